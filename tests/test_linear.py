"""The model's linear layer: oneDNN for CPU fp32 inference where it is faster, F.linear otherwise."""

import pytest
import torch
import torch.nn.functional as F

from nemotron.layers import linear as L
from nemotron.layers.linear import Linear, linear, use_onednn

onednn = pytest.mark.skipif(not L._ONEDNN, reason="oneDNN is only taken on AVX-512 CPUs")


@pytest.fixture(params=["other", "intel"])
def vendor_rule(request, monkeypatch):
    """Both dispatch rules, whatever this CPU is: each must be right on the CPUs that take it."""
    monkeypatch.setattr(L, "_MKL_AVX512", request.param == "intel")
    return request.param


@onednn
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 64])
def test_onednn_path_matches_f_linear(rows, vendor_rule):
    torch.manual_seed(0)
    w, b = torch.randn(1024, 1024) / 32, torch.randn(1024)
    x = torch.randn(2, rows, 1024)
    with torch.inference_mode():
        # a 4 MB weight takes oneDNN at any row count; on Intel at 4-16 rows (x 2 leading)
        assert use_onednn(x, w) == (vendor_rule == "other" or 4 <= 2 * rows <= 16)
        got = linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert got.shape == (2, rows, 1024)


@onednn
def test_dispatch_rule_intel(monkeypatch):
    """With MKL's AVX-512 kernels, oneDNN only for a weight of >= 2^20 elements at 4-16 rows."""
    monkeypatch.setattr(L, "_MKL_AVX512", True)
    in_proj, big = torch.randn(908, 192), torch.randn(1024, 1024)
    with torch.no_grad():
        assert [use_onednn(torch.randn(r, 1024), big) for r in (1, 2, 4, 16, 17, 256)] == \
            [False, False, True, True, False, False]
        assert not use_onednn(torch.randn(16, 192), in_proj)     # 174k elements: MKL at any row count


@onednn
def test_dispatch_rule(monkeypatch):
    """Elsewhere (MKL without AVX-512): oneDNN from rows x weight elements >= 2^20, and from 16 rows
    unless the weight alone is that large (its ~10 us per call must pay off)."""
    monkeypatch.setattr(L, "_MKL_AVX512", False)
    in_proj, small, big = torch.randn(908, 192), torch.randn(192, 192), torch.randn(1024, 1024)
    with torch.no_grad():
        assert not use_onednn(torch.randn(8, 192), in_proj)     # a tiny model's decode stays on MKL
        assert use_onednn(torch.randn(16, 192), in_proj)        # 16 rows x 174k elements
        assert use_onednn(torch.randn(1, 1024), big)            # a 1M-element weight at any row count
        assert not use_onednn(torch.randn(16, 192), small)      # 16 x 37k
        assert use_onednn(torch.randn(2, 16, 192), small)       # 32 rows, counted over the leading dims
        assert not use_onednn(torch.randn(64, 192).double(), small.double())  # fp32 only
        assert not use_onednn(torch.randn(64, 192).bfloat16(), small.bfloat16())


def test_gradients_take_f_linear():
    layer = Linear(1024, 1024)
    x = torch.randn(32, 1024, requires_grad=True)
    assert not use_onednn(x, layer.weight)
    layer(x).square().sum().backward()
    expected = torch.autograd.grad(F.linear(x, layer.weight, layer.bias).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
    assert layer.weight.grad is not None


def test_linear_is_an_nn_linear_with_the_same_state_dict():
    layer = Linear(8, 4, bias=True)
    plain = torch.nn.Linear(8, 4, bias=True)
    assert isinstance(layer, torch.nn.Linear)
    assert layer.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), plain(x))


@pytest.mark.parametrize("rows", [1, 5, 16, 40])
def test_bf16_products(rows):
    """bf16 decode takes nemotron.kernels' product where it runs (fp32 sums of the bf16 values: the
    reference is F.linear on the same values in fp64, rounded to bf16); larger products F.linear,
    in fp32 on an x86 CPU without bf16 instructions. Either way within bf16's rounding of the output."""
    from nemotron import kernels

    torch.manual_seed(0)
    w, b = (torch.randn(200, 256) / 16).bfloat16(), torch.randn(200).bfloat16()
    x = torch.randn(rows, 256).bfloat16()
    with torch.inference_mode():
        assert L.use_kernel(x, w) == (kernels.available() and rows <= kernels.MAX_ROWS)
        got = linear(x, w, b)
    ref = F.linear(x.double(), w.double(), b.double())
    assert got.dtype == torch.bfloat16
    assert ((got.double() - ref).abs().max() / ref.abs().max()).item() < 2 ** -7
    assert not L.use_kernel(x.requires_grad_(), w)                   # training takes F.linear


@pytest.mark.parametrize("rows", [1, 5, 8, 40])
def test_fp32_products(rows):
    """fp32 decode (up to 15 rows) on AVX-512 takes nemotron.kernels' product (AVX2: torch's); the same
    fp32 sums in another order, so within 1e-5 of F.linear either way."""
    from nemotron import kernels

    torch.manual_seed(0)
    w, b = torch.randn(200, 256) / 16, torch.randn(200)
    x = torch.randn(2, rows, 256)
    with torch.inference_mode():
        assert L.use_kernel(x, w) == (kernels.available() and kernels.cpu_isa() != kernels.AVX2 and 2 * rows < kernels.MAX_ROWS)
        got = linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert not L.use_kernel(x[0, :1], w.requires_grad_())               # training takes F.linear
