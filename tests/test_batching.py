"""Continuous batching (infer.batching): outputs equal transformers' and the static
Generator's with slots refilled mid-run, on one device and on a data x tensor mesh; no
compilation after warm-up; prefix reuse changes nothing but the work; the threaded API
(events, cancel, a bounded queue, stop with and without draining); log-probs against
transformers' logits; bad requests."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

import sharding
from infer.batching import (ContinuousEngine, EngineRequest, EngineStopped, PrefixIndex,
                            QueueFull, TokenEvent)
from infer.engine import Generator
from infer.sampling import Sampling
from meditron_jax.errors import UserError
from meditron_jax.io.loading import load_model
from tests import hf_fixtures

PROMPTS = [[1, 5, 9, 33], [1, 7, 100, 4, 8, 9, 10, 11, 12, 13, 14], [1, 200],
           [1] + list(range(20, 40)), [1, 3, 3, 3, 3]]
NEW = [10, 3, 7, 10, 5]      # rows end at different steps: slots are refilled mid-run
MAX_LEN = 32                 # two prompt buckets (16, 32): little to compile
SHORT = [p for p in PROMPTS if len(p) <= 16]   # one bucket


@pytest.fixture(scope="module")
def hf_model():
    return hf_fixtures.make_hf_model()


@pytest.fixture(scope="module")
def hf_greedy(hf_model):
    """transformers' greedy completions, one prompt at a time."""
    out = []
    for p, n in zip(PROMPTS, NEW):
        ids = hf_model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                                dtype=torch.long), max_new_tokens=n, do_sample=False,
                                pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


@pytest.fixture(scope="module")
def model(tiny_hf_dir):
    return load_model(tiny_hf_dir)


@pytest.fixture(scope="module")
def engine(model):
    eng = ContinuousEngine(model, slots=2, max_len=MAX_LEN)
    eng.warmup()
    return eng


def _requests(**kw):
    return [EngineRequest(p, n, **kw) for p, n in zip(PROMPTS, NEW)]


def _check_against(got, refs, new):
    for completion, ref, n in zip(got, refs, new):
        if completion.finish_reason == "stop":         # transformers keeps the eos token
            assert ref[len(completion.ids)] == 2 and len(ref) == len(completion.ids) + 1
        else:
            assert completion.finish_reason == "length" and len(completion.ids) == n
        assert completion.ids == ref[:len(completion.ids)]


def test_greedy_equals_transformers_with_refills_and_no_compiles_after_warmup(engine,
                                                                              hf_greedy):
    assert engine.compilations > 0                     # the warm-up compiled and counted
    before, calls = engine.compilations, engine.prefill_calls.copy()
    split, t0 = engine.seconds.copy(), time.perf_counter()
    got = engine.generate(_requests())
    wall = time.perf_counter() - t0
    _check_against(got, hf_greedy, NEW)
    # both slots free at the start: one call of 2 rows; then rows end one at a time
    assert engine.prefill_calls - calls == {2: 1, 1: 3}
    spent = {k: engine.seconds[k] - split[k] for k in ("prefill", "decode")}
    assert 0 < spent["prefill"] and 0 < spent["decode"] and sum(spent.values()) <= wall
    again = engine.generate(list(reversed(_requests())))   # other slots, other neighbours
    assert [c.ids for c in reversed(again)] == [c.ids for c in got]
    assert engine.compilations == before


def test_greedy_equals_transformers_on_a_mesh(tiny_hf_dir, hf_greedy):
    mesh = sharding.make_mesh("data=2,tensor=2")
    model = load_model(tiny_hf_dir, shardings=lambda cfg: sharding.param_shardings(
        cfg, mesh, sharding.INFER_RULES))
    eng = ContinuousEngine(model, mesh, slots=2, max_len=MAX_LEN)
    assert eng.prefill_rows == 2                       # a prefill call fills the data axis
    short = [i for i, p in enumerate(PROMPTS) if p in SHORT]     # one prefill to compile
    got = eng.generate([EngineRequest(PROMPTS[i], NEW[i]) for i in short])
    _check_against(got, [hf_greedy[i] for i in short], [NEW[i] for i in short])


