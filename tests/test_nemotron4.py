"""Nemotron-4 / Minitron (`model_type: "nemotron"`): parity with transformers' NemotronForCausalLM,
legacy config keys, incremental decoding and the saved checkpoint read back by transformers."""

from __future__ import annotations

import json

import pytest
import torch

import nemotron
from nemotron.config import Nemotron4Config, config_from_dict

from conftest import assert_saved_checkpoint_round_trips, hf_logits, randomize_

TOL = 1e-4
VOCAB = 128


def _tiny_hf_config(**overrides):
    from transformers import NemotronConfig

    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2,
        head_dim=24,  # q/k/v width 96 != hidden 64, and != hidden // heads (16)
        hidden_act="relu2", max_position_embeddings=256, norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
    )
    kw.update(overrides)
    return NemotronConfig(**kw)


def _make_hf_checkpoint(out, **overrides):
    """A random tiny transformers NemotronForCausalLM saved with save_pretrained: (dir, hf_model)."""
    from transformers import NemotronForCausalLM

    torch.manual_seed(0)
    model = randomize_(NemotronForCausalLM(_tiny_hf_config(**overrides)), seed=1).eval()
    # LayerNorm1P is zero-centred (gamma = 1 + w): randomise its weights around 0 as trained ones are,
    # and give its biases non-zero values too
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or name.startswith("model.norm."):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    return out, model


@pytest.fixture
def hf_checkpoint(tmp_path):
    return _make_hf_checkpoint(tmp_path / "hf")


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def test_parity_with_transformers(hf_checkpoint):
    path, hf = hf_checkpoint
    m = nemotron.load(path, dtype="float32")
    c = m.config
    assert isinstance(c, Nemotron4Config)
    assert (c.head_dim, c.num_key_value_heads, c.partial_rotary_factor) == (24, 2, 0.5)
    # partial rotary: 12 of 24 dims rotate
    assert m.model.inv_freq.shape == (6,)
    for t in (7, 33):
        ids = _ids(2, t, seed=t)
        with torch.no_grad():
            ours = m.model(ids)
        ref = hf_logits(hf, ids)
        assert ours.shape == (2, t, VOCAB) and ours.dtype == torch.float32
        diff = (ours - ref).abs().max().item()
        assert diff <= TOL, f"T={t}: max |dlogit| {diff}"
        assert ref.abs().max() > 1.0  # the comparison is not between two near-zero tensors


def test_legacy_minitron_config_keys(tmp_path):
    # Minitron-8B-Base's config.json layout (transformers 4.x era): `rope_percent`, top-level `rope_theta`.
    # A non-default fraction and theta so that ignoring either key would be caught.
    raw = {
        "architectures": ["NemotronForCausalLM"], "bos_token_id": 2, "eos_token_id": 3, "head_dim": 128,
        "hidden_act": "relu2", "hidden_size": 4096, "initializer_range": 0.0134, "intermediate_size": 16384,
        "max_position_embeddings": 4096, "model_type": "nemotron", "norm_eps": 1e-05,
        "num_attention_heads": 48, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "rope_percent": 0.25, "rope_theta": 20000, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.32.0.dev0", "use_cache": True,
        "vocab_size": 256000,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    c = nemotron.load_config(tmp_path)
    assert isinstance(c, Nemotron4Config)
    assert c.partial_rotary_factor == 0.25
    assert c.rope_theta == 20000
    assert (c.head_dim, c.num_key_value_heads, c.num_attention_heads, c.hidden_size) == (128, 8, 48, 4096)
    assert c.norm_eps == 1e-5 and c.torch_dtype == "bfloat16"
    # the model built from it rotates int(128 * 0.25) = 32 dims with theta 20000
    from nemotron.models import build_model

    with torch.device("meta"):
        model = build_model(c.replace(num_hidden_layers=1, vocab_size=16, hidden_size=64, intermediate_size=32))
    inv = model.inv_freq
    assert inv.shape == (16,)
    torch.testing.assert_close(inv, 1.0 / 20000 ** (torch.arange(0, 32, 2).float() / 32), rtol=0, atol=0)

    # the release layout written back reads to the same config
    out = c.to_hf()
    assert out["partial_rotary_factor"] == 0.25 and "rope_percent" not in out
    assert config_from_dict(out) == c
    assert config_from_dict(json.loads(json.dumps(out))) == c

    # the canonical key wins over the legacy alias when both are present
    both = dict(raw, partial_rotary_factor=0.5)
    assert config_from_dict(both).partial_rotary_factor == 0.5


def test_transformers5_config_layout_reads(hf_checkpoint):
    path, _ = hf_checkpoint
    raw = json.loads((path / "config.json").read_text())
    assert "rope_parameters" in raw  # transformers 5 folds rope_theta / partial_rotary_factor here
    c = nemotron.load_config(path)
    assert c.partial_rotary_factor == 0.5 and c.rope_theta == 10000.0 and c.head_dim == 24


def test_incremental_decoding_matches_full_forward(hf_checkpoint):
    path, _ = hf_checkpoint
    m = nemotron.load(path, dtype="float32")
    total, prefill = 20, 9
    ids = _ids(2, total, seed=5)
    with torch.no_grad():
        full = m.model(ids)
        cache = m.model.new_cache(2, total)
        steps = [m.model(ids[:, :prefill], cache=cache)]
        for i in range(prefill, total):
            steps.append(m.model(ids[:, i:i + 1], cache=cache))
    assert cache.seq_lens.tolist() == [total, total]
    inc = torch.cat(steps, dim=1)
    assert inc.shape == full.shape
    diff = (inc - full).abs().max().item()
    assert diff <= TOL, f"max |dlogit| incremental vs full {diff}"

    # a second multi-token chunk after the prefill (mask against cached keys) also agrees
    with torch.no_grad():
        cache = m.model.new_cache(2, total)
        a = m.model(ids[:, :5], cache=cache)
        b = m.model(ids[:, 5:14], cache=cache)
        c = m.model(ids[:, 14:], cache=cache)
    diff = (torch.cat([a, b, c], dim=1) - full).abs().max().item()
    assert diff <= TOL, f"max |dlogit| chunked vs full {diff}"


@pytest.mark.parametrize("theta,fraction", [(10000.0, 0.5), (1000.0, 0.75)])
def test_saved_checkpoint_loads_in_transformers(tmp_path, theta, fraction):
    from transformers import NemotronForCausalLM

    rope = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": fraction}
    path, hf = _make_hf_checkpoint(tmp_path / "hf", rope_parameters=rope)
    m = nemotron.load(path, dtype="float32")
    out = m.save(tmp_path / "ours")
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "nemotron" and saved["architectures"] == ["NemotronForCausalLM"]

    back = NemotronForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert back.config.head_dim == 24 and back.config.num_key_value_heads == 2
    assert back.config.rope_parameters["partial_rotary_factor"] == fraction
    assert back.config.rope_parameters["rope_theta"] == theta
    assert_saved_checkpoint_round_trips(hf, back, m, out, _ids(2, 17, seed=9), TOL)
