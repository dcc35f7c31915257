"""One config dataclass per architecture family, read from and written to Hugging Face `config.json`.

Each family reads every field of the released configs, its legacy aliases and the forms transformers 5
writes (layer-type lists, `rope_parameters`, `{"__float__": "Infinity"}`), keeps keys it does not use
in `extra`, and writes the *release* layout back (what NVIDIA ships, which transformers, vLLM and
llama.cpp's converter all read).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from nemotron.errors import ConfigError
from nemotron.files import is_present, json_kind, read_json

# dtype names as config.json writes them (`torch_dtype`, `mamba_ssm_cache_dtype`)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Upper bounds on the sizes a config may ask for, checked before anything is built: each is several
# times the largest released Nemotron (presets.py: 162 layers in Llama-Nemotron Ultra, hidden 18432 in
# Nemotron-4 340B, an FFN of 425984 in Ultra's widest block, 512 experts in Nemotron 3 Ultra, vocab
# 256000), so every real checkpoint loads while an absurd config fails fast with little memory.
MAX_LAYERS = 1024
SIZE_LIMITS: dict[str, int] = {
    "vocab_size": 1 << 22,
    "hidden_size": 1 << 17,
    "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 20,
    "moe_shared_expert_intermediate_size": 1 << 20, "moe_latent_size": 1 << 20,
    "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "mamba_num_heads": 1 << 12,
    "head_dim": 1 << 12, "mamba_head_dim": 1 << 12, "ssm_state_size": 1 << 12, "n_groups": 1 << 12,
    "conv_kernel": 1 << 10, "chunk_size": 1 << 16,
    "n_routed_experts": 1 << 14, "num_experts_per_tok": 1 << 14, "n_shared_experts": 64,
    "n_group": 1 << 14, "topk_group": 1 << 14,
    "num_nextn_predict_layers": 64, "num_hidden_layers": MAX_LAYERS,
    "max_position_embeddings": 1 << 27, "original_max_position_embeddings": 1 << 27,
}


def _show(value: Any) -> str:
    """A value quoted from a config in an error message: its JSON kind and a short repr."""
    text = repr(value)
    return f"{json_kind(value)} ({text[:60] + '...' if len(text) > 60 else text})"


def _decode_json_floats(value: Any) -> Any:
    """transformers 5 writes non-finite floats as {"__float__": "Infinity"}; plain json writes Infinity."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            try:
                return float(value["__float__"])
            except (TypeError, ValueError):
                raise ConfigError(f"config: {{'__float__': ...}} must hold a number, "
                                  f"got {_show(value['__float__'])}") from None
        return {k: _decode_json_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_json_floats(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------
# field types: every config dataclass is checked against its own annotations, in one place
# --------------------------------------------------------------------------------------------------

_NOUNS = {int: ("an integer", "integers"), float: ("a number", "numbers"), str: ("a string", "strings"),
          bool: ("true or false", "booleans"), type(None): ("null", "nulls")}


def _describe(hint: Any, plural: bool = False) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a, plural) for a in args)
    if hint in _NOUNS:
        return _NOUNS[hint][plural]
    if origin is list:
        return ("lists" if plural else "a list") + f" of {_describe(args[0], True)}"
    if origin is tuple:
        return ("lists" if plural else "a list") + f" of {len(args)} {_describe(args[0], True)}"
    if origin is dict or hint is Any:
        return "JSON objects" if plural else "a JSON object"
    return "objects" if plural else "an object"


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON-decoded value fits an annotation (JSON integers are fine for floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and len(value) == len(args) and \
            all(_matches(v, a) for v, a in zip(value, args))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(hint, type):
        return isinstance(value, hint)
    raise TypeError(f"config annotation {hint!r} has no JSON check")


@functools.cache
def _field_hints(klass: type) -> dict[str, Any]:
    return {k: v for k, v in typing.get_type_hints(klass).items()
            if k in {f.name for f in dataclasses.fields(klass)} and k != "extra"}


def check_types(klass: type, values: dict[str, Any], where: str, keys: dict[str, str] | None = None) -> None:
    """ConfigError naming the key (`keys`: field -> the key the file used, an alias maybe) when a
    value does not fit its field's annotation, or an integer exceeds SIZE_LIMITS."""
    for name, hint in _field_hints(klass).items():
        if name not in values:
            continue
        value, key = values[name], (keys or {}).get(name, name)
        if not _matches(value, hint):
            raise ConfigError(f"{where}: {key} must be {_describe(hint)}, got {_show(value)}")
        limit = SIZE_LIMITS.get(name)
        if limit is not None and isinstance(value, int) and value > limit:
            raise ConfigError(f"{where}: {key}={value} exceeds the supported maximum of {limit}")


@dataclass
class BaseConfig:
    """Shared mechanics: alias resolution, unknown-key preservation, JSON round trip."""

    model_type: ClassVar[str] = ""
    architecture: ClassVar[str] = ""
    # legacy or alternative key -> canonical field name
    aliases: ClassVar[dict[str, str]] = {}

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_hf(cls, raw: dict[str, Any]) -> "BaseConfig":
        raw = _decode_json_floats(dict(raw))
        layers = raw.get("num_hidden_layers")   # checked first: the layer count bounds all per-layer work
        if layers is not None:
            check_types(_LayerCount, {"num_hidden_layers": layers}, f"{cls.model_type} config")
        raw = cls._normalize(raw)
        names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        kwargs: dict[str, Any] = {}
        keys: dict[str, str] = {}
        extra: dict[str, Any] = {}
        for key, value in raw.items():
            canonical = cls.aliases.get(key, key)
            if canonical in names:
                # the canonical key wins over an alias when both are present
                if canonical in kwargs and key != canonical:
                    continue
                kwargs[canonical], keys[canonical] = value, key
            elif key not in ("model_type", "architectures", "num_hidden_layers"):
                extra[key] = value
        check_types(cls, kwargs, f"{cls.model_type} config", keys)
        config = cls(**kwargs, extra=extra)
        config.validate()
        return config

    @classmethod
    def _normalize(cls, raw: dict[str, Any]) -> dict[str, Any]:
        """Family hook: turn alternative representations into canonical fields."""
        return raw

    def validate(self) -> None:
        """Family hook: raise ConfigError for values no model can have."""

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_type}
        for f in dataclasses.fields(self):
            # unset optional fields are left out, as the released configs do
            if f.name != "extra" and getattr(self, f.name) is not None:
                out[f.name] = getattr(self, f.name)
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return dict(sorted(out.items()))

    def replace(self, **changes: Any) -> "BaseConfig":
        check_types(type(self), changes, f"{self.model_type} config")
        config = dataclasses.replace(self, **changes, extra=dict(self.extra))
        config.validate()
        return config

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{self.model_type} config: {name} must be a positive integer, got {_show(value)}")


