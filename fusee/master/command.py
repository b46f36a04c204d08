"""The master process (`fusee master`): membership, client leases, failovers and repairs.

The command line (``python -m fusee.master.command``): its options, the cluster config, where
the state lives (a file, or ZooKeeper with an election among several masters), the metrics
port, and the ``MasterServer`` (``fusee/master/server.py``) it runs until SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import zmq

from fusee.config import ClusterConfig, ConfigError
from fusee.errors import WrongMemoryNode
from fusee.emulator.serving import BindError, stop_condition, write_ready
from fusee.logsetup import LogLevelError, add_log_level_option, setup_logging
from fusee.master.identity import check_same_cluster
from fusee.master.logic import StateError, StateMismatch
from fusee.master.server import MasterServer
from fusee.master.shared import log
from fusee.master.store import FileStore, StateStore, ZooKeeperStore
from fusee.metrics import MasterCollector, MetricsUnavailable, metrics_address, serve_metrics
from fusee.transports.security import master_config

if TYPE_CHECKING:
    from fusee.master.election import ZooKeeperLeadership


def open_coordination(config: ClusterConfig, endpoint: str, state_path: str | Path | None
                      ) -> tuple[StateStore, ZooKeeperLeadership | None]:
    """The state store and leadership ``config`` asks for: a file (``state_path``) and no
    election, or ZooKeeper for both."""
    if config.coordination is None:
        assert state_path is not None, "a master without ZooKeeper keeps its state in a file"
        return FileStore(state_path), None
    from fusee.master.election import ZooKeeperLeadership
    if len(config.masters) > 1 and endpoint not in config.masters:
        raise ConfigError(f"this master's endpoint {endpoint} is not one of the config's "
                          f"masters {config.masters}: name it with --endpoint")
    # the session lasts a client lease: a dead leader is replaced about as fast as a client
    # notices it cannot renew. Setting it up may take as long (ZooKeeper commits a new session
    # through its quorum, not in one round trip): one timeout was too short for a loaded
    # ensemble, while a session it cannot set up within a session timeout would not last
    leadership = ZooKeeperLeadership(config.coordination, config.name, endpoint,
                                     session_timeout=config.client_lease,
                                     connect_timeout=max(config.timeout, config.client_lease))
    store = ZooKeeperStore(leadership.zk, leadership.root)
    try:
        # before standing in the election: a master of another cluster that shares this
        # one's path would leave one of the two without a leader while it stands there
        check_same_cluster(config, store.load(), store.where)
    except BaseException:
        leadership.close()
        raise
    return store, leadership


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fusee master", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="cluster config (TOML)")
    p.add_argument("--state", help="state file (default: <config dir>/<cluster name>"
                   ".master.json); a restarted master carries on from it. Unused with "
                   "[master] coordination (the state is in ZooKeeper)")
    p.add_argument("--endpoint", help="bind here instead of the config's master endpoint "
                   "(with several masters: this one's)")
    p.add_argument("--transport", help="backend for failovers, repairs and id draws "
                   "(default: config's)")
    p.add_argument("--ready-file", help="write {endpoint, pid} here once serving")
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port "
                   "(0: any free one; default: the config's master_metrics_port, else none)")
    add_log_level_option(p)
    args = p.parse_args(argv)
    try:
        setup_logging(args.log_level)
        config = master_config(ClusterConfig.load(args.config))
        os.environ.pop("FUSEE_CLIENT_KEY", None)    # a client's key; the master uses its own
        endpoint = args.endpoint or (config.master if len(config.masters) <= 1 else None)
        if not endpoint:
            raise ConfigError(f"{args.config} names no master endpoint (and no --endpoint)"
                              if not config.masters else f"{args.config} names several "
                              "masters: say which one this is with --endpoint")
        state = args.state or Path(args.config).with_name(f"{config.name}.master.json")
        store, leadership = open_coordination(config, endpoint, state)
        try:
            server = MasterServer(config, store, args.transport, leadership=leadership)
        except BaseException:
            if leadership is not None:
                leadership.close()
            store.close()
            raise
    except StateMismatch as e:
        hint = (f"if this is a new cluster, move {state} aside (or pass another --state)"
                if config.coordination is None else "if this is another cluster, give it "
                "its own [cluster] name (or a chroot in coordination)")
        print(f"fusee master: error: {e}: {hint}; if not, fix the config", file=sys.stderr)
        return 2
    except (ConfigError, StateError, LogLevelError) as e:
        print(f"fusee master: error: {e}", file=sys.stderr)
        return 2
    stop = stop_condition(args.parent_pid)
    metrics_port = config.master_metrics_port if args.metrics_port is None \
        else args.metrics_port
    if metrics_port is not None:
        try:
            metrics_port = serve_metrics(metrics_port, metrics_address(endpoint),
                                         MasterCollector(server))
        except MetricsUnavailable as e:
            print(f"fusee master: error: {e}", file=sys.stderr)
            return 2

    def bound(ep: str) -> None:
        role = "serving" if leadership is None else "standing in the election on"
        log(f"master {role} {ep} for {len(config.memnodes)} memory nodes "
             f"(client lease {config.client_lease:g} s, MN lease {config.mn_lease:g} s)")
        write_ready(args.ready_file, endpoint=ep, metrics_port=metrics_port)

    try:
        server.serve(endpoint, stop, bound)
    except (ConfigError, BindError, zmq.ZMQError, WrongMemoryNode) as e:
        print(f"fusee master: error: {e}", file=sys.stderr)
        return 2
    return 1 if server.failed else 0


if __name__ == "__main__":
    sys.exit(main())
