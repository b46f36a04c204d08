"""Judging the histories the multi-process tests record (tests/test_failover_processes.py's
``_worker``): the errors no operation may raise, and the final reads plus the linearizability
check."""

from __future__ import annotations

import time

from fusee.emulator.testkit.history import ERROR, OK, Op
from fusee.emulator.testkit.linearizability import check


def unexpected_errors(ops: list[Op]) -> list[Op]:
    """The operations that failed with anything but KeyExists / KeyNotFound."""
    return [op for op in ops if op.status == ERROR and
            op.error not in ("KeyExists", "KeyNotFound")]


def check_with_final_reads(ops: list[Op], reader, keys) -> None:
    """Append a read of every key in ``keys`` by ``reader`` (a Client) after everything, then
    assert the whole history is linearizable: so no acknowledged write was lost."""
    for key in keys:
        t = 2 * time.monotonic_ns()
        ops.append(Op(0, "reader", "get", key, None, t, t + 1, OK, reader.get(key)))
    for n, op in enumerate(ops):
        op.id = n
    verdict = check(ops)
    assert verdict.ok, verdict.explain()
