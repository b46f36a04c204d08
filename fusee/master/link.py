"""A client's link to the master: RPCs with deadlines, and the lease a store client holds.

The master speaks the memory nodes' control protocol (``fusee.emulator.wire``: a msgpack
``[CONTROL, seq, method, {args}]`` request, a ``[seq, [value], error]`` reply) on a ROUTER
socket; ``MasterLink`` is one DEALER socket to it, with the same sequence numbers so a late
reply is never mistaken for the next one.

``LeaseKeeper`` registers (gets a client id, a lease and the current membership) and then
renews the lease from a daemon thread with a socket of its own, every third of the lease. A
thread rather than renewals piggybacked on operations: an idle client must keep its id too,
and the renewal stays off the data path (one small RPC per lease/3; the data path pays one
clock read and one uncontended lock per batch). The lease counts from when a renewal was
*sent*, on the client's own monotonic clock, less ``CLOCK_MARGIN`` for the two clocks' rates,
so the client's view of it always ends before the master's.

A master that goes away does not end the lease. While it is unreachable the client goes on
posting verbs as long as its lease is valid, and the keeper keeps trying, with back-off, the
next master of the list each time (``MasterLink``), until a renewal comes back. Once
``valid()`` is false the client posts nothing (``lapsed``), but it is not dead: the master
declares a client crashed only after its own deadline (the client's lease plus the grace,
counted from when it received the renewal), records that before acting on it, and refuses every
later renewal of that id and token. So a renewal granted after a lapse proves that no master
declared the client crashed, and the client carries on where it was: a master restarted from
its state (``fusee.master.logic``) leases every recorded client afresh, and the keeper's next
renewal finds it. Only a refusal (``LeaseError``) ends the lease for good (``ended``): then the
master recovers the client's operations and reuses its id.

The keeper also carries the master's failover protocol (``fusee.master.logic``): when a renewal
says *pause* for the next epoch, it takes ``gate`` (which the executor holds around every
batch it posts, so this waits for the batch in flight), sets ``pause`` so that no new batch
goes out, and acks at once with another renewal; while paused, or while an operation waits
for a new epoch (``expect_news``), it renews every ``POLL`` seconds, so the published
membership arrives promptly. ``news`` (a Condition) is notified on every change.
"""

from __future__ import annotations

import math
import random
import secrets
import threading
import time
from collections.abc import Mapping
from typing import Any

import zmq

from fusee.emulator import wire
from fusee.config import ClusterConfig, ConfigError, MemNodeConfig
from fusee.errors import MasterBusy, MasterError, MasterStandby, MasterTimeout
from fusee.master.logic import Grant, LeaseError, LeaseExpired, LeaseLapsed
from fusee.master.protocol import (INCARNATIONS, REGISTER, RELEASE, RENEW, STATUS,
                                   decode_grant, refusal as master_refusal)
from fusee.membership import Membership
from fusee.transports.security import HANDSHAKE_FAILED, refusal, secure_client

#: seconds between renewals while paused or while an operation awaits a new epoch
POLL = 0.02
#: seconds between renewals while a rebuild runs: its pause waits for every client's ack,
#: and each client paused meanwhile waits for the slowest to hear of it (at most this, not a
#: third of the lease)
REBUILD_POLL = 0.05
#: the share of each lease the client gives up for the rate difference of its clock and the
#: master's: NTP slews a clock by at most 500 ppm, quartz drifts by tens of ppm
CLOCK_MARGIN = 0.01
#: the first retry of a renewal that got no reply, doubled per failure up to a third of the lease
RETRY_FIRST = 0.05


def renewal_wait(lease: float, awaiting: bool, rebuilding: bool) -> float:
    """Seconds until a client's next renewal: often while it is paused or an operation awaits
    a new epoch (``awaiting``), fairly often while a rebuild runs (so that its pause hears
    every ack soon), else a third of the ``lease``."""
    if awaiting:
        return POLL
    return min(REBUILD_POLL, lease / 3) if rebuilding else lease / 3


def membership_wait(config: ClusterConfig) -> float:
    """How long a client may wait for the next membership epoch once an MN stopped answering:
    the master's detection (MN lease), every other client's pause ack or lease expiry (a
    client lease to renew, one more to run out, plus the grace), and the failover itself (a
    few round trips, each bounded by the timeout), with a margin. An operation whose lease
    lapsed waits as long for a renewal: a master restarted (or taken over) from its state
    leases every client afresh within that time unless it stays down."""
    return config.mn_lease + 2 * config.client_lease + 4 * config.timeout + 1.0


