"""Blockwise movement of weights between the HF layout and ours, for streaming.

Every conversion and sharded load moves a weight in *blocks*: one layer of a stacked
parameter, cut along one axis into pieces of at most :data:`BLOCK_BYTES`. Each block
maps to a contiguous run of rows of the HF tensor (so safetensors reads and writes
touch only those bytes), and the native checkpoint's chunks are exactly these blocks
(so every write covers whole chunks). Host memory is bounded by a few blocks, never
by a tensor or the model.

The index mapping follows each key rule's declared ``hf_dims`` (see
:mod:`meditron_jax.io.hf_keys`): an HF dim flattens one or more of our dims, so a slice of
our array is read as the covering rows of the HF tensor, then reshaped, cut and
transposed. Where our layout pads the vocabulary, the HF tensor holds only the first
``cfg.vocab_size`` entries of that axis (``TensorPlan.stored_shape``): reads zero-fill
the rest, and the HF side's blocks (:meth:`TensorPlan.hf_blocks`) stop at it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import numpy as np

from meditron_jax.model.config import LlamaConfig
from meditron_jax.io.hf_keys import KeyRule, rules, stored_layer_shape

BLOCK_BYTES = 32 << 20  # float32-sized; small next to an 8B model's 2 GB embed, large for I/O

Index = tuple[slice, ...]


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """One parameter in our layout, and how it is cut into blocks."""

    rule: KeyRule
    shape: tuple[int, ...]  # our full shape (leading `layers` dim when stacked)
    block_axis: int         # per-layer dim that blocks cut (first dim of HF dim 0)
    block_len: int
    stored_shape: tuple[int, ...]  # per-layer, as the HF tensor holds it (true vocabulary)

    @property
    def path(self) -> tuple[str, ...]:
        return self.rule.ours

    @property
    def stacked(self) -> bool:
        return self.rule.per_layer

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape

    @property
    def num_tensors(self) -> int:
        """HF tensors this parameter holds (one per layer when stacked)."""
        return self.shape[0] if self.stacked else 1

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        chunk = list(self.layer_shape)
        chunk[self.block_axis] = self.block_len
        return (1, *chunk) if self.stacked else tuple(chunk)

    def layer_blocks(self) -> list[Index]:
        """Per-layer indices of the blocks, in HF row order."""
        n = self.layer_shape[self.block_axis]
        out = []
        for start in range(0, n, self.block_len):
            index = [slice(None)] * len(self.layer_shape)
            index[self.block_axis] = slice(start, min(start + self.block_len, n))
            out.append(tuple(index))
        return out

    def hf_blocks(self) -> list[Index]:
        """The per-layer blocks cut to what the HF tensor holds (no padding rows)."""
        out = []
        for block in self.layer_blocks():
            cut = tuple(slice(*s.indices(n)[:2]) for s, n in zip(block, self.stored_shape))
            if all(s.stop > s.start for s in cut):
                out.append(cut)
        return out

    def blocks(self, layer: int | None = None) -> list[Index]:
        """Indices into the full array: one layer's blocks (stacked) or all blocks."""
        if not self.stacked:
            return self.layer_blocks()
        return [(slice(layer, layer + 1), *b) for b in self.layer_blocks()]


def plan(cfg: LlamaConfig, block_bytes: int = BLOCK_BYTES) -> list[TensorPlan]:
    """Block plans of every parameter, in HF key-map order. Sizes assume float32, so
    the plan (and a native checkpoint's chunking) does not depend on the dtype."""
    from meditron_jax.model import param_specs
    specs = param_specs(cfg)
    out = []
    for rule in rules(cfg):
        node = specs
        for p in rule.ours:
            node = node[p]
        shape = tuple(node.shape)
        layer_shape = shape[1:] if rule.per_layer else shape
        axis = rule.hf_dims[0][0]
        n = layer_shape[axis]
        row_bytes = math.prod(layer_shape) // n * 4
        pieces = max(1, min(n, -(-n * row_bytes // block_bytes)))
        out.append(TensorPlan(rule, shape, axis, -(-n // pieces), stored_layer_shape(rule, cfg)))
    return out


def _span(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise ValueError(f"strided index {s} is not supported")
    return start, max(start, stop)


def read_ours(read_hf: Callable[[Index], np.ndarray], hf_dims, layer_shape, index: Index,
              stored_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Block ``index`` of one layer in our layout, read from the HF tensor by
    ``read_hf(hf_index)`` (which returns the HF rows/cols asked for). With
    ``stored_shape`` (our shape of what the HF tensor holds, smaller than
    ``layer_shape`` along a padded axis), entries past it read as zeros."""
    stored = stored_shape or layer_shape
    spans = [_span(s, n) for s, n in zip(index, layer_shape)]
    want = tuple(b - a for a, b in spans)
    spans = [(min(a, m), min(b, m)) for (a, b), m in zip(spans, stored)]
    hf_index, split, cut = [], [], []
    for group in hf_dims:
        inner = [stored[d] for d in group[1:]]
        a, b = spans[group[0]]
        hf_index.append(slice(a * math.prod(inner), b * math.prod(inner)))
        split += [b - a, *inner]
        cut += [slice(None)] + [slice(*spans[d]) for d in group[1:]]
    block = read_hf(tuple(hf_index)).reshape(split)[tuple(cut)]
    order = [d for group in hf_dims for d in group]
    block = np.transpose(block, [order.index(d) for d in range(len(order))])
    if block.shape == want:
        return np.ascontiguousarray(block)
    padded = np.zeros(want, block.dtype)
    padded[tuple(slice(n) for n in block.shape)] = block
    return padded


def hf_from_ours(block: np.ndarray, hf_dims) -> np.ndarray:
    """Our-layout block (cut only along HF dim 0's first dim) -> the HF rows it is."""
    order = [d for group in hf_dims for d in group]
    moved = np.transpose(block, order)
    shape, i = [], 0
    for group in hf_dims:
        shape.append(math.prod(moved.shape[i:i + len(group)]))
        i += len(group)
    return np.ascontiguousarray(moved.reshape(shape))


def iter_hf_tensors(plans: list[TensorPlan], num_layers: int) -> Iterator[tuple[str, TensorPlan, int | None]]:
    """(HF name, plan, layer) in the order HF writes them: embed, layer by layer, head."""
    by_layer = [p for p in plans if p.stacked]
    for p in plans:
        if not p.stacked and p.path == ("embed",):
            yield p.rule.hf, p, None
    for i in range(num_layers):
        for p in by_layer:
            yield p.rule.hf.format(i=i), p, i
    for p in plans:
        if not p.stacked and p.path != ("embed",):
            yield p.rule.hf, p, None
