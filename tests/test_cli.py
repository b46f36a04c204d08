"""The `fusee` command line against a running cluster, as a person would use it."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys

import pytest

from fusee.emulator.cluster import LocalCluster


def fusee(*args, check=True):
    return subprocess.run([sys.executable, "-m", "fusee.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=check)


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(memnodes=3, transport="zmq") as c:
        yield c


def test_put_get_delete(cluster):
    cfg = cluster.config_path
    fusee("put", "--config", cfg, "hello", "world")
    assert fusee("get", "--config", cfg, "hello").stdout == "world\n"
    fusee("update", "--config", cfg, "hello", "there", "--transport", "shm")
    assert fusee("get", "--config", cfg, "hello").stdout == "there\n"
    fusee("delete", "--config", cfg, "hello")
    missing = fusee("get", "--config", cfg, "hello", check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_errors_are_plain_messages(cluster):
    cfg = cluster.config_path
    fusee("insert", "--config", cfg, "k", "v")
    dup = fusee("insert", "--config", cfg, "k", "w", check=False)
    assert dup.returncode == 1 and "already exists" in dup.stderr and "Traceback" not in dup.stderr
    gone = fusee("update", "--config", cfg, "nope", "v", check=False)
    assert gone.returncode == 1 and "not found" in gone.stderr
    bad = fusee("get", "--config", "/nonexistent.toml", "k", check=False)
    assert bad.returncode == 2 and "cannot read cluster config" in bad.stderr


def test_version_is_the_installed_distributions():
    """``fusee --version`` and ``fusee.__version__`` name the installed distribution, and the
    package says it is typed (PEP 561)."""
    import importlib.metadata
    from pathlib import Path

    import fusee as package

    expected = importlib.metadata.version("fusee")
    assert package.__version__ == expected
    out = fusee("--version")
    assert out.stdout.strip() == f"fusee {expected}"
    assert (Path(package.__file__).parent / "py.typed").is_file()


def one_line_error(result, code: int, *phrases: str) -> str:
    """``result`` failed with ``code`` and one plain line (no traceback) holding ``phrases``."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if "error" in ln or "not found" in ln
             or "already exists" in ln]
    assert len(lines) == 1, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def test_user_mistakes_get_one_line_and_a_usage_code(cluster):
    cfg = cluster.config_path
    one_line_error(fusee("get", "--config", cfg, "", check=False), 2, "empty key")
    big = subprocess.run([sys.executable, "-m", "fusee.cli", "put", "--config", cfg, "big", "-"],
                         input=b"x" * (1 << 20), capture_output=True, timeout=120, check=False)
    one_line_error(subprocess.CompletedProcess(big.args, big.returncode, big.stdout.decode(),
                                               big.stderr.decode()), 2, "too large")
    fusee("insert", "--config", cfg, "twice", "v")
    one_line_error(fusee("insert", "--config", cfg, "twice", "v", check=False), 1,
                   "already exists", "fusee put")
    traced = fusee("get", "--config", cfg, "", "--debug", check=False)
    assert (traced.returncode == 2 and "Traceback" in traced.stderr
            and "KeyTooLarge" in traced.stderr)
    one_line_error(fusee("frobnicate", check=False), 2)


def test_values_from_stdin_and_json_output(cluster):
    cfg = cluster.config_path
    blob = bytes(range(256)) + b"\n"
    put = subprocess.run([sys.executable, "-m", "fusee.cli", "put", "--config", cfg, "bin", "-"],
                         input=blob, capture_output=True, timeout=120, check=False)
    assert put.returncode == 0, put.stderr
    raw = subprocess.run([sys.executable, "-m", "fusee.cli", "get", "--config", cfg, "bin"],
                         capture_output=True, timeout=120, check=True)
    assert raw.stdout == blob + b"\n"
    as_json = json.loads(fusee("get", "--config", cfg, "bin", "--json").stdout)
    assert as_json == {"key": "bin", "value_base64": base64.b64encode(blob).decode()}
    fusee("put", "--config", cfg, "text", "hé")
    assert json.loads(fusee("get", "--config", cfg, "text", "--json").stdout) == \
        {"key": "text", "value": "hé"}
    missing = fusee("get", "--config", cfg, "absent", "--json", check=False)
    assert missing.returncode == 1 and json.loads(missing.stdout) == {"key": "absent",
                                                                      "value": None}


