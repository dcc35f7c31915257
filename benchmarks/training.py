"""Training speed on CPU (fp32): our loop vs a plain transformers loop on the same checkpoint.

Both run forward + backward + AdamW on the same random token batches (next-token loss; no MTP or aux
loss, which transformers does not have), each library in its own subprocess. Reported: training
tokens per second, the median over the timed steps, and the ratio.

    python benchmarks/training.py [--steps 6] [--seq-len 512] [--batch 4] [--config small-moe]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from generation import CONFIGS, build  # noqa: E402

CHILD = r"""
import json, statistics, sys, time
import torch
torch.manual_seed(0)
which, path, steps, seq_len, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if which == "transformers":
    from transformers import NemotronHForCausalLM
    model = NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32)
    for m in model.modules():  # the same math as ours (no dt clamp)
        if hasattr(m, "time_step_limit"):
            m.time_step_limit = (0.0, float("inf"))
    vocab = model.config.vocab_size

    def loss_of(ids):
        return model(input_ids=ids, labels=ids).loss
else:
    import nemotron
    from nemotron.train import lm_loss
    from nemotron.train.data import Batch
    model = nemotron.load(path, dtype="float32").model
    vocab = model.config.vocab_size

    def loss_of(ids):
        labels = torch.cat([ids[:, 1:], torch.full((ids.shape[0], 1), -100)], 1)
        return lm_loss(model, Batch(ids, labels, torch.zeros_like(ids)))[0]
model.train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
g = torch.Generator().manual_seed(1)
times, losses = [], []
for step in range(steps + 1):
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = loss_of(ids)
    loss.backward()
    opt.step()
    if step:  # the first step warms up allocators and caches
        times.append(time.perf_counter() - t)
    losses.append(float(loss))
print(json.dumps({"tokens_per_s": batch * seq_len / statistics.median(times), "first_loss": losses[0]}))
"""


def child(which: str, path: Path, steps: int, seq_len: int, batch: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, which, str(path), str(steps), str(seq_len), str(batch)],
                            capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore",
                                                                 "TRANSFORMERS_VERBOSITY": "error"})
    if result.returncode:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small-moe")
    parser.add_argument("--repeats", type=int, default=3, help="alternating invocations of each library")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build(args.config, Path(tmp) / args.config)
        rows = []
        for _ in range(args.repeats):
            ours = child("nemotron", path, args.steps, args.seq_len, args.batch)
            theirs = child("transformers", path, args.steps, args.seq_len, args.batch)
            assert abs(ours["first_loss"] - theirs["first_loss"]) < 1e-3 * theirs["first_loss"], (ours, theirs)
            rows.append((ours["tokens_per_s"], theirs["tokens_per_s"]))
    print(f"config {args.config}, batch {args.batch} x {args.seq_len} tokens, fp32, AdamW, torch threads "
          f"{os.cpu_count()}; first-step losses agree")
    print("| run | nemotron tok/s | transformers tok/s | ratio |")
    print("|---|---|---|---|")
    for i, (a, b) in enumerate(rows, 1):
        print(f"| {i} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |")
    ratios = sorted(a / b for a, b in rows)
    print(f"median ratio {ratios[len(ratios) // 2]:.2f}x")


if __name__ == "__main__":
    main()
