"""The master's saved state (``fusee.master.saved_state``): a master restored from what
``state_of`` saved carries on where the last one stopped, and a state that does not fit the
config is refused. The pure logic: tests/test_master.py."""

from __future__ import annotations

import json

import pytest

from fusee.master.logic import StateError
from fusee.master.saved_state import restore, state_of
from fusee.membership import Membership
from test_master import GRACE, MN_L, L, master


def test_restart_from_state_carries_on():
    m = master(nodes=3)
    for cid in range(5):
        m.grant(cid, 100 + cid, now=0.0)
    m.mn_seen(0, 5.0)
    m.mn_seen(1, 1.5)
    m.tick(0.6)                                 # MN 2 dead: failed over to epoch 1
    for cid in range(5):
        m.renew(cid, 100 + cid, now=1.0, paused=1)
    assert m.next_failover(1.0) == (2,)
    m.failover_done((2,), Membership(1, frozenset({2}), {1: {(3, 4): 5}}))
    m.release(1, 101)
    m.release(2, 102)
    assert m.next_repair(1.0) == 1
    m.repair_done(1)
    assert m.next_repair(1.0) == 2             # running when the master "crashes"
    m.seed_ids(5)
    m.tick(2.1)                                 # MN 1 dead too: its failover is pending
    state = json.loads(json.dumps(state_of(m)))   # what the state file holds
    r = restore(state, range(3), L, MN_L, GRACE, now=50.0, replicas=3)
    assert state_of(r) == state_of(m)
    assert (r.epoch, r.dead, r.failing, r.pause, r.free_ids) == (1, {2}, [1], 2, [1])
    assert r.membership.settled == {1: {(3, 4): 5}} and r.draw_id() == 5
    assert set(r.clients) == {0, 3, 4} and r.clients[3].token == 103
    # leases restart in full at the restart, so a live client is never cut short
    assert all(lease.deadline == 50.0 + L + GRACE for lease in r.clients.values())
    assert r.waiting_for() == [0, 3, 4]         # acks are not persisted: clients ack again
    for cid in (0, 3, 4):
        r.renew(cid, 100 + cid, now=50.5, paused=2)
    assert r.next_repair(50.5) is None and r.next_failover(50.5) == (1,)
    r.failover_done((1,), Membership(2, frozenset({1, 2})))
    assert r.next_repair(50.5) == 2             # the interrupted repair runs again
    assert r.reusable_id() == 1
    assert r.tick(50.0 + MN_L + 0.01)[0].kind == "mn-dead"      # MNs need pings again


def test_a_restarted_master_knows_the_token_of_each_expired_client_it_inherits():
    """The worker fences an expired client at the MNs before recovering it: a master that
    restarts between the expiry and the recovery must know the client's token to do it."""
    m = master(pinged_until=100.0)
    m.grant(3, 1003, now=0.0)
    m.grant(4, 1004, now=0.0)
    m.grant(5, 1005, now=0.0)
    m.release(4, 1004)
    m.tick(L + GRACE + 1)                       # 3 and 5 expire; 4 closed cleanly
    state = json.loads(json.dumps(state_of(m)))
    r = restore(state, range(3), L, MN_L, GRACE, now=50.0, replicas=3)
    assert {c: (j.reason, j.token) for c, j in r.repairs.items()} == {
        3: ("expired", 1003), 4: ("released", None), 5: ("expired", 1005)}
    assert r.unfenced() == [] and state_of(r) == state_of(m)
    # a state saved before the tokens were kept: restored, and its expired clients are named
    del state["repair_tokens"]
    old = restore(state, range(3), L, MN_L, GRACE, now=50.0, replicas=3)
    assert [old.repairs[c].token for c in (3, 4, 5)] == [None] * 3
    assert old.unfenced() == [3, 5]


@pytest.mark.parametrize("bad", [
    {"version": 1},
    {"memnodes": [0, 1]},
    {"replicas": 2},
    {"clients": {"1": 5}, "free_ids": [1]},
    {"free_ids": [2, 2]},
    {"membership": {"epoch": 1, "dead": [7], "settled": []}},
    {"membership": {"epoch": None, "dead": [], "settled": []}},
    {"failing": [0], "membership": {"epoch": 1, "dead": [0], "settled": []}},
    {"failing": [1, 1]},
    {"next_id": "x"},
    {"clients": {"x": 1}},
    {"repair_tokens": {"2": 7}},                # no repair of client 2
    {"repair_tokens": {"2": 7}, "repairs": {"2": "released"}},
    {"repair_tokens": {"2": "7"}, "repairs": {"2": "expired"}},
    {"repair_tokens": [[2, 7]], "repairs": {"2": "expired"}},
    {"incarnations": {"5": 7}},                 # not an MN of the config
    {"incarnations": {"0": 0}},
    {"incarnations": [[0, 7]]},
    {"incarnations": {"0": -5}},
    {"incarnations": {"0": True}},
    {"incarnations": {"0": 1.9}},
    {"incarnations": {"0": 1 << 70}},
    {"incarnations": {"0": "12"}},
    {"incarnations": {"1": 7, "01": 8}},        # one node twice
])
def test_restore_refuses_a_state_that_does_not_fit(bad):
    state = {**state_of(master()), **bad}
    with pytest.raises(StateError):
        restore(state, range(3), L, MN_L, GRACE, now=0.0, replicas=3)
    with pytest.raises(StateError):
        restore({"epoch": 0}, range(3), L, MN_L, GRACE, now=0.0)
