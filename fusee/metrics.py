"""Counters a monitoring system can scrape: Prometheus text on an opt-in HTTP port of the master
and of each memory node (``--metrics-port``, or ``metrics_port`` / ``master_metrics_port`` in
the cluster config).

The servers keep plain integer tallies on their request loops (a few additions per request,
whether or not anyone scrapes); a collector turns them, and the state the master and the
memory node already keep, into metric families only when a scrape asks. So an idle port costs
nothing on the data path, and `prometheus_client` (the ``[metrics]`` extra) is imported only
by a server that opens the port.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from fusee.master.server import MasterServer
    from fusee.emulator.memnode import MemoryNode

import logging
from collections import Counter

log = logging.getLogger(__name__)


#: a memory node's request-loop tallies (``MemoryNode.tally``, by position) and their help
MEMNODE_TALLY = (("requests", "requests served (batches of verbs and controls)"),
                 ("verbs", "one-sided verbs executed"),
                 ("received_bytes", "request bytes received"),
                 ("sent_bytes", "reply bytes sent"))


class MetricsUnavailable(RuntimeError):
    """The metrics port cannot be opened (the extra is missing, or the port is taken)."""


def metrics_address(endpoint: str) -> str:
    """Where the metrics port listens: the host a ``tcp://`` endpoint names (the port is
    reachable where the server is), else loopback."""
    if endpoint.startswith("tcp://"):
        host = endpoint[6:].rpartition(":")[0].strip("[]")
        if host not in ("", "*"):
            return host
    return "127.0.0.1"


def serve_metrics(port: int, address: str, collector: MemnodeCollector | MasterCollector
                  ) -> int:
    """Serve ``collector``'s metrics (and the process's own) on ``address:port`` from a daemon
    thread; returns the port bound (``port`` 0: any free one)."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.gc_collector import GCCollector
        from prometheus_client.process_collector import ProcessCollector
    except ModuleNotFoundError:
        raise MetricsUnavailable("--metrics-port needs prometheus_client: "
                                 "pip install 'fusee[metrics]'") from None
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(collector)
    try:
        server, _ = start_http_server(port, addr=address, registry=registry)
    except OSError as e:
        raise MetricsUnavailable(f"cannot serve metrics on {address}:{port} ({e.strerror}): "
                                 "choose another --metrics-port") from None
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", address, bound)
    return bound


class MemnodeCollector:
    """A memory node's requests, verbs, bytes and memory in use."""

    def __init__(self, node: MemoryNode) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        node, label = self.node, [str(self.node.id)]
        assert len(node.tally) == len(MEMNODE_TALLY)
        for (name, text), value in zip(MEMNODE_TALLY, node.tally):
            counter = CounterMetricFamily(f"fusee_memnode_{name}", text, labels=["node"])
            counter.add_metric(label, value)
            yield counter
        used = node.blocks.used()
        for name, text, value in (
                ("blocks", "data blocks in the region", node.map.num_blocks),
                ("blocks_used", "data blocks handed out to clients", used),
                ("memory_used_bytes", "bytes of data blocks handed out",
                 used * node.config.layout.block_size),
                ("region_bytes", "size of the registered region", node.region.length)):
            family = GaugeMetricFamily(f"fusee_memnode_{name}", text, labels=["node"])
            family.add_metric(label, value)
            yield family


class MasterCollector:
    """The master's view: epoch, memory nodes alive and dead, client leases, failovers and
    client recoveries done, repairs pending."""

    def __init__(self, server: MasterServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        status: dict[str, Any] = self.server.methods["status"]({})
        tally: Counter[str] = self.server.tally
        gauges = (("epoch", "membership epoch", status["epoch"]),
                  ("memnodes_alive", "memory nodes holding a lease", len(status["alive"])),
                  ("memnodes_dead", "memory nodes declared dead", len(status["dead"])),
                  ("failovers_pending", "dead memory nodes awaiting their failover",
                   len(status["failing"])),
                  ("clients", "clients holding a lease", len(status["clients"])),
                  ("repairs_pending", "client ids awaiting recovery", len(status["repairs"])))
        for name, text, value in gauges:
            family = GaugeMetricFamily(f"fusee_master_{name}", text)
            family.add_metric([], value)
            yield family
        for name, text in (("failovers", "memory-node failovers completed"),
                           ("client_recoveries", "crashed clients recovered"),
                           ("registrations", "client registrations granted"),
                           ("renewals", "lease renewals granted"),
                           ("requests", "RPCs served")):
            counter = CounterMetricFamily(f"fusee_master_{name}", text)
            counter.add_metric([], tally[name])
            yield counter
