"""`fusee status`: how the cluster stands, from the master and from the memory nodes themselves.

The master knows membership, leases and failovers; only the memory nodes know how much of
their memory is handed out. So the view asks both, at once and each within the config's
timeout, and still says something useful when there is no master (or it is down): what each
memory node answers. Whatever per-node keys the master reports (a state such as joining or
rebuilding, its progress) are shown as they come, so the view needs no change when the
master learns a new state. A memory node whose region header is not this cluster's
(``fusee.cluster_identity``: another cluster's at its endpoint, another layout or id) shows as
"wrong memory node", with why.
"""

from __future__ import annotations

from typing import Any

from fusee.config import ClusterConfig

MiB = 1 << 20

#: master status keys that the table already shows in its own columns
_SHOWN = {"id", "endpoint", "state", "lease_left", "blocks", "blocks_used", "block_size",
          "used_bytes", "pid", "error"}


def gather(config: ClusterConfig) -> dict[str, Any]:
    """The cluster as the master and the memory nodes describe it (JSON-able)."""
    master = _master_view(config)
    infos = _memnode_infos(config)
    wrong = _wrong_memnodes(config, [m for m, info in infos.items() if "error" not in info])
    nodes = [_node_view(config, m.id, master.get("status"), infos[m.id], wrong.get(m.id))
             for m in config.memnodes]
    view: dict[str, Any] = {
        "cluster": config.name, "master": {k: v for k, v in master.items() if k != "status"},
        "memnodes": nodes}
    status = master.get("status")
    if status is not None:
        view["epoch"] = status.get("epoch")
        view["clients"] = status.get("clients", {})
        view["repairs"] = status.get("repairs", {})
        view["failing"] = status.get("failing", [])
        view["lost"] = status.get("lost")
        view["rebuilds"] = status.get("rebuilds", [])
    return view


def reachable(view: dict[str, Any]) -> bool:
    """Did anyone answer: the master, or at least one memory node?"""
    return "error" not in view["master"] or any("error" not in n for n in view["memnodes"])


def _master_view(config: ClusterConfig) -> dict[str, Any]:
    if not config.master:
        return {"endpoint": None, "error": "no master in the config"}
    from fusee.errors import MasterError
    from fusee.master.link import MasterLink
    try:
        with MasterLink(config) as link:
            status = link.status()
    except MasterError as e:
        return {"endpoint": config.master, "error": str(e).removeprefix("master: ")}
    return {"endpoint": config.master, "pid": status.get("pid"), "status": status}


def _memnode_infos(config: ClusterConfig) -> dict[int, dict[str, Any]]:
    from fusee.errors import TransportError
    from fusee.transports.channel import Channels
    channels = Channels(config)
    try:
        replies = channels.call_all([m.id for m in config.memnodes], "info", config.timeout)
    finally:
        channels.close()
    return {m: (r if not isinstance(r, TransportError) else {"error": str(r)})
            for m, r in replies.items()}


def _wrong_memnodes(config: ClusterConfig, answering: list[int]) -> dict[int, str]:
    """{node: why it is not this cluster's} among the MNs ``answering``, from their region
    headers (one READ each, over the zmq backend, which every MN serves; {} if that fails:
    the rest of the view still stands)."""
    from fusee.cluster_identity import mismatch, read_headers, reached
    from fusee.driver import run
    from fusee.errors import FuseeError
    from fusee.transports import connect
    if not answering:
        return {}
    try:
        with connect(config, "zmq", dead={m.id for m in config.memnodes} - set(answering)) as t:
            headers = run(read_headers(reached(t)), t)
    except FuseeError:
        return {}
    return {n: str(wrong) for n, header in headers.items()
            if (wrong := mismatch(config, n, header)) is not None}


def _node_view(config: ClusterConfig, node: int, status: dict[str, Any] | None,
               info: dict[str, Any], wrong: str | None = None) -> dict[str, Any]:
    view = _node_state(config, node, status, info)
    if wrong is not None:       # whatever the master says: that endpoint serves no MN of ours
        view.update(state="wrong memory node", error=wrong)
    return view


