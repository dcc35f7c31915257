"""Exact prefix caching for hybrid models.

Attention layers can resume from any cached prefix, but a Mamba layer's state after token t is one
fixed-size summary of the whole prefix, so it can only be reused where it was saved. The engine
prefills in chunks whose ends fall on multiples of `block` (absolute positions), and after each
full block it saves a checkpoint: that block's attention KV and every Mamba layer's conv/SSM state
at the block's end (vLLM's "align" mode). A new prompt resumes from its longest run of saved
blocks; because the computation after the checkpoint is the same chunks on the same state, the
outputs are bit-identical with and without the cache.

Blocks are keyed by a hash chained over the token ids (block i's key covers tokens 0..(i+1)*block),
and evicted least-recently-used under a byte budget.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from nemotron.layers.cache import HybridCache, KVState, MambaState


def block_keys(ids: list[int], block: int, limit: int | None = None) -> list[bytes]:
    """Chained keys of the full blocks of `ids` (at most `limit` of them)."""
    keys, prev = [], b""
    n = len(ids) // block if limit is None else min(limit, len(ids) // block)
    for i in range(n):
        h = hashlib.blake2b(prev, digest_size=16)
        h.update(array("q", ids[i * block:(i + 1) * block]).tobytes())
        prev = h.digest()
        keys.append(prev)
    return keys


@dataclass
class _Block:
    kv: list[tuple[torch.Tensor, torch.Tensor] | None]      # per layer: this block's keys/values
    mamba: list[tuple[torch.Tensor, torch.Tensor] | None]   # per layer: conv and SSM state at its end
    nbytes: int


class PrefixCache:
    def __init__(self, block: int, max_bytes: int) -> None:
        self.block = block
        self.max_bytes = max_bytes
        self.blocks: OrderedDict[bytes, _Block] = OrderedDict()
        self.bytes = 0
        self.queries = 0   # prompt tokens looked up
        self.hits = 0      # of which served from the cache

    def lookup(self, ids: list[int]) -> list[bytes]:
        """Keys of the longest run of cached blocks that prefixes `ids`, leaving at least one token
        to compute (its logits start the generation)."""
        keys = block_keys(ids, self.block, (len(ids) - 1) // self.block)
        found = []
        for key in keys:
            if key not in self.blocks:
                break
            found.append(key)
        self.queries += len(ids)
        self.hits += len(found) * self.block
        return found

    def restore(self, keys: list[bytes], cache: HybridCache, row: int) -> int:
        """Write the cached blocks into row `row` of `cache`; returns the number of tokens restored."""
        if not keys:
            return 0
        for i, key in enumerate(keys):
            entry = self.blocks[key]
            self.blocks.move_to_end(key)
            lo, hi = i * self.block, (i + 1) * self.block
            for state, kv in zip(cache.layers, entry.kv):
                if kv is not None:
                    state.k[row, :, lo:hi] = kv[0]
                    state.v[row, :, lo:hi] = kv[1]
        last = self.blocks[keys[-1]]
        for state, saved in zip(cache.layers, last.mamba):
            if saved is not None:
                state.conv[row].copy_(saved[0])
                state.ssm[row].copy_(saved[1])
        cache.seq_lens[row] = len(keys) * self.block
        return len(keys) * self.block

    def save(self, key: bytes, cache: HybridCache, row: int, end: int) -> None:
        """Checkpoint the block ending at position `end` (a multiple of block) of row `row`."""
        if key in self.blocks:
            self.blocks.move_to_end(key)
            return
        lo = end - self.block
        kv, mamba, nbytes = [], [], 0
        for state in cache.layers:
            if isinstance(state, KVState):
                pair = (state.k[row, :, lo:end].clone(), state.v[row, :, lo:end].clone())
                nbytes += sum(t.numel() * t.element_size() for t in pair)
                kv.append(pair)
                mamba.append(None)
            elif isinstance(state, MambaState):
                pair = (state.conv[row].clone(), state.ssm[row].clone())
                nbytes += sum(t.numel() * t.element_size() for t in pair)
                mamba.append(pair)
                kv.append(None)
            else:
                kv.append(None)
                mamba.append(None)
        if nbytes > self.max_bytes:
            return
        self.blocks[key] = _Block(kv, mamba, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, old = self.blocks.popitem(last=False)
            self.bytes -= old.nbytes

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
