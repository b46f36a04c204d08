"""``fusee.driver.run`` in C (``_atomic.driver``) against its spec, ``run_in_python``.

Random scripts drive the same kinds of operation through both loops: generators (and an
object that only has send/throw/close) whose steps are lists of verbs, empty, tuples, not
verbs (Backoff, AwaitMembership) or not a step at all; executors that complete them, raise a
TransportError, KeyboardInterrupt, StopIteration or a bug; operations that catch what is
thrown in and go on, return, raise something else, or raise again when closed. Every outcome
must be the same: what the operation and the executor saw, in order, the result or the
exception (its type, arguments and the chain of its contexts), and whether the operation was
left suspended, finished or closed.
"""

from __future__ import annotations

import inspect
import random

import pytest

from fusee import driver
from fusee.driver import run_in_python
from fusee.verbs import AwaitMembership, Backoff, NodeTimeout, Read, RemoteAccessError

RUN_IN_C = driver._RUN_IN_C


@pytest.fixture(autouse=True)
def _the_c_loop_is_built():
    """Every install builds the extension: a missing build fails here, it is not skipped."""
    assert RUN_IN_C is not None, "the C extension is not built: build_ext --inplace"

#: what the executor does with a batch of verbs
EXECUTES = ("complete", "complete", "complete", "transport", "timeout", "interrupt", "stop",
            "bug")
#: what an operation yields
STEPS = ("verbs", "verbs", "verbs", "empty", "tuple", "empty tuple", "backoff", "await",
         "not a step", "falsy raising", "truthy raising transport")
#: what an operation does with an error thrown in
ON_ERROR = ("go on", "go on", "return", "raise again", "raise another", "raise after")
#: what an operation does when closed
ON_CLOSE = ("nothing", "nothing", "raise", "return")


class Bug(Exception):
    pass


class Closing(Exception):
    pass


class Truthy:
    """A step whose truth (or first item) is not what a list's is."""

    def __init__(self, truth: BaseException | bool) -> None:
        self.truth = truth

    def __bool__(self) -> bool:
        if isinstance(self.truth, BaseException):
            raise self.truth
        return self.truth

    def __getitem__(self, i: int) -> object:
        raise RemoteAccessError("no first item", 0)

    def __repr__(self) -> str:
        return f"Truthy({self.truth!r})"


def step_of(kind: str, i: int) -> object:
    return {"verbs": lambda: [Read(i % 3, 8 * i, 8), Read((i + 1) % 3, 0, 8)],
            "empty": lambda: [], "tuple": lambda: (Read(0, i, 8),), "empty tuple": lambda: (),
            "backoff": lambda: [Backoff(0.0)], "await": lambda: [AwaitMembership(i)],
            "not a step": lambda: 5, "falsy raising": lambda: Truthy(KeyError("truth")),
            "truthy raising transport": lambda: Truthy(True)}[kind]()


def operation(script: dict, log: list):
    """The generator one script makes (a fresh one each time it is called)."""
    try:
        for i, kind in enumerate(script["steps"]):
            try:
                got = yield step_of(kind, i)
                log.append(("got", repr(got)))
            except Exception as e:
                log.append(("caught", type(e).__name__, str(e)))
                what = script["on_error"][i]
                if what == "return":
                    return ("returned early", i)
                if what == "raise again":
                    raise
                if what == "raise another":
                    raise Bug(f"after {type(e).__name__}")  # noqa: B904 (compared: its context)
                if what == "raise after":
                    log.append("handled")
            if script.get("fail_at") == i:
                raise Bug(f"op failed at {i}")
        return ("done", len(script["steps"]))
    except GeneratorExit:
        log.append("closed")
        if script["on_close"] == "raise":
            cause = None if script.get("cut") else Closing("its cause")
            raise Closing("while closing") from cause
        if script["on_close"] == "return":
            return "ignored"
        raise


class Protocol:
    """An operation that is not a generator: send/throw/close only, the steps of a script."""

    def __init__(self, script: dict, log: list) -> None:
        self.gen = operation(script, log)
        self.log = log

    def send(self, value):
        self.log.append("send")
        return self.gen.send(value)

    def throw(self, error):
        self.log.append("throw")
        return self.gen.throw(error)

    def close(self):
        self.log.append("close")
        return self.gen.close()


