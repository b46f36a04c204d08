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
master fails it over, then carry on in the new membership epoch (``_LeaseGuard``). ``close()``
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
from typing import TYPE_CHECKING, Any, NoReturn

from fusee import batch
from fusee.cluster_identity import check, check_transport, reached
from fusee.config import ClusterConfig
from fusee.driver import run, run_search
from fusee.errors import (Arg, ClientClosed, ForkedClient, InvalidArgument, LeaseExpired,
                          LeaseLapsed, NodeRestarted, WrongType)
from fusee.fencing import identity
from fusee.membership import Membership
from fusee.client_ids import open_client
from fusee.operations import ClientCore
from fusee.replication import BACKOFF, FAST_POLLS
from fusee.recovery import MASTER, recover_client
from fusee.settle import closing, settled
from fusee.verbs import Batch, EpochChanged, NodeTimeout, Op, Read, T, TransportError

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
        self.executor: Transport | _LeaseGuard
        membership = Membership()
        try:
            if self.config.master:
                from fusee.master.link import LeaseKeeper, membership_wait
                if self.lease is None:
                    self.lease = LeaseKeeper(self.config, client_id)
                client_id = self.lease.client_id
                # every MN reached is this cluster's and the process the master knows,
                # before anything is read from or written to one
                membership = _identified(transport, self.lease, self.config)
                # post batches here, not to .transport: the lease and the failovers need it
                self.executor = _LeaseGuard(transport, self.lease, membership_wait(self.config),
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
                assert isinstance(self.executor, _LeaseGuard), "a lease comes with a master"
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
                client_id: Arg = None, **kwargs: Any) -> Client:
        """Open a client on the cluster described by ``config_path``; ``transport`` is a
        backend name (default: the config's) or an already connected Transport. With a
        master, the client registers first, so a new transport skips the MNs known dead."""
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
                backend: Transport = connect(config, transport, dead=dead, identity=me)
            else:
                backend = transport
            try:
                if lease is not None:
                    _check_reachable(backend, lease, config)
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


def _check_reachable(transport: Transport, lease: LeaseKeeper, config: ClusterConfig) -> None:
    """Raise NodeTimeout for an MN that did not answer this client's transport (it keeps a
    placeholder region of length 0) while the master counts it alive: a wrong endpoint in
    the config, or no route from this host. Otherwise operations would wait for a failover
    that never comes (``membership_wait``, half a minute) and then fail naming no node. An
    MN that just died is told apart by giving the master ``mn_lease`` seconds to notice: it
    then pauses the clients or publishes a new epoch, and the failover takes its course."""
    _reach_rebuilt(transport, lease, lease.membership)
    silent = sorted(n for n, r in transport.regions.items()
                    if r.length == 0 and n not in lease.membership.dead)
    if not silent:
        return
    epoch = lease.membership.epoch
    if _news(lease, lambda: bool(lease.pause) or lease.membership.epoch != epoch,
             config.mn_lease):
        return
    node = config.node(silent[0])
    raise NodeTimeout(f"MN {node.id} at {node.endpoint} did not answer within "
                      f"{transport.timeout:g} s, yet the master hears from it: check its "
                      "endpoint in the cluster config, and that this host can reach it", node.id)


def _identified(transport: Transport, lease: LeaseKeeper, config: ClusterConfig
                ) -> Membership:
    """Check every MN ``transport`` reached that is alive in the lease's membership: it is
    this cluster's (WrongMemoryNode) and the very process the master knows, by the
    incarnation in its header (``fusee.cluster_identity.restarted``); -> the membership
    checked. An MN restarted since the master's last ping serves an empty region that the
    master counts alive until its next one (a quarter of an MN lease): as dead to this
    client as a silent MN, so it waits (up to ``membership_wait``) for the master to fail
    it over, then checks again; NodeRestarted if no failover comes."""
    from fusee.master.link import membership_wait
    wait = membership_wait(config)
    while True:
        with lease.news:                # (the keeper changes both together)
            membership, known = lease.membership, lease.incarnations
        _reach_rebuilt(transport, lease, membership)
        gone = check_transport(transport, set(reached(transport)) - membership.dead, known)
        if not gone:
            return membership
        epoch = membership.epoch

        def moved(epoch: int = epoch) -> bool:
            return lease.membership.epoch != epoch or lease.ended

        if not _news(lease, moved, wait):
            node = config.node(min(gone))
            raise NodeRestarted(f"MN {node.id} at {node.endpoint} restarted (its incarnation "
                                f"is not the one the master knows), and the master published "
                                f"no membership after epoch {epoch} within {wait:g} s: "
                                f"{lease.data_lost or 'is the master running?'}", node.id)
        lease.check(wait)


