"""The master's logic, sans-IO (SPEC §1, §8): who is alive, who holds which client id, and
which crashed clients still need recovery. The master is not on the data path; this module
only decides, from the calls it gets and the time it is given. ``emulator.master_server``
feeds it heartbeats and RPCs and carries out the repairs it asks for.

Memory nodes hold leases renewed by the master's pings: an MN whose lease runs out is declared
dead for good (crash-stop: a restarted MN has lost its memory), and the membership ``epoch``
goes up.

Clients hold leases renewed by themselves. A client stops posting verbs when its own lease runs
out (measured from when it *sent* the renewal, so its view ends first); the master waits
``grace`` more (the longest one batch can be in flight) before it declares the client crashed.
The client's id then waits in the repair queue until recovery has finished the client's
operations, and only then goes back to the pool: an id is never handed out while anything of
its previous holder may still be in flight. A clean ``release`` takes the same path (recovery
of a client that closed cleanly finds nothing to finish, and it keeps one rule for every id).

The persistent state (``state()``) is small: epoch, dead MNs, ids in use with their tokens,
pending repairs and recycled ids. Lease deadlines are not persisted (they are monotonic time):
a restarted master gives every known client a full lease again, which is never shorter than
what the client itself believes it has.
"""

from __future__ import annotations

import bisect
from dataclasses import InitVar, dataclass, field
from typing import Iterable

from fusee.errors import FuseeError

STATE_VERSION = 1
#: retry delays of a failed repair: base * 2**attempts, capped
REPAIR_BACKOFF, REPAIR_BACKOFF_MAX = 0.1, 5.0


class LeaseError(FuseeError):
    """A renewal or release for an id the master does not (or no longer) lease to the caller."""


class LeaseExpired(FuseeError):
    """This client's lease ran out: it may no longer write, and the master will recover its
    operations. Open a new client."""


class StateError(FuseeError):
    """A master state file that is malformed or belongs to another cluster shape."""


@dataclass(frozen=True)
class Grant:
    """What a client learns when it registers or renews."""
    id: int
    token: int
    lease: float            # seconds, from the moment the client sent its request
    epoch: int


@dataclass(frozen=True)
class Event:
    """Something the master decided on its own: ``kind`` is "mn-dead" (subject = MN id) or
    "client-expired" (subject = client id)."""
    kind: str
    subject: int
    epoch: int


@dataclass
class _Lease:
    token: int
    deadline: float         # the master's own deadline: client lease + grace


@dataclass
class _Repair:
    reason: str             # "expired" or "released"
    attempts: int = 0
    retry_at: float = 0.0
    error: str | None = None
    running: bool = False


