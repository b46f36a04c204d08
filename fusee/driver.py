"""Run sans-IO operations on anything with an ``execute(batch) -> completions`` method.

An operation is a generator: it yields a batch of requests (fusee.verbs), receives the list of
completions, and finally returns its result. A failed batch is thrown into the generator as the
transport's exception, so the operation decides what a dead node or a refused verb means.

``run`` drives one operation. ``run_concurrently`` keeps several in flight, like the paper's
coroutines sharing a doorbell: each step posts ONE batch made of every in-flight operation's
next batch, and hands each operation its own slice of the completions. The two requests that
are not verbs stay out of that batch: an operation backing off (``Backoff``) just gets its
turn again, and one awaiting the next membership epoch (``AwaitMembership``) has it asked for
alone; a new epoch reaches every operation in flight.
"""

from __future__ import annotations

from typing import Any
from collections.abc import Callable, Iterable

from fusee.verbs import (AwaitMembership, Backoff, EpochChanged, NodeTimeout, Op, Step, T,
                         TransportError)

Operation = Op[Any]
#: an operation in flight: its index among the operations, itself, the batch it yielded last
Flight = tuple[int, Operation, Step]


def run(op: Op[T], transport: Any) -> T:
    """Drive ``op`` to completion, one round trip per yielded batch; return its result.

    Anything else the transport raises (KeyboardInterrupt, the lease running out) ends the
    operation where it stands: it is closed at once, so that it knows (``ClientCore.tracked``)
    rather than whenever the garbage collector gets to it."""
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
        result: T = stop.value
        return result
    except BaseException:
        op.close()
        raise


def run_concurrently(ops: Iterable[Operation], transport: Any, depth: int = 0,
                     on_done: Callable[[int, Any], None] | None = None) -> list[Any] | None:
    """Drive ``ops`` with up to ``depth`` of them in flight (0: all at once).

    ``ops`` is consumed lazily, one operation whenever a place is free, so it may be an endless
    generator that stops by itself (at a deadline, say). Every step merges the pending batches
    of the operations in flight into one ``execute`` call: one round trip for all of them. When
    that batch fails, an operation gets the error thrown in only if a request of its own slice
    failed (the error then carries just its slice as ``results``); the others go on with their
    completions.

    Without ``on_done``, returns the results in the order of ``ops``. With it, calls
    ``on_done(index, result)`` as each operation finishes and returns None. An exception raised
    by an operation closes the others still in flight and propagates, as in ``run``.
    """
    results: dict[int, Any] = {}
    finish = on_done or results.__setitem__
    source = enumerate(ops)
    active: list[Flight] = []

    def admit() -> None:
        while not depth or len(active) < depth:
            try:
                index, op = next(source)
            except StopIteration:
                return
            try:
                batch = op.send(None)
            except StopIteration as stop:
                finish(index, stop.value)
            else:
                active.append((index, op, batch))

    execute = transport.execute
    try:
        admit()
        while active:
            if len(active) == 1:                # alone in flight: exactly what run() does
                index, op, batch = active[0]
                try:
                    try:
                        completions = execute(batch)
                    except TransportError as e:
                        batch = op.throw(e)
                    else:
                        batch = op.send(completions)
                except StopIteration as stop:
                    active.clear()
                    finish(index, stop.value)
                    admit()
                else:
                    active[0] = (index, op, batch)
                continue
            merged: list[Any] = []
            ends: list[int] = []        # where each operation's slice ends; -1: no verbs
            pause = 0.0
            awaiting = False
            for _, _, batch in active:
                first = batch[0] if batch else None
                if type(first) is Backoff:      # no verb: it waits, for the others
                    pause = max(pause, first.seconds)
                    ends.append(-1)
                elif type(first) is AwaitMembership:
                    awaiting = True
                    break
                else:
                    merged += batch
                    ends.append(len(merged))
            if awaiting:
                _await_together(active, execute, finish)
                admit()
                continue
            try:
                if merged:
                    completions, error = execute(merged), None
                else:
                    completions, error = execute([Backoff(pause)]), None
            except TransportError as e:
                completions, error = e.results, e
            still = []
            end = 0
            for (index, op, _), slice_end in zip(active, ends):
                start = end
                if slice_end >= 0:
                    end = slice_end
                try:
                    if slice_end < 0:           # a new epoch reaches it too
                        batch = (op.throw(error) if isinstance(error, EpochChanged)
                                 else op.send([None]))
                    elif error is None:
                        batch = op.send(completions[start:end])
                    else:
                        own = _own_failure(error, completions, start, end)
                        batch = (op.throw(own) if own is not None
                                 else op.send(completions[start:end]))
                except StopIteration as stop:
                    finish(index, stop.value)
                else:
                    still.append((index, op, batch))
            active[:] = still
            admit()
    except BaseException:
        for _, op, _ in active:
            op.close()
        raise
    return None if on_done else [results[i] for i in range(len(results))]


def _await_together(active: list[Flight], execute: Callable[[Step], list[Any]],
                    finish: Callable[[int, Any], None]) -> None:
    """Some operations in flight wait for the next membership epoch (AwaitMembership): ask
    the executor for it once. A new epoch (EpochChanged) is thrown into every operation in
    flight, none of whose batches went out; any other answer into those that asked."""
    ask = next(b for _, _, b in active if b and type(b[0]) is AwaitMembership)
    try:
        execute(ask)
        raise TypeError("the executor answered an AwaitMembership with completions")
    except TransportError as e:
        error = e
    everyone = isinstance(error, EpochChanged)
    still = []
    for index, op, batch in active:
        try:
            if everyone or (batch and type(batch[0]) is AwaitMembership):
                batch = op.throw(error)
            still.append((index, op, batch))
        except StopIteration as stop:
            finish(index, stop.value)
    active[:] = still


def _own_failure(error: TransportError, completions: list[Any] | None, start: int,
                 end: int) -> TransportError | None:
    """The error one operation would have seen had its slice been a batch of its own."""
    if completions is None:             # no per-request detail: everyone in the batch failed
        return error
    own = completions[start:end]
    failure = None
    for r in own:
        if isinstance(r, TransportError):
            # as fusee.transports.base.raise_for_failures: a dead node outranks a refused request
            if failure is None or (isinstance(r, NodeTimeout) and
                                   not isinstance(failure, NodeTimeout)):
                failure = r
    return None if failure is None else type(failure)(str(failure), failure.node, own)