def _node_state(config: ClusterConfig, node: int, status: dict[str, Any] | None,
                info: dict[str, Any]) -> dict[str, Any]:
    view: dict[str, Any] = {"id": node, "endpoint": config.node(node).endpoint}
    if "error" in info:
        view["error"] = info["error"]
    else:
        view.update(pid=info.get("pid"), blocks=info.get("blocks"),
                    blocks_used=info.get("blocks_used"), block_size=info.get("block_size"))
        if None not in (view["blocks_used"], view["block_size"]):
            view["used_bytes"] = view["blocks_used"] * view["block_size"]
    if status is None:
        view["state"] = "up" if "error" not in info else "unreachable"
        return view
    key = str(node)
    if node in status.get("dead", []):
        view["state"] = "dead"
    elif node in status.get("failing", []):
        view["state"] = "failing over"
    else:
        view["state"] = "alive"
    if key in status.get("alive", {}):
        view["lease_left"] = status["alive"][key]
    reported = status.get("memnodes")
    entry = reported.get(key) if isinstance(reported, dict) else None
    if isinstance(entry, dict):
        view.update({k: v for k, v in entry.items() if k not in ("id", "endpoint")})
    return view


def render(view: dict[str, Any]) -> str:
    """The view as a table for a person."""
    master = view["master"]
    if "error" in master:
        head = f"master: {master['endpoint'] or '-'}: {master['error']}"
    else:
        head = (f"master: {master['endpoint']} (pid {master.get('pid')}), "
                f"epoch {view.get('epoch')}")
    lines = [f"cluster {view['cluster']}", head, ""]
    rows = [("MN", "ENDPOINT", "STATE", "LEASE", "MEMORY USED", "")]
    for n in view["memnodes"]:
        lease = f"{n['lease_left']:.1f}s" if isinstance(n.get("lease_left"), (int, float)) \
            else "-"
        if "used_bytes" in n and n.get("blocks"):
            memory = (f"{n['used_bytes'] / MiB:.0f} MiB ({n['blocks_used']}/{n['blocks']} "
                      "blocks)")
        else:
            memory = "-"
        extra = ", ".join(f"{k}={_value(k, v)}" for k, v in n.items() if k not in _SHOWN)
        if "error" in n:
            extra = (extra + ", " if extra else "") + n["error"]
        rows.append((str(n["id"]), n["endpoint"], n.get("state", "?"), lease, memory, extra))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5] for r in rows]
    lines = [ln.rstrip() for ln in lines]
    if "clients" in view:
        clients = view["clients"]
        leases = ", ".join(f"{c} ({left:.1f}s left)" for c, left in clients.items())
        lines += ["", f"clients: {len(clients)}" + (f": {leases}" if leases else "")]
        if view.get("repairs"):
            lines.append(f"client recoveries pending: {', '.join(view['repairs'])}")
        if view.get("failing"):
            lines.append(f"failovers pending: memory nodes {view['failing']}")
        if view.get("lost"):
            lines.append(f"DATA LOST: {view['lost']}")
    if view.get("rebuilds"):
        lines.append(_rebuild_line(view["rebuilds"][-1]))
    return "\n".join(lines)


def _value(key: str, value: Any) -> str:
    """A per-node value as a person reads it: a rebuild's progress, [bytes copied, bytes to
    copy] in its phase, in MiB and percent; anything else as it comes."""
    if (key == "progress" and isinstance(value, list) and len(value) == 2
            and all(isinstance(x, int) for x in value)):
        done, total = value
        percent = f" ({100 * done // total}%)" if total else ""
        return f"{done / MiB:.1f}/{total / MiB:.1f} MiB{percent}"
    return str(value)


def _rebuild_line(r: dict[str, Any]) -> str:
    """The master's record of its last rebuild, and what its pause cost the clients."""
    line = (f"last rebuild: MN {r['node']} (epoch {r['epoch']}) in {r['rebuild_s']:.2f} s, "
            f"{r['copied_bytes'] / MiB:.1f} MiB copied, {r['online_bytes'] / MiB:.1f} MiB "
            f"online; clients paused {r['pause_s']:.2f} s, {r['paused_copy_s']:.2f} s of it "
            f"copying")
    if "pause_bytes" in r:          # (a master of an earlier version does not say)
        line += (f" {r['pause_bytes'] / MiB:.1f} MiB, {r['pause_groups']} block groups "
                 f"whole")
    return line

