"""benchmarks/with_build.sh: a figure is measured on the build it names (issue 12): the source
tree as it is, or a compiled copy of it, never whichever `fusee` an install points at."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "with_build.sh"
#: prints where fusee's fast path comes from, and the build the bench would record
PROBE = ("import fusee.operations as o; from fusee.bench.main import fast_path_build; "
         "print(o.__file__); print(fast_path_build())")


def _run(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    return subprocess.run(["bash", str(script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def test_source_runs_the_checkouts_files_from_any_folder(tmp_path):
    done = _run(SCRIPT, "source", sys.executable, "-c", PROBE, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    where, build = done.stdout.split()
    assert Path(where) == ROOT / "fusee" / "operations.py" and build == "Python"


def test_bad_arguments_and_a_shadowing_in_place_build_are_refused_in_one_line(tmp_path):
    for args in ([], ["source"], ["fast", "true"]):
        done = _run(SCRIPT, *args, cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.startswith("usage: benchmarks/with_build.sh")
    # a checkout compiled in place: its fusee/*.so would run instead of the sources
    (tmp_path / "benchmarks").mkdir()
    copy = shutil.copy(SCRIPT, tmp_path / "benchmarks")
    (tmp_path / "fusee").mkdir()
    (tmp_path / "fusee" / "operations.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    done = _run(Path(copy), "source", "true", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "compiled modules" in done.stderr and "rm " in done.stderr


@pytest.mark.soak
@pytest.mark.timeout(900)
def test_compiled_runs_a_compiled_copy_and_removes_it(tmp_path):
    pytest.importorskip("mypyc.build", reason="mypyc comes with mypy: pip install -e '.[lint]'")
    done = _run(SCRIPT, "compiled", sys.executable, "-c", PROBE, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    where, build = done.stdout.split()
    assert where.endswith(".so") and build == "compiled"
    assert not Path(where).exists()             # the temporary tree is gone
    assert not list((ROOT / "fusee").glob("*.so"))    # the checkout was not compiled in place
