"""Peak memory of loading a >= 1 GB fp32 checkpoint: nemotron.load vs transformers from_pretrained.

Each loader runs in a fresh subprocess; the figure is the rise of the peak resident set (VmHWM)
over the resident set just before loading, divided by the checkpoint's size on disk.

    python benchmarks/load_memory.py [--size-gb 1.1] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, os
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
import torch
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
which, path = sys.argv[1], sys.argv[2]
if which == "transformers":
    from transformers import NemotronHForCausalLM
else:
    import nemotron
before = status("VmRSS:")
if which == "transformers":
    model = NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32)
else:
    model = nemotron.load(path, dtype=torch.float32).model
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"before": before, "peak": status("VmHWM:"), "after": status("VmRSS:"), "param_bytes": params}))
"""


def make_checkpoint(out: Path, size_gb: float) -> int:
    from nemotron.config import NemotronHConfig
    from nemotron.models.init import init_weights_
    from nemotron.io.checkpoint import save_checkpoint
    from nemotron.models import build_model

    from nemotron.models.info import count_params

    def config_for(layers: int) -> NemotronHConfig:
        # a Nemotron 3 Nano-like layout (Mamba / MoE pairs, one attention layer)
        return NemotronHConfig(
            hybrid_override_pattern=("ME" * layers)[:layers - 1] + "*", vocab_size=32000, hidden_size=1024,
            num_attention_heads=8, num_key_value_heads=2, head_dim=128, mamba_num_heads=32, mamba_head_dim=64,
            n_groups=4, ssm_state_size=64, n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=1024,
            moe_shared_expert_intermediate_size=2048, torch_dtype="float32",
        )

    base, per_layer = count_params(config_for(2))["total"], (count_params(config_for(4))["total"] - count_params(config_for(2))["total"]) / 2
    config = config_for(2 + max(0, int((size_gb * 1e9 / 4 - base) / per_layer) + 1))
    model = init_weights_(build_model(config), config)
    save_checkpoint(model, config, out)
    del model
    return sum(f.stat().st_size for f in out.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-gb", type=float, default=1.1)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        size = make_checkpoint(path, args.size_gb)
        print(f"checkpoint: {size / 1e9:.2f} GB of fp32 safetensors")
        results = {}
        for which in ("nemotron", "transformers"):
            rises = []
            for _ in range(args.runs):
                out = subprocess.run([sys.executable, "-c", CHILD, which, str(path)], capture_output=True, text=True,
                                     check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rises.append((r["peak"] - r["before"]) / size)
            results[which] = statistics.median(rises)
            print(f"{which:13s} peak RSS rise / checkpoint size: median {results[which]:.3f}  (runs: "
                  + ", ".join(f"{x:.3f}" for x in rises) + ")")
        print(f"ratio nemotron / transformers: {results['nemotron'] / results['transformers']:.2f}")


if __name__ == "__main__":
    main()
