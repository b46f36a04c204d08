"""Settling a live client whose operation was cut short, sans-IO.

An operation can end between two round trips without finishing: Ctrl-C (KeyboardInterrupt
raised in the transport or in the operation's own code), any exception its driver lets out,
a driver that drops it (GeneratorExit). It may leave a SNAPSHOT round or an insert's claim
open, a split locked, a block allocated but not recorded, or frees undelivered; its last
batch may have executed in part, or in full with the completions unseen. Marking the id CLEAN
then (``ClientCore.close``) would hide all that from recovery for good: every later writer of
the key would wait on the open round until Stalled, and the audit would find an unsettled
slot and a leak.

So a client settles first (``ClientCore.settled`` says when it must): it recovers its own id,
exactly as the master recovers a crashed client (``fusee.recovery``: the log tells what was
in flight, and every step is idempotent), then opens a fresh ``ClientCore`` on the id, which
adopts what the id holds (``fusee.holdings.adopt``), and goes on with that one. The client's
memory of the cut operation (deferred frees, allocator state, cache) is dropped: the memory
nodes are the truth. Its batches to a memory node go on the same connection as the cut
operation's, after them, so a part of the cut batch still on its way is executed before
recovery reads that node.

If settling itself is cut short (a second Ctrl-C) or fails, the id stays IN_USE (this
client's claim even once the recovery is through), and the recovery lock may be held by ``owner``: a later recovery
by the same owner finishes it (the master's, under a master: ``Client.recovery_owner``).
"""

from __future__ import annotations

from fusee.operations import ClientCore
from fusee.recovery import recover_client
from fusee.verbs import EPOCH_ENDS


def settled(core: ClientCore, owner: int):
    """Generator: ``core`` itself if ``core.settled``; else recover its id (recovery lock
    ``owner``) and return a new ClientCore opened on it. A memory node that dies meanwhile:
    recovery runs again in the next membership epoch (the driver raises NodeTimeout when no
    failover comes, and the id stays for recovery)."""
    if core.settled:
        return core
    while True:
        try:
            # the id keeps this client's claim throughout: CLEAN, even for a moment, would
            # let another client draw and claim it (``fusee.client_ids.draw_client_id``)
            yield from recover_client(core.config, core.client_id, owner=owner,
                                      membership=core.membership, leave=core.claim)
            break
        except EPOCH_ENDS as e:
            yield from core.new_epoch(e)
    fresh = ClientCore(core.config, core.client_id, core.cache.capacity, core.patience,
                       core.membership)
    fresh.claim = core.claim            # its open() finds the id claimed by itself
    yield from fresh.open()
    return fresh


def closing(core: ClientCore, owner: int):
    """Generator: the close of a client: settle ``core`` if need be, then close it (the id
    is CLEAN only once nothing of it is open: a close whose frees got no answer settles
    and closes again)."""
    while True:
        core = yield from settled(core, owner)
        yield from core.close()
        if core.settled:
            return core
