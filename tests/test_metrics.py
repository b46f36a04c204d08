"""Prometheus counters, scraped over HTTP from a real memory node and a real master."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from processes import wait_for

from fusee.emulator.serving import stop_processes
from fusee.client import Client
from fusee.config import ClusterConfig, LayoutConfig, MemNodeConfig


def write_config(folder) -> str:
    """A one-MN cluster with a master, over ipc://, in ``folder``."""
    config = ClusterConfig(
        memnodes=(MemNodeConfig(0, f"ipc://{folder}/mn0.sock"),), name=f"metrics-{os.getpid()}",
        master=f"ipc://{folder}/master.sock", transport="zmq",
        layout=LayoutConfig(region_size=16 << 20, block_size=1 << 20, index_size=4 << 20,
                            max_clients=16))
    return str(config.save(folder / "cluster.toml"))


def _start(tmp_path, name: str, *args) -> tuple[subprocess.Popen, dict]:
    ready = tmp_path / f"{name}.ready"
    with open(tmp_path / f"{name}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fusee.cli", *args, "--ready-file",
                                 ready, "--parent-pid", str(os.getpid())], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def started() -> bool:
        assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()
        return ready.exists()

    wait_for(started, f"{name} to be ready")
    return proc, json.loads(ready.read_text())


def scrape(port: int) -> dict[str, float]:
    """name{labels} -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {s.name + "".join(f"{{{k}={v}}}" for k, v in sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_memnode_and_master_counters_can_be_scraped(tmp_path):
    cfg = write_config(tmp_path)
    procs = []
    try:
        mn, mn_ready = _start(tmp_path, "mn0", "memnode", "--config", cfg, "--id", "0",
                              "--metrics-port", "0")
        procs.append(mn)
        master, master_ready = _start(tmp_path, "master", "master", "--config", cfg,
                                      "--state", tmp_path / "master.json", "--metrics-port", "0")
        procs.append(master)
        before = scrape(mn_ready["metrics_port"])
        with Client.connect(cfg) as kv:
            for i in range(20):
                kv.put(b"key%d" % i, b"value" * 10)
            assert kv.get(b"key3") == b"value" * 10
            m = scrape(master_ready["metrics_port"])
            assert m["fusee_master_clients"] == 1 and m["fusee_master_epoch"] == 0
            assert m["fusee_master_memnodes_alive"] == 1 and m["fusee_master_memnodes_dead"] == 0
            assert m["fusee_master_registrations_total"] == 1
            assert m["fusee_master_requests_total"] >= 1
        after = scrape(mn_ready["metrics_port"])
        assert after["fusee_memnode_verbs_total{node=0}"] >= \
            before["fusee_memnode_verbs_total{node=0}"] + 20 * 3
        for name in ("requests_total", "received_bytes_total", "sent_bytes_total"):
            key = f"fusee_memnode_{name}{{node=0}}"
            assert after[key] > before[key], name
        assert after["fusee_memnode_blocks_used{node=0}"] >= 1
        assert after["fusee_memnode_memory_used_bytes{node=0}"] == \
            after["fusee_memnode_blocks_used{node=0}"] * (1 << 20)
        assert "process_resident_memory_bytes" in after
    finally:
        stop_processes(procs)


def test_a_metrics_port_that_cannot_open_is_one_line(tmp_path):
    cfg = write_config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run([sys.executable, "-m", "fusee.cli", "memnode", "--config", cfg,
                               "--id", "0", "--metrics-port", str(port)],
                              capture_output=True, text=True, timeout=120, check=False)
    assert busy.returncode == 2 and "Traceback" not in busy.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in busy.stderr
    missing = subprocess.run(
        [sys.executable, "-c", ("import sys; sys.modules['prometheus_client'] = None; "
                                "from fusee.cli import main; sys.exit(main(sys.argv[1:]))"),
         "master", "--config", cfg, "--state", tmp_path / "m.json", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "pip install 'fusee[metrics]'" in missing.stderr
