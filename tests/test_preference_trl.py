"""DPO (sigmoid), IPO and ORPO: our loss and its gradient against TRL's own code.

TRL's trainers are built around a tiny float32 transformers Llama (the policy; DPO also
gets a reference with other weights, so the log-ratios are not zero) and run their own
loss code on a batch from their own collators: ``DPOTrainer._compute_loss`` (the fused
log-prob head and the loss variants) and ``ORPOTrainer.get_batch_loss_metrics`` (its
concatenated forward and odds-ratio loss). Ours runs on the same pairs through
``train.preference.PairBuilder`` (the [B, 2, T] rows the loader makes) and
``train.objectives.make_pair_loss``; the gradient of every weight must agree to 1e-5.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("trl")

from meditron_jax.io.hf_keys import params_from_hf  # noqa: E402
from meditron_jax.model.config import LlamaConfig  # noqa: E402
from tests.hf_fixtures import make_hf_model, state_dict_numpy  # noqa: E402
from train.config import DataSection  # noqa: E402
from train.objectives import batch_norms, make_pair_loss  # noqa: E402
from train.preference import Pair, PairBuilder  # noqa: E402
from train.step import StepOptions  # noqa: E402

BOS, EOS, PAD = 1, 2, 0
SEQ = 16
BETA, LAMBDA = 0.1, 0.25
# (prompt, chosen, rejected) token ids (bos and eos are added as for plain-text pairs):
# uneven lengths, so padding, masks and IPO's per-token normalisation all matter
PAIRS = [([5, 17, 99, 3], [40, 41, 42], [50, 51, 52, 53, 54]),
         ([7, 8], [60, 61, 62, 63, 64, 65], [70]),
         ([9, 10, 11, 12, 13, 14], [80, 81], [90, 91, 92])]


class _IdTokenizer:
    """Text "5 17 99" <-> ids, so PairBuilder sees exactly these ids."""

    def encode(self, text, add_bos=True):
        return ([BOS] if add_bos else []) + [int(t) for t in text.split()]


def _text(ids):
    return " ".join(map(str, ids))


def our_batch():
    builder = PairBuilder(_IdTokenizer(), EOS, DataSection(seq_len=SEQ), len(PAIRS))
    rows = [builder.example(Pair(_text(p), _text(c), _text(r), False, "test"))[0]
            for p, c, r in PAIRS]
    return {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}


def trl_examples():
    return [{"prompt_ids": [BOS] + p, "chosen_ids": c + [EOS], "rejected_ids": r + [EOS]}
            for p, c, r in PAIRS]


def hf_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": 3,
             **{str(i): i for i in range(4, 256)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def tiny_dataset():
    from datasets import Dataset
    return Dataset.from_list([{"prompt": _text(p), "chosen": " " + _text(c),
                               "rejected": " " + _text(r)} for p, c, r in PAIRS])


OBJECTIVES = ("dpo", "ipo", "orpo")


@pytest.fixture(scope="module")
def ours(models):
    """objective -> (loss, gradient, metrics) of our pair loss, all three in one compile."""
    _, _, cfg, policy, reference = models
    batch = our_batch()
    norms = batch_norms(batch)

    def all_objectives(p, ref):
        out = {}
        for objective in OBJECTIVES:
            opts = StepOptions(compute_dtype=jnp.float32, remat="none", loss_chunk=4,
                               objective=objective, beta=BETA, orpo_lambda=LAMBDA)
            fn = make_pair_loss(cfg, opts)
            out[objective] = jax.value_and_grad(
                lambda q: fn(q, ref if objective != "orpo" else None, batch, norms),
                has_aux=True)(p)
        return out
    results = {}
    for objective, ((loss, (sums, extra)), grads) in jax.jit(all_objectives)(
            policy, reference).items():
        metrics = {k: float(v / norms["pairs"]) for k, v in sums.items()}
        metrics.update({k: float(v) for k, v in extra.items()})
        results[objective] = (float(loss), grads, metrics)
    return results


def torch_grads(model, cfg):
    grads = {name: p.grad.detach().numpy().copy() for name, p in model.named_parameters()}
    return params_from_hf(grads, cfg)


def assert_grads_close(got, want):
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        name = jax.tree_util.keystr(path)
        assert np.linalg.norm(w) > 0, name  # every weight takes part
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5,
                                   atol=1e-5 * np.abs(w).max(), err_msg=name)


@pytest.fixture(scope="module")
def models():
    policy = make_hf_model(std=0.25, seed=1)
    reference = make_hf_model(std=0.25, seed=2)
    cfg = LlamaConfig.from_hf(policy.config.to_dict())
    ours_policy = params_from_hf({k: v.copy() for k, v in state_dict_numpy(policy).items()}, cfg)
    ours_ref = params_from_hf({k: v.copy() for k, v in state_dict_numpy(reference).items()}, cfg)
    return policy, reference, cfg, ours_policy, ours_ref


@pytest.fixture(scope="module")
def dpo_trainer(models, tmp_path_factory):
    from trl import DPOConfig, DPOTrainer
    policy, reference, *_ = models
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl_dpo")), beta=BETA,
                     loss_type=["sigmoid"], report_to=[], use_cpu=True, bf16=False,
                     gradient_checkpointing=False, max_length=None)
    return DPOTrainer(model=policy, ref_model=reference, args=args,
                      train_dataset=tiny_dataset(), processing_class=hf_tokenizer())


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_gradient_match_trl(models, dpo_trainer, ours, loss_type):
    policy, _, cfg, _, _ = models
    trainer = dpo_trainer
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    inputs = trainer.data_collator(trl_examples())
    policy.zero_grad()
    policy.train()
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    trl_loss.backward()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    loss, grads, metrics = ours["dpo" if loss_type == "sigmoid" else "ipo"]
    np.testing.assert_allclose(loss, trl_loss.item(), rtol=1e-5)
    assert abs(metrics["reward_margin"]) > 1e-2  # the reference differs: real log-ratios
    for ours_key, trl_key in (("reward_chosen", "rewards/chosen"),
                              ("reward_rejected", "rewards/rejected"),
                              ("reward_margin", "rewards/margins"),
                              ("reward_accuracy", "rewards/accuracies"),
                              ("logp_chosen", "logps/chosen"),
                              ("logp_rejected", "logps/rejected")):
        np.testing.assert_allclose(metrics[ours_key], logged[trl_key], rtol=1e-5, atol=1e-6,
                                   err_msg=ours_key)
    assert_grads_close(grads, torch_grads(policy, cfg))


def test_orpo_loss_and_gradient_match_trl(models, ours, tmp_path_factory):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    policy, _, cfg, _, _ = models
    args = ORPOConfig(output_dir=str(tmp_path_factory.mktemp("trl_orpo")), beta=LAMBDA,
                      report_to=[], use_cpu=True, bf16=False, max_length=64,
                      gradient_checkpointing=False)
    trainer = ORPOTrainer(model=policy, args=args, train_dataset=tiny_dataset(),
                          processing_class=hf_tokenizer())

    def side(key):  # TRL's tokenized layout: prompt + answer, labels -100 on the prompt
        rows = [ex["prompt_ids"] + ex[f"{key}_ids"] for ex in trl_examples()]
        labels = [[-100] * len(ex["prompt_ids"]) + ex[f"{key}_ids"] for ex in trl_examples()]
        width = max(map(len, rows))
        pad = lambda xs, v: torch.tensor([x + [v] * (width - len(x)) for x in xs])  # noqa: E731
        return {f"{key}_input_ids": pad(rows, PAD),
                f"{key}_attention_mask": pad([[1] * len(x) for x in rows], 0),
                f"{key}_labels": pad(labels, -100)}
    batch = {**side("chosen"), **side("rejected")}
    policy.zero_grad()
    policy.train()
    trl_loss, logged = trainer.get_batch_loss_metrics(trainer.model, batch)
    trl_loss.backward()

    loss, grads, metrics = ours["orpo"]
    np.testing.assert_allclose(loss, trl_loss.item(), rtol=1e-5)
    for ours_key, trl_key in (("nll", "nll_loss"), ("log_odds_ratio", "log_odds_ratio"),
                              ("reward_chosen", "rewards/chosen"),
                              ("reward_rejected", "rewards/rejected"),
                              ("reward_margin", "rewards/margins"),
                              ("reward_accuracy", "rewards/accuracies")):
        np.testing.assert_allclose(metrics[ours_key], logged[trl_key], rtol=1e-5, atol=1e-6,
                                   err_msg=ours_key)
    assert_grads_close(grads, torch_grads(policy, cfg))