def test_sampled_rows_equal_the_static_generators(model, engine):
    """Same seeds, same tokens as Generator: per-row temperature/top-k/top-p on device
    reproduce infer.sampling.sample; a row's key does not depend on its slot."""
    s = Sampling(temperature=0.9, top_k=40, top_p=0.9)
    prompts, seeds = SHORT, [11, 12, 13, 14]
    static = Generator(model, batch_size=2)
    t0 = time.perf_counter()
    want = static.generate(prompts, max_new_tokens=12, sampling=s, seed=3, row_seeds=seeds)
    wall = time.perf_counter() - t0
    assert 0 < static.seconds["prefill"] and 0 < static.seconds["decode"]
    assert sum(static.seconds.values()) <= wall        # prefill, then decode, per batch
    eng = ContinuousEngine(model, slots=2, max_len=MAX_LEN, seed=3)
    got = eng.generate([EngineRequest(p, 12, sampling=s, seed=r)
                        for p, r in zip(prompts, seeds)])
    assert [c.ids for c in got] == [c.ids for c in want]
    assert len({tuple(c.ids) for c in got}) == len(got)
    greedy = engine.generate([EngineRequest(PROMPTS[0], 12)])[0]
    assert got[0].ids != greedy.ids                    # it did sample


def test_prefix_reuse_gives_the_same_outputs(model, engine):
    system = list(range(40, 57))                       # 17 tokens: one whole block of 16
    prompts = [system + [5 + i, 9, 11 + i] for i in range(4)] + [[1, 2, 3]]
    reqs = [EngineRequest(p, 10) for p in prompts]
    engine.prefix_cache = False                        # same executables, no reuse
    plain = engine.generate(reqs)
    engine.prefix_cache = True
    before, reused = engine.prefix_hits, engine.prefix_tokens_reused
    got = engine.generate(reqs)
    assert [c.ids for c in got] == [c.ids for c in plain]
    # the first two are prefilled in one call (neither finds the other's keys); the two
    # admitted after them reuse the prefix the first one stored
    assert engine.prefix_hits - before == 2
    assert engine.prefix_tokens_reused - reused == 2 * 16


def test_prefix_index_one_write_per_entry_and_call():
    """A prefill call never has two rows write one pool entry (the scatter would keep one
    of them while the index names the other), never overwrites an entry it reads, and
    does not store a prefix twice."""
    index = PrefixIndex(entries=2, max_len=32, block=16)
    a, b, c = ([k] * 40 for k in (3, 4, 5))
    busy: set[int] = set()
    first = index.claim(a, 0, busy)
    busy.add(first)
    assert index.claim(a, 0, busy) == -1               # already held (same call)
    second = index.claim(b, 0, busy)
    assert second not in (first, -1)
    busy.add(second)
    assert index.claim(c, 0, busy) == -1               # every entry in use by this call
    assert index.lookup(a + [9], 39) == (first, 32) and index.lookup(b, 39) == (second, 32)
    assert index.claim(c, 0, {first}) == second        # next call: the LRU entry not read
    assert index.lookup(b, 39) == (-1, 0) and index.lookup(c, 39) == (second, 32)
    assert index.claim(a, 32) == -1                    # nothing beyond what is reused


