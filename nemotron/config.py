"""One config dataclass per architecture family, read from and written to Hugging Face `config.json`.

Each family reads every field of the released configs, its legacy aliases and the forms transformers 5
writes (layer-type lists, `rope_parameters`, `{"__float__": "Infinity"}`), keeps keys it does not use
in `extra`, and writes the *release* layout back (what NVIDIA ships, which transformers, vLLM and
llama.cpp's converter all read).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .errors import ConfigError

# dtype names as config.json writes them (`torch_dtype`, `mamba_ssm_cache_dtype`)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _decode_json_floats(value: Any) -> Any:
    """transformers 5 writes non-finite floats as {"__float__": "Infinity"}; plain json writes Infinity."""
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _decode_json_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode_json_floats(v) for v in value]
    return value


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
        raw = cls._normalize(raw)
        names = {f.name for f in dataclasses.fields(cls) if f.name != "extra"}
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in raw.items():
            canonical = cls.aliases.get(key, key)
            if canonical in names:
                # the canonical key wins over an alias when both are present
                if canonical in kwargs and key != canonical:
                    continue
                kwargs[canonical] = value
            elif key not in ("model_type", "architectures", "num_hidden_layers"):
                extra[key] = value
        try:
            config = cls(**kwargs, extra=extra)
        except TypeError as e:
            raise ConfigError(f"{cls.model_type} config: {e}") from None
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
        config = dataclasses.replace(self, **changes, extra=dict(self.extra))
        config.validate()
        return config

    def _positive(self, *names: str) -> None:
        for name in names:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{self.model_type} config: {name} must be a positive integer, got {value!r}")


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
            if item not in _LIST_TO_CHAR:
                raise ConfigError(
                    f"nemotron_h config: unknown layer type {item!r} in {key} "
                    f"(known: {', '.join(sorted(_LIST_TO_CHAR))})"
                )
            out.append(_LIST_TO_CHAR[item])
        return "".join(out)
    raise ConfigError(f"nemotron_h config: {key} must be a string or a list, got {type(value).__name__}")


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
        if "time_step_limit" in raw or "mamba_dt_limit" in raw:
            key = "time_step_limit" if "time_step_limit" in raw else "mamba_dt_limit"
            raw[key] = tuple(float(v) for v in raw[key])
        layers = raw.get("num_hidden_layers")
        pattern = raw.get("hybrid_override_pattern")
        if isinstance(layers, int) and pattern is not None and layers != len(pattern):
            raise ConfigError(
                f"nemotron_h config: num_hidden_layers={layers} but the layer pattern has {len(pattern)} layers"
            )
        if raw.get("num_key_value_heads") is None and "num_attention_heads" in raw:
            raw["num_key_value_heads"] = raw["num_attention_heads"]
        return raw

    def validate(self) -> None:
        self.hybrid_override_pattern = _pattern(self.hybrid_override_pattern, "hybrid_override_pattern")
        self.mtp_hybrid_override_pattern = _pattern(self.mtp_hybrid_override_pattern, "mtp_hybrid_override_pattern")
        if not self.hybrid_override_pattern:
            raise ConfigError("nemotron_h config: the layer pattern is empty")
        self._positive("vocab_size", "hidden_size")
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
        return cls(rope_type=rope_type, **{k: v for k, v in d.items() if k in known and k != "rope_type"})

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
# Llama-Nemotron Super / Ultra (DeciLM, "nemotron-nas")
# --------------------------------------------------------------------------------------------------


@dataclass
class AttentionBlockConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class FFNBlockConfig:
    no_op: bool = False
    replace_with_linear: bool = False
    ffn_mult: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BlockConfig:
    attention: AttentionBlockConfig
    ffn: FFNBlockConfig

    @classmethod
    def from_dict(cls, d: dict[str, Any], index: int) -> "BlockConfig":
        if not isinstance(d, dict) or "attention" not in d or "ffn" not in d:
            raise ConfigError(f"nemotron-nas config: block_configs[{index}] needs 'attention' and 'ffn'")

        def split(sub: dict[str, Any], klass):
            known = {f.name for f in dataclasses.fields(klass)} - {"extra"}
            return klass(**{k: v for k, v in sub.items() if k in known},
                         extra={k: v for k, v in sub.items() if k not in known})

        return cls(split(d["attention"], AttentionBlockConfig), split(d["ffn"], FFNBlockConfig))

    def to_dict(self) -> dict[str, Any]:
        def join(sub) -> dict[str, Any]:
            d = {k: v for k, v in dataclasses.asdict(sub).items() if k != "extra"}
            d.update(sub.extra)
            return d

        return {"attention": join(self.attention), "ffn": join(self.ffn)}


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM: int(2 * ffn_mult * H / 3) rounded up to a multiple of 256."""
    size = int(2 * ffn_mult * hidden_size / 3)
    return size + (-size) % 256


