"""The training loop: ``run_training(run_config) -> summary``.

One jitted, donated ``train_step`` per optimizer step; a checkpoint every
``checkpoint.every`` steps and at the end; automatic resume from the latest checkpoint
in ``output_dir``, which one run at a time holds (a lock); SIGTERM or SIGINT saves at
the current step and returns (see :class:`train.checkpoints.Preemption`); a non-finite
loss, or a write that fails (a full disk), stops the run with one line naming the step
and the last complete checkpoint, which stays intact. At the end the trained params
are written as a native checkpoint (``output_dir/model``: what generate, score, export
and a later run's ``model.init_from`` read), or under LoRA the adapters
(``output_dir/adapter``, PEFT layout). Metrics are read back every step: that host
sync is also what lets a NaN be caught before it reaches a checkpoint.
"""
from __future__ import annotations

import contextlib
import math
import os

import jax
import numpy as np

from meditron_jax import atomic
from meditron_jax.errors import UserError
from meditron_jax.model.lora import init_lora, save_adapters
from meditron_jax.model import abstract_params
from sharding import (PRESETS, activation_constrainer, check_batch, check_model_fits, check_sequence,
                      step_kernels,
                      describe, init_sharded, make_mesh, param_shardings)
from train import setup
from train.checkpoints import Checkpointer, Preemption
from train.config import RunConfig, objective as objective_of
from train.metrics import (MetricsWriter, Throughput, peak_flops, plot_losses, read_metrics,
                           train_flops_per_token)
from train.optim import make_optimizer, schedule
from train.step import (StepOptions, abstract_state, batch_shardings, init_state,
                        jit_eval_step, jit_train_step, make_eval_step, make_train_step,
                        reference_dtype, state_shardings)

class TrainingDiverged(UserError):
    """A non-finite loss or gradient norm."""


def _load_base(run: RunConfig, cfg, mesh, rules, dtype):
    """Initial weights: an earlier run's output dir, an HF/native checkpoint, or random."""
    src = run.model.init_from
    if src and setup.is_run_dir(src):
        ckpt = Checkpointer(os.path.join(src, "checkpoints"), keep=1, read_only=True)
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f"model.init_from {src}: that run has no checkpoint yet")
        meta = ckpt.read_meta(step)
        if meta.get("lora"):
            raise UserError(f"model.init_from {src}: that run trained LoRA adapters; merge "
                            "them first (meditron-jax export --lora) and start from the export")
        params = ckpt.restore_params(step, abstract_params(cfg, jax.numpy.float32),
                                     param_shardings(cfg, mesh, rules))
        ckpt.close()
        return jax.tree.map(lambda x: x.astype(dtype), params)
    if src:
        from meditron_jax.io.loading import load_model
        loaded = load_model(src, shardings=lambda c: param_shardings(c, mesh, rules), dtype=dtype,
                            verify=run.model.verify)
        return loaded.params
    return init_sharded(cfg, jax.random.key(run.train.seed), mesh, rules, dtype,
                        run.model.init_std)


def _global(local: dict, shardings: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}


def run_training(run: RunConfig) -> dict:
    """Train (or resume) as the run config says; returns a summary dict (steps, final
    loss, tokens/s, MFU, the signal that stopped it, and the paths of metrics.jsonl,
    loss.png, checkpoints). A SIGTERM or SIGINT before the training state exists raises
    :class:`Interrupted` (nothing to save); after that it saves and returns."""
    out = os.path.abspath(run.output_dir)
    with Preemption() as preemption, _claim(out):
        try:
            return _train(run, out, preemption)
        except OSError as exc:  # a file the run writes (metrics, tokenizer, summary, ...)
            raise UserError(f"{atomic.os_error_line(exc)}; fix it and rerun the same command "
                            "(a run resumes from its last complete checkpoint)") from None


