"""What the master's three threads share (docs/design.md#the-master): one ``Master`` (the
sans-IO logic, ``fusee/master/logic.py``) under one lock, the cluster config, the state store
and the election, the events that wake or stop the threads, and the records kept for
``status``. The code of each thread is a subclass of ``SharedState`` in a module of its own
(``rpc.py``, ``heartbeat.py``, ``worker.py``); ``MasterServer`` (``server.py``) is made of
them. Everything here that reads or changes ``master`` does so under ``lock``.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from fusee.config import ClusterConfig
from fusee.master.election import LeaderGuard
from fusee.master.identity import check_same_cluster, identity
from fusee.master.logic import LEARNED, RESTARTED, Master
from fusee.master.store import Deposed, StateStore

if TYPE_CHECKING:
    from fusee.master.election import ZooKeeperLeadership
    from fusee.transports.base import Transport

_logger = logging.getLogger(__name__)


class EventLog(Protocol):
    """Where a master reports its events: ``log`` below, or a test's recorder."""

    def __call__(self, message: str, file: TextIO | None = None, flush: bool = False
                 ) -> None: ...


def log(message: str, file: TextIO | None = None, flush: bool = False) -> None:
    """The master's event log: what went to stderr is a warning, the rest information."""
    _logger.log(logging.WARNING if file is sys.stderr else logging.INFO, message)


#: the repair and failover records kept for ``status`` (the newest)
REPORTS_KEPT = 64


