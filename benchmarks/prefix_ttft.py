"""Prefix caching through the real server: time to first token of a request whose ~1,000-token
prefix (a long system prompt) was cached by an earlier request, against the first request, and the
output against a server without the prefix cache.

Starts `nemotron serve` on a free 127.0.0.1 port (the embedded model by default), streams greedy chat
requests with the official `openai` client and reports the TTFT of each and the cached prompt tokens
of the second (`usage.prompt_tokens_details.cached_tokens`). Per round, the first request is new (a
system prompt no earlier round used: a cold prefill) and the second shares its system prompt and
asks another question. Bounded: a fixed number of rounds, then the server is stopped.

The "no cache" server's first-request TTFT is a cold prefill too: compare it across trees for the
cost of the prefix cache to a cold prefill (e.g. `PYTHONPATH=/tmp/base python benchmarks/prefix_ttft.py`
against a `git worktree` of another commit; `--prefix-block` is only passed to the server when given).

    python benchmarks/prefix_ttft.py [--model tiny] [--rounds 5] [--prefix-tokens 1000] [--prefill-chunk 256]
                                     [--prefix-block N]
"""

from __future__ import annotations

import argparse
import statistics
import time

from nemotron.serve.launch import running_server


def ask(client, name: str, system: str, question: str) -> tuple[float, str, int]:
    """(time to first token in seconds, the whole text, cached prompt tokens) of one streamed greedy
    request."""
    start = time.perf_counter()
    first, parts, cached = None, [], 0
    stream = client.chat.completions.create(model=name, stream=True, temperature=0, max_tokens=24,
                                            messages=[{"role": "system", "content": system},
                                                      {"role": "user", "content": question}],
                                            stream_options={"include_usage": True},
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    for chunk in stream:
        if chunk.usage is not None and chunk.usage.prompt_tokens_details is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens or 0
        delta = chunk.choices[0].delta if chunk.choices else None
        text = (delta.content or "") if delta else ""
        if text and first is None:
            first = time.perf_counter() - start
        parts.append(text)
    return first if first is not None else time.perf_counter() - start, "".join(parts), cached


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--prefill-chunk", type=int, default=256, help="the server's --prefill-chunk")
    parser.add_argument("--prefix-block", type=int, help="the server's --prefix-block (default: the server's)")
    args = parser.parse_args()
    import openai

    import nemotron

    tokenizer = nemotron.load(args.model).tokenizer
    filler = "The station logs the wind speed, the air pressure and the sea temperature every hour. "
    per = len(tokenizer.encode(filler))
    systems = [f"Log book {r}. " + filler * (args.prefix_tokens // per) for r in range(args.rounds)]
    print(f"system prompt: {len(tokenizer.encode(systems[0]))} tokens")
    questions = ("What is 12 + 7?", "What is 3 * 4?")
    flags = ["--prefill-chunk", str(args.prefill_chunk)]
    if args.prefix_block is not None:
        flags += ["--prefix-block", str(args.prefix_block)]
    results = {}
    for label, extra in (("cache", ()), ("no cache", ("--prefix-cache-mb", "0"))):
        with running_server(args.model, *flags, *extra) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
            name = client.models.list().data[0].id
            for q in questions:  # warm-up: a long prompt, then a shared one (first-call costs out of the way)
                ask(client, name, "Warm-up. " + systems[0], q)
            results[label] = [(ask(client, name, s, questions[0]), ask(client, name, s, questions[1])) for s in systems]
    cached = results["cache"]
    ratios = [first[0] / second[0] for first, second in cached]
    print("| round | TTFT first (ms) | TTFT second, shared prefix (ms) | ratio | cached tokens | "
          "second's text equal without the cache |")
    print("|---|---|---|---|---|---|")
    for r, ((first, second), (_, plain)) in enumerate(zip(cached, results["no cache"])):
        print(f"| {r} | {first[0] * 1e3:.0f} | {second[0] * 1e3:.0f} | {first[0] / second[0]:.1f}x | {second[2]} "
              f"| {'yes' if second[1] == plain[1] else 'NO'} |")
    cold = [f[0] for f, _ in results["no cache"]] + [s[0] for _, s in results["no cache"]]
    print(f"median ratio {statistics.median(ratios):.1f}x; cold TTFT (no-cache server, every request) "
          f"median {statistics.median(cold) * 1e3:.0f} ms, min {min(cold) * 1e3:.0f} ms; first requests on the "
          f"cache server median {statistics.median(f[0] for f, _ in cached) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
