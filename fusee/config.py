"""Cluster configuration: which memory nodes exist, where they listen, and how their memory is
laid out. One TOML file describes a cluster; every process (memory node, client, master) reads
the same file, so no size is a constant in code."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import tomli_w

from fusee.errors import ConfigError as ConfigError      # raised here; imported from here too

KiB, MiB = 1 << 10, 1 << 20

#: a cluster id as the config writes it: 16 hex digits, a nonzero 64-bit word
#: (fusee.cluster_identity makes them and checks them on the memory nodes)
CLUSTER_ID = re.compile(r"(?!0{16})[0-9a-f]{16}")


@dataclass(frozen=True)
class LayoutConfig:
    """Sizes of the areas of every memory node's region (docs/design.md#memory-map)."""
    region_size: int = 256 * MiB
    block_size: int = 4 * MiB           # coarse unit the MN hands to clients (paper: 16 MiB)
    max_clients: int = 1024
    client_meta_size: int = 4 * KiB     # per-client metadata slot: log heads, owned blocks
    index_size: int = 64 * MiB          # RACE directory + subtables
    initial_subtables: int = 8          # subtables present at start; the index grows by splits
    buckets_per_subtable: int = 3 * 512  # a multiple of 3 (bucket groups)
    object_unit: int = 64               # KV objects are allocated and aligned in these units
    max_key_size: int = 1024            # longest key accepted (bytes)

    def check(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if type(v) is not int or v <= 0:
                raise ConfigError(f"layout.{f.name} must be a positive integer, got {v!r}")
        for name in ("region_size", "block_size", "client_meta_size", "index_size"):
            if getattr(self, name) % 4096:
                raise ConfigError(f"layout.{name} must be a multiple of 4096")
        if self.buckets_per_subtable % 3 or self.buckets_per_subtable < 6:
            raise ConfigError("layout.buckets_per_subtable must be a multiple of 3, >= 6")
        for name in ("initial_subtables", "object_unit"):
            if getattr(self, name) & (getattr(self, name) - 1):
                raise ConfigError(f"layout.{name} must be a power of two")
        if self.object_unit < 64:
            raise ConfigError("layout.object_unit must be at least 64")
        if self.region_size > self.object_unit << 32:
            raise ConfigError("layout.region_size must be at most 2**32 object units (a slot "
                              "names an object by a 32-bit unit number)")


@dataclass(frozen=True)
class MemNodeConfig:
    id: int
    endpoint: str                # ZeroMQ endpoint of the MN (control channel and emulated NIC)
    curve_public: str | None = None   # the MN's CURVE public key (Z85), when security.curve
    metrics_port: int | None = None   # serve Prometheus metrics on this port (fusee.metrics)

    def check(self) -> None:
        """The endpoint is a ZeroMQ address (scheme://where), a tcp:// port is a port (ZeroMQ
        takes 99999 as 99999 mod 65536: the MN would serve on another port than the config
        says), a metrics port a port."""
        where = f"memnodes[{self.id}]"
        _strings(where + ".", endpoint=self.endpoint, curve_public=self.curve_public)
        if "://" not in self.endpoint:
            raise ConfigError(f"{where}.endpoint must be a ZeroMQ address such as "
                              f"tcp://host:port or ipc:///path, got {self.endpoint!r}")
        if self.endpoint.startswith("tcp://"):
            port = self.endpoint.rpartition(":")[2]
            if not (port.isdigit() and 0 < int(port) < 65536 or port == "*"):
                raise ConfigError(f"{where}.endpoint {self.endpoint!r} needs a port 1..65535 "
                                  f"(tcp://host:port)")
        if self.metrics_port is not None and not (type(self.metrics_port) is int and
                                                  0 <= self.metrics_port < 65536):
            raise ConfigError(f"{where}.metrics_port must be a port 0..65535, got "
                              f"{self.metrics_port!r}")


@dataclass(frozen=True)
class SecurityConfig:
    """Who may talk to a memory node over ZeroMQ (see transports/security.py)."""
    curve: bool = False               # CURVE authentication + encryption on every channel
    keys_dir: str | None = None       # mn<ID>.key_secret for MNs; clients/*.key: authorized ones
    client_key: str | None = None     # this client's certificate (a .key_secret file)
    allow_insecure_tcp: bool = False  # explicit opt-in to plaintext, unauthenticated tcp://

    def check(self) -> None:
        _strings("security.", keys_dir=self.keys_dir, client_key=self.client_key)
        for name in ("curve", "allow_insecure_tcp"):
            if type(getattr(self, name)) is not bool:
                raise ConfigError(f"security.{name} must be true or false, got "
                                  f"{getattr(self, name)!r}")


def _strings(where: str, **values: object) -> None:
    """Each of ``values`` is a string or unset: a TOML number or table where text belongs
    would otherwise fail deep inside a process as an "internal error"."""
    for name, v in values.items():
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{where}{name} must be a string (in quotes), got {v!r}")


@dataclass(frozen=True)
class ClusterConfig:
    memnodes: tuple[MemNodeConfig, ...]
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    name: str = "fusee"
    #: which cluster this is (fusee.cluster_identity): every MN writes it in its region's header
    #: and every client, master and rebuild refuses an MN with another; None: a cluster made
    #: before ids, whose MNs hold none
    cluster_id: str | None = None
    replication: int = 0                 # 0 = min(3, number of memory nodes)
    transport: str = "zmq"               # default client backend: local | shm | zmq | verbs
    timeout: float = 5.0                 # seconds; every network wait is bounded by it
    master: str | None = None            # endpoint of the master, if one runs (or several, "a,b")
    master_curve_public: str | None = None  # the master's CURVE public key, when security.curve
    master_metrics_port: int | None = None  # the master's Prometheus metrics port
    client_lease: float = 5.0            # seconds a client may write without renewing its lease
    mn_lease: float = 2.0                # seconds without a heartbeat before an MN is dead
    security: SecurityConfig = field(default_factory=SecurityConfig)
    coordination: str | None = None      # [master] coordination = "zookeeper://h:p,..."

    def __post_init__(self) -> None:
        if not self.memnodes:
            raise ConfigError("a cluster needs at least one memory node")
        ids = [m.id for m in self.memnodes]
        if sorted(ids) != list(range(len(ids))):
            raise ConfigError(f"memory node ids must be 0..{len(ids) - 1}, got {ids}")
        if self.cluster_id is not None and not (isinstance(self.cluster_id, str) and
                                                CLUSTER_ID.fullmatch(self.cluster_id)):
            quote = "" if isinstance(self.cluster_id, str) else ", in quotes (a TOML string)"
            raise ConfigError(f"[cluster] cluster_id must be 16 hex digits (0-9, a-f; not all "
                              f"zero){quote}, as `fusee cluster-id --config FILE` writes it; got "
                              f"{self.cluster_id!r}")
        if not 0 <= self.replication <= len(self.memnodes):
            raise ConfigError(f"replication must be 0..{len(self.memnodes)}")
        for name in ("timeout", "client_lease", "mn_lease"):
            v = getattr(self, name)     # finite: every network wait has a deadline
            if type(v) not in (int, float) or not 0 < v < math.inf:
                raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
        _strings("", name=self.name, transport=self.transport, master=self.master,
                 master_curve_public=self.master_curve_public, coordination=self.coordination)
        for m in self.memnodes:
            m.check()
        self.security.check()
        self.layout.check()
        if self.master is not None and (not self.masters or len(set(self.masters)) !=
                                        len(self.masters)):
            raise ConfigError(f"master must name one endpoint or several distinct ones, "
                              f"comma-separated; got {self.master!r}")
        if self.coordination is not None:
            if not self.coordination.startswith("zookeeper://"):
                raise ConfigError(f"[master] coordination must be zookeeper://host:port[,...], "
                                  f"got {self.coordination!r}")
        elif self.master is not None and len(self.masters) > 1:
            raise ConfigError("several masters need [master] coordination = "
                              "\"zookeeper://...\" to agree on their leader")

    @property
    def masters(self) -> list[str]:
        """The master endpoints, in the order clients try them."""
        return [e.strip() for e in (self.master or "").split(",") if e.strip()]

    @property
    def replicas(self) -> int:
        """Replication factor r in force."""
        return self.replication or min(3, len(self.memnodes))

    def node(self, node_id: int) -> MemNodeConfig:
        return self.memnodes[node_id]

    def with_(self, **changes: Any) -> ClusterConfig:
        return replace(self, **changes)

    # -- TOML ------------------------------------------------------------------------------
    def dumps(self) -> str:
        doc = {"cluster": {k: v for k, v in (("name", self.name),
                                             ("cluster_id", self.cluster_id),
                                             ("replication", self.replication),
                                             ("transport", self.transport),
                                             ("timeout", self.timeout),
                                             ("master", self.master),
                                             ("master_curve_public", self.master_curve_public),
                                             ("master_metrics_port", self.master_metrics_port),
                                             ("client_lease", self.client_lease),
                                             ("mn_lease", self.mn_lease)) if v is not None},
               **({"master": {"coordination": self.coordination}} if self.coordination else {}),
               "layout": asdict(self.layout),
               "security": {k: v for k, v in asdict(self.security).items() if v is not None},
               "memnodes": [{k: v for k, v in asdict(m).items() if v is not None}
                            for m in self.memnodes]}
        return tomli_w.dumps(doc)

    def save(self, path: str | Path) -> Path:
        return _write_atomically(Path(path), self.dumps())

    @classmethod
    def loads(cls, text: str) -> ClusterConfig:
        try:
            doc = tomllib.loads(text)
            layout = LayoutConfig(**doc.get("layout", {}))
            security = SecurityConfig(**doc.get("security", {}))
            nodes = tuple(MemNodeConfig(**m) for m in doc.get("memnodes", []))
            master = doc.get("master", {})
            if set(master) - {"coordination"}:
                raise TypeError(f"unknown [master] keys {sorted(set(master) - {'coordination'})}")
            return cls(memnodes=nodes, layout=layout, security=security, **master,
                       **doc.get("cluster", {}))
        except (tomllib.TOMLDecodeError, TypeError) as e:
            raise ConfigError(f"bad cluster config: {e}") from e

    @classmethod
    def load(cls, path: str | Path) -> ClusterConfig:
        """Read ``path``; relative key paths in it name files next to it, wherever the
        process reading it runs (a service's working directory is rarely the config's)."""
        try:
            config = cls.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read cluster config {path}: {e}") from e
        return config.relative_to(Path(path).absolute().parent)

    def relative_to(self, folder: Path) -> ClusterConfig:
        """This config with its relative ``keys_dir`` and ``client_key`` under ``folder``."""
        paths: dict[str, Any] = {name: str(folder / value) for name in ("keys_dir", "client_key")
                 if (value := getattr(self.security, name)) and not Path(value).is_absolute()}
        return self.with_(security=replace(self.security, **paths)) if paths else self

    @staticmethod
    def edit(path: str | Path, change: Callable[[dict[str, Any]], object]) -> ClusterConfig:
        """Apply ``change(doc)`` to the TOML document at ``path`` (a dict of its tables),
        check the result and write it back atomically. Paths stay as written; the file's
        comments do not survive (TOML writers drop them)."""
        try:
            doc = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read cluster config {path}: {e}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"bad cluster config {path}: {e}") from e
        change(doc)
        text = tomli_w.dumps(doc)
        config = ClusterConfig.loads(text)
        _write_atomically(Path(path), text)
        return config


def _write_atomically(path: Path, text: str) -> Path:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
