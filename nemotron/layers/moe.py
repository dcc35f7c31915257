"""Mixture of experts of Nemotron 3: DeepSeek-V3-style sigmoid router with an aux-loss-free
selection bias, non-gated squared-ReLU routed experts (optionally in a latent space), a shared expert.

Tokens are grouped by expert (argsort + bincount) and each expert runs one matmul over its tokens;
nothing loops over tokens. One dispatch (`dispatch`: `choose_kernel`, `sort_by_expert`,
`sorted_expert_outputs`, `combine`) serves every weight source: dense experts, quantized experts
(nemotron.quant.modules) and an expert-parallel shard (nemotron.train.parallel)."""

from __future__ import annotations

import torch
from torch import nn

from nemotron import kernels
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


# --------------------------------------------------------------------------------------------------
# Expert dispatch: one for every weight source. A source is an experts module (dense `Experts`,
# `nemotron.quant.modules.QuantExperts`, or a dense `Experts` holding an expert-parallel shard) with
#   up_proj                     a tensor whose first dimension is the number of (local) experts
#   up(x, e), down(h, e)        x @ W_e^T with the up / down weight of (local) expert e
#   gathered(proj, ids, dtype)  the weights of experts `ids` (repeats allowed), [P, N, K]
#   stacked(proj, dtype)        every expert's weight, [E, N, K] (for torch._grouped_mm)
#   quantized                   True when weights are decoded from their storage at each use
#   indexed(proj, xs, ids)      row i of xs times the weight of expert ids[i] (the CPU decode kernels)
#   grouped_mm_ok(x), gather_ok(), indexed_ok(x)   whether `stacked` / `gathered` / `indexed` serve
# --------------------------------------------------------------------------------------------------


def choose_kernel(source, x: torch.Tensor, tokens: int, k: int, sorted_only: bool = False) -> str:
    """The kernel for `tokens` rows of x routed to k experts each:

    "indexed": on a CPU, at most kernels.MAX_ROWS tokens (decode): the kernels of nemotron.kernels
      multiply each (token, expert) pair's row by its expert's weight where it is stored (quantized
      weights undecoded), two calls in all, no host reads (torch.compile calls them as they are).
    "gather": the chosen experts' weights gathered for two batched matmuls (static shapes, no host
      reads). Quantized weights take it for up to 16 (token, expert) pairs, since only the chosen
      experts are decoded; dense weights under torch.compile for up to 64 (decode).
    "single": one token, a matrix-vector product per chosen expert, no sorting (CPU decode).
    "grouped": rows sorted by expert through torch._grouped_mm, all experts in one kernel (dense:
      CUDA bf16, and CPU batches of up to 1024 pairs, where per-expert matmuls are tiny).
    "loop": rows sorted by expert, one matmul per expert that has any (quantized: each expert is
      decoded once).
    sorted_only: the rows are already one per (token, expert) pair (expert parallel), so only
    "grouped" and "loop" apply."""
    pairs = tokens * k
    compiling = torch.compiler.is_compiling()
    if not sorted_only and source.indexed_ok(x):
        return "indexed"
    if source.quantized:
        return "gather" if not sorted_only and pairs <= 16 and source.gather_ok() else "loop"
    cuda_bf16 = x.is_cuda and x.dtype == torch.bfloat16
    if compiling and pairs <= 64 and not sorted_only and source.gather_ok():
        return "gather"  # decode under torch.compile: no host reads inside the graph
    if compiling and not cuda_bf16:
        return "loop"    # the compiler's _grouped_mm wants CUDA bf16
    if tokens == 1 and not x.is_cuda and not sorted_only:
        return "single"
    if source.grouped_mm_ok(x) and (cuda_bf16 or (not x.is_cuda and pairs <= 1024)):
        return "grouped"
    return "loop"


