"""Generation engine: parity with transformers, cache invariance, compile counts,
seeded sampling across meshes, stop ids / strings, bad input."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch

import sharding
from infer.engine import (DecodeState, Generator, abstract_decode_step, bucket_length,
                          cache_length, prefill_logits, step_logits)
from infer.sampling import Sampling
from meditron_jax.errors import UserError
from meditron_jax.io.loading import load_model
from meditron_jax.model import forward
from tests import hf_fixtures

PROMPTS = [[1, 5, 9, 33], [1, 7, 100, 4, 8, 9, 10, 11, 12, 13, 14], [1, 200],
           [1] + list(range(20, 40)), [1, 3, 3, 3, 3]]
NEW = 24


@pytest.fixture(scope="module")
def hf_model():
    return hf_fixtures.make_hf_model()


@pytest.fixture(scope="module")
def hf_greedy(hf_model):
    """transformers' greedy completions, one prompt at a time (no padding at all)."""
    out = []
    for p in PROMPTS:
        ids = hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                                dtype=torch.long), max_new_tokens=NEW, do_sample=False,
                                pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


@functools.lru_cache(maxsize=None)
def _mesh(spec):
    return sharding.make_mesh(spec) if spec else None


def _load(path, spec):
    mesh = _mesh(spec)
    shardings = None if mesh is None else (
        lambda cfg: sharding.param_shardings(cfg, mesh, sharding.INFER_RULES))
    return load_model(path, shardings=shardings)


@pytest.fixture(scope="module")
def generators(tiny_hf_dir):
    cache = {}

    def get(spec):
        if spec not in cache:
            cache[spec] = Generator(_load(tiny_hf_dir, spec), _mesh(spec), batch_size=4)
        return cache[spec]
    return get


@pytest.mark.parametrize("spec", [None, "tensor=2,data=4", "data=2,tensor=2"])
def test_greedy_matches_transformers(generators, hf_greedy, spec):
    gen = generators(spec)
    assert gen.model.eos_ids == (2,)
    got = gen.generate(PROMPTS, max_new_tokens=NEW)   # two batches, two length buckets
    for completion, ref in zip(got, hf_greedy):
        if completion.finish_reason == "stop":         # transformers keeps the eos token
            assert ref[len(completion.ids)] == 2 and len(ref) == len(completion.ids) + 1
        else:
            assert len(completion.ids) == NEW
        assert completion.ids == ref[:len(completion.ids)]


def test_cached_decode_logits_equal_full_forward(generators):
    """Left-padded prefill + cached steps give, at every step, the logits of one full
    forward over each row's unpadded tokens."""
    gen = generators(None)
    params, cfg = gen.model.params, gen.cfg
    prompts, steps = PROMPTS[:4], 6
    p, s = 32, 64
    tokens = np.zeros((4, p), np.int32)
    pad = np.array([p - len(x) for x in prompts], np.int32)
    for r, x in enumerate(prompts):
        tokens[r, pad[r]:] = x
    prefill = jax.jit(functools.partial(prefill_logits, cfg=cfg, max_len=s, dtype=np.float32))
    step = jax.jit(functools.partial(step_logits, cfg=cfg, dtype=np.float32))
    logits, cache = prefill(params, tokens, pad)
    buffer = np.zeros((4, s), np.int32)
    buffer[:, :p] = tokens
    state = DecodeState(cache=cache, tokens=buffer, pad=pad, budget=None, generated=None,
                        finish=None, rng=None, stop_ids=None)
    seen = []
    for i in range(steps):
        seen.append(np.asarray(logits))
        buffer[:, p + i] = np.argmax(logits, axis=-1)
        state.tokens = buffer
        logits, state.cache = step(params, state)
    # The reference: rows unpadded (left-aligned; what follows a token never changes it).
    full = np.zeros((4, s), np.int32)
    for r, x in enumerate(prompts):
        full[r, :len(x) + steps] = list(x) + buffer[r, p:p + steps].tolist()
    ref = np.asarray(forward(params, full, cfg)[0])
    for i in range(steps):
        for r, x in enumerate(prompts):
            np.testing.assert_allclose(seen[i][r], ref[r, len(x) - 1 + i], atol=1e-4, rtol=0)


