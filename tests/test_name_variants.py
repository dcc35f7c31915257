"""Checkpoint tensor-name and config-key variants across transformers versions and NVIDIA's releases.

Only one transformers (5.23) runs in the test process, so each variant is built from a checkpoint that
5.23's save_pretrained wrote, rewritten into the exact layout the other writer produces (each case says
which writer and where that was seen), then loaded with nemotron.load and compared with the 5.23
model's logits. What each writer produces was read off real save_pretrained output of transformers
4.57.6, 5.0.0, 5.3.0, 5.5.0, 5.10.1, 5.14.0, 5.18.0 and 5.23.0 (tiny random models), their
conversion_mapping.py, NVIDIA's remote modeling_nemotron_h.py, and the safetensors indexes of NVIDIA's
releases (listed in huggingface/transformers PR #48075). The name map under test is
each family's NAME_MAP (nemotron.models.family(config).name_map).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from checkpoints import assert_one_line_error, cli
from safetensors.torch import load_file, save_file

import nemotron
from nemotron.errors import CheckpointError, CheckpointWarning

from conftest import randomize_

TOL = 1e-4
# Mamba, LatentMoE-less MoE with a shared expert, attention, Mamba, dense MLP (chunk_size 8)
LAYERS = ["linear_attention", "moe", "full_attention", "linear_attention", "mlp"]


def _rewrite(src: Path, dst: Path, rename: Callable[[str], str] = lambda n: n, drop: tuple[str, ...] = (),
             add: dict[str, torch.Tensor] | None = None,
             config: Callable[[dict], dict] = lambda c: c) -> Path:
    """A copy of checkpoint `src` with its tensors renamed / dropped / added and its config.json edited."""
    shutil.copytree(src, dst)
    tensors = {rename(k): v for k, v in load_file(src / "model.safetensors").items() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    raw = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(raw), indent=2))
    return dst


def _max_diff(path: Path, hf, vocab: int = 96) -> float:
    ours = nemotron.load(path)
    worst = 0.0
    g = torch.Generator().manual_seed(1)
    for length in (16, 13):   # chunk_size 8: a multiple and not
        ids = torch.randint(0, vocab, (2, length), generator=g)
        with torch.no_grad():
            ref = hf(input_ids=ids, use_cache=False).logits.float()
            worst = max(worst, (ours.model(ids) - ref).abs().max().item())
    return worst


@pytest.fixture
def hf_h(make_hf_nemotron_h):
    """transformers 5.23's NemotronHForCausalLM (Mamba, MoE + shared expert, attention, MLP), saved."""
    return make_hf_nemotron_h(layers_block_type=LAYERS)


# --------------------------------------------------------------------------------------------------
# Nemotron-H: tensor names
# --------------------------------------------------------------------------------------------------

# transformers 5.3-5.15 layer-type names; 5.14+ write 5.23's (linear_attention / full_attention)
_OLD_LAYER_TYPES = {"linear_attention": "mamba", "full_attention": "attention"}


def _as_5_10(raw: dict) -> dict:
    """config.json as transformers 5.3-5.10 write it (seen in 5.3.0, 5.5.0, 5.10.1 output): the
    layer-type lists use mamba / attention, and no output_router_logits."""
    raw = dict(raw)
    raw["layers_block_type"] = [_OLD_LAYER_TYPES.get(t, t) for t in raw["layers_block_type"]]
    raw["mtp_layers_block_type"] = [_OLD_LAYER_TYPES.get(t, t) for t in raw["mtp_layers_block_type"]]
    raw.pop("output_router_logits", None)
    raw["transformers_version"] = "5.10.1"
    return raw


def _as_5_14(raw: dict) -> dict:
    raw = {k: v for k, v in raw.items() if k != "output_router_logits"}
    return {**raw, "transformers_version": "5.14.0"}


