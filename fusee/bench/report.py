"""What a benchmark run tells a person: merged histograms, a summary table, JSON and plots.

Every client returns one encoded HdrHistogram per operation; ``merge_hdr`` adds them without
losing anything (the same buckets, the counts summed), so the percentiles of a phase are those
of all its operations, not an average of per-client percentiles. The JSON keeps the merged
histograms encoded, so a later tool can merge or re-plot them exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from hdrh.histogram import HdrHistogram

from fusee.bench.runner import HDR_DIGITS, HDR_HIGHEST, HDR_LOWEST, Phase

OPS = ("search", "update", "insert", "delete")


def merge_hdr(encoded) -> HdrHistogram:
    h = HdrHistogram(HDR_LOWEST, HDR_HIGHEST, HDR_DIGITS)
    for e in encoded:
        h.decode_and_add(e)
    return h


def latency_stats(h: HdrHistogram) -> dict:
    """Count and microsecond percentiles of a nanosecond histogram."""
    n = h.get_total_count()
    if n == 0:
        return {"count": 0}
    us = lambda ns: round(ns / 1000, 2)
    return {"count": n, "mean_us": us(h.get_mean_value()),
            "p50_us": us(h.get_value_at_percentile(50)),
            "p99_us": us(h.get_value_at_percentile(99)),
            "p999_us": us(h.get_value_at_percentile(99.9)),
            "max_us": us(h.get_max_value())}


def aggregate(system: str, phase: Phase, raws: list[dict]) -> dict:
    """One result row from the raw results of a phase's clients."""
    kinds = sorted({k for r in raws for k in r["hdr"]}, key=lambda k: OPS.index(k))
    hdr = {k: merge_hdr(r["hdr"][k] for r in raws if k in r["hdr"]) for k in kinds}
    errors: dict[str, int] = {}
    for r in raws:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    ops = sum(sum(r["ops"].values()) for r in raws) + sum(errors.values())
    if phase.suite == "ycsb":
        seconds = phase.duration
    else:
        seconds = (max(r["t1"] for r in raws) - min(r["t0"] for r in raws)) / 1e9
    counters: dict[str, int] = {}
    for r in raws:
        for k, v in r["counters"].items():
            counters[k] = counters.get(k, 0) + v
    everything = merge_hdr(r["hdr"][k] for r in raws for k in r["hdr"])
    return {
        "system": system, "suite": phase.suite, "name": phase.name, "clients": phase.clients,
        "depth": phase.depth, "seconds": round(seconds, 4), "ops": ops,
        "throughput": round(ops / seconds, 1) if seconds > 0 else 0.0,
        "errors": errors, "misses": sum(r["misses"] for r in raws),
        "per_op": {k: round(v / ops, 3) for k, v in counters.items()} if ops else {},
        "latency_us": {"all": latency_stats(everything),
                       **{k: latency_stats(h) for k, h in hdr.items()}},
        "hdr": {k: h.encode().decode() for k, h in hdr.items()},
    }


# -- table ---------------------------------------------------------------------------------------
def _rows(doc: dict, suite: str) -> dict:
    rows: dict = {}
    for r in doc["results"]:
        if r["suite"] == suite:
            rows.setdefault((r["name"], r["clients"]), {})[r["system"]] = r
    return rows


def _fmt(x, width: int, digits: int = 1) -> str:
    return f"{x:>{width}.{digits}f}" if x is not None else " " * (width - 1) + "-"


