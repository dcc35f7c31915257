"""Weight-only CPU decode of quantized layers: the stored FP8 or NVFP4 weight multiplied by the
matrix-vector kernels of `nemotron.kernels`, which decode it in registers, so a decode step reads
1 byte (FP8) or ~0.56 bytes (NVFP4) per weight and never makes a float weight.

Numerics (tests/test_quant_cpu.py checks each against the dequantized reference):
- FP8 without AVX512-BF16: exact. Every E4M3 value is an fp32 value; the activations stay fp32 (a
  bf16 model's are widened), the sums are fp32: the products equal the dequantizing path's up to the
  order of the fp32 sums.
- FP8 on a CPU with AVX512-BF16 and AVX512-VNNI: VDPBF16PS (32 products an instruction). The
  activations are rounded to bf16 (W8A16; a bf16 model's already are), the weights decode to bf16
  exactly (E4M3's 3 mantissa bits fit bf16's 7) except E4M3 subnormals (|q| < 2^-6, under 1/28672
  of the scale's range), which read as 0; fp32 sums.
- NVFP4, on every x86 CPU the kernels run on: integer products (W4A8), through VPDPBUSD (AVX512-VNNI,
  64 products an instruction) or VPMADDUBSW (AVX2); 1.3-1.6x the rate of the exact kernels they
  replaced (BENCHMARKS.md). The weights are exact (every E2M1 value times 2 is an integer); the activations are
  rounded to int8 per block of 16, the block's amax / 127 its scale, as llama.cpp's q4_0 dot
  products round theirs to q8 blocks of 32; the integer sums are exact, scaled in fp32. Both
  instruction sets give the same sums. On the 125M benchmark model (BENCHMARKS.md) that moves decode
  logits by up to 0.35-0.42 (rounding the activations to bf16 instead: 0.41 for a bf16 model, 0.014
  for an fp32 one), where NVFP4's own rounding of the weights moves them by 1.04-1.07.

The stored tensors are read as they are, except copies made once, at the first CPU decode: NVFP4's
codes and block scales in the kernel's order (0.56 bytes per weight) and, on AVX512-BF16, FP8's
bytes in the kernel's order (1 byte). Scales become fp32 per output row and per 128-column block
(FP8's 128x128 blocks). Prefill, training, and batches of more than `kernels.MAX_ROWS` rows decode the
stored weight for a float GEMM, as before (NVFP4 through `kernels.nvfp4_decode` on AVX512-BF16: the
same values). A compiled decode step reads the copies made in eager
code before it runs (`prepare_cpu_kernels` of the quantized modules).

NEMOTRON_CPU_KERNELS=0 turns the kernels off (the dequantizing path everywhere)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import torch
from torch import nn

from nemotron import kernels
from nemotron.quant import formats

T = TypeVar("T")


def _stamp(t: torch.Tensor) -> tuple:
    """What identifies t's current values: its storage, shape, dtype and in-place version (tensors
    made under inference_mode keep no version: they cannot change outside it)."""
    try:
        version = t._version
    except RuntimeError:
        version = -1
    return t.data_ptr(), t.shape, t.dtype, t.device, version


def cached(owner: nn.Module, key: object, sources: Callable[[], Iterable[torch.Tensor]], build: Callable[[], T]) -> T | None:
    """`build()`, made once per value of the tensors it reads (`sources()`) and kept on `owner` (outside
    its state dict): made again when one of them is replaced, moved or changed in place; freed with
    the owner. For weights put in a kernel's layout at their first use in inference."""
    if torch.compiler.is_compiling():
        # a trace cannot read data pointers: it takes the copy made by the eager call before it (the
        # compiled decode step calls `prepare_cpu_kernels` first), or None (the caller's float path).
        # Nor does it look at the sources: each tensor it touched would be checked at every call.
        hit = owner.__dict__.get("_cached_packs", {}).get(key)
        return None if hit is None else hit[1]
    store = owner.__dict__.setdefault("_cached_packs", {})
    stamp = tuple(_stamp(t) for t in sources())
    hit = store.get(key)
    if hit is None or hit[0] != stamp:
        hit = store[key] = (stamp, build())
    return hit[1]