def _singular_embedding(name: str) -> str:
    # transformers 5.3.0-5.15.x save_pretrained: conversion_mapping.py's nemotron_h entry has
    # WeightRenaming("embedding.weight", "embeddings.weight"), reversed on save, so the file holds
    # `backbone.embedding.weight` (seen in 5.3.0, 5.5.0, 5.10.1, 5.14.0 output; the rename is gone
    # from 5.16.0, huggingface/transformers PR #48075). mamba_ssm's MambaLMHeadModel uses it too.
    return "backbone.embedding.weight" if name == "backbone.embeddings.weight" else name


@pytest.mark.parametrize("version,config", [("5.14", _as_5_14), ("5.10", _as_5_10)])
def test_transformers_5_3_to_5_15_singular_embedding(hf_h, tmp_path, version, config):
    path, hf = hf_h
    out = _rewrite(path, tmp_path / version, rename=_singular_embedding, config=config)
    assert "backbone.embedding.weight" in load_file(out / "model.safetensors")
    assert _max_diff(out, hf) <= TOL


def test_transformers_internal_names_and_stacked_experts(hf_h, tmp_path):
    """save_pretrained(save_original_format=False) (transformers 5.3+, every version checked) and a raw
    model.state_dict() write transformers' own module names: `model.` for `backbone.`, and each MoE
    layer's experts as two stacked 3-D tensors `mixer.experts.up_proj [E, I, H]` / `down_proj [E, H, I]`."""
    path, hf = hf_h
    out = tmp_path / "internal"
    hf.save_pretrained(out, save_original_format=False)   # written by 5.23 itself, not simulated
    names = load_file(out / "model.safetensors")
    assert "model.embeddings.weight" in names and names["model.layers.1.mixer.experts.up_proj"].dim() == 3
    assert _max_diff(out, hf) <= TOL


def test_release_layout(hf_h, tmp_path):
    """NVIDIA's releases (Nemotron-H 8B/47B/56B, Nano 2 9B/12B, Nemotron 3 Nano/Super: their
    model.safetensors.index.json, as tabulated in transformers PR #48075): `backbone.embeddings`,
    `backbone.layers.{i}.mixer.*`, one tensor per expert, `backbone.norm_f`, `lm_head`; a config with
    `hybrid_override_pattern`, `torch_dtype` and `time_step_limit: [0.0, Infinity]` in plain JSON."""
    path, hf = hf_h

    def release(raw: dict) -> dict:
        raw = dict(raw)
        chars = {"linear_attention": "M", "moe": "E", "full_attention": "*", "mlp": "-"}
        raw["hybrid_override_pattern"] = "".join(chars[t] for t in raw.pop("layers_block_type"))
        raw.pop("mtp_layers_block_type")
        raw["num_hidden_layers"] = len(raw["hybrid_override_pattern"])
        raw["torch_dtype"] = raw.pop("dtype")
        raw["time_step_limit"] = [0.0, float("inf")]
        return raw

    out = _rewrite(path, tmp_path / "release", config=release)
    text = (out / "config.json").read_text()
    assert "Infinity" in text and "__float__" not in text
    assert "backbone.layers.1.mixer.experts.7.up_proj.weight" in load_file(out / "model.safetensors")
    assert _max_diff(out, hf) <= TOL


def test_language_model_wrapper(hf_h, tmp_path):
    """VL / Omni checkpoints carry the LLM under `language_model.`."""
    path, hf = hf_h
    out = _rewrite(path, tmp_path / "vl", rename=lambda n: "language_model." + n)
    assert _max_diff(out, hf) <= TOL


