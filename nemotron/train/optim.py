"""The optimizers: AdamW with Nemotron's parameter groups, or Muon for the hidden matrices with AdamW
for the rest; and the learning-rate schedules (warmup, then cosine or warmup-stable-decay with a
linear, cosine or minus-sqrt decay)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from nemotron.layers.moe import Experts

SCHEDULES = ("cosine", "wsd", "constant")
DECAYS = ("linear", "cosine", "minus_sqrt")
OPTIMIZERS = ("adamw", "muon")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases and any 1-D parameter (A_log, D, dt_bias, ...); router
    correction biases are buffers and never see the optimizer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def matrix_parameters(model: nn.Module, experts: bool = False) -> list[nn.Parameter]:
    """The hidden matrices Muon updates: the weights of the Linear layers (with `experts`, also the
    stacked expert matrices, each expert its own matrix). Not the embeddings, the output head, the
    routers, the convolutions, norms and biases: Muon's orthogonalised step is for matrices that map
    one hidden space to another. LoRA adapters are not Linear layers of their own, so AdamW trains them.
    Experts stay on AdamW by default: orthogonalising gives an expert that saw few tokens as large a
    step as a busy one, and in the tiny recipe's pretraining every MoE layer's routing collapsed onto
    one expert by step 200 (max/mean load 3.9, of a possible 4 with 4 of 16 chosen; BENCHMARKS.md)."""
    head = getattr(model, "lm_head", None)
    skip = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        params = [module.weight] if isinstance(module, nn.Linear) else \
            [module.up_proj, module.down_proj] if experts and isinstance(module, Experts) else []
        for p in params:
            if p.requires_grad and id(p) not in skip:
                found[id(p)] = p
    return list(found.values())


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately the nearest semi-orthogonal matrix to each matrix of g [..., m, n] (U V^T of its
    SVD, singular values pushed into about [0.7, 1.2]): Muon's quintic Newton-Schulz iteration, with
    torch.optim.Muon's coefficients, in fp32."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the groups marked `muon` (Nesterov momentum, then the update orthogonalised), AdamW
    for the others, in one optimizer (one state to checkpoint). A 3-D parameter is a stack of expert
    matrices, each orthogonalised on its own. Muon's step is scaled by 0.2 sqrt(max(rows, cols)) so
    that its RMS matches AdamW's (torch.optim.Muon's "match_rms_adamw"): learning rates and weight
    decay mean the same in both kinds of group. A sharded parameter's update is orthogonalised whole
    (gathered, then each rank keeps its shard)."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 momentum: float = 0.95, ns_steps: int = 5) -> None:
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, ns_steps=ns_steps,
                                      weight_decay=0.0, muon=False))

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                p.mul_(1 - lr * wd)
                if group["muon"]:
                    self._muon(p, state, lr, group["momentum"], group["ns_steps"])
                else:
                    self._adamw(p, state, lr, *group["betas"], group["eps"])

    @staticmethod
    def _muon(p: torch.Tensor, state: dict, lr: float, momentum: float, ns_steps: int) -> None:
        g = p.grad
        buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
        buf.lerp_(g, 1 - momentum)
        update = g.lerp(buf, momentum)
        if isinstance(update, DTensor):
            update = distribute_tensor(orthogonalize(update.full_tensor(), ns_steps), update.device_mesh,
                                       update.placements, src_data_rank=None)
        else:
            update = orthogonalize(update, ns_steps)
        rows, cols = p.shape[-2:]
        p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))

    @staticmethod
    def _adamw(p: torch.Tensor, state: dict, lr: float, beta1: float, beta2: float, eps: float) -> None:
        g = p.grad
        if not state:
            state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        step = float(state["step"])
        state["exp_avg"].lerp_(g, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** step))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, kind: str = "adamw",
                   muon_lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; or (`kind` muon) Muon over `matrix_parameters` (the dense ones) at
    `muon_lr` (default: lr) and AdamW over the rest. Every group carries `lr_ratio`, its learning rate over
    `lr`, which the schedule keeps."""
    if kind == "adamw":
        groups = param_groups(model, weight_decay)
        for g in groups:
            g["lr_ratio"] = 1.0
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)
    if kind != "muon":
        raise ValueError(f"unknown optimizer {kind!r} (one of {', '.join(OPTIMIZERS)})")
    matrices = matrix_parameters(model)
    ids = {id(p) for p in matrices}
    ratio = (muon_lr if muon_lr is not None else lr) / lr if lr else 0.0
    rest = []
    for g in param_groups(model, weight_decay):
        g["params"] = [p for p in g["params"] if id(p) not in ids]
        rest.append({**g, "lr_ratio": 1.0})
    groups = [{"params": matrices, "weight_decay": weight_decay, "muon": True, "lr_ratio": ratio,
               "lr": lr * ratio}] + rest
    return MuonAdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(step: int, total: int, lr: float, min_lr: float = 0.0, warmup: int = 0, schedule: str = "cosine",
          decay_fraction: float = 0.2, decay: str = "minus_sqrt") -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(1, round(total * decay_fraction))
        start = total - decay_steps
        if step < start:
            return lr
        progress = min(1.0, (step - start + 1) / decay_steps)
        if decay == "linear":
            factor = 1 - progress
        elif decay == "cosine":
            factor = 0.5 * (1 + math.cos(math.pi * progress))
        elif decay == "minus_sqrt":  # Nemotron 3 Super
            factor = 1 - math.sqrt(progress)
        else:
            raise ValueError(f"unknown decay {decay!r} (one of {', '.join(DECAYS)})")
        return min_lr + (lr - min_lr) * factor
    raise ValueError(f"unknown schedule {schedule!r} (one of {', '.join(SCHEDULES)})")
