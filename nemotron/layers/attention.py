"""Grouped-query causal self-attention, with optional rotary embeddings (NoPE when none are given)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemotron.layers.cache import CacheMode, KVState
from nemotron.layers.linear import Linear, cpu_vendor
from nemotron.layers.rope import apply_rope

# torch's bf16 attention on a CPU multiplies through MKL's bf16 kernels, which run generic code on
# AMD CPUs: a one-token query over 128-256 cached positions took 4x the time of the fp32 kernel on
# the same values (BENCHMARKS.md). There bf16 decode attends in fp32 (q, k and v converted exactly,
# the result rounded once; the bf16 kernel also rounds its probabilities to bf16 before P @ V).
BF16_DECODE_IN_FP32 = cpu_vendor() == "AuthenticAMD"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
           gqa: bool) -> torch.Tensor:
    """`F.scaled_dot_product_attention`, in fp32 for bf16 one-token queries where `BF16_DECODE_IN_FP32`."""
    if BF16_DECODE_IN_FP32 and q.dtype == torch.bfloat16 and q.shape[2] == 1 and q.device.type == "cpu":
        y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, is_causal=causal,
                                           enable_gqa=gqa)
        return y.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        state: KVState | None = None,
        pos: list[int] | torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        seq_idx: torch.Tensor | None = None,
        mode: CacheMode = "dynamic",
    ) -> torch.Tensor:
        """x [B, T, H]; row b's tokens sit at absolute positions pos[b]..pos[b]+T-1 (0 without a cache).
        mode "dynamic" / "verify": pos is a list; the cache is written by slices and read up to the
        longest row. mode "static" (compiled decode): one token per row at pos, a tensor [B]; the whole
        buffer is read under a mask. seq_idx [B, T] (training, no cache): packed sequences, which do
        not attend to each other."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        mask = None
        if seq_idx is not None:
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            mask = (causal & (seq_idx[:, :, None] == seq_idx[:, None, :]))[:, None]
        elif mode == "static":  # the whole buffer, keys past each row masked
            k, v = state.update_static(k, v, pos)
            mask = (torch.arange(k.shape[2], device=x.device) <= pos[:, None])[:, None, None]
        elif state is not None:
            k, v = state.update(k, v, pos)
            if min(pos) != max(pos) or (t > 1 and pos[0] > 0):
                # each query sees the keys up to its own absolute position (shorter rows: less history)
                q_pos = torch.tensor(pos, device=x.device)[:, None] + torch.arange(t, device=x.device)
                mask = (torch.arange(k.shape[2], device=x.device) <= q_pos[..., None])[:, None]
        y = attend(q, k, v, mask, mask is None and t > 1, self.num_heads != self.num_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))


class LinearAttention(nn.Module):
    """DeciLM `replace_with_linear` attention: one [H, H] projection named `linear_attn`."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear_attn = Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, state: None = None, pos: list[int] | torch.Tensor | None = None, rope=None,
                seq_idx: torch.Tensor | None = None, mode: CacheMode = "dynamic") -> torch.Tensor:
        return self.linear_attn(x)
