"""Process-level chaos, as an operator would meet it: real ``fusee memnode`` processes (zmq
over ipc, or shm; r = 3), masters electing their leader on a real ZooKeeper ensemble
(``fusee.emulator.testkit.zk_ensemble``), client processes running a mixed workload (single
operations, ``get_many``, ``put_many``, pipelines) that log every invocation and outcome, and
a seeded schedule of faults, one at a time:

- ``mn``: an MN killed (SIGKILL), failed over, restarted with ``--rejoin`` and rebuilt;
  sometimes another MN (or the rejoining one again) killed while the rebuild runs;
- ``master-kill``: the leading master SIGKILLed (a standby takes over);
- ``master-stop``: the leading master SIGSTOPped until a standby leads, then SIGCONTed (the
  deposed leader must exit with status 1);
- ``zk-one``: one ZooKeeper server killed, then restarted;
- ``zk-quorum``: two of three killed for two client leases (the quorum lost), then restarted;
- ``client``: a client process killed mid-operation (the master recovers its id) and a new
  one started in its place.

and harsher ones (``COMBOS``): ``X+Y`` is an MN killed (``mn``) or rebuilt (``rebuild``) while
Y happens; ``two-mns`` (killed at once), ``mn-stop`` (SIGSTOPped past its lease, then killed
and rejoined), ``mn-fast`` (restarted at once, before the master saw it die; ``+rebuild``:
while another MN is rebuilt), ``masters-all`` (every master killed for up to two leases;
``+mn``: an MN dies meanwhile), ``zk-all`` (every ZooKeeper server), ``client-stop`` (a client
SIGSTOPped past its lease: LeaseExpired or Fenced is its due, and it opens a new client).
Never more than two MNs are down or not yet rebuilt at once (r = 3).

A supervisor restarts every master that exits (systemd's ``Restart=always``), and
``fusee status`` runs all along. ``run_round`` returns the findings, each one line (a lost
write, a wedge, a failed operation, an operation that took longer than a failover may take,
a traceback in any process's output, a ``fusee status`` that hung or did not say why in one
line, a leak in the audit, leftovers after the cluster stopped); none is a clean round.

Run by tests/test_chaos_processes.py (``-m soak``) and ``python3 tests/run_chaos.py``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from chaos_clients import KEYS, history, worker
from histories import unexpected_errors
from processes import StopFlag

from fusee.config import LayoutConfig
from fusee.emulator.cluster import LocalCluster, master_name
from fusee.emulator.testkit import zk_ensemble
from fusee.emulator.testkit.history import CRASHED, OK, Op
from fusee.emulator.testkit.linearizability import check
from fusee.master.link import MasterError, membership_wait

KINDS = ["mn", "master-kill", "master-stop", "zk-one", "zk-quorum", "client"]
#: two faults at once, and the harsher ones (the module's docstring)
COMBOS = ["mn+master-kill", "mn+master-stop", "rebuild+master-kill", "mn+zk-quorum",
          "mn+client", "rebuild+zk-quorum", "two-mns", "mn-stop", "masters-all", "zk-all",
          "client-stop", "mn-fast", "masters-all+mn", "mn-fast+rebuild"]
LEASES = dict(client_lease=2.0, mn_lease=2.0, timeout=1.0)
SMALL = dict(region_size=8 << 20, block_size=256 << 10, index_size=1 << 20, max_clients=64)
#: what a client stopped past its lease meets, by design: open a new client
LOST_LEASE = ("LeaseExpired", "Fenced")
#: operations every live client must complete after each fault
STEP = 40
WAIT = 180.0


# -- the round ----------------------------------------------------------------------------------

@dataclass
class Round:
    seed: int
    steps: int
    backend: str = "zmq"
    memnodes: int = 5
    masters: int = 3
    clients: int = 3
    kinds: tuple[str, ...] = tuple(KINDS)
    findings: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    ops: int = 0
    seconds: float = 0.0
    statuses: int = 0
    #: what is not a finding but worth knowing (operations that said why they failed)
    notes: list[str] = field(default_factory=list)
    #: what ``fusee status`` said when it failed (one line, by design), and how often
    status_errors: dict[str, int] = field(default_factory=dict)

    ended: bool = False

    def find(self, what: str) -> None:
        when = "at the end" if self.ended else f"step {len(self.done)}"
        self.findings.append(f"[seed {self.seed} {when}] {what}")


class Chaos:
    def __init__(self, r: Round, zk: zk_ensemble.ZooKeeperEnsemble, c: LocalCluster,
                 tmp: Path) -> None:
        self.r, self.zk, self.c, self.tmp = r, zk, c, tmp
        self.rng = random.Random(r.seed)
        self.ctx = mp.get_context("spawn")
        self.progress = self.ctx.Array("q", r.clients, lock=False)
        self.stop = StopFlag(self.ctx)
        self.procs: list = [None] * r.clients
        self.names: list[str] = []
        self.slot_name: dict[int, str] = {}
        #: the clients SIGSTOPped past their lease: LeaseExpired is their due
        self.stopped: set[str] = set()
        self.spawned = 0
        self.lock = threading.Lock()           # the supervisor vs the schedule's masters
        self.quit = threading.Event()
        self.master_exits: list[tuple[str, int]] = []
        self.shm_seen: set[str] = set(c.shm_names.values())
        #: MNs killed since the cluster was last quiet -> the incarnation the master knew
        self.pending: dict[int, str | None] = {}
        for slot in range(r.clients):
            self.spawn(slot)
        self.threads = [threading.Thread(target=self._supervise, daemon=True),
                        threading.Thread(target=self._status_loop, daemon=True)]
        for t in self.threads:
            t.start()

    # -- helpers ----------------------------------------------------------------------------
    def spawn(self, slot: int) -> None:
        name = f"c{self.spawned}"
        self.spawned += 1
        self.names.append(name)
        self.slot_name[slot] = name
        p = self.ctx.Process(target=worker, args=(
            str(self.c.config_path), name, self.r.seed * 1000 + self.spawned,
            str(self.tmp / f"{name}.jsonl"), str(self.tmp / f"{name}.err"), self.progress,
            slot, self.stop, os.getpid()))
        p.start()
        self.procs[slot] = p

    def _supervise(self) -> None:
        """Restart a master that exited (a deposed leader exits with status 1, by design;
        one started while ZooKeeper has no quorum says so and exits with 2)."""
        refused: set = set()
        while not self.quit.wait(0.2):
            with self.lock:
                for name, proc in list(self.c.master_procs.items()):
                    if proc.poll() is None:
                        continue
                    self.master_exits.append((name, proc.returncode))
                    if proc.returncode not in (1, -signal.SIGKILL) and proc not in refused:
                        self.r.find(f"{name} exited with {proc.returncode}")
                    i = 0 if name == "master" else int(name.removeprefix("master"))
                    try:
                        self.c.start_master(i)
                    except Exception as e:      # noqa: BLE001 - a finding, retried
                        if "cannot reach ZooKeeper" in str(e).splitlines()[-1]:
                            # its one line while the quorum is lost: retried, as systemd would
                            refused.add(self.c.master_procs[name])
                        else:
                            self.r.find(f"{name} did not start again: {str(e)[-300:]}")

    def _status_loop(self) -> None:
        """``fusee status`` every second or so: it must answer, or say why in one line."""
        while not self.quit.wait(1.0):
            self.status_once()

    def status_once(self) -> None:
        t = time.monotonic()
        try:
            out = subprocess.run([sys.executable, "-m", "fusee.cli", "status", "--config",
                                  str(self.c.config_path)], capture_output=True, text=True,
                                 timeout=60)
        except subprocess.TimeoutExpired:
            self.r.find("fusee status hung for 60 s")
            return
        self.r.statuses += 1
        took = time.monotonic() - t
        err = out.stderr.strip().splitlines()
        if out.returncode != 0:
            self.r.status_errors[f"rc {out.returncode}: {err[-1][:160] if err else ''}"] = \
                self.r.status_errors.get(f"rc {out.returncode}: "
                                         f"{err[-1][:160] if err else ''}", 0) + 1
        if "Traceback" in out.stderr or "Traceback" in out.stdout:
            self.r.find(f"fusee status printed a traceback: {out.stderr[-400:]!r}")
        elif out.returncode != 0 and len(err) != 1:
            self.r.find(f"fusee status exited {out.returncode} with {len(err)} lines: "
                        f"{out.stderr[-300:]!r}")
        elif took > 4 * self.c.config.timeout + 5:
            self.r.find(f"fusee status took {took:.1f} s (rc {out.returncode})")

    def leader(self, other_than: int | None = None, timeout: float = 90) -> int | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                pid = self.c.master_status(patience=2)["pid"]
                for n, p in list(self.c.master_procs.items()):
                    if p.pid == pid:
                        i = 0 if n == "master" else int(n.removeprefix("master"))
                        if i != other_than:
                            return i
            except (MasterError, OSError):
                pass
            time.sleep(0.1)
        self.r.find(f"no leading master (other than {other_than}) within {timeout:g} s")
        return None

    def status_until(self, predicate, what: str, timeout: float = WAIT) -> dict | None:
        deadline = time.monotonic() + timeout
        s: dict = {}
        while time.monotonic() < deadline:
            try:
                s = self.c.master_status(patience=2)
                if predicate(s):
                    return s
            except (MasterError, OSError):
                pass
            time.sleep(0.1)
        self.r.find(f"wedge: {what} not within {timeout:g} s (dead {s.get('dead')}, failing "
                    f"{s.get('failing')}, repairs {s.get('repairs')}, pause {s.get('pause')})")
        return None

    def advance(self, what: str) -> bool:
        marks = list(self.progress)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if all(self.progress[i] >= marks[i] + STEP for i in range(self.r.clients)):
                return True
            time.sleep(0.1)
        stuck = [self.names_in_slot(i) for i in range(self.r.clients)
                 if self.progress[i] < marks[i] + STEP]
        self.r.find(f"wedge: clients {stuck} made < {STEP} operations in {WAIT:g} s after "
                    f"{what}")
        return False

    def names_in_slot(self, slot: int) -> str:
        return f"slot{slot}(pid {self.procs[slot].pid})"

    def kill_mn(self, node: int) -> None:
        """SIGKILL MN ``node``, noting the incarnation the master knows it by: a restart
        within the MN lease shows only as a new one."""
        try:
            old = self.c.master_status(patience=2)["incarnations"].get(str(node))
        except Exception:                       # noqa: BLE001 - no master answers now
            old = None
        self.pending.setdefault(node, old)
        self.c.kill(node)

    def quiet(self) -> dict | None:
        """Wait until no MN is dead, failing or rebuilt, and every MN killed since is known
        by a new incarnation (restarted at once, it looks alive until the master pings it)."""
        pending = dict(self.pending)
        self.pending.clear()
        return self.status_until(
            lambda s: not (s["dead"] or s["failing"] or s["pause"] or s["repairs"]) and
            all(old is None or s["incarnations"].get(str(m)) != old
                for m, old in pending.items()),
            f"a quiet cluster (MNs {sorted(pending)} rebuilt)")

    def rejoin(self, node: int, failed_over: bool = True) -> None:
        """Restart killed MN ``node`` with ``--rejoin``: once the master has failed it over
        (``failed_over``), or at once."""
        if failed_over:
            self.status_until(lambda s: node in s["dead"], f"MN {node}'s failover")
        with self.lock:
            self.c.rejoin(node)
        self.shm_seen.update(self.c.shm_names.values())

    def without_masters(self, meanwhile=lambda: None) -> None:
        """Every master killed; ``meanwhile()``; up to two leases later, all started again."""
        with self.lock:                         # the supervisor restarts none meanwhile
            for i in range(self.r.masters):
                self.c.stop_master(kill=True, i=i)
            meanwhile()
            time.sleep(self.rng.uniform(0.5, 2 * self.c.config.client_lease))
            for i in range(self.r.masters):
                self.c.start_master(i)

    # -- the faults ---------------------------------------------------------------------------
    def fault(self, kind: str) -> None:
        c, rng = self.c, self.rng
        if kind == "mn":
            victim = rng.randrange(self.r.memnodes)
            self.kill_mn(victim)
            self.rejoin(victim)
            if rng.random() < 0.4:              # again, during the rebuild
                time.sleep(rng.uniform(0.0, 1.5))
                second = rng.choice([victim, rng.randrange(self.r.memnodes)])
                self.r.done.append(f"  +kill MN {second} during the rebuild")
                self.kill_mn(second)
                self.rejoin(second)
            self.quiet()
        elif kind == "two-mns":
            victims = rng.sample(range(self.r.memnodes), 2)
            for v in victims:
                self.kill_mn(v)
            for v in victims:
                self.rejoin(v)
            self.quiet()
        elif kind == "mn-stop":
            victim = rng.randrange(self.r.memnodes)
            proc = c.procs[victim]
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                self.status_until(lambda s: victim in s["dead"], f"MN {victim}'s failover")
            finally:
                os.kill(proc.pid, signal.SIGCONT)
            time.sleep(rng.uniform(0, 1))
            self.kill_mn(victim)                # as the operator must, then rejoin it
            self.rejoin(victim, failed_over=False)
            self.quiet()
        elif kind in ("mn-fast", "mn-fast+rebuild"):
            # restarted at once (systemd's Restart=always), before the master saw it die;
            # or while another MN's rebuild runs
            if kind == "mn-fast+rebuild":
                other = rng.randrange(self.r.memnodes)
                self.kill_mn(other)
                self.rejoin(other)
                time.sleep(rng.uniform(0.0, 0.4))
            victim = rng.randrange(self.r.memnodes)
            self.kill_mn(victim)
            self.rejoin(victim, failed_over=False)
            self.quiet()
        elif kind == "masters-all+mn":
            victim = rng.randrange(self.r.memnodes)
            self.without_masters(lambda: self.kill_mn(victim))    # none runs when it dies
            self.rejoin(victim)
            self.quiet()
        elif kind == "masters-all":
            self.without_masters()
            self.leader()
        elif kind == "zk-all":
            for i in range(3):
                self.zk.kill(i)
            time.sleep(rng.uniform(0.5, 2 * c.config.client_lease))
            self.zk.start()                     # all at once: one alone has no quorum
            self.leader()
        elif kind == "client-stop":
            slot = rng.randrange(self.r.clients)
            pid = self.procs[slot].pid
            self.stopped.add(self.slot_name[slot])
            os.kill(pid, signal.SIGSTOP)
            time.sleep(3 * c.config.client_lease + c.config.timeout)   # its lease lapses
            os.kill(pid, signal.SIGCONT)
        elif kind in COMBOS:
            self.combo(kind)
        elif kind == "master-kill":
            killed = self.kill_leader(stop=False)
            if killed is not None:
                self.leader(other_than=killed[0])
        elif kind == "master-stop":
            stopped = self.kill_leader(stop=True)
            if stopped is not None:
                self.wake(*stopped)
        elif kind == "zk-one":
            i = rng.randrange(3)
            self.zk.kill(i)
            self.advance(f"ZooKeeper server {i} killed")
            self.zk.start(i)
        elif kind == "zk-quorum":
            lost = rng.sample(range(3), 2)
            for i in lost:
                self.zk.kill(i)
            time.sleep(2 * c.config.client_lease)
            for i in lost:
                self.zk.start(i)
            self.leader()
        elif kind == "client":
            slot = rng.randrange(self.r.clients)
            time.sleep(rng.uniform(0, 0.3))
            self.procs[slot].kill()
            self.procs[slot].join(10)
            self.spawn(slot)
        else:
            raise ValueError(kind)

    def kill_leader(self, stop: bool) -> tuple[int, object] | None:
        """SIGKILL (or SIGSTOP) the leading master: (its index, its process)."""
        first = self.leader()
        if first is None:
            return None
        proc = self.c.master_procs[master_name(first)]
        if stop:
            os.kill(proc.pid, signal.SIGSTOP)
        else:
            with self.lock:
                self.c.stop_master(kill=True, i=first)
        return first, proc

    def wake(self, first: int, proc) -> None:
        """SIGCONT a stopped leader once another leads; it must exit with status 1."""
        try:
            self.leader(other_than=first)
            time.sleep(self.rng.uniform(0, 2))
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        try:
            if (code := proc.wait(60)) != 1:
                self.r.find(f"the deposed {master_name(first)} exited with {code}")
        except subprocess.TimeoutExpired:
            self.r.find(f"the deposed {master_name(first)} still runs 60 s after SIGCONT")

    def combo(self, kind: str) -> None:
        """Two faults at once: an MN killed (or rebuilt) while the leader dies or stops, the
        ZooKeeper quorum is lost, or a client dies."""
        victim = self.rng.randrange(self.r.memnodes)
        first, other = kind.split("+")
        self.kill_mn(victim)
        if first == "rebuild":
            self.rejoin(victim)
            time.sleep(self.rng.uniform(0.0, 0.5))
        else:
            time.sleep(self.rng.uniform(0.0, 1.0))
        self.fault(other)
        if first != "rebuild":
            self.rejoin(victim)
        self.quiet()

    def finish(self) -> list[Op]:
        """Stop the clients; their histories, and a finding for any that did not exit."""
        self.stop.set()
        for p in self.procs:
            p.join(60)
            if p.is_alive():
                self.r.find(f"wedge: client pid {p.pid} did not stop within 60 s")
                p.kill()
                p.join()
            elif p.exitcode != 0 and p.exitcode != -signal.SIGKILL:
                self.r.find(f"a client process exited with {p.exitcode}")
        return [op for n in self.names for op in history(n, self.tmp / f"{n}.jsonl")]

    def close(self) -> None:
        self.quit.set()
        for t in self.threads:
            t.join(90)


def judge(r: Round, chaos: Chaos, ops: list[Op]) -> None:
    c = chaos.c
    r.ops = len(ops)
    bound = membership_wait(c.config)
    # a master unreachable for longer than membership_wait (ZooKeeper slow to come back):
    # the operation says so (LeaseLapsed: retry once the master is back), by design
    lapsed = [op for op in unexpected_errors(ops) if op.error.split()[0] == "LeaseLapsed"]
    if lapsed:
        r.notes.append(f"{len(lapsed)} operations raised LeaseLapsed, e.g. {lapsed[0]}")
    failed = [op for op in unexpected_errors(ops) if op not in lapsed and
              not (op.client in chaos.stopped and op.error.split()[0] in LOST_LEASE)]
    for op in failed[:10]:
        r.find(f"an operation failed: {op}")
    for op in unexpected_errors(ops):
        op.status = CRASHED                     # its outcome is unknown: it may have landed
    if len(failed) > 10:
        r.find(f"... and {len(failed) - 10} more operations failed")
    if len(failed) > 300:                       # each a free op: the check would explode
        r.find("the linearizability check skipped: too many failed operations")
        return
    long = [op for op in ops if op.ret and (op.ret - op.invoke) / 2e9 > bound and
            op not in lapsed]
    for op in long[:5]:
        r.find(f"an operation took {(op.ret - op.invoke) / 2e9:.1f} s > {bound:g} s: {op}")
    if chaos.quiet() is None:
        return
    try:
        with c.client() as reader:
            for key in sorted({op.key for op in ops} | set(KEYS)):
                t = 2 * time.monotonic_ns()
                ops.append(Op(0, "reader", "get", key, None, t, t + 1, OK, reader.get(key)))
    except Exception as e:                      # noqa: BLE001 - a finding
        r.find(f"the final reads failed: {type(e).__name__}: {e}")
        return
    # every client closed or was killed: the master must have recovered every id
    chaos.status_until(lambda s: not s["clients"] and not s["repairs"],
                       "every client id back (the killed clients' recovered)")
    for n, op in enumerate(ops):
        op.id = n
    verdict = check(ops)
    if not verdict.ok:
        r.find(f"LOST/not linearizable: {verdict.explain()[:2000]}")
    try:
        report = c.audit(timeout=WAIT)
        if not report.ok:
            r.find(f"audit: {report.explain()[:1500]}")
    except Exception as e:                      # noqa: BLE001 - a finding
        r.find(f"the audit failed: {type(e).__name__}: {e}")


def tracebacks(r: Round, where: Path) -> None:
    for log in sorted(where.glob("*.log")) + sorted(where.glob("*.err")):
        text = log.read_text(errors="replace")
        if "Traceback" in text:
            at = text.index("Traceback")
            r.find(f"{log.name} printed a traceback: {text[at:at + 1500]!r}")


def run_round(r: Round, tmp: Path, zk: zk_ensemble.ZooKeeperEnsemble | None = None,
              keep: bool = False) -> Round:
    """One round: the cluster up, ``r.steps`` faults of the seeded schedule, the verdict."""
    started = time.monotonic()
    own = zk is None
    if own:
        zk = zk_ensemble.ZooKeeperEnsemble(3).start()
    if not all(zk.serving(i) for i in range(3)):
        zk.start()                              # (a round that failed midway left some down)
    tmp.mkdir(parents=True, exist_ok=True)
    rng = random.Random(r.seed)
    c = LocalCluster(memnodes=r.memnodes, transport=r.backend, replication=3, master=True,
                     masters=r.masters, coordination=zk.url,
                     layout=LayoutConfig(**SMALL), **LEASES)
    c.start()
    workdir = c.workdir
    chaos = None
    try:
        chaos = Chaos(r, zk, c, tmp)
        chaos.advance("the start")
        for _ in range(r.steps):
            kind = rng.choice(r.kinds)
            r.done.append(kind)
            chaos.fault(kind)
            if not chaos.advance(kind):
                break
        r.ended = True
        ops = chaos.finish()
        chaos.close()
        chaos.status_once()
        judge(r, chaos, ops)
        tracebacks(r, workdir)
        tracebacks(r, tmp)
    except Exception:                           # noqa: BLE001 - the harness's own failure
        r.find(f"harness error: {traceback.format_exc()[-1500:]}")
    finally:
        if chaos is not None:
            chaos.quit.set()
            chaos.stop.set()
            for p in chaos.procs:
                if p is not None and p.is_alive():
                    p.kill()
        if keep and r.findings:
            import shutil
            shutil.copytree(workdir, tmp / "cluster", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.sock"))
        pids = [p.pid for p in [*c.procs.values(), *c.master_procs.values()]]
        c.stop()
        if own:
            zk.stop()
    for pid in pids:
        if os.path.exists(f"/proc/{pid}") and _state(pid) != "Z":
            r.find(f"process {pid} still runs after the cluster stopped")
    if workdir.exists():
        r.find(f"{workdir} left behind")
    for name in (chaos.shm_seen if chaos else ()):
        if name and os.path.exists(f"/dev/shm/{name.lstrip('/')}"):
            r.find(f"shared-memory segment {name} left behind")
    r.seconds = time.monotonic() - started
    return r


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
