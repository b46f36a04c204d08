"""The master's pure logic (``fusee.master.logic``): client leases, id recycling, MN leases and the
failover queue, the pause protocol; and its state file. Restart from the saved state:
tests/test_master_saved_state.py; the processes: tests/test_master_processes.py."""

from __future__ import annotations

import json

import pytest

from fusee.master.store import FileStore
from fusee.config import ClusterConfig, ConfigError
from fusee.master.logic import (LEARNED, RESTARTED, DataLost, LeaseError, Master, StateError,
                                TransitionInProgress)
from fusee.master.saved_state import restore, state_of
from fusee.membership import Membership

L, MN_L, GRACE = 1.0, 0.5, 0.25         # leases of the unit tests


def master(nodes=3, now=0.0, pinged_until=None) -> Master:
    """A master; with ``pinged_until``, its MNs answered pings until then."""
    m = Master(range(nodes), L, MN_L, GRACE, now)
    for mn in range(nodes if pinged_until is not None else 0):
        m.mn_seen(mn, pinged_until)
    return m


# -- the pure logic ----------------------------------------------------------------------------
def test_client_lease_lasts_lease_plus_grace_and_renewals_extend_it():
    m = master(pinged_until=100.0)
    g = m.grant(5, 77, now=0.0)
    assert (g.id, g.token, g.lease, g.epoch) == (5, 77, L, 0)
    assert m.tick(L + GRACE) == []                  # not past the master's deadline yet
    m.renew(5, 77, now=L + GRACE)
    assert m.tick(2 * (L + GRACE)) == []
    events = m.tick(2 * (L + GRACE) + 0.001)
    assert [(e.kind, e.subject) for e in events] == [("client-expired", 5)]
    with pytest.raises(LeaseError):
        m.renew(5, 77, now=2 * (L + GRACE))
    assert "5" in m.status(0.0)["repairs"] and m.reusable_id() is None


def test_leasing_afresh_after_a_break_gives_every_client_a_full_lease_and_never_less():
    m = master(pinged_until=100.0)
    m.grant(5, 77, now=0.0)
    m.grant(6, 78, now=0.0)
    m.renew(6, 78, now=L)                           # deadline 2 L + GRACE
    m.lease_afresh(now=L / 2)                       # e.g. back from a break from ZooKeeper
    assert m.tick(1.5 * L + GRACE) == []            # 5: a full lease from then
    events = m.tick(1.5 * L + GRACE + 0.001)
    assert [(e.kind, e.subject) for e in events] == [("client-expired", 5)]
    assert m.tick(2 * L + GRACE) == []              # 6's later deadline was not shortened


def test_a_client_counts_its_lease_short_by_the_clock_margin():
    from fusee.master.link import CLOCK_MARGIN, LeaseKeeper
    assert 0 < CLOCK_MARGIN < 0.1
    assert LeaseKeeper._expiry(10.0, 2.0) == 10.0 + 2.0 * (1 - CLOCK_MARGIN) < 12.0


def test_a_client_renews_often_while_a_rebuild_runs():
    """A rebuild's pause waits for every client's ack, and a client that acked waits for the
    slowest: while a rebuild runs, renewals come every REBUILD_POLL, not every third of the
    lease (still as often as POLL while paused or awaiting an epoch)."""
    from fusee.master.link import POLL, REBUILD_POLL, renewal_wait
    assert POLL < REBUILD_POLL < 2.0 / 3
    assert renewal_wait(2.0, awaiting=False, rebuilding=False) == 2.0 / 3
    assert renewal_wait(2.0, awaiting=False, rebuilding=True) == REBUILD_POLL
    assert renewal_wait(0.06, awaiting=False, rebuilding=True) == 0.02     # a short lease
    assert renewal_wait(2.0, awaiting=True, rebuilding=True) == POLL


def test_a_renewal_after_the_deadline_expires_the_lease_itself():
    m = master()
    m.grant(1, 9, now=0.0)
    with pytest.raises(LeaseError):
        m.renew(1, 9, now=L + GRACE + 0.01)     # no tick ran in between
    assert 1 in m.repairs and 1 not in m.clients


