"""Which cluster a memory node belongs to, checked by every process that connects to it
(docs/design.md#cluster-identity).

Nothing else ties an MN to its cluster: a client, master or rebuild pointed at another
cluster's MN of the same layout (a wrong config, a reused port, a moved host) would read and
write it as its own, corrupting the other cluster's acknowledged data. So a cluster gets an id
when it is made (``new_cluster_id``: ``LocalCluster``, ``fusee cluster-id``), kept in its config
(``[cluster] cluster_id``); each MN writes it into its region's header at start-up from that
config (the MN stays CPU-less: ``format_region``), and whoever connects READs the header words
of every MN it reached, all in one batch (one round trip, at connect, never per operation), and
refuses an MN whose cluster id, layout or node id is not the config's (``WrongMemoryNode``)
before it writes anything there. The checks, and when they run:

- a client, when it opens (``fusee.client.Client``), and again for each MN its transport
  reconnects to after a rebuild (``revive``); under a master it also compares each MN's
  incarnation (header word 40) with the one the master's grant says it knows
  (``restarted``): another one means the MN restarted, empty, and the master has not pinged
  it since, so the client waits for its failover instead of using it;
- the master, when it starts and whenever its worker connects (``fusee.master.shared``),
  comparing the incarnations too (a restarted member is dead at once), which covers the MN
  asking to rejoin, checked before anything is copied to it
  (``fusee.master.worker``): the copy writes every range at the address it has on the live
  replicas, so a region of another layout would be half written or hand out blocks the others
  do not have;
- ``fusee status``, which shows such an MN as "wrong memory node" (and exits 2 with its line).

A config without ``cluster_id`` (a cluster made before ids) expects MNs that hold none (the
word is 0), and such MNs still have their layout and node id checked; a config with an id
refuses them, as they hold no proof of being this cluster's.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from fusee.config import ClusterConfig
from fusee.driver import run
from fusee.errors import TransportError, WrongMemoryNode
from fusee.layout import unpack_u64
from fusee.memory_map import (HEADER_CLUSTER, HEADER_END, HEADER_INCARNATION, HEADER_LAYOUT,
                              HEADER_MAGIC, HEADER_NODE, MAGIC, MemoryMap)
from fusee.verbs import Op, Read

if TYPE_CHECKING:
    from fusee.transports.base import Transport


def new_cluster_id() -> str:
    """A fresh cluster id, as the config writes it (16 hex digits, never all zero)."""
    while (word := secrets.randbits(64)) == 0:
        pass
    return f"{word:016x}"


def new_incarnation() -> int:
    """The word an MN process writes into its region's header when it starts (never 0), and
    answers the master's pings with (``fusee.rejoin.ping_answer``): an MN restarted at the
    same endpoint has lost its memory, and only this tells it from the one the master knows
    (docs/design.md#cluster-identity)."""
    while (word := secrets.randbits(64)) == 0:
        pass
    return word


def cluster_word(config: ClusterConfig) -> int:
    """The header word of ``config``'s cluster id: what its MNs write, and what is expected
    of them (0 for a config without one)."""
    return int(config.cluster_id, 16) if config.cluster_id else 0


def _named(word: int) -> str:
    return f"{word:016x}" if word else "none"


def mismatch(config: ClusterConfig, node: int, header: bytes) -> WrongMemoryNode | None:
    """Why the MN at ``config``'s endpoint for ``node``, whose header words are ``header``, is
    not that MN of this cluster (None when it is)."""
    endpoint = config.node(node).endpoint
    expected, found = cluster_word(config), unpack_u64(header, HEADER_CLUSTER)
    magic, fingerprint = unpack_u64(header, HEADER_MAGIC), unpack_u64(header, HEADER_LAYOUT)
    formatted_for = unpack_u64(header, HEADER_NODE)
    where = f"memory node {node} at {endpoint}"
    if magic != MAGIC:
        return WrongMemoryNode(f"{where} holds no fusee region header: is the endpoint in the "
                               "config right?", node, endpoint, "a fusee region", "none")
    if found != expected:
        why = (f"{where} belongs to another cluster (cluster id {_named(found)}, this config's "
               f"{_named(expected)})")
        if not expected:
            todo = ("this config has no [cluster] cluster_id: use the config the memory nodes "
                    "were started with")
        elif not found:
            todo = ("that memory node was started without a cluster id (another cluster, or "
                    "an old config): fix the endpoint, or restart it with this config")
        else:
            todo = ("fix the endpoint in the config (a reused port, a moved host, another "
                    "cluster's config?), or restart that memory node with this config")
        return WrongMemoryNode(f"{why}: {todo}", node, endpoint, _named(expected),
                               _named(found))
    layout = MemoryMap.of(config.layout).fingerprint
    if fingerprint != layout:
        return WrongMemoryNode(
            f"{where} has a region of another layout (fingerprint {fingerprint:#x}, this "
            f"config's {layout:#x}): restart it with the cluster's config (same [layout])",
            node, endpoint, f"layout {layout:#x}", f"layout {fingerprint:#x}")
    if formatted_for != node:
        return WrongMemoryNode(f"{where} was started as memory node {formatted_for}: restart "
                               f"it with --id {node}", node, endpoint, f"node {node}",
                               f"node {formatted_for}")
    return None


def read_headers(nodes: Iterable[int]) -> Op[dict[int, bytes]]:
    """Generator: {node: its header words} of ``nodes``, in one batch. An MN that does not
    answer is left out: its death is the failover's business, and it is checked when it is
    reached again (a rebuild, a reconnect)."""
    nodes = sorted(nodes)
    batch = [Read(n, 0, HEADER_END) for n in nodes]
    try:
        results = (yield batch) if batch else []
    except TransportError as e:
        if e.results is None:
            raise
        results = e.results
    return {n: r for n, r in zip(nodes, results) if not isinstance(r, BaseException)}


def restarted(known: Mapping[int, int], headers: Mapping[int, bytes]) -> dict[int, int]:
    """{MN: the incarnation its header holds} of the MNs of ``headers`` whose incarnation is
    not the one ``known`` (the master's: ``fusee.master.logic.Grant.incarnations``): each
    restarted since the master last heard it and serves an empty region, though the master
    may count it alive until its next ping. An MN ``known`` has no word for is not compared."""
    found = {n: unpack_u64(header, HEADER_INCARNATION) for n, header in headers.items()}
    return {n: w for n, w in sorted(found.items()) if known.get(n) and w != known[n]}


def check(config: ClusterConfig, nodes: Iterable[int],
          known: Mapping[int, int] | None = None) -> Op[dict[int, int]]:
    """Generator: WrongMemoryNode for the first of ``nodes`` whose header is not this
    cluster's MN's (one batch); else the MNs among them that restarted since the master
    learned the incarnations ``known`` (``restarted``), which nobody may read or write."""
    headers = yield from read_headers(nodes)
    for node, header in sorted(headers.items()):
        if (wrong := mismatch(config, node, header)) is not None:
            raise wrong
    return restarted(known or {}, headers)


def reached(transport: Transport) -> list[int]:
    """The MNs ``transport`` connected to (a silent one keeps a region of length 0); every MN
    of its config for a wrapper that keeps no regions (the read leaves out who is silent)."""
    regions = getattr(transport, "regions", None)
    if regions is None:
        return [m.id for m in transport.config.memnodes]
    return sorted(n for n, r in regions.items() if r.length)


def answering_headers(config: ClusterConfig, answering: Iterable[int]) -> dict[int, bytes]:
    """{node: its header words} of the MNs ``answering`` (their "info"), read over the zmq
    backend, which every MN serves, leaving out those that then fail; for a tool that looks at
    MNs without using them (``fusee status``, ``fusee cluster-id``)."""
    from fusee.errors import FuseeError
    from fusee.transports import connect
    answering = set(answering)
    if not answering:
        return {}
    try:
        with connect(config, "zmq", dead={m.id for m in config.memnodes} - answering) as t:
            return run(read_headers(reached(t)), t)
    except FuseeError:
        return {}


def serving_without_id(config: ClusterConfig, timeout: float) -> list[int]:
    """The MNs of ``config`` (which has no cluster id) that are running from it, answering
    within ``timeout``: giving it an id now would make every client and the master refuse
    them, and a restart empties an MN, so such a cluster keeps its config without one."""
    from fusee.errors import FuseeError
    from fusee.transports.channel import Channels
    assert config.cluster_id is None, config.cluster_id
    try:
        channels = Channels(config)
    except (FuseeError, OSError):   # not usable yet (keys to make): nothing runs from it
        return []
    try:
        infos = channels.call_all([m.id for m in config.memnodes], "info", timeout)
    finally:
        channels.close()
    answering = [n for n, info in infos.items() if isinstance(info, dict)]
    return sorted(n for n, header in answering_headers(config, answering).items()
                  if mismatch(config, n, header) is None)


def check_transport(transport: Transport, nodes: Iterable[int] | None = None,
                    known: Mapping[int, int] | None = None) -> dict[int, int]:
    """Raise WrongMemoryNode unless every MN of ``nodes`` (default: all it reached) that
    ``transport`` reaches is this cluster's (one round trip); -> those of them that
    restarted since the master learned the incarnations ``known`` (``restarted``)."""
    return run(check(transport.config, reached(transport) if nodes is None else nodes, known),
               transport)
