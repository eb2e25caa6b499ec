"""cpadgn.dask and --dask: the rows on a Dask cluster give the single-process results.

One LocalCluster for the module, built as ``--dask local:2`` builds it (2 worker
processes, 1 thread each, loopback only, no Active Memory Manager).
Oracle: the single-process run, which the other test files check against quadrature
and closed forms; the cluster scores other row chunks, so results agree to the rounding
bound of ``oracles.kappa_rounding_tol`` (the same derivation as
test_likelihood.test_results_do_not_depend_on_chunking), never bit for bit.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import distributed    # the 'test' extra installs dask[distributed]

import cpadgn.dask as cd
from cpadgn.errors import CpadgnError
from cpadgn.impute import impute as impute_single
from cpadgn.model import CPAModel
from oracles import (assert_stderr_matches_spread, kappa_rounding_tol, posterior_spread, random_net,
                     s4_imputation_case, salt_qmc)

CHUNK = 20      # rows per task: 8 to 12 tasks per run, more than the 2 workers


@pytest.fixture(scope="module")
def client():
    cd.quiet_logs()
    # ":0": a free port for the scheduler's HTTP server, which None still binds to 8787 (two test
    # workers, two clusters: "Port 8787 is already in use")
    with cd.local_cluster(2, dashboard_address=":0") as cluster, distributed.Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def model():
    return CPAModel(random_net(2, (8, 8), 5, seed=11, slope=0.1, scale=1.5), noise_std=0.3, device="cpu")


def rows(model, n, seed):
    """n model rows, some entries missing, one far row (large terms that cancel)."""
    X = model.sample(n, seed=seed)
    X[::6, 1] = np.nan
    X[::9, 3:] = np.nan
    X[4] *= 25.0
    return X


def h5_data(path, X):
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=X, chunks=(CHUNK // 2, X.shape[1]))
    return path


def loglik_tol(model, X, a_bound, b_bound):
    """Rounding bound of two runs that differ in batch sizes (test_likelihood's)."""
    ref = model.posterior(X)
    return 2 * kappa_rounding_tol(model, X, ref) + a_bound + b_bound


def assert_scores_equal(model, X, got):
    ref = model.posterior(X)
    tol = loglik_tol(model, X, ref.error_bound, got.error_bound)
    assert np.all(np.abs(got.log_likelihood - ref.log_likelihood) <= tol)
    np.testing.assert_array_equal(got.n_observed, ref.n_observed)
    # E[z|x] = sum_w r_w m_w: r moves by at most 2 tol relative, m_w by tol (whitened)
    assert np.all(np.abs(got.z_mean - ref.z_mean).max(1) <= tol * (1 + 2 * posterior_spread(ref, len(X))))
    assert tol.max() < 1e-6 * np.abs(ref.log_likelihood).max()            # not vacuous


# ------------------------------------------------------------------------ results
def test_scores_equal_the_single_process_run(client, model, tmp_path):
    X = rows(model, 200, seed=1)
    data = cd.read(h5_data(tmp_path / "x.h5", X), chunk_rows=CHUNK)
    assert data.numblocks[0] == 200 // CHUNK
    seen = []
    got = cd.score(client, model, data, progress=lambda done, total: seen.append((done, total)))
    assert_scores_equal(model, X, got)
    assert len(seen) == 200 // CHUNK and seen[-1] == (200, 200)
    ll = cd.log_prob(model, np.load(_npy(tmp_path, X)), client=client).compute()    # in memory, 1 chunk
    assert np.all(np.abs(ll - got.log_likelihood) <= loglik_tol(model, X, got.error_bound, got.error_bound))


def _npy(tmp_path, X):
    np.save(tmp_path / "x.npy", X)
    return tmp_path / "x.npy"


def mean_bound(model, X, error_bound):
    """E[x_m | x_o] = sum_w r_w m_w, m_w = A_w,m E_w + b_w,m: a rounding error e in log p
    moves r_w by 2 e relative and E_w by e (whitened, Sigma_w <= I), so
    |d mean_d| <= e (max_w |A_w,d| (1 + 2 |E_w|) + 2 max_w |b_w,d|), (N, D)."""
    e = loglik_tol(model, X, error_bound, error_bound)
    A, b = model.net.region_maps(model.partition().patterns)
    a_max, b_max = np.linalg.norm(A, axis=2).max(0), np.abs(b).max(0)     # (D,)
    return e[:, None] * (a_max[None] * (1 + 2 * posterior_spread(model.posterior(X), len(X)))[:, None] + 2 * b_max[None])


def test_imputation_equals_the_single_process_run(client, model, tmp_path):
    X = rows(model, 160, seed=2)
    ref = impute_single(model.net, model.partition(), model.noise_std, X, std=True, device="cpu")
    mean, std = cd.impute(model, cd.read(_npy(tmp_path, X), chunk_rows=CHUNK), std=True, client=client)
    mean, std = mean.compute(), std.compute()
    obs = ~np.isnan(X)
    np.testing.assert_array_equal(mean[obs], X[obs])                      # bit for bit
    assert np.all(std[obs] == 0) and np.all(np.isfinite(mean)) and np.all(std[~obs] > 0)
    assert np.all(np.abs(mean - ref.mean) <= mean_bound(model, X, ref.error_bound))
    draws = cd.impute(model, cd.read(_npy(tmp_path, X), chunk_rows=CHUNK), draws=3, seed=5,
                      client=client).compute()
    assert draws.shape == (3,) + X.shape
    np.testing.assert_array_equal(draws[:, obs], np.broadcast_to(X[obs], (3, obs.sum())))


# --------------------------------------------------------------- once, not per task
def test_partition_is_computed_once_and_sent_once_per_worker(client, model, tmp_path, monkeypatch):
    """The client computes the partition once; no worker computes one; every worker
    unpickles the model exactly once although it runs several tasks, and although the
    tasks come after a cycle of the scheduler's Active Memory Manager (which, when on,
    drops one of the two copies: a worker then unpickled the model twice, [1, 2], in
    loaded runs whose tasks came late, and always with this wait)."""
    import cpadgn.model as model_module
    NOISE = 0.29                        # marks this test's model (the module's has 0.3)

    def install():
        import cpadgn.model as m

        def refuse(*a, **k):
            raise AssertionError("a worker computed a partition")

        def count(self, state):         # this test's model only: an earlier test's copy may still arrive
            m._setstate(self, state)
            if np.allclose(self.noise_std, NOISE):
                m._unpickled = getattr(m, "_unpickled", 0) + 1
        m._unpickled, m._original, m._setstate = 0, m.compute_partition, m.CPAModel.__setstate__
        m.compute_partition, m.CPAModel.__setstate__ = refuse, count

    def report():
        import cpadgn.model as m
        n = m._unpickled
        m.compute_partition, m.CPAModel.__setstate__ = m._original, m._setstate
        return n

    calls = []
    original = model_module.compute_partition
    monkeypatch.setattr(model_module, "compute_partition", lambda *a, **k: calls.append(1) or original(*a, **k))
    ship = cd.ship

    def ship_then_wait(*a, **k):
        future = ship(*a, **k)
        time.sleep(1.25 * amm_interval())
        return future
    monkeypatch.setattr(cd, "ship", ship_then_wait)
    fresh = CPAModel(model.generator, noise_std=NOISE, device="cpu")
    X = rows(fresh, 240, seed=3)
    client.run(install)
    try:
        got = cd.score(client, fresh, cd.read(_npy(tmp_path, X), chunk_rows=CHUNK))
    finally:
        unpickled = client.run(report)
    assert calls == [1]
    assert sorted(unpickled.values()) == [1, 1]              # 12 tasks, 2 copies of the model
    assert_scores_equal(fresh, X, got)


def amm_interval() -> float:
    """Seconds between two cycles of a Dask scheduler's Active Memory Manager."""
    import dask
    from dask.utils import parse_timedelta
    return parse_timedelta(dask.config.get("distributed.scheduler.active-memory-manager.interval"))


# ------------------------------------------------------------------------ faults
def test_a_worker_with_another_cpadgn_is_one_line(client):
    def other_version():
        import cpadgn
        cpadgn.__version__, cpadgn._real = "0.0.0-other", cpadgn.__version__

    def restore():
        import cpadgn
        cpadgn.__version__ = cpadgn._real

    client.run(other_version)
    try:
        with pytest.raises(CpadgnError, match=r"^Dask worker tcp://127\.0\.0\.1:\d+ has cpadgn 0\.0\.0-other "
                                              r"but this client has .* \(and 1 more of 2 workers\); install"):
            cd.check_workers(client)
    finally:
        client.run(restore)
    cd.check_workers(client)

    def hide():
        import sys
        sys._cpadgn_dask = sys.modules["cpadgn.dask"]
        sys.modules["cpadgn.dask"] = None                 # import fails as if not installed

    def unhide():
        import sys
        sys.modules["cpadgn.dask"] = sys._cpadgn_dask

    client.run(hide)
    try:
        with pytest.raises(CpadgnError, match=r"^Dask worker tcp://\S+ cannot import cpadgn \(ModuleNotFoundError: "
                                              r"import of cpadgn\.dask halted.*\); install cpadgn\[dask\]"):
            cd.check_workers(client)
    finally:
        client.run(unhide)
    cd.check_workers(client)


def test_a_bad_value_in_a_chunk_is_one_error_with_its_row(client, model, tmp_path):
    X = rows(model, 60, seed=10)
    X[47, 2] = np.inf
    with pytest.raises(CpadgnError, match=r"x\.npy: row 48, column 3 is inf; replace it"):
        cd.score(client, model, cd.read(_npy(tmp_path, X), chunk_rows=CHUNK))


def test_compare_on_the_cluster_equals_compare_here(client, model):
    from cpadgn.comparison import compare
    other = CPAModel(random_net(2, (6,), 5, seed=12, slope=0.2), noise_std=0.4, device="cpu")
    X, X_train = rows(model, 90, seed=8), model.sample(60, seed=9)
    here = compare({"a": model, "b": other}, X, X_train)
    there = compare({"a": model, "b": other}, X, X_train, posterior=cd.scorer(client, chunk_rows=CHUNK))
    for name, m in (("a", model), ("b", other)):
        bounds = [next(r.max_error_bound for r in res.models if r.name == name) for res in (here, there)]
        tol = loglik_tol(m, X, *bounds)
        assert np.all(np.abs(there.log_likelihoods[name] - here.log_likelihoods[name]) <= tol)
    assert [r.name for r in there.models] == [r.name for r in here.models]


# --------------------------------------------------------------------- command line
@pytest.mark.parametrize("command", ["score", "impute"])
def test_cli_dask_refuses_data_of_another_width_by_name_before_the_partition(client, model, tmp_path, command):
    """The refusal names DATA's file, and no partition is computed before it."""
    from cli.main import main
    from cpadgn.modelfile import save_model
    save_model(tmp_path / "gen.h5", model.generator, noise_std=0.3)
    h5_data(tmp_path / "x.h5", rows(model, 10, seed=6)[:, :3])
    r = CliRunner().invoke(main, [command, str(tmp_path / "gen.h5"), str(tmp_path / "x.h5"), "-o",
                                  str(tmp_path / "out.csv"), "--dask", client.scheduler.address])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'x.h5'} has 3 columns but the generator outputs 5; pass data with 5 columns"]
    assert not (tmp_path / "out.csv").exists() and not (tmp_path / "gen.h5.partition.h5").exists()


