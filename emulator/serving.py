"""What every server process of ours does the same way: bind, report ready, know when to stop.

Memory nodes, the master and the benchmark's metadata server are started by a launcher that
waits for a ready file and expects them to exit on SIGTERM/SIGINT, or by themselves when the
launcher is gone (so a crashed test run leaves no server behind).
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from collections.abc import Callable

import zmq


class BindError(RuntimeError):
    """A server cannot listen on its endpoint; the message says why and what to change."""


class EndpointInUse(BindError):
    """Another live process serves this endpoint (or its lock file cannot be taken)."""


#: the ipc:// lock files this process holds (path -> fd), for its whole life
_held: dict[str, int] = {}


def claim_endpoint(endpoint: str) -> None:
    """Make sure no other live process serves ``endpoint``, or raise EndpointInUse.

    ZeroMQ's ipc:// bind unlinks the socket file it finds and binds a new one, so a second
    server would silently take the endpoint over from a live one. An flock on ``<path>.lock``,
    held until this process exits, tells a live owner from a file a crashed one left behind
    (the kernel drops a dead process's locks): the leftover is reclaimed. A tcp:// port in use
    fails the bind itself (no SO_REUSEPORT)."""
    if not endpoint.startswith("ipc://") or endpoint == "ipc://*":
        return
    path = os.path.abspath(endpoint[6:]) + ".lock"
    if path in _held:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise EndpointInUse(f"{endpoint}: cannot take its lock file: {e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise EndpointInUse(f"{endpoint} is served by another live process "
                            f"(it holds {path})") from None
    _held[path] = fd


def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind ``sock`` where no other live process serves (``claim_endpoint``; else
    EndpointInUse); an ``ipc://`` socket file is created owner-only. Returns the bound
    endpoint (with the port a ``tcp://host:*`` endpoint got)."""
    claim_endpoint(endpoint)
    if endpoint.startswith("ipc://"):
        Path(endpoint[6:]).parent.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        if e.errno == zmq.EADDRINUSE:
            raise EndpointInUse(f"{endpoint} is served by another process ({e.strerror}): "
                                "stop it, or choose another port") from None
        raise BindError(f"cannot listen on {endpoint} ({e.strerror}): is that address one of "
                        "this host's? Name this host's own address (or tcp://0.0.0.0:PORT) "
                        "in the config, or pass --endpoint") from None
    finally:
        os.umask(old)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def write_ready(path: str | None, **info) -> None:
    """Tell the launcher we serve: ``info`` as JSON, renamed into place atomically."""
    if path:
        tmp = path + ".tmp"
        Path(tmp).write_text(json.dumps({**info, "pid": os.getpid()}))
        os.replace(tmp, path)


def stop_condition(parent_pid: int | None) -> Callable[[], bool]:
    """A ``stop()`` that turns true after SIGTERM/SIGINT, or once ``parent_pid`` is gone
    (checked at most every 0.5 s: it costs a system call)."""
    stopping: list = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.append(True))
    last = [0.0]

    def stop() -> bool:
        now = time.monotonic()
        if parent_pid and now - last[0] > 0.5:
            last[0] = now
            if os.getppid() != parent_pid:
                return True
        return bool(stopping)

    return stop


def stop_processes(procs) -> None:
    """SIGTERM every process still running, give them 5 s together, then SIGKILL the rest."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
