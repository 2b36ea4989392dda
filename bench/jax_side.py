"""Our side: the same weights loaded through ``load_model``, timed through the code
paths users run (``model.forward`` under jit, ``infer``'s Generator, ``train``'s step).

Each benchmark warms up (compiling), then marks the compile counter, so any
recompilation during the timed repeats shows up in ``compiles_after_warmup``.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from bench import presets as workloads
from bench.presets import BenchPreset
from bench.timing import CompileCounter, KeepLast, OtherLoad, median_seconds, timed


def _measured(counter: CompileCounter, warmup, step, repeats: int) -> dict:
    """Warm up (compile time reported apart), then the median of ``repeats`` steps."""
    compile_before = counter.seconds
    first = timed(warmup)
    compile_s = counter.seconds - compile_before
    counter.mark()
    seconds = median_seconds(step, repeats, warmup=0)
    return {"seconds": seconds, "first_call_s": first, "compile_s": compile_s,
            "compiles_after_warmup": counter.since_mark}


def _forward(params, p: BenchPreset, repeats: int, counter: CompileCounter,
             reference_dir: str) -> dict:
    import jax
    import jax.numpy as jnp

    from meditron_jax.model import forward

    fwd = jax.jit(lambda prm, tok: forward(prm, tok, p.cfg)[0])
    tokens = jnp.asarray(workloads.forward_tokens(p), jnp.int32)

    step = KeepLast(lambda: fwd(params, tokens).block_until_ready())
    result = _measured(counter, step, step, repeats)
    reference = os.path.join(reference_dir, workloads.REFERENCE_LOGITS)
    if os.path.exists(reference):
        ours = workloads.reference_slice(np.asarray(step.last))
        result["max_abs_logit_diff_vs_transformers"] = float(np.max(np.abs(ours - np.load(reference))))
    return result


def _generate(model, p: BenchPreset, bench: str, repeats: int, counter: CompileCounter) -> dict:
    """Greedy generation through infer's Generator (bucketed prefill, then the on-device
    while_loop decode over a donated cache), no stop ids: every row makes every token."""
    from infer.engine import Generator

    prompts = workloads.prompt_tokens(p, bench).tolist()
    gen = Generator(model, batch_size=len(prompts))

    def run(n: int):
        out = gen.generate(prompts, max_new_tokens=n, stop_ids=())
        assert all(len(c.ids) == n for c in out), [len(c.ids) for c in out]
        return out

    compile_before = counter.seconds
    first = timed(lambda: run(p.work.new_tokens))
    run(1)
    compile_s = counter.seconds - compile_before
    counter.mark()
    ttft = median_seconds(lambda: run(1), repeats, warmup=0)
    full = KeepLast(lambda: run(p.work.new_tokens))
    total = median_seconds(full, repeats, warmup=0)
    tokens = [c.ids for c in full.last]
    result = workloads.decode_result(p, bench, ttft, total, first, tokens)
    result.update(compile_s=compile_s, compiles_after_warmup=counter.since_mark)
    return result


def _train(params, p: BenchPreset, repeats: int, counter: CompileCounter) -> dict:
    """One AdamW step through train's jitted, donated ``train_step`` on a 1-device mesh,
    float32 compute, the preset's remat policy (the same as transformers' side)."""
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
    state = jax.device_put(init_state(params, optimizer), shardings)
    tokens = workloads.forward_tokens(p).astype(np.int32)
    weights = np.ones(tokens.shape, np.float32)
    weights[:, -1] = 0.0  # the last position has no next token (as transformers' shift)
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1), "weights": weights,
             "segment_ids": np.ones_like(tokens), "positions": positions}
    batch = jax.device_put(batch, batch_shardings(mesh, rules))

    def step():
        nonlocal state
        state, metrics = step_fn(state, batch)
        return float(metrics["loss"])

    return _measured(counter, step, step, repeats)


def run(p: BenchPreset, benches: list[str], repeats: int, weights_dir: str) -> dict:
    from meditron_jax.loading import load_model
    from meditron_jax.model import decode_layout

    counter = CompileCounter()
    model = load_model(weights_dir)
    decoding = None
    results = {}
    # Training last: its donated state consumes the loaded parameters.
    for bench in sorted(benches, key=lambda b: b == "train"):
        if bench == "train":
            decoding = None  # free the per-layer copies first
        elif bench != "forward" and decoding is None:
            # per-layer, transposed weights: XLA:CPU decodes faster (model.decode_layout)
            decoding = dataclasses.replace(model, params=decode_layout(model.params))
        with OtherLoad() as load:
            if bench == "forward":
                results[bench] = _forward(model.params, p, repeats, counter, weights_dir)
            elif bench == "train":
                results[bench] = _train(model.params, p, repeats, counter)
            else:
                results[bench] = _generate(decoding, p, bench, repeats, counter)
        results[bench]["other_load"] = load.value
    return results
