"""What a config amounts to: parameter counts (computed by building the model on the meta device),
weight memory per dtype and per-sequence inference state."""

from __future__ import annotations

from typing import Any

import torch

from nemotron.config import AnyConfig, LlamaDecoderConfig, NemotronHConfig
from nemotron.models import build_model

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}  # nvfp4: 4 bits + e4m3 scale per 16


def count_params(config: AnyConfig) -> dict[str, int]:
    """total (main model, MTP excluded), active (per token: only top-k routed experts), mtp, embedding."""
    with torch.device("meta"):
        model = build_model(config)
    total = mtp = routed_inactive = 0
    for name, t in model.state_dict().items():
        n = t.numel()
        if name.startswith("mtp."):
            mtp += n
            continue
        total += n
        if ".mixer.experts." in name and isinstance(config, NemotronHConfig):
            e, k = config.n_routed_experts, config.num_experts_per_tok
            routed_inactive += n * (e - k) // e
    embedding = config.vocab_size * config.hidden_size
    return {"total": total, "active": total - routed_inactive, "mtp": mtp, "embedding": embedding}


def layer_pattern(config: AnyConfig) -> str:
    if isinstance(config, NemotronHConfig):
        return config.hybrid_override_pattern
    if isinstance(config, LlamaDecoderConfig):   # DeciLM blocks; Llama / Mistral: uniform "AF"
        # per layer: attention A / linear L / none .  then FFN F / linear L / none .
        def kind(sub) -> str:
            return "." if sub.no_op else "L" if sub.replace_with_linear else None

        return " ".join((kind(b.attention) or "A") + (kind(b.ffn) or "F") for b in config.block_configs)
    return " ".join("AF" for _ in range(config.num_hidden_layers))


def state_bytes(config: AnyConfig, dtype_bytes: int = 2, ssm_dtype_bytes: int = 4) -> dict[str, int]:
    """KV bytes per token (all attention layers) and Mamba conv + SSM bytes per sequence."""
    kv = mamba = 0
    if isinstance(config, NemotronHConfig):
        for kind in config.layer_types:
            if kind == "attention":
                kv += 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
            elif kind == "mamba":
                mamba += config.mamba_conv_dim * (config.conv_kernel - 1) * dtype_bytes
                mamba += config.mamba_num_heads * config.mamba_head_dim * config.ssm_state_size * ssm_dtype_bytes
    elif isinstance(config, LlamaDecoderConfig):
        for b in config.block_configs:
            a = b.attention
            if not (a.no_op or a.replace_with_linear):
                kv += 2 * a.kv_heads(config.num_attention_heads) * config.head_dim * dtype_bytes
    else:
        kv = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * dtype_bytes
    return {"kv_bytes_per_token": kv, "mamba_state_bytes_per_sequence": mamba}


def summarize(config: AnyConfig) -> dict[str, Any]:
    counts = count_params(config)
    out: dict[str, Any] = {
        "architecture": config.architecture,
        "model_type": config.model_type,
        "num_layers": config.num_hidden_layers,
        "layer_pattern": layer_pattern(config),
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "total_params": counts["total"],
        "active_params": counts["active"],
        "embedding_params": counts["embedding"],
        "mtp_params": counts["mtp"],
        "weight_bytes": {k: int(counts["total"] * v) for k, v in BYTES_PER_PARAM.items()},
    }
    if isinstance(config, NemotronHConfig):
        kinds = config.layer_types
        out["layer_counts"] = {k: kinds.count(k) for k in ("mamba", "attention", "mlp", "moe") if k in kinds}
        if "moe" in kinds:
            out["experts"] = {"routed": config.n_routed_experts, "per_token": config.num_experts_per_tok,
                              "latent_size": config.moe_latent_size}
    out.update(state_bytes(config))
    return out
