"""NVIDIA ModelOpt's Hugging Face checkpoint format: reading its quantization config (the legacy
`hf_quant_config.json` and `config.json`'s `quantization_config`), turning a model's layers into
quantized ones to match it before the weights load, and writing it (what vLLM's `modelopt`,
`modelopt_fp4` and `modelopt_mixed` loaders read).

A layer's format comes from the config: one `quant_algo` for every linear layer outside the
wildcard `exclude_modules`, or `MIXED_PRECISION` with a `quantized_layers` map (layers absent from it
stay unquantized). Where the config and the stored tensors disagree, the tensors decide: a float
weight with no `weight_scale` is unquantized whatever the config says, and a layer the config leaves
out whose tensors are packed FP4 or FP8 with their scales gets the format those tensors have (one
warning per load lists every such layer). An algorithm this package cannot run, or a quantized
weight without its scales, is an error naming the layer: never a silent fallback to unquantized
weights (vLLM's pitfall, which turns such checkpoints into fluent garbage).

Names are matched whichever root the file spells (`backbone.` as NVIDIA's Nemotron-H releases,
`model.` as transformers 5 and the Llama family), and the names ModelOpt 0.46-0.47 mangle
(`"lm_head.\\x00backbone.pt_name_sentinel"`) are repaired."""

from __future__ import annotations

import fnmatch
import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nemotron.errors import CheckpointError, CheckpointWarning
from nemotron.files import is_present, json_kind, read_json
from nemotron.layers.attention import Attention
from nemotron.layers.moe import Experts
from nemotron.quant.modules import ALGOS, QuantExperts, QuantLinear, QuantScheme

HF_QUANT_CONFIG = "hf_quant_config.json"
# ModelOpt's KV-cache formats. Both store `k_proj.k_scale` / `v_proj.v_scale` as amax / 448 (its
# exporter divides every KV amax by E4M3's bound); an NVFP4 cache's global scale is that over 6.
# Before 0.42 the exporter divided an NVFP4 cache's amax by 6 * 448 instead (kv_scales_as_written).
KV_CACHE_ALGOS = ("FP8", "NVFP4")
_NVFP4_KV_SCALE_CHANGED = (0, 42)


@dataclass
class ModelOptConfig:
    quant_algo: str                                    # upper case; MIXED_PRECISION for a per-layer map
    group_size: int = 16
    exclude_modules: list[str] = field(default_factory=list)
    quantized_layers: dict[str, QuantScheme] = field(default_factory=dict)
    kv_cache_quant_algo: str | None = None
    # the format's producer name (what readers key on), and who actually wrote the files
    producer: dict = field(default_factory=lambda: {"name": "modelopt", "writer": "nemotron"})
    # where it was read from, and how many of its names needed repair_name (for the load's warning)
    source: str = field(default=HF_QUANT_CONFIG, compare=False, repr=False)
    repaired_names: int = field(default=0, compare=False, repr=False)

    @property
    def mixed(self) -> bool:
        return self.quant_algo == "MIXED_PRECISION"

    def excluded(self, module: str) -> bool:
        return matches(module, self.exclude_modules)

    def scheme(self, module: str) -> QuantScheme | None:
        """The format the config gives linear layer `module` (our name), or None if unquantized."""
        if self.mixed:   # the layer's own entry, else its closest listed ancestor ("...mixer.experts")
            for spelling in spellings(module):
                parts = spelling.split(".")
                for i in range(len(parts), 0, -1):
                    scheme = self.quantized_layers.get(".".join(parts[:i]))
                    if scheme is not None:
                        return scheme
            return None
        if self.excluded(module):
            return None
        return QuantScheme(self.quant_algo, self.group_size)

    def _layer_map(self) -> dict:
        """{layer: entry}; a stacked MoE's experts sharing one format are one `...experts` entry, as
        ModelOpt writes them."""
        grouped: dict[str, set] = {}
        for k, s in self.quantized_layers.items():
            m = _EXPERT_LAYER.match(k)
            if m:
                grouped.setdefault(m.group(1), set()).add(s)
        out = {}
        for k, s in sorted(self.quantized_layers.items()):
            m = _EXPERT_LAYER.match(k)
            key = m.group(1) if m and len(grouped[m.group(1)]) == 1 else k
            out[key] = _layer_entry(s)
        return dict(sorted(out.items()))

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
        if self.mixed:   # as ModelOpt writes it: a group per format listing its layers, and the map
            layers = self._layer_map()
            algos = list(dict.fromkeys(entry["quant_algo"] for entry in layers.values()))
            out["config_groups"] = {f"group_{i}": _config_group(QuantScheme(a, self.group_size),
                                                                [k for k, e in layers.items() if e["quant_algo"] == a])
                                    for i, a in enumerate(algos)}
            out["quantized_layers"] = layers
            out["ignore"] = []
        else:
            out["config_groups"] = {"group_0": _config_group(QuantScheme(self.quant_algo, self.group_size), ["Linear"])}
            out["ignore"] = list(self.exclude_modules)
        if self.kv_cache_quant_algo:
            out["kv_cache_scheme"] = {"num_bits": 8 if self.kv_cache_quant_algo == "FP8" else 4, "type": "float",
                                      "dynamic": False}
        return out