def _reach_rebuilt(transport: Transport, lease: LeaseKeeper, membership: Membership) -> None:
    """Reconnect ``transport`` to the MNs ``membership`` has rebuilt since it connected (after
    the lease's grant) or that it did not reach: it took them for dead, or reached a process
    that restarted since, and a rebuild published meanwhile brought them back. Operations
    handed ``membership`` would otherwise meet them as dead and wait, in vain, for an epoch
    after it (``_LeaseGuard._await`` revives only those rebuilt in an epoch it hands over)."""
    since = lease.grant.membership.epoch if lease.grant.membership is not None else 0
    stale = {n for n, e in membership.rebuilt_at.items() if e > since}
    if back := (stale | (membership.rebuilt - set(reached(transport)))) - membership.dead:
        transport.revive(back)


def _news(lease: LeaseKeeper, done: Callable[[], bool], seconds: float) -> bool:
    """Wait up to ``seconds`` for ``done()``, looked at whenever the lease keeper has news
    (it renews often meanwhile: ``expect_news``); -> ``done()``."""
    deadline = time.monotonic() + seconds
    lease.expect_news(True)
    try:
        with lease.news:
            while not done() and (left := deadline - time.monotonic()) > 0:
                lease.news.wait(left)
            return done()
    finally:
        lease.expect_news(False)


def _patience(config: ClusterConfig, rtt: float) -> int:
    """How many re-reads an operation may spend waiting on another client before it calls
    that client crashed (Stalled): as many as fit, at round-trip time ``rtt`` plus the
    back-off between re-reads, in twice the time a master needs to notice a crash, pause
    everyone and fail over or recover."""
    from fusee.master.link import membership_wait
    return FAST_POLLS + int(2 * membership_wait(config) / (min(rtt, 1.0) + BACKOFF))


#: seconds between two looks at the lease keeper's news while a batch awaits late replies
LATE_POLL = 0.05


