"""Load test of `nemotron serve` on loopback: throughput and latency at 1, 8 and 32 concurrent streams.

Starts the real server process on a free 127.0.0.1 port with a random checkpoint of one of the
configs of benchmarks/generation.py (`small-moe`: hidden 256, 8 layers, LatentMoE; `dense-146m`), with
a byte-level tokenizer and the Nemotron 3 chat template, then for each concurrency level runs that many client streams, each
sending `--requests` streaming chat requests back to back (greedy, `ignore_eos`, a fixed number of
new tokens, prompts that differ so the prefix cache does not help). The clients are minimal asyncio
HTTP/1.1 readers that parse only the final usage chunk, so that on a small machine they take little
CPU from the server.

Reported per level: aggregate generated tokens per second end to end (wall clock, first request sent
to last token received, prefills included), aggregate decode tokens per second (streams x the mean
per-request decode rate, tokens after the first over the time from the first to the last chunk: the
rate at which running streams advance), requests per second, time to first token and inter-token latency percentiles
(p50/p90/p99, from the SSE chunks as the client receives them). Bounded: a fixed number of
requests and a timeout per level; the server is stopped at the end.

    python benchmarks/serve_load.py [--config small-moe | --model tiny] [--new-tokens 64] [--requests 2] [--levels 1 8 32]
                                    [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from generation import CONFIGS  # noqa: E402

from nemotron.serve.launch import running_server  # noqa: E402


def build(out: Path, config_name: str = "small-moe") -> Path:
    from nemotron.io.checkpoint import save_checkpoint
    from nemotron.config import NemotronHConfig
    from nemotron.io.tokenizer import write_byte_tokenizer
    from nemotron.models.init import init_weights_
    from nemotron.models import build_model

    out.mkdir(parents=True, exist_ok=True)
    # the byte tokenizer has 267 ids: the vocabulary is cut to 320 so that most sampled ids are text
    config = NemotronHConfig(**{**CONFIGS[config_name], "vocab_size": 320, "eos_token_id": 4, "bos_token_id": 1})
    write_byte_tokenizer(out)
    save_checkpoint(init_weights_(build_model(config), config, seed=0), config, out)
    return out


async def stream_chat(port: int, body: dict) -> tuple[float, list[float], int]:
    """One streaming request: (time to the first token chunk, gaps between token chunks, tokens).
    A chunk can carry more than one token (bytes of one character are sent together)."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.perf_counter()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\nConnection: close\r\n\r\n" + payload)
    await writer.drain()
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"server answered {status!r}: {(await reader.read(2000))!r}")
    first, last, gaps, tokens = None, None, [], 0
    while True:
        line = await reader.readline()
        if not line:
            break
        if not line.startswith(b"data: {"):
            continue
        # only the usage chunk is parsed: the clients share the machine with the server, and a JSON
        # parse per chunk would take CPU from it. A token chunk's delta has content or reasoning keys
        # (the first chunk's delta carries the role, the last one's is empty).
        if b'"usage": {' in line:
            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
        if b'"delta": {"' in line and b'"delta": {"role"' not in line:
            now = time.perf_counter()
            if first is None:
                first = now - start
            else:
                gaps.append(now - last)
            last = now
    writer.close()
    return first or 0.0, gaps, tokens


