"""The tiny recipe's pretraining step on CPU: fp32 against bf16 autocast, rows of 1024 against 512
tokens (the same 8,192 tokens a step), rows packed first-fit (the trainer's way) against greedily
(an example goes in the last row or starts a new one), alternated in one process.

The step is the trainer's own (`make_stage(...).step`, gradient clipping, AdamW) on the embedded
model's architecture, freshly initialised, over the recipe's conversations (procedural tasks rendered
with the shipped tokenizer and chat template, packed). Each setting has its own model and data
stream; the settings take turns, step by step, so a slow phase of the machine falls on all of them.
Reported: the median tokens/s of each (every position of the rows, padding included), the median
scored tokens/s (the positions that carry a loss: what the step learns from), their ratios to fp32 at
1024 packed greedily, and the mean loss of the last steps (bf16 should learn as fp32 does).

    python benchmarks/tiny_training.py [--steps 8] [--problems 3000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nemotron.config import save_config
from nemotron.io.tokenizer import Tokenizer
from nemotron.tiny import MODEL_DIR
from nemotron.tiny.recipe import TinyRecipe, build_data, embedded_model_config, pretrain_texts
from nemotron.train import load_recipe
from nemotron.train.stages import make_stage
from nemotron.train.trainer import _build

# name: (autocast, row length, the recipe's packing)
SETTINGS = {"fp32, 1024, greedy": ("none", 1024, "greedy"), "bf16, 1024, greedy": ("bfloat16", 1024, "greedy"),
            "fp32, 512, greedy": ("none", 512, "greedy"), "bf16, 512, greedy": ("bfloat16", 512, "greedy"),
            "bf16, 512, first-fit": ("bfloat16", 512, "first_fit")}
BASE = "fp32, 1024, greedy"
TOKENS_PER_STEP = 8192


def write_data(tmp: Path, n: int) -> tuple[Path, Path]:
    """The recipe's pretraining text for n training problems, rendered with the shipped tokenizer,
    and the embedded model's config for it."""
    tokenizer = Tokenizer.from_dir(MODEL_DIR)
    sft = build_data(TinyRecipe(train_problems=n), tmp)["sft"]
    data = tmp / "pretrain.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in pretrain_texts(tokenizer, sft)))
    config = tmp / "config.json"
    save_config(embedded_model_config(-(-tokenizer.vocab_size // 64) * 64), config)
    return data, config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each setting (after one warm-up)")
    parser.add_argument("--problems", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data, config = write_data(Path(tmp), args.problems)
        runs = {}
        for name, (autocast, seq_len, packing) in SETTINGS.items():
            cfg = load_recipe(None, [f"data=[{data}]", f"init_config={config}", f"tokenizer={MODEL_DIR}",
                                     f"seq_len={seq_len}", f"batch_size={TOKENS_PER_STEP // seq_len}",
                                     f"autocast={autocast}", f"packing={packing}", f"out_dir={Path(tmp) / 'out'}",
                                     "steps=100", "seed=0"],
                              "pretrain")
            torch.manual_seed(0)
            model, _, tokenizer, _ = _build(cfg)
            model.train()
            runs[name] = dict(model=model, stage=make_stage(cfg, model, tokenizer),
                              optimizer=torch.optim.AdamW(model.parameters(), lr=cfg.lr),
                              autocast=torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast == "bfloat16"),
                              rates=[], scored=[], losses=[])
        for step in range(args.steps + 1):
            for run in runs.values():
                start = time.perf_counter()
                record = run["stage"].step(run["model"], run["autocast"])
                torch.nn.utils.clip_grad_norm_(run["model"].parameters(), 1.0)
                run["optimizer"].step()
                run["optimizer"].zero_grad(set_to_none=True)
                if step:   # the first step warms up allocators and caches
                    seconds = time.perf_counter() - start
                    run["rates"].append(TOKENS_PER_STEP / seconds)
                    run["scored"].append(record["targets"] / seconds)
                run["losses"].append(record["loss"])
    base = {k: statistics.median(runs[BASE][k]) for k in ("rates", "scored")}
    print(f"tiny model, {TOKENS_PER_STEP} tokens a step, {args.steps} timed steps each, alternated; "
          f"torch threads {torch.get_num_threads()}")
    print(f"| setting | tokens/s | against {BASE} | scored tokens/s | against {BASE} | loss, last 3 steps |")
    print("|---|---|---|---|---|---|")
    for name, run in runs.items():
        rate, scored = statistics.median(run["rates"]), statistics.median(run["scored"])
        print(f"| {name} | {rate:,.0f} | {rate / base['rates']:.2f}x | {scored:,.0f} | {scored / base['scored']:.2f}x "
              f"| {statistics.mean(run['losses'][-3:]):.3f} |")


if __name__ == "__main__":
    main()
