"""Run sans-IO operations on anything with an ``execute(batch) -> completions`` method.

An operation is a generator: it yields a batch of requests (fusee.verbs), receives the list of
completions, and finally returns its result. A failed batch is thrown into the generator as the
transport's exception, so the operation decides what a dead node or a refused verb means.

``run`` drives one operation. ``run_concurrently`` keeps several in flight, like the paper's
coroutines sharing a doorbell: each step posts ONE batch made of every in-flight operation's
next batch, and hands each operation its own slice of the completions.

The two requests that are not verbs are the driver's to interpret, never the executor's: a
transport only executes verbs. An operation backing off (``Backoff``) sleeps here (or, among
others in flight, just gets its turn again); one awaiting the next membership epoch
(``AwaitMembership``) asks the executor's ``await_membership`` hook for it, alone. Only an
executor that can learn of new epochs has that hook (``fusee.client``'s lease guard, which
hears the master); with any other, nobody fails a dead node over, and the operation gets
NodeTimeout at once. A new epoch reaches every operation in flight.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final, NoReturn
from collections.abc import Callable, Iterable

from fusee.errors import batch_failure
from fusee.hashing import key_hash
from fusee.layout import check_key
from fusee.search import first_answer, first_round, search
from fusee.verbs import (AwaitMembership, Backoff, EpochChanged, NodeTimeout, Op, Step, T,
                         TransportError)

if TYPE_CHECKING:
    from fusee.index import View
    from fusee.operations import ClientCore

Operation = Op[Any]
#: an operation in flight: its index among the operations, itself, the batch it yielded last
Flight = tuple[int, Operation, Step]
#: the requests that are not verbs, interpreted by the driver (always alone in their step)
NOT_VERBS = (Backoff, AwaitMembership)


def await_membership(executor: Any, epoch: int) -> NoReturn:
    """The answer to ``AwaitMembership(epoch)``: raise EpochChanged with the next membership
    epoch, as the executor learns it, or the NodeTimeout (or lease error) that says none will
    come. An executor without the hook has no master to fail a node over."""
    hook = getattr(executor, "await_membership", None)
    if hook is None:
        raise NodeTimeout("a memory node stopped answering, and a bare transport has no "
                          "master to fail it over (a Client on a cluster with a master "
                          "waits for the failover)", None, [None])
    hook(epoch)
    raise TypeError(f"{type(executor).__name__}.await_membership returned: it must raise "
                    f"the next epoch (EpochChanged) or why none comes")


def _not_a_verb(request: object, executor: Any) -> list[Any]:
    """Interpret ``request``, an operation's whole step: the completions of a Backoff."""
    if type(request) is Backoff:
        time.sleep(request.seconds)
        return [None]
    assert type(request) is AwaitMembership, f"not in NOT_VERBS: {request!r}"
    await_membership(executor, request.epoch)


def observed(op: Op[T], see: Callable[[Step], None]) -> Op[T]:
    """Generator: ``op`` itself, step for step, as ``yield from op`` would run it (completions
    sent, errors thrown in, closed when closed), with ``see(step)`` called as each step goes
    out: a report that counts an operation's round trips (``fusee.recovery``) without a
    trampoline of its own."""
    try:
        step = op.send(None)
        while True:
            see(step)
            try:
                completions = yield step
            except GeneratorExit:
                op.close()
                raise
            except BaseException as e:
                step = op.throw(e)
            else:
                step = op.send(completions)
    except StopIteration as stop:
        result: T = stop.value
        return result


def run(op: Op[T], executor: Any) -> T:
    """Drive ``op`` to completion, one round trip per yielded batch; return its result.

    Anything else the transport raises (KeyboardInterrupt, the lease running out) ends the
    operation where it stands: it is closed at once, so that it knows (``ClientCore.tracked``)
    rather than whenever the garbage collector gets to it. ``run_in_python`` is the loop;
    it runs in C (``_RUN_IN_C``, the same loop) where the extension is built."""
    if _RUN_IN_C is not None:
        result: T = _RUN_IN_C(op, executor)
        return result
    return run_in_python(op, executor)


