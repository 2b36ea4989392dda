"""Resumable sweeps: a real subprocess killed with SIGKILL midway and rerun gives every
id exactly once and the uninterrupted run's outputs; JSONL errors name file and line;
torn tails, duplicate ids and concurrent writers are handled."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from infer.sweep import SETTINGS_SUFFIX, ResumableOutput, id_key, read_requests, run_sweep
from cli import main as cli
from meditron_jax.errors import UserError
from meditron_jax.jsonl import drop_torn_tail, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _rows(path) -> list[dict]:
    return [r for _, r in read_jsonl(path)]


# ---- the kill test --------------------------------------------------------------------------
PROMPTS = [{"id": f"p{i}", "prompt_ids": [1] + [(7 * i + j) % 250 + 3 for j in range(2 + i % 13)]}
           for i in range(40)]
ARGS = ["--prompts", "{src}", "--out", "{out}", "--max-new-tokens", "24", "--batch-size", "2",
        "--mesh", "data=2"]


def _args(src, out):
    return [a.format(src=src, out=out) for a in ARGS]


def test_sigkill_midway_then_rerun_gives_each_id_once(tiny_hf_dir, tmp_path):
    src = _write(tmp_path / "prompts.jsonl", PROMPTS)
    ref, out = str(tmp_path / "ref.jsonl"), str(tmp_path / "out.jsonl")
    assert cli.main(["generate", "--model", tiny_hf_dir] + _args(src, ref)) == 0
    command = [sys.executable, "-m", "cli", "generate", "--model", tiny_hf_dir]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.Popen(command + _args(src, out), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if os.path.exists(out) and open(out).read().count("\n") >= 2:
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the sweep finished before it could be killed: " + \
            proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stderr.close()
    first = _rows(out) if os.path.getsize(out) else []
    assert 0 < len(first) < len(PROMPTS)
    with open(out, "a") as f:   # what a kill in the middle of a write leaves behind
        f.write('{"id": "p39", "completion": null, "completion_')
    rerun = subprocess.run(command + _args(src, out), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"skipped={len(first)} " in rerun.stderr.strip().splitlines()[-1]
    got = _rows(out)
    assert sorted(r["id"] for r in got) == sorted(p["id"] for p in PROMPTS)  # each id once
    assert got[:len(first)] == first                                        # nothing lost
    by_id = {r["id"]: r for r in _rows(ref)}
    assert all(r == by_id[r["id"]] for r in got)


def test_sampled_sweep_resumes_to_the_same_samples(tiny_hf_dir, tmp_path):
    """Each prompt's random stream comes from its id, so a resumed sampled sweep (other
    batches, other neighbours) matches the uninterrupted one."""
    src = _write(tmp_path / "p.jsonl", PROMPTS[:4])
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    sampling = ["--temperature", "0.9", "--top-k", "40", "--top-p", "0.95", "--seed", "3"]
    args = ["generate", "--model", tiny_hf_dir, "--prompts", src, "--max-new-tokens", "6",
            "--batch-size", "2"] + sampling
    assert cli.main(args + ["--out", str(full)]) == 0
    lines = full.read_text().splitlines(keepends=True)
    part.write_text(lines[2] + lines[0])
    shutil.copy(f"{full}{SETTINGS_SUFFIX}", f"{part}{SETTINGS_SUFFIX}")
    assert cli.main(args + ["--out", str(part)]) == 0
    assert sorted(_rows(part), key=lambda r: r["id"]) == sorted(_rows(full),
                                                               key=lambda r: r["id"])


# ---- the pieces -------------------------------------------------------------------------------
def test_read_requests_checks_ids(tmp_path):
    parse = lambda record, where: record
    ok = _write(tmp_path / "ok.jsonl", [{"id": 1}, "", {"id": "1"}, {"id": "x"}])
    assert [r["id"] for r in read_requests(ok, parse)] == [1, "1", "x"]   # 1 and "1" differ
    for lines, message in [
        ([{"id": 1}, "{oops"], "bad.jsonl:2: malformed JSON"),
        ([{"id": 1}, [1, 2]], "bad.jsonl:2: expected a JSON object"),
        ([{"id": 1}, {"x": 2}], 'bad.jsonl:2: missing "id"'),
        ([{"id": 1}, {"id": None}], '"id" must be a non-empty string or an integer'),
        ([{"id": 1}, {"id": True}], '"id" must be a non-empty string or an integer'),
        ([{"id": "a"}, {"id": 2}, {"id": "a"}], 'bad.jsonl:3: duplicate id "a" (first on line 1)'),
        ([], "no requests"),
    ]:
        with pytest.raises(UserError, match=None) as err:
            read_requests(_write(tmp_path / "bad.jsonl", lines), parse)
        assert message in str(err.value), (message, str(err.value))
    with pytest.raises(UserError, match="no such file"):
        read_requests(str(tmp_path / "missing.jsonl"), parse)


def test_torn_tail_is_dropped_and_nothing_else(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text('{"id": 1}\n{"id": 2}\n{"id": 3')
    assert drop_torn_tail(path) == len('{"id": 3')
    assert path.read_text() == '{"id": 1}\n{"id": 2}\n'
    assert drop_torn_tail(path) == 0
    path.write_text('{"id": 3}')                       # complete JSON, but no newline
    assert drop_torn_tail(path) == len('{"id": 3}') and path.read_text() == ""


def test_resumable_output_skips_done_ids_and_never_writes_twice(tmp_path):
    path = tmp_path / "o.jsonl"
    path.write_text('{"id": "a", "v": 1}\n{"id": 2, "v": 2}\n{"id": "c", "v"')
    items = [{"id": i} for i in ["a", 2, "c", "d", "e"]]
    seen = []

    def process(batch):
        seen.append([it["id"] for it in batch])
        return [{"id": it["id"], "v": 0} for it in batch], len(batch)

    with ResumableOutput(str(path)) as out:
        assert out.done == {id_key("a"), id_key(2)}
        stats = run_sweep(items, key=lambda it: it["id"], batch_size=2, process=process, out=out)
        with pytest.raises(RuntimeError, match="twice"):
            out.write([{"id": "d"}])
    assert seen == [["c", "d"], ["e"]]
    assert (stats.total, stats.skipped, stats.done, stats.tokens) == (5, 2, 3, 3)
    assert [r["id"] for r in _rows(path)] == ["a", 2, "c", "d", "e"]


def test_resumable_output_refuses_a_second_writer_and_corrupt_files(tmp_path):
    path = tmp_path / "o.jsonl"
    with ResumableOutput(str(path)):
        with pytest.raises(UserError, match="another run is writing this file"):
            ResumableOutput(str(path))
    path.write_text('{"id": 1}\n{"id": 1}\n')
    with pytest.raises(UserError, match="o.jsonl:2: id 1 appears twice"):
        ResumableOutput(str(path))
    path.write_text('{"id": 1}\nnot json\n{"id": 2}\n')
    with pytest.raises(UserError, match="o.jsonl:2: malformed JSON"):
        ResumableOutput(str(path))
    assert path.read_text() == '{"id": 1}\nnot json\n{"id": 2}\n'   # left for the user
    with pytest.raises(UserError, match="does not exist"):
        ResumableOutput(str(tmp_path / "no" / "dir.jsonl"))


def test_a_non_writer_process_reads_without_touching_the_file(tmp_path):
    """Multi-host: processes other than 0 see the same done ids and write nothing."""
    path = tmp_path / "o.jsonl"
    text = '{"id": "a"}\n{"id": "b"}\n{"id": "c", "v'
    path.write_text(text)
    with ResumableOutput(str(path), writer=False) as out:
        assert out.done == {id_key("a"), id_key("b")}
        out.write([{"id": "c"}])
        assert id_key("c") in out.done
    assert path.read_text() == text
    with ResumableOutput(str(path), writer=True) as out:
        assert out.done == {id_key("a"), id_key("b")}
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'
