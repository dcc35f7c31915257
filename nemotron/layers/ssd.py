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

import torch
import torch.nn.functional as F


def segsum(a: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T] with out[i, j] = sum_{k=j+1..i} a_k for i >= j and -inf above the diagonal.

    Built from masked cumulative sums rather than differences of a cumsum, which loses precision."""
    t = a.shape[-1]
    a = a[..., None].expand(*a.shape, t)
    below = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=-1)
    out = torch.cumsum(a.masked_fill(~below, 0), dim=-2)
    keep = torch.tril(torch.ones(t, t, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~keep, float("-inf"))


def ssd_step(state: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor,
             B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """One token. x [b, h, p], dt [b, h], B/C [b, g, n]. Updates `state` in place; returns y [b, h, p] fp32."""
    b, h, p = x.shape
    g, n = B.shape[1], B.shape[2]
    dt = dt.float()
    decay = torch.exp(dt * A.float()).view(b, g, h // g, 1, 1)
    xdt = (x.float() * dt[..., None]).view(b, g, h // g, p, 1)
    # heads grouped as [g, h/g] so B and C broadcast instead of being repeated per head
    new = state.float().view(b, g, h // g, p, n) * decay + xdt * B.float().view(b, g, 1, 1, n)
    state.copy_(new.view(b, h, p, n))
    return (new @ C.float().view(b, g, 1, n, 1)).view(b, h, p)


def ssd_recurrent(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Step-by-step reference: returns (y [b, L, h, p] fp32, final state [b, h, p, n] fp32)."""
    b, L, h, p = x.shape
    n = B.shape[-1]
    state = torch.zeros(b, h, p, n, dtype=torch.float32, device=x.device) if initial_state is None \
        else initial_state.float().clone()
    ys = [ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t]) for t in range(L)]
    return torch.stack(ys, dim=1), state


def ssd_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                chunk_size: int, initial_state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD: returns (y [b, L, h, p] fp32, final state [b, h, p, n] fp32).

    Tensors are laid out [b, g, r, c, Q, ...] (groups, heads per group, chunks, positions) so that
    every contraction is a batched matmul on views, C.B is formed once per group rather than per
    head, and decays within a chunk are exp(cumsum_i - cumsum_j), as mamba_ssm's kernels compute them."""
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    Q = chunk_size
    pad = (-L) % Q
    c = (L + pad) // Q

    dt = dt.float()
    xd = x.float() * dt[..., None]                                   # x * dt
    a = dt * A.float()                                               # per-step log decay (<= 0)
    if pad:
        xd = F.pad(xd, (0, 0, 0, 0, 0, pad))
        a = F.pad(a, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    xd = xd.view(b, c, Q, g, r, p).permute(0, 3, 4, 1, 2, 5).contiguous()             # [b, g, r, c, Q, p]
    Bc = B.float().view(b, c, Q, g, n).permute(0, 3, 1, 2, 4).contiguous()[:, :, None]  # [b, g, 1, c, Q, n]
    Cc = C.float().view(b, c, Q, g, n).permute(0, 3, 1, 2, 4).contiguous()[:, :, None]
    a_cum = torch.cumsum(a.view(b, c, Q, g, r).permute(0, 3, 4, 1, 2), dim=-1)        # [b, g, r, c, Q]

    # 1. within each chunk: y_l = sum_{s<=l} (C_l . B_s) exp(a_cum_l - a_cum_s) x_s dt_s
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    M = torch.exp(a_cum[..., :, None] - a_cum[..., None, :]).masked_fill_(~causal, 0.0)
    M.mul_(Cc @ Bc.transpose(-1, -2))                                # [b, g, r, c, Q, Q]
    y = M @ xd                                                       # [b, g, r, c, Q, p]

    # 2. the state each chunk leaves behind, from its own inputs only
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)                # [b, g, r, c, Q]
    chunk_states = (xd * decay_to_end[..., None]).transpose(-1, -2) @ Bc               # [b, g, r, c, p, n]

    # 3. carry states across chunks (the initial state enters as chunk -1)
    init = torch.zeros_like(chunk_states[:, :, :, :1]) if initial_state is None \
        else initial_state.float().view(b, g, r, 1, p, n)
    chunk_states = torch.cat([init, chunk_states], dim=3)            # [b, g, r, c+1, p, n]
    chunk_decay = torch.exp(segsum(F.pad(a_cum[..., -1], (1, 0))))   # [b, g, r, c+1, c+1]
    states = (chunk_decay @ chunk_states.flatten(-2)).view(b, g, r, c + 1, p, n)
    start_states, final_state = states[:, :, :, :-1], states[:, :, :, -1]

    # 4. contribution of the state entering each chunk
    y += (Cc @ start_states.transpose(-1, -2)) * torch.exp(a_cum)[..., None]

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, c * Q, h, p)[:, :L]
    return y, final_state.reshape(b, h, p, n)
