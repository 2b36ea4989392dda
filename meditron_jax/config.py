"""Architecture config: a frozen dataclass that maps one-to-one onto HF ``config.json``.

Only architecture lives here. Run settings (mesh, dtypes, remat, batch) live with the
commands that use them, so one checkpoint's config serves every kind of run.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from meditron_jax.errors import UserError

ROPE_TYPES = ("default", "linear", "llama3")

# Fields HF writes into every config.json that carry no architecture (or carry a value
# we check below); anything outside this set and the fields we map is refused by name.
_IGNORED_HF_FIELDS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version",
    "initializer_range", "use_cache", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "is_encoder_decoder", "tie_encoder_decoder",
    "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "tokenizer_class",
    "prefix", "sep_token_id", "decoder_start_token_id", "task_specific_params",
    "finetuning_task", "cross_attention_hidden_size", "add_cross_attention",
    "is_decoder", "pruned_heads", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "output_scores", "return_dict_in_generate", "max_length", "min_length",
    "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})
# Fields we read but only accept at one value (they change the math otherwise).
_FIXED_HF_FIELDS = {
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "pretraining_tp": 1,
    "attention_dropout": 0.0,
}
_REQUIRED_HF_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads",
)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. ``rope_type`` is one of :data:`ROPE_TYPES`."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise UserError(
                f"config.json: unsupported rope type {self.rope_type!r} in rope_scaling; "
                f"supported: {', '.join(ROPE_TYPES)}")
        if self.factor <= 0:
            raise UserError(f"config.json: rope_scaling.factor must be > 0, got {self.factor}")


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
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UserError(f"config: {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"config: num_attention_heads ({self.num_attention_heads}) must be a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise UserError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise UserError(f"config: rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise UserError(f"config: rope_theta must be > 0, got {self.rope_theta}")

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
        """Build from an HF config dict, a config.json path, or a directory holding one."""
        hf = _read_hf_json(source) if not isinstance(source, dict) else dict(source)
        where = "config.json"
        missing = [k for k in _REQUIRED_HF_FIELDS if k not in hf]
        if missing:
            raise UserError(f"{where}: missing required field(s) {', '.join(missing)}")
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise UserError(f"{where}: model_type {model_type!r} is not supported (only 'llama')")
        for key, want in _FIXED_HF_FIELDS.items():
            if key in hf and hf[key] is not None and hf[key] != want:
                raise UserError(f"{where}: unsupported {key}={hf[key]!r} (only {want!r} is supported)")
        if hf.get("quantization_config"):
            raise UserError(f"{where}: quantization_config is not supported; use an unquantized checkpoint")

        known = set(_IGNORED_HF_FIELDS) | set(_FIXED_HF_FIELDS) | {
            f.name for f in dataclasses.fields(cls)} | {"rope_parameters", "rope_scaling",
                                                         "quantization_config"}
        unknown = sorted(k for k in hf if k not in known)
        if unknown:
            raise UserError(f"{where}: unsupported field(s) {', '.join(unknown)}; this loader "
                            "implements the Llama architecture only")

        theta, scaling = _parse_rope(hf)
        heads = _int_field(hf, "num_attention_heads")
        hidden = _int_field(hf, "hidden_size")
        head_dim = hf.get("head_dim") or hidden // heads
        eos = hf.get("eos_token_id")
        eos_tuple = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            vocab_size=_int_field(hf, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int_field(hf, "intermediate_size"),
            num_hidden_layers=_int_field(hf, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=_int_field(hf, "num_key_value_heads") if hf.get(
                "num_key_value_heads") is not None else heads,
            head_dim=int(head_dim),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(int(e) for e in eos_tuple),
            pad_token_id=hf.get("pad_token_id"),
        )

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


def _int_field(hf: dict, key: str) -> int:
    value = hf[key]
    if not isinstance(value, int) or isinstance(value, bool):
        raise UserError(f"config.json: {key} must be an integer, got {value!r}")
    return value


def _parse_rope(hf: dict) -> tuple[float, RopeScaling]:
    """Read RoPE settings from either spelling.

    transformers 4: ``rope_theta`` + ``rope_scaling`` ({"type"|"rope_type": ..., ...}).
    transformers 5: ``rope_parameters`` ({"rope_type", "rope_theta", ...}).
    """
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise UserError("config.json: rope_parameters must be an object")
    if scaling is not None and not isinstance(scaling, dict):
        raise UserError("config.json: rope_scaling must be an object or null")
    merged: dict[str, Any] = {}
    if scaling:
        merged.update(scaling)
    if params:
        merged.update(params)
    theta = merged.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise UserError(f"config.json: unsupported rope type {rope_type!r} (rope_scaling / "
                        f"rope_parameters); supported: {', '.join(ROPE_TYPES)}")
    allowed = {"factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"}
    extra = sorted(set(merged) - allowed)
    if extra:
        raise UserError(f"config.json: unsupported rope field(s) {', '.join(extra)}")
    if rope_type == "llama3":
        need = sorted(allowed - set(merged))
        if need:
            raise UserError(f"config.json: llama3 rope scaling needs {', '.join(need)}")
    if rope_type == "linear" and "factor" not in merged:
        raise UserError("config.json: linear rope scaling needs 'factor'")
    if rope_type == "default":
        merged = {}
    try:
        return float(theta), RopeScaling(rope_type=rope_type, **{
            k: (int(v) if k == "original_max_position_embeddings" else float(v))
            for k, v in merged.items()})
    except (TypeError, ValueError) as exc:
        raise UserError(f"config.json: malformed rope settings: {exc}") from None


def _read_hf_json(source: str | os.PathLike) -> dict:
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{path}: not found; point --model at a directory holding config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


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
