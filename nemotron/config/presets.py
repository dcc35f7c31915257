"""Registry of the released Nemotron family members with their real config values.

Each preset is a config of one of the families in `nemotron.config`, built by a small function per
member. Values come from NVIDIA's released `config.json` files (or public copies of them),
Megatron-Bridge providers and recipes, and the vLLM / transformers model code; a comment beside a
value names its source where that is not a release config, and the Llama / Mistral members cite
their sources in their own section below. Where a value had to be assumed, the preset's
`description` says so. tests/test_presets.py checks each preset's parameter count against NVIDIA's
stated size.

Nemotron-H attention is NoPE: the `rope_theta` / `partial_rotary_factor` keys that Nemotron-3
configs carry are ignored by every implementation and are not reproduced here.

`get_preset` returns a copy whose config may be modified freely; `PRESETS` holds the originals.

At the end, outside the registry: the embedded checkpoint's directory (`EMBEDDED_MODEL_DIR`) and a
toy configuration for tests (`toy_super_config`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nemotron.config import (
    AnyConfig,
    AttentionBlockConfig,
    BlockConfig,
    FFNBlockConfig,
    LlamaConfig,
    MistralConfig,
    Nemotron4Config,
    NemotronHConfig,
    NemotronNASConfig,
    RopeScaling,
)
from nemotron.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    name: str  # short CLI name, e.g. "nemotron-3-super-120b-a12b"
    hf_id: str  # Hugging Face repository id
    family: str  # "nemotron_h" | "nemotron" | "nemotron-nas" | "llama" | "mistral" (the config's model_type)
    advertised: str  # the advertised size, e.g. "120B-A12B", "49B"
    # NVIDIA's stated total in billions (main model, MTP excluded). Where NVIDIA gives a precise
    # figure that differs from the name (e.g. "31.6B total" for Nano-3 30B-A3B) that figure is used.
    advertised_params: float
    config: AnyConfig
    description: str  # one line


# --------------------------------------------------------------------------------------------------
# Nemotron-H / Nemotron Nano 2 / Nemotron 3 (model_type "nemotron_h")
# --------------------------------------------------------------------------------------------------

# Values shared by every released nemotron_h config (as in Nano 3 30B-A3B's config.json).
_NEMOTRON_H_COMMON: dict[str, Any] = dict(
    vocab_size=131072,
    head_dim=128,
    attention_bias=False,
    mlp_hidden_act="relu2",
    mlp_bias=False,
    n_groups=8,
    ssm_state_size=128,
    conv_kernel=4,
    chunk_size=128,
    use_conv_bias=True,
    use_bias=False,
    mamba_hidden_act="silu",
    mamba_ssm_cache_dtype="float32",
    layer_norm_epsilon=1e-5,
    residual_in_fp32=False,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    torch_dtype="bfloat16",
)

# MoE router settings of every released Nemotron 3 MoE config.json.
_NEMOTRON_3_ROUTER: dict[str, Any] = dict(n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True)

# Layer patterns (the configs' hybrid_override_pattern), one character per layer: M Mamba-2, * attention,
# - dense MLP, E MoE.
_H_8B_PATTERN = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"  # also Nemotron-H-4B
_H_47B_PATTERN = (
    "M-M-M-M-M-M-M-M-M*-M-M-M-M-M-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-M-M---MM---M-M*-M-M-M-M-M-"
)
_H_56B_PATTERN = (
    "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-"
    "M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
)
_NANO_2_9B_PATTERN = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"
_NANO_2_12B_PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
_NANO_3_4B_PATTERN = "M-M-M-MM-M-M*-M-M*-M-M-M*-M-M-MM*-MMM-M-M-"
_NANO_3_30B_PATTERN = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
_SUPER_PATTERN = (
    "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME"
)
_ULTRA_PATTERN = (
    "MEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*EMEMEMEM*EMEMEMEM*EMEMEM*"
    "EMEMEMEM*EMEMEMEME"
)


def _nemotron_h(**values: Any) -> NemotronHConfig:
    config = NemotronHConfig(**{**_NEMOTRON_H_COMMON, **values})
    config.validate()
    return config


def _nemotron_h_4b() -> NemotronHConfig:
    return _nemotron_h(
        hybrid_override_pattern=_H_8B_PATTERN, hidden_size=3072,
        num_attention_heads=32, num_key_value_heads=8,
        mamba_num_heads=112, mamba_head_dim=64,
        intermediate_size=12288, max_position_embeddings=8192,
    )


def _nemotron_h_8b() -> NemotronHConfig:
    return _nemotron_h(
        hybrid_override_pattern=_H_8B_PATTERN, hidden_size=4096,
        num_attention_heads=32, num_key_value_heads=8,
        mamba_num_heads=128, mamba_head_dim=64,
        intermediate_size=21504, max_position_embeddings=8192,
    )


def _nemotron_h_47b() -> NemotronHConfig:
    return _nemotron_h(
        hybrid_override_pattern=_H_47B_PATTERN, hidden_size=8192,
        num_attention_heads=64, num_key_value_heads=8,
        mamba_num_heads=256, mamba_head_dim=64, ssm_state_size=256,
        intermediate_size=30720, max_position_embeddings=8192,
    )


def _nemotron_h_56b() -> NemotronHConfig:
    return _nemotron_h(
        hybrid_override_pattern=_H_56B_PATTERN, hidden_size=8192,
        num_attention_heads=64, num_key_value_heads=8,
        mamba_num_heads=256, mamba_head_dim=64, ssm_state_size=256,
        intermediate_size=32768, max_position_embeddings=8192,
    )


def _nano_2_9b() -> NemotronHConfig:
    return _nemotron_h(
        hybrid_override_pattern=_NANO_2_9B_PATTERN, hidden_size=4480,
        num_attention_heads=40, num_key_value_heads=8,
        mamba_num_heads=128, mamba_head_dim=80,
        intermediate_size=15680, max_position_embeddings=131072,
    )


def _nano_2_12b() -> NemotronHConfig:
    return _nemotron_h(
        hybrid_override_pattern=_NANO_2_12B_PATTERN, hidden_size=5120,
        num_attention_heads=40, num_key_value_heads=8,
        mamba_num_heads=128, mamba_head_dim=80,
        intermediate_size=20480, max_position_embeddings=131072,
    )


def _nano_3_4b() -> NemotronHConfig:
    return _nemotron_h(
        hybrid_override_pattern=_NANO_3_4B_PATTERN, hidden_size=3136,
        num_attention_heads=40, num_key_value_heads=8,
        mamba_num_heads=96, mamba_head_dim=80, chunk_size=256,
        intermediate_size=12544,
        max_position_embeddings=262144,  # from public copies of the config
        eos_token_id=11,  # assumed as Nano-3 30B (<|im_end|>)
    )


def _nano_3_30b_a3b() -> NemotronHConfig:
    # Every value below is in the released config.json.
    return _nemotron_h(
        hybrid_override_pattern=_NANO_3_30B_PATTERN, hidden_size=2688,
        num_attention_heads=32, num_key_value_heads=2,
        mamba_num_heads=64, mamba_head_dim=64,
        n_routed_experts=128, num_experts_per_tok=6,
        moe_intermediate_size=1856, moe_shared_expert_intermediate_size=3712,
        moe_latent_size=None, routed_scaling_factor=2.5, **_NEMOTRON_3_ROUTER,
        intermediate_size=1856,  # unused (no dense MLP layer); the release sets it to moe_intermediate_size
        max_position_embeddings=262144, eos_token_id=11,
    )


def _nemotron_3_5_lightning() -> NemotronHConfig:
    # Nano-3 30B-A3B plus one MTP depth; the MTP pattern "*E" is the Megatron-Bridge Lightning
    # recipe's `mtp_hybrid_override_pattern` (the HF config itself was not seen).
    return _nano_3_30b_a3b().replace(num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E")


def _nemotron_3_super() -> NemotronHConfig:
    return _nemotron_h(
        hybrid_override_pattern=_SUPER_PATTERN, hidden_size=4096,
        num_attention_heads=32, num_key_value_heads=2,
        mamba_num_heads=128, mamba_head_dim=64,
        n_routed_experts=512, num_experts_per_tok=22,
        moe_intermediate_size=2688, moe_shared_expert_intermediate_size=5376,
        moe_latent_size=1024, routed_scaling_factor=5.0, **_NEMOTRON_3_ROUTER,
        intermediate_size=2688,  # unused (no dense MLP layer); set to moe_intermediate_size as in Nano-3
        num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E",
        max_position_embeddings=262144, eos_token_id=[2, 11],
    )


def _nemotron_3_ultra() -> NemotronHConfig:
    # No config.json was released, only a Megatron-LM pretraining script: vocab,
    # n_groups, ssm_state_size, context length, EOS and the stored MTP depth count are assumptions.
    return _nemotron_h(
        hybrid_override_pattern=_ULTRA_PATTERN, hidden_size=8192,
        num_attention_heads=64, num_key_value_heads=2,
        mamba_num_heads=256, mamba_head_dim=64,
        n_groups=8, ssm_state_size=128,  # Megatron defaults (assumed)
        n_routed_experts=512, num_experts_per_tok=22,
        moe_intermediate_size=5120, moe_shared_expert_intermediate_size=10240,
        moe_latent_size=2048, routed_scaling_factor=5.0, **_NEMOTRON_3_ROUTER,
        intermediate_size=5120,  # unused (no dense MLP layer)
        # trained with 2 repeated MTP depths of ONE stored "*E" block, which Super's HF config
        # records as num_nextn_predict_layers=1 (assumed the same here)
        num_nextn_predict_layers=1, mtp_hybrid_override_pattern="*E",
        vocab_size=131072,  # assumed as every other Nemotron-H
        max_position_embeddings=262144,  # assumed as Nano-3 / Super
        eos_token_id=[2, 11],  # assumed as Super
    )


# --------------------------------------------------------------------------------------------------
# Nemotron-4 / Minitron (model_type "nemotron")
# --------------------------------------------------------------------------------------------------

_NEMOTRON_4_COMMON: dict[str, Any] = dict(
    vocab_size=256000,
    num_hidden_layers=32,
    hidden_act="relu2",
    rope_theta=10000.0,
    partial_rotary_factor=0.5,
    norm_eps=1e-5,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
    initializer_range=0.0134,
    bos_token_id=2,
    eos_token_id=3,
    pad_token_id=None,
    torch_dtype="bfloat16",
)


def _nemotron_4(**values: Any) -> Nemotron4Config:
    config = Nemotron4Config(**{**_NEMOTRON_4_COMMON, **values})
    config.validate()
    return config


def _minitron_4b() -> Nemotron4Config:
    return _nemotron_4(hidden_size=3072, intermediate_size=9216,
                       num_attention_heads=24, num_key_value_heads=8, head_dim=128)


def _minitron_8b() -> Nemotron4Config:
    # q width 48*128 = 6144 differs from hidden_size 4096
    return _nemotron_4(hidden_size=4096, intermediate_size=16384,
                       num_attention_heads=48, num_key_value_heads=8, head_dim=128)


def _nemotron_4_15b() -> Nemotron4Config:
    # Megatron-Bridge Nemotron4ModelProvider15B; bos/eos assumed from the shared 256k tokenizer.
    return _nemotron_4(hidden_size=6144, intermediate_size=24576,
                       num_attention_heads=48, num_key_value_heads=8, head_dim=128)


def _nemotron_4_340b() -> Nemotron4Config:
    # Megatron-Bridge Nemotron4ModelProvider340B (init_method_std 0.0063); head_dim = 18432/96.
    return _nemotron_4(num_hidden_layers=96, hidden_size=18432, intermediate_size=73728,
                       num_attention_heads=96, num_key_value_heads=8, head_dim=192,
                       initializer_range=0.0063)


# --------------------------------------------------------------------------------------------------
# Llama-Nemotron Super 49B / Ultra 253B (DeciLM, model_type "nemotron-nas")
# --------------------------------------------------------------------------------------------------
#
# Per-layer block_configs, extracted from the Hugging Face config.json copies embedded in
# NVIDIA-NeMo/Megatron-Bridge commit 2cec89e0, src/megatron/bridge/models/llama_nemotron/
# llama_nemotron_config.py (LLAMA_33_NEMOTRON_SUPER_49B_HETEROGENEOUS_CONFIG, copied from
# huggingface.co/nvidia/Llama-3_3-Nemotron-Super-49B-v1, and LLAMA_31_NEMOTRON_ULTRA_253B_...).
# One character per layer, layer 0 first:
#   attention: "A" = GQA with the model's n_heads_in_group, "." = no_op (n_heads_in_group null);
#   ffn: a letter looked up in the model's ffn_mult table, "." = no_op (ffn_mult null).
# No layer of either model uses replace_with_linear. The remaining per-block keys of the release
# (sparsify, window_length, sink settings) are null/false in every block and are kept in `extra` so
# that to_hf() writes the block_configs exactly as released.

_SUPER_49B_ATTENTION = (
    "AAAAAA..AAA.AAAAAAAAAAAAAAAAAAAAAAAAAAAA"  # layers 0-39
    "AA..........A..................AAAAAAAAA"  # layers 40-79
)
_SUPER_49B_FFN = (
    "caaaaaccaaabaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    "aadccdadcdddadeedeeeddffeeffeffaaaaaaaaa"
)
_SUPER_49B_FFN_MULT = {"a": 5.25, "b": 3.28125, "c": 2.625, "d": 1.3125, "e": 1.0, "f": 0.5}

_ULTRA_253B_ATTENTION = (
    "AAAAAAAAA....AAAAA......AAA.....AAAA...A"  # layers 0-39
    "AA.A......AAAA.....AAAA.....AAAA.....AAA"  # layers 40-79
    "A.....AAAA..AAAA..A........A.....AA.A..."  # layers 80-119
    "...............................AA.AAAAAA"  # layers 120-159
    "AA"  # layers 160-161
)
_ULTRA_253B_FFN = (
    "lkjjjjjji....iiiee......eee.....eeeh...i"
    "iiiee.....eeee.....eeee.....eeee.....eee"
    "e.....efff..ghhhhhh.hhhhhhhh.....geee..."
    ".....b........a........c.....diih.hhfeee"
    "eh"
)
# a-d are the "merged giant" FFNs that replace runs of removed layers
_ULTRA_253B_FFN_MULT = {
    "a": 39.0, "b": 36.5625, "c": 31.40625, "d": 27.5625, "e": 4.875, "f": 3.4125,
    "g": 2.925, "h": 2.4375, "i": 1.95, "j": 1.4625, "k": 0.975, "l": 0.4875,
}

_NAS_ATTENTION_EXTRA: dict[str, Any] = {
    "num_sink_tokens": None, "sparsify": None, "unshifted_sink": False,
    "use_prefill_window_in_sink_attention": False, "window_length": None,
}
_NAS_FFN_EXTRA: dict[str, Any] = {"sparsify": None}


def _nas_blocks(attention: str, ffn: str, ffn_mult: dict[str, float], n_heads_in_group: int) -> list[BlockConfig]:
    if len(attention) != len(ffn):
        raise ConfigError(f"nemotron-nas preset: {len(attention)} attention codes but {len(ffn)} ffn codes")
    blocks = []
    for a, f in zip(attention, ffn):
        attn = AttentionBlockConfig(no_op=a == ".", replace_with_linear=False,
                                    n_heads_in_group=None if a == "." else n_heads_in_group,
                                    extra=dict(_NAS_ATTENTION_EXTRA))
        mlp = FFNBlockConfig(no_op=f == ".", replace_with_linear=False,
                             ffn_mult=None if f == "." else ffn_mult[f],
                             extra=dict(_NAS_FFN_EXTRA))
        blocks.append(BlockConfig(attn, mlp))
    return blocks


_NAS_COMMON: dict[str, Any] = dict(
    vocab_size=128256,
    hidden_act="silu",
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    max_position_embeddings=131072,
    initializer_range=0.02,
    bos_token_id=128000,
    eos_token_id=[128001, 128008, 128009],
    pad_token_id=None,
    torch_dtype="bfloat16",
)


def _nemotron_nas(**values: Any) -> NemotronNASConfig:
    config = NemotronNASConfig(**{**_NAS_COMMON, **values})
    config.validate()
    return config


def _llama_nemotron_super_49b() -> NemotronNASConfig:
    return _nemotron_nas(
        block_configs=_nas_blocks(_SUPER_49B_ATTENTION, _SUPER_49B_FFN, _SUPER_49B_FFN_MULT, n_heads_in_group=8),
        hidden_size=8192, num_attention_heads=64,
        rope_scaling=RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
    )


def _llama_nemotron_ultra_253b() -> NemotronNASConfig:
    return _nemotron_nas(
        block_configs=_nas_blocks(_ULTRA_253B_ATTENTION, _ULTRA_253B_FFN, _ULTRA_253B_FFN_MULT, n_heads_in_group=16),
        hidden_size=16384, num_attention_heads=128,
        rope_scaling=RopeScaling(rope_type="llama3", factor=16.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192),
    )


# --------------------------------------------------------------------------------------------------
# Llama / Mistral members (model_type "llama" / "mistral"): the NAS family's uniform-block case
# --------------------------------------------------------------------------------------------------
#
# Dimensions (layers / hidden / heads / FFN) are each model card's "Model Architecture" section
# (huggingface.co/nvidia/<name>); the Llama-3.1 members keep their parent's Llama 3.1 settings, which
# NeMo's HF importer/exporter for them states (NVIDIA/NeMo nemo/collections/llm/gpt/model/llama_nemotron.py:
# Llama31NemotronNano8BConfig / Llama31Nemotron70BConfig extend Llama31Config8B / 70B with kv_channels 128,
# every Llama-Nemotron config carries rope_scaling, head_dim is read from config.json):
# vocab 128256, 8 KV heads, rope_theta 500000, llama3 scaling (factor 8, low 1, high 4, original 8192),
# RMSNorm eps 1e-5, 131072 positions, untied head, bfloat16. Minitron-4B-Width's converted metadata
# (ggml-org/llama.cpp issue #9060: n_embd 3072, n_head 32 / n_head_kv 8, head 128, n_ff 9216,
# n_ctx_train 131072, rms eps 1e-5, freq_base 500000) confirms head_dim 128 on a 3072 residual.
# Published sizes: 4.51B (Minitron-4B-Width), 4.54B (Minitron-4B-Depth), 8.41B (Mistral-NeMo-Minitron-8B),
# as listed from the model pages in BBC-Esq/VectorDB-Plugin issue #271.


def _llama_31_rope() -> RopeScaling:
    return RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)


# the Llama-3.1 settings the NAS members share too, with the uniform members' 8 KV heads of 128; the
# stop ids are set per member
_LLAMA_31_COMMON: dict[str, Any] = {**{k: v for k, v in _NAS_COMMON.items() if k != "eos_token_id"},
                                    "num_key_value_heads": 8, "head_dim": 128}
# Llama-3.1 Instruct's stop ids (<|end_of_text|>, <|eom_id|>, <|eot_id|>); base models stop at 128001
_LLAMA_31_INSTRUCT_EOS = [128001, 128008, 128009]


def _llama(**values: Any) -> LlamaConfig:
    config = LlamaConfig(**{**_LLAMA_31_COMMON, "rope_scaling": _llama_31_rope(), **values})
    config.validate()
    return config


def _llama_31_nemotron_70b() -> LlamaConfig:
    return _llama(num_hidden_layers=80, hidden_size=8192, num_attention_heads=64, intermediate_size=28672,
                  eos_token_id=_LLAMA_31_INSTRUCT_EOS)


def _llama_31_nemotron_nano_8b() -> LlamaConfig:
    return _llama(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, intermediate_size=14336,
                  eos_token_id=_LLAMA_31_INSTRUCT_EOS)


def _minitron_4b_width(**values: Any) -> LlamaConfig:
    # 32 heads of 128 on a 3072 residual: q width 4096 != hidden, so head_dim is explicit
    return _llama(**{"num_hidden_layers": 32, "hidden_size": 3072, "num_attention_heads": 32,
                     "intermediate_size": 9216, "eos_token_id": 128001, **values})


def _minitron_4b_depth() -> LlamaConfig:
    # Llama 3.1 8B with 16 of its 32 layers
    return _llama(num_hidden_layers=16, hidden_size=4096, num_attention_heads=32, intermediate_size=14336,
                  eos_token_id=128001)


def _mistral_nemo_minitron_8b() -> MistralConfig:
    # Model card: hidden 4096, 32 heads, FFN 11520, 40 layers. 8 KV heads, vocab 131072 and 8192 positions:
    # a public LLM-performance model table (`minitron_8b_config`) citing
    # huggingface.co/nvidia/Mistral-NeMo-Minitron-8B-Base/blob/main/config.json. head_dim 128, rope_theta 1e6,
    # eps 1e-5, sliding_window null and bos/eos 1/2 are the 12B parent's config.json (mistralai/
    # Mistral-Nemo-Base-2407, copied in kevinstephano/thunder_model_blocks mistral/mistral_config.py), which
    # width pruning (hidden and FFN only, per the card) leaves unchanged; 32 x 128 = 4096 fixes head_dim.
    config = MistralConfig(
        vocab_size=131072, num_hidden_layers=40, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=11520, hidden_act="silu", rms_norm_eps=1e-5, rope_theta=1000000.0,
        rope_scaling=RopeScaling(), sliding_window=None, tie_word_embeddings=False, max_position_embeddings=8192,
        initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=None, torch_dtype="bfloat16",
    )
    config.validate()
    return config


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------


def _preset(name: str, hf_id: str, advertised: str, advertised_params: float, config: AnyConfig,
            description: str) -> Preset:
    return Preset(name=name, hf_id=hf_id, family=config.model_type, advertised=advertised,
                  advertised_params=advertised_params, config=config, description=description)


_ALL = [
    # Nemotron-H (Megatron-Bridge providers; 8K-context base models)
    # NOTE: these dims (Megatron-Bridge provider and NVIDIA's Megatron-Bridge docs; untied head, which fits
    # the 311 checkpoint tensors a third-party converter reports) give 4.49B parameters; NVIDIA only says "4B".
    _preset("nemotron-h-4b", "nvidia/Nemotron-H-4B-Base-8K", "4B", 4.0, _nemotron_h_4b(),
            "Nemotron-H 4B base: 52-layer Mamba-2/MLP hybrid with 4 attention layers, pruned from 8B."),
    _preset("nemotron-h-8b", "nvidia/Nemotron-H-8B-Base-8K", "8B", 8.0, _nemotron_h_8b(),
            "Nemotron-H 8B base: 52-layer Mamba-2/MLP hybrid with 4 attention layers."),
    _preset("nemotron-h-47b", "nvidia/Nemotron-H-47B-Base-8K", "47B", 47.0, _nemotron_h_47b(),
            "Nemotron-H 47B base: 98-layer hybrid (MiniPuzzle-compressed from 56B), Mamba state 256."),
    _preset("nemotron-h-56b", "nvidia/Nemotron-H-56B-Base-8K", "56B", 56.0, _nemotron_h_56b(),
            "Nemotron-H 56B base: 118-layer hybrid with 10 attention layers, Mamba state 256."),
    # Nemotron Nano 2
    _preset("nemotron-nano-9b-v2", "nvidia/NVIDIA-Nemotron-Nano-9B-v2", "9B", 9.0, _nano_2_9b(),
            "Nemotron Nano 2 9B reasoning model: 56-layer hybrid pruned from 12B, 128K context; "
            "eos/pad ids not seen in a release config (defaults 2/0)."),
    # NOTE: these dims give 12.31B parameters (2.6% above the nominal 12B).
    _preset("nemotron-nano-12b-v2", "nvidia/NVIDIA-Nemotron-Nano-12B-v2", "12B", 12.0, _nano_2_12b(),
            "Nemotron Nano 2 12B: 62-layer hybrid, parent of Nano 2 9B, 128K context; "
            "eos/pad ids not seen in a release config (defaults 2/0)."),
    # Nemotron 3
    _preset("nemotron-3-nano-4b", "nvidia/NVIDIA-Nemotron-3-Nano-4B-BF16", "4B", 4.0, _nano_3_4b(),
            "Nemotron 3 Nano 4B: dense 42-layer hybrid (chunk 256) compressed from Nano 2 9B; "
            "max_position_embeddings 262144 from public config copies and eos 11 assumed as Nano-3 30B."),
    _preset("nemotron-3-nano-30b-a3b", "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16", "30B-A3B", 31.6,
            _nano_3_30b_a3b(),
            "Nemotron 3 Nano 30B-A3B: 52-layer Mamba-2/MoE hybrid, 128 experts top-6 + shared expert "
            "(NVIDIA states 31.6B total)."),
    _preset("nemotron-3.5-lightning-30b-a3b", "nvidia/NVIDIA-Nemotron-3.5-Lightning-30B-A3B-BF16", "30B-A3B",
            31.6, _nemotron_3_5_lightning(),
            "Nemotron 3.5 Lightning 30B-A3B: Nano-3 30B-A3B architecture plus one '*E' MTP depth "
            "(MTP pattern from the Megatron-Bridge recipe; HF config not seen)."),
    _preset("nemotron-3-super-120b-a12b", "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16", "120B-A12B", 120.0,
            _nemotron_3_super(),
            "Nemotron 3 Super 120B-A12B: 88-layer Mamba-2/LatentMoE hybrid, 512 experts top-22, latent 1024, "
            "one '*E' MTP depth."),
    _preset("nemotron-3-ultra-550b-a55b", "nvidia/NVIDIA-Nemotron-3-Ultra-550B-A55B-BF16", "550B-A55B", 550.0,
            _nemotron_3_ultra(),
            "Nemotron 3 Ultra 550B-A55B: 108-layer LatentMoE hybrid from a Megatron script; vocab 131072, "
            "Mamba groups 8 / state 128, ctx 262144, eos [2, 11] and 1 stored MTP depth are assumed."),
    # Nemotron-4 / Minitron
    # Minitron totals: the Minitron paper gives 2.6B / 6.2B non-embedding parameters for 4B / 8B; with the
    # untied 256k-vocab embedding and head that is 4.19B / 8.27B.
    _preset("minitron-4b", "nvidia/Minitron-4B-Base", "4B", 4.19, _minitron_4b(),
            "Minitron 4B base: Nemotron-4 15B pruned and distilled, 32 layers, 256K vocab "
            "(4.19B total incl. 1.57B embedding+head)."),
    _preset("minitron-8b", "nvidia/Minitron-8B-Base", "8B", 8.27, _minitron_8b(),
            "Minitron 8B base: Nemotron-4 15B pruned and distilled, 32 layers, 48 heads of 128 on a 4096 "
            "residual (8.27B total)."),
    _preset("nemotron-mini-4b-instruct", "nvidia/Nemotron-Mini-4B-Instruct", "4B", 4.19, _minitron_4b(),
            "Nemotron-Mini-4B-Instruct: the Minitron 4B architecture, instruction tuned (4.19B total)."),
    _preset("nemotron-4-15b", "nvidia/Nemotron-4-15B", "15B", 15.7, _nemotron_4_15b(),
            "Nemotron-4 15B (values from the Megatron-Bridge provider; no public HF checkpoint confirmed, "
            "hf_id is a placeholder; bos/eos assumed 2/3; NVIDIA states 12.5B + 3.2B embedding)."),
    _preset("nemotron-4-340b", "nvidia/Nemotron-4-340B-Instruct", "340B", 340.0, _nemotron_4_340b(),
            "Nemotron-4 340B (Base/Instruct share it; released in NeMo format; Megatron-Bridge provider "
            "values; bos/eos assumed 2/3)."),
    # Llama-Nemotron (NAS)
    _preset("llama-3.3-nemotron-super-49b-v1", "nvidia/Llama-3_3-Nemotron-Super-49B-v1", "49B", 49.0,
            _llama_nemotron_super_49b(),
            "Llama-3.3-Nemotron-Super-49B-v1: NAS-pruned Llama-3.3-70B, 80 blocks (31 without attention), "
            "per-layer FFN widths."),
    _preset("llama-3.1-nemotron-ultra-253b-v1", "nvidia/Llama-3_1-Nemotron-Ultra-253B-v1", "253B", 253.0,
            _llama_nemotron_ultra_253b(),
            "Llama-3.1-Nemotron-Ultra-253B-v1: NAS-derived from Llama-3.1-405B, 162 blocks (98 without "
            "attention, 81 without FFN)."),
    # Llama / Mistral (uniform blocks)
    _preset("llama-3.1-nemotron-70b-instruct", "nvidia/Llama-3.1-Nemotron-70B-Instruct-HF", "70B", 70.0,
            _llama_31_nemotron_70b(),
            "Llama-3.1-Nemotron-70B-Instruct (HF): Llama-3.1-70B-Instruct RLHF-tuned by NVIDIA, 80 layers; "
            "eos [128001, 128008, 128009] assumed from Llama-3.1-Instruct."),
    _preset("llama-3.1-nemotron-nano-8b-v1", "nvidia/Llama-3.1-Nemotron-Nano-8B-v1", "8B", 8.0,
            _llama_31_nemotron_nano_8b(),
            "Llama-3.1-Nemotron-Nano-8B-v1: Llama-3.1-8B-Instruct post-trained for reasoning (\"detailed "
            "thinking on/off\"), 128K context; eos assumed from Llama-3.1-Instruct."),
    # NVIDIA names it 4B; its Minitron-4B-Width architecture counts 4.51B
    _preset("llama-3.1-nemotron-nano-4b-v1.1", "nvidia/Llama-3.1-Nemotron-Nano-4B-v1.1", "4B", 4.51,
            _minitron_4b_width(eos_token_id=_LLAMA_31_INSTRUCT_EOS),
            "Llama-3.1-Nemotron-Nano-4B-v1.1: reasoning model on Llama-3.1-Minitron-4B-Width (head_dim 128 on "
            "hidden 3072), 128K context; eos assumed from Llama-3.1-Instruct."),
    _preset("llama-3.1-minitron-4b-width-base", "nvidia/Llama-3.1-Minitron-4B-Width-Base", "4B", 4.51,
            _minitron_4b_width(),
            "Llama-3.1-Minitron-4B-Width-Base: Llama-3.1-8B width-pruned (hidden 3072, FFN 9216, 32 heads of "
            "128) and distilled; eos 128001 assumed from Llama-3.1-8B base."),
    _preset("llama-3.1-minitron-4b-depth-base", "nvidia/Llama-3.1-Minitron-4B-Depth-Base", "4B", 4.54,
            _minitron_4b_depth(),
            "Llama-3.1-Minitron-4B-Depth-Base: Llama-3.1-8B depth-pruned to 16 layers and distilled; eos 128001 "
            "assumed from Llama-3.1-8B base."),
    _preset("mistral-nemo-minitron-8b-base", "nvidia/Mistral-NeMo-Minitron-8B-Base", "8B", 8.41,
            _mistral_nemo_minitron_8b(),
            "Mistral-NeMo-Minitron-8B-Base: Mistral-NeMo-12B pruned (hidden 4096, FFN 11520) and distilled, 40 "
            "layers, 131K vocab, 8K context; head_dim, rope_theta, eps and eos from the 12B parent."),
    _preset("mistral-nemo-minitron-8b-instruct", "nvidia/Mistral-NeMo-Minitron-8B-Instruct", "8B", 8.41,
            _mistral_nemo_minitron_8b(),
            "Mistral-NeMo-Minitron-8B-Instruct: the Base architecture, instruction tuned (8K context; the card "
            "recommends <extra_id_1> as the stop token, which lives in its tokenizer, not in this config)."),
]

PRESETS: dict[str, Preset] = {p.name: p for p in _ALL}
del _ALL

_LOOKUP: dict[str, str] = {}
for _p in PRESETS.values():
    _LOOKUP[_p.name.lower()] = _p.name
    _LOOKUP.setdefault(_p.hf_id.lower(), _p.name)
del _p


def get_preset(name: str) -> Preset:
    """The preset named `name` (its short name or its Hugging Face id, case-insensitive).

    The returned preset carries a private copy of the config, so callers may modify it.
    """
    key = _LOOKUP.get(str(name).strip().lower())
    if key is None:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    preset = PRESETS[key]
    return dataclasses.replace(preset, config=copy.deepcopy(preset.config))


# --------------------------------------------------------------------------------------------------
# Models that are not releases
# --------------------------------------------------------------------------------------------------

# The embedded model, `nemotron.load("tiny")`: the one checkpoint that ships inside the package
# (nemotron/tiny/model/, trained by `nemotron recipe tiny`).
EMBEDDED_MODEL_DIR = Path(__file__).parent.parent / "tiny" / "model"


def toy_super_config(vocab_size: int = 320) -> NemotronHConfig:
    """A toy model for tests and examples, a few hundred thousand parameters with the Nemotron 3 Super
    layout: Mamba-2, NoPE attention and LatentMoE layers, and an MTP block. The default vocabulary
    holds `nemotron.io.tokenizer.write_byte_tokenizer`'s 267 tokens. Not the embedded model."""
    return NemotronHConfig(
        hybrid_override_pattern="MEM*EME", mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1,
        vocab_size=vocab_size, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=32,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, moe_latent_size=32,
        moe_shared_expert_intermediate_size=128, routed_scaling_factor=2.0, intermediate_size=128,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=4, pad_token_id=0,
    )
