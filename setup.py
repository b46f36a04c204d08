"""Build hook: the client's hot modules compiled with mypyc, from the same source (issue 12).

pyproject.toml holds the whole declarative configuration (and ``fusee.emulator._atomic``);
this file only adds the extension modules mypyc makes of ``COMPILED``: an operation's CPU is
the Python interpretation of its generators, and the compiled modules run the very same code
(they are type-checked by ``mypy --strict`` in CI already, which is what mypyc needs).

Left as Python, on purpose:

- ``fusee.replication`` (the rules of SNAPSHOT; the verbs of its rounds are ``fusee.snapshot``,
  compiled): the mutation tests (``tests/test_mutants.py``) break SNAPSHOT by
  replacing its functions in the modules that imported them. A compiled caller looks a
  function of a module outside the compiled group up in its module's namespace at each call,
  so the mutants reach compiled callers; a call inside the group would be bound at compile
  time and a mutant would silently not run.
- everything off the fast path (recovery, failover, the master, the bench, the CLI).

Pure Python instead (same behaviour, slower) when mypyc is not importable, when
``FUSEE_PURE_PYTHON=1``, and for an editable install: there the source files ARE the code that
runs, so an edit takes effect without a rebuild (a compiled module next to its source would
shadow it). Only a build compiles (a wheel, ``build_ext``): an sdist or pip's metadata step
does not run mypyc for nothing.

``python3 setup.py build_ext --inplace`` compiles a checkout in place (the soak test
``tests/test_compiled.py`` runs the simulator and the mutation tests that way); delete
``fusee/*.so`` and ``fusee__mypyc*.so`` to run the source again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

#: the fast path: every module an operation's generators run through, and their leaves
COMPILED = ("layout", "hashing", "index", "verbs", "verdicts", "driver", "cache", "reuse",
            "log", "holdings", "allocation", "op_core", "search", "insert", "update",
            "owed_round_trip", "operations", "client", "lease_guard", "batch", "snapshot")
#: where mypy finds the package as installed (fusee/emulator -> emulator/; see .ci/lint)
TREE = Path("build/mypyc-tree")


#: the setuptools commands that build extension modules for a wheel or an install
BUILDS = {"bdist_wheel", "build", "build_ext", "install"}
#: the commands of an editable install (PEP 660's, and the legacy one)
EDITABLE = {"editable_wheel", "develop"}


def wanted(commands: list[str], environ: dict[str, str]) -> bool:
    """Whether the setuptools ``commands`` asked for should compile the fast path."""
    if environ.get("FUSEE_PURE_PYTHON") == "1" or EDITABLE & set(commands):
        return False
    return bool(BUILDS & set(commands))


def _package_tree() -> Path:
    """A tree of symbolic links shaped as the installed package, so that mypy maps
    ``fusee.emulator`` and ``fusee.transports`` (package-dir in pyproject.toml)."""
    root = Path(__file__).resolve().parent
    package = TREE / "fusee"
    package.mkdir(parents=True, exist_ok=True)
    for source in [*(root / "fusee").iterdir(), root / "emulator", root / "transports"]:
        link = package / source.name
        if source.name == "__pycache__" or link.is_symlink():
            continue
        link.symlink_to(source)
    return package


def compiled_extensions() -> list:  # list[Extension]: mypyc's own annotation
    if not wanted(sys.argv[1:], dict(os.environ)):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("fusee: mypyc is not available; the fast path stays pure Python", file=sys.stderr)
        return []
    package = _package_tree()
    return mypycify([f"--config-file={Path('pyproject.toml').resolve()}",
                     *(str(package / f"{name}.py") for name in COMPILED)],
                    opt_level="3", group_name="fusee")


if __name__ == "__main__":         # (setuptools runs this file as __main__; tests import it)
    setup(ext_modules=compiled_extensions())