def test_wrong_tokens_and_unknown_ids_are_refused():
    m = master()
    m.grant(1, 9, now=0.0)
    for call in (lambda: m.renew(1, 8, 0.1), lambda: m.release(1, 8), lambda: m.renew(2, 9, 0.1),
                 lambda: m.release(2, 9)):
        with pytest.raises(LeaseError):
            call()
    with pytest.raises(LeaseError):
        m.grant(1, 10, now=0.2)                # in use
    assert m.clients[1].token == 9


def test_ids_come_back_only_after_their_recovery():
    m = master(pinged_until=100.0)
    m.grant(3, 1, now=0.0)
    m.grant(4, 2, now=0.0)
    m.release(4, 2)                             # a clean close takes the same road
    m.tick(L + GRACE + 1)                       # 3 expires
    assert set(m.repairs) == {3, 4} and m.reusable_id() is None
    first = m.next_repair(now=2.0)
    second = m.next_repair(now=2.0)
    assert {first, second} == {3, 4} and m.next_repair(now=2.0) is None     # both running
    with pytest.raises(LeaseError):
        m.grant(3, 5, now=2.0)                  # not while its repair runs
    m.repair_failed(3, now=2.0, error="MN 0 timed out")
    assert m.next_repair(now=2.0) is None       # backing off
    assert m.reusable_id() is None
    assert m.next_repair(now=2.0 + 10) == 3
    assert m.repairs[3].attempts == 1 and m.repairs[3].error == "MN 0 timed out"
    m.repair_done(4)
    assert m.reusable_id() == 4
    m.repair_done(3)
    assert m.free_ids == [3, 4] and m.reusable_id() == 3
    m.grant(3, 6, now=3.0)
    assert m.free_ids == [4]
    with pytest.raises(ValueError):
        m.repair_done(4)                        # not running: a bug in the caller


def test_repair_backoff_grows_and_is_capped():
    m = master()
    m.grant(0, 1, now=0.0)
    m.release(0, 1)
    delays = []
    for k in range(9):
        assert m.next_repair(100.0 * k) == 0
        m.repair_failed(0, 100.0 * k, "no recovery")
        delays.append(m.repairs[0].retry_at - 100.0 * k)
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0])
    assert m.repairs[0].attempts == 9


def test_a_silent_mn_is_dead_for_good_and_queued_for_failover():
    m = master(nodes=3, now=0.0)
    m.mn_seen(0, 0.4)
    m.mn_seen(1, 0.4)
    assert m.tick(MN_L) == []                   # all within their lease
    events = m.tick(MN_L + 0.01)                # MN 2 never answered
    assert [(e.kind, e.subject, e.epoch) for e in events] == [("mn-dead", 2, 1)]
    assert (m.failing, m.pause, m.epoch, m.dead) == ([2], 1, 0, set())
    m.mn_seen(2, 1.0)                           # a late pong does not resurrect it
    assert m.alive() == [0, 1] and m.next_failover(1.0) == (2,)   # no client to wait for
    m.failover_done((2,), Membership(1, frozenset({2})))
    assert (m.failing, m.pause, m.epoch, m.dead) == ([], 0, 1, {2})
    assert m.grant(0, 1, now=1.0).epoch == 1    # clients learn the epoch


