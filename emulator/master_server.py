"""The master process (`fusee master`): membership, client leases and repairs (SPEC §1, §8).

It wraps the sans-IO ``fusee.master.Master`` with I/O, on three threads that share it under a
lock:

- the main thread serves RPCs on a ZeroMQ ROUTER socket (the MNs' control protocol,
  ``emulator.wire``; CURVE as for the MNs): ``register``, ``renew``, ``release``, ``status``,
  ``ping``; and it ticks the leases;
- a heartbeat thread pings every live MN with the MNs' own ``ping`` control request through
  ``transports.channel.Channels``, all at once, every quarter of the MN lease;
- a repair thread runs client-crash recovery (``fusee.recovery``) for each id in the repair
  queue, on a transport of its own, and hands the id back to the pool when it is done.

A fresh client id is drawn from the MNs' shared counter (FAA on MN 0, like a client without a
master), so clients with and without a master never collide; recovered ids are handed out
first. The state is written atomically (temporary file, fsync, rename) whenever it changes,
before a reply depends on it, so a restarted master carries on. Every network wait has a
timeout. SIGTERM / SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import zmq

from emulator import wire
from fusee.config import ClusterConfig, ConfigError
from fusee.driver import run
from fusee.errors import FuseeError
from fusee.master import LeaseError, Master, StateError
from fusee.operations import draw_client_id
from fusee.recovery import recover_client
from fusee.verbs import TransportError
from transports.channel import Channels
from transports.master_link import ERR_LEASE
from emulator.serving import bind, stop_condition, write_ready
from transports.security import check_endpoint, secure_server

#: the repair records kept for ``status`` (the newest)
REPORTS_KEPT = 64
#: how often the main loop ticks the leases at least (seconds)
TICK = 0.02


class StateFile:
    """The master's state on disk: JSON, replaced atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.written: dict | None = None

    def load(self) -> dict | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"cannot read master state {self.path}: {e}") from None
        try:
            self.written = json.loads(text)
        except ValueError as e:
            raise StateError(f"master state {self.path} is not JSON: {e}") from None
        return self.written

    def save(self, state: dict) -> None:
        if state == self.written:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dirfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        self.written = state


