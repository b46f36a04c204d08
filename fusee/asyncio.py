"""The store for services that already run an asyncio event loop.

    from fusee.asyncio import Client

    async with await Client.connect("cluster.toml") as kv:
        await kv.put(b"k", b"v")
        await kv.get(b"k")                          # b"v"; None when absent
        await kv.insert(b"n", b"1"); await kv.update(b"n", b"2"); await kv.delete(b"n")
        await kv.put_many({b"a": b"1"}); await kv.get_many([b"a", b"b"])
        async with kv.pipeline() as p:              # runs when the block ends
            p.get(b"a").delete(b"a")
        p.results

It drives the very sans-IO operations the synchronous ``fusee.client.Client`` drives (that
client is inside, and does the opening, settling and closing), and keeps the loop free while
they wait:

- shm and local verbs are synchronous memory operations: a batch made only of them runs
  inline, in the loop, as the synchronous client would run it (a few microseconds);
- a batch that waits on the network or on a process (zmq round trips, block allocation on a
  memory node, the lease guard while the master fails a node over) runs on one worker thread
  per client, which the loop awaits; so do the rare steps that run several round trips at
  once (opening, settling an operation cut short, closing) and each batch of operations
  (``get_many``, ``put_many``, ``pipeline``: ``fusee.batch`` on the synchronous client);
- an operation backing off (``Backoff``) awaits ``asyncio.sleep``, and one awaiting the next
  membership epoch (``AwaitMembership``) awaits the worker asking for it as
  ``fusee.driver.run`` does.

The hand-off to the worker costs a thread switch per round trip: measured on a loaded
2-core host, a zmq ``get`` took 540-740 us against 480-510 us synchronously, while a shm
``get`` (inline) costs what the synchronous one does. Awaiting the replies on
``zmq.asyncio`` sockets would save that switch, at the price of a second receive path next
to ``fusee.transports.channel``'s.

Coroutines sharing a client take turns, one operation (or batch) at a time, as threads
sharing a synchronous Client do. Cancelling one (a timeout around it, say) cuts its operation
short like Ctrl-C: the next operation settles it first (``fusee.settle``); a round trip that
was already handed to the worker thread completes there before anything else runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from fusee import batch
from fusee.client import Client as SyncClient
from fusee.lease_guard import LeaseGuard
from fusee.operations import ClientCore
from fusee.driver import await_membership
from fusee.verbs import (AwaitMembership, Backoff, Batch, Cas, Faa, Op, Read, Step, T,
                         TransportError, Write)

if TYPE_CHECKING:
    from fusee.transports.base import Transport

#: the requests a shm or local transport executes in this process, without waiting
_IN_MEMORY = (Read, Write, Cas, Faa)
#: transports whose verbs are memory operations in this process
_INLINE_TRANSPORTS = ("shm", "local")


class Client:
    """An asyncio store client around a synchronous one (which it owns and closes)."""

    def __init__(self, client: SyncClient) -> None:
        self.sync = client
        self._turn = asyncio.Lock()             # one operation (or batch) at a time
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"fusee-{client.client_id}")
        self._inline = client.transport.name in _INLINE_TRANSPORTS
        guard = client.executor
        self._execute_now = (guard.execute_now if isinstance(guard, LeaseGuard)
                             else guard.execute)
        #: the worker's round trip the current operation awaits
        self._pending: Future[Any] | None = None

    @classmethod
    async def connect(cls, config_path: str | Path, transport: Transport | str | None = None,
                      client_id: int | None = None, **kwargs: Any) -> Client:
        """Open a client on the cluster described by ``config_path`` (as
        ``fusee.client.Client.connect``, on the worker thread: registering and claiming an
        id take several round trips)."""
        sync = await asyncio.get_running_loop().run_in_executor(
            None, lambda: SyncClient.connect(config_path, transport, client_id, **kwargs))
        return cls(sync)

    @property
    def client_id(self) -> int:
        return self.sync.client_id

    @property
    def stats(self) -> dict[str, Any]:
        return self.sync.stats

    async def get(self, key: bytes) -> bytes | None:
        """The key's value, or None when the key is absent."""
        return await self._run(ClientCore.search, key)

    async def insert(self, key: bytes, value: bytes) -> None:
        """Add a new key; KeyExists if it is present."""
        await self._run(ClientCore.insert, key, value)

    async def update(self, key: bytes, value: bytes) -> None:
        """Replace the value of a present key; KeyNotFound if it is absent."""
        await self._run(ClientCore.update, key, value)

    async def delete(self, key: bytes) -> None:
        """Remove a present key; KeyNotFound if it is absent."""
        await self._run(ClientCore.delete, key)

    async def put(self, key: bytes, value: bytes) -> None:
        """Insert or update."""
        await self._run(ClientCore.put, key, value)

    async def get_many(self, keys: Iterable[bytes], depth: int = batch.DEPTH
                       ) -> list[bytes | None]:
        """The keys' values (None: absent), in key order (``fusee.batch``)."""
        keys = list(batch.check_iterable(keys, "get_many takes an iterable of keys"))
        return await self._in_worker(batch.get_many, self.sync, keys, depth)

    async def put_many(self, items: Mapping[bytes, bytes] | Iterable[tuple[bytes, bytes]],
                       depth: int = batch.DEPTH) -> None:
        """Insert or update every (key, value) (``fusee.batch``)."""
        await self._in_worker(batch.put_many, self.sync, items, depth)

    def pipeline(self, depth: int = batch.DEPTH) -> Pipeline:
        """Queue operations, then run them with ``depth`` in flight (``fusee.batch``)."""
        return Pipeline(self, depth)

    async def close(self) -> None:
        """Settle, give the id back and close (``fusee.client.Client.close``). Idempotent."""
        async with self._turn:
            try:
                await asyncio.get_running_loop().run_in_executor(self._worker, self.sync.close)
            finally:
                self._worker.shutdown(wait=False)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- driving ------------------------------------------------------------------------------

    async def _in_worker(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` on the worker thread, in this client's turn."""
        async with self._turn:
            return await asyncio.get_running_loop().run_in_executor(self._worker, function,
                                                                    *args)

    async def _run(self, operation: Callable[..., Op[T]], *args: Any) -> T:
        """Run ``operation(core, *args)`` in this client's turn, holding the synchronous
        client's lock as its own operations do (``Client.ready``)."""
        async with self._turn:
            await self._hold()
            try:
                core = self.sync.core
                if core.settled:
                    core = self.sync.ready()         # the checks only: no round trip
                else:                                # a round trip or more: settle first
                    core = await self._handoff(self.sync.ready)
                return await self._drive(operation(core, *args))
            finally:
                self._let_go()

    async def _hold(self) -> None:
        """Take the synchronous client's lock; free unless a cancelled operation's round trip
        is still on the worker thread (the worker then takes it for us, after that one)."""
        lock = self.sync._lock
        if lock.acquire(blocking=False):
            return
        try:
            await asyncio.get_running_loop().run_in_executor(self._worker, lock.acquire)
        except BaseException:                 # cancelled: the worker takes it all the same
            self._worker.submit(lock.release)
            raise

    def _let_go(self) -> None:
        """Release the lock, at once or, when a round trip of ours is still running on the
        worker (we were cancelled), right after it."""
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            self._worker.submit(self.sync._lock.release)
        else:
            self.sync._lock.release()

    async def _handoff(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` on the worker thread, awaited. ``_pending`` is the worker's own
        future, not the awaitable wrapping it: a cancelled await leaves that one done while
        the worker still runs the round trip."""
        self._pending = pending = self._worker.submit(function, *args)
        result = await asyncio.wrap_future(pending)
        self._pending = None
        return result

    async def _drive(self, op: Op[T]) -> T:
        """``fusee.driver.run`` with an ``await`` where it waits: the same generator, fed
        the same completions and errors."""
        try:
            batch_ = op.send(None)
            while True:
                try:
                    results = await self._execute(batch_)
                except TransportError as e:
                    batch_ = op.throw(e)
                else:
                    batch_ = op.send(results)
        except StopIteration as stop:
            result: T = stop.value
            return result
        except BaseException:
            op.close()                # cut short: the next operation settles it
            raise

    async def _execute(self, batch_: Step) -> list[Any]:
        first = batch_[0] if batch_ else None
        if type(first) is Backoff:
            await asyncio.sleep(first.seconds)
            return [None]
        if type(first) is AwaitMembership:
            return await self._handoff(await_membership, self.sync.executor, first.epoch)
        verbs = cast(Batch, batch_)         # the two that are not verbs come alone: seen above
        if self._inline and all(type(r) in _IN_MEMORY for r in verbs):
            results = self._execute_now(verbs)
            if results is not None:
                return results
        return await self._handoff(self.sync.executor.execute, verbs)


class Pipeline:
    """Operations queued on an asyncio client, run together (``fusee.batch.Pipeline``) on
    its worker thread when ``execute`` is awaited or the ``async with`` block ends."""

    def __init__(self, client: Client, depth: int = batch.DEPTH) -> None:
        self.client = client
        self._queue = batch.Pipeline(client.sync, depth)   # checks and queues the arguments

    def get(self, key: bytes) -> Pipeline:
        self._queue.get(key)
        return self

    def insert(self, key: bytes, value: bytes) -> Pipeline:
        self._queue.insert(key, value)
        return self

    def update(self, key: bytes, value: bytes) -> Pipeline:
        self._queue.update(key, value)
        return self

    def put(self, key: bytes, value: bytes) -> Pipeline:
        self._queue.put(key, value)
        return self

    def delete(self, key: bytes) -> Pipeline:
        self._queue.delete(key)
        return self

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def results(self) -> list[Any] | None:
        return self._queue.results

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Run every queued operation; their outcomes in queue order (BatchError if any
        failed, unless ``raise_on_error`` is False)."""
        return await self.client._in_worker(self._queue.execute, raise_on_error)

    async def __aenter__(self) -> Pipeline:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: Any) -> None:
        if exc_type is None and len(self._queue):
            await self.execute()
        else:
            self._queue.__exit__(exc_type, *exc)      # drops the queue
