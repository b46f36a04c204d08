"""Which cluster a stored master state belongs to, so that a master never carries on from
another cluster's.

The state lives where the config's name says (``<config dir>/<name>.master.json``, or the
znode ``/fusee/<name>/state`` of the ZooKeeper ensemble), and names are easily shared: every
config that leaves ``[cluster] name`` out is called "fusee", and several clusters often share
one ensemble. A master that took another cluster's state would publish its membership (its
dead MNs, its epoch) and hand its client ids and tokens to this cluster's clients; under
ZooKeeper, merely standing in the other cluster's election leaves one of the two clusters
without a leader. So the state records the cluster's name and its memory nodes' endpoints,
and a master refuses a state whose name differs or whose MNs are all elsewhere. One MN's
endpoint may change (a replacement host: the operator edits that MN's endpoint and rejoins
it), so one endpoint in common is enough; a state of an older format, without endpoints, is
taken on its name. A state and a config that both carry a cluster id (``fusee.cluster_identity``)
must carry the same.
"""

from __future__ import annotations

from typing import Any

from fusee.config import ClusterConfig
from fusee.master.logic import StateError, StateMismatch


def identity(config: ClusterConfig) -> dict[str, Any]:
    """What a master stores with its state to say whose it is."""
    return {"cluster": config.name, "endpoints": [m.endpoint for m in config.memnodes],
            **({"cluster_id": config.cluster_id} if config.cluster_id else {})}


def check_same_cluster(config: ClusterConfig, state: dict[str, Any] | None, where: str) -> None:
    """StateMismatch unless ``state`` (loaded from ``where``; None: nothing stored yet) may be
    this cluster's."""
    if state is None:
        return
    if state.get("cluster") != config.name:
        raise StateMismatch(f"the master state in {where} is that of cluster "
                            f"{state.get('cluster')!r}, not {config.name!r}")
    stored_id = state.get("cluster_id")
    if stored_id is not None and config.cluster_id is not None and stored_id != config.cluster_id:
        raise StateMismatch(f"the master state in {where} is that of cluster id {stored_id}, "
                            f"not {config.cluster_id}")
    stored = state.get("endpoints")
    if stored is None:
        return
    if not isinstance(stored, list) or not all(isinstance(e, str) for e in stored):
        raise StateError(f"malformed master state in {where}: endpoints {stored!r}")
    ours = identity(config)["endpoints"]
    if not set(stored) & set(ours):
        raise StateMismatch(f"the master state in {where} is that of another cluster named "
                            f"{config.name!r}: its memory nodes are at {', '.join(stored)}, "
                            f"this config's at {', '.join(ours)}")
