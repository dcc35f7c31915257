"""Checkpoints written by NVIDIA's own nvidia-modelopt load as they are, and compute what their
weights say: against transformers on the same weights dequantized by a decoder written here from
the format's definition (independent of nemotron.quant.formats), and, where ModelOpt is installed,
against ModelOpt's own fake-quantized model (our activation emulation on).

Two sources: the exports kept in ../shared/fixtures/modelopt (ModelOpt 0.47.0; skipped when the folder
is absent), and exports made at test time by the installed ModelOpt (tests/modelopt_export.py;
skipped when it is not installed)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import nemotron
from nemotron.io.checkpoint import read_safetensors_index, write_safetensors
from nemotron.errors import CheckpointWarning
from nemotron.layers.cache import CacheOptions
from nemotron.quant.modules import QuantExperts, QuantLinear, set_activation_emulation

from conftest import disable_hf_dt_clamp_

# the loader's reference numerics: quantized layers dequantize, then multiply
pytestmark = pytest.mark.usefixtures("dequantizing_reference")

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "modelopt"
FIXTURE_FORMATS = ["NVFP4", "FP8", "MIXED", "NVFP4_KV"]

# E2M1 (FP4) code -> value: sign bit 3, then exponent 2 bits and mantissa 1 bit (OCP MX spec)
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
SCALE_LEAVES = ("weight_scale", "weight_scale_2", "input_scale", "k_scale", "v_scale")


def decode_weight(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One layer's stored tensors -> its fp32 weight. NVFP4: two codes per byte, low nibble first,
    times the E4M3 scale of each 16-element block times the fp32 global scale. FP8: E4M3 values times
    the per-tensor, per-channel or 128x128-block scale."""
    w, scale = tensors["weight"], tensors["weight_scale"].float()
    if w.dtype == torch.uint8:
        codes = torch.stack([w & 0x0F, w >> 4], dim=-1).reshape(w.shape[0], -1).long()
        values = E2M1_VALUES[codes]
        return values * scale.repeat_interleave(16, dim=1) * tensors["weight_scale_2"].float()
    values = w.view(torch.float8_e4m3fn).float() if w.dtype != torch.float8_e4m3fn else w.float()
    if scale.numel() == 1:
        return values * scale.reshape(())
    if scale.dim() == 4:   # [ceil(N/128), 1, ceil(K/128), 1]: the edge tiles are partial
        tiles = scale.reshape(scale.shape[0], scale.shape[2]).repeat_interleave(128, 0).repeat_interleave(128, 1)
        return values * tiles[:w.shape[0], :w.shape[1]]
    return values * scale.reshape(-1, 1)


