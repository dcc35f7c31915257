"""One file per architecture family, each implementing the `CausalLM` contract (contract.py) and
defining its `Family` (checkpoint names, parameter and state accounting). `FAMILIES` registers them
by config class; `family(config)` finds a config's family and `build_model(config)` builds its model."""

from __future__ import annotations

from nemotron.config import AnyConfig
from nemotron.models import llama_nas, nemotron4, nemotron_h
from nemotron.models.contract import CausalLM, ExpertNames, Family, NameMap, contract_violations

__all__ = ["FAMILIES", "CausalLM", "ExpertNames", "Family", "NameMap", "build_model", "contract_violations",
           "family"]

# config class -> family; a config subclass uses its base's family (NemotronNASConfig, LlamaConfig and
# MistralConfig are LlamaDecoderConfig)
FAMILIES: dict[type, Family] = {f.config_class: f for f in (nemotron_h.FAMILY, nemotron4.FAMILY, llama_nas.FAMILY)}


def family(config: AnyConfig | type) -> Family:
    """The family of a config (or config class)."""
    klass = config if isinstance(config, type) else type(config)
    for base in klass.__mro__:
        if base in FAMILIES:
            return FAMILIES[base]
    raise TypeError(f"no model for config type {klass.__name__}")


def build_model(config: AnyConfig) -> CausalLM:
    return family(config).build(config)
