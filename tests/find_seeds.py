"""Find simulator seeds whose runs reach a regression's window (tests/regression_windows.py).

After a change of verb counts a pinned seed may report "seed N no longer reaches its window:
find another". This runs the regression's run class over a range of seeds, on the shape of its
cases (or the one given), and prints each seed that reaches the window, with its witness;
a seed whose run fails the checks is printed too (a bug: the window may be what it needs).

    python3 tests/find_seeds.py r1-claim-cut-short --start 0 --count 400 --want 3
    python3 tests/find_seeds.py --list

Run from the repository root (PYTHONPATH at the tree under test). docs/testing.md says more.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from regression_windows import REGRESSIONS  # noqa: E402 (after the path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", nargs="?", help="the regression (--list names them)")
    p.add_argument("--list", action="store_true", help="list the regressions and windows")
    p.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--count", type=int, default=200, help="seeds to try (default 200)")
    p.add_argument("--want", type=int, default=3, help="stop after this many (default 3)")
    p.add_argument("--nodes", type=int, help="MNs (default: each case's shape)")
    p.add_argument("--r", type=int, help="replication factor (with --nodes)")
    p.add_argument("--crash", choices=("yes", "no"), help="a client crash (default: the "
                   "cases')")
    a = p.parse_args(argv)
    if a.list or a.name is None:
        for reg in REGRESSIONS.values():
            cases = ", ".join(f"{s} ({n} MNs r = {r}{', crash' if c else ''})"
                              for s, n, r, c in reg.cases)
            print(f"{reg.name}: {cases}\n    {reg.window.what}")
        return 0
    if a.name not in REGRESSIONS:
        print(f"no regression {a.name!r}: --list names them", file=sys.stderr)
        return 2
    reg = REGRESSIONS[a.name]
    shapes = sorted({(n, r, c) for _, n, r, c in reg.cases})
    if a.nodes is not None:
        if a.r is None:
            print("--nodes needs --r", file=sys.stderr)
            return 2
        shapes = [(a.nodes, a.r, c) for c in sorted({c for *_, c in shapes}) or (False, True)]
    if not shapes:
        print(f"{a.name} has no case left: give the shape (--nodes, --r)", file=sys.stderr)
        return 2
    if a.crash is not None:
        shapes = sorted({(n, r, a.crash == "yes") for n, r, _ in shapes})
    found = 0
    for seed in range(a.start, a.start + a.count):
        for nodes, r, crash in shapes:
            witness, failure = reg.probe(seed, nodes, r, crash)
            case = f"({seed}, {nodes}, {r}, {crash})"
            if failure is not None:
                print(f"{case} FAILS the checks ({'in' if witness else 'outside'} the "
                      f"window): {failure}", flush=True)
            if witness is not None:
                print(f"{case} reaches it: {witness}", flush=True)
                found += 1
                if found >= a.want:
                    return 0
    print(f"{found} of {a.want} found in seeds {a.start}..{a.start + a.count - 1}")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
