"""Scale-out, applied from outside the single-device model code (torchtitan's shape): one small
function per kind of parallelism, in the order tensor parallel -> expert parallel -> FSDP2.

- `apply_tp`: DTensor plans. Attention: q/k/v column-wise (heads split), o row-wise. Mamba-2: in_proj
  column-wise by heads (its rows first regrouped so that each rank's slice holds its own z, x, B, C
  and dt), out_proj row-wise, and conv1d, dt_bias, A_log, D and the gated norm as local shards.
  MLPs and shared experts: up (and SwiGLU's gate) column-wise, down row-wise. Routers, latent
  projections, routed experts and DeciLM's linear replacements are replicated.
- `apply_ep`: routed experts sharded by expert across the group; tokens go to the rank that holds
  their expert and come back with all_to_all_single (autograd-aware), as torchtitan's ExpertParallel.
- `apply_fsdp`: FSDP2 `fully_shard` on every block, then the root.

gloo on CPU, NCCL on GPU; meshes come from `init_device_mesh`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from nemotron.layers.attention import Attention
from nemotron.layers.mamba2 import Mamba2Mixer
from nemotron.layers.mlp import ReLU2MLP, SwiGLU
from nemotron.layers.moe import MoE, choose_kernel, combine, sort_by_expert, sorted_expert_outputs


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, NCCL with CUDA); (rank, world)."""
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def blocks(model: nn.Module) -> nn.ModuleList:
    return model.blocks   # the CausalLM contract's block list


# --------------------------------------------------------------------------------------------------
# tensor parallel
# --------------------------------------------------------------------------------------------------


def _mamba_row_order(m: Mamba2Mixer, tp: int) -> torch.Tensor:
    """in_proj rows regrouped rank-major: rank r's contiguous slice is [z_r, x_r, B_r, C_r, dt_r]."""
    h, p, g, n = m.num_heads, m.head_dim, m.n_groups, m.state_size
    inner = h * p
    z = torch.arange(inner)
    x = inner + torch.arange(inner)
    B = 2 * inner + torch.arange(g * n)
    C = 2 * inner + g * n + torch.arange(g * n)
    dt = 2 * inner + 2 * g * n + torch.arange(h)
    parts = [z, x, B, C, dt]
    return torch.cat([torch.cat([part.view(tp, -1)[r] for part in parts]) for r in range(tp)])


def _conv_order(m: Mamba2Mixer, tp: int) -> torch.Tensor:
    """conv channels (x, B, C) regrouped rank-major, matching the in_proj regrouping."""
    inner, gn = m.num_heads * m.head_dim, m.n_groups * m.state_size
    x, B, C = torch.arange(inner), inner + torch.arange(gn), inner + gn + torch.arange(gn)
    return torch.cat([torch.cat([part.view(tp, -1)[r] for part in (x, B, C)]) for r in range(tp)])


def _shard_rows(param: nn.Parameter | torch.Tensor, order: torch.Tensor | None, tp: int, rank: int) -> nn.Parameter:
    data = param.detach()
    if order is not None:
        data = data[order]
    return nn.Parameter(data.view(tp, -1, *data.shape[1:])[rank].clone(), requires_grad=param.requires_grad)


