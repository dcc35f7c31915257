"""Random initialisation for training from scratch (and tiny test checkpoints).

Linear and embedding weights ~ N(0, initializer_range); output projections of residual branches
scaled by 1/sqrt(num_layers); norms at identity; Mamba A_log = log(1..heads), D = 1 and dt_bias the
inverse softplus of a log-uniform dt in [time_step_min, time_step_max] (floored), as Mamba-2 does."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from nemotron.config import AnyConfig, NemotronHConfig
from nemotron.layers.mamba2 import Mamba2Mixer
from nemotron.layers.moe import Experts, TopkRouter
from nemotron.layers.norm import GatedRMSNorm, LayerNorm1P, RMSNorm

_RESIDUAL_OUTPUTS = ("out_proj", "o_proj", "down_proj", "linear_attn", "linear_mlp", "fc2_latent_proj")


@torch.no_grad()
def init_weights_(model: nn.Module, config: AnyConfig, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    std = config.initializer_range
    depth_scale = 1 / math.sqrt(max(1, config.num_hidden_layers))

    def normal_(t: torch.Tensor, s: float) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * s)

    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear):
            normal_(module.weight, std * (depth_scale if leaf in _RESIDUAL_OUTPUTS else 1.0))
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            normal_(module.weight, std)
        elif isinstance(module, (RMSNorm, GatedRMSNorm)):
            module.weight.fill_(1.0)
        elif isinstance(module, LayerNorm1P):
            module.weight.zero_()
            module.bias.zero_()
        elif isinstance(module, Experts):
            normal_(module.up_proj, std)
            normal_(module.down_proj, std * depth_scale)
        elif isinstance(module, TopkRouter):
            normal_(module.weight, std)
            module.e_score_correction_bias.zero_()
        elif isinstance(module, Mamba2Mixer):
            assert isinstance(config, NemotronHConfig)
            k = module.conv1d.weight.shape[-1]
            bound = 1 / math.sqrt(k)  # PyTorch's default conv init for a depthwise kernel
            module.conv1d.weight.copy_((torch.rand(module.conv1d.weight.shape, generator=g) * 2 - 1) * bound)
            if module.conv1d.bias is not None:
                module.conv1d.bias.copy_((torch.rand(module.conv1d.bias.shape, generator=g) * 2 - 1) * bound)
            h = module.num_heads
            module.A_log.copy_(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
            module.D.fill_(1.0)
            lo, hi = math.log(config.time_step_min), math.log(config.time_step_max)
            dt = torch.exp(torch.rand(h, generator=g) * (hi - lo) + lo).clamp(min=config.time_step_floor)
            module.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    return model


# --------------------------------------------------------------------------------------------------
# a small random checkpoint in the release layout (until the trained embedded model ships)
# --------------------------------------------------------------------------------------------------

NEMOTRON3_CHAT_TEMPLATE = Path(__file__).parent.parent / "chat" / "templates" / "nemotron3_chat.jinja"
NEMOTRON3_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>",
                            "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


def tiny_super_config(vocab_size: int = 320) -> NemotronHConfig:
    """A few-hundred-thousand-parameter model with the Nemotron 3 Super layout: Mamba-2, NoPE
    attention and LatentMoE layers, and an MTP block."""
    return NemotronHConfig(
        hybrid_override_pattern="MEM*EME", mtp_hybrid_override_pattern="*E", num_nextn_predict_layers=1,
        vocab_size=vocab_size, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, chunk_size=32,
        n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64, moe_latent_size=32,
        moe_shared_expert_intermediate_size=128, routed_scaling_factor=2.0, intermediate_size=128,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=4, pad_token_id=0,
    )


def write_byte_tokenizer(out_dir) -> int:
    """A byte-level tokenizer (256 byte tokens, no merges) with the Nemotron 3 special tokens; returns
    its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(NEMOTRON3_SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(NEMOTRON3_SPECIAL_TOKENS)
    write_tokenizer_files(tok, out_dir)
    return tok.get_vocab_size()


def write_tokenizer_files(tok, out_dir) -> None:
    """tokenizer.json, a tokenizer_config.json with the Nemotron 3 special tokens, and the project's
    chat template, for a `tokenizers.Tokenizer`."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "<unk>",
         "add_bos_token": False, "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"},
        indent=2) + "\n")
    (out / "chat_template.jinja").write_text(NEMOTRON3_CHAT_TEMPLATE.read_text())


def init_checkpoint(out_dir, config: AnyConfig | None = None, seed: int = 0, with_tokenizer: bool = True):
    """Write a randomly initialised checkpoint (config.json, model.safetensors, tokenizer) to out_dir."""
    from pathlib import Path

    from nemotron.io.checkpoint import save_checkpoint
    from nemotron.models import build_model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if with_tokenizer:
        size = write_byte_tokenizer(out)
        config = config or tiny_super_config()
        if config.vocab_size < size:
            raise ValueError(f"vocab_size {config.vocab_size} is smaller than the tokenizer's {size}")
    config = config or tiny_super_config()
    model = init_weights_(build_model(config), config, seed)
    save_checkpoint(model, config, out)
    return out
