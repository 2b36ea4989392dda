"""Training metrics: console progress bar, ``metrics.jsonl``, TensorBoard, ``loss.png``.

MFU is model FLOPs per token (``LlamaConfig.flops_per_token``: 6N plus attention)
times tokens per second, over the peak bf16 dense FLOP/s of all devices. Peaks come
from a table by device kind; CPU has no meaningful peak, so it is a config value
(``log.cpu_peak_flops``). Only process 0 writes.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax

from meditron_jax.jsonl import JsonlAppender, drop_torn_tail, iter_jsonl

# Dense bf16 peak FLOP/s per chip (vendor datasheets). Matched as substrings of
# ``device.device_kind``, most specific first.
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("H200", 989e12), ("H100", 989e12),
    ("A100", 312e12), ("L4", 121e12),
)


def peak_flops(device, cpu_peak: float) -> float | None:
    if device.platform == "cpu":
        return cpu_peak
    for kind, peak in PEAK_FLOPS:
        if kind.lower() in device.device_kind.lower():
            return peak
    return None


class Throughput:
    """Tokens/s and MFU of each step, timed from fetching its batch to reading its
    metrics (evals and checkpoint saves in between are not counted)."""

    def __init__(self, flops_per_token: float, num_devices: int, peak: float | None):
        self.flops_per_token, self.num_devices, self.peak = flops_per_token, num_devices, peak
        self._t = 0.0

    def start(self) -> None:
        self._t = time.perf_counter()

    def stop(self, tokens: float) -> float:
        return tokens / max(time.perf_counter() - self._t, 1e-9)

    def mfu(self, rate: float | None) -> float | None:
        if rate is None or not self.peak:
            return None
        return rate * self.flops_per_token / (self.peak * self.num_devices)


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
