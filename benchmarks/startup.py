"""Start-up time of the command line: the working tree against an earlier commit, alternated.

The earlier commit's `nemotron` package is extracted with `git archive` into a temporary folder and
run from there (PYTHONPATH), the working tree's from the repository; the two take turns, round by
round, so a slow phase of a noisy machine falls on both. Each run is a fresh interpreter: `import
nemotron`, and `nemotron --help` (what every command pays before its work). Reported: the median
seconds of each and their ratio.

    python benchmarks/startup.py --before REV [--rounds 7]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"import nemotron": ["-c", "import nemotron"], "nemotron --help": ["-m", "nemotron.cli", "--help"]}


def seconds(args: list[str], path: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(path)}
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=tempfile.gettempdir(), env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True, help="the earlier commit")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        blob = subprocess.run(["git", "archive", args.before, "nemotron"], cwd=ROOT, check=True,
                              capture_output=True).stdout
        tarfile.open(fileobj=io.BytesIO(blob)).extractall(tmp, filter="data")
        trees = {"before": Path(tmp), "now": ROOT}
        times = {(cmd, tree): [] for cmd in COMMANDS for tree in trees}
        for _ in range(args.rounds):
            for cmd, argv in COMMANDS.items():
                for tree, path in trees.items():
                    times[cmd, tree].append(seconds(argv, path))
    print(f"start-up, {args.rounds} alternated rounds, median seconds; before = {args.before}")
    print("| command | before | now | now / before |")
    print("|---|---|---|---|")
    for cmd in COMMANDS:
        before, now = (statistics.median(times[cmd, t]) for t in trees)
        print(f"| `{cmd}` | {before:.2f} | {now:.2f} | {now / before:.2f}x |")


if __name__ == "__main__":
    main()