@dataclass
class _LayerCount:
    """`num_hidden_layers` where a family derives it (from the layer pattern or the block list)."""

    num_hidden_layers: int = 0


# --------------------------------------------------------------------------------------------------
# Nemotron-H / Nemotron Nano 2 / Nemotron 3
# --------------------------------------------------------------------------------------------------

LAYER_CHARS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
_LIST_TO_CHAR = {
    "linear_attention": "M", "mamba": "M",
    "full_attention": "*", "attention": "*",
    "mlp": "-", "moe": "E",
}
_CHAR_TO_LIST = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def _pattern(value: Any, key: str) -> str:
    """A layer pattern from either the release string or transformers 5's list form."""
    if isinstance(value, (str, list)) and len(value.replace("|", "") if isinstance(value, str) else value) > MAX_LAYERS:
        raise ConfigError(f"nemotron_h config: {key} has {len(value)} layers, exceeding the supported maximum "
                          f"of {MAX_LAYERS}")
    if isinstance(value, str):
        # Megatron's unified form separates pipeline stages with '|'
        value = value.replace("|", "")
        bad = sorted(set(value) - set(LAYER_CHARS))
        if bad:
            raise ConfigError(f"nemotron_h config: unknown layer type {bad[0]!r} in {key} (known: M * - E)")
        return value
    if isinstance(value, list):
        out = []
        for item in value:
            if not isinstance(item, str) or item not in _LIST_TO_CHAR:
                raise ConfigError(
                    f"nemotron_h config: unknown layer type {_show(item)} in {key} "
                    f"(known: {', '.join(sorted(_LIST_TO_CHAR))})"
                )
            out.append(_LIST_TO_CHAR[item])
        return "".join(out)
    raise ConfigError(f"nemotron_h config: {key} must be a string or a list, got {json_kind(value)}")