@pytest.mark.parametrize("command", ["score", "impute"])
def test_cli_dask_warns_of_data_on_another_scale_from_its_first_rows(client, model, tmp_path, command):
    """Under --dask the client holds no rows, and rows on another scale (column 3 times 200
    plus 5,000: ~1e4 model stds) went without the warning the run without --dask gives;
    it now comes from DATA's first rows.  The model's own rows stay silent."""
    from cli.main import main
    from cpadgn.modelfile import save_model
    save_model(tmp_path / "gen.h5", model.generator, noise_std=0.3)
    X = model.sample(60, seed=8)
    for name, data, warned in (("own", X, False), ("raw", X * [1, 1, 200, 1, 1] + [0, 0, 5000, 0, 0], True)):
        path = h5_data(tmp_path / f"{name}.h5", data)
        r = CliRunner().invoke(main, [command, str(tmp_path / "gen.h5"), str(path), "-o",
                                      str(tmp_path / f"{name}_{command}.npy"), "--dask", client.scheduler.address])
        assert r.exit_code == 0, r.output
        assert (f"Warning: column 3 of {path} is" in r.stderr) == warned, r.stderr


def test_cli_score_with_dask_writes_the_same_csv(client, model, tmp_path):
    """--dask with the module cluster's scheduler address (a cluster of its own, local:2,
    would start two more worker processes: the LocalCluster is built as in the fixture)."""
    from cli.main import main
    from cpadgn.modelfile import save_model
    save_model(tmp_path / "gen.h5", model.generator, noise_std=0.3)
    X = rows(model, 120, seed=6)
    h5_data(tmp_path / "x.h5", X)
    base = ["score", str(tmp_path / "gen.h5"), str(tmp_path / "x.h5"), "-q", "--device", "cpu"]
    one = CliRunner().invoke(main, base + ["-o", str(tmp_path / "one.csv")], catch_exceptions=False)
    assert one.exit_code == 0, one.output
    run = CliRunner().invoke(main, base + ["-o", str(tmp_path / "dask.csv"), "--dask",
                                           client.scheduler.address, "--chunk-rows", str(CHUNK)], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    import pandas as pd
    a, b = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "dask.csv")
    assert list(a.columns) == list(b.columns)
    for c in ("n_observed", "top_region"):
        np.testing.assert_array_equal(a[c], b[c])
    tol = loglik_tol(model, X, a.log_likelihood_error_bound.values, b.log_likelihood_error_bound.values)
    assert np.all(np.abs(a.log_likelihood - b.log_likelihood) <= tol)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []   # no temporaries


