"""The preset registry: round trips, lookup, and the structural facts of the released configs."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from nemotron.config import (
    LlamaConfig,
    MistralConfig,
    Nemotron4Config,
    NemotronHConfig,
    NemotronNASConfig,
    config_from_dict,
)
from nemotron.errors import ConfigError
from nemotron.config.presets import PRESETS, Preset, get_preset

ALL = sorted(PRESETS)

REQUIRED = {
    "nemotron-h-4b", "nemotron-h-8b", "nemotron-h-47b", "nemotron-h-56b",
    "nemotron-nano-9b-v2", "nemotron-nano-12b-v2",
    "nemotron-3-nano-4b", "nemotron-3-nano-30b-a3b", "nemotron-3.5-lightning-30b-a3b",
    "nemotron-3-super-120b-a12b", "nemotron-3-ultra-550b-a55b",
    "minitron-4b", "minitron-8b", "nemotron-mini-4b-instruct", "nemotron-4-15b", "nemotron-4-340b",
    "llama-3.3-nemotron-super-49b-v1", "llama-3.1-nemotron-ultra-253b-v1",
    "llama-3.1-nemotron-70b-instruct", "llama-3.1-nemotron-nano-8b-v1", "llama-3.1-nemotron-nano-4b-v1.1",
    "llama-3.1-minitron-4b-width-base", "llama-3.1-minitron-4b-depth-base",
    "mistral-nemo-minitron-8b-base", "mistral-nemo-minitron-8b-instruct",
}


def test_every_required_member_is_registered():
    assert REQUIRED <= set(PRESETS)


def test_names_and_hf_ids_are_unique_case_insensitively():
    names = [p.name.lower() for p in PRESETS.values()]
    ids = [p.hf_id.lower() for p in PRESETS.values()]
    assert len(set(names)) == len(names)
    assert len(set(ids)) == len(ids)
    assert not set(names) & set(ids)


@pytest.mark.parametrize("name", ALL)
def test_preset_fields(name):
    p = PRESETS[name]
    assert isinstance(p, Preset)
    assert p.name == name
    assert p.hf_id.startswith("nvidia/")
    assert p.family == p.config.model_type
    assert p.family in ("nemotron_h", "nemotron", "nemotron-nas", "llama", "mistral")
    assert p.advertised_params > 0
    assert p.description and "\n" not in p.description


@pytest.mark.parametrize("name", ALL)
def test_round_trip_through_hf_dict(name):
    config = PRESETS[name].config
    again = config_from_dict(config.to_hf())
    assert type(again) is type(config)
    assert again == config
    assert again.to_hf() == config.to_hf()


@pytest.mark.parametrize("name", ALL)
def test_round_trip_through_json_text(name):
    config = PRESETS[name].config
    again = config_from_dict(json.loads(json.dumps(config.to_hf())))
    assert again == config


def test_get_preset_by_name_and_hf_id_case_insensitive():
    for p in PRESETS.values():
        assert get_preset(p.name).name == p.name
        assert get_preset(p.name.upper()).name == p.name
        assert get_preset(p.hf_id).name == p.name
        assert get_preset(p.hf_id.lower()).name == p.name
        assert get_preset(f"  {p.hf_id.upper()} ").name == p.name
    assert get_preset("nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16").name == "nemotron-3-super-120b-a12b"
    assert get_preset("Llama-3.3-Nemotron-Super-49B-v1").name == "llama-3.3-nemotron-super-49b-v1"


def test_get_preset_returns_a_private_config():
    p = get_preset("nemotron-h-8b")
    assert p.config == PRESETS["nemotron-h-8b"].config
    assert p.config is not PRESETS["nemotron-h-8b"].config
    p.config.hidden_size = 1
    assert PRESETS["nemotron-h-8b"].config.hidden_size == 4096
    nas = get_preset("llama-3.3-nemotron-super-49b-v1")
    nas.config.block_configs[0].ffn.ffn_mult = 99.0
    assert PRESETS["llama-3.3-nemotron-super-49b-v1"].config.block_configs[0].ffn.ffn_mult == 2.625


def test_unknown_preset_raises_config_error():
    with pytest.raises(ConfigError) as info:
        get_preset("nemotron-9000")
    message = str(info.value)
    assert message.startswith("unknown preset 'nemotron-9000' (known: ")
    assert "nemotron-3-super-120b-a12b" in message
    assert "\n" not in message


# --------------------------------------------------------------------------------------------------
# Nemotron-H family: patterns and dims from the release configs
# --------------------------------------------------------------------------------------------------


def _positions(pattern: str, char: str) -> list[int]:
    return [i for i, c in enumerate(pattern) if c == char]


@pytest.mark.parametrize(
    "name, layers, counts, attention_at",
    [
        ("nemotron-h-8b", 52, {"M": 24, "-": 24, "*": 4}, [7, 18, 29, 40]),
        ("nemotron-h-4b", 52, {"M": 24, "-": 24, "*": 4}, [7, 18, 29, 40]),
        ("nemotron-h-47b", 98, None, None),
        ("nemotron-h-56b", 118, {"M": 54, "-": 54, "*": 10}, None),
        ("nemotron-nano-9b-v2", 56, {"M": 27, "-": 25, "*": 4}, [14, 21, 30, 39]),
        ("nemotron-nano-12b-v2", 62, None, None),
        ("nemotron-3-nano-4b", 42, {"*": 4}, None),
        ("nemotron-3-nano-30b-a3b", 52, {"M": 23, "E": 23, "*": 6}, [5, 12, 19, 26, 33, 42]),
        ("nemotron-3.5-lightning-30b-a3b", 52, {"M": 23, "E": 23, "*": 6}, [5, 12, 19, 26, 33, 42]),
        ("nemotron-3-super-120b-a12b", 88, {"M": 40, "E": 40, "*": 8}, [7, 16, 25, 36, 47, 58, 69, 78]),
        ("nemotron-3-ultra-550b-a55b", 108, {"M": 48, "E": 48, "*": 12}, None),
    ],
)
def test_nemotron_h_patterns(name, layers, counts, attention_at):
    config = PRESETS[name].config
    assert isinstance(config, NemotronHConfig)
    assert config.num_hidden_layers == layers
    assert config.to_hf()["num_hidden_layers"] == layers
    if counts:
        assert {k: v for k, v in Counter(config.hybrid_override_pattern).items() if k in counts} == counts
    if attention_at:
        assert _positions(config.hybrid_override_pattern, "*") == attention_at


def test_nemotron_h_dims_from_reference():
    c = PRESETS["nemotron-3-nano-30b-a3b"].config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (2688, 32, 2, 128)
    assert (c.mamba_num_heads, c.mamba_head_dim, c.n_groups, c.ssm_state_size, c.conv_kernel, c.chunk_size) == (
        64, 64, 8, 128, 4, 128)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.moe_intermediate_size,
            c.moe_shared_expert_intermediate_size, c.moe_latent_size, c.routed_scaling_factor) == (
        128, 6, 1856, 3712, None, 2.5)
    assert (c.n_group, c.topk_group, c.norm_topk_prob) == (1, 1, True)
    assert (c.vocab_size, c.max_position_embeddings, c.bos_token_id, c.eos_token_id, c.pad_token_id) == (
        131072, 262144, 1, 11, 0)
    assert c.num_nextn_predict_layers == 0
    assert "mtp_hybrid_override_pattern" not in c.to_hf()

    s = PRESETS["nemotron-3-super-120b-a12b"].config
    assert (s.hidden_size, s.num_attention_heads, s.num_key_value_heads, s.mamba_num_heads, s.mamba_head_dim) == (
        4096, 32, 2, 128, 64)
    assert (s.n_routed_experts, s.num_experts_per_tok, s.moe_intermediate_size,
            s.moe_shared_expert_intermediate_size, s.moe_latent_size, s.routed_scaling_factor) == (
        512, 22, 2688, 5376, 1024, 5.0)
    assert (s.num_nextn_predict_layers, s.mtp_hybrid_override_pattern) == (1, "*E")
    assert s.eos_token_id == [2, 11]
    assert s.to_hf()["mtp_hybrid_override_pattern"] == "*E"

    u = PRESETS["nemotron-3-ultra-550b-a55b"].config
    assert (u.hidden_size, u.num_attention_heads, u.num_key_value_heads, u.mamba_num_heads, u.mamba_head_dim) == (
        8192, 64, 2, 256, 64)
    assert (u.n_routed_experts, u.num_experts_per_tok, u.moe_intermediate_size,
            u.moe_shared_expert_intermediate_size, u.moe_latent_size, u.routed_scaling_factor) == (
        512, 22, 5120, 10240, 2048, 5.0)
    assert (u.num_nextn_predict_layers, u.mtp_hybrid_override_pattern) == (1, "*E")

    lightning = PRESETS["nemotron-3.5-lightning-30b-a3b"].config
    base = PRESETS["nemotron-3-nano-30b-a3b"].config
    assert lightning.replace(num_nextn_predict_layers=0) == base
    assert (lightning.num_nextn_predict_layers, lightning.mtp_hybrid_override_pattern) == (1, "*E")

    assert PRESETS["nemotron-3-nano-4b"].config.chunk_size == 256
    for name in ("nemotron-h-47b", "nemotron-h-56b"):
        assert PRESETS[name].config.ssm_state_size == 256
    for name in ("nemotron-nano-9b-v2", "nemotron-nano-12b-v2", "nemotron-3-nano-4b"):
        assert PRESETS[name].config.mamba_head_dim == 80
    # Mamba in_proj rows of the released checkpoints
    for name, rows in (("nemotron-h-8b", 18560), ("nemotron-nano-9b-v2", 22656),
                       ("nemotron-3-nano-30b-a3b", 10304), ("nemotron-3-super-120b-a12b", 18560),
                       ("nemotron-3-ultra-550b-a55b", 35072)):
        c = PRESETS[name].config
        assert c.mamba_inner_size + c.mamba_conv_dim + c.mamba_num_heads == rows


# --------------------------------------------------------------------------------------------------
# Nemotron-4 / Minitron: Megatron-Bridge provider values
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, layers, hidden, heads, kv, head_dim, ffn",
    [
        ("minitron-8b", 32, 4096, 48, 8, 128, 16384),
        ("minitron-4b", 32, 3072, 24, 8, 128, 9216),
        ("nemotron-mini-4b-instruct", 32, 3072, 24, 8, 128, 9216),
        ("nemotron-4-15b", 32, 6144, 48, 8, 128, 24576),
        ("nemotron-4-340b", 96, 18432, 96, 8, 192, 73728),
    ],
)
def test_nemotron_4_dims(name, layers, hidden, heads, kv, head_dim, ffn):
    c = PRESETS[name].config
    assert isinstance(c, Nemotron4Config)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size) == (layers, hidden, heads, kv, head_dim, ffn)
    assert (c.vocab_size, c.max_position_embeddings, c.rope_theta, c.partial_rotary_factor, c.norm_eps) == (
        256000, 4096, 10000.0, 0.5, 1e-5)
    assert (c.bos_token_id, c.eos_token_id) == (2, 3)
    assert c.hidden_act == "relu2" and not c.tie_word_embeddings


# --------------------------------------------------------------------------------------------------
# Llama-Nemotron (NAS): block counts of the release configs
# --------------------------------------------------------------------------------------------------


def _nas_summary(config: NemotronNASConfig):
    attention = Counter()
    ffn = Counter()
    widths = {}
    for i, block in enumerate(config.block_configs):
        a, f = block.attention, block.ffn
        assert not a.replace_with_linear and not f.replace_with_linear
        attention["no_op" if a.no_op else a.n_heads_in_group] += 1
        if f.no_op:
            ffn["no_op"] += 1
            assert f.ffn_mult is None
        else:
            ffn[f.ffn_mult] += 1
            widths[f.ffn_mult] = config.intermediate_size(i)
        if a.no_op:
            assert a.n_heads_in_group is None
    return attention, ffn, widths


def test_llama_nemotron_super_49b_blocks():
    c = PRESETS["llama-3.3-nemotron-super-49b-v1"].config
    assert isinstance(c, NemotronNASConfig)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.head_dim) == (80, 8192, 64, 128)
    attention, ffn, widths = _nas_summary(c)
    assert attention == {8: 49, "no_op": 31}
    assert ffn == {5.25: 49, 2.625: 6, 3.28125: 1, 1.3125: 10, 1.0: 8, 0.5: 6}
    assert widths == {5.25: 28672, 2.625: 14336, 3.28125: 17920, 1.3125: 7168, 1.0: 5632, 0.5: 2816}
    # a few layers of the released order
    blocks = c.block_configs
    assert blocks[0].ffn.ffn_mult == 2.625 and not blocks[0].attention.no_op
    assert blocks[6].attention.no_op and blocks[7].attention.no_op and blocks[11].attention.no_op
    assert blocks[11].ffn.ffn_mult == 3.28125
    assert not blocks[79].attention.no_op and blocks[79].ffn.ffn_mult == 5.25
    assert (c.rope_theta, c.rope_scaling.rope_type, c.rope_scaling.factor, c.rope_scaling.low_freq_factor,
            c.rope_scaling.high_freq_factor, c.rope_scaling.original_max_position_embeddings) == (
        500000.0, "llama3", 8.0, 1.0, 4.0, 8192)
    assert (c.vocab_size, c.rms_norm_eps, c.max_position_embeddings, c.bos_token_id, c.eos_token_id) == (
        128256, 1e-5, 131072, 128000, [128001, 128008, 128009])
    assert not c.tie_word_embeddings


def test_llama_nemotron_ultra_253b_blocks():
    c = PRESETS["llama-3.1-nemotron-ultra-253b-v1"].config
    assert isinstance(c, NemotronNASConfig)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.head_dim) == (162, 16384, 128, 128)
    attention, ffn, widths = _nas_summary(c)
    assert attention == {16: 64, "no_op": 98}
    assert ffn == {
        "no_op": 81, 4.875: 34, 2.4375: 19, 1.95: 10, 1.4625: 6, 3.4125: 4, 2.925: 2, 0.4875: 1, 0.975: 1,
        39.0: 1, 36.5625: 1, 31.40625: 1, 27.5625: 1,
    }
    assert widths == {
        4.875: 53248, 2.4375: 26624, 1.95: 21504, 1.4625: 16128, 3.4125: 37376, 2.925: 32000, 0.4875: 5376,
        0.975: 10752, 39.0: 425984, 36.5625: 399360, 31.40625: 343040, 27.5625: 301056,
    }
    blocks = c.block_configs
    assert blocks[0].ffn.ffn_mult == 0.4875 and blocks[1].ffn.ffn_mult == 0.975
    assert blocks[9].attention.no_op and blocks[9].ffn.no_op
    assert not blocks[161].attention.no_op and blocks[161].ffn.ffn_mult == 2.4375
    assert c.rope_scaling.factor == 16.0 and c.rope_scaling.rope_type == "llama3"
    assert (c.vocab_size, c.bos_token_id, c.eos_token_id) == (128256, 128000, [128001, 128008, 128009])


@pytest.mark.parametrize("name", ["llama-3.3-nemotron-super-49b-v1", "llama-3.1-nemotron-ultra-253b-v1"])
def test_nas_to_hf_writes_release_block_layout(name):
    out = PRESETS[name].config.to_hf()
    assert out["architectures"] == ["DeciLMForCausalLM"] and out["model_type"] == "nemotron-nas"
    assert out["num_key_value_heads"] is None and out["intermediate_size"] is None
    block = out["block_configs"][0]
    assert set(block["attention"]) == {
        "n_heads_in_group", "no_op", "num_sink_tokens", "replace_with_linear", "sparsify", "unshifted_sink",
        "use_prefill_window_in_sink_attention", "window_length",
    }
    assert set(block["ffn"]) == {"ffn_mult", "no_op", "replace_with_linear", "sparsify"}


# --------------------------------------------------------------------------------------------------
# parameter counts, computed from each config by building the model on the meta device
# --------------------------------------------------------------------------------------------------

from nemotron.models.info import count_params  # noqa: E402

# NVIDIA names these by a rounded size; the shapes (Megatron-Bridge providers, matching the released
# tensor count) give more. Checked against an exact figure instead of the 2% band.
ROUNDED_NAMES = {
    "nemotron-h-4b": 4_489_223_040,         # "4B": pruned from 8B to hidden 3072 / FFN 12288 / 112 Mamba heads
    "nemotron-nano-12b-v2": 12_310_001_152,  # "12B"
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_total_params_near_advertised(name):
    preset = PRESETS[name]
    total = count_params(preset.config)["total"]
    if name in ROUNDED_NAMES:
        assert total == ROUNDED_NAMES[name]
    else:
        assert abs(total / (preset.advertised_params * 1e9) - 1) <= 0.02, (name, total)


def test_super_and_nano_counts_exact():
    super_counts = count_params(PRESETS["nemotron-3-super-120b-a12b"].config)
    assert super_counts["total"] == 120_668_707_840
    assert super_counts["total"] + super_counts["mtp"] == 123_611_033_088
    nano = count_params(PRESETS["nemotron-3-nano-30b-a3b"].config)
    assert abs(nano["active"] - 3.6e9) < 0.05e9


# --------------------------------------------------------------------------------------------------
# Llama / Mistral members: dims, and the counted parameters against the published size
# --------------------------------------------------------------------------------------------------

# name: (config class, layers, hidden, heads, kv heads, head_dim, FFN, vocab, exact count)
LLAMA_FAMILY = {
    "llama-3.1-nemotron-70b-instruct": (LlamaConfig, 80, 8192, 64, 8, 128, 28672, 128256, 70_553_706_496),
    "llama-3.1-nemotron-nano-8b-v1": (LlamaConfig, 32, 4096, 32, 8, 128, 14336, 128256, 8_030_261_248),
    "llama-3.1-nemotron-nano-4b-v1.1": (LlamaConfig, 32, 3072, 32, 8, 128, 9216, 128256, 4_512_746_496),
    "llama-3.1-minitron-4b-width-base": (LlamaConfig, 32, 3072, 32, 8, 128, 9216, 128256, 4_512_746_496),
    "llama-3.1-minitron-4b-depth-base": (LlamaConfig, 16, 4096, 32, 8, 128, 14336, 128256, 4_540_469_248),
    "mistral-nemo-minitron-8b-base": (MistralConfig, 40, 4096, 32, 8, 128, 11520, 131072, 8_414_105_600),
    "mistral-nemo-minitron-8b-instruct": (MistralConfig, 40, 4096, 32, 8, 128, 11520, 131072, 8_414_105_600),
}


@pytest.mark.parametrize("name", list(LLAMA_FAMILY))
def test_llama_family_presets(name):
    cls, layers, hidden, heads, kv, head_dim, ffn, vocab, exact = LLAMA_FAMILY[name]
    p = PRESETS[name]
    c = p.config
    assert type(c) is cls
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size) == (layers, hidden, heads, kv, head_dim, ffn, vocab)
    assert not c.tie_word_embeddings and not c.attention_bias and not c.mlp_bias and c.rms_norm_eps == 1e-5
    if cls is LlamaConfig:
        assert (c.rope_theta, c.max_position_embeddings, c.bos_token_id) == (500000.0, 131072, 128000)
        s = c.rope_scaling
        assert (s.rope_type, s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) == (
            "llama3", 8.0, 1.0, 4.0, 8192)
    else:
        assert (c.rope_theta, c.max_position_embeddings, c.sliding_window, c.rope_scaling.rope_type) == (
            1000000.0, 8192, None, "default")
    # uniform blocks of the NAS family
    assert len(c.block_configs) == layers
    assert {(b.attention.kv_heads(heads), b.ffn.width(hidden)) for b in c.block_configs} == {(kv, ffn)}
    # the counted parameters: exactly the shapes above, and the published size within the 2% convention
    total = count_params(c)["total"]
    assert total == exact
    assert abs(total / (p.advertised_params * 1e9) - 1) <= 0.02, (name, total)


def test_llama_family_to_hf_reads_in_transformers():
    from transformers import LlamaConfig as HFLlama
    from transformers import MistralConfig as HFMistral

    width = HFLlama(**PRESETS["llama-3.1-minitron-4b-width-base"].config.to_hf())
    assert (width.head_dim, width.hidden_size, width.num_key_value_heads) == (128, 3072, 8)
    assert width.rope_parameters["rope_type"] == "llama3" and width.rope_parameters["rope_theta"] == 500000.0
    nemo = HFMistral(**PRESETS["mistral-nemo-minitron-8b-base"].config.to_hf())
    assert nemo.sliding_window is None and nemo.head_dim == 128 and nemo.intermediate_size == 11520