def test_fusee_config_is_the_default_config(cluster):
    env = {**os.environ, "FUSEE_CONFIG": str(cluster.config_path)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "fusee.cli", *a], env=env,
                                    capture_output=True, text=True, timeout=120, check=False)
    assert run("put", "envkey", "envvalue").returncode == 0
    assert run("get", "envkey").stdout == "envvalue\n"
    one_line_error(fusee("get", "envkey", check=False), 2, "--config")


def test_status_from_the_master_and_from_the_memory_nodes_alone():
    with LocalCluster(memnodes=2, transport="zmq", master=True, timeout=2.0) as c:
        cfg = c.config_path
        view = json.loads(fusee("status", "--config", cfg, "--json").stdout)
        assert view["master"]["pid"] == c.master_procs["master"].pid
        assert view["epoch"] == 0 and view["clients"] == {}
        assert [n["state"] for n in view["memnodes"]] == ["alive", "alive"]
        assert all(n["blocks"] > 0 and n["lease_left"] > 0 for n in view["memnodes"])
        with c.client() as kv:
            kv.put(b"k", b"v")
            view = json.loads(fusee("status", "--config", cfg, "--json").stdout)
            assert len(view["clients"]) == 1
            assert all(n["blocks_used"] >= 1 and n["used_bytes"] == n["blocks_used"] *
                       n["block_size"] for n in view["memnodes"])
            table = fusee("status", "--config", cfg).stdout
            assert "epoch 0" in table and "clients: 1" in table and "MEMORY USED" in table
        c.stop_master()
        alone = fusee("status", "--config", cfg, "--json")
        view = json.loads(alone.stdout)
        assert "error" in view["master"] and "no reply" in view["master"]["error"]
        assert [n["state"] for n in view["memnodes"]] == ["up", "up"]
        one_line_error(fusee("get", "--config", cfg, "k", check=False), 3, "master")
        c.kill(0)
        table = fusee("status", "--config", cfg).stdout
        row = next(ln for ln in table.splitlines() if ln.startswith("0 "))
        assert "unreachable" in row and "MN 0" in row
        c.kill(1)
        one_line_error(fusee("status", "--config", cfg, check=False), 3,
                       "neither the master nor any memory node answered")


def test_servers_log_with_timestamps():
    """Memory nodes and the master log through ``logging``: UTC time, level, logger, pid."""
    stamped = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO [\w.]+\[\d+\]: "
    with LocalCluster(memnodes=1, transport="zmq", master=True) as c:
        with c.client() as kv:
            kv.put(b"k", b"v")
        assert re.search(stamped + r"memnode 0 serving ", c.log(0), re.MULTILINE), c.log(0)
        log = c.master_log()
        assert re.search(stamped + r"master serving ", log, re.MULTILINE), log
        assert re.search(stamped + r"master: client \d+ registered", log, re.MULTILINE), log


def test_bench_without_its_extra_names_the_pip_command():
    run = subprocess.run(
        [sys.executable, "-c", ("import sys; sys.modules['hdrh'] = None; "
                                "from fusee.cli import main; "
                                "sys.exit(main(['bench', '--quick']))")],
        capture_output=True, text=True, timeout=120, check=False)
    one_line_error(run, 2, "hdrh", "pip install 'fusee[bench]'")


PLAIN_CONFIG = """
[cluster]
name = "cli-test"
master = "ipc://{dir}/master.sock"
[security]
allow_insecure_tcp = true
[layout]
region_size = 16777216
block_size = 1048576
index_size = 4194304
max_clients = 16
[[memnodes]]
id = 0
endpoint = "{endpoint}"
"""


