"""Real NVIDIA ModelOpt exports of a tiny random NemotronH, made on CPU at test time.

Builds a seeded, fp32, random ``NemotronHForCausalLM`` with transformers (hidden 256, vocab 1024,
layers Mamba / MoE / attention / Mamba / MLP / MoE, 8 routed experts top-2 plus a shared expert, the
shape of ``../shared/fixtures/modelopt/source_config.json``), quantizes a copy per format with
``modelopt.torch.quantization`` (calibrated on seeded random token batches), records ModelOpt's own
fake-quant logits, and exports with ``modelopt.torch.export.export_hf_checkpoint``. Whatever
``nvidia-modelopt`` is installed is used, so a test can check the loader against the exporter it will
meet; the output is a plain folder tree:

    OUT_DIR/source/                        the unquantized model (save_pretrained, safetensors)
    OUT_DIR/<FORMAT>/                      ModelOpt's export, untouched (config.json,
                                           hf_quant_config.json, model.safetensors, ...)
    OUT_DIR/<FORMAT>/modelopt_logits.safetensors
                                           "input_ids" [2, 24] int64 and "logits" [2, 24, vocab] fp32:
                                           ModelOpt's fake-quant model on those ids, activation
                                           quantizers on, after the exporter's own fused-layer amax
                                           sync (q/k/v, up/gate share one scale in the checkpoint)
    OUT_DIR/manifest.json                  versions, timings, which formats exported, why others not

Usage:
    export_all(out_dir, formats=("NVFP4", "FP8", "MIXED", "NVFP4_FP8KV"), seed=0) -> {format: Path}
    python tests/modelopt_export.py OUT_DIR [--formats NVFP4 FP8 ...] [--seed 0]

Importing this module needs neither modelopt nor transformers (tests call
``pytest.importorskip("modelopt")`` first); every such import is inside a function.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

DEFAULT_FORMATS = ("NVFP4", "FP8", "MIXED", "NVFP4_FP8KV")
# Cheap extra formats ModelOpt exports for this family; skipped (and reported) where the installed
# ModelOpt lacks the config or fails to export it.
EXTRA_FORMATS = ("FP8_FP8KV", "FP8_PER_CHANNEL", "FP8_BLOCK_WO", "NVFP4_NVFP4KV", "W4A16_NVFP4")
ALL_FORMATS = DEFAULT_FORMATS + EXTRA_FORMATS

# The unquantized model: source_config.json's values. The layer list is given as the legacy
# hybrid_override_pattern, which every transformers release with NemotronH accepts (newer ones turn it
# into layers_block_type).
LAYER_PATTERN = "ME*M-E"  # Mamba, MoE, attention, Mamba, MLP, MoE
# transformers 5.1-5.9 know only Mamba / MoE / attention layers: there, the MLP layer is left out.
LAYER_PATTERN_NO_MLP = LAYER_PATTERN.replace("-", "")
TINY_NEMOTRON_H = dict(
    vocab_size=1024, hidden_size=256, num_hidden_layers=len(LAYER_PATTERN),
    hybrid_override_pattern=LAYER_PATTERN, tie_word_embeddings=False, use_cache=False,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, attention_bias=False,
    max_position_embeddings=4096, intermediate_size=512, mlp_hidden_act="relu2", mlp_bias=False,
    ssm_state_size=32, mamba_num_heads=8, mamba_head_dim=32, n_groups=2, conv_kernel=4, expand=2,
    chunk_size=16, use_conv_bias=True, mamba_proj_bias=False, mamba_hidden_act="silu",
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
    moe_shared_expert_intermediate_size=256, routed_scaling_factor=2.0, n_group=1, topk_group=1,
    norm_topk_prob=True, layer_norm_epsilon=1e-5, initializer_range=0.02, use_bias=False,
    residual_in_fp32=False, rescale_prenorm_residual=True,
)

CALIB_BATCHES, CALIB_BATCH, CALIB_LEN = 2, 4, 32  # 256 calibration tokens: every expert gets some
EVAL_BATCH, EVAL_LEN = 2, 24
# auto_quantize: NVFP4 costs 4.5 effective bits, FP8 8, none 16. The target sits between all-NVFP4 and
# all-FP8 so that most layers take NVFP4 and the most sensitive take FP8: the export really is mixed
# (where a ModelOpt's cost model puts the floor higher, see _quantize_mixed).
MIXED_EFFECTIVE_BITS = 6.5


# ----------------------------------------------------------------------------------------------------
# the model and the data


def tiny_config():
    """The NemotronHConfig of the unquantized model."""
    from transformers import NemotronHConfig

    for pattern in (LAYER_PATTERN, LAYER_PATTERN_NO_MLP):
        kwargs = dict(TINY_NEMOTRON_H, hybrid_override_pattern=pattern, num_hidden_layers=len(pattern))
        try:  # keys an older release lacks become plain attributes
            config = NemotronHConfig(**kwargs)
        except (KeyError, ValueError):  # 5.1-5.9 have no dense-MLP ("-") layer type
            continue
        layers = list(getattr(config, "layers_block_type", None) or [])
        if len(layers) == len(pattern):
            return config
    raise RuntimeError(f"this transformers cannot build NemotronH layers {LAYER_PATTERN!r}")


def build_source_model(seed: int = 0):
    """The seeded random fp32 NemotronHForCausalLM, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    config = tiny_config()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    except TypeError:
        model = AutoModelForCausalLM.from_config(config)
    model = model.to(torch.float32).eval()
    # from_config leaves this unset (save_pretrained fills it); ModelOpt's exporter reads it.
    model.config.architectures = [type(model).__name__]
    # A random init leaves these at their defaults (A_log = log 1..n, D = 1, tiny dt_bias); spread them
    # so a loader that misplaces one per-head value is seen, and give norms non-unit weights.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("A_log", "D", "dt_bias") or (leaf == "weight" and "norm" in name):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif leaf == "e_score_correction_bias":
                p.copy_(0.01 * torch.randn(p.shape, generator=g))
    return model


