"""Context parallelism: self-attention over a sequence split along a ``context`` mesh axis.

Activations are sharded along the sequence (the rule tables map the logical ``seq`` axis
to ``context``), so each of the C devices holds T/C tokens of every row. Attention runs
inside ``jax.shard_map``: each device all-gathers the keys, values and segment ids of
the whole row (K/V are small under GQA: 8 heads against 32 query heads for the 8B; the
gradient of the gather is a reduce-scatter) and attends its own queries to them with
:func:`flash_attention`, a blockwise attention with an online softmax.

Load balancing (training, scoring): the causal triangle makes late tokens cost more than
early ones, so with contiguous chunks the last device would do 2C-1 times the first's
work. The sequence is cut into 2C chunks and device r holds chunks r and 2C-1-r
(:func:`SequenceOrder`): every device then attends (r+1) + (2C-r) = 2C+1 chunk pairs.
The decoder applies the order to tokens, positions and segment ids on entry and undoes it
on the final hidden states (:meth:`SequenceOrder.restore`), so logits, loss and gradients
come back in the caller's order. Prefill into a KV cache keeps the natural order
(contiguous chunks) so the cache is written as usual.

Memory: nothing of size [T, T] (nor [T/C, T]) exists anywhere. :func:`flash_attention`
walks [block, block] tiles; for a query block starting at natural slot s it visits only
key blocks 0 .. s/block (the causal triangle: blocks above the diagonal are never
computed) and builds each tile's mask from the tile's slots and segment ids. Its
backward (a ``custom_vjp``) keeps only the output and the row-wise logsumexp and
recomputes each tile (FlashAttention-2), so the backward needs no [T, T] either.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from meditron_jax.errors import UserError

BLOCK = 512       # tile of the blockwise attention (queries and keys)
_NEG = float(np.finfo(np.float32).min) * 0.7


# ---- the sequence order ------------------------------------------------------------------
def check_length(t: int, shards: int) -> None:
    """A sequence of ``t`` tokens splits into 2 x ``shards`` equal chunks, or a one-line error."""
    if shards > 1 and t % (2 * shards):
        raise UserError(f"sequence length {t} is not divisible by 2 x context={shards} "
                        f"(= {2 * shards}: each device holds two mirrored chunks); pick a "
                        f"length that is a multiple of {2 * shards} or a smaller context axis")


class SequenceOrder:
    """The load-balanced token order for ``shards`` context devices: [B, T, ...] arrays
    are cut into 2C chunks along T and reordered to (0, 2C-1, 1, 2C-2, ...), so the
    contiguous shard r of the result is chunks r and 2C-1-r. Identity for one shard."""

    def __init__(self, shards: int):
        self.shards = shards

    def arrange(self, x: jax.Array) -> jax.Array:
        c = self.shards
        if c == 1:
            return x
        xp = np if isinstance(x, np.ndarray) else jnp   # host batches stay numpy
        b, t = x.shape[:2]
        halves = x.reshape(b, 2, c, t // (2 * c), *x.shape[2:])
        pairs = xp.stack([halves[:, 0], xp.flip(halves[:, 1], axis=1)], axis=2)
        return pairs.reshape(x.shape)

    def restore(self, x: jax.Array) -> jax.Array:
        c = self.shards
        if c == 1:
            return x
        xp = np if isinstance(x, np.ndarray) else jnp
        b, t = x.shape[:2]
        pairs = x.reshape(b, c, 2, t // (2 * c), *x.shape[2:])
        halves = xp.stack([pairs[:, :, 0], xp.flip(pairs[:, :, 1], axis=1)], axis=1)
        return halves.reshape(x.shape)


def natural_order(shards: int, balanced: bool) -> np.ndarray:
    """For the 2C chunks of a gathered row in device order (device r's two chunks at
    2r, 2r+1), the chunk each one is in the natural order (a permutation of 0..2C-1)."""
    if not balanced:
        return np.arange(2 * shards)
    return np.array([i for r in range(shards) for i in (r, 2 * shards - 1 - r)])


# ---- context-parallel attention (shard_map) ----------------------------------------------
def context_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                      mesh: Mesh, axis: str, batch_axes: tuple[str, ...] = (),
                      head_axis: str | None = None, balanced: bool = True,
                      block: int = BLOCK) -> jax.Array:
    """Causal, packed, grouped-query self-attention, q [B,T,N,H], k/v [B,T,K,H], segment ids
    [B,T] (0 = padding), with T split over mesh axis ``axis`` (``balanced``: in the
    :class:`SequenceOrder`; else contiguous) -> [B,T,N,H] in the same order. Batch over
    ``batch_axes``, heads over ``head_axis`` (KV heads it does not divide arrive
    replicated and each shard takes the ones its query heads read)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    shards = mesh.shape[axis]
    check_length(t, shards)
    batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
    heads_shards = mesh.shape[head_axis] if head_axis else 1
    if b % batch_shards:
        raise UserError(f"context attention: batch {b} does not split over mesh axes "
                        f"{'*'.join(batch_axes)} = {batch_shards}")
    split_kv = kv_heads % heads_shards == 0
    if n % heads_shards or (not split_kv and heads_shards % kv_heads):
        raise UserError(f"context attention: {n} query / {kv_heads} KV heads do not split "
                        f"over mesh axis {head_axis}={heads_shards}")
    chunk = t // (2 * shards)
    local = functools.partial(
        _local, axis=axis, shards=shards, balanced=balanced, block=math.gcd(block, chunk),
        head_axis=head_axis if not split_kv else None,
        shards_per_kv=heads_shards // kv_heads if not split_kv else 1)
    rows = batch_axes or None
    qspec = P(rows, axis, head_axis, None)
    kvspec = qspec if split_kv else P(rows, axis, None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qspec, kvspec, kvspec, P(rows, axis)),
                         out_specs=qspec, check_vma=False)(q, k, v, segment_ids.astype(jnp.int32))