def run_in_python(op: Op[T], executor: Any) -> T:
    """``run``'s loop, the spec of ``_atomic.driver``'s (tests/test_driver_in_c.py holds
    the two equal on every path)."""
    try:
        batch = op.send(None)
        while True:
            try:
                if batch and type(batch[0]) in NOT_VERBS:
                    results = _not_a_verb(batch[0], executor)
                else:
                    results = executor.execute(batch)
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


def _run_in_c() -> Callable[[Any, Any], Any] | None:
    try:
        from fusee.emulator import _atomic
    except ImportError:     # pragma: no cover (a source tree without its build)
        return None
    make: Callable[..., Any] | None = getattr(_atomic, "driver", None)     # (None: a stale build)
    return None if make is None else make(NOT_VERBS, _not_a_verb, TransportError)


#: ``run_in_python`` in C: the generator's own send (no StopIteration made), no method looked
#: up by name but ``execute`` (issue 12: a sixth of an UPDATE's instructions, compiled)
_RUN_IN_C: Final = _run_in_c()


def step_in_python(op: Operation, arg: Any) -> Any:
    """``op.send(arg)``: the step ``op`` yields next, or, when it ends, the StopIteration it
    raised, returned instead (a fresh one: no traceback), whose ``value`` is its result.
    The spec of ``_atomic.step`` (tests/test_driver_in_c.py holds the two equal), which
    ``run_concurrently`` steps its operations through: there an operation's end costs no
    exception (``_atomic.driver``'s reason)."""
    try:
        return op.send(arg)
    except StopIteration as stop:
        return StopIteration(stop.value)


def _step_in_c() -> Callable[[Any, Any], Any] | None:
    try:
        from fusee.emulator import _atomic
    except ImportError:     # pragma: no cover (a source tree without its build)
        return None
    step: Callable[[Any, Any], Any] | None = getattr(_atomic, "step", None)
    return step


#: ``step_in_python``, in C where the extension is built
_STEP: Final = _step_in_c() or step_in_python


def run_search(core: ClientCore, key: Any, executor: Any) -> bytes | None:
    """``run(core.search(key), executor)``, with the SEARCH's first round run here rather
    than by its generator: the common case (a cache hit) is answered in one round trip with
    no generator made. The round is ``fusee.search``'s own (``first_round`` makes the
    requests, ``first_answer`` judges the completions), and when it is not the last the
    search generator takes over with it (or the transport's error) as ``first``: the same
    code, verbs and round trips as ``run(core.search(key))``."""
    limit = core.layout.max_key_size
    if type(key) is not bytes or not 0 < len(key) <= limit:     # (the common case: no call)
        key = check_key(key, limit)
    h = key_hash(key)
    if core.deferred or core.aborts:        # see ``first_rounds``
        return run(core.tracked(search(core, key, h)), executor)
    try:
        rnd = first_round(core, key, h)
        got: Any = first_answer(core, key, rnd, executor.execute(rnd[3]))
    except TransportError as e:
        got = e
    except BaseException:
        core.cut_short = True       # ended half way, as ``ClientCore.tracked`` would tell
        raise
    if type(got) is bytes:
        return got
    return run(core.tracked(search(core, key, h, (rnd, got))), executor)