def test_cli_score_with_dask_streams_the_same_h5(client, model, tmp_path):
    """--dask -o OUT.h5 writes each chunk as it completes into chunked datasets: the same
    datasets, columns and values as the single-process .h5 (to the rounding bound), and
    the --contamination flags and summary from the streamed file."""
    import json

    from cli.main import main
    from cpadgn.modelfile import save_model
    save_model(tmp_path / "gen.h5", model.generator, noise_std=0.3)
    X = rows(model, 120, seed=12)
    np.save(tmp_path / "x.npy", X)
    base = ["score", str(tmp_path / "gen.h5"), str(tmp_path / "x.npy"), "--json", "--device", "cpu",
            "--contamination", "0.1"]
    summaries = {}
    for name, extra in (("one.h5", []), ("dask.h5", ["--dask", client.scheduler.address, "--chunk-rows", "15"])):
        r = CliRunner().invoke(main, base + ["-o", str(tmp_path / name)] + extra, catch_exceptions=False)
        assert r.exit_code == 0, r.output
        summaries[name] = json.loads(r.stdout)
    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "dask.h5") as b:
        assert sorted(a) == sorted(b) and list(a.attrs["columns"]) == list(b.attrs["columns"])
        assert all(b[k].chunks is not None and b[k].dtype == a[k].dtype for k in b)
        ref, got = {k: a[k][()] for k in a}, {k: b[k][()] for k in b}
    tol = loglik_tol(model, X, ref["log_likelihood_error_bound"], got["log_likelihood_error_bound"])
    for k in ("log_likelihood", "anomaly_score"):
        assert np.all(np.abs(got[k] - ref[k]) <= tol)
    for k in ("n_observed", "top_region"):
        np.testing.assert_array_equal(got[k], ref[k])
    z = np.column_stack([got[f"z_mean_{j + 1}"] - ref[f"z_mean_{j + 1}"] for j in range(2)])
    assert np.all(np.abs(z).max(1) <= tol * (1 + 2 * posterior_spread(model.posterior(X), len(X))))
    # responsibilities exp(log p_w - log p): each log moves by tol, so r by 2 tol relative
    r = ref["top_region_responsibility"]
    assert np.all(np.abs(got["top_region_responsibility"] - r) <= 2.01 * tol * r)
    # the flag can differ only for a score within tol (plus the threshold's move) of the threshold
    one, dask = summaries["one.h5"], summaries["dask.h5"]
    assert abs(dask["threshold"] - one["threshold"]) <= tol.max()
    clear = np.abs(ref["anomaly_score"] - one["threshold"]) > tol + tol.max()
    np.testing.assert_array_equal(got["is_anomaly"][clear], ref["is_anomaly"][clear])
    assert ref["is_anomaly"].sum() == one["anomalies"] and got["is_anomaly"].sum() == dask["anomalies"]
    # the running statistics against the single-process file's columns
    seen = ref["n_observed"] > 0
    assert dask["rows"] == len(X) and dask["rows_with_nothing_observed"] == int((~seen).sum())
    # a mean moves by at most the largest move, a standard deviation (1-Lipschitz in the
    # l2 norm over sqrt(n - 1)) by at most that too; plus n eps for the sums' rounding
    n, ll = seen.sum(), ref["log_likelihood"][seen]
    rounding = 4 * n * np.finfo(float).eps
    assert abs(dask["mean_log_likelihood"] - ll.mean()) <= tol.max() + rounding * np.abs(ll).max()
    sd = ll.std(ddof=1) / np.sqrt(n)
    assert abs(dask["mean_log_likelihood_stderr"] - sd) <= tol.max() / np.sqrt(n - 1) + rounding * sd
    assert abs(dask["min_log_likelihood"] - ref["log_likelihood"][seen].min()) <= tol.max()
    assert abs(dask["max_log_likelihood"] - ref["log_likelihood"][seen].max()) <= tol.max()
    # the regions integrated per row, which the pruning decides row by row (each row's
    # pairs do not depend on the rows beside it)
    pairs = model.posterior(X, pairs=False, moments=False).n_pairs
    for s in (one, dask):
        assert s["regions_per_row"] == pairs[seen].mean() and s["max_regions_per_row"] == pairs.max()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cli_impute_with_dask_streams_the_same_h5(client, model, tmp_path):
    """--dask writes an .h5 imputation chunk by chunk: the same datasets and values."""
    from cli.main import main
    from cpadgn.modelfile import save_model
    save_model(tmp_path / "gen.h5", model.generator, noise_std=0.3)
    X = rows(model, 100, seed=7)
    np.save(tmp_path / "x.npy", X)
    base = ["impute", str(tmp_path / "gen.h5"), str(tmp_path / "x.npy"), "--std", "-q", "--device", "cpu"]
    for name, extra in (("one.h5", []), ("dask.h5", ["--dask", client.scheduler.address, "--chunk-rows", "15"])):
        r = CliRunner().invoke(main, base + ["-o", str(tmp_path / name)] + extra, catch_exceptions=False)
        assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "one.h5") as a, h5py.File(tmp_path / "dask.h5") as b:
        assert sorted(a) == sorted(b) == ["data", "std"]
        assert list(a["data"].attrs["columns"]) == list(b["data"].attrs["columns"])
        ref = impute_single(model.net, model.partition(), model.noise_std, X, device="cpu")
        assert np.all(np.abs(b["data"][()] - a["data"][()]) <= mean_bound(model, X, ref.error_bound))
        np.testing.assert_array_equal(b["std"][()] == 0, a["std"][()] == 0)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("suffix", [".h5", ".npy", ".csv"])
