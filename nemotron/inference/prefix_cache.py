"""Prefix caching for hybrid models.

Attention layers can resume from any cached prefix, but a Mamba layer's state after token t is one
fixed-size summary of the whole prefix, so it can only be reused where it was saved. Prompts are cut
into blocks of `block` tokens (absolute positions); for each full block the cache keeps a checkpoint:
that block's attention KV and every Mamba layer's conv/SSM state at the block's end (vLLM's "align"
mode). A new prompt resumes from its longest run of saved blocks.

Blocks are finer than the engine's prefill chunk (a multiple of the block), at no cost to a cold
prefill: a chunk's forward captures the Mamba states at the block ends inside it (`capture`, a
`StateCapture` passed to the model), which the chunked scan computes anyway: blocks are multiples
of the scan chunk and forwards start on block boundaries, so every block end is a scan-chunk
boundary. The conv state there is the K-1 inputs before it.

Exactness. A prompt resumed at a block inside a chunk runs from there to the chunk's end, then in
the same chunks as without the cache. Its Mamba layers compute what they compute without the cache,
bit for bit: the scan carries its state from chunk to chunk one chunk at a time (ssd.py), so the
state at a block end, and all that follows it, is the same arithmetic whether the forward began at
the chunk's start or at the block (tests/test_prefix_blocks.py). What differs is only the first
resumed forward's row count (say 40 rows instead of 232), and CPU matmul kernels pick their code
path by row count: MKL's small-matrix path, and the MoE's per-expert products, whose row counts depend
on the whole batch. So a prompt resumed inside a chunk matches the uncached run to rounding (log-probs
within ~3e-6 on the embedded model; its greedy tokens were the same in every case measured), not
bit for bit. With `block` equal to the prefill chunk every restore lands where a forward ended, the
computation after it is the same forwards on the same state, and the outputs are bit-identical
whatever the kernels.

Blocks are keyed by a hash chained over the token ids (block i's key covers tokens 0..(i+1)*block),
and evicted least-recently-used under a byte budget. Each block holds a copy of the Mamba states, so
finer blocks hold more bytes per cached token (chunk / block times the Mamba share).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from nemotron.errors import NemotronWarning
from nemotron.layers.cache import HybridCache, KVState, MambaState, StateCapture
from nemotron.layers.mamba2 import Mamba2Mixer


def scan_chunk(model: nn.Module) -> int:
    """The least common multiple of the model's Mamba scan chunks (1 without Mamba layers): the
    chunked scan has the state at each of its chunk boundaries, so a block may end inside a forward
    only on one of them."""
    return math.lcm(1, *{m.chunk_size for m in model.modules() if isinstance(m, Mamba2Mixer)})


def choose_block(model: nn.Module, cache: HybridCache, prefill_chunk: int, block: int | None = None) -> int:
    """The prefix-cache block for an engine prefilling `prefill_chunk` tokens per forward: `block`
    (checked), or by default the model's scan chunk (64 without Mamba layers) where it divides the
    prefill chunk and the SSM state is fp32, else the prefill chunk. A low-precision SSM state is
    rounded where each forward ends; restoring one captured inside a forward would round it where the
    uncached run does not, so that default keeps blocks on forward ends (exact) and an explicit
    smaller block is warned about."""
    scan = scan_chunk(model)
    if block is None:
        fine = scan if scan > 1 else 64
        exact = all(s.ssm.dtype == torch.float32 for s in cache.layers if isinstance(s, MambaState))
        return fine if exact and prefill_chunk % fine == 0 else prefill_chunk
    if block < 1 or prefill_chunk % block:
        raise ValueError(f"the prefill chunk ({prefill_chunk}) must be a multiple of the prefix-cache block ({block})")
    if block < prefill_chunk and block % scan:
        raise ValueError(f"a prefix-cache block smaller than the prefill chunk must be a multiple of the Mamba "
                         f"scan chunk ({scan}), not {block}")
    if block < prefill_chunk and any(s.ssm.dtype != torch.float32 for s in cache.layers if isinstance(s, MambaState)):
        warnings.warn(f"the SSM state is stored below fp32: states restored at {block}-token blocks inside a "
                      f"{prefill_chunk}-token prefill chunk are rounded where an uncached run does not round, "
                      "so outputs with the prefix cache may differ in the last bits", NemotronWarning, stacklevel=3)
    return block


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

    def capture(self, start: int, end: int) -> StateCapture | None:
        """What a prefill forward of positions start..end-1 (start on a block boundary) must capture:
        the Mamba states at the ends of the blocks that end inside it (None: no block does)."""
        offsets = tuple(range(self.block - start % self.block, end - start + 1, self.block))
        return StateCapture(offsets) if offsets else None

    def save(self, keys: list[bytes], cache: HybridCache, row: int, start: int, capture: StateCapture) -> None:
        """Checkpoint the blocks that a prefill forward from position `start` finished: `keys` are the
        prompt's block keys, `cache` the cache (view) that forward ran on and `capture` what it
        captured (`capture(start, end)`); the prompt is its row `row`."""
        for i, offset in enumerate(capture.offsets):
            end = start + offset
            key = keys[end // self.block - 1]
            if key in self.blocks:
                self.blocks.move_to_end(key)
                continue
            self._add(key, cache, row, end, iter(capture.at(i, row)))

    def _add(self, key: bytes, cache: HybridCache, row: int, end: int,
             mamba_states: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        lo = end - self.block
        kv, mamba, nbytes = [], [], 0
        for state in cache.layers:
            pair = None
            if isinstance(state, KVState):
                pair = (state.k[row, :, lo:end].clone(), state.v[row, :, lo:end].clone())
                kv.append(pair)
                mamba.append(None)
            elif isinstance(state, MambaState):
                pair = tuple(t.clone() for t in next(mamba_states))   # not views of the whole capture
                mamba.append(pair)
                kv.append(None)
            else:
                kv.append(None)
                mamba.append(None)
            if pair is not None:
                nbytes += sum(t.numel() * t.element_size() for t in pair)
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
