"""The partition cache: round trip, reuse, staleness, corruption and atomic writes."""
import json
import os

import h5py
import numpy as np
import pytest

from cpadgn import cache
from cpadgn.cache import (CACHE_FORMAT_VERSION, NotACacheError, body_checksum, cache_key,
                          cache_path_for, load_or_compute, read_fingerprint, read_partition, save_partition)
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
    messages, notices = [], []
    part, status = load_or_compute(new_net, p, compute, log=messages.append, notice=notices.append)
    assert status == "replaced (another generator's partition)" and compute.calls == 1
    assert len(notices) == 1 and "another generator's partition" in notices[0] and "replacing" in notices[0]
    assert not any("another generator" in m for m in messages)     # said once, as the notice
    assert read_partition(p)[1] == cache_key(new_net.fingerprint())   # replaced
    assert load_or_compute(new_net, p, compute)[1] == "loaded"


def test_a_cache_replaced_between_its_header_and_its_body_is_not_used(tmp_path, monkeypatch):
    """The header (fingerprint) and the body are read in two opens of the file; when
    another process renamed another generator's cache (same shapes) into place between
    them, as jobs sharing one --cache path do, that partition was loaded for this net."""
    net, other = small_net(0), small_net(1)
    p = tmp_path / "c.h5"
    save_partition(p, hand_partition(other, seed=7), other.fingerprint())
    monkeypatch.setattr(cache, "read_identity", lambda path: (cache_key(net.fingerprint()), CACHE_FORMAT_VERSION))
    compute = Counter(hand_partition(net))
    notices = []
    part, status = load_or_compute(net, p, compute, notice=notices.append)
    assert (status, compute.calls) == (cache.STALE_STATUS, 1) and "another generator's partition" in notices[0]
    assert_same(part, hand_partition(net))
    assert read_partition(p)[1] == cache_key(net.fingerprint())


def test_cache_format_version_is_part_of_the_key(tmp_path, monkeypatch):
    net = small_net()
    p = tmp_path / "c.h5"
    load_or_compute(net, p, Counter(hand_partition(net)))
    key = cache_key(net.fingerprint())
    monkeypatch.setattr(cache, "CACHE_FORMAT_VERSION", CACHE_FORMAT_VERSION + 1)
    assert cache_key(net.fingerprint()) != key
    compute = Counter(hand_partition(net))
    messages = []
    status = load_or_compute(net, p, compute, log=messages.append)[1]
    assert status == f"recomputed (other cache format {CACHE_FORMAT_VERSION})" and compute.calls == 1
    assert "cache format" in messages[0] and "recomputing" in messages[0]


def test_format_1_cache_without_checksum_is_recomputed(tmp_path):
    """A cache written by the previous format (no body checksum) is never used as is."""
    net = small_net()
    p = tmp_path / "c.h5"
    save_partition(p, hand_partition(net), net.fingerprint())
    with h5py.File(p, "r+") as f:
        f.attrs["cache_format_version"] = 1
        f.attrs["fingerprint"] = "0" * 64
        del f.attrs["body_sha256"]
    compute = Counter(hand_partition(net))
    messages = []
    assert load_or_compute(net, p, compute, log=messages.append)[1] == "recomputed (other cache format 1)"
    assert compute.calls == 1 and len(messages) == 2 and "cache format 1" in messages[0]
    assert load_or_compute(net, p, compute)[1] == "loaded"


def test_checksum_covers_every_byte_of_the_body(tmp_path):
    """Flipping any single bit of any body dataset changes the stored checksum."""
    net = small_net()
    body = cache.body_arrays(hand_partition(net))
    want = body_checksum(body)
    assert set(body) == set(cache.BODY)
    rng = np.random.default_rng(1)
    for name, a in body.items():
        if a.size == 0:
            continue
        raw = a.copy().view(np.uint8).reshape(-1)
        raw[rng.integers(raw.size)] ^= np.uint8(1 << int(rng.integers(8)))
        assert body_checksum({**body, name: raw.view(a.dtype).reshape(a.shape)}) != want, name
        # the same values stored with another dtype or shape are another body too
    assert body_checksum({**body, "interior": body["interior"].astype(np.float32)}) != want
    assert body_checksum({**body, "facet_ptr": body["facet_ptr"].reshape(1, -1)}) != want


