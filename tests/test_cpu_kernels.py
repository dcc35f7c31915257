"""nemotron.kernels, the C++ matrix-vector kernels of CPU decode: every instruction set this CPU runs
against the product with the decoded weight (fp32 paths: equal up to the order of fp32 sums; the
VDPBF16PS paths: the reference on the same bf16 inputs; the VPDPBUSD path: on the same int8
rounded inputs), with tiles cut short (N % 4), rows in
groups of up to 8 (13 rows over 3 experts: groups above 4 take tiles of 2), an expert per row, scale segments; and bad input refused."""

from __future__ import annotations

import pytest
import torch

from nemotron import kernels
from nemotron.quant import formats

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the CPU kernels do not run here")

ISAS = [] if kernels.cpu_isa() is None else list(range(kernels.cpu_isa() + 1))   # AVX2 .. this CPU's best
E, N, K = 3, 42, 256                          # N % 4 == 2: the last tile has 2 rows


def _inputs(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, N, K, generator=g) * torch.logspace(-3, 0, K)   # columns of very different sizes
    x = torch.randn(rows, K, generator=g)
    experts = torch.randint(0, E, (rows,), generator=g)
    return w, x, experts


def _reference(w: torch.Tensor, x: torch.Tensor, experts: torch.Tensor | None) -> torch.Tensor:
    w64, x64 = w.double(), x.double()
    if experts is None:
        return x64 @ w64.T
    return torch.einsum("rk,rnk->rn", x64, w64[experts])


def _close(got: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= rel, err


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 3, 6, 13])
def test_fp32_and_bf16_weights(isa, rows):
    w, x, experts = _inputs(rows)
    _close(kernels.gemv(x, w, experts=experts, isa=isa), _reference(w, x, experts), 1e-6)
    _close(kernels.gemv(x, w[1], isa=isa), _reference(w[1], x, None), 1e-6)
    wb = w.bfloat16()
    _close(kernels.gemv(x, wb, experts=experts, isa=isa), _reference(wb.float(), x, experts), 1e-6)
    if isa == kernels.AVX512_BF16:            # bf16 inputs: VDPBF16PS, a bf16 output
        xb = x.bfloat16()
        y = kernels.gemv(xb, wb, experts=experts, isa=isa)
        assert y.dtype == torch.bfloat16
        _close(y, _reference(wb.float(), xb.float(), experts), 2 ** -8)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "block"])
def test_fp8_weights_are_read_exactly(isa, granularity):
    w, x, experts = _inputs(5)
    q, scale = formats.fp8_quantize(w[0], granularity)
    if granularity == "block":               # 128x128 blocks: N/128 x K/128 scales -> per row and segment
        scales = scale.repeat_interleave(128, 0)[:N]
    else:
        scales = scale.expand(N) if scale.dim() == 0 else scale
    scales = scales.reshape(N, -1).float().contiguous()
    dequantized = formats.fp8_dequantize(q, scale, torch.float32)
    _close(kernels.gemv(x, q.view(torch.uint8), scales, isa=isa), _reference(dequantized, x, None), 1e-6)


@pytest.mark.skipif(kernels.AVX512_BF16 not in ISAS, reason="needs AVX512-BF16")
def test_fp8_through_bf16_products():
    """E4M3 decoded to bf16 in registers: the reference on bf16-rounded inputs, subnormals read as 0."""
    w, x, experts = _inputs(13)
    q, scale = formats.fp8_quantize(w.flatten(0, 1), "channel")
    q = q.view(E, N, K)
    bits = q.view(torch.uint8)
    every = torch.arange(256, dtype=torch.uint8)
    bits[1, 5] = torch.where((every & 0x7F) == 0x7F, 0, every)          # every E4M3 code but NaN, in one row
    assert ((bits & 0x78) == 0).sum() > 100                              # subnormals and zeros are there
    scales = scale.view(E, N, 1).contiguous()
    dequantized = formats.fp8_dequantize(q.flatten(0, 1), scale, torch.float32).view(E, N, K)
    normal_only = torch.where((bits & 0x78) == 0, 0.0, dequantized)
    y = kernels.gemv_fp8_bf16(x, kernels.fp8_bf16_order(bits), scales, experts)
    ref = _reference(normal_only, x.bfloat16().float(), experts)
    _close(y, ref, 1e-6)
    _close(y, _reference(dequantized, x, experts), 2 ** -8)            # against the exact product