class SharedState:
    """The state of one master process and what every thread does with it alike."""

    #: the requests a master answers, by name (set by ``fusee.master.server.MasterServer``)
    methods: dict[str, Callable[[dict[str, Any]], Any]]

    def __init__(self, config: ClusterConfig, store: StateStore,
                 transport: str | None = None, log: EventLog = log,
                 leadership: ZooKeeperLeadership | None = None) -> None:
        """``store``: where the state lives (``fusee.master.store``); ``leadership``: this
        master's place in a ZooKeeper election (``fusee.master.election``), or None for
        the single master, which leads from the start."""
        self.config, self.backend, self.log = config, transport, log
        self.grace = config.timeout        # the longest a client's last batch can be in flight
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.failed = False                         # a thread died, or the state cannot be saved
        self.work_due = threading.Event()           # wakes the worker thread
        self.store, self.leadership = store, leadership
        self.master: Master | None = None           # None while standing by
        self.was_leading = leadership is None
        self.work_from = 0.0                        # no repair or failover before (monotonic)
        self.last_tick = 0.0                        # (monotonic) 0: standing by, never ticked
        if leadership is None:
            self._take_over()
        self.detected: dict[int, float] = {}            # client id -> when (wall clock)
        self.reports: collections.deque[dict[str, Any]] = collections.deque(maxlen=REPORTS_KEPT)
        self.failovers: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=REPORTS_KEPT)
        self.rebuilds: collections.deque[dict[str, Any]] = collections.deque(maxlen=REPORTS_KEPT)
        self.timeline: dict[int, dict[str, float]] = {}  # MN -> its failover's milestones
        self.tally: collections.Counter[str] = collections.Counter()    # for fusee.metrics
        self.transport: Transport | LeaderGuard | None = None   # the worker's, to the live MNs
        #: a gap between two ticks longer than this is a stall of this process (ticks come
        #: every TICK; a heartbeat is due every quarter MN lease)
        self.stall = min(config.client_lease, config.mn_lease) / 2

    def _take_over(self) -> None:
        """Carry on from the stored state (or start afresh) and write it back at once: a
        previous leader's next write then fails (``ZooKeeperStore``). A successor waits one
        grace before its first repair or failover, so the last batch a previous leader may
        have posted has landed."""
        now = time.monotonic()
        ids = tuple(m.id for m in self.config.memnodes)
        state = self.store.load()
        check_same_cluster(self.config, state, self.store.where)
        if state is None:
            self.master = Master(ids, self.config.client_lease, self.config.mn_lease,
                                 self.grace, now, replicas=self.config.replicas)
        else:
            self.master = Master.restore(state, ids, self.config.client_lease,
                                         self.config.mn_lease, self.grace, now,
                                         replicas=self.config.replicas)
            self.log(f"master: carried on from the stored state: epoch {self.master.epoch}, "
                     f"{len(self.master.clients)} clients, {len(self.master.repairs)} repairs, "
                     f"{len(self.master.failing)} failovers pending", flush=True)
            unfenced = self.master.unfenced()
            if unfenced:
                self.log(f"master: the stored state predates lease tokens: expired clients "
                         f"{unfenced} are recovered without fencing (a batch they still had "
                         f"on its way may land)", file=sys.stderr, flush=True)
        self.store.claim({**identity(self.config), **self.master.state()})
        # every lease counts from ``now``: a process that does not run from here to its first
        # tick (a loaded host, at start-up or at a take-over) has stalled as after any tick
        self.last_tick = now
        if self.leadership is not None:
            self.work_from = now + self.grace

    @property
    def logic(self) -> Master:
        """The master's state machine, for a process that has taken over: the threads act on
        it only once ``leading`` (a master standing by has none; once taken over, it never
        goes back)."""
        master = self.master
        assert master is not None, "a master standing by has no state to act on"
        return master

    def leading(self) -> bool:
        """This master may grant leases, fail over and recover now."""
        return self.master is not None and (self.leadership is None or
                                            self.leadership.valid())

    def _save(self, master: Master | None = None) -> None:
        """Persist the state of ``master`` (default: ours; under ``self.lock``) if it
        changed. A deposed leader stops at once."""
        try:
            self.store.save({**identity(self.config), **(master or self.logic).state()})
        except Deposed as e:
            self.log(f"master: {e}: stopping", file=sys.stderr, flush=True)
            self.failed = True
            self.stopping.set()
            raise

    def _down(self) -> set[int]:
        """The MNs not to connect to (under ``self.lock``)."""
        return set(self.logic.dead) | set(self.logic.failing)

    def check_memory_nodes(self) -> None:
        """At start: WrongMemoryNode unless every MN that answers is this cluster's
        (``fusee.cluster_identity``); the worker checks again whenever it connects. A backend
        that needs every MN (verbs) and misses one leaves it to the worker."""
        from fusee.verbs import TransportError
        with self.lock:
            down = self._down() if self.master is not None else set()
        try:
            transport = self._connect(down)
        except TransportError as e:
            self.log(f"master: the memory nodes' identity is checked when the worker "
                     f"connects ({e})", flush=True)
            return
        transport.close()

    def _connect(self, down: set[int]) -> Transport | LeaderGuard:
        """A transport to every MN but ``down``, each one it reached checked to be this
        cluster's (``fusee.cluster_identity``: WrongMemoryNode), a rejoining one too, and
        each live one to be the process whose incarnation the master knows: one restarted
        since the last ping is empty, so it is dead now (``_seen``, as its next pong would
        say) and the connect fails with NodeRestarted (the job is retried after its
        failover)."""
        from fusee.cluster_identity import check_transport
        from fusee.errors import NodeRestarted
        from fusee.transports import connect
        with self.lock:
            known = dict(self.logic.incarnations) if self.master is not None else {}
        transport = connect(self.config, self.backend, dead=down)
        try:
            gone = check_transport(transport, known=known)
            for node, incarnation in gone.items():
                self._seen(node, time.monotonic(), incarnation, "found as the master connected")
            if gone:
                raise NodeRestarted(f"memory node {min(gone)} restarted since the master last "
                                    "heard it: it is failed over first", min(gone))
        except BaseException:
            transport.close()
            raise
        return transport if self.leadership is None else LeaderGuard(transport, self.leading)

    def _seen(self, node: int, sent: float, incarnation: int, how: str = "") -> None:
        """Live MN ``node`` answered a ping sent at ``sent`` (or had its header read then)
        as ``incarnation``: its lease is renewed, unless its incarnation says it restarted
        since it became a member (its memory is gone: dead at once, failed over at the next
        tick; ``how``: where that was found). The first incarnation heard of a member is
        saved: a master taking over must know it too, or it would adopt the empty MN."""
        with self.lock:
            change = self.logic.mn_seen(node, sent, incarnation)
            if change == LEARNED:
                self._save()
        if change == RESTARTED:
            self.log(f"master: memory node {node} restarted (incarnation {incarnation:016x}"
                     f"{', ' + how if how else ''}): its memory is gone, so it is dead now",
                     flush=True)
