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

What they share (``fusee/master/shared.py``): ``master`` (None while standing by), ``lock``,
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

import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import zmq

from fusee.config import ClusterConfig
from fusee.emulator import wire
from fusee.emulator.serving import bind
from fusee.master.heartbeat import Heartbeat
from fusee.master.logic import StateError
from fusee.master.protocol import PING, REGISTER, RELEASE, RENEW, STATUS
from fusee.master.rpc import Requests
from fusee.master.shared import EventLog, log
from fusee.master.store import StateStore
from fusee.master.worker import Worker
from fusee.transports.security import check_endpoint, secure_server

if TYPE_CHECKING:
    from fusee.master.election import ZooKeeperLeadership

_logger = logging.getLogger(__name__)


#: how often the main loop ticks the leases at least (seconds)
TICK = 0.02


class MasterServer(Requests, Heartbeat, Worker):
    """One master: its state, its threads, and the socket its requests come in on."""

    def __init__(self, config: ClusterConfig, store: StateStore,
                 transport: str | None = None, log: EventLog = log,
                 leadership: ZooKeeperLeadership | None = None) -> None:
        super().__init__(config, store, transport, log, leadership)
        self.methods = {REGISTER: self._register, RENEW: self._renew,
                        RELEASE: self._release, STATUS: self._status,
                        PING: lambda args: "pong"}

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_tick < TICK:
            return
        stalled = now - self.last_tick if self.last_tick else 0.0
        self.last_tick = now
        leading = self.leading()
        if leading and not self.was_leading and self.master is not None:
            self.log("master: leading again after a break from ZooKeeper: every client gets "
                     "a full lease", flush=True)
            with self.lock:         # refused renewals in the break were not the clients' fault
                self.master.lease_afresh(now)
        if stalled > self.stall and self.master is not None:
            # this process did not run (stopped, or starved): the renewals it did not answer
            # and the heartbeats it did not send say nothing of the clients' and MNs' health
            self.log(f"master: this process did not run for {stalled:.1f} s: every client "
                     f"and memory node gets a full lease", file=sys.stderr, flush=True)
            with self.lock:
                self.master.lease_afresh(now)
                self.master.mn_afresh(now)
        self.was_leading = leading
        if not leading:
            return                  # no expiry while this master cannot be renewed through
        with self.lock:
            events = self.logic.tick(now)
            for e in events:
                if e.kind == "mn-dead":
                    self.timeline[e.subject] = {"detected_at": time.time()}
                    self.log(f"master: memory node {e.subject} missed its lease: dead; clients "
                             f"pause until its failover publishes epoch {e.epoch}", flush=True)
                elif e.kind == "data-lost":
                    self.log(f"master: DATA LOST: {self.logic.lost}", file=sys.stderr,
                             flush=True)
                else:
                    self._note_expired(e.subject)
            if events:
                self._save()
                self.work_due.set()

    def serve(self, endpoint: str, stop: Callable[[], bool],
              on_bound: Callable[[str], None] = lambda ep: None) -> None:
        """Serve until ``stop()`` is true (checked every ``TICK``)."""
        check_endpoint(self.config, endpoint, "master")
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        auth = secure_server(ctx, sock, self.config, -1, key_name="master")
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        threads = [threading.Thread(target=self._guarded, args=(f,), daemon=True, name=n)
                   for f, n in ((self.heartbeat_loop, "heartbeat"), (self.work_loop, "worker"))]
        try:
            self.check_memory_nodes()       # WrongMemoryNode: another cluster's MN, refused
            bound = bind(sock, endpoint)
            if self.leadership is None:
                for t in threads:
                    t.start()
            else:
                self.leadership.campaign()
            on_bound(bound)
            sock.setsockopt(zmq.RCVTIMEO, int(TICK * 1000))
            while not stop() and not self.stopping.is_set():
                try:        # first: a request waiting since a stall is answered after tick()
                    ident = sock.recv()
                except zmq.Again:
                    ident = None
                try:
                    if (self.master is None and self.leadership is not None  # (standing by)
                            and self.leadership.acquired.is_set()):
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
                if ident is None:
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
