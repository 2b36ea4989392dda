"""`meditron-jax demo --quick` runs every stage and leaves every artifact."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the demo sets its own 8 simulated devices
    proc = subprocess.run([sys.executable, "-m", "cli", "demo", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_every_stage_leaves_its_artifact(demo_run):
    out, stdout = demo_run
    snapshot = out / "hf_snapshot"
    names = set(os.listdir(snapshot))
    assert {"config.json", "generation_config.json", "tokenizer.json",
            "model.safetensors.index.json"} <= names
    assert sum(n.endswith(".safetensors") for n in names) >= 2  # sharded like the hub
    assert (out / "native" / "meditron_config.json").exists()
    summary = json.loads((out / "demo_summary.json").read_text())
    for stage in ("pretrain", "sft"):
        s = summary[stage]
        losses = [json.loads(line)["loss"] for line in open(s["metrics"])
                  if '"loss"' in line]
        assert losses[-1] < losses[0], f"{stage} loss did not fall: {losses[0]} -> {losses[-1]}"
        assert os.path.getsize(s["loss_plot"]) > 1000
    # DPO from the SFT model: on the held-out pairs the reward margin rises from 0 (the
    # policy starts as its own reference) and most pairs come out preferred the right way
    evals = summary["dpo_heldout"]
    margins = [r["eval_reward_margin"] for r in evals]
    assert evals[0]["step"] == 0 and len(evals) >= 3 and margins == sorted(margins), margins
    assert margins[-1] > 0.05 and evals[-1]["eval_reward_accuracy"] > 0.6, evals[-1]
    assert "DPO" in stdout and "held-out preference pairs" in stdout
    generations = [json.loads(line) for line in open(summary["generations"])]
    assert len(generations) == 6 and all(g["completion_ids"] for g in generations)
    scores = [json.loads(line) for line in open(out / "mc_scores.jsonl")]
    assert len(scores) == 32 and all(s["logprob"] < 0 for s in scores)
    assert (out / "hf_export" / "config.json").exists()
    assert summary["export_max_abs_diff"] is not None and summary["export_max_abs_diff"] < 1e-4
    assert "6/6 summary" in stdout and "demo finished" in stdout
