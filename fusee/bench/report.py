"""What a benchmark run tells a person: merged histograms, a summary table, JSON and plots.

Every client returns one encoded HdrHistogram per operation; ``merge_hdr`` adds them without
losing anything (the same buckets, the counts summed), so the percentiles of a phase are those
of all its operations, not an average of per-client percentiles. The JSON keeps the merged
histograms encoded, so a later tool can merge or re-plot them exactly.

A point run several times (``--repeat``) reports the median of its runs' throughputs, with
their spread (min, median, max: in the JSON, as a +-% in the table and as error bars in the
plot): one run can reverse a comparison that the spread shows to be noise. Its latencies are
those of all its runs' operations together.
"""

from __future__ import annotations

import json
import statistics
import textwrap
from pathlib import Path
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
from hdrh.histogram import HdrHistogram

from fusee.bench.runner import HDR_DIGITS, HDR_HIGHEST, HDR_LOWEST, Phase

if TYPE_CHECKING:
    from matplotlib.figure import Figure

OPS = ("search", "update", "insert", "delete")


def merge_hdr(encoded: Iterable[str | bytes]) -> HdrHistogram:
    h = HdrHistogram(HDR_LOWEST, HDR_HIGHEST, HDR_DIGITS)
    for e in encoded:
        h.decode_and_add(e)
    return h


def latency_stats(h: HdrHistogram) -> dict[str, Any]:
    """Count and microsecond percentiles of a nanosecond histogram."""
    n = h.get_total_count()
    if n == 0:
        return {"count": 0}

    def us(ns: float) -> float:
        return round(ns / 1000, 2)
    p50, p99, p999 = percentile_values(h, (50, 99, 99.9))
    return {"count": n, "mean_us": us(mean_value(h)), "p50_us": us(p50), "p99_us": us(p99),
            "p999_us": us(p999), "max_us": us(h.get_max_value())}


# hdrh answers a percentile or the mean by walking every one of a histogram's 21,504 buckets
# in Python, per question: a tiny bench run (270 histograms) spent most of its CPU there, 38 s
# of a 2-core machine. These read the counts once, as an array, and visit only nonzero buckets,
# with hdrh's own rules for which value of a bucket stands for it.
def _nonzero(h: HdrHistogram) -> tuple[list[int], list[int]]:
    """The indices of ``h``'s nonzero buckets and their counts."""
    counts = np.ctypeslib.as_array(h.counts)[:h.counts_len]
    nonzero = np.flatnonzero(counts)
    return nonzero.tolist(), counts[nonzero].tolist()


def percentile_values(h: HdrHistogram, percentiles: Iterable[float]) -> list[int]:
    """``h.get_value_at_percentile(p)`` for each p."""
    nonzero, counts = _nonzero(h)
    running = np.cumsum(counts)
    values = []
    for p in percentiles:
        k = int(np.searchsorted(running, h.get_target_count_at_percentile(p)))
        if k == len(nonzero):
            values.append(0)                    # an empty histogram
            continue
        v = h.get_value_from_index(nonzero[k])
        values.append(h.get_highest_equivalent_value(v) if p else
                      h.get_lowest_equivalent_value(v))
    return values


def mean_value(h: HdrHistogram) -> float:
    """``h.get_mean_value()``: each bucket counted at the middle of its range."""
    total: int = 0
    for i, c in zip(*_nonzero(h)):
        v = h.get_value_from_index(i)
        low = h.get_lowest_equivalent_value(v)
        total += c * (low + ((h.get_highest_equivalent_value(v) - low + 1) >> 1))
    count: int = h.get_total_count()
    return float(total) / count if count else 0.0


def aggregate(system: str, phase: Phase, raws: list[dict[str, Any]]) -> dict[str, Any]:
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


