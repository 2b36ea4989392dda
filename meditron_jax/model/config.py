"""Architecture config: a frozen dataclass that maps one-to-one onto HF ``config.json``.

Only architecture lives here. Run settings (mesh, dtypes, remat, batch) live with the
commands that use them, so one checkpoint's config serves every kind of run.

How :meth:`LlamaConfig.from_hf` treats a ``config.json`` (the tables below are the policy):

* **Read** (:data:`_FIELDS`): sizes, norm eps, RoPE, tied embeddings, token ids. Each
  value is type- and range-checked; a bad one is a one-line error naming the key.
  Absent or null keys take transformers' ``LlamaConfig`` defaults, except the token ids,
  which stay unset (``generation_config.json`` normally supplies them).
* **Fixed** (:data:`_FIXED`): keys that change the math at any other value
  (``hidden_act``, biases, ``pretraining_tp``, ``rope_interleaved``, ...). The Llama value
  (or null) is accepted; any other is refused by name. So is a ``quantization_config``.
* **RoPE**: both spellings, transformers 4 (``rope_theta`` + ``rope_scaling``) and 5
  (``rope_parameters``), standardized as transformers 5 does. Where both are given they
  must agree (transformers silently prefers ``rope_scaling``); rope types other than
  :data:`ROPE_TYPES` are refused.
* **Ignored** (:data:`_NO_MATH_FIELDS`): bookkeeping every exporter writes (dtype,
  version, generation defaults, ...), accepted silently.
* **Unknown**: any other key (``is_llama_config``, ``transformers.js_config``, an unused
  rope field, ...) is accepted like transformers accepts it, and all of them are named in
  one warning line (logger ``meditron_jax.model.config``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from meditron_jax.errors import UserError

_log = logging.getLogger(__name__)


# ---- value checks: each returns the value as we store it or raises _Invalid -------------------
class _Invalid(ValueError):
    """What is wrong with a value; :func:`_checked` adds where it came from."""


def _positive_int(value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _Invalid("must be a positive integer")
    return value


def _positive_number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and value > 0):
        raise _Invalid("must be a positive number")
    return float(value)


def _boolean(value):
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_id(value):
    if value is not None and not _is_token_id(value):
        raise _Invalid("must be a token id (an integer >= 0) or null")
    return value


def _token_ids(value):
    ids = tuple(value) if isinstance(value, (list, tuple)) else () if value is None else (value,)
    if not all(_is_token_id(i) for i in ids):
        raise _Invalid("must be a token id or a list of token ids (integers >= 0)")
    return ids


def _checked(check: Callable, value, key: str, where: str):
    try:
        return check(value)
    except _Invalid as exc:
        raise UserError(f"{where}: {key} {exc}, got {value!r}") from None


# ---- the policy tables ----------------------------------------------------------------------
_REQUIRED = object()
# Keys we read: HF key -> (check, value when absent or null). transformers' defaults, but
# token ids stay unset; head_dim and num_key_value_heads are derived (see from_hf).
_FIELDS: dict[str, tuple[Callable, Any]] = {
    "vocab_size": (_positive_int, _REQUIRED),
    "hidden_size": (_positive_int, _REQUIRED),
    "intermediate_size": (_positive_int, _REQUIRED),
    "num_hidden_layers": (_positive_int, _REQUIRED),
    "num_attention_heads": (_positive_int, _REQUIRED),
    "num_key_value_heads": (_positive_int, None),
    "head_dim": (_positive_int, None),
    "max_position_embeddings": (_positive_int, 2048),
    "rms_norm_eps": (_positive_number, 1e-6),
    "rope_theta": (_positive_number, 10000.0),
    "tie_word_embeddings": (_boolean, False),
    "bos_token_id": (_token_id, None),
    "eos_token_id": (_token_ids, ()),
    "pad_token_id": (_token_id, None),
}
# Keys that change the math: accepted only at these values (null counts as absent).
_FIXED: dict[str, tuple[tuple, str]] = {
    "model_type": (("llama",), "only the Llama architecture is implemented"),
    "hidden_act": (("silu", "swish"), "the MLP is SwiGLU"),
    "attention_bias": ((False,), "attention projections have no bias"),
    "mlp_bias": ((False,), "MLP projections have no bias"),
    "pretraining_tp": ((1,), "no tensor-parallel slicing of the projections"),
    "attention_dropout": ((0, 0.0), "no dropout on attention probabilities"),
    "rope_interleaved": ((False,), "RoPE rotates the two halves of each head"),
    "partial_rotary_factor": ((1, 1.0), "RoPE covers the whole head"),
}
# Keys that carry no architecture: accepted silently.
_NO_MATH_FIELDS = frozenset({
    "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "_commit_hash", "_attn_implementation", "attn_implementation",
    "_attn_implementation_autoset", "initializer_range", "use_cache", "output_attentions",
    "output_hidden_states", "return_dict", "is_encoder_decoder", "tie_encoder_decoder",
    "chunk_size_feed_forward", "id2label", "label2id", "num_labels", "problem_type",
    "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "cross_attention_hidden_size",
    "add_cross_attention", "is_decoder", "pruned_heads", "torchscript", "use_bfloat16",
    "tf_legacy_loss", "output_scores", "return_dict_in_generate", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
})
_KNOWN = frozenset(_FIELDS) | frozenset(_FIXED) | _NO_MATH_FIELDS | {
    "rope_scaling", "rope_parameters", "quantization_config"}

# RoPE: rope type -> (keys it needs, keys it may have) besides rope_type/type/rope_theta.
# transformers 5 defaults llama3's original_max_position_embeddings to
# max_position_embeddings.
_ROPE_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ()),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor"),
               ("original_max_position_embeddings",)),
}
ROPE_TYPES = tuple(_ROPE_KEYS)
_ROPE_CHECKS: dict[str, Callable] = {
    "factor": _positive_number, "low_freq_factor": _positive_number,
    "high_freq_factor": _positive_number, "original_max_position_embeddings": _positive_int,
}


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type`` is one of :data:`ROPE_TYPES`."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        _check_rope_type(self.rope_type, "rope_scaling", "config")
        for key, check in _ROPE_CHECKS.items():
            _checked(check, getattr(self, key), f"rope_scaling.{key}", "config")
        _check_freq_band(self.low_freq_factor, self.high_freq_factor, "rope_scaling", "config")

    def summary(self) -> str:
        """The settings its rope type reads, e.g. ``linear: factor 2``."""
        keys = [k for group in _ROPE_KEYS[self.rope_type] for k in group]
        settings = ", ".join(f"{k} {getattr(self, k):g}" for k in keys)
        return f"{self.rope_type}: {settings}" if settings else self.rope_type


@dataclass(frozen=True)
class LlamaConfig:
    """Architecture of a Llama decoder; field names follow HF ``config.json``."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        for key, (check, _) in _FIELDS.items():
            _checked(check, getattr(self, key), key, "config")
        if not isinstance(self.rope_scaling, RopeScaling):
            raise UserError(f"config: rope_scaling must be a RopeScaling, "
                            f"got {self.rope_scaling!r}")
        _check_heads(vars(self), "config")

    # ---- derived sizes -------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def num_params(self) -> int:
        d, f, v, n = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + n * per_layer + d + head

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Model FLOPs per token (matmuls + attention), 6N-style for training.

        Forward: 2 * (non-embedding matmul params) + 2 * attention (QK^T and PV, causal
        halves the average context). Training is 3x forward (backward = 2x forward).
        """
        d, n, f = self.hidden_size, self.num_hidden_layers, self.intermediate_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        # every weight used as a matmul: the layers and the lm_head (tied or not); the
        # embedding lookup and the norms are not matmuls.
        matmul_params = n * (2 * d * q + 2 * d * kv + 3 * d * f) + self.vocab_size * d
        attn = 2 * n * q * seq_len  # QK^T and PV: 2 matmuls x 2 flops x seq/2 average context
        forward = 2 * matmul_params + attn
        return float(3 * forward if training else forward)

    # ---- HF config.json ------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: dict | str | os.PathLike) -> "LlamaConfig":
        """Build from an HF config dict, a config.json path, or a directory holding one,
        under the policy in this module's docstring."""
        if isinstance(source, dict):
            hf, where = source, "config.json"
        else:
            hf, where = _read_hf_json(source)
        _check_fixed(hf, where)
        if hf.get("quantization_config"):
            raise UserError(f"{where}: quantization_config is not supported; use an unquantized "
                            "checkpoint")
        missing = [k for k, (_, default) in _FIELDS.items()
                   if default is _REQUIRED and hf.get(k) is None]
        if missing:
            raise UserError(f"{where}: missing required field(s) {', '.join(missing)}")
        values = {key: default if hf.get(key) is None else _checked(check, hf[key], key, where)
                  for key, (check, default) in _FIELDS.items()}
        heads, hidden = values["num_attention_heads"], values["hidden_size"]
        if values["num_key_value_heads"] is None:
            values["num_key_value_heads"] = heads
        if values["head_dim"] is None:
            if hidden % heads:
                raise UserError(
                    f"{where}: head_dim is not given and hidden_size {hidden} is not a multiple "
                    f"of num_attention_heads {heads} (transformers would round the head size "
                    f"down to {hidden // heads}); set head_dim")
            values["head_dim"] = hidden // heads
        _check_heads(values, where)
        values["rope_theta"], values["rope_scaling"], unused_rope = _parse_rope(
            hf, values["max_position_embeddings"], where)
        unused = sorted([*unused_rope, *(k for k in hf if k not in _KNOWN)])
        if unused:
            _warn_once(f"{where}: ignoring key(s) the Llama architecture does not use: "
                       f"{', '.join(unused)}")
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """HF config.json in the transformers-4 spelling (transformers 5 reads it too)."""
        rs = self.rope_scaling
        scaling = None
        if rs.rope_type == "linear":
            scaling = {"rope_type": "linear", "type": "linear", "factor": rs.factor}
        elif rs.rope_type == "llama3":
            scaling = {"rope_type": "llama3", "factor": rs.factor,
                       "low_freq_factor": rs.low_freq_factor,
                       "high_freq_factor": rs.high_freq_factor,
                       "original_max_position_embeddings": rs.original_max_position_embeddings}
        eos: Any = list(self.eos_token_id)
        if len(eos) == 1:
            eos = eos[0]
        elif not eos:
            eos = None
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "mlp_bias": False,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pretraining_tp": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": scaling,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    # ---- our own JSON (native checkpoints) --------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.to_hf(), indent=2, sort_keys=True)

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)


