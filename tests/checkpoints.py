"""Helpers for tests that corrupt real checkpoints: raw safetensors header surgery, a sharded tiny
checkpoint, the CLI as a subprocess, and a per-case deadline."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from nemotron.io.checkpoint import save_checkpoint
from nemotron.config.presets import toy_super_config
from nemotron.io.random_checkpoint import init_checkpoint
from nemotron.models.init import init_weights_
from nemotron.models import build_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def read_raw(path: Path) -> tuple[dict, bytes]:
    """A safetensors file as (header dict, data buffer), without validation."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_raw(path: Path, header: dict | bytes, data: bytes) -> None:
    """A safetensors file from a header (written as given, offsets included) and a data buffer."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def toy_checkpoint(out: Path) -> Path:
    """The toy Nemotron 3 Super layout (Mamba, attention, LatentMoE, MTP) with its tokenizer."""
    return init_checkpoint(out, toy_super_config(), seed=0)


def sharded_checkpoint(out: Path, max_shard_bytes: int = 200_000) -> Path:
    """The same tiny model saved in several shards with a model.safetensors.index.json."""
    single = toy_checkpoint(out.parent / (out.name + "-single"))
    config = toy_super_config()
    save_checkpoint(init_weights_(build_model(config), config, 0), config, out, max_shard_bytes=max_shard_bytes)
    for name in TOKENIZER_FILES:
        shutil.copy(single / name, out / name)
    assert (out / "model.safetensors.index.json").is_file()
    return out


def cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nemotron.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]


class Timeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise Timeout in the main thread after `seconds` (a blocking open() is interrupted too)."""
    def expire(signum, frame):
        raise Timeout(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
