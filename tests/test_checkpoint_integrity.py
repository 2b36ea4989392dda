"""Checkpoints never load damaged and conversions never lose or mix (issue 21): per-file
checksums named on a bit flip or a truncation (and a clean Orbax error without them), a
lock that refuses a second writer and dies with its holder, a full or read-only disk
as one line with the old checkpoint intact, and the demo's trained tokenizer loading
in transformers' AutoTokenizer after an export."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import zlib

import jax
import numpy as np
import pytest

from meditron_jax import atomic
from meditron_jax.io import checkpoint, checksums
from cli import main as cli
from meditron_jax.model.config import LlamaConfig
from meditron_jax.io.convert import convert_to_native, export_to_hf
from meditron_jax.errors import UserError
from meditron_jax.io.loading import load_model
from meditron_jax.model import abstract_params
from tests import hf_fixtures
from tests.test_convert import tree_digest

TIMEOUT = 60


@pytest.fixture(scope="module")
def native(tiny_hf_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("native") / "ckpt")
    convert_to_native(tiny_hf_dir, out, quiet=True)
    return out


@pytest.fixture(scope="module")
def native_params(native):
    return jax.tree.map(np.asarray, load_model(native).params)


def _copy(src: str, dst) -> str:
    return os.fspath(shutil.copytree(src, dst))


def _largest_data_file(path: str) -> str:
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(path, "params")) for f in fs]
    return max(files, key=os.path.getsize)


def _stderr_of(argv: list[str]) -> tuple[int, str]:
    """Exit code and everything written to file descriptor 2 (loggers' handlers too)
    while the command runs in this process (outside pytest's capture)."""
    with tempfile.TemporaryFile("w+") as f:
        saved = os.dup(2)
        os.dup2(f.fileno(), 2)
        try:
            code = cli.main(argv)
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        return code, f.read().strip()


# ---- checksums ----------------------------------------------------------------------------
def test_manifest_lists_every_file_with_its_size_and_crc(native, tmp_path):
    """Every file but the manifest, each with the size and CRC-32 computed here
    independently; a checkpoint saved from arrays (training's final model) gets one too."""
    manifest = json.load(open(os.path.join(native, checksums.MANIFEST)))
    assert (manifest["format"], manifest["version"], manifest["algorithm"]) == (
        "meditron-jax-checksums", 1, "crc32")
    on_disk = {os.path.relpath(os.path.join(r, f), native): os.path.join(r, f)
               for r, _, fs in os.walk(native) for f in fs}
    assert set(manifest["files"]) == set(on_disk) - {checksums.MANIFEST}
    assert any(name.startswith("params/") for name in manifest["files"])
    for name, entry in manifest["files"].items():
        data = open(on_disk[name], "rb").read()
        assert entry == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name

    cfg = LlamaConfig.from_hf(dict(hf_fixtures.TINY_HF))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                          abstract_params(cfg))
    trained = str(tmp_path / "model")
    checkpoint.save_params(trained, cfg, params)
    assert checksums.verify(trained)
    fingerprint = checksums.digest(native)
    assert re.fullmatch(r"[0-9a-f]{16}", fingerprint) and checksums.digest(trained) != fingerprint
    assert checksums.digest(_copy(native, tmp_path / "copy")) == fingerprint  # not the path


def test_bit_flip_is_named_and_no_verify_skips_the_check(native, native_params, tmp_path):
    """Orbax stores no checksum: unverified, the flipped bit loads as a wrong weight."""
    bad = _copy(native, tmp_path / "flipped")
    victim = _largest_data_file(bad)
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(victim, "wb").write(data)
    with pytest.raises(UserError, match=rf"^{re.escape(victim)}: CRC-32 \w+ where checksums\.json "
                                        r"says \w+; the file was damaged"):
        load_model(bad)
    garbage = load_model(bad, verify=False).params
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                           garbage, native_params))
    assert any(changed), "the flip changed no weight: the test would prove nothing"

    side = _copy(native, tmp_path / "side")
    with open(os.path.join(side, "generation_config.json"), "a") as f:
        f.write(" ")
    with pytest.raises(UserError, match=r"generation_config\.json: \d+ bytes where checksums"):
        checkpoint.NativeReader(side)
    args = argparse.Namespace(model=bad, mesh=None, batch_size=1, dtype="auto", no_verify=False)
    from infer.cli_common import load_for_inference  # generate, score and eval load this way
    with pytest.raises(UserError, match="CRC-32"):
        load_for_inference(args)


