"""The classic pre-norm decoder (attention half + FFN half per layer) shared by Nemotron-4,
Llama-Nemotron, Llama and Mistral. Either half may be absent (DeciLM `no_op`): then neither its norm
nor its residual add runs. The decoder families (nemotron4.py, llama_nas.py) build on `DecoderLM`
and `DecoderFamily`."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn

from nemotron.layers.cache import CacheMode, CacheOptions, HybridCache, KVState, StateCapture, check_mode
from nemotron.layers.attention import Attention
from nemotron.layers.linear import Linear, linear
from nemotron.layers.rope import rope_cos_sin
from nemotron.models.contract import UNWRAP_LANGUAGE_MODEL, Family, NameMap


class DecoderLayer(nn.Module):
    def __init__(self, input_layernorm: nn.Module | None, self_attn: nn.Module | None,
                 post_attention_layernorm: nn.Module | None, mlp: nn.Module | None) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp

    def forward(self, x: torch.Tensor, state: KVState | None, pos: list[int] | torch.Tensor | None,
                rope, seq_idx: torch.Tensor | None = None, mode: CacheMode = "dynamic") -> torch.Tensor:
        if self.self_attn is not None:
            x = x + self.self_attn(self.input_layernorm(x), state, pos, rope, seq_idx=seq_idx, mode=mode)
        if self.mlp is not None:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


def packed_positions(seq_idx: torch.Tensor) -> torch.Tensor:
    """[B, T] position of each token within its own packed sequence."""
    t = seq_idx.shape[1]
    index = torch.arange(t, device=seq_idx.device).expand_as(seq_idx)
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = torch.cummax(torch.where(starts, index, torch.zeros_like(index)), dim=1).values
    return index - first


class DecoderBody(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, layers: list[DecoderLayer], norm: nn.Module) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class TiedLMHead(nn.Module):
    """The output projection of a model with `tie_word_embeddings`: it multiplies by the input
    embedding matrix and owns no parameter, so the matrix is counted, trained and saved once, as
    `model.embed_tokens.weight` (the one tensor transformers writes for a tied model)."""

    def __init__(self, embedding: nn.Embedding) -> None:
        super().__init__()
        self._embedding = (embedding,)   # a tuple: not registered, the body owns the embedding

    @property
    def weight(self) -> torch.Tensor:
        # looked up on every call: loading and FSDP replace the embedding's Parameter object
        return self._embedding[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class DecoderLM(nn.Module):
    """`model.{embed_tokens,layers,norm}` + `lm_head`, with rotary embeddings computed once per forward.
    No MTP block (`mtp` is None)."""

    def __init__(self, config, body: DecoderBody, inv_freq: torch.Tensor) -> None:
        super().__init__()
        self.config = config
        self.model = body
        self.lm_head = TiedLMHead(body.embed_tokens) if getattr(config, "tie_word_embeddings", False) else \
            Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = None
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers in order (`model.layers`, as the checkpoint names them)."""
        return self.model.layers

    def _layers(self, input_ids: torch.Tensor, cache: HybridCache | None, mode: CacheMode,
                positions: torch.Tensor | None, seq_idx: torch.Tensor | None,
                capture: StateCapture | None = None) -> torch.Tensor:
        """Embeddings through every layer: the hidden states [B, T, H] before the final norm. A
        `capture` gets nothing: these models have no Mamba layers (their KV is cached per position)."""
        check_mode(mode, cache, positions, capture)
        b, t = input_ids.shape
        if seq_idx is not None:
            pos, token_pos = None, packed_positions(seq_idx)
        elif mode == "static":
            pos, token_pos = positions, positions[:, None]
        else:
            pos = None if cache is None else cache.positions()
            start = torch.zeros(b, 1, dtype=torch.long) if pos is None else torch.tensor(pos)[:, None]
            token_pos = (start + torch.arange(t)).to(input_ids.device)
        x = self.model.embed_tokens(input_ids)
        rope = rope_cos_sin(self.inv_freq, token_pos, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, None if cache is None else cache.layers[i], pos, rope, seq_idx, mode)
        if cache is not None and mode != "static":
            cache.seq_lens += t
        return x

    def hidden_states(self, input_ids: torch.Tensor, cache: HybridCache | None = None, *,
                      mode: CacheMode = "dynamic", positions: torch.Tensor | None = None,
                      seq_idx: torch.Tensor | None = None, capture: StateCapture | None = None) -> torch.Tensor:
        """The final-normed hidden states [B, T, H] (what lm_head consumes). `mode` / `positions` /
        `seq_idx` / `capture`: as `forward`."""
        return self.model.norm(self._layers(input_ids, cache, mode, positions, seq_idx, capture))

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None, logits_to_keep: int = 0, *,
                mode: CacheMode = "dynamic", positions: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None, capture: StateCapture | None = None,
                return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] fp32 (of the last `logits_to_keep` positions when > 0); with return_hidden,
        (logits, final hidden states [B, T, H]).

        `mode` (see CacheMode): "dynamic" continues each row of `cache` and advances it; "static" is the
        static-shape decode for torch.compile, one token per row at `positions` [B] (a tensor), and the
        caller then advances `cache.seq_lens` itself; "verify" is "dynamic" here (no Mamba state to
        snapshot). `seq_idx` [B, T]: packed training sequences, which neither attend to each other nor
        share rotary positions (each counts from 0). `capture`: accepted for the contract; nothing to
        capture here."""
        x = self._layers(input_ids, cache, mode, positions, seq_idx, capture)
        if return_hidden:
            h = self.model.norm(x)
            return self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h).float(), h
        x = self.model.norm(x[:, -logits_to_keep:] if logits_to_keep else x)
        return self.lm_head(x).float()

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, depth: int = 0,
                    cache: HybridCache | None = None, seq_idx: torch.Tensor | None = None,
                    logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError(f"{type(self.config).__name__} models have no MTP block")

    def new_cache(self, batch: int, max_len: int, options: CacheOptions | None = None,
                  dtype: torch.dtype | None = None, device=None, ssm_dtype: torch.dtype | None = None) -> HybridCache:
        opts = options or CacheOptions()   # kv_dtype applies (no Mamba state here)
        p = self.model.embed_tokens.weight   # never quantized, unlike lm_head
        dtype, device = dtype or p.dtype, device or p.device
        states = []
        for layer in self.model.layers:
            attn = layer.self_attn
            states.append(opts.kv_state(attn, batch, max_len, dtype, device)
                          if isinstance(attn, Attention) else None)
        return HybridCache(states)


# transformers' names are the release names; a tied head is no parameter of these models
# (TiedLMHead), so a checkpoint without lm_head needs no mapping, and one that stores it beside the
# tied embedding has it dropped
DECODER_NAME_MAP = NameMap(renames=(UNWRAP_LANGUAGE_MODEL,), tied_copy="lm_head.weight")


class DecoderFamily(Family):
    """What the decoder families share: the name map, and per-layer attention KV and no Mamba state."""

    name_map = DECODER_NAME_MAP

    @abstractmethod
    def kv_heads(self, config) -> list[int]:
        """The KV heads of each attention layer (a layer without attention has none)."""

    def state_bytes(self, config, dtype_bytes: int = 2, ssm_dtype_bytes: int = 4) -> dict[str, Any]:
        kv = 0
        for heads in self.kv_heads(config):
            kv += 2 * heads * config.head_dim * dtype_bytes
        return {"kv_bytes_per_token": kv, "mamba_state_bytes_per_sequence": 0}
