"""Shared fixtures: tiny random checkpoints written by transformers' own `save_pretrained`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the suite's many short generations decode eagerly, the reference path: the compiled decode step is
# tested against it where it is named (tests/test_generate.py), and a long test would otherwise switch
# to it part-way under the default rule (nemotron.inference.steps.use_compiled_decode)
os.environ.setdefault("NEMOTRON_COMPILE", "0")

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture
def dequantizing_reference(monkeypatch):
    """Quantized layers on their dequantize-then-matmul reference path, the CPU decode kernels off
    (tests/test_quant_cpu.py measures the kernels against this path)."""
    from nemotron import kernels

    monkeypatch.setattr(kernels, "_ENABLED", False)


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Give every tensor (norm weights, A_log, D, dt_bias, router bias too) non-trivial random values so
    parity tests exercise every term."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            if name.endswith("A_log"):
                t.copy_(torch.rand(t.shape, generator=g) * 2 - 0.5)
            elif name.endswith("dt_bias"):
                t.copy_(torch.rand(t.shape, generator=g) * 2 - 2.0)
            elif name.endswith("norm.weight") or "layernorm" in name or name.endswith(("norm_f.weight", "enorm.weight", "hnorm.weight")):
                t.copy_(1.0 + 0.2 * torch.randn(t.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g))
            else:
                fan_in = t.shape[-1] if t.dim() > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) * scale / fan_in**0.5)
    return model


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """A transformers causal LM's fp32 logits, without its cache."""
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def assert_saved_checkpoint_round_trips(hf, back, loaded, out: Path, ids: torch.Tensor, tol: float) -> None:
    """Our save of `loaded` at `out`, read back by transformers as `back`: the same tensors and logits
    as the original transformers model `hf`, within `tol` of ours; our loader reads it identically."""
    import nemotron

    ref_sd = hf.state_dict()
    for name, t in back.state_dict().items():
        assert torch.equal(t, ref_sd[name]), name
    with torch.no_grad():
        ours = loaded.model(ids)
    diff_back = (hf_logits(back, ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff_back == 0.0, f"transformers logits from our save differ by {diff_back}"
    assert (ours - hf_logits(back, ids)).abs().max().item() <= tol
    again = nemotron.load(out, dtype="float32")
    assert again.config == loaded.config
    with torch.no_grad():
        assert torch.equal(again.model(ids), ours)


def disable_hf_dt_clamp_(model: torch.nn.Module) -> torch.nn.Module:
    """transformers 5 clamps dt to >= time_step_min (0.001, inherited from Zamba2) in prefill; NVIDIA's
    remote code, mamba_ssm and vLLM apply no clamp (time_step_limit = (0, inf)), and neither do we.
    Parity is checked on the path where both agree: the reference's clamp switched off."""
    for module in model.modules():
        if hasattr(module, "time_step_limit"):
            module.time_step_limit = (0.0, float("inf"))
    return model


def tiny_nemotron_h_kwargs(**overrides):
    kw = dict(
        vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16,
        conv_kernel=4, chunk_size=8, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        moe_shared_expert_intermediate_size=48, routed_scaling_factor=2.5,
        layers_block_type=["linear_attention", "mlp", "full_attention", "linear_attention", "mlp"],
        eos_token_id=2, bos_token_id=1, pad_token_id=0,
    )
    kw.update(overrides)
    return kw


@pytest.fixture
def make_hf_nemotron_h(tmp_path):
    """Build a transformers NemotronHForCausalLM, randomise it, save_pretrained; return (dir, hf_model)."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    def make(name: str = "ckpt", seed: int = 0, **overrides):
        torch.manual_seed(seed)
        cfg = NemotronHConfig(**tiny_nemotron_h_kwargs(**overrides))
        model = randomize_(NemotronHForCausalLM(cfg), seed).eval()
        disable_hf_dt_clamp_(model)
        out = tmp_path / name
        model.save_pretrained(out)
        return out, model

    return make


@pytest.fixture(scope="session")
def scripted_checkpoint(tmp_path_factory):
    """The scripted checkpoint (tests/scripted.py), trained once per session for every module that serves it."""
    from scripted import make_scripted_checkpoint

    return make_scripted_checkpoint(tmp_path_factory.mktemp("scripted"))