class Executor:
    def __init__(self, script: dict, log: list, hook: bool) -> None:
        self.script = script
        self.log = log
        self.calls = 0
        if hook:
            self.await_membership = self._await

    def _await(self, epoch: int):
        self.log.append(("await", epoch))
        raise NodeTimeout(f"no epoch after {epoch}", None, [None])

    def execute(self, batch):
        what = self.script["executes"][self.calls % len(self.script["executes"])]
        self.calls += 1
        self.log.append(("execute", repr(batch), what))
        if what == "transport":
            raise RemoteAccessError("refused", 1, [None] * len(batch))
        if what == "timeout":
            raise NodeTimeout("silent", 2, None)
        if what == "interrupt":
            raise KeyboardInterrupt
        if what == "stop":
            raise StopIteration(("stopped", self.calls))
        if what == "bug":
            raise Bug("executor bug")
        return [b"x" * 8 for _ in batch]


def chain(e: BaseException | None) -> list:
    out = []
    while e is not None and len(out) < 10:
        out.append((type(e).__name__, e.args, e.__suppress_context__))
        e = e.__context__
    return out


def outcome(run, script: dict, protocol: bool) -> tuple:
    log: list = []
    op = Protocol(script, log) if protocol else operation(script, log)
    executor = Executor(script, log, script["hook"])
    try:
        result = ("result", run(op, executor))
    except BaseException as e:      # noqa: BLE001 (KeyboardInterrupt among them: compared)
        result = ("raised", chain(e), chain(e.__cause__))
    gen = op.gen if protocol else op
    ended = result, list(log), inspect.getgeneratorstate(gen)
    try:
        gen.close()         # one left suspended (see "stop"), not for the collector to close
    except Closing:
        pass
    return ended


def random_script(rng: random.Random) -> dict:
    n = rng.randint(1, 5)
    script = {"steps": [rng.choice(STEPS) for _ in range(n)],
              "on_error": [rng.choice(ON_ERROR) for _ in range(n)],
              "executes": [rng.choice(EXECUTES) for _ in range(rng.randint(1, 4))],
              "on_close": rng.choice(ON_CLOSE), "hook": rng.random() < 0.5,
              "cut": rng.random() < 0.3}
    if rng.random() < 0.2:
        script["fail_at"] = rng.randrange(n)
    return script


@pytest.mark.parametrize("protocol", [False, True], ids=["generator", "send-throw-close"])
def test_random_scripts_end_alike(protocol):
    rng = random.Random(12)
    outcomes = set()
    for _ in range(3000):
        script = random_script(rng)
        python = outcome(run_in_python, script, protocol)
        assert outcome(RUN_IN_C, script, protocol) == python, script
        outcomes.add((python[0][0], python[2]))
    # every way an operation can end was among them
    assert {o[0] for o in outcomes} == {"result", "raised"}
    assert {o[1] for o in outcomes} == {"GEN_CLOSED", "GEN_SUSPENDED"}


@pytest.mark.parametrize("script, expected", [
    ({"steps": ["verbs"] * 3, "executes": ["complete"]}, ("result", ("done", 3))),
    ({"steps": ["verbs"], "executes": ["transport"], "on_error": ["return"]},
     ("result", ("returned early", 0))),
    ({"steps": ["verbs", "verbs"], "executes": ["stop"]}, ("result", ("stopped", 1))),
    ({"steps": ["verbs"], "executes": ["interrupt"], "on_close": "nothing"},
     ("raised", [("KeyboardInterrupt", (), False)], [])),
    ({"steps": ["verbs"], "executes": ["interrupt"], "on_close": "raise"},
     ("raised", [("Closing", ("while closing",), True), ("GeneratorExit", (), False),
                 ("KeyboardInterrupt", (), False)], [("Closing", ("its cause",), False)])),
    ({"steps": ["await"], "executes": ["complete"], "on_error": ["raise again"]},
     ("raised", [("NodeTimeout", ("no epoch after 0",), False)], [])),
])
def test_each_path(script, expected):
    """The paths by name (what the random scripts cover), with what they end in."""
    script = {"on_error": ["go on"] * len(script["steps"]), "on_close": "nothing",
              "hook": True, **script}
    for run in (run_in_python, RUN_IN_C):
        assert outcome(run, script, False)[0] == expected


