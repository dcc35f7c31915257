"""Low-precision number formats as pure functions: E2M1 (FP4) elements, NVFP4 (16-element blocks with
E4M3 block scales and an fp32 tensor scale), FP8 E4M3 per tensor, per channel and in 128x128
blocks, and MXFP4 (32-element blocks, E8M0 scales) for reading.

Conventions are NVIDIA ModelOpt's Hugging Face export (and what vLLM's `modelopt` loaders read):
- scales are *dequantization* multipliers: w ~= q * scale;
- NVFP4 packs two E2M1 codes per byte along the input dimension, the even element in the low nibble;
- E2M1 rounds to nearest with ties to the even code, saturating at +-6;
- E4M3 casts are clamped to +-448 explicitly (what torch's cast does out of range is not relied on).
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0
E4M3_MAX = 448.0
NVFP4_BLOCK = 16
MXFP4_BLOCK = 32
FP8_BLOCK = 128

# code -> value; bit 3 is the sign, codes 0..7 are the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# the midpoints between neighbouring magnitudes; a value on a midpoint goes to the even code, which
# is the upper neighbour at 0.75, 1.75 and 3.5 and the lower one at 0.25, 1.25, 2.5 and 5
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_E2M1_TIES_UP = (0.75, 1.75, 3.5)


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Values -> E2M1 codes (uint8, 0..15): round to nearest, ties to even, saturate at +-6."""
    a = x.float().abs()
    mids = torch.tensor(_E2M1_MIDPOINTS, device=x.device)
    code = torch.searchsorted(mids, a.contiguous())        # midpoints strictly below |x|
    for tie in _E2M1_TIES_UP:
        code += (a == tie).long()
    code = code.clamp_(max=7).to(torch.uint8)
    return code | ((x < 0).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """E2M1 codes (uint8, 0..15) -> values."""
    table = torch.tensor(E2M1_VALUES, dtype=dtype, device=codes.device)
    return table[codes.long()]


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes, element 2j in the low nibble and 2j+1 in the high one."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even last dimension, got {codes.shape[-1]}")
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] codes (the inverse of `pack_fp4`)."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> float8_e4m3fn, round to nearest even, clamped to +-448 (no NaN from overflow)."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"the input dimension ({x.shape[-1]}) must be a multiple of the block size {block}")
    return x.float().unflatten(-1, (-1, block))


# --------------------------------------------------------------------------------------------------
# NVFP4
# --------------------------------------------------------------------------------------------------


def nvfp4_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """The fp32 second-level scale of a tensor whose largest magnitude is `amax`: amax / (6 * 448)
    (`weight_scale_2`, or `input_scale` for activations)."""
    return torch.as_tensor(amax, dtype=torch.float32) / (E2M1_MAX * E4M3_MAX)


def nvfp4_quantize(w: torch.Tensor, scale_2: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., K] weights -> (packed uint8 [..., K/2], E4M3 block scales [..., K/16], fp32 scale_2).

    scale_2 defaults to the tensor's amax / 2688; each block scale is its block's amax / (6 *
    scale_2) in E4M3 (an all-zero block gets 1.0), and each element E2M1(w / (block scale * scale_2))."""
    blocks = _blocks(w, NVFP4_BLOCK)
    if scale_2 is None:
        scale_2 = nvfp4_global_scale(blocks.abs().amax())
    scale_2 = torch.as_tensor(scale_2, dtype=torch.float32, device=w.device)
    block_amax = blocks.abs().amax(-1)
    ratio = block_amax / (E2M1_MAX * scale_2) if float(scale_2) > 0 else torch.zeros_like(block_amax)
    block_scale = to_e4m3(torch.where(ratio == 0, torch.ones_like(ratio), ratio))
    step = block_scale.float() * scale_2
    # a block scale that underflowed E4M3 dequantizes its block to zeros whatever the codes
    scaled = torch.where(step[..., None] > 0, blocks / step[..., None], torch.zeros_like(blocks))
    return pack_fp4(e2m1_encode(scaled.flatten(-2))), block_scale, scale_2


_BYTE_PAIRS: dict[torch.device, torch.Tensor] = {}


def _byte_pairs(device: torch.device) -> torch.Tensor:
    """[256, 2]: the two E2M1 values of every byte (low nibble first): one gather decodes a byte."""
    if device not in _BYTE_PAIRS:
        byte = torch.arange(256, dtype=torch.uint8, device=device)
        _BYTE_PAIRS[device] = torch.stack([e2m1_decode(byte & 0x0F), e2m1_decode(byte >> 4)], dim=-1)
    return _BYTE_PAIRS[device]


def nvfp4_dequantize(packed: torch.Tensor, block_scale: torch.Tensor, scale_2: torch.Tensor,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed [..., K/2], block scales [..., K/16], scale_2) -> [..., K] values: E2M1 * (block scale * scale_2)."""
    pairs = torch.index_select(_byte_pairs(packed.device), 0, packed.reshape(-1).int())       # [..., 2]
    values = pairs.view(*packed.shape[:-1], -1, NVFP4_BLOCK)
    step = block_scale.float() * torch.as_tensor(scale_2, dtype=torch.float32, device=packed.device)
    return values.mul_(step[..., None]).flatten(-2).to(dtype)