# --------------------------------------------------------------------------------------------------
# Nemotron-H: a tied output head
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("embedding", ["embeddings", "embedding"])
def test_tied_head_read_from_the_embedding(make_hf_nemotron_h, tmp_path, embedding):
    """NVIDIA's remote modeling_nemotron_h.py declares `_tied_weights_keys = ["lm_head.weight"]`: with
    tie_word_embeddings it shares lm_head with the embedding and saves no lm_head.weight (mamba_ssm does
    the same, under `backbone.embedding.weight`). transformers' NemotronH never ties (its
    `_tied_weights_keys` is empty), so the reference here gets its lm_head set to the embedding."""
    path, hf = make_hf_nemotron_h(layers_block_type=LAYERS, tie_word_embeddings=True)
    with torch.no_grad():
        hf.lm_head.weight.copy_(hf.model.embeddings.weight)
    rename = _singular_embedding if embedding == "embedding" else (lambda n: n)
    out = _rewrite(path, tmp_path / "tied", rename=rename, drop=("lm_head.weight",))
    assert not any(k.startswith("lm_head") for k in load_file(out / "model.safetensors"))
    assert _max_diff(out, hf) <= TOL


def test_tied_config_with_its_own_lm_head_uses_it(make_hf_nemotron_h):
    """transformers 5.x writes lm_head.weight even with tie_word_embeddings (its NemotronH never ties):
    that tensor is what it computes with, so it is what we load."""
    path, hf = make_hf_nemotron_h(layers_block_type=LAYERS, tie_word_embeddings=True)
    assert not torch.equal(hf.lm_head.weight, hf.model.embeddings.weight)
    assert _max_diff(path, hf) <= TOL


def test_untied_config_without_lm_head_is_an_error(hf_h, tmp_path):
    path, _ = hf_h
    out = _rewrite(path, tmp_path / "headless", drop=("lm_head.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) in checkpoint: lm_head\.weight"):
        nemotron.load(out)
    assert_one_line_error(cli("generate", "--model", out, "hi"), "lm_head.weight")


# --------------------------------------------------------------------------------------------------
# Nemotron-H: MTP
# --------------------------------------------------------------------------------------------------


def test_mtp_config_without_mtp_tensors_loads_without_mtp(make_hf_nemotron_h, tmp_path):
    """transformers implements no MTP (`_keys_to_ignore_on_load_unexpected = [r"mtp.*"]`, no mtp module
    in any version checked): saving a model whose config has num_nextn_predict_layers > 0 writes that
    config and no `mtp.` tensor (real 5.23 output here; 5.3-5.18 do the same). It loads without MTP."""
    path, hf = make_hf_nemotron_h(layers_block_type=LAYERS, num_nextn_predict_layers=1,
                                  mtp_layers_block_type=["full_attention", "moe"])
    assert json.loads((path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    assert not any(k.startswith("mtp.") for k in load_file(path / "model.safetensors"))
    assert _max_diff(path, hf) <= TOL
    with pytest.warns(CheckpointWarning, match=r"num_nextn_predict_layers=1 but the checkpoint holds no mtp\.\* tensor"):
        ours = nemotron.load(path)
    assert ours.config.num_nextn_predict_layers == 0 and ours.model.mtp is None
    saved = ours.save(tmp_path / "resaved")
    assert json.loads((saved / "config.json").read_text())["num_nextn_predict_layers"] == 0
    assert _max_diff(saved, hf) <= TOL


def test_partial_mtp_is_an_error(make_hf_nemotron_h, tmp_path):
    """Some `mtp.` tensors but not all: a damaged checkpoint, not a writer's variant."""
    path, _ = make_hf_nemotron_h(layers_block_type=LAYERS, num_nextn_predict_layers=1,
                                 mtp_layers_block_type=["full_attention", "moe"])
    out = _rewrite(path, tmp_path / "partial", add={"mtp.layers.0.enorm.weight": torch.ones(64)})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) in checkpoint: mtp\.layers\.0\."):
        nemotron.load(out)


# --------------------------------------------------------------------------------------------------
# Nemotron-H: two spellings of one tensor
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra", ["backbone.embedding.weight", "model.norm_f.weight",
                                   "backbone.layers.1.mixer.experts.up_proj"])
