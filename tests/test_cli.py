"""The `fusee` command line against a running cluster, as a person would use it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from emulator.cluster import LocalCluster


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