class MasterServer:
    def __init__(self, config: ClusterConfig, state_path: str | Path,
                 transport: str | None = None, log=print):
        self.config, self.backend, self.log = config, transport, log
        self.grace = config.timeout        # the longest a client's last batch can be in flight
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.failed = False                         # a background thread died
        self.repair_due = threading.Event()         # wakes the repair thread
        self.file = StateFile(state_path)
        now = time.monotonic()
        ids = [m.id for m in config.memnodes]
        state = self.file.load()
        if state is not None and state.get("cluster") != config.name:
            raise StateError(f"{self.file.path} is the state of cluster "
                             f"{state.get('cluster')!r}, not {config.name!r}")
        if state is None:
            self.master = Master(ids, config.client_lease, config.mn_lease, self.grace, now)
        else:
            self.master = Master.restore(state, ids, config.client_lease, config.mn_lease,
                                         self.grace, now)
            log(f"master: carried on from {self.file.path}: epoch {self.master.epoch}, "
                f"{len(self.master.clients)} clients, {len(self.master.repairs)} repairs "
                "pending", flush=True)
        self._save()
        self.detected: dict[int, float] = {}            # client id -> when (wall clock)
        self.reports: collections.deque = collections.deque(maxlen=REPORTS_KEPT)
        self.id_transport = None                        # the main thread's, to draw ids
        self.last_tick = 0.0
        self.methods = {"register": self._register, "renew": self._renew,
                        "release": self._release, "status": self._status,
                        "ping": lambda args: "pong"}

    def _save(self) -> None:
        """Persist the state (under ``self.lock``) if it changed."""
        self.file.save({"cluster": self.config.name, **self.master.state()})

    # -- RPCs (main thread) -------------------------------------------------------------------
    def handle(self, data: bytes) -> bytes:
        """One request in, one reply out; no exception escapes."""
        try:
            kind, seq, name, args = wire.decode_request(data)
        except wire.MalformedMessage as e:
            return wire.encode_reply(-1, [], [0, wire.ERR_MALFORMED, str(e)])
        method = self.methods.get(name) if kind == wire.CONTROL else None
        if method is None:
            return wire.encode_reply(seq, [], [0, wire.ERR_MALFORMED, f"unknown request {name!r}"])
        try:
            return wire.encode_reply(seq, [method(args)])
        except LeaseError as e:
            return wire.encode_reply(seq, [], [0, ERR_LEASE, str(e)])
        except (FuseeError, TransportError, OSError, ValueError, TypeError, KeyError) as e:
            return wire.encode_reply(seq, [], [0, wire.ERR_CONTROL, f"{name}: {e}"])

    @staticmethod
    def _client(args: dict) -> tuple[int, int]:
        cid, token = args["id"], args["token"]
        if type(cid) is not int or type(token) is not int:
            raise TypeError("id and token must be integers")
        return cid, token

    def _register(self, args: dict) -> dict:
        with self.lock:
            cid = self.master.reusable_id()
        if cid is None:
            cid = self._draw_id()
        with self.lock:
            g = self.master.grant(cid, secrets.randbits(62), time.monotonic())
            self._save()                    # before the client can act on it
        self.log(f"master: client {cid} registered", flush=True)
        return {"id": g.id, "token": g.token, "lease": g.lease, "epoch": g.epoch}

    def _draw_id(self) -> int:
        """A never-used id from MN 0's counter (the same one clients without a master use)."""
        try:
            if self.id_transport is None:
                from transports import connect
                self.id_transport = connect(self.config, self.backend)
            return run(draw_client_id(self.config), self.id_transport)
        except (TransportError, OSError):
            if self.id_transport is not None:
                self.id_transport.close()
                self.id_transport = None
            raise

    def _renew(self, args: dict) -> dict:
        cid, token = self._client(args)
        with self.lock:
            try:
                g = self.master.renew(cid, token, time.monotonic())
            except LeaseError:
                self._note_expired(cid)
                self._save()
                raise
        return {"id": g.id, "token": g.token, "lease": g.lease, "epoch": g.epoch}

    def _release(self, args: dict) -> None:
        cid, token = self._client(args)
        with self.lock:
            self.master.release(cid, token)
            self.detected[cid] = time.time()
            self._save()
        self.repair_due.set()
        self.log(f"master: client {cid} released its id", flush=True)

    def _status(self, args: dict) -> dict:
        with self.lock:
            status = self.master.status(time.monotonic())
            status["repaired"] = list(self.reports)
        status["pid"] = os.getpid()
        return status

    def _note_expired(self, cid: int) -> None:
        if cid in self.master.repairs and cid not in self.detected:
            self.detected[cid] = time.time()
            self.repair_due.set()
            self.log(f"master: client {cid} lease expired: recovery scheduled", flush=True)

    def tick(self) -> None:
        now = time.monotonic()
        if now - self.last_tick < TICK:
            return
        self.last_tick = now
        with self.lock:
            events = self.master.tick(now)
            for e in events:
                if e.kind == "mn-dead":
                    self.log(f"master: memory node {e.subject} missed its lease: dead "
                             f"(epoch {e.epoch})", flush=True)
                else:
                    self._note_expired(e.subject)
            if events:
                self._save()

    # -- heartbeats ----------------------------------------------------------------------------
    def heartbeat_loop(self) -> None:
        interval = self.config.mn_lease / 4
        timeout = min(self.config.timeout, self.config.mn_lease / 2)
        channels = Channels(self.config)
        try:
            while not self.stopping.is_set():
                with self.lock:
                    alive = self.master.alive()
                seq = channels.next_seq()
                sent = time.monotonic()
                replies = channels.exchange(
                    {m: wire.encode_control(seq, "ping", {}) for m in alive}, seq, timeout)
                with self.lock:
                    for node, reply in replies.items():
                        if type(reply) is tuple and not reply[1] and reply[0] == ["pong"]:
                            self.master.mn_seen(node, sent)
                self.stopping.wait(max(0.0, sent + interval - time.monotonic()))
        finally:
            channels.close()

    # -- repairs -------------------------------------------------------------------------------
    def repair_loop(self) -> None:
        transport = None
        try:
            while not self.stopping.is_set():
                self.repair_due.clear()
                with self.lock:
                    cid = self.master.next_repair(time.monotonic())
                if cid is None:
                    self.repair_due.wait(0.05)          # or a retry comes due
                    continue
                transport = self._repair(cid, transport)
        finally:
            if transport is not None:
                transport.close()

    def _repair(self, cid: int, transport):
        """Recover ``cid`` (a failure is retried later, by the same lock owner); returns the
        transport to use next time (None after a transport failure: reconnect)."""
        started = time.time()
        connect_s = 0.0
        try:
            if transport is None:
                from transports import connect
                t0 = time.perf_counter()
                transport = connect(self.config, self.backend)
                connect_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            report = run(recover_client(self.config, cid), transport)
            recover_s = time.perf_counter() - t0
        except Exception as e:          # noqa: BLE001 - a failed repair is retried, not fatal
            if isinstance(e, TransportError) and transport is not None:
                transport.close()
                transport = None
            with self.lock:
                self.master.repair_failed(cid, time.monotonic(), f"{type(e).__name__}: {e}")
                first = self.master.repairs[cid].attempts == 1
            if first:
                self.log(f"master: recovery of client {cid} failed (will retry): {e}",
                         flush=True)
            return transport
        with self.lock:
            reason = self.master.repairs[cid].reason
            self.master.repair_done(cid)
            self._save()
            detected = self.detected.pop(cid, started)
            self.reports.append({"id": cid, "reason": reason, "detected_at": detected,
                                 "started_at": started, "connect_s": connect_s,
                                 "recover_s": recover_s, "finished_at": time.time(),
                                 "report": _plain(report.as_dict())})
        self.log(f"master: client {cid} recovered in {recover_s * 1000:.1f} ms; id free",
                 flush=True)
        return transport

    # -- the process ---------------------------------------------------------------------------
    def serve(self, endpoint: str, stop: Callable[[], bool],
              on_bound: Callable[[str], None] = lambda ep: None) -> None:
        """Serve until ``stop()`` is true (checked every ``TICK``)."""
        check_endpoint(self.config, endpoint, "master")
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        auth = secure_server(ctx, sock, self.config, -1, key_name="master")
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        threads = [threading.Thread(target=self._guarded, args=(f,), daemon=True, name=n)
                   for f, n in ((self.heartbeat_loop, "heartbeat"), (self.repair_loop, "repair"))]
        try:
            bound = bind(sock, endpoint)
            for t in threads:
                t.start()
            on_bound(bound)
            sock.setsockopt(zmq.RCVTIMEO, int(TICK * 1000))
            while not stop() and not self.stopping.is_set():
                self.tick()
                try:
                    ident = sock.recv()
                except zmq.Again:
                    continue
                data = sock.recv(copy=False)
                if data.more:
                    while sock.recv(copy=False).more:
                        pass
                    continue
                try:
                    reply = self.handle(data.bytes)
                except Exception as e:        # noqa: BLE001 - a bug must not stop the master
                    print(f"master: internal error: {e!r}", file=sys.stderr, flush=True)
                    reply = wire.encode_reply(-1, [], [0, wire.ERR_MALFORMED, "internal error"])
                sock.send(ident, zmq.SNDMORE | zmq.NOBLOCK)
                sock.send(reply, zmq.NOBLOCK)
        finally:
            self.stopping.set()
            self.repair_due.set()
            for t in threads:
                if t.is_alive():
                    t.join(self.config.timeout + 1)
            sock.close(0)
            if self.id_transport is not None:
                self.id_transport.close()
            if auth is not None:
                auth.stop()
            with self.lock:
                self._save()

    def _guarded(self, loop: Callable[[], None]) -> None:
        """A background loop that fails stops the master rather than leaving it half alive."""
        try:
            loop()
        except Exception as e:          # noqa: BLE001
            self.log(f"master: {threading.current_thread().name} thread failed: {e!r}",
                     file=sys.stderr, flush=True)
            self.failed = True
            self.stopping.set()


