"""The master process (`fusee master`): membership, client leases, failovers and repairs
(docs/design.md#the-master).

It wraps the sans-IO ``fusee.master.logic.Master`` with I/O, on three threads that share it
under one lock (``MasterServer.lock``), each thread's code in a module of its own:

- the main thread serves the requests on a ZeroMQ ROUTER socket (CURVE as for the MNs;
  ``fusee/master/rpc.py``, in the protocol of ``fusee/master/protocol.py``) and ticks the
  leases (here);
- the heartbeat thread pings the MNs and queues the rebuild of a dead one that asks to
  rejoin (``fusee/master/heartbeat.py``);
- the worker thread runs failovers, client-crash recoveries and rebuilds, one at a time
  (``fusee/master/worker.py``).

The state they share is this class's: ``master`` (None while standing by), ``lock``,
``config``, ``work_due`` (wakes the worker), ``stopping``, the reports kept for ``status``
and ``tally`` (``fusee.metrics``); ``_save`` persists the state, ``_connect`` opens a
transport to the MNs not known down.

While an MN awaits its failover, renewal replies tell clients to pause (``fusee.master.logic``);
once it is done the new membership is saved, then handed out with the renewals. Registrations
are refused meanwhile (the client retries). The state is saved (``fusee.master.store``: a
file, or ZooKeeper) whenever it changes, before a reply depends on it, so a restarted master
carries on. Every network wait has a timeout. SIGTERM / SIGINT stop it cleanly (the command:
``fusee/master/command.py``).

With ``[master] coordination = "zookeeper://..."`` several of these processes run; one leads
(``fusee.master.election``) and the others stand by: they answer every request but ``ping``
with ERR_STANDBY (the client asks the next master of its list) and start their threads only
once elected, when they carry on from the state in ZooKeeper as a restarted master would.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
from collections.abc import Callable

import zmq

from fusee.config import ClusterConfig
from fusee.emulator import wire
from fusee.emulator.serving import bind
from fusee.master.election import LeaderGuard
from fusee.master.heartbeat import Heartbeat
from fusee.master.logic import Master, StateError, StateMismatch
from fusee.master.protocol import PING, REGISTER, RELEASE, RENEW, STATUS
from fusee.master.rpc import Requests
from fusee.master.store import Deposed, StateStore
from fusee.master.worker import Worker
from fusee.transports.security import check_endpoint, secure_server

_logger = logging.getLogger(__name__)


def log(message: str, file=None, flush: bool = False) -> None:
    """The master's event log: what went to stderr is a warning, the rest information."""
    _logger.log(logging.WARNING if file is sys.stderr else logging.INFO, message)


#: the repair and failover records kept for ``status`` (the newest)
REPORTS_KEPT = 64
#: how often the main loop ticks the leases at least (seconds)
TICK = 0.02


