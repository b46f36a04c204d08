"""Run a sans-IO operation on anything with an ``execute(batch) -> completions`` method.

An operation is a generator: it yields a batch of requests (fusee.verbs), receives the list of
completions, and finally returns its result. A failed batch is thrown into the generator as the
transport's exception, so the operation decides what a dead node or a refused verb means.
"""

from __future__ import annotations

from typing import Any, Generator

from fusee.verbs import Batch, TransportError

Operation = Generator[Batch, list, Any]


def run(op: Operation, transport) -> Any:
    """Drive ``op`` to completion, one round trip per yielded batch; return its result."""
    try:
        batch = op.send(None)
        while True:
            try:
                results = transport.execute(batch)
            except TransportError as e:
                batch = op.throw(e)
            else:
                batch = op.send(results)
    except StopIteration as stop:
        return stop.value
