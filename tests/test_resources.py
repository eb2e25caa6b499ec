"""Resources: peak memory within --memory-budget at S >= 3, prompt Ctrl-C, the
partition's region and memory guards.

Memory is measured, never assumed: the peak RSS of a child process (ru_maxrss of a
small wrapper's children), against the same command on one row for the fixed
overhead (interpreter, torch, the partition, the region table)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cpadgn.errors import CpadgnError
from cpadgn.model import CPAModel, load
from cpadgn.modelfile import save_model
from cpadgn.network import PiecewiseAffineNet
from cpadgn.partition import compute_partition
from cpadgn.stop import map_in_threads, stop_check

ROOT = Path(__file__).resolve().parents[1]
# A fixed mmap threshold: glibc raises its threshold as large blocks are freed, after
# which large arrays come from the heap, and the peak RSS of the same command varied by
# up to 50 MB between runs (353-400 MB measured); fixed, every array over 1 MB is its
# own mapping, returned on free, and the peak repeats to 1 MB.
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "MALLOC_MMAP_THRESHOLD_": "1000000"}
CLI = [sys.executable, "-c", "from cli.main import main; main()"]
# runs argv, then prints its exit code and the peak RSS (kB) of its process
PEAK = [sys.executable, "-c", "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"]


def random_net(S, hidden, D, seed=0):
    rng = np.random.default_rng(seed)
    sizes = [S, *hidden, D]
    return PiecewiseAffineNet.from_arrays(
        [rng.standard_normal((b, a)) / np.sqrt(a) for a, b in zip(sizes[:-1], sizes[1:])],
        [0.3 * rng.standard_normal(b) for b in sizes[1:]], [np.full(h, 0.1) for h in hidden])


def model_with_rows(tmp, name, S, hidden, D, n_rows, noise=0.05):
    """A saved model with its partition cached, and data files of 1 and n_rows rows."""
    net = random_net(S, hidden, D)
    path = tmp / f"{name}.h5"
    save_model(path, net, noise_std=noise)
    load(path).partition()                                   # the cache, outside the measurements
    X = CPAModel(net, noise_std=noise).sample(n_rows, seed=1)
    np.save(tmp / f"{name}_1.npy", X[:1])
    np.save(tmp / f"{name}_n.npy", X)
    return path


def peak_rss(argv, **env):
    """(exit code, peak RSS in bytes, seconds) of a child process (env: extra variables)."""
    t0 = time.perf_counter()
    out = subprocess.run(PEAK + argv, capture_output=True, text=True, env={**ENV, **env}, cwd=ROOT)
    code, kb = out.stdout.split()[-2:]
    return int(code), 1024.0 * int(kb), time.perf_counter() - t0


BUDGET = 1e7


def score_argv(path, data, out):
    return CLI + ["score", str(path), str(data), "-o", str(out), "-q", "--memory-budget", str(BUDGET)]


@pytest.fixture(scope="module")
def s3_model(tmp_path_factory):
    """An S = 3 model with 40 rows, and (exit code, peak RSS, seconds) of scoring one."""
    path = model_with_rows(tmp_path_factory.mktemp("s3"), "s3", 3, (10, 10), 32, 40)
    return path, peak_rss(score_argv(path, path.parent / "s3_1.npy", path.parent / "one.csv"))


@pytest.mark.parametrize("S", [3, 4])
def test_score_peak_memory_within_budget(tmp_path, s3_model, S):
    if S == 3:                       # the first 4 rows of the 40
        path, (code1, base, t1) = s3_model
        rows, data = 4, tmp_path / "s3_4.npy"
        np.save(data, np.load(path.parent / "s3_n.npy")[:rows])
    else:
        path = model_with_rows(tmp_path, "s4", 4, (6, 6), 32, 3)
        rows, data = 3, tmp_path / "s4_n.npy"
        code1, base, t1 = peak_rss(score_argv(path, tmp_path / "s4_1.npy", tmp_path / "one.csv"))
    budget = BUDGET
    code, peak, t = peak_rss(score_argv(path, data, tmp_path / "all.csv"))
    print(f"S = {S}: one row {base / 1e6:.0f} MB ({t1:.1f} s), {rows} rows {peak / 1e6:.0f} MB ({t:.1f} s), "
          f"budget {budget / 1e6:.0f} MB")
    assert code1 == 0 and code == 0
    assert peak <= base + budget


def test_fit_peak_memory_within_budget(tmp_path):
    """fit's --memory-budget held its M-step only: the E-step's batches were sized by a
    fixed 5e8 bytes (one EM iteration on 3,000 rows, S = 2 32-32: 786 MB at any budget,
    against 348 MB for 30 rows).  Measured against the same fit of 30 rows; beyond the
    budget, EM keeps every (row, region) pair's posterior moments for its M-step (the
    E-step's result, counted here twice: the tables and the statistics built from them)."""
    from cpadgn import em
    net = random_net(2, (32, 32), 64)
    X = CPAModel(net, noise_std=0.1).sample(3000, seed=1)
    np.save(tmp_path / "small.npy", X[:30])
    np.save(tmp_path / "big.npy", X)
    argv = lambda data: CLI + ["fit", str(tmp_path / f"{data}.npy"), "-o", str(tmp_path / f"{data}.h5"), "-S", "2",
                               "--hidden", "32,32", "--max-iter", "1", "--val-fraction", "0", "-q",
                               "--memory-budget", "5e7"]
    code1, base, _ = peak_rss(argv("small"))
    code, peak, _ = peak_rss(argv("big"))
    print(f"fit: 30 rows {base / 1e6:.0f} MB, 3,000 rows {peak / 1e6:.0f} MB, budget 50 MB")
    assert code1 == 0 and code == 0
    e = em.e_step(net, CPAModel(net, noise_std=0.1).partition(), np.asarray(0.1), X, memory_budget=5e7)
    pairs = sum(getattr(e, f).nbytes for f in ("pair_row", "pair_region", "pair_responsibility", "pair_mean",
                                                 "pair_cov"))
    print(f"   pair tables {pairs / 1e6:.1f} MB")
    assert peak <= base + 5e7 + 2 * pairs


