"""What every model family provides, so that callers (inference, training, quantization, checkpoint
io, `nemotron info`) use one interface instead of probing attributes or branching on config types.

`CausalLM` is the model: logits, final hidden states, the head, the inference state, the block list
and the (optional) MTP block. `Family` is the family around it: the config class it builds from, how
its checkpoints name tensors (`NameMap`) and what its parameters and inference state amount to. The
registry in `nemotron.models` maps config classes to families (`family(config)`, `build_model`).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from nemotron.layers.cache import CacheMode, CacheOptions, HybridCache, StateCapture

# --------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------


@runtime_checkable
class CausalLM(Protocol):
    """A causal language model of any family (Nemotron-H, Nemotron-4, Llama-Nemotron / Llama / Mistral).

    config: the family's config dataclass. lm_head: the output projection (a module with `.weight`
    [V, H]). mtp: the multi-token-prediction block, or None (always defined). blocks: the residual
    blocks in order (Nemotron-H's `backbone.layers`, the decoders' `model.layers`: the checkpoint
    names are unchanged, `blocks` is a view).

    forward / hidden_states take the cache mode explicitly (`CacheMode`): "dynamic" (the default:
    tokens continue each row of `cache`, which the forward advances), "static" (one token per row at
    `positions` [B], whole-buffer attention for torch.compile; the caller advances `cache.seq_lens`),
    "verify" (as dynamic, with per-token Mamba snapshots for `cache.rollback`). `seq_idx` [B, T]:
    packed training sequences (no cache), which share no attention or state. `capture` (a
    `StateCapture`, dynamic mode): the Mamba states at offsets inside the forward, for prefix-cache
    blocks (a model without Mamba layers captures nothing).

    `lm_head(hidden_states(ids, ...)).float()` equals `forward(ids, ...)`. Models are nn.Modules, so
    on Python 3.12+ `isinstance(model, CausalLM)` cannot see registered submodules (it looks
    attributes up statically): use `contract_violations` to check a model."""

    config: Any
    lm_head: nn.Module
    mtp: nn.Module | None

    @property
    def blocks(self) -> nn.ModuleList: ...

    def forward(self, input_ids: torch.Tensor, cache: HybridCache | None = None, logits_to_keep: int = 0, *,
                mode: CacheMode = "dynamic", positions: torch.Tensor | None = None,
                seq_idx: torch.Tensor | None = None, capture: StateCapture | None = None,
                return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] fp32 (of the last `logits_to_keep` positions when > 0); with return_hidden,
        (logits, final hidden states [B, T, H]) in one call."""
        ...

    def hidden_states(self, input_ids: torch.Tensor, cache: HybridCache | None = None, *,
                      mode: CacheMode = "dynamic", positions: torch.Tensor | None = None,
                      seq_idx: torch.Tensor | None = None, capture: StateCapture | None = None) -> torch.Tensor:
        """The final-normed hidden states [B, T, H]: what lm_head (and the MTP block) consume."""
        ...

    def mtp_forward(self, hidden: torch.Tensor, next_ids: torch.Tensor, depth: int = 0,
                    cache: HybridCache | None = None, seq_idx: torch.Tensor | None = None,
                    logits_to_keep: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """One MTP depth: (logits, hidden for the next depth). Raises ValueError when `mtp` is None."""
        ...

    def new_cache(self, batch: int, max_len: int, options: CacheOptions | None = None,
                  dtype: torch.dtype | None = None, device=None,
                  ssm_dtype: torch.dtype | None = None) -> HybridCache:
        """An empty inference state for `batch` sequences of up to `max_len` tokens."""
        ...


_METHODS = ("forward", "hidden_states", "mtp_forward", "new_cache")


def contract_violations(model: object) -> list[str]:
    """What `model` lacks of the CausalLM contract (empty: it satisfies it). Explicit attribute checks,
    which see nn.Module submodules on every Python version."""
    problems = []
    for name in ("config", "lm_head", "mtp", "blocks"):
        if not hasattr(model, name):
            problems.append(f"no attribute {name!r}")
    for name in _METHODS:
        if not callable(getattr(model, name, None)):
            problems.append(f"no method {name!r}")
    if hasattr(model, "lm_head") and not isinstance(getattr(model.lm_head, "weight", None), torch.Tensor):
        problems.append("lm_head has no weight tensor")
    if hasattr(model, "mtp") and not (model.mtp is None or isinstance(model.mtp, nn.Module)):
        problems.append("mtp is neither a module nor None")
    if hasattr(model, "blocks") and not isinstance(model.blocks, nn.ModuleList):
        problems.append("blocks is not an nn.ModuleList")
    return problems


# --------------------------------------------------------------------------------------------------
# checkpoint names
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertNames:
    """Routed experts: stacked in the model (`...mixer.experts.up_proj [E, I, X]`, a quantized
    checkpoint's scales likewise, `..._weight_scale` ...), one tensor per expert in the release
    checkpoints (`...mixer.experts.{e}.up_proj.weight`, `.weight_scale` ...).

    `single`: a release name, groups (prefix, expert, projection, tensor kind). `stacked`: our name,
    groups (prefix, projection, kind or None for the weight)."""

    single: re.Pattern
    stacked: re.Pattern

    def ours(self, name: str) -> tuple[str, int] | None:
        """A per-expert checkpoint name -> (our stacked parameter, expert index); None for others."""
        m = self.single.match(name)
        if not m:
            return None
        suffix = "" if m.group(4) == "weight" else "_" + m.group(4)
        return f"{m.group(1)}.{m.group(3)}{suffix}", int(m.group(2))

    def release(self, name: str, expert: int) -> str | None:
        """Our stacked parameter's name -> expert `expert`'s release name; None for other names."""
        m = self.stacked.match(name)
        if not m:
            return None
        return f"{m.group(1)}.{expert}.{m.group(2)}.{m.group(3) or 'weight'}"


@dataclass(frozen=True)
class NameMap:
    """How the writers of one family's checkpoints name its tensors, as data.

    `renames`: (pattern, replacement) applied in order to every checkpoint name, turning each writer's
    spelling into ours. `experts`: routed experts, stored stacked by us and one by one in checkpoints
    (a routed expert's own tensor is loaded into slot {e} of our stacked parameter, and split again
    on saving). `tied`: (head, embedding), our names: with `tie_word_embeddings` and no head tensor in
    the checkpoint, the head is read from the embedding's tensor. `tied_copy`: a head tensor that some
    exporters store beside a tied embedding although the model owns no such parameter; it is dropped
    (transformers ties it to the embedding too). `optional`: (prefix, config field) for a part that a
    writer may leave out whole; then the model is built without it."""

    renames: tuple[tuple[re.Pattern, str], ...] = ()
    experts: ExpertNames | None = None
    tied: tuple[str, str] | None = None
    tied_copy: str | None = None
    optional: tuple[tuple[str, str], ...] = ()


# VL / Omni checkpoints wrap the LLM in `language_model.`
UNWRAP_LANGUAGE_MODEL = (re.compile(r"^language_model\."), "")


# --------------------------------------------------------------------------------------------------
# the family
# --------------------------------------------------------------------------------------------------


class Family(ABC):
    """One architecture family: the config class it builds from (a subclass of it too), the model it
    builds, its checkpoints' names, and its accounting (what `nemotron info` reports). Each family
    module defines one instance (`FAMILY`); `nemotron.models.FAMILIES` registers them."""

    config_class: ClassVar[type]
    name_map: ClassVar[NameMap]

    @abstractmethod
    def build(self, config) -> CausalLM:
        ...

    @abstractmethod
    def layer_pattern(self, config) -> str:
        """The layer stack in one line (Nemotron-H's pattern, or one token per decoder layer)."""
        ...

    @abstractmethod
    def state_bytes(self, config, dtype_bytes: int = 2, ssm_dtype_bytes: int = 4) -> dict[str, int]:
        """{"kv_bytes_per_token": all attention layers, "mamba_state_bytes_per_sequence": conv + SSM}."""
        ...

    def inactive_params(self, config, name: str, numel: int) -> int:
        """How many of state-dict tensor `name`'s `numel` parameters one token does not use (routed
        experts outside its top-k); 0 for a dense family."""
        return 0

    def summary(self, config) -> dict[str, Any]:
        """Family-specific entries of `nemotron info` (layer counts, experts)."""
        return {}