def test_pausing_clients_fence_the_failover_without_expiring_them():
    m = master(pinged_until=0.4)
    for cid in (1, 2, 3):
        m.grant(cid, 10 + cid, now=0.0)
    m.mn_seen(0, 100.0)
    m.mn_seen(1, 100.0)
    m.tick(MN_L + 0.5)                          # MN 2 is dead: epoch 1 awaits its failover
    g = m.renew(1, 11, now=1.0)
    assert (g.pause, g.epoch, g.lost) == (1, 0, None)
    with pytest.raises(TransitionInProgress):
        m.grant(4, 14, now=1.0)                 # no newcomer until epoch 1 is out
    m.renew(1, 11, now=1.0, paused=1)           # acked: no batch in flight, none will go
    m.renew(2, 12, now=1.0, paused=7)           # not the pending pause: no ack
    assert m.waiting_for() == [2, 3] and m.next_failover(1.0) is None
    m.renew(2, 12, now=1.1, paused=1)
    m.renew(1, 11, now=1.1, paused=1)           # paused clients keep their leases
    assert m.next_failover(1.1 + L) is None     # 3 neither acked nor expired yet
    events = m.tick(L + GRACE + 0.01)           # 3 went silent: it counts as crashed
    assert [(e.kind, e.subject) for e in events] == [("client-expired", 3)]
    assert m.next_repair(2.0) is None           # no recovery before the new membership
    assert m.next_failover(2.0) == (2,) and m.next_failover(2.0) is None   # running
    assert m.next_repair(2.0) is None           # nor during the failover
    m.failover_failed((2,), now=2.0, error="NodeTimeout: MN 1")
    assert m.next_failover(2.05) is None and m.next_failover(2.15) == (2,)     # backoff
    assert m.failover.attempts == 1 and "MN 1" in m.status(2.0)["failover"]["error"]
    with pytest.raises(ValueError):
        m.failover_done((2,), Membership(2, frozenset({2})))   # not the next epoch
    with pytest.raises(ValueError):
        m.failover_done((1,), Membership(1, frozenset({1})))   # not the MN failing over
    m.failover_done((2,), Membership(1, frozenset({2}), {1: {(0, 5): 77}}))
    assert set(m.clients) == {1, 2}             # both live clients kept their ids
    g = m.renew(1, 11, now=2.2, paused=1)
    assert (g.pause, g.epoch) == (0, 1) and m.membership.settled == {1: {(0, 5): 77}}
    assert m.next_repair(2.2) == 3              # the crashed one is recovered now
    m.repair_done(3)
    assert m.grant(3, 13, now=2.3).epoch == 1


def test_a_failover_waits_for_a_running_repair():
    m = master(pinged_until=0.4)
    m.mn_seen(0, 100.0)
    m.mn_seen(1, 100.0)
    m.grant(1, 11, now=0.0)
    m.release(1, 11)
    assert m.next_repair(0.0) == 1              # running when MN 2 dies
    m.tick(MN_L + 0.5)
    assert m.next_failover(1.0) is None
    m.repair_failed(1, now=1.0, error="NodeTimeout: MN 2")
    assert m.next_failover(1.0) == (2,)


def test_deaths_during_a_transition_queue_and_the_rth_loses_data():
    m = master(nodes=4, pinged_until=0.4)
    m.replicas = 3
    m.mn_seen(0, 100.0)
    m.mn_seen(1, 100.0)
    m.mn_seen(3, 1.0)
    m.tick(MN_L + 0.5)                          # MN 2 dies; its failover starts
    assert (m.failing, m.pause, m.lost) == ([2], 1, None)
    assert m.next_failover(1.0) == (2,)
    m.tick(1.0 + MN_L + 0.01)                   # MN 3 dies while it runs, and fails it
    m.failover_failed((2,), now=2.0, error="NodeTimeout: MN 3")
    assert (m.failing, m.pause) == ([2, 3], 1)  # one failover takes both
    assert m.next_failover(2.5) == (2, 3)
    with pytest.raises(ValueError):
        m.failover_done((2, 3), Membership(1, frozenset({2})))
    m.failover_done((2, 3), Membership(1, frozenset({2, 3})))
    assert (m.epoch, m.dead, m.pause, m.failing) == (1, {2, 3}, 0, [])
    m.mn_seen(1, 200.0)
    events = m.tick(100.0 + MN_L + 0.01)        # MN 0 as well: r = 3 deaths
    assert [e.kind for e in events] == ["mn-dead", "data-lost"]
    assert "replication factor is 3" in m.lost and m.next_failover(200.0) is None
    with pytest.raises(DataLost):
        m.grant(6, 66, now=101.0)


def test_fresh_ids_come_from_the_masters_own_counter():
    m = master()
    assert m.draw_id() is None                  # seeded from the MNs' counter first
    m.seed_ids(4)
    m.seed_ids(9)                               # once
    m.grant(5, 1, now=0.0)                      # asked for by number
    assert [m.draw_id(), m.draw_id()] == [4, 6]
    r = restore(json.loads(json.dumps(state_of(m))), range(3), L, MN_L, GRACE, now=1.0)
    assert r.draw_id() == 7


