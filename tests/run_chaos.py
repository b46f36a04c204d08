"""Rounds of process-level chaos (tests/chaos.py), one seed each, and every finding.

    python3 tests/run_chaos.py --rounds 5 --seed 1 --steps 8 [--backend shm] [--kinds mn,client]

One ZooKeeper ensemble serves every round (each cluster has its own name on it). A round with
findings keeps its logs and histories under --out/seed-N (the others are removed); the exit
status is 1 if any round had one.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]

from chaos import COMBOS, KINDS, Round, run_round  # noqa: E402

from fusee.emulator.testkit import zk_ensemble  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1, help="the first round's seed")
    ap.add_argument("--steps", type=int, default=8, help="faults per round")
    ap.add_argument("--backend", default="zmq", choices=["zmq", "shm"])
    ap.add_argument("--memnodes", type=int, default=5)
    ap.add_argument("--masters", type=int, default=3)
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS + COMBOS), help="the faults to draw from")
    ap.add_argument("--out", default="/tmp/fusee-chaos")
    args = ap.parse_args()
    if (missing := zk_ensemble.missing()) is not None:
        print(f"run_chaos: error: no ZooKeeper here: {missing}", file=sys.stderr)
        return 2
    # a SIGTERM unwinds (the clusters and the ensemble stop) instead of orphaning them
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bad = 0
    with zk_ensemble.ZooKeeperEnsemble(3) as zk:
        for seed in range(args.seed, args.seed + args.rounds):
            where = Path(args.out) / f"seed-{seed}"
            r = Round(seed, args.steps, args.backend, args.memnodes, args.masters,
                      args.clients, tuple(args.kinds.split(",")))
            try:
                run_round(r, where, zk, keep=True)
            except Exception as e:              # noqa: BLE001 - the round could not start
                r.find(f"harness error: {type(e).__name__}: {str(e)[:500]}")
            print(f"seed {seed}: {r.seconds:.0f} s, {r.ops} ops, faults {' '.join(r.done)}: "
                  f"{len(r.findings)} findings", flush=True)
            for said, n in r.status_errors.items():
                print(f"  fusee status failed {n}/{r.statuses} times: {said}")
            for note in r.notes:
                print(f"  note: {note}")
            for f in r.findings:
                print("  " + f.replace("\n", "\n    "), flush=True)
            if r.findings:
                bad += 1
            else:
                shutil.rmtree(where, ignore_errors=True)
    print(f"{args.rounds} rounds, {bad} with findings")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
