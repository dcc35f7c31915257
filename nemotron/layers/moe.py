"""Mixture of experts of Nemotron 3: DeepSeek-V3-style sigmoid router with an aux-loss-free
selection bias, non-gated squared-ReLU routed experts (optionally in a latent space), a shared expert.

Tokens are grouped by expert (argsort + bincount) and each expert runs one matmul over its tokens;
nothing loops over tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemotron.layers.linear import Linear, linear
from nemotron.layers.mlp import ReLU2MLP, relu2


def route(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router math on fp32 logits [T, E]. Returns (weights [T, k] fp32, expert ids [T, k]).

    The correction bias only steers *which* experts are chosen; the weights come from the raw
    sigmoid scores."""
    scores = logits.float().sigmoid()
    choice = scores + correction_bias.float()
    if n_group > 1:
        t, e = choice.shape
        grouped = choice.view(t, n_group, e // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)                       # [T, n_group]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(t, e)
    idx = choice.topk(top_k, dim=-1, sorted=False).indices
    weights = scores.gather(1, idx)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, idx


class TopkRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, n_group: int = 1, topk_group: int = 1,
                 norm_topk_prob: bool = True, scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        # Kept in fp32 whatever the model dtype (the release stores it fp32); moved by the
        # aux-loss-free balancing update, never by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = top_k, n_group, topk_group
        self.norm_topk_prob, self.scaling_factor = norm_topk_prob, scaling_factor
        # training only: tokens routed to each expert since the last balancing update, and the last
        # forward's (scores, choices) for the sequence-level auxiliary loss
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.last_routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` & co. must not round the selection bias (or the load counts): they only
        # follow the device.
        kept = {name: self._buffers.pop(name) for name in ("e_score_correction_bias", "tokens_per_expert")}
        try:
            return super()._apply(fn, recurse)
        finally:
            for name, buf in kept.items():
                if buf.is_meta and not self.weight.is_meta:  # built on meta, loaded: the counts start at 0
                    buf = torch.zeros(buf.shape, dtype=buf.dtype)
                self._buffers[name] = buf.to(self.weight.device)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the router stays fp32 under autocast
            return linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(x)
        weights, idx = route(logits, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                             self.norm_topk_prob, self.scaling_factor)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(idx.reshape(-1), minlength=self.tokens_per_expert.numel())
            self.last_routing = (logits.sigmoid(), idx)
        return weights, idx


class Experts(nn.Module):
    """E non-gated relu² experts stored stacked: up_proj [E, I, X], down_proj [E, X, I]."""

    def __init__(self, num_experts: int, dim: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, intermediate_size))

    def grouped_mm_ok(self, x: torch.Tensor) -> bool:
        """torch._grouped_mm runs all experts in one kernel; it needs 16-byte-aligned rows. On CPU the
        per-expert loop is as fast, so it is the default there."""
        aligned = all(d * x.element_size() % 16 == 0 for d in self.up_proj.shape[1:])
        return hasattr(torch, "_grouped_mm") and aligned

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                method: str | None = None) -> torch.Tensor:
        """x [T, X], idx/weights [T, k] -> sum_j w_j e_j(x), accumulated in fp32, returned in x.dtype.

        method: "gather" (the chosen experts' weights copied for two bmm: used under torch.compile),
        "single" (one token: a matrix-vector product per chosen expert), "grouped"
        (torch._grouped_mm over tokens sorted by expert), "loop" (sorted tokens, one matmul per expert
        that has any); by default single for one token on CPU, grouped on CUDA and for small CPU
        batches, loop otherwise."""
        t, k = idx.shape
        if method is None:
            compiling = torch.compiler.is_compiling()
            if compiling and t * k <= 64:
                method = "gather"  # decode under torch.compile: no host reads inside the graph
            elif compiling and not (x.is_cuda and x.dtype == torch.bfloat16):
                method = "loop"    # the compiler's _grouped_mm wants CUDA bf16
            elif t == 1 and not x.is_cuda:
                method = "single"
            elif self.grouped_mm_ok(x) and ((x.is_cuda and x.dtype == torch.bfloat16) or
                                            (not x.is_cuda and t * k <= 1024)):
                # one kernel on GPU; on CPU it wins while per-expert matmuls are tiny (decode batches)
                method = "grouped"
            else:
                method = "loop"
        if method == "gather":
            # the chosen experts' weights gathered for two batched matmuls (static shapes)
            up, down = self.up_proj[idx.reshape(-1)], self.down_proj[idx.reshape(-1)]          # [T*k, I, X], [T*k, X, I]
            h = relu2(torch.bmm(up, x.repeat_interleave(k, dim=0)[:, :, None]))              # [T*k, I, 1]
            ys = torch.bmm(down, h).view(t, k, -1).float()                                   # [T, k, X]
            return (ys * weights[..., None].float()).sum(1).to(x.dtype)
        if method == "single":
            # decode on CPU: read only the k chosen experts, no sorting or copies
            out = None
            for e, w in zip(idx[0].tolist(), weights[0].float()):
                y = linear(relu2(linear(x, self.up_proj[e])), self.down_proj[e]).float() * w
                out = y if out is None else out + y
            return out.to(x.dtype)
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.num_experts)
        # index_select rather than x[token]: its backward is an index_add, not a sorting index_put
        xs = x.index_select(0, token)
        if method == "grouped":
            offsets = counts.cumsum(0).to(torch.int32)
            up, down = self.up_proj, self.down_proj
            if up.dtype != xs.dtype:  # under autocast the activations are already in the low dtype
                up, down = up.to(xs.dtype), down.to(xs.dtype)
            h = relu2(torch._grouped_mm(xs, up.transpose(1, 2), offs=offsets))
            ys = torch._grouped_mm(h, down.transpose(1, 2), offs=offsets)
        elif torch.is_grad_enabled():
            # training: per-expert outputs joined by one cat (its backward is free views)
            parts, start = [], 0
            for e, n in enumerate(counts.tolist()):
                if n:
                    parts.append(F.linear(relu2(F.linear(xs[start:start + n], self.up_proj[e])), self.down_proj[e]))
                    start += n
            ys = torch.cat(parts)
        else:
            ys = torch.empty_like(xs)
            start = 0
            for e, n in enumerate(counts.tolist()):  # one matmul per expert that has tokens
                if n:
                    h = relu2(linear(xs[start:start + n], self.up_proj[e]))
                    ys[start:start + n] = linear(h, self.down_proj[e])
                    start += n
        w = weights.reshape(-1).index_select(0, order)[:, None].float()
        # ys is this function's own buffer (or a fresh fp32 copy of it) when nothing is recorded
        ys = ys.float() * w if torch.is_grad_enabled() else ys.float().mul_(w)
        out = torch.zeros(t, x.shape[-1], dtype=torch.float32, device=x.device)
        return out.index_add_(0, token, ys).to(x.dtype)


class MoE(nn.Module):
    """Router and shared expert see the full-width x; routed experts run in the latent space when
    `latent_size` is set (LatentMoE: fc1_latent_proj in, fc2_latent_proj out)."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, intermediate_size: int,
                 shared_intermediate_size: int, latent_size: int | None = None, n_group: int = 1,
                 topk_group: int = 1, norm_topk_prob: bool = True, scaling_factor: float = 1.0,
                 bias: bool = False) -> None:
        super().__init__()
        self.gate = TopkRouter(hidden_size, num_experts, top_k, n_group, topk_group, norm_topk_prob, scaling_factor)
        dim = latent_size or hidden_size
        self.experts = Experts(num_experts, dim, intermediate_size)
        self.shared_experts = ReLU2MLP(hidden_size, shared_intermediate_size, bias=bias) \
            if shared_intermediate_size else None
        if latent_size:
            self.fc1_latent_proj = Linear(hidden_size, latent_size, bias=bias)
            self.fc2_latent_proj = Linear(latent_size, hidden_size, bias=bias)
        else:
            self.fc1_latent_proj = self.fc2_latent_proj = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, idx = self.gate(flat)
        u = flat if self.fc1_latent_proj is None else self.fc1_latent_proj(flat)
        r = self.experts(u, idx, weights)
        if self.fc2_latent_proj is not None:
            r = self.fc2_latent_proj(r)
        out = r.view(shape)
        return out if self.shared_experts is None else out + self.shared_experts(x)