def test_cli_impute_with_dask_writes_the_std_beside_the_draws(client, model, tmp_path, suffix):
    """--draws K --std with --dask writes the draws and the std, as the run without --dask
    does (it was an internal error, exit 70: the workers sent the draws without the std).
    The std is each row's own, so it equals the std of a --dask --std mean run bit for bit."""
    from cli.main import main
    from cpadgn.modelfile import save_model
    save_model(tmp_path / "gen.h5", model.generator, noise_std=0.3)
    X = rows(model, 60, seed=8)
    np.save(tmp_path / "x.npy", X)
    base = ["impute", str(tmp_path / "gen.h5"), str(tmp_path / "x.npy"), "--std", "-q", "--device", "cpu",
            "--dask", client.scheduler.address, "--chunk-rows", "15"]
    for name, extra in (("mean.h5", []), ("draws" + suffix, ["--draws", "3", "--seed", "4"])):
        r = CliRunner().invoke(main, base + ["-o", str(tmp_path / name)] + extra, catch_exceptions=False)
        assert r.exit_code == 0, r.output
    with h5py.File(tmp_path / "mean.h5") as f:
        std_ref = f["std"][()]
    if suffix == ".h5":
        with h5py.File(tmp_path / "draws.h5") as f:
            assert sorted(f) == ["data", "std"]
            draws, std = f["data"][()], f["std"][()]
    elif suffix == ".npy":
        draws, std = np.load(tmp_path / "draws.npy"), np.load(tmp_path / "draws.std.npy")
    else:
        import pandas as pd
        long = pd.read_csv(tmp_path / "draws.csv")
        draws = long.drop(columns="draw").to_numpy().reshape(3, len(X), X.shape[1])
        std = pd.read_csv(tmp_path / "draws.std.csv")
        assert list(std.columns) == list(long.columns[1:])
        std = std.to_numpy()
    assert draws.shape == (3,) + X.shape and std.shape == X.shape
    obs = ~np.isnan(X)
    np.testing.assert_array_equal(draws[:, obs], np.broadcast_to(X[obs], (3, obs.sum())))
    # the CSV holds repr(float): float64 round trips exactly
    np.testing.assert_array_equal(std, std_ref)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ------------------------------------------------- S >= 4: the imputed means' QMC standard error
