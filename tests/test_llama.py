"""Llama and Mistral (`model_type: "llama"` / `"mistral"`), the uniform-block case of the NAS family:
parity with transformers' own LlamaForCausalLM / MistralForCausalLM (GQA, head_dim != hidden / heads,
llama3 RoPE, tied and untied heads, biases), greedy generation, our save read back by transformers,
the same weights under a DeciLM config with explicit per-block sizes, and bad configs. (The presets:
tests/test_presets.py; `nemotron models` / `info` on them: tests/test_cli.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nemotron
from nemotron.config import LlamaConfig, MistralConfig, NemotronNASConfig, config_from_dict
from nemotron.errors import ConfigError

from conftest import assert_saved_checkpoint_round_trips, hf_logits, randomize_

TOL = 1e-4
VOCAB = 128
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0,
          # small enough that, with head_dim 24, frequencies are kept, smoothed and divided alike
          "original_max_position_embeddings": 32}

# name -> (transformers class name, config kwargs)
CASES = {
    # GQA 4/2, head_dim 24 on a 64 residual (q width 96), llama3 scaling, untied head
    "llama-gqa-llama3": ("Llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                       rope_parameters=dict(LLAMA3), tie_word_embeddings=False)),
    # MQA, head_dim derived (16), plain RoPE, tied head, biases on every projection
    "llama-tied-bias": ("Llama", dict(num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True,
                                      attention_bias=True, mlp_bias=True,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    # Mistral, tied, head_dim 24, a window no shorter than the context (so it never slides)
    "mistral-tied": ("Mistral", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                     tie_word_embeddings=True, sliding_window=256,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
}


def _hf_classes(kind: str):
    import transformers

    return getattr(transformers, f"{kind}Config"), getattr(transformers, f"{kind}ForCausalLM")


def _make_hf(out, name: str, seed: int = 0):
    """A random tiny transformers model saved with save_pretrained (safetensors): (dir, hf_model)."""
    kind, kw = CASES[name]
    config_cls, model_cls = _hf_classes(kind)
    cfg = config_cls(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, **kw)
    torch.manual_seed(seed)
    model = randomize_(model_cls(cfg), seed=seed + 1).eval()
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(out)
    return out, model


@pytest.fixture(params=list(CASES))
def hf_checkpoint(request, tmp_path):
    return (request.param, *_make_hf(tmp_path / request.param, request.param))


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_parity_with_transformers(hf_checkpoint):
    name, path, hf = hf_checkpoint
    m = nemotron.load(path, dtype="float32")
    c = m.config
    assert type(c) is (MistralConfig if name.startswith("mistral") else LlamaConfig)
    kw = CASES[name][1]
    assert (c.head_dim, c.num_key_value_heads) == (kw.get("head_dim", 16), kw["num_key_value_heads"])
    attn = m.model.model.layers[0].self_attn
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (4, c.num_key_value_heads, c.head_dim)
    torch.testing.assert_close(m.model.inv_freq, hf.model.rotary_emb.inv_freq, rtol=0, atol=0)
    sd = m.model.state_dict()
    # a tied head owns no tensor: the matrix is the embedding, held once
    assert ("lm_head.weight" in sd) != c.tie_word_embeddings
    assert m.model.lm_head.weight is m.model.model.embed_tokens.weight or not c.tie_word_embeddings
    assert ("model.layers.0.self_attn.q_proj.bias" in sd) == c.attention_bias
    assert ("model.layers.0.mlp.up_proj.bias" in sd) == c.mlp_bias
    for t in (7, 40):
        ids = _ids(2, t, seed=t)
        with torch.no_grad():
            ours = m.model(ids)
        ref = hf_logits(hf, ids)
        assert ours.shape == (2, t, VOCAB) and ours.dtype == torch.float32
        diff = (ours - ref).abs().max().item()
        print(f"{name} T={t}: max |dlogit| {diff:.3g}")
        assert diff <= TOL, f"{name} T={t}: max |dlogit| {diff}"
        assert ref.abs().max() > 1.0  # the comparison is not between two near-zero tensors


def test_llama3_scaling_changes_frequencies(tmp_path):
    """The llama3 case really exercises the scaling (kept, divided and smoothed frequencies)."""
    path, _ = _make_hf(tmp_path / "l3", "llama-gqa-llama3")
    c = nemotron.load_config(path)
    assert c.rope_scaling.rope_type == "llama3" and c.rope_scaling.original_max_position_embeddings == 32
    from nemotron.layers.rope import rope_inv_freq

    with torch.device("meta"):
        from nemotron.models import build_model
        model = build_model(c)
    ratio = model.inv_freq / rope_inv_freq(24, 10000.0)
    assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(1 / 8)).any()
    assert ((ratio < 1) & (ratio > 1 / 8 + 1e-6)).any()


def test_greedy_generation_matches_transformers(hf_checkpoint):
    """Prefill + cached decode picks the same tokens as transformers' generate() with its own cache."""
    from nemotron.inference.steps import greedy_generate

    name, path, hf = hf_checkpoint
    ours = nemotron.load(path, dtype="float32").model
    prompt = torch.randint(3, VOCAB, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                          min_new_tokens=12)[:, 11:]
    mine = greedy_generate(ours, prompt, 12)
    assert torch.equal(mine, ref), (name, mine, ref)