def modelopt_handles_fused_experts() -> bool:
    """Whether the installed ModelOpt can quantize transformers' fused ``NemotronHExperts`` (3-D
    ``up_proj`` / ``down_proj`` parameters): ``_QuantNonGatedFusedExperts``, from 0.45 on (whose
    exporter still refuses them; 0.46 exports them)."""
    try:
        from modelopt.torch.quantization.plugins import huggingface
    except Exception:  # noqa: BLE001
        return False
    return hasattr(huggingface, "_QuantNonGatedFusedExperts")


def split_fused_experts(model) -> int:
    """Give every MoE block per-expert ``nn.Linear`` experts: the layout of the Nemotron-H remote
    code (``modeling_nemotron_h.py`` with ``trust_remote_code``: ``experts`` a ModuleList of
    ``NemotronHMLP``), which is what ModelOpt before 0.45 handles. Same weights, same math (the
    loop of transformers' ``NemotronHExperts.forward``, each expert an MLP). Returns the count."""
    import torch
    from torch import nn

    modeling = sys.modules[type(model).__module__]
    mlp_cls = modeling.NemotronHMLP

    class NemotronHExpertList(nn.ModuleList):
        """experts[i] = NemotronHMLP(up_proj, down_proj); called like NemotronHExperts."""

        def forward(self, hidden_states, top_k_index, top_k_weights):
            out = torch.zeros_like(hidden_states, dtype=top_k_weights.dtype)
            mask = torch.nn.functional.one_hot(top_k_index, num_classes=len(self)).permute(2, 1, 0)
            for e, expert in enumerate(self):
                pos, tok = torch.where(mask[e])
                if tok.numel() == 0:
                    continue
                y = expert(hidden_states[tok]) * top_k_weights[tok, pos, None]
                out.index_add_(0, tok, y.to(out.dtype))
            return out.to(hidden_states.dtype)

    count = 0
    for module in list(model.modules()):
        fused = getattr(module, "experts", None)
        if fused is None or isinstance(fused, nn.ModuleList):
            continue
        up, down = getattr(fused, "up_proj", None), getattr(fused, "down_proj", None)
        if not (isinstance(up, torch.Tensor) and up.ndim == 3 and isinstance(down, torch.Tensor)):
            continue
        experts = NemotronHExpertList()
        for e in range(up.shape[0]):
            mlp = mlp_cls(model.config, intermediate_size=up.shape[1])
            with torch.no_grad():
                mlp.up_proj.weight.copy_(up[e])
                mlp.down_proj.weight.copy_(down[e])
            experts.append(mlp)
        module.experts = experts.to(up.dtype)
        count += 1
    return count


