"""A SEARCH whose subtable's primary is dead to it reads the key from the backups
(``fusee.search``), whatever says so: a silent MN (NodeTimeout) or one that refused the
client's access key because it restarted, empty (NodeRestarted, a NodeTimeout). It used to
test the exact type, and a restarted primary made the read wait for the failover instead.
"""

from __future__ import annotations

import pytest
from test_failover import _config

from fusee.driver import run
from fusee.errors import NodeRestarted, NodeTimeout
from fusee.hashing import key_hash
from fusee.operations import ClientCore
from fusee.transports.local import LocalMemory, LocalTransport
from fusee.verbs import AwaitMembership

KEY, VALUE = b"restarted", b"read from a backup"


@pytest.mark.parametrize("dead", [NodeTimeout, NodeRestarted])
def test_a_search_whose_primary_is_dead_to_it_reads_the_backups(dead):
    cfg = _config(3, 3)
    mem = LocalMemory(cfg)
    t = LocalTransport(cfg, memory=mem)
    writer, reader = ClientCore(cfg, 0), ClientCore(cfg, 1)
    run(writer.open(), t)
    run(writer.insert(KEY, VALUE), t)
    run(reader.open(), t)
    primary, *backups = reader.dir.nodes(reader.dir.lookup(key_hash(KEY))[0])
    op = reader.search(KEY)
    batch = next(op)
    assert {v.node for v in batch} == {primary}, batch
    batch = op.throw(dead(f"MN {primary} is dead to this client", primary))
    assert not any(isinstance(v, AwaitMembership) for v in batch), batch
    assert {v.node for v in batch} <= set(backups), batch
    try:
        while True:
            batch = op.send(t.execute(batch))
    except StopIteration as stop:
        assert stop.value == VALUE
    assert reader.counters["backup_reads"] == 1