@dataclass
class Master:
    memnodes: tuple[int, ...]
    client_lease: float
    mn_lease: float
    grace: float
    now: InitVar[float]
    epoch: int = 0
    dead: set[int] = field(default_factory=set)
    clients: dict[int, _Lease] = field(default_factory=dict)
    repairs: dict[int, _Repair] = field(default_factory=dict)
    free_ids: list[int] = field(default_factory=list)        # sorted
    mn_deadline: dict[int, float] = field(default_factory=dict)

    def __post_init__(self, now: float) -> None:
        for name in ("client_lease", "mn_lease"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.grace < 0:
            raise ValueError("grace must be >= 0")
        self.memnodes = tuple(self.memnodes)
        for m in self.memnodes:
            if m not in self.dead:
                self.mn_deadline.setdefault(m, now + self.mn_lease)

    # -- client ids and leases --------------------------------------------------------------
    def reusable_id(self) -> int | None:
        """The smallest recovered id, to hand out before drawing a fresh one."""
        return self.free_ids[0] if self.free_ids else None

    def grant(self, cid: int, token: int, now: float) -> Grant:
        """Lease ``cid`` (a recycled id or a fresh one the caller drew) to a new client."""
        if cid in self.clients or cid in self.repairs:
            raise LeaseError(f"client id {cid} is in use or awaiting recovery")
        i = bisect.bisect_left(self.free_ids, cid)
        if i < len(self.free_ids) and self.free_ids[i] == cid:
            del self.free_ids[i]
        self.clients[cid] = _Lease(token, now + self.client_lease + self.grace)
        return Grant(cid, token, self.client_lease, self.epoch)

    def renew(self, cid: int, token: int, now: float) -> Grant:
        lease = self._holder(cid, token)
        if now > lease.deadline:            # ran out before a tick noticed: same outcome
            self._expire(cid)
            raise LeaseError(f"the lease of client {cid} expired")
        lease.deadline = now + self.client_lease + self.grace
        return Grant(cid, token, self.client_lease, self.epoch)

    def release(self, cid: int, token: int) -> None:
        """A clean close: the id goes to recovery (which finds nothing in flight) and back."""
        self._holder(cid, token)
        del self.clients[cid]
        self.repairs[cid] = _Repair("released")

    def _holder(self, cid: int, token: int) -> _Lease:
        lease = self.clients.get(cid)
        if lease is None or lease.token != token:
            raise LeaseError(f"client {cid} holds no lease with this token")
        return lease

    def _expire(self, cid: int) -> None:
        del self.clients[cid]
        self.repairs[cid] = _Repair("expired")

    # -- memory nodes -----------------------------------------------------------------------
    def mn_seen(self, node: int, sent_at: float) -> None:
        """MN ``node`` answered a ping sent at ``sent_at``. A dead MN stays dead."""
        if node in self.mn_deadline:
            self.mn_deadline[node] = max(self.mn_deadline[node], sent_at + self.mn_lease)

    def alive(self) -> list[int]:
        return sorted(self.mn_deadline)

    # -- time -------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Event]:
        """Expire what ran out by ``now``; the events say what changed."""
        events = []
        for node, deadline in sorted(self.mn_deadline.items()):
            if now > deadline:
                del self.mn_deadline[node]
                self.dead.add(node)
                self.epoch += 1
                events.append(Event("mn-dead", node, self.epoch))
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

    # -- the repair queue -------------------------------------------------------------------
    def next_repair(self, now: float) -> int | None:
        """A repair due now (marked running until ``repair_done`` / ``repair_failed``)."""
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
        r = self._running(cid)
        r.running = False
        r.attempts += 1
        r.error = error
        r.retry_at = now + min(REPAIR_BACKOFF * 2 ** (r.attempts - 1), REPAIR_BACKOFF_MAX)

    def _running(self, cid: int) -> _Repair:
        r = self.repairs.get(cid)
        if r is None or not r.running:
            raise ValueError(f"no repair of client {cid} is running")
        return r

    # -- views and persistence --------------------------------------------------------------
    def status(self, now: float) -> dict:
        """A snapshot for operators and tests (string keys, so it travels as msgpack or JSON):
        seconds left on each lease, the repair queue, the recycled ids."""
        return {"epoch": self.epoch,
                "alive": {str(m): round(d - now, 3) for m, d in sorted(self.mn_deadline.items())},
                "dead": sorted(self.dead),
                "clients": {str(c): round(lease.deadline - now, 3)
                            for c, lease in sorted(self.clients.items())},
                "repairs": {str(c): {"reason": r.reason, "attempts": r.attempts,
                                     "error": r.error, "running": r.running}
                            for c, r in sorted(self.repairs.items())},
                "free_ids": list(self.free_ids)}

    def state(self) -> dict:
        """What must survive a restart (JSON-able)."""
        return {"version": STATE_VERSION, "memnodes": list(self.memnodes), "epoch": self.epoch,
                "dead": sorted(self.dead),
                "clients": {str(c): l.token for c, l in sorted(self.clients.items())},
                "repairs": {str(c): r.reason for c, r in sorted(self.repairs.items())},
                "free_ids": list(self.free_ids)}

    @classmethod
    def restore(cls, state: dict, memnodes: Iterable[int], client_lease: float,
                mn_lease: float, grace: float, now: float) -> "Master":
        """Carry on from ``state()``: every known client gets a full lease from ``now``."""
        memnodes = tuple(memnodes)
        try:
            if state["version"] != STATE_VERSION:
                raise StateError(f"master state version {state['version']!r}, "
                                 f"expected {STATE_VERSION}")
            if tuple(state["memnodes"]) != memnodes:
                raise StateError(f"master state is for memory nodes {state['memnodes']}, "
                                 f"the config has {list(memnodes)}")
            dead = {int(m) for m in state["dead"]}
            clients = {int(c): int(t) for c, t in state["clients"].items()}
            repairs = {int(c): str(reason) for c, reason in state["repairs"].items()}
            free = sorted(int(c) for c in state["free_ids"])
            epoch = int(state["epoch"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StateError(f"malformed master state: {e!r}") from None
        if not dead <= set(memnodes):
            raise StateError(f"dead memory nodes {sorted(dead)} not in the config")
        if (clients.keys() & repairs.keys() or clients.keys() & set(free)
                or repairs.keys() & set(free) or len(set(free)) != len(free)):
            raise StateError("master state names an id twice")
        m = cls(memnodes, client_lease, mn_lease, grace, now, epoch=epoch, dead=dead,
                free_ids=free)
        deadline = now + client_lease + grace
        m.clients = {c: _Lease(t, deadline) for c, t in clients.items()}
        m.repairs = {c: _Repair(reason) for c, reason in repairs.items()}
        return m