def enabled_on(device: torch.device) -> bool:
    """Whether the kernels serve layers stored on `device` (a CPU where they run)."""
    return device.type == "cpu" and kernels.available()


def applies(x: torch.Tensor) -> bool:
    """Whether a quantized layer multiplies `x` through the kernels (`kernels.applies`: CPU inference,
    at most MAX_ROWS rows)."""
    return kernels.applies(x)


@dataclass
class PackedWeight:
    """A quantized weight [N, K], or a stack of experts' [E, N, K], as a `nemotron.kernels` product
    reads it. kind: "nvfp4_i8" (weight: codes, block_scales: E4M3 bits, both in
    `kernels.nvfp4_i8_order`), "fp8" (weight: E4M3 bits as
    stored) or "fp8_bf16" (weight: E4M3 bits in `kernels.fp8_bf16_order`); scales: fp32
    [.., N, segments of K]."""

    kind: str
    weight: torch.Tensor
    scales: torch.Tensor
    block_scales: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # fixed sizes for torch.compile (as parameters' are): the compiled decode step, traced with
        # symbolic shapes, would otherwise check every size of these copies in Python at each step
        for t in (self.weight, self.scales, self.block_scales):
            if t is not None:
                torch._dynamo.mark_static(t)

    def __call__(self, x: torch.Tensor, experts: torch.Tensor | None = None) -> torch.Tensor:
        """x [.., K] -> [.., N] in x.dtype; with a stack, `experts` names each row's expert."""
        if self.kind == "nvfp4_i8":
            return kernels.gemv_nvfp4_i8(x, self.weight, self.block_scales, self.scales, experts)
        if self.kind == "fp8_bf16":
            return kernels.gemv_fp8_bf16(x, self.weight, self.scales, experts)
        return kernels.gemv(x, self.weight, self.scales, experts)


def _row_scales(scale: torch.Tensor, lead: int, n: int, k: int) -> torch.Tensor | None:
    """An FP8 weight_scale (per tensor [..], per channel [.., N], or ModelOpt's 128x128 blocks
    [.., N/128, 1, K/128, 1]) -> fp32 [.., N, segments]; None where the blocks do not split K evenly."""
    scale = scale.float()
    if scale.dim() == lead:
        out = scale[..., None, None].expand(*scale.shape, n, 1)
    elif scale.dim() == lead + 1:
        out = scale[..., None]
    else:
        if k % formats.FP8_BLOCK:
            return None
        blocks = scale.squeeze(-1).squeeze(-2)   # [.., N/128, K/128]
        out = blocks.repeat_interleave(formats.FP8_BLOCK, dim=-2)[..., :n, :]
    return out.contiguous()


def pack(nvfp4: bool, weight: torch.Tensor, weight_scale: torch.Tensor,
         weight_scale_2: torch.Tensor | None = None) -> PackedWeight | None:
    """A layer's stored tensors (ModelOpt names; [N, ..] or stacked experts' [E, N, ..]) in the
    kernels' layout, or None where its shape does not fit them (FP8: K not a multiple of 32, or its
    128-column blocks not of 64; NVFP4 is padded to 256 columns: any K)."""
    lead = weight.dim() - 2
    n = weight.shape[-2]
    if nvfp4:
        scales = weight_scale_2.float().reshape(*weight.shape[:-2], 1, 1).expand(*weight.shape[:-2], n, 1).contiguous()
        packed, block_scales = kernels.nvfp4_i8_order(formats.unpack_fp4(weight), weight_scale)
        return PackedWeight("nvfp4_i8", packed, scales, block_scales)
    k = weight.shape[-1]
    scales = _row_scales(weight_scale, lead, n, k)
    if scales is None or k % 32:
        return None
    bits = weight.view(torch.uint8)
    if kernels.cpu_isa() == kernels.AVX512_BF16 and (k // scales.shape[-1]) % 64 == 0:
        return PackedWeight("fp8_bf16", kernels.fp8_bf16_order(bits), scales)
    return PackedWeight("fp8", bits.contiguous(), scales)
