"""pyverbs plumbing shared by both ends of the real-RDMA path and by the preflight check.

Both the memory node (fusee.emulator.rdma_nic) and the client (fusee.transports.rdma) open a
device, pick a GID, and bring an RC queue pair to RTS from the peer's queue-pair info; this
module does it once.
Nothing here imports pyverbs at module import time, so a machine without RDMA can import it
(and the test suite can skip cleanly).

Per-host settings come from the environment, because device names and GID tables differ from
host to host while the cluster config is shared by all of them:
FUSEE_RDMA_DEVICE (e.g. mlx5_0, rxe0), FUSEE_RDMA_PORT (default 1), FUSEE_RDMA_GID_INDEX
(default: chosen automatically), FUSEE_RDMA_ATOMIC_ORDER (little | big | auto, client side).
"""

from __future__ import annotations

import glob
import importlib
import importlib.machinery
import importlib.util
import ipaddress
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: the access a memory node grants on its region, and a client on its staging buffer
ACCESS_NAMES = ("IBV_ACCESS_LOCAL_WRITE", "IBV_ACCESS_REMOTE_READ", "IBV_ACCESS_REMOTE_WRITE",
                "IBV_ACCESS_REMOTE_ATOMIC")

#: RC transport parameters: local ACK timeout 4.096 us * 2**14 = 67 ms, 7 retries; a dead peer
#: shows up as a retry-exceeded completion after about half a second
ACK_TIMEOUT, RETRY_COUNT, RNR_RETRY, MIN_RNR_TIMER = 14, 7, 7, 12


class RdmaUnavailable(RuntimeError):
    """No usable RDMA: pyverbs missing, no device, port down. The message says what to do."""


_E = None