def _check_fixed(spec: Mapping, where: str, keys=tuple(_FIXED), prefix: str = "") -> None:
    """Refuse a :data:`_FIXED` key of ``spec`` at a value that changes the math."""
    for key in keys:
        allowed, meaning = _FIXED[key]
        value = spec.get(key)
        if value is not None and not any(type(value) is type(a) and value == a for a in allowed):
            raise UserError(f"{where}: {prefix}{key}={json.dumps(value)} is not supported "
                            f"({meaning}; accepted: {', '.join(json.dumps(a) for a in allowed)})")


def _check_heads(values: Mapping, where: str) -> None:
    heads, kv_heads = values["num_attention_heads"], values["num_key_value_heads"]
    if heads % kv_heads:
        raise UserError(f"{where}: num_attention_heads ({heads}) must be a multiple of "
                        f"num_key_value_heads ({kv_heads})")
    if values["head_dim"] % 2:
        raise UserError(f"{where}: head_dim must be even for RoPE, got {values['head_dim']}")


def _check_rope_type(rope_type, name: str, where: str) -> None:
    if rope_type not in _ROPE_KEYS:
        raise UserError(f"{where}: {name} has rope type {rope_type!r}, which is not "
                        f"implemented; supported: {', '.join(ROPE_TYPES)}")


