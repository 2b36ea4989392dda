"""Benchmark models and workloads, and the accounting (FLOPs, bytes) behind MFU.

``small`` and ``medium`` are the sizes the performance issue specifies; ``tiny`` is the
project's debug model with a shrunken workload, for the smoke test. Every size the
benchmark uses comes from here, so both sides run exactly the same shapes.
"""
from __future__ import annotations

import dataclasses

from meditron_jax.model.config import LlamaConfig, RopeScaling, preset
from meditron_jax.errors import UserError

BENCHMARKS = ("forward", "decode_b1", "decode_b8", "train")
# Our side only (transformers has no int8 weights here): the decode benchmarks with every
# projection (and an untied head) stored int8 per output channel (meditron_jax.model.quant),
# dequantized to the compute dtype per layer. Opt-in: ``--benches decode_b1,decode_b1_int8``.
INT8_SUFFIX = "_int8"
INT8_BENCHMARKS = ("decode_b1_int8", "decode_b8_int8")
ALL_BENCHMARKS = BENCHMARKS + INT8_BENCHMARKS


def is_int8(bench: str) -> bool:
    return bench.endswith(INT8_SUFFIX)


def base_bench(bench: str) -> str:
    """The bf16/fp32 benchmark an int8 one shadows (itself for the others)."""
    return bench[:-len(INT8_SUFFIX)] if is_int8(bench) else bench
_LLAMA3_ROPE = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


@dataclasses.dataclass(frozen=True)
class Workload:
    batch: int            # forward and train batch
    seq_len: int          # forward and train sequence length
    prompt_len: int       # generation prompt length
    new_tokens: int       # generated tokens per row
    decode_batches: tuple[int, int] = (1, 8)
    # Activation checkpointing of every layer in the training step, on both sides
    # ("full": transformers' gradient checkpointing, our remat="full"); "none" keeps
    # every activation, as transformers does by default.
    train_remat: str = "none"

    def decode_batch(self, bench: str) -> int:
        return self.decode_batches[base_bench(bench) != "decode_b1"]


@dataclasses.dataclass(frozen=True)
class BenchPreset:
    name: str
    cfg: LlamaConfig
    work: Workload


def _llama(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=mlp,
                       num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, head_dim=hidden // heads,
                       max_position_embeddings=8192, rope_theta=500000.0,
                       rope_scaling=_LLAMA3_ROPE, bos_token_id=1, eos_token_id=(2,))


_ISSUE_WORK = Workload(batch=4, seq_len=512, prompt_len=128, new_tokens=64)

PRESETS: dict[str, BenchPreset] = {
    "small": BenchPreset("small", _llama(768, 12, 12, 4, 2048), _ISSUE_WORK),
    # 0.85B parameters: float32 weights, gradients and Adam moments alone are 12.7 GiB,
    # so training keeps only each layer's input (both sides) and our step scans its
    # layers (no split copy of the weights: +3.4 GiB) to fit a 24 GB machine.
    "medium": BenchPreset("medium", _llama(2048, 16, 32, 8, 5632),
                          dataclasses.replace(_ISSUE_WORK, train_remat="full")),
    "tiny": BenchPreset("tiny", preset("tiny"), Workload(batch=2, seq_len=32, prompt_len=8,
                                                          new_tokens=4, decode_batches=(1, 2))),
}