def load_pyverbs():
    """Import pyverbs and return its enum module, whichever layout this rdma-core has.

    pyverbs is not on PyPI: it ships with rdma-core (Debian: python3-pyverbs) into the system
    interpreter's dist-packages. A virtualenv or pyenv interpreter of the same Python version
    can load those same extension modules, so when the import fails we load the ``pyverbs``
    package alone from there (not the whole directory: nothing else this interpreter has may
    be shadowed by the system's packages).
    Older rdma-core names the enums ``pyverbs.enums``, newer ``pyverbs.libibverbs_enums``.
    """
    global _E
    if _E is not None:
        return _E
    try:
        importlib.import_module("pyverbs")
    except ImportError:
        _load_system_pyverbs()
    for name in ("pyverbs.libibverbs_enums", "pyverbs.enums"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(mod, "IBV_WR_RDMA_WRITE"):
            _E = mod
            return mod
    raise RdmaUnavailable("this pyverbs has neither pyverbs.libibverbs_enums nor pyverbs.enums")


def _load_system_pyverbs() -> None:
    tag = importlib.machinery.EXTENSION_SUFFIXES[0]            # e.g. .cpython-311-x86_64-...so
    for pattern in ("/usr/lib/python3/dist-packages", "/usr/lib64/python3*/site-packages",
                    "/usr/lib/python3*/site-packages"):
        for path in glob.glob(pattern):
            pkg = Path(path) / "pyverbs"
            if (pkg / f"device{tag}").exists():
                spec = importlib.util.spec_from_file_location(
                    "pyverbs", pkg / "__init__.py", submodule_search_locations=[str(pkg)])
                assert spec is not None and spec.loader is not None, path
                module = importlib.util.module_from_spec(spec)
                sys.modules["pyverbs"] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules["pyverbs"]
                    raise
                return
    raise RdmaUnavailable(
        f"pyverbs is not importable; install rdma-core's Python bindings (Debian/Ubuntu: "
        f"apt install python3-pyverbs) for Python "
        f"{sys.version_info.major}.{sys.version_info.minor}")


def access_flags() -> int:
    e = load_pyverbs()
    flags = 0
    for name in ACCESS_NAMES:
        flags |= getattr(e, name)
    return flags


def device_names() -> list[str]:
    """RDMA devices the kernel exposes (empty when there is no RDMA at all)."""
    return sorted(p.name for p in Path("/sys/class/infiniband").glob("*"))


def rdma_available() -> tuple[bool, str]:
    """(True, device) if a device with an ACTIVE port can be opened here, else (False, why)."""
    try:
        dev = Device.open()
    except RdmaUnavailable as e:
        return False, str(e)
    name = dev.name
    dev.close()
    return True, name


def gid_rank(gid: str, roce_v2: bool) -> int:
    """How good a GID is for our connections: an IPv4-mapped RoCEv2 GID routes over IP
    networks and is what RoCE peers agree on; any RoCEv2 next; then any non-zero GID (on
    InfiniBand, the port GID at index 0). -1 = unusable (all zero)."""
    try:
        ip = ipaddress.IPv6Address(gid)
    except ValueError:
        return -1
    if int(ip) == 0:
        return -1
    return (2 if ip.ipv4_mapped else 0) + (1 if roce_v2 else 0)


def choose_gid(table: list[tuple[int, str, bool]]) -> int | None:
    """Best index among (index, gid, is_roce_v2) entries; the lowest index wins a tie."""
    best, best_rank = None, -1
    for index, gid, v2 in table:
        r = gid_rank(gid, v2)
        if r > best_rank:
            best, best_rank = index, r
    return best


@dataclass
class Device:
    """An opened device port with the GID and MTU our queue pairs use."""
    ctx: Any                 # pyverbs Context
    name: str
    port: int
    gid_index: int
    gid: str
    lid: int
    mtu: int                 # IBV_MTU_* of the port's active MTU
    link_layer: str          # "InfiniBand" | "Ethernet"
    max_msg: int             # largest message one work request may carry
    attr: Any                # pyverbs DeviceAttr

    @classmethod
    def open(cls, name: str | None = None, port: int | None = None,
             gid_index: int | None = None) -> Device:
        """Open ``name`` (default FUSEE_RDMA_DEVICE, else the first device with an ACTIVE
        port) and choose its GID (default FUSEE_RDMA_GID_INDEX, else automatically)."""
        name = name or os.environ.get("FUSEE_RDMA_DEVICE") or None
        port = port or int(os.environ.get("FUSEE_RDMA_PORT") or 1)
        if gid_index is None and os.environ.get("FUSEE_RDMA_GID_INDEX"):
            gid_index = int(os.environ["FUSEE_RDMA_GID_INDEX"])
        names = device_names()
        if not names:
            raise RdmaUnavailable("no RDMA device (/sys/class/infiniband is empty): load the "
                                  "driver, or create a SoftRoCE device with "
                                  "`rdma link add rxe0 type rxe netdev <netdev>`")
        if name is not None and name not in names:
            raise RdmaUnavailable(f"no RDMA device {name!r}; this host has {', '.join(names)}")
        e = load_pyverbs()
        from pyverbs.device import Context
        from pyverbs.pyverbs_error import PyverbsError
        problems = []
        for candidate in [name] if name else names:
            try:
                ctx = Context(name=candidate)
            except PyverbsError as err:
                problems.append(f"{candidate}: cannot open ({err}); check /dev/infiniband "
                                f"permissions and that ib_uverbs is loaded")
                continue
            try:
                pattr = ctx.query_port(port)
            except PyverbsError as err:
                ctx.close()
                problems.append(f"{candidate}: no port {port} ({err})")
                continue
            if pattr.state != e.IBV_PORT_ACTIVE:
                ctx.close()
                problems.append(f"{candidate} port {port} is not ACTIVE (state {pattr.state}): "
                                f"check the cable/link, the subnet manager (InfiniBand) or the "
                                f"netdev (RoCE)")
                continue
            try:
                return cls._with_port(ctx, candidate, port, pattr, gid_index)
            except RdmaUnavailable as err:
                ctx.close()
                problems.append(str(err))
        raise RdmaUnavailable("; ".join(problems))

    @classmethod
    def _with_port(cls, ctx, name, port, pattr, gid_index) -> Device:
        e = load_pyverbs()
        table = gid_table(ctx, port, pattr.gid_tbl_len)
        if gid_index is None:
            gid_index = choose_gid(table)
            if gid_index is None:
                raise RdmaUnavailable(f"{name} port {port} has no usable GID: give the netdev "
                                      f"an IP address (RoCE) or check the port (InfiniBand)")
        gids = {i: g for i, g, _ in table}
        if gid_index not in gids or gid_rank(gids[gid_index], False) < 0:
            raise RdmaUnavailable(f"{name} port {port} has no GID at index {gid_index}")
        link = "Ethernet" if pattr.link_layer == e.IBV_LINK_LAYER_ETHERNET else "InfiniBand"
        return cls(ctx=ctx, name=name, port=port, gid_index=gid_index, gid=gids[gid_index],
                   lid=pattr.lid, mtu=pattr.active_mtu, link_layer=link,
                   max_msg=pattr.max_msg_sz, attr=ctx.query_device())

    def info(self) -> dict:
        """What the peer needs to address us (plus a queue pair number and PSN, added later)."""
        return {"gid": self.gid, "lid": self.lid, "mtu": self.mtu, "rd": rd_atomic_depth(self)}

    def close(self) -> None:
        self.ctx.close()


def gid_table(ctx, port: int, length: int) -> list[tuple[int, str, bool]]:
    """(index, gid, is RoCEv2) of every readable non-zero GID of a port."""
    e = load_pyverbs()
    out = []
    for i in range(length):
        try:
            gid = str(ctx.query_gid(port, i).gid)
        except Exception:          # unpopulated entries raise on some providers
            continue
        if gid_rank(gid, False) < 0:
            continue
        try:
            v2 = ctx.query_gid_type(port, i) == e.IBV_GID_TYPE_SYSFS_ROCE_V2
        except Exception:
            v2 = False
        out.append((i, gid, v2))
    return out


def new_psn() -> int:
    return secrets.randbits(24)


def check_peer(info: dict) -> dict:
    """Validate queue-pair info from the other side (it crosses a network): a clear error
    instead of a crash deep inside the verbs library."""
    if not isinstance(info, dict):
        raise ValueError("queue-pair info must be a map")
    for key, lo, hi in (("qpn", 1, 1 << 24), ("psn", 0, 1 << 24), ("lid", 0, 1 << 16),
                        ("mtu", 1, 6), ("rd", 1, 256)):
        v = info.get(key)
        if type(v) is not int or not lo <= v < hi:
            raise ValueError(f"queue-pair info: bad {key} {v!r}")
    gid = info.get("gid")
    if type(gid) is not str or gid_rank(gid, False) < 0:
        raise ValueError(f"queue-pair info: bad gid {gid!r}")
    return info


def create_qp(dev: Device, pd, cq, depth: int):
    """An RC queue pair in INIT state, allowing remote read, write and atomic access."""
    e = load_pyverbs()
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    init = QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, sq_sig_all=0,
                      cap=QPCap(max_send_wr=depth, max_recv_wr=1, max_send_sge=1,
                                max_recv_sge=1))
    attr = QPAttr(port_num=dev.port)
    attr.qp_access_flags = access_flags()
    return QP(pd, init, attr)


