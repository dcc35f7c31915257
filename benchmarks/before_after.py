"""Decode speed of the working tree against an earlier commit, both in one process.

The earlier commit's `nemotron` package is extracted with `git archive` into a temporary folder and
renamed `nemotron_before` (its imports rewritten), so both versions load the same checkpoint side by
side and their runs alternate within seconds of each other: on a noisy shared machine this compares
far more fairly than two processes minutes apart. Each run is the engine's batch-1 greedy decode of
--new-tokens tokens after a 32-token prompt, eager and compiled (`compile=False/True`, compiled
once before timing); medians of --rounds alternated rounds and the median of the per-round ratios.

    python benchmarks/before_after.py --before REV --model DIR [--dtype bfloat16] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def extract_before(rev: str, into: Path) -> str:
    """`nemotron` at `rev`, importable as `nemotron_before` from `into`."""
    blob = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "nemotron"], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(into, filter="data")
    (into / "nemotron").rename(into / "nemotron_before")
    for path in (into / "nemotron_before").rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\bnemotron\.(\w)", r"nemotron_before.\1", text)
        text = text.replace("from nemotron import", "from nemotron_before import")
        text = re.sub(r"^import nemotron$", "import nemotron_before", text, flags=re.M)
        text = text.replace('"nemotron::', '"nemotron_before::')   # its custom ops, under their own names
        path.write_text(text.replace("nemotron_cpu", "nemotron_before_cpu"))
    for path in (into / "nemotron_before").rglob("*.cpp"):   # its C++ kernels: their own library and build
        path.write_text(path.read_text().replace("nemotron_cpu", "nemotron_before_cpu"))
    return "nemotron_before"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--model", required=True, help="a checkpoint directory")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="nemotron-before-"))
    sys.path.insert(0, str(tmp))
    names = {"before": extract_before(args.before, tmp), "after": "nemotron"}
    ids = torch.randint(3, 1024, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    side = {}
    for version, name in names.items():
        pkg = importlib.import_module(name)
        engine = importlib.import_module(f"{name}.inference.engine")
        requests = importlib.import_module(f"{name}.inference.requests")
        sampling = importlib.import_module(f"{name}.inference.sampling")
        side[version] = (pkg.load(args.model, dtype=args.dtype).model, engine.Engine, requests.Request,
                         sampling.SamplingParams)

    def run(version: str, compiled: bool) -> tuple[float, list[int]]:
        model, engine_cls, request_cls, params_cls = side[version]
        req = request_cls(list(ids), params_cls(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True))
        events = engine_cls.for_requests(model, [req], compile=compiled).run([req])
        next(events)                                       # the prompt's prefill and first token
        start = time.perf_counter()
        for _ in events:
            pass
        return (args.new_tokens - 1) / (time.perf_counter() - start), req.output_ids

    tokens = {(v, c): run(v, c)[1] for v in side for c in (False, True)}     # compiles, untimed
    rates = {(v, c): [] for v in side for c in (False, True)}
    for r in range(args.rounds):
        for compiled in (False, True):
            for version in (("before", "after") if r % 2 == 0 else ("after", "before")):
                rates[(version, compiled)].append(run(version, compiled)[0])
    for compiled in (False, True):
        ratios = [a / b for a, b in zip(rates[("after", compiled)], rates[("before", compiled)])]
        print(json.dumps({"model": Path(args.model).name, "dtype": args.dtype, "compiled": compiled,
                          "before tok/s": round(statistics.median(rates[("before", compiled)]), 1),
                          "after tok/s": round(statistics.median(rates[("after", compiled)]), 1),
                          "after/before": round(statistics.median(ratios), 2),
                          "same tokens before/after": tokens[("before", compiled)] == tokens[("after", compiled)],
                          "same tokens eager/compiled (after)": tokens[("after", False)] == tokens[("after", True)]}))


if __name__ == "__main__":
    main()