def test_run_is_the_one_in_c():
    """Where the extension is built, ``run`` is the C loop's."""
    log: list = []
    script = {"steps": ["verbs"], "executes": ["complete"], "on_error": ["go on"],
              "on_close": "nothing", "hook": False}
    assert driver.run(operation(script, log), Executor(script, log, False)) == ("done", 1)
    assert driver._RUN_IN_C is RUN_IN_C is not None


def test_an_op_without_send_posts_no_batch_in_either_loop():
    """The C loop sends through the generator's am_send slot; an object without one gets
    ``send`` called by name, as the spec does: an iterator with no ``send`` (a programming
    error) fails before any round trip in both (PyIter_Send alone would have called its
    ``__next__`` and posted the first batch: the session-13 review)."""
    from fusee import driver
    from fusee.verbs import Read

    class Executor:
        def __init__(self):
            self.seen = []

        def execute(self, batch):
            self.seen.append(batch)
            return [bytes(8)] * len(batch)

    for run in (driver._RUN_IN_C, driver.run_in_python):
        ex = Executor()
        with pytest.raises(AttributeError):     # (its close, raised while the send's is handled)
            run(iter([[Read(0, 0, 8)], [Read(0, 8, 8)]]), ex)
        assert ex.seen == []


# -- ``_atomic.step`` against its spec, ``step_in_python`` ---------------------------------

def _stepped(step, make) -> list:
    """Step a fresh operation from ``make()`` to its end through ``step``: what each step
    returned (a StopIteration by its type, value and traceback), or the exception raised."""
    op, seen, arg = make(), [], None
    for _ in range(10):
        try:
            got = step(op, arg)
        except BaseException as e:      # noqa: BLE001 (compared, not swallowed)
            seen.append(("raised", type(e), e.args))
            return seen
        if type(got) is StopIteration:
            seen.append(("stop", got.value, got.args, got.__traceback__))
            return seen
        seen.append(("step", got))
        arg = [len(seen)]
    return seen


class SendOnly:
    """An operation with send alone (no am_send slot): its end is a StopIteration raised by
    a method, which both take for the end."""

    def __init__(self, ends: BaseException) -> None:
        self.n, self.ends = 0, ends

    def send(self, arg):
        self.n += 1
        if self.n > 2:
            raise self.ends
        return [arg]


def _gen(result, raises=None):
    def make():
        got = yield [Read(0, 0, 8)]
        got = yield [Read(0, 8, 8), got]
        if raises is not None:
            raise raises
        return result if result != "echo" else got
    return make


@pytest.mark.parametrize("make", [
    _gen(("done", 1)), _gen(None), _gen("echo"), _gen((1, 2)), _gen(StopIteration(3)),
    _gen(None, raises=KeyError("k")), _gen(None, raises=StopIteration(4)),
    lambda: SendOnly(StopIteration(5)), lambda: SendOnly(StopIteration()),
    lambda: SendOnly(ValueError("v")), lambda: iter([[1], [2]]),
], ids=["tuple", "none", "echo", "pair", "a StopIteration as result", "raises",
        "raises StopIteration (PEP 479)", "send-only stop", "send-only bare stop",
        "send-only raises", "no send"])
def test_step_in_c_is_step_in_python(make):
    """The same steps, result and exception for every way an operation can go on or end;
    the StopIteration returned is a fresh one, without a traceback, holding the result."""
    c = _stepped(driver._STEP, make)
    py = _stepped(driver.step_in_python, make)
    assert driver._STEP is not driver.step_in_python, "the C step is not the one in use"
    assert c == py
    if c[-1][0] == "stop":
        assert c[-1][3] is None


def test_run_concurrently_ends_operations_through_step():
    """Operations that end at once, after one step and after several, at depth 1 (alone in
    flight), depth 2 and unbounded: each result reaches its place, as with ``run``."""
    from fusee.driver import run_concurrently

    class Executor:
        def execute(self, batch):
            return [bytes(8)] * len(batch)

    def op(i):
        for k in range(i % 4):
            yield [Read(0, 8 * k, 8)]
        return i * 10

    for depth in (1, 2, 0):
        assert run_concurrently((op(i) for i in range(9)), Executor(), depth) == \
            [i * 10 for i in range(9)]
