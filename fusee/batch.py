"""Many operations of one client in flight at once: ``get_many``, ``put_many``, ``pipeline``.

    values = kv.get_many([b"a", b"b"])              # [value or None, ...] in key order
    kv.put_many({b"a": b"1", b"b": b"2"})
    with kv.pipeline() as p:                         # runs the queue when the block ends
        p.insert(b"c", b"3"); p.get(b"a"); p.delete(b"b")
    p.results                                        # [None, b"1", None]

A queue of operations runs through ``fusee.driver.run_concurrently``: up to ``depth`` of them
in flight, the verbs of all their next steps merged into one batch per round trip, as the
paper's coroutines share a doorbell. Only round trips are shared, never an operation's
logic: each one is exactly the operation ``Client.get`` / ``put`` / ... runs alone.

Operations on the same key run one after the other in the order they were queued (a
``put`` then a ``get`` of that key sees the put); operations on different keys run
concurrently, in no particular order, like separate clients' operations.

Each operation has its own outcome: its result, or the exception it ended with (KeyExists,
KeyNotFound, a TransportError...), which does not stop the others. ``execute`` returns the
outcomes in queue order, raising BatchError (carrying them all) if any failed, unless asked
to return the exceptions in place. Bad arguments (a key that is not bytes, a value too large)
raise at once, when the operation is queued.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import repeat
from typing import TYPE_CHECKING, Any

from fusee.driver import first_rounds, run_concurrently
from fusee.errors import INTERNAL, Arg, FuseeError, InvalidArgument, WrongType
from fusee.layout import check_key
from fusee.operations import ClientCore
from fusee.verbs import Op

if TYPE_CHECKING:
    from fusee.client import Client


#: operations in flight by default: enough to hide a network round trip behind the client's
#: work on the others, few enough that one batch stays small
DEPTH = 8


class BatchError(FuseeError):
    """Raised when some operations of a batch failed. ``results`` holds every operation's
    outcome in queue order, with the exception in place of each failed one; ``errors`` the
    (position, exception) of the failed ones; ``exit_code`` the highest of theirs."""

    def __init__(self, results: list[Any]) -> None:
        self.results = results
        self.errors = [(i, r) for i, r in enumerate(results) if isinstance(r, Exception)]
        self.exit_code = max(getattr(e, "exit_code", INTERNAL) for _, e in self.errors)
        i, first = self.errors[0]
        super().__init__(f"{len(self.errors)} of {len(results)} operations failed; the first "
                         f"(#{i}): {type(first).__name__}: {first}")


class Pipeline:
    """Operations queued on a client (``Client.pipeline``), run together by ``execute``."""

    def __init__(self, client: Client, depth: Arg = DEPTH) -> None:
        self.client, self.depth = client, check_depth(depth)
        #: (key, ClientCore operation, its arguments, the core it was made on, the operation)
        self._queue: list[tuple[bytes, Callable[..., Op[Any]], tuple[Any, ...], ClientCore,
                                Op[Any]]] = []
        self.results: list[Any] | None = None

    def get(self, key: Arg) -> Pipeline:
        return self._add(key, ClientCore.search, key)

    def insert(self, key: Arg, value: Arg) -> Pipeline:
        return self._add(key, ClientCore.insert, key, value)

    def update(self, key: Arg, value: Arg) -> Pipeline:
        return self._add(key, ClientCore.update, key, value)

    def put(self, key: Arg, value: Arg) -> Pipeline:
        return self._add(key, ClientCore.put, key, value)

    def delete(self, key: Arg) -> Pipeline:
        return self._add(key, ClientCore.delete, key)

    def _add(self, key: Arg, operation: Callable[..., Op[Any]], *args: Any) -> Pipeline:
        # made now, which checks the arguments (bad ones raise here), on the core of the
        # moment; ``execute`` makes it again only if ``Client.ready`` then hands out another
        # (a settle may replace it). Not started, it has done nothing yet.
        core = self.client.core
        made = operation(core, *args)                   # first: it checks the key's type
        self._queue.append((bytes(key), operation, args, core, made))
        return self

    def __len__(self) -> int:
        return len(self._queue)

    def execute(self, raise_on_error: Arg = True) -> list[Any]:
        """Run every queued operation; their outcomes in queue order (see the module doc)."""
        # open, not a fork's child, nothing left cut short; other threads wait till it ends
        with self.client.locked():
            return self._execute(self.client.ready(), bool(raise_on_error))  # (any truth value)

    def _execute(self, core: ClientCore, raise_on_error: bool) -> list[Any]:
        queue, self._queue = self._queue, []
        ops = [op if made_on is core else _made_again(op, operation(core, *args))
               for _, operation, args, made_on, op in queue]
        results: list[Any] = [None] * len(ops)
        keys = [item[0] for item in queue]
        flights: Iterable[Op[None]]
        if len(set(keys)) == len(keys):     # no key twice (the common case): no chains
            flights = map(_outcome, range(len(ops)), ops, repeat(results))
        else:
            chains: dict[bytes, list[tuple[int, Op[Any]]]] = {}
            for i, (key, op) in enumerate(zip(keys, ops)):
                chains.setdefault(key, []).append((i, op))
            flights = (_in_order(chain, results) for chain in chains.values())
        try:
            run_concurrently(flights, self.client.executor, self.depth, _ignore)
        except BaseException:
            for op in ops:              # those never started (the others are closed already)
                op.close()
            raise
        self.results = results
        if raise_on_error and any(isinstance(r, Exception) for r in results):
            raise BatchError(results)
        return results

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None and self._queue:
            self.execute()
        else:
            self._queue = []


def _made_again(stale: Op[Any], op: Op[Any]) -> Op[Any]:
    """``op``, made on the core the queue runs on, in place of ``stale`` (never started)."""
    stale.close()
    return op


def _outcome(i: int, op: Op[Any], results: list[Any]) -> Op[None]:
    """Generator: ``op``, its outcome into ``results[i]`` (its exception, if it raised one;
    a BaseException that is not an Exception, KeyboardInterrupt, stops them all)."""
    try:
        results[i] = yield from op
    except Exception as e:
        results[i] = e


def _in_order(chain: list[tuple[int, Op[Any]]], results: list[Any]) -> Op[None]:
    """Generator: one key's operations, one after the other; each outcome into ``results``.
    An operation's exception is its outcome (the others go on); a BaseException that is not
    an Exception (KeyboardInterrupt) stops them all."""
    for i, op in chain:
        yield from _outcome(i, op, results)


def _ignore(index: int, result: object) -> None:
    pass


def get_many(client: Client, keys: Iterable[Arg], depth: Arg = DEPTH) -> list[Any]:
    """The SEARCHes of ``keys``, ``depth`` at a time: each group's first rounds go out as
    one batch (``fusee.driver.first_rounds``), which answers the cache hits; the searches
    it did not answer go on together (``run_concurrently``) before the next group. A key
    asked twice is searched once, its outcome given to each place it was asked for: gets
    with no write between them may return one read (as a pipeline running them one after
    the other, with no write between, may too)."""
    check_depth(depth)
    limit = client.core.layout.max_key_size
    if type(keys) is not list and type(keys) is not tuple:     # (those need no check)
        keys = check_iterable(keys, "get_many takes an iterable of keys")
    keys = [key if type(key) is bytes and 0 < len(key) <= limit else check_key(key, limit)
            for key in keys]                    # all checked first (no call: bytes)
    # (a set says whether any key is asked twice, cheaper than the dict that drops them)
    distinct = keys if len(set(keys)) == len(keys) else list(dict.fromkeys(keys))
    results, went_on = _searches(client, distinct, depth)
    if distinct is not keys:
        outcome = dict(zip(distinct, results))
        results = [outcome[key] for key in keys]
    if went_on and any(isinstance(r, Exception) for r in results):
        raise BatchError(results)
    return results


def _searches(client: Client, keys: list[bytes], depth: int) -> tuple[list[Any], bool]:
    """The outcomes of the SEARCHes of ``keys`` (checked, distinct): ``get_many``'s work;
    and whether any went on past its first round (only those can fail: a first round
    answers with a value or hands its search over)."""
    results: list[Any] = [None] * len(keys)
    went_on = False
    with client.locked():
        core = client.ready()
        for start in range(0, len(keys), depth):
            group = keys if len(keys) <= depth else keys[start:start + depth]
            rest = []
            for j, got in enumerate(first_rounds(core, group, client.executor)):
                i = start + j           # (compiled, enumerate from 0 is a native loop)
                if isinstance(got, bytes):
                    results[i] = got
                else:
                    rest.append(_outcome(i, got, results))
            if rest:
                went_on = True
                try:
                    run_concurrently(rest, client.executor, depth, _ignore)
                except BaseException:
                    core.cut_short = True       # searches whose first round went out
                    raise
    return results, went_on


def put_many(client: Client, items: Mapping[Arg, Arg] | Iterable[tuple[Arg, Arg]],
             depth: Arg = DEPTH) -> None:
    p = Pipeline(client, depth)
    what = "put_many takes a mapping or an iterable of (key, value) pairs"
    for item in (items.items() if isinstance(items, Mapping) else check_iterable(items, what)):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise WrongType(f"{what}, got an item {type(item).__name__}")
        p.put(*item)
    p.execute()


def check_depth(depth: Arg) -> int:
    """``depth``, an int >= 1 (or InvalidArgument / WrongType, before anything runs)."""
    if type(depth) is not int:
        raise WrongType(f"depth is an int, got {type(depth).__name__}")
    if depth < 1:
        raise InvalidArgument(f"depth must be at least 1, got {depth}")
    return depth


def check_iterable(items: Iterable[Any], what: str) -> Iterable[Any]:
    """``items`` if it can be iterated over, else WrongType saying ``what`` (a None, an
    int: Python's own TypeError would not say which argument)."""
    if isinstance(items, (str, bytes, bytearray, memoryview)) or not hasattr(items,
                                                                               "__iter__"):
        raise WrongType(f"{what}, got {type(items).__name__}")
    return items
