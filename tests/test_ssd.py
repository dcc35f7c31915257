"""The chunked SSD scan against the step-by-step recurrence, and the router as a pure function."""

from __future__ import annotations

import pytest
import torch

from nemotron.layers.moe import route
from nemotron.layers.ssd import ssd_chunked, ssd_recurrent, ssd_step, ssd_steps


def _inputs(b, L, h, p, g, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, h, p, generator=gen)
    dt = torch.nn.functional.softplus(torch.randn(b, L, h, generator=gen) - 1.0)
    A = -torch.exp(torch.rand(h, generator=gen) * 2 - 0.5)
    B = torch.randn(b, L, g, n, generator=gen)
    C = torch.randn(b, L, g, n, generator=gen)
    s0 = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, s0


@pytest.mark.parametrize("L,chunk", [(16, 8), (13, 8), (5, 8), (1, 4), (37, 16), (64, 64), (30, 7)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_chunked_equals_recurrent(L, chunk, with_state, groups):
    x, dt, A, B, C, s0 = _inputs(2, L, 4, 3, groups, 5)
    init = s0 if with_state else None
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, init)
    y, s = ssd_chunked(x, dt, A, B, C, chunk, init)
    assert (y - y_ref).abs().max() <= 1e-5 * max(1.0, y_ref.abs().max().item())
    assert (s - s_ref).abs().max() <= 1e-5 * max(1.0, s_ref.abs().max().item())


def test_chunked_scan_with_steep_decays_equals_recurrent():
    """Trained checkpoints drive intra-chunk log-decays far below fp32 exp's range (floored in the
    chunked scan for speed); the result must still be the recurrence's."""
    x, dt, A, B, C, s0 = _inputs(1, 64, 4, 3, 2, 5, seed=2)
    dt = dt * 20 + 0.5                                   # per-step decays of -1 .. -30: chunk sums to -1000s
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, s0)
    y, s = ssd_chunked(x, dt, A, B, C, 32, s0)
    assert torch.isfinite(y).all()
    assert (y - y_ref).abs().max() <= 1e-5 * max(1.0, y_ref.abs().max().item())
    assert (s - s_ref).abs().max() <= 1e-5 * max(1.0, s_ref.abs().max().item())


def test_chunked_scan_continues_from_its_own_final_state():
    x, dt, A, B, C, _ = _inputs(1, 29, 4, 3, 2, 5, seed=1)
    y_all, s_all = ssd_chunked(x, dt, A, B, C, 8)
    y1, s1 = ssd_chunked(x[:, :11], dt[:, :11], A, B[:, :11], C[:, :11], 8)
    y2, s2 = ssd_chunked(x[:, 11:], dt[:, 11:], A, B[:, 11:], C[:, 11:], 8, initial_state=s1)
    assert torch.allclose(torch.cat([y1, y2], 1), y_all, atol=1e-5)
    assert torch.allclose(s2, s_all, atol=1e-5)


def test_router_bias_selects_but_does_not_weight():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])  # pushes expert 3 into the top-2
    w, idx = route(logits, bias, top_k=2, norm_topk_prob=False, scaling_factor=1.0)
    chosen = dict(zip(idx[0].tolist(), w[0].tolist()))
    assert set(chosen) == {0, 3}
    assert chosen[3] == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item())  # raw score, no bias
    w, idx = route(logits, bias, top_k=2, norm_topk_prob=True, scaling_factor=2.5)
    assert w.sum().item() == pytest.approx(2.5)


def test_router_group_limited_selection():
    # 4 groups of 2 experts; keep the best 2 groups (by the sum of their top-2 scores)
    logits = torch.tensor([[3.0, -3.0, 0.5, 0.5, 2.9, -5.0, 1.0, 1.0]])
    w, idx = route(logits, torch.zeros(8), top_k=3, n_group=4, topk_group=2)
    # group sums: g0 = s(3)+s(-3) ~ 1.0, g1 = 2*s(.5) ~ 1.25, g2 ~ 0.95, g3 = 2*s(1) ~ 1.46 -> g1, g3
    assert set(idx[0].tolist()) <= {2, 3, 6, 7} and len(set(idx[0].tolist())) == 3


def test_expert_kernels_agree():
    """The per-expert loop, torch._grouped_mm (default on CUDA) and the single-token path (default
    for CPU decode) compute the same thing."""
    from nemotron.layers.moe import Experts

    experts = Experts(num_experts=8, dim=32, intermediate_size=64)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.up_proj.copy_(torch.randn(experts.up_proj.shape, generator=g) * 0.2)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g) * 0.2)
        x = torch.randn(50, 32, generator=g)
        weights, idx = route(torch.randn(50, 8, generator=g), torch.zeros(8), top_k=3)
        assert experts.grouped_mm_ok(x)
        loop = experts(x, idx, weights, method="loop")
        grouped = experts(x, idx, weights, method="grouped")
        single = torch.cat([experts(x[i:i + 1], idx[i:i + 1], weights[i:i + 1], method="single")
                            for i in range(50)])
    assert (loop - grouped).abs().max() <= 1e-5
    assert (loop - single).abs().max() <= 1e-5
    # and both equal the definition, token by token
    ref = torch.stack([sum(w * torch.relu(experts.up_proj[e] @ x[t]).square() @ experts.down_proj[e].T
                           for w, e in zip(weights[t], idx[t])) for t in range(50)])
    assert (loop - ref).abs().max() <= 1e-4