def register_wait(config: ClusterConfig) -> float:
    """How long a client waits for the master's answer to its registration: the master may
    first survey the MNs (a connection, an FAA and a read, each bounded by the timeout) and
    saves its state before it answers, so one timeout is not enough for a master that is
    merely busy; a master silent for all of it is taken as down."""
    return 4 * config.timeout


class MasterLink:
    """Synchronous RPCs to the master (one thread at a time uses one link). With several
    masters (``config.masters``: one leads, on ZooKeeper, the others stand by) it talks to one
    at a time: a master standing by sends it on to the next at once; one that does not answer
    in time is left for the next on the following call. Each move opens a fresh socket, so no
    request queued for a master that went away reaches its successor late."""

    def __init__(self, config: ClusterConfig, timeout: float | None = None):
        if not config.master:
            raise ConfigError("the cluster config names no master")
        if config.security.curve and not config.master_curve_public:
            raise ConfigError("security.curve needs master_curve_public in the cluster config")
        self.config = config
        self.timeout = config.timeout if timeout is None else timeout
        self.endpoints = config.masters
        self.at = 0                             # the index of the master talked to
        self.sock: zmq.Socket[bytes]                # (``_open``)
        #: CURVE handshake failures, watched until the master first answers (``_greeting``)
        self.monitor: zmq.Socket[bytes] | None = None
        self._open()
        self.seq = secrets.randbits(31)         # distinct from an earlier link's replies

    @property
    def endpoint(self) -> str:
        return self.endpoints[self.at]

    def _open(self) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.rcvtimeo = -1
        try:
            # the master is a server like an MN: same CURVE rules, its own public key
            self.public = secure_client(
                self.sock, self.config,
                MemNodeConfig(-1, self.endpoint, self.config.master_curve_public))
            if self.config.security.curve:
                self.monitor = self.sock.get_monitor_socket(HANDSHAKE_FAILED)
            self.sock.connect(self.endpoint)
        except BaseException:
            self._close_sockets()
            raise

    def _move_on(self) -> None:
        """Talk to the next master (the same one again, with a fresh socket, if it is the
        only one)."""
        self._close_sockets()
        self.at = (self.at + 1) % len(self.endpoints)
        self._open()

    def call(self, method: str, timeout: float | None = None, **args: Any) -> Any:
        """Send one request; its reply value, or LeaseError / MasterBusy / MasterError /
        MasterTimeout."""
        timeout = self.timeout if timeout is None else timeout
        for _ in range(len(self.endpoints)):
            try:
                return self._call_one(method, timeout, args)
            except MasterStandby:
                self._move_on()             # it named no lease: ask the next one at once
            except MasterTimeout:
                self._move_on()
                raise
        raise MasterStandby(f"master: all of {', '.join(self.endpoints)} stand by: no leader "
                            "yet (is ZooKeeper reachable from them?)")

    def _call_one(self, method: str, timeout: float, args: dict[str, Any]) -> Any:
        self.seq += 1
        try:
            self.sock.send(wire.encode_control(self.seq, method, args), zmq.NOBLOCK)
        except zmq.Again:
            raise MasterTimeout(f"master at {self.endpoint}: cannot send {method!r} (not "
                                "connected)") from None
        deadline = time.monotonic() + timeout
        if self.monitor is not None:
            self._greeting(deadline)
        while True:
            left = deadline - time.monotonic()
            ms = int(left * 1000) + 1 if left > 0 else 0
            if ms != self.rcvtimeo:
                self.sock.setsockopt(zmq.RCVTIMEO, ms)
                self.rcvtimeo = ms
            try:
                data = self.sock.recv()
            except zmq.Again:
                raise MasterTimeout(f"master at {self.endpoint}: no reply to {method!r} within "
                                    f"{timeout:g} s (is it running, and is that its endpoint?)") \
                    from None
            try:
                seq, results, error = wire.decode_reply(data)
            except wire.MalformedMessage:
                continue
            if seq != self.seq:
                continue                        # a late reply to a request that timed out
            if error:
                _, code, text = error
                raise master_refusal(code, text)
            return results[0]

    def register(self, client_id: int | None = None, timeout: float | None = None) -> Grant:
        """A lease on a fresh or recovered id, or on ``client_id`` if it is free."""
        args: dict[str, Any] = {INCARNATIONS: True}
        if client_id is not None:
            args["id"] = client_id
        return decode_grant(self.call(REGISTER, timeout, **args))

    def renew(self, grant: Grant, timeout: float | None = None, paused: int = 0,
              epoch: int = 0) -> Grant:
        """``paused``: the pause epoch acked; ``epoch``: the membership epoch this client has
        (the reply carries the membership when the master's is newer)."""
        return decode_grant(self.call(RENEW, timeout, id=grant.id, token=grant.token,
                                      paused=paused, epoch=epoch,
                                      **{INCARNATIONS: True}))

    def release(self, grant: Grant) -> None:
        self.call(RELEASE, id=grant.id, token=grant.token)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.call(STATUS)
        return status

    def _greeting(self, deadline: float) -> None:
        """Wait (until ``deadline``) for the master's first reply or a refusal of our CURVE
        key, which raises NotAuthorized at once; once it has answered, stop watching."""
        assert self.monitor is not None and self.public is not None, "watched under CURVE"
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(int(left * 1000) + 1))
            refused = refusal(self.monitor, self.public, "the master", self.endpoint)
            if refused is not None:
                raise refused
            if self.sock in ready:
                self.sock.disable_monitor()
                self.monitor.close(0)
                self.monitor = None
                return

    def _close_sockets(self) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(0)
            self.monitor = None
        self.sock.close(0)

    def close(self) -> None:
        self._close_sockets()

    def __enter__(self) -> MasterLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LeaseKeeper:
    """A registered client id, its lease renewed in the background until ``close``, and the
    membership the master published last."""

    def __init__(self, config: ClusterConfig, client_id: int | None = None):
        """Registers (``client_id``: that very id, if it is free); while a failover is in
        progress the registration is retried, up to ``membership_wait``."""
        self.link = MasterLink(config)
        try:
            deadline = time.monotonic() + membership_wait(config)
            silent = 0                          # masters in a row that did not answer
            while True:
                sent = time.monotonic()
                try:
                    self.grant = self.link.register(client_id, register_wait(config))
                    break
                except (MasterBusy, MasterStandby):     # a failover or an election is on
                    if sent > deadline:
                        raise
                    time.sleep(POLL)
                except MasterTimeout:           # the link moved on to the next master
                    silent += 1
                    if silent >= len(self.link.endpoints) or sent > deadline:
                        raise
        except BaseException:
            self.link.close()
            raise
        self.expires = self._expiry(sent, self.grant.lease)
        self.membership = self.grant.membership or Membership()
        #: the incarnation the master knew of each live MN of ``membership`` when it sent it
        #: (``fusee.cluster_identity.restarted``; updated with it, under ``news``)
        self.incarnations: Mapping[int, int] = self.grant.incarnations or {}
        self.epoch = self.membership.epoch
        self.pause = 0                          # nonzero: post nothing until that epoch
        self.acked = 0                          # the pause acked to the master
        self.acks = 0                           # pauses acked so far (``fusee.client``)
        self.lost: str | None = None            # why the last renewal failed, if it did
        self.ended = False                      # the lease is over for good (``lost`` says why)
        self.data_lost: str | None = self.grant.lost    # no failover will come any more
        #: when the last renewal that said a rebuild runs was sent (operations paused for it
        #: keep waiting while renewals say so: ``fusee.client``)
        self.rebuild_seen = -math.inf
        #: the MN a running rebuild copies to, as the last grant said (None: none runs)
        self.rebuilding: int | None = None if self.grant.rebuild is None else self.grant.rebuild[0]
        self.gate = threading.Lock()            # held around every batch posted
        self.news = threading.Condition()
        self.waiters = 0                        # operations waiting for a new epoch
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"fusee-lease-{self.grant.id}")
        self._thread.start()

    @property
    def client_id(self) -> int:
        return self.grant.id

    @staticmethod
    def _expiry(sent: float, lease: float) -> float:
        """When a lease granted for ``lease`` seconds to a request sent at ``sent`` ends, on
        this client's clock."""
        return sent + lease * (1 - CLOCK_MARGIN)

    @staticmethod
    def _pause(g: Grant, epoch: int) -> int:
        """The epoch a renewal tells a client that knows ``epoch`` to pause for (0: none): a
        pause for an epoch it already has is over."""
        return g.pause if g.pause > epoch else 0

    def valid(self) -> bool:
        return time.monotonic() < self.expires

    def await_valid(self, timeout: float) -> None:
        """Return once the lease is valid (at once, usually), waiting up to ``timeout`` for a
        renewal after a lapse; LeaseExpired once it has ended for good, LeaseLapsed when no
        renewal came in time (the client may carry on later)."""
        if time.monotonic() < self.expires:
            return
        deadline = time.monotonic() + timeout
        self.expect_news(True)
        try:
            with self.news:
                while (not self.ended and time.monotonic() >= self.expires
                       and (left := deadline - time.monotonic()) > 0):
                    self.news.wait(left)
        finally:
            self.expect_news(False)
        self.check(timeout)

    def check(self, waited: float) -> None:
        """Raise LeaseExpired if the lease has ended for good, LeaseLapsed if it is not valid
        now (after ``waited`` seconds of waiting for a renewal)."""
        if self.ended:
            raise LeaseExpired(f"the lease of client {self.client_id} ran out ({self.lost}); "
                               "open a new client")
        if time.monotonic() >= self.expires:
            raise LeaseLapsed(f"the lease of client {self.client_id} lapsed and no renewal "
                              f"came within {waited:g} s ({self.lost or 'not renewed in time'})"
                              "; the client posts no verb until the master renews it: retry "
                              "once the master is back")

    def expect_news(self, on: bool) -> None:
        """An operation starts (or stops) waiting for a new epoch: renew now, then often."""
        with self.news:
            self.waiters += 1 if on else -1
        if on:
            self._wake.set()

    def _renew_loop(self) -> None:
        """The keeper thread: renewals until ``close``. Should anything unexpected end it,
        the lease is given up at once (and waiters told), not left to run out silently."""
        try:
            self._renewals()
        except BaseException as e:      # noqa: BLE001 - reported through ``lost``
            self._end(f"the lease keeper failed: {e!r}")

    def _end(self, why: str) -> None:
        with self.news:
            self.lost, self.expires, self.ended = why, 0.0, True
            self.news.notify_all()

    def _renewals(self) -> None:
        lease = self.grant.lease
        wait, failures = lease / 3, 0
        while True:
            self._wake.wait(wait)
            if self._stop.is_set():
                return
            self._wake.clear()
            sent = time.monotonic()
            # while the lease holds, a renewal that cannot come back before it ends is of no
            # use; once it has lapsed, one that comes back at all brings the client back
            left = self.expires - sent
            timeout = min(lease / 3, left) if left > 0 else min(lease / 3, self.link.timeout)
            try:
                g = self.link.renew(self.grant, timeout=max(0.001, timeout),
                                    paused=self.acked, epoch=self.membership.epoch)
            except LeaseError as e:
                self._end(str(e))
                return
            except MasterError as e:
                with self.news:
                    self.lost = str(e)
                    self.news.notify_all()
                failures += 1
                wait = min(RETRY_FIRST * 2 ** (failures - 1), lease / 3) * random.uniform(0.5, 1)
                continue
            failures = 0
            ack = self._apply(g, sent)
            wait = 0 if ack else renewal_wait(lease, bool(self.pause or self.waiters),
                                              self.rebuilding is not None)

    def _apply(self, g: Grant, sent: float) -> bool:
        """Take in a renewal; True if a pause was just acked (tell the master at once)."""
        with self.news:
            self.expires, self.lost, self.data_lost = self._expiry(sent, g.lease), None, g.lost
            if g.rebuild is not None:
                self.rebuild_seen = sent
            self.rebuilding = None if g.rebuild is None else g.rebuild[0]
            if g.membership is not None and g.membership.epoch > self.membership.epoch:
                self.membership = g.membership
                self.epoch = g.membership.epoch
                self.incarnations = g.incarnations or {}
            # the pause goes up before the gate is taken: a batch that gets the gate after us
            # sees it and stays home
            self.pause = self._pause(g, self.membership.epoch)
            self.news.notify_all()
        if not self.pause or self.acked == self.pause:
            return False
        # wait for the batch in flight (it is bounded by the transport's timeout), but not
        # past half the lease left: a plain renewal goes out meanwhile, then this again
        left = (self.expires - time.monotonic()) / 2
        if not self.gate.acquire(timeout=max(0.0, min(self.link.timeout + 1.0, left))):
            return False
        self.gate.release()
        self.acked = self.pause
        self.acks += 1
        return True

    def close(self, release: bool = True) -> None:
        """Stop renewing; give the id back to the master if the lease still holds. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        self._thread.join()
        try:
            if release and self.valid():
                self.link.release(self.grant)
                self.expires = 0.0
        except (MasterError, LeaseError):
            pass            # the master will see the lease expire and recover the id anyway
        finally:
            self.link.close()
