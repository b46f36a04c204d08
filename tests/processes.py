"""Client processes for the multi-process tests: spawn them, collect what each reports."""

from __future__ import annotations

import multiprocessing


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
    """Set ``stop`` (an Event the processes watch) and join them; stragglers are killed after
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
    progress, stop = ctx.Array("q", clients, lock=False), ctx.Event()
    outs = [tmp_path / f"c{i}.jsonl" for i in range(clients)]
    procs = [ctx.Process(target=_worker, args=(str(config_path), i, str(outs[i]), progress,
                                               stop, fresh))
             for i in range(clients)]
    return procs, progress, stop, outs
