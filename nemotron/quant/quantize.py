"""`nemotron quantize`: post-training quantization of a checkpoint into ModelOpt's Hugging Face format.

1. Calibration: the model runs on sample text while hooks record each linear layer's largest input
   magnitude (per expert for MoE experts) and each attention layer's largest key and value.
2. Sensitivity: each quantizable layer's output error on its recorded inputs, in each format
   (relative Frobenius error of x W^T against x dequant(Wq)^T).
3. Formats: every quantizable layer in one format (`nvfp4`, `fp8`), or `mixed`: NVFP4 everywhere,
   then the layers where a step up (NVFP4 -> FP8 -> the model dtype) removes the most error per
   extra bit are upgraded while the average stays within the bits budget (ModelOpt AutoQuantize's
   idea with a local error proxy).
4. Export: packed weights and scales under ModelOpt's names and dtypes, `hf_quant_config.json`
   and config.json's `quantization_config`, tokenizer files copied.

ModelOpt's default exclusions apply: lm_head, the MoE routers and the Mamba conv1d (those last two
are not linear layers here), and modules matching `exclude` patterns."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import track
from torch import nn

from nemotron.api import load
from nemotron.config import DTYPES
from nemotron.io.jsonl import read_jsonl
from nemotron.layers.attention import Attention
from nemotron.layers.mlp import relu2
from nemotron.layers.moe import Experts
from nemotron.quant.formats import E4M3_MAX
from nemotron.quant.modelopt import HF_QUANT_CONFIG, ModelOptConfig, matches, normalize_name, quantized_layers
from nemotron.quant.modules import QuantExperts, QuantLinear, QuantScheme

FORMATS = {"nvfp4": "NVFP4", "fp8": "FP8"}
# ModelOpt's `_default_disabled_quantizer_cfg`, in the names of this package's models
DEFAULT_EXCLUDE = ["lm_head", "*.mixer.gate", "*.mixer.conv1d", "*output_layer*"]
CALIBRATION_TEXTS = [
    "The quick brown fox jumps over the lazy dog while the farmer counts his sheep in the morning light.",
    "What is (3 + 15) * 2 + 14? First add 3 and 15 to get 18, then double it to 36, then add 14: 50.",
    "Mamba layers carry a recurrent state; attention layers keep every key and value of the context.",
    "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Sort from smallest to largest: 42, 7, 19, 88. The smallest is 7, the largest is 88: 7, 19, 42, 88.",
    "On Tuesday, 12 March 2024, the committee met in the library to review the budget for next year.",
]


@dataclass
class LayerStats:
    """Calibration record of one quantizable layer (a Linear, or one expert's up/down projection)."""

    name: str
    params: int
    amax: float = 0.0
    inputs: list[torch.Tensor] = field(default_factory=list)   # a sample of its input rows (fp32)


def calibrate(model: nn.Module, batches: Iterable[torch.Tensor], exclude: Iterable[str] = DEFAULT_EXCLUDE,
              keep_rows: int = 256) -> tuple[dict[str, LayerStats], dict[str, float]]:
    """Run `batches` (token ids [B, T]) through the model recording, per quantizable layer, the max
    |input| and a sample of input rows; and per attention layer the max |key| and |value|
    ("<attention>.k_proj" / ".v_proj" -> amax of their outputs)."""
    exclude = list(exclude)
    stats: dict[str, LayerStats] = {}
    kv_amax: dict[str, float] = {}
    hooks = []

    def record(name: str, x: torch.Tensor) -> None:
        s = stats[name]
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if x.numel():
            s.amax = max(s.amax, float(x.abs().max()))
            if sum(len(t) for t in s.inputs) < keep_rows:
                s.inputs.append(x[:keep_rows])

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not matches(name, exclude):
            stats[name] = LayerStats(name, m.weight.numel())
            hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: record(n, args[0])))
        elif isinstance(m, Experts) and not matches(name, exclude):
            for e in range(m.num_experts):
                for proj in ("up_proj", "down_proj"):
                    stats[f"{name}.{e}.{proj}"] = LayerStats(f"{name}.{e}.{proj}", getattr(m, proj)[e].numel())

            def experts_hook(mod, args, n=name):
                x, idx = args[0], args[1]
                for e in range(mod.num_experts):
                    rows = (idx == e).any(-1)
                    if rows.any():
                        xe = x[rows]
                        record(f"{n}.{e}.up_proj", xe)
                        record(f"{n}.{e}.down_proj", relu2(F.linear(xe, mod.up_proj[e])))
            hooks.append(m.register_forward_pre_hook(experts_hook))
        if isinstance(m, Attention):
            for proj in ("k_proj", "v_proj"):
                key = f"{name}.{proj}"
                kv_amax[key] = 0.0

                def kv_hook(mod, args, out, k=key):
                    kv_amax[k] = max(kv_amax[k], float(out.detach().abs().max()))
                hooks.append(getattr(m, proj).register_forward_hook(kv_hook))
    try:
        with torch.inference_mode():
            for ids in batches:
                if model.mtp is not None:   # the MTP block sees calibration data too
                    _, h = model(ids, return_hidden=True)
                    model.mtp_forward(h[:, :-1], ids[:, 1:])
                else:
                    model(ids)
    finally:
        for h in hooks:
            h.remove()
    return stats, kv_amax


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    """The float weight of a quantizable layer (a Linear's, or expert e's projection)."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
        return getattr(model.get_submodule(".".join(parts[:-2])), parts[-1])[int(parts[-2])].detach()
    return model.get_submodule(name).weight.detach()


def sensitivity(model: nn.Module, stats: dict[str, LayerStats], algos: Iterable[str] = ("NVFP4", "FP8")
                ) -> dict[str, dict[str, float]]:
    """{layer: {algo: relative output error on its calibration inputs}} (weight-only numerics)."""
    out: dict[str, dict[str, float]] = {}
    for name, s in stats.items():
        if not s.inputs:
            continue   # an expert no calibration token reached
        x = torch.cat(s.inputs)
        w = _weight(model, name).float()
        y = x @ w.t()
        norm = float(y.norm()) or 1.0
        row = {}
        for algo in algos:
            scheme = QuantScheme(algo)
            wq = scheme.dequantize(scheme.quantize(w), torch.float32)
            row[algo] = float((x @ wq.t() - y).norm()) / norm
        out[name] = row
    return out


def choose_mixed(stats: dict[str, LayerStats], errors: dict[str, dict[str, float]], budget_bits: float,
                 full_bits: float = 16.0) -> dict[str, str | None]:
    """Per layer NVFP4, FP8 or None (the model dtype, `full_bits`), NVFP4 to start with; steps up are
    taken greedily by error removed per extra bit (weighted by the layer's size) while the average
    bits per quantizable weight stays within `budget_bits`. The experts of one MoE layer move
    together (they are stored as one stack)."""
    bits = {"NVFP4": QuantScheme("NVFP4").bits, "FP8": QuantScheme("FP8").bits, None: full_bits}
    groups: dict[str, list[str]] = {}
    for name in stats:
        parts = name.split(".")
        key = ".".join(parts[:-2]) if len(parts) >= 3 and parts[-3] == "experts" else name
        groups.setdefault(key, []).append(name)
    params = {g: sum(stats[n].params for n in names) for g, names in groups.items()}

    def err(g: str, algo: str | None) -> float:
        if algo is None:
            return 0.0
        return sum(errors.get(n, {}).get(algo, 0.0) ** 2 * stats[n].params for n in groups[g])

    choice: dict[str, str | None] = {g: "NVFP4" for g in groups}
    total = sum(params.values())
    used = sum(bits["NVFP4"] * p for p in params.values())
    step = {"NVFP4": "FP8", "FP8": None}
    while True:
        best, best_gain = None, 0.0
        for g, algo in choice.items():
            if algo is None:
                continue
            nxt = step[algo]
            cost = (bits[nxt] - bits[algo]) * params[g]
            if used + cost > budget_bits * total:
                continue
            gain = (err(g, algo) - err(g, nxt)) / cost
            if gain > best_gain:
                best, best_gain = g, gain
        if best is None:
            break
        used += (bits[step[choice[best]]] - bits[choice[best]]) * params[best]
        choice[best] = step[choice[best]]
    return {n: choice[g] for g, names in groups.items() for n in names}


def _fits(w: torch.Tensor, algo: str) -> bool:
    try:
        QuantScheme(algo).shapes(*w.shape)
        return True
    except ValueError:
        return False


def apply_formats(model: nn.Module, layer_algos: dict[str, str | None], stats: dict[str, LayerStats]) -> None:
    """Replace the layers given a format by quantized ones (in place)."""
    for name, m in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if isinstance(m, nn.Linear) and layer_algos.get(name):
            scheme = QuantScheme(layer_algos[name])
            layer = QuantLinear.from_linear(m, scheme, torch.tensor(max(stats[name].amax, 1e-6)))
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        elif isinstance(m, Experts):
            algos = {layer_algos.get(f"{name}.{e}.{p}") for e in range(m.num_experts) for p in ("up_proj", "down_proj")}
            if algos == {None}:
                continue
            if len(algos) != 1:
                raise ValueError(f"{name}: the experts of one layer must share one format")
            amax = {p: torch.tensor([max(stats[f"{name}.{e}.{p}"].amax, 1e-6) for e in range(m.num_experts)])
                    for p in ("up_proj", "down_proj")}
            setattr(model.get_submodule(parent_name), child, QuantExperts.from_experts(m, QuantScheme(algos.pop()), amax))


def add_kv_scales(model: nn.Module, kv_amax: dict[str, float]) -> None:
    """FP8 KV-cache scales as ModelOpt exports them: amax / 448, at least 1.0."""
    for key, amax in kv_amax.items():
        proj = model.get_submodule(key)
        name = "k_scale" if key.endswith("k_proj") else "v_scale"
        proj.register_buffer(name, torch.tensor(max(amax / E4M3_MAX, 1.0), dtype=torch.float32))


def export_config(model: nn.Module, fmt: str, kv_cache: bool, exclude: list[str]) -> ModelOptConfig:
    layers = quantized_layers(model)
    kv = "FP8" if kv_cache else None
    if fmt == "mixed":
        return ModelOptConfig("MIXED_PRECISION", quantized_layers=layers, kv_cache_quant_algo=kv)
    # one format: vLLM quantizes every linear layer outside exclude_modules, so every layer left in
    # the model dtype is listed (the default exclusions and the user's patterns, and any other)
    unquantized = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Experts))]
    listed = list(dict.fromkeys(exclude + [n for n in unquantized if not matches(n, exclude)]))
    return ModelOptConfig(FORMATS[fmt], exclude_modules=listed, kv_cache_quant_algo=kv)


def calibration_batches(tokenizer, texts: list[str], seq_len: int = 256, batch_size: int = 4) -> list[torch.Tensor]:
    """Token-id batches [B, T] from texts (each cut to seq_len; a batch shares one length)."""
    ids = [tokenizer.encode(t)[:seq_len] for t in texts if t.strip()]
    ids = sorted((x for x in ids if x), key=len)
    if not ids:
        raise ValueError("the calibration data has no text")
    batches = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        n = min(len(x) for x in chunk)
        batches.append(torch.tensor([x[:n] for x in chunk]))
    return batches


def read_calibration(path: str | Path) -> list[str]:
    """Texts from a .jsonl ("text" or chat "messages" records) or plain text (blank-line separated)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such calibration file")
    if path.suffix == ".jsonl":
        texts = []
        for n, r in enumerate(read_jsonl(path), 1):
            if isinstance(r.get("text"), str):
                texts.append(r["text"])
            elif isinstance(r.get("messages"), list):
                texts.append("\n".join(str(m.get("content") or "") for m in r["messages"] if isinstance(m, dict)))
            else:
                raise ValueError(f"{path}: record {n}: expected a 'text' string or a 'messages' list")
        return texts
    return [t for t in path.read_text().split("\n\n") if t.strip()]


def quantize_model(loaded, fmt: str, texts: list[str] | None = None, budget_bits: float = 4.75,
                   exclude: list[str] | None = None, kv_cache: bool = False, progress: bool = False
                   ) -> tuple[ModelOptConfig, dict]:
    """Quantize a loaded model in place; returns (its ModelOpt config, a report: the format of every
    quantizable layer, its sensitivity, the bits per quantizable weight)."""
    if fmt not in (*FORMATS, "mixed"):
        raise ValueError(f"unknown format {fmt!r} (nvfp4, fp8 or mixed)")
    if fmt == "mixed" and budget_bits < QuantScheme("NVFP4").bits:
        raise ValueError(f"a mixed budget of {budget_bits} bits is below NVFP4's 4.5 bits per weight")
    if loaded.tokenizer is None:
        raise ValueError("calibration needs the checkpoint's tokenizer")
    model = loaded.model
    # the module holding the block list: "backbone" (Nemotron-H) or "model" (the decoders)
    root = next(name for name, m in model.named_modules() if m is model.blocks).split(".")[0]
    exclude = DEFAULT_EXCLUDE + [normalize_name(p, root) for p in exclude or []]
    batches = calibration_batches(loaded.tokenizer, texts or CALIBRATION_TEXTS)
    stats, kv_amax = calibrate(model, _progress(batches, progress, "calibrating"), exclude)
    errors = sensitivity(model, stats)
    if fmt == "mixed":
        algos = choose_mixed(stats, errors, budget_bits)
    else:
        algos = {n: FORMATS[fmt] for n in stats}
    for name in algos:   # a layer the format cannot hold (NVFP4: input dimension not a multiple of 16)
        if algos[name] and not _fits(_weight(model, name), algos[name]):
            algos[name] = None
    apply_formats(model, algos, stats)
    if kv_cache:
        add_kv_scales(model, kv_amax)
    cfg = export_config(model, fmt, kv_cache, exclude)
    weight = sum(s.params for s in stats.values())
    bits = sum(stats[n].params * (QuantScheme(a).bits if a else 16.0) for n, a in algos.items()) / max(1, weight)
    report = {"format": fmt, "quant_algo": cfg.quant_algo, "bits_per_quantized_weight": bits,
              "layers": {n: {"format": a or "unquantized", "params": stats[n].params, "input_amax": stats[n].amax,
                             **{f"error_{k.lower()}": v for k, v in errors.get(n, {}).items()}}
                         for n, a in algos.items()}}
    return cfg, report


def save_quantized(loaded, cfg: ModelOptConfig, out: str | Path, report: dict | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Write a quantized model in ModelOpt's layout: safetensors, config.json with its
    quantization_config, hf_quant_config.json, the tokenizer files (and the report)."""
    out = loaded.save(out, dtype, quantization_config=cfg.to_config_json())
    (out / HF_QUANT_CONFIG).write_text(json.dumps(cfg.to_hf_quant_config(), indent=2) + "\n")
    if report is not None:
        (out / "quantization_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return out


def quantize(model_path: str, fmt: str, output: str | Path, calib: str | None = None, budget_bits: float = 4.75,
             exclude: list[str] | None = None, kv_cache: bool = False, dtype: str | None = None,
             progress: bool = True) -> dict:
    """`nemotron quantize`: checkpoint `model_path` -> `output` in ModelOpt's layout (unquantized
    tensors in `dtype`, default the checkpoint's). Returns the report."""
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: the output exists and is not an empty directory")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
    texts = read_calibration(calib) if calib else None
    loaded = load(model_path, progress=progress)
    cfg, report = quantize_model(loaded, fmt, texts, budget_bits, exclude, kv_cache, progress)
    save_quantized(loaded, cfg, out, report, DTYPES[dtype] if dtype else None)
    return report


def _progress(items: list, on: bool, what: str):
    if not on:
        return items
    return track(items, description=what, transient=True)
