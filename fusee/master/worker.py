"""The master's worker thread, on a transport of its own to the live MNs: the failover of each
dead MN (``fusee.failover``) once every client has paused for it, client-crash recovery
(``fusee.recovery``) for each id in the repair queue, handing the id back to the pool when it
is done, and the rebuild of each MN that asked to rejoin (``fusee.rebuild``), with the clients
paused as for a failover. One thread for all: a recovery never runs during a failover or a
rebuild. Whatever it publishes is saved first (a restarted master must not go back a
membership).

The master's three threads share one ``Master`` under one lock (``fusee/master/shared.py``), so
the code of each thread is a subclass of that shared state, in a module of its own;
``MasterServer`` (``fusee/master/server.py``) is made of the three.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

from fusee.driver import run
from fusee.fencing import fence_key
from fusee.failover import close_rounds, failover
from fusee.master.logic import Master
from fusee.master.shared import SharedState
from fusee.master.store import Deposed
from fusee.rebuild import Rebuild, RebuildAbandoned, RebuildError
from fusee.recovery import recover_client
from fusee.transports.channel import Channels
from fusee.verbs import Op, T, TransportError


class Worker(SharedState):
    """The worker thread's loop (``MasterServer.serve`` starts it) and each job it runs."""

    def work_loop(self) -> None:
        try:
            while not self.stopping.is_set():
                self.work_due.clear()
                now = time.monotonic()
                if not self.leading() or now < self.work_from:
                    self.work_due.wait(0.05)
                    continue
                with self.lock:
                    nodes = self.logic.next_failover(now)
                    joining = self.logic.next_rebuild(now) if nodes is None else None
                    cid = (self.logic.next_repair(now)
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

    def _run(self, op: Op[T], down: set[int]) -> tuple[T, float]:
        """Run ``op`` on the worker's transport (connected first if need be); -> (result,
        seconds spent connecting). After a transport failure the next run reconnects."""
        connect_s = 0.0
        if self.transport is None:
            t0 = time.perf_counter()
            self.transport = self._connect(down)
            connect_s = time.perf_counter() - t0
        try:
            # the driver fails an AwaitMembership on a bare transport (a repair that met a
            # dead MN): the repair is retried after the failover
            return run(op, self.transport), connect_s
        except TransportError:
            self.transport.close()
            self.transport = None
            raise

    def _saved_then_applied(self, change: Callable[[Master], None]) -> None:
        """Make ``change`` to the master's state once a copy of the state with it made is
        saved: what the change publishes (a membership, a closing) must survive this master,
        for a restarted or next master must never go back on what clients may have been
        handed. Raises what saving raises (Deposed, OSError) with the state unchanged.
        Called holding ``self.lock``."""
        published = copy.deepcopy(self.logic)
        change(published)
        self._save(published)
        change(self.logic)

    def _failover(self, nodes: tuple[int, ...]) -> None:
        """Fail over ``nodes`` (a failure is retried later: a failover is idempotent)."""
        with self.lock:
            membership, down = self.logic.membership, self._down()
            milestones = [self.timeline.setdefault(n, {}) for n in nodes]
        # no MN: the rounds a failed rebuild's pause closed, published by none (Master.closing)
        names = ", ".join(map(str, nodes)) or "none (closing the rounds a rebuild left)"
        self.log(f"master: failing over memory node {names} (epoch {membership.epoch} -> "
                 f"{membership.epoch + 1})", flush=True)
        t0 = time.perf_counter()
        op = failover(self.config, membership, nodes) if nodes else close_rounds(self.config,
                                                                                 membership)
        try:
            self._fence_expired(down)
            for m in milestones:
                m.setdefault("started_at", time.time())
            new, connect_s = self._run(op, down)
        except Exception as e:          # noqa: BLE001 - a failed failover is retried, not fatal
            with self.lock:
                self.logic.failover_failed(nodes, time.monotonic(), f"{type(e).__name__}: {e}")
                attempts = self.logic.failover.attempts
            self.log(f"master: failover of memory node {names} failed (attempt {attempts}, "
                     f"will retry): {type(e).__name__}: {e}", flush=True)
            return
        seconds = time.perf_counter() - t0
        settled = len(new.settled.get(new.epoch, ()))
        with self.lock:
            attempts = self.logic.failover.attempts + 1
            try:
                self._saved_then_applied(lambda master: master.failover_done(nodes, new))
            except Deposed:
                return
            except OSError as e:
                self.logic.failover_failed(nodes, time.monotonic(), f"saving the state: {e}")
                self.log(f"master: cannot save the state of epoch {new.epoch} (will retry the "
                         f"failover): {e}", flush=True)
                return
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
        it: the online copy, then the pause for the rest; a failure is retried later."""
        with self.lock:
            membership, down = self.logic.membership, self._down() - {node}
        self.log(f"master: rebuilding memory node {node} (epoch {membership.epoch} -> "
                 f"{membership.epoch + 1}): copying online", flush=True)

        def progress(done: int, total: int) -> None:
            with self.lock:
                self.logic.rejoins.progress = (done, total)

        def overtaken() -> str | None:
            with self.lock:
                return self.logic.rebuild_overtaken(membership)

        t0 = time.perf_counter()
        job = None
        try:
            # checks the rejoining MN's header (WrongMemoryNode) before anything is copied
            transport = self._connect(down)
            try:
                job = Rebuild(self.config, membership, node, progress, overtaken)
                self._until_heard(node, overtaken)
                run(job.copy_online(), transport)
                paused = time.perf_counter()
                self._pause_for_rebuild(node, overtaken)
                self._fence_expired(down)
                acked = time.perf_counter()
                self._closing(node)
                new = run(job.finish(), transport)
            finally:
                transport.close()
        except Exception as e:          # noqa: BLE001 - a failed rebuild is retried, not fatal
            final = isinstance(e, RebuildError)
            closed = job.closed() if job is not None else None
            error = f"{type(e).__name__}: {e}"
            with self.lock:
                now = time.monotonic()
                try:
                    if closed is None:
                        self.logic.rebuild_failed(node, now, error, final)
                    else:       # the rounds its pause closed, published like a failover's
                        self._saved_then_applied(
                            lambda master: master.rebuild_failed(node, now, error, final, closed))
                except Deposed:
                    return
                except OSError as save_error:
                    # still ``closing``: a failover of no MN publishes them later
                    assert closed is not None, "only publishing closed rounds saves"
                    self.log(f"master: cannot save the state of epoch {closed.epoch}: "
                             f"{save_error}", flush=True)
                    closed = None
                    self.logic.rebuild_failed(node, now, error, final)
                self.work_due.set()
            if closed is not None:
                self.log(f"master: the failed rebuild's pause closed rounds: epoch "
                         f"{closed.epoch} published "
                         f"({len(closed.settled[closed.epoch])} slots settled)", flush=True)
            self.log(f"master: rebuild of memory node {node} failed "
                     f"({'it stays dead' if final else 'will retry while it asks'}): "
                     f"{type(e).__name__}: {e}", flush=True)
            return
        end = time.perf_counter()
        seconds, pause_s, last_s = end - t0, end - paused, end - acked
        with self.lock:
            copied = job.online_bytes + self.logic.rejoins.progress[0]
            now, incarnation = time.monotonic(), job.incarnation
            try:
                self._saved_then_applied(
                    lambda master: master.rebuild_done(node, new, now, incarnation))
            except Deposed:
                return
            except OSError as e:
                self.logic.rebuild_failed(node, now, f"saving the state: {e}")
                self.log(f"master: cannot save the state of epoch {new.epoch}: {e}",
                         flush=True)
                return
            self.rebuilds.append({"node": node, "epoch": new.epoch, "finished_at": time.time(),
                                  "rebuild_s": seconds, "copied_bytes": copied,
                                  "online_bytes": job.online_bytes, "pause_s": pause_s,
                                  "paused_copy_s": last_s, "pause_bytes": job.pause_bytes,
                                  "pause_groups": job.pause_groups})
            self.work_due.set()
        if self.transport is not None:      # it has the MN as dead: reconnect when needed
            self.transport.close()
            self.transport = None
        self.log(f"master: memory node {node} rebuilt in {seconds * 1000:.1f} ms "
                 f"({copied / 2**20:.1f} MiB copied, {job.online_bytes / 2**20:.1f} MiB of it "
                 f"online; clients paused {pause_s * 1000:.1f} ms, {last_s * 1000:.1f} ms of "
                 f"it copying {job.pause_bytes / 2**20:.1f} MiB, {job.pause_groups} block "
                 f"groups whole): epoch {new.epoch} "
                 f"published", flush=True)

    def _closing(self, node: int) -> None:
        """Record, saved before the pause touches the memory, that it may close rounds: a
        master that takes over if this one dies in the pause publishes a new epoch before
        any client resumes (``Master.closing``)."""
        with self.lock:     # an OSError fails the rebuild before it touches any
            self._saved_then_applied(lambda master: master.rebuild_closing(node))

    def _until_heard(self, node: int, overtaken: Callable[[], str | None]) -> None:
        """Before the online copy of ``node``: wait until every leased client has heard of
        the rebuild in a renewal (``Master.unheard``; it renews every third of its lease),
        or a lease and its grace have gone by (one that did not renew meanwhile is expiring).
        Not needed for the copy to be exact, only for the pause to be short: a client that
        has not heard yet reuses its freed objects in any of its groups, each of which the
        pause would copy again. RebuildAbandoned if the rebuild is overtaken meanwhile."""
        with self.lock:
            deadline = time.monotonic() + self.logic.client_lease + self.logic.grace
        while True:
            reason = overtaken() or ("the master stops" if self.stopping.is_set() else None)
            if reason is not None:
                raise RebuildAbandoned(reason)
            with self.lock:
                unheard = self.logic.unheard()
            if not unheard:
                return
            if time.monotonic() > deadline:
                self.log(f"master: clients {unheard} did not hear of the rebuild of memory "
                         f"node {node} in a lease: copying all the same", flush=True)
                return
            self.stopping.wait(0.01)

    def _pause_for_rebuild(self, node: int, overtaken: Callable[[], str | None]) -> None:
        """Pause the clients for the last phase of ``node``'s rebuild; return once every
        leased client has acked. RebuildAbandoned if the rebuild is overtaken meanwhile, the
        master stops, or a client neither acks nor loses its lease within two leases."""
        with self.lock:
            self.logic.rebuild_pausing(node)
            patience = 2 * (self.logic.client_lease + self.logic.grace)
        self.log(f"master: memory node {node} copied online: clients pause for the rest",
                 flush=True)
        deadline = time.monotonic() + patience
        while True:
            self.work_due.clear()
            reason = overtaken()
            with self.lock:
                waiting = self.logic.waiting_for()
            if reason is None and not waiting:
                return
            if reason is None and self.stopping.is_set():
                reason = "the master stops"
            if reason is None and time.monotonic() > deadline:
                reason = f"clients {waiting} did not pause"
            if reason is not None:
                raise RebuildAbandoned(reason)
            self.work_due.wait(0.01)

    def _repair(self, cid: int) -> None:
        """Recover ``cid`` (a failure is retried later, by the same lock owner); an expired
        client is fenced first."""
        started = time.time()
        with self.lock:
            membership, down = self.logic.membership, self._down()
            token = self.logic.repairs[cid].token
        try:
            if token is not None:
                self._fence(cid, token, [m for m in self.logic.memnodes if m not in down])
            t0 = time.perf_counter()
            report, connect_s = self._run(recover_client(self.config, cid,
                                                         membership=membership), down)
            recover_s = time.perf_counter() - t0 - connect_s
        except Exception as e:          # noqa: BLE001 - a failed repair is retried, not fatal
            with self.lock:
                self.logic.repair_failed(cid, time.monotonic(), f"{type(e).__name__}: {e}")
                first = self.logic.repairs[cid].attempts == 1
            if first:
                self.log(f"master: recovery of client {cid} failed (will retry): {e}",
                         flush=True)
            return
        with self.lock:
            reason = self.logic.repairs[cid].reason
            self.logic.repair_done(cid)
            self._save()
            detected = self.detected.pop(cid, started)
            self.reports.append({"id": cid, "reason": reason, "detected_at": detected,
                                 "started_at": started, "connect_s": connect_s,
                                 "recover_s": recover_s, "finished_at": time.time(),
                                 "report": _plain(report.as_dict())})
            self.tally["client_recoveries"] += 1
        self.log(f"master: client {cid} recovered in {recover_s * 1000:.1f} ms; id free",
                 flush=True)


    def _fence_expired(self, down: set[int]) -> None:
        """Fence every expired client not recovered yet at the MNs not ``down``, before a
        failover or a rebuild's pause goes on without its ack: its lease ran out, yet a batch
        past its lease check when it stopped (SIGSTOP, a GC pause) may still go out, and
        land after the failover read a round or the pause copied what it wrote; the repair's
        own fence came only after the epoch was published. Raises what ``_fence`` raises (the
        failover or rebuild fails and is retried)."""
        with self.lock:
            expired = [(cid, job.token) for cid, job in sorted(self.logic.repairs.items())
                       if job.token is not None]
        live = [m for m in self.logic.memnodes if m not in down]
        for cid, token in expired:
            self._fence(cid, token, live)

    def _fence(self, cid: int, token: int, nodes: list[int]) -> None:
        """Have every live MN refuse client ``cid`` of lease ``token`` before its recovery
        (``fusee.fencing``): a batch it still had on its way then either ran before the
        recovery began or is refused. An MN that does not answer fails the repair, retried
        later (by then that MN answers, or it is failed over and out of ``nodes``)."""
        channels = Channels(self.config)
        try:
            replies = channels.call_all(nodes, "fence", self.config.timeout,
                                        key=fence_key(cid, token))
        finally:
            channels.close()
        for reply in replies.values():
            if isinstance(reply, Exception):
                raise reply


def _plain(value: object) -> object:
    """A recovery report as msgpack/JSON-friendly values (string keys)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)