class _LeaseGuard:
    """The transport as operations see it under a master's lease.

    No batch is posted while the lease is not valid (one clock read per batch: a lapsed lease
    is waited for, up to ``wait``), nor while the master has the client paused for a
    failover; each batch is posted holding the keeper's ``gate``, so a pause waits for the
    batch in flight. A membership newer than the one the
    operations have is handed to them as ``EpochChanged`` instead of posting the batch; so is
    the answer to ``AwaitMembership`` (the driver asks ``await_membership``), once the master
    has published the next epoch (waited for up to ``wait`` seconds, longer while the master
    reports a rebuild running, else NodeTimeout).

    A batch that an MN did not answer within the transport's timeout is not failed at once
    (``_late``): a timeout is only a suspicion, and the master's failure detector (the MN
    lease, longer than the timeout) decides whether the MN is dead. Until the master says so
    (a pause, a new epoch) the batch's late replies are awaited (``Transport.late``): a
    stalled MN process executes what it was sent once it runs again, so each verb runs
    exactly once and its late completion says what it did; the operation then carries on as
    after a slow round trip, in the same epoch, with nothing sent again. Once the master
    pauses the client (or the lease ends, or ``wait`` goes by), the batch fails with its
    NodeTimeout as before and the operation settles it from the next epoch's decisions.
    The late completions are taken only if no pause was acked while they were awaited
    (checked holding the gate): a reply that came before the client heard of a pause is one
    a batch in flight could have had anyway, while after an ack the failover may have run."""

    def __init__(self, transport: Transport, lease: LeaseKeeper, wait: float,
                 membership: Membership) -> None:
        self.transport, self.lease, self.wait = transport, lease, wait
        self.handed = membership.epoch              # the epoch the operations have
        #: when the batch that met a silent MN was posted, if no late reply came for it: the
        #: wait for the next epoch counts from then (it covers the master's detection)
        self.silent_since: float | None = None

    def adopt(self, membership: Membership) -> Membership:
        """The operations have ``membership`` from elsewhere (a new ClientCore)."""
        self.handed = membership.epoch
        return membership

    def execute(self, batch: Batch) -> list[Any]:
        # the wait for an epoch counts from a silent batch only when asked for right after it
        self.silent_since = None
        k = self.lease
        while True:
            if time.monotonic() >= k.expires:       # lapsed: wait for the master to renew it
                k.await_valid(self.wait)
            silent = None
            with k.gate:
                if not k.pause and k.membership.epoch == self.handed:
                    acks = k.acks
                    try:
                        return self.transport.execute(batch)
                    except NodeTimeout as e:
                        silent = e
            if silent is not None:
                return self._late(batch, silent, acks)
            self._await(self.handed, resume=True)

    def _late(self, batch: Batch, silent: NodeTimeout, acks: int) -> list[Any]:
        """``batch`` failed with ``silent``: an MN did not answer in time. Its completions
        once the late replies came, if the master paused nobody meanwhile (see the class
        doc); else raise ``silent`` (the wait for the next epoch then counts from now)."""
        k, transport = self.lease, self.transport
        start = time.monotonic()
        self.silent_since = start
        awaits_late = getattr(transport, "awaits_late", None)   # (any object that executes)
        if awaits_late is None or not awaits_late(batch):
            raise silent
        k.expect_news(True)                 # renewals come often now: a pause is heard soon
        try:
            while (k.acks == acks and not k.pause and k.membership.epoch == self.handed
                   and not k.ended and not k.data_lost
                   and (left := start + self.wait - time.monotonic()) > 0):
                outcome: list[Any] | TransportError | None
                try:
                    outcome = transport.late(batch, min(left, LATE_POLL))
                except TransportError as e:     # completed, with a refusal in it
                    outcome = e
                if outcome is None:
                    continue
                with k.gate:
                    if (k.acks == acks and not k.pause and k.membership.epoch == self.handed
                            and time.monotonic() < k.expires):
                        self.silent_since = None
                        if isinstance(outcome, TransportError):
                            raise outcome
                        return outcome
                break
        finally:
            k.expect_news(False)
        raise silent

    def execute_now(self, batch: Batch) -> list[Any] | None:
        """``execute`` when that needs no wait (an event loop's inline path, ``fusee.asyncio``);
        None when it would wait or raise: the lease ran out, the client is paused, a newer
        epoch is out, or the keeper holds the gate (``execute`` then says which)."""
        k = self.lease
        if time.monotonic() >= k.expires or not k.gate.acquire(blocking=False):
            return None
        try:
            if not k.pause and k.membership.epoch == self.handed:
                return self.transport.execute(batch)
        finally:
            k.gate.release()
        return None

    def await_membership(self, epoch: int) -> NoReturn:
        """The driver's answer to an operation's ``AwaitMembership(epoch)`` (``fusee.driver``):
        EpochChanged once the master has published the next epoch, else why none comes."""
        self._await(epoch)
        raise AssertionError("_await returns only to a batch that a pause held back")

    def _await(self, epoch: int, resume: bool = False) -> None:
        """Raise EpochChanged with the first membership newer than ``epoch`` (waiting for the
        master to publish it), LeaseExpired, LeaseLapsed or NodeTimeout. ``resume`` (a batch
        held back by a pause): return once the pause ends with no new epoch (a rebuild that
        failed, or whose MN stopped asking), so that the batch goes out after all.

        The wait is ``wait`` seconds, restarted by every renewal that says the rebuild the
        pause is for still runs: a rebuild copies what its MN holds, which may take longer
        than a failover, and the master's renewals are the client's evidence that it goes
        on (a rebuild ends, one way or the other: each of its verbs has a timeout). Should
        the master fall silent, no renewal restarts the wait."""
        k = self.lease
        since, self.silent_since = self.silent_since, None
        if k.membership.epoch <= epoch:
            start = time.monotonic() if resume or since is None else since
            k.expect_news(True)
            try:
                with k.news:
                    while (k.membership.epoch <= epoch and not k.data_lost and not k.ended
                           and not (resume and not k.pause)
                           and (left := max(start, k.rebuild_seen) + self.wait
                                - time.monotonic()) > 0):
                        k.news.wait(left)
            finally:
                k.expect_news(False)
        with k.news:                    # (the keeper changes both together)
            m, known = k.membership, k.incarnations
        if m.epoch > epoch:
            if back := m.rebuilt - m.dead:      # MNs rebuilt: the transport reaches them
                self.transport.revive(back)
                # what now serves there is ours, and the process the master rebuilt: one
                # restarted since is empty, and dead to us until the next epoch says so
                if check_transport(self.transport, back, known):
                    self._await(m.epoch)
            # handed only now: should the check or the wait fail, the operations keep the
            # epoch they have, and the next batch takes ``m`` in (and checks) again
            self.handed = m.epoch
            raise EpochChanged(m)
        if k.data_lost:
            raise NodeTimeout(f"no failover will come: {k.data_lost}")
        if resume and not k.pause and not k.ended:
            return
        k.check(self.wait)
        raise NodeTimeout(f"a memory node stopped answering and the master published no new "
                          f"membership after epoch {epoch} within {self.wait:g} s")