def sort_by_expert(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [N] -> (order [N]: the positions grouped by expert, stable; counts [num_experts])."""
    return ids.argsort(stable=True), torch.bincount(ids, minlength=num_experts)


def expert_mlp(source, x: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e of `source` on rows x: down_e relu(up_e x)²."""
    return source.down(relu2(source.up(x, e)), e)


def sorted_expert_outputs(source, xs: torch.Tensor, counts: torch.Tensor, method: str) -> torch.Tensor:
    """e(x) for rows xs [N, X] sorted by expert (counts[e] rows of expert e, in order) -> [N, X]."""
    if method == "grouped":
        offsets = counts.cumsum(0).to(torch.int32)
        h = relu2(torch._grouped_mm(xs, source.stacked("up_proj", xs.dtype).transpose(1, 2), offs=offsets))
        return torch._grouped_mm(h, source.stacked("down_proj", xs.dtype).transpose(1, 2), offs=offsets)
    if method != "loop":
        raise ValueError(f"unknown expert kernel {method!r} for sorted rows")
    spans, start = [], 0                      # (expert, its rows) for each expert that has rows
    for e, n in enumerate(counts.tolist()):
        if n:
            spans.append((e, slice(start, start + n)))
            start += n
    if torch.is_grad_enabled():               # training: one cat (its backward is free views)
        return torch.cat([expert_mlp(source, xs[rows], e) for e, rows in spans])
    ys = torch.empty_like(xs)                 # inference: one buffer
    for e, rows in spans:
        ys[rows] = expert_mlp(source, xs[rows], e)
    return ys


def combine(ys: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, token: torch.Tensor,
            tokens: int) -> torch.Tensor:
    """sum_j w_j e_j(x) in fp32 [tokens, X] from the outputs ys [T*k, X] of the pairs in `order`
    (token[i] = order[i] // k). Without autograd ys is scaled in place: pass a buffer of your own."""
    w = weights.reshape(-1).index_select(0, order)[:, None].float()
    ys = ys.float() * w if torch.is_grad_enabled() else ys.float().mul_(w)
    out = torch.zeros(tokens, ys.shape[-1], dtype=torch.float32, device=ys.device)
    return out.index_add_(0, token, ys)


def dispatch(source, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
             method: str | None = None) -> torch.Tensor:
    """x [T, X], idx/weights [T, k] -> sum_j w_j e_j(x), accumulated in fp32, returned in x.dtype.
    method: a kernel of `choose_kernel` (its choice by default)."""
    t, k = idx.shape
    method = method or choose_kernel(source, x, t, k)
    if method in ("indexed", "gather"):
        flat, xs = idx.reshape(-1), x.repeat_interleave(k, dim=0)                            # [T*k, X]
        if method == "indexed":
            ys = source.indexed("down_proj", relu2(source.indexed("up_proj", xs, flat)), flat)
        else:
            h = relu2(torch.bmm(source.gathered("up_proj", flat, x.dtype), xs[:, :, None]))
            ys = torch.bmm(source.gathered("down_proj", flat, x.dtype), h)
        return (ys.view(t, k, -1).float() * weights[..., None].float()).sum(1).to(x.dtype)
    if method == "single":
        # read only the k chosen experts, no sorting or copies; the routing read to the host once, each
        # output added in fp32 with its weight by one kernel
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e, w in zip(idx[0].tolist(), weights[0].tolist()):
            out.add_(expert_mlp(source, x, e), alpha=w)
        return out if x.dtype == torch.float32 else out.to(x.dtype)
    order, counts = sort_by_expert(idx.reshape(-1), source.up_proj.shape[0])
    token = order // k
    # index_select rather than x[token]: its backward is an index_add, not a sorting index_put
    ys = sorted_expert_outputs(source, x.index_select(0, token), counts, method)
    return combine(ys, weights, order, token, t).to(x.dtype)


class Experts(nn.Module):
    """E non-gated relu² experts stored stacked: up_proj [E, I, X], down_proj [E, X, I]. A weight
    source of `dispatch` (also when `train.parallel.apply_ep` leaves it a shard of the experts)."""

    quantized = False

    def __init__(self, num_experts: int, dim: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, intermediate_size))

    def grouped_mm_ok(self, x: torch.Tensor) -> bool:
        """torch._grouped_mm runs all experts in one kernel; it needs 16-byte-aligned rows."""
        aligned = all(d * x.element_size() % 16 == 0 for d in self.up_proj.shape[1:])
        return hasattr(torch, "_grouped_mm") and aligned

    def gather_ok(self) -> bool:
        return True

    def indexed_ok(self, x: torch.Tensor) -> bool:
        """Whether `indexed` serves rows like x: CPU decode through the kernels (`kernels.serves`)."""
        return kernels.serves(x, self.up_proj) and kernels.serves(x, self.down_proj)

    def indexed(self, proj: str, x: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return kernels.gemv(x, getattr(self, proj), experts=experts)

    def up(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return linear(x, self.up_proj[e])

    def down(self, h: torch.Tensor, e: int) -> torch.Tensor:
        return linear(h, self.down_proj[e])

    def gathered(self, proj: str, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return getattr(self, proj)[ids]   # as stored (autocast converts)

    def stacked(self, proj: str, dtype: torch.dtype) -> torch.Tensor:
        w = getattr(self, proj)
        return w if w.dtype == dtype else w.to(dtype)   # under autocast x is already in the low dtype

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor,
                method: str | None = None) -> torch.Tensor:
        """x [T, X], idx/weights [T, k] -> sum_j w_j e_j(x) (see `dispatch`, `choose_kernel`)."""
        return dispatch(self, x, idx, weights, method)


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