@dataclass
class NemotronHConfig(BaseConfig):
    model_type: ClassVar[str] = "nemotron_h"
    architecture: ClassVar[str] = "NemotronHForCausalLM"
    aliases: ClassVar[dict[str, str]] = {
        "mamba_n_groups": "n_groups",
        "mamba_d_conv": "conv_kernel",
        "mamba_expand": "expand",
        "mamba_dt_min": "time_step_min",
        "mamba_dt_max": "time_step_max",
        "mamba_dt_limit": "time_step_limit",
        "mamba_dt_init_floor": "time_step_floor",
        "mamba_conv_bias": "use_conv_bias",
        "mamba_chunk_size": "chunk_size",
        "attention_head_dim": "head_dim",
        "num_local_experts": "n_routed_experts",
    }

    hybrid_override_pattern: str = "M-M*-"
    vocab_size: int = 131072
    hidden_size: int = 4096
    # attention
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    attention_bias: bool = False
    # dense MLP
    intermediate_size: int = 21504
    mlp_hidden_act: str = "relu2"
    mlp_bias: bool = False
    # Mamba-2
    mamba_num_heads: int = 128
    mamba_head_dim: int = 64
    ssm_state_size: int = 128
    n_groups: int = 8
    conv_kernel: int = 4
    chunk_size: int = 128
    use_conv_bias: bool = True
    use_bias: bool = False
    mamba_hidden_act: str = "silu"
    expand: int = 2  # unused for shapes: the inner width is mamba_num_heads * mamba_head_dim
    time_step_min: float = 0.001
    time_step_max: float = 0.1
    time_step_floor: float = 1e-4
    time_step_limit: tuple[float, float] = (0.0, math.inf)
    mamba_ssm_cache_dtype: str = "float32"
    # MoE
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    n_shared_experts: int = 1
    moe_latent_size: int | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    # MTP
    num_nextn_predict_layers: int = 0
    mtp_hybrid_override_pattern: str = "*E"
    # misc
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    torch_dtype: str | None = None

    @classmethod
    def _normalize(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = dict(raw)
        for list_key, str_key in (
            ("layers_block_type", "hybrid_override_pattern"),
            ("layer_types", "hybrid_override_pattern"),
            ("mtp_layers_block_type", "mtp_hybrid_override_pattern"),
        ):
            if list_key in raw:
                value = raw.pop(list_key)
                if str_key not in raw and value is not None:
                    raw[str_key] = value
        for key in ("hybrid_override_pattern", "mtp_hybrid_override_pattern"):
            if key in raw:
                raw[key] = _pattern(raw[key], key)
        if "dtype" in raw and "torch_dtype" not in raw:
            raw["torch_dtype"] = raw.pop("dtype")
        layers = raw.get("num_hidden_layers")
        pattern = raw.get("hybrid_override_pattern")
        if layers is not None and pattern is not None and layers != len(pattern):
            raise ConfigError(
                f"nemotron_h config: num_hidden_layers={layers} but the layer pattern has {len(pattern)} layers"
            )
        if raw.get("num_key_value_heads") is None and "num_attention_heads" in raw:
            raw["num_key_value_heads"] = raw["num_attention_heads"]
        return raw

    def validate(self) -> None:
        self.hybrid_override_pattern = _pattern(self.hybrid_override_pattern, "hybrid_override_pattern")
        self.mtp_hybrid_override_pattern = _pattern(self.mtp_hybrid_override_pattern, "mtp_hybrid_override_pattern")
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)
        if not self.hybrid_override_pattern:
            raise ConfigError("nemotron_h config: the layer pattern is empty")
        if self.num_nextn_predict_layers < 0:
            raise ConfigError("nemotron_h config: num_nextn_predict_layers must be >= 0")
        if self.num_nextn_predict_layers and not self.mtp_hybrid_override_pattern:
            raise ConfigError("nemotron_h config: mtp_hybrid_override_pattern is empty but MTP layers are enabled")
        mtp_layers = self.num_nextn_predict_layers * len(self.mtp_hybrid_override_pattern)
        if mtp_layers > MAX_LAYERS:   # each MTP depth repeats the whole MTP pattern
            raise ConfigError(f"nemotron_h config: {self.num_nextn_predict_layers} MTP depths of "
                              f"{len(self.mtp_hybrid_override_pattern)} layers exceed the supported maximum of "
                              f"{MAX_LAYERS} MTP layers")
        self._positive("vocab_size", "hidden_size")
        if self.mamba_ssm_cache_dtype not in DTYPES:
            raise ConfigError(f"nemotron_h config: mamba_ssm_cache_dtype={self.mamba_ssm_cache_dtype!r} is not "
                              f"supported ({', '.join(DTYPES)})")
        kinds = set(self.hybrid_override_pattern) | (
            set(self.mtp_hybrid_override_pattern) if self.num_nextn_predict_layers else set()
        )
        if "*" in kinds:
            self._positive("num_attention_heads", "num_key_value_heads", "head_dim")
            if self.num_attention_heads % self.num_key_value_heads:
                raise ConfigError(
                    f"nemotron_h config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                    f"num_key_value_heads={self.num_key_value_heads}"
                )
        if "M" in kinds:
            self._positive("mamba_num_heads", "mamba_head_dim", "ssm_state_size", "n_groups", "conv_kernel", "chunk_size")
            if self.mamba_num_heads % self.n_groups:
                raise ConfigError(
                    f"nemotron_h config: mamba_num_heads={self.mamba_num_heads} is not a multiple of "
                    f"n_groups={self.n_groups}"
                )
        if "E" in kinds:
            self._positive("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group")
            if self.n_routed_experts % self.n_group:
                raise ConfigError(
                    f"nemotron_h config: n_routed_experts={self.n_routed_experts} is not a multiple of n_group={self.n_group}"
                )
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ConfigError("nemotron_h config: num_experts_per_tok exceeds n_routed_experts")
            if self.topk_group > self.n_group:
                raise ConfigError(f"nemotron_h config: topk_group={self.topk_group} exceeds n_group={self.n_group}")
            if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
                raise ConfigError("nemotron_h config: grouped routing needs at least 2 experts per group")
            if self.moe_latent_size is not None:
                self._positive("moe_latent_size")
            if self.n_shared_experts < 0 or self.moe_shared_expert_intermediate_size < 0:
                raise ConfigError("nemotron_h config: n_shared_experts and moe_shared_expert_intermediate_size "
                                  "must be >= 0")
        if "-" in kinds:
            self._positive("intermediate_size")
        for act_key, allowed in (("mlp_hidden_act", ("relu2",)), ("mamba_hidden_act", ("silu", "swish"))):
            if getattr(self, act_key) not in allowed:
                raise ConfigError(f"nemotron_h config: {act_key}={getattr(self, act_key)!r} is not supported ({allowed})")

    @property
    def num_hidden_layers(self) -> int:
        return len(self.hybrid_override_pattern)

    @property
    def layer_types(self) -> list[str]:
        """'mamba' / 'attention' / 'mlp' / 'moe' per layer."""
        return [LAYER_CHARS[c] for c in self.hybrid_override_pattern]

    @property
    def mamba_inner_size(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_inner_size + 2 * self.n_groups * self.ssm_state_size

    def to_hf(self) -> dict[str, Any]:
        out = super().to_hf()
        out["num_hidden_layers"] = self.num_hidden_layers
        out["time_step_limit"] = list(self.time_step_limit)
        if not self.num_nextn_predict_layers:
            out.pop("mtp_hybrid_override_pattern")
        return dict(sorted(out.items()))

    def to_transformers(self) -> dict[str, Any]:
        """The form transformers 5 writes (layer-type lists), for tests and tools that want it."""
        out = self.to_hf()
        out["layers_block_type"] = [_CHAR_TO_LIST[c] for c in out.pop("hybrid_override_pattern")]
        out["mtp_layers_block_type"] = [_CHAR_TO_LIST[c] for c in self.mtp_hybrid_override_pattern]
        out.pop("mtp_hybrid_override_pattern", None)
        return out


# --------------------------------------------------------------------------------------------------
# Rotary embeddings (shared by Nemotron-4 and Llama-Nemotron)
# --------------------------------------------------------------------------------------------------


@dataclass
class RopeScaling:
    """`rope_scaling` (transformers 4) / `rope_parameters` (transformers 5), without rope_theta."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "RopeScaling":
        if not d:
            return cls()
        rope_type = d.get("rope_type", d.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ConfigError(f"rope scaling type {rope_type!r} is not supported (default, llama3)")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known and k != "rope_type"}
        check_types(cls, values, "rope scaling")
        scaling = cls(rope_type=rope_type, **values)
        if rope_type == "llama3":
            factors = (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor,
                       scaling.original_max_position_embeddings)
            if not all(v > 0 for v in factors) or scaling.low_freq_factor == scaling.high_freq_factor:
                raise ConfigError("rope scaling: factor, low_freq_factor, high_freq_factor and "
                                  "original_max_position_embeddings must be positive, and the two frequency "
                                  "factors distinct")
        return scaling

    def to_dict(self) -> dict[str, Any] | None:
        if self.rope_type == "default":
            return None
        return dataclasses.asdict(self)


def _split_rope_parameters(raw: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 folds rope_theta / partial_rotary_factor / scaling into `rope_parameters`."""
    raw = dict(raw)
    params = raw.pop("rope_parameters", None)
    if isinstance(params, dict):
        params = dict(params)
        for key in ("rope_theta", "partial_rotary_factor"):
            if key in params:
                raw.setdefault(key, params.pop(key))
        if params.get("rope_type", "default") != "default":
            raw.setdefault("rope_scaling", params)
    if isinstance(raw.get("rope_scaling"), dict):
        raw["rope_scaling"] = RopeScaling.from_dict(raw["rope_scaling"])
    elif raw.get("rope_scaling") is None:
        raw.pop("rope_scaling", None)
    return raw


# --------------------------------------------------------------------------------------------------
# Nemotron-4 / Minitron
# --------------------------------------------------------------------------------------------------


@dataclass
class Nemotron4Config(BaseConfig):
    model_type: ClassVar[str] = "nemotron"
    architecture: ClassVar[str] = "NemotronForCausalLM"
    aliases: ClassVar[dict[str, str]] = {
        "rope_percent": "partial_rotary_factor",
        "layer_norm_eps": "norm_eps",
        "kv_channels": "head_dim",
    }

    vocab_size: int = 256000
    hidden_size: int = 6144
    intermediate_size: int = 24576
    num_hidden_layers: int = 32
    num_attention_heads: int = 48
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "relu2"
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    norm_eps: float = 1e-5
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    initializer_range: float = 0.0134
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 3
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    @classmethod
    def _normalize(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = _split_rope_parameters(raw)
        raw.pop("rope_scaling", None)  # Nemotron-4 uses plain (partial) RoPE
        if "dtype" in raw and "torch_dtype" not in raw:
            raw["torch_dtype"] = raw.pop("dtype")
        return raw

    def validate(self) -> None:
        self._positive("hidden_size", "num_attention_heads")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._positive("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                       "num_key_value_heads", "head_dim")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("nemotron config: num_attention_heads is not a multiple of num_key_value_heads")
        if self.hidden_act != "relu2":
            raise ConfigError(f"nemotron config: hidden_act={self.hidden_act!r} is not supported (relu2)")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError("nemotron config: partial_rotary_factor must be in (0, 1]")



# --------------------------------------------------------------------------------------------------
# The Llama decoder: Llama-Nemotron Super / Ultra (DeciLM, "nemotron-nas"), Llama and Mistral
# --------------------------------------------------------------------------------------------------
#
# One model (models/llama_nas.py) serves three config.json layouts. DeciLM lists a block per layer;
# Llama and Mistral are its uniform case (every layer the same GQA width and FFN size), so their
# configs derive the same `block_configs` from their flat keys and nothing downstream tells them apart.

# per-block keys of Puzzle's newer block layout (ModelOpt's `AttentionConfig.num_key_value_heads`,
# `FFNConfig.intermediate_size`), written only when set: the released DeciLM blocks carry neither
_EXPLICIT_BLOCK_KEYS = ("num_key_value_heads", "intermediate_size")


@dataclass
class AttentionBlockConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None
    num_key_value_heads: int | None = None   # explicit KV heads; otherwise heads // n_heads_in_group
    extra: dict[str, Any] = field(default_factory=dict)

    def kv_heads(self, num_attention_heads: int) -> int:
        """The KV heads of a GQA block."""
        if self.num_key_value_heads is not None:
            return self.num_key_value_heads
        return num_attention_heads // self.n_heads_in_group


@dataclass
class FFNBlockConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    ffn_mult: float | None = None
    intermediate_size: int | None = None   # explicit width; otherwise derived from ffn_mult
    extra: dict[str, Any] = field(default_factory=dict)

    def width(self, hidden_size: int) -> int:
        """The intermediate size of a SwiGLU block."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        return ffn_mult_to_intermediate_size(self.ffn_mult, hidden_size)


@dataclass
class BlockConfig:
    attention: AttentionBlockConfig
    ffn: FFNBlockConfig

    @classmethod
    def from_dict(cls, d: dict[str, Any], index: int) -> "BlockConfig":
        if not isinstance(d, dict) or "attention" not in d or "ffn" not in d:
            raise ConfigError(f"nemotron-nas config: block_configs[{index}] needs 'attention' and 'ffn'")

        def split(part: str, klass):
            sub = d[part]
            where = f"nemotron-nas config: block_configs[{index}].{part}"
            if not isinstance(sub, dict):
                raise ConfigError(f"{where} must be a JSON object, got {_show(sub)}")
            known = {f.name for f in dataclasses.fields(klass)} - {"extra"}
            values = {k: v for k, v in sub.items() if k in known}
            check_types(klass, values, where)
            return klass(**values, extra={k: v for k, v in sub.items() if k not in known})

        return cls(split("attention", AttentionBlockConfig), split("ffn", FFNBlockConfig))

    def to_dict(self) -> dict[str, Any]:
        def join(sub) -> dict[str, Any]:
            d = {k: v for k, v in dataclasses.asdict(sub).items()
                 if k != "extra" and not (k in _EXPLICIT_BLOCK_KEYS and v is None)}
            d.update(sub.extra)
            return d

        return {"attention": join(self.attention), "ffn": join(self.ffn)}


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM: int(2 * ffn_mult * H / 3) rounded up to a multiple of 256."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size + (-size) % 256


@dataclass
class LlamaDecoderConfig(BaseConfig):
    """What every config built by `models.llama_nas.build_llama_nas` shares: RMSNorm, GQA with RoPE
    (plain or llama3-scaled), SwiGLU, an explicit or derived head_dim. Each subclass provides
    `block_configs`, one BlockConfig per layer: DeciLM stores them, Llama and Mistral derive them."""

    vocab_size: int = 128256
    hidden_size: int = 8192
    num_attention_heads: int = 64
    head_dim: int | None = None   # None in a file: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    @classmethod
    def _normalize(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = _split_rope_parameters(raw)
        if "dtype" in raw and "torch_dtype" not in raw:
            raw["torch_dtype"] = raw.pop("dtype")
        return raw

    def validate(self) -> None:
        where = f"{self.model_type} config"
        self._positive("vocab_size", "hidden_size", "num_attention_heads")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"{where}: hidden_size={self.hidden_size} is not a multiple of "
                                  f"num_attention_heads={self.num_attention_heads} (and no head_dim is given)")
            self.head_dim = self.hidden_size // self.num_attention_heads
        self._positive("head_dim")
        if self.hidden_act != "silu":
            raise ConfigError(f"{where}: hidden_act={self.hidden_act!r} is not supported (silu)")
        # a partial rotary fraction would land in `extra` and be ignored: refuse it instead
        fraction = self.extra.get("partial_rotary_factor", 1.0)
        if fraction not in (None, 1, 1.0):
            raise ConfigError(f"{where}: partial_rotary_factor={fraction!r} is not supported (1.0)")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling.from_dict(self.rope_scaling)
        heads = self.num_attention_heads
        for i, block in enumerate(self.block_configs):
            a, f = block.attention, block.ffn
            if not (a.no_op or a.replace_with_linear):
                kv, group = a.num_key_value_heads, a.n_heads_in_group
                if kv is not None:
                    if kv <= 0 or heads % kv:
                        raise ConfigError(f"{where}: block_configs[{i}].attention.num_key_value_heads={kv} must "
                                          f"divide num_attention_heads={heads}")
                    if group is not None and group * kv != heads:
                        raise ConfigError(f"{where}: block_configs[{i}].attention has n_heads_in_group={group} "
                                          f"but num_key_value_heads={kv} (num_attention_heads={heads})")
                elif not isinstance(group, int) or group <= 0 or heads % group:
                    raise ConfigError(f"{where}: block_configs[{i}].attention.n_heads_in_group={group!r} must "
                                      f"divide num_attention_heads={heads}")
            if not (f.no_op or f.replace_with_linear):
                if f.intermediate_size is not None:
                    if f.intermediate_size <= 0:
                        raise ConfigError(f"{where}: block_configs[{i}].ffn.intermediate_size must be positive")
                    continue
                if not isinstance(f.ffn_mult, (int, float)) or not 0 < f.ffn_mult < math.inf:
                    raise ConfigError(f"{where}: block_configs[{i}].ffn.ffn_mult must be positive")
                size = ffn_mult_to_intermediate_size(f.ffn_mult, self.hidden_size)
                if size > SIZE_LIMITS["intermediate_size"]:
                    raise ConfigError(f"{where}: block_configs[{i}].ffn.ffn_mult={f.ffn_mult} makes an "
                                      f"FFN of {size}, more than the supported {SIZE_LIMITS['intermediate_size']}")

    def to_hf(self) -> dict[str, Any]:
        out = super().to_hf()
        out["rope_scaling"] = self.rope_scaling.to_dict()
        return dict(sorted(out.items()))


@dataclass
class NemotronNASConfig(LlamaDecoderConfig):
    """Llama-Nemotron Super / Ultra (DeciLM): per-layer blocks that choose their GQA width and FFN
    width, or replace a half by one linear map, or drop it (`no_op`)."""

    model_type: ClassVar[str] = "nemotron-nas"
    architecture: ClassVar[str] = "DeciLMForCausalLM"

    block_configs: list[BlockConfig] = field(default_factory=list)

    @classmethod
    def _normalize(cls, raw: dict[str, Any]) -> dict[str, Any]:
        raw = super()._normalize(raw)
        blocks = raw.get("block_configs")
        if not isinstance(blocks, list) or not blocks:
            raise ConfigError("nemotron-nas config: block_configs must be a non-empty list")
        if len(blocks) > MAX_LAYERS:   # before any per-block work
            raise ConfigError(f"nemotron-nas config: block_configs has {len(blocks)} layers, exceeding the "
                              f"supported maximum of {MAX_LAYERS}")
        layers = raw.get("num_hidden_layers")
        if layers is not None and layers != len(blocks):
            raise ConfigError(f"nemotron-nas config: num_hidden_layers={layers} but block_configs has {len(blocks)}")
        raw["block_configs"] = [b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b, i)
                                for i, b in enumerate(blocks)]
        return raw

    @property
    def num_hidden_layers(self) -> int:
        return len(self.block_configs)

    def intermediate_size(self, layer: int) -> int:
        return self.block_configs[layer].ffn.width(self.hidden_size)

    def to_hf(self) -> dict[str, Any]:
        out = super().to_hf()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        out["num_hidden_layers"] = self.num_hidden_layers
        # the released configs carry these as null: sizes are per block
        out.setdefault("num_key_value_heads", None)
        out.setdefault("intermediate_size", None)
        # DeciLM derives head_dim from hidden_size / num_attention_heads; only a different one is written
        if self.head_dim == self.hidden_size // self.num_attention_heads:
            out.pop("head_dim", None)
        return dict(sorted(out.items()))


@dataclass
class LlamaConfig(LlamaDecoderConfig):
    """`LlamaForCausalLM` (Llama-3.1-Nemotron 70B / Nano 8B / Nano 4B, Llama-3.1-Minitron): the
    uniform-block case of the NAS family, read from and written to transformers' Llama config.json.
    Defaults are transformers' `LlamaConfig` defaults, for keys a config.json leaves out."""

    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_attention_heads: int = 32
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    num_hidden_layers: int = 32
    num_key_value_heads: int | None = None   # None in a file: num_attention_heads (MHA)
    intermediate_size: int = 11008

    def validate(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self._positive("vocab_size", "hidden_size", "num_attention_heads", "num_key_value_heads",
                       "num_hidden_layers", "intermediate_size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{self.model_type} config: num_key_value_heads={self.num_key_value_heads} does not "
                              f"divide num_attention_heads={self.num_attention_heads}")
        super().validate()

    @property
    def block_configs(self) -> list[BlockConfig]:
        """Every layer: GQA with num_key_value_heads, SwiGLU of intermediate_size."""
        return [BlockConfig(AttentionBlockConfig(num_key_value_heads=self.num_key_value_heads),
                            FFNBlockConfig(intermediate_size=self.intermediate_size))
                for _ in range(self.num_hidden_layers)]


@dataclass
class MistralConfig(LlamaConfig):
    """`MistralForCausalLM` (Mistral-NeMo-Minitron): the Llama decoder without biases and with an
    optional sliding window, supported only where it never slides (null, or at least the context)."""

    model_type: ClassVar[str] = "mistral"
    architecture: ClassVar[str] = "MistralForCausalLM"

    # transformers' MistralConfig defaults
    max_position_embeddings: int = 131072
    num_key_value_heads: int | None = 8
    intermediate_size: int = 14336
    sliding_window: int | None = 4096

    def validate(self) -> None:
        super().validate()
        if self.attention_bias or self.mlp_bias:
            # MistralForCausalLM's projections have no bias whatever the config says
            raise ConfigError("mistral config: attention_bias / mlp_bias are not supported (Mistral has no biases)")
        w = self.sliding_window
        if w is not None and w < self.max_position_embeddings:
            raise ConfigError(f"mistral config: sliding_window={w} is below max_position_embeddings="
                              f"{self.max_position_embeddings}; sliding-window attention is not supported")

    def to_hf(self) -> dict[str, Any]:
        out = super().to_hf()
        out.pop("attention_bias", None)
        out.pop("mlp_bias", None)
        out["sliding_window"] = self.sliding_window   # written even when null: transformers' default is 4096
        return dict(sorted(out.items()))


FAMILIES: dict[str, type[BaseConfig]] = {
    c.model_type: c for c in (NemotronHConfig, Nemotron4Config, NemotronNASConfig, LlamaConfig, MistralConfig)
}

AnyConfig = NemotronHConfig | Nemotron4Config | NemotronNASConfig | LlamaConfig | MistralConfig


def config_from_dict(raw: dict[str, Any]) -> AnyConfig:
    """Dispatch on `model_type` (with the architectures list as a fallback)."""
    if not isinstance(raw, dict):
        raise ConfigError("config.json must hold a JSON object")
    model_type = raw.get("model_type")
    architectures = raw.get("architectures")
    if architectures is not None and not (isinstance(architectures, list)
                                          and all(isinstance(a, str) for a in architectures)):
        raise ConfigError(f"config: architectures must be a list of strings, got {_show(architectures)}")
    if model_type is None:
        arch = (architectures or [None])[0]
        model_type = {c.architecture: t for t, c in FAMILIES.items()}.get(arch)
    if model_type is not None and not isinstance(model_type, str):
        raise ConfigError(f"config: model_type must be a string, got {_show(model_type)}")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"unsupported model_type {model_type!r} (supported: {', '.join(FAMILIES)})"
        )
    return FAMILIES[model_type].from_hf(raw)


def load_config(path: str | Path) -> AnyConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not is_present(path):
        raise ConfigError(f"no config.json at {path}")
    raw = read_json(path, ConfigError)
    try:
        return config_from_dict(raw)
    except ConfigError as e:   # say which file was wrong
        raise ConfigError(f"{path}: {e}") from None


def save_config(config: AnyConfig, path: str | Path) -> None:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    path.write_text(json.dumps(config.to_hf(), indent=2) + "\n")
