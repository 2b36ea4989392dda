"""Training metrics: console progress bar, ``metrics.jsonl``, TensorBoard, ``loss.png``.

MFU is model FLOPs per token (:func:`train_flops_per_token`: 6N plus attention, less the
weight gradients that LoRA's frozen weights never need) times tokens per second, over
the dense peak FLOP/s of all devices in the compute dtype (:func:`peak_flops`): a table
of accelerators by device kind, and on CPU a matmul measured in this process (or
``log.cpu_peak_flops``). The log names the peak and where it came from. Only process 0
writes.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import jax
import jax.numpy as jnp

from meditron_jax.model.config import LlamaConfig
from meditron_jax.jsonl import JsonlAppender, drop_torn_tail, iter_jsonl
from meditron_jax.model.lora import LoraConfig, init_lora

# Dense (not "with sparsity") peak FLOP/s per chip as (bfloat16, float32), matched as
# substrings of ``device.device_kind``, most specific first. Vendor datasheets: Google
# Cloud TPU system architecture pages (v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s bf16);
# NVIDIA A100 (BF16 312, TF32 156), H100 SXM (989, 495), H100 PCIe (756, 378),
# H100/H200 NVL (835, 418), H200 SXM (989, 495), L4 (121, 60) datasheets, halving their
# sparsity figures. The float32 column is what XLA's default precision runs float32 dots
# at: TF32 on NVIDIA tensor cores; bf16 passes on TPU, whose pages give no float32 figure
# (the bf16 peak is an upper bound there, so MFU is never overstated).
PEAK_FLOPS = (
    ("TPU v6", 918e12, 918e12), ("TPU v5p", 459e12, 459e12),
    ("TPU v5 lite", 197e12, 197e12), ("TPU v5e", 197e12, 197e12),
    ("TPU v5", 459e12, 459e12), ("TPU v4", 275e12, 275e12),
    ("H200 NVL", 835e12, 418e12), ("H200", 989e12, 495e12),
    ("H100 NVL", 835e12, 418e12), ("H100 PCIe", 756e12, 378e12), ("H100", 989e12, 495e12),
    ("A100", 312e12, 156e12), ("L4", 121e12, 60e12),
)
PROBE_N, PROBE_REPEATS = 2048, 3  # the CPU matmul probe: 17 GFLOP, ~0.1 s on a laptop


@dataclasses.dataclass(frozen=True)
class Peak:
    flops: float      # dense FLOP/s of all the devices together
    devices: int
    source: str       # where the number comes from, for the log

    def __str__(self) -> str:
        return f"peak {_rate(self.flops / self.devices)}/device x {self.devices}: {self.source}"


def _rate(flops: float) -> str:
    return f"{flops / 1e12:,.0f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:,.1f} GFLOP/s"


def peak_flops(devices, compute_dtype: str, cpu_peak: float | None = None) -> Peak | None:
    """The dense peak of ``devices`` (a mesh's) together in ``compute_dtype``
    ("bfloat16"/"float32"). Accelerators: the table per device (None for a kind it does
    not know: no MFU rather than a wrong one). CPU: ``cpu_peak`` per device when given,
    else the matmul rate measured on this host, once per host in the mesh: a host's CPU
    devices share its cores, so one device alone may use them all."""
    devices = list(devices)
    n = len(devices)
    if devices[0].platform == "cpu":
        if cpu_peak:
            return Peak(cpu_peak * n, n, "log.cpu_peak_flops")
        host, how = measured_cpu_flops(compute_dtype)
        hosts = len({d.process_index for d in devices})
        return Peak(host * hosts, n, f"measured {how}, {_rate(host)} per host, shared by "
                                     "its devices")
    column = 1 if compute_dtype == "float32" else 0
    kind = devices[0].device_kind
    for name, *peaks in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return Peak(peaks[column] * n, n, f"{kind} {compute_dtype} dense, vendor datasheet")
    return None


@functools.lru_cache(maxsize=None)
def measured_cpu_flops(compute_dtype: str) -> tuple[float, str]:
    """(FLOP/s, what was timed): the fastest ``PROBE_N``-cube matmul on the first CPU
    device (which uses all the host's cores), jitted, best of ``PROBE_REPEATS`` after a
    warm-up: a ceiling, which a busy moment lowers in a median but not in a best. Timed
    in the compute dtype and in float32 (XLA:CPU runs a large bfloat16 product slower
    than a float32 one, and may run the model's small ones through float32 kernels).
    Once per process and dtype."""
    if compute_dtype == "float32":
        return _fastest_matmul("float32")
    return max(_fastest_matmul(compute_dtype), measured_cpu_flops("float32"))


def _fastest_matmul(dtype_name: str) -> tuple[float, str]:
    dtype, device = jnp.dtype(dtype_name), jax.devices("cpu")[0]
    a, b = (jax.device_put(jax.random.normal(k, (PROBE_N, PROBE_N), dtype), device)
            for k in jax.random.split(jax.random.key(0)))
    libs = {"XLA": jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))}
    rates = []
    for lib, fn in libs.items():
        fn(a, b).block_until_ready()
        best = math.inf
        for _ in range(PROBE_REPEATS):
            t = time.perf_counter()
            fn(a, b).block_until_ready()
            best = min(best, time.perf_counter() - t)
        rates.append((2.0 * PROBE_N ** 3 / best, f"{PROBE_N}^3 {dtype_name} matmul ({lib})"))
    return max(rates)


def train_flops_per_token(cfg: LlamaConfig, seq_len: int, lora: LoraConfig | None = None,
                          objective: str = "sft") -> float:
    """Model FLOPs per trained token, what MFU counts. Full fine-tuning: 3x the forward
    (``LlamaConfig.flops_per_token``): the forward, the activation gradients and the
    weight gradients cost 2 FLOPs per matmul weight and token each, attention 3x its
    forward. LoRA: the frozen weights get no weight gradients (2 per weight and token
    less), and each adapter parameter costs 6 (forward, activation and weight gradient
    of ``x·a·b``). Not counted, as remat's recomputation is not: the extra work of this
    implementation, which merges the adapters into each layer's weights and so also
    forms the adapted weights' gradient and the merge products. DPO and IPO add the
    reference's forward (2 per weight and token, plus attention)."""
    full = cfg.flops_per_token(seq_len, training=True)
    if objective in ("dpo", "ipo"):
        full += cfg.flops_per_token(seq_len, training=False)
    if lora is None:
        return full
    weights = cfg.flops_per_token(0, training=False)  # 2 per matmul weight: no attention
    shapes = jax.eval_shape(lambda: init_lora(cfg, lora, jax.random.key(0)))
    adapters = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    return full - weights + 6.0 * adapters


class Throughput:
    """Tokens/s and MFU of each step, timed from fetching its batch to reading its
    metrics (evals and checkpoint saves in between are not counted)."""

    def __init__(self, flops_per_token: float, peak: Peak | None):
        self.flops_per_token, self.peak = flops_per_token, peak
        self._t = 0.0

    def describe(self) -> str:
        """One log line: the FLOPs counted per token and the peak they are divided by."""
        if self.peak is None:
            return (f"MFU not reported: no peak FLOP/s known for device kind "
                    f"{jax.devices()[0].device_kind!r}")
        return f"MFU of {self.flops_per_token / 1e6:,.2f} MFLOP/token over {self.peak}"

    def start(self) -> None:
        self._t = time.perf_counter()

    def stop(self, tokens: float) -> float:
        return tokens / max(time.perf_counter() - self._t, 1e-9)

    def mfu(self, rate: float | None) -> float | None:
        if rate is None or self.peak is None:
            return None
        return rate * self.flops_per_token / self.peak.flops


class MetricsWriter:
    """Writes every record to metrics.jsonl and TensorBoard; shows a progress bar."""

    def __init__(self, out_dir: str, total_steps: int, start_step: int, *, progress: bool,
                 tensorboard: bool):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb_dir = os.path.join(out_dir, "tensorboard") if tensorboard else None
        self._bar = self._tb = self._jsonl = None
        if not self.enabled:
            return
        truncate_after(self.path, start_step)
        self._jsonl = JsonlAppender(self.path)
        if tensorboard:
            from tensorboardX import SummaryWriter
            # purge_step hides events a killed run wrote after the checkpoint we resume
            self._tb = SummaryWriter(self.tb_dir, purge_step=start_step + 1)
        if progress:
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, leave=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write([record])
        step = record["step"]
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    tag = "eval/" + key[5:] if key.startswith("eval_") else "train/" + key
                    self._tb.add_scalar(tag, value, step)
        if self._bar is not None and "loss" in record:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                  refresh=False)
            self._bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()


def truncate_after(path: str, step: int) -> None:
    """Drop records a killed run logged after the step we resume from (written aside,
    then renamed), so metrics.jsonl reads as one uninterrupted run."""
    if not os.path.exists(path):
        return
    drop_torn_tail(path)
    keep = [rec for _, rec in iter_jsonl(path) if rec.get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)


def read_metrics(path: str) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path)] if os.path.exists(path) else []


def plot_losses(metrics_path: str, out_png: str) -> str | None:
    """Train (and eval) loss against step, written aside then renamed."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png
