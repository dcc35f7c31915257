"""Llama-Nemotron Super / Ultra (DeciLM, `model_type: "nemotron-nas"`): parity with transformers' Llama
for uniform blocks, llama3 RoPE frequencies, heterogeneous blocks (no_op, replace_with_linear, per-layer
GQA / FFN widths) against a forward written out here, and the save -> load round trip."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import nemotron
from nemotron.config import NemotronNASConfig, config_from_dict, ffn_mult_to_intermediate_size

from conftest import randomize_

TOL = 1e-4
VOCAB = 128
H, HEADS = 64, 4  # head_dim 16
ROPE = {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
        # small enough that, with head_dim 16 and theta 10000, one frequency is kept, one smoothed and
        # six divided by the factor
        "original_max_position_embeddings": 32, "rope_type": "llama3"}
THETA = 10000.0


def attention_block(g=None, no_op=False, linear=False) -> dict:
    """An attention block config with every key the released DeciLM configs carry."""
    return {"n_heads_in_group": g, "no_op": no_op, "num_sink_tokens": None, "replace_with_linear": linear,
            "sparsify": None, "unshifted_sink": False, "use_prefill_window_in_sink_attention": False,
            "window_length": None}


def ffn_block(m=None, no_op=False, linear=False) -> dict:
    return {"ffn_mult": m, "no_op": no_op, "replace_with_linear": linear, "sparsify": None}


def decilm_dict(blocks: list[dict]) -> dict:
    """A tiny config.json in the released Llama-3.3-Nemotron-Super layout."""
    return {
        "architectures": ["DeciLMForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig",
                     "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"},
        "block_configs": blocks,
        "bos_token_id": 1,
        "eos_token_id": [2, 3],
        "hidden_act": "silu",
        "hidden_size": H,
        "initializer_range": 0.02,
        "intermediate_size": None,
        "max_position_embeddings": 256,
        "mlp_bias": False,
        "model_type": "nemotron-nas",
        "num_attention_heads": HEADS,
        "num_hidden_layers": len(blocks),
        "num_key_value_heads": None,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": dict(ROPE),
        "rope_theta": THETA,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.48.3",
        "use_cache": True,
        "vocab_size": VOCAB,
    }


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _hf_llama3_inv_freq(theta, head_dim, factor, low, high, orig) -> torch.Tensor:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=4 * orig,
                      rope_parameters={"rope_type": "llama3", "rope_theta": theta, "factor": factor,
                                       "low_freq_factor": low, "high_freq_factor": high,
                                       "original_max_position_embeddings": orig})
    inv, scaling = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert scaling == 1.0
    return inv


# --------------------------------------------------------------------------------------------------
# uniform blocks == transformers Llama
# --------------------------------------------------------------------------------------------------

G, MULT, LAYERS = 2, 2.5, 3


def test_parity_with_transformers_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    blocks = [{"attention": attention_block(G), "ffn": ffn_block(MULT)} for _ in range(LAYERS)]
    raw = decilm_dict(blocks)
    config = config_from_dict(raw)
    assert isinstance(config, NemotronNASConfig)
    inter = config.intermediate_size(0)
    assert inter == 256 * math.ceil(int(2 * MULT * H / 3) / 256) == 256

    hf_cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=H, intermediate_size=inter, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=HEADS // G, hidden_act="silu",
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_theta": THETA, **ROPE}, attention_bias=False, mlp_bias=False,
        bos_token_id=1, eos_token_id=[2, 3],
    )
    torch.manual_seed(0)
    hf = randomize_(LlamaForCausalLM(hf_cfg), seed=3).eval()
    path = tmp_path / "nas"
    hf.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(raw))  # Llama weight names == DeciLM weight names

    m = nemotron.load(path, dtype="float32")
    assert isinstance(m.config, NemotronNASConfig)
    attn = m.model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (HEADS, HEADS // G, H // HEADS)
    # the scaling really changes the frequencies at this size
    plain = 1.0 / THETA ** (torch.arange(0, 16, 2).float() / 16)
    assert not torch.allclose(m.model.inv_freq, plain)
    torch.testing.assert_close(m.model.inv_freq, hf.model.rotary_emb.inv_freq, rtol=0, atol=0)

    for t in (40, 13):
        ids = _ids(2, t, seed=t)
        with torch.no_grad():
            ours = m.model(ids)
            ref = hf(input_ids=ids, use_cache=False).logits.float()
        assert ours.shape == (2, t, VOCAB)
        diff = (ours - ref).abs().max().item()
        assert diff <= TOL, f"T={t}: max |dlogit| {diff}"
        assert ref.abs().max() > 1.0


# --------------------------------------------------------------------------------------------------
# RoPE frequencies
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [8.0, 16.0])  # Super-49B, Ultra-253B
def test_llama3_rope_frequencies_match_transformers(factor):
    from nemotron.layers.rope import rope_inv_freq

    rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    raw = decilm_dict([{"attention": attention_block(8), "ffn": ffn_block(5.25)}])
    raw.update(hidden_size=8192, num_attention_heads=64, rope_theta=500000.0, rope_scaling=rope)
    config = config_from_dict(raw)
    assert config.head_dim == 128
    with torch.device("meta"):
        from nemotron.models.llama_nas import build_llama_nas
        model = build_llama_nas(config)
    ours = model.inv_freq
    assert ours.device.type == "cpu" and ours.shape == (64,)
    ref = _hf_llama3_inv_freq(500000.0, 128, factor, 1.0, 4.0, 8192)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=0)
    # all three regimes are exercised: kept, smoothed, divided by factor
    plain = rope_inv_freq(128, 500000.0)
    ratio = ours / plain
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(1 / factor)).any()
    assert ((ratio < 1) & (ratio > 1 / factor + 1e-6)).any()


# --------------------------------------------------------------------------------------------------
# heterogeneous blocks against a forward written out here
# --------------------------------------------------------------------------------------------------

MIXED = [
    {"attention": attention_block(2), "ffn": ffn_block(2.0)},                       # GQA 4/2, FFN 128 -> 256
    {"attention": attention_block(no_op=True), "ffn": ffn_block(1.0)},              # no attention
    {"attention": attention_block(linear=True), "ffn": ffn_block(no_op=True)},      # linear attention, no FFN
    {"attention": attention_block(4), "ffn": ffn_block(linear=True)},               # MQA, linear FFN
    {"attention": attention_block(1), "ffn": ffn_block(7.0)},                       # MHA, FFN 298 -> 512
    {"attention": attention_block(no_op=True), "ffn": ffn_block(no_op=True)},       # empty layer
    {"attention": attention_block(linear=True), "ffn": ffn_block(linear=True)},
]


@pytest.fixture
def mixed(tmp_path):
    """Our model for MIXED, randomised and saved: (LoadedModel, dir, raw config dict)."""
    from nemotron.io.checkpoint import save_checkpoint
    from nemotron.models import build_model

    raw = decilm_dict(copy.deepcopy(MIXED))
    config = config_from_dict(raw)
    torch.manual_seed(0)
    model = randomize_(build_model(config), seed=4).eval()
    path = tmp_path / "mixed"
    save_checkpoint(model, config, path)
    return nemotron.load(path, dtype="float32"), path, raw


def _rms(x, w, eps=1e-5):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_forward(sd: dict, raw: dict, ids: torch.Tensor) -> torch.Tensor:
    """DeciLM forward in plain torch ops over a state dict."""
    hsz, heads, eps = raw["hidden_size"], raw["num_attention_heads"], raw["rms_norm_eps"]
    hd = hsz // heads
    r = raw["rope_scaling"]
    inv = _hf_llama3_inv_freq(raw["rope_theta"], hd, r["factor"], r["low_freq_factor"], r["high_freq_factor"],
                              r["original_max_position_embeddings"])
    b, t = ids.shape
    ang = torch.arange(t).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    causal = torch.ones(t, t, dtype=torch.bool).tril()

    x = sd["model.embed_tokens.weight"][ids]
    for i, block in enumerate(raw["block_configs"]):
        p = f"model.layers.{i}."
        a, f = block["attention"], block["ffn"]
        if not a["no_op"]:
            h = _rms(x, sd[p + "input_layernorm.weight"], eps)
            if a["replace_with_linear"]:
                y = h @ sd[p + "self_attn.linear_attn.weight"].T
            else:
                kv = heads // a["n_heads_in_group"]
                q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(b, t, heads, hd).transpose(1, 2)
                k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(b, t, kv, hd).transpose(1, 2)
                v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(b, t, kv, hd).transpose(1, 2)
                q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
                rep = heads // kv
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
                s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
                s = s.masked_fill(~causal, float("-inf")).softmax(-1)
                y = (s @ v).transpose(1, 2).reshape(b, t, heads * hd) @ sd[p + "self_attn.o_proj.weight"].T
            x = x + y
        if not f["no_op"]:
            h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
            if f["replace_with_linear"]:
                y = h @ sd[p + "mlp.linear_mlp.weight"].T
            else:
                gate = h @ sd[p + "mlp.gate_proj.weight"].T
                up = h @ sd[p + "mlp.up_proj.weight"].T
                y = (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
            x = x + y
    x = _rms(x, sd["model.norm.weight"], eps)
    return (x @ sd["lm_head.weight"].T).float()


def test_heterogeneous_blocks_state_dict(mixed):
    m, _, _ = mixed
    sd = m.model.state_dict()
    by_layer: dict[int, set[str]] = {}
    for name in sd:
        if name.startswith("model.layers."):
            i, rest = name[len("model.layers."):].split(".", 1)
            by_layer.setdefault(int(i), set()).add(rest)
    norm_in, norm_post = {"input_layernorm.weight"}, {"post_attention_layernorm.weight"}
    gqa = {f"self_attn.{n}_proj.weight" for n in "qkvo"}
    swiglu = {f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")}
    lin_attn, lin_mlp = {"self_attn.linear_attn.weight"}, {"mlp.linear_mlp.weight"}
    assert by_layer[0] == norm_in | gqa | norm_post | swiglu
    assert by_layer[1] == norm_post | swiglu
    assert by_layer[2] == norm_in | lin_attn
    assert by_layer[3] == norm_in | gqa | norm_post | lin_mlp
    assert by_layer[4] == norm_in | gqa | norm_post | swiglu
    assert 5 not in by_layer  # both halves no_op: no weights at all
    assert by_layer[6] == norm_in | lin_attn | norm_post | lin_mlp
    for i in (2, 6):
        assert sd[f"model.layers.{i}.self_attn.linear_attn.weight"].shape == (H, H)
    for i in (3, 6):
        assert sd[f"model.layers.{i}.mlp.linear_mlp.weight"].shape == (H, H)
    hd = H // HEADS
    for i, kv in ((0, 2), (3, 1), (4, 4)):
        assert sd[f"model.layers.{i}.self_attn.k_proj.weight"].shape == (kv * hd, H)
        assert sd[f"model.layers.{i}.self_attn.v_proj.weight"].shape == (kv * hd, H)
        assert sd[f"model.layers.{i}.self_attn.q_proj.weight"].shape == (H, H)
    for i, mult in ((0, 2.0), (1, 1.0), (4, 7.0)):
        inter = ffn_mult_to_intermediate_size(mult, H)
        assert sd[f"model.layers.{i}.mlp.up_proj.weight"].shape == (inter, H)
        assert sd[f"model.layers.{i}.mlp.down_proj.weight"].shape == (H, inter)
    assert [ffn_mult_to_intermediate_size(x, H) for x in (1.0, 2.0, 7.0)] == [256, 256, 512]
    # the released sizes: find_multiple(int(2 * mult * H / 3), 256)
    assert ffn_mult_to_intermediate_size(5.25, 8192) == 28672
    assert ffn_mult_to_intermediate_size(1.0, 8192) == 5632
    assert ffn_mult_to_intermediate_size(0.4875, 16384) == 5376
    assert ffn_mult_to_intermediate_size(1.95, 16384) == 21504


def test_heterogeneous_blocks_match_reference_forward(mixed):
    m, _, raw = mixed
    sd = {k: v.float() for k, v in m.model.state_dict().items()}
    for t in (40, 6):
        ids = _ids(2, t, seed=100 + t)
        with torch.no_grad():
            ours = m.model(ids)
            ref = reference_forward(sd, raw, ids)
        diff = (ours - ref).abs().max().item()
        assert diff <= TOL, f"T={t}: max |dlogit| {diff}"
        assert ref.abs().max() > 1.0


def test_heterogeneous_blocks_incremental_decoding(mixed):
    m, _, _ = mixed
    total, prefill = 24, 10
    ids = _ids(2, total, seed=7)
    with torch.no_grad():
        full = m.model(ids)
        cache = m.model.new_cache(2, total)
        steps = [m.model(ids[:, :prefill], cache=cache)]
        steps += [m.model(ids[:, i:i + 1], cache=cache) for i in range(prefill, total)]
    # only real attention layers hold a KV cache
    assert [s is not None for s in cache.layers] == [True, False, False, True, True, False, False]
    diff = (torch.cat(steps, 1) - full).abs().max().item()
    assert diff <= TOL, f"incremental vs full: max |dlogit| {diff}"


# --------------------------------------------------------------------------------------------------
# save -> load round trip
# --------------------------------------------------------------------------------------------------


def test_save_load_round_trip(mixed, tmp_path):
    m, path, raw = mixed
    # what save_checkpoint wrote is the released layout, unknown keys inside blocks and at top level kept
    first = json.loads((path / "config.json").read_text())
    assert first == raw

    out = m.save(tmp_path / "again")
    second = json.loads((out / "config.json").read_text())
    assert second == first
    assert second["block_configs"] == raw["block_configs"]
    assert second["block_configs"][2]["attention"]["sparsify"] is None
    assert second["block_configs"][0]["attention"]["window_length"] is None
    assert second["num_key_value_heads"] is None and second["intermediate_size"] is None

    back = nemotron.load(out, dtype="float32")
    assert back.config == m.config
    assert back.config.block_configs[0].attention.extra["sparsify"] is None
    sd0, sd1 = m.model.state_dict(), back.model.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    ids = _ids(2, 30, seed=11)
    with torch.no_grad():
        assert torch.equal(back.model(ids), m.model(ids))
