"""Normalisation layers: RMSNorm, the grouped gated RMSNorm of the Mamba-2 mixer, LayerNorm1P."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm whose weight multiply happens in fp32, with one rounding at the end (Nemotron-H path).

    `weight_in_fp32=False` gives the Llama ordering (round, then multiply in the activation dtype).
    """

    def __init__(self, dim: int, eps: float = 1e-5, weight_in_fp32: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.weight_in_fp32 = weight_in_fp32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_in_fp32:  # one fused kernel: normalise and multiply in fp32, round once
            # fp32; or bf16 on a CPU, whose kernel computes in fp32 and rounds once: the bits of the
            # fp32 path below without its three conversions (tests/test_numerics.py)
            direct = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and x.device.type == "cpu")
            if direct and x.dtype == self.weight.dtype:
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """`w * rmsnorm_group(y * silu(z))` over `groups` contiguous channel groups (norm_before_gate=False).

    Everything in fp32 and rounded once, as mamba_ssm's fused `rmsnorm_fn` kernel does.
    """

    def __init__(self, dim: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.groups = groups
        self.eps = eps

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = y.float() * F.silu(z.float())
        shape = g.shape
        g = F.rms_norm(g.view(*shape[:-1], self.groups, shape[-1] // self.groups), (shape[-1] // self.groups,),
                       eps=self.eps).view(shape)
        if y.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return self.weight * g
        return (self.weight.float() * g).to(y.dtype)


class LayerNorm1P(nn.Module):
    """Nemotron-4's zero-centred LayerNorm: `layer_norm(x, weight + 1, bias)` with autocast off."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x, (x.shape[-1],), self.weight + 1.0, self.bias, self.eps)