@pytest.mark.parametrize("damage", ["bad_ptr", "missing", "patterns", "one_value", "no_checksum",
                                    "truncated", "truncated_to_half"])
def test_damaged_cache_is_recomputed_and_says_corrupt(tmp_path, damage):
    """A cpadgn cache whose body was changed (its attributes intact), or that was cut short
    (unreadable as HDF5, its format name still in its first bytes), is never used."""
    net = small_net()
    p = tmp_path / "c.h5"
    save_partition(p, hand_partition(net), net.fingerprint())
    if damage.startswith("truncated"):
        p.write_bytes(p.read_bytes()[:1000 if damage == "truncated" else p.stat().st_size // 2])
    else:
        with h5py.File(p, "r+") as f:
            if damage == "bad_ptr":
                f["facet_ptr"][-1] = 10 ** 6
            elif damage == "missing":
                del f["clearance"]
            elif damage == "patterns":                   # another valid pattern array, same shape
                f["patterns"][...] = ~f["patterns"][()]
            elif damage == "one_value":
                f["log_prior_mass"][0] = f["log_prior_mass"][0] + 1e-12
            else:
                del f.attrs["body_sha256"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["c.h5"]
    compute = Counter(hand_partition(net))
    messages = []
    part, status = load_or_compute(net, p, compute, log=messages.append)
    assert status.startswith("recomputed (corrupt cache: ") and compute.calls == 1
    assert "corrupt" in messages[0] and "recomputing" in messages[0]
    assert "damaged partition cache" not in messages[0] and "((" not in messages[0]   # once, not nested
    assert load_or_compute(net, p, compute)[1] == "loaded"  # replaced by a good one
    assert_same(part, read_partition(p)[0])


def run_child(code: str, timeout=120.0):
    """Run ``code`` (Python, with tests/ on the path) in a child process, where a crash
    (a segfault inside HDF5) fails the test instead of ending pytest; returns its result."""
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_a_flipped_byte_anywhere_in_a_cache_is_caught_before_hdf5_reads_it(tmp_path):
    """HDF5 read damaged caches as they were: one flipped byte in the root attributes (byte
    849 of a 29 KB cache, in the format attribute's datatype) crashed the process with a
    segfault in h5py, 45 of 1,200 flips there made the file 'not a cpadgn partition cache'
    (refused, the command failed) and 13 changed the partition_fingerprint attribute, loaded
    as is.  The file's SHA-256 seal after the HDF5 image is checked first: every flip in the
    image is a damaged cache (recomputed), a flip in the seal's name leaves an intact image."""
    r = run_child(f"""
import json, os
from cpadgn.cache import CpadgnError, read_partition, save_partition
from test_cache import assert_same, hand_partition, small_net
net = small_net(); part = hand_partition(net); p = {str(tmp_path / "c.h5")!r}
save_partition(p, part, net.fingerprint())
good = open(p, "rb").read()
offsets = list(range(1500)) + list(range(1500, len(good), 101)) + list(range(len(good) - 100, len(good)))
out = {{"size": len(good), "damaged": [], "loaded": []}}
for off in offsets:
    b = bytearray(good); b[off] ^= 0xFF
    with open(p, "wb") as f:
        f.write(b)
    try:
        got = read_partition(p)[0]
    except CpadgnError as e:
        out["damaged"].append([off, type(e).__name__, str(e)])
        continue
    assert_same(got, part)
    out["loaded"].append(off)
print(json.dumps(out))
""")
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-500:]}"
    out = json.loads(r.stdout)
    seal_name = range(out["size"] - cache._SEAL_BYTES, out["size"] - cache._SEAL_BYTES + len(cache.SEAL))
    assert out["loaded"] == list(seal_name)     # the image is intact: the file is read as unsealed
    flags = range(cache._OPEN_FLAGS.start, cache._OPEN_FLAGS.stop)   # not sealed, checked by HDF5 itself
    assert [off for off, _, msg in out["damaged"] if "unreadable HDF5" in msg] == list(flags)
    assert out["damaged"] and all(kind == "CpadgnError" and ("does not match its SHA-256 seal" in msg or off in flags)
                                  for off, kind, msg in out["damaged"])


def test_a_cache_another_process_holds_open_is_loaded_not_called_corrupt(tmp_path):
    """HDF5 locks a file it opens: while another process held the cache open for writing
    (h5py mode 'r+' or 'a'), opening it failed with 'unable to lock file' and the cache was
    called corrupt, recomputed and replaced.  A sealed cache is read from memory, without
    HDF5's locks; an unsealed one (an older cpadgn's) is opened without them."""
    import subprocess
    import sys
    net = small_net()
    p = tmp_path / "c.h5"
    save_partition(p, hand_partition(net), net.fingerprint())
    unsealed = tmp_path / "old.h5"
    unsealed.write_bytes(p.read_bytes()[:-cache._SEAL_BYTES])
    for path in (p, unsealed):
        holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys, time\n"
                                   f"f = h5py.File({str(path)!r}, 'r+')\nprint('open', flush=True)\ntime.sleep(60)"],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "open"
            compute = Counter(hand_partition(net))
            messages = []
            part, status = load_or_compute(net, path, compute, log=messages.append)
        finally:
            holder.kill()
            holder.wait()
        assert (status, compute.calls) == ("loaded", 0), messages
        assert_same(part, hand_partition(net))


