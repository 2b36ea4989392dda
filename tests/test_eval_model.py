"""``meditron-jax eval`` on a random tiny model: option log-likelihoods against
transformers, a planted answer that must score 100%, checkpoint comparison, and a
resume after SIGKILL that counts every item once."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from infer.eval_tasks import TASKS, fewshot_context, load_items, pick_shots
from cli import main as cli
from tests.eval_fixtures import make_eval_snapshot, sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANTED_WORD = "referral"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """ckpts/step_0: random std-0.25 model; ckpts/step_1000: the same model with a planted
    continuation (the token " referral" is ~e^80 times likelier than any other, at every
    position, whatever the input)."""
    import torch
    from transformers import LlamaForCausalLM
    from meditron_jax.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("eval_model")
    random_dir = make_eval_snapshot(root / "ckpts" / "step_0")
    planted_dir = str(root / "ckpts" / "step_1000")
    (word,) = Tokenizer.from_dir(random_dir).encode(" " + PLANTED_WORD, add_bos=False)
    model = LlamaForCausalLM.from_pretrained(random_dir, dtype=torch.float32)
    with torch.no_grad():
        d0 = 0
        # A huge constant feature dominates the residual stream, the final norm keeps
        # only it, and the head maps it to one token.
        model.model.embed_tokens.weight[:, d0] = 1000.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[d0] = 1.0
        model.lm_head.weight[:, d0] = 0.0
        model.lm_head.weight[word, d0] = 10.0
    model.save_pretrained(planted_dir, safe_serialization=True)
    shutil.copy(os.path.join(random_dir, "tokenizer.json"), planted_dir)
    return {"root": str(root), "random": random_dir, "planted": planted_dir, "word": word}


@pytest.fixture(scope="module")
def reference(ckpts):
    """transformers' model and tokenizer on the same files (an independent scorer)."""
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    model = LlamaForCausalLM.from_pretrained(ckpts["random"], dtype=torch.float32,
                                             attn_implementation="sdpa").eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ckpts["random"], "tokenizer.json"))
    return model, tok


def torch_option_lls(reference, context: str, options) -> list[float]:
    """log p(" " + option | context) from transformers' logits, split like lm-eval (all
    options in one batch, right-padded: causal attention never sees the padding)."""
    import torch
    model, tok = reference
    ctx = tok(context).input_ids
    wholes = [tok(context + " " + option).input_ids for option in options]
    assert all(w[:len(ctx)] == ctx for w in wholes)
    batch = torch.zeros((len(wholes), max(map(len, wholes))), dtype=torch.long)
    for r, w in enumerate(wholes):
        batch[r, :len(w)] = torch.tensor(w)
    with torch.no_grad():
        logp = torch.log_softmax(model(batch).logits.double(), -1)
    return [float(sum(logp[r, i - 1, w[i]] for i in range(len(ctx), len(w))))
            for r, w in enumerate(wholes)]


def read_items(out_dir):
    with open(os.path.join(out_dir, "items.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("task,data,fmt,shots,mesh,choices", [
    ("medqa", "medqa", "mcq", 1, "data=2,tensor=2", "ABCD"),
    ("mmlu", "mmlu_medical", "cloze", 2, None, None),
    ("mmlu", "mmlu_medical", "mcq", 2, "data=2,tensor=2", "ABCD"),
    ("pubmedqa", "pubmedqa", "mcq", 1, None, ("yes", "no", "maybe")),
], ids=["medqa-mcq", "mmlu-cloze", "mmlu-mcq", "pubmedqa"])
def test_option_loglikelihoods_match_transformers(ckpts, reference, tmp_path, task, data, fmt,
                                                  shots, mesh, choices):
    """Each option's log-likelihood equals transformers' on the same prompt; acc and
    acc_norm (argmax of the summed, and of the per-character, log-likelihood) equal an
    independent computation from transformers' numbers."""
    argv = ["eval", "--model", ckpts["random"], "--task", task, "--data", sample(data),
            "--format", fmt, "--shots", str(shots), "--limit", "6", "--out", str(tmp_path)]
    assert cli.main(argv + (["--mesh", mesh] if mesh else [])) == 0
    records = read_items(tmp_path / "step_0" / task)
    pool = load_items(TASKS[task], sample(data), fmt)
    assert [r["id"] for r in records] == list(range(6))
    hits = {"acc": [], "acc_norm": []}
    for rec, item in zip(records, pool[:6]):
        assert choices is None or item.choices == tuple(choices)
        context = fewshot_context(item, pick_shots(item, pool, shots, same_file=True))
        expected = np.asarray(torch_option_lls(reference, context, item.choices))
        np.testing.assert_allclose(rec["loglikelihoods"], expected, atol=1e-4, rtol=0)
        pred = int(np.argmax(expected))
        pred_norm = int(np.argmax(expected / [len(c) for c in item.choices]))
        assert (rec["pred"], rec["pred_norm"], rec["gold"]) == (pred, pred_norm, item.gold)
        hits["acc"].append(pred == item.gold)
        hits["acc_norm"].append(pred_norm == item.gold)
    summary = json.loads((tmp_path / "step_0" / task / "summary.json").read_text())
    assert summary["n"] == 6
    for metric, h in hits.items():
        assert summary[metric] == pytest.approx(np.mean(h), abs=1e-12), metric