def test_lease_durations_are_validated():
    with pytest.raises(ValueError):
        Master(range(1), 0.0, 1.0, 0.0, 0.0)
    with pytest.raises(ConfigError):
        ClusterConfig.loads('[cluster]\nclient_lease = -1\n[[memnodes]]\nid = 0\n'
                            'endpoint = "ipc:///x"\n')


def test_a_second_master_on_the_same_state_is_refused(tmp_path):
    first = FileStore(tmp_path / "master.json")
    with pytest.raises(StateError, match="another master"):
        FileStore(tmp_path / "master.json")
    first.close()                               # the first one exits: the lock goes with it
    FileStore(tmp_path / "master.json")


MN = '[[memnodes]]\nid = 0\nendpoint = "ipc:///tmp/mn0"\n'


@pytest.mark.parametrize("text,error", [
    ('[cluster]\nmaster = "ipc:///a,ipc:///b"\n', "several masters need"),
    ('[cluster]\nmaster = "ipc:///a,ipc:///a"\n[master]\ncoordination = "zookeeper://h:1"\n',
     "distinct"),
    ('[cluster]\nmaster = "ipc:///a"\n[master]\ncoordination = "http://h:1"\n',
     "coordination must be zookeeper://"),
    ('[master]\nelection = "zookeeper://h:1"\n', "unknown \\[master\\] keys"),
])
def test_bad_master_configs_are_refused_with_what_to_do(text, error):
    with pytest.raises(ConfigError, match=error):
        ClusterConfig.loads(text + MN)


def test_several_masters_list_and_round_trip_through_toml():
    config = ClusterConfig.loads('[cluster]\nmaster = "ipc:///a, ipc:///b"\n[master]\n'
                                 'coordination = "zookeeper://h:1,h:2"\n' + MN)
    assert config.masters == ["ipc:///a", "ipc:///b"]
    assert ClusterConfig.loads(config.dumps()) == config


def test_a_master_of_several_must_be_told_which_it_is(tmp_path, capsys):
    from fusee.master.command import main
    path = tmp_path / "c.toml"
    path.write_text('[cluster]\nmaster = "ipc:///a,ipc:///b"\n[master]\n'
                    'coordination = "zookeeper://127.0.0.1:9"\n' + MN)
    assert main(["--config", str(path)]) == 2
    assert capsys.readouterr().err == (f"fusee master: error: {path} names several masters: "
                                       "say which one this is with --endpoint\n")


def test_an_mn_answering_with_another_incarnation_restarted_and_is_dead_at_once():
    m = master()
    assert m.mn_seen(1, 0.0, 0xAB) == LEARNED
    assert m.mn_seen(1, 0.1, 0xAB) is None and m.mn_seen(1, 0.1, 0) is None   # 0: not told
    # a master taking over knows it too (or it would adopt the empty MN as a member)
    taken = restore(json.loads(json.dumps(state_of(m))), range(3), L, MN_L, GRACE,
                           now=0.2)
    for k in (m, taken):
        assert k.mn_seen(1, 0.2, 0xCD) == RESTARTED
        k.mn_afresh(0.2)                                # a stall of the master meanwhile
        assert [(e.kind, e.subject) for e in k.tick(0.21)] == [("mn-dead", 1)]   # not MN_L
        assert k.failing == [1] and 1 not in k.incarnations
        assert k.mn_seen(1, 0.3, 0xCD) is None          # a dead MN stays dead


def test_a_rebuilt_mn_is_expected_with_the_incarnation_it_asked_to_rejoin_with():
    m = master(pinged_until=100.0)
    m.mn_seen(0, 0.0, 0xAB)
    m.mn_seen(0, 0.0, 0xCD)         # restarted (with --rejoin)
    m.tick(0.1)
    m.failover_done(m.next_failover(0.1), Membership(1, frozenset({0})))
    assert m.rejoin(0, 1.0, 0xEF) and m.next_rebuild(1.0) == 0
    m.rebuild_done(0, Membership(2, frozenset(), rebuilt_at={0: 2}), now=1.1)
    assert m.incarnations[0] == 0xEF
    assert m.mn_seen(0, 1.2, 0xEF) is None and m.mn_seen(0, 1.3, 0x12) == RESTARTED


