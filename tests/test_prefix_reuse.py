"""Prefix reuse in scoring: a shared few-shot block run once into a KV cache and every
question scored on top of it gives the same numbers as scoring each context whole."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from infer.eval import EvalSpec, evaluate, shared_prefix
from infer.eval_tasks import TASKS, fewshot_context, load_items, pick_shots
from infer.grouped_score import GroupedScorer, ScoreGroup
from meditron_jax.io.loading import load_model
from sharding import INFER_RULES, make_mesh, param_shardings
from tests.eval_fixtures import make_eval_snapshot, sample


def prefix_groups(vocab: int, letters: bool = False) -> tuple[tuple[int, ...], list[ScoreGroup]]:
    """A 40-token prefix and contexts sharing all of it, part of it (25 tokens, then
    their own), none of it, or being exactly it; four options of 1 to 3 tokens each,
    or of one token (``letters``): every batch one shape, one compile per function."""
    rng = np.random.default_rng(0)
    ids = lambda n: tuple(int(t) for t in rng.integers(3, vocab, n))
    prefix = ids(40)
    contexts = [prefix + ids(n) for n in (5, 7, 3)] + [prefix[:25] + ids(12), prefix[:25] + ids(9)]
    contexts += [(prefix[0] + 1,) + ids(13), prefix, prefix + ids(1)]
    groups = [ScoreGroup(i, ctx, (ids(1), ids(2), ids(3), ids(int(rng.integers(1, 4)))))
              for i, ctx in enumerate(contexts)]
    if letters:
        groups = [ScoreGroup(g.id, g.context_ids, tuple(c[:1] for c in g.continuations))
                  for g in groups]
    return prefix, groups


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    return load_model(tiny_hf_dir)


@pytest.mark.parametrize("mesh", [None, "data=2,tensor=2"])
def test_prefix_reuse_equals_whole_contexts(tiny, mesh):
    """Every option's log-likelihood to 1e-5 and its greedy flag equal with and without
    the prefix; the prefix batches ran (rows keeping all, part or none of the prefix)
    and computed fewer token slots. Options of several tokens on one device (they attend
    to the prefix through the cache too), one-token options on the mesh (compiles less;
    the several-token pass on a mesh is test_eval_grouped_score's)."""
    model = tiny
    if mesh is not None:
        mesh = make_mesh(mesh)
        model = load_model(tiny.path, shardings=lambda cfg: param_shardings(cfg, mesh, INFER_RULES))
    prefix, groups = prefix_groups(model.cfg.vocab_size, letters=mesh is not None)
    plain = GroupedScorer(model, mesh=mesh, batch_size=4)
    reuse = GroupedScorer(model, mesh=mesh, batch_size=4)
    expected = plain.score_groups(groups)
    got = reuse.score_groups(groups, prefix=prefix)
    assert reuse.computed["prefix_batches"] == 2 and reuse.computed["plain_batches"] == 0
    assert plain.computed["prefix_batches"] == 0
    # whole: 2 batches x 4 rows x 64 slots; reuse: the prefix's 48 slots (one row per data
    # shard), then 2 x 4 rows x 16 (rests 14, 15, 12, 7 and 5, 3, 1, 1)
    rows = 1 if mesh is None else 2
    assert (plain.computed["slots"] - reuse.computed["slots"]
            == 2 * 4 * 64 - rows * 48 - 2 * 4 * 16)
    for want, have in zip(expected, got):
        np.testing.assert_allclose([r.logprob for r in have], [r.logprob for r in want],
                                   atol=1e-5, rtol=0)
        assert [r.greedy for r in have] == [r.greedy for r in want]
        assert (np.argmax([r.logprob for r in have]) == np.argmax([r.logprob for r in want]))
    # the prefix's cache is kept for the next call
    kept = reuse._prefix[1]
    again = reuse.score_groups(groups[:4], prefix=prefix)
    assert reuse._prefix[1] is kept
    np.testing.assert_allclose([r.logprob for r in again[0]], [r.logprob for r in got[0]],
                               atol=1e-5, rtol=0)


def test_short_or_unshared_prefix_runs_the_plain_way(tiny):
    prefix, groups = prefix_groups(tiny.cfg.vocab_size)
    scorer = GroupedScorer(tiny, batch_size=4)
    scorer.score_groups(groups[:4], prefix=prefix[:15])        # under 16 tokens: not worth it
    other = (prefix[0] + 1 if prefix[0] + 1 != groups[5].context_ids[0] else prefix[0] + 2,)
    scorer.score_groups(groups[:4], prefix=other + prefix[1:])  # shares no token
    assert scorer.computed["prefix_batches"] == 0 and scorer.computed["plain_batches"] == 2


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory):
    return load_model(make_eval_snapshot(tmp_path_factory.mktemp("prefix_eval") / "m"))


