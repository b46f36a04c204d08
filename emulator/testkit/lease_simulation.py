"""The lease/pause protocol in the deterministic simulator: the real
``fusee.master.logic.Master`` on a simulated clock, interleaved verb by verb with the clients'
operations.

``fusee.emulator.testkit.simulator`` pauses clients for a failover by fiat. Here nothing is by
fiat: one
scheduler step is ``TICK`` simulated seconds, and at each step

- renewals and their replies that are due arrive (each is dropped or delayed as the seed
  says; a master that is down drops what it is sent), and the master's ``renew`` answers;
- the master hears the live MNs' pings, ``tick``s (an MN or a client whose lease ran out is
  declared dead), runs the failover ``next_failover`` allows (the MNs' failover as
  ``fusee.failover`` does it) and starts the repair ``next_repair`` hands out: a recovery
  (``fusee.recovery``) that then runs verb by verb like any client;
- each leased client's batch in flight lands once ``flight`` seconds have passed (a posted
  verb is the NIC's, the client's CPU plays no part: the longest a batch is in flight, which
  the master's ``grace`` covers), a paused client acks once no batch of it is in flight, and
  it renews when its keeper would (every third of the lease, ``POLL`` while paused); a client
  may stall (SIGSTOP) for a while: it then neither moves, renews nor acks.

Before each batch a client posts, the ``LeaseGuard`` check is made against the simulated
clock: the lease as the client sees it (``LeaseKeeper._expiry``: from when the renewal was
sent, less ``CLOCK_MARGIN``), the pause, the end of the lease; a batch that may not go waits
(``held``) until it may. A client whose renewal the master refuses is over (``LeaseExpired``:
its operation's outcome is unknown, the master recovers it). ``restart_master`` stops the
master (its repairs in progress die with it) and brings it back ``down`` seconds later from
its saved state (``fusee.master.saved_state``, which the server persists at every change), as a
restarted or standby master does.

The invariants, checked at every verb: no verb of a client lands once the master has declared
it dead (fencing), no verb of an epoch lands once a later epoch is published, no batch is in
flight when a failover starts, and a client that passes the guard knows the current epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fusee.emulator.testkit.simulator import Call, SimClient, SimulationError, Simulator
from fusee.master.logic import Grant, LeaseError, Master
from fusee.master.saved_state import restore, state_of
from fusee.recovery import recover_client
from fusee.verbs import AwaitMembership, Backoff, EpochChanged, NodeTimeout
from fusee.transports.local import LocalMemory
from fusee.master.link import POLL, LeaseKeeper

#: simulated seconds per scheduler step
TICK = 0.001


@dataclass
class SimLease:
    """A client's ``LeaseKeeper`` on the simulated clock."""
    cid: int
    token: int
    lease: float                # what the master grants, seconds
    expires: float              # the client's own view (LeaseKeeper._expiry)
    epoch: int                  # the membership epoch the client knows
    pause: int = 0              # nonzero: post nothing until that epoch
    acked: int = 0
    ended: str | None = None    # the master refused a renewal: the lease is over for good
    released: bool = False
    next_renewal: float = 0.0
    last_sent: float = 0.0      # the keeper waits for the reply to this renewal only
    stalled_until: float = 0.0
    cut_until: float = 0.0      # until then, no message between it and the master goes through
    held: list | None = None    # a batch the guard keeps home
    posted_at: float = 0.0      # when the batch in flight went out
    batch_epoch: int = 0        # the epoch it went out in


@dataclass(order=True)
class _Message:
    arrives: float
    seq: int
    name: str = field(compare=False)
    sent: float = field(compare=False)
    paused: int = field(compare=False, default=0)
    reply: Grant | LeaseError | None = field(compare=False, default=None)   # None: a request


