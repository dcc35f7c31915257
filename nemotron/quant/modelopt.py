"""NVIDIA ModelOpt's Hugging Face checkpoint format: reading its quantization config (the legacy
`hf_quant_config.json` and `config.json`'s `quantization_config`), turning a model's layers into
quantized ones to match it before the weights load, and writing it (what vLLM's `modelopt`,
`modelopt_fp4` and `modelopt_mixed` loaders read).

A layer's format comes from the config alone: one `quant_algo` for every linear layer outside the
wildcard `exclude_modules`, or `MIXED_PRECISION` with a `quantized_layers` map (layers absent from it
stay unquantized). An algorithm this package cannot run is an error naming the layer: never a silent
fallback to unquantized weights (vLLM's pitfall, which turns such checkpoints into fluent garbage)."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError
from ..files import is_present, json_kind, read_json
from .modules import ALGOS, QuantExperts, QuantLinear, QuantScheme

HF_QUANT_CONFIG = "hf_quant_config.json"
KV_CACHE_ALGOS = ("FP8",)


@dataclass
class ModelOptConfig:
    quant_algo: str                                    # upper case; MIXED_PRECISION for a per-layer map
    group_size: int = 16
    exclude_modules: list[str] = field(default_factory=list)
    quantized_layers: dict[str, QuantScheme] = field(default_factory=dict)
    kv_cache_quant_algo: str | None = None
    # the format's producer name (what readers key on), and who actually wrote the files
    producer: dict = field(default_factory=lambda: {"name": "modelopt", "writer": "nemotron"})

    @property
    def mixed(self) -> bool:
        return self.quant_algo == "MIXED_PRECISION"

    def excluded(self, module: str) -> bool:
        return matches(module, self.exclude_modules)

    def scheme(self, module: str) -> QuantScheme | None:
        """The format of linear layer `module` (our / the release's name), or None if unquantized."""
        if self.mixed:   # the layer's own entry, else its closest listed ancestor ("...mixer.experts")
            parts = module.split(".")
            for i in range(len(parts), 0, -1):
                scheme = self.quantized_layers.get(".".join(parts[:i]))
                if scheme is not None:
                    return scheme
            return None
        if self.excluded(module):
            return None
        return QuantScheme(self.quant_algo, self.group_size)

    def _layer_map(self) -> dict:
        return {k: _layer_entry(s) for k, s in sorted(self.quantized_layers.items())}

    def to_hf_quant_config(self) -> dict:
        """The legacy `hf_quant_config.json` body."""
        q: dict = {"quant_algo": self.quant_algo, "kv_cache_quant_algo": self.kv_cache_quant_algo}
        if self.mixed:
            q["quantized_layers"] = self._layer_map()
        else:
            if self.quant_algo in ("NVFP4", "W4A16_NVFP4"):
                q["group_size"] = self.group_size
            q["exclude_modules"] = list(self.exclude_modules)
        return {"producer": dict(self.producer), "quantization": q}

    def to_config_json(self) -> dict:
        """The `quantization_config` entry of config.json (ModelOpt's compressed-tensors-shaped one)."""
        out: dict = {"quant_method": "modelopt", "quant_algo": self.quant_algo, "producer": dict(self.producer)}
        if self.mixed:
            out["quantized_layers"] = self._layer_map()
        else:
            nvfp4 = self.quant_algo in ("NVFP4", "W4A16_NVFP4")
            weights = {"num_bits": 4 if nvfp4 else 8, "type": "float", "dynamic": False}
            if nvfp4:
                weights["group_size"] = self.group_size
            group = {"weights": weights, "targets": ["Linear"]}
            if self.quant_algo in ("NVFP4", "FP8"):
                group["input_activations"] = {**weights, "dynamic": self.quant_algo == "NVFP4"}
            out["config_groups"] = {"group_0": group}
            out["ignore"] = list(self.exclude_modules)
        if self.kv_cache_quant_algo:
            out["kv_cache_scheme"] = {"num_bits": 8, "type": "float", "dynamic": False}
        return out


def matches(module: str, patterns: list[str]) -> bool:
    """exclude_modules entries are module names or fnmatch wildcards ("backbone.layers.4.mixer*");
    an entry also covers the modules below it."""
    return any(module == p or fnmatch.fnmatchcase(module, p) or module.startswith(p + ".") for p in patterns)


def _layer_entry(s: QuantScheme) -> dict:
    return {"quant_algo": s.algo, "group_size": s.group_size} if s.nvfp4 else {"quant_algo": s.algo}


def normalize_name(name: str) -> str:
    """A checkpoint module name in our naming (transformers' `model.` is the release's `backbone.`)."""
    if name.startswith("language_model."):
        name = name[len("language_model."):]
    return "backbone." + name[len("model."):] if name.startswith("model.") else name


def _group_size(value, where: str) -> int:
    """A group_size as the file gives it (absent: NVFP4's 16)."""
    if value is None:
        return 16
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise CheckpointError(f"{where}: group_size must be a positive integer, got {json_kind(value)}")
    return value


def _scheme(algo, group_size, where: str) -> QuantScheme:
    if not isinstance(algo, str):
        raise CheckpointError(f"{where}: quant_algo must be a string, got {json_kind(algo)}")
    try:
        return QuantScheme(algo.upper(), _group_size(group_size, where))
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def parse_quant_config(raw: dict, source: str = HF_QUANT_CONFIG) -> ModelOptConfig:
    """Either shape: the legacy file ({"producer", "quantization": {...}}) or config.json's
    quantization_config ({"quant_method": "modelopt", "quant_algo", "ignore", "kv_cache_scheme", ...})."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a JSON object")
    q = raw.get("quantization", raw)
    if not isinstance(q, dict):
        raise CheckpointError(f"{source}: 'quantization' must be an object")
    method = q.get("quant_method")
    if method is not None and method != "modelopt":
        raise CheckpointError(f"{source}: quantization method {method!r} is not supported (only NVIDIA ModelOpt's "
                              f"'modelopt' format is)")
    algo = q.get("quant_algo")
    if not isinstance(algo, str):
        raise CheckpointError(f"{source}: no quant_algo")
    algo = algo.upper()
    group_size = q.get("group_size")
    groups = q.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise CheckpointError(f"{source}: config_groups must be an object, got {json_kind(groups)}")
    if group_size is None:   # config.json shape: the weights' group size of the first config group
        for g in groups.values():
            weights = g.get("weights") if isinstance(g, dict) else None
            group_size = weights.get("group_size") if isinstance(weights, dict) else None
            if group_size:
                break
    group_size = _group_size(group_size, source)
    kv = q.get("kv_cache_quant_algo")
    scheme = q.get("kv_cache_scheme")
    if kv is None and isinstance(scheme, dict):
        kv = "FP8" if scheme.get("num_bits") == 8 and scheme.get("type") == "float" else json.dumps(scheme)
    if kv is not None and str(kv).upper() not in KV_CACHE_ALGOS:
        raise CheckpointError(f"{source}: kv_cache_quant_algo {kv!r} is not supported (supported: FP8)")
    exclude = q.get("exclude_modules", q.get("ignore")) or []
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise CheckpointError(f"{source}: exclude_modules must be a list of module names or patterns")
    producer = raw.get("producer") or q.get("producer") or {}
    if not isinstance(producer, dict):
        raise CheckpointError(f"{source}: producer must be an object, got {json_kind(producer)}")
    cfg = ModelOptConfig(algo, group_size, [normalize_name(p) for p in exclude],
                         kv_cache_quant_algo=str(kv).upper() if kv is not None else None, producer=producer)
    if algo == "MIXED_PRECISION":
        layers = q.get("quantized_layers")
        if not isinstance(layers, dict):
            raise CheckpointError(f"{source}: MIXED_PRECISION needs a 'quantized_layers' map")
        for name, entry in layers.items():
            if not isinstance(entry, dict):
                raise CheckpointError(f"{source}: quantized_layers[{name!r}] must be an object")
            cfg.quantized_layers[normalize_name(name)] = _scheme(entry.get("quant_algo"), entry.get("group_size"),
                                                             f"{source}: layer {name}")
    elif algo not in ALGOS:
        raise CheckpointError(f"{source}: quant_algo {algo!r} is not supported (supported: "
                              f"{', '.join(ALGOS)}, MIXED_PRECISION)")
    else:
        _scheme(algo, cfg.group_size, source)   # validates the group size
    return cfg


def read_quant_config(path: Path) -> ModelOptConfig | None:
    """The checkpoint's quantization config, or None for an unquantized one. hf_quant_config.json
    wins over config.json's quantization_config (vLLM reads the same file first)."""
    legacy = path / HF_QUANT_CONFIG
    if is_present(legacy):
        return parse_quant_config(read_json(legacy), str(legacy))
    config = path / "config.json"
    if config.is_file():
        try:
            raw = read_json(config).get("quantization_config")
        except CheckpointError:
            return None   # the config loader reports a broken config.json
        if raw is not None:
            return parse_quant_config(raw, f"{config} (quantization_config)")
    return None


# --------------------------------------------------------------------------------------------------
# the model's structure
# --------------------------------------------------------------------------------------------------

def _experts_scheme(cfg: ModelOptConfig, name: str, num_experts: int) -> QuantScheme | None:
    """One scheme for every expert of a stacked Experts module, or an error naming the layer."""
    schemes = {cfg.scheme(f"{name}.{e}.{proj}") for e in range(num_experts) for proj in ("up_proj", "down_proj")}
    if len(schemes) > 1:
        got = ", ".join(sorted(s.algo if s else "unquantized" for s in schemes))
        raise CheckpointError(f"{name}: experts of one layer in different formats ({got}) are not supported")
    return schemes.pop()


def apply_quant_config(model: nn.Module, cfg: ModelOptConfig, compute_dtype: torch.dtype) -> dict[str, QuantScheme]:
    """Replace the linear layers (and stacked MoE experts) that `cfg` quantizes with quantized ones
    of the same shapes (on the model's device, meta included), and add the KV-cache scales. Every
    entry of a MIXED_PRECISION map must name a layer of the model. Returns {layer: scheme}."""
    from ..layers.attention import Attention
    from ..layers.moe import Experts

    done: dict[str, QuantScheme] = {}
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear):
            scheme = cfg.scheme(name)
            if scheme is None:
                continue
            device = module.weight.device
            try:
                q = QuantLinear(module.in_features, module.out_features, scheme, module.bias is not None,
                                compute_dtype, device)
            except ValueError as e:
                raise CheckpointError(f"{name}: {e}") from None
            setattr(parent, child, q)
            done[name] = scheme
        elif isinstance(module, Experts):
            scheme = _experts_scheme(cfg, name, module.num_experts)
            if scheme is None:
                continue
            e, i, x = module.up_proj.shape
            try:
                q = QuantExperts(e, x, i, scheme, compute_dtype, module.up_proj.device)
            except ValueError as err:
                raise CheckpointError(f"{name}: {err}") from None
            setattr(parent, child, q)
            for j in range(e):
                for proj in ("up_proj", "down_proj"):
                    done[f"{name}.{j}.{proj}"] = scheme
    if cfg.kv_cache_quant_algo:   # after the projections were replaced: the scales live on them
        for module in model.modules():
            if isinstance(module, Attention):
                device = module.k_proj.weight.device
                module.k_proj.register_buffer("k_scale", torch.ones((), dtype=torch.float32, device=device))
                module.v_proj.register_buffer("v_scale", torch.ones((), dtype=torch.float32, device=device))
    if cfg.mixed:
        unknown = sorted(k for k in cfg.quantized_layers if not any(n == k or n.startswith(k + ".") for n in done))
        if unknown:
            raise CheckpointError(f"quantized_layers names {unknown[0]!r}, which is not a linear layer of this model"
                                  + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    return done


def quantized_layers(model: nn.Module) -> dict[str, QuantScheme]:
    """{layer name (experts one by one, as the checkpoint names them): scheme} of a quantized model."""
    out: dict[str, QuantScheme] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            out[name] = m.scheme
        elif isinstance(m, QuantExperts):
            for e in range(m.num_experts):
                out[f"{name}.{e}.up_proj"] = out[f"{name}.{e}.down_proj"] = m.scheme
    return out


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (what stays resident)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
