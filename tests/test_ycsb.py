"""YCSB key generators against the distributions they must produce (fixed seeds: no flakes)."""

from __future__ import annotations

import numpy as np
import pytest
from fusee.bench.ycsb import (INSERT, READ, SCRAMBLED_ITEMS, UPDATE, WORKLOADS, OpStream,
                              ScrambledZipfian, Uniform, Workload, Zipfian, fnvhash64, key_names,
                              latest_positions, stream_rng, zeta, zipfian_cdf)


def fnv1a64(data: bytes) -> int:
    """Reference FNV-1a 64 over bytes, pinned to the published test vectors below."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & (2 ** 64 - 1)
    return h


def _pmf(n: int, theta: float, upto: int | None = None) -> np.ndarray:
    cdf = zipfian_cdf(n, theta, np.arange(upto or n))
    return np.diff(np.concatenate(([0.0], cdf)))


def _chi2_z(counts: np.ndarray, expected_p: np.ndarray, min_expected: float = 5.0) -> float:
    """Chi-square goodness of fit as a standard normal score (Wilson-Hilferty), with bins
    merged from the tail until each expects >= min_expected. z < 3.09 <=> p > 0.001."""
    exp = expected_p * counts.sum()
    order = np.argsort(exp)[::-1]
    exp, counts = exp[order], counts[order]
    keep = int(np.searchsorted(-exp, -min_expected, side="right"))
    obs, ex = counts[:keep], exp[:keep]
    if keep < len(exp):
        obs, ex = np.append(obs, counts[keep:].sum()), np.append(ex, exp[keep:].sum())
    ex = ex * obs.sum() / ex.sum()
    stat, dof = float(np.sum((obs - ex) ** 2 / ex)), len(obs) - 1
    v = 2 / (9 * dof)
    return ((stat / dof) ** (1 / 3) - (1 - v)) / np.sqrt(v)


P_001, P_1E9 = 3.09, 6.0          # one-sided normal quantiles: p = 0.001 and p ~ 1e-9


def test_fnv_reference_matches_published_vectors():
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


def test_fnvhash64_is_ycsb_fnv_of_the_little_endian_long():
    values = np.random.default_rng(7).integers(0, 2 ** 63 - 1, 2000, dtype=np.int64)
    got = fnvhash64(values)
    for v, h in zip(values.tolist(), got.tolist()):
        ref = fnv1a64(v.to_bytes(8, "little"))
        signed = ref - 2 ** 64 if ref >= 2 ** 63 else ref
        assert h == abs(signed)


def test_key_names_are_ycsbs():
    keys = key_names([0, 1, 99999])
    assert keys[0] == b"user6284781860667377211"     # YCSB's first key, hashed insert order
    assert len({len(k) for k in keys}) == 1


def test_zeta_exact_and_asymptotic():
    n = 3_000_000                                    # beyond the exact-summation cutoff
    direct = float(np.sum(np.arange(1, n + 1, dtype=np.float64) ** -0.99))
    assert zeta(n, 0.99) == pytest.approx(direct, rel=1e-12)
    assert zeta(SCRAMBLED_ITEMS, 0.99) == pytest.approx(26.46902820178302, rel=1e-9)  # YCSB
    assert zeta(5, 0.5) == pytest.approx(sum(i ** -0.5 for i in range(1, 6)))


@pytest.mark.parametrize("theta", [0.99, 0.5])
def test_zipfian_matches_its_exact_distribution(theta):
    n = 1000
    s = Zipfian(n, theta).sample(stream_rng(1, 2), 300_000)
    assert s.min() >= 0 and s.max() < n
    assert _chi2_z(np.bincount(s, minlength=n), _pmf(n, theta)) < P_001


def test_chi_square_has_teeth():
    n = 1000
    wrong = Zipfian(n, 0.9).sample(stream_rng(1, 2), 300_000)
    assert _chi2_z(np.bincount(wrong, minlength=n), _pmf(n, 0.99)) > P_1E9


def test_zipfian_rank_frequency_is_zipf():
    pmf = _pmf(100_000, 0.99)
    ranks = np.arange(10, 10_000)
    slope = np.polyfit(np.log(ranks + 1), np.log(pmf[ranks]), 1)[0]
    assert slope == pytest.approx(-0.99, abs=0.01)
    assert pmf.sum() == pytest.approx(1.0)
    assert pmf[0] == pytest.approx(1 / zeta(100_000, 0.99), rel=1e-9)


def test_scrambled_zipfian_matches_its_expected_distribution():
    n, head = 1000, 2_000_000
    gen = ScrambledZipfian(n, 0.99)
    s = gen.sample(stream_rng(3), 500_000)
    assert s.min() >= 0 and s.max() < n
    # expected: the exact mass of the first 2e6 base ranks, each sent to its FNV key; the
    # remaining ~45% comes from ~1e10 ranks of tiny mass each, spread evenly over the keys
    base = _pmf(SCRAMBLED_ITEMS, 0.99, upto=head)
    expected = np.bincount(fnvhash64(np.arange(head)) % n, weights=base, minlength=n)
    expected += (1 - base.sum()) / n
    counts = np.bincount(s, minlength=n)
    assert _chi2_z(counts, expected) < P_001
    hottest = int(fnvhash64([0])[0] % n)
    assert counts.argmax() == hottest
    # the same ranks NOT scrambled are a very different distribution
    unscrambled = gen.base.sample(stream_rng(3), 500_000) % n
    assert _chi2_z(np.bincount(unscrambled, minlength=n), expected) > P_1E9


def test_generators_are_reproducible_by_seed():
    for gen in (Zipfian(5000), ScrambledZipfian(5000), Uniform(5000)):
        a = gen.sample(stream_rng(42, 1, 0), 1000)
        assert np.array_equal(a, gen.sample(stream_rng(42, 1, 0), 1000))
        assert not np.array_equal(a, gen.sample(stream_rng(42, 1, 1), 1000))


def test_latest_counts_back_from_the_newest_key():
    count = 5000
    pos = latest_positions(stream_rng(5), np.full(200_000, count), 0.99)
    assert pos.min() >= 0 and pos.max() < count
    ranks = count - 1 - pos
    assert _chi2_z(np.bincount(ranks, minlength=count), _pmf(count, 0.99)) < P_001
    growing = np.repeat(np.arange(100, 1100), 50)    # keys inserted as reads go on
    pos = latest_positions(stream_rng(6), growing, 0.99)
    assert (pos >= 0).all() and (pos < growing).all()
    assert np.mean(pos == growing - 1) == pytest.approx(1 / zeta(600, 0.99), rel=0.05)
    with pytest.raises(ValueError):
        latest_positions(stream_rng(6), np.array([1, 2]))


def test_opstream_mix_inserts_and_reproducibility():
    keys, base = 10_000, 10 ** 12
    a = OpStream(WORKLOADS["D"], keys, stream_rng(9, 0, 1), insert_base=base)
    codes1, nums1 = a.chunk(50_000)
    codes2, nums2 = a.chunk(50_000)
    codes, nums = np.concatenate([codes1, codes2]), np.concatenate([nums1, nums2])
    inserts = nums[codes == INSERT]
    assert np.array_equal(inserts, base + np.arange(len(inserts)))   # consecutive, disjoint
    assert len(inserts) / len(codes) == pytest.approx(0.05, abs=5 * np.sqrt(0.05 * 0.95 / 1e5))
    reads = nums[codes == READ]
    fresh = reads >= base
    assert fresh.mean() > 0.3                  # read-latest: new keys are the hot ones
    # a read of an inserted key only ever names a key inserted before it
    order = np.flatnonzero(codes == READ)
    inserted_before = np.cumsum(codes == INSERT)[order]
    assert (reads[fresh] - base < inserted_before[fresh]).all()
    assert ((reads[~fresh] >= 0) & (reads[~fresh] < keys)).all()
    b = OpStream(WORKLOADS["D"], keys, stream_rng(9, 0, 1), insert_base=base)
    assert np.array_equal(b.chunk(50_000)[1], nums1)

    mix = OpStream(WORKLOADS["A"], keys, stream_rng(1), insert_base=base).chunk(100_000)[0]
    assert np.mean(mix == UPDATE) == pytest.approx(0.5, abs=0.01)
    assert set(np.unique(mix)) == {READ, UPDATE}


def test_workload_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        Workload("X", read=0.5)
    with pytest.raises(ValueError, match="distribution"):
        Workload("X", read=1.0, distribution="hotspot")
    with pytest.raises(ValueError, match="theta"):
        Zipfian(100, 1.2)
    assert WORKLOADS["D"].ops() == ["search", "insert"]


@pytest.mark.parametrize("workload", ["A", "D"])
def test_the_bench_names_each_operations_key_as_key_names_does(workload):
    """The bench's op source (``fusee.bench.runner.ycsb_ops``) names the keys inserted since
    the load a chunk at a time: the same names, in the same order, as one at a time; over
    more than one chunk, so that the next chunk's draw follows."""
    from fusee.bench.runner import CHUNK, ycsb_ops
    from fusee.bench.ycsb import OP_NAMES
    keys = 1000

    def stream() -> OpStream:
        return OpStream(WORKLOADS[workload], keys, stream_rng(7, 1 << 20, 0), insert_base=keys)
    reference = stream()
    want = []
    while len(want) < 2 * CHUNK + 10:
        codes, nums = reference.chunk(CHUNK)
        want += [(OP_NAMES[c], key_names([n])[0]) for c, n in zip(codes, nums)]
    loaded = key_names(np.arange(keys))
    ops = ycsb_ops(stream(), loaded)
    got = [next(ops) for _ in want]
    assert got == want
    fresh = {key for _, key in got} - set(loaded)       # D inserts and reads the new keys
    assert bool(fresh) == (workload == "D")