def spellings(module: str) -> tuple[str, ...]:
    """A module name as checkpoints spell it: ours, and with the other root (transformers 5 writes
    `model.` where NVIDIA's Nemotron-H releases write `backbone.`)."""
    for ours, other in (("backbone.", "model."), ("model.", "backbone.")):
        if module.startswith(ours):
            return module, other + module[len(ours):]
    return (module,)


def matches(module: str, patterns: list[str]) -> bool:
    """exclude_modules entries are module names or fnmatch wildcards ("backbone.layers.4.mixer*");
    an entry also covers the modules below it. Either root spelling matches."""
    return any(m == p or fnmatch.fnmatchcase(m, p) or m.startswith(p + ".") for m in spellings(module) for p in patterns)


_EXPERT_LAYER = re.compile(r"^(.*\.experts)\.\d+\.(?:up_proj|down_proj)$")


def _config_group(s: QuantScheme, targets: list[str]) -> dict:
    """One config.json `config_groups` entry (the compressed-tensors shape ModelOpt writes); every
    static activation scale is written `dynamic: false`, NVFP4's included."""
    weights = {"num_bits": 4 if s.nvfp4 else 8, "type": "float", "dynamic": False}
    if s.nvfp4:
        weights["group_size"] = s.group_size
    group: dict = {"weights": weights, "targets": targets}
    if s.has_input_scale:
        group["input_activations"] = dict(weights)
    return group


def _layer_entry(s: QuantScheme) -> dict:
    return {"quant_algo": s.algo, "group_size": s.group_size} if s.nvfp4 else {"quant_algo": s.algo}


def repair_name(name: str) -> str:
    """A module name as ModelOpt meant to write it. 0.46-0.47 append a sentinel segment
    (".\\x00modelopt_name_sentinel") before renaming `model.` to `backbone.`, with a pattern whose `.`
    matches any character, so the sentinel itself is rewritten and never stripped:
    "lm_head.\\x00backbone.pt_name_sentinel". Everything from the NUL on is the broken sentinel; a
    trailing wildcard ("*", ".*") was appended after it."""
    head, nul, tail = name.partition("\x00")
    if not nul:
        return name
    suffix = ".*" if tail.endswith(".*") else "*" if tail.endswith("*") else ""
    return head.removesuffix(".") + suffix


def normalize_name(name: str, root: str = "backbone") -> str:
    """A module name (a user's pattern, a checkpoint's entry) under the model's own root: VL / Omni
    wrappers' `language_model.` dropped, `model.` / `backbone.` as `root`."""
    name = name.removeprefix("language_model.")
    for prefix in ("model.", "backbone."):
        if name.startswith(prefix):
            return f"{root}.{name[len(prefix):]}"
    return name


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
    if kv is None and isinstance(scheme, str):   # ModelOpt <= 0.44 writes NVFP4's as a bare string
        kv = scheme
    elif kv is None and isinstance(scheme, dict):
        kv = {(8, "float"): "FP8", (4, "float"): "NVFP4"}.get((scheme.get("num_bits"), scheme.get("type")),
                                                              json.dumps(scheme))
    if kv is not None and str(kv).upper() not in KV_CACHE_ALGOS:
        raise CheckpointError(f"{source}: kv_cache_quant_algo {str(kv)[:80]!r} is not supported "
                              f"(supported: {', '.join(KV_CACHE_ALGOS)})")
    exclude = q.get("exclude_modules", q.get("ignore")) or []
    if not isinstance(exclude, list) or not all(isinstance(p, str) for p in exclude):
        raise CheckpointError(f"{source}: exclude_modules must be a list of module names or patterns")
    producer = raw.get("producer") or q.get("producer") or {}
    if not isinstance(producer, dict):
        raise CheckpointError(f"{source}: producer must be an object, got {json_kind(producer)}")
    repaired = sum(1 for p in exclude if "\x00" in p)
    cfg = ModelOptConfig(algo, group_size, [repair_name(p).removeprefix("language_model.") for p in exclude],
                         kv_cache_quant_algo=str(kv).upper() if kv is not None else None, producer=producer,
                         source=source)
    if algo == "MIXED_PRECISION":
        layers = q.get("quantized_layers")
        if not isinstance(layers, dict):
            raise CheckpointError(f"{source}: MIXED_PRECISION needs a 'quantized_layers' map")
        for name, entry in layers.items():
            if not isinstance(entry, dict):
                raise CheckpointError(f"{source}: quantized_layers[{name!r}] must be an object")
            repaired += "\x00" in name
            key = repair_name(name).removeprefix("language_model.")
            cfg.quantized_layers[key] = _scheme(entry.get("quant_algo"), entry.get("group_size"),
                                                f"{source}: layer {key}")
    elif algo not in ALGOS:
        raise CheckpointError(f"{source}: quant_algo {algo!r} is not supported (supported: "
                              f"{', '.join(ALGOS)}, MIXED_PRECISION)")
    else:
        _scheme(algo, cfg.group_size, source)   # validates the group size
    cfg.repaired_names = repaired
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

