"""A resumable sweep run by two processes (``jax.distributed`` on localhost, gloo, one
mesh over both processes' CPU devices) writes the file one process writes: every id
once, the same completions and scores, from scratch and when resuming a half-finished
file. A refusal on one process (the output locked by another run) or on all of them
(other settings) is an error on every process, never a hang."""
from __future__ import annotations

import fcntl
import json
import os
import shutil

import pytest

from infer.sweep import SETTINGS_SUFFIX
from cli import main as cli
from tests.multihost_support import run_processes

MESH = "data=2,tensor=2"   # two devices in each process; one process uses 4 of its 8
# 10-15 tokens: one prefill and one scoring shape to compile
PROMPTS = [{"id": f"p{i}", "prompt_ids": [1] + [(13 * i + j) % 250 + 3 for j in range(9 + i)]}
           for i in range(6)]
REQUESTS = [{"id": i, "context_ids": [1] + [(5 * i + j) % 250 + 3 for j in range(7 + i)],
             "continuation_ids": [40 + i, 7]} for i in range(6)]
COMMON = ["--batch-size", "2", "--mesh", MESH]
SAMPLING = ["--max-new-tokens", "6", "--temperature", "0.8", "--top-k", "20", "--seed", "5"]


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _read(path) -> tuple[bytes, bytes]:
    return tuple(open(p, "rb").read() for p in (path, f"{path}{SETTINGS_SUFFIX}"))


def _half(ref: str, out: str, lines: int) -> None:
    """What a sweep killed mid-write leaves: its first lines, a torn one, its settings."""
    with open(ref, "rb") as f:
        text = b"".join(f.readlines()[:lines])
    with open(out, "wb") as f:
        f.write(text + b'{"id": "p5", "comple')
    shutil.copy(f"{ref}{SETTINGS_SUFFIX}", f"{out}{SETTINGS_SUFFIX}")




@pytest.fixture(scope="module")
def sweeps(tiny_hf_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost_sweep")
    src, req = _write(tmp / "prompts.jsonl", PROMPTS), _write(tmp / "requests.jsonl", REQUESTS)
    p = {name: str(tmp / f"{name}.jsonl") for name in
         ("ref_gen", "ref_score", "fresh_gen", "half_gen", "half_score", "locked")}
    generate = ["generate", "--model", tiny_hf_dir, "--prompts", src, *COMMON, *SAMPLING]
    score = ["score", "--model", tiny_hf_dir, "--input", req, *COMMON]
    assert cli.main([*generate, "--out", p["ref_gen"]]) == 0     # one process
    assert cli.main([*score, "--out", p["ref_score"]]) == 0
    _half(p["ref_gen"], p["half_gen"], 2)
    _half(p["ref_score"], p["half_score"], 3)
    cases = {
        "locked": [*generate, "--out", p["locked"]],
        "fresh": [*generate, "--out", p["fresh_gen"]],
        "resume": [*generate, "--out", p["half_gen"]],
        "other_seed": [*generate, "--seed", "6", "--out", p["fresh_gen"]],
        "score_resume": [*score, "--out", p["half_score"]],
    }
    with open(tmp / "cases.json", "w") as f:
        json.dump(list(cases.values()), f)
    with open(p["locked"], "a") as held:      # another run is writing this one
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        run_processes("tests.multihost_sweep_worker",
                      [str(tmp / "cases.json"), str(tmp / "result{i}.json")], tmp)
    results = [json.load(open(tmp / f"result{i}.json")) for i in range(2)]
    return p, [dict(zip(cases, r)) for r in results]


def test_two_processes_write_what_one_process_writes(sweeps):
    paths, results = sweeps
    for name in ("fresh", "resume", "score_resume"):
        assert [r[name][0] for r in results] == [0, 0], (name, results)
    ref_gen, ref_score = _read(paths["ref_gen"]), _read(paths["ref_score"])
    assert _read(paths["fresh_gen"]) == ref_gen                 # byte for byte, settings too
    assert _read(paths["half_gen"]) == ref_gen                  # resumed: each id once
    assert _read(paths["half_score"]) == ref_score
    assert len(ref_gen[0].splitlines()) == len(PROMPTS)
    assert len(ref_score[0].splitlines()) == len(REQUESTS)
    assert "skipped=2 total=6" in results[0]["resume"][1]
    assert "skipped=3 total=6" in results[0]["score_resume"][1]


def test_a_refusal_stops_every_process(sweeps):
    paths, results = sweeps
    (code0, err0), (code1, err1) = (r["locked"] for r in results)
    assert (code0, code1) == (2, 2)
    assert "another run is writing this file" in err0, err0
    assert "another process could not open this output" in err1, err1
    assert os.path.getsize(paths["locked"]) == 0
    for code, err in (r["other_seed"] for r in results):
        assert code == 2 and "other settings (seed differ)" in err, err
    assert _read(paths["fresh_gen"]) == _read(paths["ref_gen"])  # untouched by the refusal
