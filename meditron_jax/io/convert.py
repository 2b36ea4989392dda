"""Conversion between checkpoint kinds, streamed block by block.

``convert_to_native``: any checkpoint directory -> native (Orbax) checkpoint.
``export_to_hf``: any checkpoint directory -> HF safetensors snapshot (+ index).

Both read the source through one interface (``cfg``, ``dtype_of(plan)``,
``read(plan, index)``), implemented by :class:`~meditron_jax.io.hf_io.HFSnapshot`,
:class:`~meditron_jax.io.checkpoint.NativeReader` and, after a LoRA merge, an in-memory
tree; every source is checked whole before a byte is written. Outputs are staged next
to the destination and swapped in only when complete (:mod:`meditron_jax.atomic`),
under a lock that refuses a second writer to the same ``--out``; file-system errors
(a read-only or full disk) are one line, and the destination stays as it was.
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import json
import os
import resource
import sys
import time
from typing import Iterator

import jax.numpy as jnp
import numpy as np

from meditron_jax import atomic
from meditron_jax.io import checkpoint, hf_io
from meditron_jax.atomic import staged_dir
from meditron_jax.model.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.io.hf_keys import hf_shape
from meditron_jax.io.loading import directory_kind
from meditron_jax.io.tensor_blocks import BLOCK_BYTES, TensorPlan, hf_from_ours, iter_hf_tensors, plan

@dataclasses.dataclass
class Result:
    verb: str
    source: str
    out: str
    tensors: int
    nbytes: int
    seconds: float

    def line(self) -> str:
        return (f"{self.verb} {self.tensors} tensors ({self.nbytes / 1e9:.2f} GB) from "
                f"{self.source} to {self.out} in {self.seconds:.1f} s; peak RSS "
                f"{peak_rss_bytes() / 2**20:.0f} MiB")


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM on Linux (``ru_maxrss`` would also count
    the image of whatever process forked us, from before exec), else getrusage."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _unmap_freed_blocks() -> None:
    """Make freed blocks go back to the OS at once (glibc only).

    After a large free, glibc raises its mmap threshold (up to 32 MiB), so later blocks
    come from per-thread heaps it keeps (tensorstore's threads each grow one): peak RSS
    then tracks the allocator's high-water mark rather than the few live blocks. A
    fixed threshold keeps every block a mapping of its own, unmapped when freed.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


class Progress:
    """One bar: bytes done / total, with tensors done / total beside it."""

    def __init__(self, desc: str, tensors: int, nbytes: int, quiet: bool):
        from tqdm import tqdm
        self.tensors, self.done = tensors, 0
        self.bar = tqdm(total=nbytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                        disable=quiet, file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
        self._postfix()

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"tensors {self.done}/{self.tensors}", refresh=False)

    def advance(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def tensor_done(self) -> None:
        self.done += 1
        self._postfix()

    def close(self) -> None:
        self.bar.close()


# ---- sources ------------------------------------------------------------------------------
def open_source(path: str | os.PathLike, verify: bool = True):
    path = os.fspath(path)
    if directory_kind(path) == "native":
        return checkpoint.NativeReader(path, verify)
    return hf_io.HFSnapshot.open(path)


@dataclasses.dataclass
class InMemorySource:
    """A params tree held in memory (the result of a LoRA merge)."""

    cfg: LlamaConfig
    params: dict

    def _leaf(self, p: TensorPlan):
        node = self.params
        for name in p.path:
            node = node[name]
        return node

    def dtype_of(self, p: TensorPlan) -> np.dtype:
        return np.dtype(self._leaf(p).dtype)

    def read(self, p: TensorPlan, index) -> np.ndarray:
        return np.asarray(self._leaf(p)[index])


def _merge_lora(source, lora_dir: str) -> InMemorySource:
    try:
        from meditron_jax.model.lora import load_and_merge
    except ImportError:
        raise UserError("--lora: LoRA merging is not available in this build "
                        "(meditron_jax.model.lora is missing)") from None
    params: dict = {}
    for p in plan(source.cfg):
        node = params
        for name in p.path[:-1]:
            node = node.setdefault(name, {})
        node[p.path[-1]] = source.read(p, tuple(slice(None) for _ in p.shape))
    return InMemorySource(source.cfg, load_and_merge(params, source.cfg, lora_dir))


# ---- destination --------------------------------------------------------------------------
@contextlib.contextmanager
def writing(model: str, out: str, kind: str, overwrite: bool) -> Iterator[None]:
    """Hold ``out`` for one conversion: checked writable before any work, locked against
    a second writer until the end (:func:`meditron_jax.atomic.locked`), and a
    file-system error inside is one line; the old checkpoint stays until the end."""
    check_writable(out)
    with checkpoint.storage_errors(f"writing {out}"), atomic.locked(out):
        check_destination(model, out, kind, overwrite)
        yield


def check_writable(out: str) -> None:
    """``out`` is (or can be made) a directory we may write: its nearest existing
    ancestor is a writable directory, and so is ``out`` itself when it exists."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} exists and is not a directory; choose another path")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"--out {out}: {parent} is not a directory")
    for path in (parent, out) if os.path.isdir(out) else (parent,):
        if os.statvfs(path).f_flag & os.ST_RDONLY:
            raise UserError(f"--out {out}: {path} is on a read-only file system")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UserError(f"--out {out}: {path} is not writable (permission denied)")


def check_destination(model: str, out: str, kind: str, overwrite: bool) -> None:
    """Refuse to clobber anything but a checkpoint of the kind we write, and that only
    with ``overwrite``; the old one stays in place until the new one is complete."""
    if os.path.exists(out) and os.path.realpath(out) == os.path.realpath(model):
        raise UserError(f"--out {out} is the --model directory; write to a new directory")
    if not os.path.lexists(out) or not os.listdir(out):
        return
    marker = checkpoint.CONFIG_FILE if kind == "native" else "config.json"
    if not os.path.exists(os.path.join(out, marker)):
        raise UserError(f"--out {out} exists, is not empty and is not a {kind} checkpoint; "
                        "refusing to replace it, choose a new directory")
    if not overwrite:
        raise UserError(f"--out {out} already holds a {kind} checkpoint; pass --overwrite to "
                        "replace it (it stays intact until the new one is complete)")


def _out_dtype(source, p: TensorPlan, dtype) -> np.dtype:
    return np.dtype(jnp.dtype(dtype)) if dtype is not None else np.dtype(source.dtype_of(p))


# ---- HF/native -> native ------------------------------------------------------------------
def convert_to_native(model: str, out: str, *, dtype: str | None = None, overwrite: bool = False,
                      quiet: bool = False, verify: bool = True,
                      block_bytes: int = BLOCK_BYTES) -> Result:
    """``model`` (HF or native; ``verify``: check a native one's checksums first) -> a
    native checkpoint at ``out``, held as :func:`writing` says."""
    with writing(model, out, "native", overwrite):
        return _convert_to_native(model, out, dtype, quiet, verify, block_bytes)


def _convert_to_native(model: str, out: str, dtype: str | None, quiet: bool, verify: bool,
                       block_bytes: int) -> Result:
    start = time.time()
    _unmap_freed_blocks()
    source = open_source(model, verify)
    plans = plan(source.cfg, block_bytes)
    dtypes = {p.path: _out_dtype(source, p, dtype) for p in plans}
    total = sum(int(np.prod(p.shape)) * dtypes[p.path].itemsize for p in plans)
    progress = Progress("convert", sum(p.num_tensors for p in plans), total, quiet)

    def blocks(p: TensorPlan):
        for layer in range(p.num_tensors):
            for index in p.blocks(layer):
                block = source.read(p, index).astype(dtypes[p.path], copy=False)
                progress.advance(block.nbytes)
                yield index, block
                del block  # one block alive at a time
            progress.tensor_done()

    tree: dict = {}
    for p in plans:
        node = tree
        for name in p.path[:-1]:
            node = node.setdefault(name, {})
        node[p.path[-1]] = checkpoint.StreamedArray(
            p.shape, dtypes[p.path], p.chunk_shape, lambda p=p: blocks(p))
    try:
        checkpoint.save_params(out, source.cfg, tree, source_dir=model)
    finally:
        progress.close()
    return Result("converted", model, out, progress.tensors, total, time.time() - start)


# ---- HF/native -> HF ----------------------------------------------------------------------
def export_to_hf(model: str, out: str, *, dtype: str | None = None, max_shard_size="5GB",
                 lora: str | None = None, overwrite: bool = False, quiet: bool = False,
                 verify: bool = True, block_bytes: int = BLOCK_BYTES) -> Result:
    """``model`` (HF or native; ``verify``: check a native one's checksums first), with
    ``lora`` merged when given -> an HF snapshot at ``out``, held as :func:`writing` says."""
    limit = hf_io.parse_size(max_shard_size)
    with writing(model, out, "hf", overwrite):
        return _export_to_hf(model, out, dtype, limit, lora, quiet, verify, block_bytes)


def _export_to_hf(model: str, out: str, dtype: str | None, limit: int, lora: str | None,
                  quiet: bool, verify: bool, block_bytes: int) -> Result:
    start = time.time()
    _unmap_freed_blocks()
    if lora is not None and not os.path.isdir(lora):
        raise UserError(f"--lora {lora}: no such directory")
    source = open_source(model, verify)
    if lora is not None:
        source = _merge_lora(source, lora)
    cfg = source.cfg
    plans = plan(cfg, block_bytes)
    dtypes = {p.path: _out_dtype(source, p, dtype) for p in plans}

    def blocks(p: TensorPlan, layer: int | None):
        for index in p.hf_blocks():  # HF tensors hold the true vocabulary, not our padding
            if p.stacked:
                block = source.read(p, (slice(layer, layer + 1), *index))[0]
            else:
                block = source.read(p, index)
            yield hf_from_ours(block, p.rule.hf_dims).astype(dtypes[p.path], copy=False)

    tensors = [hf_io.TensorOut(name, hf_shape(p.rule, cfg), dtypes[p.path],
                               lambda p=p, layer=layer: blocks(p, layer))
               for name, p, layer in iter_hf_tensors(plans, cfg.num_hidden_layers)]
    total = sum(t.nbytes for t in tensors)
    progress = Progress("export", len(tensors), total, quiet)
    try:
        with staged_dir(out) as staging:
            hf_io.write_safetensors(staging, tensors, limit, progress.advance, progress.tensor_done)
            _write_hf_side_files(model, staging, cfg, tensors)
    finally:
        progress.close()
    return Result("exported", model, out, len(tensors), total, time.time() - start)


def _write_hf_side_files(model: str, out: str, cfg: LlamaConfig, tensors) -> None:
    by_dtype: collections.Counter = collections.Counter()
    for t in tensors:
        by_dtype[t.dtype] += t.nbytes
    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = str(by_dtype.most_common(1)[0][0])
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    checkpoint.copy_side_files(model, out)
    if not os.path.exists(os.path.join(out, "generation_config.json")):
        eos = hf_cfg["eos_token_id"]
        generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos}
        if cfg.pad_token_id is not None:
            generation["pad_token_id"] = cfg.pad_token_id
        with open(os.path.join(out, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation, f, indent=2, sort_keys=True)
