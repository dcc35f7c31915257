"""Nemotron-H, Nemotron Nano 2 and Nemotron 3 (`model_type: "nemotron_h"`).

Each position of the layer pattern is one pre-norm residual block holding one mixer:
`M` Mamba-2, `*` NoPE GQA attention, `-` squared-ReLU MLP, `E` (Latent)MoE. Optional MTP block
(`mtp.layers.*`) shares the embeddings and lm_head. Module names mirror the release checkpoint
(`backbone.embeddings`, `backbone.layers.{i}.norm`, `backbone.layers.{i}.mixer.*`, `backbone.norm_f`,
`lm_head`, `mtp.layers.{j}.*`), so only routed experts need a name map (they are stored stacked)."""

from __future__ import annotations

import torch
from torch import nn

from nemotron.layers.cache import CacheOptions, HybridCache, KVState, MambaState
from nemotron.config import DTYPES, LAYER_CHARS, NemotronHConfig
from nemotron.layers.attention import Attention
from nemotron.layers.linear import Linear
from nemotron.layers.mamba2 import Mamba2Mixer
from nemotron.layers.mlp import ReLU2MLP
from nemotron.layers.moe import MoE
from nemotron.layers.norm import RMSNorm


def build_mixer(config: NemotronHConfig, kind: str) -> nn.Module:
    c = config
    if kind == "mamba":
        return Mamba2Mixer(c.hidden_size, c.mamba_num_heads, c.mamba_head_dim, c.ssm_state_size, c.n_groups,
                           c.conv_kernel, c.chunk_size, c.use_conv_bias, c.use_bias, c.layer_norm_epsilon,
                           c.time_step_limit)
    if kind == "attention":
        return Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.attention_bias)
    if kind == "mlp":
        return ReLU2MLP(c.hidden_size, c.intermediate_size, c.mlp_bias)
    if kind == "moe":
        return MoE(c.hidden_size, c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size,
                   c.moe_shared_expert_intermediate_size * c.n_shared_experts, c.moe_latent_size, c.n_group,
                   c.topk_group, c.norm_topk_prob, c.routed_scaling_factor, c.mlp_bias)
    raise ValueError(f"unknown layer type {kind!r}")


class HybridBlock(nn.Module):
    """`x + mixer(RMSNorm(x))`."""

    def __init__(self, config: NemotronHConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.hidden_size, config.layer_norm_epsilon)
        self.mixer = build_mixer(config, kind)

    def forward(self, x: torch.Tensor, state: KVState | MambaState | None = None,
                pos: list[int] | torch.Tensor | None = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x if x.dtype == self.norm.weight.dtype else x.to(self.norm.weight.dtype))
        h = self.mixer(h, state, pos, seq_idx=seq_idx) if self.kind in ("mamba", "attention") else self.mixer(h)
        return (x.float() if self.residual_in_fp32 else x) + h


class MTPLayer(HybridBlock):
    """One block of the MTP stack. The first block of a depth also owns enorm/hnorm/eh_proj, the last
    one final_layernorm."""

    def __init__(self, config: NemotronHConfig, kind: str, first: bool, last: bool) -> None:
        super().__init__(config, kind)
        h, eps = config.hidden_size, config.layer_norm_epsilon
        if first:
            self.enorm = RMSNorm(h, eps)
            self.hnorm = RMSNorm(h, eps)
            self.eh_proj = Linear(2 * h, h, bias=False)
        if last:
            self.final_layernorm = RMSNorm(h, eps)


class Backbone(nn.Module):
    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HybridBlock(config, kind) for kind in config.layer_types)
        self.norm_f = RMSNorm(config.hidden_size, config.layer_norm_epsilon)


class MTP(nn.Module):
    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        pattern = config.mtp_hybrid_override_pattern
        self.depth_size = len(pattern)
        self.layers = nn.ModuleList(
            MTPLayer(config, LAYER_CHARS[ch], first=j == 0, last=j == len(pattern) - 1)
            for _ in range(config.num_nextn_predict_layers)
            for j, ch in enumerate(pattern)
        )