def test_eval_five_shots_same_results_with_and_without(eval_model, tmp_path):
    """5-shot MedMCQA over the bundled sample: identical records (log-likelihoods to
    1e-5, the same predictions) with --prefix-cache on and off; the shared block is the
    first five items' and the questions among them reuse the part they share."""
    task, path = TASKS["medmcqa"], sample("medmcqa")
    items = load_items(task, path)
    spec = EvalSpec(task="medmcqa", data=path, fewshot_data=None, shots=5, format="mcq")
    tok = eval_model.tokenizer
    prefix = shared_prefix(items, items, spec, tok)
    block = fewshot_context(items[6], pick_shots(items[6], items, 5, True))
    assert prefix == tuple(tok.encode(block[:len(block) - len(items[6].text)]))
    runs = {}
    for mode in ("off", "on"):
        scorer = GroupedScorer(eval_model, batch_size=6)
        summary = evaluate(scorer, tok, items, items, spec, str(tmp_path / mode),
                           model_path=eval_model.path, prefix_cache=mode == "on")
        with open(tmp_path / mode / "items.jsonl", encoding="utf-8") as f:
            runs[mode] = (summary, [json.loads(line) for line in f], scorer.computed)
    (s_off, off, c_off), (s_on, on, c_on) = runs["off"], runs["on"]
    # batches of 6: the first five items (their own example sets, rests of 150-520
    # tokens) and one more run whole; the other six reuse the 430-token block
    assert (c_off["plain_batches"], c_on["plain_batches"], c_on["prefix_batches"]) == (2, 1, 1)
    assert c_on["slots"] < 0.7 * c_off["slots"]
    assert len(on) == len(off) == 12
    for a, b in zip(on, off):
        np.testing.assert_allclose(a["loglikelihoods"], b["loglikelihoods"], atol=1e-5, rtol=0)
        for key in ("id", "pred", "pred_norm", "acc", "acc_norm", "greedy", "num_tokens"):
            assert a[key] == b[key], key
    for key in ("acc", "acc_norm", "acc_stderr", "acc_ci95", "n"):
        assert s_on[key] == s_off[key], key
    # not a setting: the recorded settings are the same, so either resumes the other
    assert ((tmp_path / "on" / "settings.json").read_text()
            == (tmp_path / "off" / "settings.json").read_text())


def test_cli_switch(eval_model, tmp_path, capsys):
    """``--prefix-cache off`` then ``on`` resume one another; a bad value exits 2."""
    from cli import main as cli
    base = ["eval", "--model", eval_model.path, "--task", "medmcqa", "--data",
            sample("medmcqa"), "--shots", "5", "--batch-size", "6", "--out", str(tmp_path)]
    assert cli.main(base + ["--prefix-cache", "off", "--limit", "3"]) == 0
    assert cli.main(base + ["--prefix-cache", "on"]) == 0
    label = os.path.basename(eval_model.path)
    summary = json.loads((tmp_path / label / "medmcqa" / "summary.json").read_text())
    assert (summary["n"], summary["resumed"], summary["scored_now"]) == (12, 3, 9)
    with pytest.raises(SystemExit) as exc:
        cli.main(base + ["--prefix-cache", "maybe"])
    assert exc.value.code == 2
    assert "--prefix-cache: invalid choice: 'maybe'" in capsys.readouterr().err
