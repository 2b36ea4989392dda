"""Sweeps never serve stale or mixed results: ``generate`` and ``score`` record their
settings and the model's fingerprint beside ``--out``, refuse to resume under other
ones (one line naming what differs, the old results untouched), start over with
``--overwrite``, and refuse an ``--out`` they cannot use before loading the model."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from infer import cli_common
from meditron_jax.io.loading import model_fingerprint
from infer.sweep import SETTINGS_SUFFIX, ResumableOutput
from cli import main as cli
from meditron_jax.errors import UserError
from tests import hf_fixtures

PROMPTS = [{"id": f"p{i}", "prompt_ids": [1] + [(11 * i + j) % 250 + 3 for j in range(3 + i)]}
           for i in range(4)]
REQUESTS = [{"id": f"r{i}", "context_ids": [1, 7 + i, 9], "continuation_ids": [20 + i, 4]}
            for i in range(4)]
GENERATE = ["--max-new-tokens", "6", "--batch-size", "2", "--temperature", "0.8", "--seed", "3"]


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _files(out) -> tuple[bytes | None, bytes | None]:
    """The output and its settings, as bytes (None: absent)."""
    paths = (str(out), f"{out}{SETTINGS_SUFFIX}")
    return tuple(open(p, "rb").read() if os.path.exists(p) else None for p in paths)


def _generate(model, src, out, *extra) -> int:
    return cli.main(["generate", "--model", model, "--prompts", src, "--out", str(out),
                     *GENERATE, *extra])


def _score(model, src, out, *extra) -> int:
    return cli.main(["score", "--model", model, "--input", src, "--out", str(out),
                     "--batch-size", "2", *extra])


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Same architecture, other weights."""
    return hf_fixtures.make_hf_snapshot(tmp_path_factory.mktemp("other"), seed=1)


@pytest.fixture(scope="module")
def sweeps(tiny_hf_dir, other_model, tmp_path_factory):
    """Finished generate and score sweeps of both models (reference outputs)."""
    tmp = tmp_path_factory.mktemp("sweeps")
    src, req = _write(tmp / "prompts.jsonl", PROMPTS), _write(tmp / "requests.jsonl", REQUESTS)
    runs = {}
    for name, model in (("a", tiny_hf_dir), ("b", other_model)):
        assert _generate(model, src, tmp / f"gen_{name}.jsonl") == 0
        assert _score(model, req, tmp / f"score_{name}.jsonl") == 0
        runs[name] = {kind: _files(tmp / f"{kind}_{name}.jsonl") for kind in ("gen", "score")}
    assert runs["a"]["gen"] != runs["b"]["gen"] and runs["a"]["score"] != runs["b"]["score"]
    return src, req, runs


def _place(files: tuple, out, keep_lines: int | None = None) -> None:
    """Copy a reference sweep's files to ``out`` (only its first lines: a killed run)."""
    output, settings = files
    if keep_lines is not None:
        output = b"".join(output.splitlines(keepends=True)[:keep_lines])
    out.write_bytes(output)
    open(f"{out}{SETTINGS_SUFFIX}", "wb").write(settings)


# ---- the model fingerprint -----------------------------------------------------------------
def test_fingerprint_follows_what_the_checkpoint_computes(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"hidden_size": 64}')
    (hf / "model.safetensors").write_bytes(b"w" * 100)
    (hf / "tokenizer.json").write_text('{"vocab": 1}')
    base = model_fingerprint(str(hf))
    moved = shutil.copytree(hf, tmp_path / "elsewhere")
    (moved / "README.md").write_text("notes")
    (moved / ".cache").mkdir()
    (moved / ".cache" / "download.metadata").write_text("etag, time")
    assert model_fingerprint(str(moved)) == base          # where it lives, docs: no matter
    for name, data in [("config.json", b'{"hidden_size": 65}'), ("model.safetensors", b"w" * 99),
                       ("tokenizer.json", b'{"vocab": 2}'), ("generation_config.json", b"{}"),
                       ("model-00002-of-00002.safetensors", b"")]:
        changed = shutil.copytree(hf, tmp_path / f"changed_{name}")
        (changed / name).write_bytes(data)
        assert model_fingerprint(str(changed)) != base, name

    native = tmp_path / "native"
    (native / "params" / "d").mkdir(parents=True)
    (native / "meditron_config.json").write_text('{"format": "meditron-jax"}')
    (native / "params" / "d" / "chunk").write_bytes(b"x" * 64)
    (native / "checksums.json").write_text('{"params/d/chunk": "aaaa"}')
    seen = {model_fingerprint(str(native))}
    (native / "params" / "d" / "chunk").write_bytes(b"y" * 64)      # same size, other weights
    seen.add(model_fingerprint(str(native)))
    (native / "checksums.json").write_text('{"params/d/chunk": "bbbb"}')   # a manifest
    seen.add(model_fingerprint(str(native)))
    (native / "params" / "d" / "chunk").write_bytes(b"y" * 65)
    seen.add(model_fingerprint(str(native)))
    assert len(seen) == 4


