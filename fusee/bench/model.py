"""`fusee bench model`: the paper's testbed, or your cluster, in simulated time.

It runs the real fusee operations and the Clover-style baseline's on memory images in this
process, timed by a hardware profile (``fusee.emulator.timing``: network round trip, each memory
node's NIC with its message rate, bandwidth and atomic rate, the clients' CPU per step, the
metadata server's cores), and reports what the FUSEE paper plots: Fig. 11 (INSERT / UPDATE /
SEARCH / DELETE throughput against the number of clients), Fig. 13 (YCSB A-D), Fig. 19
(1-client UPDATE and SEARCH latency for r = 1..5) and Fig. 20 (throughput over time across a
memory-node crash; fusee only: the baseline survives no crash), with the paper's figures
beside ours and, for every point, the resource that saturates first.

``fusee bench model --memnodes 5 -r 3 --clients 256 --profile cx6-200g`` answers the same
question for your own cluster (with ``--clients``, only Fig. 11 and 13 run unless
``--figures`` says otherwise). A profile is a TOML file (``benchmarks/profiles``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import sys
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusee.emulator.timing.profile import Profile, ProfileError, load
from fusee.emulator.timing.runs import ModelRun, PhaseResult
from fusee.bench import report
from fusee.bench.runner import hdr_encode
from fusee.bench.ycsb import KEY_LENGTH, WORKLOADS
from fusee.errors import FuseeError

#: where a run says how it is getting on (a line at a time)
Say = Callable[[str], object]

MICRO_OPS = ("insert", "update", "search", "delete")
FIGURES = (11, 13, 19, 20)
MAX_MODEL_CLIENTS = 4096

#: The FUSEE paper's own figures (Shen et al., FAST '23), read off its plots, so approximate.
#: Its comparisons ran 2 memory nodes and up to 128 clients (16 compute nodes x 8) on
#: ConnectX-3 56 Gb/s; YCSB: 100,000 keys, Zipfian 0.99, 1 KB objects; micro-benchmarks:
#: 10,000 keys per client.
PAPER: dict[str, Any] = {
    # Mops at 128 clients, by panel: Fig. 11 (micro-benchmarks) and Fig. 13 (YCSB); the
    # paper's third system, pDPM-Direct, where its figure shows it. Panels the figures do not
    # give a value for here (YCSB-B, YCSB-D, DELETE) are left out rather than guessed.
    "mops_at_128": {
        "search": {"fusee": 9.3, "clover": 3.2, "pdpm-direct": 1.75},
        "insert": {"fusee": 2.1, "clover": 0.45, "pdpm-direct": 0.7},
        "update": {"fusee": 2.0, "clover": 0.65, "pdpm-direct": 0.65},
        "A": {"fusee": 3.45, "clover": 0.73},
        "C": {"fusee": 8.7, "clover": 4.3},
    },
    # Fig. 11 / 13: Clover is ahead below this many clients (its metadata server saturates
    # above)
    "crossover_clients": (30, 50),
    # single-client median latency (us), low and high of what the paper shows
    "latency_1_client_us": {"search": (5.0, 5.0), "insert": (8.0, 11.0),
                            "update": (11.0, 13.0)},
    # Fig. 19: 1-client median UPDATE latency (us) by replication factor (its end points);
    # SEARCH stays flat across r
    "fig19_update_us": {1: 10.0, 5: 23.0},
}
#: the profile of the paper's testbed: only a run on it is held against PAPER
PAPER_PROFILE = "cx3-56g"


@dataclass
class ModelOptions:
    profile: str = "cx3-56g"
    figures: list[int] = field(default_factory=lambda: list(FIGURES))
    systems: list[str] = field(default_factory=lambda: ["fusee", "clover"])
    # the paper's comparisons: 2 MNs, replicated on both (r = 2)
    memnodes: int = 2
    replication: int = 2
    clients: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128])
    micro_ops: list[str] = field(default_factory=lambda: list(MICRO_OPS))
    micro_keys: int = 0                 # per client; 0: 4096 per point, shared by its clients
    workloads: list[str] = field(default_factory=lambda: list(WORKLOADS))
    keys: int = 10_000
    object_size: int = 1024
    theta: float = 0.99
    warmup_us: float = 200.0
    duration_us: float = 1000.0
    warm: bool = True                   # YCSB clients start with warm caches
    latency_ops: int = 200
    crash_clients: int = 16
    crash_at_us: float = 2000.0
    crash_duration_us: float = 8000.0
    bucket_us: float = 250.0
    seed: int = 1

    def check(self) -> None:
        bad = [f for f in self.figures if f not in FIGURES]
        if bad:
            raise ValueError(f"unknown figure(s) {bad}; the model draws {list(FIGURES)}")
        for s in self.systems:
            if s not in ("fusee", "clover"):
                raise ValueError(f"unknown system {s!r}; the model runs fusee and clover")
        if not self.clients or min(self.clients) < 1 or max(self.clients) > MAX_MODEL_CLIENTS:
            raise ValueError(f"client counts must be 1..{MAX_MODEL_CLIENTS}")
        if self.memnodes < 1 or not 1 <= self.replication <= self.memnodes:
            raise ValueError(f"need memnodes >= 1 and 1 <= r <= memnodes "
                             f"(got {self.memnodes} MNs, r={self.replication})")
        if 20 in self.figures and self.replication < 2:
            raise ValueError("Fig. 20 (a memory node crash) needs r >= 2")
        if self.object_size <= KEY_LENGTH + 8:
            raise ValueError(f"object size must exceed {KEY_LENGTH + 8} bytes")
        if (self.keys < 2 or self.duration_us <= 0 or self.warmup_us < 0
                or self.micro_keys < 0):
            raise ValueError("need keys >= 2, micro keys >= 0, duration > 0, warmup >= 0")
        for op in self.micro_ops:
            if op not in MICRO_OPS:
                raise ValueError(f"unknown micro-benchmark {op!r}")
        for w in self.workloads:
            if w not in WORKLOADS:
                raise ValueError(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")

    def keys_per_client(self, clients: int) -> int:
        return self.micro_keys or max(8, 4096 // clients)


# -- rows in `fusee bench`'s shape, so its table and plots serve ----------------------------
def _row(r: PhaseResult, depth: int = 1) -> dict[str, Any]:
    everything = [x for v in r.latencies_us.values() for x in v]
    hdr = {k: hdr_encode(array("q", (int(x * 1000) for x in v)))
           for k, v in r.latencies_us.items()}
    lat = {"all": _stats(everything), **{k: _stats(v) for k, v in r.latencies_us.items()}}
    name, share = r.bottleneck
    return {"system": r.system, "suite": r.suite, "name": r.name, "clients": r.clients,
            "depth": depth, "seconds": r.seconds, "ops": r.ops,
            "throughput": round(r.throughput, 1), "errors": {"refused": r.refused},
            "misses": r.misses,
            "per_op": {"round_trips": round(r.round_trips / r.ops, 3) if r.ops else 0,
                       "verbs": round(r.verbs / r.ops, 3) if r.ops else 0},
            "latency_us": lat, "hdr": hdr, "saturates": {"resource": name,
                                                          "busy": round(share, 3)},
            "utilization": {k: round(v, 3) for k, v in r.utilization.items()}}


def _stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    v = sorted(values)

    def pick(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))], 2)
    return {"count": len(v), "mean_us": round(sum(v) / len(v), 2), "p50_us": pick(0.5),
            "p99_us": pick(0.99), "p999_us": pick(0.999), "max_us": round(v[-1], 2)}


# -- the figures ----------------------------------------------------------------------------
def run_throughput(o: ModelOptions, profile: Profile, doc: dict[str, Any],
                   say: Say) -> None:
    """Fig. 11 and 13: every system at every client count."""
    micro = 11 in o.figures and o.micro_ops
    ycsb = 13 in o.figures and o.workloads
    for system in o.systems:
        for n in o.clients:
            t0, cpu0 = time.monotonic(), time.process_time()
            count = o.keys_per_client(n)
            run = ModelRun(system, profile, memnodes=o.memnodes, replicas=o.replication,
                           clients=n, keys=o.keys, object_size=o.object_size, seed=o.seed,
                           extra_keys=n * count if micro else 0)
            if ycsb:
                if o.warm:
                    run.warm_caches()
                for i, w in enumerate(o.workloads):
                    r = run.ycsb(WORKLOADS[w], o.warmup_us, o.duration_us, keyspace=2 + i,
                                 theta=o.theta)
                    doc["results"].append(_row(r))
            if micro:
                for op in MICRO_OPS:            # each step needs the keys of the one before
                    r = run.micro(op, count)
                    if op in o.micro_ops:
                        doc["results"].append(_row(r))
            took, cpu = time.monotonic() - t0, time.process_time() - cpu0
            doc["point_seconds"].append({"system": system, "clients": n,
                                         "seconds": round(took, 1), "cpu_seconds": round(cpu, 1)})
            say(f"{system} x{n}: {took:.1f} s ({cpu:.1f} s of CPU)")


def run_latency(o: ModelOptions, profile: Profile, doc: dict[str, Any],
                   say: Say) -> None:
    """Fig. 19: one client's UPDATE and SEARCH latency for r = 1..5 on 5 memory nodes."""
    for system in o.systems:
        for r in range(1, 6):
            run = ModelRun(system, profile, memnodes=5, replicas=r, clients=1,
                           keys=min(o.keys, 1000), object_size=o.object_size, seed=o.seed,
                           extra_keys=o.latency_ops)
            point = {"system": system, "replicas": r}
            for op in ("insert", "update", "search"):
                res = run.micro(op, o.latency_ops)
                if op != "insert":
                    point[op] = _stats(res.latencies_us[op])
            doc["latency"].append(point)
        say(f"{system}: Fig. 19 done")


