"""A client's link to the master: RPCs with deadlines, and the lease a store client holds.

The master speaks the memory nodes' control protocol (``emulator.wire``: a msgpack
``[CONTROL, seq, method, {args}]`` request, a ``[seq, [value], error]`` reply) on a ROUTER
socket; ``MasterLink`` is one DEALER socket to it, with the same sequence numbers so a late
reply is never mistaken for the next one.

``LeaseKeeper`` registers (gets a client id and a lease) and then renews the lease from a
daemon thread with a socket of its own, every third of the lease. A thread rather than renewals
piggybacked on operations: an idle client must keep its id too, and the renewal stays off the
data path (one small RPC per lease/3; the data path pays one clock read per batch to check
the lease). The lease counts from when a renewal was *sent*, so the client's view of it always
ends before the master's; once it has ended, ``valid()`` is false for good and the client must
post no more verbs (the master will recover its operations and reuse its id).
"""

from __future__ import annotations

import secrets
import threading
import time

import zmq

from emulator import wire
from fusee.config import ClusterConfig, ConfigError, MemNodeConfig
from fusee.errors import FuseeError
from fusee.master import Grant, LeaseError
from transports.security import secure_client

#: error code of a lease refusal in a reply's error triple (next to wire.ERR_*)
ERR_LEASE = 16


class MasterError(FuseeError):
    """The master refused a request, or did not answer within the deadline."""


class MasterTimeout(MasterError):
    """No reply from the master within the deadline."""


class MasterLink:
    """Synchronous RPCs to the master (one thread at a time uses one link)."""

    def __init__(self, config: ClusterConfig, timeout: float | None = None):
        if not config.master:
            raise ConfigError("the cluster config names no master")
        if config.security.curve and not config.master_curve_public:
            raise ConfigError("security.curve needs master_curve_public in the cluster config")
        self.timeout = config.timeout if timeout is None else timeout
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        try:
            # the master is a server like an MN: same CURVE rules, its own public key
            secure_client(self.sock, config,
                          MemNodeConfig(-1, config.master, config.master_curve_public))
            self.sock.connect(config.master)
        except BaseException:
            self.sock.close(0)
            raise
        self.seq = secrets.randbits(31)         # distinct from an earlier link's replies
        self.rcvtimeo = -1

    def call(self, method: str, timeout: float | None = None, **args):
        """Send one request; its reply value, or LeaseError / MasterError / MasterTimeout."""
        timeout = self.timeout if timeout is None else timeout
        self.seq += 1
        try:
            self.sock.send(wire.encode_control(self.seq, method, args), zmq.NOBLOCK)
        except zmq.Again:
            raise MasterTimeout(f"master: cannot send {method!r} (not connected)") from None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            ms = int(left * 1000) + 1 if left > 0 else 0
            if ms != self.rcvtimeo:
                self.sock.setsockopt(zmq.RCVTIMEO, ms)
                self.rcvtimeo = ms
            try:
                data = self.sock.recv()
            except zmq.Again:
                raise MasterTimeout(f"master: no reply to {method!r} within {timeout:g} s") \
                    from None
            try:
                seq, results, error = wire.decode_reply(data)
            except wire.MalformedMessage:
                continue
            if seq != self.seq:
                continue                        # a late reply to a request that timed out
            if error:
                _, code, text = error
                raise (LeaseError if code == ERR_LEASE else MasterError)(f"master: {text}")
            return results[0]

    def register(self) -> Grant:
        return Grant(**self.call("register"))

    def renew(self, grant: Grant, timeout: float | None = None) -> Grant:
        return Grant(**self.call("renew", timeout, id=grant.id, token=grant.token))

    def release(self, grant: Grant) -> None:
        self.call("release", id=grant.id, token=grant.token)

    def status(self) -> dict:
        return self.call("status")

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> "MasterLink":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LeaseKeeper:
    """A registered client id and its lease, renewed in the background until ``close``."""

    def __init__(self, config: ClusterConfig):
        self.link = MasterLink(config)
        try:
            sent = time.monotonic()
            self.grant = self.link.register()
        except BaseException:
            self.link.close()
            raise
        self.expires = sent + self.grant.lease
        self.epoch = self.grant.epoch           # the master's membership epoch, last seen
        self.lost: str | None = None            # why the lease ended early, once it has
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"fusee-lease-{self.grant.id}")
        self._thread.start()

    @property
    def client_id(self) -> int:
        return self.grant.id

    def valid(self) -> bool:
        return time.monotonic() < self.expires

    def _renew_loop(self) -> None:
        lease = self.grant.lease
        wait = lease / 3
        while not self._stop.wait(wait):
            sent = time.monotonic()
            if sent >= self.expires:
                self.lost = self.lost or "no renewal reached the master in time"
                return
            try:
                # a renewal that cannot come back before the lease ends is of no use
                g = self.link.renew(self.grant, timeout=max(0.001, min(lease / 3,
                                                                       self.expires - sent)))
            except LeaseError as e:
                self.lost, self.expires = str(e), 0.0
                return
            except MasterError as e:
                self.lost = str(e)              # kept only if the lease runs out
                wait = lease / 10               # try again soon
                continue
            self.expires, self.epoch, self.lost = sent + g.lease, g.epoch, None
            wait = lease / 3

    def close(self, release: bool = True) -> None:
        """Stop renewing; give the id back to the master if the lease still holds. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        try:
            if release and self.valid():
                self.link.release(self.grant)
                self.expires = 0.0
        except (MasterError, LeaseError):
            pass            # the master will see the lease expire and recover the id anyway
        finally:
            self.link.close()
