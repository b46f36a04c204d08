"""Hardware profiles of the timing model: what a verb, a client step and an RPC cost.

A profile is a TOML file (``benchmarks/profiles/*.toml``); every number in it carries its
source in a comment, because a model is only as good as the numbers it is fed and a reader
must be able to tell a published rate from an assumption. All times are microseconds, rates
are millions of operations per second, bandwidths gigabits per second.

The resources it describes, and how the model uses them (``fusee.emulator.timing.engine``):

- ``[network] rtt_us``: the round trip of a small verb on an idle NIC, wire and both NICs'
  fixed latency included. Half of it before a verb reaches the memory node's NIC, half after.
- ``[nic]``: each memory node's RDMA NIC, a FIFO queue: a READ or WRITE occupies it
  ``1 / message_rate + bytes / bandwidth``; a CAS or FAA also occupies its atomic unit for
  ``1 / atomic_rate`` (atomics are far slower than READ/WRITE on older NICs).
- ``[client]``: the CPU of a client for one step of an operation (receive the completions,
  run the operation's logic, post the next batch): ``cpu_per_step_us`` plus
  ``cpu_per_verb_us`` per verb posted. ``cores`` = 0 gives every client a core of its own;
  N > 0 makes all clients share N cores (clients packed on one small host). A table
  ``[client.cpu_per_step_us_by_op]`` (search = 12.0, ...) sets the step cost per operation
  kind where one number does not fit (a measured profile, ``fusee.emulator.timing.calibrate``).
- ``[metadata_server]``: the Clover-style baseline's metadata server, ``cores`` cores each
  spending ``rpc_us`` per request.
- ``[failure]``: how long a verb to a dead node waits before it gives up, how long the master
  takes to declare the node dead, and what one round trip of the failover costs.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

#: where the shipped profiles live (``--profile NAME`` looks here)
PROFILES = Path(__file__).resolve().parents[2] / "benchmarks" / "profiles"


class ProfileError(ValueError):
    """A profile file is missing, malformed or has a value out of range."""


@dataclass(frozen=True)
class Profile:
    name: str
    rtt_us: float
    nic_message_rate_mops: float
    nic_bandwidth_gbps: float
    nic_atomic_rate_mops: float
    client_cpu_per_step_us: float
    client_cpu_per_verb_us: float
    client_cores: int
    ms_cores: int
    ms_rpc_us: float
    verb_timeout_us: float
    detect_us: float
    failover_round_trip_us: float
    description: str = ""
    #: operation kind -> CPU per step (us), where it differs from ``client_cpu_per_step_us``
    client_cpu_per_step_by_op: dict = field(default_factory=dict)

    def step_us(self, kind: str) -> float:
        return self.client_cpu_per_step_by_op.get(kind, self.client_cpu_per_step_us)

    @property
    def message_us(self) -> float:
        return 1.0 / self.nic_message_rate_mops

    @property
    def atomic_us(self) -> float:
        return 1.0 / self.nic_atomic_rate_mops

    @property
    def us_per_byte(self) -> float:
        return 8.0 / (self.nic_bandwidth_gbps * 1000.0)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


#: (table, key) in the file -> field of Profile, and whether the value may be zero
_LAYOUT = {
    ("network", "rtt_us"): ("rtt_us", True),
    ("nic", "message_rate_mops"): ("nic_message_rate_mops", False),
    ("nic", "bandwidth_gbps"): ("nic_bandwidth_gbps", False),
    ("nic", "atomic_rate_mops"): ("nic_atomic_rate_mops", False),
    ("client", "cpu_per_step_us"): ("client_cpu_per_step_us", True),
    ("client", "cpu_per_verb_us"): ("client_cpu_per_verb_us", True),
    ("client", "cores"): ("client_cores", True),
    ("metadata_server", "cores"): ("ms_cores", False),
    ("metadata_server", "rpc_us"): ("ms_rpc_us", True),
    ("failure", "verb_timeout_us"): ("verb_timeout_us", True),
    ("failure", "detect_us"): ("detect_us", True),
    ("failure", "failover_round_trip_us"): ("failover_round_trip_us", True),
}
_INTEGERS = {"client_cores", "ms_cores"}


def from_dict(doc: dict, name: str) -> Profile:
    """A Profile from a parsed TOML document; ProfileError names the bad key."""
    values: dict = {"name": doc.get("name", name), "description": doc.get("description", "")}
    for (table, key), (name_of, zero_ok) in _LAYOUT.items():
        v = doc.get(table, {}).get(key) if isinstance(doc.get(table), dict) else None
        where = f"profile {name}: [{table}] {key}"
        if v is None:
            raise ProfileError(f"{where} is missing")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ProfileError(f"{where} must be a number, got {v!r}")
        if name_of in _INTEGERS and not isinstance(v, int):
            raise ProfileError(f"{where} must be a whole number, got {v!r}")
        if v < 0 or (v == 0 and not zero_ok):
            raise ProfileError(f"{where} must be {'>= 0' if zero_ok else '> 0'}, got {v!r}")
        values[name_of] = v
    by_op = doc.get("client", {}).get("cpu_per_step_us_by_op", {})
    if not isinstance(by_op, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
            for v in by_op.values()):
        raise ProfileError(f"profile {name}: [client.cpu_per_step_us_by_op] must map "
                           f"operation kinds to numbers >= 0")
    return Profile(**values, client_cpu_per_step_by_op=dict(by_op))


def load(spec: str | Path) -> Profile:
    """A profile by file path, or by the name of a shipped one (``cx3-56g``)."""
    path = Path(spec)
    if not path.suffix and not path.exists():
        path = PROFILES / f"{spec}.toml"
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        shipped = ", ".join(sorted(p.stem for p in PROFILES.glob("*.toml")))
        raise ProfileError(f"no profile {str(spec)!r} (a TOML file, or one of: {shipped})") \
            from None
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ProfileError(f"profile {path} is not valid TOML: {e}") from None
    return from_dict(doc, path.stem)
