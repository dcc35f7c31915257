"""The CPU weight-only kernels of quantized layers (nemotron.quant.cpu): each repack within its stated
rounding, each kernel against the product with the repacked weight, a quantized model's decode
against the dequantizing reference path, and the same checks on the AVX2 code path."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import nemotron
from nemotron.config.presets import toy_super_config
from nemotron.inference.steps import decode_step, prefill
from nemotron.io.random_checkpoint import init_checkpoint
from nemotron.quant import cpu
from nemotron.quant.modules import QuantExperts, QuantLinear
from nemotron.quant.quantize import quantize_model, save_quantized

TEXTS = ["The cat sat on the mat and looked at the birds in the garden.",
         "What is 12 * 7? It is 84, because 10 * 7 = 70 and 2 * 7 = 14."] * 2


def test_int8_repack_rounds_each_weight_by_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.logspace(-2, 0, 48)[:, None]     # rows of very different ranges
    p = cpu.int8_weight(w)
    step = p.scales.float()[:, None]
    assert torch.all((p.weight.float() * step - w).abs() <= step / 2 * (1 + 1e-6))
    assert p.weight.abs().amax(1).eq(127).all()                       # the full range is used per row


def test_int4_repack_rounds_each_weight_by_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(40, 96) * torch.logspace(-2, 0, 96)               # groups of very different ranges
    codes, scale, zero = cpu.int4_codes(w)
    back = (codes - 8) * scale[..., None] + zero[..., None]
    assert torch.all((back.view_as(w) - w).abs() <= (scale[..., None] * 0.5 * 1.02 + 1e-6).expand_as(codes).reshape_as(w))
    assert codes.min() >= 0 and codes.max() <= 15


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_kernel_is_the_product_with_the_repacked_weight(bits, rows):
    """x [.., K] @ the repacked weight, bf16 activations, fp32 accumulation; N not a multiple of 16
    (4-bit pads and slices)."""
    torch.manual_seed(0)
    w, x = torch.randn(40, 96) / 10, torch.randn(2, rows, 96)
    p = cpu.int8_weight(w) if bits == 8 else cpu.int4_weight(w)
    if bits == 8:
        ref_w = p.weight.float() * p.scales.float()[:, None]
    else:
        codes, scale, zero = cpu.int4_codes(w)
        ref_w = ((codes - 8) * scale[..., None] + zero[..., None]).view_as(w)
    ref = x.bfloat16().float() @ ref_w.T
    got = p(x)
    assert got.shape == (2, rows, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)        # the bf16 rounding of the output


def test_int4_needs_groups_of_32():
    assert cpu.int4_weight(torch.randn(32, 48)) is None
    assert cpu.pack(torch.randn(32, 48), nvfp4=True).bits == 8        # NVFP4 with K % 32: int8


def test_kernels_only_for_cpu_inference_at_few_rows():
    x = torch.randn(1, 64)
    with torch.no_grad():
        assert cpu.applies(x)
        assert cpu.applies(torch.randn(2, 8, 64))
        assert not cpu.applies(torch.randn(2, 9, 64))                 # 18 rows: prefill's dequantized GEMM
    assert cpu.applies(x)                                             # nothing records a gradient for x
    assert not cpu.applies(x.requires_grad_())


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("quant_cpu")
    out = {"float": init_checkpoint(base / "float", toy_super_config(), seed=1)}
    for fmt in ("fp8", "nvfp4"):
        loaded = nemotron.load(out["float"])
        cfg, report = quantize_model(loaded, fmt, TEXTS)
        out[fmt] = save_quantized(loaded, cfg, base / fmt, report)
    return out


def _decode_logits(model, steps=(5, 17, 99, 3)) -> torch.Tensor:
    torch.manual_seed(0)
    cache = model.new_cache(1, 40)
    prefill(model, torch.randint(0, 200, (1, 12)), cache)
    return torch.stack([decode_step(model, torch.tensor([t]), cache) for t in steps])


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_with_the_kernels_stays_within_the_formats_own_error(checkpoints, fmt, dtype, monkeypatch):
    """Decode through the repacked kernels differs from the dequantizing reference by less than the
    format itself differs from the float model (measured: FP8 ~0.01 vs 0.03; NVFP4 ~0.10 vs 0.14)."""
    model = nemotron.load(checkpoints[fmt], dtype=dtype).model
    monkeypatch.setattr(cpu, "_ENABLED", False)
    reference = _decode_logits(model)
    assert not any("_cached_packs" in vars(m) for m in model.modules())
    float_model = _decode_logits(nemotron.load(checkpoints["float"], dtype=dtype).model)
    monkeypatch.setattr(cpu, "_ENABLED", True)
    fast = _decode_logits(model)
    packed = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantExperts)) and "_cached_packs" in vars(m)]
    assert any(isinstance(m, QuantExperts) for m in packed) and any(isinstance(m, QuantLinear) for m in packed)
    assert (fast - reference).abs().max() < (reference - float_model).abs().max()
    assert (fast - reference).abs().max() < {"fp8": 0.03, "nvfp4": 0.2}[fmt]


def test_a_changed_weight_or_scale_is_repacked(checkpoints):
    model = nemotron.load(checkpoints["fp8"]).model
    layer = next(m for m in model.modules() if isinstance(m, QuantLinear))
    experts = next(m for m in model.modules() if isinstance(m, QuantExperts))
    x, h = torch.randn(1, layer.in_features), torch.randn(1, experts.up_proj.shape[-1])
    with torch.inference_mode():
        before, up = layer(x), experts.up(h, 0)
    with torch.no_grad():
        layer.weight_scale.mul_(2)                                     # changed in place
        experts.up_proj_weight_scale.mul_(2)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), 2 * before, rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(experts.up(h, 0), 2 * up, rtol=2e-2, atol=1e-3)
    layer.weight = torch.zeros_like(layer.weight)                     # replaced: a new tensor
    with torch.inference_mode():
        assert layer(x).abs().max() == 0 and before.abs().max() > 0


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 code paths")
def test_the_avx2_code_path():
    """This file's kernel tests and the bf16 RMSNorm's bits again with torch's CPU dispatch and oneDNN
    held to AVX2 (the AMD EPYC path), in a process that checks it got it."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "NEMOTRON_EXPECT_CPU": "AVX2"}
    numerics = os.path.join(os.path.dirname(__file__), "test_numerics.py")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, numerics,
                          "-k", "repack or kernel or groups or expected_one or rmsnorm"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
    assert "skipped" not in out.stdout and "deselected" in out.stdout


def test_code_path_is_the_expected_one():
    """Under test_the_avx2_code_path: torch really dispatches to the forced code path."""
    expected = os.environ.get("NEMOTRON_EXPECT_CPU")
    if expected is None:
        pytest.skip("run by test_the_avx2_code_path")
    assert torch.backends.cpu.get_cpu_capability() == expected
