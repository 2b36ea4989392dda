"""Hugging Face safetensors snapshots: validated streaming reads, sharded loads, writes.

Reading never loads a file whole: :class:`HFSnapshot` checks every file's header
(truncation, names, shapes, dtypes, completeness against ``config.json``) before any
data moves, then reads only the rows asked for (safetensors ``get_slice``). A sharded
load builds each array with ``jax.make_array_from_callback``, so each process reads
just the slices its devices hold. Writing streams block by block into shard files
whose headers are computed up front (the safetensors format is a JSON header and raw
bytes; the library's writer would need every tensor of a shard in memory).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import struct
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from meditron_jax.model.config import LlamaConfig
from meditron_jax.errors import UserError
from meditron_jax.io.hf_keys import (check_hf_tensor, check_key_set, is_ignorable, tied_copies,
                                  tied_copy_differs)
from meditron_jax.io.tensor_blocks import BLOCK_BYTES, Index, TensorPlan, plan, read_ours

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16)}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclasses.dataclass(frozen=True)
class _Stored:
    """Where one tensor's bytes are: file, absolute offset, shape, dtype."""

    file: str
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass
class HFSnapshot:
    """A validated HF snapshot: where each tensor is, and its dtype."""

    path: str
    cfg: LlamaConfig
    tensors: dict[str, _Stored]

    @classmethod
    def open(cls, path: str | os.PathLike) -> "HFSnapshot":
        path = os.fspath(path)
        cfg = LlamaConfig.from_hf(path)
        files = _weight_files(path)
        headers: dict[str, tuple[tuple, str, int]] = {}
        for file, names in _group_by_file(files).items():
            headers.update(_read_header(file, names))
        headers = {n: h for n, h in headers.items() if not is_ignorable(n)}
        check_key_set(headers, cfg, path)
        tensors = {}
        for name, (shape, dtype_name, offset) in headers.items():
            if dtype_name not in DTYPES:
                raise UserError(f"{files[name]}: tensor {name} has dtype {dtype_name}; "
                                f"weights must be one of {', '.join(DTYPES)}")
            check_hf_tensor(name, shape, cfg, files[name])
            tensors[name] = _Stored(files[name], offset, shape, DTYPES[dtype_name])
        for copy, original in tied_copies(cfg).items():
            if copy in tensors and not _same_values(tensors[copy], tensors[original]):
                raise tied_copy_differs(files[copy], copy, original)
            tensors.pop(copy, None)
        return cls(path, cfg, tensors)

    def dtype_of(self, p: TensorPlan) -> np.dtype:
        """The stored dtype of a parameter (the widest of its layers' tensors)."""
        names = [p.rule.hf.format(i=i) for i in range(p.num_tensors)] if p.stacked else [p.rule.hf]
        return np.result_type(*(self.tensors[n].dtype for n in names))

    def read(self, p: TensorPlan, index: Index) -> np.ndarray:
        """Block ``index`` of parameter ``p`` in our layout (full-array index)."""
        if not p.stacked:
            return read_ours(self._reader(p.rule.hf), p.rule.hf_dims, p.layer_shape, index,
                             p.stored_shape)
        start, stop, _ = index[0].indices(p.shape[0])
        layers = [read_ours(self._reader(p.rule.hf.format(i=i)), p.rule.hf_dims, p.layer_shape,
                            index[1:], p.stored_shape) for i in range(start, stop)]
        if len(layers) == 1:
            return layers[0][None]
        return np.stack(layers)

    def _reader(self, name: str) -> Callable[[Index], np.ndarray]:
        return lambda hf_index: _read_rows(self.tensors[name], hf_index)


