"""nemotron_h against transformers' NemotronHForCausalLM on tiny random checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

import nemotron
from nemotron.io.checkpoint import save_checkpoint

from conftest import disable_hf_dt_clamp_

DENSE = ["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"]
MOE = ["linear_attention", "moe", "full_attention", "linear_attention", "moe"]
VARIANTS = {
    "dense-hybrid": dict(layers_block_type=DENSE),
    "hybrid-moe": dict(layers_block_type=MOE),
    "latent-moe": dict(layers_block_type=MOE, moe_latent_size=32),
    "latent-moe-grouped": dict(layers_block_type=MOE, moe_latent_size=32, n_group=4, topk_group=2),
}


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_transformers(make_hf_nemotron_h, variant):
    path, hf = make_hf_nemotron_h(**VARIANTS[variant])
    ours = nemotron.load(path)
    assert ours.config.hybrid_override_pattern == "".join(
        {"linear_attention": "M", "mlp": "-", "full_attention": "*", "moe": "E"}[t]
        for t in VARIANTS[variant]["layers_block_type"])
    g = torch.Generator().manual_seed(1)
    for length in (16, 13):  # chunk_size is 8: a multiple and not
        ids = torch.randint(0, 96, (3, length), generator=g)
        diff = (_logits(hf, ids) - _logits(ours.model, ids)).abs().max().item()
        assert diff <= 1e-4, (variant, length, diff)


def test_transformers_dt_clamp_is_a_deviation(make_hf_nemotron_h):
    """transformers clamps dt >= time_step_min in prefill; the official kernels do not. With a large
    time_step_min the clamp bites: the reference with its clamp differs from us, without it equals us."""
    path, hf = make_hf_nemotron_h(time_step_min=0.5, time_step_max=0.9)
    ours = nemotron.load(path)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    unclamped = _logits(hf, ids)
    for m in hf.modules():
        if hasattr(m, "time_step_limit"):
            m.time_step_limit = (0.5, float("inf"))
    clamped = _logits(hf, ids)
    mine = _logits(ours.model, ids)
    assert (unclamped - mine).abs().max() <= 1e-4
    assert (clamped - mine).abs().max() > 1e-3


def test_release_layout_config_with_legacy_aliases(make_hf_nemotron_h, tmp_path):
    """NVIDIA's release config (hybrid_override_pattern, mamba_* aliases) reads like transformers 5's."""
    path, hf = make_hf_nemotron_h(**VARIANTS["latent-moe"])
    raw = json.loads((path / "config.json").read_text())
    layers = raw.pop("layers_block_type")
    raw.pop("mtp_layers_block_type")
    raw["hybrid_override_pattern"] = "".join({"linear_attention": "M", "moe": "E", "full_attention": "*", "mlp": "-"}[t] for t in layers)
    raw["num_hidden_layers"] = len(layers)
    raw["mamba_n_groups"] = raw.pop("n_groups")
    raw["mamba_d_conv"] = raw.pop("conv_kernel")
    raw["mamba_chunk_size"] = raw.pop("chunk_size")
    raw["attention_head_dim"] = raw.pop("head_dim")
    raw["time_step_limit"] = [0.0, float("inf")]
    (path / "config.json").write_text(json.dumps(raw))
    ours = nemotron.load(path)
    c = ours.config
    assert (c.n_groups, c.conv_kernel, c.chunk_size, c.head_dim) == (2, 4, 8, 16)
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    assert (_logits(hf, ids) - _logits(ours.model, ids)).abs().max() <= 1e-4


def test_config_round_trip_keeps_unknown_keys():
    raw = {"model_type": "nemotron_h", "hybrid_override_pattern": "M*-E", "hidden_size": 64,
           "vocab_size": 100, "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig"},
           "rope_theta": 10000, "mamba_n_groups": 4, "time_step_limit": [0.0, {"__float__": "Infinity"}]}
    config = nemotron.config_from_dict(raw)
    out = config.to_hf()
    assert out["auto_map"] == raw["auto_map"] and out["rope_theta"] == 10000
    assert out["hybrid_override_pattern"] == "M*-E" and out["num_hidden_layers"] == 4
    assert out["n_groups"] == 4 and "mamba_n_groups" not in out
    assert out["time_step_limit"] == [0.0, float("inf")]
    assert nemotron.config_from_dict(out) == config
    assert nemotron.config_from_dict(config.to_transformers()) == config


def test_prefill_state_continues_exactly(make_hf_nemotron_h):
    """A prefill's conv/SSM/KV state handed to the recurrent step (and to a further chunked prefill)
    gives the same logits as one longer prefill."""
    path, _ = make_hf_nemotron_h(**VARIANTS["latent-moe"])
    model = nemotron.load(path).model
    ids = torch.randint(0, 96, (2, 23), generator=torch.Generator().manual_seed(3))
    full = _logits(model, ids)
    cache = model.new_cache(batch=2, max_len=32)
    with torch.no_grad():
        parts = [model(ids[:, :5], cache), model(ids[:, 5:19], cache)]  # 5 then 14: crosses chunk edges
        parts += [model(ids[:, t:t + 1], cache) for t in range(19, 23)]  # recurrent single steps
    stepped = torch.cat(parts, dim=1)
    assert cache.seq_lens.tolist() == [23, 23]
    assert (full - stepped).abs().max() <= 1e-4
    assert cache.kv_bytes_per_token == 2 * 2 * 16 * 4  # one attention layer, k+v, 2 kv heads x 16, fp32
    conv_dim = 64 + 2 * 2 * 16
    assert cache.mamba_bytes_per_sequence == 2 * (conv_dim * 3 * 4 + 8 * 8 * 16 * 4)


def test_saved_checkpoint_loads_in_transformers(make_hf_nemotron_h, tmp_path):
    from transformers import NemotronHForCausalLM

    path, hf = make_hf_nemotron_h(**VARIANTS["latent-moe-grouped"])
    ours = nemotron.load(path)
    out = ours.save(tmp_path / "saved")
    config = json.loads((out / "config.json").read_text())
    assert config["hybrid_override_pattern"] == "ME*ME" and "layers_block_type" not in config
    reloaded = disable_hf_dt_clamp_(NemotronHForCausalLM.from_pretrained(out).eval())
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(reloaded, ids), _logits(hf, ids))
    assert torch.equal(_logits(nemotron.load(out).model, ids), _logits(ours.model, ids))


def test_sharded_checkpoint(make_hf_nemotron_h, tmp_path):
    from transformers import NemotronHForCausalLM

    path, hf = make_hf_nemotron_h(**VARIANTS["hybrid-moe"])
    ours = nemotron.load(path)
    out = save_checkpoint(ours.model, ours.config, tmp_path / "sharded", max_shard_bytes=40_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file()
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(nemotron.load(out).model, ids), _logits(ours.model, ids))
    reloaded = disable_hf_dt_clamp_(NemotronHForCausalLM.from_pretrained(out).eval())
    assert torch.equal(_logits(reloaded, ids), _logits(hf, ids))


def test_bf16_load_keeps_router_bias_fp32(make_hf_nemotron_h):
    path, hf = make_hf_nemotron_h(**VARIANTS["hybrid-moe"])
    m = nemotron.load(path, dtype="bfloat16").model
    assert m.lm_head.weight.dtype == torch.bfloat16
    assert m.backbone.layers[1].mixer.gate.e_score_correction_bias.dtype == torch.float32
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _logits(hf, ids)
    diff = (_logits(m, ids) - ref).abs().max().item()
    assert diff < 0.05 * ref.abs().max().item()


def _mtp_config(**overrides):
    raw = dict(model_type="nemotron_h", hybrid_override_pattern="M*E", mtp_hybrid_override_pattern="*E",
               num_nextn_predict_layers=1, vocab_size=96, hidden_size=64, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=8, n_groups=2,
               ssm_state_size=16, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2,
               moe_intermediate_size=32, moe_shared_expert_intermediate_size=48, moe_latent_size=32,
               routed_scaling_factor=2.0)
    raw.update(overrides)
    return nemotron.config_from_dict(raw)


def test_mtp_weights_release_layout_and_forward(tmp_path):
    """MTP tensors use the release names and load back; transformers ignores them; one MTP depth equals
    its written-out math (enorm(embed(next)), hnorm(h), eh_proj, attention block, MoE block, final norm)."""
    from conftest import randomize_
    from nemotron.models import build_model
    from transformers import NemotronHForCausalLM

    config = _mtp_config()
    model = randomize_(build_model(config), seed=5).eval()
    out = save_checkpoint(model, config, tmp_path / "mtp")
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    for name in ("mtp.layers.0.enorm.weight", "mtp.layers.0.hnorm.weight", "mtp.layers.0.eh_proj.weight",
                 "mtp.layers.0.mixer.q_proj.weight", "mtp.layers.1.final_layernorm.weight",
                 "mtp.layers.1.mixer.experts.7.up_proj.weight", "mtp.layers.1.mixer.gate.e_score_correction_bias"):
        assert name in names, name
    loaded = nemotron.load(out).model
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = loaded.hidden_states(ids)
        logits, h2 = loaded.mtp_forward(h[:, :-1], ids[:, 1:])
        layers = loaded.mtp.layers
        x = layers[0].eh_proj(torch.cat([layers[0].enorm(loaded.backbone.embeddings(ids[:, 1:])),
                                         layers[0].hnorm(h[:, :-1])], -1))
        x = x + layers[0].mixer(layers[0].norm(x))
        x = x + layers[1].mixer(layers[1].norm(x))
        expect = loaded.lm_head(layers[1].final_layernorm(x))
    assert torch.allclose(logits, expect, atol=1e-5) and logits.shape == (2, 6, 96)
    hf = disable_hf_dt_clamp_(NemotronHForCausalLM.from_pretrained(out).eval())
    assert (_logits(hf, ids) - _logits(loaded, ids)).abs().max() <= 1e-4


def test_greedy_decoding_matches_transformers_generate(make_hf_nemotron_h):
    """Prefill + recurrent decode through our hybrid cache picks the same tokens as transformers'
    generate() with its own cache."""
    from nemotron.inference.steps import greedy_generate

    path, hf = make_hf_nemotron_h(**VARIANTS["latent-moe"])
    ours = nemotron.load(path).model
    prompt = torch.randint(3, 96, (2, 11), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0,
                          min_new_tokens=12)[:, 11:]
    mine = greedy_generate(ours, prompt, 12)
    assert torch.equal(mine, ref), (mine, ref)