_FP8_STORAGE = (torch.float8_e4m3fn, torch.int8, torch.uint8)   # older exports store FP8 bytes as int8


# the checkpoint's tensors under our module names (checkpoint.our_spelling), each with a dtype and a shape
Stored = Mapping[str, object]


def stored_unquantized(stored: Stored, layer: str) -> bool:
    """A float weight stored without a weight_scale."""
    weight = stored[f"{layer}.weight"]
    return (weight.dtype.is_floating_point and weight.dtype != torch.float8_e4m3fn
            and f"{layer}.weight_scale" not in stored)


def stored_scheme(stored: Stored, layer: str) -> QuantScheme | None:
    """The format a layer's stored tensors have (None: a float weight without scales), or an error
    naming the tensor when they fit no format this package runs."""
    if stored_unquantized(stored, layer):
        return None
    weight, scale = stored[f"{layer}.weight"], stored.get(f"{layer}.weight_scale")
    if scale is None:
        raise CheckpointError(f"tensor {layer}.weight is stored as {str(weight.dtype)[6:]} (quantized) but the "
                              f"checkpoint has no {layer}.weight_scale")
    has_input = f"{layer}.input_scale" in stored
    if weight.dtype == torch.uint8 and f"{layer}.weight_scale_2" in stored:
        return QuantScheme("NVFP4" if has_input else "W4A16_NVFP4")
    if weight.dtype in _FP8_STORAGE and len(weight.shape) == 2:
        n = math.prod(scale.shape)
        if n == 1:
            return QuantScheme("FP8")
        if len(scale.shape) == 4:
            return QuantScheme("FP8_PB_WO")
        if n == weight.shape[0]:
            return QuantScheme("FP8_PER_CHANNEL_PER_TOKEN")
    raise CheckpointError(f"tensor {layer}.weight: a {str(weight.dtype)[6:]} weight of shape {list(weight.shape)} "
                          f"with a weight_scale of shape {list(scale.shape)} is no format this package runs")


def _layer_scheme(cfg: ModelOptConfig, layer: str, stored: Stored | None, overruled: list[str]
                  ) -> QuantScheme | None:
    """The config's format for `layer`, unless its stored tensors say otherwise (noted in `overruled`).
    Only quantized-or-not is read from the tensors when the config quantizes the layer, so a
    quantized layer missing a scale stays an error of the loader."""
    configured = cfg.scheme(layer)
    if stored is None or f"{layer}.weight" not in stored:   # absent weights: the loader names them
        return configured
    if configured is not None:
        if stored_unquantized(stored, layer):
            overruled.append(f"{layer} (config: {configured.algo}; stored unquantized)")
            return None
        return configured
    found = stored_scheme(stored, layer)
    if found is not None:
        overruled.append(f"{layer} (config: unquantized; stored {found.algo})")
    return found


def _experts_scheme(cfg: ModelOptConfig, name: str, num_experts: int, stored: Stored | None,
                    overruled: list[str]) -> QuantScheme | None:
    """One scheme for every expert of a stacked Experts module, or an error naming the layer."""
    notes: list[str] = []
    schemes = {_layer_scheme(cfg, f"{name}.{e}.{proj}", stored, notes)
               for e in range(num_experts) for proj in ("up_proj", "down_proj")}
    if len(schemes) > 1:
        got = ", ".join(sorted(s.algo if s else "unquantized" for s in schemes))
        raise CheckpointError(f"{name}: experts of one layer in different formats ({got}) are not supported")
    if notes:
        overruled.append(f"{name}.* ({len(notes)} expert weights: {notes[0].split(' (', 1)[1][:-1]})")
    return schemes.pop()


