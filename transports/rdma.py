"""The verbs backend: one-sided RDMA through pyverbs, over RC queue pairs (RoCE, SoftRoCE, IB).

Connecting: for every MN the transport creates an RC queue pair and sends its info (QP number,
PSN, GID, LID, MTU) through the MN's control channel (``rdma_connect``, served by
fusee.emulator.rdma_nic); the MN answers with its own queue pair's info and the registered region's
key, address and length. The region's length also bounds every request here, so an
out-of-range or unaligned request is refused before it is posted, with the same
RemoteAccessError the emulator raises.

A batch: the verbs for one MN become one chain of work requests, posted with a single
``post_send`` (one doorbell), of which only the last is signalled; RC completes in order, so
that one completion says the whole chain is done. The chains for all MNs are posted first and
then the one completion queue is polled for all of them, within ``timeout``. Data moves through
one registered staging buffer: WRITE payloads are copied in before posting, READ data and the
old values fetched by CAS/FAA land there and are copied out after completion. A request larger
than the port's maximum message is split into several work requests, and a chain longer than the
send queue is posted in windows, each window signalling its last request.

Failures: an error completion fails its request with RemoteAccessError (remote access or
invalid request: wrong key, permissions) or NodeTimeout (transport retries exceeded: the MN is
gone), the requests after it in that MN's chain with the same error (they were flushed), and no
completion in time is a NodeTimeout; the exception carries ``results`` like every backend's.
The queue pair is then in the error state: the transport destroys it and, on the next batch
for that MN, connects a fresh one through the control channel (telling the MN which old one to
drop). If the MN does not answer that, its requests fail with NodeTimeout.

Fencing (``fusee.fencing``): a leased client's control channel carries its routing identity,
and every ``rdma_connect`` its lease, under which the MN files the queue pair; the master's
``fence`` makes the MN destroy them all and refuse that lease a new one. A batch posted after
that fails here (no responder: retries exceeded, or no completion in time), and the
reconnect after it with Fenced.

Control requests (AllocBlock, FreeBlock) go through the MN's control channel as with the zmq
backend, in parallel with the RDMA chains; they are not ordered with respect to the verbs of the
same batch (no core operation mixes them).

Atomic byte order: FUSEE words are little-endian in memory. Verbs operands are host integers,
but some NICs deliver the fetched old value of CAS/FAA big-endian. ``atomic_order`` ("little",
"big", or "auto": probe at connect time by fetching the region's header magic with FAA 0 and
comparing it with a READ of the same word) says how the fetched 8 bytes are decoded.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Any, Literal
from collections.abc import Sequence

from fusee.emulator import _atomic, wire
from fusee.emulator.rdma_device import (Device, RdmaUnavailable, check_peer, connect_qp, create_qp,
                                  load_pyverbs, new_psn)
from fusee.config import ClusterConfig
from fusee.fencing import key_of
from fusee.memory_map import HEADER_MAGIC
from fusee.verbs import (AllocBlock, Cas, ControlError, Faa, FreeBlock, MASK64, NodeTimeout, Read,
                         RemoteAccessError, Request, TransportError, Write, validate)
from fusee.transports.base import RegionInfo, Transport, group_by_node, raise_for_failures
from fusee.transports.channel import Channels, place_replies

#: work requests posted to one queue pair at a time (a longer chain goes in windows)
SEND_DEPTH = 128
STAGING_MIN = 1 << 20
_GEN_SHIFT = 32
#: the byte order a NIC delivers fetched atomics in
ByteOrder = Literal["little", "big"]


def fetched_word(raw: bytes, order: ByteOrder) -> int:
    """The old value a CAS/FAA fetched, from the 8 bytes the NIC wrote locally."""
    return int.from_bytes(raw, order)


def detect_order(memory_bytes: bytes, fetched: bytes) -> ByteOrder | None:
    """Byte order of a NIC's fetched atomics, from the same word read by READ (memory order,
    little-endian) and fetched by an atomic; None if the word cannot tell (a palindrome) or
    the two disagree."""
    if memory_bytes == memory_bytes[::-1]:
        return None
    if fetched == memory_bytes:
        return "little"
    if fetched == memory_bytes[::-1]:
        return "big"
    return None


class _Staging:
    """Registered local memory that READ data, fetched words and WRITE payloads pass through."""

    def __init__(self, pd, access: int):
        self.pd, self.access = pd, access
        self.size = 0
        self.buf: mmap.mmap | None = None
        self.view: memoryview | None = None
        self.mr: Any = None

    def reserve(self, size: int) -> None:
        if size <= self.size:
            return
        from pyverbs.mr import MR
        new = max(STAGING_MIN, 1 << (size - 1).bit_length())
        self.close()
        self.buf = mmap.mmap(-1, new)
        self.view = memoryview(self.buf)
        self.mr = MR(self.pd, new, self.access, address=_atomic.address(self.view))
        self.size = new

    def close(self) -> None:
        if self.mr is not None:
            self.mr.close()
            self.view.release()
            self.buf.close()
        self.size, self.buf, self.view, self.mr = 0, None, None, None


class _Link:
    """The queue pair to one MN and what the MN told us on connecting."""

    def __init__(self, qp, mn_qpn: int):
        self.qp, self.mn_qpn = qp, mn_qpn


class VerbsTransport(Transport):
    name = "verbs"

    def __init__(self, config: ClusterConfig, timeout: float | None = None,
                 device: str | None = None, port: int | None = None,
                 gid_index: int | None = None, atomic_order: str | None = None,
                 send_depth: int = SEND_DEPTH, identity: bytes | None = None):
        """``identity``: a leased client's (``fusee.fencing.identity``), by which the MNs
        cut it off once the master fences it; None: a client that holds no lease."""
        super().__init__(config, timeout)
        self.lease = None if identity is None else key_of(identity)
        self.atomic_order = atomic_order or os.environ.get("FUSEE_RDMA_ATOMIC_ORDER") or "auto"
        if self.atomic_order not in ("auto", "little", "big"):
            raise ValueError(f"atomic_order must be auto, little or big, not {self.atomic_order!r}")
        self.e = e = load_pyverbs()
        from pyverbs.cq import CQ
        from pyverbs.pd import PD
        from pyverbs.wr import SGE, SendWR
        self._SGE, self._SendWR = SGE, SendWR
        self.dev: Device | None = Device.open(device, port, gid_index)
        self.depth = max(2, min(send_depth, self.dev.attr.max_qp_wr))
        self.max_msg = max(1, min(self.dev.max_msg, 1 << 30))
        self.links: dict[int, _Link | None] = {}
        self.retired: dict[int, int] = {}       # node -> MN queue pair to drop on reconnect
        self.control_rkeys: dict[int, int] = {}
        self.orders: dict[int, ByteOrder] = {}
        self.rdma_stats = {"work_requests": 0, "completions": 0, "reconnects": 0}
        self._gen = 0
        self.channels = None
        self.pd = self.cq = self.staging = None
        try:
            self.pd = PD(self.dev.ctx)
            cqe = min(self.dev.attr.max_cqe, 2 * self.depth * len(config.memnodes) + 64)
            self.cq = CQ(self.dev.ctx, cqe, None, None, 0)
            self.staging = _Staging(self.pd, e.IBV_ACCESS_LOCAL_WRITE)
            self.staging.reserve(STAGING_MIN)
            self.channels = Channels(config, identity)
            for m in config.memnodes:
                info = self.channels.call(m.id, "info", self.timeout)
                self.control_rkeys[m.id] = info["rkey"]
                self._connect(m.id)
            self._probe_orders()
        except BaseException:
            self.close()
            raise

    # -- connection ----------------------------------------------------------------------------
    def _connect(self, node: int) -> None:
        """A fresh RC queue pair to ``node``, connected through its control channel."""
        from pyverbs.pyverbs_error import PyverbsError
        assert self.dev is not None, "connecting on a closed transport"
        qp = create_qp(self.dev, self.pd, self.cq, self.depth)
        psn = new_psn()
        args = {**self.dev.info(), "qpn": qp.qp_num, "psn": psn, "lease": self.lease}
        if node in self.retired:
            args["replaces"] = self.retired[node]
        try:
            reply = self.channels.call(node, "rdma_connect", self.timeout, **args)
            self.retired.pop(node, None)
            peer = check_peer(reply)
            for key in ("rkey", "addr", "length"):
                if type(reply.get(key)) is not int or reply[key] < 0:
                    raise ValueError(f"bad region {key} {reply.get(key)!r}")
            connect_qp(self.dev, qp, psn, peer)
        except ControlError as err:
            qp.close()
            raise ControlError(f"{err} (is the memory node running with --rdma?)", node) from None
        except (TransportError, ValueError, PyverbsError) as err:
            qp.close()
            if isinstance(err, TransportError):
                raise
            raise TransportError(f"MN {node}: cannot connect a queue pair: {err}", node) from None
        self.links[node] = _Link(qp, peer["qpn"])
        self.regions[node] = RegionInfo(node=node, length=reply["length"], rkey=reply["rkey"],
                                        addr=reply["addr"])

    def _retire(self, node: int) -> None:
        """The queue pair went to the error state (or silent): drop it, reconnect on next use."""
        link = self.links.get(node)
        if link is not None:
            link.qp.close()
            self.retired[node] = link.mn_qpn
            self.links[node] = None

    def _probe_orders(self) -> None:
        """Learn how each MN's NIC hands back fetched atomics (one round trip for all)."""
        nodes = sorted(self.links)
        if self.atomic_order != "auto":
            fixed: ByteOrder = "big" if self.atomic_order == "big" else "little"
            self.orders = dict.fromkeys(nodes, fixed)
            return
        batch = [v for n in nodes for v in (Read(n, HEADER_MAGIC, 8), Faa(n, HEADER_MAGIC, 0))]
        got = self._run(batch, raw_atomics=True)
        for k, node in enumerate(nodes):
            memory, fetched = got[2 * k], got[2 * k + 1]
            order = detect_order(memory, fetched)
            if order is None:
                raise TransportError(f"MN {node}: cannot tell this NIC's atomic byte order "
                                     f"(READ {memory.hex()}, FAA fetched {fetched.hex()}); "
                                     f"set FUSEE_RDMA_ATOMIC_ORDER", node)
            self.orders[node] = order

    # -- batches ---------------------------------------------------------------------------------
    def _execute(self, batch: Sequence[Request]) -> list:
        return self._run(batch)

    def _run(self, batch: Sequence[Request], raw_atomics: bool = False) -> list:
        results: list = [None] * len(batch)
        failed = False
        plans: dict[int, list] = {}
        controls: dict[int, list[int]] = {}
        staging_need = 0
        for node, idx in group_by_node(batch).items():
            verbs = []
            for i in idx:
                req = batch[i]
                validate(req)
                t = type(req)
                if t is AllocBlock or t is FreeBlock:
                    controls.setdefault(node, []).append(i)
                else:
                    verbs.append(i)
                    staging_need += (req.length if t is Read else len(req.data) if t is Write
                                     else 16)         # an atomic's word, 8-byte aligned
            if verbs:
                plans[node] = verbs
        self.staging.reserve(staging_need)

        # Build each MN's chain; a request refused here fails, and flushes the rest, as at a NIC.
        chains: dict[int, list] = {}
        off = 0
        for node, verbs in plans.items():
            if self.links.get(node) is None:
                try:
                    self.rdma_stats["reconnects"] += 1
                    self._connect(node)
                except TransportError as exc:
                    failed = True
                    for i in verbs:
                        results[i] = exc
                    continue
            wrs, off, refused = self._plan(node, batch, verbs, off)
            if refused is not None:
                failed = True
                k, err = refused
                for i in verbs[k:]:
                    results[i] = err
            if wrs:
                chains[node] = wrs

        # Post every chain, send the control requests, then collect everything.
        gen = self._gen = (self._gen + 1) & 0xFFFFFFFF
        deadline = time.monotonic() + self.timeout
        #: [next to post, last done, error]
        state: dict[int, list[Any]] = {node: [0, -1, None] for node in chains}
        for node in chains:
            self._post_window(node, chains[node], state[node], gen)
        if controls:
            failed |= self._controls(batch, controls, results)
        errors = self._poll(chains, state, gen, deadline)

        staging = self.staging.view
        assert staging is not None, "reserved before the batch is planned"
        for node, wrs in chains.items():
            done = state[node][1]
            err = errors.get(node)
            for k, (i, _opcode, _raddr, length, loff, _a, _b, last) in enumerate(wrs):
                if not last:
                    continue
                if k <= done:
                    req = batch[i]
                    t = type(req)
                    if t is Read:
                        start = loff - (req.length - length)     # a split READ: whole range
                        results[i] = bytes(staging[start:loff + length])
                    elif t is Write:
                        results[i] = None
                    else:
                        raw = bytes(staging[loff:loff + 8])
                        results[i] = raw if raw_atomics else fetched_word(raw, self.orders[node])
                else:
                    failed = True
                    results[i] = err
            if err is not None:
                self._retire(node)
        if failed:
            raise_for_failures(results)
        return results

    def _plan(self, node: int, batch, verbs: list[int], off: int):
        """Work requests (i, opcode, remote addr, length, staging offset, compare_add, swap,
        last-of-its-request) for one MN; stops at the first request the region refuses."""
        e, region, staging = self.e, self.regions[node], self.staging.view
        assert staging is not None, "reserved before the batch is planned"
        base, limit, step = region.addr, region.length, self.max_msg
        wrs: list[tuple[Any, ...]] = []
        for k, i in enumerate(verbs):
            req = batch[i]
            t = type(req)
            length = req.length if t is Read else len(req.data) if t is Write else 8
            if req.addr + length > limit:
                return wrs, off, (k, RemoteAccessError(
                    f"MN {node}: [{req.addr:#x}, {req.addr + length:#x}) is outside the region "
                    f"[0, {limit:#x})", node))
            if t is Read or t is Write:
                if t is Write:
                    staging[off:off + length] = req.data
                opcode = e.IBV_WR_RDMA_READ if t is Read else e.IBV_WR_RDMA_WRITE
                pos = 0
                while True:                    # zero-length requests still get one WR
                    n = min(step, length - pos)
                    last = pos + n >= length
                    wrs.append((i, opcode, base + req.addr + pos, n, off + pos, 0, 0, last))
                    pos += n
                    if last:
                        break
                off += length
            else:
                if req.addr & 7:
                    return wrs, off, (k, RemoteAccessError(
                        f"MN {node}: unaligned atomic at {req.addr:#x}", node))
                off = (off + 7) & ~7
                if t is Cas:
                    wrs.append((i, e.IBV_WR_ATOMIC_CMP_AND_SWP, base + req.addr, 8, off,
                                req.expected, req.desired, True))
                else:
                    wrs.append((i, e.IBV_WR_ATOMIC_FETCH_AND_ADD, base + req.addr, 8, off,
                                req.delta & MASK64, 0, True))
                off += 8
        return wrs, off, None

    def _post_window(self, node: int, wrs: list, st: list, gen: int) -> None:
        """Post the next up to ``depth`` work requests of a chain; only the last is signalled."""
        SGE, SendWR, e = self._SGE, self._SendWR, self.e
        start = st[0]
        end = min(len(wrs), start + self.depth)
        rkey, lkey, lbase = self.regions[node].rkey, self.staging.mr.lkey, self.staging.mr.buf
        atomic = (e.IBV_WR_ATOMIC_CMP_AND_SWP, e.IBV_WR_ATOMIC_FETCH_AND_ADD)
        nxt = None
        keep = []
        for k in range(end - 1, start - 1, -1):
            _i, opcode, raddr, length, loff, a, b, _last = wrs[k]
            flags = e.IBV_SEND_SIGNALED if k == end - 1 else 0
            wr = SendWR(wr_id=(gen << _GEN_SHIFT) | k, opcode=opcode, num_sge=1,
                        sg=[SGE(lbase + loff, length, lkey)], send_flags=flags, next_wr=nxt)
            if opcode in atomic:
                wr.set_wr_atomic(rkey=rkey, addr=raddr, compare_add=a, swap=b)
            else:
                wr.set_wr_rdma(rkey, raddr)
            keep.append(wr)                     # the chain points into these objects
            nxt = wr
        self.links[node].qp.post_send(nxt, None)
        self.rdma_stats["work_requests"] += end - start
        st[0] = end

    def _poll(self, chains: dict, state: dict, gen: int, deadline: float) -> dict:
        """Poll until every chain is complete or failed, or the deadline; node -> error."""
        e = self.e
        errors: dict[int, TransportError] = {}
        by_qpn = {self.links[n].qp.qp_num: n for n in chains}
        waiting = set(chains)
        cq = self.cq
        idle = 0
        while waiting:
            n, wcs = cq.poll(32)
            if not n:
                idle += 1
                if idle & 0x3FF == 0:
                    if time.monotonic() > deadline:
                        break
                    os.sched_yield()      # let the kernel's rxe tasks and peers run
                continue
            self.rdma_stats["completions"] += n
            for wc in wcs:
                node = by_qpn.get(wc.qp_num)
                if node is None or wc.wr_id >> _GEN_SHIFT != gen or node not in waiting:
                    continue                        # from an older batch or a retired QP
                k = wc.wr_id & 0xFFFFFFFF
                st = state[node]
                if wc.status == e.IBV_WC_SUCCESS:
                    st[1] = k
                    if k == len(chains[node]) - 1:
                        waiting.discard(node)
                    elif k == st[0] - 1:
                        self._post_window(node, chains[node], st, gen)
                elif wc.status != e.IBV_WC_WR_FLUSH_ERR:
                    st[1] = k - 1
                    errors[node] = self._error(node, wc.status)
                    waiting.discard(node)
        for node in waiting:
            errors[node] = NodeTimeout(f"MN {node}: no completion within {self.timeout:g} s",
                                       node)
        return errors

    def _error(self, node: int, status: int) -> TransportError:
        e = self.e
        name = _status_name(e, status)
        if status in (e.IBV_WC_RETRY_EXC_ERR, e.IBV_WC_RNR_RETRY_EXC_ERR):
            return NodeTimeout(f"MN {node}: not answering ({name})", node)
        if status in (e.IBV_WC_REM_ACCESS_ERR, e.IBV_WC_REM_INV_REQ_ERR, e.IBV_WC_REM_OP_ERR,
                      e.IBV_WC_REM_INV_RD_REQ_ERR):
            return RemoteAccessError(f"MN {node}: remote access error ({name}): wrong access "
                                     f"key or access not granted", node)
        return TransportError(f"MN {node}: work request failed ({name})", node)

    def _controls(self, batch, controls: dict[int, list[int]], results: list) -> bool:
        """Control requests through the MN's control channel; True if any failed."""
        ch = self.channels
        seq = ch.next_seq()
        payloads = {node: wire.encode_verbs(seq, self.control_rkeys[node],
                                            [batch[i] for i in idx])
                    for node, idx in controls.items()}
        return place_replies(results, controls, ch.exchange(payloads, seq, self.timeout))

    def close(self) -> None:
        """Drop our queue pairs on the MNs (best effort, one round trip), then free everything."""
        ch = self.channels
        live = {n: link for n, link in self.links.items() if link is not None}
        if ch is not None and live:
            seq = ch.next_seq()
            ch.exchange({n: wire.encode_control(seq, "rdma_disconnect",
                                                {"qpn": link.mn_qpn, "lease": self.lease})
                         for n, link in live.items()}, seq, min(self.timeout, 1.0))
        for node in list(self.links):
            self._retire(node)
        self.links.clear()
        for obj in (self.staging, self.cq, self.pd):
            if obj is not None:
                obj.close()
        self.staging = self.cq = self.pd = None
        if self.dev is not None:
            self.dev.close()
            self.dev = None
        if ch is not None:
            ch.close()
            self.channels = None


def _status_name(e, status: int) -> str:
    for name in dir(e):
        if name.startswith("IBV_WC_") and name.endswith("_ERR") and getattr(e, name) == status:
            return name
    return f"status {status}"


__all__ = ["VerbsTransport", "RdmaUnavailable", "detect_order", "fetched_word"]
