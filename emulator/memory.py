"""Registered memory: the window a memory node exposes.

A ``MemoryRegion`` executes one-sided verbs on a writable buffer exactly as an RDMA NIC would:
every request passes the NIC's checks first (``fusee.emulator.nic_checks``: access key,
bounds, alignment), and CAS/FAA are real hardware atomics (``fusee.emulator._atomic``), so
several processes mapping the same shared-memory segment race correctly. Failures raise
RemoteAccessError and
leave the region untouched.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets

import _posixshmem

from fusee.emulator import _atomic
from fusee.emulator.nic_checks import check_atomic, check_key, check_range
from fusee.errors import ConfigError
from fusee.verbs import Cas, Faa, Read, RemoteAccessError, Write

_atomic_cas, _atomic_faa = _atomic.cas, _atomic.faa


def new_rkey() -> int:
    """A random 32-bit access key, as a NIC hands out when memory is registered."""
    return secrets.randbits(32) or 1


class MemoryRegion:
    """A bounds-, key- and alignment-checked window onto a writable buffer."""

    def __init__(self, buf, rkey: int, node: int = 0):
        self.mem = memoryview(buf).cast("B")
        if self.mem.readonly:
            raise ValueError("a memory region needs a writable buffer")
        self.length = len(self.mem)
        self.rkey = rkey
        self.node = node
        self._base = _atomic.address(self.mem)

    def read(self, addr: int, length: int, rkey: int) -> bytes:
        check_key(self.node, rkey, self.rkey)
        check_range(self.node, addr, length, self.length)
        return self.mem[addr:addr + length].tobytes()

    def write(self, addr: int, data, rkey: int) -> None:
        n = len(data)
        check_key(self.node, rkey, self.rkey)
        check_range(self.node, addr, n, self.length)
        self.mem[addr:addr + n] = data

    def cas(self, addr: int, expected: int, desired: int, rkey: int) -> int:
        check_key(self.node, rkey, self.rkey)
        check_atomic(self.node, addr, self.length, expected, desired)
        return _atomic_cas(self._base + addr, expected, desired)

    def faa(self, addr: int, delta: int, rkey: int) -> int:
        check_key(self.node, rkey, self.rkey)
        check_atomic(self.node, addr, self.length)
        return _atomic_faa(self._base + addr, delta)

    def execute(self, verb, rkey: int):
        """Execute one verb; returns its completion or raises RemoteAccessError."""
        t = type(verb)
        if t is Read:
            return self.read(verb.addr, verb.length, rkey)
        if t is Write:
            return self.write(verb.addr, verb.data, rkey)
        if t is Cas:
            return self.cas(verb.addr, verb.expected, verb.desired, rkey)
        if t is Faa:
            return self.faa(verb.addr, verb.delta, rkey)
        raise RemoteAccessError(f"MN {self.node}: not a verb: {verb!r}", self.node)

    def release(self) -> None:
        self.mem.release()


#: pages mapped up front (Linux); elsewhere, on first touch as before
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _reserve(fd: int, size: int, name: str) -> None:
    """Allocate all of a new segment's memory now, as registering a region pins it: else a
    ``/dev/shm`` too small for the regions (Docker's default is 64 MiB) lets the memory node
    start, and the first process to touch a page beyond its room dies of SIGBUS (mapped
    populated, a memory node after the first one did, formatting its header). ConfigError,
    one line saying what to do, where the room is short; where the call does not apply
    (not Linux, a file system without it), the pages come on first touch as before."""
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is None or not size:
        return
    try:
        fallocate(fd, 0, size)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            return
        try:
            st = os.statvfs("/dev/shm")
            room = f" (/dev/shm has {st.f_bavail * st.f_frsize >> 20} MiB free)"
        except OSError:
            room = ""
        raise ConfigError(f"no room for shared memory segment {name} of {size >> 20} MiB"
                          f"{room}: make layout.region_size smaller or /dev/shm larger "
                          f"(docker run --shm-size)") from None



def _mapped(fd: int, size: int, name: str, create: bool, populate: bool) -> mmap.mmap:
    """``fd`` mapped (populated if ``populate``); where the memory node that makes the segment
    may not map that much (ulimit -v), ConfigError, one line saying what to do (a client
    that maps it says so in ``transports/shm.py``, naming the node)."""
    try:
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | (_POPULATE if populate else 0))
    except OSError as e:
        if not create or e.errno != errno.ENOMEM:
            raise
        raise ConfigError(f"cannot map shared memory segment {name} of {size >> 20} MiB: "
                          f"{e.strerror}: this process may not map that much (ulimit -v); "
                          f"raise its limit, or make layout.region_size smaller") from None

class SharedSegment:
    """A named POSIX shared-memory segment, owner-only by default (mode 0o600).

    The creator (the memory node) unlinks it on close; others only map it. Unlike
    multiprocessing.shared_memory on Python < 3.13, attaching registers nothing with a
    resource tracker, so a client exiting never destroys a memory node's memory.

    Both map it populated (MAP_POPULATE), as an RDMA NIC has it: registering a region pins
    its memory (every page allocated up front), and the NIC translates any address of it
    from then on. Mapped lazily, the client took the page faults instead, on its first
    touch of each page: one insert in four faulted, all three replicas together, a sixth of
    a load's client CPU, cost real hardware never has (issue 12's load phase). The price
    is the region's memory taken when the memory node starts, as pinning takes it, and the
    time to map it: about 10 ms per 128 MiB. A client that lives a moment (one command of
    the ``fusee`` CLI) touches a few pages, and would spend most of its run mapping the
    rest: it maps lazily (``populate=False``; ``ShmTransport``'s keyword, where it is
    chosen). The memory node always maps populated.
    """

    def __init__(self, name: str, size: int = 0, create: bool = False, mode: int = 0o600,
                 populate: bool = True):
        self.name = name if name.startswith("/") else "/" + name
        self.owner = create
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = _posixshmem.shm_open(self.name, flags, mode)
        try:
            if create:
                os.ftruncate(fd, size)
                _reserve(fd, size, self.name)
            else:
                size = os.fstat(fd).st_size
            self.size = size
            self.mmap = _mapped(fd, size, self.name, create, populate)
        except BaseException:
            if create:
                _posixshmem.shm_unlink(self.name)
            raise
        finally:
            os.close(fd)

    def close(self) -> None:
        try:
            self.mmap.close()
        except BufferError:
            pass    # a view is still alive; the mapping goes with the process
        if self.owner:
            self.owner = False
            try:
                _posixshmem.shm_unlink(self.name)
            except FileNotFoundError:
                pass
