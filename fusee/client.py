"""The synchronous public API: a ``Client`` drives ``ClientCore`` operations over a transport.

    kv = Client.connect("cluster.toml")        # or LocalCluster(...).client()
    kv.insert(b"k", b"v"); kv.update(b"k", b"w"); kv.get(b"k"); kv.delete(b"k")
    kv.put(b"k", b"v")                         # insert or update
    kv.get_many(keys); kv.put_many(items)      # many in flight at once (fusee.batch)
    with kv.pipeline() as p: p.get(b"k"); ...
    kv.stats                                   # round trips, verbs, bytes, cache hits, retries

Errors: one tree rooted at ``fusee.errors.FuseeError`` (KeyExists, KeyNotFound, WrongType
for keys or values that are not bytes, KeyTooLarge, ValueTooLarge, TransportError when the
network or a memory node fails, LeaseExpired, ...), each with the exit code a CLI uses.

When the cluster config names a master, the client registers with it: the master leases it an
id (a fresh or recovered one, or the one asked for) and the current membership; a background
thread renews the lease (``fusee.master.link``). While the master is unreachable the
client carries on as long as its lease is valid; once it has lapsed, operations wait (bounded)
for a renewal and carry on when a restarted master grants one (``LeaseLapsed`` if none comes in
time). Once the master has refused it, the lease is over and every operation raises
``fusee.master.logic.LeaseExpired`` before posting a verb (the master recovers the client's
unfinished operations). When a memory node dies, operations pause while the
master fails it over, then carry on in the new membership epoch (``LeaseGuard``). ``close()``
gives the id back. Without a master, the id is drawn from the MNs (``fusee.client_ids``: one
closed cleanly, else a fresh one) and claimed there (``ClientCore.open``), there is no lease,
and a dead memory node fails the operations that need it (nobody fails it over).

An operation cut short between two round trips (Ctrl-C, any exception the caller catches)
is settled before the next operation and before ``close()`` marks the id CLEAN: the client
recovers its own id and goes on with a fresh core (``fusee.settle``).

Threads: a Client may be shared by any number of threads. Its operations (single ones, and
each batch as a whole) take turns under one lock per Client, as a redis-py ``Connection``
shared through a lock would: one client id, one transport and one core (cache, slabs, log)
serve them all, and each operation still sees the store exactly as it would alone, so the
history stays linearizable. The lock costs one uncontended acquire per operation: 0.2-0.4 us
measured, about 2% of a ``get`` on shm (20 us on a loaded 2-core host), less on zmq. We
weighed a pool of per-thread clients (redis-py's ``ConnectionPool``): it would overlap the
network waits of several threads, but each thread would hold a client id of the layout's
``max_clients``, its own lease and sockets, and would leave them behind when the thread ends
without closing; the store's own answer to "many operations in flight" is ``get_many`` /
``put_many`` / ``pipeline`` (one round trip for many operations), and a thread that wants
its own round trips in flight opens its own Client.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusee import batch
from fusee.cluster_identity import check, reached
from fusee.config import ClusterConfig
from fusee.driver import run, run_search
from fusee.errors import (Arg, ClientClosed, ForkedClient, InvalidArgument, LeaseExpired,
                          LeaseLapsed, WrongType)
from fusee.fencing import identity
from fusee.lease_guard import LeaseGuard, check_reachable, identified
from fusee.membership import Membership
from fusee.client_ids import open_client
from fusee.operations import ClientCore
from fusee.replication import BACKOFF, FAST_POLLS
from fusee.recovery import MASTER, recover_client
from fusee.settle import closing, settled
from fusee.verbs import EpochChanged, Op, Read, T, TransportError

if TYPE_CHECKING:
    from fusee.transports.base import Transport
    from fusee.master.link import LeaseKeeper

def _check_transport(transport: Any) -> None:
    """WrongType unless ``transport`` executes batches and closes, as a Transport does
    (wrappers of one, like the tests' fault injectors, are welcome): anything else would
    fail at its first batch with an AttributeError naming neither."""
    if not (callable(getattr(transport, "execute", None))
            and callable(getattr(transport, "close", None))):
        raise WrongType(f"transport must be a backend name ('shm', 'zmq', 'local', 'verbs') "
                        f"or a connected Transport (fusee.transports.connect(config)), got "
                        f"{type(transport).__name__}")


#: forks this process is the child of (``os.register_at_fork``): a client opened before a fork
#: is refused in the child, at no per-operation cost but an int comparison
_forks = 0


def _forked() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_forked)


class Client:
    """A store client. It owns the transport it is given and closes it on ``close()``. It
    belongs to the process that opened it: after a fork, the child must open its own
    (operations raise ForkedClient there, and ``close()`` leaves the parent's client be).
    Threads may share it: its operations take turns under its lock (see the module doc)."""

    def __init__(self, transport: Arg, config: ClusterConfig | None = None,
                 client_id: Arg = None, cache_capacity: Arg = 65536,
                 recover: Arg = False, lease: LeaseKeeper | None = None) -> None:
        """``transport``: a connected Transport (``fusee.transports.connect``), or anything
        that executes batches and closes as one does. ``recover``: ``client_id`` was left
        in use by a client that crashed: finish its operations first (``fusee.recovery``),
        then carry on with everything it held. ``lease``: a ``LeaseKeeper`` registered
        already (else, with a master, one is made here); the client owns it from now on."""
        if isinstance(transport, str):
            raise WrongType(f"Client() takes a connected Transport; to open one by its "
                            f"backend's name, use Client.connect(config_path, "
                            f"transport={transport!r})")
        _check_transport(transport)
        if recover and client_id is None:
            raise InvalidArgument("recover=True needs the client_id to recover")
        self.transport = transport
        self.config = config or transport.config
        self.lease = lease                  # fusee.master.link.LeaseKeeper, with a master
        self.executor: Transport | LeaseGuard
        membership = Membership()
        try:
            if self.config.master:
                from fusee.master.link import LeaseKeeper, membership_wait
                if self.lease is None:
                    self.lease = LeaseKeeper(self.config, client_id)
                client_id = self.lease.client_id
                # every MN reached is this cluster's and the process the master knows,
                # before anything is read from or written to one
                membership = identified(transport, self.lease, self.config)
                # post batches here, not to .transport: the lease and the failovers need it
                self.executor = LeaseGuard(transport, self.lease, membership_wait(self.config),
                                            membership)
            else:
                self.executor = transport       # no await_membership: NodeTimeout at once
                # every MN reached is this cluster's, before anything is written to one
                # (fusee.cluster_identity: one round trip)
                run(check(self.config, reached(transport)), transport)
            # under a master, a recovery this client leaves half done is the master's to
            # finish (it recovers the id once the lease ends): the same lock owner
            owner = MASTER if self.config.master else client_id
            if recover:
                assert client_id is not None and owner is not None, "checked above"
                run(recover_client(self.config, client_id, owner=owner,
                                   membership=membership), self.executor)
            if self.lease is not None:              # the newest, and the guard knows it
                assert isinstance(self.executor, LeaseGuard), "a lease comes with a master"
                membership = self.executor.adopt(self.lease.membership)
            self.core = self._told(run(open_client(self.config, client_id, membership,
                                                   cache_capacity=cache_capacity),
                                       self.executor))
            self.recovery_owner = MASTER if self.config.master else self.core.client_id
            self.core.patience = _patience(self.config, self._round_trip())
        except BaseException:
            if self.lease is not None:
                self.lease.close()
            raise
        self.closed = False
        self._forks = _forks
        self._pid = os.getpid()
        #: held by every operation and batch from ``ready`` to its end, and by ``close``:
        #: the transport and the core serve one operation at a time
        self._lock = threading.Lock()

    def _round_trip(self, samples: int = 5) -> float:
        """Seconds one small READ takes on this transport (the best of a few; infinity when
        the batch does not go through, e.g. a failover is under way)."""
        read = [Read(self.core.meta_nodes[0], 0, 8)]
        best = float("inf")
        for _ in range(samples):
            t0 = time.perf_counter()
            try:
                self.executor.execute(read)
            except EpochChanged as e:           # the operations to come need it
                self.core.place(e.membership)
                break
            except TransportError:
                break
            best = min(best, time.perf_counter() - t0)
        return best

    @classmethod
    def connect(cls, config_path: str | Path, transport: Arg = None,
                client_id: Arg = None, *, populate: bool = True, **kwargs: Any) -> Client:
        """Open a client on the cluster described by ``config_path``; ``transport`` is a
        backend name (default: the config's) or an already connected Transport. With a
        master, the client registers first, so a new transport skips the MNs known dead.
        ``populate=False``: a client that does a few operations and exits (as one command
        of the ``fusee`` CLI does) has the shm backend map the MNs' regions page by page on
        first touch, not all at once (connecting: ~3 ms instead of ~20-30 on 3 regions of
        128 MiB; ``fusee.transports.shm``); the default suits a client that runs a while
        (no page fault on its operations). Other ``kwargs`` go to ``Client``."""
        if transport is not None and not isinstance(transport, str):
            _check_transport(transport)     # before a lease is taken for it
        config = ClusterConfig.load(config_path)
        lease = None
        if config.master:
            from fusee.master.link import LeaseKeeper
            lease = LeaseKeeper(config, client_id)
        try:
            if transport is None or isinstance(transport, str):
                from fusee.transports import connect
                dead = lease.membership.dead if lease is not None else ()
                # the MNs can refuse it once the master ends the lease (fusee.fencing)
                me = None if lease is None else identity(lease.client_id, lease.grant.token)
                backend: Transport = connect(config, transport, dead=dead, identity=me,
                                             populate=populate)
            else:
                backend = transport
            try:
                if lease is not None:
                    check_reachable(backend, lease, config)
                return cls(backend, config, client_id, lease=lease, **kwargs)
            except BaseException:
                backend.close()
                raise
        except BaseException:
            if lease is not None:
                lease.close()
            raise

    @property
    def client_id(self) -> int:
        client_id: int = self.core.client_id
        return client_id

    def _run(self, operation: Callable[..., Op[T]], *args: Any) -> T:
        """Run ``operation(core, *args)`` on a settled core (``ready``), holding the lock."""
        if self._forks != _forks:
            raise self._forked()
        with self._lock:
            return run(operation(self.ready(), *args), self.executor)

    def locked(self) -> threading.Lock:
        """The client's lock, for ``with client.locked(): core = client.ready()``: the block
        has the client to itself and a ready core, how a batch (``fusee.batch``) runs.
        Checked first: the client belongs to this process (see ``_forked``). (The lock
        itself in the ``with``, not a context manager of ours: interpreted, only a C
        ``__enter__`` leaves no moment for a Ctrl-C between taking the lock and the block
        that releases it; compiled, contextlib's would be four Python calls a batch.)"""
        if self._forks != _forks:
            raise self._forked()
        return self._lock

    def _forked(self) -> ForkedClient:
        # checked before the lock is taken: a thread of the parent may have held it when the
        # process forked, and in the child nobody would ever release it
        return ForkedClient(f"this client was opened in process {self._pid}, which forked "
                            f"since: open a new client in process {os.getpid()}")

    def ready(self) -> ClientCore:
        """The core every operation of this client must run on, checked first: the client
        is open and belongs to this process (not a fork's child), and an operation cut short
        before (a KeyboardInterrupt caught by the caller, say) is settled (``fusee.settle``).
        Single operations and batches (``fusee.batch``) alike go through here, holding the
        client's lock."""
        if self.closed:
            raise ClientClosed("this client is closed: open a new one")
        if self._forks != _forks:
            raise self._forked()
        if not self.core.settled:
            self.core = self._told(run(settled(self.core, self.recovery_owner), self.executor))
        return self.core

    def _told(self, core: ClientCore) -> ClientCore:
        """``core``, its allocator following the rebuilds the master's grants announce
        (``Allocator.follow``: while one copies, new objects go to fresh blocks only)."""
        if self.lease is not None:
            lease = self.lease
            core.alloc.news = lambda: lease.rebuilding
        return core

    def get(self, key: Arg) -> bytes | None:
        """The key's value, or None when the key is absent."""
        if self._forks != _forks:
            raise self._forked()
        # (``with``, not acquire() then try: interpreted, a Ctrl-C pending as acquire()
        # returns would be raised before the try, and the lock left held for good)
        with self._lock:
            core = self.core
            if self.closed or not core.settled:     # (``ready``'s common case inline)
                core = self.ready()
            return run_search(core, key, self.executor)

    def insert(self, key: Arg, value: Arg) -> None:
        """Add a new key; KeyExists if it is present. (``_run``'s steps written out, as in
        ``get``: a load is inserts one by one, and compiled, ``_run``'s ``*args`` call of
        the operation and ``ready`` cost about 1k instructions an insert.)"""
        if self._forks != _forks:
            raise self._forked()
        with self._lock:                            # (``with``: see ``get``)
            core = self.core
            if self.closed or not core.settled:     # (``ready``'s common case inline)
                core = self.ready()
            run(core.insert(key, value), self.executor)

    def update(self, key: Arg, value: Arg) -> None:
        """Replace the value of a present key; KeyNotFound if it is absent."""
        self._run(ClientCore.update, key, value)

    def delete(self, key: Arg) -> None:
        """Remove a present key; KeyNotFound if it is absent."""
        self._run(ClientCore.delete, key)

    def put(self, key: Arg, value: Arg) -> None:
        """Insert or update."""
        self._run(ClientCore.put, key, value)

    def get_many(self, keys: Iterable[Arg], depth: Arg = batch.DEPTH) -> list[bytes | None]:
        """The keys' values (None: absent), in key order, with ``depth`` lookups in flight
        (``fusee.batch``); BatchError if any failed."""
        return batch.get_many(self, keys, depth)

    def put_many(self, items: Mapping[Arg, Arg] | Iterable[tuple[Arg, Arg]],
                 depth: Arg = batch.DEPTH) -> None:
        """Insert or update every (key, value) of a mapping or iterable, ``depth`` at a time
        (``fusee.batch``); BatchError if any failed."""
        batch.put_many(self, items, depth)

    def pipeline(self, depth: Arg = batch.DEPTH) -> batch.Pipeline:
        """Queue operations, then run them with ``depth`` in flight (``fusee.batch``)."""
        return batch.Pipeline(self, depth)

    @property
    def stats(self) -> dict[str, Any]:
        """Transport counters (round_trips, verbs, bytes_out, ...) and the core's (cache_hits,
        cache_misses, retries, lost SNAPSHOT rounds, splits, blocks, reclaimed objects)."""
        return {**self.transport.stats.as_dict(), **self.core.stats}

    def close(self) -> None:
        """Settle an operation cut short (``fusee.settle``), send deferred frees and log
        marks, mark the id CLEAN, give it back to the master (if any), then close the
        transport. Idempotent. Cut short itself (a second Ctrl-C), it leaves the id IN_USE:
        the master recovers it, or ``Client(..., client_id=N, recover=True)``. In a child forked
        after the client opened, only this object is closed: the parent's client carries on."""
        if self.closed:
            return
        if self._forks != _forks:      # the id, lease and sockets are the parent's
            self.closed = True
            return
        with self._lock:                # after the operation in flight, if any
            if self.closed:     # another thread closed it while this one waited for the lock
                return          # type: ignore[unreachable]  # (mypy keeps the check above)
            try:
                self.core = run(closing(self.core, self.recovery_owner), self.executor)
            except (LeaseExpired, LeaseLapsed):
                pass            # too late to write: the master recovers what is left
            finally:
                self.closed = True
                if self.lease is not None:
                    self.lease.close()
                self.transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _patience(config: ClusterConfig, rtt: float) -> int:
    """How many re-reads an operation may spend waiting on another client before it calls
    that client crashed (Stalled): as many as fit, at round-trip time ``rtt`` plus the
    back-off between re-reads, in twice the time a master needs to notice a crash, pause
    everyone and fail over or recover."""
    from fusee.master.link import membership_wait
    return FAST_POLLS + int(2 * membership_wait(config) / (min(rtt, 1.0) + BACKOFF))
