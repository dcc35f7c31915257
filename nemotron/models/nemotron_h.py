"""Nemotron-H, Nemotron Nano 2 and Nemotron 3 (`model_type: "nemotron_h"`).

Each position of the layer pattern is one pre-norm residual block holding one mixer:
`M` Mamba-2, `*` NoPE GQA attention, `-` squared-ReLU MLP, `E` (Latent)MoE. Optional MTP block
(`mtp.layers.*`) shares the embeddings and lm_head. Module names mirror the release checkpoint
(`backbone.embeddings`, `backbone.layers.{i}.norm`, `backbone.layers.{i}.mixer.*`, `backbone.norm_f`,
`lm_head`, `mtp.layers.{j}.*`), so only routed experts need a name map (they are stored stacked);
`NAME_MAP` also lists the other writers' spellings."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from nemotron.layers.cache import CacheMode, CacheOptions, HybridCache, KVState, MambaState, StateCapture, check_mode
from nemotron.config import DTYPES, LAYER_CHARS, NemotronHConfig
from nemotron.models.contract import UNWRAP_LANGUAGE_MODEL, ExpertNames, Family, NameMap
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
                pos: list[int] | torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                mode: CacheMode = "dynamic", capture: StateCapture | None = None) -> torch.Tensor:
        h = self.norm(x if x.dtype == self.norm.weight.dtype else x.to(self.norm.weight.dtype))
        if self.kind == "mamba":
            h = self.mixer(h, state, pos, seq_idx=seq_idx, mode=mode, capture=capture)
        elif self.kind == "attention":   # its keys and values are in the cache per position: no capture
            h = self.mixer(h, state, pos, seq_idx=seq_idx, mode=mode)
        else:
            h = self.mixer(h)
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

    @property
    def blocks(self) -> nn.ModuleList:
        """The residual blocks in order (`backbone.layers`, as the checkpoint names them)."""
        return self.backbone.layers

    def hidden_states(self, input_ids: torch.Tensor, cache: HybridCache | None = None, *,
                      mode: CacheMode = "dynamic", positions: torch.Tensor | None = None,
                      seq_idx: torch.Tensor | None = None, capture: StateCapture | None = None) -> torch.Tensor:
        """The final-normed hidden states [B, T, H] (what lm_head and the MTP block consume).

        `mode` (see CacheMode): "dynamic" continues each row of `cache` and advances it; "static" is
        the static-shape decode used under torch.compile, one token per row at `positions` [B] (a
        tensor), and the caller then advances `cache.seq_lens` itself; "verify" keeps the Mamba state
        after every token for `cache.rollback`. `seq_idx` [B, T] marks packed training sequences
        (non-decreasing per row): no state or attention crosses from one to the next. `capture`
        ("dynamic" mode): the Mamba states at offsets inside this forward (see StateCapture)."""
        check_mode(mode, cache, positions, capture)
        pos = positions if mode == "static" else None if cache is None else cache.positions()
        x = self.backbone.embeddings(input_ids)
        for i, layer in enumerate(self.backbone.layers):
            x = layer(x, None if cache is None else cache.layers[i], pos, seq_idx, mode, capture)
        if cache is not None and mode != "static":
            cache.seq_lens += input_ids.shape[1]
        return self.backbone.norm_f(x.to(self.backbone.norm_f.weight.dtype))

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None, logits_to_keep: int = 0, *,
                mode: CacheMode = "dynamic", positions: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None, capture: StateCapture | None = None,
                return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] fp32; with return_hidden, (logits, final hidden states) in one call (training
        with MTP: a single entry point is also what FSDP wraps). `mode` / `positions` / `capture`: as
        hidden_states."""
        h = self.hidden_states(input_ids, cache, mode=mode, positions=positions, seq_idx=seq_idx, capture=capture)
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
            x = layer(x, None if cache is None else cache.mtp_layers[index], pos, seq_idx)   # dynamic mode
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


# --------------------------------------------------------------------------------------------------
# the family: checkpoint names and accounting
# --------------------------------------------------------------------------------------------------

# routed experts: one tensor per expert in the release (its weight, or in quantized checkpoints one of
# its scales), stacked [E, ...] in the model
EXPERT_NAMES = ExpertNames(
    single=re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.(weight|weight_scale|weight_scale_2|input_scale)$"),
    stacked=re.compile(r"^(.*\.mixer\.experts)\.(up_proj|down_proj)(?:_(weight_scale_2|weight_scale|input_scale))?$"),
)

# Only what differs from our module names is listed. Checked against transformers 4.57.6, 5.0.0, 5.3.0,
# 5.5.0, 5.10.1, 5.14.0, 5.18.0 and 5.23.0 save_pretrained, and NVIDIA's released Nemotron-H / Nano 2 /
# Nemotron 3 checkpoints.
NAME_MAP = NameMap(
    renames=(
        UNWRAP_LANGUAGE_MODEL,
        # transformers 5's own module names (save_pretrained(save_original_format=False), a raw
        # state_dict): `model.` where the release has `backbone.`; experts stacked [E, I, H] as ours
        (re.compile(r"^model\."), "backbone."),
        # the singular embedding: transformers 5.3-5.15 save_pretrained (its conversion mapping's
        # `embedding.weight` -> `embeddings.weight` rename, reversed on save), mamba_ssm and early
        # stubs; NVIDIA's remote code reads it too. The releases all write `embeddings`.
        (re.compile(r"^backbone\.embedding\.weight$"), "backbone.embeddings.weight"),
    ),
    experts=EXPERT_NAMES,
    # NVIDIA's remote code ties lm_head with tie_word_embeddings and then saves no lm_head; our
    # lm_head is its own parameter (as in transformers' NemotronH, which never ties)
    tied=("lm_head.weight", "backbone.embeddings.weight"),
    # transformers implements no MTP: it saves a config with num_nextn_predict_layers > 0 and no
    # `mtp.` tensor
    optional=(("mtp.", "num_nextn_predict_layers"),),
)


class NemotronHFamily(Family):
    config_class = NemotronHConfig
    name_map = NAME_MAP

    def build(self, config: NemotronHConfig) -> NemotronHForCausalLM:
        return NemotronHForCausalLM(config)

    def layer_pattern(self, config: NemotronHConfig) -> str:
        return config.hybrid_override_pattern

    def state_bytes(self, config: NemotronHConfig, dtype_bytes: int = 2, ssm_dtype_bytes: int = 4) -> dict[str, int]:
        kv = mamba = 0
        for kind in config.layer_types:
            if kind == "attention":
                kv += 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
            elif kind == "mamba":
                mamba += config.mamba_conv_dim * (config.conv_kernel - 1) * dtype_bytes
                mamba += config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * ssm_dtype_bytes
        return {"kv_bytes_per_token": kv, "mamba_state_bytes_per_sequence": mamba}

    def inactive_params(self, config: NemotronHConfig, name: str, numel: int) -> int:
        if ".mixer.experts." in name:   # routed experts: a token uses its top-k of them
            e, k = config.n_routed_experts, config.num_experts_per_tok
            return numel * (e - k) // e
        return 0

    def summary(self, config: NemotronHConfig) -> dict[str, Any]:
        kinds = config.layer_types
        out: dict[str, Any] = {"layer_counts": {k: kinds.count(k) for k in ("mamba", "attention", "mlp", "moe")
                                                if k in kinds}}
        if "moe" in kinds:
            out["experts"] = {"routed": config.n_routed_experts, "per_token": config.num_experts_per_tok,
                              "latent_size": config.moe_latent_size}
        return out


FAMILY = NemotronHFamily()
