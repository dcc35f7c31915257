"""The Mamba-2 state-space scan (SSD) as pure functions.

For each batch b, head h (using B/C group g = h // (heads/groups)) and step t, with the state
S_t in R^{P x N}:

    S_t = exp(dt_t * A_h) * S_{t-1} + dt_t * x_t (outer) B_t        y_t = S_t C_t

`ssd_step` is that update for one token (decode), `ssd_recurrent` loops it over a sequence (the
test oracle), and `ssd_chunked` computes the same thing in chunks of `chunk_size` with matmuls
(prefill), as mamba_ssm's `mamba_chunk_scan_combined` does. All math is fp32. The D skip, the
gate and the norm are applied by the mixer, outside these functions.

Shapes: x [b, L, h, p]; dt [b, L, h] (after softplus); A [h] (negative); B, C [b, L, g, n];
state [b, h, p, n].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from nemotron.layers.cache import round_into

# Floor for the log-decays fed to exp. Below about -87.3 fp32 exp leaves the normal range, and the
# CPU's exp (and any product it feeds) drops to a microcode slow path 15-30x slower; trained
# checkpoints (large dt*A summed over a chunk) put most intra-chunk decays there. exp(-60) ~ 9e-27
# stands in for anything smaller: invisible beside the diagonal term, which is weighted by exp(0).
LOG_DECAY_FLOOR = -60.0
# exp of the floor, with room for fp32 rounding: decays at or under it get no gradient
_FLOOR_VALUE = math.exp(LOG_DECAY_FLOOR) * (1 + 1e-4)


def _into(shape: tuple[int, ...], op, *args: torch.Tensor) -> torch.Tensor:
    """op(*args) materialised contiguous in `shape`'s layout: written straight there with out= when
    no gradient is recorded (one pass instead of two), computed then made contiguous otherwise
    (out= has no autograd)."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in args):
        return op(*args).contiguous()
    out = torch.empty(shape, dtype=torch.float32, device=args[0].device)
    return op(*args, out=out)


def _decays(a_cum: torch.Tensor) -> torch.Tensor:
    """exp(a_cum_i - a_cum_j) [..., Q, Q], built in place: clamped to [floor, 0] (above the diagonal
    the difference is positive and is zeroed by the causal mask on C.B later)."""
    return (a_cum[..., :, None] - a_cum[..., None, :]).clamp_(LOG_DECAY_FLOOR, 0.0).exp_()


