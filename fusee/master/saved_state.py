"""The master's saved state (docs/design.md#the-master): what of ``fusee.master.logic.Master``
must survive a restart or a takeover (``state_of``), as the store keeps it
(``fusee.master.store``: a JSON file or a znode), and the master that carries on from it
(``restore``), which checks it first: a state that is malformed, of another version, or of
another cluster's memory nodes or replication is refused (``StateError``, ``StateMismatch``),
never half taken.

Lease deadlines and pause acks are not saved (monotonic time; clients re-ack with every
renewal): a restored master gives every known client a full lease from its own start.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fusee.master.logic import Master, StateError, StateMismatch, _Job, _Lease
from fusee.membership import Membership

STATE_VERSION = 2


def state_of(master: Master) -> dict[str, Any]:
    """What of ``master`` must survive a restart (JSON-able)."""
    return {"version": STATE_VERSION, "memnodes": list(master.memnodes),
            "replicas": master.replicas, "membership": master.membership.to_wire(),
            "failing": list(master.failing),
            "clients": {str(c): lease.token for c, lease in sorted(master.clients.items())},
            "repairs": {str(c): r.reason for c, r in sorted(master.repairs.items())},
            # a key of its own, so that the repairs keep the shape an older master reads
            "repair_tokens": {str(c): r.token for c, r in sorted(master.repairs.items())
                              if r.token is not None},
            "free_ids": list(master.free_ids), "next_id": master.next_id,
            "closing": master.closing,
            "incarnations": {str(m): w for m, w in sorted(master.incarnations.items())}}


def restore(state: dict[str, Any], memnodes: Iterable[int], client_lease: float,
            mn_lease: float, grace: float, now: float, replicas: int = 0) -> Master:
    """A master that carries on from ``state`` (``state_of``'s): every known client gets a
    full lease from ``now``."""
    memnodes = tuple(memnodes)
    try:
        if state["version"] != STATE_VERSION:
            raise StateMismatch(f"master state version {state['version']!r}, "
                                f"expected {STATE_VERSION}")
        if tuple(state["memnodes"]) != memnodes:
            raise StateMismatch(f"master state is for memory nodes {state['memnodes']}, "
                                f"the config has {list(memnodes)}")
        if replicas and state["replicas"] != replicas:
            raise StateMismatch(f"master state is for r = {state['replicas']}, the config "
                                f"has r = {replicas}")
        membership = Membership.from_wire(state["membership"])
        failing = [int(m) for m in state["failing"]]
        clients = {int(c): int(t) for c, t in state["clients"].items()}
        repairs = {int(c): str(reason) for c, reason in state["repairs"].items()}
        tokens = _repair_tokens(state.get("repair_tokens", {}), repairs)
        free = sorted(int(c) for c in state["free_ids"])
        next_id = None if state["next_id"] is None else int(state["next_id"])
        replicas = int(state["replicas"])
        closing = state.get("closing", False)     # absent: saved before it existed
        if not isinstance(closing, bool):
            raise ValueError(f"closing is {closing!r}, not a boolean")
        # absent: saved before they were kept (learned again from the next pongs)
        incarnations = _incarnations(state.get("incarnations", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StateError(f"malformed master state: {e!r}") from None
    down = membership.dead | set(failing)
    if not down <= set(memnodes) or len(down) != len(membership.dead) + len(failing):
        raise StateError(f"dead memory nodes {sorted(membership.dead)} and failing "
                         f"{failing} must be distinct nodes of the config")
    if (clients.keys() & repairs.keys() or clients.keys() & set(free)
            or repairs.keys() & set(free) or len(set(free)) != len(free)):
        raise StateError("master state names an id twice")
    if not incarnations.keys() <= set(memnodes) - down:
        raise StateError(f"master state has incarnations {incarnations} for memory nodes "
                         "that are not live ones of the config")
    m = Master(memnodes, client_lease, mn_lease, grace, now, replicas=replicas,
            membership=membership, failing=failing, free_ids=free, next_id=next_id,
            closing=closing, incarnations=incarnations)
    m.clients = {c: _Lease(t, 0.0) for c, t in clients.items()}
    m.lease_afresh(now)
    m.repairs = {c: _Job(reason, token=tokens.get(c)) for c, reason in repairs.items()}
    return m


def _incarnations(saved: dict[str, object]) -> dict[int, int]:
    """The live MNs' incarnations as ``state()`` saved them: nonzero 64-bit ints, one per
    node. Anything else (a float, a bool, a string, a node named twice as "1" and "01") is
    no state of ours, and taken as one it would fail a healthy MN over at its first pong."""
    words = {int(m): w for m, w in saved.items() if type(w) is int and 0 < w < 1 << 64}
    if len(words) != len(saved):
        raise ValueError(f"incarnations {saved!r} are not one 64-bit word per memory node")
    return words


def _repair_tokens(saved: object, repairs: dict[int, str]) -> dict[int, int]:
    """The lease tokens of the expired clients awaiting recovery, as ``state()`` saved them
    (a state saved before they were kept has none: its repairs are ``unfenced``). Each must
    belong to an expired client's repair; one that does not says the state is not what it
    claims to be."""
    if not isinstance(saved, dict):
        raise ValueError(f"repair_tokens is {saved!r}, not a mapping")
    tokens = {}
    for c, t in saved.items():
        cid = int(c)
        if repairs.get(cid) != "expired":
            raise ValueError(f"repair_tokens names client {cid}, which awaits no recovery "
                             "after an expired lease")
        if type(t) is not int or t < 0:
            raise ValueError(f"the lease token of client {cid} is {t!r}")
        tokens[cid] = t
    return tokens
