"""`nemotron serve` as a child process on a free loopback port: for tests, benchmarks and scripts
that drive the real server over HTTP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(model, *flags: str, startup_s: float = 300) -> Iterator[str]:
    """Start `nemotron serve --model MODEL FLAGS...` on 127.0.0.1, wait for /health, yield its base URL
    (http://127.0.0.1:PORT) and stop it on exit. A server that exits or never answers raises
    RuntimeError with the end of its stderr (kept in a file: a pipe nobody reads would fill up and
    block a long-running server)."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen([sys.executable, "-m", "nemotron.cli", "serve", "--model", str(model),
                                 "--port", str(port), *flags], stdout=subprocess.DEVNULL, stderr=errors,
                                text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})

        def tail() -> str:
            errors.seek(0)
            return errors.read()[-2000:]

        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited: {tail()}")
                try:
                    with urllib.request.urlopen(base + "/health", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not answer /health within {startup_s:.0f} s: {tail()}")
                time.sleep(0.2)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