def test_chunked_scan_gradients_equal_recurrent():
    """The scan is differentiable (training) and its gradients are those of the recurrence, here
    written out of place (ssd_step updates its state in place, for decode)."""
    inputs = [t.requires_grad_() for t in _inputs(1, 21, 4, 3, 2, 5, seed=3)]
    x, dt, A, B, C, s0 = inputs

    def recurrence():
        state, ys = s0, []
        r = x.shape[2] // B.shape[2]
        for t in range(x.shape[1]):
            Bt, Ct = B[:, t].repeat_interleave(r, 1), C[:, t].repeat_interleave(r, 1)    # [b, h, n]
            decay = torch.exp(dt[:, t] * A)[..., None, None]
            state = state * decay + (x[:, t] * dt[:, t, :, None])[..., None] * Bt[:, :, None, :]
            ys.append((state * Ct[:, :, None, :]).sum(-1))
        return torch.stack(ys, 1), state

    grads = []
    for scan in (recurrence, lambda: ssd_chunked(x, dt, A, B, C, 8, s0)):
        y, s = scan()
        (y.square().sum() + s.sum()).backward()
        grads.append([t.grad.clone() for t in inputs])
        for t in inputs:
            t.grad = None
    for ref, got in zip(*grads):
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("L,chunk,bounds", [(40, 8, [5, 6, 16, 30]), (37, 16, [16, 17]), (12, 4, [1, 2, 3, 11]),
                                            (20, 8, [])])
def test_packed_sequences_restart_from_zero(L, chunk, bounds):
    """seq_idx: the chunked scan over packed sequences equals the recurrence with resets and each
    sequence run on its own, boundaries at and inside chunk edges, one-token sequences included."""
    x, dt, A, B, C, s0 = _inputs(2, L, 4, 3, 2, 5, seed=4)
    seq = torch.zeros(2, L, dtype=torch.long)
    for i in bounds:
        seq[0, i:] += 1
    seq[1, L // 2:] = 1
    y_ref, s_ref = ssd_recurrent(x, dt, A, B, C, s0, seq_idx=seq)
    y, s = ssd_chunked(x, dt, A, B, C, chunk, s0, seq_idx=seq)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(s, s_ref, atol=1e-5)
    starts = [0] + bounds + [L]
    for k, (a, e) in enumerate(zip(starts[:-1], starts[1:])):
        alone, _ = ssd_chunked(x[:1, a:e], dt[:1, a:e], A, B[:1, a:e], C[:1, a:e], chunk, s0[:1] if k == 0 else None)
        assert torch.allclose(y[:1, a:e], alone, atol=1e-5)


@pytest.mark.parametrize("t,groups", [(1, 1), (2, 2), (4, 2)])
def test_ssd_steps_is_ssd_step_token_by_token(t, groups):
    """The verify's multi-token update does ssd_step's arithmetic: the same bits, and the state after
    every token."""
    x, dt, A, B, C, s0 = _inputs(2, t, 4, 8, groups, 16)
    state, ys, states = s0.clone(), [], []
    for i in range(t):
        ys.append(ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i]))
        states.append(state.clone())
    multi = s0.clone()
    y, history = ssd_steps(multi, x, dt, A, B, C)
    assert torch.equal(y, torch.stack(ys, 1))
    assert torch.equal(history, torch.stack(states, 1))
    assert torch.equal(multi, state)


def test_ssd_steps_rounds_a_low_precision_state_after_every_token():
    x, dt, A, B, C, s0 = _inputs(2, 3, 4, 8, 2, 16)
    state, ys, states = s0.half(), [], []
    for i in range(3):
        ys.append(ssd_step(state, x[:, i], dt[:, i], A, B[:, i], C[:, i]))
        states.append(state.clone())
    multi = s0.half()
    y, history = ssd_steps(multi, x, dt, A, B, C)
    assert history.dtype == torch.float16
    assert torch.equal(y, torch.stack(ys, 1)) and torch.equal(history, torch.stack(states, 1))
    assert torch.equal(multi, state)


def test_mamba_verify_equals_steps_and_rolls_back_to_any_token():
    """The speculative verify of T tokens gives the outputs of T single-token steps, and rolling back
    to n of them leaves the conv and SSM state that n steps leave."""
    from nemotron.layers.cache import MambaState
    from nemotron.layers.mamba2 import Mamba2Mixer

    torch.manual_seed(0)
    mixer = Mamba2Mixer(hidden_size=32, num_heads=4, head_dim=8, state_size=16, n_groups=2, chunk_size=8)
    with torch.no_grad():
        mixer.conv1d.weight.normal_()
        mixer.dt_bias.normal_()
    b, t = 2, 3
    prompt, new = torch.randn(b, 5, 32), torch.randn(b, t, 32)

    def primed() -> MambaState:
        s = mixer.new_state(b, torch.float32, torch.float32, "cpu")
        mixer(prompt, s, pos=[0] * b)
        return s

    with torch.inference_mode():
        stepped, after = primed(), []
        outs = []
        for i in range(t):
            outs.append(mixer(new[:, i:i + 1], stepped, pos=[5 + i] * b))
            after.append((stepped.conv.clone(), stepped.ssm.clone()))
        for keep in ([1, 3], [2, 2], [3, 1]):
            s = primed()
            y = mixer(new, s, pos=[5] * b, mode="verify")
            torch.testing.assert_close(y, torch.cat(outs, 1), rtol=1e-5, atol=1e-6)
            s.rollback(keep)
            for row, n in enumerate(keep):
                torch.testing.assert_close(s.conv[row], after[n - 1][0][row])
                torch.testing.assert_close(s.ssm[row], after[n - 1][1][row], rtol=1e-5, atol=1e-6)
