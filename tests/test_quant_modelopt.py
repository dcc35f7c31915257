"""ModelOpt-format checkpoints built by hand (uint8 packed NVFP4 weights, float8_e4m3fn block scales,
fp32 weight_scale_2 / input_scale, FP8 per-tensor and per-channel, a MIXED_PRECISION config with an
exclusion) load through `nemotron.load` and compute exactly the dequantize-then-matmul math."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import nemotron
from nemotron.io.checkpoint import read_safetensors_index, write_safetensors
from nemotron.errors import CheckpointError, CheckpointWarning
from nemotron.config.presets import toy_super_config
from nemotron.io.random_checkpoint import init_checkpoint
from nemotron.quant import formats
from nemotron.quant.modelopt import repair_name
from nemotron.quant.modules import QuantExperts, QuantLinear, set_activation_emulation

# the loader's reference numerics: quantized layers dequantize, then multiply
pytestmark = pytest.mark.usefixtures("dequantizing_reference")

# layer -> format in the hand-built MIXED_PRECISION checkpoint (layers 1 and 4 are LatentMoE, 3 attention)
LAYERS = {
    "backbone.layers.0.mixer.in_proj": "NVFP4",
    "backbone.layers.0.mixer.out_proj": "W4A16_NVFP4",
    "backbone.layers.3.mixer.o_proj": "FP8",
    "backbone.layers.1.mixer.shared_experts.up_proj": "FP8_PER_CHANNEL_PER_TOKEN",
    "backbone.layers.1.mixer.fc1_latent_proj": "NVFP4",
}
EXPERTS = "backbone.layers.4.mixer.experts"   # every expert NVFP4


def _stored(algo: str, w: torch.Tensor, amax_in: float) -> dict[str, torch.Tensor]:
    """One layer's tensors exactly as ModelOpt exports them, from the format functions."""
    if algo in ("NVFP4", "W4A16_NVFP4"):
        packed, scale, scale_2 = formats.nvfp4_quantize(w)
        out = {"weight": packed, "weight_scale": scale, "weight_scale_2": scale_2}
        if algo == "NVFP4":
            out["input_scale"] = formats.nvfp4_global_scale(amax_in)
        return out
    q, scale = formats.fp8_quantize(w, "tensor" if algo == "FP8" else "channel")
    out = {"weight": q, "weight_scale": scale}
    if algo == "FP8":
        out["input_scale"] = torch.tensor(amax_in / 448.0)
    return out


def _dequantized(algo: str, t: dict[str, torch.Tensor]) -> torch.Tensor:
    if algo in ("NVFP4", "W4A16_NVFP4"):
        return formats.nvfp4_dequantize(t["weight"], t["weight_scale"], t["weight_scale_2"])
    return formats.fp8_dequantize(t["weight"], t["weight_scale"])


@pytest.fixture(scope="module")
def hand_built(tmp_path_factory):
    """(float checkpoint, ModelOpt mixed checkpoint, {tensor name: stored tensor}, reference model
    whose quantized layers hold their dequantized weights)."""
    root = tmp_path_factory.mktemp("modelopt")
    base = init_checkpoint(root / "float", toy_super_config(), seed=0)
    tensors = {k: r.read() for k, r in read_safetensors_index(base / "model.safetensors").items()}
    quant = root / "mixed"
    shutil.copytree(base, quant)
    stored, deq = {}, {}
    for layer, algo in LAYERS.items():
        w = tensors.pop(f"{layer}.weight")
        for name, t in _stored(algo, w, amax_in=3.0).items():
            stored[f"{layer}.{name}"] = t
        deq[f"{layer}.weight"] = _dequantized(algo, {k.rsplit(".", 1)[1]: v for k, v in stored.items()
                                                     if k.rsplit(".", 1)[0] == layer})
    n_experts = toy_super_config().n_routed_experts
    layers = dict(LAYERS)
    for e in range(n_experts):
        for proj in ("up_proj", "down_proj"):
            layer = f"{EXPERTS}.{e}.{proj}"
            layers[layer] = "NVFP4"
            t = _stored("NVFP4", tensors.pop(f"{layer}.weight"), amax_in=2.0)
            stored.update({f"{layer}.{k}": v for k, v in t.items()})
            deq[f"{layer}.weight"] = _dequantized("NVFP4", t)
    write_safetensors(quant / "model.safetensors", {**tensors, **stored}, metadata={"format": "pt"})
    config = {"producer": {"name": "modelopt", "version": "0.39.0"},
              "quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None,
                               "quantized_layers": {k: ({"quant_algo": a, "group_size": 16} if "NVFP4" in a
                                                        else {"quant_algo": a}) for k, a in layers.items()},
                               # an exclusion too: vLLM reads it; here it changes nothing
                               "exclude_modules": ["lm_head", "backbone.layers.2.mixer*"]}}
    (quant / "hf_quant_config.json").write_text(json.dumps(config))
    reference = nemotron.load(base)
    with torch.no_grad():
        for name, w in deq.items():
            if name.startswith(EXPERTS):
                e, proj = name[len(EXPERTS) + 1:].split(".")[:2]
                getattr(reference.model.backbone.layers[4].mixer.experts, proj)[int(e)].copy_(w)
            else:
                reference.model.get_parameter(name).copy_(w)
    return base, quant, stored, reference


