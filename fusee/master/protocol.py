"""The master's wire protocol: one home for what the master (``fusee/master/server.py``) and
a client's link to it (``fusee/master/link.py``) must agree on.

The master speaks the memory nodes' control protocol (``fusee.emulator.wire``: a msgpack
``[CONTROL, seq, method, {args}]`` request, a ``[seq, [value], error]`` reply) with its own
requests and, next to ``wire.ERR_*``, three error codes of its own. A grant travels as a map
whose membership is sent only to a client that lags behind it (docs/design.md#the-master).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fusee.errors import (FuseeError, LeaseError, MasterBusy, MasterError, MasterStandby,
                          TransitionInProgress)
from fusee.master.logic import Grant
from fusee.membership import Membership

#: the requests: a lease for a new client, its renewal (a pause ack with it), a clean end,
#: the cluster's state (``fusee status``), and the liveness probe a standby answers too
REGISTER, RENEW, RELEASE, STATUS, PING = "register", "renew", "release", "status", "ping"

#: the argument by which a client asks for the incarnations with its grants (``encode_grant``):
#: a client older than them would refuse a grant that carries them as malformed
INCARNATIONS = "incarnations"

#: error codes of a lease refusal, of "retry once the failover is done" and of "I stand by, ask
#: the leader", in a reply's error triple (next to wire.ERR_*)
ERR_LEASE, ERR_BUSY, ERR_STANDBY = 16, 17, 18

#: what a client raises for each of them; any other code is a MasterError
_REFUSALS: dict[int, type[FuseeError]] = {ERR_LEASE: LeaseError, ERR_BUSY: MasterBusy,
                                          ERR_STANDBY: MasterStandby}


def error_code(e: Exception) -> int | None:
    """The code the master replies with for ``e``, or None when ``e`` has none of its own."""
    if isinstance(e, LeaseError):
        return ERR_LEASE
    if isinstance(e, TransitionInProgress):
        return ERR_BUSY
    return None


def refusal(code: int, text: str) -> FuseeError:
    """The exception a client raises for an error reply of the master."""
    return _REFUSALS.get(code, MasterError)(f"master: {text}")


def encode_grant(g: Grant, membership: Membership, known: int,
                 incarnations: Mapping[int, int] | None = None) -> dict[str, Any]:
    """A grant as a reply; the membership travels only to a client that lags behind it
    (``known``: the epoch the client has). ``incarnations`` (the master's, of the live MNs:
    ``Master.incarnations``), when given: the master sends them, to a client that asks for
    them (``INCARNATIONS``), at registration and with every membership, and the client
    compares them with the MN headers it reads (``fusee.cluster_identity.restarted``)."""
    reply: dict[str, Any] = {"id": g.id, "token": g.token, "lease": g.lease, "epoch": g.epoch,
                             "pause": g.pause, "lost": g.lost}
    if g.rebuild is not None:
        reply["rebuild"] = list(g.rebuild)
    if membership.epoch > known:
        reply["membership"] = membership.to_wire()
    if incarnations is not None:
        reply[INCARNATIONS] = [[n, w] for n, w in sorted(incarnations.items())]
    return reply


def _incarnations(pairs: object) -> dict[int, int]:
    """The incarnations of a grant's reply ([[MN, word], ...]); ValueError if malformed."""
    if not (isinstance(pairs, list) and all(
            isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p)
            and p[0] >= 0 and 0 < p[1] < 1 << 64 for p in pairs)):
        raise ValueError(f"incarnations {pairs!r} are not [MN, 64-bit word] pairs")
    return {n: w for n, w in pairs}


def decode_grant(reply: Any) -> Grant:
    """A grant from a reply; MasterError if it is not one."""
    try:
        wire_membership = reply.pop("membership", None)
        membership = None if wire_membership is None else Membership.from_wire(wire_membership)
        rebuild = reply.pop("rebuild", None)
        rebuild = None if rebuild is None else tuple(int(x) for x in rebuild)
        incarnations = reply.pop(INCARNATIONS, None)
        incarnations = None if incarnations is None else _incarnations(incarnations)
        return Grant(**reply, membership=membership, rebuild=rebuild,
                     incarnations=incarnations)
    except (AttributeError, TypeError, ValueError) as e:
        raise MasterError(f"master: malformed grant: {e}") from None