def test_cache_lengths_step_by_half_powers_of_two():
    got = {n: cache_length(n) for n in (1, 16, 17, 24, 25, 80, 96, 97, 128, 129, 192, 193)}
    assert got == {1: 16, 16: 16, 17: 24, 24: 24, 25: 32, 80: 96, 96: 96, 97: 128, 128: 128,
                   129: 192, 192: 192, 193: 256}
    assert cache_length(193, cap=200) == 200
    assert all(cache_length(n) >= n for n in range(1, 5000))


def test_decode_compiles_once_for_64_tokens_over_several_lengths(tiny_hf_dir):
    gen = Generator(load_model(tiny_hf_dir), batch_size=2)
    lengths = [[3], [10, 20], [25, 5]]      # prompt buckets 16, 32, 32; one cache of 96
    assert {cache_length(bucket_length(max(x)) + 64) for x in lengths} == {96}
    decode, prefill = gen.decode_fn(Sampling()), gen.prefill_fn(96, Sampling())
    before = decode._cache_size(), prefill._cache_size()   # other tests' shapes
    streamed = []
    for group in lengths:
        out = gen.generate([list(range(1, n + 1)) for n in group], max_new_tokens=64,
                           stop_ids=())
        assert all(len(c.ids) == 64 and c.finish_reason == "length" for c in out)
    # streaming runs the same executable one step per call
    out = gen.generate([[1, 2, 3]], max_new_tokens=64, stop_ids=(),
                       on_tokens=lambda i, ids: streamed.extend(ids))
    assert streamed == out[0].ids
    assert decode._cache_size() - before[0] == 1
    assert prefill._cache_size() - before[1] == 2


SAMPLED = Sampling(temperature=0.8, top_k=20, top_p=0.9)


@pytest.fixture(scope="module")
def sampled(generators):
    return [c.ids for c in generators(None).generate(PROMPTS[:4], max_new_tokens=16,
                                                     sampling=SAMPLED, seed=7)]


def test_sampling_reproducible_across_runs_and_batches(generators, sampled):
    gen = generators(None)
    again = gen.generate(PROMPTS[:4], max_new_tokens=16, sampling=SAMPLED, seed=7)
    assert [c.ids for c in again] == sampled
    # a prompt's stream depends on its row seed, not on its batch neighbours
    alone = gen.generate([PROMPTS[2]], max_new_tokens=16, sampling=SAMPLED, seed=7,
                         row_seeds=[2])
    assert alone[0].ids == sampled[2]
    other = gen.generate(PROMPTS[:4], max_new_tokens=16, sampling=SAMPLED, seed=8)
    assert [c.ids for c in other] != sampled
    greedy = gen.generate(PROMPTS[:4], max_new_tokens=16)
    assert [c.ids for c in greedy] != sampled


def test_sampling_reproducible_across_meshes(generators, sampled):
    got = generators("tensor=2,data=4").generate(PROMPTS[:4], max_new_tokens=16,
                                                 sampling=SAMPLED, seed=7)
    assert [c.ids for c in got] == sampled


def test_stop_ids_end_rows_and_are_not_returned(generators):
    gen = generators(None)
    free = gen.generate(PROMPTS[:2], max_new_tokens=NEW, stop_ids=())
    stop = free[0].ids[5]
    first = free[0].ids.index(stop)
    got = gen.generate(PROMPTS[:2], max_new_tokens=NEW, stop_ids=(stop,))
    assert got[0].ids == free[0].ids[:first] and got[0].finish_reason == "stop"
    if stop in free[1].ids:
        assert got[1].ids == free[1].ids[:free[1].ids.index(stop)]
    else:
        assert got[1].ids == free[1].ids and got[1].finish_reason == "length"


