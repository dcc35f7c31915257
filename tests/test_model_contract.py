"""Every family implements one model contract (nemotron.models.contract.CausalLM), is found through
one registry (config class -> Family) by the builder, the checkpoint io and `nemotron info`, and takes
its cache mode ("dynamic" / "static" / "verify") as an explicit argument."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from nemotron.config import (LlamaConfig, LlamaDecoderConfig, MistralConfig, Nemotron4Config, NemotronHConfig,
                             NemotronNASConfig, config_from_dict)
from nemotron.io import checkpoint
from nemotron.models import FAMILIES, CausalLM, build_model, contract_violations, family
from nemotron.models.decoder import DecoderLM
from nemotron.models.info import layer_pattern, state_bytes, summarize
from nemotron.models.nemotron_h import NemotronHForCausalLM


def _block(g=None, m=None, a_no=False, a_lin=False, f_no=False, f_lin=False) -> dict:
    return {"attention": {"n_heads_in_group": g, "no_op": a_no, "replace_with_linear": a_lin},
            "ffn": {"ffn_mult": m, "no_op": f_no, "replace_with_linear": f_lin}}


_H = dict(hybrid_override_pattern="MEM*EME", mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1,
          vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
          mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=4,
          n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, moe_latent_size=32,
          moe_shared_expert_intermediate_size=128, routed_scaling_factor=2.0, intermediate_size=128)
_DECODER = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2}

CONFIGS = {
    "nemotron_h": lambda: NemotronHConfig(**_H),
    "nemotron_h_no_mtp": lambda: NemotronHConfig(**{**_H, "num_nextn_predict_layers": 0}),
    "nemotron4": lambda: config_from_dict({"model_type": "nemotron", **_DECODER, "head_dim": 8}),
    "nemotron_nas": lambda: config_from_dict({
        "model_type": "nemotron-nas", "vocab_size": 96, "hidden_size": 32, "num_attention_heads": 4,
        "block_configs": [_block(2, 2.0), _block(a_no=True, m=1.0), _block(a_lin=True, f_no=True),
                          _block(4, f_lin=True)]}),
    "llama_tied": lambda: config_from_dict({"model_type": "llama", **_DECODER, "tie_word_embeddings": True}),
    "mistral": lambda: config_from_dict({"model_type": "mistral", **_DECODER, "head_dim": 8, "sliding_window": None}),
}


def _model(name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    config = CONFIGS[name]()
    torch.manual_seed(0)
    model = build_model(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.to(dtype).eval()


def _ids(t: int = 11) -> torch.Tensor:
    return torch.randint(0, 96, (2, t), generator=torch.Generator().manual_seed(2))


# --------------------------------------------------------------------------------------------------
# the contract
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_every_family_satisfies_the_contract(name):
    model = _model(name)
    assert contract_violations(model) == []
    if sys.version_info < (3, 12):   # 3.12+ looks attributes up statically: nn.Module submodules are invisible
        assert isinstance(model, CausalLM)
    assert model.config is not None and isinstance(model.lm_head.weight, torch.Tensor)
    # the block list is a view: the checkpoint names (state_dict keys) are unchanged
    root = model.backbone.layers if isinstance(model, NemotronHForCausalLM) else model.model.layers
    assert model.blocks is root and len(model.blocks) > 0
    assert not any(k.startswith("blocks.") for k in model.state_dict())
    # mtp is always defined: the block, or None
    assert (model.mtp is not None) == (getattr(model.config, "num_nextn_predict_layers", 0) > 0)
    if model.mtp is None:
        with pytest.raises(ValueError, match="MTP"):
            model.mtp_forward(torch.zeros(1, 2, model.config.hidden_size), torch.zeros(1, 2, dtype=torch.long))
    # the family that builds it is the registry's entry for its config
    assert isinstance(model, NemotronHForCausalLM if isinstance(model.config, NemotronHConfig) else DecoderLM)
    assert type(family(model.config).build(model.config)) is type(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", CONFIGS)
def test_hidden_states_then_lm_head_is_forward(name, dtype):
    """lm_head(hidden_states) == forward's logits, bit for bit: without a cache, through a cached
    prefill and decode, and with return_hidden."""
    model = _model(name, dtype)
    ids = _ids()
    with torch.no_grad():
        logits = model(ids)
        assert logits.dtype == torch.float32 and logits.shape == (2, 11, 96)
        h = model.hidden_states(ids)
        assert h.shape == (2, 11, model.config.hidden_size)
        assert torch.equal(model.lm_head(h).float(), logits)
        got, h2 = model(ids, return_hidden=True)
        assert torch.equal(got, logits) and torch.equal(h2, h)

        a, b = model.new_cache(2, 16), model.new_cache(2, 16)
        for part in (ids[:, :7], ids[:, 7:8], ids[:, 8:9]):
            via_forward = model(part, a)
            via_hidden = model.lm_head(model.hidden_states(part, b)).float()
            assert torch.equal(via_forward, via_hidden)
        assert a.positions() == b.positions() == [9, 9]


# --------------------------------------------------------------------------------------------------
# explicit cache modes
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["nemotron_h", "nemotron4", "nemotron_nas", "llama_tied"])
def test_static_mode_decodes_like_dynamic(name):
    """mode="static" (whole-buffer attention, positions as a tensor, the caller advances the lengths)
    gives dynamic decode's logits, with rows at different lengths."""
    model = _model(name)
    ids = _ids()
    dynamic, static = model.new_cache(2, 24), model.new_cache(2, 24)
    with torch.no_grad():
        for cache in (dynamic, static):
            model(ids[:1, :6], cache.rows(0))
            model(ids[1:, :3], cache.rows(1))
        for s in range(3):
            step = ids[:, 6 + s:7 + s]
            want = model(step, dynamic)
            positions = static.seq_lens.clone()
            got = model(step, static, mode="static", positions=positions)
            assert static.seq_lens.tolist() == positions.tolist()   # not advanced by the forward
            static.seq_lens += 1
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_verify_mode_keeps_per_token_state_for_rollback():
    """mode="verify" gives the dynamic forward's hidden states and lets `rollback` rewind the Mamba
    state to any token: decoding on from there matches a cache that only ever saw the kept tokens."""
    model = _model("nemotron_h")
    ids = _ids()
    with torch.no_grad():
        plain, verified = model.new_cache(2, 24), model.new_cache(2, 24)
        model(ids[:, :5], plain)
        model(ids[:, :5], verified)
        want = model.hidden_states(ids[:, 5:9], plain)
        got = model.hidden_states(ids[:, 5:9], verified, mode="verify")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        verified.rollback([2, 4], 4)
        assert verified.positions() == [7, 9]
        for row, kept in enumerate((2, 4)):
            fresh = model.new_cache(1, 24)
            model(ids[row:row + 1, :5 + kept], fresh)
            nxt = ids[row:row + 1, 9:10]
            torch.testing.assert_close(model(nxt, verified.rows(row)), model(nxt, fresh), rtol=1e-4, atol=1e-4)
        # a decoder has no Mamba state: verify is its dynamic forward
        decoder = _model("nemotron4")
        c1, c2 = decoder.new_cache(2, 24), decoder.new_cache(2, 24)
        assert torch.equal(decoder(ids, c1), decoder(ids, c2, mode="verify"))