def bench_preset(name: str) -> BenchPreset:
    if name not in PRESETS:
        raise UserError(f"unknown benchmark preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def parse_list(text: str, allowed, what: str) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise UserError(f"--{what}: give at least one of {', '.join(allowed)}")
    bad = [s for s in items if s not in allowed]
    if bad:
        raise UserError(f"--{what}: unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(items))


def tokens_per_step(p: BenchPreset, bench: str) -> int:
    """Tokens one timed unit produces: a forward/train batch, or one decode step."""
    if bench in ("forward", "train"):
        return p.work.batch * p.work.seq_len
    return p.work.decode_batch(bench)


def peak_gib_estimate(p: BenchPreset, bench: str) -> float:
    """A coarse float32 peak-memory estimate for one side, to skip (not crash) a
    benchmark the machine cannot hold: weights (x4 with gradients and Adam moments),
    saved activations, [B, T, V] logits, and 1.5 GiB of runtime."""
    cfg, w = p.cfg, p.work
    n, d, f, layers = cfg.num_params(), cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    if bench != "train":
        # decode holds the stacked and the per-layer weights while it unstacks them
        weights = 4 * n * (1 if bench == "forward" else 2)
        return (weights + 2 * 4 * w.batch * w.seq_len * cfg.vocab_size) / 2 ** 30 + 1.5
    m = w.batch * w.seq_len
    kv = cfg.num_key_value_heads * cfg.head_dim
    layer = 4 * (m * (6 * d + 4 * kv + 4 * f)
                 + w.batch * cfg.num_attention_heads * w.seq_len ** 2)
    saved = layers * (4 * m * d) + layer if w.train_remat == "full" else layers * layer
    logits = 3 * 4 * m * cfg.vocab_size
    return (16 * n + saved + logits) / 2 ** 30 + 1.5


def decode_weight_bytes(p: BenchPreset, bench: str, bytes_per_value: int = 4) -> float:
    """Weight bytes a decode step streams: every weight once, the embedding only its B
    rows. For an int8 benchmark the projections (and an untied head) count 1 byte a value
    plus a float32 scale per output channel; norms and embedding rows stay at
    ``bytes_per_value``."""
    cfg, b = p.cfg, p.work.decode_batch(bench)
    weights = cfg.num_params() - cfg.vocab_size * cfg.hidden_size + b * cfg.hidden_size
    if not is_int8(bench):
        return float(weights * bytes_per_value)
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q_out, kv_out = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    proj = layers * (2 * d * q_out + 2 * d * kv_out + 3 * d * f)
    scales = layers * (q_out + 2 * kv_out + d + 2 * f + d)
    if not cfg.tie_word_embeddings:
        proj, scales = proj + d * cfg.vocab_size, scales + cfg.vocab_size
    return float(proj + 4 * scales + (weights - proj) * bytes_per_value)


def decode_bytes_per_step(p: BenchPreset, bench: str, bytes_per_value: int = 4) -> float:
    """Bytes a decode step must read: the weights (:func:`decode_weight_bytes`) plus the
    KV cache up to the average context length of the generation (in the compute dtype,
    int8 weights or not)."""
    cfg, b = p.cfg, p.work.decode_batch(bench)
    avg_context = p.work.prompt_len + (p.work.new_tokens + 1) / 2
    kv = 2 * cfg.num_hidden_layers * b * avg_context * cfg.num_key_value_heads * cfg.head_dim
    return decode_weight_bytes(p, bench, bytes_per_value) + float(kv * bytes_per_value)


# ---- inputs both sides feed, identical by construction ----------------------------------
REFERENCE_LOGITS = "reference_logits.npy"
# One AdamW step's settings, shared by both sides (the values only need to agree).
TRAIN_HPARAMS = {"learning_rate": 1e-4, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
                 "weight_decay": 0.1, "clip_norm": 1.0}


def _tokens(p: BenchPreset, shape: tuple[int, int], seed: int):
    import numpy as np
    # Ids 3.. avoid bos/eos/pad so no side treats them specially.
    return np.random.default_rng(seed).integers(3, p.cfg.vocab_size, shape, dtype=np.int64)


def forward_tokens(p: BenchPreset):
    return _tokens(p, (p.work.batch, p.work.seq_len), seed=1)


def prompt_tokens(p: BenchPreset, bench: str):
    return _tokens(p, (p.work.decode_batch(bench), p.work.prompt_len), seed=2)


def reference_slice(logits):
    """The part of the forward logits both sides save to check they run the same model."""
    return logits[0, : min(64, logits.shape[1])]


def decode_once(p: BenchPreset, ttft: float, total: float) -> dict:
    """One decode measurement from a 1-token run (prefill + first token: the time to
    first token) and a full run; the difference is new_tokens - 1 decode steps."""
    steps = max(p.work.new_tokens - 1, 1)
    return {"seconds": max(total - ttft, 1e-9) / steps, "ttft_s": ttft, "total_s": total}
