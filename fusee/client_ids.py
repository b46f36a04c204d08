"""Client ids: drawing one from the memory nodes and claiming it, without a master.

An id is a client's slot in the metadata region (its STATE word, log groups, incarnation).
Without a master nobody hands ids out, so a client draws one itself: an id closed CLEAN
first (its blocks come with it, adopted by ``fusee.holdings``), else a fresh one from the
counter on the directory replicas. Drawing takes no lock; claiming does (``ClientCore.open``
CASes the STATE word), so two drawers never both hold an id, and one that loses draws again.
The master seeds its own id counter from the same words (``client_states``).
"""

from __future__ import annotations

from fusee.config import ClusterConfig
from fusee.errors import ClientLimit, NeedsRecovery
from fusee.index import Directory, IndexGeometry
from fusee.layout import CLEAN, META_GROUPS, META_STATE, unpack_u64
from fusee.membership import Membership
from fusee.memory_map import HEADER_CLIENT_IDS, MemoryMap
from fusee.operations import ClientCore
from fusee.verbs import Faa, Read, chunks


def fresh_client_id(config: ClusterConfig, membership: Membership = Membership()):
    """Generator: an id never drawn before, by FAA on the client-id counter of every live
    directory replica (the largest old value: a replica that missed a draw lags behind)."""
    nodes = Directory(IndexGeometry.of(config.layout), len(config.memnodes), config.replicas,
                      membership).replicas
    cid = max((yield [Faa(n, HEADER_CLIENT_IDS, 1) for n in nodes]))
    if cid >= config.layout.max_clients:
        raise ClientLimit(f"all {config.layout.max_clients} client ids are in use")
    return cid


def draw_client_id(config: ClusterConfig, membership: Membership = Membership(),
                   taken: frozenset[int] = frozenset()):
    """Generator: an id for a client without a master to claim. Ids closed CLEAN are reused
    before a fresh one is drawn (``fresh_client_id``), those holding blocks first: their next
    holder adopts the blocks (``fusee.holdings``), so closed clients leave neither ids nor
    memory behind. The draw takes no lock: ``ClientCore.open`` claims the id with a CAS on
    its state word, and a claimant that loses (to another drawer, or to a client that asked
    for the id by number) draws again with the id in ``taken``."""
    (counter,) = yield [Read(_first_meta_node(config, membership), HEADER_CLIENT_IDS, 8)]
    ids = [i for i in range(min(unpack_u64(counter), config.layout.max_clients))
           if i not in taken]
    states = yield from client_states(config, membership, ids)
    clean = [(groups == 0, i) for i, (state, groups) in zip(ids, states) if state == CLEAN]
    if clean:
        return min(clean)[1]
    return (yield from fresh_client_id(config, membership))


def open_client(config: ClusterConfig, client_id: int | None = None,
                membership: Membership = Membership(), **core_args):
    """Generator: a ClientCore opened on ``client_id``, or on an id drawn from the MNs
    (``draw_client_id``; another is drawn when a concurrent client claims that one first).
    ``core_args`` go to ClientCore."""
    taken: set[int] = set()
    while True:
        cid = client_id
        if cid is None:
            cid = yield from draw_client_id(config, membership, frozenset(taken))
        core = ClientCore(config, cid, membership=membership, **core_args)
        try:
            yield from core.open()
            return core
        except NeedsRecovery:
            if client_id is not None:
                raise
            assert cid not in taken, "an id drawn twice in one claim"
            taken.add(cid)
            # its open may have adopted the next epoch: the driver tells each epoch's end
            # once, so the next core starts from there, or it would write to the replicas
            # of an epoch that is over (missing an MN rebuilt since)
            membership = core.membership


def client_states(config: ClusterConfig, membership: Membership, ids: list[int]):
    """Generator: the (STATE word, block group count) of each of ``ids``, as the first live
    metadata replica has them (the one ``ClientCore.open`` claims ids on)."""
    mmap_ = MemoryMap.of(config.layout)
    m0 = _first_meta_node(config, membership)
    words = []
    for batch in chunks([Read(m0, mmap_.client_meta(i) + off, 8)
                         for i in ids for off in (META_STATE, META_GROUPS)]):
        words += yield batch
    return [(unpack_u64(words[k]), unpack_u64(words[k + 1])) for k in range(0, len(words), 2)]


def _first_meta_node(config: ClusterConfig, membership: Membership) -> int:
    return Directory(IndexGeometry.of(config.layout), len(config.memnodes), config.replicas,
                     membership).replicas[0]
