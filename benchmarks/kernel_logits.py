"""How far the CPU decode kernels move a quantized checkpoint's logits from the dequantizing reference.

Three decodes of the same 32-token prompt and 16 teacher-forced steps: the quantized checkpoint
through nemotron.kernels (the default on a CPU), the same checkpoint with the kernels off (each
layer's weight dequantized, the exact reference), and the unquantized checkpoint it came from (the
format's own rounding, for scale). Prints the largest logit difference and how many argmaxes agree.

    python benchmarks/kernel_logits.py --model DIR-NVFP4 --unquantized DIR [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

import torch

import nemotron
from nemotron import kernels
from nemotron.inference.steps import decode_step, prefill


def decode_logits(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    cache = model.new_cache(1, 64)
    prefill(model, torch.randint(3, 1024, (1, 32), generator=g), cache)
    steps = torch.randint(3, 1024, (16,), generator=g)
    return torch.stack([decode_step(model, t.view(1), cache).float().squeeze() for t in steps])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="a quantized (FP8 / NVFP4) checkpoint")
    parser.add_argument("--unquantized", required=True, help="the checkpoint it was quantized from")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit("the CPU kernels do not run here")
    with torch.inference_mode():
        model = nemotron.load(args.model, dtype=args.dtype).model
        fast = decode_logits(model)
        kernels._ENABLED = False                      # NEMOTRON_CPU_KERNELS=0 for the same loaded model
        reference = decode_logits(model)
        kernels._ENABLED = True
        unquantized = decode_logits(nemotron.load(args.unquantized, dtype=args.dtype).model)

    def compare(a: torch.Tensor, b: torch.Tensor) -> str:
        same = int((a.argmax(-1) == b.argmax(-1)).sum())
        return f"max |dlogit| {(a - b).abs().max().item():.3f}, the same argmax at {same} of {len(a)} steps"

    print(f"{args.dtype}, {kernels.ISA_NAMES[kernels.cpu_isa()]} kernels; logits up to {reference.abs().max().item():.2f}")
    print("kernels against the dequantizing reference:", compare(fast, reference))
    print("the dequantizing reference against the unquantized model:", compare(reference, unquantized))


if __name__ == "__main__":
    main()