def dequantized_checkpoint(export: Path, out: Path) -> Path:
    """The export with every quantized weight decoded to fp32 and its scales dropped, config.json
    without its quantization_config: an ordinary float checkpoint for transformers."""
    refs = read_safetensors_index(export / "model.safetensors")
    tensors = {name: ref.read() for name, ref in refs.items()}
    layers = {name.rsplit(".", 1)[0] for name in tensors if name.endswith(".weight_scale")}
    # transformers 5.5-5.14 save the embedding as `backbone.embedding` (and so do ModelOpt exports made
    # under them); the installed transformers reads only the releases' `backbone.embeddings`
    plain = {n.replace("backbone.embedding.", "backbone.embeddings."): t for n, t in tensors.items()
             if not n.endswith(SCALE_LEAVES)}
    for layer in layers:
        plain[f"{layer}.weight"] = decode_weight({leaf: tensors[f"{layer}.{leaf}"] for leaf in
                                                  ("weight", "weight_scale", "weight_scale_2")
                                                  if f"{layer}.{leaf}" in tensors})
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out / "model.safetensors", plain, metadata={"format": "pt"})
    config = json.loads((export / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    return out


def transformers_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = disable_hf_dt_clamp_(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
    with torch.no_grad():
        return hf(ids).logits


def our_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |Δlogit| in units of the reference logits' standard deviation."""
    return ((ours - ref).abs().max() / ref.std()).item()


def load_export(path: Path) -> nemotron.LoadedModel:
    """nemotron.load, with the one warning a 0.46-0.47 export earns (its mangled names) checked."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = nemotron.load(path)
    notes = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
    mangled = "\x00" in (path / "hf_quant_config.json").read_text(encoding="utf-8") or \
        "\\u0000" in (path / "hf_quant_config.json").read_text()
    assert len(notes) == (1 if mangled else 0), notes
    if mangled:
        assert "repaired" in notes[0] and "overrule" not in notes[0], notes[0]
    return loaded


def quantized_formats(model: torch.nn.Module) -> dict[str, str]:
    return {n: m.scheme.algo for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts))}


# --------------------------------------------------------------------------------------------------
# the exports kept as fixtures (ModelOpt 0.47.0)
# --------------------------------------------------------------------------------------------------

needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures/modelopt is absent")


@needs_fixtures
@pytest.mark.parametrize("fmt", FIXTURE_FORMATS)
def test_fixture_export_matches_transformers_on_decoded_weights(fmt, tmp_path):
    export = FIXTURES / f"nemotron_h-{fmt}"
    loaded = load_export(export)
    formats = quantized_formats(loaded.model)
    assert "lm_head" not in formats and formats, formats   # excluded by its (repaired) name, the rest quantized
    if fmt == "MIXED":
        assert set(formats.values()) == {"NVFP4", "FP8"}
        assert formats["backbone.layers.1.mixer.experts"] == "FP8"   # one entry for a MoE's routed experts
    else:
        assert set(formats.values()) == {"FP8" if fmt == "FP8" else "NVFP4"}
    if fmt == "NVFP4_KV":
        k_scale = loaded.model.backbone.layers[2].mixer.k_proj.k_scale
        assert k_scale.item() > 0
    ids = torch.randint(0, loaded.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = transformers_logits(dequantized_checkpoint(export, tmp_path / "decoded"), ids)
    err = relative_error(our_logits(loaded.model, ids), ref)
    assert err <= 1e-3, (fmt, err)


@needs_fixtures
@pytest.mark.parametrize("fmt", ["NVFP4", "FP8"])
def test_fixture_export_through_the_cpu_kernels(fmt, monkeypatch):
    """ModelOpt's own export, each quantized layer through the CPU decode kernels (nemotron.quant.cpu,
    which read the stored weight) against its dequantize-then-matmul reference: exact up to the
    order of fp32 sums, or within bf16 activations on AVX512-BF16. (Whole-model logits are
    no measure on this random export: a 1% change of a MoE layer's input flips a near-tied routing
    choice.)"""
    from nemotron import kernels

    if not kernels.available():
        pytest.skip("the CPU kernels do not run here")
    model = load_export(FIXTURES / f"nemotron_h-{fmt}").model
    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantExperts))]
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for layer in layers:
        k = layer.in_features if isinstance(layer, QuantLinear) else \
            layer.up_proj.shape[-1] * (2 if layer.scheme.nvfp4 else 1)   # NVFP4: two codes a byte
        x = torch.randn(3, k, generator=g)
        run = (lambda: layer(x)) if isinstance(layer, QuantLinear) else (lambda: layer.up(x, 1))
        with torch.inference_mode():
            monkeypatch.setattr(kernels, "_ENABLED", False)
            ref = run()
            monkeypatch.setattr(kernels, "_ENABLED", True)
            got = run()
        assert "_cached_packs" in vars(layer)
        worst = max(worst, ((got - ref).norm() / ref.norm()).item())
    bf16 = kernels.cpu_isa() == kernels.AVX512_BF16
    assert layers and worst <= (2 ** -8 if bf16 else 1e-6), (fmt, worst)


@needs_fixtures
def test_cli_generates_from_a_fixture_export_with_one_warning_line(tmp_path):
    """The real CLI on ModelOpt's NVFP4 export (with a byte tokenizer added): it generates, and the
    name repair is one `warning:` line."""
    from nemotron.io.tokenizer import write_byte_tokenizer

    from checkpoints import cli

    export = tmp_path / "nvfp4"
    shutil.copytree(FIXTURES / "nemotron_h-NVFP4", export)
    write_byte_tokenizer(export)
    r = cli("generate", "--model", export, "Hello", "--max-new-tokens", "4", "--temperature", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines == [f"warning: {export / 'hf_quant_config.json'}: repaired 6 module name(s) written with ModelOpt "
                     "0.46-0.47's name defect ('...\\x00backbone.pt_name_sentinel')"], r.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# exports made now by the installed ModelOpt, every format it has for this family
# --------------------------------------------------------------------------------------------------

# the formats of the acceptance checks run by default; the rest of what ModelOpt exports under -m slow
DEFAULT_PRODUCER_FORMATS = ["NVFP4", "FP8", "MIXED", "NVFP4_FP8KV"]
SLOW_PRODUCER_FORMATS = ["FP8_FP8KV", "FP8_PER_CHANNEL", "FP8_BLOCK_WO", "NVFP4_NVFP4KV", "W4A16_NVFP4"]
PRODUCER_FORMATS = DEFAULT_PRODUCER_FORMATS + [pytest.param(f, marks=pytest.mark.slow) for f in SLOW_PRODUCER_FORMATS]


def _producer_exports(tmp_path_factory, formats: list[str]) -> dict[str, Path]:
    """{format: export}: made now by the installed ModelOpt, or read from NEMOTRON_MODELOPT_EXPORTS, a
    folder that `python tests/modelopt_export.py DIR --formats all` filled under another ModelOpt
    version (its own venv), so the same checks run against any version's exports."""
    made = os.environ.get("NEMOTRON_MODELOPT_EXPORTS")
    if made:
        return {d.name: d for d in Path(made).iterdir() if (d / "hf_quant_config.json").is_file()}
    pytest.importorskip("modelopt")
    import modelopt_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return modelopt_export.export_all(tmp_path_factory.mktemp("modelopt"), formats, seed=0, verbose=False)


@pytest.fixture(scope="module")
def default_producer_exports(tmp_path_factory) -> dict[str, Path]:
    return _producer_exports(tmp_path_factory, DEFAULT_PRODUCER_FORMATS)


@pytest.fixture(scope="module")
def slow_producer_exports(tmp_path_factory) -> dict[str, Path]:
    return _producer_exports(tmp_path_factory, SLOW_PRODUCER_FORMATS)


@pytest.fixture
def producer_export(request, fmt) -> Path:
    """The export of `fmt` (skipped where the installed ModelOpt has no such format: W4A16 before 0.45)."""
    exports = request.getfixturevalue("slow_producer_exports" if fmt in SLOW_PRODUCER_FORMATS
                                      else "default_producer_exports")
    if fmt not in exports:
        pytest.skip(f"this ModelOpt exports no {fmt}")
    return exports[fmt]


def _modelopt_reference(export: Path) -> tuple[torch.Tensor, torch.Tensor]:
    ref = {name: r.read() for name, r in read_safetensors_index(export / "modelopt_logits.safetensors").items()}
    return ref["input_ids"], ref["logits"]


@pytest.mark.slow   # by default the 0.47.0 fixtures above cover this check
@pytest.mark.parametrize("fmt", DEFAULT_PRODUCER_FORMATS + SLOW_PRODUCER_FORMATS)
def test_producer_export_matches_transformers_on_decoded_weights(producer_export, fmt, tmp_path):
    """Weight-only (the default): the same numbers as transformers on the independently decoded weights."""
    ids, _ = _modelopt_reference(producer_export)
    loaded = load_export(producer_export)
    ref = transformers_logits(dequantized_checkpoint(producer_export, tmp_path / "decoded"), ids)
    assert relative_error(our_logits(loaded.model, ids), ref) <= 1e-3


@pytest.mark.parametrize("fmt", PRODUCER_FORMATS)
def test_producer_export_with_activation_emulation_matches_modelopts_fake_quant(producer_export, fmt):
    """With activation emulation on (and the KV cache in the format the export names), the logits are
    those of ModelOpt's own fake-quantized model. Per token: an activation that lands within ~1e-6 of
    an FP8 / FP4 rounding boundary (our arithmetic and ModelOpt's differ by that much upstream) may round
    the other way, and in an MoE layer pick another expert, so a few tokens may differ by that one
    step; every other token matches to 1e-3 of the logits' standard deviation."""
    export = producer_export
    ids, reference = _modelopt_reference(export)
    loaded = load_export(export)
    assert set_activation_emulation(loaded.model) > 0 or fmt in ("W4A16_NVFP4", "FP8_BLOCK_WO")
    kv = json.loads((export / "hf_quant_config.json").read_text())["quantization"].get("kv_cache_quant_algo")
    if kv:
        loaded.cache_options = CacheOptions(kv_dtype=kv.lower())
    with torch.no_grad():
        ours = loaded.model(ids, loaded.new_cache(*ids.shape))
    per_token = ((ours - reference).abs().amax(-1) / reference.std()).flatten()
    assert (per_token <= 1e-3).float().mean() >= 0.9, per_token
    assert per_token.median() <= 1e-4 and per_token.max() <= 0.1, per_token


@needs_fixtures
@pytest.mark.parametrize("fmt", FIXTURE_FORMATS)
def test_our_writer_writes_what_modelopt_writes(fmt):
    """Read back and written again, each quantization config is the one ModelOpt wrote (its names
    repaired): config.json's quantization_config and hf_quant_config.json alike."""
    from nemotron.quant.modelopt import parse_quant_config, repair_name

    def repaired(value):
        if isinstance(value, dict):
            return {repair_name(k): repaired(v) for k, v in value.items()}
        if isinstance(value, list):
            return [repaired(v) for v in value]
        return repair_name(value) if isinstance(value, str) else value

    export = FIXTURES / f"nemotron_h-{fmt}"
    config_json = json.loads((export / "config.json").read_text())["quantization_config"]
    legacy = json.loads((export / "hf_quant_config.json").read_text())
    assert parse_quant_config(config_json).to_config_json() == repaired(config_json)
    assert parse_quant_config(legacy).to_hf_quant_config() == repaired(legacy)