def test_bad_input_is_refused():
    w, x, experts = _inputs(2)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.gemv(x, w, experts=torch.tensor([0, E]))
    with pytest.raises(RuntimeError, match="expert index per row"):
        kernels.gemv(x, w)
    with pytest.raises(RuntimeError, match="columns"):
        kernels.gemv(x[:, :64], w[0])
    with pytest.raises(RuntimeError, match="multiples of 32"):
        kernels.gemv(torch.randn(1, 48), torch.randn(8, 48))
    codes, scales = kernels.nvfp4_i8_order(torch.zeros(8, 256, dtype=torch.uint8), torch.zeros(8, 16, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="chunks of 256"):
        kernels.gemv_nvfp4_i8(torch.randn(1, 512), codes, scales, torch.ones(8, 1))


def test_compiled_calls_run_the_kernels():
    """torch.compile calls the kernels as they are (their shapes come from the fake kernels)."""
    w, x, experts = _inputs(3)
    f = torch.compile(lambda x, e: torch.relu(kernels.gemv(x, w, experts=e)), fullgraph=True)
    _close(f(x, experts), _reference(w, x, experts).relu(), 1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 6, 13])
@pytest.mark.parametrize("k", [256, 400])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_through_int8_products(isa, rows, k, dtype):
    """NVFP4 block-transposed, K padded to 256 (W4A8), on each instruction set: exactly the dequantized
    weight's product on the inputs rounded to int8 per block of 16 (`quantize_blocks`; the AVX2 and
    AVX-512 roundings agree, or a block would be off by a step of its scale, far above 1e-6), and
    within 1% of the unrounded inputs'."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(E, N, k, generator=g), torch.randn(rows, k, generator=g).to(dtype)
    x[0, :16] = 0                                           # a block of zeros: scale 0
    x[-1, 16:32] *= 1e3                                     # blocks of very different sizes
    experts = torch.randint(0, E, (rows,), generator=g)
    packed, block_scales, scale_2 = formats.nvfp4_quantize(w)
    dequantized = formats.nvfp4_dequantize(packed, block_scales, scale_2, torch.float32)
    codes, scales = kernels.nvfp4_i8_order(formats.unpack_fp4(packed), block_scales)
    y = kernels.gemv_nvfp4_i8(x, codes, scales, scale_2.float().expand(E, N, 1).contiguous(), experts, isa=isa)
    assert y.dtype == dtype
    q, s = kernels.quantize_blocks(torch.nn.functional.pad(x, (0, -k % 16)))
    rounded = (q.unflatten(-1, (-1, 16)) * s[..., None]).flatten(-2)[:, :k]
    exact = _reference(dequantized, rounded, experts)
    _close(y.float(), exact, 1e-6 if dtype == torch.float32 else 2 ** -8)
    _close(y.float(), _reference(dequantized, x.float(), experts), 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nvfp4_decode_equals_the_torch_reference(dtype):
    """Prefill's NVFP4 decode on AVX512-BF16 gives `formats.nvfp4_dequantize`'s values bit for bit, for
    one weight and for a stack of experts with a scale_2 each; elsewhere it declines (None)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(E, N, 96, generator=g) * torch.logspace(-4, 1, 96)
    w[0, 0, :16] = 0                                                   # a block of zeros
    packed, block_scales, scale_2 = formats.nvfp4_quantize(w)
    per_expert = torch.tensor([scale_2.item(), scale_2.item() / 3, scale_2.item() * 7])
    for p, s, s2, ref_s2 in [(packed[1], block_scales[1], scale_2, scale_2),
                             (packed, block_scales, per_expert, per_expert[:, None, None])]:
        got = kernels.nvfp4_decode(p, s, s2, dtype)
        if kernels.cpu_isa() != kernels.AVX512_BF16 or not kernels.available():
            assert got is None
            continue
        ref = formats.nvfp4_dequantize(p, s, ref_s2, dtype)
        assert got.dtype == dtype and got.shape == ref.shape
        assert torch.equal(got, ref)