def test_fingerprint_samples_large_weight_files(tmp_path):
    """Two fine-tunes of one model: same config, same sizes, other bytes (read: 64 KiB)."""
    for name, byte in (("a", 0), ("b", 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        weights = bytearray(16 << 20)
        weights[(9 << 20) + 100] = byte          # inside the 10th of 16 sampled blocks
        (tmp_path / name / "model.safetensors").write_bytes(weights)
    assert model_fingerprint(str(tmp_path / "a")) != model_fingerprint(str(tmp_path / "b"))
    with pytest.raises(UserError, match="neither a Hugging Face snapshot"):
        model_fingerprint(str(tmp_path))


# ---- refusing to resume under other settings ---------------------------------------------------
@pytest.mark.parametrize("kind", ["gen", "score"])
def test_another_model_is_refused_and_overwrite_starts_over(sweeps, tiny_hf_dir, other_model,
                                                             tmp_path, capsys, kind):
    """Before: exit 0, every id skipped, model A's results kept under model B's name."""
    src, req, runs = sweeps
    run = _generate if kind == "gen" else _score
    source = src if kind == "gen" else req
    out = tmp_path / "out.jsonl"
    for keep in (None, 2):                    # finished, and half-finished (killed) sweeps
        _place(runs["a"][kind], out, keep)
        before = _files(out)
        assert run(other_model, source, out) == 2
        err = _error(capsys)
        assert "holds results of a run with other settings (model differ)" in err, err
        assert "pass --overwrite to start over" in err
        assert _files(out) == before                                  # untouched
    assert run(other_model, source, out, "--overwrite") == 0
    assert "skipped=0 total=4" in capsys.readouterr().err
    assert _files(out) == runs["b"][kind]                              # B's results only
    assert run(tiny_hf_dir, source, out) == 2                          # and now A is refused
    assert "(model differ)" in _error(capsys)


@pytest.mark.parametrize("extra, differ", [
    (["--temperature", "0.5"], "temperature"),
    (["--top-k", "5", "--top-p", "0.9"], "top_k, top_p"),
    (["--seed", "4"], "seed"),
    (["--max-new-tokens", "7"], "max_new_tokens"),
    (["--stop", "x"], "stop"),
    (["--truncate-prompt"], "truncate_prompt"),
    (["--dtype", "bfloat16"], "dtype"),
])
def test_other_sampling_settings_are_refused(sweeps, tiny_hf_dir, tmp_path, capsys, extra,
                                             differ):
    src, _, runs = sweeps
    out = tmp_path / "out.jsonl"
    _place(runs["a"]["gen"], out, keep_lines=2)
    before = _files(out)
    assert _generate(tiny_hf_dir, src, out, *extra) == 2
    assert f"other settings ({differ} differ)" in _error(capsys)
    assert _files(out) == before


def test_how_the_work_is_laid_out_is_not_a_setting(sweeps, tiny_hf_dir, tmp_path, capsys):
    """Batch size and mesh do not change results: a half-finished sweep resumes under
    other ones to the uninterrupted output."""
    src, _, runs = sweeps
    out = tmp_path / "out.jsonl"
    _place(runs["a"]["gen"], out, keep_lines=1)
    assert _generate(tiny_hf_dir, src, out, "--batch-size", "1") == 0
    assert "skipped=1 " in capsys.readouterr().err
    assert _files(out) == runs["a"]["gen"]
    _place(runs["a"]["score"], out, keep_lines=2)
    assert _score(tiny_hf_dir, sweeps[1], out, "--mesh", "data=2") == 0
    assert "skipped=2 " in capsys.readouterr().err
    rows = [json.loads(line) for line in open(out)]
    want = [json.loads(line) for line in runs["a"]["score"][0].splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in want]
    for got, ref in zip(rows, want):
        assert got["logprob"] == pytest.approx(ref["logprob"], abs=1e-5)
        assert (got["num_tokens"], got["greedy"]) == (ref["num_tokens"], ref["greedy"])


def test_results_without_a_settings_record_are_refused(sweeps, tiny_hf_dir, tmp_path, capsys):
    """An output written by an older version, or by hand: nothing says what made it."""
    src, _, runs = sweeps
    out = tmp_path / "out.jsonl"
    out.write_bytes(runs["a"]["gen"][0])
    assert _generate(tiny_hf_dir, src, out) == 2
    assert "holds results but no record of the settings that made them (no out.jsonl" \
        ".settings.json); pass --overwrite" in _error(capsys)
    assert not os.path.exists(f"{out}{SETTINGS_SUFFIX}")


# ---- the output file itself: checked before the model loads -------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")
    monkeypatch.setattr(cli_common, "load_model", load_model)


def _read_only_dir(tmp_path) -> str:
    """A directory this process cannot create files in (root ignores permissions: /sys)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    return str(locked) if not os.access(locked, os.W_OK) else "/sys"


@pytest.mark.parametrize("command", ["generate", "score"])
def test_unusable_out_is_one_line_before_loading(sweeps, tiny_hf_dir, tmp_path, capsys,
                                                 no_model_load, command):
    src = sweeps[0] if command == "generate" else sweeps[1]
    flag = "--prompts" if command == "generate" else "--input"
    text = open(src, "rb").read()
    link = tmp_path / "link.jsonl"
    link.symlink_to(src)
    (tmp_path / "a_dir").mkdir()
    for out, message in [
        (src, "is the input file; give another path"),
        (str(link), "is the input file"),
        (str(tmp_path / "a_dir"), "a_dir: is a directory; --out takes a JSONL file path"),
        (str(tmp_path / "missing" / "o.jsonl"), "does not exist; create it first"),
        (os.path.join(_read_only_dir(tmp_path), "o.jsonl"),
         "o.jsonl: cannot write there (Permission denied); give a writable --out"),
    ]:
        assert cli.main([command, "--model", tiny_hf_dir, flag, src, "--out", out]) == 2
        err = _error(capsys)
        assert message in err, (out, err)
        assert open(src, "rb").read() == text                          # input untouched
    assert not os.listdir(tmp_path / "a_dir")


def test_overwrite_needs_out(tiny_hf_dir, capsys):
    assert cli.main(["generate", "--model", tiny_hf_dir, "--prompt", "x", "--overwrite"]) == 2
    assert "--overwrite goes with --out" in _error(capsys)


# ---- the pieces ------------------------------------------------------------------------------
def test_overwrite_never_removes_what_another_run_is_writing(tmp_path):
    path = str(tmp_path / "o.jsonl")
    with ResumableOutput(path, settings={"seed": 1}) as out:
        out.write([{"id": 1}])
        before = _files(path)
        with pytest.raises(UserError, match="another run is writing this file"):
            ResumableOutput(path, settings={"seed": 2}, overwrite=True)
        assert _files(path) == before
    with ResumableOutput(path, settings={"seed": 2}, overwrite=True) as out:
        assert out.done == set()
    assert _files(path) == (b"", b'{\n  "seed": 2\n}\n')


def test_settings_without_results_are_replaced(tmp_path):
    """A run that stopped before its first record (say, a checkpoint that failed to
    load) leaves settings but no results: a run with other settings may take over."""
    path = str(tmp_path / "o.jsonl")
    ResumableOutput(path, settings={"seed": 1}).close()
    with ResumableOutput(path, settings={"seed": 2}) as out:
        out.write([{"id": "x"}])
    with pytest.raises(UserError, match=r"other settings \(seed differ\)"):
        ResumableOutput(path, settings={"seed": 1})
    # A non-writer process (multi-host) reads, checks, and never writes.
    with pytest.raises(UserError, match=r"other settings \(seed differ\)"):
        ResumableOutput(path, writer=False, settings={"seed": 3})
    assert json.load(open(f"{path}{SETTINGS_SUFFIX}")) == {"seed": 2}
