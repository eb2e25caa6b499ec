"""The partition cache: round trip, reuse, staleness, corruption and atomic writes."""
import os

import h5py
import numpy as np
import pytest

from cpadgn import cache
from cpadgn.cache import (CACHE_FORMAT_VERSION, cache_key, cache_path_for, load_or_compute,
                          read_partition, save_partition)
from cpadgn.network import PiecewiseAffineNet
from cpadgn.partition import Partition


def small_net(seed=0, K=11):
    rng = np.random.default_rng(seed)
    return PiecewiseAffineNet.from_arrays([rng.normal(size=(K, 2)), rng.normal(size=(3, K))],
                                          [rng.normal(size=K), rng.normal(size=3)], [0.1])


def hand_partition(net, R=5, seed=0):
    """A partition-shaped object built by hand (not a real enumeration)."""
    rng = np.random.default_rng(seed)
    K, S = net.n_units, net.latent_dim
    counts = rng.integers(0, 4, size=R) if K else np.zeros(R, dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return Partition(
        patterns=rng.random((R, K)) < 0.5,
        interior=rng.normal(size=(R, S)),
        facet_ptr=ptr,
        facet_units=rng.integers(0, max(K, 1), size=ptr[-1]).astype(np.int64),
        bounded=rng.random(R) < 0.5,
        log_prior_mass=np.log(rng.dirichlet(np.ones(R))),
        log_prior_mass_stderr=np.where(rng.random(R) < 0.5, 0.0, 1e-4),
        clearance=rng.random(R),
        degenerate=np.array([True] + [False] * (R - 1)),
        fingerprint=net.fingerprint(),
        method="hand-made",
        seconds=0.125,
    )


FIELDS = ("patterns", "interior", "facet_ptr", "facet_units", "bounded", "log_prior_mass",
          "log_prior_mass_stderr", "clearance", "degenerate")


def assert_same(a: Partition, b: Partition):
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert (a.fingerprint, a.method, a.seconds) == (b.fingerprint, b.method, b.seconds)


class Counter:
    def __init__(self, part):
        self.part, self.calls = part, 0

    def __call__(self):
        self.calls += 1
        return self.part


@pytest.mark.parametrize("K", [11, 8, 0])
def test_round_trip_every_field(tmp_path, K):
    net = small_net(K=K) if K else PiecewiseAffineNet.from_arrays([np.ones((3, 2))], [np.zeros(3)], [])
    part = hand_partition(net, R=1 if K == 0 else 7)
    save_partition(tmp_path / "c.h5", part, net.fingerprint())
    back, fp = read_partition(tmp_path / "c.h5")
    assert fp == cache_key(net.fingerprint())
    assert_same(part, back)
    with h5py.File(tmp_path / "c.h5") as f:
        assert f.attrs["format"] == "cpadgn-partition"
        assert f.attrs["cache_format_version"] == CACHE_FORMAT_VERSION
        assert f.attrs["n_regions"] == part.n_regions and f.attrs["n_units"] == K
        assert f["patterns"].dtype == np.uint8 and f["patterns"].shape == (part.n_regions, (K + 7) // 8)


def test_cache_path_beside_model(tmp_path):
    assert cache_path_for(tmp_path / "gen.pt2") == tmp_path / "gen.pt2.partition.h5"


def test_second_call_loads_without_computing(tmp_path):
    net = small_net()
    compute = Counter(hand_partition(net))
    messages = []
    p = tmp_path / "gen.partition.h5"
    part1, status1 = load_or_compute(net, p, compute, log=messages.append)
    part2, status2 = load_or_compute(net, p, compute, log=messages.append)
    assert (status1, status2) == ("computed", "loaded") and compute.calls == 1
    assert_same(part1, part2)
    assert "Computed" in messages[0] and "Loaded" in messages[1]
    # a different but identical-weights net object hits the cache too
    _, status3 = load_or_compute(small_net(), p, compute)
    assert status3 == "loaded" and compute.calls == 1


def test_stale_fingerprint_recomputes_and_says_so(tmp_path):
    p = tmp_path / "c.h5"
    old_net, new_net = small_net(0), small_net(1)
    load_or_compute(old_net, p, Counter(hand_partition(old_net)))
    compute = Counter(hand_partition(new_net, seed=3))
    messages = []
    part, status = load_or_compute(new_net, p, compute, log=messages.append)
    assert status == "recomputed (stale: fingerprint mismatch)" and compute.calls == 1
    assert any("fingerprint mismatch" in m and "recomputing" in m for m in messages)
    assert read_partition(p)[1] == cache_key(new_net.fingerprint())   # replaced
    assert load_or_compute(new_net, p, compute)[1] == "loaded"


def test_cache_format_version_is_part_of_the_key(tmp_path, monkeypatch):
    net = small_net()
    p = tmp_path / "c.h5"
    load_or_compute(net, p, Counter(hand_partition(net)))
    monkeypatch.setattr(cache, "CACHE_FORMAT_VERSION", CACHE_FORMAT_VERSION + 1)
    compute = Counter(hand_partition(net))
    assert load_or_compute(net, p, compute)[1] == "recomputed (stale: fingerprint mismatch)"


@pytest.mark.parametrize("damage", ["garbage", "truncate", "foreign", "bad_ptr", "missing"])
def test_corrupt_cache_recomputes(tmp_path, damage):
    net = small_net()
    p = tmp_path / "c.h5"
    save_partition(p, hand_partition(net), net.fingerprint())
    if damage == "garbage":
        p.write_bytes(b"not an hdf5 file at all")
    elif damage == "truncate":
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
    elif damage == "foreign":
        with h5py.File(p, "w") as f:
            f["x"] = np.zeros(3)
    elif damage == "bad_ptr":
        with h5py.File(p, "r+") as f:
            f["facet_ptr"][-1] = 10 ** 6
    else:
        with h5py.File(p, "r+") as f:
            del f["clearance"]
    compute = Counter(hand_partition(net))
    messages = []
    part, status = load_or_compute(net, p, compute, log=messages.append)
    assert status.startswith("recomputed (unreadable cache: ") and compute.calls == 1
    assert "unreadable" in messages[0]
    assert load_or_compute(net, p, compute)[1] == "loaded"  # replaced by a good one


def test_failed_write_leaves_old_file_intact_and_no_temp(tmp_path, monkeypatch):
    net = small_net()
    p = tmp_path / "c.h5"
    save_partition(p, hand_partition(net), net.fingerprint())
    before = p.read_bytes()
    calls = {"n": 0}
    orig = h5py.Group.create_dataset

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device")
        return orig(self, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(OSError):
        save_partition(p, hand_partition(net, seed=9), net.fingerprint())
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.h5"]
    # no old file: nothing is left behind either
    calls["n"] = 0
    with pytest.raises(OSError):
        save_partition(tmp_path / "new.h5", hand_partition(net), net.fingerprint())
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.h5"]
    # through load_or_compute: a warning, and the computed partition anyway
    calls["n"] = 0
    messages = []
    part, status = load_or_compute(small_net(2), tmp_path / "other.h5",
                                   Counter(hand_partition(small_net(2))), log=messages.append)
    assert status == "computed" and part.n_regions == 5
    assert "Could not write the partition cache" in messages[-1]
    assert not (tmp_path / "other.h5").exists()


def test_unwritable_cache_directory_warns_and_returns(tmp_path):
    net = small_net()
    where = tmp_path / "no" / "such" / "dir" / "c.h5"
    with pytest.warns(RuntimeWarning, match="Could not write the partition cache"):
        part, status = load_or_compute(net, where, Counter(hand_partition(net)))
    assert status == "computed" and part.n_regions == 5
    if os.geteuid() != 0:  # root ignores directory permissions
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            messages = []
            _, status = load_or_compute(net, ro / "c.h5", Counter(hand_partition(net)),
                                        log=messages.append)
            assert status == "computed" and "Could not write" in messages[-1]
        finally:
            ro.chmod(0o755)


def test_cache_written_is_readable_by_plain_h5py(tmp_path):
    net = small_net()
    part = hand_partition(net)
    save_partition(tmp_path / "c.h5", part, net.fingerprint())
    with h5py.File(tmp_path / "c.h5") as f:
        K = f["patterns"].attrs["n_units"]
        patterns = np.unpackbits(f["patterns"][()], axis=1, count=K).astype(bool)
        np.testing.assert_array_equal(patterns, part.patterns)
        assert f.attrs["fingerprint"] == cache_key(net.fingerprint())
        assert f.attrs["net_fingerprint"] == net.fingerprint()