def apply_quant_config(model: nn.Module, cfg: ModelOptConfig, compute_dtype: torch.dtype,
                       stored: Stored | None = None) -> dict[str, QuantScheme]:
    """Replace the linear layers (and stacked MoE experts) that `cfg` quantizes with quantized ones
    of the same shapes (on the model's device, meta included), and add the KV-cache scales.
    `stored` (the checkpoint's tensors under our module names, with dtype and shape) lets the tensors
    decide where they contradict the config. Every entry of a MIXED_PRECISION map must name a layer of the
    model. Returns {layer: scheme}; warns once (CheckpointWarning) about repaired names and overruled
    entries."""

    overruled: list[str] = []
    done: dict[str, QuantScheme] = {}
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, nn.Linear):
            scheme = _layer_scheme(cfg, name, stored, overruled)
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
            scheme = _experts_scheme(cfg, name, module.num_experts, stored, overruled)
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
    # the KV-cache scales live on the (possibly replaced) projections; the file decides where it has them
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            for proj, leaf in (("k_proj", "k_scale"), ("v_proj", "v_scale")):
                tensor = f"{name}.{proj}.{leaf}"
                has = cfg.kv_cache_quant_algo is not None if stored is None else tensor in stored
                if has != (cfg.kv_cache_quant_algo is not None):
                    overruled.append(f"{tensor} (config: KV cache {cfg.kv_cache_quant_algo or 'unquantized'}; "
                                     f"{'stored' if has else 'not stored'})")
                if has:
                    owner = getattr(module, proj)
                    owner.register_buffer(leaf, torch.ones((), dtype=torch.float32, device=owner.weight.device))
    if cfg.mixed:   # every entry names a layer (or a parent of layers) that could be quantized
        layers = [s for n in _quantizable(model) for s in spellings(n)]
        unknown = sorted(k for k in cfg.quantized_layers if not any(s == k or s.startswith(k + ".") for s in layers))
        if unknown:
            raise CheckpointError(f"{cfg.source}: quantized_layers names {unknown[0]!r}, which is not a linear layer "
                                  "of this model" + (f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    notes = []
    if cfg.repaired_names:
        notes.append(f"repaired {cfg.repaired_names} module name(s) written with ModelOpt 0.46-0.47's name defect "
                     "('...\\x00backbone.pt_name_sentinel')")
    if overruled:
        notes.append(f"the stored tensors overrule the quantization config for {len(overruled)} entr"
                     f"{'y' if len(overruled) == 1 else 'ies'}: " + "; ".join(overruled[:4])
                     + (f"; +{len(overruled) - 4} more" if len(overruled) > 4 else ""))
    if notes:
        warnings.warn(f"{cfg.source}: " + "; ".join(notes), CheckpointWarning, stacklevel=3)
    return done


def _producer_version(cfg: ModelOptConfig) -> tuple[int, ...] | None:
    version = cfg.producer.get("version") if cfg.producer.get("name") == "modelopt" else None
    try:
        return tuple(int(part) for part in str(version).split(".")[:2])
    except ValueError:
        return None


def kv_scales_as_written(model: nn.Module, cfg: ModelOptConfig) -> None:
    """After loading: bring KV-cache scales to one meaning, amax / 448. ModelOpt before 0.42 wrote an
    NVFP4 cache's scales as NVFP4 global scales, amax / (6 * 448), six times smaller (its exporter's
    `cache_bound_mapping`); 0.42 on divide every KV amax by 448."""
    version = _producer_version(cfg)
    if cfg.kv_cache_quant_algo != "NVFP4" or version is None or version >= _NVFP4_KV_SCALE_CHANGED:
        return
    with torch.no_grad():
        for module in model.modules():
            for leaf in ("k_scale", "v_scale"):
                scale = module._buffers.get(leaf)
                if scale is not None:
                    scale.mul_(6.0)


def _quantizable(model: nn.Module) -> list[str]:
    """The names a quantization config can give a format: linear layers, and each stacked expert's
    projections as the checkpoint names them."""

    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, QuantLinear)):
            out.append(name)
        elif isinstance(m, (Experts, QuantExperts)):
            out += [f"{name}.{e}.{p}" for e in range(m.num_experts) for p in ("up_proj", "down_proj")]
    return out


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