def _local(q, k, v, segment_ids, *, axis, shards, balanced, block, head_axis, shards_per_kv):
    """One device: its 2 chunks of queries against the gathered row of keys/values."""
    if head_axis is not None:  # replicated KV heads: the one this shard's query heads read
        head = jax.lax.axis_index(head_axis) // shards_per_kv
        k, v = (jax.lax.dynamic_slice_in_dim(x, head, 1, axis=2) for x in (k, v))
    b, tl, n, h = q.shape
    chunk = tl // 2
    order = natural_order(shards, balanced)
    to_natural = np.argsort(order)   # natural chunk i is gathered chunk to_natural[i]

    def gather(x):                   # [B, T/C, ...] -> [B, T, ...] in the natural order
        x = jax.lax.all_gather(x, axis, axis=1, tiled=True)
        x = x.reshape(b, 2 * shards, chunk, *x.shape[2:])[:, to_natural]
        return x.reshape(b, 2 * shards * chunk, *x.shape[3:])
    kn, vn, kv_seg = gather(k), gather(v), gather(segment_ids)
    r = jax.lax.axis_index(axis)
    mine = jnp.asarray(order, jnp.int32).reshape(shards, 2)[r]        # my chunks (natural)
    starts = (mine[:, None] * chunk + jnp.arange(0, chunk, block, dtype=jnp.int32)[None])
    return flash_attention(q, kn, vn, segment_ids, kv_seg, starts.reshape(-1), block=block)


# ---- blockwise attention with an online softmax --------------------------------------------
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segments: jax.Array,
                    kv_segments: jax.Array, q_starts: jax.Array, *, block: int) -> jax.Array:
    """q [B,Tq,N,H] against keys/values [B,S,K,H] in the natural order (slot j = index j);
    query block i (``block`` tokens) holds the natural slots q_starts[i] ... + block - 1
    (``q_starts`` [Tq/block] int32, multiples of ``block``). Key j is visible to query i iff
    slot(j) <= slot(i) and their segment ids match -> [B,Tq,N,H], scale 1/sqrt(H)."""
    b, tq, n, h = q.shape
    kvh = k.shape[2]
    if tq % block or k.shape[1] % block:
        raise ValueError(f"flash_attention: block {block} must divide {tq} and {k.shape[1]}")
    qh = q.reshape(b, tq, kvh, n // kvh, h).transpose(0, 2, 3, 1, 4)      # [B,K,G,Tq,H]
    qh = (qh * np.float32(1.0 / math.sqrt(h))).astype(q.dtype)
    kh, vh = k.swapaxes(1, 2), v.swapaxes(1, 2)                          # [B,K,S,H]
    out = _flash(qh, kh, vh, q_segments.astype(jnp.int32), kv_segments.astype(jnp.int32),
                 q_starts.astype(jnp.int32), block)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, n, h)