def run_crash(o: ModelOptions, profile: Profile, doc: dict[str, Any],
                   say: Say) -> None:
    """Fig. 20: YCSB-A throughput over time, memory node 0 crashing mid-run (fusee)."""
    run = ModelRun("fusee", profile, memnodes=o.memnodes, replicas=o.replication,
                   clients=o.crash_clients, keys=o.keys, object_size=o.object_size,
                   seed=o.seed)
    r = run.ycsb(WORKLOADS["A"], 0.0, o.crash_duration_us, theta=o.theta,
                 crash=(0, o.crash_at_us), bucket_us=o.bucket_us)
    doc["timeline"] = {"clients": o.crash_clients, "bucket_us": o.bucket_us,
                       "crash_at_us": o.crash_at_us, "failover_at_us": r.failovers,
                       "mops": [round(b / o.bucket_us, 3) for b in r.buckets]}
    say("fusee: Fig. 20 done")


# -- what it means ----------------------------------------------------------------------------
def _points(doc: dict[str, Any], system: str, suite: str, name: str) -> dict[int, float]:
    return {r["clients"]: r["throughput"] for r in doc["results"]
            if r["system"] == system and r["suite"] == suite and r["name"] == name}


def comparison(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per panel of Fig. 11 / 13: fusee and clover at the largest client count, fusee's
    speedup there and where fusee overtakes clover; at 128 clients also the paper's values
    and model/paper for each system's Mops and for the speedup."""
    out = []
    panels = dict.fromkeys((r["suite"], r["name"]) for r in doc["results"])
    for suite, name in panels:
        f, c = _points(doc, "fusee", suite, name), _points(doc, "clover", suite, name)
        if not f:
            continue
        top = max(f)
        row = {"figure": 11 if suite == "micro" else 13, "panel": name, "clients": top,
               "fusee_mops": round(f[top] / 1e6, 3),
               "clover_mops": round(c[top] / 1e6, 3) if top in c else None}
        row["fusee_saturates"] = _saturates(doc, "fusee", suite, name, top)
        if top in c and c[top] > 0:
            row["speedup"] = round(f[top] / c[top], 2)
            row["clover_saturates"] = _saturates(doc, "clover", suite, name, top)
        paper = (PAPER["mops_at_128"].get(name) if top == 128 and _on_paper_testbed(doc)
                 else None)
        if paper:
            row["paper"] = dict(paper)
            row["fusee_over_paper"] = round(row["fusee_mops"] / paper["fusee"], 2)
            if row["clover_mops"] is not None:
                row["clover_over_paper"] = round(row["clover_mops"] / paper["clover"], 2)
                row["paper_speedup"] = round(paper["fusee"] / paper["clover"], 2)
                if "speedup" in row:
                    row["speedup_over_paper"] = round(row["speedup"] / row["paper_speedup"],
                                                      2)
        row["overtakes_at"] = _overtake(f, c)
        out.append(row)
    return out


def _on_paper_testbed(doc: dict[str, Any]) -> bool:
    name: str = doc["profile"]["name"]
    return name == PAPER_PROFILE


def _saturates(doc: dict[str, Any], system: str, suite: str, name: str, clients: int) -> str:
    sat = next(r["saturates"] for r in doc["results"] if r["system"] == system
               and r["suite"] == suite and r["name"] == name and r["clients"] == clients)
    return f"{sat['resource']} ({sat['busy']:.0%})"


def one_client_latency(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """fusee's and clover's 1-client median latency per micro-benchmark, beside the
    paper's (its single-client medians; the only numbers the cx3-56g profile is fitted to)."""
    if not _on_paper_testbed(doc):
        return []
    out = []
    for op, (lo, hi) in PAPER["latency_1_client_us"].items():
        row = {"op": op, "paper_us": [lo, hi]}
        for system in ("fusee", "clover"):
            r = next((r for r in doc["results"] if r["system"] == system and r["clients"] == 1
                      and r["suite"] == "micro" and r["name"] == op), None)
            if r is not None:
                row[f"{system}_us"] = r["latency_us"][op]["p50_us"]
        if "fusee_us" in row:
            row["fusee_over_paper"] = round(row["fusee_us"] / ((lo + hi) / 2), 2)
            out.append(row)
    return out


def _overtake(f: dict[int, float], c: dict[int, float]) -> str:
    """From which client count on fusee stays ahead of clover: "always", "never",
    "N clients", or "-" (fewer than two client counts to tell)."""
    common = sorted(set(f) & set(c))
    if len(common) < 2:
        return "-"
    for n in common:
        if all(f[m] > c[m] for m in common if m >= n):
            return "always" if n == common[0] else f"{n} clients"
    return "never"


def model_table(doc: dict[str, Any]) -> str:
    lines = [f"profile {doc['profile']['name']}: {doc['profile']['description']}"]
    rows = doc["comparison"]
    if rows:
        lo, hi = PAPER["crossover_clients"]
        lines += ["", ("Fig. 11 / 13 at the largest client count, Mops; at 128 clients the "
                       "paper's figures beside ours (paper: Clover ahead below "
                       f"~{lo}-{hi} clients)"),
                  (f"{'fig':>3} {'panel':<7}{'cl':>5} | {'fusee':>6} {'paper':>6} {'ratio':>5} | "
                   f"{'clover':>6} {'paper':>6} {'ratio':>5} | {'speedup':>7} {'paper':>6} "
                   f"{'ratio':>5} | {'overtakes at':>12} | saturates first (fusee; clover)")]
        for r in rows:
            paper = r.get("paper", {})
            lines.append(
                f"{r['figure']:>3} {r['panel']:<7}{r['clients']:>5} | {r['fusee_mops']:>6.2f} "
                f"{_num(paper.get('fusee'), 6)} {_num(r.get('fusee_over_paper'), 5)} | "
                f"{_num(r.get('clover_mops'), 6)} {_num(paper.get('clover'), 6)} "
                f"{_num(r.get('clover_over_paper'), 5)} | {_num(r.get('speedup'), 7)} "
                f"{_num(r.get('paper_speedup'), 6)} {_num(r.get('speedup_over_paper'), 5)} | "
                f"{r['overtakes_at']:>12} | {r['fusee_saturates']}"
                + (f"; {r['clover_saturates']}" if r.get("clover_saturates") else ""))
    single = doc.get("one_client", [])
    if single:
        lines += ["", ("1 client, median latency (us): the paper's single-client values, "
                       "which the cx3-56g profile's CPU per step is fitted to"),
                  f"{'op':<7}| {'fusee':>6} {'paper':>7} {'ratio':>5} | {'clover':>6}"]
        for r in single:
            lo, hi = r["paper_us"]
            lines.append(f"{r['op']:<7}| {r['fusee_us']:>6.2f} {_range(lo, hi):>7} "
                         f"{r['fusee_over_paper']:>5.2f} | {_num(r.get('clover_us'), 6)}")
    if doc["latency"]:
        paper = PAPER["fig19_update_us"] if _on_paper_testbed(doc) else {}
        said = (f"; paper: UPDATE ~{paper[1]:g} at r = 1 to ~{paper[5]:g} at r = 5, SEARCH "
                "flat" if paper else "")
        lines += ["", f"Fig. 19: 1-client median latency on 5 MNs (us){said}",
                  f"{'system':<8}{'r':>3} | {'UPDATE':>8} {'paper':>6} {'SEARCH':>8}"]
        for p in doc["latency"]:
            theirs = paper.get(p["replicas"]) if p["system"] == "fusee" else None
            lines.append(f"{p['system']:<8}{p['replicas']:>3} | "
                         f"{p['update'].get('p50_us', 0):>8.2f} {_num(theirs, 6)} "
                         f"{p['search'].get('p50_us', 0):>8.2f}")
    t = doc.get("timeline")
    if t:
        mops = t["mops"]
        at = int(t["crash_at_us"] // t["bucket_us"])
        before = sum(mops[:at]) / max(1, at)
        low = min(mops[at:]) if mops[at:] else 0.0
        after = mops[-max(1, len(mops) // 4):]
        lines += ["", (f"Fig. 20: fusee YCSB-A, {t['clients']} clients, MN 0 crashes at "
                       f"{t['crash_at_us'] / 1000:g} ms, failover at "
                       f"{', '.join(f'{x / 1000:.2f}' for x in t['failover_at_us']) or '-'} ms: "
                       f"{before:.2f} Mops before, {low:.2f} at the lowest, "
                       f"{sum(after) / len(after):.2f} at the end")]
    return "\n".join(lines) + "\n"


def _num(x: float | None, width: int) -> str:
    return f"{x:>{width}.2f}" if x is not None else f"{'-':>{width}}"


def _range(lo: float, hi: float) -> str:
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def answers(doc: dict[str, Any]) -> str:
    """One line per point: how many Mops, and which resource saturates first."""
    lines = []
    for r in doc["results"]:
        what = f"YCSB-{r['name']}" if r["suite"] == "ycsb" else r["name"].upper()
        s = r["saturates"]
        lines.append(f"{r['system']:<7}{what:<8}{r['clients']:>5} clients: "
                     f"{r['throughput'] / 1e6:7.2f} Mops, p50 "
                     f"{r['latency_us']['all'].get('p50_us', 0):7.1f} us; busiest: "
                     f"{s['resource']} {s['busy']:.0%}")
    return "\n".join(lines) + "\n"


# -- files ------------------------------------------------------------------------------------
def plot_latency(doc: dict[str, Any], path: Path) -> Path:
    fig, axes = report.subplots(1, 2, figsize=(8, 3.2), squeeze=False)
    for ax, op in zip(axes.flat, ("update", "search")):
        for system in doc["options"]["systems"]:
            pts = [(p["replicas"], p[op].get("p50_us", 0)) for p in doc["latency"]
                   if p["system"] == system]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=system)
        if op == "update" and _on_paper_testbed(doc):
            paper = PAPER["fig19_update_us"]
            ax.plot(list(paper), list(paper.values()), "k*", label="fusee, paper")
        ax.set_title(f"{op.upper()} latency, 1 client (model)")
        ax.set_xlabel("replication factor r")
        ax.set_ylabel("median latency (us)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return report.save(fig, path)


def plot_timeline(doc: dict[str, Any], path: Path) -> Path:
    t = doc["timeline"]
    fig, axes = report.subplots(1, 1, figsize=(7, 3.2), squeeze=False)
    ax = axes[0][0]
    xs = [(i + 0.5) * t["bucket_us"] / 1000 for i in range(len(t["mops"]))]
    ax.plot(xs, t["mops"], marker=".", label="fusee YCSB-A")
    ax.axvline(t["crash_at_us"] / 1000, color="red", linestyle="--", label="MN 0 crashes")
    for x in t["failover_at_us"]:
        ax.axvline(x / 1000, color="green", linestyle=":", label="failover")
    ax.set_xlabel("simulated time (ms)")
    ax.set_ylabel("Mops")
    ax.set_title(f"Fig. 20 (model): {t['clients']} clients")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return report.save(fig, path)


def write_all(doc: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    text = f"$ {doc['command']}\n\n" + model_table(doc)
    if doc["results"]:
        text += report.table(doc) + "\n" + answers(doc)
    (out / "table.txt").write_text(text)
    files = [report.write_json(doc, out / "results.json"), out / "table.txt"]
    if doc["results"]:
        files += [report.plot_throughput(doc, out / "throughput_vs_clients.png"),
                  report.plot_latency_cdf(doc, out / "latency_cdf.png")]
    if doc["latency"]:
        files.append(plot_latency(doc, out / "fig19_latency.png"))
    if doc.get("timeline"):
        files.append(plot_timeline(doc, out / "fig20_crash.png"))
    return files


def run_model(o: ModelOptions, command: str = "", say: Say = lambda s: None
              ) -> dict[str, Any]:
    o.check()
    profile = load(o.profile)
    doc = {"fusee_bench_model": 1, "command": command,
           "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
           "profile": profile.as_dict(),
           "options": {**dataclasses.asdict(o), "replicas": o.replication,
                       "transport": f"model:{profile.name}", "depth": 1,
                       "distribution": "zipfian", "micro_keys": o.keys_per_client(max(o.clients)),
                       "duration": o.duration_us / 1e6},
           "systems": list(o.systems), "skipped": {}, "failed": {}, "paper": PAPER,
           "load": [], "results": [], "latency": [],
           "point_seconds": []}
    if 11 in o.figures or 13 in o.figures:
        run_throughput(o, profile, doc, say)
    if 19 in o.figures:
        run_latency(o, profile, doc, say)
    if 20 in o.figures:
        run_crash(o, profile, doc, say)
    doc["comparison"] = comparison(doc)
    doc["one_client"] = one_client_latency(doc)
    doc["finished"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return doc


# -- command line ------------------------------------------------------------------------------
def _csv(kind: Callable[[str], object] = str) -> Callable[[str], list[object]]:
    return lambda s: [kind(x) for x in s.split(",") if x]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fusee bench model", description=__doc__.split("\n\n")[0])
    d = ModelOptions()
    p.add_argument("--profile", help=f"hardware profile: a TOML file or a shipped name "
                                     f"(default: {d.profile}; also cx6-200g)")
    p.add_argument("--figures", type=_csv(int), help="which of 11,13,19,20 (default: all; "
                                                    "with --clients: 11,13)")
    p.add_argument("--systems", type=_csv(), help="default: fusee,clover")
    p.add_argument("--memnodes", type=int, help=f"memory nodes (default: {d.memnodes})")
    p.add_argument("-r", "--replication", type=int, help=f"r (default: {d.replication})")
    p.add_argument("--clients", type=_csv(int), help="client counts (default: 1,2,...,128)")
    p.add_argument("--workloads", type=_csv(), help="YCSB workloads (default: A,B,C,D)")
    p.add_argument("--micro-ops", type=_csv(), help="default: insert,update,search,delete")
    p.add_argument("--keys", type=int, help=f"YCSB keys loaded (default: {d.keys})")
    p.add_argument("--micro-keys", type=int,
                   help="micro-benchmark keys per client (default: 4096 / clients, >= 8)")
    p.add_argument("--object-size", type=int, help="key + value bytes (default: 1024)")
    p.add_argument("--theta", type=float, help="Zipfian constant (default: 0.99)")
    p.add_argument("--duration-us", type=float, help="simulated YCSB window (default: 1000)")
    p.add_argument("--warmup-us", type=float, help="simulated warm-up (default: 200)")
    p.add_argument("--cold", dest="warm", action="store_const", const=False,
                   help="YCSB clients start with empty caches (default: every loaded key "
                        "cached, as after the paper's seconds of load)")
    p.add_argument("--seed", type=int, help="default: 1")
    p.add_argument("--out", help="output folder (default: ./fusee-model-results)")
    return p


def options(args: argparse.Namespace) -> ModelOptions:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ModelOptions)
              if getattr(args, f.name, None) is not None}
    if args.clients is not None and args.figures is None:
        values["figures"] = [11, 13]
    return ModelOptions(**values)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    try:
        o = options(args)
        o.check()
        load(o.profile)
    except (ValueError, ProfileError) as e:
        print(f"fusee bench model: error: {e}", file=sys.stderr)
        return 2
    try:
        doc = run_model(o, "fusee bench model " + shlex.join(argv),
                        say=lambda s: print(s, file=sys.stderr, flush=True))
    except FuseeError as e:                     # the store itself failed in the model
        print(f"fusee bench model: the store failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    files = write_all(doc, Path(args.out or "fusee-model-results"))
    print(model_table(doc))
    if doc["results"]:
        print(answers(doc))
    print("wrote " + ", ".join(str(f) for f in files))
    return 0
