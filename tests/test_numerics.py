"""Low-precision numerics follow the official kernel path (mamba_ssm and NVIDIA's remote modeling code)."""

from __future__ import annotations

import pytest
import torch

from nemotron.config.presets import toy_super_config
from nemotron.models.init import init_weights_
from nemotron.layers.norm import GatedRMSNorm, RMSNorm
from nemotron.models import build_model


def _bf16_inputs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(torch.bfloat16)


@pytest.mark.parametrize("rows, dim", [(64, 256), (1, 768), (3, 100)])
def test_rmsnorm_multiplies_weight_in_fp32_and_rounds_once(rows, dim):
    """On a CPU the bf16 kernel runs directly (decode: one row); the bits must be the fp32 formula's."""
    norm = RMSNorm(dim).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(dim, generator=torch.Generator().manual_seed(1)))
    x = _bf16_inputs(rows, dim)
    xf = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    once = (norm.weight.float() * xf).to(torch.bfloat16)
    twice = norm.weight * xf.to(torch.bfloat16)  # Llama's order: round, then multiply in bf16
    out = norm(x)
    assert torch.equal(out, once)
    assert not torch.equal(out, twice)  # the order is observable in bf16


def test_gated_norm_is_fused_fp32():
    norm = GatedRMSNorm(128, groups=4).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(128, generator=torch.Generator().manual_seed(2)))
    y, z = _bf16_inputs(32, 128, seed=3), _bf16_inputs(32, 128, seed=4)
    g = (y.float() * torch.nn.functional.silu(z.float())).view(32, 4, 32)
    g = (g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + 1e-5)).view(32, 128)
    assert torch.equal(norm(y, z), (norm.weight.float() * g).to(torch.bfloat16))


def test_bf16_model_keeps_fp32_state_router_and_dt():
    config = toy_super_config()
    model = init_weights_(build_model(config), config).to(torch.bfloat16).eval()
    moe = model.backbone.layers[1].mixer
    assert moe.gate.e_score_correction_bias.dtype == torch.float32  # .to(bfloat16) leaves it fp32
    x = _bf16_inputs(5, config.hidden_size)
    assert moe.gate.logits(x).dtype == torch.float32
    weights, _ = moe.gate(x)
    assert weights.dtype == torch.float32
    cache = model.new_cache(batch=1, max_len=16)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, cache)
        model(ids[:, :1], cache)
    ssm = cache.layers[0].ssm
    assert ssm.dtype == torch.float32 and ssm.abs().sum() > 0  # mamba_ssm_cache_dtype: float32
    assert cache.layers[0].conv.dtype == torch.bfloat16
    assert cache.layers[3].k.dtype == torch.bfloat16


def test_no_dt_clamp_by_default_but_config_limit_applies():
    config = toy_super_config()
    model = init_weights_(build_model(config), config).eval()
    mixer = model.backbone.layers[0].mixer
    assert mixer.dt_limit == (0.0, float("inf"))
    x = torch.randn(1, 7, config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixer.dt_bias.fill_(-12.0)  # softplus(-12) ~ 6e-6: far below time_step_min
        free = mixer(x)
        mixer.dt_limit = (config.time_step_min, float("inf"))
        clamped = mixer(x)
    assert (free - clamped).abs().max() > 1e-6


@pytest.mark.parametrize("window", [7, 130])
def test_bf16_decode_attention(window):
    """A bf16 one-token query on a CPU attends in fp32 where `BF16_DECODE_IN_FP32` (AMD: torch's bf16
    kernel runs MKL's generic code there): exactly the fp32 kernel on the same values, rounded once,
    and within bf16 rounding of torch's bf16 kernel. Elsewhere it is torch's bf16 kernel itself."""
    import torch.nn.functional as F

    from nemotron.layers import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, t, 32, generator=g).bfloat16() for h, t in ((8, 1), (2, window), (2, window)))
    mask = (torch.arange(window) <= torch.tensor([window - 1, window // 2])[:, None])[:, None, None]
    got = attention.attend(q, k, v, mask, False, True)
    bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    fp32 = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, fp32.bfloat16() if attention.BF16_DECODE_IN_FP32 else bf16)
    torch.testing.assert_close(got.float(), bf16.float(), rtol=2 ** -6, atol=2 ** -6)
