"""Which of several ``fusee master`` processes leads, on ZooKeeper (``[master] coordination =
"zookeeper://host:port,host:port,..."``): kazoo's lock recipe under ``/fusee/<cluster>/``, the
lock's contender id being the master's endpoint. The others stand by (they answer every
request with "standing by", so a client moves on to the next master of its list) and one of
them takes over when the leader's ZooKeeper session ends.

The leader is the only master that may grant a lease, pause clients, fail an MN over or
recover a client, and it must stop before a successor can start. ZooKeeper hands the lock on
only once the leader's session has expired, which the server does no sooner than the session
timeout after it last heard from the leader. So ``valid()`` holds only within that session
timeout (less a margin) of the *sending* of the leader's last successful ZooKeeper round trip,
which a thread repeats several times per session timeout: a leader cut off from ZooKeeper, or
paused (GC, SIGSTOP), stops granting before anyone else can lead, whatever its own threads
believe. A request the leader answers was sent before it checked ``valid()``, so a client's
lease (counted from its send) ends before the successor's full lease for every recorded
client (``fusee.master.logic``). On top of that the state store fences on the znode version
(``fusee.master.store``), and a leader whose session is lost for good exits (``lost``).

What the check cannot stop is a batch already past it when the leader stops (SIGSTOP, a GC
pause) or is cut off: it goes out whenever the process runs again, after a successor took
over and acted. So each leadership has a number (``number``): the sequence of the winner's
election znode, which grows from one leader to the next (the lock goes to the lowest sequence
present, and a znode created later gets a higher one). The leader's transport carries it in
every request and queue pair (``identity``), and before it acts on the MNs it has every one it
reaches refuse the leaderships below its own (``fence_predecessors``; ``fusee.fencing``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fusee.config import ClusterConfig, ConfigError
from fusee.fencing import master_identity
from fusee.verbs import Batch, TransportError

if TYPE_CHECKING:
    from fusee.transports.base import Transport

log = logging.getLogger(__name__)
#: kazoo's own chatter (a warning per refused connection attempt while it retries): errors only;
#: this module reports the session's state changes itself
kazoo_log = logging.getLogger(f"{__name__}.kazoo")
kazoo_log.setLevel(logging.ERROR)

#: the share of the session timeout a leader gives up for clock rates and ZooKeeper's ticks
SESSION_MARGIN = 0.1
#: round trips to ZooKeeper per session timeout that confirm the leadership
CONFIRMS = 6


def parse_url(url: str) -> tuple[str, str]:
    """``zookeeper://h:p,h:p[/chroot]`` -> (kazoo hosts, chroot or "")."""
    parts = urlsplit(url)
    if parts.scheme != "zookeeper" or not parts.netloc:
        raise ConfigError(f"coordination must be zookeeper://host:port[,host:port...], "
                          f"got {url!r}")
    for host in parts.netloc.split(","):
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            raise ConfigError(f"coordination: {host!r} is not host:port (in {url!r})")
    return parts.netloc, parts.path.rstrip("/")