def test_planted_answer_scores_100_percent_and_checkpoints_compare(ckpts, tmp_path, capsys):
    """Every option is one token; the planted word is the right one, at a different
    position in each question: the planted checkpoint must get all of them, while the
    random one is near chance."""
    from meditron_jax.tokenizer import Tokenizer
    tok = Tokenizer.from_dir(ckpts["random"])
    others = ["malaria", "hospital", "vaccination", "pneumonia", "diarrhoea", "antibiotic"]
    assert all(len(tok.encode(" " + w, add_bos=False)) == 1 for w in others)
    records = []
    with open(sample("mmlu_medical"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            rec = json.loads(line)
            choices = [others[(i + j) % len(others)] for j in range(3)]
            choices.insert(i % 4, PLANTED_WORD)
            rec["choices"], rec["answer"] = choices, i % 4
            records.append(rec)
    data = tmp_path / "planted.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    pattern = os.path.join(ckpts["root"], "ckpts", "step_*")
    assert cli.main(["eval", "--model", pattern, "--task", "mmlu", "--data", str(data),
                     "--format", "cloze", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    summaries = json.loads((out / "comparison_mmlu.json").read_text())
    assert [s["label"] for s in summaries] == ["step_0", "step_1000"]  # by step number
    planted = summaries[1]
    assert planted["n"] == 12 and planted["acc"] == 1.0 and planted["acc_norm"] == 1.0
    assert summaries[0]["acc"] <= 0.5
    assert "| step_1000 | mmlu | 12 | 100.0 [75.8, 100.0]" in table
    assert (out / "comparison_mmlu.md").read_text().strip() == table.strip()


def test_resume_after_sigkill_counts_every_item_once(ckpts, tmp_path, capsys):
    lines = open(sample("medmcqa"), encoding="utf-8").read().splitlines()
    data = tmp_path / "medmcqa_96.jsonl"
    data.write_text("\n".join(lines * 8) + "\n")  # 96 items, one durable write each
    args = ["eval", "--model", ckpts["random"], "--task", "medmcqa", "--data", str(data),
            "--shots", "1", "--chunk", "1"]
    killed_out = tmp_path / "killed"
    items_file = killed_out / "step_0" / "medmcqa" / "items.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args, "--out", str(killed_out)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if items_file.exists() and items_file.read_bytes().count(b"\n") >= 3:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    partial = items_file.read_bytes().count(b"\n")
    assert 3 <= partial < 96

    assert cli.main([*args, "--out", str(killed_out)]) == 0  # resume
    resumed = read_items(items_file.parent)
    assert sorted(r["id"] for r in resumed) == list(range(96))  # each item exactly once
    summary = json.loads((items_file.parent / "summary.json").read_text())
    assert summary["resumed"] >= partial and summary["scored_now"] == 96 - summary["resumed"]

    clean_out = tmp_path / "clean"
    assert cli.main([*args, "--out", str(clean_out)]) == 0
    clean = {r["id"]: r for r in read_items(clean_out / "step_0" / "medmcqa")}
    for rec in resumed:
        np.testing.assert_allclose(rec["loglikelihoods"], clean[rec["id"]]["loglikelihoods"],
                                   atol=1e-5)
    clean_summary = json.loads((clean_out / "step_0" / "medmcqa" / "summary.json").read_text())
    assert summary["acc"] == clean_summary["acc"] and summary["acc_norm"] == clean_summary["acc_norm"]

    # The same directory with other settings is refused, not mixed in.
    other = [a if a != "1" or args[i - 1] != "--shots" else "2" for i, a in enumerate(args)]
    assert cli.main([*other, "--out", str(killed_out)]) == 2
    assert "holds results of a run with other settings (shots differ)" in capsys.readouterr().err


def test_a_checkpoint_replaced_at_the_same_path_is_not_resumed_into(ckpts, tmp_path, capsys):
    """Settings record the model by fingerprint, not by path: new weights at the old path
    are refused instead of being mixed into the old results."""
    model = tmp_path / "model"
    shutil.copytree(ckpts["random"], model)
    args = ["eval", "--model", str(model), "--task", "medmcqa", "--data", sample("medmcqa"),
            "--limit", "2", "--out", str(tmp_path / "out")]
    assert cli.main(args) == 0
    shutil.rmtree(model)
    shutil.copytree(ckpts["planted"], model)
    capsys.readouterr()
    assert cli.main(args) == 2
    assert "other settings (model differ)" in capsys.readouterr().err