def _check_freq_band(low: float, high: float, name: str, where: str) -> None:
    if not low < high:
        raise UserError(f"{where}: {name}.low_freq_factor ({low:g}) must be below "
                        f"{name}.high_freq_factor ({high:g})")


def _read_rope_scaling(spec: Mapping, name: str, max_positions: int,
                       where: str) -> tuple[RopeScaling, list[str]]:
    """One rope dict as transformers 5 standardizes it (``type`` is the old name of
    ``rope_type``); also the keys its rope type does not read."""
    rope_type = spec.get("rope_type") or spec.get("type") or "default"
    _check_rope_type(rope_type, name, where)
    _check_fixed(spec, where, ("partial_rotary_factor",), prefix=f"{name}.")
    needed, optional = _ROPE_KEYS[rope_type]
    missing = [k for k in needed if spec.get(k) is None]
    if missing:
        raise UserError(f"{where}: {rope_type} rope scaling needs {', '.join(missing)} "
                        f"(in {name})")
    values = {k: _checked(_ROPE_CHECKS[k], spec[k], f"{name}.{k}", where)
              for k in needed + optional if spec.get(k) is not None}
    if rope_type == "llama3":
        values.setdefault("original_max_position_embeddings", max_positions)
        _check_freq_band(values["low_freq_factor"], values["high_freq_factor"], name, where)
    read = {*needed, *optional, "rope_type", "type", "rope_theta", "partial_rotary_factor"}
    return RopeScaling(rope_type, **values), [f"{name}.{k}" for k in spec if k not in read]


