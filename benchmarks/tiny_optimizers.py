"""What the optimizer buys the tiny recipe's pretraining: AdamW against Muon (the hidden matrices on
Muon, the rest on AdamW) for the same steps, data and seed.

Each run is the trainer itself (`nemotron.train.train`, the recipe's pretraining settings: bf16
autocast where the CPU has it, rows of 512 packed first-fit, 16 a step, warmup then warmup-stable-decay)
on the embedded model's architecture, freshly initialised, over the recipe's conversations rendered
with the shipped tokenizer. After training, each model scores the assistant turns (reasoning and
answer, reasoning on) of questions of forms held out of training, per family: the mean cross-entropy
per token, lower is better. Reported beside it: the median tokens/s of each run's steps (the runs
follow one another, not alternated: a rough figure).

    python benchmarks/tiny_optimizers.py [--steps 100] [--problems 20000] [--muon-lr 0.02]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_training import write_data  # noqa: E402

from nemotron import kernels
from nemotron.api import load
from nemotron.tiny import MODEL_DIR
from nemotron.tiny.tasks import conversation, problems
from nemotron.train import load_recipe, train
from nemotron.train.data import chat_example

FAMILIES = ("arithmetic2", "arithmetic", "word", "units", "counting")


def held_out_loss(model_dir: Path, per_family: int) -> dict[str, float]:
    m = load(model_dir)
    model, tokenizer = m.model.eval(), m.tokenizer
    out = {}
    for family in FAMILIES:
        total = count = 0.0
        for p in problems(per_family, "eval", 7, (family,), held_out_forms=True):
            for ex in chat_example(tokenizer, conversation(p, "think")):
                ids = torch.tensor([ex.ids])
                with torch.no_grad():
                    logits = model(ids).float()[0, :-1]
                scored = torch.tensor(ex.targets[1:])
                ce = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
                total += float(ce[scored].sum())
                count += int(scored.sum())
        out[family] = total / count
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--problems", type=int, default=20000)
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW's (and, under muon, the non-matrix parameters')")
    parser.add_argument("--muon-lr", type=float, default=0.02)
    parser.add_argument("--per-family", type=int, default=24, help="held-out questions scored per family")
    args = parser.parse_args()
    autocast = "bfloat16" if kernels.cpu_isa() == kernels.AVX512_BF16 else "none"
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        data, config = write_data(Path(tmp), args.problems)
        for name, extra in (("adamw", ["optimizer=adamw"]), ("muon", ["optimizer=muon", f"muon_lr={args.muon_lr}"])):
            out = Path(tmp) / name
            cfg = load_recipe(None, [f"data=[{data}]", f"init_config={config}", f"tokenizer={MODEL_DIR}", "seq_len=512",
                                     "batch_size=16", f"autocast={autocast}", "packing=first_fit", f"steps={args.steps}",
                                     f"lr={args.lr}", "min_lr=1e-4", f"warmup={max(1, args.steps // 20)}", "seed=0",
                                     "save_every=100000", "resume=false", f"out_dir={out}", *extra], "pretrain")
            train(cfg, progress=True)
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            results[name] = dict(loss=held_out_loss(out / "final", args.per_family),
                                 train_loss=statistics.mean(r["loss"] for r in records[-5:]),
                                 tokens_per_s=statistics.median(r["tokens_per_s"] for r in records[1:]))
    print(f"tiny model pretraining, {args.steps} steps of 16 x 512 tokens, autocast {autocast}, AdamW lr {args.lr}, "
          f"Muon lr {args.muon_lr}; held-out-form cross-entropy per assistant token, {args.per_family} questions a family")
    print("| optimizer | " + " | ".join(FAMILIES) + " | training loss, last 5 steps | tokens/s |")
    print("|---|" + "---|" * (len(FAMILIES) + 2))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r['loss'][f]:.3f}" for f in FAMILIES)
              + f" | {r['train_loss']:.3f} | {r['tokens_per_s']:,.0f} |")
    a, m = results["adamw"]["loss"], results["muon"]["loss"]
    print("muon / adamw cross-entropy: " + ", ".join(f"{f} {m[f] / a[f]:.2f}x" for f in FAMILIES))


if __name__ == "__main__":
    main()