class LeaseSimulator(Simulator):
    """A ``Simulator`` whose clients hold leases of ``master`` (see the module docstring).

    ``drop``: the chance that a renewal or its reply is lost; ``delay``: the most either is
    delayed, but for the ``late`` share of them, delayed up to a whole lease; ``stalls``: the
    chance per step that a client stalls, for up to ``stall`` s."""

    def __init__(self, memory: LocalMemory, seed: int, *, client_lease: float = 0.3,
                 grace: float = 0.05, mn_lease: float = 0.05, flight: float = 0.02,
                 drop: float = 0.05, delay: float = 0.01, late: float = 0.0,
                 stalls: float = 0.0,
                 stall: float = 0.0, **kw):
        super().__init__(memory, seed, **kw)
        assert flight <= grace, "the grace covers the longest a batch is in flight"
        self.config = memory.config
        self.shape: dict[str, Any] = {"memnodes": tuple(range(len(self.config.memnodes))),
                      "client_lease": client_lease, "mn_lease": mn_lease, "grace": grace}
        self.master: Master | None = Master(now=0.0, replicas=self.config.replication,
                                            **self.shape)
        self.master_back_at = 0.0
        self.saved: dict | None = None
        self.flight, self.drop, self.delay, self.late = flight, drop, delay, late
        self.stalls, self.stall = stalls, stall
        self.leases: dict[str, SimLease] = {}
        self.declared: dict[int, float] = {}    # client id -> when the master declared it dead
        self.expired: set[str] = set()          # clients whose lease the master ended
        self.repairs: dict[int, str] = {}       # client id -> its recovery actor, running
        self.reports: list = []                 # what each finished recovery returned
        self._messages: list[_Message] = []
        self._seq = 0

    @property
    def now(self) -> float:
        return self.step * TICK

    # -- setup -----------------------------------------------------------------------------
    def add_leased_client(self, name: str, cid: int, calls) -> SimClient:
        """A client that registers as ``cid`` now (the master must be up)."""
        assert self.master is not None
        token = self.rng.getrandbits(62)
        g = self.master.grant(cid, token, self.now)
        self.leases[name] = SimLease(cid, token, g.lease, LeaseKeeper._expiry(self.now, g.lease),
                                     g.epoch, next_renewal=self.now + g.lease / 3)
        return self.add_client(name, calls)

    def cut_off(self, name: str, seconds: float) -> None:
        """Client ``name`` and the master cannot reach each other for ``seconds`` (the MNs
        it still reaches): what it sends and what it is sent meanwhile is lost."""
        self.leases[name].cut_until = self.now + seconds
        self.faults.append((self.step, f"client {name} cut off from the master for {seconds:g} s"))

    def restart_master(self, down: float) -> None:
        """The master stops now (its repairs die with it) and is back ``down`` s later from
        its persisted state."""
        if self.master is None:
            return
        self.saved = state_of(self.master)
        self.master = None
        self.master_back_at = self.now + down
        for name in self.repairs.values():
            self.crash_client(name)
        self.repairs.clear()
        self.faults.append((self.step, f"master down for {down:g} s"))

    # -- the clock -------------------------------------------------------------------------
    def _before_step(self) -> None:
        now = self.now
        if self.master is None and now >= self.master_back_at:
            assert self.saved is not None, "a master that went down saved its state"
            self.master = restore(self.saved, now=now, replicas=self.config.replication,
                                  **self.shape)
            self.faults.append((self.step, "master restarted from its state"))
        while self._messages and self._messages[0].arrives <= now:
            self._deliver(self._messages.pop(0))
        self._master_step(now)
        for name, lease in self.leases.items():
            self._client_step(self.clients[name], lease, now)

    def _master_step(self, now: float) -> None:
        m = self.master
        if m is None:
            return
        for node in m.alive():
            if node not in self.memory.crashed:
                m.mn_seen(node, now)
        m.tick(now)
        self._note_declared()
        if (nodes := m.next_failover(now)) is not None:
            self._failover(m, nodes)
        if (cid := m.next_repair(now)) is not None:
            self._start_repair(cid)

    def _note_declared(self) -> None:
        """Record when the master declared each leased client dead (or took its id back)."""
        for lease in self.leases.values():
            if lease.cid not in self.master.clients and lease.cid not in self.declared:
                self.declared[lease.cid] = self.now

    def _client_step(self, c: SimClient, lease: SimLease, now: float) -> None:
        if c.pending and now >= lease.posted_at + self.flight:     # the NIC delivers it
            while c.runnable and c.pending:
                self._verb(c, next(iter(c.pending)))
        if c.crashed or lease.ended or lease.released or now < lease.stalled_until:
            return
        if c.done:
            self._release(lease)
            return
        if self.stalls and self.fault_rng.random() < self.stalls:
            lease.stalled_until = now + self.fault_rng.uniform(0, self.stall)
            until = f"{lease.stalled_until:.3f}"
            self.faults.append((self.step, f"client {c.name} stalls until {until}"))
            return
        if lease.pause and lease.acked != lease.pause and not c.pending:
            lease.acked = lease.pause       # between batches: ack at once
            lease.next_renewal = now
        if now >= lease.next_renewal:
            self._send(c.name, now, lease.acked)
            lease.last_sent = now
            lease.next_renewal = now + (POLL if lease.pause or c.waiting else lease.lease / 3)
        if lease.held is not None and self._may_post(lease, now):
            batch, lease.held = lease.held, None
            self._post(c, batch)

    def _release(self, lease: SimLease) -> None:
        """A client that closed gives its id back (``LeaseKeeper.close``), if its lease holds."""
        if self.master is None:
            return
        lease.released = True
        if self.now < lease.expires:
            try:
                self.master.release(lease.cid, lease.token)
            except LeaseError:
                pass
        self._note_declared()

    # -- renewals --------------------------------------------------------------------------
    def _send(self, name: str, sent: float, paused: int = 0,
              reply: Grant | LeaseError | None = None) -> None:
        """A renewal sent at ``sent`` (or the reply to it) leaves now, unless it is lost."""
        if self.rng.random() < self.drop or self.now < self.leases[name].cut_until:
            return
        self._seq += 1
        delay = self.shape["client_lease"] if self.rng.random() < self.late else self.delay
        msg = _Message(self.now + self.rng.uniform(0, delay), self._seq, name, sent, paused,
                       reply)
        i = len(self._messages)
        while i and self._messages[i - 1] > msg:
            i -= 1
        self._messages.insert(i, msg)

    def _deliver(self, msg: _Message) -> None:
        lease = self.leases[msg.name]
        if self.now < lease.cut_until:
            return
        if msg.reply is None:               # a renewal reaches the master
            if self.master is None:
                return
            reply: Grant | LeaseError
            try:
                reply = self.master.renew(lease.cid, lease.token, self.now, msg.paused)
            except LeaseError as e:
                reply = e
            self._note_declared()
            self._send(msg.name, msg.sent, reply=reply)
            return
        if msg.sent < lease.last_sent:      # the keeper gave up on it (MasterLink's seq)
            return
        c = self.clients[msg.name]
        if isinstance(msg.reply, LeaseError):
            if not lease.ended and not lease.released:
                lease.ended = str(msg.reply)
                if c.gen is None or lease.held is not None:
                    self._lease_ended(c)
            return
        g = msg.reply
        lease.expires = LeaseKeeper._expiry(msg.sent, g.lease)
        lease.epoch = max(lease.epoch, g.epoch)
        lease.pause = LeaseKeeper._pause(g, lease.epoch)

    def _lease_ended(self, c: SimClient) -> None:
        """``LeaseExpired``: the client's operation ends with an unknown outcome, and the
        client with it."""
        self.expired.add(c.name)
        self.leases[c.name].held = None
        self.crash_client(c.name)

    # -- the guard -------------------------------------------------------------------------
    @staticmethod
    def _may_post(lease: SimLease, now: float) -> bool:
        return now < lease.expires and not lease.pause

    def _movable(self, c: SimClient) -> bool:
        lease = self.leases.get(c.name)
        if lease is not None and (lease.held is not None or self.now < lease.stalled_until):
            return False
        return super()._movable(c)

    def _time_passes(self) -> bool:
        m = self.master
        return (m is None or bool(m.repairs) or bool(m.failing and not m.lost)
                or any(c.runnable for c in self.clients.values()))

    def _post(self, c: SimClient, batch) -> None:
        lease = self.leases.get(c.name)
        batch = list(batch)
        if (lease is None or not batch or type(batch[0]) is Backoff
                or type(batch[0]) is AwaitMembership):
            super()._post(c, batch)
            return
        if lease.ended:
            self._lease_ended(c)
            return
        now = self.now
        if not self._may_post(lease, now):
            lease.held = batch
            return
        if lease.epoch != self.membership.epoch:
            raise SimulationError(f"seed {self.seed}, step {self.step}: client {c.name} may "
                                  f"post in epoch {lease.epoch} but epoch "
                                  f"{self.membership.epoch} is out")
        lease.posted_at, lease.batch_epoch = now, self.membership.epoch
        super()._post(c, batch)

    def _verb(self, c: SimClient, node: int) -> None:
        lease = self.leases.get(c.name)
        if lease is not None:
            dead_at = self.declared.get(lease.cid)
            if dead_at is not None:
                raise SimulationError(f"seed {self.seed}, step {self.step}: a verb of client "
                                      f"{c.name} lands at {self.now:.3f}, after the master "
                                      f"declared it dead at {dead_at:.3f}")
            if lease.batch_epoch != self.membership.epoch:
                raise SimulationError(f"seed {self.seed}, step {self.step}: a verb of client "
                                      f"{c.name} from epoch {lease.batch_epoch} lands in "
                                      f"epoch {self.membership.epoch}")
        super()._verb(c, node)

    # -- the master's actions --------------------------------------------------------------
    def _failover(self, m: Master, nodes: tuple[int, ...]) -> None:
        busy = [c.name for c in self.clients.values() if c.runnable and c.pending]
        if busy:
            raise SimulationError(f"seed {self.seed}, step {self.step}: the failover of MNs "
                                  f"{list(nodes)} starts while {busy} have batches in flight")
        self._publish_failover(nodes)
        m.failover_done(nodes, self.membership)

    def _start_repair(self, cid: int) -> None:
        name = f"repair{cid}.{self.step}"
        master = self.master

        def recover():
            try:
                report = yield from recover_client(self.config, cid, clock=lambda: 0.0,
                                                   membership=self.membership)
            except (NodeTimeout, EpochChanged) as e:
                if self.master is master:
                    master.repair_failed(cid, self.now, repr(e))
                    del self.repairs[cid]
                return "failed"
            assert self.master is master, "a repair outlived its master"
            master.repair_done(cid)
            del self.repairs[cid]
            self.reports.append(report)
            return "recovered"
        self.repairs[cid] = name
        self.add_client(name, [Call("recover", None, None, recover)])
