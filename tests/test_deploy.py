"""docs/deploy.md, run as written: one network namespace per host, joined by veth pairs to a
bridge in a namespace of its own, and exactly the commands the page shows, so the walkthrough
cannot drift from what works.

The page's host table gives each namespace its address; each ```sh block starting with
``# on HOST`` runs in that host's namespace and folder (``(runs until stopped)``: a server,
started in the background until the test ends); each ```text block ``# files for HOST`` is
copied from the admin folder. ``fusee`` on the PATH runs this checkout's code. Nothing is
added to the machine's own network namespace.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from processes import wait_for

import fusee

DOC = Path(__file__).resolve().parent.parent / "docs" / "deploy.md"
BLOCK = re.compile(r"```(sh|text)\n# (on|files for) (\w+)( \(runs until stopped\))?\n(.*?)```",
                   re.DOTALL)
HOST_ROW = re.compile(r"^\| (\w+) \| (10\.\d+\.\d+\.\d+) \|$", re.MULTILINE)
START_TIMEOUT = 60


def doc_steps() -> tuple[dict[str, str], list[tuple[str, str, bool, str]]]:
    """(host -> address, [(kind, host, is_server, body)] in the page's order)."""
    text = DOC.read_text()
    hosts = dict(HOST_ROW.findall(text))
    steps = [(kind, host, bool(server), body) for _, kind, host, server, body
             in BLOCK.findall(text)]
    return hosts, steps


def test_the_page_has_what_the_walkthrough_needs():
    hosts, steps = doc_steps()
    assert set(hosts) == {"mn0", "mn1", "mn2", "master", "app1", "app2"}
    servers = [h for kind, h, server, _ in steps if server]
    assert servers == ["mn0", "mn1", "mn2", "master"]
    assert {h for kind, h, _, _ in steps if kind == "files for"} == set(hosts)
    text = DOC.read_text()
    for server, body in ((h, b) for kind, h, s, b in steps if s):
        # the systemd units run the same commands as the walkthrough
        command = body.strip().replace("--id 1", "--id 0").replace("--id 2", "--id 0")
        assert f"ExecStart=/usr/local/bin/{command}\n" in text, server


def _skip_reason() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the `ip` tool (iproute2) to create network namespaces"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Hosts:
    """One network namespace per host on a bridge; removed on exit."""

    def __init__(self, addresses: dict[str, str]):
        self.addresses = addresses
        self.tag = f"fz{os.getpid() % 100000}"
        self.switch = f"{self.tag}-sw"
        self.created: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def __enter__(self) -> Hosts:
        try:
            self._add(self.switch)
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for host, address in self.addresses.items():
                ns, port = self.ns(host), f"v-{host}"
                self._add(ns)
                _ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name",
                    "eth0", "netns", ns)
                _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _add(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.created.append(ns)

    def __exit__(self, *exc) -> None:
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30,
                           check=False)
        self.created.clear()


def _fusee_on_path(tmp: Path) -> dict:
    """An environment whose ``fusee`` runs this checkout (not whatever is installed)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    launcher = bin_dir / "fusee"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m fusee.cli "$@"\n')
    launcher.chmod(0o755)
    root = str(Path(fusee.__file__).resolve().parent.parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEE_")}
    return {**env, "PATH": f"{bin_dir}:{env['PATH']}",
            "PYTHONPATH": os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))}


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy2(src, dst)


def _wait_serving(proc: subprocess.Popen, log: Path, host: str) -> None:
    def serving() -> bool:
        assert proc.poll() is None, f"{host} exited: {log.read_text()}"
        return " serving " in log.read_text()

    wait_for(serving, lambda: f"{host} to serve: {log.read_text()}", START_TIMEOUT)


def _stop(servers: list[subprocess.Popen]) -> None:
    for proc in servers:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in servers:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)


def test_the_multi_host_walkthrough_runs_as_written(tmp_path):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    addresses, steps = doc_steps()
    env = _fusee_on_path(tmp_path)
    folders = {h: tmp_path / h for h in ["admin", *addresses]}
    for folder in folders.values():
        folder.mkdir(mode=0o700)
    servers: list[subprocess.Popen] = []
    outputs: dict[str, str] = {}
    with Hosts(addresses) as hosts:
        try:
            for kind, host, is_server, body in steps:
                if kind == "files for":
                    for name in body.split():
                        _copy(folders["admin"] / name, folders[host] / name)
                    continue
                netns = [] if host == "admin" else ["ip", "netns", "exec", hosts.ns(host)]
                command = [*netns, "bash", "-e", "-c", body]
                if is_server:
                    log = tmp_path / f"{host}.log"
                    with open(log, "wb") as out:
                        servers.append(subprocess.Popen(
                            command, cwd=folders[host], env=env, stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True))
                    _wait_serving(servers[-1], log, host)
                    continue
                done = subprocess.run(command, cwd=folders[host], env=env, capture_output=True,
                                      text=True, timeout=120, check=False)
                assert done.returncode == 0, f"on {host}:\n{body}\n{done.stdout}{done.stderr}"
                outputs[host] = done.stdout
        finally:
            _stop(servers)
    assert outputs["app2"] == "world\n"
    status = outputs["app1"]
    assert "epoch 0" in status and status.count(" alive ") == 3, status
    for name in ("mn0", "mn1", "mn2", "master"):
        assert "Traceback" not in (tmp_path / f"{name}.log").read_text()
