"""Prefill and greedy-decode speed on CPU: nemotron vs transformers on the same random checkpoint.

A small Nemotron 3-shaped model (Mamba-2, attention, LatentMoE) in fp32; prefill of a batch of
prompts, then greedy decoding with each library's own cache. Reports medians of several runs and
the ratio (transformers time / ours time: > 1 means we are faster). Also checks both pick the same
tokens.

    python benchmarks/forward_speed.py [--runs 5] [--prompt 512] [--new 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402


def timed(fn, runs: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--new", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)

    from transformers import NemotronHForCausalLM

    import nemotron
    from nemotron.checkpoint import save_checkpoint
    from nemotron.config import NemotronHConfig
    from nemotron.generate import greedy_generate, prefill
    from nemotron.init import init_weights_
    from nemotron.models import build_model

    config = NemotronHConfig(
        hybrid_override_pattern="MEM*EMEM*E", vocab_size=32000, hidden_size=768, num_attention_heads=12,
        num_key_value_heads=2, head_dim=64, mamba_num_heads=24, mamba_head_dim=64, n_groups=4,
        ssm_state_size=64, chunk_size=128, n_routed_experts=32, num_experts_per_tok=4,
        moe_intermediate_size=512, moe_latent_size=384, moe_shared_expert_intermediate_size=1024,
        routed_scaling_factor=2.5, time_step_min=0.001, torch_dtype="float32",
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp)
        save_checkpoint(init_weights_(build_model(config), config), config, path)
        ours = nemotron.load(path).model
        hf = NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for m in hf.modules():  # the official path has no dt clamp (see README); same math for both
            if hasattr(m, "time_step_limit"):
                m.time_step_limit = (0.0, float("inf"))
    ids = torch.randint(0, config.vocab_size, (args.batch, args.prompt))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {args.batch}, "
          f"prompt {args.prompt}, {args.new} new tokens, fp32")

    def ours_prefill():
        cache = ours.new_cache(args.batch, args.prompt)
        return prefill(ours, ids, cache)

    def hf_prefill():
        with torch.inference_mode():
            return hf(ids, logits_to_keep=1).logits[:, -1]

    def ours_generate():
        return greedy_generate(ours, ids, args.new)

    def hf_generate():
        with torch.inference_mode():
            return hf.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                               pad_token_id=0)[:, args.prompt:]

    rows = []
    for name, a, b in (("prefill", ours_prefill, hf_prefill), ("prefill + greedy decode", ours_generate, hf_generate)):
        a(), b()  # warm-up
        ta, oa = timed(a, args.runs)
        tb, ob = timed(b, args.runs)
        rows.append((name, ta, tb))
        same = torch.equal(oa, ob) if oa.dtype == torch.long else (oa - ob).abs().max().item() < 1e-3
        print(f"{name:24s} nemotron {ta * 1000:8.1f} ms   transformers {tb * 1000:8.1f} ms   "
              f"ratio {tb / ta:5.2f}x   same output: {same}")
    _, prefill_ours, prefill_hf = rows[0]
    decode_ours = (rows[1][1] - prefill_ours) / args.new
    decode_hf = (rows[1][2] - prefill_hf) / args.new
    print(f"{'decode per token':24s} nemotron {decode_ours * 1000:8.1f} ms   transformers {decode_hf * 1000:8.1f} ms   "
          f"ratio {decode_hf / decode_ours:5.2f}x")


if __name__ == "__main__":
    main()