def _tp_mamba(m: Mamba2Mixer, mesh) -> None:
    """Shard a Mamba-2 mixer by heads (groups whole): in_proj column-wise after regrouping its rows so
    each rank's slice is its own [z, x, B, C, dt]; out_proj row-wise; the per-head and per-channel
    parameters (conv, dt_bias, A_log, D, the gated norm) as local shards."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp, rank = mesh.size(), mesh.get_local_rank()
    if m.num_heads % tp or m.n_groups % tp:
        raise ValueError(f"Mamba heads ({m.num_heads}) and groups ({m.n_groups}) must divide by tp={tp}")
    rows, channels = _mamba_row_order(m, tp), _conv_order(m, tp)
    with torch.no_grad():
        m.in_proj.weight.copy_(m.in_proj.weight[rows])
        if m.in_proj.bias is not None:
            m.in_proj.bias.copy_(m.in_proj.bias[rows])
    m.tp_shards = {"in_proj.weight": ("dtensor", rows), "in_proj.bias": ("dtensor", rows),
                   "conv1d.weight": (0, channels)}
    m.conv1d.weight = _shard_rows(m.conv1d.weight, channels, tp, rank)
    if m.conv1d.bias is not None:
        m.conv1d.bias = _shard_rows(m.conv1d.bias, channels, tp, rank)
        m.tp_shards["conv1d.bias"] = (0, channels)
    for name in ("dt_bias", "A_log", "D"):
        setattr(m, name, _shard_rows(getattr(m, name), None, tp, rank))
        m.tp_shards[name] = (0, None)
    m.norm.weight = _shard_rows(m.norm.weight, None, tp, rank)
    m.tp_shards["norm.weight"] = (0, None)
    m.norm.groups //= tp
    m.num_heads //= tp
    m.n_groups //= tp
    m.inner //= tp
    m.conv_dim //= tp
    parallelize_module(m, mesh, {"in_proj": ColwiseParallel(), "out_proj": RowwiseParallel()})


def apply_tp(model: nn.Module, mesh) -> nn.Module:
    """Tensor parallel on a 1-D device mesh, in place, with DTensor plans: attention q/k/v column-wise
    (heads split) and o row-wise; Mamba-2 by heads (see `_tp_mamba`); MLPs and shared experts up (and
    gate) column-wise, down row-wise. Every rank must feed the same batch; replicated parameters then
    get identical gradients without communication."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    tp = mesh.size()
    for module in list(model.modules()):
        if isinstance(module, Attention):
            if module.num_heads % tp or module.num_kv_heads % tp:
                raise ValueError(f"attention heads ({module.num_heads}/{module.num_kv_heads}) must divide by tp={tp}")
            parallelize_module(module, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                              "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
            module.num_heads //= tp
            module.num_kv_heads //= tp
        elif isinstance(module, Mamba2Mixer):
            _tp_mamba(module, mesh)
        elif isinstance(module, ReLU2MLP):
            parallelize_module(module, mesh, {"up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()})
        elif isinstance(module, SwiGLU):   # Llama / Mistral / Llama-Nemotron: gate and up split alike
            parallelize_module(module, mesh, {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
                                              "down_proj": RowwiseParallel()})
    return model


def full_state_dict(model: nn.Module, tp_group=None, ep_group=None) -> dict[str, torch.Tensor]:
    """The unsharded state dict on every rank: DTensors gathered, local tensor-parallel shards
    all-gathered and put back in checkpoint order, expert shards all-gathered."""
    from torch.distributed.tensor import DTensor

    out = {}
    owners = {name: m for name, m in model.named_modules() if getattr(m, "tp_shards", None)}
    ep_owners = {name: m for name, m in model.named_modules() if getattr(m, "expert_parallel", None)}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        prefix, _, local = name.rpartition(".")
        owner_name = next((o for o in owners if name.startswith(o + ".")), None)
        if owner_name is not None and name[len(owner_name) + 1:] in owners[owner_name].tp_shards:
            how, order = owners[owner_name].tp_shards[name[len(owner_name) + 1:]]
            if how != "dtensor":
                parts = [torch.empty_like(t) for _ in range(dist.get_world_size(tp_group))]
                dist.all_gather(parts, t.contiguous(), group=tp_group)
                t = torch.cat(parts)
            if order is not None:
                t = t[torch.argsort(order)]
        elif any(name.startswith(o + ".") for o in ep_owners) and local in ("up_proj", "down_proj"):
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(ep_group))]
            dist.all_gather(parts, t.contiguous(), group=ep_group)
            t = torch.cat(parts)
        out[name] = t.detach().clone()
    return out


# --------------------------------------------------------------------------------------------------
# expert parallel
# --------------------------------------------------------------------------------------------------


def _ep_experts_forward(experts, group, ep: int, rank: int):
    """The forward of an expert-parallel shard: the (token, expert) pairs are sorted by expert
    (which is by owning rank), sent to their owners, run there through the shared sorted-rows
    kernels of nemotron.layers.moe, sent back and combined where they came from."""
    from torch.distributed.nn.functional import all_to_all_single

    local = experts.up_proj.shape[0]

    def forward(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, method: str | None = None) -> torch.Tensor:
        t, k = idx.shape
        order, counts = sort_by_expert(idx.reshape(-1), ep * local)
        token = order // k
        # recv_counts[s, e]: rows for my local expert e that rank s sends
        send_counts = counts.view(ep, local)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send, recv = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
        rows = all_to_all_single(x.new_empty(sum(recv), x.shape[1]), x.index_select(0, token), recv, send, group=group)
        # rows arrive by source rank, then by expert: regroup them by expert alone
        ids = torch.arange(local, device=x.device).repeat(ep).repeat_interleave(recv_counts.reshape(-1))
        local_order, local_counts = sort_by_expert(ids, local)
        method = method or choose_kernel(experts, rows, len(ids), 1, sorted_only=True)
        ys = sorted_expert_outputs(experts, rows.index_select(0, local_order), local_counts, method)
        ys = ys.new_empty(ys.shape).index_copy(0, local_order, ys)                  # arrival order
        back = all_to_all_single(ys.new_empty(sum(send), ys.shape[1]), ys, send, recv, group=group)
        return combine(back, weights, order, token, t).to(x.dtype)

    return forward


def apply_ep(model: nn.Module, group=None) -> nn.Module:
    """Expert parallel over `group`: rank r keeps experts [r*E/ep, (r+1)*E/ep). Every rank routes its
    own tokens (the group is also a data-parallel group)."""
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    for module in model.modules():
        if isinstance(module, MoE):
            ex = module.experts
            if ex.num_experts % ep:
                raise ValueError(f"{ex.num_experts} experts do not divide over ep={ep}")
            ex.up_proj = _shard_rows(ex.up_proj, None, ep, rank)
            ex.down_proj = _shard_rows(ex.down_proj, None, ep, rank)
            ex.expert_parallel = (group, ep, rank)
            ex.forward = _ep_experts_forward(ex, group, ep, rank)
    return model


def expert_parameters(model: nn.Module) -> set[int]:
    return {id(p) for m in model.modules() if getattr(m, "expert_parallel", None) for p in m.parameters()}


def all_reduce_grads(model: nn.Module, group=None, skip: set[int] = frozenset()) -> None:
    """Sum the gradients of replicated parameters over a data-parallel group (what DDP does, without
    its bucketing); `skip`: parameters that already hold every rank's contribution (expert shards)."""
    for p in model.parameters():
        if p.grad is not None and id(p) not in skip:
            dist.all_reduce(p.grad, group=group)


# --------------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------------


def apply_fsdp(model: nn.Module, mesh=None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: each block sharded on its own (gathered just before it runs), then the root, which
    holds the embeddings, the final norm, lm_head and the MTP block. `mtp_forward` is registered as a
    forward method, so the root's parameters are gathered for it too."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    if model.mtp is not None:
        register_fsdp_forward_method(model, "mtp_forward")
    return model
