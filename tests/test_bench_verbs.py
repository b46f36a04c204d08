"""`fusee bench verbs` end to end, with tiny op counts: the table and the JSON it writes.

The figures themselves are machine-dependent; these tests check what was measured and how it
is reported, never how fast it was.
"""

from __future__ import annotations

import json

import pytest

from fusee.bench import verbs as bench
from fusee.cli import main as cli

CASES = {"read64", "write64", "cas", "faa", "read1k", "batch3"}
ROW = {"n", "p50_us", "p99_us", "ops_per_s", "verbs_per_s"}


def positive(row: dict) -> bool:
    return all(row[k] > 0 for k in ("p50_us", "p99_us", "ops_per_s", "verbs_per_s")) and \
        row["p50_us"] <= row["p99_us"]


def test_every_default_backend_with_its_floors(tmp_path, capsys):
    out = tmp_path / "verbs.json"
    assert cli(["bench", "verbs", "--ops", "30", "--rounds", "3", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["bench"] == "verbs" and doc["ops"] == 30 and doc["memnodes"] == 3
    assert list(doc["backends"]) == ["local", "shm", "zmq-ipc", "zmq-tcp"]
    for name, r in doc["backends"].items():
        assert set(r["ops"]) == CASES
        for case, row in r["ops"].items():
            assert ROW <= set(row) and row["n"] == 30 and positive(row)
            verbs_per_batch = 3 if case == "batch3" else 1
            assert row["verbs_per_s"] == pytest.approx(row["ops_per_s"] * verbs_per_batch)
            floor = r["floors"][row["floor"]]["p50_us"]
            assert row["x_floor"] == pytest.approx(row["p50_us"] / floor)
        assert r["batch3_x_single"] == pytest.approx(r["ops"]["batch3"]["p50_us"] /
                                                     r["ops"]["read64"]["p50_us"])
        expected_floors = {"pingpong"} if name.startswith("zmq") else \
            {"copy64", "copy1k", "unpack", "atomic"}
        assert set(r["floors"]) == expected_floors
        assert all(f["n"] == 30 and positive(f) for f in r["floors"].values())
    assert doc["backends"]["zmq-tcp"]["curve"] is True          # the floor speaks CURVE too
    table = capsys.readouterr().out
    for name in doc["backends"]:
        assert f"{name:9} batch3" in table and f"{name:9} batch of 3 MNs" in table
    assert "(pingpong)" in table and "(atomic)" in table


def test_an_unavailable_backend_is_reported_and_the_others_still_run(tmp_path, monkeypatch,
                                                                     capsys):
    monkeypatch.setitem(bench.TARGETS, "broken", bench.Target(dict(transport="nonexistent"),
                                                              "none"))
    out = tmp_path / "verbs.json"
    assert bench.main(["--transport", "broken,shm", "--ops", "5", "--json", str(out)]) == 1
    doc = json.loads(out.read_text())
    assert "unknown transport" in doc["backends"]["broken"]["error"]
    assert set(doc["backends"]["shm"]["ops"]) == CASES
    assert "broken    unavailable" in capsys.readouterr().out


def test_atomic_alternatives_are_timed_on_request(tmp_path):
    out = tmp_path / "verbs.json"
    assert bench.main(["--transport", "local", "--ops", "10", "--atomics",
                       "--json", str(out)]) == 0
    alt = json.loads(out.read_text())["atomics"]
    assert alt["c_ext_cas"]["p50_ns"] > 0 and alt["c_ext_faa"]["p50_ns"] > 0
    for name in ("ctypes_libatomic", "atomics_pkg"):      # measured, or said why not
        assert f"{name}_cas" in alt or isinstance(alt.get(name), str)


@pytest.mark.parametrize("argv", [["--transport", "nosuch"], ["--transport", ""],
                                  ["--ops", "0"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2


def test_interleaving_times_every_case_the_asked_number_of_times():
    calls = {"a": 0, "b": 0}

    def count(name):
        calls[name] += 1

    got = bench.interleaved({"a": (count, "a"), "b": (count, "b")}, ops=10, rounds=3)
    assert [len(got[k].ns) for k in "ab"] == [10, 10]
    assert calls == {"a": 14, "b": 14}            # 10 timed + a warm-up slice of 4