def test_truncated_file_is_one_line_with_or_without_checksums(native, native_params, tmp_path,
                                                             caplog):
    bad = _copy(native, tmp_path / "truncated")
    victim = _largest_data_file(bad)
    size = os.path.getsize(victim)
    os.truncate(victim, size // 2)
    with pytest.raises(UserError, match=rf"^{re.escape(victim)}: {size // 2} bytes where "
                                        rf"checksums\.json says {size};"):
        load_model(bad)
    # Past the checksums, Orbax's own error (a tensorstore range error) is one line too.
    orbax_error = rf"^reading {re.escape(bad)}/params: .*; the checkpoint is truncated or damaged$"
    with pytest.raises(UserError, match=orbax_error):
        load_model(bad, verify=False)
    os.remove(os.path.join(bad, checksums.MANIFEST))  # as written before checksums
    with caplog.at_level(logging.WARNING, "meditron_jax.io.checkpoint"):
        with pytest.raises(UserError, match=orbax_error):
            load_model(bad)
    assert [r.getMessage() for r in caplog.records] == [
        f"{bad}: no checksums.json (written before checksums); loading it unverified"]

    old = _copy(native, tmp_path / "old")  # an intact checkpoint from before checksums loads
    os.remove(os.path.join(old, checksums.MANIFEST))
    loaded = jax.tree.map(np.asarray, load_model(old).params)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, loaded, native_params)))


def test_missing_file_or_bad_manifest_is_named(native, tmp_path):
    bad = _copy(native, tmp_path / "incomplete")
    os.remove(os.path.join(bad, "generation_config.json"))
    with pytest.raises(UserError, match=r"generation_config\.json: missing \(listed in checksums"):
        load_model(bad)
    manifest = os.path.join(bad, checksums.MANIFEST)
    for text, message in (("{", "malformed"), ('{"format": "x"}', "not a meditron-jax-checksums"),
                          (json.dumps({"format": "meditron-jax-checksums", "version": 1,
                                       "algorithm": "crc32", "files": {"a": {"size": "1"}}}),
                           "'files' must map each file to its size and crc32")):
        open(manifest, "w").write(text)
        with pytest.raises(UserError, match=rf"^{re.escape(manifest)}: {message}"):
            load_model(bad)


