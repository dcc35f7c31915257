"""Nemotron-4 15B/340B and Minitron 4B/8B (`model_type: "nemotron"`): LayerNorm1P, partial RoPE,
squared-ReLU MLP, explicit head_dim."""

from __future__ import annotations

from nemotron.config import Nemotron4Config
from nemotron.layers.attention import Attention
from nemotron.models.decoder import DecoderBody, DecoderFamily, DecoderLayer, DecoderLM
from nemotron.layers.mlp import ReLU2MLP
from nemotron.layers.norm import LayerNorm1P
from nemotron.layers.rope import rope_inv_freq


def build_nemotron4(config: Nemotron4Config) -> DecoderLM:
    c = config
    layers = [
        DecoderLayer(
            LayerNorm1P(c.hidden_size, c.norm_eps),
            Attention(c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.attention_bias),
            LayerNorm1P(c.hidden_size, c.norm_eps),
            ReLU2MLP(c.hidden_size, c.intermediate_size, c.mlp_bias),
        )
        for _ in range(c.num_hidden_layers)
    ]
    body = DecoderBody(c.vocab_size, c.hidden_size, layers, LayerNorm1P(c.hidden_size, c.norm_eps))
    rotary_dim = int(c.head_dim * c.partial_rotary_factor)
    return DecoderLM(c, body, rope_inv_freq(rotary_dim, c.rope_theta))


class Nemotron4Family(DecoderFamily):
    config_class = Nemotron4Config

    def build(self, config: Nemotron4Config) -> DecoderLM:
        return build_nemotron4(config)

    def layer_pattern(self, config: Nemotron4Config) -> str:
        return " ".join("AF" for _ in range(config.num_hidden_layers))

    def kv_heads(self, config: Nemotron4Config) -> list[int]:
        return [config.num_key_value_heads] * config.num_hidden_layers


FAMILY = Nemotron4Family()