def table(doc: dict) -> str:
    """The summary: per workload and client count, fusee's throughput, latency percentiles and
    round trips / verbs per op, then each baseline's throughput and fusee's ratio to it."""
    o = doc["options"]
    baselines = [s for s in doc["systems"] if s != "fusee"]
    out = []
    for suite, title in (("ycsb", "YCSB"), ("micro", "micro-benchmarks")):
        rows = _rows(doc, suite)
        if not rows:
            continue
        detail = (f"{o['keys']:,} keys, {o['distribution']} {o['theta']}"
                  if suite == "ycsb" else f"{o['micro_keys']:,} keys per client")
        out.append(f"\n{title}: {detail}, {o['object_size']}-byte objects, {o['transport']}, "
                   f"{o['memnodes']} MNs, r={o['replicas']}, depth {o['depth']}"
                   + (f", {o['duration']:g} s per point" if suite == "ycsb" else ""))
        head = (f"{'':<9}{'':>3} | {'fusee':^46} |"
                + "".join(f" {b:^24} |" for b in baselines))
        sub = (f"{'workload' if suite == 'ycsb' else 'op':<9}{'cl':>3} | {'Kops/s':>8} "
               f"{'p50 us':>7} {'p99 us':>8} {'p999 us':>8} {'rt/op':>5} {'verbs/op':>6} "
               f"{'cpu us/op':>9} |"
               + "".join(f" {'Kops/s':>8} {'p50 us':>7} {'fusee':>6} |" for _ in baselines))
        out += [head, sub, "-" * len(sub)]
        for (name, clients), by in rows.items():
            f = by.get("fusee")
            line = f"{name:<9}{clients:>3} | "
            if f:
                lat, per = f["latency_us"]["all"], f["per_op"]
                line += (f"{f['throughput'] / 1e3:>8.2f} {_fmt(lat.get('p50_us'), 7)} "
                         f"{_fmt(lat.get('p99_us'), 8)} {_fmt(lat.get('p999_us'), 8)} "
                         f"{_fmt(per.get('round_trips'), 5, 2)} {_fmt(per.get('verbs'), 8, 1)} "
                         f"{_fmt(per.get('cpu_us'), 9, 1)} |")
            else:
                line += f"{'-':>56} |"
            for b in baselines:
                r = by.get(b)
                if r is None:
                    why = ("skipped" if b in doc["skipped"] else
                           "failed" if b in doc.get("failed", {}) else "-")
                    line += f" {why:>24} |"
                    continue
                ratio = f"{f['throughput'] / r['throughput']:.2f}x" if f and r["throughput"] \
                    else "-"
                line += (f" {r['throughput'] / 1e3:>8.2f} "
                         f"{_fmt(r['latency_us']['all'].get('p50_us'), 7)} {ratio:>6} |")
            out.append(line)
    for name, why in doc["skipped"].items():
        out.append(f"\n{name}: skipped: {why}")
    for name, why in doc.get("failed", {}).items():
        out.append(f"\n{name}: FAILED (its rows stop there): {why.strip().splitlines()[-1]}")
    for load in doc["load"]:
        out.append(f"load {load['system']}: {load['keys']:,} keys in {load['seconds']:.1f} s "
                   f"({load['throughput'] / 1e3:.1f} Kops/s"
                   + (f", {cpu:.1f} us client CPU per insert)"
                      if (cpu := load.get("cpu_us_per_op")) is not None else ")"))
    return "\n".join(out).lstrip("\n") + "\n"


# -- files ---------------------------------------------------------------------------------------
def write_json(doc: dict, path: Path) -> Path:
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def subplots(*args, **kwargs):
    """matplotlib's ``subplots``, drawn off-screen (Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kwargs)


def save(fig, path: Path) -> Path:
    """Write a figure made by ``subplots`` as a PNG and free it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_throughput(doc: dict, path: Path) -> Path:
    """Throughput against the number of clients, one panel per workload / operation."""
    panels = []
    for suite in ("ycsb", "micro"):
        for name in dict.fromkeys(r["name"] for r in doc["results"] if r["suite"] == suite):
            panels.append((suite, name))
    cols = min(4, max(1, len(panels)))
    rows = -(-len(panels) // cols)
    fig, axes = subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, (suite, name) in zip(axes.flat, panels):
        for system in doc["systems"]:
            pts = sorted((r["clients"], r["throughput"] / 1e3) for r in doc["results"]
                         if r["suite"] == suite and r["name"] == name and r["system"] == system)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=system)
        ax.set_title(f"YCSB-{name}" if suite == "ycsb" else name.upper())
        ax.set_xlabel("clients")
        ax.set_xticks(sorted({r["clients"] for r in doc["results"]}))
        ax.set_ylabel("Kops/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    return save(fig, path)


def cdf_points(encoded: str) -> tuple[np.ndarray, np.ndarray]:
    """(latency in us, cumulative fraction) of a histogram, dense in the tail."""
    h = merge_hdr([encoded])
    q = np.concatenate([np.linspace(0, 90, 91), 100 - np.logspace(1, -3, 60)])
    return (np.array([h.get_value_at_percentile(p) for p in q]) / 1000, q / 100)


def plot_latency_cdf(doc: dict, path: Path) -> Path:
    """Latency CDF per operation at the smallest client count, one line per system (micro
    phases when they ran; else the YCSB phases that issue that operation)."""
    fig, axes = subplots(1, len(OPS), figsize=(4 * len(OPS), 3.2), squeeze=False)
    for ax, op in zip(axes.flat, OPS):
        ax.set_title(op.upper())
        for system in doc["systems"]:
            cands = [r for r in doc["results"] if r["system"] == system and op in r["hdr"]]
            if not cands:
                continue
            best = min(cands, key=lambda r: (r["suite"] != "micro", r["clients"]))
            x, y = cdf_points(best["hdr"][op])
            ax.plot(x, y, label=f"{system} ({best['suite']} {best['name']}, "
                                f"{best['clients']} cl)")
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        ax.set_xscale("log")
        ax.set_xlabel("latency (us)")
        ax.set_ylabel("fraction of operations")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="x-small")
    return save(fig, path)


def write_all(doc: dict, out: Path) -> list[Path]:
    """results.json, table.txt and the two plots in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    command = f"$ {doc['command']}\n" if doc.get("command") else ""
    if doc.get("equivalent_command"):
        command += f"  (run {doc['run']!r}, the same as: {doc['equivalent_command']})\n"
    command += "\n" if command else ""
    (out / "table.txt").write_text(command + table(doc))
    return [write_json(doc, out / "results.json"), out / "table.txt",
            plot_throughput(doc, out / "throughput_vs_clients.png"),
            plot_latency_cdf(doc, out / "latency_cdf.png")]