async def level(port: int, streams: int, requests: int, new_tokens: int, timeout: float) -> dict:
    async def client(c: int) -> list:
        out = []
        for i in range(requests):
            body = {"messages": [{"role": "user", "content": f"stream {c} request {i}: tell me a story"}],
                    "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            out.append(await stream_chat(port, body))
        return out

    start = time.perf_counter()
    results = await asyncio.wait_for(asyncio.gather(*(client(c) for c in range(streams))), timeout)
    wall = time.perf_counter() - start
    flat = [r for rs in results for r in rs]
    ttft = sorted(r[0] for r in flat)
    itl = sorted(g for r in flat for g in r[1])
    tokens = sum(r[2] for r in flat)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3 if xs else float("nan")

    # each request's decode rate: tokens after the first over the time from first to last chunk
    rates = [(r[2] - 1) / sum(r[1]) for r in flat if r[1] and sum(r[1]) > 0]
    return {"streams": streams, "requests": len(flat), "tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "decode_tok_per_s": streams * statistics.fmean(rates),
            "req_per_s": len(flat) / wall, "ttft_ms": [pct(ttft, q) for q in (0.5, 0.9, 0.99)],
            "itl_ms": [pct(itl, q) for q in (0.5, 0.9, 0.99)]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2, help="requests per stream at each level")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--timeout", type=float, default=600, help="seconds per level")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the levels this many times, alternating (the machine's speed drifts); the "
                             "table shows the last round, the ratios each round's and their median")
    parser.add_argument("--server-threads", type=int, help="the server's --threads (default: its own, by model size)")
    parser.add_argument("--server-prefill-threads", type=int,
                        help="the server's --prefill-threads (default: its own, all cores)")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small-moe",
                        help="small-moe: hidden 256 (per-step overhead bound on CPU); dense-146m: weight-read bound")
    parser.add_argument("--model", help="serve this checkpoint (a directory, or 'tiny': the embedded model) "
                                        "instead of a random one of --config")
    parser.add_argument("--device", default="cpu", help="the server's --device (cuda on a GPU machine)")
    parser.add_argument("--no-compile", action="store_true",
                        help="the server's --no-compile: eager decode steps (by default it compiles the step first)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build(Path(tmp) / f"{args.config}-chat", args.config)
        flags = ["--max-batch", str(max(args.levels)), "--device", args.device,
                 *(["--threads", str(args.server_threads)] if args.server_threads else []),
                 *(["--prefill-threads", str(args.server_prefill_threads)] if args.server_prefill_threads else []),
                 *(["--no-compile"] if args.no_compile else [])]
        with running_server(path, *flags, startup_s=300) as base:   # compiling the decode step first
            port = int(base.rsplit(":", 1)[1])
            asyncio.run(level(port, 1, 1, 8, args.timeout))  # warm-up
            rounds = [[asyncio.run(level(port, n, args.requests, args.new_tokens, args.timeout)) for n in args.levels]
                      for _ in range(args.rounds)]
    print(f"{'model ' + args.model if args.model else 'config ' + args.config}, fp32, greedy, {args.new_tokens} new tokens per request, {args.requests} requests "
          f"per stream, {os.cpu_count()} cores, server torch threads "
          f"{args.server_threads or 'by the server default'} (prefill "
          f"{args.server_prefill_threads or os.cpu_count()}), device {args.device}, decode step "
          f"{'eager (--no-compile)' if args.no_compile else 'as the server defaults (compiled before serving)'}\n")
    print("| streams | requests | tokens/s (end to end) | decode tokens/s | requests/s | TTFT p50 / p90 / p99 (ms) "
          "| ITL p50 / p90 / p99 (ms) |")
    print("|---|---|---|---|---|---|---|")
    rows = rounds[-1]
    for r in rows:
        print(f"| {r['streams']} | {r['requests']} | {r['tok_per_s']:.0f} | {r['decode_tok_per_s']:.0f} | "
              f"{r['req_per_s']:.2f} | "
              + " / ".join(f"{x:.0f}" for x in r["ttft_ms"]) + " | "
              + " / ".join(f"{x:.1f}" for x in r["itl_ms"]) + " |")
    for key, what in (("tok_per_s", "end-to-end throughput"), ("decode_tok_per_s", "decode throughput")):
        ratios = [[r[key] / rs[0][key] for r in rs] for rs in rounds]   # per round, relative to its first level
        print(f"aggregate {what} relative to {rows[0]['streams']} stream(s): " + ", ".join(
            f"{r['streams']} streams {statistics.median(x[i] for x in ratios):.2f}x"
            + (f" (rounds: {', '.join(f'{x[i]:.2f}' for x in ratios)})" if len(rounds) > 1 else "")
            for i, r in enumerate(rows)))


if __name__ == "__main__":
    main()
