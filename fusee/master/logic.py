"""The master's logic, sans-IO: who is alive, who holds which client id, which
crashed clients still need recovery, and when a dead memory node's failover may run. The
master is not on the data path; this module only decides, from the calls it gets and the time
it is given. ``fusee.master.server`` feeds it heartbeats and RPCs and carries out the
repairs and failovers it asks for.

Memory nodes hold leases renewed by the master's pings: an MN whose lease runs out is declared
dead for good (crash-stop: a restarted MN has lost its memory) and queued for failover
(``fusee.failover``). A failover takes every MN queued when it starts (one that dies while it
runs makes it fail and start again with that one too) and publishes the next ``Membership``
(``fusee.membership``): the epoch goes up by one per failover.

A failover must not race with any client's verbs of the old epoch (stop the world). So from
the moment an MN is declared dead until its failover is done, renewals tell each client to
*pause* for the next epoch; a client acks (renews with ``paused`` = that epoch) once no batch
of it is in flight and it posts none any more. The failover runs when every leased client has
acked, or has lost its lease (+ grace: it then counts as crashed and is recovered after the
failover, like any expired client). Pausing is not expiring: a live client keeps its id, its
log and its allocations, and carries on in the new epoch. Client repairs never run during a
transition (they need the new membership); a new client registers only once the new epoch is
published. Up to r-1 MN deaths are survivable; from the r-th on the master stops failing over
and says that data is lost.

Clients hold leases renewed by themselves. A client stops posting verbs when its own lease runs
out (measured from when it *sent* the renewal, so its view ends first); the master waits
``grace`` more (the longest one batch can be in flight) before it declares the client crashed.
The client's id then waits in the repair queue until recovery has finished the client's
operations, and only then goes back to the pool: an id is never handed out while anything of
its previous holder may still be in flight. A clean ``release`` takes the same path (recovery
of a client that closed cleanly finds nothing to finish, and it keeps one rule for every id).

Fresh ids come from the master's own counter (``next_id``), persisted with the rest: the MNs'
counter word (``fusee.client_ids.fresh_client_id``) seeds it once, and after that no MN is
needed to register, whichever of them is dead; a counter copy on another MN could be stale.
The same seeding takes in what the MNs say of the ids (``seed_ids``), so that the leases and
the ids' STATE words agree even on a cluster used before the master (or its state) existed.

The persistent state (``state()``) is small: the membership, the MNs awaiting failover, ids in
use with their tokens, pending repairs (an expired client's with its token, which a restarted
master needs to fence it: ``fusee.fencing``), recycled ids and the id counter. Lease deadlines and
pause acks are not persisted (monotonic time, and clients re-ack with every renewal): a
restarted master (or a standby taking over, ``fusee.master.election``) gives every known
client a full lease again (``lease_afresh``), which is never shorter than what the client
itself believes it has. So a client whose lease lapsed while no master could be reached, and
that the next master renews, was never declared crashed, and carries on.

Design: docs/design.md#the-master.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import InitVar, dataclass, field
from collections.abc import Iterable, Mapping
from typing import Any

# the master's errors belong to the store's one tree; imported from here too
from fusee.errors import DataLost as DataLost
from fusee.errors import FuseeError
from fusee.errors import LeaseError as LeaseError
from fusee.errors import LeaseExpired as LeaseExpired
from fusee.errors import LeaseLapsed as LeaseLapsed
from fusee.errors import TransitionInProgress as TransitionInProgress
from fusee.membership import Membership
from fusee.rejoin import Rejoins, node_states

STATE_VERSION = 2
#: what ``Master.mn_seen`` changed: the first incarnation of a member heard (to persist), or
#: another one (the MN restarted: dead)
LEARNED, RESTARTED = "learned", "restarted"
#: retry delays of a failed repair or failover: base * 2**attempts, capped
REPAIR_BACKOFF, REPAIR_BACKOFF_MAX = 0.1, 5.0


class StateError(FuseeError):
    """A master state file that is malformed or belongs to another cluster shape."""


class StateMismatch(StateError):
    """A master state file written for another cluster: other memory nodes, another r, another
    cluster name or format version (an old deployment's file, most likely)."""


@dataclass(frozen=True)
class Grant:
    """What a client learns when it registers or renews."""
    id: int
    token: int
    lease: float            # seconds, from the moment the client sent its request
    epoch: int              # the published membership epoch
    pause: int = 0          # nonzero: stop posting verbs and ack; the failover to this epoch waits
    lost: str | None = None     # why no failover will come any more
    membership: Membership | None = None    # the published membership, when the client lags
    #: (MN, bytes copied, bytes to copy) while the rebuild the pause waits for runs: a paused
    #: client keeps waiting as long as renewals say so, however long the copy takes
    rebuild: tuple[int, int, int] | None = None
    #: MN -> the incarnation the master knows of it (``Master.incarnations``), for every
    #: live MN it has heard: sent at registration and with each membership, so that a client
    #: reading an MN's header tells a restarted (empty) one from the member before the
    #: master's next ping does (docs/design.md#cluster-identity); None: not sent
    incarnations: Mapping[int, int] | None = None


@dataclass(frozen=True)
class Event:
    """Something the master decided on its own: ``kind`` is "mn-dead" (subject = MN id, epoch =
    the one its failover will publish), "data-lost" (subject = the MN one too many) or
    "client-expired" (subject = client id)."""
    kind: str
    subject: int
    epoch: int


@dataclass
class _Lease:
    token: int
    deadline: float         # the master's own deadline: client lease + grace


@dataclass
class _Job:
    """A repair (of a client id) or a failover (of the MNs queued) and its retries."""
    reason: str = "failover"    # repairs: "expired" or "released"
    attempts: int = 0
    retry_at: float = 0.0
    error: str | None = None
    running: bool = False
    nodes: tuple[int, ...] = ()     # a failover's MNs, while it runs
    #: an expired client's lease token, which the live MNs fence before its recovery
    #: (``fusee.fencing``); None for a release, an id found in use, or an expired client
    #: inherited from a state saved before tokens were kept (``unfenced``)
    token: int | None = None

    def failed(self, now: float, error: str) -> None:
        self.running = False
        self.attempts += 1
        self.error = error
        self.retry_at = now + min(REPAIR_BACKOFF * 2 ** (self.attempts - 1), REPAIR_BACKOFF_MAX)

    def status(self) -> dict[str, Any]:
        return {"reason": self.reason, "attempts": self.attempts, "error": self.error,
                "running": self.running}


@dataclass
class Master:
    memnodes: tuple[int, ...]
    client_lease: float
    mn_lease: float
    grace: float
    now: InitVar[float]
    replicas: int = 0                   # r; 0: every MN holds a replica of everything
    membership: Membership = field(default_factory=Membership)
    failing: list[int] = field(default_factory=list)        # dead, failover pending, in order
    clients: dict[int, _Lease] = field(default_factory=dict)
    repairs: dict[int, _Job] = field(default_factory=dict)
    free_ids: list[int] = field(default_factory=list)        # sorted
    next_id: int | None = None          # None: not seeded from the MNs' counter yet
    mn_deadline: dict[int, float] = field(default_factory=dict)
    acks: dict[int, int] = field(default_factory=dict)       # client id -> pause it acked
    failover: _Job = field(default_factory=_Job)
    rejoins: Rejoins = field(default_factory=Rejoins)   # dead MNs to rebuild (fusee.rejoin)
    #: a rebuild's pause may have closed rounds on the memory and no epoch has been published
    #: since: the clients stay paused until a failover (of the MNs failing, or of none) does
    closing: bool = False
    #: the incarnation of each live MN (``fusee.cluster_identity.new_incarnation``), as first
    #: heard or as rebuilt: another one in a pong means the MN restarted, empty (persisted)
    incarnations: dict[int, int] = field(default_factory=dict)

    def __post_init__(self, now: float) -> None:
        for name in ("client_lease", "mn_lease"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.grace < 0:
            raise ValueError("grace must be >= 0")
        self.memnodes = tuple(self.memnodes)
        if not 0 <= self.replicas <= len(self.memnodes):
            raise ValueError(f"replicas must be 1..{len(self.memnodes)} (or 0: all of them)")
        self.replicas = self.replicas or len(self.memnodes)
        for m in self.memnodes:
            if m not in self.membership.dead and m not in self.failing:
                self.mn_deadline.setdefault(m, now + self.mn_lease)

    @property
    def epoch(self) -> int:
        return self.membership.epoch

    @property
    def dead(self) -> frozenset[int]:
        """The MNs failed over (not those still in the queue)."""
        return self.membership.dead

    @property
    def pause(self) -> int:
        """The epoch clients must pause for (0: none): the next one, while an MN awaits its
        failover or its rebuild's last phase, or rounds a failed pause closed await theirs."""
        return (self.membership.epoch + 1
                if self.failing or self.rejoins.pausing or self.closing else 0)

    @property
    def lost(self) -> str | None:
        down = len(self.membership.dead) + len(self.failing)
        if down < self.replicas:
            return None
        return (f"memory nodes {sorted(self.membership.dead | set(self.failing))} are dead and "
                f"the replication factor is {self.replicas}: what only they held is lost, so "
                "the master fails over no more")

    # -- client ids and leases --------------------------------------------------------------
    def reusable_id(self) -> int | None:
        """The smallest recovered id, to hand out before drawing a fresh one."""
        return self.free_ids[0] if self.free_ids else None

    def admit(self) -> int | None:
        """Before a registration: refuses while a failover is pending; -> ``reusable_id``."""
        if self.lost:
            raise DataLost(self.lost)
        if self.failing:
            raise TransitionInProgress(f"memory node {self.failing[0]} died; epoch "
                                       f"{self.pause} is not published yet")
        if self.rejoins.pausing or self.closing:
            raise TransitionInProgress(f"memory node {self.rejoins.running} is being "
                                       f"rebuilt; epoch {self.pause} is not published yet")
        return self.reusable_id()

    def draw_id(self) -> int | None:
        """A never-used id from the master's counter (None until ``seed_ids``)."""
        if self.next_id is None:
            return None
        while (self.next_id in self.clients or self.next_id in self.repairs
               or self.next_id in self.free_ids):
            self.next_id += 1           # taken by a client that asked for it by number
        cid, self.next_id = self.next_id, self.next_id + 1
        return cid

    def seed_ids(self, first: int, clean: Iterable[int] = (), in_use: Iterable[int] = ()) -> None:
        """Start the counter at ``first``, the MNs' counter word, and take in the ids the MNs
        mark CLEAN below it (``clean``: recycled, so their blocks are adopted) or in use
        (``in_use``: left by clients that did not close, before this master knew of them;
        recovered before anyone gets them). Once; ids this master already tracks are
        skipped: its own view of them is newer."""
        if self.next_id is not None:
            return
        self.next_id = first
        known = self.clients.keys() | self.repairs.keys() | set(self.free_ids)
        for cid in set(in_use) - known:
            self.repairs[cid] = _Job("found in use")
        for cid in set(clean) - known - set(in_use):
            assert cid < first, "a clean id to recycle that the counter never handed out"
            bisect.insort(self.free_ids, cid)

    def grant(self, cid: int, token: int, now: float) -> Grant:
        """Lease ``cid`` (a recycled id, a fresh one, or one a client asked for) to a client."""
        self.admit()
        if cid in self.clients or cid in self.repairs:
            raise LeaseError(f"client id {cid} is in use or awaiting recovery")
        i = bisect.bisect_left(self.free_ids, cid)
        if i < len(self.free_ids) and self.free_ids[i] == cid:
            del self.free_ids[i]
        self.clients[cid] = _Lease(token, now + self.client_lease + self.grace)
        return Grant(cid, token, self.client_lease, self.epoch, rebuild=self._rebuild_news(cid))

    def renew(self, cid: int, token: int, now: float, paused: int = 0) -> Grant:
        """Extend the lease; ``paused``: the pause epoch the client has acked (0: none)."""
        lease = self._holder(cid, token)
        if now > lease.deadline:            # ran out before a tick noticed: same outcome
            self._expire(cid)
            raise LeaseError(f"the lease of client {cid} expired")
        lease.deadline = now + self.client_lease + self.grace
        if paused and paused == self.pause:
            self.acks[cid] = paused
        return Grant(cid, token, self.client_lease, self.epoch, self.pause, self.lost,
                     rebuild=self._rebuild_news(cid))

    def _rebuild_news(self, cid: int) -> tuple[int, int, int] | None:
        """What a grant to ``cid`` says of the running rebuild (None: none runs); it counts
        as heard (``unheard``)."""
        running = self.rejoins.running
        if running is None:
            return None
        self.rejoins.heard.add(cid)
        return (running, *self.rejoins.progress)

    def unheard(self) -> list[int]:
        """The leased clients no grant has told yet that the running rebuild runs. Told, a
        client carves new objects from fresh blocks only while it runs (``Allocator.follow``),
        so the online copy waits for them: what they write meanwhile lands in few groups,
        which the pause copies again, not in every group they hold."""
        return sorted(self.clients.keys() - self.rejoins.heard)

    def release(self, cid: int, token: int) -> None:
        """A clean close: the id goes to recovery (which finds nothing in flight) and back."""
        self._holder(cid, token)
        del self.clients[cid]
        self.acks.pop(cid, None)
        self.repairs[cid] = _Job("released")

    def _holder(self, cid: int, token: int) -> _Lease:
        lease = self.clients.get(cid)
        if lease is None or lease.token != token:
            raise LeaseError(f"client {cid} holds no lease with this token")
        return lease

    def _expire(self, cid: int) -> None:
        lease = self.clients.pop(cid)
        self.acks.pop(cid, None)
        self.repairs[cid] = _Job("expired", token=lease.token)

    # -- memory nodes -----------------------------------------------------------------------
    def mn_seen(self, node: int, sent_at: float, incarnation: int = 0) -> str | None:
        """MN ``node`` answered a ping sent at ``sent_at`` as ``incarnation`` (0: not told). A
        dead MN stays dead. A live one with another incarnation than the one known restarted
        and lost its memory: its lease ends now (``tick`` fails it over) -> RESTARTED; the
        first one heard is kept -> LEARNED (to persist); else None."""
        if node not in self.mn_deadline:
            return None
        known = self.incarnations.get(node)
        if incarnation and known and incarnation != known:
            restarted = self.mn_deadline[node] != -math.inf    # (told once)
            self.mn_deadline[node] = -math.inf
            return RESTARTED if restarted else None
        self.mn_deadline[node] = max(self.mn_deadline[node], sent_at + self.mn_lease)
        if incarnation and not known:
            self.incarnations[node] = incarnation
            return LEARNED
        return None

    def alive(self) -> list[int]:
        return sorted(self.mn_deadline)

    def waiting_for(self) -> list[int]:
        """The leased clients that have not acked the pending pause yet."""
        pause = self.pause
        return sorted(c for c in self.clients if pause and self.acks.get(c) != pause)

    # -- time -------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Event]:
        """Expire what ran out by ``now``; the events say what changed."""
        events = []
        for node, deadline in sorted(self.mn_deadline.items()):
            if now > deadline:
                del self.mn_deadline[node]
                self.incarnations.pop(node, None)
                was_lost = self.lost
                self.failing.append(node)
                events.append(Event("mn-dead", node, self.epoch + 1))
                if self.lost and not was_lost:
                    events.append(Event("data-lost", node, self.epoch))
        for cid, lease in sorted(self.clients.items()):
            if now > lease.deadline:
                self._expire(cid)
                events.append(Event("client-expired", cid, self.epoch))
        return events

    def next_deadline(self) -> float | None:
        """When ``tick`` may next have something to do."""
        times = list(self.mn_deadline.values())
        times += [lease.deadline for lease in self.clients.values()]
        return min(times) if times else None

    # -- failovers --------------------------------------------------------------------------
    def next_failover(self, now: float) -> tuple[int, ...] | None:
        """The MNs whose failover may run now, all those queued (marked running until
        ``failover_done`` / ``failover_failed``): every leased client paused, no repair
        running, data not lost. None queued but ``closing``: () (a failover of no MN, which
        closes the rounds and publishes the next epoch)."""
        f = self.failover
        if (not (self.failing or self.closing) or self.lost or f.running or f.retry_at > now
                or any(r.running for r in self.repairs.values()) or self.waiting_for()):
            return None
        f.running = True
        f.nodes = tuple(self.failing)
        return f.nodes

    def failover_done(self, nodes: tuple[int, ...], membership: Membership) -> None:
        """The failover of ``nodes`` published ``membership``: renewals now hand it out."""
        self._failing(nodes)
        expected = self.membership.dead | set(nodes)
        if membership.epoch != self.epoch + 1 or membership.dead != expected:
            raise ValueError(f"the failover of MNs {list(nodes)} returned epoch "
                             f"{membership.epoch} with dead {sorted(membership.dead)}; expected "
                             f"epoch {self.epoch + 1} with dead {sorted(expected)}")
        self.membership = membership
        self.failing = [m for m in self.failing if m not in nodes]
        self.failover = _Job()
        self.closing = False
        self.acks = {c: e for c, e in self.acks.items() if e > membership.epoch}

    def failover_failed(self, nodes: tuple[int, ...], now: float, error: str) -> None:
        self._failing(nodes)
        self.failover.failed(now, error)

    def _failing(self, nodes: tuple[int, ...]) -> None:
        if not (self.failover.running and self.failover.nodes == tuple(nodes)):
            raise ValueError(f"no failover of MNs {list(nodes)} is running")

    # -- rebuilds of dead MNs (fusee.rejoin, fusee.rebuild) ---------------------------------
    def rejoin(self, node: int, sent_at: float, incarnation: int = 0) -> bool:
        """Dead MN ``node`` asked to rejoin (answering a ping sent at ``sent_at`` as
        ``incarnation``); True when that queues its rebuild. Ignored unless it was failed over
        and data is not lost."""
        if node not in self.membership.dead or self.lost:
            return False
        return self.rejoins.ask(node, sent_at, self.mn_lease, incarnation)

    def rejoin_candidates(self) -> list[int]:
        """The dead MNs to ask (with a ping) whether they rejoin."""
        return sorted(self.membership.dead)

    def next_rebuild(self, now: float) -> int | None:
        """The MN whose rebuild may run now: no failover pending or running, no repair
        running. It starts with the clients working (its online copy); ``rebuild_pausing``
        pauses them for the rest."""
        ready = not (self.failing or self.closing or self.failover.running or self.waiting_for()
                     or any(r.running for r in self.repairs.values()))
        return self.rejoins.next(now, ready)

    def rebuild_pausing(self, node: int) -> None:
        """The online copy of ``node`` is done: the clients pause for the rest of it (its
        last phase runs once ``waiting_for`` is empty)."""
        self.rejoins.pause_for(node)

    def rebuild_closing(self, node: int) -> None:
        """Every client of ``node``'s rebuild acked its pause, whose first step closes the
        open rounds on the memory: from now until an epoch is published, the clients must
        not resume the old one (persisted, so that the next master knows it too)."""
        assert self.rejoins.pausing and self.rejoins.running == node, (node, self.rejoins)
        self.closing = True

    def rebuild_overtaken(self, membership: Membership) -> str | None:
        """Why a rebuild begun under ``membership`` must be given up (None: it may go on):
        an MN died, whose failover comes first."""
        if self.failing:
            return f"memory node {self.failing[0]} died: its failover comes first"
        if self.membership.epoch != membership.epoch:
            return f"epoch {self.membership.epoch} was published meanwhile"
        return None

    def rebuild_done(self, node: int, membership: Membership, now: float,
                     incarnation: int = 0) -> None:
        """The rebuild of ``node`` published ``membership``: it is alive (leased) again, as
        ``incarnation``, the word in the header of the region copied to (0: not read; the
        one it asked to rejoin with is taken instead)."""
        if membership.epoch != self.epoch + 1 or membership.dead != self.dead - {node}:
            raise ValueError(f"the rebuild of MN {node} returned epoch {membership.epoch} with "
                             f"dead {sorted(membership.dead)}; expected epoch "
                             f"{self.epoch + 1} with dead {sorted(self.dead - {node})}")
        if membership.rebuilt_at.get(node) != membership.epoch:
            # the epoch a rebuilt MN came back in tells which rounds it can witness
            raise ValueError(f"the rebuild of MN {node} returned a membership that does not "
                             f"record it rebuilt in epoch {membership.epoch}")
        incarnation = incarnation or self.rejoins.rebuilding_as
        self.rejoins.done(node)
        self.membership = membership
        self.closing = False
        self.mn_deadline[node] = now + self.mn_lease
        if incarnation:     # the MN rebuilt; a restart since is told by its next pong
            self.incarnations[node] = incarnation
        self.acks = {c: e for c, e in self.acks.items() if e > membership.epoch}

    def rebuild_failed(self, node: int, now: float, error: str, final: bool = False,
                       closed: Membership | None = None) -> None:
        """The rebuild of ``node`` failed: its next ask is heard after a backoff, or never
        (``final``: the rebuild cannot succeed). The clients resume, in ``closed`` if given
        (``Rebuild.closed``: the rounds its pause closed, published like a failover's);
        else, after a pause that began closing rounds, only once a failover (of the MNs
        failing, or of none) has published the next epoch: never in the old one."""
        if closed is not None:
            if (closed.epoch != self.epoch + 1 or closed.dead != self.dead
                    or closed.rebuilt_at != self.membership.rebuilt_at):
                raise ValueError(f"the failed rebuild of MN {node} closed rounds in epoch "
                                 f"{closed.epoch} with dead {sorted(closed.dead)}; expected "
                                 f"epoch {self.epoch + 1} with dead {sorted(self.dead)}")
            self.membership = closed
            self.closing = False
            self.acks = {c: e for c, e in self.acks.items() if e > closed.epoch}
        attempts = self.rejoins.attempts.get(node, 0)
        self.rejoins.failed(node, now, error, math.inf if final else
                            min(REPAIR_BACKOFF * 2 ** attempts, REPAIR_BACKOFF_MAX))

    # -- the repair queue -------------------------------------------------------------------
    def next_repair(self, now: float) -> int | None:
        """A repair due now (marked running until ``repair_done`` / ``repair_failed``); none
        while a failover or a rebuild is pending or running: recovery needs the new
        membership."""
        if self.failing or self.closing or self.failover.running or self.rejoins.joining:
            return None
        due = [(r.retry_at, cid) for cid, r in self.repairs.items()
               if not r.running and r.retry_at <= now]
        if not due:
            return None
        cid = min(due)[1]
        self.repairs[cid].running = True
        return cid

    def repair_done(self, cid: int) -> None:
        """Recovery of ``cid`` finished: the id may be handed out again."""
        self._running(cid)
        del self.repairs[cid]
        bisect.insort(self.free_ids, cid)

    def repair_failed(self, cid: int, now: float, error: str) -> None:
        self._running(cid).failed(now, error)

    def _running(self, cid: int) -> _Job:
        r = self.repairs.get(cid)
        if r is None or not r.running:
            raise ValueError(f"no repair of client {cid} is running")
        return r

    # -- views and persistence --------------------------------------------------------------
    def status(self, now: float) -> dict[str, Any]:
        """A snapshot for operators and tests (string keys, so it travels as msgpack or JSON):
        seconds left on each lease, the failover and repair queues, the recycled ids, the live
        MNs' incarnations (hex) and ``memnodes``: each MN's state, progress and placement
        (``fusee.rejoin.node_states``)."""
        return {"epoch": self.epoch,
                "alive": {str(m): round(d - now, 3) for m, d in sorted(self.mn_deadline.items())},
                "dead": sorted(self.dead),
                "membership": self.membership.to_wire(),
                "failing": list(self.failing),
                "pause": self.pause,
                "closing": self.closing,
                "waiting_for": self.waiting_for(),
                "failover": self.failover.status() if self.failing else None,
                "lost": self.lost,
                "clients": {str(c): round(lease.deadline - now, 3)
                            for c, lease in sorted(self.clients.items())},
                "repairs": {str(c): r.status() for c, r in sorted(self.repairs.items())},
                "free_ids": list(self.free_ids),
                "incarnations": {str(m): f"{w:016x}" for m, w in sorted(self.incarnations.items())},
                "memnodes": node_states(len(self.memnodes), self.replicas, self.dead,
                                        self.failing, self.rejoins)}

    def state(self) -> dict[str, Any]:
        """What must survive a restart (JSON-able)."""
        return {"version": STATE_VERSION, "memnodes": list(self.memnodes),
                "replicas": self.replicas, "membership": self.membership.to_wire(),
                "failing": list(self.failing),
                "clients": {str(c): lease.token for c, lease in sorted(self.clients.items())},
                "repairs": {str(c): r.reason for c, r in sorted(self.repairs.items())},
                # a key of its own, so that the repairs keep the shape an older master reads
                "repair_tokens": {str(c): r.token for c, r in sorted(self.repairs.items())
                                  if r.token is not None},
                "free_ids": list(self.free_ids), "next_id": self.next_id,
                "closing": self.closing,
                "incarnations": {str(m): w for m, w in sorted(self.incarnations.items())}}

    @classmethod
    def restore(cls, state: dict[str, Any], memnodes: Iterable[int], client_lease: float,
                mn_lease: float, grace: float, now: float, replicas: int = 0) -> Master:
        """Carry on from ``state()``: every known client gets a full lease from ``now``."""
        memnodes = tuple(memnodes)
        try:
            if state["version"] != STATE_VERSION:
                raise StateMismatch(f"master state version {state['version']!r}, "
                                 f"expected {STATE_VERSION}")
            if tuple(state["memnodes"]) != memnodes:
                raise StateMismatch(f"master state is for memory nodes {state['memnodes']}, "
                                 f"the config has {list(memnodes)}")
            if replicas and state["replicas"] != replicas:
                raise StateMismatch(f"master state is for r = {state['replicas']}, the config "
                                 f"has r = {replicas}")
            membership = Membership.from_wire(state["membership"])
            failing = [int(m) for m in state["failing"]]
            clients = {int(c): int(t) for c, t in state["clients"].items()}
            repairs = {int(c): str(reason) for c, reason in state["repairs"].items()}
            tokens = _repair_tokens(state.get("repair_tokens", {}), repairs)
            free = sorted(int(c) for c in state["free_ids"])
            next_id = None if state["next_id"] is None else int(state["next_id"])
            replicas = int(state["replicas"])
            closing = state.get("closing", False)     # absent: saved before it existed
            if not isinstance(closing, bool):
                raise ValueError(f"closing is {closing!r}, not a boolean")
            # absent: saved before they were kept (learned again from the next pongs)
            incarnations = _incarnations(state.get("incarnations", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StateError(f"malformed master state: {e!r}") from None
        down = membership.dead | set(failing)
        if not down <= set(memnodes) or len(down) != len(membership.dead) + len(failing):
            raise StateError(f"dead memory nodes {sorted(membership.dead)} and failing "
                             f"{failing} must be distinct nodes of the config")
        if (clients.keys() & repairs.keys() or clients.keys() & set(free)
                or repairs.keys() & set(free) or len(set(free)) != len(free)):
            raise StateError("master state names an id twice")
        if not incarnations.keys() <= set(memnodes) - down:
            raise StateError(f"master state has incarnations {incarnations} for memory nodes "
                             "that are not live ones of the config")
        m = cls(memnodes, client_lease, mn_lease, grace, now, replicas=replicas,
                membership=membership, failing=failing, free_ids=free, next_id=next_id,
                closing=closing, incarnations=incarnations)
        m.clients = {c: _Lease(t, 0.0) for c, t in clients.items()}
        m.lease_afresh(now)
        m.repairs = {c: _Job(reason, token=tokens.get(c)) for c, reason in repairs.items()}
        return m

    def unfenced(self) -> list[int]:
        """The expired clients awaiting recovery whose lease token this master does not know
        (inherited from a state saved before tokens were kept): recovered without fencing,
        so a batch such a client still had on its way may land (``fusee.fencing``)."""
        return sorted(c for c, r in self.repairs.items()
                      if r.reason == "expired" and r.token is None)

    def lease_afresh(self, now: float) -> None:
        """Give every leased client a full lease from ``now``: after a restart, a takeover or
        a break in which this master could not be reached, when a client's missed renewals
        say nothing of its health. Never shorter than what the client itself believes it has
        (its lease counts from a renewal it sent before ``now``); only slower to expire."""
        for lease in self.clients.values():
            lease.deadline = max(lease.deadline, now + self.client_lease + self.grace)

    def mn_afresh(self, now: float) -> None:
        """Give every live MN a full lease from ``now``: after a stall of this master, when
        the heartbeats it did not send say nothing of the MNs' health."""
        for node, deadline in self.mn_deadline.items():
            if deadline != -math.inf:       # a restarted MN's memory is gone all the same
                self.mn_deadline[node] = max(deadline, now + self.mn_lease)


def _incarnations(saved: dict[str, object]) -> dict[int, int]:
    """The live MNs' incarnations as ``state()`` saved them: nonzero 64-bit ints, one per
    node. Anything else (a float, a bool, a string, a node named twice as "1" and "01") is
    no state of ours, and taken as one it would fail a healthy MN over at its first pong."""
    words = {int(m): w for m, w in saved.items() if type(w) is int and 0 < w < 1 << 64}
    if len(words) != len(saved):
        raise ValueError(f"incarnations {saved!r} are not one 64-bit word per memory node")
    return words


def _repair_tokens(saved: object, repairs: dict[int, str]) -> dict[int, int]:
    """The lease tokens of the expired clients awaiting recovery, as ``state()`` saved them
    (a state saved before they were kept has none: its repairs are ``unfenced``). Each must
    belong to an expired client's repair; one that does not says the state is not what it
    claims to be."""
    if not isinstance(saved, dict):
        raise ValueError(f"repair_tokens is {saved!r}, not a mapping")
    tokens = {}
    for c, t in saved.items():
        cid = int(c)
        if repairs.get(cid) != "expired":
            raise ValueError(f"repair_tokens names client {cid}, which awaits no recovery "
                             "after an expired lease")
        if type(t) is not int or t < 0:
            raise ValueError(f"the lease token of client {cid} is {t!r}")
        tokens[cid] = t
    return tokens
