"""The prefix pool's host-side index for continuous batching's prefix reuse.

Prefix reuse. After a prefill, the first ``prefix_len`` slots of the prompt's keys and
values are kept in a small device pool (``prefix_entries`` entries, least recently used
evicted), indexed on the host by a hash chain over whole blocks of ``PREFIX_BLOCK``
tokens. A later prompt that starts with the same blocks (a system prompt, few-shot
examples) copies them and prefills only the rest, attending to the copied keys through
the cache. Keys/values of a position depend only on the tokens up to it, so the result
is the same computation (test: identical greedy outputs with and without).
"""
from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import numpy as np

PREFIX_BLOCK = 16       # prefix reuse matches whole blocks of this many tokens


class PrefixIndex:
    """Which pool entry holds the keys/values of which prompt prefixes (whole blocks),
    least recently used first out."""

    def __init__(self, entries: int, max_len: int, block: int = PREFIX_BLOCK):
        self.entries, self.max_len, self.block = entries, max_len, block
        self.owner: dict[bytes, int] = {}                 # block-chain hash -> entry
        self.keys: dict[int, list[bytes]] = {}             # entry -> its hashes
        self.lru: collections.OrderedDict[int, None] = collections.OrderedDict(
            (e, None) for e in range(entries))
        self.hits = self.reused_tokens = 0

    def _chain(self, ids: Sequence[int], blocks: int) -> list[bytes]:
        out, h = [], b""
        for j in range(blocks):
            block = np.asarray(ids[j * self.block:(j + 1) * self.block], np.int64).tobytes()
            h = hashlib.blake2b(h + block, digest_size=16).digest()
            out.append(h)
        return out

    def lookup(self, ids: Sequence[int], limit: int) -> tuple[int, int]:
        """(entry, prefix length) of the longest cached whole-block prefix of ``ids``
        no longer than ``limit`` tokens; (-1, 0) if none."""
        blocks = min(limit, self.max_len) // self.block
        best = (-1, 0)
        for j, h in enumerate(self._chain(ids, blocks)):
            if h not in self.owner:
                break
            best = (self.owner[h], (j + 1) * self.block)
        if best[0] >= 0:
            self.lru.move_to_end(best[0])
            self.hits += 1
            self.reused_tokens += best[1]
        return best

    def claim(self, ids: Sequence[int], have: int, busy: set[int] = frozenset()) -> int:
        """An entry to keep ``ids``' first blocks in, or -1 when they add nothing beyond
        ``have`` cached tokens, are already held (by a row of the same prefill call too),
        or every entry is ``busy`` (read or written by the same call); the entry's old
        prefixes are forgotten."""
        blocks = min(len(ids), self.max_len) // self.block
        if blocks * self.block <= have:
            return -1
        hashes = self._chain(ids, blocks)
        entry = next((e for e in self.lru if e not in busy), -1)
        if hashes[-1] in self.owner or entry < 0:
            return -1
        for h in self.keys.pop(entry, []):
            if self.owner.get(h) == entry:
                del self.owner[h]
        for h in hashes:
            self.owner[h] = entry
        self.keys[entry] = hashes
        self.lru.move_to_end(entry)
        return entry
