"""The verbs backend of the ``cluster`` fixture (tests/conftest.py): memory-node processes
serving a real RDMA device, skipped on a host without one.

Starting the MN processes costs ~10 s in the emulated SoftRoCE VM, so one cluster serves the
tests of the whole session in turn: each gets it with its regions put back as they were just
after it started, and it is replaced when a test killed one of its nodes.
"""

from __future__ import annotations

import functools
import os

import pytest

from fusee.config import LayoutConfig
from fusee.emulator.cluster import LocalCluster
from fusee.emulator.memory import SharedSegment
from fusee.emulator.rdma_device import rdma_available

MiB = 1 << 20

#: small regions (the VM has little memory; registration pins all of it), room for 17 MiB
VERBS_LAYOUT = LayoutConfig(region_size=48 * MiB, block_size=1 * MiB, max_clients=64,
                            index_size=8 * MiB)


@functools.cache
def _device() -> tuple[bool, str]:
    return rdma_available()


def require_device() -> None:
    """Skip the test on a host with no usable RDMA device (this machine, CI's host), or fail
    it where FUSEE_RDMA_REQUIRED=1 (the SoftRoCE VM, ``fusee.emulator.softroce.run_tests``):
    a missing device there is a broken harness, not a skip."""
    available, why = _device()
    if not available:
        if os.environ.get("FUSEE_RDMA_REQUIRED") == "1":
            pytest.fail(f"FUSEE_RDMA_REQUIRED=1 but no usable RDMA device: {why}")
        pytest.skip(why)


def _segments(c: LocalCluster, write: dict | None = None) -> dict:
    """The bytes of every MN's region (read through its shared-memory segment), or, given
    ``write``, put those bytes back."""
    out = {}
    for name in c.shm_names.values():
        seg = SharedSegment(name)
        if write is None:
            out[name] = bytes(seg.mmap)
        else:
            seg.mmap[:] = write[name]
        seg.close()
    return out


class VerbsClusters:
    """The session's one verbs cluster of 3 MNs, as fresh as a new one for each test."""

    def __init__(self) -> None:
        self.cluster: LocalCluster | None = None
        self.fresh_bytes: dict = {}

    def fresh(self) -> LocalCluster:
        c = self.cluster
        if c is not None and c.procs and all(p.poll() is None for p in c.procs.values()):
            _segments(c, write=self.fresh_bytes)
            return c
        self.stop()
        c = LocalCluster(memnodes=3, transport="verbs", layout=VERBS_LAYOUT,
                         start_timeout=180).start()
        self.cluster, self.fresh_bytes = c, _segments(c)
        return c

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
            self.cluster = None