def _same_values(a: _Stored, b: _Stored) -> bool:
    """Whether two stored tensors of one shape hold the same values, compared a block of
    rows at a time (never a whole tensor in memory)."""
    rows = max(1, BLOCK_BYTES // (int(np.prod(a.shape[1:], dtype=np.int64)) * 4))
    for start in range(0, a.shape[0], rows):
        x, y = (_read_rows(t, (slice(start, start + rows),)) for t in (a, b))
        if x.dtype != y.dtype:
            x, y = x.astype(np.float32), y.astype(np.float32)
        if not np.array_equal(x, y):
            return False
    return True


def _read_rows(t: _Stored, hf_index: Index) -> np.ndarray:
    """One block of an HF tensor, holding no more than the block in memory.

    Whole rows (conversion blocks, shards cut along HF dim 0) are read straight into
    one buffer: the safetensors slice API would hold two copies. A cut along a later
    dim (say an fsdp shard of the hidden dim) copies just that slice out of a memory
    map, so a device's shard never costs the whole tensor.
    """
    start, stop, _ = hf_index[0].indices(t.shape[0])
    if stop <= start:  # a block wholly in our padded vocabulary
        return np.empty((0, *t.shape[1:]), t.dtype)[(slice(None), *hf_index[1:])]
    rows = (stop - start, *t.shape[1:])
    row_bytes = int(np.prod(t.shape[1:], dtype=np.int64)) * t.dtype.itemsize
    offset = t.offset + start * row_bytes
    if all(s.indices(n)[:2] == (0, n) for s, n in zip(hf_index[1:], t.shape[1:])):
        out = np.empty(rows, t.dtype)
        with open(t.file, "rb") as f:
            f.seek(offset)
            if f.readinto(out.reshape(-1).view(np.uint8).data) != out.nbytes:
                raise UserError(f"{t.file}: ends early; the file was truncated after it was opened")
        return out
    mapped = np.memmap(t.file, dtype=t.dtype, mode="r", offset=offset, shape=rows)
    return np.array(mapped[(slice(None), *hf_index[1:])])


def _weight_files(path: str) -> dict[str, str]:
    """Tensor name -> file, from the index when there is one, else every *.safetensors."""
    index_file = os.path.join(path, INDEX_FILE)
    if os.path.exists(index_file):
        return _read_index(path, index_file)
    found = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not found:
        pickled = sorted(os.path.basename(f) for pat in _PICKLED
                         for f in glob.glob(os.path.join(path, pat)))
        if pickled:
            raise UserError(
                f"{path}: only pickled PyTorch weights ({', '.join(pickled[:3])}); they are "
                "refused because unpickling runs arbitrary code. Re-save as safetensors: "
                "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)")
        raise UserError(f"{path}: no *.safetensors weights next to config.json")
    files: dict[str, str] = {}
    for file in found:
        for name in _read_header(file, None):
            if name in files:
                raise UserError(f"{path}: tensor {name} is in both {os.path.basename(files[name])} "
                                f"and {os.path.basename(file)}; keep one copy")
            files[name] = file
    return files


def _read_index(path: str, index_file: str) -> dict[str, str]:
    try:
        with open(index_file, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise UserError(f"{index_file}: not a valid index ({exc})") from None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise UserError(f"{index_file}: 'weight_map' must map tensor names to file names")
    files = {}
    for name, rel in weight_map.items():
        norm = os.path.normpath(rel)
        # Checked on the path as written, not its realpath: HF cache snapshots are
        # symlinks into ../blobs and are fine.
        if os.path.isabs(rel) or norm == ".." or norm.startswith(".." + os.sep):
            raise UserError(f"{index_file}: entry {rel!r} for {name} points outside the "
                            "checkpoint directory; shards must sit next to the index")
        if not rel.endswith(".safetensors"):
            raise UserError(f"{index_file}: {rel!r} is not a .safetensors file (pickled "
                            "weights are refused; re-save as safetensors)")
        full = os.path.join(path, norm)
        if not os.path.isfile(full):
            raise UserError(f"{index_file}: shard {rel} (holding {name}) is missing from {path}")
        files[name] = full
    return files


def _group_by_file(files: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, file in files.items():
        out.setdefault(file, []).append(name)
    return out


def _read_header(file: str, names: Iterable[str] | None) -> dict[str, tuple[tuple, str, int]]:
    """(shape, dtype name, absolute data offset) of ``names`` (default: all) in one file.

    ``safe_open`` validates the file (its data must cover the header exactly, so a
    truncated file fails here); the offsets come from the header, which it does not
    expose."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(file, framework="numpy") as f:
            present = set(f.keys())
    except SafetensorError as exc:
        raise UserError(f"{file}: not a valid safetensors file, truncated or corrupt ({exc}); "
                        "download it again") from None
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    out = {}
    for name in (present if names is None else names):
        if name not in present:
            raise UserError(f"{file}: the index lists tensor {name} in this file but the file "
                            "does not hold it")
        entry = header[name]
        out[name] = (tuple(entry["shape"]), entry["dtype"], 8 + header_len + entry["data_offsets"][0])
    return out


# ---- sharded load -------------------------------------------------------------------------
def load_hf_params(path: str | os.PathLike, *, shardings=None, dtype=None):
    """``(cfg, params)`` from an HF snapshot, each array built in its target sharding.

    ``shardings(cfg)`` gives the target tree (default: the first local device). Only
    the slices this process's devices hold are read from disk.
    """
    snap = HFSnapshot.open(path)
    return snap.cfg, place_params(snap.cfg, snap.read, snap.dtype_of, shardings, dtype)


def place_params(cfg: LlamaConfig, read: Callable[[TensorPlan, Index], np.ndarray],
                 stored_dtype: Callable[[TensorPlan], np.dtype], shardings=None, dtype=None) -> dict:
    """Build every parameter with ``jax.make_array_from_callback`` from a block reader."""
    targets = shardings(cfg) if shardings is not None else None
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params: dict = {}
    for p in plan(cfg):
        sharding = _at(targets, p.path) if targets is not None else default
        out_dtype = jnp.dtype(dtype) if dtype is not None else stored_dtype(p)
        cache: dict = {}

        def shard(index: Index, p=p, out_dtype=out_dtype, cache=cache) -> np.ndarray:
            # Replicated shards ask for the same index once per device: read it once.
            key = tuple(s.indices(n)[:2] for s, n in zip(index, p.shape))
            if key not in cache:
                cache[key] = read(p, index).astype(out_dtype, copy=False)
            return cache[key]

        node = params
        for name in p.path[:-1]:
            node = node.setdefault(name, {})
        node[p.path[-1]] = jax.make_array_from_callback(p.shape, sharding, shard)
    return params


def _at(tree, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


# ---- writing ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorOut:
    """One HF tensor to write: its name, shape, dtype and a producer of its row blocks."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    blocks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5e9 bytes (KB/MB/GB decimal, KiB/MiB/GiB binary, as transformers)."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE.match(str(text))
        if not m:
            raise UserError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    if size <= 0:
        raise UserError(f"--max-shard-size {text!r}: must be positive")
    return size


def shard_plan(tensors: list[TensorOut], max_shard_size: int) -> list[list[TensorOut]]:
    """Greedy split in write order; a tensor larger than the limit gets its own shard."""
    shards: list[list[TensorOut]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_safetensors(out_dir: str, tensors: list[TensorOut], max_shard_size: int,
                      on_block: Callable[[int], None] | None = None,
                      on_tensor: Callable[[], None] | None = None) -> list[str]:
    """Write ``tensors`` as HF shards (+ index when more than one); returns file names."""
    shards = shard_plan(tensors, max_shard_size)
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(names, shards):
        _write_shard(os.path.join(out_dir, file), shard, on_block, on_tensor)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.name: f for f, s in zip(names, shards) for t in s}}
        with open(os.path.join(out_dir, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    return names


def _write_shard(file: str, tensors: list[TensorOut], on_block, on_tensor) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors:
            written = 0
            for block in t.blocks():
                data = np.ascontiguousarray(block, dtype=t.dtype).reshape(-1).view(np.uint8)
                f.write(data.data)
                written += data.size
                if on_block:
                    on_block(data.size)
            if written != t.nbytes:
                raise RuntimeError(f"{t.name}: wrote {written} bytes, expected {t.nbytes}")
            if on_tensor:
                on_tensor()
        f.flush()
        os.fsync(f.fileno())
