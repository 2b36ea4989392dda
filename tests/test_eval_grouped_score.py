"""Shared-context scoring equals scoring every ``context + option`` on its own."""
from __future__ import annotations

import numpy as np
import pytest

from infer.grouped_score import GroupedScorer, ScoreGroup
from infer.score import ScoreRequest, Scorer
from meditron_jax.errors import UserError
from meditron_jax.io.loading import load_model
from sharding import INFER_RULES, make_mesh, param_shardings


def random_groups(seed: int, n: int, vocab: int, max_option: int) -> list[ScoreGroup]:
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(n):
        ctx = tuple(int(t) for t in rng.integers(3, vocab, rng.integers(17, 27)))
        options = tuple(tuple(int(t) for t in rng.integers(3, vocab, rng.integers(1, max_option + 1)))
                        for _ in range(rng.integers(2, 5)))
        groups.append(ScoreGroup(i, ctx, options))
    return groups


def one_by_one(scorer: Scorer, groups, truncate=False):
    requests = [ScoreRequest((g.id, j), g.context_ids, c)
                for g in groups for j, c in enumerate(g.continuations)]
    return {r.id: r for r in scorer.score(requests, truncate=truncate)}


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_model(tiny_hf_dir)


@pytest.mark.parametrize("max_option,mesh", [(1, None), (5, "data=2,tensor=2")])
def test_grouped_equals_one_by_one(model, max_option, mesh):
    groups = random_groups(max_option, 7, model.cfg.vocab_size, max_option)
    if mesh is not None:
        mesh = make_mesh(mesh)
        model = load_model(model.path, shardings=lambda cfg: param_shardings(cfg, mesh, INFER_RULES))
    grouped = GroupedScorer(model, mesh=mesh, batch_size=4).score_groups(groups)
    expected = one_by_one(Scorer(model, batch_size=8), groups)
    assert [len(r) for r in grouped] == [len(g.continuations) for g in groups]
    for results in grouped:
        for r in results:
            e = expected[r.id]
            assert r.logprob == pytest.approx(e.logprob, abs=2e-5)
            assert (r.num_tokens, r.greedy) == (e.num_tokens, e.greedy)


def test_too_long_context_is_cut_once_for_all_options_or_refused(model):
    limit = model.cfg.max_position_embeddings
    ctx = tuple(3 + i % 200 for i in range(limit - 2))
    group = ScoreGroup("q", ctx, ((5,), (6, 7, 8), (9, 10)))
    scorer = GroupedScorer(model, batch_size=2)
    with pytest.raises(UserError, match="exceed the model's max length"):
        scorer.score_groups([group])
    (results,) = scorer.score_groups([group], truncate=True)
    cut = ScoreGroup("q", ctx[1:], group.continuations)  # 253 + the longest option fit
    expected = one_by_one(Scorer(model, batch_size=4), [cut])
    for r in results:
        assert r.logprob == pytest.approx(expected[r.id].logprob, abs=2e-5)
    with pytest.raises(UserError, match="empty continuation"):
        scorer.score_groups([ScoreGroup("e", (1, 2), ((3,), ()))])
