"""``meditron-jax plan``: will this step fit, and how much work is it? Asked before the job.

Builds the real train step (``train.step``) or decode loop (``infer.engine``) for a
model, mesh and target, lowers and compiles it from abstract inputs only
(``sharding.aot``) and prints per-device memory, whether it fits, and FLOPs per step.
It lives in ``cli/`` because it needs both ``train`` and ``infer``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile

import jax
import jax.numpy as jnp

from meditron_jax.kernels import ATTENTION
from meditron_jax.model.config import LlamaConfig, preset, PRESETS as MODEL_PRESETS
from meditron_jax.errors import UserError
from meditron_jax.io.loading import directory_kind
from meditron_jax.model import REMAT_POLICIES
from sharding import (INFER_RULES, TRAIN_RULES, Rules, cache_heads, check_sequence, describe,
                      make_mesh, step_kernels)
from sharding.aot import TARGET_EXAMPLES, MemoryPlan, compile_plan, resolve_target, step_flops

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
GiB = 1024 ** 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="meditron3-8b",
                        help=f"a preset ({', '.join(MODEL_PRESETS)}) or a checkpoint directory "
                             "(only its config is read)")
    parser.add_argument("--mode", choices=("train", "dpo", "infer"), default="train",
                        help="train: one optimizer step; dpo: one DPO step on --batch "
                             "preference pairs (2 rows of --seq each: policy, frozen bf16 "
                             "reference and AdamW state); infer: the KV-cache decode loop")
    parser.add_argument("--mesh", default=None,
                        help="mesh spec, e.g. fsdp=8 or data=2,fsdp=2,tensor=2; train: "
                             "context=N splits each row's sequence over N devices (context "
                             "parallelism, e.g. fsdp=2,context=4); None means "
                             "fsdp=-1 for train, tensor=-1 for infer")
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows)")
    parser.add_argument("--seq", type=int, default=2048,
                        help="train: tokens per row; infer: KV cache length")
    parser.add_argument("--target", default="cpu:8",
                        help=f"devices to compile for: {', '.join(TARGET_EXAMPLES)}; "
                             "tpu:GEN:TOPOLOGY:N for N slices (TPU targets need libtpu: "
                             "pip install 'meditron-jax[tpu]'; no TPU needed)")
    parser.add_argument("--remat", choices=REMAT_POLICIES, default="full",
                        help="train: activation rematerialization policy")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="train: micro-batches per step")
    parser.add_argument("--param-dtype", choices=tuple(DTYPES), default=None,
                        help="weights' dtype; None means float32 master weights for train, "
                             "bfloat16 for infer")
    parser.add_argument("--compute-dtype", choices=tuple(DTYPES), default="bfloat16",
                        help="train: matmul dtype")
    parser.add_argument("--attention", choices=ATTENTION, default="auto",
                        help="train: attention kernel (auto: splash on TPU targets, XLA on cpu)")
    parser.add_argument("--quantize", default=None, metavar="SCHEME",
                        help="infer: int8 weight-only quantization (projections and head int8 "
                             "with float32 per-channel scales; KV cache --param-dtype)")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="also write the plan as JSON to PATH")
    parser.epilog = "Exit status: 0 when the step fits, 1 when it does not, 2 on bad input."


@dataclasses.dataclass
class Plan:
    model: str
    mode: str
    target: str
    device_kind: str
    devices: int
    mesh: str
    batch: int
    seq: int
    settings: str
    memory: MemoryPlan
    flops: float          # global, per step (train) or per decode step (infer)
    model_flops: float    # analytic 6N + attention (train only; 0 for infer)

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["memory"].update(required=self.memory.required, fits=self.memory.fits)
        return data

    def format(self) -> str:
        m = self.memory
        lines = [f"plan: {self.model} {self.mode} step on {self.target} "
                 f"({self.devices} x {self.device_kind}), mesh {self.mesh}",
                 f"  batch {self.batch} x {self.seq}, {self.settings}"]
        if m.refusal is not None:
            lines.append(f"  does not fit: the compiler refused it: {m.refusal}")
        else:
            lines.append(f"  per device: arguments {_gib(m.arguments)}, outputs {_gib(m.outputs)}"
                         f" (aliased {_gib(m.aliased)}), temporaries {_gib(m.temporaries)}, "
                         f"code {_gib(m.code)}")
            verdict = "fits" if m.fits else "does not fit"
            lines.append(f"  needs {_gib(m.required)} of {_gib(m.capacity)} {m.capacity_label} "
                         f"per device: {verdict} (compiler's liveness peak "
                         f"{_gib(m.compiler_peak)})")
        what = "per step" if self.mode != "infer" else "per decode step"
        flops = f"  FLOPs {what}: {self.flops:.3e} (XLA, layers unrolled), " \
                f"{self.flops / self.devices:.3e} per device"
        if self.model_flops:
            flops += f"; model 6N+attention {self.model_flops:.3e} " \
                     f"(x{self.flops / self.model_flops:.2f}: rematerialization)"
        lines.append(flops)
        lines.append(f"  compile {m.compile_s:.1f} s")
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 4 else f"{n / 2 ** 20:.1f} MiB"


def load_config(model: str) -> LlamaConfig:
    if model in MODEL_PRESETS:
        return preset(model)
    if not os.path.exists(model):
        raise UserError(f"--model {model!r}: neither a preset ({', '.join(MODEL_PRESETS)}) nor "
                        "an existing checkpoint directory")
    name = "meditron_config.json" if directory_kind(model) == "native" else "config.json"
    return LlamaConfig.from_hf(os.path.join(model, name))


def make_plan(cfg: LlamaConfig, *, model: str, mode: str, target: str, mesh: str | None,
              batch: int, seq: int, remat: str = "full", grad_accum: int = 1,
              param_dtype: str | None = None, compute_dtype: str = "bfloat16",
              attention: str = "auto", quantize: str | None = None) -> Plan:
    """Compile the step for ``target`` and measure it (abstract inputs only)."""
    from meditron_jax.model.quant import check_scheme
    check_scheme(quantize)
    if quantize is not None and mode != "infer":
        raise UserError(f"--quantize {quantize}: int8 weights are inference-only; plan it with "
                        "--mode infer (training keeps float weights)")
    if batch < 1 or seq < 1 or grad_accum < 1:
        raise UserError("--batch, --seq and --grad-accum must be positive")
    if seq > cfg.max_position_embeddings:
        raise UserError(f"--seq {seq} exceeds the model's max_position_embeddings "
                        f"({cfg.max_position_embeddings})")
    devices = resolve_target(target)
    spec = mesh or ("fsdp=-1" if mode != "infer" else "tensor=-1")
    the_mesh = make_mesh(spec, devices=list(devices.devices))
    if mode != "infer":
        if batch % grad_accum:
            raise UserError(f"--batch {batch} is not divisible by --grad-accum {grad_accum}")
        check_sequence(seq, the_mesh, TRAIN_RULES)
        from train.step import abstract_train_step
        pdt = param_dtype or "float32"

        def build(m, attention=attention):
            return abstract_train_step(cfg, m, TRAIN_RULES, batch=batch, seq=seq, remat=remat,
                                       param_dtype=DTYPES[pdt],
                                       compute_dtype=DTYPES[compute_dtype],
                                       grad_accum=grad_accum, attention=attention,
                                       objective="dpo" if mode == "dpo" else "sft")
        # the same facts train.step gives select, so this line names what the step runs
        kernels = step_kernels(attention, the_mesh, TRAIN_RULES, packed=True,
                               dtype=DTYPES[compute_dtype], head_dim=cfg.head_dim)
        settings = (f"remat {remat}, params {pdt}, compute {compute_dtype}, "
                    f"grad accum {grad_accum}, AdamW, {kernels.describe()}")
        model_flops = batch * seq * cfg.flops_per_token(seq, training=True)
        if mode == "dpo":  # two rows per pair; the reference's forward on both
            settings += f", DPO: {batch} pairs, frozen {compute_dtype} reference"
            model_flops = 2 * batch * seq * (cfg.flops_per_token(seq, training=True)
                                             + cfg.flops_per_token(seq, training=False))
    else:
        from infer.engine import abstract_decode_step
        pdt = param_dtype or "bfloat16"

        def build(m, attention=None):
            return abstract_decode_step(cfg, m, INFER_RULES, batch=batch, max_len=seq,
                                        dtype=DTYPES[pdt], quantize=quantize)
        settings = (f"weights and KV cache {pdt}" if quantize is None else
                    f"weights {quantize} (per-channel float32 scales, embedding {pdt}), "
                    f"KV cache and activations {pdt}")
        model_flops = 0.0
    settings += _kv_heads_note(cfg, the_mesh, TRAIN_RULES if mode != "infer" else INFER_RULES,
                               mode)
    memory = compile_plan(*build(the_mesh), devices)
    # FLOPs belong to the global program: count them on one CPU device (lowered, not
    # compiled), which also works where the target's compile-only client cannot; with XLA
    # attention, whose FLOPs cost analysis sees (it is blind inside a Pallas kernel).
    # Dense XLA attention there: the blockwise path's loops run a data-dependent number of
    # times, which cost analysis would count once (lowered only: its [T, T] never exists).
    from meditron_jax.kernels.xla import dense_for_counting
    with dense_for_counting():
        flops = step_flops(*build(make_mesh("fsdp=1", devices=jax.devices("cpu")[:1]), "xla"))
    return Plan(model=model, mode=mode, target=devices.name, device_kind=devices.device_kind,
                devices=len(devices.devices), mesh=describe(the_mesh), batch=batch, seq=seq,
                settings=settings, memory=memory, flops=flops, model_flops=model_flops)


def _kv_heads_note(cfg: LlamaConfig, mesh, rules: Rules, mode: str) -> str:
    """How KV heads that the mesh does not divide are laid out (sharding.rules)."""
    if rules.for_model(cfg, mesh) is rules:
        return ""
    note = f"; {cfg.num_key_value_heads} KV heads: k/v weights replicated"
    if mode == "infer":
        note += f", cache of {cache_heads(cfg, mesh, rules)} heads (each repeated)"
    return note


def _prepare_backend(target: str) -> None:
    """A plan never runs anything: CPU devices (and libtpu's compile-only TPU topologies)
    suffice, and a TPU VM's chips may be busy with the very job being planned."""
    parts = target.strip().lower().split(":")
    try:
        jax.config.update("jax_platforms", "cpu")
        if parts[0] == "cpu" and len(parts) == 2 and parts[1].isdigit():
            jax.config.update("jax_num_cpu_devices", int(parts[1]))
    except RuntimeError:
        pass  # backends already started (e.g. inside tests); resolve_target checks the count


def run(args: argparse.Namespace) -> int:
    _prepare_backend(args.target)
    cfg = load_config(args.model)
    plan = make_plan(cfg, model=args.model, mode=args.mode, target=args.target, mesh=args.mesh,
                     batch=args.batch, seq=args.seq, remat=args.remat,
                     grad_accum=args.grad_accum, param_dtype=args.param_dtype,
                     compute_dtype=args.compute_dtype, attention=args.attention,
                     quantize=args.quantize)
    print(plan.format(), flush=True)
    if args.json:
        write_json(args.json, plan.to_json())
    return 0 if plan.memory.fits else 1


def write_json(path: str, data: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".plan-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
