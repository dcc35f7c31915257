"""AdamW with Nemotron's parameter groups, and the learning-rate schedules (warmup, then cosine or
warmup-stable-decay with a linear, cosine or minus-sqrt decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

SCHEDULES = ("cosine", "wsd", "constant")
DECAYS = ("linear", "cosine", "minus_sqrt")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases and any 1-D parameter (A_log, D, dt_bias, ...); router
    correction biases are buffers and never see the optimizer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.endswith(".bias") or "norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps)


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
