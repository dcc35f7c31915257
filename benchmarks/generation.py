"""Generation speed on CPU (fp32): nemotron vs transformers on the same random checkpoints.

* prefill tokens/s at 512 and 2048 tokens (transformers' PyTorch path: no mamba_ssm kernels on CPU);
* decode tokens/s at batch 1 and 8: our engine vs transformers `generate` (greedy, same prompts,
  both with their own cache; the outputs are checked to be identical);
* peak memory: the rise of the peak RSS of a fresh process over its RSS before the run;
* decode roofline on a >= 100M-parameter dense config: weight bytes read per token divided by the
  copy bandwidth measured in the same run (bytes copied per second by `dst.copy_(src)` on a buffer
  the size of the weights; read-only streaming is reported beside it).

Each library runs in its own subprocess per measurement, so one's allocations and caches do not
colour the other's. Medians of --runs repetitions.

    python benchmarks/generation.py [--runs 3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIGS = {
    # Nemotron 3 Nano scaled to hidden 256: its first 8 layers (MEMEM*EM), Mamba heads/groups = 8,
    # state 128, chunk 128; LatentMoE with 32 experts, 6 per token.
    "small-moe": dict(
        hybrid_override_pattern="MEMEM*EM", vocab_size=4096, hidden_size=256, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, mamba_num_heads=16, mamba_head_dim=32, n_groups=2,
        ssm_state_size=128, chunk_size=128, n_routed_experts=32, num_experts_per_tok=6,
        moe_intermediate_size=128, moe_latent_size=128, moe_shared_expert_intermediate_size=256,
        routed_scaling_factor=2.5, torch_dtype="float32",
    ),
    # a dense hybrid (Nemotron-H layout) of ~146M parameters for the bandwidth roofline
    "dense-146m": dict(
        hybrid_override_pattern="M-M*M-M-M*M-", vocab_size=32000, hidden_size=1024, num_attention_heads=16,
        num_key_value_heads=4, head_dim=64, mamba_num_heads=32, mamba_head_dim=64, n_groups=4,
        ssm_state_size=64, chunk_size=128, intermediate_size=4096, torch_dtype="float32",
    ),
}

CHILD = r"""
import json, os, sys, time, statistics
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
import torch
torch.manual_seed(0)

