"""One file per architecture family; `build_model(config)` picks the right one."""

from __future__ import annotations

from torch import nn

from nemotron.config import AnyConfig, LlamaDecoderConfig, Nemotron4Config, NemotronHConfig


def build_model(config: AnyConfig) -> nn.Module:
    if isinstance(config, NemotronHConfig):
        from nemotron.models.nemotron_h import NemotronHForCausalLM
        return NemotronHForCausalLM(config)
    if isinstance(config, Nemotron4Config):
        from nemotron.models.nemotron4 import build_nemotron4
        return build_nemotron4(config)
    if isinstance(config, LlamaDecoderConfig):   # DeciLM, and Llama / Mistral as its uniform case
        from nemotron.models.llama_nas import build_llama_nas
        return build_llama_nas(config)
    raise TypeError(f"no model for config type {type(config).__name__}")