def calibration_batches(seed: int = 0, vocab: int = 1024):
    import torch

    g = torch.Generator().manual_seed(seed + 100)
    return [torch.randint(0, vocab, (CALIB_BATCH, CALIB_LEN), generator=g) for _ in range(CALIB_BATCHES)]


def eval_input_ids(seed: int = 0, vocab: int = 1024):
    import torch

    g = torch.Generator().manual_seed(seed + 200)
    return torch.randint(0, vocab, (EVAL_BATCH, EVAL_LEN), generator=g)


# ----------------------------------------------------------------------------------------------------
# the CPU NVFP4 fake-quant patch


def _nvfp4_fake_quant_torch(inputs, block_size: int, amax):
    """NVFP4 fake quant (quantize then dequantize) with ModelOpt's own pure-torch NVFP4QTensor code."""
    import torch
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    x = inputs.float()
    if amax is None:
        amax = x.abs().amax()
    # Global (per-tensor) scale from the calibrated amax, exactly as the exporter derives
    # weight_scale_2 / input_scale: amax / (E2M1_MAX 6 * E4M3_MAX 448).
    scale_2 = amax.float().reshape(()).to(x.device) / (6.0 * 448.0)
    if float(scale_2) == 0.0:
        return inputs.clone()
    n = x.shape[-1]
    pad = (-n) % block_size  # a last dim that is no multiple of the block: zero-pad, as ModelOpt does
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    qtensor, scale, scale_2 = NVFP4QTensor.quantize(x, block_size, weights_scaling_factor_2=scale_2)
    out = qtensor.dequantize(
        dtype=torch.float32, scale=scale, double_scale=scale_2, block_sizes={-1: block_size}
    )
    return out.reshape(x.shape)[..., :n].to(inputs.dtype)


@contextlib.contextmanager
def cpu_nvfp4_fake_quant():
    """Route ModelOpt's NVFP4 fake-quant op to its pure-torch NVFP4QTensor path while on CPU.

    Why: ModelOpt's dynamic-block (NVFP4) fake quant, ``tensor_quant._dynamic_block_quantize_impl``,
    is a Triton kernel / CUDA extension that asserts ``amax.is_cuda``; there is no CPU path. The
    module-level ``tensor_quant.dynamic_block_quantize_op`` (what ``DynamicBlockQuantizationFunction``
    calls, in every ModelOpt from 0.35 to 0.47 at least) is swapped for a wrapper that handles only
    CPU E2M1 values with E4M3 block scales (NVFP4) by ModelOpt's own ``NVFP4QTensor.quantize`` /
    ``dequantize`` -- the code its exporter packs NVFP4 weights with -- and defers everything else to
    the original. The backward (straight-through) is untouched. Restored on exit; harness-only.
    """
    import torch
    from modelopt.torch.quantization import tensor_quant

    original = getattr(tensor_quant, "dynamic_block_quantize_op", None)
    if original is None:  # a ModelOpt without the hook: leave it alone, NVFP4 will fail loudly
        yield False
        return
    # ModelOpt <= 0.44's NVFP4QTensor.quantize calls backends.utils.fp4_compatible() -- which asks
    # torch.cuda for the device capability, raising on a CPU-only torch -- before it looks at the
    # tensor's device (to try a TensorRT-LLM kernel). With no CUDA there is no FP4 device: say so.
    nvfp4_module, fp4_compatible = None, None
    if not torch.cuda.is_available():
        try:
            from modelopt.torch.quantization.qtensor import nvfp4_tensor as nvfp4_module
        except ImportError:
            nvfp4_module = None
        fp4_compatible = getattr(nvfp4_module, "fp4_compatible", None)
        if fp4_compatible is not None:
            nvfp4_module.fp4_compatible = lambda: False

    def dynamic_block_quantize_op(
        inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits
    ):
        if (
            not inputs.is_cuda
            and (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4)
        ):
            return _nvfp4_fake_quant_torch(inputs, block_size, amax)
        return original(
            inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits, scale_exponent_bits
        )

    tensor_quant.dynamic_block_quantize_op = dynamic_block_quantize_op
    try:
        yield True
    finally:
        tensor_quant.dynamic_block_quantize_op = original
        if fp4_compatible is not None:
            nvfp4_module.fp4_compatible = fp4_compatible


