"""Scoring: continuation log-probs equal transformers', the greedy flag, bucketing,
the ``score`` command and its bad input."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch

import sharding
from infer import runner
from infer.score import ScoreRequest, Scorer, encode_pair
from cli import main as cli
from meditron_jax.errors import UserError
from meditron_jax.io.loading import load_model
from tests import hf_fixtures

REQUESTS = [
    ScoreRequest("a", (1, 5, 9, 33), (4,)),
    ScoreRequest("b", (1, 7, 100, 4, 8, 9, 10, 11, 12, 13, 14), (3, 4, 5, 6, 7)),
    ScoreRequest(3, (1,), (200, 201)),
    ScoreRequest("long", tuple([1] + list(range(20, 60))), (17, 18, 19)),
    ScoreRequest("e", (1, 9), tuple(range(30, 42))),
]


def compiled() -> int:
    """Executables compiled so far by every runner in this process (an entry may be a
    tuple of jitted functions: grouped scoring's prefix pair)."""
    return sum(fn._cache_size() for fn in jax.tree.leaves(list(runner._JITTED.values())))


@pytest.fixture(scope="module")
def hf_model():
    return hf_fixtures.make_hf_model()


def reference(hf_model, request: ScoreRequest) -> tuple[float, bool]:
    seq = list(request.context_ids + request.continuation_ids)
    logits = torch.tensor(hf_fixtures.torch_logits(hf_model, [seq])[0], dtype=torch.float64)
    logp = torch.log_softmax(logits, -1).numpy()
    c = len(request.context_ids)
    rows = range(c - 1, len(seq) - 1)
    total = sum(logp[i, seq[i + 1]] for i in rows)
    return float(total), all(int(np.argmax(logp[i])) == seq[i + 1] for i in rows)


@pytest.fixture(scope="module")
def greedy_request(hf_model):
    """A continuation that is transformers' own greedy choice (greedy must be True)."""
    ctx = [1, 40, 41, 42]
    out = hf_model.generate(torch.tensor([ctx]), max_new_tokens=3, do_sample=False,
                            pad_token_id=0, attention_mask=torch.ones(1, 4, dtype=torch.long))
    return ScoreRequest("greedy", tuple(ctx), tuple(out[0, 4:].tolist()))


@pytest.mark.parametrize("spec", [None, "tensor=2,data=4"])
def test_logprobs_equal_transformers(tiny_hf_dir, hf_model, greedy_request, spec):
    mesh = sharding.make_mesh(spec) if spec else None
    model = load_model(tiny_hf_dir, shardings=None if mesh is None else (
        lambda cfg: sharding.param_shardings(cfg, mesh, sharding.INFER_RULES)))
    scorer = Scorer(model, mesh=mesh, batch_size=4)
    requests = REQUESTS + [greedy_request]
    before = compiled()
    results = scorer.score(requests)
    assert [r.id for r in results] == [q.id for q in requests]
    for q, r in zip(requests, results):
        want, want_greedy = reference(hf_model, q)
        assert abs(r.logprob - want) < 1e-4, (q.id, r.logprob, want)
        assert r.num_tokens == len(q.continuation_ids) and r.greedy == want_greedy
    assert results[-1].greedy
    # 6 requests sorted by length into 2 batches: one compile per (T, C) bucket pair
    assert compiled() - before <= 2


def test_truncation_and_bad_requests(tiny_hf_dir):
    scorer = Scorer(load_model(tiny_hf_dir), batch_size=2)
    with pytest.raises(UserError, match="empty continuation"):
        scorer.score([ScoreRequest("x", (1, 2), ())])
    with pytest.raises(UserError, match="empty context"):
        scorer.score([ScoreRequest("x", (), (1, 2))])
    with pytest.raises(UserError, match="token id 300 is outside"):
        scorer.score([ScoreRequest("x", (1, 300), (1,))])
    long = ScoreRequest("long", tuple(range(1, 255)), (5, 6, 7))
    with pytest.raises(UserError, match="257 tokens exceed the model's max length 256"):
        scorer.score([long])
    cut = scorer.score([long], truncate=True)[0]
    same = scorer.score([ScoreRequest("long", tuple(range(2, 255)), (5, 6, 7))])[0]
    assert cut.logprob == pytest.approx(same.logprob, abs=1e-5)


def test_encode_pair_splits_where_the_context_encoding_ends(tiny_hf_dir, tmp_path):
    path = hf_fixtures.add_word_tokenizer(tiny_hf_dir, tmp_path / "m",
                                          ["Question:", "fever?", "Answer:", "A", "B"])
    tok = load_model(path).tokenizer
    ctx, cont = encode_pair(tok, "Question: fever? Answer:", " B")
    assert ctx == tok.encode("Question: fever? Answer:") and cont == [tok.encode("B")[-1]]


# ---- the command ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_model(tiny_hf_dir, tmp_path_factory):
    return hf_fixtures.add_word_tokenizer(tiny_hf_dir, tmp_path_factory.mktemp("words"),
                                          [f"w{i}" for i in range(4, 256)])


def _write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def test_score_command_resumes_and_matches_the_library(text_model, tmp_path, capsys):
    lines = [{"id": "t", "context": "w10 w11 w12", "continuation": " w13 w14"},
             {"id": 7, "context_ids": [1, 5, 9, 33], "continuation_ids": [4]},
             {"id": "mixed", "context": "w40", "continuation_ids": [50, 51]}]
    src, out = _write(tmp_path / "in.jsonl", lines), str(tmp_path / "out.jsonl")
    assert cli.main(["score", "--model", text_model, "--input", src, "--out", out,
                     "--batch-size", "2"]) == 0
    assert "requests=3 skipped=0 total=3" in capsys.readouterr().err
    got = {r["id"]: r for r in map(json.loads, open(out))}
    model = load_model(text_model)
    tok = model.tokenizer
    want = Scorer(model, batch_size=2).score([
        ScoreRequest("t", *encode_pair(tok, "w10 w11 w12", " w13 w14")),
        ScoreRequest(7, (1, 5, 9, 33), (4,)),
        ScoreRequest("mixed", tuple(tok.encode("w40")), (50, 51))])
    for w in want:
        assert got[w.id]["logprob"] == pytest.approx(w.logprob, abs=1e-5)
        assert got[w.id]["num_tokens"] == w.num_tokens and got[w.id]["greedy"] == w.greedy
    assert got["t"]["num_tokens"] == 2
    # rerun: nothing to do, nothing written twice
    assert cli.main(["score", "--model", text_model, "--input", src, "--out", out]) == 0
    assert "requests=0 skipped=3" in capsys.readouterr().err
    assert len(open(out).readlines()) == 3


@pytest.mark.parametrize("line, message", [
    ('{"id": 1, "context": "w5"', "in.jsonl:2: malformed JSON"),
    ({"context": "w5", "continuation": "w6"}, "in.jsonl:2: missing \"id\""),
    ({"id": "a", "context": "w5", "continuation": "w6"}, "in.jsonl:2: duplicate id \"a\""),
    ({"id": 2, "context": "w5", "continuation": ""}, "\"continuation\" must be a non-empty"),
    ({"id": 2, "context": "w5", "context_ids": [1], "continuation": "w6"}, "exactly one of"),
    ({"id": 2, "context_ids": [1, 999], "continuation_ids": [3]}, "token id 999 is outside"),
])
def test_score_command_bad_input(text_model, tmp_path, capsys, line, message):
    src = _write(tmp_path / "in.jsonl", [{"id": "a", "context": "w4", "continuation": " w5"},
                                         line])
    out = tmp_path / "out.jsonl"
    first = _write(tmp_path / "first.jsonl", [{"id": "kept", "context": "w4", "continuation": " w5"}])
    assert cli.main(["score", "--model", text_model, "--input", first, "--out", str(out)]) == 0
    capsys.readouterr()
    kept = out.read_text()
    assert cli.main(["score", "--model", text_model, "--input", src, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert out.read_text() == kept      # nothing already written is lost
