"""The master's requests, served on its main thread: ``register``, ``renew``, ``release``,
``status`` and ``ping`` (the protocol: ``fusee/master/protocol.py``). A master standing by
answers only ``ping``; every other request gets ERR_STANDBY, and the client asks the next
master of its list.

The master's three threads share one ``Master`` under one lock (``fusee/master/shared.py``), so
the code of each thread is a subclass of that shared state, in a module of its own;
``MasterServer`` (``fusee/master/server.py``) is made of the three.
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Any

from fusee.client_ids import client_states, fresh_client_id
from fusee.driver import run
from fusee.emulator import wire
from fusee.errors import ClientLimit, FuseeError, NodeRestarted
from fusee.layout import CLEAN
from fusee.master.logic import LeaseError, TransitionInProgress
from fusee.master.protocol import ERR_STANDBY, INCARNATIONS, PING, encode_grant, error_code
from fusee.master.shared import SharedState
from fusee.verbs import TransportError


class Requests(SharedState):
    """The handlers of the master's requests (``MasterServer.methods`` names them)."""

    def handle(self, data: bytes) -> bytes:
        """One request in, one reply out; no exception escapes."""
        try:
            kind, seq, name, args = wire.decode_request(data)
        except wire.MalformedMessage as e:
            return wire.encode_reply(-1, [], [0, wire.ERR_MALFORMED, str(e)])
        method = self.methods.get(name) if kind == wire.CONTROL else None
        self.tally["requests"] += 1
        if method is None:
            return wire.encode_reply(seq, [], [0, wire.ERR_MALFORMED, f"unknown request {name!r}"])
        if name != PING and not self.leading():
            return wire.encode_reply(seq, [], [0, ERR_STANDBY, self._standing_by()])
        try:
            return wire.encode_reply(seq, [method(args)])
        except (LeaseError, TransitionInProgress) as e:
            return wire.encode_reply(seq, [], [0, error_code(e), str(e)])
        except (FuseeError, TransportError, OSError, ValueError, TypeError, KeyError) as e:
            return wire.encode_reply(seq, [], [0, wire.ERR_CONTROL, f"{name}: {e}"])

    def _standing_by(self) -> str:
        leader = self.leadership.leader() if self.leadership is not None else None
        return (f"this master (pid {os.getpid()}) stands by; "
                + (f"the leader is {leader}" if leader else "no leader is elected yet"))

    @staticmethod
    def _ints(args: dict[str, Any], *names: str, optional: tuple[str, ...] = ()) -> list[Any]:
        values = [args[n] for n in names] + [args.get(n, 0) for n in optional]
        if any(type(v) is not int for v in values):
            raise TypeError(f"{', '.join(names + optional)} must be integers")
        return values

    def _register(self, args: dict[str, Any]) -> dict[str, Any]:
        """Lease a recovered id, a fresh one, or the one asked for (``id``) to a new client."""
        want = args.get("id")
        limit = self.config.layout.max_clients
        if want is not None and not (type(want) is int and 0 <= want < limit):
            raise ValueError(f"client id must be an integer in [0, {limit})")
        for _ in range(2):
            with self.lock:
                reusable = self.logic.admit()
                cid = want if want is not None else \
                    reusable if reusable is not None else self.logic.draw_id()
                if cid is not None:
                    if cid >= limit:
                        raise ClientLimit(f"all {limit} client ids are taken")
                    g = self.logic.grant(cid, secrets.randbits(62), time.monotonic())
                    self._save()                    # before the client can act on it
                    membership = self.logic.membership
                    incarnations = (dict(self.logic.incarnations)
                                    if args.get(INCARNATIONS) is True else None)
                    break
            try:
                seed = self._survey()               # outside the lock: it talks to the MNs
            except NodeRestarted as e:              # failed over now: register after it
                raise TransitionInProgress(str(e)) from None
            with self.lock:
                self.logic.seed_ids(*seed)
                self._save()
                self.work_due.set()                 # ids found in use await recovery
        self.tally["registrations"] += 1
        self.log(f"master: client {cid} registered", flush=True)
        return encode_grant(g, membership, 0, incarnations)

    def _survey(self) -> tuple[int, list[int], list[int]]:
        """The arguments of ``Master.seed_ids``: the MNs' client-id counter word (FAA), where
        the master's own counter starts, so that ids drawn before there was a master are
        never handed out as fresh; the ids below it marked CLEAN, and every id marked in
        use."""
        with self.lock:
            membership, down = self.logic.membership, self._down()
        transport = self._connect(down)
        try:
            first = run(fresh_client_id(self.config, membership), transport)
            states = run(client_states(self.config, membership,
                                       list(range(self.config.layout.max_clients))), transport)
        finally:
            transport.close()
        return (first, [i for i, (state, _) in enumerate(states[:first]) if state == CLEAN],
                [i for i, (state, _) in enumerate(states) if state != CLEAN])

    def _renew(self, args: dict[str, Any]) -> dict[str, Any]:
        """``paused``: the pause epoch the client acked; ``epoch``: the membership it has."""
        cid, token, paused, known = self._ints(args, "id", "token",
                                               optional=("paused", "epoch"))
        # as of its arrival, as ``tick`` judges: the lock may be held for long (the worker's
        # save to a ZooKeeper without quorum), which says nothing of this client's health,
        # and the client counts its lease from before it sent this, so never longer
        arrived = time.monotonic()
        with self.lock:
            try:
                acked = self.logic.acks.get(cid)
                g = self.logic.renew(cid, token, arrived, paused)
            except LeaseError:
                self._note_expired(cid)
                self._save()
                raise
            membership = self.logic.membership
            # with each membership, the incarnations of its live MNs (a rebuilt one's is new)
            incarnations = (dict(self.logic.incarnations)
                            if membership.epoch > known and args.get(INCARNATIONS) is True
                            else None)
            self.tally["renewals"] += 1
            if g.pause and acked != paused and not self.logic.waiting_for():
                self.work_due.set()                 # the last ack: the failover may start
        return encode_grant(g, membership, known, incarnations)

    def _release(self, args: dict[str, Any]) -> None:
        cid, token = self._ints(args, "id", "token")
        with self.lock:
            self.logic.release(cid, token)
            self.detected[cid] = time.time()
            self._save()
            if not self.logic.waiting_for():
                self.work_due.set()
        self.log(f"master: client {cid} released its id", flush=True)

    def _status(self, args: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            status = self.logic.status(time.monotonic())
            status["repaired"] = list(self.reports)
            status["failovers"] = list(self.failovers)
            status["rebuilds"] = list(self.rebuilds)
        status["pid"] = os.getpid()
        return status

    def _note_expired(self, cid: int) -> None:
        if cid in self.logic.repairs and cid not in self.detected:
            self.detected[cid] = time.time()
            self.work_due.set()
            self.log(f"master: client {cid} lease expired: recovery scheduled", flush=True)