def test_events_cancel_queue_and_stop(model):
    eng = ContinuousEngine(model, slots=2, max_len=MAX_LEN, queue_size=3)
    # a bounded queue: nothing runs before start()
    handles = [eng.submit(EngineRequest(PROMPTS[i], 8)) for i in range(3)]
    with pytest.raises(QueueFull):
        eng.submit(EngineRequest(PROMPTS[0], 8))
    eng.start()
    assert all(h.result(timeout=120).finish_reason == "length" for h in handles)
    events: list[TokenEvent] = []
    cancelled_events: list[TokenEvent] = []
    first = threading.Event()

    def on_victim_event(event):
        cancelled_events.append(event)
        first.set()

    streamed = eng.submit(EngineRequest(PROMPTS[0], 24), on_event=events.append)
    victim = eng.submit(EngineRequest(PROMPTS[2], 28), on_event=on_victim_event)
    assert first.wait(120)
    victim.cancel()                                   # the client went away
    done = streamed.result(timeout=120)
    assert done.finish_reason == "length" and len(done.ids) == 24
    assert sum((e.ids for e in events), []) == done.ids        # events add up, in order
    assert [e.finish_reason for e in events][-1] == "length" and events[-1].completion is done
    assert all(e.finish_reason is None for e in events[:-1])
    gone = victim.result(timeout=120)
    assert gone.finish_reason == "cancelled" and len(gone.ids) < 28
    assert cancelled_events[-1].finish_reason == "cancelled"
    # stop without draining: what has not finished ends as "cancelled", every waiter wakes
    late = [eng.submit(EngineRequest(PROMPTS[0], 28)) for _ in range(3)]
    eng.stop(drain=False, timeout=120)
    assert not eng.running
    reasons = [h.result(timeout=1).finish_reason for h in late]
    assert "cancelled" in reasons and set(reasons) <= {"cancelled", "length"}
    with pytest.raises(EngineStopped):
        eng.submit(EngineRequest(PROMPTS[0], 5))


def test_stop_drains_queued_requests(model):
    eng = ContinuousEngine(model, slots=2, max_len=MAX_LEN)
    eng.start()
    handles = [eng.submit(r) for r in _requests()]
    eng.stop(drain=True, timeout=120)
    assert all(h.done for h in handles)
    assert [h.completion.finish_reason for h in handles] == \
        [c.finish_reason for c in eng.generate(_requests())]


def test_logprobs_equal_transformers(model, hf_model):
    eng = ContinuousEngine(model, slots=2, max_len=MAX_LEN)
    c = eng.generate([EngineRequest(PROMPTS[0], 6, logprobs=3),
                      EngineRequest(PROMPTS[2], 4)])
    assert c[1].logprobs is None
    full = PROMPTS[0] + c[0].ids
    logits = torch.tensor(hf_fixtures.torch_logits(hf_model, [full])[0], dtype=torch.float64)
    ref = torch.log_softmax(logits, dim=-1).numpy()
    n = len(PROMPTS[0])
    for j, tok in enumerate(c[0].ids):
        row = ref[n - 1 + j]
        assert abs(c[0].logprobs[j] - row[tok]) < 1e-4
        top = c[0].top_logprobs[j]
        assert list(top) == list(np.argsort(-row)[:3])       # greedy: the first is tok
        assert next(iter(top)) == tok
        assert all(abs(v - row[k]) < 1e-4 for k, v in top.items())


@pytest.mark.parametrize("kwargs, message", [
    (dict(ids=[], max_new_tokens=4), "empty prompt"),
    (dict(ids=[1, 999], max_new_tokens=4), "outside the vocabulary"),
    (dict(ids=[1] * 30, max_new_tokens=10), "exceed this engine's max length 32"),
    (dict(ids=[1], max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(ids=[1], max_new_tokens=4, logprobs=21), "logprobs must be in [0, 20]"),
    (dict(ids=[1], max_new_tokens=4, stop_ids=list(range(17))), "at most 16 stop ids"),
    (dict(ids=[1], max_new_tokens=4, stop_strings=("x",)), "need a tokenizer"),
])
def test_bad_requests(engine, kwargs, message):
    with pytest.raises(UserError) as err:
        engine.submit(EngineRequest(**kwargs))
    assert message in str(err.value)


@pytest.mark.parametrize("argv, message", [
    (["--sides", "continuous,vllm"], "--sides: unknown vllm"),
    (["--min-new", "9", "--max-new", "8"], "need 1 <= 9 <= 8"),
    (["--prompts", "4", "--batch", "8"], "--prompts 4 must be >= --batch 8"),
])
def test_sweep_bench_bad_flags(argv, message):
    from bench import sweep
    with pytest.raises(UserError) as err:
        sweep.main(argv)
    assert message in str(err.value)
