"""MTP speculative decoding on the embedded tiny model: acceptance length and decode speed-up.

Greedy batch-1 chat answers (reasoning on) to held-out questions of every task family, decoded
plainly and with k MTP draft tokens per step, alternated question by question so that the noise of
the machine falls on both alike (`nemotron.tiny.evaluate.decode_speed`, which also checks that both
produce the same text). Reported per k: the median over runs of plain and speculative decode
tokens/s, their ratio, and the acceptance length (tokens produced per target-model forward).

    python benchmarks/tiny_mtp.py [--runs 3] [--questions 16] [--draft 1 2 3] [--threads 1] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--draft", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (batch-1 decode of a tiny model)")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--device", default="cpu", help="cuda on a GPU machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import nemotron
    from nemotron.tiny.evaluate import decode_speed
    from nemotron.tiny.tasks import problems

    m = nemotron.load("tiny", device=args.device)
    held_out = problems(args.questions, "eval", seed=3)
    print("| draft tokens | plain tokens/s | MTP tokens/s | speed-up | acceptance length | same text |")
    print("|---|---|---|---|---|---|")
    for k in args.draft:
        runs = [decode_speed(m, held_out, k, args.max_new_tokens, args.questions) for _ in range(args.runs)]
        med = {key: statistics.median(r[key] for r in runs)
               for key in ("decode_tokens_per_s", "mtp_tokens_per_s", "mtp_speedup", "mtp_acceptance_length")}
        print(f"| {k} | {med['decode_tokens_per_s']:.0f} | {med['mtp_tokens_per_s']:.0f} | {med['mtp_speedup']:.2f}x "
              f"| {med['mtp_acceptance_length']:.2f} | {'yes' if all(r['mtp_same_text'] for r in runs) else 'NO'} |",
              flush=True)


if __name__ == "__main__":
    main()