def test_s4_mean_stderr_on_the_cluster_matches_the_spread_over_independent_randomisations(client):
    """At S = 4 ``cpadgn.dask.impute(..., mean_stderr=True)`` carries each imputed mean's
    QMC standard error back from the workers (a column block of ``impute_table``).
    Oracle: test_impute's (``oracles.assert_stderr_matches_spread``, band derived there)
    on R = 40 reruns on the cluster of ``oracles.s4_imputation_case`` in two chunks, every
    worker's QMC points salted anew for each rerun (``oracles.salt_qmc`` run on the
    workers), and the spread of the means over them."""
    import cloudpickle

    import oracles
    model, X = s4_imputation_case()
    shipped = cd.ship(client, model, "cpu")
    data = cd.as_rows(X, chunk_rows=2)
    means, ses = [], []
    cloudpickle.register_pickle_by_value(oracles)          # the workers cannot import it
    try:
        for salt in range(1, 41):
            client.run(salt_qmc, salt)
            # seed= (unused without draws) gives each rerun its own task keys: never a result kept
            mean, std, se = cd.impute(shipped, data, seed=salt, std=True, mean_stderr=True, client=client)
            mean, std, se = client.compute([mean, std, se], sync=True)
            means.append(mean)
            ses.append(se)
    finally:
        client.run(salt_qmc, 0)
        cloudpickle.unregister_pickle_by_value(oracles)
    assert std.shape == X.shape and np.all(std[np.isnan(X)] > 0)
    assert_stderr_matches_spread(means, ses, np.isnan(X))