@pytest.mark.parametrize("kind", ["garbage", "truncated_model", "foreign_h5", "csv", "model", "directory"])
def test_a_file_that_is_not_a_cache_is_refused_and_left_untouched(tmp_path, kind):
    """Only a cpadgn partition cache is ever replaced at the cache path."""
    from cpadgn.modelfile import save_model
    net = small_net()
    p = tmp_path / "c.h5"
    if kind == "garbage":
        p.write_bytes(b"not an hdf5 file at all")
    elif kind == "truncated_model":
        save_model(p, net, noise_std=0.5)
        p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
    elif kind == "foreign_h5":
        with h5py.File(p, "w") as f:
            f["x"] = np.zeros(3)
    elif kind == "csv":
        p = tmp_path / "data.csv"
        p.write_text("1,2,3\n4,5,6\n")
    elif kind == "model":
        save_model(p, net, noise_std=0.5)
    else:
        p.mkdir()
    before = None if p.is_dir() else p.read_bytes()
    compute = Counter(hand_partition(net))
    with pytest.raises(NotACacheError, match="not a cpadgn partition cache.*left untouched"):
        load_or_compute(net, p, compute)
    assert compute.calls == 0
    assert p.is_dir() if before is None else p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == [p.name]


def run_on_named_pipe(code: str, fifo, timeout=30.0) -> str:
    """Run ``code`` (Python; FIFO is the path of a named pipe it may read) in a child
    process and return its stdout; a child still waiting after ``timeout`` s (blocked in
    open() with no writer, holding the GIL inside HDF5) is killed and the test fails."""
    import subprocess
    import sys
    os.mkfifo(fifo)
    try:
        r = subprocess.run([sys.executable, "-c", f"FIFO = {str(fifo)!r}\n" + code], capture_output=True,
                           text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    except subprocess.TimeoutExpired:
        pytest.fail("the named pipe was waited on (no answer within the timeout)")
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_named_pipe_at_the_cache_path_is_refused_not_waited_on(tmp_path):
    """A FIFO (or <(...), a pipe) at the cache path blocked the command forever in open() (h68):
    it is no cache and not a file cpadgn may replace, so it is refused at once."""
    out = run_on_named_pipe(
        "from cpadgn.cache import NotACacheError, load_or_compute\n"
        "from test_cache import small_net\n"
        "try:\n"
        "    load_or_compute(small_net(), FIFO, lambda: 1 / 0)\n"
        "except NotACacheError as e:\n"
        "    print(e)\n", tmp_path / "c.h5")
    assert "not a regular file" in out and "left untouched" in out


def test_a_cache_path_that_is_a_symbolic_link_is_written_at_its_target(tmp_path):
    """Renaming the new cache over the link would replace the link by a file and leave its
    target stale; a link to no file was read as 'not an HDF5 file' and refused."""
    old, net = small_net(seed=1), small_net(seed=2)
    target, link = tmp_path / "stale.h5", tmp_path / "link.h5"
    save_partition(target, hand_partition(old), old.fingerprint())
    link.symlink_to(target)
    _, status = load_or_compute(net, link, Counter(hand_partition(net)))
    assert status == cache.STALE_STATUS and link.is_symlink()
    assert read_fingerprint(target) == cache_key(net.fingerprint())
    dangling, absent = tmp_path / "dangling.h5", tmp_path / "new.h5"
    dangling.symlink_to(absent)
    _, status = load_or_compute(net, dangling, Counter(hand_partition(net)))
    assert status == "computed" and dangling.is_symlink() and read_fingerprint(absent) == cache_key(net.fingerprint())


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
    assert status == "not_written (no space left on device; free space or choose another path)"
    assert part.n_regions == 5
    assert "Could not write the partition cache" in messages[-1] and "no space" in messages[-1]
    assert not (tmp_path / "other.h5").exists()


def test_unwritable_cache_directory_warns_and_returns(tmp_path):
    net = small_net()
    where = tmp_path / "no" / "such" / "dir" / "c.h5"
    with pytest.warns(RuntimeWarning, match="Could not write the partition cache"):
        part, status = load_or_compute(net, where, Counter(hand_partition(net)))
    assert status.startswith("not_written (") and part.n_regions == 5
    # a parent that is a regular file cannot hold a cache, even for root
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    messages = []
    _, status = load_or_compute(net, blocker / "c.h5", Counter(hand_partition(net)),
                                log=messages.append)
    assert status == "not_written (Not a directory)" and "Could not write" in messages[-1]
    assert blocker.read_text() == "x" and sorted(x.name for x in tmp_path.iterdir()) == ["a_file"]


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


def test_same_partition_gives_the_same_bytes(tmp_path):
    net = small_net()
    save_partition(tmp_path / "a.h5", hand_partition(net), net.fingerprint())
    save_partition(tmp_path / "b.h5", hand_partition(net), net.fingerprint())
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    """A temporary names its writer (host, PID): the next write removes those of writers
    that are gone from this host, and any older than STALE_TEMP_SECONDS."""
    import subprocess
    import sys
    import time

    from cpadgn.data import STALE_TEMP_SECONDS, _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()                                   # reaped: this PID no longer exists
    live = os.getppid()
    net = small_net()
    target = tmp_path / "c.h5"
    name = f".{target.name}"
    files = {
        "dead": f"{name}.{_host()}.{dead.pid}.abcd1234.tmp",
        "dead_check": f"{name}.{_host()}.{dead.pid}.abcd1234.check",
        "live": f"{name}.{_host()}.{live}.abcd1234.tmp",
        "other_host_recent": f"{name}.elsewhere.{dead.pid}.abcd1234.tmp",
        "other_host_old": f"{name}.elsewhere.{live}.abcd5678.tmp",
        "old_format_old": f"{name}.k2j4h5g6.tmp",
        "other_target": f".d.h5.{_host()}.{dead.pid}.abcd1234.tmp",
        "not_a_temp": f"{name}.{_host()}.{dead.pid}.notes.txt",
    }
    for f in files.values():
        (tmp_path / f).write_text("x")
    old = time.time() - STALE_TEMP_SECONDS - 60
    for key in ("other_host_old", "old_format_old"):
        os.utime(tmp_path / files[key], (old, old))
    save_partition(target, hand_partition(net), net.fingerprint())
    left = {x.name for x in tmp_path.iterdir()}
    gone = {"dead", "dead_check", "other_host_old", "old_format_old"}
    assert left == {target.name} | {files[k] for k in files if k not in gone}
    assert read_partition(target)[1] == cache_key(net.fingerprint())
