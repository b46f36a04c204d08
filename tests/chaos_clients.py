"""The client processes of a chaos round (tests/chaos.py): each runs a seeded mix of single
operations, ``get_many``, ``put_many`` and pipelines on a few hot keys (and some fresh ones),
and logs every invocation before the call and every outcome after it as JSON lines;
``history`` reads a log back as the linearizability checker's ops (a call never answered, its
process killed, is CRASHED)."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from fusee.emulator.testkit.history import CRASHED, ERROR, OK, Op

KEYS = [b"k%d" % i for i in range(8)]
SINGLE = ["get"] * 3 + ["put"] * 3 + ["update"] * 2 + ["insert"] * 2 + ["delete"] * 2
BATCHES = ["get_many", "put_many", "pipeline"]
#: a client's rest between two operations (s): a few hundred a second each, so that a round's
#: history stays small enough to check (over shm, unpaced, a round made 400,000 operations)
#: and the clients leave the masters and MNs some of the host's cores
PACE = 0.003


# -- the client processes -----------------------------------------------------------------------

def worker(config_path: str, name: str, seed: int, out: str, err: str, progress, slot: int,
           stop, parent: int) -> None:
    """One client process: single and batched operations on ``KEYS`` until ``stop`` (or
    until process ``parent``, the harness, is gone); every invocation and outcome is a JSON
    line of ``out`` (written before / after the call), and anything it prints goes to
    ``err``."""
    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    os.dup2(fd, 1)
    from fusee.batch import BatchError
    from fusee.client import Client
    from fusee.errors import Fenced, KeyExists, KeyNotFound, LeaseExpired
    rng = random.Random(seed)
    fresh: list[bytes] = []

    def outcome(r) -> dict:
        if isinstance(r, (KeyExists, KeyNotFound)):
            return {"status": ERROR, "error": type(r).__name__}
        if isinstance(r, BaseException):
            return {"status": ERROR, "error": type(r).__name__, "unexpected": str(r)[:300]}
        return {"status": OK, "result": r.hex() if isinstance(r, bytes) else None}

    kv = Client.connect(config_path)
    with open(out, "w", buffering=1) as f:
        i = 0
        while not stop.is_set() and os.getppid() == parent:
            if rng.random() < 0.25:
                kind = rng.choice(BATCHES)
                keys = rng.sample(KEYS, rng.randint(2, 5))
                if kind == "get_many":
                    ops = [("get", k, None) for k in keys]
                elif kind == "put_many":
                    ops = [("put", k, b"%s-%d-%d" % (name.encode(), i, j))
                           for j, k in enumerate(keys)]
                else:
                    ops = []
                    for j, k in enumerate(keys):
                        sub = rng.choice(SINGLE)
                        ops.append((sub, k, None if sub in ("get", "delete")
                                    else b"%s-%d-%d" % (name.encode(), i, j)))
            else:
                kind = "single"
                sub, k = rng.choice(SINGLE), rng.choice(KEYS)
                if rng.random() < 0.1:          # fresh keys: allocation, index splits
                    sub, k = "insert", b"f-%s-%d" % (name.encode(), i)
                    fresh.append(k)
                elif fresh and rng.random() < 0.05:
                    sub, k = rng.choice(["delete", "get", "update"]), rng.choice(fresh)
                ops = [(sub, k, None if sub in ("get", "delete") else
                        b"%s-%d" % (name.encode(), i))]
            f.write(json.dumps({"i": i, "kind": kind, "t": time.monotonic_ns(),
                                "ops": [[o, k.hex(), v and v.hex()] for o, k, v in ops]}) + "\n")
            try:
                if kind == "single":
                    o, k, v = ops[0]
                    try:
                        results = [getattr(kv, o)(*((k,) if v is None else (k, v)))]
                    except Exception as e:      # noqa: BLE001 - recorded, judged later
                        results = [e]
                        if not isinstance(e, (KeyExists, KeyNotFound)):
                            print(f"{o}: {type(e).__name__}: {e}", flush=True)
                elif kind == "get_many":
                    try:
                        results = kv.get_many([k for _, k, _ in ops])
                    except BatchError as e:
                        results = e.results
                elif kind == "put_many":
                    try:
                        kv.put_many([(k, v) for _, k, v in ops])
                        results = [None] * len(ops)
                    except BatchError as e:
                        results = e.results
                else:
                    p = kv.pipeline()
                    for o, k, v in ops:
                        getattr(p, o)(*((k,) if v is None else (k, v)))
                    results = p.execute(raise_on_error=False)
            except Exception as e:              # noqa: BLE001 - the whole batch failed
                print(f"{kind}: {type(e).__name__}: {e}", flush=True)
                results = [e] * len(ops)
            f.write(json.dumps({"i": i, "t": time.monotonic_ns(),
                                "outcomes": [outcome(r) for r in results]}) + "\n")
            progress[slot] += 1
            i += 1
            time.sleep(PACE)
            if any(isinstance(r, (LeaseExpired, Fenced)) for r in results):
                print("the lease ran out: opening a new client, as the error says", flush=True)
                try:
                    kv.close()
                except Exception as e:          # noqa: BLE001 - it is gone either way
                    print(f"close: {type(e).__name__}: {e}", flush=True)
                kv = Client.connect(config_path)
    kv.close()


def history(name: str, path: Path) -> list[Op]:
    """The ops of one client process, batches split into one op per key (each with the
    batch's invocation and return). An op that never returned is CRASHED; one that failed
    with anything but KeyExists / KeyNotFound is ERROR with ``unexpected`` in its error."""
    calls: dict[int, list[Op]] = {}
    for line in path.read_text().splitlines() if path.exists() else ():
        try:
            rec = json.loads(line)
        except ValueError:
            continue                        # the half-written last line of a killed process
        if "ops" in rec:
            calls[rec["i"]] = [Op(0, name, o, bytes.fromhex(k), v and bytes.fromhex(v),
                                  2 * rec["t"], status=CRASHED) for o, k, v in rec["ops"]]
        else:
            for op, out in zip(calls[rec["i"]], rec["outcomes"]):
                op.ret, op.status, op.error = 2 * rec["t"] + 1, out["status"], out.get("error")
                op.result = out.get("result") and bytes.fromhex(out["result"])
                if "unexpected" in out:
                    op.error += f" ({out['unexpected']})"
    return [op for ops in calls.values() for op in ops]