def test_a_rebuilt_mn_is_expected_with_the_incarnation_its_rebuild_found_in_its_header():
    """It restarted (with --rejoin) between its ask and the rebuild's copy: the copy went to
    the new process, whose word the rebuild read (``Rebuild.incarnation``)."""
    m = master(pinged_until=100.0)
    m.mn_seen(0, 0.0, 0xAB)
    m.mn_seen(0, 0.0, 0xCD)
    m.tick(0.1)
    m.failover_done(m.next_failover(0.1), Membership(1, frozenset({0})))
    assert m.rejoin(0, 1.0, 0xEF) and m.next_rebuild(1.0) == 0
    m.rebuild_done(0, Membership(2, frozenset(), rebuilt_at={0: 2}), now=1.1, incarnation=0x77)
    assert m.incarnations[0] == 0x77
    assert m.mn_seen(0, 1.2, 0x77) is None and m.mn_seen(0, 1.3, 0xEF) == RESTARTED


# -- rebuilds of dead MNs (fusee.rejoin) --------------------------------------------------------
def _failed_over(m: Master, node: int, now: float) -> None:
    m.tick(now)
    assert m.next_failover(now) == (node,)
    m.failover_done((node,), m.membership.successor([node], {}))


def test_a_rebuild_copies_online_then_pauses_the_clients_until_it_publishes():
    """A rejoining MN's rebuild starts with the clients working (registrations too) and
    pauses them only for its last phase."""
    m = master(pinged_until=0.0)
    for mn in (1, 2):
        m.mn_seen(mn, 10.0)
    _failed_over(m, 0, now=MN_L + 0.1)
    m.grant(7, 1, now=0.6)
    assert m.status(0.0)["memnodes"]["0"] == {"state": "dead", "replica_of": [0, 1, 2],
                                               "primary_of": []}
    assert m.status(0.0)["memnodes"]["1"]["primary_of"] == [0, 1]
    assert not m.rejoin(1, 0.7) and m.pause == 0           # alive: nothing to rebuild
    assert m.rejoin(0, 0.7) and not m.rejoin(0, 0.8)       # queued once
    assert m.pause == 0 and m.status(0.0)["memnodes"]["0"]["state"] == "joining"
    assert m.next_repair(0.8) is None and m.next_rebuild(0.8) == 0
    m.rejoins.progress = (5, 10)
    node = m.status(0.0)["memnodes"]["0"]
    assert (node["state"], node["phase"], node["progress"]) == ("rebuilding",
                                                                 "copying online", [5, 10])
    assert m.pause == 0 and m.admit() is None              # the clients keep going
    assert m.rebuild_overtaken(m.membership) is None
    m.rebuild_pausing(0)
    assert m.pause == 2 and m.waiting_for() == [7]
    assert m.status(0.0)["memnodes"]["0"]["phase"] == "pausing"
    with pytest.raises(TransitionInProgress, match="rebuilt"):
        m.admit()
    m.renew(7, 1, now=0.8, paused=2)
    assert m.waiting_for() == []
    with pytest.raises(ValueError, match="expected epoch 2 with dead"):
        m.rebuild_done(0, m.membership.successor([1], {}), 0.9)
    m.rebuild_done(0, m.membership.rejoined([0], {}), now=0.9)
    assert (m.epoch, m.dead, m.pause, m.alive()) == (2, frozenset(), 0, [0, 1, 2])
    assert m.status(0.0)["memnodes"]["0"]["primary_of"] == [0]
    assert m.tick(0.9 + MN_L) == []                         # it has a lease of its own now