class ZooKeeperLeadership:
    """A ZooKeeper session and this master's place in the election of ``cluster``'s leader."""

    def __init__(self, url: str, cluster: str, endpoint: str, session_timeout: float,
                 connect_timeout: float):
        hosts, chroot = parse_url(url)
        try:
            from kazoo.client import KazooClient
            from kazoo.handlers.threading import KazooTimeoutError
        except ImportError:
            raise ConfigError("[master] coordination needs the kazoo package: pip install "
                              "'fusee[zookeeper]'") from None
        self.root = f"{chroot}/fusee/{cluster}"
        self.zk = KazooClient(hosts=hosts, timeout=session_timeout, logger=kazoo_log,
                              connection_retry={"max_tries": -1, "delay": 0.1,
                                                "max_delay": 1.0})
        try:
            self.zk.start(timeout=connect_timeout)
        except KazooTimeoutError:
            self.zk.close()
            raise ConfigError(f"cannot reach ZooKeeper at {hosts} within "
                              f"{connect_timeout:g} s: is the ensemble up?") from None
        # as negotiated with the server, which may shorten it
        self.session = min(session_timeout, (self.zk._session_timeout or 1e9) / 1000)
        self.lock = self.zk.Lock(f"{self.root}/election", identifier=endpoint)
        self.acquired = threading.Event()
        #: the number of this master's leadership (``fusee.fencing``), once ``acquired``
        self.number: int | None = None
        self.lost: str | None = None            # the session ended: this process leads no more
        self.confirmed = float("-inf")          # send time of the last round trip that succeeded
        self._stop = threading.Event()
        self.zk.add_listener(self._state)

    def _state(self, state: str) -> None:
        from kazoo.protocol.states import KazooState
        if state == KazooState.LOST and self.acquired.is_set():
            self.lost = "the ZooKeeper session expired"
            log.error("master: %s: leading no more", self.lost)
        elif state == KazooState.SUSPENDED and self.acquired.is_set():
            log.warning("master: the connection to ZooKeeper is suspended: no grants until "
                        "it is back")

    def campaign(self) -> None:
        """Stand in the election from a thread of its own; ``acquired`` is set on winning."""
        threading.Thread(target=self._campaign, daemon=True, name="election").start()

    def _campaign(self) -> None:
        from kazoo.exceptions import CancelledError, KazooException
        while not self._stop.is_set():
            try:
                if self.lock.acquire():
                    break
            except CancelledError:
                return
            except KazooException as e:
                log.warning("master: the election failed, trying again: %r", e)
                self._stop.wait(0.5)
        else:
            return
        # "<uuid>__lock__<sequence>": the sequence ZooKeeper gave the node
        self.number = int(self.lock.node[len(self.lock.prefix):])
        self._confirm()
        self.acquired.set()
        threading.Thread(target=self._confirm_loop, daemon=True, name="leadership").start()

    def _confirm(self) -> None:
        """One round trip to ZooKeeper that finds this master's lock node still there."""
        from kazoo.exceptions import KazooException
        sent = time.monotonic()
        try:
            present = self.zk.exists(f"{self.lock.path}/{self.lock.node}") is not None
        except KazooException:
            return                          # the connection is down: validity runs out
        if not present:
            self.lost = "the election lock is gone"
            return
        self.confirmed = max(self.confirmed, sent)

    def _confirm_loop(self) -> None:
        interval = self.session / CONFIRMS
        while not self._stop.wait(interval) and not self.lost:
            self._confirm()

    def valid(self) -> bool:
        """This master leads now: it may grant, pause, fail over and recover."""
        return (self.acquired.is_set() and not self.lost and
                time.monotonic() < self.confirmed + self.session * (1 - SESSION_MARGIN))

    def identity(self) -> bytes | None:
        """A routing identity for a socket of this master's transport, which the MNs refuse
        once a newer master leads; None until it leads."""
        return None if self.number is None else master_identity(self.number)

    def fence_predecessors(self, config: ClusterConfig, nodes: list[int]) -> None:
        """Have every MN of ``nodes`` refuse the masters that led before this one (each
        leadership numbered below ``number``), before this one acts on them: a batch a deposed
        leader had on its way then either ran before or is refused. An MN that does not ack
        fails the caller (a TransportError: its job is retried)."""
        from fusee.transports.channel import Channels
        assert self.number is not None, "only a leader fences its predecessors"
        channels = Channels(config, self.identity())
        try:
            replies = channels.call_all(nodes, "fence", config.timeout,
                                        masters_below=self.number)
        finally:
            channels.close()
        for reply in replies.values():
            if isinstance(reply, Exception):
                raise reply

    def leader(self) -> str | None:
        """The endpoint of the master that holds the lock (as ZooKeeper last said)."""
        from kazoo.exceptions import KazooException
        try:
            contenders = self.lock.contenders()
        except KazooException:
            return None
        return contenders[0] if contenders else None

    def close(self) -> None:
        self._stop.set()
        try:
            self.lock.cancel()
            if self.acquired.is_set() and not self.lost:
                self.lock.release()
        except Exception as e:          # noqa: BLE001 - the session ends below anyway
            log.warning("master: could not give up the election lock: %r", e)
        self.zk.stop()
        self.zk.close()


class NotLeading(TransportError):
    """This master does not lead (any more): its failovers and repairs post no verb."""


class LeaderGuard:
    """The worker's transport under an elected master: no batch goes out unless the master
    leads at that moment (``leading()``), so a deposed leader's failover or repair stops at
    the next round trip rather than racing its successor's."""

    def __init__(self, transport: Transport, leading: Callable[[], bool]) -> None:
        self.transport, self.leading = transport, leading

    def execute(self, batch: Batch) -> list[Any]:
        if not self.leading():
            raise NotLeading("this master leads no more: its failover or repair stops here")
        return self.transport.execute(batch)

    def close(self) -> None:
        self.transport.close()
