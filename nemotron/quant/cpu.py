"""Weight-only CPU kernels for quantized layers: a stored FP8 or NVFP4 weight repacked once, at its
first use in CPU inference, into a layout one of torch's CPU kernels multiplies without making a
float weight, so a decode step reads 1 byte (8-bit) or ~0.56 bytes (4-bit) per weight instead of
decoding the stored weight to a float matrix at every call.

- FP8 (per tensor, per channel, 128x128 blocks) -> int8 with one scale per output channel
  (`torch._weight_int8pack_mm`).
- NVFP4 -> unsigned 4-bit codes in groups of 32 along the input, a scale and a zero point each
  (`torch._weight_int4pack_mm_for_cpu`), when the input dimension is a multiple of 32.

Numerics. Both kernels take bf16 activations and accumulate in fp32 (W8A16 / W4A16: an fp32 model's
input to the layer is rounded to bf16 first, its output returned in the model's dtype). Neither repack
is lossless; each rounds the stored weight once more:
- int8 per channel: each weight moves by at most half a step of max|row| / 127 (FP8's own step is
  relative, 1/16 of the value, so small weights of a row with a large one lose most);
- int4 per group of 32: the 16 evenly spaced levels between the group's min and max (scale and zero
  point rounded to bf16) replace E2M1's uneven ones across two 16-element blocks, up to half a step
  of (max - min) / 15: the rounding of q4-style formats on top of NVFP4's.
tests/test_quant_cpu.py bounds each, and the logits against the dequantized reference; BENCHMARKS.md
has the measured differences. Prefill and batches of more than MAX_ROWS rows decode the stored weight
as before (the kernels are matrix-vector kernels: slower than a float GEMM at many rows).

The repacked copy is kept beside the stored tensors (which a save writes back unchanged): FP8 takes
1 byte more per weight, NVFP4 0.625 (bf16 scale and zero per 32), still less than a bf16 model. A
compiled decode step reads the copies made in eager code before it runs (`prepare_cpu_kernels` of
the quantized modules); the experts' products run as one custom operation the trace does not enter.

NEMOTRON_CPU_KERNELS=0 turns the repacked kernels off (the dequantizing reference path everywhere)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, TypeVar

import torch
from torch import nn

# rows up to which the weight-only kernels beat dequantizing the weight for a float GEMM
MAX_ROWS = 16
INT4_GROUP = 32

_ENABLED = os.environ.get("NEMOTRON_CPU_KERNELS", "1") != "0"


T = TypeVar("T")


def _stamp(t: torch.Tensor) -> tuple:
    """What identifies t's current values: its storage, shape, dtype and in-place version (tensors
    made under inference_mode keep no version: they cannot change outside it)."""
    try:
        version = t._version
    except RuntimeError:
        version = -1
    return t.data_ptr(), t.shape, t.dtype, t.device, version


def cached(owner: nn.Module, key: object, sources: Iterable[torch.Tensor], build: Callable[[], T]) -> T | None:
    """`build()`, made once per value of the tensors it reads (`sources`) and kept on `owner` (outside
    its state dict): made again when one of them is replaced, moved or changed in place; freed with
    the owner. For weights repacked into a kernel's layout at their first use in inference."""
    if torch.compiler.is_compiling():
        # a trace cannot read data pointers: it takes the copy made by the eager call before it (the
        # compiled decode step calls `prepare_cpu_kernels` first), or None (the caller's float path)
        hit = owner.__dict__.get("_cached_packs", {}).get(key)
        return None if hit is None else hit[1]
    store = owner.__dict__.setdefault("_cached_packs", {})
    stamp = tuple(_stamp(t) for t in sources)
    hit = store.get(key)
    if hit is None or hit[0] != stamp:
        hit = store[key] = (stamp, build())
    return hit[1]


def enabled_on(device: torch.device) -> bool:
    """Whether the weight-only kernels serve layers stored on `device` (a CPU, not turned off)."""
    return _ENABLED and device.type == "cpu"


def applies(x: torch.Tensor) -> bool:
    """Whether a quantized layer runs `x` through its repacked kernel: CPU inference (nothing records
    a gradient for x), at most MAX_ROWS rows. Under torch.compile only where the repacked copy was
    made before the trace (`cached`)."""
    if not enabled_on(x.device) or x.numel() == 0:
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return x.numel() // x.shape[-1] <= MAX_ROWS


