"""Causal, packed, grouped-query self-attention through JAX's Pallas TPU splash kernel.

The kernel works on one sequence: q [N, T, H], k/v [K, S, H] with N a multiple of K
(query head n reads key head n // (N/K), the model's [K, G] head order), a static
causal mask and per-token segment ids (tokens attend only within their segment, so
segment 0 = padding behaves as in :func:`meditron_jax.model.layers.attention_mask`). It does
not scale the logits: q is scaled by 1/sqrt(H) first. Here it is vmapped over the
batch and, given a mesh, run under ``jax.shard_map`` with the batch split over the
mesh's batch axes and the heads over its head axis: a Pallas call is a custom call
that XLA's partitioner cannot split, and each shard builds its kernel for its own
head count (``check_vma=False``: Pallas' output shapes carry no varying-axes type;
the transpose then sums replicated inputs' cotangents over the axes they were not
split on, which the tests check). On CPU, ``interpret=True`` runs the same kernel
through Pallas' interpreter (tests only: slow).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import Mesh, PartitionSpec as P

from meditron_jax.errors import UserError

LANES = 128     # the kernel's block sizes (and so T and S) are multiples of this
BLOCK = 512     # default tile (MaxText's); T=640 gets gcd(512, 640) = 128


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     segment_ids: jax.Array | None, *, mesh: Mesh | None = None,
                     batch_axes: tuple[str, ...] = ("data", "fsdp"), head_axis: str | None = "tensor",
                     block: int = BLOCK, interpret: bool = False) -> jax.Array:
    """Causal attention, q [B,T,N,H], k/v [B,S,K,H] (S == T: no cache), segment_ids
    [B,T] int or None (one segment) -> [B,T,N,H] in q's dtype, scale 1/sqrt(H).

    With ``mesh``: runs in ``shard_map`` (batch over ``batch_axes``, query heads over
    ``head_axis``). Key heads are split like the query heads when ``head_axis``
    divides them; otherwise (8 KV heads on tensor=16) they arrive replicated and each
    shard takes the one its query heads read."""
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if s != t:
        raise ValueError(f"splash_attention is self-attention: {t} queries, {s} keys")
    if t % LANES:
        raise UserError(f"splash attention needs a sequence length that is a multiple of "
                        f"{LANES}; got {t} (pick another --seq or --attention xla)")
    if segment_ids is None:
        segment_ids = jnp.ones((b, t), jnp.int32)
    segment_ids = segment_ids.astype(jnp.int32)
    local = functools.partial(_local_attention, block=math.gcd(block, t), interpret=interpret)
    if mesh is None:
        return local(q, k, v, segment_ids)
    batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
    heads_shards = mesh.shape[head_axis] if head_axis else 1
    if b % batch_shards:
        raise UserError(f"splash attention: batch {b} does not split over mesh axes "
                        f"{'*'.join(batch_axes)} = {batch_shards}")
    if n % heads_shards:
        raise UserError(f"splash attention: {n} query heads do not split over mesh axis "
                        f"{head_axis}={heads_shards}")
    split_kv = kv_heads % heads_shards == 0
    if not split_kv and heads_shards % kv_heads:
        raise UserError(f"splash attention: {kv_heads} KV heads neither split over nor "
                        f"divide mesh axis {head_axis}={heads_shards}")
    if not split_kv:
        local = functools.partial(_replicated_kv, local, head_axis, heads_shards // kv_heads)
    rows = batch_axes or None
    qspec = P(rows, None, head_axis, None)
    kvspec = qspec if split_kv else P(rows, None, None, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(qspec, kvspec, kvspec, P(rows, None)),
                         out_specs=qspec, check_vma=False)(q, k, v, segment_ids)


def _replicated_kv(local, head_axis: str, shards_per_kv: int, q, k, v, segment_ids):
    # This shard's query heads all read key head (shard index) // (shards per key head).
    head = jax.lax.axis_index(head_axis) // shards_per_kv
    k, v = (jax.lax.dynamic_slice_in_dim(x, head, 1, axis=2) for x in (k, v))
    return local(q, k, v, segment_ids)


def _local_attention(q, k, v, segment_ids, *, block: int, interpret: bool):
    """One device's shard: the kernel vmapped over its batch rows, head-major inside."""
    t, n, h = q.shape[1:]
    kernel = _kernel(n, t, block, interpret)
    qh = (q * (1.0 / math.sqrt(h))).astype(q.dtype).swapaxes(1, 2)   # [B, N, T, H]
    kh, vh = k.swapaxes(1, 2), v.swapaxes(1, 2)                      # [B, K, S, H]
    ids = splash.SegmentIds(q=segment_ids, kv=segment_ids)
    out = jax.vmap(kernel)(qh, kh, vh, segment_ids=ids)
    return out.swapaxes(1, 2).astype(q.dtype)


@functools.lru_cache(maxsize=None)
def _kernel(heads: int, t: int, block: int, interpret: bool) -> splash.SplashAttentionKernel:
    """The kernel for ``heads`` query heads over T tokens (its block mask is built from
    numpy once per shape: T/block squared entries). Built outside any trace, so the
    cached kernel holds constants, not tracers of the step that first asked for it."""
    mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * heads)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block,
                              block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)