# ----------------------------------------------------------------------------------------------------
# formats


def _cfg(name: str):
    import modelopt.torch.quantization as mtq

    cfg = getattr(mtq, name, None)
    if cfg is None:
        raise LookupError(f"modelopt.torch.quantization has no {name}")
    return copy.deepcopy(cfg)


def _with_kv(base_name: str, kv_name: str):
    """base cfg + a KV-cache cfg, merged as ModelOpt's examples/llm_ptq/hf_ptq.py does."""
    import modelopt.torch.quantization as mtq

    base, kv = _cfg(base_name), _cfg(kv_name)["quant_cfg"]
    helper = getattr(mtq, "update_quant_cfg_with_kv_cache_quant", None)
    if helper is not None:  # ModelOpt's own merge (a list of entries from 0.46/0.47 on, a dict before)
        return helper(base, kv)
    if isinstance(base["quant_cfg"], dict):  # older hf_ptq.py: quant_cfg["quant_cfg"].update(kv_cfg)
        base["quant_cfg"].update(kv)
    else:
        base["quant_cfg"] = list(base["quant_cfg"]) + list(kv)
    base.setdefault("algorithm", "max")
    return base


PTQ_FORMATS = {
    "NVFP4": lambda: _cfg("NVFP4_DEFAULT_CFG"),
    "FP8": lambda: _cfg("FP8_DEFAULT_CFG"),
    "NVFP4_FP8KV": lambda: _with_kv("NVFP4_DEFAULT_CFG", "FP8_KV_CFG"),
    "FP8_FP8KV": lambda: _with_kv("FP8_DEFAULT_CFG", "FP8_KV_CFG"),
    "FP8_PER_CHANNEL": lambda: _cfg("FP8_PER_CHANNEL_PER_TOKEN_CFG"),
    "FP8_BLOCK_WO": lambda: _cfg("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG"),
    "NVFP4_NVFP4KV": lambda: _with_kv("NVFP4_DEFAULT_CFG", "NVFP4_KV_CFG"),
    "W4A16_NVFP4": lambda: _cfg("W4A16_NVFP4_CFG"),
}


def _disable_conv1d(cfg):
    """Keep the Mamba ``conv1d`` unquantized, as ModelOpt's own configs do from 0.39 on
    (``"*mixer.conv1d*": {"enable": False}``). 0.37's configs lack the entry: its fake quant then
    quantizes the conv1d input and weight, while its exporter writes conv1d unquantized (and does not
    list it in exclude_modules), so its fake-quant logits would not be those of its checkpoint."""
    pattern = "*mixer.conv1d*"
    entries = cfg["quant_cfg"]
    if isinstance(entries, dict):  # before 0.46
        entries.setdefault(pattern, {"enable": False})
    elif not any(e.get("quantizer_name") == pattern for e in entries):
        entries.append({"quantizer_name": pattern, "enable": False})
    return cfg