def test_log_prob_memory_does_not_grow_with_the_pairs():
    """log_prob (score, compare, p-values) keeps per row only its results: its peak is
    the same for 80 and 160 rows (the chunks are 19 rows at this budget), where keeping
    every (row, region) pair (about 700 a row here, 8 (S^2 + S + 3) bytes each) added
    9.7 MB for the 80 extra rows (their 4.0 MB and copies).  tracemalloc counts numpy's
    arrays, not torch's."""
    import tracemalloc
    model = CPAModel(random_net(2, (32, 32), 16), noise_std=0.15, memory_budget=1e6)
    X = model.sample(160, seed=1)
    model.log_prob(X[:2])                                 # the region table, outside the measurement
    peaks = []
    for n in (80, 160):
        tracemalloc.start()
        model.log_prob(X[:n])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    pairs_per_row = model.posterior(X[80:100]).pair_row.size / 20
    extra_pair_bytes = 80 * pairs_per_row * 8 * (2 * 2 + 2 + 3)
    print(f"peaks {peaks[0] / 1e6:.2f}, {peaks[1] / 1e6:.2f} MB; the extra rows' pairs {extra_pair_bytes / 1e6:.1f} MB")
    assert peaks[1] - peaks[0] < 0.25 * extra_pair_bytes


