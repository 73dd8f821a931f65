"""Start a model server as a subprocess, wait until it is ready, stop it cleanly.

Benchmarks, tests and notebooks need a real server (a real socket, a real uvicorn, a
real SIGTERM) without leaving stray processes behind. `start_server` runs
``python -m aimodels.serving.cli serve ...`` on a free 127.0.0.1 port and polls
``GET /v2/health/ready`` until it answers 200, the same readiness probe a Kubernetes
deployment would use. If the server dies or is not ready in time, it is killed and a
`RuntimeError` carries the end of its log, so the reason is in the error itself.
`ServerProcess.stop` sends SIGTERM (graceful: in-flight requests finish) and only
after `timeout` seconds SIGKILL. Use it as a context manager::

    with start_server("store/") as server:
        httpx.post(f"{server.url}/v2/models/digits/infer", json=body)

The server's output goes to a temporary log file rather than a pipe: a pipe nobody
reads fills up after 64 KiB and then blocks the server on its next log line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

__all__ = ["ServerProcess", "free_port", "start_server"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """A running server subprocess: its `url`, `pid`, log, and a clean `stop`."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path) -> None:
        self.process = process
        self.url = url
        self.log_path = log_path
        self.log = ""  # the full log, filled in by stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def read_log(self) -> str:
        """The server's stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return self.log

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.read_log().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; return the exit code.

        The exit code is 0 after a graceful shutdown, -9 if it had to be killed.
        """
        if self.running():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.log_path.exists():
            self.log = self.read_log()
            self.log_path.unlink(missing_ok=True)
        return self.process.returncode

    def kill(self) -> int:
        """SIGKILL at once (no graceful shutdown); return the exit code."""
        if self.running():
            self.process.kill()
        self.process.wait()
        return self.stop()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else f"exited {self.process.returncode}"
        return f"ServerProcess(pid={self.pid}, url={self.url!r}, {state})"


def start_server(
    store_root: str | os.PathLike[str],
    *,
    port: int | None = None,
    max_batch_size: int = 16,
    max_delay_ms: float = 5.0,
    threads: int = 1,
    env: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> ServerProcess:
    """Run ``aimodels serve`` on 127.0.0.1 and return once it is ready.

    `env` is added to this process's environment (e.g. ``AIMODELS_ADMIN_TOKEN``);
    `extra_args` go to ``serve`` as they are (e.g. ``["--max-queue-size", "8"]``).
    Raises RuntimeError, with the server's log, if it is not ready within `timeout` s.
    """
    port = free_port() if port is None else port
    command = [
        sys.executable, "-m", "aimodels.serving.cli", "serve",
        "--store", str(store_root), "--host", "127.0.0.1", "--port", str(port),
        "--max-batch-size", str(max_batch_size), "--max-delay-ms", str(max_delay_ms),
        "--threads", str(threads), *map(str, extra_args),
    ]
    log_fd, log_name = tempfile.mkstemp(prefix="aimodels-server-", suffix=".log")
    try:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    except BaseException:
        os.close(log_fd)
        Path(log_name).unlink(missing_ok=True)
        raise
    os.close(log_fd)  # the child has its own copy
    server = ServerProcess(process, f"http://127.0.0.1:{port}", Path(log_name))
    try:
        _wait_until_ready(server, timeout)
    except BaseException:
        server.kill()
        raise
    return server


def _wait_until_ready(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=2.0) as client:
        while True:
            if not server.running():
                raise RuntimeError(
                    f"the server exited with code {server.process.returncode} before it was "
                    f"ready; its log ends with:\n{server.log_tail()}"
                )
            try:
                if client.get(f"{server.url}/v2/health/ready").status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server at {server.url} was not ready within {timeout} s; its log "
                    f"ends with:\n{server.log_tail()}"
                )
            time.sleep(0.1)