def test_cli_impute_with_dask_at_s4_writes_what_the_run_without_dask_writes(client, tmp_path):
    """At S = 4, ``cpadgn impute --dask --std`` to .h5 writes the datasets of the run
    without --dask (data, std, mean_stderr, their column attributes) and the same summary
    fields, max_mean_qmc_stderr the largest of its mean_stderr; to .csv the same two files.

    The workers integrate other batches of rows, on other thread counts and budgets, but a
    pair's QMC points are keyed by its row's values and region and a draw is summed the
    same in any blocks (``likelihood._pair_ids``, ``polytope._SetSums``): the means and
    their standard errors agree up to rounding (``mean_bound``), where other points
    would move them by about their standard error.
    """
    import json

    from cli.main import main
    from cpadgn.modelfile import save_model
    model, _ = s4_imputation_case()
    save_model(tmp_path / "gen.h5", model.generator, noise_std=0.6)
    X = model.sample(12, seed=5)
    X[::2, 1:4] = np.nan
    X[1::4, 0] = np.nan
    X[3, :] = np.nan
    np.save(tmp_path / "x.npy", X)
    miss = np.isnan(X)
    base = ["impute", str(tmp_path / "gen.h5"), str(tmp_path / "x.npy"), "--std", "--json", "--device", "cpu",
            "--stderr-target", "0.01"]
    dask_args = ["--dask", client.scheduler.address, "--chunk-rows", "4"]
    summary = {}
    for name, extra in (("one", []), ("dask", dask_args)):
        for suffix in (".h5", ".csv"):
            (tmp_path / name).mkdir(exist_ok=True)
            r = CliRunner().invoke(main, base + ["-o", str(tmp_path / name / ("out" + suffix))] + extra,
                                   catch_exceptions=False)
            assert r.exit_code == 0, r.output
            summary[name, suffix] = json.loads(r.stdout)
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == \
        sorted(p.name for p in (tmp_path / "dask").iterdir()) == ["out.csv", "out.h5", "out.std.csv"]
    for suffix in (".h5", ".csv"):
        a, b = summary["one", suffix], summary["dask", suffix]
        assert list(a) == list(b) and "max_mean_qmc_stderr" in a
        for key in ("rows", "columns", "rows_with_missing", "missing_entries", "rows_all_missing", "draws",
                    "noise_std", "regions"):
            assert a[key] == b[key], key
    with h5py.File(tmp_path / "one" / "out.h5") as a, h5py.File(tmp_path / "dask" / "out.h5") as b:
        assert sorted(a) == sorted(b) == ["data", "mean_stderr", "std"]
        for name in a:
            assert list(a[name].attrs["columns"]) == list(b[name].attrs["columns"])
        se_a, se_b = a["mean_stderr"][()], b["mean_stderr"][()]
        assert np.all(se_a[~miss] == 0) and np.all(se_b[~miss] == 0) and np.all(se_b[miss] > 0)
        assert summary["dask", ".h5"]["max_mean_qmc_stderr"] == se_b.max()
        assert summary["one", ".h5"]["max_mean_qmc_stderr"] == se_a.max()
        ref = impute_single(model.net, model.partition(), model.noise_std, X, device="cpu")
        tol = mean_bound(model, X, ref.error_bound)
        assert np.median(se_a[miss]) > 1e3 * tol.max()                     # other points would show
        np.testing.assert_array_equal(b["data"][()][~miss], X[~miss])
        assert np.all(np.abs(b["data"][()] - a["data"][()]) <= tol)
        assert np.allclose(se_a, se_b, rtol=1e-6, atol=0)
        np.testing.assert_array_equal(b["std"][()] == 0, a["std"][()] == 0)
    assert [p.name for p in tmp_path.rglob(".*")] == []


def test_cli_refuses_csv_and_bad_addresses_in_one_line(tmp_path):
    from cli.main import main
    data = Path("sample_data/digits_test.csv").resolve()
    gen = Path("sample_data/digits_generator.h5").resolve()
    r = CliRunner().invoke(main, ["score", str(gen), str(data), "-o", str(tmp_path / "s.csv"),
                                  "--dask", "local:2"])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "--dask reads DATA in chunks from .npy or .h5 files, not CSV; convert" in r.output
    np.save(tmp_path / "x.npy", np.zeros((3, 64)))
    r = CliRunner().invoke(main, ["score", str(gen), str(tmp_path / "x.npy"), "-o", str(tmp_path / "s.csv"),
                                  "--dask", "local:zero"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "expected local:N" in r.output    # usage errors
    r = CliRunner().invoke(main, ["score", str(gen), str(tmp_path / "x.npy"), "-o", str(tmp_path / "s.csv"),
                                  "--dask", "local:1", "--pvalues"])
    assert r.exit_code == 2 and "--pvalues/--alpha cannot be combined with --dask" in r.output


# Measured on 2 loaded cores: the local:2 cluster is up ~10 s after the start and the
# command exits ~2.5 s after SIGINT (cancelling the tasks, closing the workers and their
# nannies).  The deadline is 8 times that for a slower or busier CI machine, and still
# bounded: a Ctrl-C that hangs in the cluster's shutdown fails the test.
INTERRUPT_DEADLINE_S = 20


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_during_a_dask_run_exits_130_and_leaves_no_file(model, tmp_path, sig, code, word):
    """SIGINT once the output's temporary exists (the cluster is up and the tasks running;
    its 200 tasks take ~17 s more on 2 loaded cores, and the signal follows the temporary
    within the 0.05 s poll): exit 130, one line, nothing left behind.  SIGTERM (a
    scheduler stopping the task) likewise, exit 143: it left the pre-allocated temporary
    of the output's full size and a multiprocessing warning on stderr."""
    import time

    from cpadgn.modelfile import save_model
    save_model(tmp_path / "gen.h5", model.generator, noise_std=0.3)
    np.save(tmp_path / "x.npy", model.sample(2000, seed=13))
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "score", str(tmp_path / "gen.h5"),
                             str(tmp_path / "x.npy"), "-o", str(tmp_path / "out.h5"), "--dask", "local:2",
                             "--chunk-rows", "10", "--device", "cpu"],
                            cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started = time.monotonic()
        while not list(tmp_path.glob(".out.h5.*.tmp")):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - started < 240, "the cluster never started"
            time.sleep(0.05)
        proc.send_signal(sig)
        signalled = time.monotonic()
        while proc.poll() is None and time.monotonic() - signalled < INTERRUPT_DEADLINE_S:
            time.sleep(0.05)
        assert proc.poll() is not None, f"no exit {INTERRUPT_DEADLINE_S} s after Ctrl-C"
        # the command has exited; a Dask worker process may hold stderr a while longer
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == f"Error: {word}", err
    assert err.count(word) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.h5", "gen.h5.partition.h5", "x.npy"]


@pytest.mark.parametrize("delay", [0.0, 0.15, 0.3])
def test_ctrl_c_while_the_local_cluster_starts_exits_130(model, tmp_path, delay):
    """The local workers start with SIGINT ignored (inherited, so that they ignore it), and
    this process ignored it meanwhile: a Ctrl-C at the terminal (SIGINT to the process
    group) in those seconds was lost, and the run went on to exit 0 with its output.  A
    watcher process records it; the cluster closes, exit 130, one line, nothing written.
    And a worker importing cli.main (the parent's __main__) no longer installs cpadgn's
    handler there: the Ctrl-C ended it ('Nanny failed to start', exit 70; 2 of 6 runs on
    loaded cores at 0.2-0.3 s)."""
    import time

    from cpadgn.modelfile import save_model
    save_model(tmp_path / "gen.h5", model.generator, noise_std=0.3)
    np.save(tmp_path / "x.npy", model.sample(400, seed=13))
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "score", str(tmp_path / "gen.h5"),
                             str(tmp_path / "x.npy"), "-o", str(tmp_path / "out.csv"), "--dask", "local:2",
                             "--device", "cpu"], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        lines = []
        for line in proc.stderr:                     # until the cluster starts
            lines.append(line)
            if "Dask: starting 2 local worker" in line:
                break
        assert lines and "starting" in lines[-1], "".join(lines)
        time.sleep(delay)
        os.killpg(proc.pid, signal.SIGINT)           # as the terminal sends Ctrl-C
        signalled = time.monotonic()
        err = proc.stderr.read()
        proc.wait(timeout=120)
        elapsed = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == ["Error: interrupted"], err
    assert elapsed < 60, elapsed                     # the rest of the start, then the close
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.h5", "gen.h5.partition.h5", "x.npy"]