class MasterServer(Requests, Heartbeat, Worker):
    """One master: its state, its threads, and the socket its requests come in on."""

    def __init__(self, config: ClusterConfig, store: StateStore,
                 transport: str | None = None, log=log, leadership=None):
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
        if leadership is None:
            self._take_over()
        self.detected: dict[int, float] = {}            # client id -> when (wall clock)
        self.reports: collections.deque = collections.deque(maxlen=REPORTS_KEPT)
        self.failovers: collections.deque = collections.deque(maxlen=REPORTS_KEPT)
        self.rebuilds: collections.deque = collections.deque(maxlen=REPORTS_KEPT)
        self.timeline: dict[int, dict] = {}             # MN -> its failover's milestones
        self.tally: collections.Counter = collections.Counter()     # for fusee.metrics
        self.transport = None                           # the worker's, to the live MNs
        self.last_tick = 0.0
        self.methods = {REGISTER: self._register, RENEW: self._renew,
                        RELEASE: self._release, STATUS: self._status,
                        PING: lambda args: "pong"}

    def _take_over(self) -> None:
        """Carry on from the stored state (or start afresh) and write it back at once: a
        previous leader's next write then fails (``ZooKeeperStore``). A successor waits one
        grace before its first repair or failover, so the last batch a previous leader may
        have posted has landed."""
        now = time.monotonic()
        ids = [m.id for m in self.config.memnodes]
        state = self.store.load()
        if state is not None and state.get("cluster") != self.config.name:
            raise StateMismatch(f"the stored master state is that of cluster "
                             f"{state.get('cluster')!r}, not {self.config.name!r}")
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
        self.store.claim({"cluster": self.config.name, **self.master.state()})
        if self.leadership is not None:
            self.work_from = now + self.grace

    def leading(self) -> bool:
        """This master may grant leases, fail over and recover now."""
        return self.master is not None and (self.leadership is None or
                                            self.leadership.valid())

    def _save(self, master: Master | None = None) -> None:
        """Persist the state of ``master`` (default: ours; under ``self.lock``) if it
        changed. A deposed leader stops at once."""
        try:
            self.store.save({"cluster": self.config.name, **(master or self.master).state()})
        except Deposed as e:
            self.log(f"master: {e}: stopping", file=sys.stderr, flush=True)
            self.failed = True
            self.stopping.set()
            raise

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_tick < TICK:
            return
        self.last_tick = now
        leading = self.leading()
        if leading and not self.was_leading and self.master is not None:
            self.log("master: leading again after a break from ZooKeeper: every client gets "
                     "a full lease", flush=True)
            with self.lock:         # refused renewals in the break were not the clients' fault
                self.master.lease_afresh(now)
        self.was_leading = leading
        if not leading:
            return                  # no expiry while this master cannot be renewed through
        with self.lock:
            events = self.master.tick(now)
            for e in events:
                if e.kind == "mn-dead":
                    self.timeline[e.subject] = {"detected_at": time.time()}
                    self.log(f"master: memory node {e.subject} missed its lease: dead; clients "
                             f"pause until its failover publishes epoch {e.epoch}", flush=True)
                elif e.kind == "data-lost":
                    self.log(f"master: DATA LOST: {self.master.lost}", file=sys.stderr,
                             flush=True)
                else:
                    self._note_expired(e.subject)
            if events:
                self._save()
                self.work_due.set()

    # -- connections to the MNs (the worker's, and a registration's survey) -------------------
    def _down(self) -> set[int]:
        """The MNs not to connect to (under ``self.lock``)."""
        return set(self.master.dead) | set(self.master.failing)

    def _connect(self, down: set[int]):
        from fusee.transports import connect
        transport = connect(self.config, self.backend, dead=down)
        return transport if self.leadership is None else LeaderGuard(transport, self.leading)

    # -- the process ---------------------------------------------------------------------------
    def serve(self, endpoint: str, stop: Callable[[], bool],
              on_bound: Callable[[str], None] = lambda ep: None) -> None:
        """Serve until ``stop()`` is true (checked every ``TICK``)."""
        check_endpoint(self.config, endpoint, "master")
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        auth = secure_server(ctx, sock, self.config, -1, key_name="master")
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        threads = [threading.Thread(target=self._guarded, args=(f,), daemon=True, name=n)
                   for f, n in ((self.heartbeat_loop, "heartbeat"), (self.work_loop, "worker"))]
        try:
            bound = bind(sock, endpoint)
            if self.leadership is None:
                for t in threads:
                    t.start()
            else:
                self.leadership.campaign()
            on_bound(bound)
            sock.setsockopt(zmq.RCVTIMEO, int(TICK * 1000))
            while not stop() and not self.stopping.is_set():
                try:
                    if self.master is None and self.leadership.acquired.is_set():
                        self._take_over()
                        self.log(f"master: {bound} leads now", flush=True)
                        for t in threads:
                            t.start()
                    if self.leadership is not None and self.leadership.lost:
                        self.log(f"master: {self.leadership.lost}: stopping", file=sys.stderr,
                                 flush=True)
                        self.failed = True
                        break
                    self.tick()
                except (OSError, StateError) as e:      # cannot save: stop, do not guess
                    self.log(f"master: cannot load or save the state: {e}", file=sys.stderr,
                             flush=True)
                    self.failed = True
                    break
                try:
                    ident = sock.recv()
                except zmq.Again:
                    continue
                data = sock.recv(copy=False)
                if data.more:
                    while sock.recv(copy=False).more:
                        pass
                    continue
                try:
                    reply = self.handle(data.bytes)
                except Exception:             # noqa: BLE001 - a bug must not stop the master
                    _logger.exception("master: internal error")
                    reply = wire.encode_reply(-1, [], [0, wire.ERR_MALFORMED, "internal error"])
                sock.send(ident, zmq.SNDMORE | zmq.NOBLOCK)
                sock.send(reply, zmq.NOBLOCK)
        finally:
            self.stopping.set()
            self.work_due.set()
            for t in threads:
                if t.is_alive():
                    t.join(self.config.timeout + 1)
            sock.close(0)
            if auth is not None:
                auth.stop()
            with self.lock:
                try:
                    if self.leading():
                        self._save()
                except OSError as e:
                    self.log(f"master: cannot save the state on the way out: {e}",
                             file=sys.stderr, flush=True)
                    self.failed = True
            if self.leadership is not None:
                self.leadership.close()         # a standby takes over at once
            self.store.close()

    def _guarded(self, loop: Callable[[], None]) -> None:
        """A background loop that fails stops the master rather than leaving it half alive."""
        try:
            loop()
        except Exception as e:          # noqa: BLE001
            self.log(f"master: {threading.current_thread().name} thread failed: {e!r}",
                     file=sys.stderr, flush=True)
            self.failed = True
            self.stopping.set()