def first_rounds(core: ClientCore, keys: list[bytes], executor: Any
                 ) -> list[bytes | Op[bytes | None]]:
    """The first rounds of the SEARCHes of ``keys`` (checked already: ``check_key``),
    merged into one batch: per key, its value when that round answered it (a cache hit),
    else its search generator (``core.search``'s), to be run on from that round
    (``fusee.search.search``'s ``first``). A batch that fails gives each search the error
    its own requests would have met alone (as ``run_concurrently`` does). A client that
    owes frees or ABORTED marks (its round trips carry them: ``ClientCore.rt``) gets the
    generators, not started."""
    if core.deferred or core.aborts:
        return [core.tracked(search(core, key, key_hash(key))) for key in keys]
    hashes = []
    rounds = []
    merged: list[Any] = []
    error: TransportError | None = None
    try:
        for key in keys:
            h = key_hash(key)
            rnd = first_round(core, key, h)
            merged.extend(rnd[3])
            hashes.append(h)
            rounds.append(rnd)
        completions: list[Any] | None
        try:
            completions = executor.execute(merged)
        except TransportError as e:
            completions, error = e.results, e
        out: list[bytes | Op[bytes | None]] = []
        start = 0
        for j, rnd in enumerate(rounds):        # (compiled: no tuple per key, as zip makes)
            key = keys[j]
            end = start + len(rnd[3])
            own = None if error is None else _own_failure(error, completions, start, end)
            got: bytes | View | BaseException
            if own is not None:
                got = own
            else:
                assert completions is not None, "no completions: each failed (own)"
                got = first_answer(core, key, rnd, completions, start)
            start = end
            out.append(got if type(got) is bytes
                       else core.tracked(search(core, key, hashes[j], (rnd, got))))
    except BaseException:
        core.cut_short = True       # ended half way, as ``ClientCore.tracked`` would tell
        raise
    return out


def run_concurrently(ops: Iterable[Operation], executor: Any, depth: int = 0,
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
            first: Any = _STEP(op, None)
            if type(first) is StopIteration:
                finish(index, first.value)
            else:
                active.append((index, op, first))

    execute = executor.execute
    after: Any              # an operation's next step, or the StopIteration that ends it
    try:
        admit()
        while active:
            if len(active) == 1:                # alone in flight: exactly what run() does
                index, op, batch = active[0]
                try:
                    if batch and type(batch[0]) in NOT_VERBS:
                        got = _not_a_verb(batch[0], executor)
                    else:
                        got = execute(batch)
                except TransportError as e:
                    try:
                        after = op.throw(e)
                    except StopIteration as stop:
                        after = StopIteration(stop.value)
                else:
                    after = _STEP(op, got)
                if type(after) is StopIteration:
                    active.clear()
                    finish(index, after.value)
                    admit()
                else:
                    active[0] = (index, op, after)
                continue
            merged: list[Any] = []
            ends: list[int] = []        # where each operation's slice ends; -1: no verbs
            pause = 0.0
            awaiting = False
            for _, _, batch in active:
                if batch and type(batch[0]) not in NOT_VERBS:   # verbs: the common case
                    merged += batch
                    ends.append(len(merged))
                    continue
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
                _await_together(active, executor, finish)
                admit()
                continue
            completions: Any = []       # None when a failure has no per-request detail
            error: TransportError | None = None
            try:
                if merged:
                    completions = execute(merged)
                else:                           # every one backs off: the longest wait
                    time.sleep(pause)
            except TransportError as e:
                completions, error = e.results, e
            still = []
            end = 0
            for (index, op, _), slice_end in zip(active, ends):
                start = end
                try:
                    if error is None and slice_end >= 0:    # the common case
                        end = slice_end
                        after = _STEP(op, completions[start:end])
                    elif slice_end < 0:         # a new epoch reaches it too
                        after = (op.throw(error) if isinstance(error, EpochChanged)
                                 else op.send([None]))
                    else:
                        assert error is not None, "a failed batch's slice"
                        end = slice_end
                        own = _own_failure(error, completions, start, end)
                        after = (op.throw(own) if own is not None
                                 else op.send(completions[start:end]))
                except StopIteration as stop:
                    after = StopIteration(stop.value)
                if type(after) is StopIteration:
                    finish(index, after.value)
                else:
                    still.append((index, op, after))
            active[:] = still
            admit()
    except BaseException:
        for _, op, _ in active:
            op.close()
        raise
    return None if on_done else [results[i] for i in range(len(results))]


def _await_together(active: list[Flight], executor: Any,
                    finish: Callable[[int, Any], None]) -> None:
    """Some operations in flight wait for the next membership epoch (AwaitMembership): ask
    the executor for it once. A new epoch (EpochChanged) is thrown into every operation in
    flight, none of whose batches went out; any other answer into those that asked."""
    ask = next(b[0] for _, _, b in active if b and type(b[0]) is AwaitMembership)
    try:
        await_membership(executor, ask.epoch)
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
    return batch_failure(completions[start:end])