@dataclass
class NemotronNASConfig(BaseConfig):
    model_type: ClassVar[str] = "nemotron-nas"
    architecture: ClassVar[str] = "DeciLMForCausalLM"

    block_configs: list[BlockConfig] = field(default_factory=list)
    vocab_size: int = 128256
    hidden_size: int = 8192
    num_attention_heads: int = 64
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
        blocks = raw.get("block_configs")
        if not isinstance(blocks, list) or not blocks:
            raise ConfigError("nemotron-nas config: block_configs must be a non-empty list")
        raw["block_configs"] = [b if isinstance(b, BlockConfig) else BlockConfig.from_dict(b, i)
                                for i, b in enumerate(blocks)]
        layers = raw.get("num_hidden_layers")
        if isinstance(layers, int) and layers != len(blocks):
            raise ConfigError(f"nemotron-nas config: num_hidden_layers={layers} but block_configs has {len(blocks)}")
        return raw

    def validate(self) -> None:
        self._positive("vocab_size", "hidden_size", "num_attention_heads")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("nemotron-nas config: hidden_size is not a multiple of num_attention_heads")
        if self.hidden_act != "silu":
            raise ConfigError(f"nemotron-nas config: hidden_act={self.hidden_act!r} is not supported (silu)")
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = RopeScaling.from_dict(self.rope_scaling)
        for i, block in enumerate(self.block_configs):
            a, f = block.attention, block.ffn
            if not (a.no_op or a.replace_with_linear):
                if not isinstance(a.n_heads_in_group, int) or a.n_heads_in_group <= 0 or \
                        self.num_attention_heads % a.n_heads_in_group:
                    raise ConfigError(
                        f"nemotron-nas config: block_configs[{i}].attention.n_heads_in_group="
                        f"{a.n_heads_in_group!r} must divide num_attention_heads={self.num_attention_heads}"
                    )
            if not (f.no_op or f.replace_with_linear):
                if not isinstance(f.ffn_mult, (int, float)) or f.ffn_mult <= 0:
                    raise ConfigError(f"nemotron-nas config: block_configs[{i}].ffn.ffn_mult must be positive")

    @property
    def num_hidden_layers(self) -> int:
        return len(self.block_configs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def intermediate_size(self, layer: int) -> int:
        return ffn_mult_to_intermediate_size(self.block_configs[layer].ffn.ffn_mult, self.hidden_size)

    def to_hf(self) -> dict[str, Any]:
        out = super().to_hf()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        out["rope_scaling"] = self.rope_scaling.to_dict()
        out["num_hidden_layers"] = self.num_hidden_layers
        # the released configs carry these as null: sizes are per block
        out.setdefault("num_key_value_heads", None)
        out.setdefault("intermediate_size", None)
        return dict(sorted(out.items()))


FAMILIES: dict[str, type[BaseConfig]] = {
    c.model_type: c for c in (NemotronHConfig, Nemotron4Config, NemotronNASConfig)
}

AnyConfig = NemotronHConfig | Nemotron4Config | NemotronNASConfig


def config_from_dict(raw: dict[str, Any]) -> AnyConfig:
    """Dispatch on `model_type` (with the architectures list as a fallback)."""
    if not isinstance(raw, dict):
        raise ConfigError("config.json must hold a JSON object")
    model_type = raw.get("model_type")
    if model_type is None:
        arch = (raw.get("architectures") or [None])[0]
        model_type = {c.architecture: t for t, c in FAMILIES.items()}.get(arch)
    if model_type not in FAMILIES:
        raise ConfigError(
            f"unsupported model_type {model_type!r} (supported: {', '.join(FAMILIES)})"
        )
    return FAMILIES[model_type].from_hf(raw)


def load_config(path: str | Path) -> AnyConfig:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no config.json at {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return config_from_dict(raw)


def save_config(config: AnyConfig, path: str | Path) -> None:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    path.write_text(json.dumps(config.to_hf(), indent=2) + "\n")