@contextlib.contextmanager
def _claim(out: str):
    """Create ``output_dir`` and hold it for the run: a second trainer on it gets a
    one-line error at once. Process 0 holds the lock for the run's processes."""
    with contextlib.ExitStack() as stack:
        try:
            os.makedirs(out, exist_ok=True)
            if jax.process_index() == 0:
                stack.enter_context(atomic.locked(out))
        except OSError as exc:
            raise UserError(f"output_dir {atomic.os_error_line(exc)}") from None
        if not os.access(out, os.W_OK):
            raise UserError(f"output_dir {out}: not writable")
        yield


def _train(run: RunConfig, out: str, preemption: Preemption) -> dict:
    cfg, lcfg = setup.model_config(run), setup.lora_config(run)
    mesh, rules = make_mesh(run.train.mesh), PRESETS[run.train.rules]
    check_model_fits(cfg, mesh, rules)
    check_batch(run.train.batch_size // run.train.grad_accum, mesh, rules)
    check_sequence(run.data.seq_len, mesh, rules)
    if run.data.seq_len > cfg.max_position_embeddings:
        raise UserError(f"data.seq_len {run.data.seq_len} exceeds the model's "
                        f"max_position_embeddings ({cfg.max_position_embeddings})")
    tok, eos, tok_dir = setup.tokenizer_for(run, cfg)
    data = setup.make_data(run, tok, eos, tok_dir)  # every data file validated before any compile
    kernels = step_kernels(run.model.attention, mesh, rules, packed=True,  # chosen once, logged
                           dtype=setup.DTYPES[run.model.compute_dtype], head_dim=cfg.head_dim)
    if jax.process_index() == 0:
        atomic.write_json(os.path.join(out, setup.RUN_META), {
            "model": cfg.to_hf(), "run": run.to_dict(), "kernels": kernels.record()})
    setup.keep_tokenizer(tok_dir, out)

    param_dtype = setup.DTYPES[run.model.param_dtype]
    optimizer = make_optimizer(run.optim, run.train.steps)
    lr = schedule(run.optim, run.train.steps)
    objective = objective_of(run)
    opts = StepOptions(grad_accum=run.train.grad_accum,
                       compute_dtype=setup.DTYPES[run.model.compute_dtype],
                       remat=run.model.remat, kernels=kernels,
                       loss_chunk=run.model.loss_chunk, lora=lcfg, objective=objective,
                       beta=run.train.beta, orpo_lambda=run.train.orpo_lambda)
    # DPO/IPO under full fine-tuning: the initial weights, frozen, as the reference
    ref_dtype = reference_dtype(objective, lcfg, opts.compute_dtype)
    abstract = abstract_state(cfg, optimizer, param_dtype, lcfg, ref_dtype)
    shardings = state_shardings(cfg, abstract, mesh, rules, lcfg)
    constrain = activation_constrainer(mesh, rules)
    train_step = jit_train_step(make_train_step(cfg, optimizer, lr, opts, constrain),
                                shardings, mesh, rules)
    eval_step = jit_eval_step(make_eval_step(cfg, opts, constrain), shardings, mesh, rules)
    eval_q = run.log.eval_quantize
    eval_q_step = None if eval_q is None else jit_eval_step(
        make_eval_step(cfg, opts, constrain, quantize=eval_q), shardings, mesh, rules)
    bsh = batch_shardings(mesh, rules)

    ckpt = Checkpointer(os.path.join(out, "checkpoints"), run.checkpoint.keep,
                        run.checkpoint.async_save)
    meta = setup.run_meta(run, cfg, lcfg)
    latest = ckpt.latest_step()
    if latest is not None:
        state, data_state = ckpt.restore(latest, abstract, shardings, meta)
        data.train.set_state(data_state)
        if lcfg is not None:
            state.frozen = _load_base(run, cfg, mesh, rules, param_dtype)
        elif ref_dtype is not None:  # the reference is the initial weights, never saved
            state.frozen = _load_base(run, cfg, mesh, rules, ref_dtype)
    else:
        base = _load_base(run, cfg, mesh, rules, param_dtype)
        if lcfg is None:
            state = jax.jit(lambda p: init_state(p, optimizer, None if ref_dtype is None else
                                                 jax.tree.map(lambda x: x.astype(ref_dtype), p)),
                            out_shardings=shardings, donate_argnums=0)(base)
        else:
            key = jax.random.fold_in(jax.random.key(run.train.seed), 1)
            state = jax.jit(lambda k, f: init_state(init_lora(cfg, lcfg, k), optimizer, f),
                            out_shardings=shardings, donate_argnums=1)(key, base)
    start = int(jax.device_get(state.step))
    preemption.arm()  # a state to save from here on

    writer = MetricsWriter(out, run.train.steps, start, progress=run.log.progress,
                           tensorboard=run.log.tensorboard)
    writer.message(f"train: {cfg.num_params() / 1e6:.1f}M params{' (LoRA r=%d)' % lcfg.rank if lcfg else ''}, "
                   f"mesh {describe(mesh)}, batch {run.train.batch_size}"
                   f"{' pairs x 2' if objective != 'sft' else ''}x{run.data.seq_len}, "
                   f"{objective + ' (beta %g), ' % run.train.beta if objective in ('dpo', 'ipo') else ''}"
                   f"{kernels.describe()}"
                   f"{f', resuming from step {start}' if latest is not None else ''}")
    throughput = Throughput(train_flops_per_token(cfg, run.data.seq_len, lcfg, objective),
                            peak_flops(mesh.devices.flat, run.model.compute_dtype,
                                       run.log.cpu_peak_flops))
    writer.message(f"train: {throughput.describe()}")
    last: dict = {}
    rates: list[float] = []
    stopped_by = None
    step = start
    try:
        for step in range(start + 1, run.train.steps + 1):
            throughput.start()
            state, metrics = train_step(state, _global(next(data.train), bsh))
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            # the first step of a process includes compilation: not a throughput
            rate = throughput.stop(m["tokens"]) if step > start + 1 else None
            if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
                ckpt.wait()
                raise TrainingDiverged(
                    f"loss is {m['loss']} (grad norm {m['grad_norm']}) at step {step}; stopped "
                    f"without saving it; {ckpt.last_complete()}. Lower optim.lr or set "
                    "optim.clip_norm and rerun (it resumes from there)")
            last = {"step": step, **m, "tokens_per_s": rate, "mfu": throughput.mfu(rate),
                    "data_overlong": data.train.counts["overlong"]}
            if objective != "sft":
                last["data_unfit"] = data.train.counts["unfit"]
            if rate is not None:
                rates.append(rate)
            if run.log.eval_every and data.eval_batches and (
                    step % run.log.eval_every == 0 or step == run.train.steps):
                if objective != "sft":
                    last.update(_evaluate_pairs(eval_step, state, data.eval_batches, bsh))
                else:
                    last["eval_loss"] = _evaluate(eval_step, state, data.eval_batches, bsh)
                if eval_q_step is not None:
                    last[f"eval_loss_{eval_q}"] = _evaluate(eval_q_step, state,
                                                            data.eval_batches, bsh)
            writer.write(last)
            if run.log.every and step % run.log.every == 0:
                writer.message(_line(last))
            if step % run.checkpoint.every == 0 or step == run.train.steps:
                ckpt.save(step, state, data.train.get_state(), meta)
            ckpt.check()  # a background save that failed stops training here
            if preemption.reached(step):
                stopped_by = preemption.signal or "SIGTERM"  # several processes: JAX's notice
                ckpt.save(step, state, data.train.get_state(), meta)
                ckpt.wait()
                writer.message(f"train: {'preempted' if stopped_by == 'SIGTERM' else 'interrupted'}"
                               f" ({stopped_by}) at step {step}; checkpoint saved, rerun the same "
                               "command to resume")
                break
        ckpt.wait()
        rate = float(np.median(rates)) if rates else None
        return _finish(run, cfg, out, state, lcfg, ckpt, writer, last, start, step, stopped_by,
                       data, rate, throughput.mfu(rate))
    finally:
        writer.close()
        ckpt.close()


def _evaluate(eval_step, state, batches, bsh) -> float:
    nll = count = 0.0
    for b in batches:
        n, c = jax.device_get(eval_step(state, _global(b, bsh)))
        nll, count = nll + float(n), count + float(c)
    return nll / max(count, 1.0)


def _evaluate_pairs(eval_step, state, batches, bsh) -> dict:
    """Held-out preference metrics (eval_loss, eval_reward_margin, ...), pairs-weighted."""
    totals: dict = {}
    pairs = 0.0
    for b in batches:
        m = {k: float(v) for k, v in jax.device_get(eval_step(state, _global(b, bsh))).items()}
        n = m.pop("pairs")
        pairs += n
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v * n
    return {f"eval_{k}": v / max(pairs, 1.0) for k, v in totals.items()}


def _line(r: dict) -> str:
    parts = [f"step {r['step']}", f"loss {r['loss']:.4f}", f"lr {r['lr']:.2e}",
             f"grad_norm {r['grad_norm']:.3f}"]
    if r.get("tokens_per_s"):
        parts.append(f"{r['tokens_per_s']:.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if "reward_margin" in r:
        parts.append(f"margin {r['reward_margin']:.3f} acc {r['reward_accuracy']:.2f}")
    if "eval_loss" in r:
        parts.append(f"eval_loss {r['eval_loss']:.4f}")
    if "eval_reward_margin" in r:
        parts.append(f"eval margin {r['eval_reward_margin']:.3f} "
                     f"acc {r['eval_reward_accuracy']:.2f}")
    if "eval_loss_int8" in r:
        parts.append(f"eval_loss_int8 {r['eval_loss_int8']:.4f}")
    return "  ".join(parts)


def _finish(run, cfg, out, state, lcfg, ckpt, writer, last, start, step, stopped_by, data,
            rate, mfu) -> dict:
    """The final model (a native checkpoint, or the LoRA adapters), plot and summary."""
    adapter = model = None
    if lcfg is not None and not stopped_by:
        adapter = os.path.join(out, "adapter")
        if jax.process_index() == 0 and (step > start or not os.path.exists(adapter)):
            save_adapters(jax.device_get(state.params), lcfg, adapter, base_model=run.model.init_from)
    elif not stopped_by:
        from meditron_jax.io.checkpoint import save_params
        model = os.path.join(out, "model")
        if step > start or not os.path.exists(model):  # every process: a collective save
            try:
                save_params(model, cfg, state.params, source_dir=os.path.join(out, "tokenizer"))
            except UserError as exc:  # a storage failure, as one line
                raise UserError(f"{exc}; training itself is complete ({ckpt.last_complete()}): "
                                "free space and rerun the same command to write the final "
                                "model") from None
    plot = None
    if run.log.plot and jax.process_index() == 0:
        plot = plot_losses(writer.path, os.path.join(out, "loss.png"))
    if not last:  # nothing left to train: report the finished run's last step
        last = next((r for r in reversed(read_metrics(writer.path)) if "loss" in r), {})
    if data.train.report():
        writer.message(data.train.report())
    summary = {
        "steps": step, "start_step": start, "total_steps": run.train.steps,
        "preempted": stopped_by is not None, "signal": stopped_by,
        "final_loss": last.get("loss"), "final_eval_loss": last.get("eval_loss"),
        **({"final_eval_loss_int8": last.get("eval_loss_int8")}
           if run.log.eval_quantize else {}),
        **({key: last.get(key) for key in ("reward_margin", "reward_accuracy",
                                           "eval_reward_margin", "eval_reward_accuracy")}
           if objective_of(run) != "sft" else {}),
        "tokens_per_s": rate, "mfu": mfu,
        "metrics": writer.path, "loss_plot": plot, "tensorboard": writer.tb_dir,
        "checkpoints": ckpt.directory, "latest_checkpoint": ckpt.latest_step(),
        "model": model, "adapter": adapter, "output_dir": out, "data": data.train.counts,
    }
    if jax.process_index() == 0:
        atomic.write_json(os.path.join(out, "summary.json"), summary)
    return summary