def test_damaged_source_is_one_cli_line_and_writes_nothing(native, tmp_path, capfd):
    bad = _copy(native, tmp_path / "bad")
    victim = _largest_data_file(bad)
    os.truncate(victim, os.path.getsize(victim) // 2)
    for verb in ("export", "convert"):
        for flags, message in (([], rf"{re.escape(victim)}: \d+ bytes where checksums\.json"),
                               (["--no-verify"], r"the checkpoint is truncated or damaged$")):
            out = str(tmp_path / f"{verb}_out")
            code = cli.main([verb, "--model", bad, "--out", out, "--quiet", *flags])
            err = capfd.readouterr().err.strip()  # loggers' output included
            assert code == 2 and len(err.splitlines()) == 1, (verb, flags, err)
            assert err.startswith(f"meditron-jax {verb}: error:") and re.search(message, err), err
            assert sorted(os.listdir(tmp_path)) == ["bad"]


# ---- one writer per destination -----------------------------------------------------------
def test_second_writer_is_refused_and_the_lock_leaves_nothing(tiny_hf_dir, native, tmp_path):
    dest = tmp_path / "a" / "b" / "ckpt"  # parents missing: created
    with atomic.locked(dest):
        for write in (lambda: convert_to_native(tiny_hf_dir, str(dest), quiet=True),
                      lambda: export_to_hf(native, str(dest), quiet=True)):
            with pytest.raises(UserError, match=rf"^{re.escape(str(dest))} is being written by "
                                                rf"pid {os.getpid()} on "):
                write()
    assert os.listdir(dest.parent) == []
    convert_to_native(tiny_hf_dir, str(dest), quiet=True)
    assert os.listdir(dest.parent) == ["ckpt"] and checksums.verify(dest)


def test_lock_dies_with_its_holder(tmp_path):
    """A SIGKILLed holder leaves its lock file but no lock: the next writer takes it."""
    dest = tmp_path / "out"
    holder = ("import sys, time\nfrom meditron_jax import atomic\n"
              "with atomic.locked(sys.argv[1]):\n"
              "    print('held', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(dest)], stdout=subprocess.PIPE,
                            text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        ready, _, _ = select.select([proc.stdout], [], [], TIMEOUT)
        assert ready and proc.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"is being written by pid {proc.pid} on "):
            with atomic.locked(dest):
                pass
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=TIMEOUT)
        assert os.listdir(tmp_path) == [".out.lock"]  # the dead holder's file, inert
        with atomic.locked(dest):
            assert open(tmp_path / ".out.lock").read().startswith(f"pid {os.getpid()} on ")
        assert os.listdir(tmp_path) == []
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)


def test_file_system_without_flock_warns_and_writes(tmp_path, monkeypatch, caplog):
    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(atomic.fcntl, "flock", unsupported)
    with caplog.at_level(logging.WARNING, "meditron_jax.atomic"):
        with atomic.locked(tmp_path / "out"):
            (tmp_path / "out").mkdir()
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path}/.out.lock: the file system cannot lock (No locks available); nothing stops "
        "a second writer"]
    assert os.listdir(tmp_path) == ["out"]


# ---- full and read-only disks -------------------------------------------------------------
def _unshare() -> list[str] | None:
    """A command prefix running in a mount namespace of its own (root: as is; others:
    mapped to root in a user namespace), or None where the system allows neither."""
    if not (shutil.which("unshare") and shutil.which("mount")):
        return None
    prefix = ["unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--map-root-user"])
    try:
        ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=TIMEOUT).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return prefix if ok else None


def _fs_faults(model: str, good: str, mount: str) -> None:
    """Runs inside the mount namespace: a tmpfs just big enough for the good checkpoint
    and half another, convert and export onto it (full), then the same read-only; prints
    each command's exit code and stderr, whether the good checkpoint is unchanged, and
    what is left on the file system."""
    used = sum(-(-os.path.getsize(os.path.join(r, f)) // 4096) * 4096
               for r, _, fs in os.walk(good) for f in fs)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + 160 * 1024}", "tmpfs", mount],
                   check=True)
    dest = shutil.copytree(good, os.path.join(mount, "ckpt"))
    before = tree_digest(dest)
    runs, hf = [], os.path.join(mount, "hf")
    for readonly in (False, True):
        if readonly:
            subprocess.run(["mount", "-o", "remount,ro", mount], check=True)
        runs.append(_stderr_of(["convert", "--model", model, "--out", dest, "--overwrite", "--quiet"]))
        runs.append(_stderr_of(["export", "--model", dest, "--out", hf, "--quiet"]))
    print(json.dumps({"runs": runs, "unchanged": tree_digest(dest) == before,
                      "left": sorted(os.listdir(mount))}))


