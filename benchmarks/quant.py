"""Low precision: perplexity of the trained tiny model in FP8, NVFP4 and mixed precision against its
bf16 (and fp32) self, and the resident weight memory of NVFP4 checkpoints against bf16.

Perplexity: held-out conversations of the tiny recipe's task families (seeds disjoint from training),
rendered in the chat format, in all three modes (reasoning on, off, tool use); every token scored.
Calibration uses training-split conversations. Each variant is produced by `nemotron quantize`'s
code (`quantize_model` + `save_quantized`) and loaded back from disk through `nemotron.load`.
Weight-only execution (W4A16 / W8A16) is the default; the W4A4 / W8A8 rows fake-quantize
activations with the calibrated input scales (Blackwell / Hopper numerics). Decode speed: batch-1
greedy, one thread, 64 tokens, median of 3.

Memory: each checkpoint is loaded in a fresh process (after a warm-up load of the embedded model,
which pays the one-off costs), which reports the bytes of its model's parameters and buffers and the
rise of its resident set (VmRSS) over loading. Two models: the tiny
one (its 1024-token vocabulary makes the unquantized embedding and lm_head 7% of it) and a random
hybrid MoE whose embedding and lm_head hold 2.2% of the weights, as in Nemotron 3 Nano's release.

    python benchmarks/quant.py [--eval 120] [--calib 128]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

CHILD = r"""
import json, sys
import torch
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
import nemotron, nemotron.api, nemotron.chat.template, nemotron.io.checkpoint, nemotron.models, nemotron.io.tokenizer, tokenizers
from nemotron.quant.modelopt import model_weight_bytes
warm = nemotron.load("tiny")   # a first load pays the one-off costs (lazy imports, thread pools); kept
before = rss()                 # alive so that its memory is not reused: the rise is the model's own
m = nemotron.load(sys.argv[1])
print(json.dumps({"tensor_bytes": model_weight_bytes(m.model), "rss_rise": rss() - before}))
"""


def texts_for(problems, tokenizer) -> list[str]:
    from nemotron.chat.template import apply_chat_template
    from nemotron.tiny.tasks import TOOL_FAMILIES, conversation

    out = []
    for p in problems:
        for mode in ("think", "no_think") + (("tool",) if p.family in TOOL_FAMILIES else ()):
            r = conversation(p, mode)
            out.append(apply_chat_template(tokenizer, r["messages"], tools=r.get("tools"), add_generation_prompt=False,
                                           enable_thinking=r.get("enable_thinking", True)))
    return out


@torch.inference_mode()
def perplexity(model, tokenizer, texts: list[str]) -> float:
    nll, n = 0.0, 0
    for t in texts:
        ids = torch.tensor([tokenizer.encode(t)])
        logits = model(ids)[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        n += ids.shape[1] - 1
    return math.exp(nll / n)


def decode_speed(model, tokenizer, new_tokens: int = 64, runs: int = 3) -> float:
    """Batch-1 greedy decode tokens/s (one thread), median of `runs`."""
    from nemotron.inference.steps import greedy_generate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ids = torch.tensor([tokenizer.encode("What is 12 + 7 * 3?")])
    greedy_generate(model, ids, 4)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        greedy_generate(model, ids, new_tokens)
        times.append(time.perf_counter() - start)
    torch.set_num_threads(threads)
    return new_tokens / statistics.median(times)


def memory(path: Path) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def nano_shaped(out: Path) -> Path:
    """A random hybrid MoE at hidden 1024 (bf16) whose embedding and lm_head hold the share of the
    weights they hold in Nemotron 3 Nano 30B-A3B (2 x 131072 x 2688 of 31.6B: 2.2%)."""
    from nemotron.io.checkpoint import save_checkpoint
    from nemotron.config import NemotronHConfig
    from nemotron.io.tokenizer import write_byte_tokenizer
    from nemotron.models.init import init_weights_
    from nemotron.models import build_model

    config = NemotronHConfig(
        hybrid_override_pattern="MEMEM*EMEMEM*E", vocab_size=2816, hidden_size=1024, num_attention_heads=16,
        num_key_value_heads=2, head_dim=64, mamba_num_heads=32, mamba_head_dim=64, n_groups=8, ssm_state_size=128,
        chunk_size=128, n_routed_experts=32, num_experts_per_tok=6, moe_intermediate_size=512,
        moe_shared_expert_intermediate_size=1024, routed_scaling_factor=2.5, torch_dtype="bfloat16",
        bos_token_id=1, eos_token_id=4, pad_token_id=0)
    write_byte_tokenizer(out)
    model = init_weights_(build_model(config), config, seed=0)
    save_checkpoint(model, config, out, dtype=torch.bfloat16)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval", type=int, default=120, help="held-out problems (x2-3 conversations each)")
    parser.add_argument("--calib", type=int, default=128, help="training-split problems for calibration")
    parser.add_argument("--budget-bits", type=float, default=4.75)
    parser.add_argument("--memory-only", action="store_true", help="skip the perplexity table")
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")

    import nemotron
    from nemotron.io.checkpoint import save_checkpoint
    from nemotron.quant.modules import set_activation_emulation
    from nemotron.quant.quantize import quantize_model, save_quantized
    from nemotron.tiny.tasks import EVAL_FAMILIES, problems

    base = nemotron.load("tiny")
    held_out = texts_for(problems(args.eval, "eval", seed=0, families=EVAL_FAMILIES), base.tokenizer)
    calib = texts_for(problems(args.calib, "train", seed=5, families=EVAL_FAMILIES), base.tokenizer)
    rows, mem = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bf16_dir = tmp / "tiny-bf16"
        save_checkpoint(base.model, base.config, bf16_dir, dtype=torch.bfloat16)
        for f in base.path.iterdir():
            if f.name.startswith("tokenizer") or f.suffix == ".jinja":
                (bf16_dir / f.name).write_bytes(f.read_bytes())
        mem.append(("tiny", "bf16", memory(bf16_dir)))
        ref = {}
        if not args.memory_only:
            ref["fp32"] = perplexity(base.model, base.tokenizer, held_out)
            bf16 = nemotron.load(bf16_dir).model
            ref["bf16"] = perplexity(bf16, base.tokenizer, held_out)
            rows += [("fp32 (as trained)", "-", ref["fp32"], decode_speed(base.model, base.tokenizer)),
                     ("bf16", "-", ref["bf16"], decode_speed(bf16, base.tokenizer))]
        for fmt in ("fp8", "nvfp4", "mixed"):
            if args.memory_only and fmt != "nvfp4":
                continue
            loaded = nemotron.load("tiny")
            cfg, report = quantize_model(loaded, fmt, calib, args.budget_bits)
            out = save_quantized(loaded, cfg, tmp / f"tiny-{fmt}", report, dtype=torch.bfloat16)
            q = nemotron.load(out, dtype=torch.float32)   # the unquantized rest computes in fp32 like the reference
            bits = f"{report['bits_per_quantized_weight']:.2f}"
            if not args.memory_only:
                rows.append((f"{fmt} weight-only", bits, perplexity(q.model, base.tokenizer, held_out),
                             decode_speed(q.model, base.tokenizer)))
            if fmt != "mixed" and not args.memory_only:
                set_activation_emulation(q.model)
                rows.append((f"{fmt} {'W4A4' if fmt == 'nvfp4' else 'W8A8'} (emulated)", bits,
                             perplexity(q.model, base.tokenizer, held_out), None))
            if fmt == "nvfp4":
                mem.append(("tiny", "nvfp4", memory(out)))
        nano = nano_shaped(tmp / "nano-bf16")
        mem.append(("Nano-shaped", "bf16", memory(nano)))
        loaded = nemotron.load(nano)
        cfg, report = quantize_model(loaded, "nvfp4")
        mem.append(("Nano-shaped", "nvfp4", memory(save_quantized(loaded, cfg, tmp / "nano-nvfp4", report,
                                                                   dtype=torch.bfloat16))))
    if rows:
        print(f"Perplexity of the tiny model on {len(held_out)} held-out conversations (calibration: {len(calib)} "
              f"training-split conversations)\n")
        print("| variant | bits per quantized weight | perplexity | vs bf16 | vs fp32 | decode tokens/s (batch 1) |")
        print("|---|---|---|---|---|---|")
    for name, bits, ppl, speed in rows:
        print(f"| {name} | {bits} | {ppl:.5f} | {100 * (ppl / ref['bf16'] - 1):+.2f}% | {100 * (ppl / ref['fp32'] - 1):+.2f}% "
              f"| {'-' if speed is None else f'{speed:.0f}'} |")
    print("\nResident weight memory, each checkpoint loaded in a fresh process\n")
    print("| model | format | parameter + buffer bytes | ratio to bf16 | RSS rise on loading | ratio to bf16 |")
    print("|---|---|---|---|---|---|")
    base_mem = {}
    for model, fmt, m in mem:
        if fmt == "bf16":
            base_mem[model] = m
        b = base_mem[model]
        print(f"| {model} | {fmt} | {m['tensor_bytes'] / 2**20:.2f} MiB | {m['tensor_bytes'] / b['tensor_bytes']:.3f} | "
              f"{m['rss_rise'] / 2**20:.1f} MiB | {m['rss_rise'] / b['rss_rise']:.3f} |")


if __name__ == "__main__":
    main()