@dataclass
class PackedWeight:
    """One [N, K] weight in a CPU kernel's layout: int8 (`bits` 8: weight [N, K] int8, scales [N]) or
    int4 (`bits` 4: torch's CPU int4 packing of N rounded up to 16 rows, scales_and_zeros [K/32, N, 2])."""

    bits: int
    weight: torch.Tensor
    scales: torch.Tensor
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x @ w^T [..., N] in x.dtype (bf16 activations, fp32 accumulation). Written for
        few dispatches: decode calls it ~70 times a token."""
        rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if rows.dtype != torch.bfloat16:
            rows = rows.to(torch.bfloat16)
        if self.bits == 8:
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales)
        else:
            y = torch._weight_int4pack_mm_for_cpu(rows, self.weight, INT4_GROUP, self.scales)
            if y.shape[1] != self.out_features:
                y = y[:, :self.out_features]
        if x.dtype != torch.bfloat16:
            y = y.to(x.dtype)
        return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)


def int8_weight(w: torch.Tensor) -> PackedWeight:
    """A float [N, K] weight -> int8 with a scale per output channel (symmetric, round to nearest)."""
    w = w.float()
    scale = (w.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    scale = scale.bfloat16().float()                 # the kernel's scale, as it will multiply
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return PackedWeight(8, q.contiguous(), scale.bfloat16(), w.shape[0])


def int4_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float [N, K] weight (K a multiple of 32) -> (codes [N, K/32, 32] in 0..15, scale and zero
    [N, K/32] fp32, both bf16 values): w ~= (code - 8) * scale + zero, min-max per group, codes
    rounded to nearest against the bf16-rounded scale and zero the kernel multiplies by."""
    n, k = w.shape
    g = w.float().view(n, k // INT4_GROUP, INT4_GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-30).bfloat16().float()
    zero = (lo + 8 * scale).bfloat16().float()
    codes = ((g - zero[..., None]) / scale[..., None] + 8).round().clamp(0, 15)
    return codes, scale, zero


def int4_weight(w: torch.Tensor) -> PackedWeight | None:
    """A float [N, K] weight -> `int4_codes` in torch's CPU int4 layout, or None when K is not a
    multiple of 32. N is padded with zero rows to a multiple of 16 (the packing's tile), the padding
    sliced off each product."""
    n, k = w.shape
    if k % INT4_GROUP:
        return None
    codes, scale, zero = int4_codes(torch.nn.functional.pad(w.float(), (0, 0, 0, -n % 16)))
    packed = torch._convert_weight_to_int4pack_for_cpu(codes.view(-1, k).to(torch.int32), 1)
    scales_and_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()
    return PackedWeight(4, packed, scales_and_zeros, n)


@dataclass
class StackedPacks:
    """E experts' weights of one projection in one kernel layout, stacked: weight [E, ...], scales
    [E, ...]; `experts[e]` is expert e's PackedWeight (views of the stacks)."""

    bits: int
    weight: torch.Tensor
    scales: torch.Tensor
    out_features: int

    def expert(self, e: int) -> PackedWeight:
        return PackedWeight(self.bits, self.weight[e], self.scales[e], self.out_features)

    @cached_property
    def experts(self) -> list[PackedWeight]:
        """Every expert's PackedWeight, made once (the eager decode path reads them per token)."""
        return [self.expert(e) for e in range(self.weight.shape[0])]


def stack(packs: list[PackedWeight]) -> StackedPacks:
    """Packs of the same shape and kind (each expert's weight of one projection) as one stack."""
    return StackedPacks(packs[0].bits, torch.stack([p.weight for p in packs]), torch.stack([p.scales for p in packs]),
                        packs[0].out_features)


def pack(w: torch.Tensor, nvfp4: bool) -> PackedWeight:
    """The CPU kernel layout of a dequantized [N, K] weight: int4 for NVFP4 (int8 where its K does
    not fit the 4-bit groups), int8 for FP8."""
    return (int4_weight(w) if nvfp4 else None) or int8_weight(w)

