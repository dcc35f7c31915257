"""The embedded model on what a user types: the figures the tiny model is judged by, for one or more
model directories side by side (the shipped model by default).

- Held-out-form two-digit arithmetic (two or three operations on two-digit numbers, in forms kept out
  of training): 32 questions of evaluation seed 7, greedy, reasoning on and off, right by the recipe's
  verifier.
- The calculator offered (both tools, then the calculator alone), reasoning on: the first call's
  expression, run by the calculator, gives the right answer.
- Single digits: 32 expressions of one or two operations on one-digit numbers, reasoning on.
- Ten plain questions, written by hand in everyday words (no template), through `nemotron generate`
  run as a subprocess: the last number of its output against the answer.

    python benchmarks/tiny_acceptance.py [MODEL_DIR ...] [--n 32] [--skip-plain]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import warnings
from pathlib import Path

from nemotron.api import load
from nemotron.tiny import MODEL_DIR
from nemotron.tiny.evaluate import evaluate
from nemotron.tiny.tasks import CALCULATOR, TOOLS, arithmetic_problem, calculate, problems

PLAIN = [("Hey, what's 17 plus 26?", "43"), ("I need to know 48 minus 19.", "29"),
         ("Could you add 35 and 47 for me?", "82"), ("12 times 11 is what?", "132"),
         ("I had 45 dollars and spent 18. How much do I have left?", "27"),
         ("How many minutes are there in 5 hours?", "300"),
         ("If something weighs 3 kilograms, how many grams is that?", "3000"),
         ("Take 64, add 25, then subtract 30. What do you get?", "59"),
         ("Please work out 9 * 8 + 15 for me.", "87"), ("7 minutes has how many seconds?", "420")]


def calculator_calls(m, ps, tools: list[dict]) -> int:
    """How many first tool calls name the calculator with an expression that evaluates to the answer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = m.chat_batch([[{"role": "user", "content": p.question}] for p in ps], tools=tools,
                               enable_thinking=True, max_new_tokens=96)
    good = 0
    for p, r in zip(ps, results):
        if not r.tool_calls or r.tool_calls[0]["function"]["name"] != "calculator":
            continue
        try:
            expression = json.loads(r.tool_calls[0]["function"]["arguments"]).get("expression", "")
        except (ValueError, AttributeError):
            continue
        good += calculate(str(expression)) == p.answer
    return good


def plain_questions(model: str) -> list[tuple[str, str, str]]:
    out = []
    for question, expected in PLAIN:
        run = subprocess.run([sys.executable, "-m", "nemotron.cli", "generate", question, "--model", model,
                              "--max-new-tokens", "960"], capture_output=True, text=True, timeout=600)
        numbers = re.findall(r"-?\d+", run.stdout)
        out.append((question, expected, numbers[-1] if numbers else ""))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=[str(MODEL_DIR)])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--skip-plain", action="store_true")
    args = ap.parse_args()
    two_digit = problems(args.n, "eval", 7, ("arithmetic2",), held_out_forms=True)
    rng = random.Random(7)
    single = [arithmetic_problem(rng, True, ops=(1, 2), digits=(1, 1)) for _ in range(args.n)]
    for model in args.models:
        m = load(model)
        table = evaluate(m, two_digit, ("on", "off"), 960)   # the recipe's scoring, as shares
        row = {"on": round(table["on"]["all"] * args.n), "off": round(table["off"]["all"] * args.n),
               "calculator, both tools": calculator_calls(m, two_digit, TOOLS),
               "calculator alone": calculator_calls(m, two_digit, [CALCULATOR]),
               "single digits, on": round(evaluate(m, single, ("on",), 960)["on"]["all"] * args.n)}
        print(f"## {model}")
        for k, v in row.items():
            print(f"{k}: {v}/{args.n}")
        if not args.skip_plain:
            plain = plain_questions(model)
            for q, want, got in plain:
                print(f"  {q} ({want}) -> {got} {'right' if got == want else 'WRONG'}")
            print(f"plain questions: {sum(w == g for _, w, g in plain)}/{len(plain)}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
