"""A client whose transport connected while an MN was dead, or before it restarted, opened
after the master published that MN rebuilt (real processes, r = 3, a master, shm and zmq):
its open reaches the rebuilt MN (and checks it) instead of handing the operations a
membership with an MN its transport took for dead or reached in a process gone since, whose
batches then waited in vain for a later epoch (the open failed with NodeTimeout after
``membership_wait``). ``Client.connect`` meets this when a rebuild publishes between its
registration and its identity check (a client opening while a rebuild's pause closes)."""

from __future__ import annotations

import pytest
from processes import wait_for
from storekit import SMALL

from fusee.client import Client
from fusee.config import LayoutConfig
from fusee.emulator.cluster import LocalCluster
from fusee.fencing import identity
from fusee.master.link import LeaseKeeper
from fusee.transports import connect


def _values(tag: bytes) -> dict[bytes, bytes]:
    return {b"k%d" % i: tag + b"%d" % i for i in range(50)}


@pytest.mark.parametrize("backend", ["shm", "zmq"])
@pytest.mark.parametrize("connected", ["while MN 1 was dead", "before MN 1 restarted"])
def test_a_transport_connected_before_a_rebuild_reaches_the_rebuilt_mn(backend, connected):
    with LocalCluster(memnodes=3, transport=backend, replication=3, master=True,
                      layout=LayoutConfig(**SMALL), client_lease=2.0, mn_lease=3.0,
                      timeout=1.0) as c:
        with c.client() as kv:
            kv.put_many(_values(b"a"))
            if connected == "while MN 1 was dead":
                c.kill(1)
                kv.put_many(_values(b"b"))      # through MN 1's failover
        lease = LeaseKeeper(c.config)
        transport = connect(c.config, backend, dead=lease.membership.dead,
                            identity=identity(lease.client_id, lease.grant.token))
        try:
            if connected == "before MN 1 restarted":
                c.kill(1)
            else:
                assert 1 in lease.membership.dead, lease.membership
            c.rejoin(1)
            wait_for(lambda: 1 in lease.membership.rebuilt - lease.membership.dead,
                     "the client's lease to learn MN 1 rebuilt", timeout=60)
            kv = Client(transport, c.config, lease=lease)
        except BaseException:
            lease.close()
            transport.close()
            raise
        with kv:
            kv.put_many(_values(b"c"))
            assert kv.get_many(list(_values(b"c"))) == list(_values(b"c").values())
