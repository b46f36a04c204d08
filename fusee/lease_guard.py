"""The transport as a client's operations see it under a master's lease (``LeaseGuard``),
and the checks a client makes of the memory nodes it reached before its first operation.

A client under a master posts no verb unless its lease is valid and the master has not paused
it for a failover; a memory node that stops answering is a suspicion for the master's failure
detector to confirm, not a failure (late replies are awaited); a membership newer than the
operations' is handed to them as ``EpochChanged``. Out of ``fusee.client`` so that the public
API's module holds the API, and this one the lease's side of every round trip.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from fusee.cluster_identity import check_transport, reached
from fusee.errors import NodeRestarted
from fusee.membership import Membership
from fusee.verbs import Batch, EpochChanged, NodeTimeout, TransportError

if TYPE_CHECKING:
    from fusee.config import ClusterConfig
    from fusee.master.link import LeaseKeeper
    from fusee.transports.base import Transport


def check_reachable(transport: Transport, lease: LeaseKeeper, config: ClusterConfig) -> None:
    """Raise NodeTimeout for an MN that did not answer this client's transport (it keeps a
    placeholder region of length 0) while the master counts it alive: a wrong endpoint in
    the config, or no route from this host. Otherwise operations would wait for a failover
    that never comes (``membership_wait``, half a minute) and then fail naming no node. An
    MN that just died is told apart by giving the master ``mn_lease`` seconds to notice: it
    then pauses the clients or publishes a new epoch, and the failover takes its course."""
    reach_rebuilt(transport, lease, lease.membership)
    silent = sorted(n for n, r in transport.regions.items()
                    if r.length == 0 and n not in lease.membership.dead)
    if not silent:
        return
    epoch = lease.membership.epoch
    if await_news(lease, lambda: bool(lease.pause) or lease.membership.epoch != epoch,
             config.mn_lease):
        return
    node = config.node(silent[0])
    raise NodeTimeout(f"MN {node.id} at {node.endpoint} did not answer within "
                      f"{transport.timeout:g} s, yet the master hears from it: check its "
                      "endpoint in the cluster config, and that this host can reach it", node.id)


def identified(transport: Transport, lease: LeaseKeeper, config: ClusterConfig
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
        reach_rebuilt(transport, lease, membership)
        gone = check_transport(transport, set(reached(transport)) - membership.dead, known)
        if not gone:
            return membership
        epoch = membership.epoch

        def moved(epoch: int = epoch) -> bool:
            return lease.membership.epoch != epoch or lease.ended

        if not await_news(lease, moved, wait):
            node = config.node(min(gone))
            raise NodeRestarted(f"MN {node.id} at {node.endpoint} restarted (its incarnation "
                                f"is not the one the master knows), and the master published "
                                f"no membership after epoch {epoch} within {wait:g} s: "
                                f"{lease.data_lost or 'is the master running?'}", node.id)
        lease.check(wait)


def reach_rebuilt(transport: Transport, lease: LeaseKeeper, membership: Membership) -> None:
    """Reconnect ``transport`` to the MNs ``membership`` has rebuilt since it connected (after
    the lease's grant) or that it did not reach: it took them for dead, or reached a process
    that restarted since, and a rebuild published meanwhile brought them back. Operations
    handed ``membership`` would otherwise meet them as dead and wait, in vain, for an epoch
    after it (``LeaseGuard._await`` revives only those rebuilt in an epoch it hands over)."""
    since = lease.grant.membership.epoch if lease.grant.membership is not None else 0
    stale = {n for n, e in membership.rebuilt_at.items() if e > since}
    if back := (stale | (membership.rebuilt - set(reached(transport)))) - membership.dead:
        transport.revive(back)


def await_news(lease: LeaseKeeper, done: Callable[[], bool], seconds: float) -> bool:
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


#: seconds between two looks at the lease keeper's news while a batch awaits late replies
LATE_POLL = 0.05


class LeaseGuard:
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
