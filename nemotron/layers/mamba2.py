"""The Mamba-2 mixer of Nemotron-H: in_proj -> causal depthwise conv + SiLU -> SSD scan -> gated
grouped RMSNorm -> out_proj. Numerics follow the mamba_ssm kernel path: conv, dt, decay and state in
fp32, no dt clamp unless the config sets a limit, scan output rounded to the model dtype before the
fused gated norm."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nemotron import kernels
from nemotron.layers.cache import CacheMode, MambaState, StateCapture
from nemotron.layers.linear import Linear
from nemotron.layers.norm import GatedRMSNorm
from nemotron.layers.ssd import ssd_chunked, ssd_step, ssd_steps


def _f32(t: torch.Tensor) -> torch.Tensor:
    """fp32 view of t without a dispatch when it already is (decode runs these per token)."""
    return t if t.dtype == torch.float32 else t.float()


class Mamba2Mixer(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        state_size: int,
        n_groups: int,
        conv_kernel: int = 4,
        chunk_size: int = 128,
        conv_bias: bool = True,
        proj_bias: bool = False,
        eps: float = 1e-5,
        dt_limit: tuple[float, float] = (0.0, math.inf),
    ) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.state_size, self.n_groups = num_heads, head_dim, state_size, n_groups
        self.conv_kernel, self.chunk_size = conv_kernel, chunk_size
        self.inner = num_heads * head_dim
        self.conv_dim = self.inner + 2 * n_groups * state_size
        self.dt_limit = tuple(dt_limit)
        self.in_proj = Linear(hidden_size, self.inner + self.conv_dim + num_heads, bias=proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_kernel, groups=self.conv_dim, bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(num_heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, num_heads + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(num_heads))
        self.norm = GatedRMSNorm(self.inner, groups=n_groups, eps=eps)
        self.out_proj = Linear(self.inner, hidden_size, bias=proj_bias)

    def _conv(self, xBC: torch.Tensor, state: MambaState | None, fresh: bool = False,
              seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """Causal depthwise conv + SiLU in fp32 over [b, T, conv_dim], continuing (and updating) the
        conv state when one is given (`fresh`: every row starts a sequence, so the state is only
        written). Done as K shifted multiply-adds in the [b, T, channels] layout (no transposes, no
        padded copy; the state's K-1 columns only touch the first outputs)."""
        k = self.conv_kernel
        b, t, _ = xBC.shape
        x = _f32(xBC)
        weight = _f32(self.conv1d.weight)[:, 0]                                       # [c, K]
        out = x * weight[:, k - 1]
        for s in range(1, min(k, t + 1)):  # tap k-1-s reads the input s steps back
            if s < t:
                back = x[:, :t - s]
                if seq_idx is not None:  # packed sequences: no tap reaches into the previous one
                    back = back * (seq_idx[:, s:] == seq_idx[:, :t - s])[..., None]
                out[:, s:].addcmul_(back, weight[:, k - 1 - s])
        if state is not None:
            if not fresh:
                prefix = _f32(state.conv).transpose(1, 2)                             # [b, K-1, c]
                for s in range(1, k):  # outputs 0..s-1 reach back into the previous tokens
                    n = min(s, t)
                    out[:, :n].addcmul_(prefix[:, k - 1 - s:k - 1 - s + n], weight[:, k - 1 - s])
            else:
                state.conv.zero_()  # a new sequence: the inputs before its first token are zeros
            if t < k - 1:
                full = torch.cat([state.conv.transpose(1, 2), xBC.to(state.conv.dtype)], dim=1)
                state.conv.copy_(full[:, full.shape[1] - (k - 1):].transpose(1, 2))
            else:
                state.conv.copy_(xBC[:, t - (k - 1):].transpose(1, 2))
        if self.conv1d.bias is not None:
            out += _f32(self.conv1d.bias)
        return F.silu(out, inplace=True).to(xBC.dtype)

    def _discretize(self, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 dt = softplus(dt + dt_bias), clamped only when the config sets a limit; A = -exp(A_log)."""
        dt = F.softplus(_f32(dt) + _f32(self.dt_bias))
        if self.dt_limit != (0.0, math.inf):
            dt = dt.clamp(*self.dt_limit)
        return dt, -torch.exp(_f32(self.A_log))

    def step(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """Decode: one token per row through the recurrent form (same math as `forward`: fp32 conv, dt,
        decay and state; output rounded before the norm). On a CPU where `kernels.fuses_mamba_step`
        allows, everything between the two projections is one kernel call; elsewhere `reference_step`."""
        if not kernels.fuses_mamba_step(x, state.conv, state.ssm):
            return self.reference_step(x, state)
        return self.out_proj(kernels.mamba_step(
            self.in_proj(x[:, 0]), state.conv, state.ssm, self.conv1d.weight, self.conv1d.bias, self.dt_bias,
            self.A_log, self.D, self.norm.weight, self.n_groups, self.norm.groups, self.dt_limit, self.norm.eps))[:, None]

    def reference_step(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """`step` in torch operations, written for few kernel launches (the fused kernel's test oracle)."""
        b = x.shape[0]
        h, p, g, n = self.num_heads, self.head_dim, self.n_groups, self.state_size
        i, c = self.inner, self.conv_dim
        zxbcdt = self.in_proj(x[:, 0])
        z, xBC, dt = zxbcdt[:, :i], zxbcdt[:, i:i + c], zxbcdt[:, i + c:]
        window = torch.cat([state.conv, xBC.to(state.conv.dtype)[:, :, None]], dim=-1)   # [b, c, K]
        state.conv.copy_(window[:, :, 1:])
        conv = (_f32(window) * _f32(self.conv1d.weight)[:, 0]).sum(-1)
        if self.conv1d.bias is not None:
            conv = conv + _f32(self.conv1d.bias)
        xBC = F.silu(conv)                                                                  # fp32 [b, c]
        if x.dtype != torch.float32:
            xBC = xBC.to(x.dtype).float()  # the conv output is stored in the model dtype
        xs = xBC[:, :i].view(b, h, p)
        dt, A = self._discretize(dt)
        y = ssd_step(state.ssm, xs, dt, A, xBC[:, i:i + g * n].view(b, g, n), xBC[:, i + g * n:].view(b, g, n),
                     state.rounding, state.generator)
        y = y.addcmul_(xs, _f32(self.D)[:, None]).view(b, 1, i).to(x.dtype)
        return self.out_proj(self.norm(y, z[:, None]))

    def verify(self, x: torch.Tensor, state: MambaState) -> torch.Tensor:
        """Speculative verify: a few tokens per row continuing the cache, with `step`'s math (the conv
        over a window of the state and the new inputs, the recurrence token by token), keeping the
        conv window and the SSM state after every token (`conv_history`, `ssm_history`) for
        `MambaState.rollback`. The projections see all T tokens at once."""
        b, t, _ = x.shape
        h, p, g, n = self.num_heads, self.head_dim, self.n_groups, self.state_size
        i, c, k = self.inner, self.conv_dim, self.conv_kernel
        zxbcdt = self.in_proj(x)
        z, xBC, dt = zxbcdt[..., :i], zxbcdt[..., i:i + c], zxbcdt[..., i + c:]
        window = torch.cat([state.conv, xBC.to(state.conv.dtype).transpose(1, 2)], dim=-1)   # [b, c, K-1+T]
        state.conv_history = window
        state.conv.copy_(window[:, :, t:])
        conv = (_f32(window).unfold(-1, k, 1) * _f32(self.conv1d.weight)[:, None, 0]).sum(-1)   # [b, c, T]
        if self.conv1d.bias is not None:
            conv = conv + _f32(self.conv1d.bias)[:, None]
        xBC = F.silu(conv).transpose(1, 2)                                                     # fp32 [b, T, c]
        if x.dtype != torch.float32:
            xBC = xBC.to(x.dtype).float()
        xs = xBC[..., :i].unflatten(-1, (h, p))
        B, C = xBC[..., i:i + g * n].unflatten(-1, (g, n)), xBC[..., i + g * n:].unflatten(-1, (g, n))
        dt, A = self._discretize(dt)
        y, state.ssm_history = ssd_steps(state.ssm, xs, dt, A, B, C, state.rounding, state.generator)
        y = y.addcmul_(xs, _f32(self.D)[:, None]).view(b, t, i).to(x.dtype)
        return self.out_proj(self.norm(y, z))

    def forward(self, x: torch.Tensor, state: MambaState | None = None, pos: list[int] | torch.Tensor | None = None,
                rope=None, seq_idx: torch.Tensor | None = None, mode: CacheMode = "dynamic",
                capture: StateCapture | None = None) -> torch.Tensor:
        """x [b, T, H] continuing `state` (rows at positions pos, a list in "dynamic" mode). mode
        "verify": the per-token recurrence with snapshots for rollback (`verify`); a single token with
        a state (any mode): the recurrent `step`; otherwise the chunked scan. seq_idx [b, T] (training,
        no cache): packed sequences, each starting from zero conv/SSM state. capture ("dynamic" mode,
        with a state): keep the states at `capture.offsets` (see StateCapture)."""
        b, t, _ = x.shape
        if seq_idx is not None and state is not None:
            raise ValueError("seq_idx (packed sequences) is for cache-free forwards")
        if capture is not None and (state is None or mode != "dynamic"):
            raise ValueError("capturing states needs a cache and mode='dynamic'")
        if mode == "verify":
            if state is None:
                raise ValueError("mode='verify' continues a cached state: pass one")
            return self.verify(x, state)
        if state is not None and t == 1:
            if capture is not None and capture.offsets != (1,):
                raise ValueError(f"a one-token forward has its state at offset 1 only, not {capture.offsets}")
            out = self.step(x, state)
            if capture is not None:
                capture.states.append((state.conv[:, None].clone(), state.ssm[:, None].clone()))
            return out
        z, xBC, dt = self.in_proj(x).split([self.inner, self.conv_dim, self.num_heads], dim=-1)
        # every row at position 0: the cached states of a previous sequence are not read
        fresh = state is not None and mode == "dynamic" and pos is not None and not any(pos)
        # the conv inputs before this forward, for captured conv windows that reach back into them
        before = state.conv.clone() if capture is not None and not fresh else None
        xBC_in = xBC
        xBC = self._conv(xBC, state, fresh, seq_idx)
        xs, B, C = xBC.split([self.inner, self.n_groups * self.state_size, self.n_groups * self.state_size], dim=-1)
        xs = xs.unflatten(-1, (self.num_heads, self.head_dim))     # views, no copies
        B = B.unflatten(-1, (self.n_groups, self.state_size))
        C = C.unflatten(-1, (self.n_groups, self.state_size))

        dt, A = self._discretize(dt)

        y, states = ssd_chunked(xs, dt, A, B, C, self.chunk_size,
                                initial_state=None if state is None or fresh else state.ssm, seq_idx=seq_idx,
                                state_at=None if capture is None else (*capture.offsets, t))
        if state is not None:
            state.store_ssm(states if capture is None else states[:, -1])
        if capture is not None:
            capture.states.append(self._captured(capture.offsets, xBC_in, states[:, :-1], state, before))
        y = y.addcmul_(_f32(xs), _f32(self.D)[:, None])                 # D skip, in place
        y = y.reshape(b, t, self.inner).to(x.dtype)
        return self.out_proj(self.norm(y, z))

    def _captured(self, offsets: tuple[int, ...], xBC: torch.Tensor, ssm: torch.Tensor, state: MambaState,
                  before: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(conv [b, O, conv_dim, K-1], ssm [b, O, h, p, n]) at `offsets` of a chunked forward whose conv
        inputs were xBC [b, T, conv_dim] and whose scan kept `ssm` [b, O, h, p, n] fp32 there, in the
        state's dtypes. The conv state at an offset is the K-1 inputs before it (those before the
        forward: `before`, or zeros for a new sequence). A low-precision SSM state is rounded to
        nearest, with no random draws, so the stochastic rounding of the forward's own state goes on
        as without the capture; at the forward's end it is the stored state itself."""
        w, t = self.conv_kernel - 1, xBC.shape[1]
        inputs = xBC.to(state.conv.dtype).transpose(1, 2)                              # [b, c, T]
        windows = []
        for o in offsets:
            window = inputs[:, :, max(0, o - w):o]
            if o < w:
                prev = before[:, :, o:] if before is not None else window.new_zeros(*window.shape[:2], w - o)
                window = torch.cat([prev, window], dim=-1)
            windows.append(window)
        ssm = ssm.to(state.ssm.dtype)
        if offsets[-1] == t:
            ssm[:, -1] = state.ssm
        return torch.stack(windows, dim=1), ssm

    def new_state(self, batch: int, dtype: torch.dtype, ssm_dtype: torch.dtype, device, rounding: str = "nearest",
                  generator: torch.Generator | None = None) -> MambaState:
        return MambaState.empty(batch, self.conv_dim, self.conv_kernel, self.num_heads, self.head_dim,
                                self.state_size, dtype, ssm_dtype, device, rounding, generator)
