"""A running client taking in a rebuilt MN whose check fails (real processes, r = 3, a
master, zmq): the rebuilt MN 1 was restarted, before the master's next ping, from another
cluster's config, so the revive check raises WrongMemoryNode. The operations must keep the
epoch they have, and the next batch take the new one in (and check it) again: the guard
used to count it handed before the check, so the next operation's batches went out under
the membership the operations still had (epoch 0 here, MN 1 a replica in it), to the
other cluster's MN that the transport had just reconnected to."""

from __future__ import annotations

import pytest
from processes import wait_for
from test_restart_processes import (LONG_MN_LEASE, _cluster, _values,
                                    restarted_after_its_rebuild)

from fusee.cluster_identity import new_cluster_id
from fusee.errors import WrongMemoryNode


def test_a_revive_check_that_fails_hands_the_operations_no_epoch(tmp_path):
    with _cluster("zmq", mn_lease=LONG_MN_LEASE) as c:
        other = tmp_path / "other.toml"
        c.config.with_(cluster_id=new_cluster_id()).save(other)
        with c.client() as running:
            running.put_many(_values(b"a"))
            restarted_after_its_rebuild(c, other)
            with pytest.raises(WrongMemoryNode):
                running.get(b"k0")
            # taken in again, and refused again (the master's next ping is far off): not
            # posted under the epoch the operations still have, in which MN 1 is a replica
            # (the transport reaches the other cluster's MN there now)
            with pytest.raises(WrongMemoryNode):
                running.put(b"k0", b"b0")
            wait_for(lambda: 1 in running.lease.membership.dead,
                     "the master to fail MN 1 over", timeout=LONG_MN_LEASE)
            running.put(b"k0", b"b0")
            expected = {**_values(b"a"), b"k0": b"b0"}
            assert running.get_many(list(expected)) == list(expected.values())
