"""Inference-state options: an FP8 (E4M3) attention KV cache with per-layer scales, and a float16 Mamba
SSM state rounded to nearest or stochastically."""

from __future__ import annotations

import pytest
import torch

import nemotron
from nemotron.layers.cache import CacheOptions, KVState, stochastic_round
from nemotron.inference.steps import greedy_generate
from nemotron.config.presets import toy_super_config
from nemotron.io.random_checkpoint import init_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return init_checkpoint(tmp_path_factory.mktemp("cache") / "ckpt", toy_super_config(), seed=3)


def test_stochastic_rounding_picks_a_neighbour_without_bias():
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 1.0 + 2.0 ** -12)          # a quarter of the way from 1 to the next fp16
    r = stochastic_round(x, torch.float16, g)
    up = 1.0 + 2.0 ** -10
    assert set(r.float().unique().tolist()) == {1.0, up}
    assert abs(float((r.float() == up).float().mean()) - 0.25) < 0.01    # odds by distance
    assert abs(float(r.double().mean()) - float(x[0])) < 2e-6             # unbiased (nearest would give 1.0)
    exact = torch.tensor([0.5, -3.0, 1024.0, 0.0])
    assert torch.equal(stochastic_round(exact, torch.float16, g).float(), exact)
    neg = stochastic_round(torch.full((50_000,), -(1.0 + 2.0 ** -11)), torch.float16, g).double().mean()
    assert abs(float(neg) + 1.0 + 2.0 ** -11) < 4e-6
    same = [stochastic_round(x[:100], torch.float16, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(same[0], same[1])


def test_fp8_kv_state_stores_scaled_e4m3_and_returns_dequantized():
    kv = KVState.empty(1, 2, 8, 4, torch.float8_e4m3fn, "cpu", k_scale=2.0, v_scale=0.5)
    k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    keys, values = kv.update(k, v, [0])
    assert kv.k.dtype == torch.float8_e4m3fn and kv.k.element_size() == 1
    torch.testing.assert_close(keys, (k / 2.0).to(torch.float8_e4m3fn).float() * 2.0)
    torch.testing.assert_close(values, (v / 0.5).to(torch.float8_e4m3fn).float() * 0.5)
    assert keys.dtype == torch.float32 and (keys - k).abs().max() < 0.15


def test_nvfp4_kv_state_stores_packed_blocks_and_returns_dequantized():
    """Each head vector is kept as E2M1 codes plus E4M3 scales of its 16-element blocks (4.5 bits a
    value), with the checkpoint's scale / 6 as the global scale; written by slice and by scatter."""
    from nemotron.quant.formats import nvfp4_fake_quantize

    kv = KVState.empty(2, 2, 8, 32, torch.uint8, "cpu", k_scale=3.0 / 6, v_scale=0.5 / 6)
    assert kv.k.shape == (2, 2, 8, 16 + 2) and kv.bytes_per_token == 2 * 2 * 18
    k, v = torch.randn(2, 2, 3, 32) * 2, torch.randn(2, 2, 3, 32) * 0.2
    keys, values = kv.update(k, v, [0, 0])
    torch.testing.assert_close(keys, nvfp4_fake_quantize(k, torch.tensor(3.0 / 6)))
    torch.testing.assert_close(values, nvfp4_fake_quantize(v, torch.tensor(0.5 / 6)))
    assert 0 < (keys - k).abs().max() < 0.2 * k.abs().max()
    k2 = torch.randn(2, 2, 1, 32)
    keys, _ = kv.update_static(k2, k2, torch.tensor([3, 5]))
    torch.testing.assert_close(keys[0, :, 3:4], nvfp4_fake_quantize(k2[0:1], torch.tensor(3.0 / 6))[0])
    torch.testing.assert_close(keys[1, :, 5:6], nvfp4_fake_quantize(k2[1:2], torch.tensor(3.0 / 6))[0])
    kv.copy_row(0, 1)
    assert torch.equal(kv.k[1], kv.k[0])
    with pytest.raises(ValueError, match="divisible by 16"):
        KVState.empty(1, 1, 4, 24, torch.uint8, "cpu")


@pytest.mark.parametrize("kv_dtype, storage, bytes_of_64, tol", [
    ("fp8", torch.float8_e4m3fn, 16, 0.05),   # a byte a value against fp32's four
    ("nvfp4", torch.uint8, 9, 0.25),          # 4.5 bits a value
])
def test_low_precision_kv_cache_decodes_close_to_the_full_precision_cache(ckpt, kv_dtype, storage, bytes_of_64, tol):
    plain = nemotron.load(ckpt)
    low = nemotron.load(ckpt, cache=CacheOptions(kv_dtype=kv_dtype))
    ids, step = torch.randint(5, 300, (1, 24)), torch.tensor([[7]])
    with torch.inference_mode():
        c_plain, c_low = plain.new_cache(1, 64), low.new_cache(1, 64)
        assert {s.k.dtype for s in c_low.layers if isinstance(s, KVState)} == {storage}
        assert c_low.kv_bytes_per_token * 64 == c_plain.kv_bytes_per_token * bytes_of_64
        outs = [(plain.model(ids, c_plain), low.model(ids, c_low)),     # attention reads the stored keys and values
                (plain.model(step, c_plain), low.model(step, c_low))]   # ... and so does the next step
    for a, b in outs:
        assert 0 < (a - b).abs().max() < tol * a.abs().max()


def test_kv_scales_come_from_a_quantized_checkpoint(ckpt, tmp_path):
    from nemotron.quant.quantize import quantize_model, save_quantized

    loaded = nemotron.load(ckpt)
    cfg, report = quantize_model(loaded, "fp8", ["Some calibration text with numbers 1 2 3."] * 4, kv_cache=True)
    out = save_quantized(loaded, cfg, tmp_path / "fp8kv", report)
    m = nemotron.load(out, cache=CacheOptions(kv_dtype="fp8"))
    attn = m.model.backbone.layers[3].mixer
    state = m.new_cache(1, 16).layers[3]
    assert state.k_scale == float(attn.k_proj.k_scale) >= 1.0 and state.v_scale == float(attn.v_proj.v_scale)


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_float16_ssm_state(ckpt, rounding):
    ref = nemotron.load(ckpt)
    low = nemotron.load(ckpt, cache=CacheOptions(ssm_dtype="float16", ssm_rounding=rounding, seed=1))
    cache = low.new_cache(1, 96)
    assert cache.layers[0].ssm.dtype == torch.float16
    prompt = torch.randint(5, 300, (1, 16))
    with torch.inference_mode():
        want = greedy_generate(ref.model, prompt, 40)
        c_ref, c_low = ref.new_cache(1, 96), low.new_cache(1, 96)
        ref.model(want[:, :-1], c_ref)
        low.model(want[:, :-1], c_low)
    # the state after 55 tokens stays within fp16's precision of the fp32 one
    s_ref, s_low = c_ref.layers[0].ssm, c_low.layers[0].ssm.float()
    assert (s_low - s_ref).abs().max() <= 2e-3 * s_ref.abs().max()
    if rounding == "stochastic":   # a different seed rounds differently; the same seed the same
        other = nemotron.load(ckpt, cache=CacheOptions(ssm_dtype="float16", ssm_rounding="stochastic", seed=2))
        again = nemotron.load(ckpt, cache=CacheOptions(ssm_dtype="float16", ssm_rounding="stochastic", seed=1))
        states = []
        for m in (other, again):
            c = m.new_cache(1, 96)
            with torch.inference_mode():
                m.model(want[:, :-1], c)
            states.append(c.layers[0].ssm)
        assert not torch.equal(states[0], c_low.layers[0].ssm) and torch.equal(states[1], c_low.layers[0].ssm)


def test_cache_options_are_validated():
    with pytest.raises(ValueError, match="fp8"):
        CacheOptions(kv_dtype="int4")
    with pytest.raises(ValueError, match="stochastic"):
        CacheOptions(ssm_rounding="up")
