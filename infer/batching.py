"""Continuous batching: a fixed number of decode slots, refilled as rows finish.

Admission. Queued requests are prefilled ``R`` rows at a time (R the mesh's
data-parallel size, filler rows dropped), or all ``B`` slots' worth in one call when more
than half the slots wait to be filled (a sweep's start, several rows ending in one
step): a prefill reads every weight once per call, so on an accelerator a [B, T]
prefill costs about what a [1, T] one does, and on a CPU it still runs its matmuls at
B x T rows. The prompts are bucketed to a power of two
(:func:`~infer.runner.bucket_length`) and run into a small cache that is then written
into their slots' rows of the running batch, with each row's settings (budget, stop ids,
sampling, seed); the other rows' state is untouched. Each row's first token is sampled
there.

Decode. :func:`~infer.slot_step.decode` runs up to ``chunk`` steps in a
``lax.while_loop`` and returns early once a row finishes, so the host can refill that
slot at once. The executables (one decode loop, one prefill per prompt bucket and call
size, two with prefix reuse) all compile in :meth:`ContinuousEngine.warmup`;
``compilations`` counts every XLA compilation the engine causes, so a test sees that
none happens after it.

The device state and the jitted functions are in :mod:`infer.slot_step`, the prefix
pool's index in :mod:`infer.prefix_index`.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from infer.engine import FINISH_REASONS, MAX_STOP_IDS, RUNNING, STOPPED, Completion, \
    stop_string_end
from infer.prefix_index import PREFIX_BLOCK, PrefixIndex
from infer.runner import PAD_ID, BatchRunner, bucket_length, cache_length, to_host
from infer.sampling import Sampling
from infer.slot_step import (MAX_TOP_LOGPROBS, POOL_AXES, Rows, SlotState, decode,
                             prefill)
from meditron_jax.errors import UserError
from meditron_jax.io.loading import LoadedModel
from meditron_jax.model import check_token_ids
from meditron_jax.model.kvcache import CACHE_AXES, KVCache

__all__ = ["CANCELLED", "ContinuousEngine", "EngineRequest", "EngineStopped", "Handle",
           "MAX_TOP_LOGPROBS", "PREFIX_BLOCK", "PrefixIndex", "QueueFull", "TokenEvent"]

CANCELLED = 3
REASONS = {**FINISH_REASONS, CANCELLED: "cancelled"}
DEFAULT_CHUNK = 8       # decode steps per host round trip (fewer when a row finishes)


class QueueFull(Exception):
    """``submit`` when the bounded queue is full (a server answers 429)."""


class EngineStopped(RuntimeError):
    """``submit`` after ``stop``."""


@dataclasses.dataclass
class EngineRequest:
    ids: list[int]                    # prompt token ids (already checked/fitted)
    max_new_tokens: int
    sampling: Sampling = Sampling()
    seed: int = 0                     # this row's seed (Generator's row_seeds)
    stop_ids: list[int] | None = None  # None: the checkpoint's eos ids
    stop_strings: tuple[str, ...] = ()
    logprobs: int | None = None       # None: none; k >= 0: each token's log-prob + top k


@dataclasses.dataclass
class TokenEvent:
    ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None
    finish_reason: str | None = None
    completion: Completion | None = None


# ---- compile counting -------------------------------------------------------------------------
_counting = threading.local()
_listener_installed = False


def _install_listener() -> None:
    global _listener_installed
    if _listener_installed:
        return
    from jax._src import dispatch  # the event name is not re-exported publicly
    import jax.monitoring
    name = dispatch.BACKEND_COMPILE_EVENT

    def listener(event: str, duration: float, **_):
        engine = getattr(_counting, "engine", None)
        if event == name and engine is not None:
            engine.compilations += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    _listener_installed = True


class _Counting:
    def __init__(self, engine):
        self.engine = engine

    def __enter__(self):
        self.previous = getattr(_counting, "engine", None)
        _counting.engine = self.engine

    def __exit__(self, *exc):
        _counting.engine = self.previous


# ---- the engine -------------------------------------------------------------------------------
class Handle:
    """One submitted request: ``result()`` blocks until it is done."""

    def __init__(self, engine: "ContinuousEngine", request: EngineRequest, on_event):
        self._engine, self.request, self._on_event = engine, request, on_event
        self._done = threading.Event()
        self._cancel = False
        self.completion: Completion | None = None

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request not finished after {timeout} s")
        return self.completion

    def cancel(self) -> None:
        """Free the slot at the next step (finish_reason "cancelled")."""
        self._cancel = True
        self._engine._wake()

    def _emit(self, event: TokenEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)


@dataclasses.dataclass
class _Slot:
    handle: Handle
    stop_strings: tuple[str, ...]
    kept: int = 0            # tokens delivered so far


class ContinuousEngine:
    """Continuous batching over ``slots`` rows of at most ``max_len`` tokens each
    (prompt + new tokens; default the model's max length, capped at 4096)."""

    def __init__(self, model: LoadedModel, mesh: Mesh | None = None, *, slots: int = 8,
                 max_len: int | None = None, attention: str = "auto", queue_size: int = 64,
                 prefix_cache: bool = True, seed: int = 0, chunk: int = DEFAULT_CHUNK,
                 prefix_entries: int = 4, prefix_len: int | None = None):
        if slots < 1:
            raise UserError(f"--batch-size (slots) must be >= 1, got {slots}")
        if queue_size < 1:
            raise UserError(f"queue size must be >= 1, got {queue_size}")
        if chunk < 1:
            raise UserError(f"decode chunk must be >= 1 step, got {chunk}")
        self.runner = BatchRunner(model, mesh, slots, attention=attention)
        self.model, self.cfg, self.slots = model, model.cfg, slots
        limit = self.cfg.max_position_embeddings
        max_len = min(limit, 4096) if max_len is None else int(max_len)
        if not 2 <= max_len <= limit:
            raise UserError(f"engine max_len must be in [2, {limit}] (the model's max length), "
                            f"got {max_len}")
        self.max_len = cache_length(max_len, cap=limit)
        self.seed, self.chunk, self.queue_size = int(seed), int(chunk), int(queue_size)
        self.compilations = 0
        self.prefill_calls: collections.Counter[int] = collections.Counter()   # by rows
        # wall seconds in admissions ("prefill": their prompts, until the first tokens are
        # on the host) and in decode calls with their delivery ("decode")
        self.seconds: collections.Counter[str] = collections.Counter(prefill=0.0, decode=0.0)
        _install_listener()
        placement = self.runner.placement
        # prefill rows per call: the smallest batch the mesh's data axes divide, and every
        # slot at once (the engine's batch, which fits by construction)
        self.prefill_rows = 1
        while True:
            try:
                placement.check_fits(self.prefill_rows)
                break
            except UserError:
                self.prefill_rows += 1
        self.prefill_sizes = tuple(sorted({self.prefill_rows, slots}))
        self.prefix_cache = bool(prefix_cache)   # may be switched off and on between requests
        self.prefix: PrefixIndex | None = None
        self._pool = None
        if prefix_cache and prefix_entries > 0:
            plen = prefix_len or max(PREFIX_BLOCK, self.max_len // 2)
            plen = min(plen, self.max_len - PREFIX_BLOCK) // PREFIX_BLOCK * PREFIX_BLOCK
            if plen >= PREFIX_BLOCK:
                self.prefix = PrefixIndex(prefix_entries, plen)
        self._lock = threading.Condition()
        self._queue: collections.deque[Handle] = collections.deque()
        self._active: dict[int, _Slot] = {}
        self._free = list(range(slots))
        self._accepting = True
        self._thread: threading.Thread | None = None
        self._state: SlotState | None = None
        self._error: BaseException | None = None

    # ---- executables ----------------------------------------------------------------------
    def _statics(self):
        r = self.runner
        return dict(cfg=self.cfg, dtype=r.dtype, constrain=r.placement.constrain,
                    kernels=r.kernels)

    def _decode_fn(self, with_logprobs: bool):
        r = self.runner

        def build():
            fn = functools.partial(decode, with_logprobs=with_logprobs, **self._statics())
            p = r.placement
            if p.mesh is None:
                return jax.jit(fn, donate_argnums=(1,))
            tree = p.tree(SlotState.logical_axes())
            return jax.jit(fn, in_shardings=(p.params(), tree, p.sharding(())),
                           out_shardings=tree, donate_argnums=(1,))
        return r.jitted("cb-decode", self.slots, self.max_len, with_logprobs, build=build)

    def _chunk_len(self, t: int, with_prefix: bool) -> int:
        return min(self.max_len, (self.prefix.max_len if with_prefix else 0) + t)

    def _prefill_fn(self, rows: int, t: int, with_prefix: bool, with_logprobs: bool):
        r = self.runner
        pool_len = self.prefix.max_len if self.prefix else 0
        chunk_len = self._chunk_len(t, with_prefix)

        def build():
            fn = functools.partial(prefill, chunk_len=chunk_len, with_prefix=with_prefix,
                                   with_logprobs=with_logprobs, **self._statics())
            p = r.placement
            if p.mesh is None:
                return jax.jit(fn, donate_argnums=(1, 2))
            tree = p.tree(SlotState.logical_axes())
            pool = None if self.prefix is None else (p.sharding(POOL_AXES),) * 2
            row = p.sharding(("batch",))
            rows = p.tree(Rows.logical_axes())
            rep = p.sharding((None,))
            return jax.jit(fn, in_shardings=(p.params(), tree, pool, rows,
                                             p.sharding(("batch", "seq")), row, row, rep,
                                             rep, rep, rep),
                           out_shardings=(tree, pool), donate_argnums=(1, 2))
        return r.jitted("cb-prefill", self.slots, self.max_len, rows, t,
                        with_prefix, with_logprobs, pool_len,
                        self.prefix.entries if self.prefix else 0, build=build)

    def _buckets(self) -> list[int]:
        out, t = [], bucket_length(1)
        while True:
            out.append(min(t, self.max_len))
            if t >= self.max_len:
                return out
            t *= 2

    # ---- state ----------------------------------------------------------------------------
    def _init_state(self) -> None:
        if self._state is not None:
            return
        p, b, s = self.runner.placement, self.slots, self.max_len
        cache = KVCache.init(self.cfg, b, s, self.runner.dtype, p.cache_heads)
        axes = SlotState.logical_axes()

        def put(x, ax):   # committed, as the executables' outputs are (one jit cache key)
            x = p.put(np.asarray(x), ax)
            return jax.device_put(x, jax.devices()[0]) if p.mesh is None else x
        rows = jax.tree.map(put, Rows.empty(b, s), axes.rows)
        cache = KVCache(k=put(cache.k, CACHE_AXES), v=put(cache.v, CACHE_AXES),
                        segment_ids=put(cache.segment_ids, ("batch", "seq")),
                        index=put(np.zeros((b,), np.int32), ("batch",)))
        self._state = SlotState(cache=cache, rows=rows)
        if self.prefix is not None:
            e, plen = self.prefix.entries, self.prefix.max_len
            shape = (e, self.cfg.num_hidden_layers, p.cache_heads, plen, self.cfg.head_dim)
            zeros = np.zeros(shape, jnp.dtype(self.runner.dtype))
            self._pool = (put(zeros, POOL_AXES), put(zeros, POOL_AXES))

    def warmup(self, logprobs: bool = False) -> None:
        """Compile everything a request can need (the decode loop, a prefill per prompt
        bucket, with and without a reused prefix), so that serving compiles nothing.
        ``logprobs``: also the variants that compute log-probs."""
        with _Counting(self):
            self._init_state()
            for lp in (False, True) if logprobs else (False,):
                self._state = self._decode_fn(lp)(self.runner.params, self._state,
                                                  self._put_scalar(0))
                for rows, t in itertools.product(self.prefill_sizes, self._buckets()):
                    for with_prefix in (False, True) if self.prefix else (False,):
                        if with_prefix and self._chunk_len(t, True) < t + PREFIX_BLOCK:
                            continue
                        self._prefill([], t, with_prefix, lp, rows)
            jax.block_until_ready(self._state)

    def _put_scalar(self, x):
        return self.runner.placement.put(np.asarray(x, np.int32), ())

    # ---- requests -------------------------------------------------------------------------
    def check(self, request: EngineRequest) -> None:
        """Raise UserError (one line) for a request this engine cannot run."""
        ids = request.ids
        if not ids:
            raise UserError("empty prompt; give at least one token")
        check_token_ids(np.asarray(ids), self.cfg)
        if request.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        if len(ids) + request.max_new_tokens > self.max_len:
            raise UserError(f"{len(ids)} prompt tokens + {request.max_new_tokens} new tokens "
                            f"exceed this engine's max length {self.max_len}; shorten the "
                            "prompt or ask for fewer tokens")
        stops = self.model.eos_ids if request.stop_ids is None else request.stop_ids
        if len(stops) > MAX_STOP_IDS:
            raise UserError(f"at most {MAX_STOP_IDS} stop ids, got {len(stops)}")
        if any(not s for s in request.stop_strings):
            raise UserError("empty stop string")
        if request.stop_strings and self.model.tokenizer is None:
            raise UserError("stop strings need a tokenizer; this model directory has none")
        if request.logprobs is not None and not 0 <= request.logprobs <= MAX_TOP_LOGPROBS:
            raise UserError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got "
                            f"{request.logprobs}")

    def submit(self, request: EngineRequest,
               on_event: Callable[[TokenEvent], None] | None = None) -> Handle:
        """Queue a request (thread-safe); raises QueueFull when the queue is full."""
        self.check(request)
        handle = Handle(self, request, on_event)
        with self._lock:
            if not self._accepting:
                raise EngineStopped("the engine is stopping; it accepts no new requests")
            if self._error is not None:
                raise RuntimeError("the engine's decode loop failed") from self._error
            if len(self._queue) >= self.queue_size:
                raise QueueFull(f"queue full ({self.queue_size} requests waiting)")
            self._queue.append(handle)
            self._lock.notify_all()
        return handle

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Run the decode loop in a background thread."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._serve, name="continuous-engine",
                                        daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting requests; ``drain`` finishes queued and running ones, otherwise
        they end as "cancelled". Returns when the loop has ended (or ``timeout``)."""
        with self._lock:
            self._accepting = False
            if not drain:
                for h in list(self._queue) + [s.handle for s in self._active.values()]:
                    h._cancel = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _serve(self) -> None:
        with _Counting(self):
            try:
                self._init_state()
                while True:
                    with self._lock:
                        while (not self._queue and not self._active) and self._accepting:
                            self._lock.wait()
                        if not self._queue and not self._active:
                            return
                    self._step()
            except BaseException as exc:   # noqa: BLE001: fail every waiter, not hang it
                self._fail(exc)
                raise

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._error = exc
            handles = list(self._queue) + [s.handle for s in self._active.values()]
            self._queue.clear()
            self._active.clear()
        for h in handles:
            h.completion = Completion(ids=[], finish_reason="error", text=None)
            h._done.set()

    def generate(self, requests: Sequence[EngineRequest],
                 on_done: Callable[[int, Completion], None] | None = None) -> list[Completion]:
        """Every request's completion, in input order. Without a started loop this runs
        in the caller's thread (deterministic, as multi-host runs need); ``on_done(i,
        completion)`` is called as each finishes."""
        for r in requests:
            self.check(r)
        if self.running:
            handles = []
            for i, r in enumerate(requests):
                cb = None
                if on_done is not None:
                    cb = lambda e, i=i: e.completion is not None and on_done(i, e.completion)
                while True:
                    try:
                        handles.append(self.submit(r, cb))
                        break
                    except QueueFull:   # wait for the oldest unfinished one, then retry
                        next(h for h in handles if not h.done)._done.wait(0.05)
            return [h.result() for h in handles]
        handles = []
        for i, r in enumerate(requests):
            cb = None
            if on_done is not None:
                cb = lambda e, i=i: e.completion is not None and on_done(i, e.completion)
            handles.append(Handle(self, r, cb))
        with _Counting(self):
            self._init_state()
            self._queue.extend(handles)
            while self._queue or self._active:
                self._step()
        return [h.completion for h in handles]

    # ---- one round: admit, decode a chunk, deliver ---------------------------------------
    def _step(self) -> None:
        clock = time.perf_counter()
        if self._admit() or any(s.handle._cancel for s in self._active.values()):
            self._collect()     # first tokens out now (time to first token), cancels freed
        now = time.perf_counter()
        self.seconds["prefill"] += now - clock
        if not self._active:
            return
        lp = self._wants_logprobs()
        self._state = self._decode_fn(lp)(self.runner.params, self._state,
                                          self._put_scalar(self.chunk))
        self._collect()
        self.seconds["decode"] += time.perf_counter() - now

    def _wants_logprobs(self) -> bool:
        return any(s.handle.request.logprobs is not None for s in self._active.values())

    def _admit(self) -> bool:
        admitted = False
        while True:
            with self._lock:
                group: list[tuple[int, Handle]] = []
                rows = self._call_rows(min(len(self._queue), len(self._free)))
                while self._queue and len(self._free) > len(group) and len(group) < rows:
                    h = self._queue.popleft()
                    if h._cancel:
                        self._finish(h, [], CANCELLED, None, [], [])
                        continue
                    group.append((self._free[len(group)], h))
                if not group:
                    return admitted
                del self._free[:len(group)]
            self._prefill_group(group, rows)
            admitted = True

    def _call_rows(self, waiting: int) -> int:
        """Rows of the next prefill call when ``waiting`` requests can be admitted: every
        slot's worth once more than half the slots would be filled, else R."""
        big = self.prefill_sizes[-1]
        return big if 2 * waiting > big else self.prefill_sizes[0]

    def _prefill_group(self, group: list[tuple[int, Handle]], rows: int) -> None:
        plan = []
        for slot, h in group:
            ids = list(h.request.ids)
            entry, m = (-1, 0)
            if self.prefix is not None and self.prefix_cache:
                entry, m = self.prefix.lookup(ids, len(ids) - 1)
                if m and m + bucket_length(len(ids) - m) > self._chunk_len(
                        bucket_length(len(ids) - m), True):
                    entry, m = -1, 0
            plan.append((slot, h, ids, entry, m))
        while True:   # one suffix bucket for the call; a prefix must leave room for it
            t = min(self.max_len, max(bucket_length(len(ids) - m) for _, _, ids, _, m in plan))
            late = [i for i, (*_, m) in enumerate(plan) if m and m + t > self._chunk_len(t, True)]
            if not late:
                break
            for i in late:
                plan[i] = plan[i][:3] + (-1, 0)
        with_prefix = any(m for *_, m in plan)
        lp = any(h.request.logprobs is not None for _, h, *_ in plan) or self._wants_logprobs()
        self._prefill(plan, t, with_prefix, lp, rows)
        for slot, h, ids, entry, m in plan:
            self._active[slot] = _Slot(h, tuple(h.request.stop_strings))

    def _prefill(self, plan, t: int, with_prefix: bool, with_logprobs: bool,
                 r: int) -> None:
        """Run one prefill call of ``r`` rows for ``plan`` [(slot, handle, ids, entry, m)]
        (empty: a warm-up call on filler rows only)."""
        s, b = self.max_len, self.slots
        new = Rows.empty(r, s)
        suffix = np.full((r, t), PAD_ID, np.int32)
        suffix_len = np.ones((r,), np.int32)
        start = np.zeros((r,), np.int32)
        entry = np.zeros((r,), np.int32)
        slots = np.full((r,), b, np.int32)             # filler rows: dropped
        save = np.full((r,), self.prefix.entries if self.prefix else 0, np.int32)
        seeds = np.zeros((r + 1,), np.uint32)
        seeds[0] = self.seed % (1 << 32)
        for i, (slot, h, ids, e, m) in enumerate(plan):
            q = h.request
            new.tokens[i, :len(ids)] = ids
            new.budget[i] = q.max_new_tokens
            new.finish[i] = RUNNING
            seeds[1 + i] = q.seed % (1 << 32)
            stops = self.model.eos_ids if q.stop_ids is None else q.stop_ids
            new.stop_ids[i, :len(stops)] = stops
            new.temperature[i] = q.sampling.temperature
            new.top_k[i] = q.sampling.top_k
            new.top_p[i] = q.sampling.top_p
            suffix[i, :len(ids) - m] = ids[m:]
            suffix_len[i], start[i], entry[i], slots[i] = len(ids) - m, m, max(e, 0), slot
        if self.prefix is not None and self.prefix_cache:
            busy = {e for *_, e, _ in plan if e >= 0}   # read by this call: not overwritten
            for i, (slot, h, ids, e, m) in enumerate(plan):
                claimed = self.prefix.claim(ids, m, busy)
                if claimed >= 0:
                    save[i] = claimed
                    busy.add(claimed)                 # one row's write per entry and call
        p = self.runner.placement
        rows = jax.tree.map(lambda a, ax: p.put(a, ax), new, Rows.logical_axes(),
                            is_leaf=lambda x: isinstance(x, np.ndarray))
        fn = self._prefill_fn(r, t, with_prefix, with_logprobs)
        self.prefill_calls[r] += bool(plan)
        self._state, pool = fn(self.runner.params, self._state, self._pool, rows,
                               p.put(suffix, ("batch", "seq")), p.put(suffix_len, ("batch",)),
                               p.put(start, ("batch",)), p.put(entry, (None,)),
                               p.put(slots, (None,)), p.put(save, (None,)),
                               p.put(seeds, (None,)))
        if self._pool is not None:
            self._pool = pool

    def _collect(self) -> None:
        """Deliver new tokens; finish rows (stop id, budget, stop string, cancel)."""
        if not self._active:
            return
        st = self._state.rows
        generated, finish = to_host(st.generated), to_host(st.finish).copy()
        tokens, plen = to_host(st.tokens), to_host(st.prompt_len)
        lp = top_ids = top_lp = None
        if self._wants_logprobs():
            lp, top_ids, top_lp = to_host(st.logprob), to_host(st.top_ids), to_host(st.top_logprob)
        changed = False
        for slot, a in list(self._active.items()):
            h, n = a.handle, int(plen[slot])
            ids = tokens[slot, n:n + generated[slot]].tolist()
            end, reason, text = len(ids), int(finish[slot]), None
            if reason == STOPPED:
                end -= 1
            if a.stop_strings:
                hit = stop_string_end(self.model.tokenizer.decode, ids[:end], a.kept,
                                       a.stop_strings)
                if hit is not None:
                    (end, text), reason = hit, STOPPED
            if h._cancel and reason == RUNNING:
                reason = CANCELLED
            if reason != RUNNING and finish[slot] == RUNNING:
                finish[slot], changed = reason, True
            new_ids = ids[a.kept:end]
            k = h.request.logprobs
            new_lp = new_top = None
            if k is not None:
                span = range(n + a.kept, n + end)
                new_lp = [float(lp[slot, j]) for j in span]
                new_top = [{int(top_ids[slot, j, c]): float(top_lp[slot, j, c])
                            for c in range(k)} for j in span]
            a.kept = end
            if reason == RUNNING:
                if new_ids:
                    h._emit(TokenEvent(new_ids, new_lp, new_top))
                continue
            del self._active[slot]
            with self._lock:
                self._free.append(slot)
            all_lp = all_top = None
            if k is not None:
                span = range(n, n + end)
                all_lp = [float(lp[slot, j]) for j in span]
                all_top = [{int(top_ids[slot, j, c]): float(top_lp[slot, j, c])
                            for c in range(k)} for j in span]
            self._finish(h, ids[:end], reason, text, all_lp, all_top, new_ids, new_lp, new_top)
        if changed:
            rows = dataclasses.replace(st, finish=jax.device_put(finish, st.finish.sharding))
            self._state = dataclasses.replace(self._state, rows=rows)

    def _finish(self, h: Handle, ids, reason: int, text, all_lp, all_top, new_ids=(),
                new_lp=None, new_top=None) -> None:
        if text is None and self.model.tokenizer is not None:
            text = self.model.tokenizer.decode(ids)
        c = Completion(ids=list(ids), finish_reason=REASONS[reason], text=text,
                       logprobs=all_lp, top_logprobs=all_top)
        h.completion = c
        try:
            h._emit(TokenEvent(list(new_ids), new_lp, new_top, c.finish_reason, c))
        finally:
            h._done.set()

    # ---- figures ----------------------------------------------------------------------------
    @property
    def prefix_hits(self) -> int:
        return self.prefix.hits if self.prefix else 0

    @property
    def prefix_tokens_reused(self) -> int:
        return self.prefix.reused_tokens if self.prefix else 0