def test_full_or_read_only_disk_is_one_line_and_keeps_the_old_checkpoint(tiny_hf_dir, native,
                                                                         tmp_path):
    prefix = _unshare()
    if prefix is None:
        pytest.skip("needs unshare and mount namespaces to mount a small tmpfs")
    mount = tmp_path / "fs"
    mount.mkdir()
    code = (f"from tests.test_checkpoint_integrity import _fs_faults; "
            f"_fs_faults({tiny_hf_dir!r}, {native!r}, {str(mount)!r})")
    proc = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)),
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    (full_convert, full_export, ro_convert, ro_export) = result["runs"]
    for code_, err in result["runs"]:
        assert code_ == 2 and len(err.splitlines()) == 1, err
    assert re.search(r"^meditron-jax convert: error: writing .*/ckpt: .*: No space left on device$",
                     full_convert[1]), full_convert
    assert re.search(r"^meditron-jax export: error: writing .*/hf: .*No space left on device$",
                     full_export[1]), full_export
    for verb, (_, err) in (("convert", ro_convert), ("export", ro_export)):
        assert re.search(rf"^meditron-jax {verb}: error: --out .*: .*/fs is on a read-only file "
                         r"system$", err), err
    assert result["unchanged"] and result["left"] == ["ckpt"]


# ---- the demo's trained tokenizer, exported ----------------------------------------------
def test_exported_bpe_tokenizer_loads_in_autotokenizer_and_encodes_like_ours(tmp_path):
    from transformers import AutoTokenizer

    from meditron_jax.tokenizer import Tokenizer
    from train.bpe import train_bpe
    import meditron_jax
    corpus = os.path.join(os.path.dirname(meditron_jax.__file__), "data", "clinical_corpus.txt")
    texts = [t for t in open(corpus, encoding="utf-8").read().split("\n---\n") if t.strip()]
    tok_dir = train_bpe(texts, 300, str(tmp_path / "tokenizer"))
    ours = Tokenizer.from_dir(tok_dir)
    cfg = LlamaConfig.from_hf({**hf_fixtures.TINY_HF, "vocab_size": ours.vocab_size,
                               "bos_token_id": ours.bos_id, "eos_token_id": ours.eos_ids[0]})
    params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract_params(cfg))
    checkpoint.save_params(tmp_path / "native", cfg, params, source_dir=tok_dir)
    export_to_hf(str(tmp_path / "native"), str(tmp_path / "hf"), quiet=True)

    auto = AutoTokenizer.from_pretrained(tmp_path / "hf")  # "Unk token <unk> not found" before
    exported = Tokenizer.from_dir(tmp_path / "hf")
    samples = ["The patient presented with fever and a productive cough.", " leading space",
               "dose: 2.5 mg/kg, twice daily\nthen stop", "café – naïve 😀",
               "<|begin_of_text|>a<|end_of_text|>b", ""]
    for text in samples:
        want = ours.encode(text)
        assert want == [ours.bos_id] + ours.encode(text, add_bos=False)  # bos once
        assert auto(text).input_ids == exported.encode(text) == want, text
        assert auto(text, add_special_tokens=False).input_ids == ours.encode(text, add_bos=False)
        assert auto.decode(want, skip_special_tokens=True) == ours.decode(want), text
    assert (auto.bos_token_id, auto.eos_token_id) == (ours.bos_id, ours.eos_ids[0])


def test_training_from_a_damaged_checkpoint_is_one_line(native, tiny_hf_dir, tmp_path):
    """train verifies a native ``model.init_from`` like every other command, before any
    compile; ``model.verify: false`` is its opt-out (the same keyword as load_model's)."""
    from tests.train_support import tiny_run
    from train.loop import run_training
    bad = _copy(native, tmp_path / "flipped")
    victim = _largest_data_file(bad)
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0x10
    open(victim, "wb").write(data)
    run = tiny_run(tmp_path / "run", model={"preset": None, "init_from": bad,
                                            "compute_dtype": "float32"},
                   data={"seq_len": 16, "tokenizer": hf_fixtures.add_word_tokenizer(
                       tiny_hf_dir, tmp_path / "tok", ["fever", "cough"])},
                   train={"steps": 1, "mesh": "fsdp=1"})
    with pytest.raises(UserError, match=rf"^{re.escape(victim)}: CRC-32"):
        run_training(run)
    assert tiny_run(tmp_path / "run2", model={"verify": False}).model.verify is False