def test_two_spellings_of_one_tensor_is_an_error(hf_h, tmp_path, extra):
    path, _ = hf_h
    tensors = load_file(path / "model.safetensors")
    twin = {"backbone.embedding.weight": "backbone.embeddings.weight", "model.norm_f.weight": "backbone.norm_f.weight",
            "backbone.layers.1.mixer.experts.up_proj": None}[extra]
    if twin is None:   # stacked experts beside the per-expert tensors
        added = torch.stack([tensors[f"backbone.layers.1.mixer.experts.{e}.up_proj.weight"] for e in range(8)])
    else:
        added = tensors[twin].clone()
    out = _rewrite(path, tmp_path / "twice", add={extra: added})
    with pytest.raises(CheckpointError, match="are the same parameter") as info:
        nemotron.load(out)
    assert extra in str(info.value) and "\n" not in str(info.value)


def test_two_spellings_cli_one_line(hf_h, tmp_path):
    path, _ = hf_h
    tensors = load_file(path / "model.safetensors")
    out = _rewrite(path, tmp_path / "twice",
                   add={"backbone.embedding.weight": tensors["backbone.embeddings.weight"].clone()})
    assert_one_line_error(cli("generate", "--model", out, "hi"), "backbone.embedding.weight",
                          "backbone.embeddings.weight")


# --------------------------------------------------------------------------------------------------
# Nemotron-4 / Minitron (`NemotronForCausalLM`)
# --------------------------------------------------------------------------------------------------


def _hf_nemotron4(out: Path, tie: bool = False):
    """transformers 5.23's NemotronForCausalLM, random, saved: (dir, model)."""
    from transformers import NemotronConfig, NemotronForCausalLM

    config = NemotronConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, hidden_act="relu2", max_position_embeddings=256, norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        bos_token_id=2, eos_token_id=3, tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = randomize_(NemotronForCausalLM(config), seed=1).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():   # LayerNorm1P is zero-centred: weights around 0, biases non-zero
        for name, p in model.named_parameters():
            if "layernorm" in name or name.startswith("model.norm."):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out, model


def _as_4_57(raw: dict) -> dict:
    """config.json as transformers 4.57.6 writes it: rope_theta and partial_rotary_factor at the top
    level, no rope_parameters, no pad_token_id."""
    raw = dict(raw)
    params = raw.pop("rope_parameters")
    raw["rope_theta"], raw["partial_rotary_factor"] = params["rope_theta"], params["partial_rotary_factor"]
    raw.pop("pad_token_id", None)
    return raw


def _as_5_0_to_5_18(raw: dict) -> dict:
    """transformers 5.0-5.18 (seen in 5.0.0, 5.3.0, 5.5.0, 5.10.1, 5.14.0, 5.18.0): rope_parameters and
    a top-level partial_rotary_factor too."""
    return {**raw, "partial_rotary_factor": raw["rope_parameters"]["partial_rotary_factor"]}


@pytest.mark.parametrize("version,config", [("4.57", _as_4_57), ("5.0-5.18", _as_5_0_to_5_18),
                                            ("5.23", lambda c: c)])
def test_nemotron4_config_variants(tmp_path, version, config):
    """transformers writes the same Nemotron-4 tensor names in every version checked (model.embed_tokens,
    model.layers.{i}.{input_layernorm,self_attn.*,post_attention_layernorm,mlp.*}, model.norm, lm_head);
    only the config's RoPE keys move."""
    path, hf = _hf_nemotron4(tmp_path / "hf")
    out = _rewrite(path, tmp_path / version, config=config)
    assert _max_diff(out, hf, vocab=128) <= TOL


def test_nemotron4_tied_embeddings(tmp_path):
    """transformers (4.57.6 to 5.23.0) saves a tied NemotronForCausalLM without lm_head.weight."""
    path, hf = _hf_nemotron4(tmp_path / "hf", tie=True)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    assert _max_diff(path, hf, vocab=128) <= TOL
