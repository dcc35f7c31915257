"""Prefix caching through the real server: time to first token of a request whose ~1,000-token
prefix (a long system prompt) was cached by an earlier request, against the first request, and the
output against a server without the prefix cache.

Starts `nemotron serve` on a free 127.0.0.1 port (the embedded model by default), streams greedy chat
requests with the official `openai` client and reports the TTFT of each. Per round, the first request
is new (a system prompt no earlier round used) and the second shares its system prompt and asks
another question. Bounded: a fixed number of rounds, then the server is stopped.

    python benchmarks/prefix_ttft.py [--model tiny] [--rounds 5] [--prefix-tokens 1000] [--prefill-chunk 256]
"""

from __future__ import annotations

import argparse
import statistics
import time

from nemotron.serve.launch import running_server


def ask(client, name: str, system: str, question: str) -> tuple[float, str]:
    """(time to first token in seconds, the whole text) of one streamed greedy request."""
    start = time.perf_counter()
    first, parts = None, []
    stream = client.chat.completions.create(model=name, stream=True, temperature=0, max_tokens=24,
                                            messages=[{"role": "system", "content": system},
                                                      {"role": "user", "content": question}],
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    for chunk in stream:
        delta = chunk.choices[0].delta if chunk.choices else None
        text = (delta.content or "") if delta else ""
        if text and first is None:
            first = time.perf_counter() - start
        parts.append(text)
    return first if first is not None else time.perf_counter() - start, "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--prefill-chunk", type=int, default=256,
                        help="the server's --prefill-chunk, also its prefix-cache block")
    args = parser.parse_args()
    import openai

    import nemotron

    tokenizer = nemotron.load(args.model).tokenizer
    filler = "The station logs the wind speed, the air pressure and the sea temperature every hour. "
    per = len(tokenizer.encode(filler))
    systems = [f"Log book {r}. " + filler * (args.prefix_tokens // per) for r in range(args.rounds)]
    print(f"system prompt: {len(tokenizer.encode(systems[0]))} tokens")
    questions = ("What is 12 + 7?", "What is 3 * 4?")
    results = {}
    for label, flags in (("cache", ()), ("no cache", ("--prefix-cache-mb", "0"))):
        with running_server(args.model, "--prefill-chunk", str(args.prefill_chunk), *flags) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
            name = client.models.list().data[0].id
            for q in questions:  # warm-up: a long prompt, then a shared one (first-call costs out of the way)
                ask(client, name, "Warm-up. " + systems[0], q)
            results[label] = [(ask(client, name, s, questions[0]), ask(client, name, s, questions[1])) for s in systems]
    cached = results["cache"]
    ratios = [first[0] / second[0] for first, second in cached]
    print("| round | TTFT first (ms) | TTFT second, shared prefix (ms) | ratio | second's text equal without the cache |")
    print("|---|---|---|---|---|")
    for r, ((first, second), (_, plain)) in enumerate(zip(cached, results["no cache"])):
        print(f"| {r} | {first[0] * 1e3:.0f} | {second[0] * 1e3:.0f} | {first[0] / second[0]:.1f}x "
              f"| {'yes' if second[1] == plain[1] else 'NO'} |")
    print(f"median ratio {statistics.median(ratios):.1f}x; without the cache the second request's TTFT is "
          f"{statistics.median(s[0] for _, s in results['no cache']) * 1e3:.0f} ms (median)")


if __name__ == "__main__":
    main()
