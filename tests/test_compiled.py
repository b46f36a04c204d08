"""The fast path compiled with mypyc (setup.py) is the same algorithm as its source: which
modules are compiled, when, and (soak) the simulator, the crash sweep and the mutation tests
run against a checkout compiled in place."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _setup_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fusee_setup", ROOT / "setup.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)         # defines; setup() runs only as __main__
    return module


def test_the_fast_path_is_compiled_but_the_mutants_target_stays_python():
    """The mutation tests replace fusee.replication's functions where they were imported: a
    compiled caller looks up a function of a module outside its group at each call (the
    mutant runs), but one inside the group is bound when compiled (it would not)."""
    compiled = _setup_script().COMPILED
    fast_path = {"layout", "index", "search", "insert", "update", "operations", "driver",
                 "client", "batch", "owed_round_trip"}
    assert fast_path <= set(compiled)
    assert "replication" not in compiled
    assert all((ROOT / "fusee" / f"{name}.py").is_file() for name in compiled)


def test_no_compiled_generator_yields_inside_an_except_clause():
    """mypyc (2.4.1), a generator suspended at a yield inside an ``except`` clause and
    closed through a compiled ``yield from`` raises from ``close()`` the exception its clause
    handled, instead of finishing: Ctrl-C while a write waited for a failover came out of
    ``kv.put`` as the NodeTimeout it had handled (tests/test_interrupt.py, compiled), and a
    driver closing its operations stopped at the first. Every such wait runs after the
    clause instead (``except E as e: err = e``, then the yields)."""
    import ast
    offenders = []
    for name in _setup_script().COMPILED:
        path = ROOT / "fusee" / f"{name}.py"
        for handler in ast.walk(ast.parse(path.read_text())):
            if isinstance(handler, ast.ExceptHandler):
                offenders += [f"fusee/{name}.py:{node.lineno}" for node in ast.walk(handler)
                              if isinstance(node, (ast.Yield, ast.YieldFrom))]
    assert not offenders, f"a yield inside an except clause of a compiled module: {offenders}"


def test_only_a_build_compiles_and_never_an_editable_install():
    wanted = _setup_script().wanted
    assert wanted(["bdist_wheel"], {})
    assert wanted(["build_ext", "--inplace"], {})
    assert not wanted(["editable_wheel", "--dist-dir", "x"], {})     # pip install -e
    assert not wanted(["sdist"], {}) and not wanted(["egg_info"], {})
    assert not wanted(["bdist_wheel"], {"FUSEE_PURE_PYTHON": "1"})


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_the_simulator_and_the_mutants_run_against_the_compiled_fast_path(tmp_path):
    """Compile a copy of the checkout in place, check each compiled module is what imports,
    then run the simulator schedules, the crash sweep and the mutation tests there."""
    mypyc = pytest.importorskip("mypyc.build",
                                reason="mypyc comes with mypy: pip install -e '.[lint]'")
    assert mypyc
    tree = tmp_path / "src"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", "*.so", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache"))
    env = {k: v for k, v in os.environ.items() if k != "FUSEE_PURE_PYTHON"}
    env["PYTHONPATH"] = str(tree)
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree,
                   env=env, check=True, capture_output=True, timeout=1800)
    compiled = _setup_script().COMPILED
    where = subprocess.run(
        [sys.executable, "-c", "import importlib, sys\nfor n in sys.argv[1:]: "
         "print(importlib.import_module('fusee.' + n).__file__)", *compiled],
        cwd=tmp_path, env=env, check=True, capture_output=True, text=True, timeout=60)
    files = where.stdout.split()
    assert len(files) == len(compiled) and all(f.endswith(".so") for f in files), files
    said = subprocess.run([sys.executable, "-c", "from fusee.bench.main import fast_path_build; "
                           "print(fast_path_build())"], cwd=tmp_path, env=env, check=True,
                          capture_output=True, text=True, timeout=60)
    assert said.stdout.strip() == "compiled"
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
         "tests/test_simulation.py", "tests/test_crash_sweep.py", "tests/test_mutants.py",
         "tests/test_fast_path.py", "tests/test_pipeline_simulation.py"],
        cwd=tree, env=env, capture_output=True, text=True, timeout=3000)
    assert tests.returncode == 0, tests.stdout[-3000:]
