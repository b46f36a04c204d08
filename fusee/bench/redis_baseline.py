"""The Redis baseline: what a user runs instead today, through redis-py, on this machine.

The bench starts its own ``redis-server`` on a free loopback port with a temporary directory
and no persistence, and always stops it. It installs nothing: without the server it prints how
to get it (Debian/Ubuntu: ``apt-get install redis-server``) and the bench skips this baseline.

Operations are generators like the store's: they yield batches of Redis commands, so the same
driver keeps K of them in flight; an executor sends a batch as one pipeline (one round trip).
INSERT is ``SET NX``, UPDATE ``SET XX``, DELETE ``DEL``, SEARCH ``GET``, with the store's
errors for an existing / missing key.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from collections.abc import Generator, Sequence
from typing import Any, TypeVar

from fusee.emulator.serving import stop_processes
from fusee.errors import KeyExists, KeyNotFound

T = TypeVar("T")
#: an operation on Redis: yields batches of commands (tuples), is sent their replies
Command = Generator[list[tuple[Any, ...]], Any, T]

INSTALL_HINT = ("redis-server is not installed; the Redis baseline is skipped. "
                "To include it: apt-get install redis-server (Debian/Ubuntu), "
                "or put a redis-server binary on PATH.")


class RedisUnavailable(RuntimeError):
    """No redis-server binary to run, or it would not start."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class RedisServer:
    """A private redis-server on 127.0.0.1 (context manager; stopped and cleaned up on exit)."""

    def __init__(self, binary: str | None = None, start_timeout: float = 10.0) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise RedisUnavailable(INSTALL_HINT)
        self.binary: str = found
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.workdir: Path | None = None

    def start(self) -> RedisServer:
        import redis
        self.workdir = Path(tempfile.mkdtemp(prefix="fusee-redis-"))
        for _ in range(5):                         # a free port may be taken before we bind
            self.port = _free_port()
            log = self.workdir / "redis.log"
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--logfile", str(log), "--protected-mode", "yes"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + self.start_timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                try:
                    redis.Redis(port=self.port, socket_timeout=1).ping()
                    return self
                except redis.ConnectionError:
                    time.sleep(0.02)
            self._kill()
        text = (self.workdir / "redis.log").read_text(errors="replace")[-2048:] \
            if (self.workdir / "redis.log").exists() else ""
        self.stop()
        raise RedisUnavailable(f"redis-server did not start:\n{text}")

    def _kill(self) -> None:
        p, self.proc = self.proc, None
        if p is not None:
            stop_processes([p])

    def stop(self) -> None:
        self._kill()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisExecutor:
    """Runs a batch of commands: one command directly, several as one pipeline."""

    def __init__(self, port: int, timeout: float) -> None:
        import redis
        self.client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout,
                                  socket_connect_timeout=timeout)
        self.round_trips = self.commands = 0

    def execute(self, batch: Sequence[tuple[Any, ...]]) -> list[Any]:
        self.round_trips += 1
        self.commands += len(batch)
        if len(batch) == 1:
            # redis-py leaves execute_command unannotated
            return [self.client.execute_command(*batch[0])]  # type: ignore[no-untyped-call]
        pipe = self.client.pipeline(transaction=False)
        for cmd in batch:
            pipe.execute_command(*cmd)  # type: ignore[no-untyped-call]
        return pipe.execute()

    def close(self) -> None:
        self.client.close()


def search(key: bytes) -> Command[bytes | None]:
    (value,) = yield [("GET", key)]
    found: bytes | None = value
    return found


def insert(key: bytes, value: bytes) -> Command[None]:
    (ok,) = yield [("SET", key, value, "NX")]
    if not ok:
        raise KeyExists(key)


def update(key: bytes, value: bytes) -> Command[None]:
    (ok,) = yield [("SET", key, value, "XX")]
    if not ok:
        raise KeyNotFound(key)


def delete(key: bytes) -> Command[None]:
    (n,) = yield [("DEL", key)]
    if not n:
        raise KeyNotFound(key)
