"""The master process (`fusee master`): membership, client leases, failovers and repairs
(docs/design.md#the-master).

It wraps the sans-IO ``fusee.master.logic.Master`` with I/O, on three threads that share it under a
lock:

- the main thread serves RPCs on a ZeroMQ ROUTER socket (the MNs' control protocol,
  ``fusee.emulator.wire``; CURVE as for the MNs): ``register``, ``renew``, ``release``, ``status``,
  ``ping``; and it ticks the leases;
- a heartbeat thread pings every live MN with the MNs' own ``ping`` control request through
  ``fusee.transports.channel.Channels``, all at once, every quarter of the MN lease; the dead ones
  too, and one that answers "rejoin" (``fusee memnode --rejoin``) is queued for a rebuild
  (``fusee.rejoin``);
- a worker thread, on a transport of its own to the live MNs, runs the failover of each dead
  MN (``fusee.failover``) once every client has paused for it, and client-crash recovery
  (``fusee.recovery``) for each id in the repair queue, handing the id back to the pool when
  it is done, and the rebuild of each MN that asked to rejoin (``fusee.rebuild``), with the
  clients paused as for a failover. One thread for all: a recovery never runs during a
  failover or a rebuild.

While an MN awaits its failover, renewal replies tell clients to pause (``fusee.master.logic``);
once it is done the new membership is saved, then handed out with the renewals. Registrations
are refused meanwhile (the client retries). The state is saved (``fusee.master.store``: a
file, or ZooKeeper) whenever it changes, before a reply depends on it, so a restarted master
carries on. Every network wait has a timeout. SIGTERM / SIGINT stop it cleanly.

With ``[master] coordination = "zookeeper://..."`` several of these processes run; one leads
(``fusee.master.election``) and the others stand by: they answer every request but ``ping``
with ERR_STANDBY (the client asks the next master of its list) and start their threads only
once elected, when they carry on from the state in ZooKeeper as a restarted master would.
"""

from __future__ import annotations

import argparse
import collections
import copy
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import zmq

from fusee.emulator import wire
from fusee.config import ClusterConfig, ConfigError
from fusee.driver import run
from fusee.errors import ClientLimit, FuseeError
from fusee.failover import failover
from fusee.rebuild import RebuildError, rebuild
from fusee.rejoin import REJOIN
from fusee.master.logic import (LeaseError, Master, StateError, StateMismatch,
                          TransitionInProgress)
from fusee.layout import CLEAN
from fusee.client_ids import client_states, fresh_client_id
from fusee.recovery import recover_client
from fusee.verbs import TransportError
from fusee.transports.channel import Channels
from fusee.master.protocol import (ERR_STANDBY, PING, REGISTER, RELEASE, RENEW, STATUS,
                                   encode_grant, error_code)
from fusee.master.election import LeaderGuard
from fusee.master.store import Deposed, FileStore, StateStore, ZooKeeperStore
from fusee.emulator.serving import BindError, EndpointInUse, bind, stop_condition, write_ready
from fusee.transports.security import check_endpoint, master_config, secure_server
from fusee.logsetup import LogLevelError, add_log_level_option, setup_logging
from fusee.metrics import MasterCollector, MetricsUnavailable, metrics_address, serve_metrics

_logger = logging.getLogger(__name__)


def _log(message: str, file=None, flush: bool = False) -> None:
    """The master's event log: what went to stderr is a warning, the rest information."""
    _logger.log(logging.WARNING if file is sys.stderr else logging.INFO, message)

#: the repair and failover records kept for ``status`` (the newest)
REPORTS_KEPT = 64
#: how often the main loop ticks the leases at least (seconds)
TICK = 0.02