def test_hand_built_modelopt_checkpoint_loads_packed_and_bit_exact(hand_built):
    _, quant, stored, _ = hand_built
    m = nemotron.load(quant)
    layers = m.model.backbone.layers
    assert isinstance(layers[0].mixer.in_proj, QuantLinear) and layers[0].mixer.in_proj.scheme.algo == "NVFP4"
    assert isinstance(layers[3].mixer.o_proj, QuantLinear) and layers[3].mixer.o_proj.scheme.algo == "FP8"
    assert isinstance(layers[4].mixer.experts, QuantExperts)
    assert not isinstance(layers[3].mixer.q_proj, QuantLinear)     # not listed: unquantized
    for name, t in stored.items():   # every stored tensor sits in the model as written, same dtype, same bits
        owner, leaf = name.rsplit(".", 1)
        if owner.startswith(EXPERTS + "."):
            e, proj = owner[len(EXPERTS) + 1:].split(".")
            got = getattr(layers[4].mixer.experts, proj if leaf == "weight" else f"{proj}_{leaf}")[int(e)]
        else:
            got = getattr(m.model.get_submodule(owner), leaf)
        assert got.dtype == t.dtype, name
        assert torch.equal(got.view(torch.uint8), t.view(torch.uint8)) if t.element_size() == 1 else torch.equal(got, t)