class NemotronHForCausalLM(nn.Module):
    def __init__(self, config: NemotronHConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = MTP(config) if config.num_nextn_predict_layers else None

    def hidden_states(self, input_ids: torch.Tensor, cache: HybridCache | None = None,
                      positions: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        """The final-normed hidden states [B, T, H] (what lm_head and the MTP block consume).

        `positions` [B] (a tensor, one token per row) is the static-shape decode used under
        torch.compile; the caller then advances `cache.seq_lens` itself. `seq_idx` [B, T] marks packed
        training sequences (non-decreasing per row): no state or attention crosses from one to the next."""
        pos = positions if positions is not None else None if cache is None else cache.positions()
        x = self.backbone.embeddings(input_ids)
        for i, layer in enumerate(self.backbone.layers):
            x = layer(x, None if cache is None else cache.layers[i], pos, seq_idx)
        if cache is not None and positions is None:
            cache.seq_lens += input_ids.shape[1]
        return self.backbone.norm_f(x.to(self.backbone.norm_f.weight.dtype))

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None, logits_to_keep: int = 0,
                positions: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] fp32; with return_hidden, (logits, final hidden states) in one call (training
        with MTP: a single entry point is also what FSDP wraps)."""
        h = self.hidden_states(input_ids, cache, positions, seq_idx)
        logits = self.lm_head(h[:, -logits_to_keep:] if logits_to_keep else h).float()
        return (logits, h) if return_hidden else logits

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, depth: int = 0,
                    cache: HybridCache | None = None, seq_idx: torch.Tensor | None = None,
                    logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP depth: from the hidden state at t and the token at t+1, predict the token at t+2.

        hidden [B, T, H] (post norm_f, or the previous depth's output); next_ids [B, T]. With a cache,
        the MTP attention continues from `cache.mtp_seq_lens` and advances it.
        Returns (logits [B, T, V] fp32, or of the last `logits_to_keep` positions; hidden [B, T, H] for
        the next depth)."""
        if self.mtp is None:
            raise ValueError("this checkpoint has no MTP block (num_nextn_predict_layers = 0)")
        stored = len(self.mtp.layers) // self.mtp.depth_size
        block = self.mtp.layers[(depth % stored) * self.mtp.depth_size:][: self.mtp.depth_size]
        first, last = block[0], block[-1]
        e = first.enorm(self.backbone.embeddings(next_ids))
        x = first.eh_proj(torch.cat([e, first.hnorm(hidden.to(e.dtype))], dim=-1))
        pos = None if cache is None else cache.mtp_seq_lens.tolist()
        for j, layer in enumerate(block):
            index = (depth % stored) * self.mtp.depth_size + j
            x = layer(x, None if cache is None else cache.mtp_layers[index], pos, seq_idx)
        if cache is not None:
            cache.mtp_seq_lens += next_ids.shape[1]
        x = last.final_layernorm(x)
        return self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x).float(), x

    def new_cache(self, batch: int, max_len: int, options: CacheOptions | None = None,
                  dtype: torch.dtype | None = None, device=None, ssm_dtype: torch.dtype | None = None) -> HybridCache:
        opts = options or CacheOptions()
        p = self.backbone.embeddings.weight   # never quantized, unlike lm_head
        dtype, device = dtype or p.dtype, device or p.device
        ssm_dtype = ssm_dtype or DTYPES.get(opts.ssm_dtype or self.config.mamba_ssm_cache_dtype, torch.float32)
        generator = torch.Generator(device).manual_seed(opts.seed) if opts.ssm_rounding == "stochastic" else None

        def state(block: HybridBlock):
            m = block.mixer
            if block.kind == "attention":
                return opts.kv_state(m, batch, max_len, dtype, device)
            if block.kind == "mamba":
                return m.new_state(batch, dtype, ssm_dtype, device, opts.ssm_rounding, generator)
            return None

        mtp = [state(b) for b in self.mtp.layers] if self.mtp is not None else None
        return HybridCache([state(b) for b in self.backbone.layers], mtp)