def floor(raws: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """A floor's row (``main.FLOOR``) from its runs' raw results: their latencies together."""
    h = merge_hdr(r["hdr"][name] for r in raws)
    return {"runs": len(raws), "count": h.get_total_count(), "latency_us": latency_stats(h),
            "hdr": h.encode().decode()}


def combine(system: str, phase: Phase, runs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """One result row from the raw results of every run of a point (``aggregate`` of each):
    the median throughput and seconds, the spread of the throughputs, and the histograms,
    errors and counters of all runs together."""
    rows = [aggregate(system, phase, raws) for raws in runs]
    row = aggregate(system, phase, [r for raws in runs for r in raws])
    tps = [r["throughput"] for r in rows]
    row["throughput"] = round(statistics.median(tps), 1)
    row["seconds"] = round(statistics.median(r["seconds"] for r in rows), 4)
    row["spread"] = {"runs": len(rows), "throughput": tps, "min": min(tps),
                     "median": row["throughput"], "max": max(tps)}
    return row


def spread_pct(row: dict[str, Any]) -> float | None:
    """Half the range of a point's throughputs, in % of their median (None: one run)."""
    s = row.get("spread")
    if not s or s["runs"] < 2 or not s["median"]:
        return None
    pct: float = 50 * (s["max"] - s["min"]) / s["median"]
    return pct


def conditions(doc: dict[str, Any]) -> str:
    """The run's conditions in one line: what a plot or a table must carry to be compared."""
    o, machine = doc["options"], doc.get("machine", {})
    cpus, build = machine.get("cpus"), machine.get("fast_path")
    return (f"{o['transport']}, {o['memnodes']} MNs, r={o['replicas']}, {o['keys']:,} keys, "
            f"{o['object_size']}-byte objects, {','.join(map(str, o['clients']))} clients, "
            f"depth {o['depth']}, {o.get('repeat', 1)} run(s) per point"
            + (f", {cpus} host cores" if cpus else "")
            + (f", client fast path {build}" if build else ""))


# -- table ---------------------------------------------------------------------------------------
def _rows(doc: dict[str, Any], suite: str) -> dict[tuple[str, int], dict[str, Any]]:
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for r in doc["results"]:
        if r["suite"] == suite:
            rows.setdefault((r["name"], r["clients"]), {})[r["system"]] = r
    return rows


def _fmt(x: float | None, width: int, digits: int = 1) -> str:
    return f"{x:>{width}.{digits}f}" if x is not None else " " * (width - 1) + "-"


def _pct(row: dict[str, Any]) -> str:
    """A row's spread as a 4-wide '+-' cell: '3%', or '-' after a single run."""
    pct = spread_pct(row)
    return f"{pct:>3.0f}%" if pct is not None else f"{'-':>4}"


def table(doc: dict[str, Any]) -> str:
    """The summary: per workload and client count, fusee's throughput, latency percentiles and
    round trips / verbs per op, then each baseline's throughput and fusee's ratio to it."""
    o, build = doc["options"], doc.get("machine", {}).get("fast_path")
    baselines = [s for s in doc["systems"] if s != "fusee"]
    out = []
    for suite, title in (("ycsb", "YCSB"), ("micro", "micro-benchmarks")):
        rows = _rows(doc, suite)
        if not rows:
            continue
        detail = (f"{o['keys']:,} keys, {o['distribution']} {o['theta']}"
                  if suite == "ycsb" else f"{o['micro_keys']:,} keys per client")
        runs = o.get("repeat", 1)
        out.append(f"\n{title}: {detail}, {o['object_size']}-byte objects, {o['transport']}, "
                   f"{o['memnodes']} MNs, r={o['replicas']}, depth {o['depth']}"
                   + (f", {o['duration']:g} s per point" if suite == "ycsb" else "")
                   + (f", client fast path {build}" if build else "")
                   + (f"; Kops/s: the median of {runs} runs, +-: half their range" if runs > 1
                      else ""))
        head = (f"{'':<9}{'':>3} | {'fusee':^64} |"
                + "".join(f" {b:^28} |" for b in baselines))
        sub = (f"{'workload' if suite == 'ycsb' else 'op':<9}{'cl':>3} | {'Kops/s':>8} "
               f"{'+-':>4} {'p50 us':>7} {'p99 us':>8} {'p999 us':>8} {'rt/op':>5} "
               f"{'verbs/op':>6} {'cpu us/op':>9} |"
               + "".join(f" {'Kops/s':>8} {'+-':>4} {'p50 us':>7} {'fusee':>6} |"
                         for _ in baselines))
        out += [head, sub, "-" * len(sub)]
        for (name, clients), by in rows.items():
            f = by.get("fusee")
            line = f"{name:<9}{clients:>3} | "
            if f:
                lat, per = f["latency_us"]["all"], f["per_op"]
                line += (f"{f['throughput'] / 1e3:>8.2f} {_pct(f)} {_fmt(lat.get('p50_us'), 7)} "
                         f"{_fmt(lat.get('p99_us'), 8)} {_fmt(lat.get('p999_us'), 8)} "
                         f"{_fmt(per.get('round_trips'), 5, 2)} {_fmt(per.get('verbs'), 8, 1)} "
                         f"{_fmt(per.get('cpu_us'), 9, 1)} |")
            else:
                line += f"{'-':>64} |"
            for b in baselines:
                r = by.get(b)
                if r is None:
                    why = ("skipped" if b in doc["skipped"] else
                           "failed" if b in doc.get("failed", {}) else "-")
                    line += f" {why:>28} |"
                    continue
                ratio = f"{f['throughput'] / r['throughput']:.2f}x" if f and r["throughput"] \
                    else "-"
                line += (f" {r['throughput'] / 1e3:>8.2f} {_pct(r)} "
                         f"{_fmt(r['latency_us']['all'].get('p50_us'), 7)} {ratio:>6} |")
            out.append(line)
    for name, why in doc["skipped"].items():
        out.append(f"\n{name}: skipped: {why}")
    for name, why in doc.get("failed", {}).items():
        out.append(f"\n{name}: FAILED (its rows stop there): {why.strip().splitlines()[-1]}")
    for name, row in doc.get("floors", {}).items():
        lat = row["latency_us"]
        out.append(f"floor {name}: raw pyzmq request/reply from a client process, "
                   f"{row['count']:,} of them in {row['runs']} run(s) after the SEARCH "
                   f"micro-benchmark: p50 {_fmt(lat.get('p50_us'), 0)} us, "
                   f"p99 {_fmt(lat.get('p99_us'), 0)} us")
    for load in doc["load"]:
        out.append(f"load {load['system']}: {load['keys']:,} keys in {load['seconds']:.1f} s "
                   f"({load['throughput'] / 1e3:.1f} Kops/s"
                   + (f", {cpu:.1f} us client CPU per insert)"
                      if (cpu := load.get("cpu_us_per_op")) is not None else ")"))
    return "\n".join(out).lstrip("\n") + "\n"


# -- files ---------------------------------------------------------------------------------------
def write_json(doc: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def subplots(*args: Any, **kwargs: Any) -> tuple[Figure, Any]:
    """matplotlib's ``subplots``, drawn off-screen (Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(*args, **kwargs)


def title(fig: Figure, text: str) -> None:
    """A figure's title, wrapped to its width (a clipped condition is a lost one)."""
    fig.suptitle(textwrap.fill(text, int(fig.get_figwidth() * 13)), fontsize="small")


def save(fig: Figure, path: Path) -> Path:
    """Write a figure made by ``subplots`` as a PNG and free it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_throughput(doc: dict[str, Any], path: Path) -> Path:
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
            points = sorted((r for r in doc["results"] if r["suite"] == suite and
                             r["name"] == name and r["system"] == system),
                            key=lambda r: r["clients"])
            if points:          # the median, and the spread of the runs as an error bar
                y = [r["throughput"] / 1e3 for r in points]
                spread = [r.get("spread") or {"min": r["throughput"], "max": r["throughput"]}
                          for r in points]
                yerr = [[v - s["min"] / 1e3 for v, s in zip(y, spread)],
                        [s["max"] / 1e3 - v for v, s in zip(y, spread)]]
                ax.errorbar([r["clients"] for r in points], y, yerr=yerr, marker="o",
                            capsize=3, label=system)
        ax.set_title(f"YCSB-{name}" if suite == "ycsb" else name.upper())
        ax.set_xlabel("clients")
        ax.set_xticks(sorted({r["clients"] for r in doc["results"]}))
        ax.set_ylabel("Kops/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    title(fig, f"throughput (median; bars: min-max of the runs): {conditions(doc)}")
    return save(fig, path)


def cdf_points(encoded: str) -> tuple[np.ndarray, np.ndarray]:
    """(latency in us, cumulative fraction) of a histogram, dense in the tail."""
    h = merge_hdr([encoded])
    q = np.concatenate([np.linspace(0, 90, 91), 100 - np.logspace(1, -3, 60)])
    return np.array(percentile_values(h, q.tolist())) / 1000, q / 100


def plot_latency_cdf(doc: dict[str, Any], path: Path) -> Path:
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
    title(fig, f"latency: {conditions(doc)}")
    return save(fig, path)


def write_all(doc: dict[str, Any], out: Path) -> list[Path]:
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