def test_hand_built_checkpoint_matches_dequantize_then_matmul(hand_built):
    _, quant, _, reference = hand_built
    m = nemotron.load(quant)
    ids = torch.randint(5, 300, (2, 12))
    with torch.inference_mode():
        got, want = m.model(ids), reference.model(ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # greedy generation through the quantized layers agrees too
    assert m.generate("The", max_new_tokens=8, temperature=0) == \
        reference.generate("The", max_new_tokens=8, temperature=0)


def test_w4a4_emulation_fake_quantizes_inputs(hand_built):
    _, quant, stored, _ = hand_built
    m = nemotron.load(quant)
    layer = m.model.backbone.layers[0].mixer.in_proj
    x = torch.randn(3, layer.in_features)
    w = formats.nvfp4_dequantize(stored["backbone.layers.0.mixer.in_proj.weight"],
                                 stored["backbone.layers.0.mixer.in_proj.weight_scale"],
                                 stored["backbone.layers.0.mixer.in_proj.weight_scale_2"])
    torch.testing.assert_close(layer(x), x @ w.t())
    # NVFP4 (W4A4), FP8 o_proj and the NVFP4 experts carry input scales, per-channel FP8 quantizes each
    # token at run time; W4A16 does not touch its inputs
    assert set_activation_emulation(m.model) == 5
    xq = formats.nvfp4_fake_quantize(x, stored["backbone.layers.0.mixer.in_proj.input_scale"])
    assert not torch.equal(xq, x)
    torch.testing.assert_close(layer(x), xq @ w.t())
    out = m.model.backbone.layers[3].mixer.o_proj
    x = torch.randn(2, out.in_features)
    xq = formats.fp8_fake_quantize(x, stored["backbone.layers.3.mixer.o_proj.input_scale"])
    torch.testing.assert_close(out(x), xq @ out.dequantized_weight().t())
    up = m.model.backbone.layers[1].mixer.shared_experts.up_proj     # FP8_PER_CHANNEL_PER_TOKEN
    x = torch.randn(4, up.in_features) * torch.tensor([[0.01], [1.0], [30.0], [500.0]])
    step = x.abs().amax(-1, keepdim=True) / 448.0                     # each token its own scale
    xq = (x / step).to(torch.float8_e4m3fn).float() * step
    assert not torch.equal(xq, x)
    torch.testing.assert_close(up(x), xq @ up.dequantized_weight().t())
    assert not m.model.backbone.layers[0].mixer.out_proj.emulate_activations   # W4A16


def test_config_json_quantization_config_shape_loads(hand_built, tmp_path):
    _, quant, _, reference = hand_built
    other = tmp_path / "cfgjson"
    shutil.copytree(quant, other)
    legacy = json.loads((other / "hf_quant_config.json").read_text())
    (other / "hf_quant_config.json").unlink()
    config = json.loads((other / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "MIXED_PRECISION",
                                     "quantized_layers": legacy["quantization"]["quantized_layers"],
                                     "ignore": ["lm_head"], "producer": legacy["producer"]}
    (other / "config.json").write_text(json.dumps(config))
    ids = torch.randint(5, 300, (1, 9))
    with torch.inference_mode():
        torch.testing.assert_close(nemotron.load(other).model(ids), reference.model(ids), rtol=1e-5, atol=1e-5)


def _assert_same_logits(m: nemotron.LoadedModel, reference: nemotron.LoadedModel) -> None:
    ids = torch.randint(5, 300, (1, 9))
    with torch.inference_mode():
        torch.testing.assert_close(m.model(ids), reference.model(ids), rtol=1e-5, atol=1e-5)


def _variant(quant, tmp_path, edit_config=None, edit_tensors=None):
    out = tmp_path / "variant"
    shutil.copytree(quant, out)
    if edit_config:
        config = json.loads((out / "hf_quant_config.json").read_text())
        edit_config(config["quantization"])
        (out / "hf_quant_config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = {k: r.read() for k, r in read_safetensors_index(out / "model.safetensors").items()}
        edit_tensors(tensors)
        write_safetensors(out / "model.safetensors", tensors)
    return out


def test_unknown_per_layer_algo_is_an_error_naming_the_layer(hand_built, tmp_path):
    _, quant, _, _ = hand_built

    def edit(q):
        q["quantized_layers"]["backbone.layers.0.mixer.out_proj"] = {"quant_algo": "W4A8_AWQ"}

    with pytest.raises(CheckpointError, match=r"backbone\.layers\.0\.mixer\.out_proj.*W4A8_AWQ"):
        nemotron.load(_variant(quant, tmp_path, edit_config=edit))


def test_unknown_quant_algo_is_an_error(hand_built, tmp_path):
    _, quant, _, _ = hand_built

    def edit(q):
        q["quant_algo"] = "INT3_MAGIC"

    with pytest.raises(CheckpointError, match="INT3_MAGIC"):
        nemotron.load(_variant(quant, tmp_path, edit_config=edit))


def test_wrong_shape_scale_is_an_error_naming_the_tensor(hand_built, tmp_path):
    _, quant, _, _ = hand_built
    name = "backbone.layers.0.mixer.in_proj.weight_scale"

    def edit(t):
        t[name] = t[name][:, :-1].contiguous()

    with pytest.raises(CheckpointError, match=rf"wrong tensor shape: {name}"):
        nemotron.load(_variant(quant, tmp_path, edit_tensors=edit))


def test_missing_scale_is_an_error_naming_the_tensor(hand_built, tmp_path):
    _, quant, _, _ = hand_built

    def edit(t):
        del t["backbone.layers.3.mixer.o_proj.input_scale"]
        del t[f"{EXPERTS}.5.down_proj.weight_scale_2"]

    with pytest.raises(CheckpointError, match=r"missing tensor\(s\).*backbone\.layers\.3\.mixer\.o_proj\.input_scale"):
        nemotron.load(_variant(quant, tmp_path, edit_tensors=edit))


def test_mixed_map_naming_no_layer_is_an_error(hand_built, tmp_path):
    _, quant, _, _ = hand_built

    def edit(q):
        q["quantized_layers"]["backbone.layers.0.mixer.not_a_layer"] = {"quant_algo": "FP8"}

    with pytest.raises(CheckpointError, match="not_a_layer"):
        nemotron.load(_variant(quant, tmp_path, edit_config=edit))


def test_mixed_map_entry_for_a_whole_experts_module(hand_built, tmp_path):
    """quantized_layers may name the experts module instead of every expert (vLLM resolves such
    prefixes too)."""
    _, quant, _, reference = hand_built

    def edit(q):
        layers = q["quantized_layers"]
        for key in [k for k in layers if k.startswith(EXPERTS + ".")]:
            del layers[key]
        layers[EXPERTS] = {"quant_algo": "NVFP4", "group_size": 16}

    m = nemotron.load(_variant(quant, tmp_path, edit_config=edit))
    assert isinstance(m.model.backbone.layers[4].mixer.experts, QuantExperts)
    _assert_same_logits(m, reference)


def test_per_tensor_scales_stored_as_one_element_vectors_load(hand_built, tmp_path):
    """Some exports write per-tensor scales as [1] rather than as scalars."""
    _, quant, _, reference = hand_built

    def edit(t):
        for name in list(t):
            if name.endswith(("weight_scale_2", "input_scale")) or name == "backbone.layers.3.mixer.o_proj.weight_scale":
                t[name] = t[name].reshape(1)

    m = nemotron.load(_variant(quant, tmp_path, edit_tensors=edit))
    assert m.model.backbone.layers[0].mixer.in_proj.weight_scale_2.shape == ()
    _assert_same_logits(m, reference)


def test_changing_the_model_dtype_keeps_the_stored_formats(hand_built):
    _, quant, stored, _ = hand_built
    m = nemotron.load(quant)
    m.model.to(torch.bfloat16)
    layer = m.model.backbone.layers[0].mixer.in_proj
    assert (layer.weight.dtype, layer.weight_scale.dtype, layer.weight_scale_2.dtype) == \
        (torch.uint8, torch.float8_e4m3fn, torch.float32)
    assert torch.equal(layer.weight, stored["backbone.layers.0.mixer.in_proj.weight"])
    assert m.model.backbone.layers[4].mixer.experts.up_proj.dtype == torch.uint8
    with torch.inference_mode():
        logits = m.model(torch.randint(5, 300, (1, 6)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def _load_warning(path) -> tuple[nemotron.LoadedModel, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = nemotron.load(path)
    return m, [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]


def test_tensors_overrule_a_config_that_quantizes_a_float_layer(hand_built, tmp_path):
    """A layer the config quantizes whose weight is stored in float with no scales is unquantized
    (one warning names it), never refused."""
    _, quant, _, reference = hand_built

    def edit(q):
        q["quantized_layers"]["lm_head"] = {"quant_algo": "NVFP4", "group_size": 16}
        q["quantized_layers"]["backbone.layers.3.mixer.q_proj"] = {"quant_algo": "FP8"}

    m, notes = _load_warning(_variant(quant, tmp_path, edit_config=edit))
    assert not isinstance(m.model.lm_head, QuantLinear)
    assert not isinstance(m.model.backbone.layers[3].mixer.q_proj, QuantLinear)
    assert len(notes) == 1 and "lm_head (config: NVFP4; stored unquantized)" in notes[0], notes
    assert "backbone.layers.3.mixer.q_proj (config: FP8; stored unquantized)" in notes[0]
    _assert_same_logits(m, reference)


def test_tensors_overrule_a_config_that_leaves_a_quantized_layer_out(hand_built, tmp_path):
    """Layers the config leaves out whose tensors are packed NVFP4 / FP8 with scales load in the
    format their tensors have."""
    _, quant, _, reference = hand_built

    def edit(q):
        del q["quantized_layers"]["backbone.layers.0.mixer.in_proj"]                     # NVFP4 + input_scale
        del q["quantized_layers"]["backbone.layers.0.mixer.out_proj"]                    # W4A16: no input_scale
        del q["quantized_layers"]["backbone.layers.1.mixer.shared_experts.up_proj"]      # per-channel FP8
        for key in [k for k in q["quantized_layers"] if k.startswith(EXPERTS + ".")]:
            del q["quantized_layers"][key]

    m, notes = _load_warning(_variant(quant, tmp_path, edit_config=edit))
    layers = m.model.backbone.layers
    assert layers[0].mixer.in_proj.scheme.algo == "NVFP4"
    assert layers[0].mixer.out_proj.scheme.algo == "W4A16_NVFP4"
    assert layers[1].mixer.shared_experts.up_proj.scheme.algo == "FP8_PER_CHANNEL_PER_TOKEN"
    assert isinstance(layers[4].mixer.experts, QuantExperts) and layers[4].mixer.experts.scheme.algo == "NVFP4"
    assert len(notes) == 1 and "backbone.layers.0.mixer.in_proj (config: unquantized; stored NVFP4)" in notes[0]
    assert f"{EXPERTS}.* ({2 * toy_super_config().n_routed_experts} expert weights: config: unquantized; stored NVFP4)" \
        in notes[0], notes[0]
    _assert_same_logits(m, reference)


def test_a_quantized_weight_without_its_scale_is_an_error_naming_it(hand_built, tmp_path):
    _, quant, _, _ = hand_built

    def edit_config(q):
        del q["quantized_layers"]["backbone.layers.0.mixer.in_proj"]

    def edit_tensors(t):
        del t["backbone.layers.0.mixer.in_proj.weight_scale"]

    with pytest.raises(CheckpointError, match=r"backbone\.layers\.0\.mixer\.in_proj\.weight is stored as uint8 "
                                              r"\(quantized\) but the checkpoint has no .*weight_scale"):
        nemotron.load(_variant(quant, tmp_path, edit_config=edit_config, edit_tensors=edit_tensors))


@pytest.mark.parametrize("written, meant", [
    ("lm_head.\x00backbone.pt_name_sentinel", "lm_head"),
    ("backbone.layers.1.mixer.experts.\x00backbone.pt_name_sentinel", "backbone.layers.1.mixer.experts"),
    ("backbone.layers.4.mixer.\x00backbone.pt_name_sentinel.*", "backbone.layers.4.mixer.*"),
    ("*.mixer.gate.\x00backbone.pt_name_sentinel*", "*.mixer.gate*"),
    ("backbone.layers.0.mixer.in_proj", "backbone.layers.0.mixer.in_proj"),
])
def test_modelopt_name_sentinel_defect_is_repaired(written, meant):
    """ModelOpt 0.46-0.47 write every exclude_modules / quantized_layers name with their rename
    sentinel mangled (see ../shared/fixtures/modelopt); wildcards follow the sentinel."""
    assert repair_name(written) == meant


def test_mangled_names_load_with_one_warning(hand_built, tmp_path):
    _, quant, _, reference = hand_built

    def edit(q):
        q["quantized_layers"] = {f"{k}.\x00backbone.pt_name_sentinel": v for k, v in q["quantized_layers"].items()}
        q["exclude_modules"] = ["lm_head.\x00backbone.pt_name_sentinel",
                                "backbone.layers.2.mixer.\x00backbone.pt_name_sentinel*"]

    m, notes = _load_warning(_variant(quant, tmp_path, edit_config=edit))
    assert notes == [f"{tmp_path / 'variant' / 'hf_quant_config.json'}: repaired {len(LAYERS) + 2 * toy_super_config().n_routed_experts + 2} module "
                     "name(s) written with ModelOpt 0.46-0.47's name defect ('...\\x00backbone.pt_name_sentinel')"]
    assert m.model.backbone.layers[0].mixer.in_proj.scheme.algo == "NVFP4"
    _assert_same_logits(m, reference)


def test_kv_scales_follow_the_tensors(hand_built, tmp_path):
    """A config announcing an FP8 KV cache without k_scale / v_scale tensors loads with the scales
    absent (1.0, as vLLM defaults them) and says so; stored scales the config does not announce load."""
    _, quant, _, _ = hand_built

    def announce(q):
        q["kv_cache_quant_algo"] = "FP8"

    m, notes = _load_warning(_variant(quant, tmp_path, edit_config=announce))
    attn = m.model.backbone.layers[3].mixer
    assert not hasattr(attn.k_proj, "k_scale") and "k_proj.k_scale (config: KV cache FP8; not stored)" in notes[0]

    def store(t):
        t["backbone.layers.3.mixer.k_proj.k_scale"] = torch.tensor(2.0)
        t["backbone.layers.3.mixer.v_proj.v_scale"] = torch.tensor(3.0)

    shutil.rmtree(tmp_path / "variant")
    m, notes = _load_warning(_variant(quant, tmp_path, edit_tensors=store))
    attn = m.model.backbone.layers[3].mixer
    assert (attn.k_proj.k_scale.item(), attn.v_proj.v_scale.item()) == (2.0, 3.0)
    assert "v_proj.v_scale (config: KV cache unquantized; stored)" in notes[0]


@pytest.mark.parametrize("version, stored, loaded", [("0.39.0", 0.5, 3.0), ("0.42.0", 0.5, 0.5), ("0.47.0", 0.5, 0.5)])
def test_nvfp4_kv_scales_written_before_modelopt_042_are_rescaled(hand_built, tmp_path, version, stored, loaded):
    """ModelOpt before 0.42 wrote an NVFP4 KV cache's scales as amax / (6 * 448), later ones as
    amax / 448 (as for FP8): both load as amax / 448."""
    _, quant, _, _ = hand_built

    def kv(q):
        q["kv_cache_quant_algo"] = "NVFP4"

    def scales(t):
        t["backbone.layers.3.mixer.k_proj.k_scale"] = torch.tensor(stored)
        t["backbone.layers.3.mixer.v_proj.v_scale"] = torch.tensor(stored / 2)

    out = _variant(quant, tmp_path, edit_config=kv, edit_tensors=scales)
    config = json.loads((out / "hf_quant_config.json").read_text())
    config["producer"]["version"] = version
    (out / "hf_quant_config.json").write_text(json.dumps(config))
    attn = nemotron.load(out).model.backbone.layers[3].mixer
    assert (attn.k_proj.k_scale.item(), attn.v_proj.v_scale.item()) == (loaded, loaded / 2)
