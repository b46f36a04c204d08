"""Client processes for the multi-process tests: spawn them, collect what each reports."""

from __future__ import annotations

import multiprocessing
import time


def wait_for(predicate, what, timeout: float = 60.0, interval: float = 0.05):
    """Poll until ``predicate()`` is truthy and return its value: the one poll-until of the
    tests. ``what`` names the wait in the failure (a callable: a message made then, a log's
    text). The bound is generous, never a timing assertion; a predicate may fail at once
    (asserting that the process it waits on still runs)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what() if callable(what) else what}")
        time.sleep(interval)


class StopFlag:
    """A stop flag shared with spawned processes, without a lock: a ``multiprocessing.Event``
    takes a lock in ``is_set``, and a process that a SIGINT (or SIGKILL) interrupts between
    taking it and leaving the ``with`` keeps it for good, so every other process blocks in
    ``is_set`` (seen in CI: a SIGINTed worker wedged the rest for 300 s)."""

    def __init__(self, ctx) -> None:
        self._flag = ctx.RawValue("b", 0)

    def set(self) -> None:
        self._flag.value = 1

    def is_set(self) -> bool:
        return bool(self._flag.value)


def run_processes(target, argss):
    """Run ``target(*args, out)`` in one spawned process per ``args``; return what each put on
    ``out``, and fail if any of them did not exit cleanly. Stragglers are killed."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, out)) for a in argss]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    return results


def stop_processes(procs, stop, timeout: float = 60.0) -> list:
    """Set ``stop`` (a ``StopFlag`` the processes watch) and join them; stragglers are killed after
    ``timeout``. Returns their exit codes."""
    stop.set()
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def worker_processes(config_path, tmp_path, clients: int, fresh: float = 0.0):
    """``clients`` client processes (not started) running tests/test_failover_processes.py's
    ``_worker`` on the cluster of ``config_path``, each writing its history to ``tmp_path``:
    (procs, progress, stop, outs)."""
    from test_failover_processes import _worker
    ctx = multiprocessing.get_context("spawn")
    progress, stop = ctx.Array("q", clients, lock=False), StopFlag(ctx)
    outs = [tmp_path / f"c{i}.jsonl" for i in range(clients)]
    procs = [ctx.Process(target=_worker, args=(str(config_path), i, str(outs[i]), progress,
                                               stop, fresh))
             for i in range(clients)]
    return procs, progress, stop, outs