class _DecayedCB(torch.autograd.Function):
    """M = exp(clamp(a_cum_i - a_cum_j)) * CB with a hand-written backward: the largest tensors of the
    scan are touched a few times fewer than autograd's chain of sub/clamp/exp/mul backwards would."""

    @staticmethod
    def forward(ctx, a_cum: torch.Tensor, CB: torch.Tensor) -> torch.Tensor:
        E = _decays(a_cum)
        ctx.save_for_backward(E, CB)
        return E * CB

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        E, CB = ctx.saved_tensors
        grad_CB = (grad * E).sum(2, keepdim=True) if ctx.needs_input_grad[1] else None
        grad_a = None
        if ctx.needs_input_grad[0]:
            # d/d diff of exp(clamp(diff)): E inside (floor, 0]; zero where the floor held it
            g = (grad * CB).mul_(E).masked_fill_(E <= _FLOOR_VALUE, 0.0)
            grad_a = g.sum(-1) - g.sum(-2)
        return grad_a, grad_CB


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor, rounding: str = "nearest",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """One token. x [b, h, p], dt [b, h], B/C [b, g, n]. Updates `state` in place; returns y [b, h, p] fp32.
    A low-precision state is updated in fp32 and rounded once (`rounding`: nearest or stochastic)."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    dt = dt.float()
    decay = torch.exp(dt * A.float()).view(b, g, h // g, 1, 1)
    xdt = (x.float() * dt[..., None]).view(b, g, h // g, p, 1)
    Bg = B.float().view(b, g, 1, 1, n)
    # heads grouped as [g, h/g] so B and C broadcast instead of being repeated per head
    if state.dtype == torch.float32:
        # in place: the state is the largest tensor of a decode step; no temporaries of its size
        new = state.view(b, g, h // g, p, n)
        new.mul_(decay).addcmul_(xdt, Bg)
    else:  # a low-precision state is updated in fp32 and rounded once
        new = state.float().view(b, g, h // g, p, n) * decay + xdt * Bg
        round_into(state, new.view(b, h, p, n), rounding, generator)
    # a dot product over n per (head, p): 3-4x faster on CPU than the broadcast matmul (many tiny GEMVs)
    return torch.linalg.vecdot(new, C.float().view(b, g, 1, 1, n)).view(b, h, p)


def ssd_steps(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              C: torch.Tensor, rounding: str = "nearest",
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A few tokens continuing `state` (speculative verify), with `ssd_step`'s arithmetic token by
    token. x [b, T, h, p], dt [b, T, h], B/C [b, T, g, n]. Returns (y [b, T, h, p] fp32, the state after
    each token [b, T, h, p, n] in the state's dtype); `state` ends as the last. An fp32 state is
    written straight into the history; a low-precision one is rounded after every token, as in decode."""
    b, t, h, p = x.shape
    g, n = B.shape[-2], B.shape[-1]
    history = state.new_empty(b, t, g, h // g, p, n)
    if state.dtype != torch.float32:
        ys = []
        for s in range(t):
            ys.append(ssd_step(state, x[:, s], dt[:, s], A, B[:, s], C[:, s], rounding, generator))
            history[:, s].copy_(state.view(b, g, h // g, p, n))
        return torch.stack(ys, 1), history.view(b, t, h, p, n)
    dt = dt.float()
    decay = torch.exp(dt * A.float()).view(b, t, g, h // g, 1, 1)
    xdt = (x.float() * dt[..., None]).view(b, t, g, h // g, p, 1)
    Bg = B.float().view(b, t, g, 1, 1, n)
    prev = state.view(b, g, h // g, p, n)
    for s in range(t):  # the same two in-place operations per token as ssd_step
        torch.mul(prev, decay[:, s], out=history[:, s])
        prev = history[:, s].addcmul_(xdt[:, s], Bg[:, s])
    state.copy_(prev.view(state.shape))
    y = torch.linalg.vecdot(history, C.float().view(b, t, g, 1, 1, n)).view(b, t, h, p)
    return y, history.view(b, t, h, p, n)


def ssd_recurrent(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  initial_state: torch.Tensor | None = None,
                  seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step reference: returns (y [b, L, h, p] fp32, final state [b, h, p, n] fp32).
    seq_idx [b, L]: packed sequences; the state restarts from zero where the index changes."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    state = torch.zeros(b, h, p, n, dtype=torch.float32, device=x.device) if initial_state is None \
        else initial_state.float().clone()
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            state *= (seq_idx[:, t] == seq_idx[:, t - 1]).view(b, 1, 1, 1)
        ys.append(ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t]))
    return torch.stack(ys, dim=1), state


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int, initial_state: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None,
                state_at: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD: returns (y [b, L, h, p] fp32, final state [b, h, p, n] fp32).

    The sequence is zero-padded to whole chunks and viewed as [b, c, Q, ...]; `ssd_chunks` does the
    work on that layout (so its only free size is the chunk count c). seq_idx [b, L] (non-decreasing
    per row): packed sequences, each starting from a zero state (mamba_ssm's seq_idx); an initial
    state belongs to the first one. state_at: positions (each a multiple of chunk_size, or L) whose
    states to return instead of the final one, [b, len(state_at), h, p, n] fp32: the scan has the
    state at every chunk boundary anyway (the prefix cache keeps them)."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q = chunk_size
    if state_at is not None:
        bad = [s for s in state_at if not (0 < s <= L and (s % Q == 0 or s == L))]
        if bad:
            raise ValueError(f"states are kept at chunk boundaries ({Q}) or the end ({L}), not at {bad}")
    # a sequence within one chunk is padded to a multiple of 16, not to chunk_size: a 32-token prompt's
    # scan did 4x the work in a chunk of 128 (and has no chunk boundary to keep a state at)
    if 0 < L < Q:
        Q = min(Q, -(-L // 16) * 16)
    pad = (-L) % Q
    c = (L + pad) // Q
    if pad:
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
        if seq_idx is not None:  # padding continues the last sequence (and adds nothing to it)
            seq_idx = F.pad(seq_idx, (0, pad), mode="replicate") if seq_idx.shape[1] > 0 else seq_idx
    y, states = ssd_chunks(x.view(b, c, Q, h, p), dt.view(b, c, Q, h), A, B.view(b, c, Q, g, n),
                           C.view(b, c, Q, g, n), initial_state,
                           None if seq_idx is None else seq_idx.view(b, c, Q))
    y = y.reshape(b, c * Q, h, p)[:, :L]
    if state_at is None:
        return y, states[:, -1].contiguous()
    # the padded tail adds nothing (dt = 0: no decay, no input), so the last state is the state at L
    return y, states[:, [-(-s // Q) for s in state_at]].contiguous()


def ssd_chunks(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               initial_state: torch.Tensor | None = None,
               seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SSD over whole chunks: x [b, c, Q, h, p], dt [b, c, Q, h], B/C [b, c, Q, g, n] ->
    (y [b, c, Q, g, h/g, p] fp32, the state at every chunk boundary [b, c+1, h, p, n] fp32: the
    initial one (zeros without `initial_state`), then after each chunk).

    Heads are split as [groups g, heads per group r]. Every contraction within a chunk is a batched
    matmul: C.B is formed once per group (not per head), and the heads of a group share one matmul with B or C by
    laying them side by side ([Q, r*p] matrices), so B and C are never repeated per head. Decays
    within a chunk are exp(cumsum_i - cumsum_j), as mamba_ssm's kernels compute them."""
    b, c, Q, h, p = x.shape
    g, n = B.shape[3], B.shape[4]
    r = h // g
    dt = dt.float()
    a = dt * A.float()                                               # per-step log decay (<= 0)
    # x * dt, written straight into the [b, g, c, Q, r, p] layout the matmuls want
    xg = _into((b, g, c, Q, r, p), torch.mul, x.float().view(b, c, Q, g, r, p).permute(0, 3, 1, 2, 4, 5),
               dt.view(b, c, Q, g, r, 1).permute(0, 3, 1, 2, 4, 5))
    Bc = B.float().permute(0, 3, 1, 2, 4).contiguous()                                 # [b, g, c, Q, n]
    Cc = C.float().permute(0, 3, 1, 2, 4).contiguous()
    a_cum = torch.cumsum(a.view(b, c, Q, g, r).permute(0, 3, 4, 1, 2), dim=-1)        # [b, g, r, c, Q]

    # 1. within each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(a_cum_l - a_cum_s) x_s dt_s
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    # M is the largest temporary: built in place. Above the diagonal the difference is positive;
    # clamping it to 0 keeps exp finite (and fast), and the causal mask is applied to C.B instead,
    # which is per group and so r times smaller.
    if seq_idx is not None:
        # packed sequences: nothing flows between positions of different sequences
        seq = seq_idx[:, None]                                                          # [b, 1, c, Q]
        causal = causal & (seq[..., :, None] == seq[..., None, :])                      # [b, 1, c, Q, Q]
        # the sequence each chunk starts in: that of the position before it (the first: its own)
        before = torch.cat([seq[..., :1, :1], seq[..., :-1, -1:]], dim=-2)              # [b, 1, c, 1]
        keeps_start = seq == before                   # positions that continue the incoming state
        keeps_end = seq == seq[..., -1:]              # positions that reach the chunk's end state
        resets = ~keeps_start[..., -1]                # [b, 1, c]: the incoming state stops in this chunk
    CB = (Cc @ Bc.transpose(-1, -2)).masked_fill_(~causal, 0.0)[:, :, None]
    if torch.is_grad_enabled() and (a_cum.requires_grad or CB.requires_grad):
        M = _DecayedCB.apply(a_cum, CB)                                  # training: a fused backward
    else:
        M = _decays(a_cum).mul_(CB)                                      # [b, g, r, c, Q, Q]
    y_diag = M @ xg.permute(0, 1, 4, 2, 3, 5)                        # [b, g, r, c, Q, p]

    # 2. the state each chunk leaves behind, from its own inputs only: [b, g, c, n, r*p]
    decay_to_end = (a_cum[..., -1:] - a_cum).clamp_(min=LOG_DECAY_FLOOR).exp_().permute(0, 1, 3, 4, 2)  # [b, g, c, Q, r]
    if seq_idx is not None:
        decay_to_end = decay_to_end * keeps_end[..., None]
    chunk_states = Bc.transpose(-1, -2) @ (xg * decay_to_end[..., None]).view(b, g, c, Q, r * p)

    # 3. carry the state across chunks one chunk at a time, as mamba_ssm's state-passing kernel does:
    # S_{j+1} = exp(chunk j's total decay) S_j + chunk j's own state. Sequential (not one matmul over
    # all chunk pairs) so that the state at a chunk boundary, and all that follows it, is the same
    # arithmetic whether the scan started at the sequence start or at that boundary: a prefix-cache
    # block restored there continues bit-identically (prefix_cache.py).
    chunk_states = chunk_states.view(b, g, c, n, r, p).permute(0, 1, 4, 2, 3, 5)       # [b, g, r, c, n, p]
    chunk_decay = a_cum[..., -1].exp()                                 # [b, g, r, c]
    if seq_idx is not None:  # a chunk where a new sequence starts passes nothing of the old state on
        chunk_decay = chunk_decay.masked_fill(resets[:, :, None], 0.0)
    state = (chunk_states.new_zeros(b, g, r, n, p) if initial_state is None
             else initial_state.float().view(b, g, r, p, n).transpose(-1, -2))
    states = [state]
    for j in range(c):
        state = torch.addcmul(chunk_states[:, :, :, j], chunk_decay[..., j, None, None], state)
        states.append(state)
    states = torch.stack(states, dim=3)                                # [b, g, r, c+1, n, p]
    start_states = states[:, :, :, :-1]

    # 4. contribution of the state entering each chunk: C @ [n, r*p] per group, decayed per head
    y_off = Cc @ start_states.permute(0, 1, 3, 4, 2, 5).reshape(b, g, c, n, r * p)    # [b, g, c, Q, r*p]
    start_decay = a_cum.clamp(min=LOG_DECAY_FLOOR).exp_().permute(0, 1, 3, 4, 2)         # [b, g, c, Q, r]
    if seq_idx is not None:
        start_decay = start_decay * keeps_start[..., None]
    y_off = y_off.view(b, g, c, Q, r, p) * start_decay[..., None]

    y = _into((b, c, Q, g, r, p), torch.add, y_off.permute(0, 2, 3, 1, 4, 5), y_diag.permute(0, 3, 4, 1, 2, 5))
    return y, states.permute(0, 3, 1, 2, 5, 4).flatten(2, 3)           # a view [b, c+1, h, p, n]
