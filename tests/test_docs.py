"""The design in the repository and the references to it agree (issue 17).

The code cites the design as ``docs/design.md#<section>``; these tests fail when a citation
names a section that docs/design.md does not have (renamed or dropped), when a reference to
the old out-of-tree specification ("SPEC" and a section sign) comes back, and when the docs
name a module, test or page that is not in the tree, so the README's "where to read it"
table, docs/design.md and the tree cannot drift apart unnoticed.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
#: where code, tests and docs live (what a reader greps)
SCANNED = ("fusee", "transports", "emulator", "tests", "docs", "examples", "benchmarks",
           "README.md")
TEXT = {".py", ".md", ".toml", ".sh", ".c", ".txt", ".cfg"}

#: the out-of-tree specification's references, built so this file does not match itself
OLD_SPEC = re.compile("SPEC" + r"\s*\u00a7")
CITATION = re.compile(r"(?:docs/)?design\.md#([A-Za-z0-9_-]+)")
LOCAL_LINK = re.compile(r"\]\(#([A-Za-z0-9_-]+)\)")
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
TREE_PATH = re.compile(r"`((?:fusee|transports|emulator|tests|benchmarks|examples|docs)"
                       r"/[\w./-]*)`")


def text_files():
    for name in SCANNED:
        p = ROOT / name
        if p.is_file():
            yield p
            continue
        for f in sorted(p.rglob("*")):
            if f.is_file() and f.suffix in TEXT and "__pycache__" not in f.parts:
                yield f


def slug(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a Markdown document (repeated headings get -1, -2...)."""
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m and not in_code:
            base = slug(m.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def test_no_reference_to_the_old_spec_is_left():
    found = [f"{rel(f)}:{i}" for f in text_files()
             for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1)
             if OLD_SPEC.search(line)]
    assert not found, f"cite a section of docs/design.md instead: {found}"


def test_every_citation_of_the_design_names_a_section_it_has():
    have = anchors(DESIGN.read_text())
    cited: dict[str, list[str]] = {}
    for f in text_files():
        for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
            for a in CITATION.findall(line):
                cited.setdefault(a, []).append(f"{rel(f)}:{i}")
            if f == DESIGN:
                for a in LOCAL_LINK.findall(line):
                    cited.setdefault(a, []).append(f"{rel(f)}:{i}")
    missing = {a: where for a, where in cited.items() if a not in have}
    assert not missing, f"no such section in docs/design.md: {missing}"
    # the code does cite it: a scan that finds nothing would prove nothing
    assert any(w.endswith(".py") or ".py:" in w for ws in cited.values() for w in ws)


def test_the_docs_name_only_files_that_exist():
    pages = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    missing = []
    for page in pages:
        for i, line in enumerate(page.read_text().splitlines(), 1):
            for target in MD_LINK.findall(line):
                if "://" not in target and not (page.parent / target).exists():
                    missing.append(f"{rel(page)}:{i}: link {target}")
            for path in TREE_PATH.findall(line):
                if not (ROOT / path.rstrip("/.")).exists():
                    missing.append(f"{rel(page)}:{i}: {path}")
    assert not missing, missing


def test_the_readme_table_points_into_the_design():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## How it works (and where to read it)", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("|") and "---" not in r][1:]
    assert rows and all(CITATION.search(r) for r in rows), \
        "every row of the README's 'where to read it' table links to its design section"


def test_every_module_has_a_home_in_the_subsystem_table():
    """A newcomer finds every room: each module of the product and its tooling is named in
    docs/index.md's subsystem table, by its path or by a folder that holds it, so a module
    added or moved without a place in the docs fails here."""
    index = (ROOT / "docs" / "index.md").read_text()
    table = index.split("## Subsystems", 1)[1]
    named = set(TREE_PATH.findall(table))
    modules = [rel(f) for top in ("fusee", "transports", "emulator")
               for f in sorted((ROOT / top).rglob("*.py"))
               if f.name != "__init__.py" and "__pycache__" not in f.parts]
    assert modules
    homeless = [m for m in modules
                if m not in named and not any(n.endswith("/") and m.startswith(n) for n in named)]
    assert not homeless, f"name these in docs/index.md's subsystem table: {homeless}"


def test_slugs_follow_the_renderers():
    assert slug("SNAPSHOT rule 2") == "snapshot-rule-2"
    assert slug("The four operations") == "the-four-operations"
    assert slug("KV objects") == "kv-objects"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_the_tree_names_every_module_of_a_folder_it_lists_by_file():
    """docs/design.md's tree: a folder whose row names its modules file by file names every
    one of them (and each of its subfolders), so a module added there is not missing from
    the map (``fusee/master/identity.py`` was)."""
    design = DESIGN.read_text()
    tree = design.split("### The tree", 1)[1].split("\n### ", 1)[0]
    checked = []
    for row in tree.splitlines():
        cells = row.split("|")
        if len(cells) < 3 or not (m := re.fullmatch(r"\s*`([\w/]+/)`\s*", cells[1])):
            continue
        folder, named = ROOT / m.group(1), set(re.findall(r"`([\w.]+(?:\.py|/))`", cells[2]))
        if not any(n.endswith(".py") for n in named):
            continue            # a row that tells its folder in words (fusee/, tests/)
        have = {f.name for f in folder.glob("*.py") if f.name != "__init__.py"} | {
            f"{d.name}/" for d in folder.iterdir()
            if d.is_dir() and (d / "__init__.py").exists() and (m.group(1) + d.name + "/")
            not in tree}
        assert have <= named, f"name these in the row of {m.group(1)}: {sorted(have - named)}"
        checked.append(m.group(1))
    assert {"fusee/master/", "emulator/", "transports/"} <= set(checked), checked
