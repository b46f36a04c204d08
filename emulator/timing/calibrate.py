"""A profile of this host's local cluster, measured: the model checked against itself.

On the local and shm backends there is no network and no NIC: a client executes its verbs
itself, so every cost is the client's CPU. ``measure`` runs one client's operations over a
transport and times, call by call, the operation generators (the client's CPU per step, per
operation kind: an INSERT's steps do more than a SEARCH's) and the transport (the CPU per
verb), in CPU time of the calling thread, so that other processes on a shared host do not
count; ``local_profile`` turns that into a profile with no network latency, NICs too fast to
queue, and ``os.cpu_count()`` cores shared by all clients. With it, the model's prediction for
1-2 clients can be held against a real ``fusee bench`` run on this machine
(tests/test_timing_model.py).

``fit_step_cost`` is the other calibration, for a profile of hardware that is not here: the
client's CPU per step fitted to published ONE-client latencies (the cx3-56g profile, to the
FUSEE paper's), never to multi-client results, which are what the model is held against.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from fusee.emulator.timing.profile import Profile
from fusee.emulator.timing.runs import ModelRun
from fusee.verbs import TransportError

#: NIC rates (Mops) so high that nothing queues: the local backend has no NIC
_UNBOUNDED = 1e6


def _timed_run(op, transport, clock: list) -> None:
    """``fusee.driver.run``, adding the generator's time to clock[0] and the transport's to
    clock[1], and counting steps in clock[2]."""
    how, arg = op.send, None
    while True:
        t0 = time.thread_time()
        try:
            batch = how(arg)
        except StopIteration:
            clock[0] += time.thread_time() - t0
            clock[2] += 1
            return
        t1 = time.thread_time()
        clock[0] += t1 - t0
        clock[2] += 1
        try:
            how, arg = op.send, transport.execute(batch)
        except TransportError as e:
            how, arg = op.throw, e
        clock[1] += time.thread_time() - t1


def measure(core, transport, names: list[bytes], value: bytes,
            rounds: int = 3) -> tuple[dict[str, float], float]:
    """({operation: CPU per step}, CPU per verb), in us, of ``core`` (a ClientCore) over
    ``transport``: INSERT, UPDATE, SEARCH and DELETE of each of ``names``, ``rounds`` times
    (each round takes its own suffix of the keys); the median of the rounds, since the host
    may be shared."""
    steps: dict[str, list[float]] = {}
    verbs = []
    for r in range(rounds):
        keys = [k + b"/%d" % r for k in names]
        spent, n_verbs = 0.0, 0
        for op in ("insert", "update", "search", "delete"):
            clock = [0.0, 0.0, 0]
            v0 = transport.stats.verbs
            for k in keys:
                gen = (getattr(core, op)(k) if op in ("search", "delete")
                       else getattr(core, op)(k, value))
                _timed_run(gen, transport, clock)
            steps.setdefault(op, []).append(clock[0] / clock[2] * 1e6)
            spent += clock[1]
            n_verbs += transport.stats.verbs - v0
        verbs.append(spent / max(1, n_verbs) * 1e6)
    return {op: float(np.median(v)) for op, v in steps.items()}, float(np.median(verbs))


def local_profile(steps_us: dict[str, float], verb_us: float,
                  cores: int | None = None) -> Profile:
    """The profile of a host whose clients execute their verbs themselves (``measure``)."""
    return Profile(name="local", description="this host's local backend, measured",
                   rtt_us=0.0, nic_message_rate_mops=_UNBOUNDED,
                   nic_bandwidth_gbps=_UNBOUNDED, nic_atomic_rate_mops=_UNBOUNDED,
                   client_cpu_per_step_us=max(steps_us.values(), default=0.0),
                   client_cpu_per_step_by_op=dict(steps_us), client_cpu_per_verb_us=verb_us,
                   client_cores=cores or os.cpu_count() or 1, ms_cores=1, ms_rpc_us=0.0,
                   verb_timeout_us=1000.0, detect_us=1000.0, failover_round_trip_us=0.0)


def one_client_latency(profile: Profile, ops, *, memnodes: int, replicas: int,
                       count: int = 200) -> dict[str, float]:
    """Median latency (us) of each of ``ops`` for one client on ``profile``: the client
    inserts ``count`` keys of its own, then runs each operation on them, as the paper's
    micro-benchmarks do."""
    run = ModelRun("fusee", profile, memnodes=memnodes, replicas=replicas, clients=1,
                   keys=1000, extra_keys=count)
    medians = {}
    for op in ("insert", "update", "search", "delete"):     # each needs the one before
        result = run.micro(op, count)
        if op in ops:
            medians[op] = float(np.median(result.latencies_us[op]))
    return medians


def fit_step_cost(profile: Profile, targets_us: dict[str, float], *, memnodes: int,
                  replicas: int) -> float:
    """The client CPU per step (us) that brings one client's median latencies closest (least
    squares) to ``targets_us`` ({operation: latency}), the other costs of ``profile`` kept.

    With one client nothing queues behind another, so an operation's latency is linear in
    the step cost: ``base + steps * s``, where ``steps`` counts its steps (its round trips
    and its last step). Two runs, at s = 0 and s = 1, give ``base`` and ``steps`` per
    operation; the fit is then closed-form, and never looks at more than one client."""
    ops = list(targets_us)
    at = {s: one_client_latency(dataclasses.replace(profile, client_cpu_per_step_us=s,
                                                    client_cpu_per_step_by_op={}),
                                ops, memnodes=memnodes, replicas=replicas)
          for s in (0.0, 1.0)}
    steps = {op: at[1.0][op] - at[0.0][op] for op in ops}
    assert all(n > 0 for n in steps.values()), steps
    s = (sum(steps[op] * (targets_us[op] - at[0.0][op]) for op in ops)
         / sum(n * n for n in steps.values()))
    return max(0.0, s)