def test_saved_checkpoint_loads_in_transformers(hf_checkpoint, tmp_path):
    name, path, hf = hf_checkpoint
    kind, kw = CASES[name]
    _, model_cls = _hf_classes(kind)
    m = nemotron.load(path, dtype="float32")
    out = m.save(tmp_path / "ours")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == kind.lower() and saved["architectures"] == [f"{kind}ForCausalLM"]
    if kind == "Mistral":
        assert "attention_bias" not in saved and saved["sliding_window"] == 256

    back = model_cls.from_pretrained(out, dtype=torch.float32).eval()
    bc = back.config
    assert (bc.head_dim, bc.num_key_value_heads, bc.tie_word_embeddings) == (
        m.config.head_dim, kw["num_key_value_heads"], kw["tie_word_embeddings"])
    assert bc.rope_parameters["rope_type"] == kw["rope_parameters"]["rope_type"]
    assert bc.rope_parameters["rope_theta"] == kw["rope_parameters"]["rope_theta"]
    if kw["rope_parameters"]["rope_type"] == "llama3":
        assert bc.rope_parameters["factor"] == 8.0 and bc.rope_parameters["original_max_position_embeddings"] == 32
    assert_saved_checkpoint_round_trips(hf, back, m, out, _ids(2, 17, seed=9), TOL)


def test_same_weights_as_nas_blocks_with_explicit_sizes(tmp_path):
    """A Llama checkpoint under a DeciLM config whose blocks name their KV heads and FFN width
    explicitly (Puzzle's newer block keys) is the same model: the Llama config is its uniform case."""
    path, hf = _make_hf(tmp_path / "llama", "llama-gqa-llama3")
    as_llama = nemotron.load(path, dtype="float32")
    raw = json.loads((path / "config.json").read_text())
    raw.update(model_type="nemotron-nas", architectures=["DeciLMForCausalLM"], num_key_value_heads=None,
               intermediate_size=None, block_configs=[
                   {"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": None,
                                  "num_key_value_heads": 2},
                    "ffn": {"no_op": False, "replace_with_linear": False, "ffn_mult": None, "intermediate_size": 96}}
                   for _ in range(3)])
    (path / "config.json").write_text(json.dumps(raw))
    as_nas = nemotron.load(path, dtype="float32")
    assert isinstance(as_nas.config, NemotronNASConfig) and as_nas.config.intermediate_size(0) == 96
    assert as_nas.config.to_hf()["block_configs"] == raw["block_configs"]   # explicit keys written back
    assert as_nas.config.to_hf()["head_dim"] == 24                          # != hidden / heads: kept
    ids = _ids(2, 21, seed=3)
    with torch.no_grad():
        assert torch.equal(as_nas.model(ids), as_llama.model(ids))
    # and the uniform Llama config lists exactly these blocks
    assert [b.to_dict() for b in as_llama.config.block_configs] == raw["block_configs"]


# --------------------------------------------------------------------------------------------------
# bad input: one line naming the key
# --------------------------------------------------------------------------------------------------


def _llama_raw(**changes) -> dict:
    raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 64,
           "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
    raw.update(changes)
    return {k: v for k, v in raw.items() if v is not None}


@pytest.mark.parametrize("changes, needle", [
    (dict(num_key_value_heads=3), "num_key_value_heads=3 does not divide num_attention_heads=4"),
    (dict(num_attention_heads=6, num_key_value_heads=6), "hidden_size=64 is not a multiple of num_attention_heads=6"),
    (dict(num_key_value_heads=0), "num_key_value_heads must be a positive integer"),
    (dict(intermediate_size="96"), "intermediate_size must be an integer"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling type 'yarn' is not supported"),
    (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 is not supported"),
    (dict(num_hidden_layers=100_000), "num_hidden_layers=100000 exceeds the supported maximum"),
    # Mistral: a real sliding window, stated or by transformers' default of 4096, is refused
    (dict(model_type="mistral", sliding_window=4096, max_position_embeddings=32768), "sliding_window=4096 is below"),
    (dict(model_type="mistral", max_position_embeddings=32768), "sliding_window=4096 is below"),
    (dict(model_type="mistral", sliding_window=None, attention_bias=True), "mistral config: attention_bias"),
])
def test_bad_config_is_one_line_naming_the_key(changes, needle):
    with pytest.raises(ConfigError) as e:
        config_from_dict(_llama_raw(**changes))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_checkpoint_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_llama_raw(num_key_value_heads=3)))
    with pytest.raises(ConfigError) as e:
        nemotron.load(tmp_path)
    text = str(e.value)
    assert text.startswith(str(tmp_path / "config.json")) and "num_key_value_heads=3" in text and "\n" not in text


def test_heads_need_not_divide_hidden_with_an_explicit_head_dim():
    c = config_from_dict(_llama_raw(num_attention_heads=6, num_key_value_heads=2, head_dim=16))
    assert (c.head_dim, c.num_hidden_layers, len(c.block_configs)) == (16, 2, 2)
    # a Mistral window at least as long as the context is full attention, and is accepted
    m = config_from_dict(_llama_raw(model_type="mistral", sliding_window=4096, max_position_embeddings=4096))
    assert isinstance(m, MistralConfig) and m.to_hf()["sliding_window"] == 4096
    # without num_key_value_heads a Llama config is MHA, as in transformers
    assert config_from_dict(_llama_raw(num_key_value_heads=None)).num_key_value_heads == 4


def test_a_tied_checkpoint_that_also_stores_the_head_loads(tmp_path):
    """Some exporters write lm_head.weight beside a tied embedding; transformers ties it to the
    embedding anyway, and so does the loader (the stored copy is not read)."""
    path, hf = _make_hf(tmp_path / "tied", "llama-tied-bias")
    tensors = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    m = nemotron.load(path)
    ids = _ids(1, 9, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(m.model(ids), hf_logits(hf, ids), rtol=0, atol=1e-5)
