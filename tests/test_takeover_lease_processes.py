"""Every master down, then one back (found by tests/chaos.py: ``python3 tests/run_chaos.py
--seed 401 --rounds 1 --steps 5 --kinds mn-fast,masters-all+mn,mn-fast+rebuild``, the fourth
fault): a client whose lease lapsed meanwhile looks for a leader through the master list, one
endpoint per renewal, each silent one costing a renewal timeout (``lease / 3``) and a backoff
(up to ``lease / 3``). The master that takes over gives every client a full lease from then
(``lease_afresh``: ``client_lease`` + grace) and expires the ones it has not heard from by its
end: a live client still on its way round the list of dead endpoints is recovered, its next
operation raises LeaseExpired ("open a new client"). In the chaos round the other masters were
starting one after the other (each silent until it bound); here eight endpoints of which only
the first comes back make the round trip longer than that lease every time.
"""

from __future__ import annotations

import time

import pytest
from processes import wait_for
from storekit import SMALL

from fusee.config import LayoutConfig
from fusee.emulator.cluster import LocalCluster
from fusee.emulator.testkit import zk_ensemble

pytestmark = [pytest.mark.soak,
              pytest.mark.skipif(zk_ensemble.missing() is not None,
                                 reason=f"no ZooKeeper here: {zk_ensemble.missing()}")]
MASTERS = 8


@pytest.mark.xfail(strict=True, reason="a takeover leases clients afresh for client_lease + "
                   "grace only, shorter than a lapsed client's way round silent masters")
def test_a_client_looking_for_the_new_leader_is_not_expired():
    with zk_ensemble.ZooKeeperEnsemble(3) as zk, \
            LocalCluster(memnodes=1, transport="shm", master=True, masters=MASTERS,
                         coordination=zk.url, layout=LayoutConfig(**SMALL), client_lease=2.0,
                         mn_lease=2.0, timeout=1.0) as c, c.client() as kv:
        kv.put(b"k", b"v")
        for i in range(MASTERS):
            c.stop_master(kill=True, i=i)
        keeper = kv.lease
        time.sleep(c.config.client_lease + c.config.timeout)      # lapsed, looking round
        wait_for(lambda: keeper.link.at == 1, "the client to look past master 0")
        c.start_master(0)
        kv.put(b"k", b"w")                      # waits for the renewal: LeaseExpired here
        assert kv.get(b"k") == b"w"