def _quantize_ptq(model, fmt: str, batches):
    import modelopt.torch.quantization as mtq
    import torch

    cfg = _disable_conv1d(PTQ_FORMATS[fmt]())

    def forward_loop(m):
        with torch.no_grad():
            for batch in batches:
                m(input_ids=batch)

    return mtq.quantize(model, cfg, forward_loop)


def _quantize_mixed(model, batches):
    """mtq.auto_quantize over NVFP4 / FP8 / none -> a per-layer MIXED_PRECISION export."""
    import re

    import modelopt.torch.quantization as mtq
    import torch

    params = inspect.signature(mtq.auto_quantize).parameters
    formats = [_cfg("NVFP4_DEFAULT_CFG"), _cfg("FP8_DEFAULT_CFG")]

    def forward_step(m, batch):
        return m(input_ids=batch, labels=batch)

    def loss_func(output, batch):
        return output.loss

    def search(target):
        candidate = copy.deepcopy(model)
        kwargs = dict(
            constraints={"effective_bits": target},
            quantization_formats=formats,
            data_loader=batches,
            forward_step=forward_step,
            loss_func=loss_func,
            disabled_layers=_default_disabled_layers(),
            num_calib_steps=len(batches),
            num_score_steps=len(batches),
            verbose=False,
            method="gradient",
        )
        kwargs = {k: v for k, v in kwargs.items() if k in params}
        for p in candidate.parameters():  # the gradient score needs grads through the fake quant
            p.requires_grad_(True)
        with torch.enable_grad():
            candidate, _ = mtq.auto_quantize(candidate, **kwargs)
        for p in candidate.parameters():
            p.requires_grad_(False)
            p.grad = None
        return candidate.eval()

    try:
        return search(MIXED_EFFECTIVE_BITS)
    except ValueError as exc:
        # 0.47 checks feasibility first and says the floor; its cost model counts the disabled
        # lm_head at 16 bits, so the floor is above NVFP4's 4.5. Aim a little above it.
        found = re.search(r"minimum achievable effective bits is ([0-9.]+)", str(exc))
        if not found:
            raise
        return search(float(found.group(1)) + 0.5)


def _default_disabled_layers() -> list[str]:
    """The name patterns the PTQ configs switch off (lm_head, Mamba conv1d, routers, ...).

    auto_quantize ignores a config's name-based disables and searches every quantizable module, so
    they are passed as ``disabled_layers``: else 0.47 lists the Mamba ``conv1d`` as NVFP4 in
    quantized_layers while writing its weight unquantized, and lm_head is searched too.
    """
    patterns = ["*lm_head*", "*conv1d*"]
    entries = _cfg("NVFP4_DEFAULT_CFG")["quant_cfg"]
    if isinstance(entries, dict):  # before 0.46: {"pattern": {"enable": False}, ...}
        entries = [{"quantizer_name": k, **v} for k, v in entries.items() if isinstance(v, dict)]
    for entry in entries:
        name = entry.get("quantizer_name", "*")
        if name in ("*", "default") or entry.get("parent_class") or entry.get("enable", True):
            continue
        if "quantizer" not in name and name not in patterns:
            patterns.append(name)
    return patterns


def quantized_formats(model) -> dict[str, str]:
    """{module name: "NVFP4" | "FP8" | "FP8_BLOCK" | ...} of the quantized model, from its weight
    quantizers (a fused-experts module, with one quantizer list per projection, counts once)."""

    def kind(wq):
        bits = getattr(wq, "num_bits", None)
        if bits == (2, 1):
            return "NVFP4"
        if bits == (4, 3):
            return "FP8_BLOCK" if getattr(wq, "block_sizes", None) else "FP8"
        return str(bits)

    out = {}
    for name, module in model.named_modules():
        wq = getattr(module, "weight_quantizer", None)
        if wq is None:  # fused experts: e.g. up_proj_weight_quantizers, one per expert
            lists = [v for k, v in vars(module).get("_modules", {}).items()
                     if k.endswith("weight_quantizers") and len(v)]
            wq = lists[0][0] if lists else None
        if wq is not None and getattr(wq, "is_enabled", False):
            out[name] = kind(wq)
    return out