def rss(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

which, path, task, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
args = json.loads(sys.argv[5])
if which == "transformers":
    from transformers import NemotronHForCausalLM
    model = NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for m in model.modules():  # the official path has no dt clamp; compare on the same math
        if hasattr(m, "time_step_limit"):
            m.time_step_limit = (0.0, float("inf"))
    vocab = model.config.vocab_size
else:
    import nemotron
    from nemotron.inference.engine import Engine
    from nemotron.inference.requests import Request
    from nemotron.inference.steps import prefill
    from nemotron.inference.sampling import SamplingParams
    model = nemotron.load(path).model
    vocab = model.config.vocab_size
g = torch.Generator().manual_seed(1)
before = rss("VmRSS:")
out = {}

def timed(fn):
    t = time.perf_counter(); fn(); out["first_call_s"] = time.perf_counter() - t  # compiles, if any
    times = []
    for _ in range(runs):
        t = time.perf_counter(); result = fn(); times.append(time.perf_counter() - t)
    return statistics.median(times), result

if task == "prefill":
    ids = torch.randint(0, vocab, (1, args["tokens"]), generator=g)
    if which == "transformers":
        def run():
            with torch.inference_mode():
                return model(ids, logits_to_keep=1).logits[:, -1]
    else:
        def run():
            cache = model.new_cache(1, args["tokens"])
            return prefill(model, ids, cache, chunk=args["tokens"])
    seconds, logits = timed(run)
    out |= {"seconds": seconds, "tokens_per_s": args["tokens"] / seconds, "logits": logits[0, :8].tolist()}
else:
    batch, prompt, new = args["batch"], args["prompt"], args["new"]
    prompts = torch.randint(0, vocab, (batch, prompt), generator=g)
    if which == "transformers":
        def run():
            with torch.inference_mode():
                return model.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                      pad_token_id=0)[:, prompt:].tolist()
    else:
        def run():
            reqs = [Request(p, SamplingParams(max_new_tokens=new, temperature=0)) for p in prompts.tolist()]
            list(Engine.for_requests(model, reqs, compile=which == "nemotron-compiled").run(reqs))
            return [r.output_ids for r in reqs]
    seconds, tokens = timed(run)
    out |= {"seconds": seconds, "tokens_per_s": batch * new / seconds, "tokens": tokens}
    if args.get("roofline"):
        weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                      if "embed" not in n)  # a decode step reads one embedding row, every other weight
        src = torch.randn(weights // 4); dst = torch.empty_like(src)

        def rate(fn):  # median of 9 single passes
            fn()
            samples = []
            for _ in range(9):
                t = time.perf_counter(); fn(); samples.append(time.perf_counter() - t)
            return weights / statistics.median(samples)

        # the machine's bandwidth drifts by tens of percent between seconds: each decode run is
        # paired with a copy-bandwidth measurement taken right after it, and the fractions' median kept
        fractions, copy_bws, read_bws = [], [], []
        for _ in range(runs):
            t = time.perf_counter(); run(); per_token = (time.perf_counter() - t) / new
            copy_bws.append(rate(lambda: dst.copy_(src))); read_bws.append(rate(lambda: src.sum()))
            fractions.append((weights / per_token / copy_bws[-1], weights / per_token / read_bws[-1]))
        out.update(weight_bytes=weights, copy_bw=copy_bws, read_bw=read_bws,
                   copy_fraction=statistics.median(f[0] for f in fractions),
                   read_fraction=statistics.median(f[1] for f in fractions))
out["peak_rss_rise"] = rss("VmHWM:") - before
print(json.dumps(out))
"""


def build(config_name: str, out: Path) -> Path:
    from nemotron.io.checkpoint import save_checkpoint
    from nemotron.config import NemotronHConfig
    from nemotron.models.init import init_weights_
    from nemotron.models import build_model

    config = NemotronHConfig(**CONFIGS[config_name])
    save_checkpoint(init_weights_(build_model(config), config, seed=0), config, out)
    return out


def child(which: str, path: Path, task: str, runs: int, **args) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, which, str(path), task, str(runs), json.dumps(args)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer tokens (a smoke run)")
    args = parser.parse_args()
    new = 16 if args.quick else 64
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        small = build("small-moe", Path(tmp) / "small")
        dense = build("dense-146m", Path(tmp) / "dense")
        print("config small-moe: hidden 256, 8 layers (MEMEM*EM, Nano 3's first 8), LatentMoE 32 experts top-6; fp32, "
              f"torch threads {os.cpu_count()}")
        for tokens in (512, 2048):
            ours = child("nemotron", small, "prefill", args.runs, tokens=tokens)
            theirs = child("transformers", small, "prefill", args.runs, tokens=tokens)
            rows.append((f"prefill {tokens} tokens (tok/s)", ours, theirs))
        for batch in (1, 8):
            theirs = child("transformers", small, "decode", args.runs, batch=batch, prompt=32, new=new)
            for which in ("nemotron", "nemotron-compiled"):
                ours = child(which, small, "decode", args.runs, batch=batch, prompt=32, new=new)
                assert ours["tokens"] == theirs["tokens"], "greedy outputs differ"
                # the default rule decodes eagerly for a model's first seconds, then compiled
                label = " eager" if which == "nemotron" else f" compiled ({ours['first_call_s']:.0f} s first call)"
                rows.append((f"prompt 32 + decode {new}, batch {batch}{label} (tok/s)", ours, theirs))
        print(f"\n{'':62s} {'nemotron':>10s} {'transformers':>13s} {'ratio':>7s} {'peak RSS rise (MB) ours/theirs':>32s}")
        for name, ours, theirs in rows:
            print(f"{name:62s} {ours['tokens_per_s']:10.0f} {theirs['tokens_per_s']:13.0f} "
                  f"{ours['tokens_per_s'] / theirs['tokens_per_s']:6.2f}x "
                  f"{ours['peak_rss_rise'] / 2**20:20.0f} / {theirs['peak_rss_rise'] / 2**20:.0f}")
        roof = child("nemotron", dense, "decode", args.runs, batch=1, prompt=32, new=new, roofline=True)
        per_token = roof["seconds"] / new
        print(f"\nconfig dense-146m: decode batch 1 {roof['tokens_per_s']:.1f} tok/s; "
              f"weights read per token {roof['weight_bytes'] / 1e6:.0f} MB -> {roof['weight_bytes'] / per_token / 1e9:.1f} GB/s")
        print(f"copy bandwidth {min(roof['copy_bw']) / 1e9:.1f}-{max(roof['copy_bw']) / 1e9:.1f} GB/s (bytes copied "
              f"per second), read-only streaming {min(roof['read_bw']) / 1e9:.1f}-{max(roof['read_bw']) / 1e9:.1f} GB/s")
        print(f"roofline fraction (median over runs, each run against the bandwidth measured right after it): "
              f"{roof['copy_fraction']:.2f} of copy bandwidth, {roof['read_fraction']:.2f} of read bandwidth "
              "(prefill of the 32-token prompt included in the time)")

if __name__ == "__main__":
    main()
