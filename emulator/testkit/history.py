"""What a concurrent run observed: every operation's invocation and return, in real-time order.

The simulator (and the multi-process tests) append to a ``History``; the linearizability checker
reads it. Time is a logical clock that ticks on every event, so "A returned before B was
invoked" is exact. An operation whose client crashed never returns: its outcome is unknown, and
the checker lets it take effect at any point after its invocation, or never.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OK, ERROR, CRASHED, PENDING = "ok", "error", "crashed", "pending"


@dataclass
class Op:
    """One operation of one client: ``kind`` with ``key`` and ``value`` (None when unused)."""
    id: int
    client: str
    kind: str
    key: bytes | None
    value: bytes | None
    invoke: int
    ret: int | None = None           # logical time of the return; None if it never returned
    status: str = PENDING            # ok | error | crashed | pending
    result: Any = None               # the returned value (status ok)
    error: str | None = None         # the exception's class name (status error)
    verbs: int = 0                   # verbs this op executed (the crash sweep enumerates them)
    round_trips: int = 0

    def __str__(self) -> str:
        args = ", ".join(repr(a) for a in (self.key, self.value) if a is not None)
        if self.status == OK:
            out = f"-> {self.result!r}"
        elif self.status == ERROR:
            out = f"!! {self.error}"
        else:
            out = f"?? {self.status}"
        end = "inf" if self.ret is None else self.ret
        return f"[{self.invoke:>5}, {end:>5}] {self.client}: {self.kind}({args}) {out}"


@dataclass
class History:
    """An append-only record of operations; ``ops`` is in invocation order."""
    ops: list[Op] = field(default_factory=list)
    clock: int = 0

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def invoke(self, client: str, kind: str, key: bytes | None = None,
               value: bytes | None = None) -> Op:
        op = Op(len(self.ops), client, kind, key, value, self._tick())
        self.ops.append(op)
        return op

    def ok(self, op: Op, result: Any = None) -> None:
        self._finish(op, OK)
        op.result = result

    def fail(self, op: Op, error: BaseException | str) -> None:
        self._finish(op, ERROR)
        op.error = error if isinstance(error, str) else type(error).__name__

    def crash(self, op: Op) -> None:
        """The client died during ``op``: no return event, unknown outcome."""
        if op.status != PENDING:
            raise ValueError(f"op {op.id} already finished: {op}")
        op.status = CRASHED

    def _finish(self, op: Op, status: str) -> None:
        if op.status != PENDING:
            raise ValueError(f"op {op.id} already finished: {op}")
        op.status, op.ret = status, self._tick()

    def events(self) -> list[tuple[int, str, Op]]:
        """(time, "invoke" | "return", op) in time order; crashed ops have no return."""
        evs = [(op.invoke, "invoke", op) for op in self.ops]
        evs += [(op.ret, "return", op) for op in self.ops if op.ret is not None]
        evs.sort(key=lambda e: e[0])
        return evs

    def format(self, ops: list[Op] | None = None) -> str:
        return "\n".join(str(op) for op in (self.ops if ops is None else ops))