def test_memnode_that_cannot_listen_says_why(tmp_path):
    import socket
    cfg = tmp_path / "c.toml"
    cfg.write_text(PLAIN_CONFIG.format(dir=tmp_path, endpoint="tcp://192.0.2.1:7000"))
    quiet = subprocess.run([sys.executable, "-m", "fusee.cli", "memnode", "--config", cfg, "--id",
                            "0"], env={**os.environ, "FUSEE_LOG_LEVEL": "loud"},
                           capture_output=True, text=True, timeout=120, check=False)
    one_line_error(quiet, 2, "unknown log level 'LOUD'", "FUSEE_LOG_LEVEL")
    one_line_error(fusee("memnode", "--config", cfg, "--id", "0", check=False), 2,
                   "192.0.2.1", "this host's own address")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line_error(fusee("memnode", "--config", cfg, "--id", "0", "--endpoint",
                             f"tcp://127.0.0.1:{port}", check=False), 2,
                       "served by another process", "another port")


#: (what a config gets wrong: a regex substitution of PLAIN_CONFIG, the phrase the one line
#: must hold): each of these exited 5 ("internal error: report the traceback") or, for the
#: port, had the MN serve on 99999 mod 65536
WRONG_FIELDS = [
    (("name", 'name = "cli-test"\ntransport = "zmqq"'), "unknown transport 'zmqq'"),
    (("endpoint", 'endpoint = "mn0"'), "must be a ZeroMQ address"),
    (("endpoint", 'endpoint = 7'), "endpoint must be a string"),
    (("endpoint", 'endpoint = "tcp://127.0.0.1:99999"'), "needs a port 1..65535"),
    (("name", 'name = "cli-test"\nmaster = 5'), "master must be a string"),
    (("allow_insecure_tcp", 'allow_insecure_tcp = true\nkeys_dir = 5'), "keys_dir must be"),
    (("allow_insecure_tcp", 'allow_insecure_tcp = "yes"'), "true or false"),
    (("name", 'name = "cli-test"\ntimeout = inf'), "timeout must be a positive number"),
]


@pytest.mark.parametrize("change, phrase", WRONG_FIELDS, ids=[p for _, p in WRONG_FIELDS])
def test_a_config_wrong_in_one_field_says_which(tmp_path, change, phrase):
    field, line = change
    text = PLAIN_CONFIG.format(dir=tmp_path, endpoint=f"ipc://{tmp_path}/mn0.sock")
    text = re.sub(r"(?m)^master = .*\n", "", text)        # no master to wait for
    cfg = tmp_path / "c.toml"
    cfg.write_text(re.sub(rf"(?m)^{field} = .*$", lambda _: line, text, count=1))
    one_line_error(fusee("get", "--config", cfg, "k", check=False), 2, phrase)


def test_a_memnode_whose_layout_leaves_no_room_says_so(tmp_path):
    """A region too small for its index and blocks was a traceback (ValueError, exit 1)."""
    cfg = tmp_path / "c.toml"
    cfg.write_text(PLAIN_CONFIG.format(dir=tmp_path, endpoint=f"ipc://{tmp_path}/mn0.sock")
                   .replace("region_size = 16777216", "region_size = 4194304"))
    one_line_error(fusee("memnode", "--config", cfg, "--id", "0", check=False), 2,
                   "no room for a single data block", "layout.region_size larger")