def _sync_fused_layers(model) -> bool:
    """Run the exporter's own q/k/v (and up/gate) amax unification before taking logits, so the
    fake-quant logits are those of what is exported. Idempotent: export_hf_checkpoint repeats it."""
    fn = None
    for mod in ("modelopt.torch.export.unified_export_hf", "modelopt.torch.export.quant_utils"):
        try:
            fn = getattr(__import__(mod, fromlist=["_"]), "requantize_resmooth_fused_llm_layers", None)
        except ImportError:
            fn = None
        if fn is not None:
            break
    if fn is None:
        return False
    import torch

    with torch.no_grad():
        fn(model)
    return True


# ----------------------------------------------------------------------------------------------------
# the driver


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "modelopt"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            out[name] = "absent"
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


def export_format(source, fmt: str, out_dir: Path, seed: int = 0, experts: str = "auto") -> Path:
    """Quantize a deep copy of ``source`` as ``fmt``, save its fake-quant logits, export it.

    ``experts``: "fused" keeps transformers' stacked ``NemotronHExperts``; "per_expert" splits them
    first (see split_fused_experts); "auto" splits only for a ModelOpt that cannot handle them.
    """
    return _export_format(source, fmt, out_dir, seed, experts)[0]


def _export_format(source, fmt: str, out_dir: Path, seed: int = 0, experts: str = "auto"):
    if fmt != "MIXED" and fmt not in PTQ_FORMATS:
        raise KeyError(f"unknown format {fmt!r}; known: {', '.join(ALL_FORMATS)}")
    export_dir = Path(out_dir) / fmt
    if experts != "auto":
        return _export_once(source, fmt, export_dir, seed, experts)
    if not modelopt_handles_fused_experts():  # before 0.45
        return _export_once(source, fmt, export_dir, seed, "per_expert")
    try:
        return _export_once(source, fmt, export_dir, seed, "fused")
    except (NotImplementedError, TypeError, AttributeError) as exc:
        # 0.45 wraps the fused experts (QuantNemotronHExperts) but its max calibration iterates them
        # ("'QuantNemotronHExperts' object is not iterable") and its exporter refuses them ("MoE
        # model with experts type 'QuantNemotronHExperts' is not supported in export"): fall back
        # to the per-expert layout.
        if "experts" not in str(exc).lower():
            raise
        shutil.rmtree(export_dir, ignore_errors=True)
        path, info = _export_once(source, fmt, export_dir, seed, "per_expert")
        info["experts"] = "per_expert (fused refused: " + _one_line(exc)[:120] + ")"
        return path, info


def _export_once(source, fmt: str, export_dir: Path, seed: int, experts: str):
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from safetensors.torch import save_file

    vocab = source.config.vocab_size
    batches = calibration_batches(seed, vocab)
    ids = eval_input_ids(seed, vocab)
    model = copy.deepcopy(source).eval()
    if experts == "per_expert":
        split_fused_experts(model)
    with cpu_nvfp4_fake_quant():
        torch.manual_seed(seed)
        if fmt == "MIXED":
            model = _quantize_mixed(model, batches)
        else:
            model = _quantize_ptq(model, fmt, batches)
        synced = _sync_fused_layers(model)
        layers = quantized_formats(model)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float().contiguous()
        export_dir.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            export_hf_checkpoint(model, export_dir=export_dir, dtype=torch.float32)
    save_file(
        {"input_ids": ids.contiguous(), "logits": logits},
        str(export_dir / "modelopt_logits.safetensors"),
        # one key: safetensors writes metadata in hash order, and these files should be byte-stable
        metadata={"modelopt_export": json.dumps({"format": fmt, "seed": seed,
                                                 "fused_amax_synced": synced}, sort_keys=True)},
    )
    counts = {}
    for kind in layers.values():
        counts[kind] = counts.get(kind, 0) + 1
    return export_dir, {"quantized_modules": counts, "fused_amax_synced": synced,
                        "experts": experts}