def connect_qp(dev: Device, qp, local_psn: int, peer: dict) -> None:
    """INIT -> RTR -> RTS towards ``peer`` (check_peer'd info). Path MTU and the number of
    outstanding READs/atomics are the smaller of the two ends'."""
    load_pyverbs()
    from pyverbs.addr import AHAttr, GID, GlobalRoute
    from pyverbs.qp import QPAttr
    a = QPAttr(port_num=dev.port)
    a.qp_access_flags = access_flags()
    a.path_mtu = min(dev.mtu, peer["mtu"])
    a.dest_qp_num = peer["qpn"]
    a.rq_psn = peer["psn"]
    a.sq_psn = local_psn
    a.max_dest_rd_atomic = a.max_rd_atomic = min(rd_atomic_depth(dev), peer["rd"])
    a.min_rnr_timer, a.timeout, a.retry_cnt, a.rnr_retry = (MIN_RNR_TIMER, ACK_TIMEOUT,
                                                            RETRY_COUNT, RNR_RETRY)
    gr = GlobalRoute(dgid=GID(ipaddress.IPv6Address(peer["gid"]).exploded),
                     sgid_index=dev.gid_index, hop_limit=64)
    a.ah_attr = AHAttr(port_num=dev.port, is_global=1, gr=gr, dlid=peer["lid"])
    qp.to_rts(a)


def rd_atomic_depth(dev: Device) -> int:
    """Outstanding READ/atomic requests per queue pair: what both ends support, at most 16."""
    return max(1, min(16, dev.attr.max_qp_rd_atom, dev.attr.max_qp_init_rd_atom))
