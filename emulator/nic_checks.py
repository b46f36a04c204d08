"""What an RDMA NIC checks on every verb, in one place (docs/design.md#nic-checks): the access
key (rkey), the bounds of the registered region, 8-byte alignment of atomics and a CAS's
operands being unsigned 64-bit words. A request that fails any of them raises
RemoteAccessError, worded here, and leaves the region untouched.

Every backend that executes verbs itself checks through this module, so a wrong request fails
the same way everywhere: ``MemoryRegion`` (``emulator/memory.py``; the local backend and the
MN's emulated NIC) and the shm client's general path (``transports/shm.py``). The fast paths
(the MN's inline loop in ``emulator/memnode.py``, ``_atomic.run`` in C for shm) accept only
requests these checks pass and hand any other to a checked path, which words the refusal.
``transports/rdma.py`` bounds requests before posting and the real NIC does the rest.

An FAA's delta is not checked: it wraps modulo 2**64, as a NIC's adder does.
"""

from __future__ import annotations

from fusee.errors import NodeRestarted, RemoteAccessError
from fusee.verbs import MASK64


def wrong_key(node: int) -> NodeRestarted:
    """A key this registration did not hand out: the one of a previous start of the MN."""
    return NodeRestarted(f"MN {node}: wrong access key (it restarted since this client "
                         "connected: its memory is gone)", node)


def check_key(node: int, rkey: int, registered: int) -> None:
    if rkey != registered:
        raise wrong_key(node)


def check_range(node: int, addr: int, length: int, size: int) -> None:
    """``[addr, addr + length)`` lies within a region of ``size`` bytes."""
    if addr < 0 or length < 0 or addr + length > size:
        raise out_of_range(node, addr, length, size)


def check_atomic(node: int, addr: int, size: int, *operands: int) -> None:
    """An 8-byte atomic at ``addr``: in the region, aligned, and (a CAS's) ``operands`` words."""
    check_range(node, addr, 8, size)
    if addr & 7:
        raise RemoteAccessError(f"MN {node}: unaligned atomic at {addr:#x}", node)
    for v in operands:
        if not 0 <= v <= MASK64:
            raise RemoteAccessError(f"MN {node}: CAS operands must be unsigned 64-bit", node)


def out_of_range(node: int, addr, length, size: int) -> RemoteAccessError:
    span = (f"[{addr:#x}, {addr + length:#x})" if type(addr) is int and type(length) is int
            else f"[{addr!r}, +{length!r})")
    return RemoteAccessError(f"MN {node}: {span} is outside the region [0, {size:#x})", node)


def malformed(node: int, e: Exception) -> RemoteAccessError:
    """A request whose operands are not even of the right types (what a NIC cannot parse)."""
    return RemoteAccessError(f"MN {node}: malformed request: {e}", node)
