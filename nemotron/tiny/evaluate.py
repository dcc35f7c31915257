"""Held-out evaluation of a chat model on the procedural tasks: accuracy per family with reasoning
off, with reasoning on, and with tools (the model's tool calls are executed and their results fed
back, up to a few rounds), greedy decoding through the project's own generation API, the questions of a mode decoded in batches
of `kernels.MAX_ROWS` (the rows the CPU decode kernels serve: a larger batch's MoE dispatch reads its
expert counts to the host, which breaks the compiled step into a graph per count pattern)."""

from __future__ import annotations

import json
import time
import warnings
from collections import defaultdict

from nemotron.kernels import MAX_ROWS
from nemotron.tiny.tasks import TOOL_FAMILIES, TOOLS, Problem, grpo_prompt, run_tool
from nemotron.train.rewards import REWARDS

MODES = ("off", "on", "tools")


def tool_messages(result) -> list[dict]:
    """The assistant message with its tool calls, then one tool message per call with the executed
    tool's result (what a chat client does between two turns)."""
    messages = [result.message()]
    for call in result.tool_calls:
        try:
            args = json.loads(call["function"]["arguments"])
        except ValueError:
            args = {}
        messages.append({"role": "tool", "tool_call_id": call["id"],
                         "content": run_tool(call["function"]["name"], args if isinstance(args, dict) else {})})
    return messages


def answers(m, held_out: list[Problem], mode: str, max_new_tokens: int = 128, max_tool_rounds: int = 3,
            batch: int = MAX_ROWS) -> list[tuple[str, bool]]:
    """For each problem: the model's final answer and whether it made a tool call (tools mode). The
    questions are batched in the order of their reference reasoning's length: a batch decodes until
    its longest answer ends, so long and short ones are not mixed."""
    order = sorted(range(len(held_out)), key=lambda i: len(" ".join(held_out[i].steps)))
    out: list[tuple[str, bool]] = []
    for start in range(0, len(order), batch):
        chunk = [held_out[i] for i in order[start:start + batch]]
        conversations = [[{"role": "user", "content": p.question}] for p in chunk]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if mode != "tools":
                results = m.chat_batch(conversations, enable_thinking=mode == "on", max_new_tokens=max_new_tokens)
                out.extend((r.content or "", False) for r in results)
                continue
            final, called = [""] * len(chunk), [False] * len(chunk)
            active = list(range(len(chunk)))
            for _ in range(max_tool_rounds + 1):
                if not active:
                    break
                results = m.chat_batch([conversations[i] for i in active], tools=TOOLS, enable_thinking=True,
                                       max_new_tokens=max_new_tokens)
                still = []
                for i, r in zip(active, results):
                    if r.tool_calls:
                        called[i] = True
                        conversations[i].extend(tool_messages(r))
                        still.append(i)
                    else:
                        final[i] = r.content or ""
                active = still
            out.extend(zip(final, called))
    answered: list[tuple[str, bool]] = [("", False)] * len(held_out)
    for i, result in zip(order, out):
        answered[i] = result
    return answered


def evaluate(m, held_out: list[Problem], modes: tuple[str, ...] = MODES, max_new_tokens: int = 128) -> dict:
    """{mode: {family: accuracy, ..., "all": accuracy}} plus, for tools, the share of questions
    answered through at least one tool call ("tool_call_rate")."""
    table: dict = {}
    for mode in modes:
        hits, totals = defaultdict(int), defaultdict(int)
        problems = [p for p in held_out if mode != "tools" or p.family in TOOL_FAMILIES]
        results = answers(m, problems, mode, max_new_tokens)
        for p, (text, _) in zip(problems, results):
            ok = REWARDS[p.verifier](text, grpo_prompt(p)) == 1.0
            hits[p.family] += ok
            totals[p.family] += 1
        row = {f: hits[f] / totals[f] for f in sorted(totals)}
        row["all"] = sum(hits.values()) / max(1, sum(totals.values()))
        if mode == "tools":
            row["tool_call_rate"] = sum(c for _, c in results) / max(1, len(problems))
        table[mode] = row
    return table


def decode_speed(m, held_out: list[Problem], speculative_tokens: int = 2, max_new_tokens: int = 96,
                 n: int = 16) -> dict:
    """Batch-1 greedy decoding over `n` held-out questions (reasoning on), plain and with MTP
    speculation, alternated question by question (a noisy machine slows both alike): decode
    tokens/s of each, the speed-up, and the MTP acceptance length (tokens per target forward). The
    two produce the same text (speculation is exact), which is checked."""
    prompts = [[{"role": "user", "content": p.question}] for p in held_out[:n]]
    k = speculative_tokens
    tokens, seconds, same, rounds, accepted = {0: 0, k: 0}, {0: 0.0, k: 0.0}, True, 0, 0
    for spec in (0, k):
        m.chat(prompts[0], max_new_tokens=8, speculative_tokens=spec)   # warm-up
    for messages in prompts:
        texts = {}
        for spec in (0, k):
            start = time.perf_counter()
            r = m.chat(messages, max_new_tokens=max_new_tokens, speculative_tokens=spec)
            seconds[spec] += time.perf_counter() - start
            tokens[spec] += r.completion_tokens
            texts[spec] = r.text
            if spec and r.speculation:
                rounds += r.speculation["rounds"]
                accepted += r.speculation["accepted"]
        same &= texts[0] == texts[k]
    plain, fast = tokens[0] / seconds[0], tokens[k] / seconds[k]
    return {"decode_tokens_per_s": plain, "mtp_tokens_per_s": fast, "mtp_speedup": fast / plain,
            "mtp_draft_tokens": k, "mtp_acceptance_length": 1.0 + accepted / rounds if rounds else 1.0,
            "mtp_same_text": same}
