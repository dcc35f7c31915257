"""Feed-forward layers: the non-gated squared-ReLU MLP (Nemotron-H, Nemotron-4) and SwiGLU (Llama)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemotron.layers.linear import Linear


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


class ReLU2MLP(nn.Module):
    """`down(relu(up(x))**2)`."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(relu2(self.up_proj(x)))


class SwiGLU(nn.Module):
    """`down(silu(gate(x)) * up(x))`."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearMLP(nn.Module):
    """DeciLM `replace_with_linear` FFN: one [H, H] projection named `linear_mlp`."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear_mlp = Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)
