"""Hybrid inference state: preallocated attention KV for attention layers, conv + SSM state for Mamba
layers, for a batch of sequences of different lengths.

Each row has its own length (`seq_lens`, a CPU tensor so that reading it never waits on a device).
`cache.rows(i, j)` is a view of rows i..j-1 that shares every tensor with the parent, so a prompt can
be prefilled into one row while the others decode. For speculative decoding a forward in "verify"
mode keeps the Mamba state after every token, and `rollback` then keeps only the accepted ones,
without recomputing the prefix.

How a forward meets the cache is its `CacheMode`, an explicit argument from the model's `forward` /
`hidden_states` down to every attention and Mamba layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from nemotron.quant import formats

CacheMode = Literal["dynamic", "static", "verify"]
"""How a forward meets the cache (the `mode` argument of a model's `forward` / `hidden_states`, passed
down to its layers):

"dynamic" (the default, and the only mode without a cache): T tokens per row continue each row at
  `cache.seq_lens` (positions as a Python list); attention writes the new keys and reads the cache
  up to the longest row; the forward advances `seq_lens`.
"static": one token per row at `positions` [B] (a tensor); attention scatters its key into the
  preallocated buffer and reads the whole buffer under a mask, so no shape depends on the lengths
  (torch.compile's decode step never recompiles); the caller advances `seq_lens`.
"verify": as "dynamic", but Mamba layers run the new tokens one by one through the recurrence and
  keep the state after each (`MambaState.conv_history` / `ssm_history`) for `HybridCache.rollback`
  (speculative decoding)."""
CACHE_MODES: tuple[str, ...] = ("dynamic", "static", "verify")


def check_mode(mode: str, cache: object, positions: object, capture: object = None) -> None:
    """A model-level forward's mode against its arguments: static needs `positions` and a cache,
    verify a cache; `positions` belongs to static decode only, a `StateCapture` to dynamic mode with
    a cache."""
    if mode not in CACHE_MODES:
        raise ValueError(f"mode must be one of {', '.join(CACHE_MODES)}, not {mode!r}")
    if mode != "dynamic" and cache is None:
        raise ValueError(f"mode={mode!r} continues a cache: pass one")
    if (mode == "static") != (positions is not None):
        raise ValueError("positions [B] (a tensor) go with mode='static', and only with it")
    if capture is not None and (mode != "dynamic" or cache is None):
        raise ValueError("capture (states inside a forward) goes with mode='dynamic' and a cache")


@dataclass
class CacheOptions:
    """How a model's inference state is stored (passed to the model's `new_cache`).

    kv_dtype: "auto" (the model dtype), "fp8" (E4M3 with the checkpoint's per-layer k_scale /
    v_scale, 1.0 when it has none: half the bytes of bf16, a quarter of fp32) or "nvfp4" (E2M1 in
    16-element blocks along the head dimension with E4M3 block scales and the checkpoint's scale / 6
    as the global scale, as ModelOpt's NVFP4 KV cache: 4.5 bits a value). ssm_dtype: the Mamba
    SSM state's dtype ("float32", "float16", "bfloat16"; None: the config's mamba_ssm_cache_dtype).
    ssm_rounding: how a low-precision SSM state is rounded after each update, "nearest" or
    "stochastic" (unbiased: a value lands on either neighbour with odds by distance, which keeps
    the many small decays and updates of a long decode from drifting one way; Nemotron 3 Super's
    fp16 state does this)."""

    kv_dtype: str = "auto"
    ssm_dtype: str | None = None
    ssm_rounding: str = "nearest"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kv_dtype not in ("auto", "fp8", "nvfp4"):
            raise ValueError(f"kv cache dtype must be 'auto', 'fp8' or 'nvfp4', not {self.kv_dtype!r}")
        if self.ssm_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(f"SSM cache dtype must be float32, float16 or bfloat16, not {self.ssm_dtype!r}")
        if self.ssm_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"SSM rounding must be 'nearest' or 'stochastic', not {self.ssm_rounding!r}")

    def kv_state(self, attention, batch: int, max_len: int, dtype: torch.dtype, device) -> "KVState":
        """An attention layer's empty KV cache: the model dtype, or E4M3 / NVFP4 with the checkpoint's
        k_scale / v_scale (FP8's amax / 448; 1.0 without)."""
        if self.kv_dtype == "auto":
            return KVState.empty(batch, attention.num_kv_heads, max_len, attention.head_dim, dtype, device)
        k, v = getattr(attention.k_proj, "k_scale", None), getattr(attention.v_proj, "v_scale", None)
        k, v = 1.0 if k is None else float(k), 1.0 if v is None else float(v)
        if self.kv_dtype == "fp8":
            return KVState.empty(batch, attention.num_kv_heads, max_len, attention.head_dim, torch.float8_e4m3fn,
                                 device, k, v)
        # NVFP4's global scale is amax / (6 * 448): the FP8 scale over E2M1's largest value
        return KVState.empty(batch, attention.num_kv_heads, max_len, attention.head_dim, torch.uint8, device,
                             k / formats.E2M1_MAX, v / formats.E2M1_MAX)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> `dtype`, rounding to one of the two neighbours with probability proportional to the
    closeness (E[result] = x)."""
    nearest = x.to(dtype)
    nf = nearest.float()
    toward = torch.where(x > nf, float("inf"), float("-inf")).to(dtype)
    other = torch.nextafter(nearest, toward)
    gap = other.float() - nf
    p = torch.where(gap != 0, (x - nf) / gap, torch.zeros_like(x))
    u = torch.rand(x.shape, generator=generator, device=x.device)
    return torch.where(u < p, other, nearest)


def round_into(dst: torch.Tensor, src: torch.Tensor, rounding: str = "nearest",
               generator: torch.Generator | None = None) -> None:
    """dst.copy_(src) with `rounding` when dst is lower precision than the fp32 src."""
    if rounding == "stochastic" and dst.dtype != src.dtype and dst.dtype in (torch.float16, torch.bfloat16):
        dst.copy_(stochastic_round(src.float(), dst.dtype, generator))
    else:
        dst.copy_(src)


@dataclass
class KVState:
    """Static KV cache of one attention layer: [B, kv_heads, max_len, head_dim]. An FP8 cache stores
    k / k_scale and v / v_scale in E4M3 and hands back dequantized keys and values. An NVFP4 cache
    (uint8) stores each head vector as its packed E2M1 codes followed by its E4M3 block scales,
    head_dim / 2 + head_dim / 16 bytes, so rows, slices and scatters treat it like any other cache."""

    k: torch.Tensor
    v: torch.Tensor
    k_scale: float = 1.0
    v_scale: float = 1.0

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str, k_scale: float = 1.0, v_scale: float = 1.0) -> "KVState":
        width = head_dim // 2 + head_dim // formats.NVFP4_BLOCK if dtype == torch.uint8 else head_dim
        if dtype == torch.uint8 and head_dim % formats.NVFP4_BLOCK:
            raise ValueError(f"an NVFP4 KV cache needs a head dimension divisible by 16, got {head_dim}")
        shape = (batch, kv_heads, max_len, width)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   k_scale, v_scale)

    @property
    def fp8(self) -> bool:
        return self.k.dtype == torch.float8_e4m3fn

    @property
    def nvfp4(self) -> bool:
        return self.k.dtype == torch.uint8

    def _store(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        if self.nvfp4:
            packed, block_scale, _ = formats.nvfp4_quantize(x, torch.tensor(scale, dtype=torch.float32))
            return torch.cat([packed, block_scale.view(torch.uint8)], dim=-1)
        return (x.float() / scale).clamp(-448.0, 448.0).to(self.k.dtype) if self.fp8 else x

    def _load(self, x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        if self.nvfp4:
            half = x.shape[-1] * 8 // 9   # head_dim / 2 code bytes, then head_dim / 16 scale bytes
            return formats.nvfp4_dequantize(x[..., :half], x[..., half:].view(torch.float8_e4m3fn),
                                            torch.tensor(scale, dtype=torch.float32), dtype)
        return (x.float() * scale).to(dtype) if self.fp8 else x

    def rows(self, start: int, end: int) -> "KVState":
        return KVState(self.k[start:end], self.v[start:end], self.k_scale, self.v_scale)

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v ([B, kv, T, hd]) for row b at positions pos[b]..pos[b]+T-1; return the keys and
        values of every row up to the longest row's end ([B, kv, max(pos)+T, hd])."""
        t = k.shape[2]
        end = max(pos) + t
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.k.shape[2]}")
        dtype = k.dtype
        k, v = self._store(k, self.k_scale), self._store(v, self.v_scale)
        if min(pos) == end - t:  # every row at the same position: a plain slice
            self.k[:, :, end - t:end] = k
            self.v[:, :, end - t:end] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            cols = torch.tensor(pos, device=k.device)[:, None] + torch.arange(t, device=k.device)
            self.k[rows, :, cols] = k.transpose(1, 2)
            self.v[rows, :, cols] = v.transpose(1, 2)
        return self._load(self.k[:, :, :end], self.k_scale, dtype), self._load(self.v[:, :, :end], self.v_scale, dtype)

    def first(self, length: int) -> "KVState":
        """A view of positions 0..length-1 of every row (the static decode's window)."""
        return KVState(self.k[:, :, :length], self.v[:, :, :length], self.k_scale, self.v_scale)

    def update_static(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row (k/v [B, kv, 1, hd]) written at pos [B] (a tensor); returns the whole
        buffer. Shapes never change, so a compiled decode step never recompiles (gpt-fast style)."""
        dtype = k.dtype
        k, v = self._store(k, self.k_scale), self._store(v, self.v_scale)
        index = pos.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        return self._load(self.k, self.k_scale, dtype), self._load(self.v, self.v_scale, dtype)

    def copy_row(self, src: int, dst: int) -> None:
        self.k[dst].copy_(self.k[src])
        self.v[dst].copy_(self.v[src])

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.k.shape[1] * self.k.shape[3] * self.k.element_size()


@dataclass
class MambaState:
    """Mamba-2 state of one layer: the last K-1 conv inputs [B, conv_dim, K-1] and the SSM state
    [B, heads, head_dim, state_size] (fp32 by default).

    A forward in "verify" mode (`Mamba2Mixer.verify`) also keeps the conv input window and the SSM
    state after each token (`conv_history`, `ssm_history`) so that `rollback` can rewind to any of them."""

    conv: torch.Tensor
    ssm: torch.Tensor
    conv_history: torch.Tensor | None = field(default=None, repr=False)
    ssm_history: torch.Tensor | None = field(default=None, repr=False)
    rounding: str = "nearest"                  # of a low-precision ssm state (CacheOptions.ssm_rounding)
    generator: torch.Generator | None = field(default=None, repr=False)

    @classmethod
    def empty(cls, batch: int, conv_dim: int, conv_kernel: int, heads: int, head_dim: int, state_size: int,
              dtype: torch.dtype, ssm_dtype: torch.dtype, device: torch.device | str, rounding: str = "nearest",
              generator: torch.Generator | None = None) -> "MambaState":
        return cls(
            torch.zeros(batch, conv_dim, conv_kernel - 1, dtype=dtype, device=device),
            torch.zeros(batch, heads, head_dim, state_size, dtype=ssm_dtype, device=device),
            rounding=rounding, generator=generator,
        )

    def rows(self, start: int, end: int) -> "MambaState":
        return MambaState(self.conv[start:end], self.ssm[start:end], rounding=self.rounding,
                          generator=self.generator)

    def store_ssm(self, new: torch.Tensor, into: torch.Tensor | None = None) -> None:
        """Write an fp32 state into `into` (default: the whole ssm state) with this cache's rounding."""
        round_into(self.ssm if into is None else into, new, self.rounding, self.generator)

    def rollback(self, keep: list[int]) -> None:
        """After a "verify" forward of T tokens, keep the first keep[b] (1..T) of them in row b."""
        window = self.conv.shape[-1]
        for b, n in enumerate(keep):
            self.conv[b].copy_(self.conv_history[b, :, n:n + window])
            self.ssm[b].copy_(self.ssm_history[b, n - 1])
        self.conv_history = self.ssm_history = None

    def copy_row(self, src: int, dst: int) -> None:
        self.conv[dst].copy_(self.conv[src])
        self.ssm[dst].copy_(self.ssm[src])

    def zero_row(self, row: int) -> None:
        self.conv[row].zero_()
        self.ssm[row].zero_()

    @property
    def bytes_per_sequence(self) -> int:
        return (self.conv[0].numel() * self.conv.element_size() + self.ssm[0].numel() * self.ssm.element_size())


@dataclass
class StateCapture:
    """A request, passed explicitly to a "dynamic" forward (`capture=` of the model's forward /
    hidden_states, down to each Mamba mixer), for every Mamba layer's state at given offsets inside
    that forward: what a prefix-cache block ending inside a prefill chunk saves. Attention needs no
    capture: its keys and values are in the cache per position.

    offsets: token counts into the forward, ascending, each a multiple of the layers' scan chunk
    (where the chunked scan has the state anyway) or the forward's length. The forward appends one
    (conv [B, O, conv_dim, K-1], ssm [B, O, heads, head_dim, state_size]) per Mamba layer to `states`,
    in layer order, in the cache's dtypes."""

    offsets: tuple[int, ...]
    states: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.offsets = tuple(self.offsets)
        if not self.offsets or self.offsets[0] <= 0 or any(a >= b for a, b in zip(self.offsets, self.offsets[1:])):
            raise ValueError(f"capture offsets must be positive and ascending, not {self.offsets}")

    def at(self, i: int, row: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each Mamba layer's (conv, ssm) at offsets[i] in batch row `row`, in layer order."""
        return [(conv[row, i], ssm[row, i]) for conv, ssm in self.states]


State = KVState | MambaState | None


class HybridCache:
    """Per-layer states (main model and MTP block) plus the number of tokens each row holds."""

    def __init__(self, layers: list[State], mtp_layers: list[State] | None = None,
                 seq_lens: torch.Tensor | None = None, mtp_seq_lens: torch.Tensor | None = None) -> None:
        self.layers = layers
        self.mtp_layers = mtp_layers or []
        batch = next((s.k.shape[0] if isinstance(s, KVState) else s.conv.shape[0]
                      for s in layers if s is not None), 1)
        self.seq_lens = seq_lens if seq_lens is not None else torch.zeros(batch, dtype=torch.long)
        self.mtp_seq_lens = mtp_seq_lens if mtp_seq_lens is not None else torch.zeros(batch, dtype=torch.long)

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def capacity(self) -> int:
        return next((s.k.shape[2] for s in self.layers if isinstance(s, KVState)), 1 << 62)

    def positions(self) -> list[int]:
        return self.seq_lens.tolist()

    def rows(self, start: int, end: int | None = None) -> "HybridCache":
        """A view of rows start..end-1 (default: one row) sharing all tensors with this cache."""
        end = start + 1 if end is None else end

        def view(states: list[State]) -> list[State]:
            return [None if s is None else s.rows(start, end) for s in states]

        return HybridCache(view(self.layers), view(self.mtp_layers), self.seq_lens[start:end],
                           self.mtp_seq_lens[start:end])

    def first(self, length: int) -> "HybridCache":
        """A view whose attention layers hold positions 0..length-1 only (Mamba states whole): the
        static decode step reads and masks `length` positions, not the whole capacity."""
        def view(states: list[State]) -> list[State]:
            return [s.first(length) if isinstance(s, KVState) else s for s in states]

        return HybridCache(view(self.layers), view(self.mtp_layers), self.seq_lens, self.mtp_seq_lens)

    def rollback(self, keep: list[int], forward_len: int) -> None:
        """Undo the tail of the last "verify" forward of `forward_len` tokens: row b keeps keep[b]."""
        for s in self.layers:
            if isinstance(s, MambaState):
                s.rollback(keep)
        self.seq_lens -= torch.tensor([forward_len - n for n in keep], dtype=torch.long)

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src's whole state into row dst (to keep active sequences packed at the front)."""
        for s in self.layers + self.mtp_layers:
            if s is not None:
                s.copy_row(src, dst)
        self.seq_lens[dst] = self.seq_lens[src]
        self.mtp_seq_lens[dst] = self.mtp_seq_lens[src]

    def reset_row(self, row: int) -> None:
        """Empty row `row` for a new sequence (Mamba state must start from zero; KV is overwritten)."""
        for s in self.layers + self.mtp_layers:
            if isinstance(s, MambaState):
                s.zero_row(row)
        self.seq_lens[row] = 0
        self.mtp_seq_lens[row] = 0

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(s.bytes_per_token for s in self.layers if isinstance(s, KVState))

    @property
    def mamba_bytes_per_sequence(self) -> int:
        return sum(s.bytes_per_sequence for s in self.layers if isinstance(s, MambaState))
