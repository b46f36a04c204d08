"""The master killed with SIGKILL under a multi-process mixed workload (r = 3, 3 MNs) and
restarted from its state file after the clients' leases have lapsed: no client raises, the
history of every process (the final reads of every key included) is linearizable, so nothing
acknowledged was lost, and the leak audit accounts for every object. The longest operation
across the outage is the pause the clients saw; it is reported, and bounded only by what the
lease settings promise (``membership_wait``), never by a wall-clock guess.

The client side of it (a lapsed lease posts nothing, a client the master declared dead stays
fenced) is in tests/test_master_processes.py.
"""

from __future__ import annotations

import multiprocessing as mp
import time

from histories import check_with_final_reads, unexpected_errors
from processes import StopFlag, stop_processes, wait_for
from storekit import SMALL
from test_failover_processes import KEYS, LEASES, _history, _worker

from fusee.emulator.cluster import LocalCluster
from fusee.audit import audit
from fusee.config import LayoutConfig
from fusee.driver import run
from fusee.membership import Membership
from fusee.master.link import membership_wait

CLIENTS = 3
#: operations every client does before the kill, and again after the restart
BEFORE, AFTER = 100, 100


def test_clients_ride_out_a_master_killed_and_restarted(tmp_path):
    with LocalCluster(memnodes=3, transport="shm", replication=3, master=True,
                      layout=LayoutConfig(**SMALL), **LEASES) as c:
        ctx = mp.get_context("spawn")
        progress, stop = ctx.Array("q", CLIENTS, lock=False), StopFlag(ctx)
        outs = [tmp_path / f"c{i}.jsonl" for i in range(CLIENTS)]
        procs = [ctx.Process(target=_worker, args=(str(c.config_path), i, str(outs[i]),
                                                    progress, stop))
                 for i in range(CLIENTS)]
        for p in procs:
            p.start()
        try:
            wait_for(lambda: min(progress) >= BEFORE, "the clients to get going")
            before = c.master_status()
            c.stop_master(kill=True)
            killed = time.monotonic_ns()
            # down for longer than a lease: every client's lease lapses before the restart
            time.sleep(c.config.client_lease * 1.25)
            c.start_master()
            marks = list(progress)
            wait_for(lambda: all(progress[i] >= marks[i] + AFTER for i in range(CLIENTS)),
                  "the clients to carry on after the restart")
            assert stop_processes(procs, stop) == [0] * CLIENTS
        finally:
            stop_processes(procs, stop, timeout=5)
        after = c.master_status()
        assert after["pid"] != before["pid"] and after["epoch"] == before["epoch"] == 0
        ops = [op for i, out in enumerate(outs) for op in _history(f"c{i}", out)]
        unexpected = unexpected_errors(ops)
        assert not unexpected, "\n".join(map(str, unexpected[:10]))
        # the pause: the longest operation in flight across the outage
        across = [op for op in ops if op.ret > 2 * killed]
        pause = max(op.ret - op.invoke for op in across) / 2e9
        print(f"\nmaster killed, restarted {c.config.client_lease * 1.25:g} s later: longest "
              f"operation across the outage {pause:.2f} s (client_lease "
              f"{c.config.client_lease:g} s, mn_lease {c.config.mn_lease:g} s, timeout "
              f"{c.config.timeout:g} s)")
        assert pause < membership_wait(c.config)
        with c.client() as reader:
            check_with_final_reads(ops, reader, KEYS)
        wait_for(lambda: (s := c.master_status())["repairs"] == {} and
              len(s["free_ids"]) == CLIENTS, "every id to be recovered and free")
        membership = Membership()
        with c.transport() as t:
            report = run(audit(c.config, (), membership), t)
        assert report.ok, report.explain()
        assert report.objects > 0
