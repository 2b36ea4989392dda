"""The lm-eval adapter: a harness run gives the same per-item log-likelihoods as
``meditron-jax eval``; rolling log-likelihood and generation agree with transformers."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from infer.lm_eval_adapter import MeditronLM  # noqa: E402
from cli import main as cli  # noqa: E402
from meditron_jax.errors import UserError  # noqa: E402
from tests.eval_fixtures import DATA, make_eval_snapshot, sample  # noqa: E402


@pytest.fixture(scope="module")
def snap(tmp_path_factory):
    return make_eval_snapshot(tmp_path_factory.mktemp("lm_eval") / "tiny")


@pytest.fixture(scope="module")
def lm(snap):
    return MeditronLM(snap)


def test_harness_run_matches_meditron_eval(snap, lm, tmp_path):
    """lm-eval's own MedMCQA template and few-shot assembly, through the adapter, on a
    local copy of the task: per option log-likelihoods equal ``meditron-jax eval``'s."""
    from lm_eval.tasks.medmcqa.utils_medmcqa import doc_to_text
    lines = open(sample("medmcqa"), encoding="utf-8").read().splitlines()
    dev = tmp_path / "dev.jsonl"
    dev.write_text("\n".join(lines[9:]) + "\n")
    assert cli.main(["eval", "--model", snap, "--task", "medmcqa", "--data", sample("medmcqa"),
                     "--fewshot-data", str(dev), "--shots", "2", "--out", str(tmp_path)]) == 0
    ours = [json.loads(x) for x in open(tmp_path / "tiny" / "medmcqa" / "items.jsonl")]
    summary = json.loads((tmp_path / "tiny" / "medmcqa" / "summary.json").read_text())

    task = {"task": "medmcqa_local", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": sample("medmcqa"), "dev": str(dev)},
                               "cache_dir": str(tmp_path / "hf_datasets")},
            "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
            "num_fewshot": 2, "output_type": "multiple_choice", "doc_to_text": doc_to_text,
            "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "cop",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean",
                             "higher_is_better": True}]}
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model=lm, tasks=[task], log_samples=True, bootstrap_iters=0,
                                  task_manager=TaskManager(include_defaults=False))
    samples = sorted(out["samples"]["medmcqa_local"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ours) == 12
    for s, rec in zip(samples, ours):
        harness = [resp[0][0] for resp in s["resps"]]
        np.testing.assert_allclose(harness, rec["loglikelihoods"], atol=1e-5, rtol=0)
    metrics = out["results"]["medmcqa_local"]
    assert metrics["acc,none"] == pytest.approx(summary["acc"])
    assert metrics["acc_norm,none"] == pytest.approx(summary["acc_norm"])


@pytest.fixture(scope="module")
def reference(snap):
    import torch
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    model = LlamaForCausalLM.from_pretrained(snap, dtype=torch.float32,
                                             attn_implementation="sdpa").eval()
    return model, PreTrainedTokenizerFast(tokenizer_file=os.path.join(snap, "tokenizer.json"))


def torch_window_lls(model, windows) -> float:
    import torch
    total = 0.0
    for ctx, cont in windows:
        ids = ctx + cont
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        total += float(sum(logp[i - 1, ids[i]] for i in range(len(ctx), len(ids))))
    return total


def test_rolling_loglikelihood_matches_transformers(snap, lm, reference):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    model, tok = reference
    text = open(os.path.join(DATA, "clinical_corpus.txt"), encoding="utf-8").read()[:400]
    ids = tok(text, add_special_tokens=False).input_ids
    request = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    # Windows of 32 tokens, each conditioned on the text before it (the first on bos).
    short = MeditronLM(model=lm.model, max_length=32)
    windows = list(map(make_disjoint_window, get_rolling_token_windows(ids, 1, 32, 1)))
    assert len(windows) > 2 and sum(len(c) for _, c in windows) == len(ids)
    assert windows[0][0] == [1]
    assert short.loglikelihood_rolling(request)[0] == pytest.approx(
        torch_window_lls(model, windows), rel=1e-6)  # float32 sums of ~100 terms


def test_generate_until_matches_transformers_greedy(lm, reference):
    import torch
    model, tok = reference
    prompts = ["Question: How is severe dehydration treated?\nAnswer:", "Malaria in children"]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n", "Question"],
                                                    "max_gen_toks": 12}), i)
                for i, p in enumerate(prompts)]
    got = lm.generate_until(requests)
    for prompt, text in zip(prompts, got):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=12, do_sample=False)
        expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        for stop in ("\n", "Question"):
            expected = expected.split(stop)[0]
        assert text == expected


def test_model_args_from_the_harness(snap):
    """lm-eval's ``--model_args`` string: a multi-axis mesh is written with '+'."""
    registered = lm_eval.api.registry.get_model("meditron-jax")
    assert registered is MeditronLM
    lm = registered.create_from_arg_string(f"pretrained={snap},mesh=data=2+tensor=2,batch_size=4",
                                           {"batch_size": None, "device": "cuda"})
    assert dict(lm.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2} and lm.batch_size == 4
    assert lm.model.params["layers"]["q"].sharding.spec[2] == "tensor"
    with pytest.raises(UserError, match="unknown temperature"):
        MeditronLM(snap, temperature=0.5)
    with pytest.raises(UserError, match="batch_size must be a positive integer"):
        MeditronLM(snap, batch_size="big")
    with pytest.raises(UserError, match="give path="):
        MeditronLM()