def test_impute_memory_does_not_grow_with_the_rows():
    """impute keeps the (row, region) pairs of a chunk of rows (8 (S^2 + S + 3) bytes each,
    about 420 a row here, held a few times over), so its rows per chunk come from the
    budget (14 here, with every region a pair of every row): the peak is the same for 14
    and 28 rows, where the fixed 512-row chunk added 0.95 MB for the 14 extra rows (their
    0.44 MB of pairs and copies).  tracemalloc counts numpy's arrays, not torch's."""
    import tracemalloc
    model = CPAModel(random_net(2, (16, 16), 8), noise_std=0.5, memory_budget=1e6)
    X = model.sample(28, seed=1)
    X[:, :3] = np.nan
    model.impute(X[:2])                                  # the region table, outside the measurement
    peaks = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # one posterior chunk at a time: two at once moved the peak by 0.5 MB
    try:
        for n in (14, 28):
            tracemalloc.start()
            model.impute(X[:n])
            peaks.append(tracemalloc.get_traced_memory()[1])
            tracemalloc.stop()
    finally:
        torch.set_num_threads(threads)
    pairs_per_row = model.posterior(X[14:28]).pair_row.size / 14
    extra_pair_bytes = 14 * pairs_per_row * 8 * (2 * 2 + 2 + 3)
    print(f"peaks {peaks[0] / 1e6:.2f}, {peaks[1] / 1e6:.2f} MB; the extra rows' pairs {extra_pair_bytes / 1e6:.2f} MB")
    assert peaks[1] - peaks[0] < 0.25 * extra_pair_bytes


def test_explanations_within_the_memory_budget():
    """score --explain's expected squared residuals went in blocks of pairs of a fixed 2e8
    bytes whatever the budget: 3,000 rows (16 pairs a row) took 89 MB at a budget of 10 MB.
    Beyond the pairs they are given (posterior's, which --explain keeps), the blocks now
    fit the budget.  tracemalloc counts numpy's arrays."""
    import tracemalloc
    from cpadgn.anomaly import expected_squared_residuals
    model = CPAModel(random_net(2, (16, 16), 64), noise_std=0.3, memory_budget=1e7)
    X = model.sample(3000, seed=1)
    post = model.posterior(X)
    tracemalloc.start()
    expected_squared_residuals(model, X, post)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"peak {peak / 1e6:.1f} MB, {post.pair_row.size / X.shape[0]:.0f} pairs a row")
    assert peak <= 2e7     # the budget, plus the regions' maps, the rows' copies and the result (16 MB measured; 89 before)


def test_exact_elbo_within_the_memory_budget():
    """compare's exact ELBO of a VAE ran in chunks sized by a fixed 4e8 bytes, whatever
    --memory-budget: 300 digits rows took 373 MB (and 3,000 rows 930 MB of RSS over the
    one-row run at a budget of 5e7).  It now takes the model's budget."""
    import tracemalloc
    from cpadgn.vae import exact_elbo
    model = load(ROOT / "sample_data" / "digits_vae.h5")
    model.memory_budget = 1e7
    X = np.loadtxt(ROOT / "sample_data" / "digits_test.csv", delimiter=",", skiprows=1)
    model.partition()
    tracemalloc.start()
    exact_elbo(model, X)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(f"peak {peak / 1e6:.1f} MB")
    assert peak <= 2e7     # the budget, plus the regions' maps and facets (15 MB measured; 373 before)


