"""One expert dispatch (nemotron.layers.moe.dispatch) for three weight sources: dense experts,
quantized experts and an expert-parallel shard (2 gloo processes) each equal a plain per-token
reference on random inputs, through every kernel that applies."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from nemotron import kernels
from nemotron.layers.moe import MoE, Experts, choose_kernel, route
from nemotron.quant.modules import QuantExperts, QuantScheme

E, X, I, K = 8, 32, 64, 3


def _experts(seed: int = 0) -> Experts:
    g = torch.Generator().manual_seed(seed)
    ex = Experts(E, X, I)
    with torch.no_grad():
        ex.up_proj.copy_(torch.randn(ex.up_proj.shape, generator=g) * 0.2)
        ex.down_proj.copy_(torch.randn(ex.down_proj.shape, generator=g) * 0.2)
    return ex


def _inputs(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, X, generator=g)
    weights, idx = route(torch.randn(tokens, E, generator=g), torch.zeros(E), top_k=K)
    return x, idx, weights


def _reference(up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, idx: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: sum_j w_j down_e relu(up_e x)^2."""
    rows = []
    for t in range(x.shape[0]):
        y = torch.zeros(x.shape[1])
        for w, e in zip(weights[t].tolist(), idx[t].tolist()):
            y += w * (down[e] @ torch.relu(up[e] @ x[t]).square())
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("tokens", [1, 4, 40])
def test_dense_experts_match_reference(tokens):
    ex = _experts()
    x, idx, weights = _inputs(tokens, seed=tokens)
    ref = _reference(ex.up_proj.detach(), ex.down_proj.detach(), x, idx, weights)
    methods = [None, "gather", "loop", "grouped"] + (["single"] if tokens == 1 else [])
    with torch.no_grad():
        # fp32 decode on AVX-512 multiplies the stored experts through nemotron.kernels
        fp32_kernels = kernels.available() and kernels.cpu_isa() != kernels.AVX2 and tokens < kernels.MAX_ROWS
        assert (choose_kernel(ex, x, tokens, K) == "indexed") == fp32_kernels
        for method in methods + (["indexed"] if fp32_kernels else []):
            assert (ex(x, idx, weights, method=method) - ref).abs().max() <= 1e-5, method
    y = ex(x, idx, weights)                           # with autograd (the training paths)
    assert (y.detach() - ref).abs().max() <= 1e-5


@pytest.mark.skipif(not kernels.available(), reason="the CPU kernels do not run here")
@pytest.mark.parametrize("tokens", [1, 4])
def test_bf16_experts_through_the_cpu_kernels(tokens):
    """bf16 decode multiplies each (token, expert) row by its expert's weight where it is stored
    ("indexed", nemotron.kernels), as the sorted per-expert loop does, within bf16's rounding."""
    ex = _experts().bfloat16()
    x, idx, weights = _inputs(tokens, seed=tokens)
    x = x.bfloat16()
    ref = _reference(ex.up_proj.detach().double(), ex.down_proj.detach().double(), x.double(), idx, weights.double())
    with torch.no_grad():
        assert choose_kernel(ex, x, tokens, K) == "indexed"
        for method in ("indexed", "loop"):
            y = ex(x, idx, weights, method=method)
            assert y.dtype == torch.bfloat16
            assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2 ** -6, method


def _quantized(algo: str, tokens: int):
    """Quantized experts, inputs for `tokens` tokens, and the reference on their dequantized weights."""
    q = QuantExperts.from_experts(_experts(), QuantScheme(algo),
                                  {"up_proj": torch.full((E,), 3.0), "down_proj": torch.full((E,), 3.0)})
    up = torch.stack([q.expert_weight("up_proj", e) for e in range(E)])
    down = torch.stack([q.expert_weight("down_proj", e) for e in range(E)])
    x, idx, weights = _inputs(tokens, seed=tokens)
    return q, x, idx, weights, _reference(up, down, x, idx, weights)


