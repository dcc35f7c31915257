"""The Llama decoder as a list of per-layer blocks: Llama-3.3-Nemotron-Super-49B and
Llama-3.1-Nemotron-Ultra-253B (DeciLM, `model_type: "nemotron-nas"`), whose layers each choose GQA width
(`n_heads_in_group`), FFN width (`ffn_mult`), or replace a half by a single linear map or drop it
(`no_op`); and Llama / Mistral (`model_type: "llama"` / `"mistral"`: Llama-3.1-Nemotron 70B / Nano,
Llama-3.1-Minitron, Mistral-NeMo-Minitron), whose configs derive the uniform block list."""

from __future__ import annotations

from nemotron.config import LlamaDecoderConfig
from nemotron.layers.attention import Attention, LinearAttention
from nemotron.models.decoder import DecoderBody, DecoderFamily, DecoderLayer, DecoderLM
from nemotron.layers.mlp import LinearMLP, SwiGLU
from nemotron.layers.norm import RMSNorm
from nemotron.layers.rope import rope_inv_freq


def build_llama_nas(config: LlamaDecoderConfig) -> DecoderLM:
    c = config
    h = c.hidden_size

    def norm() -> RMSNorm:
        return RMSNorm(h, c.rms_norm_eps, weight_in_fp32=False)  # Llama rounding order

    layers = []
    for block in c.block_configs:
        a, f = block.attention, block.ffn
        if a.no_op:
            attn = None
        elif a.replace_with_linear:
            attn = LinearAttention(h)
        else:
            attn = Attention(h, c.num_attention_heads, a.kv_heads(c.num_attention_heads), c.head_dim,
                             c.attention_bias)
        if f.no_op:
            mlp = None
        elif f.replace_with_linear:
            mlp = LinearMLP(h)
        else:
            mlp = SwiGLU(h, f.width(h), c.mlp_bias)
        layers.append(DecoderLayer(None if attn is None else norm(), attn, None if mlp is None else norm(), mlp))
    body = DecoderBody(c.vocab_size, h, layers, norm())
    s = c.rope_scaling
    inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, s.rope_type, s.factor, s.low_freq_factor,
                             s.high_freq_factor, s.original_max_position_embeddings)
    return DecoderLM(c, body, inv_freq)


class LlamaNASFamily(DecoderFamily):
    """DeciLM, and Llama / Mistral as its uniform case (their configs subclass LlamaDecoderConfig)."""

    config_class = LlamaDecoderConfig

    def build(self, config: LlamaDecoderConfig) -> DecoderLM:
        return build_llama_nas(config)

    def layer_pattern(self, config: LlamaDecoderConfig) -> str:
        # per layer: attention A / linear L / none .  then FFN F / linear L / none .  (Llama / Mistral: "AF")
        def kind(sub) -> str | None:
            return "." if sub.no_op else "L" if sub.replace_with_linear else None

        return " ".join((kind(b.attention) or "A") + (kind(b.ffn) or "F") for b in config.block_configs)

    def kv_heads(self, config: LlamaDecoderConfig) -> list[int]:
        return [b.attention.kv_heads(config.num_attention_heads) for b in config.block_configs
                if not (b.attention.no_op or b.attention.replace_with_linear)]


FAMILY = LlamaNASFamily()
