"""The fused Mamba-2 decode step (`kernels.mamba_step`, mamba_step.cpp) against its torch oracle
(`Mamba2Mixer.reference_step`), on every instruction set this CPU runs: fp32 and bf16 models, bf16
conv states, a batch of rows, conv kernels of 2-5 taps (the specialised 2-4 and the general loop),
state sizes that leave a vector tail, a dt limit, no conv bias; and that decoding takes it."""

from __future__ import annotations

import copy

import pytest
import torch

from nemotron import kernels
from nemotron.layers.mamba2 import Mamba2Mixer

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the CPU kernels do not run here")

ISAS = [] if kernels.cpu_isa() is None else sorted({kernels.AVX2, min(kernels.cpu_isa(), kernels.AVX512)})


def _mixer(dtype: torch.dtype, conv_kernel: int = 4, state_size: int = 48, groups: int = 2,
           dt_limit=(0.0, float("inf")), conv_bias: bool = True) -> Mamba2Mixer:
    torch.manual_seed(0)
    m = Mamba2Mixer(64, 8, 16, state_size, groups, conv_kernel=conv_kernel, conv_bias=conv_bias, dt_limit=dt_limit)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        m.A_log.copy_(torch.rand(8) * 2 - 1)
    return m.to(dtype)


def _fused(m: Mamba2Mixer, x: torch.Tensor, state, isa: int) -> torch.Tensor:
    return m.out_proj(kernels.mamba_step(m.in_proj(x[:, 0]), state.conv, state.ssm, m.conv1d.weight, m.conv1d.bias,
                                         m.dt_bias, m.A_log, m.D, m.norm.weight, m.n_groups, m.norm.groups,
                                         m.dt_limit, m.norm.eps, isa=isa))[:, None]


def _compare(m: Mamba2Mixer, dtype: torch.dtype, conv_dtype: torch.dtype, isa: int, rows: int = 3, steps: int = 4):
    state = m.new_state(rows, conv_dtype, torch.float32, "cpu")
    state.conv.normal_()
    state.ssm.normal_()
    ref_state = copy.deepcopy(state)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7
    with torch.no_grad():
        for step in range(steps):   # the states carry over: the conv window shifts, the SSM state decays
            x = torch.randn(rows, 1, 64).to(dtype)
            want = m.reference_step(x, ref_state)
            got = _fused(m, x, state, isa)
            assert got.dtype == want.dtype and got.shape == want.shape
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            assert err <= tol, (step, err)
            assert torch.equal(state.conv, ref_state.conv)
            torch.testing.assert_close(state.ssm, ref_state.ssm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype,conv_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float32, torch.bfloat16)])
def test_fused_step_equals_the_reference(isa, dtype, conv_dtype):
    _compare(_mixer(dtype), dtype, conv_dtype, isa)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("conv_kernel", [2, 3, 5])
def test_conv_kernels_of_other_widths(isa, conv_kernel):
    _compare(_mixer(torch.float32, conv_kernel=conv_kernel, state_size=16, groups=1, conv_bias=False),
             torch.float32, torch.float32, isa, rows=1)


@pytest.mark.parametrize("isa", ISAS)
def test_dt_limit(isa):
    _compare(_mixer(torch.float32, dt_limit=(0.05, 0.5)), torch.float32, torch.float32, isa)


def test_decoding_takes_the_kernel_and_agrees():
    """`step` takes the kernel on this CPU (fp32 SSM state) and gives the reference's output; a
    low-precision SSM state keeps the torch path and its own rounding."""
    m = _mixer(torch.float32)
    x = torch.randn(2, 1, 64)
    state = m.new_state(2, torch.float32, torch.float32, "cpu")
    assert kernels.fuses_mamba_step(x, state.conv, state.ssm)
    ref = copy.deepcopy(state)
    with torch.no_grad():
        torch.testing.assert_close(m.step(x, state), m.reference_step(x, ref), rtol=1e-5, atol=1e-5)
    low = m.new_state(2, torch.float32, torch.bfloat16, "cpu")
    assert not kernels.fuses_mamba_step(x, low.conv, low.ssm)
