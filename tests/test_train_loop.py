"""A tiny model learns the bundled corpus; the run's artifacts; a diverging run stops cleanly."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from meditron_jax.tokenizer import Tokenizer
from tests.train_support import CORPUS, tiny_run
from train.config import DataSection
from train.data import read_records
from train.loop import TrainingDiverged, run_training


def unigram_entropy(tokenizer, docs) -> float:
    """Entropy (nats) of the corpus's token frequencies: the loss of the best model
    that ignores context."""
    ids = np.concatenate([tokenizer.encode(d) + [tokenizer.eos_ids[0]] for d in docs])
    p = np.bincount(ids) / len(ids)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    root = tmp_path_factory.mktemp("learn")
    docs = read_records([CORPUS], DataSection())
    train_file, held_out = root / "train.txt", root / "heldout.txt"
    train_file.write_text("\n---\n".join(docs[:-1]))
    held_out.write_text(docs[-1])
    run = tiny_run(root / "run", model={"compute_dtype": "bfloat16"},
                   data={"train_files": [str(train_file)], "eval_file": str(held_out),
                         "seq_len": 128},
                   optim={"lr": 5e-3, "warmup_steps": 20},
                   train={"steps": 200, "grad_accum": 1, "mesh": "fsdp=1"},
                   checkpoint={"every": 100},
                   log={"eval_every": 100, "eval_batches": 2, "plot": True, "tensorboard": True})
    summary = run_training(run)
    tok = Tokenizer.from_dir(os.path.join(summary["output_dir"], "tokenizer"))
    return summary, unigram_entropy(tok, docs[:-1])


def test_loss_falls_well_below_unigram_entropy(learned):
    summary, entropy = learned
    records = [json.loads(line) for line in open(summary["metrics"])]
    train = [r["loss"] for r in records if "loss" in r]
    final = float(np.mean(train[-20:]))
    print(f"\nunigram entropy {entropy:.3f} nats/token; loss step 1 {train[0]:.3f} "
          f"(ln 512 = {np.log(512):.3f}); mean of the last 20 steps {final:.3f}; "
          f"held-out eval loss {summary['final_eval_loss']:.3f}")
    assert train[0] == pytest.approx(np.log(512), abs=0.1)  # starts at chance
    assert final < 0.8 * entropy  # uses context: well below any unigram model
    assert summary["final_eval_loss"] < train[0] - 1.0  # and generalizes to held-out text


def test_run_artifacts(learned):
    summary, _ = learned
    records = [json.loads(line) for line in open(summary["metrics"])]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 201))
    for key in ("loss", "lr", "grad_norm", "tokens", "loss_tokens"):
        assert all(np.isfinite(r[key]) for r in steps), key
    assert steps[0]["tokens_per_s"] is None and steps[5]["tokens_per_s"] > 0
    assert 0 < steps[5]["mfu"] < 1  # against log.cpu_peak_flops
    assert [r["step"] for r in records if "eval_loss" in r] == [100, 200]
    with open(summary["loss_plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    events = os.listdir(summary["tensorboard"])
    assert events and events[0].startswith("events.out.tfevents")
    assert summary["tokens_per_s"] > 0 and summary["latest_checkpoint"] == 200
    assert sorted(os.listdir(summary["checkpoints"])) == ["100", "200"]
    # the attention kernel chosen once for the step, and why (meditron_jax.kernels)
    with open(os.path.join(summary["output_dir"], "train_run.json")) as f:
        assert json.load(f)["kernels"] == {"attention": "xla", "reason": "auto on cpu"}


def test_final_model_is_a_native_checkpoint_that_loads(learned):
    """What generate/score/export and a later run's model.init_from read."""
    import jax
    from meditron_jax.io.loading import load_model
    from meditron_jax.model import abstract_params
    from train.checkpoints import Checkpointer
    summary, _ = learned
    loaded = load_model(summary["model"])
    assert loaded.kind == "native" and loaded.tokenizer is not None
    assert loaded.tokenizer.encode("malaria") == Tokenizer.from_dir(
        os.path.join(summary["output_dir"], "tokenizer")).encode("malaria")
    ckpt = Checkpointer(summary["checkpoints"], keep=2, read_only=True)
    last = ckpt.restore_params(200, abstract_params(loaded.cfg), jax.tree.map(
        lambda x: x.sharding, loaded.params))
    ckpt.close()
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(last)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # lr 1e30: the first update sends every weight to ~1e30, so step 2 overflows
    run = tiny_run(tmp_path, optim={"lr": 1e30, "warmup_steps": 0, "clip_norm": None},
                   train={"mesh": "fsdp=1", "grad_accum": 1}, checkpoint={"every": 1})
    with pytest.raises(TrainingDiverged, match=r"loss is nan .* at step 2; stopped without "
                                               r"saving it; the last complete checkpoint is "
                                               r"step 1 in "):
        run_training(run)
    assert os.listdir(tmp_path / "checkpoints") == ["1"]
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1]
