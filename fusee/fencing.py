"""Fencing: a client whose lease the master ended writes nothing more to the memory nodes.

A client checks its lease on its own clock before every batch (``fusee.lease_guard.LeaseGuard``),
and the master recovers an expired client's id only ``grace`` past its lease. That leaves a
batch already past the check when the client stopped (SIGSTOP, a long GC or VM pause): once it
runs again, the batch goes out, possibly after the master recovered the id, and a stale write or
free could overwrite or free live data.

On zmq the memory nodes close that window. Every client's sockets carry a routing identity made
of its client id and lease token (``identity``); before recovering an expired client, the
master has every live MN *fence* that id and token (the ``fence`` control request), and an MN
refuses every later request from a fenced identity (``Fenced``). ZeroMQ hands the MN each
message with its sender's identity, so the check costs nothing until a client was fenced, and
a request either ran before its MN acked the fence (so before the recovery began) or is refused.

On verbs the MN's CPU never sees a verb: its NIC executes them on the client's queue pairs. So a
client's ``rdma_connect`` says which lease it holds (its fence key), the MN files the queue pair
under it, and on the master's ``fence`` it destroys every queue pair of that key before it acks
and refuses the key a new one (``fusee.emulator.queue_pairs``): the client's verbs then fail at
its own NIC, and its control channel carries the same identity as on zmq. The shm backend
cannot fence: the client maps the memory and executes verbs itself; it relies on the lease
check before every batch, which leaves the window of one batch in flight
(docs/design.md#fencing).

The master's own transport is fenced the same way. Masters elected on ZooKeeper
(``fusee.master.election``) each lead under a *leadership* number, the sequence of their
election znode, which grows from one leader to the next; every request and queue pair of a
leader's transport carries it (``master_identity``, ``master_key``). Before its first action
on an MN, a new leader has it refuse every leadership below its own (the ``fence`` control
with ``masters_below``: a watermark, since it cannot know its predecessors' keys), so a batch
that a deposed leader had past its check when it stopped either ran before the new leader
acted there or is refused (``refused``). A single master (its state in a file) needs none:
nothing else leads.
"""

from __future__ import annotations

import re
import secrets

#: the bytes of an identity after its key: distinct sockets of one client (a ROUTER refuses a
#: second peer with an identity it already has)
_NONCE = 4
_KEY = re.compile(rb"fusee-client (0|[1-9][0-9]{0,18}) (0|[1-9][0-9]{0,18})\.")
#: how a master's fence key and identities begin
MASTER_PREFIX = b"fusee-master "
_MASTER_KEY = re.compile(rb"fusee-master (0|[1-9][0-9]{0,18})\.")
#: a leadership number is a ZooKeeper sequence (a signed 32-bit int) in practice; a
#: ``masters_below`` from the network is checked against this
MAX_LEADERSHIP = 2**63 - 1


def fence_key(client_id: int, token: int) -> bytes:
    """What an MN records to fence client ``client_id`` holding the lease ``token``."""
    return b"fusee-client %d %d." % (client_id, token)


def holder_of(key: object) -> tuple[int, int] | None:
    """The (client id, lease token) a fence key names; None if ``key`` is not one (it
    crossed a network: an MN checks it before it files a queue pair under it)."""
    if type(key) is not bytes:
        return None
    match = _KEY.fullmatch(key)
    return None if match is None else (int(match[1]), int(match[2]))


def identity(client_id: int, token: int) -> bytes:
    """A routing identity for one socket of that client (``zmq.ROUTING_ID``)."""
    return fence_key(client_id, token) + secrets.token_hex(_NONCE // 2).encode()


def master_key(leadership: int) -> bytes:
    """The fence key of the master that leads under ``leadership``."""
    return b"fusee-master %d." % leadership


def master_identity(leadership: int) -> bytes:
    """A routing identity for one socket of the master leading under ``leadership``."""
    return master_key(leadership) + secrets.token_hex(_NONCE // 2).encode()


def leadership_of(key: object) -> int | None:
    """The leadership a master's fence key names; None if ``key`` is not one."""
    if type(key) is not bytes or not key.startswith(MASTER_PREFIX):
        return None
    match = _MASTER_KEY.fullmatch(key)
    return None if match is None else int(match[1])


def refused(key: bytes, fenced: set[bytes], masters_below: int) -> bool:
    """Whether an MN that fenced the keys ``fenced`` and every master leadership below
    ``masters_below`` refuses the holder of ``key``."""
    if key in fenced:
        return True
    leadership = leadership_of(key)
    return leadership is not None and leadership < masters_below


def refusal(node: int, key: bytes) -> str:
    """What MN ``node`` tells the holder of a fenced ``key``."""
    if leadership_of(key) is not None:
        return (f"MN {node}: a newer master leads (this one's ZooKeeper session ended): this "
                "master is deposed and may change nothing")
    return (f"MN {node}: the master ended this client's lease and recovers its id: open a new "
            "client")


def key_of(identity: bytes) -> bytes:
    """The fence key an identity carries (any other identity gives one no fence matches)."""
    return identity[:-_NONCE]