def test_the_online_copy_waits_until_every_client_heard_of_the_rebuild():
    """Every grant while a rebuild runs names its MN (a client then carves new objects from
    fresh groups only, ``Allocator.follow``); ``unheard`` lists the leased clients no grant
    has told yet, whom the online copy waits for. A client registered meanwhile hears it in
    its first grant; the next rebuild is news to everyone again."""
    m = master(pinged_until=0.0)
    for mn in (1, 2):
        m.mn_seen(mn, 10.0)
    _failed_over(m, 0, now=MN_L + 0.1)
    m.grant(7, 1, now=0.6)
    m.grant(8, 1, now=0.6)
    assert m.renew(7, 1, now=0.65).rebuild is None and m.unheard() == [7, 8]
    assert m.rejoin(0, 0.7) and m.next_rebuild(0.7) == 0
    assert m.unheard() == [7, 8]
    m.rejoins.progress = (5, 10)
    assert m.renew(7, 1, now=0.75).rebuild == (0, 5, 10) and m.unheard() == [8]
    assert m.grant(9, 1, now=0.75).rebuild == (0, 5, 10) and m.unheard() == [8]
    m.renew(8, 1, now=0.8)
    assert m.unheard() == []
    m.rebuild_failed(0, 0.85, "RebuildAbandoned: a test")
    assert m.renew(7, 1, now=0.9).rebuild is None
    m.rejoins.retry_at.clear()
    assert m.rejoin(0, 0.9) and m.next_rebuild(0.9) == 0
    assert m.unheard() == [7, 8, 9]


def test_a_rebuild_is_overtaken_by_a_death_then_by_its_failover():
    m = master(nodes=4, pinged_until=0.0)
    for mn in (1, 2, 3):
        m.mn_seen(mn, 10.0)
    _failed_over(m, 0, now=MN_L + 0.1)
    m.rejoin(0, 0.7)
    assert m.next_rebuild(0.8) == 0
    begun = m.membership
    m.mn_seen(2, 20.0)
    m.mn_seen(3, 20.0)
    m.tick(10.0 + MN_L + 0.1)                               # MN 1 missed its lease
    assert "memory node 1 died" in m.rebuild_overtaken(begun)
    m.rebuild_failed(0, 11.0, "RebuildAbandoned")
    _failed_over(m, 1, now=11.0)
    assert "epoch 2 was published" in m.rebuild_overtaken(begun)


def test_a_failed_rebuild_lets_the_clients_go_and_an_mn_that_stops_asking_is_dropped():
    m = master(pinged_until=0.0)
    for mn in (0, 1):
        m.mn_seen(mn, 10.0)
    _failed_over(m, 2, now=MN_L + 0.1)
    m.rejoin(2, 1.0)
    assert m.next_rebuild(1.0) == 2 and m.next_rebuild(1.0) is None    # running
    m.rebuild_failed(2, 1.1, "NodeTimeout: MN 1")
    assert m.pause == 0                                     # the clients resume at once
    assert m.status(0.0)["memnodes"]["2"] == {"state": "dead", "replica_of": [0, 1, 2],
                                               "primary_of": [],
                                               "rebuild_error": "NodeTimeout: MN 1"}
    assert not m.rejoin(2, 1.15) and m.rejoin(2, 1.3)        # heard again after a backoff
    assert m.next_rebuild(1.3) == 2
    m.rebuild_failed(2, 1.3, "RebuildError: two groups", final=True)
    assert not m.rejoin(2, 1e9) and m.pause == 0             # for good
    m.rejoins.retry_at.clear()
    m.rejoin(2, 2.0)
    assert m.next_rebuild(2.0 + MN_L + 0.5) is None          # it stopped asking: dropped
    assert m.pause == 0 and m.status(0.0)["memnodes"]["2"]["state"] == "dead"


def test_the_master_protocol_carries_a_grant_and_names_each_refusal():
    """What the master sends (fusee/master/protocol.py) a client reads back the same; the
    membership only travels to a client that lags behind it."""
    from fusee.errors import MasterBusy, MasterError, MasterStandby
    from fusee.master.logic import Grant
    from fusee.master.protocol import (ERR_BUSY, ERR_LEASE, ERR_STANDBY, decode_grant,
                                       encode_grant, error_code, refusal)
    membership = Membership(epoch=3)
    g = Grant(id=5, token=7, lease=2.0, epoch=3, pause=4, rebuild=(1, 10, 20))
    assert decode_grant(encode_grant(g, membership, known=3)) == g
    assert decode_grant(encode_grant(g, membership, known=2)).membership == membership
    with pytest.raises(MasterError, match="malformed grant"):
        decode_grant({"id": 5})
    # the incarnations the master knows travel when it sends them (registration, membership)
    words = {0: 0xAB, 2: (1 << 64) - 1}
    assert decode_grant(encode_grant(g, membership, 3, words)).incarnations == words
    assert decode_grant(encode_grant(g, membership, 3)).incarnations is None
    for bad in ([[0, 0]], [[0, 1 << 64]], [[0, 1.5]], [[-1, 1]], {"0": 1}, [[0, 1, 2]]):
        reply = {**encode_grant(g, membership, 3), "incarnations": bad}
        with pytest.raises(MasterError, match="malformed grant"):
            decode_grant(reply)
    for e, code, raised in ((LeaseError("x"), ERR_LEASE, LeaseError),
                            (TransitionInProgress("x"), ERR_BUSY, MasterBusy)):
        assert error_code(e) == code and type(refusal(code, "x")) is raised
    assert type(refusal(ERR_STANDBY, "x")) is MasterStandby
    assert type(refusal(1, "x")) is MasterError and error_code(ValueError()) is None


