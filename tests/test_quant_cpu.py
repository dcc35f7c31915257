"""Quantized layers' CPU decode through nemotron.kernels (nemotron.quant.cpu): each stored format put
in the kernels' layout and multiplied as the dequantized weight is, a quantized model's decode
against the dequantizing reference path, and the same checks on the AVX2 code path."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

import nemotron
from nemotron import kernels
from nemotron.config.presets import toy_super_config
from nemotron.inference.steps import decode_step, prefill
from nemotron.io.random_checkpoint import init_checkpoint
from nemotron.quant import cpu
from nemotron.quant.modules import QuantExperts, QuantLinear, QuantScheme
from nemotron.quant.quantize import quantize_model, save_quantized

TEXTS = ["The cat sat on the mat and looked at the birds in the garden.",
         "What is 12 * 7? It is 84, because 10 * 7 = 70 and 2 * 7 = 14."] * 2
needs_kernels = pytest.mark.skipif(not kernels.available(), reason="the CPU kernels do not run here")


@needs_kernels
@pytest.mark.parametrize("algo", ["NVFP4", "W4A16_NVFP4", "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO"])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_a_packed_layer_multiplies_as_its_dequantized_weight(algo, rows):
    """FP8: exactly (up to the order of fp32 sums), except on AVX512-BF16, where its activations are
    rounded to bf16 (and E4M3 subnormals read as 0): within bf16's rounding. NVFP4 (activations
    rounded to int8 per block of 16): within 1%. N = 200 (not a multiple of the 4-row tiles), K = 384
    (three 128-column blocks)."""
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(torch.nn.Linear(384, 200, bias=False), QuantScheme(algo), torch.tensor(4.0))
    x = torch.randn(2, rows, 384) if rows > 1 else torch.randn(1, 384)
    with torch.inference_mode():
        packed = layer._packed()
        got = layer(x)
    ref = x.double() @ layer.dequantized_weight().double().T
    bf16 = kernels.cpu_isa() == kernels.AVX512_BF16
    assert packed.kind == ("nvfp4_i8" if "NVFP4" in algo else "fp8_bf16" if bf16 else "fp8")
    assert got.shape == ref.shape and got.dtype == torch.float32
    err = ((got - ref).abs().max() / ref.abs().max()).item()
    assert err <= ({"nvfp4_i8": 1e-2, "fp8_bf16": 2 ** -8}.get(packed.kind, 1e-6)), err


def test_formats_the_kernels_cannot_split_decode_their_weight():
    """FP8 with K not a multiple of 32 (nor of its 128-column blocks): no pack; the dequantizing path.
    (NVFP4 pads K to 256 columns: any K.)"""
    for algo, k in [("FP8", 48), ("FP8_PB_WO", 192)]:
        layer = QuantLinear.from_linear(torch.nn.Linear(k, 8, bias=False), QuantScheme(algo), torch.tensor(4.0))
        with torch.inference_mode():
            assert layer._packed() is None
            torch.testing.assert_close(layer(torch.ones(1, k)), torch.ones(1, k) @ layer.dequantized_weight().T)


def test_kernels_only_for_cpu_inference_at_few_rows():
    if not kernels.available():
        assert not cpu.applies(torch.randn(1, 64))
        return
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
@needs_kernels
def test_decode_through_the_kernels_matches_the_dequantizing_path(checkpoints, fmt, dtype, monkeypatch):
    """A quantized model's decode through the kernels against the dequantizing reference: without
    AVX512-BF16, an fp32 model's FP8 logits up to summation order; with it (bf16 activations), for
    NVFP4 (int8 activations), and for a bf16 model (its own rounding between layers), far inside the
    format's own error."""
    model = nemotron.load(checkpoints[fmt], dtype=dtype).model
    monkeypatch.setattr(kernels, "_ENABLED", False)
    reference = _decode_logits(model)
    assert not any("_cached_packs" in vars(m) for m in model.modules())
    float_model = _decode_logits(nemotron.load(checkpoints["float"], dtype=dtype).model)
    monkeypatch.setattr(kernels, "_ENABLED", True)
    fast = _decode_logits(model)
    packed = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantExperts)) and "_cached_packs" in vars(m)]
    assert any(isinstance(m, QuantExperts) for m in packed) and any(isinstance(m, QuantLinear) for m in packed)
    diff, format_error = (fast - reference).abs().max().item(), (reference - float_model).abs().max().item()
    if dtype == "float32" and fmt == "fp8" and kernels.cpu_isa() != kernels.AVX512_BF16:
        assert diff < 1e-4, diff
    else:
        assert diff < format_error / 4, (diff, format_error)


@needs_kernels
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
    """This file's kernel tests, the kernels' own and the bf16 RMSNorm's bits again with torch's CPU
    dispatch, oneDNN and nemotron.kernels held to AVX2 (the AMD EPYC path), in a process that checks
    it got it."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "NEMOTRON_EXPECT_CPU": "AVX2"}
    here = os.path.dirname(__file__)
    files = [__file__, os.path.join(here, "test_numerics.py"), os.path.join(here, "test_cpu_kernels.py")]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files, "-k",
                          "multiplies_as or decode_their or few_rows or expected_one or rmsnorm or weights or int8_products or refused"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and " passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
    assert "skipped" not in out.stdout and "deselected" in out.stdout


def test_code_path_is_the_expected_one():
    """Under test_the_avx2_code_path: torch really dispatches to the forced code path."""
    expected = os.environ.get("NEMOTRON_EXPECT_CPU")
    if expected is None:
        pytest.skip("run by test_the_avx2_code_path")
    assert torch.backends.cpu.get_cpu_capability() == expected
    assert kernels.cpu_isa() in (None, kernels.AVX2)
