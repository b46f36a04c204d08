"""``fusee rdma preflight``: check that this host can run the verbs backend, and say what is wrong.

Each check returns ok / warn / fail with what was found and, when it is not ok, what to do.
The checks go from the bottom up (kernel devices, pyverbs, the port, its GID and MTU, atomics,
locked-memory limit, huge pages), then a loopback self-test that runs WRITE, READ, CAS and FAA
between two queue pairs of this host's device and finds the NIC's atomic byte order, and, given
a cluster config, a real connection to every memory node. Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import ipaddress
import resource
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fusee.emulator.rdma_device import (Device, RdmaUnavailable, access_flags, connect_qp,
                                        create_qp, device_names, gid_table, load_pyverbs,
                                        new_psn)

MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}
CAP_IPC_LOCK = 14
#: what a client registers besides the MN regions: its staging buffer grows with the batches
CLIENT_STAGING = 64 << 20


@dataclass
class Check:
    name: str
    status: str          # ok | warn | fail
    detail: str
    fix: str = ""


def _has_cap_ipc_lock() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except OSError:
        pass
    return False


def check_memlock(need: int) -> Check:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    fix = ("raise it: `ulimit -l unlimited` in the shell that starts fusee, "
           "`* - memlock unlimited` in /etc/security/limits.conf, or LimitMEMLOCK=infinity "
           "in a systemd unit (containers: --ulimit memlock=-1)")
    if _has_cap_ipc_lock():
        return Check("memlock", "ok", "CAP_IPC_LOCK: registered memory is not limited")
    if soft == resource.RLIM_INFINITY:
        return Check("memlock", "ok", "unlimited")
    if soft < need:
        return Check("memlock", "fail", f"locked-memory limit {soft >> 20} MiB < the "
                     f"{need >> 20} MiB this host needs to register", fix)
    return Check("memlock", "ok", f"{soft >> 20} MiB >= {need >> 20} MiB needed")


def check_hugepages() -> Check:
    info = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            info[k] = v.split()[0]
    except OSError:
        return Check("hugepages", "warn", "cannot read /proc/meminfo")
    thp = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")
    shmem = thp.read_text().strip() if thp.exists() else "unknown"
    detail = (f"HugePages_Total {info.get('HugePages_Total', '?')} of "
              f"{info.get('Hugepagesize', '?')} kB; shmem THP: {shmem}")
    if not any(f"[{mode}]" in shmem for mode in ("always", "within_size", "force")):
        return Check("hugepages", "warn", detail,
                     "MN regions are POSIX shared memory (tmpfs): with huge pages the NIC "
                     "needs 512x fewer translation entries; `echo within_size > "
                     "/sys/kernel/mm/transparent_hugepage/shmem_enabled` on the MN hosts")
    return Check("hugepages", "ok", detail)


def check_device(dev: Device) -> list[Check]:
    e = load_pyverbs()
    out = [Check("device", "ok", f"{dev.name} port {dev.port}: {dev.link_layer}, "
                 f"max message {dev.max_msg} B, max_qp_wr {dev.attr.max_qp_wr}, "
                 f"max_qp_rd_atom {dev.attr.max_qp_rd_atom}")]
    table = gid_table(dev.ctx, dev.port, dev.ctx.query_port(dev.port).gid_tbl_len)
    listing = ", ".join(f"[{i}] {g}{' v2' if v2 else ''}" for i, g, v2 in table)
    chosen = f"using gid[{dev.gid_index}] {dev.gid}; table: {listing}"
    v2 = {i for i, _, is_v2 in table if is_v2}
    mapped = ipaddress.IPv6Address(dev.gid).ipv4_mapped is not None
    if dev.link_layer == "Ethernet" and not (mapped and dev.gid_index in v2):
        out.append(Check("gid", "warn", chosen,
                         "no IPv4-mapped RoCEv2 GID: give the netdev an IPv4 address, or set "
                         "FUSEE_RDMA_GID_INDEX to the GID every host can route to"))
    else:
        out.append(Check("gid", "ok", chosen))
    pattr = dev.ctx.query_port(dev.port)
    active, top = MTU_BYTES.get(pattr.active_mtu, "?"), MTU_BYTES.get(pattr.max_mtu, "?")
    if pattr.active_mtu < pattr.max_mtu:
        out.append(Check("mtu", "warn", f"active {active} B < port maximum {top} B",
                         "on RoCE the active MTU follows the netdev MTU: set it (and the "
                         "switches') to 4200 or more for a 4096 B RDMA MTU (jumbo frames); on "
                         "InfiniBand check the subnet manager's MTU"))
    else:
        out.append(Check("mtu", "ok", f"active {active} B (port maximum)"))
    if dev.attr.atomic_caps == e.IBV_ATOMIC_NONE:
        out.append(Check("atomics", "fail", "the device does not support RDMA atomics",
                         "FUSEE needs CAS and FAA: use a device with atomic support"))
    else:
        out.append(Check("atomics", "ok", "HCA-level" if dev.attr.atomic_caps ==
                         e.IBV_ATOMIC_HCA else "global"))
    return out


def loopback_test(dev: Device) -> Check:
    """WRITE, READ, CAS, FAA between two queue pairs of this device; finds the atomic byte
    order with a word whose bytes all differ."""
    from pyverbs.cq import CQ
    from pyverbs.mr import MR
    from pyverbs.pd import PD
    from pyverbs.wr import SGE, SendWR
    e = load_pyverbs()
    pd = PD(dev.ctx)
    objs = []
    try:
        cq = CQ(dev.ctx, 8, None, None, 0)
        mr = MR(pd, 4096, access_flags())
        a, b = create_qp(dev, pd, cq, 4), create_qp(dev, pd, cq, 4)
        objs = [a, b, mr, cq]
        pa, pb = new_psn(), new_psn()
        connect_qp(dev, a, pa, {**dev.info(), "qpn": b.qp_num, "psn": pb})
        connect_qp(dev, b, pb, {**dev.info(), "qpn": a.qp_num, "psn": pa})
        word = 0x0102030405060708

        def post(opcode, local, remote, length, **atomic):
            wr = SendWR(opcode=opcode, num_sge=1, sg=[SGE(mr.buf + local, length, mr.lkey)],
                        send_flags=e.IBV_SEND_SIGNALED)
            if atomic:
                wr.set_wr_atomic(rkey=mr.rkey, addr=mr.buf + remote, **atomic)
            else:
                wr.set_wr_rdma(mr.rkey, mr.buf + remote)
            a.post_send(wr, None)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                n, wcs = cq.poll(1)
                if n:
                    if wcs[0].status != e.IBV_WC_SUCCESS:
                        raise RuntimeError(f"completion status {wcs[0].status}")
                    return
            raise RuntimeError("no completion within 5 s")

        mr.write(struct.pack("<Q", word), 8, 0)
        post(e.IBV_WR_RDMA_WRITE, 0, 1024, 8)
        post(e.IBV_WR_RDMA_READ, 2048, 1024, 8)
        if mr.read(8, 2048) != struct.pack("<Q", word):
            return Check("loopback", "fail", "RDMA WRITE then READ returned other bytes")
        post(e.IBV_WR_ATOMIC_CMP_AND_SWP, 3072, 1024, 8, compare_add=word, swap=word + 1)
        fetched = mr.read(8, 3072)
        post(e.IBV_WR_ATOMIC_FETCH_AND_ADD, 3080, 1024, 8, compare_add=1, swap=0)
        after = struct.unpack("<Q", mr.read(8, 1024))[0]
        order = ("little" if fetched == struct.pack("<Q", word) else
                 "big" if fetched == struct.pack(">Q", word) else None)
        if order is None or after != word + 2:
            return Check("loopback", "fail", f"atomics misbehave: CAS fetched {fetched.hex()}, "
                         f"word after CAS+FAA {after:#x} (expected {word + 2:#x})")
        return Check("loopback", "ok", f"WRITE, READ, CAS, FAA pass; fetched atomic values "
                     f"arrive {order}-endian")
    except Exception as err:
        return Check("loopback", "fail", f"self-test failed: {err}",
                     "check the port state, the GID (FUSEE_RDMA_GID_INDEX) and dmesg")
    finally:
        for o in objs:
            o.close()
        pd.close()


def check_cluster(config_path: str) -> Check:
    from fusee.cluster_identity import mismatch
    from fusee.config import ClusterConfig
    from fusee.memory_map import HEADER_END
    from fusee.verbs import Read, TransportError
    from fusee.transports.rdma import VerbsTransport
    try:
        config = ClusterConfig.load(config_path)
        t = VerbsTransport(config)
    except (TransportError, RdmaUnavailable, OSError, ValueError) as err:
        return Check("cluster", "fail", f"cannot connect: {err}",
                     "start every `fusee memnode --rdma`, and check the endpoints in the config")
    try:        # each one's header: this cluster's MN? (fusee.cluster_identity)
        headers = t.execute([Read(m.id, 0, HEADER_END) for m in config.memnodes])
    except TransportError as err:
        return Check("cluster", "fail", f"READ from the memory nodes failed: {err}")
    finally:
        t.close()
    wrong = [w for m, h in zip(config.memnodes, headers)
             if (w := mismatch(config, m.id, h)) is not None]
    if wrong:
        return Check("cluster", "fail", "; ".join(map(str, wrong)))
    return Check("cluster", "ok", f"{len(headers)} memory nodes reachable over RDMA "
                 f"(atomic order {sorted(set(t.orders.values()))})")


def preflight(device: str | None = None, port: int | None = None, gid_index: int | None = None,
              config: str | None = None, region_size: int = 256 << 20) -> list[Check]:
    """Every check, in order; stops early only where later checks cannot run."""
    checks = []
    names = device_names()
    if not names:
        checks.append(Check("kernel", "fail", "no RDMA device in /sys/class/infiniband",
                            "load the NIC's RDMA driver (e.g. mlx5_ib), or for SoftRoCE: "
                            "`modprobe rdma_rxe && rdma link add rxe0 type rxe netdev <netdev>`"))
    elif not list(Path("/dev/infiniband").glob("uverbs*")):
        checks.append(Check("kernel", "fail", f"devices {names} but no /dev/infiniband/uverbs*",
                            "`modprobe ib_uverbs`"))
    else:
        checks.append(Check("kernel", "ok", f"RDMA devices: {', '.join(names)}"))
    try:
        e = load_pyverbs()
        checks.append(Check("pyverbs", "ok", f"{e.__name__} from {Path(e.__file__).parent}"))
    except RdmaUnavailable as err:
        checks.append(Check("pyverbs", "fail", str(err),
                            "apt install python3-pyverbs (or rdma-core's python bindings)"))
        return checks + [check_memlock(region_size + CLIENT_STAGING), check_hugepages()]
    if names:
        try:
            dev = Device.open(device, port, gid_index)
        except RdmaUnavailable as err:
            checks.append(Check("device", "fail", str(err),
                                "FUSEE_RDMA_DEVICE / FUSEE_RDMA_PORT select another device"))
        else:
            try:
                checks += check_device(dev)
                checks.append(loopback_test(dev))
            finally:
                dev.close()
    checks += [check_memlock(region_size + CLIENT_STAGING), check_hugepages()]
    if config:
        checks.append(check_cluster(config))
    return checks


def report(checks: list[Check]) -> str:
    marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    lines = []
    for c in checks:
        lines.append(f"[{marks[c.status]}] {c.name:<10} {c.detail}")
        if c.fix and c.status != "ok":
            lines.append(f"{'':18}-> {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append(f"{len(checks)} checks: {failed} failed, {warned} warnings")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fusee rdma preflight", description=__doc__.splitlines()[0])
    p.add_argument("--device", help="RDMA device (default: FUSEE_RDMA_DEVICE, else the first "
                   "with an active port)")
    p.add_argument("--port", type=int, help="device port (default 1)")
    p.add_argument("--gid-index", type=int, help="GID index (default: automatic)")
    p.add_argument("--config", help="cluster config: also connect to every memory node")
    p.add_argument("--region-size", type=int, default=256 << 20,
                   help="bytes a memory node here registers (for the memlock check)")
    args = p.parse_args(argv)
    region = args.region_size
    if args.config:
        from fusee.config import ClusterConfig, ConfigError
        try:
            region = ClusterConfig.load(args.config).layout.region_size
        except ConfigError as err:
            p.error(str(err))
    checks = preflight(args.device, args.port, args.gid_index, args.config, region)
    print(report(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