def _parse_rope(hf: Mapping, max_positions: int,
                where: str) -> tuple[float, RopeScaling, set[str]]:
    """(rope_theta, scaling, unused keys) from either spelling.

    transformers 4 writes ``rope_theta`` + ``rope_scaling``; transformers 5 writes
    ``rope_parameters`` (with ``rope_theta`` inside). transformers 5 reads a non-empty
    ``rope_scaling`` in preference to ``rope_parameters`` and a ``rope_theta`` inside the
    dict in preference to the top-level one, so where a config holds more than one they
    must agree: otherwise which one holds depends on the reader.
    """
    given = {}
    for name in ("rope_scaling", "rope_parameters"):
        spec = hf.get(name)
        if spec is not None and not isinstance(spec, dict):
            raise UserError(f"{where}: {name} must be an object or null, got {spec!r}")
        if spec:
            given[name] = spec
    places = {"rope_theta": hf.get("rope_theta"),
              **{f"{name}.rope_theta": spec.get("rope_theta") for name, spec in given.items()}}
    thetas = {key: _checked(_positive_number, value, key, where)
              for key, value in places.items() if value is not None}
    if len(set(thetas.values())) > 1:
        raise UserError(f"{where}: {' and '.join(f'{k} ({v:g})' for k, v in thetas.items())} "
                        "disagree; keep one spelling")
    scalings = {name: _read_rope_scaling(spec, name, max_positions, where)
                for name, spec in given.items()}
    if len(scalings) == 2 and scalings["rope_scaling"][0] != scalings["rope_parameters"][0]:
        raise UserError(
            f"{where}: rope_scaling ({scalings['rope_scaling'][0].summary()}) and "
            f"rope_parameters ({scalings['rope_parameters'][0].summary()}) disagree "
            "(transformers reads rope_scaling); keep one spelling")
    theta = next(iter(thetas.values()), _FIELDS["rope_theta"][1])  # transformers' default
    scaling = next((scaling for scaling, _ in scalings.values()), RopeScaling())
    return theta, scaling, {key for _, keys in scalings.values() for key in keys}


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """Log ``message`` once per process (a command may read one config.json twice)."""
    if message not in _warned:
        _warned.add(message)
        _log.warning(message)


def _read_hf_json(source: str | os.PathLike) -> tuple[dict, str]:
    """(the parsed config.json, its path)."""
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{path}: not found; point --model at a directory holding config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); "
                        "config.json must be UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON (line {exc.lineno}: {exc.msg})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data, path


# ---- presets ----------------------------------------------------------------------------
_LLAMA31_8B = LlamaConfig(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
    bos_token_id=128000, eos_token_id=(128001, 128008, 128009),
)

PRESETS: dict[str, LlamaConfig] = {
    "llama-3.1-8b": _LLAMA31_8B,
    # Meditron3-8B is a continued pretraining of the Llama-3.1-8B *base* model: same
    # architecture; as a base model it ends documents with <|end_of_text|> only.
    "meditron3-8b": dataclasses.replace(_LLAMA31_8B, eos_token_id=(128001,)),
    # A debug model of the same family: GQA, llama3 rope scaling with a short original
    # context (so tests run past it), untied head. Small enough for CPU tests.
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 32),
        bos_token_id=1, eos_token_id=(2,),
    ),
}


def preset(name: str) -> LlamaConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}") from None