@pytest.mark.parametrize("algo", ["NVFP4", "FP8", "FP8_PB_WO"])
@pytest.mark.parametrize("tokens", [1, 4, 40])
def test_quantized_experts_match_reference(algo, tokens, monkeypatch):
    """The dequantizing kernels (the CPU kernels off: test below)."""
    monkeypatch.setattr(kernels, "_ENABLED", False)
    q, x, idx, weights, ref = _quantized(algo, tokens)
    expected = "gather" if tokens * K <= 16 and algo != "FP8_PB_WO" else "loop"
    assert choose_kernel(q, x, tokens, K) == expected
    with torch.no_grad():
        for method in (None, "loop") + (("gather",) if algo != "FP8_PB_WO" else ()):
            assert (q(x, idx, weights, method=method) - ref).abs().max() <= 1e-5, method


@pytest.mark.skipif(not kernels.available(), reason="the CPU kernels do not run here")
@pytest.mark.parametrize("algo", ["NVFP4", "FP8", "FP8_PB_WO"])
@pytest.mark.parametrize("tokens", [1, 4, 40])
def test_quantized_experts_through_the_cpu_kernels(algo, tokens):
    """On a CPU, decode (up to 16 tokens) multiplies each (token, expert) row by its expert's stored
    weight through nemotron.kernels in two calls ("indexed"); 40 tokens are grouped by expert and
    each expert's rows (fewer than 16) go through the same kernels. NVFP4 and FP8 read exactly
    the dequantized weights; NVFP4's activations are rounded to int8 per block of 16, and on
    AVX512-BF16 FP8's to bf16 (nemotron.quant.cpu).
    FP8's 128x128 blocks do not split these 32 and 64 columns evenly: that one decodes its weight."""
    q, x, idx, weights, ref = _quantized(algo, tokens)
    with torch.no_grad():
        method = choose_kernel(q, x, tokens, K)
        y = q(x, idx, weights)
    packs = {proj: q._packs(proj) for proj in ("up_proj", "down_proj")}
    if algo == "FP8_PB_WO":
        assert packs == {"up_proj": None, "down_proj": None} and method == "loop"
    else:
        assert method == ("indexed" if tokens <= 16 else "loop")
    rounded = any(p is not None and p.kind.endswith(("_bf16", "_i8")) for p in packs.values())
    error = ((y - ref).norm() / ref.norm()).item()
    assert error <= (1e-2 if rounded else 1e-6), error


def _ep_worker(rank: int, world: int, init: str, result: str) -> None:
    import torch.distributed as dist

    from nemotron.train.parallel import apply_ep

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        moe = MoE(X, E, K, I, shared_intermediate_size=0)
        full = _experts()
        with torch.no_grad():
            moe.experts.up_proj.copy_(full.up_proj)
            moe.experts.down_proj.copy_(full.down_proj)
        apply_ep(moe)
        worst = 0.0
        for tokens in (1, 5, 37):                         # each rank routes its own tokens
            x, idx, weights = _inputs(tokens, seed=100 * tokens + rank)
            ref = _reference(full.up_proj.detach(), full.down_proj.detach(), x, idx, weights)
            with torch.no_grad():
                worst = max(worst, (moe.experts(x, idx, weights) - ref).abs().max().item())
            xg = x.clone().requires_grad_()             # autograd through both all-to-alls
            y = moe.experts(xg, idx, weights)
            y.square().sum().backward()
            xr = x.clone().requires_grad_()
            y_ref = full(xr, idx, weights, method="loop")
            y_ref.square().sum().backward()
            worst = max(worst, (y.detach() - ref).abs().max().item(), (xg.grad - xr.grad).abs().max().item())
        if rank == 0:
            with open(result, "w") as f:
                f.write(str(worst))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_expert_parallel_shard_matches_reference(tmp_path):
    result = tmp_path / "result.txt"
    mp.spawn(_ep_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", str(result)), nprocs=2, join=True)
    assert float(result.read_text()) <= 1e-5
