"""Issue 12's targets judged from `fusee bench` results (``fusee.bench.targets``): each figure
next to its target, and only under the conditions the target is stated for."""

from __future__ import annotations

import json

from fusee.bench.targets import judge_depth, judge_run, main

SHM = {"transport": "shm", "memnodes": 3, "replicas": 3, "object_size": 1024,
       "load_clients": 1}


def _row(suite, name, throughput, depth=1, clients=1, p50=None):
    latency = {name: {"p50_us": p50}} if p50 is not None else {}
    return {"system": "fusee", "suite": suite, "name": name, "clients": clients,
            "depth": depth, "throughput": throughput, "latency_us": latency}


def _doc(options, rows, load=(), build="compiled"):
    return {"options": options, "results": rows, "machine": {"fast_path": build},
            "load": [{"system": "fusee", "throughput": t} for t in load]}


def test_each_figure_is_printed_with_its_target_and_whether_it_is_met():
    doc = _doc(SHM, [_row("micro", "search", 1, p50=4.9), _row("micro", "insert", 1, p50=15.1),
                     _row("micro", "update", 1, p50=9, clients=2),      # not one client
                     _row("ycsb", "C", 151_000, depth=8)], load=[59_000])
    got = {v.what: (v.figure, v.target, v.met) for v in judge_run(doc)}
    assert got == {
        "SEARCH p50, shm, 1 client, compiled": ("4.9 us", "<= 5 us", True),
        "INSERT p50, shm, 1 client, compiled": ("15.1 us", "<= 15 us", False),
        "YCSB-C throughput, shm, 1 client, depth 8, compiled": ("151.0 Kops/s", ">= 150 Kops/s",
                                                                True),
        "load phase, shm, 1 client process, compiled": ("59.0 Kops/s", ">= 60 Kops/s", False)}
    # each line names the build it measured; older results do not say which
    doc = _doc(SHM, [_row("micro", "search", 1, p50=6.0)], build="Python")
    assert [v.what for v in judge_run(doc)] == ["SEARCH p50, shm, 1 client, Python"]
    del doc["machine"]
    assert [v.what for v in judge_run(doc)] == ["SEARCH p50, shm, 1 client, build unknown"]


def test_a_figure_measured_under_other_conditions_is_not_judged():
    rows = [_row("micro", "search", 1, p50=1.0), _row("ycsb", "C", 10**6, depth=8)]
    for change in ({"replicas": 1}, {"memnodes": 2}, {"object_size": 64},
                   {"transport": "zmq"}):
        assert judge_run(_doc({**SHM, **change}, rows, load=[10**6])) == []
    # the load phase of two client processes is not one process's throughput
    assert judge_run(_doc({**SHM, "load_clients": 2}, [], load=[10**6])) == []


def test_depth_8_is_judged_against_depth_1_of_the_same_transport_workload_and_build():
    zmq = {**SHM, "transport": "zmq"}
    docs = [_doc(zmq, [_row("ycsb", "C", 10_000)]), _doc(zmq, [_row("ycsb", "C", 39_000, 8)]),
            _doc(SHM, [_row("ycsb", "C", 50_000)]), _doc(SHM, [_row("ycsb", "C", 50_000, 8)]),
            _doc(SHM, [_row("ycsb", "A", 50_000, 8)]),      # no depth 1 of A: not judged
            # a source run at depth 1 is no baseline for a compiled one at depth 8
            _doc(SHM, [_row("ycsb", "B", 40_000)], build="Python"),
            _doc(SHM, [_row("ycsb", "B", 60_000, 8)])]
    got = {v.what: (v.figure, v.met) for v in judge_depth(docs)}
    assert got == {"YCSB-C depth 8 / depth 1, shm, 1 client, compiled": ("1.0 x", True),
                   "YCSB-C depth 8 / depth 1, zmq, 1 client, compiled": ("3.9 x", False)}


def test_the_command_line_reads_run_folders_and_says_what_it_cannot_read(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(_doc(SHM, [_row("micro", "delete", 1,
                                                                  p50=11.0)])))
    assert main([str(run)]) == 0
    assert ("DELETE p50, shm, 1 client, compiled: 11.0 us  (target <= 12 us)  met"
            in capsys.readouterr().out)
    (tmp_path / "bad.json").write_text("{not json")
    assert main([str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusee.bench.targets: cannot read the results:") and "\n" == err[-1]
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(run / "results.json"), str(tmp_path / "missing")]) == 2
    (run / "results.json").write_text(json.dumps(_doc({**SHM, "replicas": 1}, [])))
    assert main([str(run)]) == 2 and "no figure" in capsys.readouterr().err


def test_a_zmq_search_is_judged_against_the_ping_pong_floor_of_its_own_run():
    zmq = {**SHM, "transport": "zmq", "endpoint": "ipc"}
    rows = [_row("micro", "search", 1, p50=30.0), _row("micro", "update", 1, p50=90.0)]
    doc = _doc(zmq, rows)
    assert judge_run(doc) == []             # no floor measured (an older run): not judged
    doc["floors"] = {"pingpong": {"latency_us": {"p50_us": 24.0}}}
    got = [(v.what, v.figure, v.target, v.met) for v in judge_run(doc)]
    assert got == [("SEARCH p50 / raw pyzmq ping-pong p50 (30.0 / 24.0 us), zmq ipc, 1 client, "
                    "compiled", "1.2 x", "<= 1.5 x", True)]
    doc["floors"]["pingpong"]["latency_us"]["p50_us"] = 19.0
    assert [v.met for v in judge_run(doc)] == [False]
    # stated for ipc endpoints, and one client
    assert judge_run({**doc, "options": {**zmq, "endpoint": "tcp"}}) == []
    assert judge_run({**doc, "results": [_row("micro", "search", 1, p50=20.0, clients=2)]}) == []
