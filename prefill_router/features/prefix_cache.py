"""Prefix reuse: when a prompt starts with tokens the encoder has already run, compute only the rest.

A conversation that grows by a turn, or requests that share a system prompt, start with the same tokens as an
earlier prompt. For those tokens the encoder keeps two things from the earlier pass:
- the attention keys and values of every decoder layer it ran (the KV cache), so the new tokens can attend
  to the prefix without recomputing it;
- running sums of every hidden state over the prefix, taken at each block boundary, so mean pooling over the
  whole prompt is (prefix sum + sum over the new tokens) / length.
`last` pooling reads the last token, which is always new. The result equals a full pass within float
rounding (tests/test_prefix_cache.py).

Prefixes are matched in blocks of `BLOCK` tokens: a chain of block hashes maps every block-aligned prefix of a
stored prompt to its entry, so a lookup costs one hash per block of the new prompt. At least one token is
always computed anew. Entries live in an LRU bounded by bytes (about 30 KB per token for SmolLM2-135M at 18
layers), and only prompts of at least one block are stored.

The cache works on the token ids the encoder really runs, after the routing window and truncation. So in
the gateway, whose window is the first system message plus the last user message (features/window.py), the
reusable prefix of a new turn is the template's opening plus the system prompt; without a window (the
library's `Router.route` on a whole conversation) it is the whole earlier conversation.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK = 16


@dataclass
class PrefixEntry:
    ids: list[int]  # the block-aligned token ids this entry covers
    depth: int  # hidden states 0..depth are summed; decoder layers 1..depth have keys and values
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: keys, values [1, heads, len(ids), dim]
    block_sums: torch.Tensor  # [depth + 1, blocks, hidden]: sum of each state over the first (b + 1) blocks
    nbytes: int


@dataclass
class PrefixHit:
    entry: PrefixEntry
    blocks: int  # how many of the entry's blocks the new prompt shares

    @property
    def tokens(self) -> int:
        return self.blocks * BLOCK


def block_hashes(ids: list[int], blocks: int) -> list[int]:
    """hash of ids[:BLOCK * (b + 1)] for b < blocks, each computed from the one before."""
    out, h = [], 0
    for b in range(blocks):
        h = hash((h, tuple(ids[b * BLOCK:(b + 1) * BLOCK])))
        out.append(h)
    return out


class PrefixCache:
    """Thread-safe LRU of PrefixEntry, at most `max_bytes` in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[int, PrefixEntry] = OrderedDict()  # keyed by the hash of all their blocks
        self._index: dict[int, int] = {}  # block-prefix hash -> key of the newest entry holding that prefix
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0
        self.tokens_reused = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def lookup(self, ids: list[int], depth: int) -> PrefixHit | None:
        """The longest stored block-aligned prefix of `ids` that leaves at least one token to compute."""
        usable = (len(ids) - 1) // BLOCK
        hashes = block_hashes(ids, usable)
        with self._lock:
            for b in range(usable - 1, -1, -1):
                key = self._index.get(hashes[b])
                if key is None:
                    continue
                entry = self._entries.get(key)
                # Hashes can collide; the ids cannot lie.
                if entry is not None and entry.depth >= depth and entry.ids[:(b + 1) * BLOCK] == ids[:(b + 1) * BLOCK]:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    self.tokens_reused += (b + 1) * BLOCK
                    return PrefixHit(entry, b + 1)
            self.misses += 1
        return None

    def store(self, ids: list[int], depth: int, kv: list[tuple[torch.Tensor, torch.Tensor]],
              block_sums: torch.Tensor) -> None:
        """Keep the first len(block_sums[0]) blocks of a prompt: `kv` and `block_sums` must cover exactly them."""
        blocks = block_sums.shape[1]
        if blocks == 0:
            return
        ids = list(ids[:blocks * BLOCK])
        nbytes = block_sums.nbytes + sum(k.nbytes + v.nbytes for k, v in kv)
        if nbytes > self.max_bytes:
            return
        hashes = block_hashes(ids, blocks)
        entry = PrefixEntry(ids, depth, kv, block_sums, nbytes)
        with self._lock:
            key = hashes[-1]
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += nbytes
            for h in hashes:
                self._index[h] = key
            while self._bytes > self.max_bytes and self._entries:
                gone_key, gone = self._entries.popitem(last=False)
                self._bytes -= gone.nbytes
                for h in block_hashes(gone.ids, len(gone.ids) // BLOCK):
                    if self._index.get(h) == gone_key:
                        del self._index[h]

    def stats(self) -> dict:
        return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                "hits": self.hits, "misses": self.misses, "tokens_reused": self.tokens_reused}


def sums_at_blocks(states: torch.Tensor, blocks: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """[S, blocks, H] running sums over tokens of `states` [S, T, H] at every block end (the first `blocks`
    blocks of T), plus `start` [S, H] (the sum of what came before) when given."""
    if blocks == 0:
        return states.new_zeros((states.shape[0], 0, states.shape[-1]))
    per_block = states[:, :blocks * BLOCK].float().reshape(states.shape[0], blocks, BLOCK, -1).sum(2)
    sums = per_block.cumsum(1)
    return sums if start is None else sums + start[:, None, :]