def test_master_with_an_old_state_file_says_what_to_do(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(PLAIN_CONFIG.format(dir=tmp_path, endpoint=f"ipc://{tmp_path}/mn0.sock"))
    state = tmp_path / "master.json"
    state.write_text(json.dumps({"cluster": "another"}))
    one_line_error(fusee("master", "--config", cfg, "--state", state, check=False), 2,
                   "another", f"move {state} aside")
    state.write_text(json.dumps({"cluster": "cli-test", "version": 2, "memnodes": [0, 1, 2]}))
    one_line_error(fusee("master", "--config", cfg, "--state", state, check=False), 2,
                   "memory nodes [0, 1, 2]", f"move {state} aside")


def test_exit_codes_tell_not_found_from_a_crash():
    from fusee import exit_codes
    from fusee.errors import KeyNotFound
    from fusee.verbs import NodeTimeout
    assert exit_codes.classify(KeyNotFound(b"k"))[0] == 1
    assert exit_codes.classify(NodeTimeout("MN 2: no reply", 2))[0] == 3
    assert exit_codes.classify(RuntimeError("a bug"))[0] == 5
    assert exit_codes.classify(type("Custom", (Exception,), {"exit_code": 4})())[0] == 4


def test_keys_dir_and_client_key_are_relative_to_the_config_file(tmp_path, monkeypatch):
    from fusee.config import ClusterConfig
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "c.toml").write_text(
        '[security]\ncurve = true\nkeys_dir = "keys"\nclient_key = "keys/app.key_secret"\n'
        '[[memnodes]]\nid = 0\nendpoint = "tcp://127.0.0.1:7000"\n')
    monkeypatch.chdir(tmp_path)
    security = ClusterConfig.load("etc/c.toml").security
    assert security.keys_dir == str(folder / "keys")
    assert security.client_key == str(folder / "keys" / "app.key_secret")


def test_a_master_without_its_secret_key_says_how_to_make_it(tmp_path):
    cfg = tmp_path / "c.toml"
    (tmp_path / "keys").mkdir()
    cfg.write_text(PLAIN_CONFIG.format(dir=tmp_path, endpoint="ipc://x")
                   .replace('master = "ipc://', 'master = "tcp://127.0.0.1:0" # ipc://')
                   .replace("allow_insecure_tcp = true", 'curve = true\nkeys_dir = "keys"'))
    one_line_error(fusee("master", "--config", cfg, check=False), 2,
                   "master.key_secret is missing", "fusee keys init-master")


def test_the_example_config_loads_and_explains_every_setting():
    import dataclasses
    from pathlib import Path

    from fusee.config import ClusterConfig, LayoutConfig, MemNodeConfig, SecurityConfig
    path = Path(__file__).resolve().parent.parent / "examples" / "cluster.toml"
    config = ClusterConfig.load(path)
    assert config.security.curve and len(config.memnodes) == 3
    text = path.read_text()
    for cls in (ClusterConfig, LayoutConfig, MemNodeConfig, SecurityConfig):
        for f in dataclasses.fields(cls):
            if f.name not in ("memnodes", "layout", "security"):
                assert re.search(rf"^#? ?{f.name} = .*# ", text, re.MULTILINE), f.name


def test_keys_init_and_init_master_fill_in_the_config(tmp_path):
    from fusee.config import ClusterConfig
    etc = tmp_path / "etc"
    etc.mkdir()
    cfg = etc / "c.toml"
    cfg.write_text(PLAIN_CONFIG.format(dir=tmp_path, endpoint="tcp://127.0.0.1:7000")
                   .replace("allow_insecure_tcp = true\n", ""))
    one_line_error(fusee("keys", "init", "--dir", etc / "keys", "--config", cfg,
                         "--memnodes", "2", check=False), 2, "leave --memnodes out")
    assert not (etc / "keys").exists()
    fusee("keys", "init", "--dir", etc / "keys", "--config", cfg, "--client", "app")
    fusee("keys", "init-master", "--dir", etc / "keys", "--config", cfg)
    config = ClusterConfig.load(cfg)
    assert config.security.curve and config.security.keys_dir == str(etc / "keys")
    assert 'keys_dir = "keys"' in cfg.read_text()          # as it resolves: next to the config
    assert config.memnodes[0].curve_public and config.master_curve_public
    authorized = sorted(p.name for p in (etc / "keys" / "clients").iterdir())
    assert authorized == ["app.key", "master.key"]           # the master is the MNs' client
    one_line_error(fusee("keys", "add-client", "--dir", etc / "keys", "--client", "master",
                         check=False), 2, "refusing to overwrite")