def _tile(q_blk, k_blk, q_seg, kv_seg, q_start, kv_start, block):
    """Logits [B,K,G,bq,bk] float32 of one tile, and its mask [B,1,1,bq,bk]."""
    s = jnp.einsum("BKGTH,BKSH->BKGTS", q_blk, k_blk, preferred_element_type=jnp.float32)
    slots = jnp.arange(block, dtype=jnp.int32)
    causal = (kv_start + slots)[None, :] <= (q_start + slots)[:, None]
    mask = causal[None] & (q_seg[:, :, None] == kv_seg[:, None, :])
    return s, mask[:, None, None]


def _blocks(x, i, block, axis):
    return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=axis)


def _forward(q, k, v, q_seg, kv_seg, q_starts, block):
    """(out [B,K,G,Tq,H] in q's dtype, logsumexp [B,K,G,Tq] float32)."""
    b, kh, g, tq, h = q.shape

    def one_query_block(i):
        q_blk, qs, start = _blocks(q, i, block, 3), _blocks(q_seg, i, block, 1), q_starts[i]

        def step(j, carry):
            m, l, o = carry
            s, mask = _tile(q_blk, _blocks(k, j, block, 2), qs, _blocks(kv_seg, j, block, 1),
                            start, j * block, block)
            s = jnp.where(mask, s, _NEG)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            pv = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v.dtype), _blocks(v, j, block, 2),
                            preferred_element_type=jnp.float32)
            return m_new, l * corr + jnp.sum(p, axis=-1), o * corr[..., None] + pv
        init = (jnp.full((b, kh, g, block), _NEG, jnp.float32),
                jnp.zeros((b, kh, g, block), jnp.float32),
                jnp.zeros((b, kh, g, block, h), jnp.float32))
        # the causal triangle: key blocks up to the one holding this block's diagonal
        m, l, o = jax.lax.fori_loop(0, start // block + 1, step, init)
        return (o / l[..., None]).astype(q.dtype), m + jnp.log(l)
    out, lse = jax.lax.map(one_query_block, jnp.arange(tq // block))
    # [nq, B,K,G,blk,(H)] -> [B,K,G,Tq,(H)]
    out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, tq, h)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, tq)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_seg, kv_seg, q_starts, block):
    return _forward(q, k, v, q_seg, kv_seg, q_starts, block)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, q_starts, block):
    out, lse = _forward(q, k, v, q_seg, kv_seg, q_starts, block)
    return out, (q, k, v, q_seg, kv_seg, q_starts, out, lse)


def _flash_bwd(block, res, d_out):
    q, k, v, q_seg, kv_seg, q_starts, out, lse = res
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def one_query_block(carry, i):
        q_blk, do_blk = _blocks(q, i, block, 3), _blocks(d_out, i, block, 3)
        lse_blk, delta_blk = _blocks(lse, i, block, 3), _blocks(delta, i, block, 3)
        qs, start = _blocks(q_seg, i, block, 1), q_starts[i]

        def step(j, inner):
            dq, dk, dv = inner
            k_blk, v_blk = _blocks(k, j, block, 2), _blocks(v, j, block, 2)
            s, mask = _tile(q_blk, k_blk, qs, _blocks(kv_seg, j, block, 1), start,
                            j * block, block)
            p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)
            dv_j = jnp.einsum("BKGTS,BKGTH->BKSH", p.astype(do_blk.dtype), do_blk,
                              preferred_element_type=jnp.float32)
            dp = jnp.einsum("BKGTH,BKSH->BKGTS", do_blk, v_blk,
                            preferred_element_type=jnp.float32)
            ds = p * (dp - delta_blk[..., None])
            dq = dq + jnp.einsum("BKGTS,BKSH->BKGTH", ds.astype(k.dtype), k_blk,
                                 preferred_element_type=jnp.float32)
            dk_j = jnp.einsum("BKGTS,BKGTH->BKSH", ds.astype(q.dtype), q_blk,
                              preferred_element_type=jnp.float32)
            dk = jax.lax.dynamic_update_slice_in_dim(dk, _blocks(dk, j, block, 2) + dk_j,
                                                     j * block, axis=2)
            dv = jax.lax.dynamic_update_slice_in_dim(dv, _blocks(dv, j, block, 2) + dv_j,
                                                     j * block, axis=2)
            return dq, dk, dv
        dk, dv = carry
        dq = jnp.zeros(q_blk.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(0, start // block + 1, step, (dq, dk, dv))
        return (dk, dv), dq.astype(q.dtype)
    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(one_query_block, (zeros, zeros), jnp.arange(q.shape[3] // block))
    b, kh, g, tq, h = q.shape
    dq = jnp.moveaxis(dq, 0, 3).reshape(b, kh, g, tq, h)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
