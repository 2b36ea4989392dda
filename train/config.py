"""Run configs: small YAML files loaded strictly into frozen dataclasses.

An unknown key, a wrong type or a bad value is a one-line :class:`UserError` naming the
key. ``--set section.key=value`` overrides are parsed as YAML scalars and go through
the same checks. The architecture is not here: it comes from ``model.preset``,
``model.config`` or the checkpoint in ``model.init_from`` (see ``meditron_jax.model.config``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from meditron_jax.errors import UserError

DTYPES = ("float32", "bfloat16")
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class ModelSection:
    preset: str | None = "tiny"          # used when neither init_from nor config is given
    config: str | None = None            # an HF config.json (or its directory) for random init
    init_from: str | None = None         # HF snapshot or native checkpoint directory
    verify: bool = True                  # check a native init_from against its checksums.json
    overrides: dict = field(default_factory=dict)  # LlamaConfig fields, e.g. {vocab_size: 512}
    init_std: float = 0.02
    param_dtype: str = "float32"         # master weights (LoRA: the frozen base)
    compute_dtype: str = "bfloat16"
    remat: str = "full"
    attention: str = "auto"              # auto | xla | splash | cudnn (meditron_jax.kernels)
    loss_chunk: int = 1024               # positions per logits chunk in the loss (memory knob)
    quantize: str | None = None          # refused: int8 weights are inference-only

    def architecture_overrides(self) -> dict:
        """``overrides`` as typed ``LlamaConfig`` fields (a RopeScaling from its mapping);
        a wrong key or type is a UserError naming ``model.overrides.KEY``."""
        from meditron_jax.model.config import LlamaConfig
        return typed_fields(LlamaConfig, self.overrides, "run config", "model.overrides.")


@dataclass(frozen=True)
class DataSection:
    kind: str = "pretrain"               # "pretrain" (text), "sft" (prompt/completion), "chat"
                                         # or "preference" ({"prompt"|"messages", "chosen", "rejected"})
    train_files: tuple[str, ...] = ()
    eval_file: str | None = None
    tokenizer: str | None = None         # a tokenizer dir; "bpe:N" trains one; None: init_from's
    chat_template: str | None = None     # kind chat: a .jinja file or tokenizer dir
    seq_len: int = 512
    overlong: str = "split"              # "split" or "truncate" examples longer than seq_len
    text_key: str = "text"               # JSONL field of pretraining documents
    shuffle: bool = True
    seed: int = 0
    packing_bins: int = 64               # first-fit bins per packing round (more: less padding)


@dataclass(frozen=True)
class OptimSection:
    lr: float = 3e-4
    warmup_steps: int = 100
    decay: str = "cosine"                # "cosine", "linear" or "constant"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float | None = 1.0


@dataclass(frozen=True)
class TrainSection:
    steps: int = 1000
    batch_size: int = 8                  # global rows per optimizer step
    grad_accum: int = 1                  # micro-batches per step (batch_size / grad_accum rows each)
    seed: int = 0
    mesh: str = "fsdp=-1"
    rules: str = "train"
    objective: str | None = None         # sft | dpo | ipo | orpo; None: what data.kind implies
                                         # (dpo for preference pairs, sft otherwise)
    beta: float = 0.1                    # DPO/IPO: strength of the pull towards the reference
    orpo_lambda: float = 0.1             # ORPO: weight of the odds-ratio term beside the NLL


@dataclass(frozen=True)
class LoraSection:
    rank: int = 0                        # 0 disables LoRA (full fine-tuning)
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "k", "v", "o")


@dataclass(frozen=True)
class CheckpointSection:
    every: int = 500
    keep: int = 3
    async_save: bool = True


@dataclass(frozen=True)
class LogSection:
    every: int = 10                      # a console line every N steps (jsonl/TensorBoard: every step)
    eval_every: int = 0                  # 0: never (needs data.eval_file)
    eval_batches: int = 8
    eval_quantize: str | None = None     # int8: also eval_loss_int8, on int8 copies (full FT)
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    cpu_peak_flops: float | None = None  # per device; None: a matmul measured at start.
                                         # Accelerators use a table by device kind


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)

    def __post_init__(self):
        validate(self)

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# The range of every number in a run config (tests/test_train_config.py checks that no
# numeric field is missing). Floats must also be finite; integers < 2**31 (the step
# counter and the seeds are 32-bit on the device).
_POSITIVE = ("> 0", lambda x: x > 0)
_NON_NEGATIVE = (">= 0", lambda x: x >= 0)
_FRACTION = ("in [0, 1]", lambda x: 0 <= x <= 1)
_BELOW_ONE = ("in [0, 1)", lambda x: 0 <= x < 1)
RANGES = {
    "model.init_std": _POSITIVE, "model.loss_chunk": _POSITIVE,
    "data.seq_len": _POSITIVE, "data.seed": _NON_NEGATIVE, "data.packing_bins": _POSITIVE,
    "optim.lr": _NON_NEGATIVE, "optim.warmup_steps": _NON_NEGATIVE,
    "optim.min_lr_ratio": _FRACTION, "optim.weight_decay": _NON_NEGATIVE,
    "optim.b1": _BELOW_ONE, "optim.b2": _BELOW_ONE, "optim.eps": _POSITIVE,
    "optim.clip_norm": _POSITIVE,
    "train.steps": _POSITIVE, "train.batch_size": _POSITIVE, "train.grad_accum": _POSITIVE,
    "train.seed": _NON_NEGATIVE, "train.beta": _POSITIVE, "train.orpo_lambda": _NON_NEGATIVE,
    "lora.rank": _NON_NEGATIVE, "lora.alpha": _POSITIVE,
    "checkpoint.every": _POSITIVE, "checkpoint.keep": _POSITIVE,
    "log.every": _POSITIVE, "log.eval_every": _NON_NEGATIVE, "log.eval_batches": _POSITIVE,
    "log.cpu_peak_flops": _POSITIVE,
}
MAX_INT = 2**31 - 1


def validate(cfg: RunConfig) -> None:
    """Value checks (types are checked while loading): every number in its range, the
    choices, and what fields demand of each other."""
    m, d, o, t, lo, log = cfg.model, cfg.data, cfg.optim, cfg.train, cfg.lora, cfg.log
    for key, (what, ok) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:  # optional (optim.clip_norm: null turns clipping off)
            continue
        if not (math.isfinite(value) and ok(value)):
            raise UserError(f"run config: {key} must be {what}, got {value}")
        if isinstance(value, int) and value > MAX_INT:
            raise UserError(f"run config: {key} must be <= {MAX_INT}, got {value}")
    _choice("model.param_dtype", m.param_dtype, DTYPES)
    _choice("model.compute_dtype", m.compute_dtype, DTYPES)
    from meditron_jax.model import REMAT_POLICIES
    _choice("model.remat", m.remat, REMAT_POLICIES)
    from meditron_jax.kernels import ATTENTION
    _choice("model.attention", m.attention, ATTENTION)
    _choice("data.kind", d.kind, ("pretrain", "sft", "chat", "preference"))
    _choice("data.overlong", d.overlong, ("split", "truncate"))
    _choice("optim.decay", o.decay, ("cosine", "linear", "constant"))
    _choice("train.rules", t.rules, ("train", "infer"))
    _check_objective(cfg)
    for key, value in (("output_dir", cfg.output_dir), ("data.text_key", d.text_key),
                       ("train.mesh", t.mesh)):
        if not value.strip():
            raise UserError(f"run config: {key} must not be empty")
    m.architecture_overrides()  # their types, before JAX starts
    if t.batch_size % t.grad_accum:
        raise UserError(f"run config: train.batch_size ({t.batch_size}) must be a multiple of "
                        f"train.grad_accum ({t.grad_accum})")
    unknown = sorted(set(lo.targets) - set(LORA_TARGETS))
    if unknown or (lo.rank and not lo.targets):
        raise UserError(f"run config: lora.targets {list(lo.targets)} must be a non-empty "
                        f"subset of {', '.join(LORA_TARGETS)}")
    if d.kind == "chat" and (d.tokenizer or "").startswith("bpe:"):
        raise UserError(f"run config: data.tokenizer {d.tokenizer!r} cannot encode data.kind chat "
                        "(it would be trained on the run's data); use a tokenizer directory, "
                        "e.g. that of a run pretrained with bpe:N (model.init_from)")
    if log.eval_every and not d.eval_file:
        raise UserError("run config: log.eval_every needs data.eval_file (a held-out file)")
    if m.quantize is not None:
        raise UserError(f"run config: model.quantize {m.quantize!r}: int8 weights are "
                        "inference-only: training updates float weights; to see the held-out "
                        "loss of int8 copies set log.eval_quantize: int8")
    if log.eval_quantize is not None:
        _choice("log.eval_quantize", log.eval_quantize, ("int8",))
        if not log.eval_every:
            raise UserError("run config: log.eval_quantize needs log.eval_every (and "
                            "data.eval_file)")
        if lo.rank:
            raise UserError("run config: log.eval_quantize is for full fine-tuning; under LoRA "
                            "merge the adapters (export) and run eval --quantize int8")


OBJECTIVES = ("sft", "dpo", "ipo", "orpo")
PREFERENCE_OBJECTIVES = ("dpo", "ipo", "orpo")


def objective(cfg: RunConfig) -> str:
    """``train.objective``, or what ``data.kind`` implies (dpo for preference pairs)."""
    if cfg.train.objective is not None:
        return cfg.train.objective
    return "dpo" if cfg.data.kind == "preference" else "sft"


def _check_objective(cfg: RunConfig) -> None:
    if cfg.train.objective is not None:
        _choice("train.objective", cfg.train.objective, OBJECTIVES)
    pairs, preference = cfg.data.kind == "preference", objective(cfg) in PREFERENCE_OBJECTIVES
    if pairs != preference:
        need = ("data.kind: preference (chosen/rejected pairs)" if preference
                else "text or SFT data, not preference pairs (use dpo, ipo or orpo)")
        raise UserError(f"run config: train.objective {objective(cfg)} needs {need}, got "
                        f"data.kind {cfg.data.kind}")
    if preference and cfg.log.eval_quantize is not None:
        raise UserError("run config: log.eval_quantize is not available for preference "
                        "objectives (dpo, ipo, orpo)")


def _choice(name: str, value, choices) -> None:
    if value not in choices:
        raise UserError(f"run config: {name} must be one of {', '.join(map(str, choices))}, "
                        f"got {value!r}")


# ---- loading --------------------------------------------------------------------------
def load(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()
         ) -> RunConfig:
    """Read a YAML run config (or the defaults) and apply ``key=value`` overrides."""
    raw: dict = {}
    if path is not None:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise UserError(f"{path}: run config not found; see configs/*.yaml")
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{mark.line + 1}:" if mark else ""
            raise UserError(f"{path}:{where} malformed YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: a run config is a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(raw, where=path or "run config")


def apply_override(raw: dict, item: str) -> None:
    """``section.key=value`` into the nested dict (value parsed as a YAML scalar/list)."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {item!r}: expected KEY=VALUE, e.g. train.grad_accum=4")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        raise UserError(f"--set {item!r}: value is not valid YAML") from None
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {item!r}: {p!r} is not a section")
        node = child
    node[parts[-1]] = parsed


def from_dict(raw: dict, where: str = "run config") -> RunConfig:
    return _build(RunConfig, raw, where, "")


def _build(cls, raw, where: str, prefix: str):
    return cls(**typed_fields(cls, raw, where, prefix))


def typed_fields(cls, raw, where: str, prefix: str) -> dict:
    """The mapping ``raw`` as keyword arguments of dataclass ``cls``, each value checked
    against (and converted to) its field's type; errors name ``PREFIX + key``."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping, "
                        f"got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise UserError(f"{where}: unknown key {prefix}{unknown[0]!r}; known keys"
                        f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    return {name: _coerce(hints[name], value, where, prefix + name) for name, value in raw.items()}


def _coerce(tp, value, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, where, key + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple, dict)):
            value = [value]  # a single item
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: {key} must be a list, got {value!r}")
        return tuple(_coerce(args[0], v, where, key) for v in value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value):
            raise UserError(f"{where}: {key} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config field type {tp} for {key}")
