"""Hybrid inference state: preallocated attention KV for attention layers, conv + SSM state for Mamba
layers, for a batch of sequences of different lengths.

Each row has its own length (`seq_lens`, a CPU tensor so that reading it never waits on a device).
`cache.rows(i, j)` is a view of rows i..j-1 that shares every tensor with the parent, so a prompt can
be prefilled into one row while the others decode. For speculative decoding a forward can `record`
the Mamba state after every token, and `rollback` then keeps only the accepted ones, without
recomputing the prefix."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def rows(self, start: int, end: int) -> "KVState":
        return KVState(self.k[start:end], self.v[start:end])

    def update(self, k: torch.Tensor, v: torch.Tensor, pos: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v ([B, kv, T, hd]) for row b at positions pos[b]..pos[b]+T-1; return the keys and
        values of every row up to the longest row's end ([B, kv, max(pos)+T, hd])."""
        t = k.shape[2]
        end = max(pos) + t
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache overflow: {end} tokens > capacity {self.k.shape[2]}")
        if min(pos) == end - t:  # every row at the same position: a plain slice
            self.k[:, :, end - t:end] = k
            self.v[:, :, end - t:end] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            cols = torch.tensor(pos, device=k.device)[:, None] + torch.arange(t, device=k.device)
            self.k[rows, :, cols] = k.transpose(1, 2)
            self.v[rows, :, cols] = v.transpose(1, 2)
        return self.k[:, :, :end], self.v[:, :, :end]

    def update_static(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row (k/v [B, kv, 1, hd]) written at pos [B] (a tensor); returns the whole
        buffer. Shapes never change, so a compiled decode step never recompiles (gpt-fast style)."""
        index = pos.view(-1, 1, 1, 1).expand(-1, k.shape[1], 1, k.shape[3])
        self.k.scatter_(2, index, k)
        self.v.scatter_(2, index, v)
        return self.k, self.v

    def copy_row(self, src: int, dst: int) -> None:
        self.k[dst].copy_(self.k[src])
        self.v[dst].copy_(self.v[src])

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.k.shape[1] * self.k.shape[3] * self.k.element_size()


@dataclass
class MambaState:
    """Mamba-2 state of one layer: the last K-1 conv inputs [B, conv_dim, K-1] and the SSM state
    [B, heads, head_dim, state_size] (fp32 by default).

    With `record` set, a multi-token forward also keeps the conv input window and the SSM state after
    each token (`conv_history`, `ssm_history`) so that `rollback` can rewind to any of them."""

    conv: torch.Tensor
    ssm: torch.Tensor
    record: bool = False
    conv_history: torch.Tensor | None = field(default=None, repr=False)
    ssm_history: torch.Tensor | None = field(default=None, repr=False)

    @classmethod
    def empty(cls, batch: int, conv_dim: int, conv_kernel: int, heads: int, head_dim: int, state_size: int,
              dtype: torch.dtype, ssm_dtype: torch.dtype, device: torch.device | str) -> "MambaState":
        return cls(
            torch.zeros(batch, conv_dim, conv_kernel - 1, dtype=dtype, device=device),
            torch.zeros(batch, heads, head_dim, state_size, dtype=ssm_dtype, device=device),
        )

    def rows(self, start: int, end: int) -> "MambaState":
        return MambaState(self.conv[start:end], self.ssm[start:end], self.record)

    def rollback(self, keep: list[int]) -> None:
        """After a recorded forward of T tokens, keep the first keep[b] (1..T) of them in row b."""
        window = self.conv.shape[-1]
        for b, n in enumerate(keep):
            self.conv[b].copy_(self.conv_history[b, :, n:n + window])
            self.ssm[b].copy_(self.ssm_history[b, n - 1])
        self.conv_history = self.ssm_history = None

    def copy_row(self, src: int, dst: int) -> None:
        self.conv[dst].copy_(self.conv[src])
        self.ssm[dst].copy_(self.ssm[src])

    def zero_row(self, row: int) -> None:
        self.conv[row].zero_()
        self.ssm[row].zero_()

    @property
    def bytes_per_sequence(self) -> int:
        return (self.conv[0].numel() * self.conv.element_size() + self.ssm[0].numel() * self.ssm.element_size())


State = KVState | MambaState | None


class HybridCache:
    """Per-layer states (main model and MTP block) plus the number of tokens each row holds."""

    def __init__(self, layers: list[State], mtp_layers: list[State] | None = None,
                 seq_lens: torch.Tensor | None = None, mtp_seq_lens: torch.Tensor | None = None) -> None:
        self.layers = layers
        self.mtp_layers = mtp_layers or []
        batch = next((s.k.shape[0] if isinstance(s, KVState) else s.conv.shape[0]
                      for s in layers if s is not None), 1)
        self.seq_lens = seq_lens if seq_lens is not None else torch.zeros(batch, dtype=torch.long)
        self.mtp_seq_lens = mtp_seq_lens if mtp_seq_lens is not None else torch.zeros(batch, dtype=torch.long)

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def capacity(self) -> int:
        return next((s.k.shape[2] for s in self.layers if isinstance(s, KVState)), 1 << 62)

    def positions(self) -> list[int]:
        return self.seq_lens.tolist()

    def rows(self, start: int, end: int | None = None) -> "HybridCache":
        """A view of rows start..end-1 (default: one row) sharing all tensors with this cache."""
        end = start + 1 if end is None else end

        def view(states: list[State]) -> list[State]:
            return [None if s is None else s.rows(start, end) for s in states]

        return HybridCache(view(self.layers), view(self.mtp_layers), self.seq_lens[start:end],
                           self.mtp_seq_lens[start:end])

    def set_record(self, on: bool) -> None:
        for s in self.layers:
            if isinstance(s, MambaState):
                s.record = on

    def rollback(self, keep: list[int], forward_len: int) -> None:
        """Undo the tail of the last recorded forward of `forward_len` tokens: row b keeps keep[b]."""
        for s in self.layers:
            if isinstance(s, MambaState):
                s.rollback(keep)
        self.seq_lens -= torch.tensor([forward_len - n for n in keep], dtype=torch.long)

    def move_row(self, src: int, dst: int) -> None:
        """Copy row src's whole state into row dst (to keep active sequences packed at the front)."""
        for s in self.layers + self.mtp_layers:
            if s is not None:
                s.copy_row(src, dst)
        self.seq_lens[dst] = self.seq_lens[src]
        self.mtp_seq_lens[dst] = self.mtp_seq_lens[src]

    def reset_row(self, row: int) -> None:
        """Empty row `row` for a new sequence (Mamba state must start from zero; KV is overwritten)."""
        for s in self.layers + self.mtp_layers:
            if isinstance(s, MambaState):
                s.zero_row(row)
        self.seq_lens[row] = 0
        self.mtp_seq_lens[row] = 0

    @property
    def kv_bytes_per_token(self) -> int:
        return sum(s.bytes_per_token for s in self.layers if isinstance(s, KVState))

    @property
    def mamba_bytes_per_sequence(self) -> int:
        return sum(s.bytes_per_sequence for s in self.layers if isinstance(s, MambaState))