def test_status_shows_whatever_state_and_progress_the_master_reports_per_node():
    """A per-node entry in the master's reply (a state such as rebuilding, with its
    progress) overrides the state derived from the leases and is shown as it comes."""
    from fusee import cli_status
    from fusee.config import ClusterConfig, MemNodeConfig
    config = ClusterConfig(memnodes=tuple(MemNodeConfig(i, f"ipc:///x/mn{i}") for i in range(2)))
    status = {"epoch": 3, "alive": {"0": 1.5}, "dead": [1], "failing": [], "clients": {"7": 4.0},
              "repairs": {}, "lost": None,
              "memnodes": {"1": {"state": "rebuilding", "progress": 0.4, "from": 0}}}
    info = {"pid": 1, "blocks": 10, "blocks_used": 2, "block_size": 1 << 20}
    nodes = [cli_status._node_view(config, i, status, info) for i in range(2)]
    assert nodes[0]["state"] == "alive" and nodes[0]["lease_left"] == 1.5
    assert nodes[1]["state"] == "rebuilding" and nodes[1]["progress"] == 0.4
    view = {"cluster": "c", "master": {"endpoint": "ipc:///x/m", "pid": 2}, "memnodes": nodes,
            "epoch": 3, "clients": status["clients"], "repairs": {}, "failing": [], "lost": None}
    table = cli_status.render(view)
    row = next(ln for ln in table.splitlines() if ln.startswith("1 "))
    assert "rebuilding" in row and "progress=0.4" in row and "from=0" in row
    assert "2 MiB (2/10 blocks)" in row and "clients: 1: 7 (4.0s left)" in table


def test_status_shows_a_rebuilds_progress_in_mib():
    """The master reports a rebuilding MN's progress in its phase as [bytes copied, bytes to
    copy]: shown in MiB, with the share done."""
    from fusee import cli_status
    from fusee.cli_status import MiB
    from fusee.config import ClusterConfig, MemNodeConfig
    config = ClusterConfig(memnodes=(MemNodeConfig(0, "ipc:///x/mn0"),))
    status = {"epoch": 1, "alive": {}, "dead": [0], "failing": [], "clients": {},
              "memnodes": {"0": {"state": "rebuilding", "phase": "copying online",
                                 "progress": [3 * MiB, 12 * MiB]}}}
    node = cli_status._node_view(config, 0, status, {"error": "unreachable"})
    view = {"cluster": "c", "master": {"endpoint": "ipc:///x/m", "pid": 2}, "memnodes": [node],
            "epoch": 1}
    row = next(ln for ln in cli_status.render(view).splitlines() if ln.startswith("0 "))
    assert "rebuilding" in row and "phase=copying online" in row
    assert "progress=3.0/12.0 MiB (25%)" in row


def test_status_shows_what_the_last_rebuild_cost_the_clients():
    """The master's record of its last rebuild: how long the clients were paused and what
    the pause copied (the groups written while the online copy ran)."""
    from fusee import cli_status
    record = {"node": 0, "epoch": 4, "finished_at": 0.0, "rebuild_s": 2.5,
              "copied_bytes": 160 * 2**20, "online_bytes": 150 * 2**20, "pause_s": 0.4,
              "paused_copy_s": 0.2, "pause_bytes": 10 * 2**20, "pause_groups": 3}
    view = {"cluster": "c", "master": {"endpoint": "ipc:///x/m", "pid": 2}, "memnodes": [],
            "epoch": 4, "clients": {}, "repairs": {}, "failing": [], "lost": None,
            "rebuilds": [{**record, "node": 1}, record]}
    last = cli_status.render(view).splitlines()[-1]
    assert last == ("last rebuild: MN 0 (epoch 4) in 2.50 s, 160.0 MiB copied, 150.0 MiB "
                    "online; clients paused 0.40 s, 0.20 s of it copying 10.0 MiB, 3 block "
                    "groups whole")