# a Ctrl-C 0.02 s into the model's broadcast (client.scatter(..., broadcast=True)): the
# local workers close under the scheduler's replicate, whose KeyError asyncio logged as a
# 15-line "Task exception was never retrieved" traceback above "Error: interrupted" (3 of 3
# runs on the wine data); the __main__ guard keeps the spawned workers from running it
SIGINT_WHILE_BROADCASTING = """
import os, signal, sys, threading
if __name__ == "__main__":
    import distributed
    scatter = distributed.Client.scatter
    def broadcasting(self, *args, **kwargs):
        if kwargs.get("broadcast"):
            threading.Timer(0.02, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
        return scatter(self, *args, **kwargs)
    distributed.Client.scatter = broadcasting
    from cli.main import main
    main(args=sys.argv[1:], prog_name="cpadgn")
"""


def test_ctrl_c_while_the_model_is_broadcast_exits_130_with_one_line(model, tmp_path):
    from cpadgn.modelfile import save_model
    save_model(tmp_path / "gen.h5", model.generator, noise_std=0.3)
    np.save(tmp_path / "x.npy", model.sample(200, seed=13))
    code = tmp_path / "code"
    code.mkdir()
    (code / "run_cli.py").write_text(SIGINT_WHILE_BROADCASTING)
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-m", "run_cli", "score", str(tmp_path / "gen.h5"), str(tmp_path / "x.npy"),
                          "-o", str(tmp_path / "out.h5"), "--dask", "local:2", "-q", "--device", "cpu"],
                         cwd=root, env={**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(root)])},
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 130, res.stderr
    assert res.stderr.splitlines() == ["Error: interrupted"], res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["code", "gen.h5", "gen.h5.partition.h5", "x.npy"]


@pytest.mark.parametrize("fallocate", [True, False], ids=["posix_fallocate", "rewrite"])
def test_reserve_disk_allocates_every_block_and_keeps_the_content(tmp_path, monkeypatch, fallocate):
    """A sparse file (data, a 3 MB hole, data) gets real blocks for its length plus the
    extra bytes, its content unchanged; without posix_fallocate (macOS) by rewriting."""
    if not fallocate:
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    path = tmp_path / "sparse"
    head, tail = os.urandom(5000), os.urandom(3000)
    with open(path, "wb") as f:
        f.write(head)
        f.seek(3 * 2 ** 20)
        f.write(tail)
    size = path.stat().st_size
    assert path.stat().st_blocks * 512 < size / 2                  # the hole holds no blocks
    cd.reserve_disk(path, extra=2 ** 16)
    assert path.stat().st_blocks * 512 >= size + 2 ** 16 - 4096     # a partial last block
    data = path.read_bytes()
    assert data[:5000] == head and data[size - 3000:size] == tail and not any(data[5000:size - 3000])
    assert len(data) >= size and not any(data[size:])


@pytest.mark.parametrize("argv", [["score", "s.h5"], ["impute", "i.h5", "--std"], ["impute", "i.npy", "--std"]],
                         ids=["score h5", "impute h5", "impute npy"])