def exit_seconds_after_sigint(argv, wait):
    """Start argv, send SIGINT after ``wait`` seconds (it must still run), return
    (seconds to exit, exit code, stderr)."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        if wait is None:                                    # wait for "ready" on stdout
            assert proc.stdout.readline().strip() == "ready"
        else:
            time.sleep(wait)
        assert proc.poll() is None, "the workload ended before the signal"
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        return time.perf_counter() - t0, proc.returncode, err
    finally:
        proc.kill()


def test_ctrl_c_stops_score_promptly(tmp_path, s3_model):
    """SIGINT mid-run: exit within 2 s beyond the interpreter's own teardown (measured on
    an idle process that imported the same modules), non-zero, no traceback.  The
    workload (the 40 rows at S = 3, 200 times over, each copy moved by ~1e-6) runs far longer than the wait before
    the signal."""
    idle = [sys.executable, "-c", "import time, torch, cli.main, cpadgn.likelihood; print('ready', flush=True); "
                                  "time.sleep(600)"]
    teardown, _, _ = exit_seconds_after_sigint(idle, None)
    path, (_, _, startup) = s3_model        # seconds to score one row: start-up and loading
    out = tmp_path / "scores.csv"
    data = tmp_path / "many.npy"
    rows = np.tile(np.load(path.parent / "s3_n.npy"), (200, 1))      # distinct: equal rows are scored once
    np.save(data, rows + 1e-6 * np.random.default_rng(0).standard_normal(rows.shape))
    seconds, code, err = exit_seconds_after_sigint(score_argv(path, data, out), startup + 2.0)
    print(f"exit {code} {seconds:.2f} s after SIGINT (idle teardown {teardown:.2f} s); stderr {err!r}")
    assert code == 130
    assert "Traceback" not in err
    assert not out.exists()
    assert seconds <= 2.0 + teardown


def test_stop_flag_reaches_running_and_queued_work():
    """Closing map_in_threads early: the running job sees the flag, queued ones never start."""
    started, stopped = [], threading.Event()

    def job(i):
        started.append(i)
        if i == 0:
            return i
        while True:                        # a long job that checks the flag
            try:
                stop_check()
            except KeyboardInterrupt:
                stopped.set()
                raise
            time.sleep(0.001)
    results = map_in_threads(job, [(i,) for i in range(50)], 2)
    assert next(results) == 0
    while len(started) < 2:
        time.sleep(0.001)
    results.close()
    assert stopped.wait(60)
    assert len(started) <= 3               # the two first, and at most one picked up before the cancel


def test_partition_guard_s8(tmp_path):
    """S = 8, 16-16 has far more than 100,000 regions: the one-line --max-regions error,
    well below 3 GB (the enumeration alone would need tens of GB)."""
    path = tmp_path / "s8.h5"
    save_model(path, random_net(8, (16, 16), 64), noise_std=0.1)
    argv = CLI + ["partition", str(path), "--max-regions", "100000", "--cache", str(tmp_path / "c.h5")]
    t0 = time.perf_counter()
    out = subprocess.run(PEAK + argv, capture_output=True, text=True, env=ENV, cwd=ROOT)
    code, kb = map(int, out.stdout.split()[-2:])
    print(f"S = 8 guard: exit {code} after {time.perf_counter() - t0:.1f} s, peak {kb / 1e6:.2f} GB; {out.stderr!r}")
    assert code == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the partition has more than 100,000 regions")
    assert 1024.0 * kb < 3e9


def test_partition_memory_guard():
    """Without --max-regions the subdivision stops before a step over the memory budget."""
    with pytest.raises(CpadgnError, match="memory budget"):
        compute_partition(random_net(8, (16, 16), 64), memory_budget=2e8)


def test_s1_partition_memory_guard():
    """The S = 1 interval splitting had no guard: 200,000 hidden units asked for 298 GiB
    and got the generic out-of-memory line, which --memory-budget could not change.  Its
    (intervals, units) arrays are now checked first (5,000 units: ~0.85 GB against 1e8);
    a small net still splits under that budget, into the intervals a dense grid finds."""
    with pytest.raises(CpadgnError, match="memory budget"):
        compute_partition(random_net(1, (5000,), 3), memory_budget=1e8)
    net = random_net(1, (6, 6), 3)
    part = compute_partition(net, memory_budget=1e8)
    z = np.linspace(-8, 8, 400001)[:, None]
    grid = np.unique(net.patterns(z), axis=0)                # the patterns a dense grid meets
    assert {p.tobytes() for p in grid} <= {p.tobytes() for p in part.patterns}


def test_max_regions_applies_to_a_cached_partition(tmp_path):
    path = tmp_path / "s2.h5"
    save_model(path, random_net(2, (6, 6), 4), noise_std=0.1)
    n = load(path).partition().n_regions
    model = load(path)
    with pytest.raises(CpadgnError, match="more than"):
        model.partition(max_regions=n - 1)
    assert model.partition_status == "loaded"              # the check ran on the cached partition
    assert load(path).partition(max_regions=n).n_regions == n
