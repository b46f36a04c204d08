"""YCSB workloads and key generators, as the YCSB core workload defines them.

Generators draw whole arrays with NumPy from a seeded ``numpy.random.Generator``, so a
benchmark client pre-computes its operation stream outside the timed loop and the same seed
always gives the same stream.

- ``Zipfian``: Gray et al.'s generator as YCSB implements it (``ZipfianGenerator``): rank 0
  is the most popular; P(rank k) is close to 1 / ((k+1)^theta * zeta(n, theta)).
- ``ScrambledZipfian``: YCSB's default request distribution. It draws from a Zipfian over
  10^10 items and maps the draw to a key with FNV-1a-64 modulo the key count, so hot keys are
  scattered over the key space instead of being the first ones.
- ``latest_positions``: YCSB's "latest" (``SkewedLatestGenerator``): a Zipfian rank counted
  back from the most recently inserted key, over a key count that grows with every insert.

``zipfian_cdf`` gives the exact distribution the Zipfian generator produces (the tests check
samples against it), and ``zeta`` evaluates the generalized harmonic number for any n.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

FNV_OFFSET_BASIS_64 = 0xCBF29CE484222325
FNV_PRIME_64 = 1099511628211
#: item count of YCSB's ScrambledZipfianGenerator (its ZETAN is zeta of this + 1 items)
SCRAMBLED_ITEMS = 10_000_000_000 + 1

READ, UPDATE, INSERT = 0, 1, 2
OP_NAMES = {READ: "search", UPDATE: "update", INSERT: "insert"}


def fnvhash64(values: ArrayLike) -> np.ndarray:
    """YCSB's ``Utils.fnvhash64`` on each value: FNV-1a 64 over the value's 8 little-endian
    bytes, then made non-negative as a Java ``long`` (returned as int64)."""
    v = np.array(values, dtype=np.uint64, ndmin=1)
    h = np.full(v.shape, FNV_OFFSET_BASIS_64, dtype=np.uint64)
    prime, low = np.uint64(FNV_PRIME_64), np.uint64(0xFF)
    for shift in range(0, 64, 8):
        h ^= (v >> np.uint64(shift)) & low
        h *= prime                      # wraps modulo 2**64, as Java's long multiply does
    return np.abs(h.view(np.int64))


def key_names(keynums: ArrayLike) -> list[bytes]:
    """YCSB key names for key numbers: ``user`` + the FNV hash of the number (YCSB's default
    "hashed" insert order), zero-padded to 19 digits so every key has the same length."""
    return [b"user%019d" % h for h in fnvhash64(keynums).tolist()]


KEY_LENGTH = len(key_names([0])[0])


class StoreShape:
    """What a benchmark's options with ``memnodes``, ``replication`` (0: up to 3) and
    ``object_size`` (key + value bytes) imply."""
    memnodes: int
    replication: int
    object_size: int

    @property
    def replicas(self) -> int:
        return self.replication or min(3, self.memnodes)

    @property
    def value_size(self) -> int:
        return self.object_size - KEY_LENGTH


def zeta(n: int, theta: float) -> float:
    """sum_{i=1..n} i^-theta. Exact summation up to 10^6 terms; beyond, the Euler-Maclaurin
    tail (error far below a double's precision), so YCSB's 10^10-item constant is cheap."""
    m = min(int(n), 1_000_000)
    head = float(np.sum(np.arange(1, m + 1, dtype=np.float64) ** -theta))
    if n <= m:
        return head
    a, b, s = float(m), float(n), theta
    # sum_{i=m+1..n} f(i) = int_m^n f + (f(n) - f(m))/2 + (f'(n) - f'(m))/12 - ...
    integral = (b ** (1 - s) - a ** (1 - s)) / (1 - s)
    ends = (b ** -s - a ** -s) / 2
    d1 = (-s * b ** (-s - 1) + s * a ** (-s - 1)) / 12
    total: float = head + integral + ends + d1
    return total


def _check_theta(theta: float) -> None:
    if not 0 < theta < 1:
        raise ValueError(f"Zipfian theta must be in (0, 1), got {theta}")


def _zipf_ranks(u: np.ndarray, n: float | np.ndarray, zetan: float | np.ndarray,
                theta: float) -> np.ndarray:
    """YCSB ``ZipfianGenerator.nextLong`` for uniform draws ``u`` (n and zetan may be arrays)."""
    alpha = 1.0 / (1.0 - theta)
    eta = (1 - np.power(2.0 / n, 1 - theta)) / (1 - zeta(2, theta) / zetan)
    ranks = np.floor(n * np.power(eta * u - eta + 1, alpha))
    ints: np.ndarray = np.minimum(ranks, np.asarray(n) - 1).astype(np.int64)   # u -> 1 rounding
    uz = u * zetan
    ints[uz < 1.0 + 0.5 ** theta] = 1
    ints[uz < 1.0] = 0
    return ints


def zipfian_cdf(n: int, theta: float, ranks: ArrayLike) -> np.ndarray:
    """P(rank <= k) for each k in ``ranks``, exactly as ``Zipfian(n, theta)`` draws them.

    The generator maps u ~ U[0,1) monotonically to a rank, so the CDF is the measure of the
    u that map at or below k: u < 1/zeta_n gives 0, u < (1 + 2^-theta)/zeta_n gives 1, and
    above that floor(n (eta u - eta + 1)^alpha) <= k  <=>  u < 1 + (((k+1)/n)^(1-theta) - 1)/eta.
    """
    _check_theta(theta)
    k = np.asarray(ranks, dtype=np.float64)
    zn = zeta(n, theta)
    eta = (1 - (2.0 / n) ** (1 - theta)) / (1 - zeta(2, theta) / zn)
    u1 = (1.0 + 0.5 ** theta) / zn
    t = np.clip(1 + (np.power((k + 1) / n, 1 - theta) - 1) / eta, 0.0, 1.0)
    cdf = np.maximum(u1, t)
    cdf = np.where(k < 1, 1.0 / zn + np.maximum(0.0, t - u1), cdf)
    return np.where(k >= n - 1, 1.0, np.minimum(cdf, 1.0))


class Zipfian:
    """Ranks in [0, n) with rank 0 the most popular (YCSB ``ZipfianGenerator``)."""

    def __init__(self, n: int, theta: float = 0.99) -> None:
        _check_theta(theta)
        if n < 2:
            raise ValueError("a Zipfian needs at least 2 items")
        self.n, self.theta = int(n), theta
        self.zetan = zeta(self.n, theta)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return _zipf_ranks(rng.random(size), self.n, self.zetan, self.theta)


class ScrambledZipfian:
    """Keys in [0, n), Zipfian-popular but scattered (YCSB ``ScrambledZipfianGenerator``)."""

    def __init__(self, n: int, theta: float = 0.99) -> None:
        if n < 1:
            raise ValueError("need at least one key")
        self.n = int(n)
        self.base = Zipfian(SCRAMBLED_ITEMS, theta)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return fnvhash64(self.base.sample(rng, size)) % self.n


class Uniform:
    """Keys in [0, n), all equally likely."""

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError("need at least one key")
        self.n = int(n)

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.integers(0, self.n, size, dtype=np.int64)


def latest_positions(rng: np.random.Generator, counts: np.ndarray, theta: float = 0.99,
                     ) -> np.ndarray:
    """For reads issued when ``counts[i]`` keys exist (positions 0..counts[i]-1 in insertion
    order), the position each read picks: the newest minus a Zipfian rank over counts[i]
    items (YCSB ``SkewedLatestGenerator``). ``counts`` must not decrease."""
    _check_theta(theta)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.size == 0:
        return counts
    lo, hi = int(counts[0]), int(counts[-1])
    if lo < 2:
        raise ValueError("the latest distribution needs at least 2 existing keys")
    # zeta(count) for every count seen, extended incrementally as YCSB does when items grow
    grow = np.arange(lo + 1, hi + 1, dtype=np.float64) ** -theta
    zetas = zeta(lo, theta) + np.concatenate(([0.0], np.cumsum(grow)))
    ranks = _zipf_ranks(rng.random(counts.size), counts.astype(np.float64),
                        zetas[counts - lo], theta)
    positions: np.ndarray = counts - 1 - ranks
    return positions


@dataclass(frozen=True)
class Workload:
    """An operation mix over the loaded keys (proportions sum to 1)."""
    name: str
    read: float = 0.0
    update: float = 0.0
    insert: float = 0.0
    distribution: str = "zipfian"        # zipfian (scrambled) | uniform | latest

    def __post_init__(self) -> None:
        props = (self.read, self.update, self.insert)
        if min(props) < 0 or abs(sum(props) - 1.0) > 1e-9:
            raise ValueError(f"workload {self.name}: read/update/insert proportions must be "
                             f">= 0 and sum to 1, got {props}")
        if self.distribution not in ("zipfian", "uniform", "latest"):
            raise ValueError(f"workload {self.name}: unknown distribution "
                             f"{self.distribution!r} (zipfian, uniform, latest)")

    def ops(self) -> list[str]:
        """The operation kinds this mix issues."""
        return [OP_NAMES[c] for c, p in ((READ, self.read), (UPDATE, self.update),
                                         (INSERT, self.insert)) if p > 0]


#: the workloads of the paper's evaluation (YCSB core workloads A-D)
WORKLOADS = {
    "A": Workload("A", read=0.5, update=0.5),
    "B": Workload("B", read=0.95, update=0.05),
    "C": Workload("C", read=1.0),
    "D": Workload("D", read=0.95, insert=0.05, distribution="latest"),
}


@dataclass
class OpStream:
    """One client's endless, reproducible stream of (op code, key number) pairs.

    Loaded keys are numbers 0..keys-1. The i-th key this client inserts is number
    ``insert_base + i`` (the caller gives every client a disjoint range). Under "latest", a
    client counts back from its own newest insert (it cannot know other clients' inserts
    without a shared counter, which would be a synchronization YCSB's generator does not add).
    """
    workload: Workload
    keys: int
    rng: np.random.Generator
    insert_base: int
    theta: float = 0.99
    inserted: int = 0
    _chooser: ScrambledZipfian | Uniform | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        d = self.workload.distribution
        self._chooser = (ScrambledZipfian(self.keys, self.theta) if d == "zipfian"
                         else Uniform(self.keys) if d == "uniform" else None)
        if d == "latest":
            _check_theta(self.theta)

    def chunk(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``size`` operations: op codes and key numbers."""
        w = self.workload
        codes = self.rng.choice(np.array([READ, UPDATE, INSERT], dtype=np.int8), size,
                                p=[w.read, w.update, w.insert])
        is_insert = codes == INSERT
        inserts_before = self.inserted + np.cumsum(is_insert) - is_insert
        keynums = np.empty(size, dtype=np.int64)
        keynums[is_insert] = self.insert_base + inserts_before[is_insert]
        others = ~is_insert
        if self._chooser is not None:
            keynums[others] = self._chooser.sample(self.rng, int(others.sum()))
        else:
            pos = latest_positions(self.rng, self.keys + inserts_before[others], self.theta)
            keynums[others] = np.where(pos < self.keys, pos, self.insert_base + pos - self.keys)
        self.inserted += int(is_insert.sum())
        return codes, keynums


def stream_rng(seed: int, *ids: int) -> np.random.Generator:
    """An independent generator per (seed, phase, client, ...), reproducible by seed."""
    return np.random.default_rng(np.random.SeedSequence([seed, *ids]))