def test_a_full_disk_is_one_line_and_leaves_nothing(client, model, tmp_path, argv):
    """The streamed outputs reserve their disk space before the work: a full disk (a 1 MB
    tmpfs filled but for 32 KB, where mounting is permitted; else a 32 KB file-size limit)
    is one line and exit 1, with nothing left behind (before: HDF5's failed writes crashed
    the process, and a memory map past the disk's end would die of SIGBUS)."""
    import cpadgn
    from cpadgn.modelfile import save_model
    from test_faults import file_size_limit, fill_up, small_disk
    save_model(tmp_path / "gen.h5", model.generator, noise_std=0.3)
    cpadgn.load(tmp_path / "gen.h5").partition()               # the cache is written here, not there
    np.save(tmp_path / "x.npy", rows(model, 3000, seed=3))     # outputs of 120-240 KB
    root = Path(__file__).resolve().parent.parent
    with small_disk(tmp_path / "disk") as disk:
        folder = tmp_path / "disk"
        limit = file_size_limit(2 ** 15) if disk is None else fill_up(disk, leave=2 ** 15)
        before = sorted(folder.iterdir())
        out = folder / argv[1]
        r = subprocess.run([sys.executable, "-m", "cli.main", argv[0], str(tmp_path / "gen.h5"),
                            str(tmp_path / "x.npy"), "-o", str(out), *argv[2:], "-q", "--device", "cpu",
                            "--dask", client.scheduler.address, "--chunk-rows", "500"],
                           cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True,
                           text=True, timeout=300, preexec_fn=limit)
        assert r.returncode == 1, (r.returncode, r.stderr)
        assert r.stderr.strip() == f"Error: could not write {out}: no space left on device; free space or " \
                                   "choose another path", r.stderr
        assert sorted(folder.iterdir()) == before


def test_the_command_line_starts_without_importing_dask():
    root = Path(__file__).resolve().parent.parent
    code = ("import sys\nfrom click.testing import CliRunner\nfrom cli.main import main\n"
            "for args in [[]] + [[c] for c in main.commands]:\n"
            "    assert CliRunner().invoke(main, args + ['--help']).exit_code == 0, args\n"
            "print(sorted(m for m in ('dask', 'distributed') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(root)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------ faults, last (a worker dies)
def test_a_killed_worker_is_replaced_and_the_output_is_complete(client, model, tmp_path):
    """Last in the file: the nanny's replacement worker need not be waited for."""
    X = rows(model, 240, seed=4)
    data = cd.read(_npy(tmp_path, X), chunk_rows=CHUNK // 2)
    killed = []

    def kill_one(done, total):
        if not killed:
            assert done < total                                 # mid-run
            pid = next(iter(client.run(os.getpid).values()))
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    got = cd.score(client, model, data, progress=kill_one)
    assert killed and killed[0] not in client.run(os.getpid).values()
    assert_scores_equal(model, X, got)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (3,), (2, 3, 4)])
def test_chunked_reader_refuses_bad_shapes_like_read_data(tmp_path, shape):
    """open_rows (--dask) had its own copy of read_data's shape checks, without what to do:
    '... has no data rows' only.  Both say the same now, 'what is wrong; what to do'."""
    from cpadgn.data import read_data
    path = tmp_path / "x.npy"
    np.save(path, np.zeros(shape))
    with pytest.raises(CpadgnError) as here:
        read_data(path)
    with pytest.raises(CpadgnError) as chunked:
        cd.open_rows(path)
    assert str(chunked.value) == str(here.value) and "; " in str(here.value)


def test_rounding_warning_and_count_on_the_cluster(client, tmp_path):
    """score and impute --dask warn about the rows that lie far in noise units (the estimate
    is computed block by block on the cluster; test_rounding checks its value and the run
    without --dask)."""
    import json

    from cli.main import main
    from cpadgn.modelfile import save_model
    from cpadgn.network import PiecewiseAffineNet
    rng = np.random.default_rng(5)
    A, b = rng.normal(size=(3, 2)), rng.normal(size=3)
    save_model(tmp_path / "lin.h5", PiecewiseAffineNet.from_arrays([A], [b], []), noise_std=1e-20)
    X = rng.standard_normal((30, 2)) @ A.T + b
    X[:4] = b                                        # x'Px = 0: rows 1..4 are not warned about
    X[::3, 1] = np.nan                               # 10 rows for impute, 8 of them far from b
    h5_data(tmp_path / "x.h5", X)
    for verb, want in (("score", 26), ("impute", 8)):
        r = CliRunner().invoke(main, [verb, str(tmp_path / "lin.h5"), str(tmp_path / "x.h5"), "-o",
                                      str(tmp_path / f"{verb}.h5"), "--json", "--device", "cpu", "--dask",
                                      client.scheduler.address, "--chunk-rows", "7"], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["rows_unreliable_by_rounding"] == want, verb
        assert sum(l.startswith(f"Warning: {want} row(s)") for l in r.stderr.splitlines()) == 1