@pytest.fixture(scope="module")
def word_model(tiny_hf_dir, tmp_path_factory):
    """The tiny model with a tokenizer covering its whole vocabulary (w4 ... w255)."""
    path = hf_fixtures.add_word_tokenizer(tiny_hf_dir, tmp_path_factory.mktemp("words"),
                                          [f"w{i}" for i in range(4, 256)])
    return load_model(path)


def test_stop_strings_cut_text_and_leave_the_loop(word_model):
    gen = Generator(word_model, batch_size=2)
    prompt = word_model.tokenizer.encode("w10 w11 w12")
    free = gen.generate([prompt, prompt[:2]], max_new_tokens=40, stop_ids=())
    words = free[0].text.split()
    stop = words[6]
    k = words.index(stop)
    got = gen.generate([prompt, prompt[:2]], max_new_tokens=40, stop_ids=(),
                       stop_strings=[stop])
    assert got[0].finish_reason == "stop"
    assert got[0].text == " ".join(words[:k]) + " "
    assert got[0].ids == free[0].ids[:k + 1]          # ids keep the token that spelled it
    assert got[1].ids == free[1].ids[:len(got[1].ids)]
    # the streaming path (one step per call) agrees
    streamed = {0: [], 1: []}
    again = gen.generate([prompt, prompt[:2]], max_new_tokens=40, stop_ids=(),
                         stop_strings=[stop], on_tokens=lambda i, ids: streamed[i].extend(ids))
    assert [c.ids for c in again] == [c.ids for c in got]
    assert streamed[0] == got[0].ids


def test_abstract_decode_step_compiles_without_allocating(tiny_hf_dir):
    cfg = load_model(tiny_hf_dir).cfg
    fn, args = abstract_decode_step(cfg, _mesh("tensor=2,data=4"), batch=8, max_len=64)
    compiled = fn.lower(*args).compile()
    assert compiled.memory_analysis() is not None
    assert args[1].cache.k.sharding.spec == jax.sharding.PartitionSpec(
        None, "data", "tensor")


# ---- bad input --------------------------------------------------------------------------------
def test_bad_prompts(generators):
    gen = generators(None)
    with pytest.raises(UserError, match="empty prompt"):
        gen.generate([[1, 2], []], max_new_tokens=4)
    with pytest.raises(UserError, match="token id 256 is outside"):
        gen.generate([[1, 256]], max_new_tokens=4)
    with pytest.raises(UserError, match="token id -1 is outside"):
        gen.generate([[-1, 3]], max_new_tokens=4)
    long = list(range(1, 251))
    with pytest.raises(UserError, match="exceed the model's max length 256.*--truncate-prompt"):
        gen.generate([long], max_new_tokens=10)
    with pytest.raises(UserError, match="max-new-tokens must be >= 1"):
        gen.generate([[1]], max_new_tokens=0)
    out = gen.generate([long], max_new_tokens=10, truncate=True, stop_ids=())
    ref = gen.generate([long[-246:]], max_new_tokens=10, stop_ids=())
    assert out[0].ids == ref[0].ids


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_p=0.0), "top-p must be in \\(0, 1\\]"),
    (dict(top_p=1.5), "top-p must be in \\(0, 1\\]"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_k=-2), "top-k must be a non-negative integer"),
])
def test_bad_sampling(kwargs, message):
    with pytest.raises(UserError, match=message):
        Sampling(**kwargs)


def test_bad_meshes(tiny_hf_dir, generators):
    model = generators(None).model
    with pytest.raises(UserError, match="needs 16 devices but only 8"):
        sharding.make_mesh("data=16")
    with pytest.raises(UserError, match="4 query heads are not divisible by tensor=8"):
        Generator(model, _mesh("tensor=8"), batch_size=8)
    with pytest.raises(UserError, match="batch size 6 is not divisible by the data axes"):
        Generator(model, _mesh("tensor=2,data=4"), batch_size=6)