def _plain(value):
    """A recovery report as msgpack/JSON-friendly values (string keys)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fusee master", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="cluster config (TOML)")
    p.add_argument("--state", help="state file (default: <config dir>/<cluster name>"
                   ".master.json); a restarted master carries on from it")
    p.add_argument("--endpoint", help="bind here instead of the config's master endpoint")
    p.add_argument("--transport", help="backend for repairs and id draws (default: config's)")
    p.add_argument("--ready-file", help="write {endpoint, pid} here once serving")
    p.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    args = p.parse_args(argv)
    try:
        config = ClusterConfig.load(args.config)
        endpoint = args.endpoint or config.master
        if not endpoint:
            raise ConfigError(f"{args.config} names no master endpoint (and no --endpoint)")
        state = args.state or Path(args.config).with_name(f"{config.name}.master.json")
        server = MasterServer(config, state, args.transport)
    except (ConfigError, StateError) as e:
        print(f"fusee master: error: {e}", file=sys.stderr)
        return 2
    stop = stop_condition(args.parent_pid)

    def bound(ep: str) -> None:
        print(f"master serving {ep} for {len(config.memnodes)} memory nodes "
              f"(client lease {config.client_lease:g} s, MN lease {config.mn_lease:g} s)",
              flush=True)
        write_ready(args.ready_file, endpoint=ep)

    try:
        server.serve(endpoint, stop, bound)
    except (ConfigError, zmq.ZMQError) as e:
        print(f"fusee master: error: {e}", file=sys.stderr)
        return 2
    return 1 if server.failed else 0


if __name__ == "__main__":
    sys.exit(main())
