"""Hybrid inference state: preallocated attention KV for attention layers, conv + SSM state for Mamba
layers. Layers receive their own state object and the absolute position of their first input token."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KVState:
    """Static KV cache of one attention layer: [B, kv_heads, max_len, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str) -> "KVState":
        shape = (batch, kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v ([B, kv, T, hd]) at `pos`; return the filled prefix [B, kv, pos+T, hd]."""
        end = pos + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.k.shape[2]}")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    @property
    def nbytes_per_token(self) -> int:
        return 2 * self.k[:, :, 0].numel() * self.k.element_size() // self.k.shape[0]


@dataclass
class MambaState:
    """Mamba-2 state of one layer: the last K-1 conv inputs [B, conv_dim, K-1] and the SSM state
    [B, heads, head_dim, state_size] (fp32 by default)."""

    conv: torch.Tensor
    ssm: torch.Tensor

    @classmethod
    def empty(cls, batch: int, conv_dim: int, conv_kernel: int, heads: int, head_dim: int, state_size: int,
              dtype: torch.dtype, ssm_dtype: torch.dtype, device: torch.device | str) -> "MambaState":
        return cls(
            torch.zeros(batch, conv_dim, conv_kernel - 1, dtype=dtype, device=device),
            torch.zeros(batch, heads, head_dim, state_size, dtype=ssm_dtype, device=device),
        )

    @property
    def nbytes_per_sequence(self) -> int:
        b = self.conv.shape[0]
        return (self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()) // b


class HybridCache:
    """Per-layer states plus the number of tokens already consumed (`seq_len`)."""

    def __init__(self, layers: list[KVState | MambaState | None], mtp_layers: list[KVState | None] | None = None):
        self.layers = layers
        self.mtp_layers = mtp_layers or []
        self.seq_len = 0

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(s.nbytes_per_token for s in self.layers if isinstance(s, KVState))

    @property
    def mamba_bytes_per_sequence(self) -> int:
        return sum(s.nbytes_per_sequence for s in self.layers if isinstance(s, MambaState))