class MasterServer:
    def __init__(self, config: ClusterConfig, store: StateStore,
                 transport: str | None = None, log=_log, leadership=None):
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

    # -- RPCs (main thread) -------------------------------------------------------------------
    def handle(self, data: bytes) -> bytes:
        """One request in, one reply out; no exception escapes."""
        try:
            kind, seq, name, args = wire.decode_request(data)
        except wire.MalformedMessage as e:
            return wire.encode_reply(-1, [], [0, wire.ERR_MALFORMED, str(e)])
        method = self.methods.get(name) if kind == wire.CONTROL else None
        self.tally["requests"] += 1
        if method is None:
            return wire.encode_reply(seq, [], [0, wire.ERR_MALFORMED, f"unknown request {name!r}"])
        if name != PING and not self.leading():
            return wire.encode_reply(seq, [], [0, ERR_STANDBY, self._standing_by()])
        try:
            return wire.encode_reply(seq, [method(args)])
        except (LeaseError, TransitionInProgress) as e:
            return wire.encode_reply(seq, [], [0, error_code(e), str(e)])
        except (FuseeError, TransportError, OSError, ValueError, TypeError, KeyError) as e:
            return wire.encode_reply(seq, [], [0, wire.ERR_CONTROL, f"{name}: {e}"])

    def _standing_by(self) -> str:
        leader = self.leadership.leader() if self.leadership is not None else None
        return (f"this master (pid {os.getpid()}) stands by; "
                + (f"the leader is {leader}" if leader else "no leader is elected yet"))

    @staticmethod
    def _ints(args: dict, *names: str, optional: tuple[str, ...] = ()) -> list:
        values = [args[n] for n in names] + [args.get(n, 0) for n in optional]
        if any(type(v) is not int for v in values):
            raise TypeError(f"{', '.join(names + optional)} must be integers")
        return values

    def _register(self, args: dict) -> dict:
        """Lease a recovered id, a fresh one, or the one asked for (``id``) to a new client."""
        want = args.get("id")
        limit = self.config.layout.max_clients
        if want is not None and not (type(want) is int and 0 <= want < limit):
            raise ValueError(f"client id must be an integer in [0, {limit})")
        for _ in range(2):
            with self.lock:
                reusable = self.master.admit()
                cid = want if want is not None else \
                    reusable if reusable is not None else self.master.draw_id()
                if cid is not None:
                    if cid >= limit:
                        raise ClientLimit(f"all {limit} client ids are taken")
                    g = self.master.grant(cid, secrets.randbits(62), time.monotonic())
                    self._save()                    # before the client can act on it
                    membership = self.master.membership
                    break
            seed = self._survey()                   # outside the lock: it talks to the MNs
            with self.lock:
                self.master.seed_ids(*seed)
                self._save()
                self.work_due.set()                 # ids found in use await recovery
        self.tally["registrations"] += 1
        self.log(f"master: client {cid} registered", flush=True)
        return encode_grant(g, membership, 0)

    def _survey(self) -> tuple[int, list[int], list[int]]:
        """The arguments of ``Master.seed_ids``: the MNs' client-id counter word (FAA), where
        the master's own counter starts, so that ids drawn before there was a master are
        never handed out as fresh; the ids below it marked CLEAN, and every id marked in
        use."""
        with self.lock:
            membership, down = self.master.membership, self._down()
        transport = self._connect(down)
        try:
            first = run(fresh_client_id(self.config, membership), transport)
            states = run(client_states(self.config, membership,
                                       list(range(self.config.layout.max_clients))), transport)
        finally:
            transport.close()
        return (first, [i for i, (state, _) in enumerate(states[:first]) if state == CLEAN],
                [i for i, (state, _) in enumerate(states) if state != CLEAN])

    def _renew(self, args: dict) -> dict:
        """``paused``: the pause epoch the client acked; ``epoch``: the membership it has."""
        cid, token, paused, known = self._ints(args, "id", "token",
                                               optional=("paused", "epoch"))
        with self.lock:
            try:
                acked = self.master.acks.get(cid)
                g = self.master.renew(cid, token, time.monotonic(), paused)
            except LeaseError:
                self._note_expired(cid)
                self._save()
                raise
            membership = self.master.membership
            self.tally["renewals"] += 1
            if g.pause and acked != paused and not self.master.waiting_for():
                self.work_due.set()                 # the last ack: the failover may start
        return encode_grant(g, membership, known)

    def _release(self, args: dict) -> None:
        cid, token = self._ints(args, "id", "token")
        with self.lock:
            self.master.release(cid, token)
            self.detected[cid] = time.time()
            self._save()
            if not self.master.waiting_for():
                self.work_due.set()
        self.log(f"master: client {cid} released its id", flush=True)

    def _status(self, args: dict) -> dict:
        with self.lock:
            status = self.master.status(time.monotonic())
            status["repaired"] = list(self.reports)
            status["failovers"] = list(self.failovers)
            status["rebuilds"] = list(self.rebuilds)
        status["pid"] = os.getpid()
        return status

    def _note_expired(self, cid: int) -> None:
        if cid in self.master.repairs and cid not in self.detected:
            self.detected[cid] = time.time()
            self.work_due.set()
            self.log(f"master: client {cid} lease expired: recovery scheduled", flush=True)

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

    # -- heartbeats ----------------------------------------------------------------------------
    def heartbeat_loop(self) -> None:
        """Ping every live MN at once each quarter of the MN lease; each pong renews its
        node's lease as it arrives, so a dead MN's silence never delays the others'."""
        interval = self.config.mn_lease / 4
        timeout = min(self.config.timeout, self.config.mn_lease / 2)
        channels = Channels(self.config)
        plain: set[int] = set()     # dead MNs told that a plain restart is not used
        try:
            while not self.stopping.is_set():
                with self.lock:
                    alive, dead = self.master.alive(), self.master.rejoin_candidates()
                sent = time.monotonic()
                for node, answer in _pongs(channels, alive + dead, timeout):
                    if node in alive:
                        with self.lock:
                            self.master.mn_seen(node, sent)
                    elif answer == REJOIN:
                        self._rejoin(node, sent)
                        plain.discard(node)
                    elif node not in plain:
                        plain.add(node)
                        self.log(f"master: memory node {node} answers but is dead and was "
                                 f"not started with --rejoin: it is not used (restart it "
                                 f"with --rejoin to rebuild it)", flush=True)
                self.stopping.wait(max(0.0, sent + interval - time.monotonic()))
        finally:
            channels.close()

    def _rejoin(self, node: int, sent: float) -> None:
        with self.lock:
            queued = self.master.rejoin(node, sent)
            pause = self.master.pause
        if queued:
            self.work_due.set()
            self.log(f"master: memory node {node} asks to rejoin: clients pause until its "
                     f"rebuild publishes epoch {pause}", flush=True)

    # -- failovers and repairs (the worker thread) ---------------------------------------------
    def _down(self) -> set[int]:
        """The MNs not to connect to (under ``self.lock``)."""
        return set(self.master.dead) | set(self.master.failing)

    def _connect(self, down: set[int]):
        from fusee.transports import connect
        transport = connect(self.config, self.backend, dead=down)
        return transport if self.leadership is None else LeaderGuard(transport, self.leading)

    def work_loop(self) -> None:
        try:
            while not self.stopping.is_set():
                self.work_due.clear()
                now = time.monotonic()
                if not self.leading() or now < self.work_from:
                    self.work_due.wait(0.05)
                    continue
                with self.lock:
                    nodes = self.master.next_failover(now)
                    joining = self.master.next_rebuild(now) if nodes is None else None
                    cid = (self.master.next_repair(now)
                           if nodes is None and joining is None else None)
                if nodes is not None:
                    self._failover(nodes)
                elif joining is not None:
                    self._rebuild(joining)
                elif cid is not None:
                    self._repair(cid)
                else:
                    self.work_due.wait(0.05)            # or a retry comes due
        finally:
            if self.transport is not None:
                self.transport.close()

    def _run(self, op, down: set[int]) -> tuple:
        """Run ``op`` on the worker's transport (connected first if need be); -> (result,
        seconds spent connecting). After a transport failure the next run reconnects."""
        connect_s = 0.0
        if self.transport is None:
            t0 = time.perf_counter()
            self.transport = self._connect(down)
            connect_s = time.perf_counter() - t0
        try:
            # a bare transport fails an AwaitMembership (a repair that met a dead MN): the
            # repair is retried after the failover
            return run(op, self.transport), connect_s
        except TransportError:
            self.transport.close()
            self.transport = None
            raise

    def _failover(self, nodes: tuple[int, ...]) -> None:
        """Fail over ``nodes`` (a failure is retried later: a failover is idempotent)."""
        with self.lock:
            membership, down = self.master.membership, self._down()
            milestones = [self.timeline.setdefault(n, {}) for n in nodes]
        for m in milestones:
            m.setdefault("started_at", time.time())
        names = ", ".join(map(str, nodes))
        self.log(f"master: failing over memory node {names} (epoch {membership.epoch} -> "
                 f"{membership.epoch + 1})", flush=True)
        t0 = time.perf_counter()
        try:
            new, connect_s = self._run(failover(self.config, membership, nodes), down)
        except Exception as e:          # noqa: BLE001 - a failed failover is retried, not fatal
            with self.lock:
                self.master.failover_failed(nodes, time.monotonic(), f"{type(e).__name__}: {e}")
                attempts = self.master.failover.attempts
            self.log(f"master: failover of memory node {names} failed (attempt {attempts}, "
                     f"will retry): {type(e).__name__}: {e}", flush=True)
            return
        seconds = time.perf_counter() - t0
        settled = len(new.settled.get(new.epoch, ()))
        with self.lock:
            attempts = self.master.failover.attempts + 1
            # persisted before anything hands it out: a restart must not go back a membership
            published = copy.deepcopy(self.master)
            published.failover_done(nodes, new)
            try:
                self._save(published)
            except Deposed:
                return
            except OSError as e:
                self.master.failover_failed(nodes, time.monotonic(), f"saving the state: {e}")
                self.log(f"master: cannot save the state of epoch {new.epoch} (will retry the "
                         f"failover): {e}", flush=True)
                return
            self.master.failover_done(nodes, new)
            for node, m in zip(nodes, milestones):
                self.failovers.append({"node": node, "epoch": new.epoch, **m,
                                       "finished_at": time.time(), "attempts": attempts,
                                       "connect_s": connect_s, "failover_s": seconds,
                                       "settled": settled})
                self.timeline.pop(node, None)
                self.tally["failovers"] += 1
            self.work_due.set()
        self.log(f"master: memory node {names} failed over in {seconds * 1000:.1f} ms: epoch "
                 f"{new.epoch} published ({settled} slots settled)", flush=True)

    def _rebuild(self, node: int) -> None:
        """Rebuild dead MN ``node`` (``fusee.rebuild``) on a transport of its own that reaches
        it; a failure is retried later."""
        with self.lock:
            membership, down = self.master.membership, self._down() - {node}
        self.log(f"master: rebuilding memory node {node} (epoch {membership.epoch} -> "
                 f"{membership.epoch + 1})", flush=True)

        def progress(done: int, total: int) -> None:
            with self.lock:
                self.master.rejoins.progress = (done, total)

        t0 = time.perf_counter()
        try:
            transport = self._connect(down)
            try:
                new = run(rebuild(self.config, membership, node, progress), transport)
            finally:
                transport.close()
        except Exception as e:          # noqa: BLE001 - a failed rebuild is retried, not fatal
            final = isinstance(e, RebuildError)
            with self.lock:
                self.master.rebuild_failed(node, time.monotonic(), f"{type(e).__name__}: {e}",
                                           final)
            self.log(f"master: rebuild of memory node {node} failed "
                     f"({'it stays dead' if final else 'will retry while it asks'}): "
                     f"{type(e).__name__}: {e}", flush=True)
            return
        seconds = time.perf_counter() - t0
        with self.lock:
            copied = self.master.rejoins.progress[0]
            # persisted before anything hands it out, as a failover's
            published = copy.deepcopy(self.master)
            published.rebuild_done(node, new, time.monotonic())
            try:
                self._save(published)
            except Deposed:
                return
            except OSError as e:
                self.master.rebuild_failed(node, time.monotonic(), f"saving the state: {e}")
                self.log(f"master: cannot save the state of epoch {new.epoch}: {e}",
                         flush=True)
                return
            self.master.rebuild_done(node, new, time.monotonic())
            self.rebuilds.append({"node": node, "epoch": new.epoch, "finished_at": time.time(),
                                  "rebuild_s": seconds, "copied_bytes": copied})
            self.work_due.set()
        if self.transport is not None:      # it has the MN as dead: reconnect when needed
            self.transport.close()
            self.transport = None
        self.log(f"master: memory node {node} rebuilt in {seconds * 1000:.1f} ms "
                 f"({copied / 2**20:.1f} MiB copied): epoch {new.epoch} published", flush=True)

    def _repair(self, cid: int) -> None:
        """Recover ``cid`` (a failure is retried later, by the same lock owner)."""
        started = time.time()
        with self.lock:
            membership, down = self.master.membership, self._down()
        try:
            t0 = time.perf_counter()
            report, connect_s = self._run(recover_client(self.config, cid,
                                                         membership=membership), down)
            recover_s = time.perf_counter() - t0 - connect_s
        except Exception as e:          # noqa: BLE001 - a failed repair is retried, not fatal
            with self.lock:
                self.master.repair_failed(cid, time.monotonic(), f"{type(e).__name__}: {e}")
                first = self.master.repairs[cid].attempts == 1
            if first:
                self.log(f"master: recovery of client {cid} failed (will retry): {e}",
                         flush=True)
            return
        with self.lock:
            reason = self.master.repairs[cid].reason
            self.master.repair_done(cid)
            self._save()
            detected = self.detected.pop(cid, started)
            self.reports.append({"id": cid, "reason": reason, "detected_at": detected,
                                 "started_at": started, "connect_s": connect_s,
                                 "recover_s": recover_s, "finished_at": time.time(),
                                 "report": _plain(report.as_dict())})
            self.tally["client_recoveries"] += 1
        self.log(f"master: client {cid} recovered in {recover_s * 1000:.1f} ms; id free",
                 flush=True)

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