@pytest.mark.parametrize("name", ["nemotron_h", "nemotron4"])
def test_mode_arguments_are_checked(name):
    model = _model(name)
    ids, cache = _ids(1), model.new_cache(2, 8)
    with pytest.raises(ValueError, match="positions"):
        model(ids, cache, mode="static")                        # static needs positions
    with pytest.raises(ValueError, match="positions"):
        model(ids, cache, positions=torch.zeros(2, dtype=torch.long))   # positions only go with static
    with pytest.raises(ValueError, match="cache"):
        model.hidden_states(ids, mode="verify")                 # verify continues a cache
    with pytest.raises(ValueError, match="mode"):
        model(ids, cache, mode="record")


# --------------------------------------------------------------------------------------------------
# the registry: build, checkpoint names, accounting
# --------------------------------------------------------------------------------------------------


def test_the_registry_finds_every_config_class():
    assert set(FAMILIES) == {NemotronHConfig, Nemotron4Config, LlamaDecoderConfig}
    for klass in (NemotronNASConfig, LlamaConfig, MistralConfig):   # subclasses: their base's family
        assert family(klass) is FAMILIES[LlamaDecoderConfig]
    with pytest.raises(TypeError, match="no model for config type"):
        family(object())


@pytest.mark.parametrize("name", CONFIGS)
def test_io_and_info_ask_the_family(name):
    config = CONFIGS[name]()
    fam = family(config)
    assert checkpoint.name_map(config) is fam.name_map
    assert layer_pattern(config) == fam.layer_pattern(config)
    assert state_bytes(config) == fam.state_bytes(config)
    info = summarize(config)
    assert info["layer_pattern"] == fam.layer_pattern(config)
    assert info["active_params"] <= info["total_params"]
    assert ("experts" in info) == ("E" in getattr(config, "hybrid_override_pattern", ""))


def test_expert_names_round_trip():
    experts = family(NemotronHConfig).name_map.experts
    assert experts.ours("backbone.layers.1.mixer.experts.3.up_proj.weight") == ("backbone.layers.1.mixer.experts.up_proj", 3)
    assert experts.ours("backbone.layers.1.mixer.experts.0.down_proj.weight_scale_2") == \
        ("backbone.layers.1.mixer.experts.down_proj_weight_scale_2", 0)
    assert experts.ours("backbone.layers.1.mixer.shared_experts.up_proj.weight") is None
    assert experts.release("backbone.layers.1.mixer.experts.up_proj", 5) == "backbone.layers.1.mixer.experts.5.up_proj.weight"
    assert experts.release("backbone.layers.1.mixer.experts.down_proj_input_scale", 2) == \
        "backbone.layers.1.mixer.experts.2.down_proj.input_scale"
    assert family(LlamaConfig).name_map.experts is None
    model = _model("nemotron_h")
    names = [n for n, _ in checkpoint.release_state_dict(model)]
    assert "backbone.layers.1.mixer.experts.7.down_proj.weight" in names
    assert not any(n.endswith("experts.up_proj") for n in names)
