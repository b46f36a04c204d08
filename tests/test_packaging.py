"""What `pip install fusee` and its sdist carry: numpy only with the benchmarks, the documents
the README links to, and the stated requirements."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.partition(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.partition(".")[0])
    return names


def test_numpy_is_a_dependency_of_the_benchmarks_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("numpy") for d in project["dependencies"])
    assert any(d.startswith("numpy") for d in project["optional-dependencies"]["bench"])
    # the benchmarks: fusee.bench, and the timing model that only `fusee bench model` runs
    bench = (ROOT / "fusee" / "bench", ROOT / "emulator" / "timing")
    sources = [p for package in ("fusee", "emulator", "transports")
               for p in (ROOT / package).rglob("*.py")
               if not any(b in p.parents for b in bench)]
    assert [p for p in sources if "numpy" in _imports(p)] == []
    assert [p for p in sources if "fusee.emulator.timing" in p.read_text()] == []


def test_the_readme_states_what_an_install_needs():
    readme = (ROOT / "README.md").read_text()
    assert "Python >= 3.11" in readme and "C compiler" in readme


def test_the_sdist_carries_docs_examples_and_benchmarks(tmp_path):
    tree = tmp_path / "src"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(
        ".git", "*.so", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache"))
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                    "build_meta.build_sdist(sys.argv[1])", str(tmp_path / "dist")],
                   cwd=tree, check=True, capture_output=True, timeout=300)
    (sdist,) = (tmp_path / "dist").glob("fusee-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.partition("/")[2] for n in tar.getnames()}
    for needed in ("docs/deploy.md", "docs/security.md", "docs/rdma.md",
                   "examples/cluster.toml", "examples/quickstart.py",
                   "benchmarks/reference.toml", "benchmarks/README.md", "LICENSE",
                   "emulator/_atomic.c", "fusee/py.typed"):
        assert needed in names, needed
    assert not any(n.endswith(".so") for n in names)


def _imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, by its full name (``from a import b`` counts as a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def test_the_product_imports_no_test_tooling():
    """emulator/testkit/ holds what proves the store correct (simulator, checker, fuzz
    targets...), apart from the product: a store, a memory node or a master that imported it
    would carry test code into production."""
    testkit = ROOT / "emulator" / "testkit"
    product = [p for package in ("fusee", "emulator", "transports")
               for p in (ROOT / package).rglob("*.py") if testkit not in p.parents]
    assert len(product) > 50
    assert [p for p in product
            if any(m.startswith("fusee.emulator.testkit") for m in _imported_modules(p))] == []


def test_fusee_installs_under_one_top_level_name():
    """emulator/ and transports/ install as fusee.emulator and fusee.transports (generic
    top-level names would clash with other projects in site-packages); every package folder
    of the tree is listed, and nothing imports the bare names any more."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool["package-dir"]
    assert dirs == {"fusee": "fusee", "fusee.emulator": "emulator",
                    "fusee.transports": "transports"}
    found = set()
    for name, folder in dirs.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((name, *rel)))
    assert set(tool["packages"]) == found
    assert all(p.split(".")[0] == "fusee" for p in tool["packages"])
    bare = [p for package in ("fusee", "emulator", "transports", "tests", "examples")
            for p in (ROOT / package).rglob("*.py")
            if _imports(p) & {"emulator", "transports"}]
    assert bare == []