def _closing(m: Master, rejoining: int, client: int) -> Membership:
    """``m`` with ``rejoining`` failed over and its rebuild's pause begun (``client`` acked):
    the pause may have closed rounds on the memory from here on; -> the epoch it began in."""
    _failed_over(m, rejoining, now=MN_L + 0.1)
    m.grant(client, 1, now=0.6)
    m.rejoin(rejoining, 0.7)
    assert m.next_rebuild(0.8) == rejoining
    m.rebuild_pausing(rejoining)
    m.renew(client, 1, now=0.8, paused=m.pause)
    m.rebuild_closing(rejoining)
    return m.membership


def test_a_pause_that_failed_after_closing_rounds_publishes_their_decisions():
    """The rounds a failed rebuild's pause closed are published in the next epoch, the
    rejoining MN still dead, as a failover's: the clients never resume the old epoch."""
    m = master(pinged_until=0.0)
    for mn in (1, 2):
        m.mn_seen(mn, 10.0)
    begun = _closing(m, 0, client=7)
    closed = begun.successor((), {(0, 5): 0x1234})
    with pytest.raises(ValueError, match="expected epoch 2 with dead"):
        m.rebuild_failed(0, 0.9, "NodeTimeout: MN 1", closed=begun.successor([1], {}))
    m.rebuild_failed(0, 0.9, "NodeTimeout: MN 1", closed=closed)
    assert (m.epoch, m.dead, m.pause, m.closing) == (2, frozenset({0}), 0, False)
    grant = m.renew(7, 1, now=1.0)
    assert grant.epoch == 2 and grant.pause == 0
    assert m.membership.decided_at(1, 0, 5) == 0x1234       # a round of epoch 1: its fate
    assert m.status(0.0)["memnodes"]["0"]["state"] == "dead"


def test_a_pause_that_failed_with_its_decisions_unsaved_or_its_master_keeps_the_clients_paused():
    """A failed pause whose decisions were not published (their save failed, or the master
    died in the pause: the next one has only the state saved when it began) keeps the
    clients paused until a failover of no MN closes the rounds again and publishes."""
    m = master(pinged_until=0.0)
    for mn in (1, 2):
        m.mn_seen(mn, 10.0)
    _closing(m, 0, client=7)
    saved = json.loads(json.dumps(state_of(m)))
    m.rebuild_failed(0, 0.9, "NodeTimeout: MN 1")           # nothing published
    later = restore(saved, range(3), L, MN_L, GRACE, now=1.0)
    for mn in (1, 2):
        later.mn_seen(mn, 20.0)
    for x in (m, later):
        assert x.pause == 2 and x.epoch == 1 and x.status(1.0)["closing"]
        with pytest.raises(TransitionInProgress):
            x.admit()
        assert x.next_rebuild(1.0) is None
        if x is later:                                      # its acks are not persisted
            assert x.next_failover(1.0) is None and x.waiting_for() == [7]
            x.renew(7, 1, now=1.0, paused=2)
        assert x.next_failover(1.0) == ()                   # a failover of no MN
        x.failover_done((), x.membership.successor((), {}))
        assert (x.epoch, x.dead, x.pause, x.closing) == (2, frozenset({0}), 0, False)
    bad = dict(saved, closing="yes")
    with pytest.raises(StateError, match="closing"):
        restore(bad, range(3), L, MN_L, GRACE, now=1.0)
