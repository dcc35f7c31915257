"""Held-out evaluation of a chat model on the procedural tasks: accuracy per family with reasoning
off, with reasoning on, and with tools (the model's tool calls are executed and their results fed
back, up to a few rounds), greedy decoding through the project's own generation API."""

from __future__ import annotations

import json
import warnings
from collections import defaultdict

from ..train.stages import REWARDS
from .tasks import TOOL_FAMILIES, TOOLS, Problem, grpo_prompt, run_tool

MODES = ("off", "on", "tools")


def answer(m, p: Problem, mode: str, max_new_tokens: int = 128, max_tool_rounds: int = 3) -> tuple[str, bool]:
    """The model's final answer to `p` and whether it made a valid tool call (tools mode)."""
    messages = [{"role": "user", "content": p.question}]
    if mode != "tools":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = m.chat(messages, enable_thinking=mode == "on", max_new_tokens=max_new_tokens)
        return r.content or "", False
    called = False
    for _ in range(max_tool_rounds + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = m.chat(messages, tools=TOOLS, enable_thinking=True, max_new_tokens=max_new_tokens)
        if not r.tool_calls:
            return r.content or "", called
        called = True
        messages.append(r.message())
        for call in r.tool_calls:
            try:
                args = json.loads(call["function"]["arguments"])
            except ValueError:
                args = {}
            messages.append({"role": "tool", "tool_call_id": call["id"],
                             "content": run_tool(call["function"]["name"], args if isinstance(args, dict) else {})})
    return "", called


def evaluate(m, held_out: list[Problem], modes: tuple[str, ...] = MODES, max_new_tokens: int = 128) -> dict:
    """{mode: {family: accuracy, ..., "all": accuracy}} plus, for tools, the share of questions
    answered through at least one tool call ("tool_call_rate")."""
    table: dict = {}
    for mode in modes:
        hits, totals, calls = defaultdict(int), defaultdict(int), 0
        problems = [p for p in held_out if mode != "tools" or p.family in TOOL_FAMILIES]
        for p in problems:
            text, called = answer(m, p, mode, max_new_tokens)
            record = grpo_prompt(p)
            ok = REWARDS[p.verifier](text, record) == 1.0
            hits[p.family] += ok
            totals[p.family] += 1
            calls += called
        row = {f: hits[f] / totals[f] for f in sorted(totals)}
        row["all"] = sum(hits.values()) / max(1, sum(totals.values()))
        if mode == "tools":
            row["tool_call_rate"] = calls / max(1, len(problems))
        table[mode] = row
    return table
