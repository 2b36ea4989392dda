"""Our side: the same weights loaded through ``load_model``, timed through the code
paths users run (``model.forward`` under jit, ``infer``'s Generator, ``train``'s step);
the int8 decode benchmarks run the Generator on ``quantize_params`` of those weights.

Each benchmark warms up (compiling), then marks the compile counter, so any
recompilation during the timed runs shows up in ``compiles_after_warmup``.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from bench import presets as workloads
from bench.presets import BenchPreset
from bench.timing import Bench, CompileCounter, KeepLast, timed


class _Measured(Bench):
    """Warm-up compile time and the compile counter around a jitted step."""

    def __init__(self, counter: CompileCounter, step):
        self.counter, self.step = counter, step

    def warm(self) -> dict:
        before = self.counter.seconds
        first = timed(self.step)
        compile_s = self.counter.seconds - before
        self.counter.mark()
        return {"first_call_s": first, "compile_s": compile_s}

    def once(self) -> dict:
        return {"seconds": timed(self.step)}

    def finish(self) -> dict:
        return {"compiles_after_warmup": self.counter.since_mark}


class _Forward(_Measured):
    def __init__(self, params, p: BenchPreset, counter: CompileCounter, reference_dir: str):
        import jax
        import jax.numpy as jnp

        from meditron_jax.model import forward

        fwd = jax.jit(lambda prm, tok: forward(prm, tok, p.cfg)[0])
        tokens = jnp.asarray(workloads.forward_tokens(p), jnp.int32)
        super().__init__(counter, KeepLast(lambda: fwd(params, tokens).block_until_ready()))
        self.reference = os.path.join(reference_dir, workloads.REFERENCE_LOGITS)

    def finish(self) -> dict:
        out = super().finish()
        if os.path.exists(self.reference):
            ours = workloads.reference_slice(np.asarray(self.step.last))
            out["max_abs_logit_diff_vs_transformers"] = float(
                np.max(np.abs(ours - np.load(self.reference))))
        return out


class _Generate(_Measured):
    """Greedy generation through infer's Generator (bucketed prefill, then the on-device
    while_loop decode over a donated cache), no stop ids: every row makes every token."""

    def __init__(self, model, p: BenchPreset, bench: str, counter: CompileCounter):
        from infer.engine import Generator
        from meditron_jax.model.quant import weight_bytes

        self.p = p
        self.weight_bytes = weight_bytes(model.params)  # the whole tree, as held
        prompts = workloads.prompt_tokens(p, bench).tolist()
        gen = Generator(model, batch_size=len(prompts))

        def run(n: int):
            out = gen.generate(prompts, max_new_tokens=n, stop_ids=())
            assert all(len(c.ids) == n for c in out), [len(c.ids) for c in out]
            return out
        self.run = run
        super().__init__(counter, KeepLast(lambda: run(p.work.new_tokens)))

    def warm(self) -> dict:
        before = self.counter.seconds
        first = timed(self.step)
        self.run(1)
        compile_s = self.counter.seconds - before
        self.counter.mark()
        return {"first_call_s": first, "compile_s": compile_s}

    def once(self) -> dict:
        ttft = timed(lambda: self.run(1))
        return workloads.decode_once(self.p, ttft, timed(self.step))

    def finish(self) -> dict:
        return {**super().finish(), "tokens": [list(map(int, c.ids)) for c in self.step.last],
                "params_bytes": self.weight_bytes}


class _Train(_Measured):
    """One AdamW step through train's jitted, donated ``train_step`` on a 1-device mesh,
    float32 compute, the preset's remat policy (the same as transformers' side)."""

    def __init__(self, params, p: BenchPreset, counter: CompileCounter):
        import jax
        import jax.numpy as jnp

        from sharding import PRESETS as RULES, activation_constrainer, make_mesh
        from train.config import OptimSection
        from train.optim import make_optimizer, schedule
        from train.step import (StepOptions, abstract_state, batch_shardings, init_state,
                                jit_train_step, make_train_step, state_shardings)

        hp = workloads.TRAIN_HPARAMS
        optim = OptimSection(lr=hp["learning_rate"], warmup_steps=0, decay="constant",
                             weight_decay=hp["weight_decay"], b1=hp["b1"], b2=hp["b2"],
                             eps=hp["eps"], clip_norm=hp["clip_norm"])
        optimizer = make_optimizer(optim, total_steps=1)
        mesh, rules = make_mesh("data=1", jax.devices()[:1]), RULES["train"]
        opts = StepOptions(compute_dtype=jnp.float32, remat=p.work.train_remat)
        shardings = state_shardings(p.cfg, abstract_state(p.cfg, optimizer), mesh, rules)
        step_fn = jit_train_step(
            make_train_step(p.cfg, optimizer, schedule(optim, 1), opts,
                            activation_constrainer(mesh, rules)), shardings, mesh, rules)
        self.state = jax.device_put(init_state(params, optimizer), shardings)
        tokens = workloads.forward_tokens(p).astype(np.int32)
        weights = np.ones(tokens.shape, np.float32)
        weights[:, -1] = 0.0  # the last position has no next token (as transformers' shift)
        positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
        batch = {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "weights": weights,
                 "segment_ids": np.ones_like(tokens), "positions": positions}
        batch = jax.device_put(batch, batch_shardings(mesh, rules))

        def step():
            self.state, metrics = step_fn(self.state, batch)
            return float(metrics["loss"])
        super().__init__(counter, step)


class Side:
    """One process's loaded model; ``bench(name)`` makes each benchmark. Training must
    come last: its donated state consumes the loaded parameters."""

    def __init__(self, p: BenchPreset, weights_dir: str):
        from meditron_jax.io.loading import load_model

        self.p, self.weights_dir = p, weights_dir
        self.counter = CompileCounter()
        self.model = load_model(weights_dir)
        self.decoding = None
        self.quantized = None  # the int8 decoding params, made on the first int8 benchmark
        self.matmul = "xla"

    def bench(self, name: str) -> Bench:
        from meditron_jax.model import unstack_layers

        if name == "forward":
            return _Forward(self.model.params, self.p, self.counter, self.weights_dir)
        if name == "train":
            self.decoding = self.quantized = None  # free the per-layer copies first
            return _Train(self.model.params, self.p, self.counter)
        if workloads.is_int8(name):
            if self.quantized is None:
                from meditron_jax.model.quant import quantize_params
                # int8 per output channel from the loaded weights, then per layer as below;
                # the compute dtype stays the embedding's (float32 here)
                self.quantized = dataclasses.replace(
                    self.model, params=unstack_layers(quantize_params(self.model.params)))
            return _Generate(self.quantized, self.p, workloads.base_bench(name), self.counter)
        if self.decoding is None:
            # per-layer weights, as `generate` decodes on one CPU device (unstack_layers)
            self.decoding = dataclasses.replace(self.model,
                                                params=unstack_layers(self.model.params))
        return _Generate(self.decoding, self.p, name, self.counter)
