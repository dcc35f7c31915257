"""Unit vectors for the low-precision formats, against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from nemotron.quant.formats import (E2M1_VALUES, e2m1_decode, e2m1_encode, fp8_dequantize, fp8_fake_quantize,
                                    fp8_quantize, mxfp4_dequantize, mxfp4_quantize, nvfp4_dequantize,
                                    nvfp4_fake_quantize, nvfp4_quantize, pack_fp4, to_e4m3, unpack_fp4)

# |x| -> magnitude code: every rounding boundary, both sides of it, and the ties (to the even code)
E2M1_CASES = [
    (0.0, 0), (0.1, 0), (0.25, 0), (0.2500001, 1), (0.5, 1), (0.7499999, 1), (0.75, 2), (1.0, 2),
    (1.25, 2), (1.2500001, 3), (1.5, 3), (1.7499999, 3), (1.75, 4), (2.0, 4), (2.5, 4), (2.5000002, 5),
    (3.0, 5), (3.4999998, 5), (3.5, 6), (4.0, 6), (5.0, 6), (5.0000005, 7), (6.0, 7), (7.0, 7), (1e30, 7),
]


@pytest.mark.parametrize("value,code", E2M1_CASES)
def test_e2m1_rounding_boundaries_and_ties(value, code):
    x = torch.tensor([value, -value], dtype=torch.float32)
    got = e2m1_encode(x).tolist()
    assert got[0] == code
    assert got[1] == (code | 8 if value > 0 else 0)   # the sign bit; -0.0 is not negative
    assert e2m1_decode(torch.tensor([code, code | 8]), torch.float32).tolist() == [E2M1_VALUES[code], -E2M1_VALUES[code]]


def test_e2m1_table_round_trips():
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_decode(codes)
    assert values.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    back = e2m1_encode(values)
    assert [b for i, b in enumerate(back.tolist()) if i != 8] == [c for c in range(16) if c != 8]
    assert back[8] == 0   # -0.0 is not negative: it encodes as +0


def test_nibble_order_even_element_low():
    assert pack_fp4(torch.tensor([1, 2], dtype=torch.uint8)).tolist() == [0x21]
    assert pack_fp4(torch.tensor([[0x7, 0xF, 0x0, 0x9]], dtype=torch.uint8)).tolist() == [[0xF7, 0x90]]
    codes = torch.randint(0, 16, (3, 32), dtype=torch.uint8)
    assert torch.equal(unpack_fp4(pack_fp4(codes)), codes)
    with pytest.raises(ValueError, match="even"):
        pack_fp4(torch.zeros(3, dtype=torch.uint8))


def test_e4m3_saturation_and_underflow():
    x = torch.tensor([448.0, 449.0, 464.0, 1000.0, float("inf"), -1e6, 2.0 ** -9, 2.0 ** -10, 2.0 ** -10 * 1.01,
                      2.0 ** -11, 0.3])
    got = to_e4m3(x).float().tolist()
    # 2^-9 is the smallest subnormal; 2^-10 is the tie between 0 and it (to even: 0); 0.3 -> 0.3125
    assert got == [448.0, 448.0, 448.0, 448.0, 448.0, -448.0, 2.0 ** -9, 0.0, 2.0 ** -9, 0.0, 0.3125]


def test_nvfp4_hand_computed_block():
    # one block whose amax is 6: scale_2 = 6 / 2688, the block scale 448 exactly, so the elements
    # are quantized as themselves
    w = torch.tensor([[6.0, -0.25, 0.75, 1.3, -2.5, 3.5, 5.5, 0.1, 1.75, -4.2, 0.0, 2.9, -6.0, 1.1, 0.6, 3.2]])
    packed, block_scale, scale_2 = nvfp4_quantize(w)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 8)
    assert block_scale.dtype == torch.float8_e4m3fn and block_scale.shape == (1, 1)
    assert scale_2.dtype == torch.float32 and scale_2.shape == ()
    assert float(scale_2) == pytest.approx(6 / 2688, rel=1e-7) and float(block_scale) == 448.0
    want = [6.0, -0.0, 1.0, 1.5, -2.0, 4.0, 6.0, 0.0, 2.0, -4.0, 0.0, 3.0, -6.0, 1.0, 0.5, 3.0]
    assert nvfp4_dequantize(packed, block_scale, scale_2).flatten().tolist() == pytest.approx(want, rel=1e-6)
    assert packed[0, 0] == (0x7 | (0x8 << 4))   # 6 in the low nibble, -0 in the high one


def test_nvfp4_two_level_scales_and_underflow():
    torch.manual_seed(0)
    w = torch.randn(4, 64)
    w[1, 16:32] *= 1e-9          # a block far below the tensor's range: its E4M3 scale underflows
    w[2, :16] = 0.0              # an all-zero block gets scale 1.0
    packed, block_scale, scale_2 = nvfp4_quantize(w)
    assert block_scale.shape == (4, 4)
    assert float(block_scale.float().max()) == 448.0        # the largest block sits at the top of E4M3
    assert float(block_scale[1, 1].float()) == 0.0 and float(block_scale[2, 0].float()) == 1.0
    dq = nvfp4_dequantize(packed, block_scale, scale_2)
    assert torch.all(dq[1, 16:32] == 0) and torch.all(dq[2, :16] == 0)
    err = (dq - w).norm() / w.norm()
    assert 0.05 < err < 0.15                                # ~10% for Gaussian weights


def test_nvfp4_activation_fake_quant():
    # values on the E2M1 grid of a block whose scale comes out exactly representable pass unchanged
    x = torch.tensor([[6.0, -3.0, 1.5, 0.5] * 4])
    input_scale = torch.tensor(6.0 / 2688)
    torch.testing.assert_close(nvfp4_fake_quantize(x, input_scale), x)
    y = torch.randn(8, 32)
    yq = nvfp4_fake_quantize(y, y.abs().amax() / 2688)
    assert 0 < (yq - y).norm() / y.norm() < 0.15


@pytest.mark.parametrize("granularity,scale_shape", [("tensor", ()), ("channel", (256,)), ("block", (2, 3))])
def test_fp8_granularities(granularity, scale_shape):
    torch.manual_seed(0)
    w = torch.randn(256, 384) * torch.linspace(0.1, 4, 256)[:, None]
    q, scale = fp8_quantize(w, granularity)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert scale.dtype == torch.float32 and tuple(scale.shape) == scale_shape
    assert float(q.float().abs().max()) == 448.0
    dq = fp8_dequantize(q, scale)
    assert (dq - w).norm() / w.norm() < 0.03
    if granularity == "block":   # ModelOpt's 4-d block scale layout reads the same
        torch.testing.assert_close(fp8_dequantize(q, scale.reshape(2, 1, 3, 1)), dq)


def test_fp8_blocks_at_ragged_edges():
    """Dimensions that are not multiples of 128 (a Mamba in_proj of 648 rows) get partial edge tiles,
    each scaled by its own amax, as ModelOpt exports them ([ceil(N/128), 1, ceil(K/128), 1])."""
    torch.manual_seed(0)
    w = torch.randn(200, 300)
    w[150:, 260:] *= 50.0                      # the corner tile's own amax
    q, scale = fp8_quantize(w, "block")
    assert tuple(scale.shape) == (2, 3)
    for bi, rows in enumerate((slice(0, 128), slice(128, 200))):
        for bj, cols in enumerate((slice(0, 128), slice(128, 256), slice(256, 300))):
            assert float(scale[bi, bj]) == pytest.approx(float(w[rows, cols].abs().max()) / 448.0, rel=1e-6)
    dq = fp8_dequantize(q, scale.reshape(2, 1, 3, 1))
    assert dq.shape == w.shape and (dq - w).abs().max() <= w.abs().max() / 448.0 * 16


def test_fp8_hand_computed():
    w = torch.tensor([[448.0, -224.0, 1.0, 0.0]])
    q, scale = fp8_quantize(w)
    assert float(scale) == 1.0 and q.float().tolist() == [[448.0, -224.0, 1.0, 0.0]]
    q, scale = fp8_quantize(w * 2)
    assert float(scale) == 2.0 and fp8_dequantize(q, scale).tolist() == [[896.0, -448.0, 2.0, 0.0]]
    x = torch.tensor([1.0, 1.1, 500.0])
    assert fp8_fake_quantize(x, torch.tensor(1.0)).tolist() == [1.0, 1.125, 448.0]


def test_mxfp4_read_and_write():
    # a block with amax 6 has exponent 0 (scale byte 127); values on the grid are exact
    w = torch.tensor([E2M1_VALUES[i % 16] for i in range(32)]).reshape(1, 32)
    blocks, scales = mxfp4_quantize(w)
    assert blocks.shape == (1, 1, 16) and scales.tolist() == [[127]]
    assert mxfp4_dequantize(blocks, scales).tolist() == w.tolist()
    blocks, scales = mxfp4_quantize(w * 8)
    assert scales.tolist() == [[130]] and mxfp4_dequantize(blocks, scales).tolist() == (w * 8).tolist()


def test_e4m3_table_decode_equals_the_cast_on_every_code():
    from nemotron.quant.formats import e4m3_to_float

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    got, want = e4m3_to_float(codes), codes.float()
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and int(torch.isnan(got).sum()) == 2
    assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
    assert torch.equal(torch.signbit(got), torch.signbit(want))   # -0.0 stays negative
