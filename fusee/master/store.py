"""Where the master keeps its persistent state (``fusee.master.saved_state``): one small
interface, ``load`` / ``save`` / ``close``, and two stores behind it.

- ``FileStore``: a JSON file replaced atomically, locked for the life of the process (the
  embedded default: one master, a laptop, the quick start).
- ``ZooKeeperStore``: one znode per cluster holding the same JSON, every write a
  compare-and-set on the znode's version (``[master] coordination = "zookeeper://..."``, with
  ``fusee.master.election`` choosing the one master that writes). The state is one znode,
  not one per record, because the master's decisions span records (a repair moves an id from
  the clients to the repair queue; a failover changes the membership, the queue and the pause
  at once): a single versioned write keeps them atomic, and the whole state is a few KiB (ids
  and tokens of at most ``layout.max_clients`` clients, far below ZooKeeper's 1 MiB znode).

A leader that has been deposed must not publish: ``claim`` (once, on taking over) rewrites the
state so its version moves on, and from then on a write of a previous leader, which still
names the older version, fails with ``Deposed``. Every failure to save is an ``OSError``, which
the master treats as fatal (it stops rather than guess what is stored).
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Any, Protocol

from fusee.master.logic import StateError


class Deposed(OSError):
    """Another master wrote the state since this one read it: this one no longer leads."""


def _parse(text: str | bytes, what: str) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(text)
        return state
    except ValueError as e:
        raise StateError(f"{what} is not JSON: {e}") from None


class StateStore(Protocol):
    #: where the state is, for messages
    where: str

    def load(self) -> dict[str, Any] | None:
        """The state saved last (None: none yet)."""

    def save(self, state: dict[str, Any]) -> None:
        """Persist ``state`` before anything depends on it (OSError: not saved)."""

    def claim(self, state: dict[str, Any]) -> None:
        """Persist ``state`` even if unchanged, on taking over (fences a previous leader)."""

    def close(self) -> None:
        ...


class FileStore:
    """The master's state on disk: JSON, replaced atomically. A lock file next to it, held
    for the life of the process, keeps a second master off the same state."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.where = str(self.path)
        self.written: dict[str, Any] | None = None
        lock = self.path.with_name(self.path.name + ".lock")
        try:
            self.lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StateError(f"cannot open {lock}: {e}") from None
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.lock_fd)
            raise StateError(
                f"another master is running on {self.path} (it holds {lock})") from None

    def load(self) -> dict[str, Any] | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read master state {self.path}: {e}") from None
        self.written = _parse(text, f"master state {self.path}")
        return self.written

    def save(self, state: dict[str, Any]) -> None:
        if state == self.written:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dirfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        self.written = state

    def claim(self, state: dict[str, Any]) -> None:
        self.save(state)                # the file lock fences a second master already

    def close(self) -> None:
        os.close(self.lock_fd)          # the lock goes with it


class ZooKeeperStore:
    """The state as one znode (``<root>/state``), written only as a compare-and-set on the
    version read or written last. ``zk``: a started ``kazoo.client.KazooClient``."""

    def __init__(self, zk: Any, root: str):
        self.zk, self.path = zk, f"{root}/state"
        self.where = f"ZooKeeper ({self.path})"
        self.written: dict[str, Any] | None = None
        self.version: int | None = None         # None: no znode yet (as of ``load``)

    def load(self) -> dict[str, Any] | None:
        from kazoo.exceptions import KazooException, NoNodeError
        try:
            # a server answers reads from what it has applied, which may lag behind a write
            # another master's session made through another server: sync first, so that what
            # this master carries on from (and checks) is the state written last
            self.zk.sync(self.path)
            data, stat = self.zk.get(self.path)
        except NoNodeError:
            self.written, self.version = None, None
            return None
        except KazooException as e:
            raise StateError(f"cannot read the master state from ZooKeeper: {e!r}") from None
        self.written = _parse(data, f"the master state in ZooKeeper ({self.path})")
        self.version = stat.version
        return self.written

    def claim(self, state: dict[str, Any]) -> None:
        """Write ``state`` even if unchanged: the version moves on, so a previous leader's
        next write fails."""
        self.written = None
        self.save(state)

    def save(self, state: dict[str, Any]) -> None:
        from kazoo.exceptions import BadVersionError, KazooException, NodeExistsError
        if state == self.written:
            return
        data = json.dumps(state).encode()
        try:
            if self.version is None:
                self.zk.create(self.path, data, makepath=True)
                self.version = 0
            else:
                self.version = self.zk.set(self.path, data, version=self.version).version
        except (BadVersionError, NodeExistsError):
            raise Deposed(f"another master wrote {self.path} since this one read it: it "
                          "leads now") from None
        except KazooException as e:
            raise OSError(f"cannot write the master state to ZooKeeper: {e!r}") from None
        self.written = state

    def close(self) -> None:
        pass                            # the session is the election's to close
