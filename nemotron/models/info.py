"""What a config amounts to: parameter counts (computed by building the model on the meta device),
weight memory per dtype and per-sequence inference state. What differs by family (routed experts,
the layer pattern, KV and Mamba state, extra entries) each family answers (`Family` in contract.py)."""

from __future__ import annotations

from typing import Any

import torch

from nemotron.config import AnyConfig
from nemotron.models import family

BYTES_PER_PARAM = {"float32": 4.0, "bfloat16": 2.0, "fp8": 1.0, "nvfp4": 0.5 + 1 / 16}  # nvfp4: 4 bits + e4m3 scale per 16


def count_params(config: AnyConfig) -> dict[str, int]:
    """total (main model, MTP excluded), active (per token: only top-k routed experts), mtp, embedding."""
    fam = family(config)
    with torch.device("meta"):
        model = fam.build(config)
    total = mtp = routed_inactive = 0
    for name, t in model.state_dict().items():
        n = t.numel()
        if name.startswith("mtp."):
            mtp += n
            continue
        total += n
        routed_inactive += fam.inactive_params(config, name, n)
    embedding = config.vocab_size * config.hidden_size
    return {"total": total, "active": total - routed_inactive, "mtp": mtp, "embedding": embedding}


def layer_pattern(config: AnyConfig) -> str:
    return family(config).layer_pattern(config)


def state_bytes(config: AnyConfig, dtype_bytes: int = 2, ssm_dtype_bytes: int = 4) -> dict[str, int]:
    """KV bytes per token (all attention layers) and Mamba conv + SSM bytes per sequence."""
    return family(config).state_bytes(config, dtype_bytes, ssm_dtype_bytes)


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
    out.update(family(config).summary(config))
    out.update(state_bytes(config))
    return out