def nvfp4_fake_quantize(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Activations through NVFP4 and back with a static, calibrated `input_scale` (amax / 2688), as
    Blackwell's W4A4 GEMM sees them: block scales computed at run time from each 16-element block."""
    g = 1.0 / torch.as_tensor(input_scale, dtype=torch.float32, device=x.device)
    blocks = _blocks(x, NVFP4_BLOCK)
    block_scale = to_e4m3(g * blocks.abs().amax(-1) / E2M1_MAX).float()
    inv = torch.where(block_scale > 0, 1.0 / block_scale, torch.zeros_like(block_scale))
    codes = e2m1_encode((blocks * (g * inv)[..., None]).clamp(-E2M1_MAX, E2M1_MAX))
    return (e2m1_decode(codes) * (block_scale / g)[..., None]).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# FP8 E4M3
# --------------------------------------------------------------------------------------------------


def fp8_quantize(w: torch.Tensor, granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (float8_e4m3fn [N, K], fp32 scale): granularity "tensor" (a scalar, amax / 448),
    "channel" ([N], one per output row) or "block" ([ceil(N/128), ceil(K/128)], one per 128x128 tile;
    the last row and column of tiles are partial when a dimension is not a multiple of 128, as
    ModelOpt exports them)."""
    w32 = w.float()
    if granularity == "tensor":
        amax = w32.abs().amax()
    elif granularity == "channel":
        amax = w32.abs().amax(-1)
    elif granularity == "block":
        n, k = w32.shape
        padded = torch.nn.functional.pad(w32.abs(), (0, -k % FP8_BLOCK, 0, -n % FP8_BLOCK))
        amax = padded.view(padded.shape[0] // FP8_BLOCK, FP8_BLOCK, padded.shape[1] // FP8_BLOCK, FP8_BLOCK).amax((1, 3))
    else:
        raise ValueError(f"unknown FP8 granularity {granularity!r} (tensor, channel or block)")
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return to_e4m3(w32 / _expand_fp8_scale(scale, w32.shape)), scale


def _expand_fp8_scale(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A per-tensor, per-channel [N] or per-block [ceil(N/128), ceil(K/128)] scale broadcast to [N, K]."""
    if scale.dim() == 0:
        return scale
    if scale.dim() == 1:
        return scale[:, None]
    n, k = shape
    return scale.repeat_interleave(FP8_BLOCK, 0)[:n].repeat_interleave(FP8_BLOCK, 1)[:, :k]


_E4M3_VALUES: dict[torch.device, torch.Tensor] = {}


def e4m3_to_float(q: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn -> fp32 through a 256-entry table (a CPU converts FP8 in software, 3x slower)."""
    if q.device not in _E4M3_VALUES:
        _E4M3_VALUES[q.device] = torch.arange(256, dtype=torch.uint8, device=q.device).view(torch.float8_e4m3fn).float()
    flat = torch.index_select(_E4M3_VALUES[q.device], 0, q.view(torch.uint8).reshape(-1).int())
    return flat.view(q.shape)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """float8_e4m3fn [N, K] and its scale (scalar, [N], or 128x128 blocks as [ceil(N/128), ceil(K/128)]
    or ModelOpt's [ceil(N/128), 1, ceil(K/128), 1]) -> values."""
    scale = scale.float()
    if scale.dim() == 4:
        scale = scale.reshape(scale.shape[0], scale.shape[2])
    return e4m3_to_float(q).mul_(_expand_fp8_scale(scale, q.shape)).to(dtype)


def fp8_fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """Activations through FP8 E4M3 and back with a scale computed at run time for each token (row
    amax / 448), as FP8_PER_CHANNEL_PER_TOKEN's dynamic activation quantizer does."""
    amax = x.float().abs().amax(-1, keepdim=True)
    return fp8_fake_quantize(x, torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)))


def fp8_fake_quantize(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Activations through FP8 E4M3 and back with a static per-tensor `input_scale` (amax / 448)."""
    s = torch.as_tensor(input_scale, dtype=torch.float32, device=x.device)
    return (to_e4m3(x.float() / s).float() * s).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# MXFP4 (reading)
# --------------------------------------------------------------------------------------------------


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """OCP MXFP4: packed codes [..., K/32, 16] (low nibble first) and E8M0 scales [..., K/32] (uint8,
    bias 127) -> [..., K] values, E2M1 * 2^(scale - 127)."""
    values = e2m1_decode(unpack_fp4(blocks))                                     # [..., K/32, 32]
    exp = torch.exp2(scales.to(torch.int32).sub(127).float())
    return (values * exp[..., None]).flatten(-2).to(dtype)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., K] -> (packed [..., K/32, 16], E8M0 scales [..., K/32]): ModelOpt's choice of exponent,
    ceil(log2(block amax / 6)), so that no element saturates."""
    blocks = _blocks(w, MXFP4_BLOCK)
    amax = blocks.abs().amax(-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / E2M1_MAX)), torch.full_like(amax, -127.0)).clamp(-127, 127)
    codes = e2m1_encode(blocks / torch.exp2(exp)[..., None])
    return pack_fp4(codes), (exp + 127).to(torch.uint8)