def export_all(out_dir, formats=DEFAULT_FORMATS, seed: int = 0, strict: bool = False,
               verbose: bool = False, experts: str = "auto", threads: int | None = 1) -> dict[str, Path]:
    """Export the tiny NemotronH in every format of ``formats`` under ``out_dir``.

    Returns {format: export folder} for the formats that exported; the others (a config this ModelOpt
    lacks, an export error) are listed with a one-line reason in ``out_dir/manifest.json`` under
    "failed" (``strict=True`` raises on the first instead). ``out_dir/source`` holds the unquantized
    model. ``experts``: see export_format. ``threads``: torch intra-op threads while exporting
    (restored after): 1 by default, which takes the thread count out of the numbers and is fastest
    for a model this small (a 2-thread ``index_add_`` waits on the second thread for ~70 ms on a
    loaded 2-core runner); None leaves torch's setting alone.
    """
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _export_all(out_dir, formats, seed, strict, verbose, experts)
    finally:
        torch.set_num_threads(previous)


def _export_all(out_dir, formats, seed, strict, verbose, experts) -> dict[str, Path]:
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    formats = tuple(formats)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = build_source_model(seed)
        source.save_pretrained(str(out_dir / "source"), safe_serialization=True)
        with torch.no_grad():
            src_logits = source(input_ids=eval_input_ids(seed, source.config.vocab_size)).logits
    from safetensors.torch import save_file

    save_file({"input_ids": eval_input_ids(seed, source.config.vocab_size),
               "logits": src_logits.float().contiguous()},
              str(out_dir / "source" / "source_logits.safetensors"))
    manifest = {"versions": versions(), "seed": seed,
                "layers": list(source.config.layers_block_type),
                "build_s": round(time.perf_counter() - t0, 2), "exported": {}, "failed": {}}
    done: dict[str, Path] = {}
    for fmt in formats:
        t, c = time.perf_counter(), time.process_time()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(_Devnull())
                with quiet:
                    path, info = _export_format(source, fmt, out_dir, seed, experts)
        except Exception as exc:  # noqa: BLE001 - reported, not hidden
            if strict:
                raise
            manifest["failed"][fmt] = _one_line(exc)
            if verbose:
                import traceback

                traceback.print_exc()
            continue
        done[fmt] = path
        manifest["exported"][fmt] = {"dir": fmt, "seconds": round(time.perf_counter() - t, 2),
                                     "cpu_seconds": round(time.process_time() - c, 2), **info}
    manifest["total_s"] = round(time.perf_counter() - t0, 2)
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return done


class _Devnull:
    """A stdout sink: ModelOpt prints a lot (progress, configs) that tests do not need."""

    def write(self, s):
        return len(s)

    def flush(self):
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--formats", nargs="+", default=list(DEFAULT_FORMATS),
                        help=f"default: {' '.join(DEFAULT_FORMATS)}; 'all' = {' '.join(ALL_FORMATS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strict", action="store_true", help="raise on the first failed format")
    parser.add_argument("--experts", choices=("auto", "fused", "per_expert"), default="auto",
                        help="MoE experts as transformers stacks them, split per expert, or auto")
    parser.add_argument("-v", "--verbose", action="store_true", help="keep ModelOpt's output")
    args = parser.parse_args(argv)
    formats = ALL_FORMATS if args.formats == ["all"] else tuple(args.formats)
    done = export_all(args.out_dir, formats, seed=args.seed, strict=args.strict, verbose=args.verbose,
                      experts=args.experts)
    manifest = json.loads((args.out_dir / "manifest.json").read_text())
    print(json.dumps(manifest["versions"]))
    for fmt in formats:
        if fmt in done:
            print(f"{fmt}: exported to {done[fmt]} in {manifest['exported'][fmt]['seconds']} s")
        else:
            print(f"{fmt}: FAILED {manifest['failed'][fmt]}")
    print(f"total {manifest['total_s']} s")
    return 0 if len(done) == len(formats) else 1


if __name__ == "__main__":
    sys.exit(main())
