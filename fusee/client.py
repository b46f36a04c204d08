"""The synchronous public API: a ``Client`` drives ``ClientCore`` operations over a transport.

    kv = Client.connect("cluster.toml")        # or LocalCluster(...).client()
    kv.insert(b"k", b"v"); kv.update(b"k", b"w"); kv.get(b"k"); kv.delete(b"k")
    kv.put(b"k", b"v")                         # insert or update
    kv.stats                                   # round trips, verbs, bytes, cache hits, retries

Errors: ``fusee.errors`` (KeyExists, KeyNotFound, KeyTooLarge, ValueTooLarge, ...), TypeError
for keys or values that are not bytes, ``fusee.verbs.TransportError`` when the network or a
memory node fails.

When the cluster config names a master, a client without an explicit id registers with it: the
master leases it an id, a background thread renews the lease (``transports.master_link``), and
once the lease has run out every operation raises ``fusee.master.LeaseExpired`` before posting
a verb (the master then recovers the client's unfinished operations). ``close()`` gives the id
back. Without a master, the id comes from the MNs' counter and there is no lease.
"""

from __future__ import annotations

import time
from pathlib import Path

from fusee.config import ClusterConfig
from fusee.driver import run
from fusee.master import LeaseExpired
from fusee.operations import ClientCore, draw_client_id
from fusee.recovery import recover_client


class Client:
    """A store client. It owns the transport it is given and closes it on ``close()``."""

    def __init__(self, transport, config: ClusterConfig | None = None,
                 client_id: int | None = None, cache_capacity: int = 65536,
                 recover: bool = False):
        """``recover``: ``client_id`` was left in use by a client that crashed: finish its
        operations first (``fusee.recovery``), then carry on with everything it held."""
        if recover and client_id is None:
            raise ValueError("recover=True needs the client_id to recover")
        self.transport = transport
        self.config = config or transport.config
        self.lease = None                   # transports.master_link.LeaseKeeper, with a master
        self.executor = transport           # post batches here, not to .transport: the lease
        if client_id is None and self.config.master:
            from transports.master_link import LeaseKeeper
            self.lease = LeaseKeeper(self.config)
            client_id = self.lease.client_id
            self.executor = _LeaseGuard(transport, self.lease)
        try:
            if client_id is None:
                client_id = run(draw_client_id(self.config), transport)
            if recover:
                run(recover_client(self.config, client_id, owner=client_id), self.executor)
            self.core = ClientCore(self.config, client_id, cache_capacity)
            run(self.core.open(), self.executor)
        except BaseException:
            if self.lease is not None:
                self.lease.close()
            raise
        self.closed = False

    @classmethod
    def connect(cls, config_path: str | Path, transport=None,
                client_id: int | None = None) -> "Client":
        """Open a client on the cluster described by ``config_path``; ``transport`` is a
        backend name (default: the config's) or an already connected Transport."""
        config = ClusterConfig.load(config_path)
        if transport is None or isinstance(transport, str):
            from transports import connect
            transport = connect(config, transport)
        try:
            return cls(transport, config, client_id)
        except BaseException:
            transport.close()
            raise

    @property
    def client_id(self) -> int:
        return self.core.client_id

    def _run(self, op):
        if self.closed:
            raise RuntimeError("this client is closed")
        return run(op, self.executor)

    def get(self, key: bytes) -> bytes | None:
        """The key's value, or None when the key is absent."""
        return self._run(self.core.search(key))

    def insert(self, key: bytes, value: bytes) -> None:
        """Add a new key; KeyExists if it is present."""
        self._run(self.core.insert(key, value))

    def update(self, key: bytes, value: bytes) -> None:
        """Replace the value of a present key; KeyNotFound if it is absent."""
        self._run(self.core.update(key, value))

    def delete(self, key: bytes) -> None:
        """Remove a present key; KeyNotFound if it is absent."""
        self._run(self.core.delete(key))

    def put(self, key: bytes, value: bytes) -> None:
        """Insert or update."""
        self._run(self.core.put(key, value))

    @property
    def stats(self) -> dict:
        """Transport counters (round_trips, verbs, bytes_out, ...) and the core's (cache_hits,
        cache_misses, retries, lost SNAPSHOT rounds, splits, blocks, reclaimed objects)."""
        return {**self.transport.stats.as_dict(), **self.core.stats}

    def close(self) -> None:
        """Send deferred frees and log marks, give the id back to the master (if any), then
        close the transport. Idempotent."""
        if self.closed:
            return
        try:
            run(self.core.close(), self.executor)
        except LeaseExpired:
            pass            # too late to write: the master recovers what is left
        finally:
            self.closed = True
            if self.lease is not None:
                self.lease.close()
            self.transport.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _LeaseGuard:
    """The transport as operations see it under a master's lease: no batch is posted once the
    lease has run out (one clock read per batch)."""

    def __init__(self, transport, lease):
        self.transport, self.lease = transport, lease

    def execute(self, batch):
        if time.monotonic() >= self.lease.expires:
            raise LeaseExpired(f"the lease of client {self.lease.client_id} ran out "
                               f"({self.lease.lost or 'not renewed in time'}); open a new client")
        return self.transport.execute(batch)