def _pongs(channels: Channels, nodes: list[int], timeout: float):
    """Ping ``nodes`` at once; yield (node, its answer: "pong", or REJOIN from an MN started
    with --rejoin) for each that answers within ``timeout``, as it answers."""
    seq = channels.next_seq()
    posted = channels.post({m: wire.encode_control(seq, "ping", {}) for m in nodes})
    waiting = {channels.socks[m]: m for m, failure in posted.items() if failure is None}
    poller = zmq.Poller()
    for sock in waiting:
        poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while waiting and (left := deadline - time.monotonic()) > 0:
        for sock, _ in poller.poll(int(left * 1000) + 1):
            try:
                rseq, results, error = wire.decode_reply(sock.recv(zmq.NOBLOCK))
            except (zmq.Again, wire.MalformedMessage):
                continue
            if rseq != seq:
                continue                        # a late pong of an earlier round
            poller.unregister(sock)
            node = waiting.pop(sock)
            if not error and results in (["pong"], [REJOIN]):
                yield node, results[0]


def _plain(value):
    """A recovery report as msgpack/JSON-friendly values (string keys)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def open_coordination(config: ClusterConfig, endpoint: str, state_path: str | Path | None):
    """The state store and leadership ``config`` asks for: a file (``state_path``) and no
    election, or ZooKeeper for both."""
    if config.coordination is None:
        return FileStore(state_path), None
    from fusee.master.election import ZooKeeperLeadership
    if len(config.masters) > 1 and endpoint not in config.masters:
        raise ConfigError(f"this master's endpoint {endpoint} is not one of the config's "
                          f"masters {config.masters}: name it with --endpoint")
    # the session lasts a client lease: a dead leader is replaced about as fast as a client
    # notices it cannot renew
    leadership = ZooKeeperLeadership(config.coordination, config.name, endpoint,
                                     session_timeout=config.client_lease,
                                     connect_timeout=config.timeout)
    return ZooKeeperStore(leadership.zk, leadership.root), leadership


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fusee master", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="cluster config (TOML)")
    p.add_argument("--state", help="state file (default: <config dir>/<cluster name>"
                   ".master.json); a restarted master carries on from it. Unused with "
                   "[master] coordination (the state is in ZooKeeper)")
    p.add_argument("--endpoint", help="bind here instead of the config's master endpoint "
                   "(with several masters: this one's)")
    p.add_argument("--transport", help="backend for failovers, repairs and id draws "
                   "(default: config's)")
    p.add_argument("--ready-file", help="write {endpoint, pid} here once serving")
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port "
                   "(0: any free one; default: the config's master_metrics_port, else none)")
    add_log_level_option(p)
    args = p.parse_args(argv)
    try:
        setup_logging(args.log_level)
        config = master_config(ClusterConfig.load(args.config))
        os.environ.pop("FUSEE_CLIENT_KEY", None)    # a client's key; the master uses its own
        endpoint = args.endpoint or (config.master if len(config.masters) <= 1 else None)
        if not endpoint:
            raise ConfigError(f"{args.config} names no master endpoint (and no --endpoint)"
                              if not config.masters else f"{args.config} names several "
                              "masters: say which one this is with --endpoint")
        state = args.state or Path(args.config).with_name(f"{config.name}.master.json")
        store, leadership = open_coordination(config, endpoint, state)
        try:
            server = MasterServer(config, store, args.transport, leadership=leadership)
        except BaseException:
            if leadership is not None:
                leadership.close()
            store.close()
            raise
    except StateMismatch as e:
        print(f"fusee master: error: {e}: if this is a new cluster, move {state} aside (or "
              "pass another --state); if not, fix the config", file=sys.stderr)
        return 2
    except (ConfigError, StateError, LogLevelError) as e:
        print(f"fusee master: error: {e}", file=sys.stderr)
        return 2
    stop = stop_condition(args.parent_pid)
    metrics_port = config.master_metrics_port if args.metrics_port is None \
        else args.metrics_port
    if metrics_port is not None:
        try:
            metrics_port = serve_metrics(metrics_port, metrics_address(endpoint),
                                         MasterCollector(server))
        except MetricsUnavailable as e:
            print(f"fusee master: error: {e}", file=sys.stderr)
            return 2

    def bound(ep: str) -> None:
        role = "serving" if leadership is None else "standing in the election on"
        _log(f"master {role} {ep} for {len(config.memnodes)} memory nodes "
             f"(client lease {config.client_lease:g} s, MN lease {config.mn_lease:g} s)")
        write_ready(args.ready_file, endpoint=ep, metrics_port=metrics_port)

    try:
        server.serve(endpoint, stop, bound)
    except (ConfigError, BindError, zmq.ZMQError) as e:
        print(f"fusee master: error: {e}", file=sys.stderr)
        return 2
    return 1 if server.failed else 0


if __name__ == "__main__":
    sys.exit(main())
