"""Exact conditional imputation and exact draws (cpadgn.impute, cpadgn.sampling, cpadgn impute)
against independent oracles: closed forms (linear generator), quadrature (S = 1) and
importance sampling with a standard error (any S)."""
import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from cli.main import main
from cpadgn.data import read_data
from cpadgn.impute import conditional_cdf, imputation_errors, impute as impute_fn
from cpadgn.model import CPAModel
from cpadgn.modelfile import save_model
from cpadgn.polytope import log_diff_ndtr, polytope_moments
from cpadgn.sampling import sample_standard_polytope, truncated_normal_1d

from oracles import (GL_W, GL_X, assert_stderr_matches_spread, line_breakpoints, random_linear_model,
                     random_net, s4_imputation_case, salt_qmc, small_s3_net_and_quadrature)


# ============================================================================ oracles
def _log_lik_obs(gz, x, var):
    """log N(x_o; g(z)_o, var_o) for every row of gz (n, D); NaN in x = missing."""
    o = ~np.isnan(x)
    r = gz[:, o] - x[o]
    return -0.5 * (r * r / var[o]).sum(1)


def quad_nodes_1d(net, lo=-40.0, hi=40.0, n_grid=4001):
    """Piecewise Gauss-Legendre nodes on [lo, hi] for S = 1, pieces split at the
    breakpoints of g and on a fine grid: edges, nodes t (pieces, 60), log weights
    (with the prior density) and g(t) (pieces, 60, D)."""
    breaks = line_breakpoints(lambda t: net.preactivations(t[:, None]), lo, hi)
    edges = np.union1d(breaks, np.linspace(lo, hi, n_grid))
    a, b = edges[:-1, None], edges[1:, None]
    t = 0.5 * (b - a) * GL_X + 0.5 * (a + b)
    logw = np.log(0.5 * (b - a) * GL_W) - 0.5 * t * t
    return edges, t, logw, net.forward(t.reshape(-1, 1)).reshape(t.shape + (net.output_dim,))


def quad_conditional_1d(nodes, x, sigma):
    """E[x_m | x_o] and Cov[x_m | x_o] for S = 1 by quadrature of g(z) p(z | x_o)."""
    _, t, logw, gz = nodes
    D = gz.shape[-1]
    var = np.broadcast_to(np.asarray(sigma, float) ** 2, (D,))
    gz = gz.reshape(-1, D)
    lw = logw.ravel() + _log_lik_obs(gz, x, var)
    w = np.exp(lw - lw.max())
    w /= w.sum()
    m = np.isnan(x)
    g = gz[:, m]
    mean = w @ g
    d = g - mean
    return mean, (w[:, None] * d).T @ d + np.diag(var[m])


def quad_posterior_cdf_1d(net, nodes, x, sigma):
    """The exact posterior CDF of z given x_o (S = 1) by the same quadrature: a callable
    (whole pieces summed, the last partial piece by its own 60-point rule)."""
    edges, t, logw, gz = nodes
    D = gz.shape[-1]
    var = np.broadcast_to(np.asarray(sigma, float) ** 2, (D,))
    lw = logw + _log_lik_obs(gz.reshape(-1, D), x, var).reshape(t.shape)
    shift = lw.max()
    cum = np.concatenate([[0.0], np.cumsum(np.exp(lw - shift).sum(1))])

    def cdf(z):
        z = np.clip(np.asarray(z, float), edges[0], edges[-1])
        k = np.clip(np.searchsorted(edges, z, side="right") - 1, 0, len(edges) - 2)
        a = edges[k]
        h = 0.5 * (z - a)
        tt = h[:, None] * GL_X + (a + h)[:, None]
        with np.errstate(divide="ignore"):
            lp = (np.log(h)[:, None] + np.log(GL_W) - 0.5 * tt * tt
                  + _log_lik_obs(net.forward(tt.reshape(-1, 1)), x, var).reshape(tt.shape))
        return (cum[k] + np.exp(lp - shift).sum(1)) / cum[-1]

    return cdf


def prior_draws_of_g(model, n=200_000, seed=0):
    """g(z) for n draws of z from the model's own (user) prior: (n, D)."""
    rng = np.random.default_rng(seed)
    z = model.prior_mean + rng.standard_normal((n, model.latent_dim)) @ model.prior_chol.T
    return model.generator.forward(z)


def importance_conditional(model, gz, x):
    """Self-normalised importance sampling with the prior as proposal (gz from
    ``prior_draws_of_g``): E[x_m | x_o] and E[x_m x_m^T | x_o] with their standard errors
    (delta method), and the effective sample size."""
    var = np.broadcast_to(np.asarray(model.noise_std, float) ** 2, (model.output_dim,))
    lw = _log_lik_obs(gz, x, var)
    w = np.exp(lw - lw.max())
    w /= w.sum()
    m = np.isnan(x)
    g = gz[:, m]
    f1 = g
    f2 = (g[:, :, None] * g[:, None, :]) + np.diag(var[m])[None]
    est1 = w @ f1
    est2 = np.einsum("n,nij->ij", w, f2)
    se1 = np.sqrt(np.einsum("n,ni->i", w ** 2, (f1 - est1) ** 2))
    se2 = np.sqrt(np.einsum("n,nij->ij", w ** 2, (f2 - est2) ** 2))
    return est1, se1, est2, se2, 1.0 / (w ** 2).sum()


# ============================================================================ closed form
def test_linear_generator_matches_gaussian_conditioning():
    rng = np.random.default_rng(0)
    D = 6
    model, A, b, mu, cov_z, sigma = random_linear_model(rng, 2, D, 0.8)
    X = model.sample(8, seed=1)
    X[0, [1, 4]] = np.nan
    X[1, :] = np.nan
    X[2, 0] = np.nan
    X[4, [0, 2, 3, 5]] = np.nan
    cond = model.conditional(X)
    m_x = b + A @ mu
    C_x = A @ cov_z @ A.T + np.diag(sigma ** 2)
    for n, x in enumerate(X):
        m, o = np.isnan(x), ~np.isnan(x)
        want_mean, want_cov = x.copy(), np.zeros((D, D))
        if m.any():
            K = C_x[np.ix_(m, o)] @ np.linalg.inv(C_x[np.ix_(o, o)]) if o.any() else np.zeros((m.sum(), 0))
            want_mean[m] = m_x[m] + K @ (x[o] - m_x[o])
            want_cov[np.ix_(m, m)] = C_x[np.ix_(m, m)] - K @ C_x[np.ix_(o, m)]
        np.testing.assert_allclose(cond.mean[n], want_mean, atol=1e-10, rtol=0)
        np.testing.assert_allclose(cond.cov[n], want_cov, atol=1e-10, rtol=0)
        np.testing.assert_allclose(cond.std[n], np.sqrt(np.diag(want_cov)), atol=1e-10, rtol=0)
    np.testing.assert_array_equal(model.impute(X)[~np.isnan(X)], X[~np.isnan(X)])


# ============================================================================ S = 1 quadrature
@pytest.fixture(scope="module")
def model1():
    return CPAModel(random_net(1, (8, 8), 4, seed=3, slope=0.1, scale=2.0), noise_std=0.3, device="cpu")


def _rows1(model):
    X = model.sample(6, seed=2)
    X[0, [0]] = np.nan
    X[1, [1, 3]] = np.nan
    X[2, :3] = np.nan
    X[3, :] = np.nan                   # nothing observed: the marginal moments
    X[4, [2]] = np.nan
    X[4, 0] += 3.0                     # off the manifold
    return X                           # row 5: complete, passes through


def test_s1_conditional_moments_match_quadrature(model1):
    X = _rows1(model1)
    cond = model1.conditional(X)
    nodes = quad_nodes_1d(model1.net)
    for n, x in enumerate(X):
        m = np.isnan(x)
        if not m.any():
            np.testing.assert_array_equal(cond.mean[n], x)
            assert not cond.cov[n].any()
            continue
        mean, cov = quad_conditional_1d(nodes, x, 0.3)
        np.testing.assert_allclose(cond.mean[n, m], mean, atol=1e-8, rtol=0)
        np.testing.assert_allclose(cond.cov[n][np.ix_(m, m)], cov, atol=1e-8, rtol=0)
        np.testing.assert_array_equal(cond.mean[n, ~m], x[~m])
        assert not cond.cov[n][~m].any() and not cond.cov[n][:, ~m].any()


def test_equal_rows_get_equal_imputations_across_batches(model1):
    """Copies of a row in different batches of rows (row_chunk 2) and at different places
    in one got conditional means and stds that could differ in the last bits (each batch's
    posterior and its sums over blocks of pairs); they now have the first copy's, bit for
    bit, and match the quadrature oracle.  Their draws stay independent."""
    X = _rows1(model1)
    where = np.array([0, 1, 0, 2, 4, 0, 1, 3, 4, 4, 5, 0])
    Y = X[where]
    res = impute_fn(model1.net, model1.partition(), model1.noise_std, Y, std=True, full_cov=True,
                    draws=2, seed=1, row_chunk=2)
    first = {}
    for i, j in enumerate(where):
        k = first.setdefault(j, i)
        for f in ("mean", "std", "cov", "error_bound", "mean_stderr"):
            np.testing.assert_array_equal(getattr(res, f)[i], getattr(res, f)[k], err_msg=f"{f} row {i}")
    nodes = quad_nodes_1d(model1.net)
    for j in (0, 1, 4):
        m = np.isnan(X[j])
        mean, cov = quad_conditional_1d(nodes, X[j], 0.3)
        np.testing.assert_allclose(res.mean[first[j], m], mean, atol=1e-8, rtol=0)
        np.testing.assert_allclose(res.cov[first[j]][np.ix_(m, m)], cov, atol=1e-8, rtol=0)
    assert not np.array_equal(res.draws[:, 0], res.draws[:, 2])       # row 0's copies: their own draws
    # the bundled digits model, 40 test rows with their top half hidden (and 4 more entries
    # of every third) and 40 copies among them: 10 rows' copies differed, in batches of 7
    from pathlib import Path
    import cpadgn
    samples = Path(__file__).resolve().parents[1] / "sample_data"
    digits = cpadgn.load(samples / "digits_generator.h5", cache=False)
    X = np.loadtxt(samples / "digits_test.csv", delimiter=",", skiprows=1)[:40]
    X[:, :32] = np.nan
    X[::3, 40:44] = np.nan
    rng = np.random.default_rng(0)
    where = np.concatenate([np.arange(40), rng.integers(0, 40, 40)])[rng.permutation(80)]
    res = impute_fn(digits.net, digits.partition(), digits.noise_std, X[where], std=True, row_chunk=7)
    for j in range(40):
        copies = np.flatnonzero(where == j)
        for f in ("mean", "std", "error_bound", "mean_stderr"):
            np.testing.assert_array_equal(getattr(res, f)[copies], getattr(res, f)[copies[:1]].repeat(copies.size, 0),
                                          err_msg=f"{f} row {j}")


def test_s1_draws_of_z_pass_ks_against_quadrature_cdf(model1):
    X = _rows1(model1)[[0, 2, 3, 4]]
    K = 2000
    res = impute_fn(model1.net, model1.partition(), model1.noise_std, X, draws=K, seed=7)
    nodes = quad_nodes_1d(model1.net)
    for n, x in enumerate(X):
        cdf = quad_posterior_cdf_1d(model1.net, nodes, x, 0.3)
        p = stats.kstest(res.z_draws[:, n, 0], cdf).pvalue
        assert p > 1e-3, (n, p)


# ============================================================================ S = 3: nested quadrature
def _s3_incomplete_rows(net):
    """Rows near the manifold of the small S = 3 net (D = 4) with 1, 2 and 3 entries missing."""
    rng = np.random.default_rng(5)
    X = net.forward(rng.standard_normal((3, 3))) + 0.4 * rng.standard_normal((3, 4))
    X[0, 1] = np.nan
    X[1, [0, 3]] = np.nan
    X[2, [0, 1, 2]] = np.nan
    return X


def test_s3_conditional_mean_matches_nested_quadrature():
    """E[x_m | x_o] = E[g_m(z) | x_o] against ``oracles.Quadrature3D`` (whose own error,
    measured by doubling its nodes in test_likelihood.test_s3_oracle_converges, is <= 1e-9),
    within 1e-8 plus cpadgn's certified pruning bound (relative, on values of size |g| <~ 10)."""
    net, quad = small_s3_net_and_quadrature()
    model = CPAModel(net, noise_std=0.4, device="cpu")
    X = _s3_incomplete_rows(net)
    res = impute_fn(model.net, model.partition(), model.noise_std, X)
    for n, x in enumerate(X):
        m = np.isnan(x)
        _, _, eg = quad.integrate(x, 0.4)
        tol = 1e-8 + 2 * res.error_bound[n] * np.abs(eg[m]).max()
        np.testing.assert_allclose(res.mean[n, m], eg[m], atol=tol, rtol=0)
        np.testing.assert_array_equal(res.mean[n, ~m], x[~m])


def test_s3_conditional_covariance_and_std_match_nested_quadrature():
    """Cov[x_m | x_o] = E[g_m g_m^T | x_o] - E[g_m | x_o] E[g_m | x_o]^T + sigma^2 I (what
    `cpadgn impute --std` writes the square root of) against ``oracles.Quadrature3D``'s second
    moment (its own error, by doubling its nodes in
    test_likelihood.test_s3_oracle_converges, is <= 1e-9), within 1e-8 plus the certified
    pruning bound (relative, on second moments of size |g|^2 <~ 100)."""
    net, quad = small_s3_net_and_quadrature()
    model = CPAModel(net, noise_std=0.4, device="cpu")
    X = _s3_incomplete_rows(net)
    cond = model.conditional(X)
    res = impute_fn(model.net, model.partition(), model.noise_std, X, std=True)
    for n, x in enumerate(X):
        m = np.isnan(x)
        _, _, eg, egg = quad.integrate(x, 0.4, second=True)
        want = egg[np.ix_(m, m)] - np.outer(eg[m], eg[m]) + 0.4 ** 2 * np.eye(m.sum())
        tol = 1e-8 + 2 * res.error_bound[n] * np.abs(egg[np.ix_(m, m)]).max()
        np.testing.assert_allclose(cond.cov[n][np.ix_(m, m)], want, atol=tol, rtol=0)
        np.testing.assert_allclose(res.std[n, m], np.sqrt(np.diag(want)), atol=tol / 0.4, rtol=0)
        np.testing.assert_array_equal(res.std[n, ~m], 0.0)


def test_s3_draws_mean_matches_the_exact_conditional_mean():
    net, quad = small_s3_net_and_quadrature()
    model = CPAModel(net, noise_std=0.4, device="cpu")
    X = _s3_incomplete_rows(net)
    K = 2000
    draws = model.impute(X, draws=K, seed=11)
    for n, x in enumerate(X):
        m = np.isnan(x)
        _, _, eg = quad.integrate(x, 0.4)
        d = draws[:, n][:, m]
        se = d.std(0, ddof=1) / np.sqrt(K)
        assert np.all(np.abs(d.mean(0) - eg[m]) <= 4 * se), (n, d.mean(0) - eg[m], se)
        np.testing.assert_array_equal(draws[:, n][:, ~m], np.broadcast_to(x[~m], (K, (~m).sum())))


# ============================================================================ any S: importance sampling
@pytest.mark.parametrize("S,hidden,prior", [(2, (8, 8), True), (3, (6,), False)])
def test_conditional_moments_match_importance_sampling(S, hidden, prior):
    net = random_net(S, hidden, 4, seed=11 + S, slope=0.1, scale=1.5)
    rng = np.random.default_rng(S)
    kw = {}
    if prior:
        L = np.tril(rng.normal(size=(S, S))) * 0.3 + np.eye(S)
        kw = {"prior_mean": rng.normal(size=S) * 0.5, "prior_cov": L @ L.T}
    model = CPAModel(net, noise_std=0.5, device="cpu", **kw)
    X = model.sample(4, seed=3)
    X[0, [0, 1]] = np.nan
    X[1, [2]] = np.nan
    X[2, [0, 2, 3]] = np.nan
    X[3, :] = np.nan
    cond = model.conditional(X)
    gz = prior_draws_of_g(model)
    for n, x in enumerate(X):
        m = np.isnan(x)
        e1, se1, e2, se2, ess = importance_conditional(model, gz, x)
        assert ess > 1000
        got1 = cond.mean[n, m]
        got2 = cond.cov[n][np.ix_(m, m)] + np.outer(got1, got1)
        # S <= 3 moments are exact: the importance sampler's own error is all there is
        assert np.all(np.abs(got1 - e1) <= 4 * se1), (n, got1, e1, se1)
        assert np.all(np.abs(got2 - e2) <= 4 * se2), (n, got2, e2, se2)


def test_draws_match_exact_conditional_moments():
    net = random_net(2, (8, 8), 5, seed=1, slope=0.1, scale=2.0)
    model = CPAModel(net, noise_std=0.3, device="cpu")
    X = model.sample(5, seed=4)
    X[0, [1, 3]] = np.nan
    X[1, :] = np.nan
    X[2, [0, 2, 4]] = np.nan
    X[3, [4]] = np.nan
    X[3, 0] += 2.0
    K = 4000
    cond = model.conditional(X)
    draws = model.impute(X, draws=K, seed=3)
    assert draws.shape == (K,) + X.shape
    for n, x in enumerate(X):
        m = np.isnan(x)
        if not m.any():
            continue
        d = draws[:, n][:, m]
        mean, cov = cond.mean[n, m], cond.cov[n][np.ix_(m, m)]
        se = np.sqrt(np.diag(cov) / K)
        assert np.all(np.abs(d.mean(0) - mean) <= 4.5 * se), n
        c = d - mean                                   # centred at the exact mean
        prod = c[:, :, None] * c[:, None, :]
        se_c = prod.std(0, ddof=1) / np.sqrt(K)
        assert np.all(np.abs(prod.mean(0) - cov) <= 4.5 * se_c), n


def test_draws_are_calibrated_on_data_from_the_model():
    """Probability integral transform: for rows drawn from the model itself, the exact
    conditional CDF at the hidden true value is Uniform(0, 1) (one hidden entry per row,
    so the rows are independent); the CDF comes from the exact draws (Rao-Blackwellised)."""
    net = random_net(2, (8, 8), 4, seed=8, slope=0.1, scale=2.0)
    model = CPAModel(net, noise_std=0.2, device="cpu")
    X = model.sample(300, seed=1)
    rng = np.random.default_rng(2)
    hidden = np.zeros(X.shape, bool)
    hidden[np.arange(len(X)), rng.integers(0, 4, len(X))] = True
    hidden[:20] = True                               # and a few rows with nothing observed
    Xm = np.where(hidden, np.nan, X)
    res = impute_fn(model.net, model.partition(), model.noise_std, Xm, draws=200, seed=3)
    cdf = conditional_cdf(model.net, model.noise_std, res.z_draws, X)
    pit = cdf[20:][hidden[20:]]
    assert stats.kstest(pit, "uniform").pvalue > 1e-3
    ev = imputation_errors(X, res.mean, hidden, res.draws, cdf=cdf)
    assert abs(ev["coverage_cdf"] - 0.9) < 4 * np.sqrt(0.09 / ev["hidden"])


# ============================================================================ invariants
def test_observed_bitwise_dtype_shape_seed():
    net = random_net(2, (6, 6), 4, seed=5, slope=0.1, scale=1.5)
    model = CPAModel(net, noise_std=0.4, device="cpu")
    X = model.sample(7, seed=1)
    X[0, 0] = -0.0
    X[1, [1, 2]] = np.nan
    X[2, :] = np.nan
    X[3, 3] = np.nan
    X[4, 0] = 5e-324                    # a subnormal survives untouched
    for dtype in (np.float64, np.float32):
        Xd = X.astype(dtype)
        obs = ~np.isnan(Xd)
        mean = model.impute(Xd)
        assert mean.dtype == dtype and mean.shape == Xd.shape
        assert not np.isnan(mean).any()
        assert mean[obs].tobytes() == Xd[obs].tobytes()
        assert np.signbit(mean[0, 0])
        d1 = model.impute(Xd, draws=3, seed=42)
        d2 = model.impute(Xd, draws=3, seed=42)
        d3 = model.impute(Xd, draws=3, seed=43)
        assert d1.dtype == dtype and d1.shape == (3,) + Xd.shape
        assert d1.tobytes() == d2.tobytes()
        assert not np.array_equal(d1, d3)
        for k in range(3):
            assert d1[k][obs].tobytes() == Xd[obs].tobytes()
    # rows with nothing missing pass through untouched; all-missing rows: the marginal mean
    np.testing.assert_array_equal(model.impute(X[[0, 5, 6]]), X[[0, 5, 6]])
    prior_draws = model.sample(200_000, seed=9)
    marginal, se = prior_draws.mean(0), prior_draws.std(0) / np.sqrt(200_000)
    assert np.all(np.abs(model.impute(X[[2]])[0] - marginal) < 4.5 * se)
    # integer data has nothing missing: returned as float64 equal values
    Xi = np.arange(8).reshape(2, 4)
    np.testing.assert_array_equal(model.impute(Xi), Xi)
    # None in an object array (a pandas column with gaps) is missing, as in log_prob; it
    # was refused with 'the data must be numeric, got dtype object'
    Xo = X[[1, 3]].astype(object)
    Xo[np.isnan(X[[1, 3]])] = None
    np.testing.assert_array_equal(model.impute(Xo), model.impute(X[[1, 3]]))


def test_many_draws_hold_the_result_once_plus_working_memory():
    """K draws of N rows of D columns are 8 K N D bytes; impute held them about four times
    over (a float64 working copy, the result, the chunk's noise and np.where temporaries):
    --draws 1000 of 200 digits (102 MB of draws) raised the peak RSS by 300 MB over
    --draws 200.  Now the draws go straight into the result, the noise and region maps
    in blocks sized by memory_budget: the peak traced allocation is the result plus the
    latent draws (8 K N S) plus O(K N) bookkeeping (picks, uniforms, the 1-D sampler's
    bounds: about 12 numbers a draw) plus the budget's blocks.  The draws keep the observed
    entries, and their residuals from g(z) on the missing ones are N(0, sigma^2)."""
    import tracemalloc
    S, D, N, K, budget = 1, 40, 20, 5000, 2.0 ** 23
    model = CPAModel(random_net(S, (6,), D, seed=4, slope=0.1, scale=1.5), noise_std=0.3, device="cpu")
    X = model.sample(N, seed=1)
    X[:, ::2] = np.nan
    X[3] = np.nan
    part, tab = model.partition(), model._region_table()
    tracemalloc.start()
    try:
        res = impute_fn(model.net, part, model.noise_std, X, draws=K, seed=2, tab=tab, memory_budget=budget)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    result = 8.0 * K * N * (D + S)
    assert peak < result + 8.0 * K * N * 12 + budget, (peak / 1e6, result / 1e6)
    m = np.isnan(X)
    assert res.draws.shape == (K, N, D) and np.array_equal(res.draws[:, ~m], np.broadcast_to(X[~m], (K, (~m).sum())))
    g = model.net.forward(res.z_draws.reshape(-1, S)).reshape(K, N, D)
    eps = (res.draws - g)[:, m] / 0.3
    assert abs(eps.mean()) < 4.5 / np.sqrt(eps.size) and abs(eps.var() - 1) < 4.5 * np.sqrt(2 / eps.size)


# ============================================================================ the sampler
def test_truncated_normal_1d_far_tails():
    rng = np.random.default_rng(0)
    for lo, hi in [(30.0, 30.5), (-1000.0, -999.0), (-np.inf, -40.0), (2.0, np.inf), (-0.01, 0.01),
                   (-3.0, 8.0)]:
        x = truncated_normal_1d(np.full(4000, lo), np.full(4000, hi), rng)
        assert np.all((x >= lo) & (x <= hi)) and np.all(np.isfinite(x))
        logZ = log_diff_ndtr(lo, hi)
        flip = lo > 0

        def cdf(v):
            if flip:                     # upper tail: 1 - P[X > v]
                return 1.0 - np.exp(log_diff_ndtr(-hi, -np.asarray(v)) - logZ)
            return np.exp(log_diff_ndtr(lo, np.asarray(v)) - logZ)
        assert stats.kstest(x, cdf).pvalue > 1e-3, (lo, hi)


def _random_polytopes(S, B, F, seed, shift):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(B, F, S))
    b = rng.normal(size=(B, F)) * 2 - shift
    mask = rng.random((B, F)) < 0.85
    mask[:, 0] = True
    return A, b, mask


def test_polytope_sampler_matches_exact_moments_s2():
    A, b, mask = _random_polytopes(2, 120, 5, seed=1, shift=1.5)
    ref = polytope_moments(A, b, mask)
    keep = np.isfinite(ref.log_mass) & (ref.log_mass > -300)
    A, b, mask = A[keep], b[keep], mask[keep]
    assert keep.sum() > 30 and ref.log_mass[keep].min() < -20      # far tails included
    n = 3000
    st = {}
    u = sample_standard_polytope(A, b, mask, np.full(len(A), n), np.random.default_rng(2), stats=st)
    u = u.reshape(len(A), n, 2)
    assert np.all((np.einsum("bfs,bns->bnf", A, u) - b[:, None]) [np.broadcast_to(mask[:, None], (len(A), n, 5))]
                  <= 1e-9)
    sd = np.sqrt(np.einsum("bii->bi", ref.cov[keep]))
    z = (u.mean(1) - ref.mean[keep]) / (sd / np.sqrt(n))
    assert np.abs(z).max() < 4.5
    c = u - ref.mean[keep][:, None]
    v = (c ** 2).mean(1)
    sev = (c ** 2).std(1) / np.sqrt(n)
    assert np.abs((v - sd ** 2) / sev).max() < 4.5
    # the closed-form acceptance rate is the observed one
    pred, prop, acc = st["predicted_acceptance"], st["proposals"], st["accepted"]
    live = pred < 1
    se = np.sqrt(pred * (1 - pred) / prop)
    assert np.abs((acc / prop - pred)[live] / se[live]).max() < 4.5


def test_polytope_sampler_s3_matches_rejection():
    A, b, mask = _random_polytopes(3, 20, 5, seed=4, shift=0.0)
    rng = np.random.default_rng(5)
    ref = []
    for i in range(20):                 # plain rejection from N(0, I) as the reference
        v = rng.standard_normal((100_000, 3))
        ref.append(v[((v @ A[i].T - b[i]) <= 0)[:, mask[i]].all(1)])
    keep = np.array([len(v) >= 2000 for v in ref])
    assert keep.sum() >= 5
    n = 4000
    u = sample_standard_polytope(A[keep], b[keep], mask[keep], np.full(keep.sum(), n), rng)
    u = u.reshape(-1, n, 3)
    for ui, v in zip(u, [r for r, k in zip(ref, keep) if k]):
        sd = v.std(0)
        z = (ui.mean(0) - v.mean(0)) / (sd * np.sqrt(1 / n + 1 / len(v)))
        assert np.abs(z).max() < 4.5


# ============================================================================ CLI
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("impute")
    net = random_net(2, (6, 6), 4, seed=2, slope=0.1, scale=1.5)
    save_model(d / "gen.h5", net, noise_std=0.3)
    model = CPAModel(net, noise_std=0.3, device="cpu")
    X = model.sample(12, seed=0)
    X[0, 1] = np.nan
    X[3, [0, 2]] = np.nan
    X[5, :] = np.nan
    X[7, 3] = np.nan
    names = ["a", "b", "c", "d"]
    with open(d / "data.csv", "w") as f:
        f.write(",".join(names) + "\n")
        for row in X:
            f.write(",".join("NA" if np.isnan(v) else repr(float(v)) for v in row) + "\n")
    np.save(d / "data.npy", X)
    with h5py.File(d / "data.h5", "w") as f:
        f["x"] = X
    return d, X, model


def run(*args):
    return CliRunner().invoke(main, ["impute", *map(str, args)])


@pytest.mark.parametrize("ext", ["csv", "npy", "h5"])
def test_cli_round_trip_and_std(files, ext):
    d, X, model = files
    out = d / f"out_{ext}.{ext}"
    r = run(d / "gen.h5", d / f"data.{ext}", "-o", out, "--std", "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    cond = model.conditional(X)
    if ext == "h5":
        with h5py.File(out) as f:
            assert sorted(f) == ["data", "std"]             # S = 2: exact, no 'mean_stderr'
            got, std = f["data"][()], f["std"][()]
    else:
        got = read_data(out)
        std = read_data(d / f"out_{ext}.std.{ext}")
    assert got.shape == X.shape
    obs = ~np.isnan(X)
    assert got[obs].tobytes() == X[obs].tobytes()
    np.testing.assert_array_equal(got, cond.mean)
    np.testing.assert_array_equal(std, cond.std)
    if ext == "csv":
        assert (d / "out_csv.csv").read_text().splitlines()[0] == "a,b,c,d"


@pytest.mark.parametrize("ext", ["csv", "npy", "h5"])
def test_cli_draws_layout(files, ext):
    d, X, model = files
    out = d / f"draws_{ext}.{ext}"
    r = run(d / "gen.h5", d / "data.npy", "-o", out, "--draws", 3, "--seed", 5, "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    want = model.impute(X, draws=3, seed=5)
    if ext == "csv":
        lines = out.read_text().splitlines()
        assert lines[0] == "draw,x1,x2,x3,x4" and len(lines) == 1 + 3 * len(X)
        tab = np.loadtxt(out, delimiter=",", skiprows=1)
        np.testing.assert_array_equal(tab[:, 0], np.repeat([1, 2, 3], len(X)))
        got = tab[:, 1:].reshape(3, len(X), 4)
    elif ext == "npy":
        got = np.load(out)
    else:
        with h5py.File(out) as f:
            got = f["data"][()]
    np.testing.assert_array_equal(got, want)


def test_cli_draws_help_says_noise_is_included_and_where_pooling_is(files):
    """--draws said only "K exact draws from p(x_missing | x_observed)": a multiple-imputation
    user could not tell whether the draws carry the observation noise (they do: their spread
    is --std's, test_draws_match_exact_conditional_moments) nor where pooling is described."""
    text = " ".join(run("--help").output.split())
    assert "observation noise included" in text and "Rubin's rules" in text


def test_cli_evaluate_mcar(files):
    d, X, model = files
    r = run(d / "gen.h5", d / "data.csv", "--evaluate-mcar", 0.3, "--draws", 50, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output[r.output.index("{"):])
    assert rep["rmse"] > 0 and rep["hidden_entries"] == round(0.3 * (~np.isnan(X)).sum())
    assert set(rep["rmse_per_column"]) == {"a", "b", "c", "d"}
    assert 0 <= rep["coverage_90"] <= 1
    r = run(d / "gen.h5", d / "data.csv", "--evaluate-mcar", 0.3, "--device", "cpu")
    assert r.exit_code == 0 and "rmse" in r.output and "RMSE per column" in r.output


def test_cli_evaluate_mcar_keeps_every_column_of_a_header_with_duplicate_names(files):
    """A header naming two columns alike (a,b,b,d) gave rmse_per_column 3 keys for 4 columns,
    the second 'b' overwriting the first; each repeated name now carries its column number,
    with the RMSE of the same run under distinct names (a,b,c,d), column by column."""
    d, X, model = files
    dup = d / "dup.csv"
    lines = (d / "data.csv").read_text().splitlines()
    dup.write_text("\n".join(["a,b,b,d"] + lines[1:]) + "\n")
    reps = []
    for path in (d / "data.csv", dup):
        r = run(d / "gen.h5", path, "--evaluate-mcar", 0.5, "--seed", 3, "--json", "-q", "--device", "cpu")
        assert r.exit_code == 0, r.output
        reps.append(json.loads(r.stdout)["rmse_per_column"])
    assert list(reps[1]) == ["a", "b (column 2)", "b (column 3)", "d"]
    assert list(reps[1].values()) == list(reps[0].values())
    r = run(d / "gen.h5", dup, "--evaluate-mcar", 0.5, "--seed", 3, "-q", "--device", "cpu")
    assert r.exit_code == 0 and "b (column 2)" in r.output and "b (column 3)" in r.output


def test_cli_evaluate_mcar_coverage_of_k_draws_is_documented(files):
    """The central 90% of K draws covers about 0.9 (K - 1)/(K + 1) of the hidden entries
    even on rows drawn from the model itself (0.6 at K = 5; measured 0.62, 0.81, 0.88 at
    K = 5, 20, 100 on 2,000 entries): a new user read 0.76 at K = 20 as a badly
    calibrated model.  --help says what to expect, and it holds here."""
    assert "0.9 (K-1)/(K+1)" in " ".join(run("--help").output.split())
    d, _, model = files
    np.save(d / "own.npy", model.sample(500, seed=11))
    r = run(d / "gen.h5", d / "own.npy", "--evaluate-mcar", 0.25, "--draws", 5, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output[r.output.index("{"):])
    n, want = rep["hidden_entries"], 0.9 * 4 / 6
    assert abs(rep["coverage_90"] - want) < 4 * np.sqrt(want * (1 - want) / n) + 0.03   # + the law's own spread


@pytest.mark.parametrize("extra,data,message,code", [
    (["-o", "{d}/bad1.csv"], "wide.csv", "columns", 1),                      # seen once the files are read
    ([], "data.csv", "-o OUT", 2),                                           # the command line alone: usage
    (["-o", "{d}/bad2.txt"], "data.csv", "extension", 2),
    (["-o", "{d}/bad3.csv", "--draws", "0"], "data.csv", "--draws", 2),
    (["--evaluate-mcar", "1.5"], "data.csv", "--evaluate-mcar", 2),
    (["--std"], "data.csv", "-o OUT", 2),
    (["-o", "{d}/bad5.csv", "--chunk-rows", "4"], "data.csv", "add --dask", 2),
    (["-o", "{d}/bad6.csv", "--dask", "local:1", "--evaluate-mcar", "0.2"], "data.csv", "cannot be combined", 2),
    (["-o", "{d}/bad4.csv", "--draws", "2"], "draw.csv", "draw", 1),
    (["-o", "{d}/nodir/out.csv"], "data.csv", "does not exist", 1),
])
def test_cli_refusals_are_one_line_without_output(files, extra, data, message, code):
    d, X, _ = files
    (d / "wide.csv").write_text("1,2,3,4,5\n6,,8,9,10\n")
    (d / "draw.csv").write_text("draw,b,c,d\n1,,3,4\n")
    r = run(d / "gen.h5", d / data, *[e.format(d=d) for e in extra], "-q", "--device", "cpu")
    assert r.exit_code == code, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], r.output
    assert not any(p.name.startswith(("bad", ".bad")) for p in d.iterdir())


def test_cli_draw_column_is_refused_before_imputing(files, monkeypatch):
    """A CSV DATA column named 'draw' clashes with the CSV draws layout: refused before the
    imputation runs (it was refused only when writing, after all the work)."""
    from cpadgn.model import CPAModel
    d, _, _ = files
    (d / "draw.csv").write_text("draw,b,c,d\n1,,3,4\n")

    def imputation(*args, **kwargs):
        raise AssertionError("imputation ran")
    monkeypatch.setattr(CPAModel, "imputation", imputation)
    r = run(d / "gen.h5", d / "draw.csv", "-o", d / "d.csv", "--draws", "2", "-q", "--device", "cpu")
    assert r.exit_code == 1 and "column named 'draw'" in r.output, r.output


# ============================================================================ S >= 4: Monte Carlo error of the mean
def _s4_rows(model):
    X = model.sample(4, seed=4)
    rng = np.random.default_rng(0)
    for row in X:
        row[rng.choice(5, 4, replace=False)] = np.nan
    return X


def test_s4_mean_stderr_matches_the_spread_over_independent_randomisations():
    """At S = 4 the conditional mean comes from randomised QMC; its reported standard
    error must be the spread of the mean over reruns with independent random points.
    Oracle (``oracles.assert_stderr_matches_spread``, its band derived there): R = 40
    reruns of ``oracles.s4_imputation_case``, each with the QMC keys and Sobol scrambles
    salted (``oracles.salt_qmc``: every integral gets independent points), and the
    empirical standard deviation of the mean over them."""
    model, X = s4_imputation_case()
    means, ses = [], []
    try:
        for salt in range(1, 41):
            salt_qmc(salt)
            res = model.imputation(X)
            means.append(res.mean)
            ses.append(res.mean_stderr)
    finally:
        salt_qmc(0)
    assert_stderr_matches_spread(means, ses, np.isnan(X))


@pytest.mark.parametrize("S,hidden", [(2, (6, 6)), (3, (5,))])
def test_mean_stderr_is_zero_where_the_integrals_are_exact(S, hidden):
    """S <= 3: the region integrals are deterministic, so the mean has no Monte Carlo
    error: mean_stderr is exactly 0, with the result's shape."""
    model = CPAModel(random_net(S, hidden, 5, seed=3, slope=0.2), noise_std=0.5, device="cpu")
    X = _s4_rows(model)
    res = model.imputation(X)
    assert res.mean_stderr.shape == X.shape
    assert np.all(res.mean_stderr == 0.0)


def test_mean_stderr_terms_match_the_ratio_estimator_they_linearise():
    """The assembly of ``impute.mean_stderr_terms``: the mean is sum_w r_w (A_w E_w + b_w)
    with r_w = softmax(l)_w, a nonlinear function of every pair's estimated log weight l_w
    and truncated mean E_w.  Oracle: 20,000 draws of correlated Gaussian errors of
    (l_w, E_w) with a chosen covariance (independent across pairs), the mean recomputed
    from each draw without linearising, and its empirical variance per entry: within 4
    relative sd of a variance from normal replicates (sqrt(2 / (n - 1)), the mean being
    nearly linear at errors of 1e-2) of the sum of r_w^2 terms.  The mass-mean covariance
    is made strong, so that dropping or flipping the cross term fails."""
    from cpadgn.impute import mean_stderr_terms
    rng = np.random.default_rng(5)
    P, D, S, n = 6, 3, 4, 20_000
    A, b, E = rng.normal(size=(P, D, S)), rng.normal(size=(P, D)), rng.normal(size=(P, S))
    logw = rng.normal(size=P)
    L = rng.normal(size=(P, S + 1, S + 1)) * 0.01
    L[:, 1:, 0] += 0.02 * rng.normal(size=(P, S))            # errors of weight and mean correlate
    C = L @ np.swapaxes(L, 1, 2)                              # (P, 1 + S, 1 + S): Cov[(l_w, E_w)]
    err = np.einsum("pij,npj->npi", L, rng.standard_normal((n, P, S + 1)))
    l, Ez = logw + err[..., 0], E + err[..., 1:]
    r = np.exp(l - l.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    means = np.einsum("np,npd->nd", r, np.einsum("pds,nps->npd", A, Ez) + b)
    r0 = np.exp(logw - logw.max())
    r0 /= r0.sum()
    m = np.einsum("pds,ps->pd", A, E) + b
    dev = m - r0 @ m
    var = r0 ** 2 @ mean_stderr_terms(A, dev, C[:, 0, 0], C[:, 1:, 0], C[:, 1:, 1:])
    cross = r0 ** 2 @ (2 * dev * np.einsum("pds,ps->pd", A, C[:, 1:, 0]))
    ratio = means.var(0, ddof=1) / var
    assert np.all(np.abs(ratio - 1) <= 4 * np.sqrt(2 / (n - 1))), ratio
    assert np.max(np.abs(cross) / var) > 0.3                  # the cross term matters here


def test_variances_keep_their_exact_bounds_for_rows_far_from_the_model():
    """At noise std 1e-6 two digits test rows lie ~1e6 noise stds from the generator, and
    their posteriors are ~1e-15 wide: E[zz'] - E[z]E[z]' cancels to -1e-11 in rounding.
    Two facts hold whatever the rounding: Var[x_d | x_o] >= sigma^2 (the noise is
    independent of z and x_o) and Cov[z | x] is positive semidefinite.  Before the
    bounds were applied 27 of the 32 missing entries had std 0 and Cov[z | x] an
    eigenvalue of -2.5e-11."""
    import cpadgn
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "sample_data"
    X = read_data(root / "digits_test.csv")[[3, 7]]
    sigma = 1e-6
    model = cpadgn.load(root / "digits_generator.h5", noise_std=sigma)
    Y = X.copy()
    Y[:, ::4] = np.nan
    res = impute_fn(model.net, model.partition(), model.noise_std, Y, std=True, tab=model._region_table())
    assert np.all(res.std[np.isnan(Y)] >= sigma * (1 - 1e-12))
    assert np.all(np.linalg.eigvalsh(model.posterior(X).z_cov) >= 0.0)


def test_s1_draws_of_x_match_quadrature_with_a_general_prior_and_diagonal_noise():
    """The multiple-imputation draws themselves (region, truncated z, then per-entry noise
    sigma_d), under a prior N(0.7, 1.5^2) and noise (0.2, 0.5, 0.3): every missing entry
    passes KS against the quadrature CDF of p(x_d | x_o) = sum_i w_i Phi((v - g_d(t_i)) /
    sigma_d), and the draws' mean and covariance agree with the quadrature moments within
    4.5 Monte Carlo standard errors.  The quadrature applies the prior to the raw
    generator's nodes (not the folded net the code samples)."""
    net = random_net(1, (6, 6), 3, seed=11, slope=0.1, scale=2.0)
    mean, sd, noise = 0.7, 1.5, np.array([0.2, 0.5, 0.3])
    model = CPAModel(net, prior_mean=[mean], prior_cov=[[sd * sd]], noise_std=noise, device="cpu")
    edges, t, logw, gz = quad_nodes_1d(net, lo=mean - 18 * sd, hi=mean + 18 * sd, n_grid=801)
    nodes = (edges, t, logw + 0.5 * t * t - 0.5 * ((t - mean) / sd) ** 2 - np.log(sd), gz)
    X = model.sample(3, seed=3)
    X[0, 0] = X[1, [1, 2]] = X[2, 2] = np.nan
    K = 3000
    draws = model.impute(X, draws=K, seed=1)
    gflat = gz.reshape(-1, 3)
    for n, x in enumerate(X):
        m = np.isnan(x)
        qmean, qcov = quad_conditional_1d(nodes, x, noise)
        d = draws[:, n][:, m]
        np.testing.assert_array_equal(draws[:, n][:, ~m], np.broadcast_to(x[~m], (K, (~m).sum())))
        assert np.all(np.abs(d.mean(0) - qmean) <= 4.5 * np.sqrt(np.diag(qcov) / K)), n
        prod = (d - qmean)[:, :, None] * (d - qmean)[:, None, :]
        assert np.all(np.abs(prod.mean(0) - qcov) <= 4.5 * prod.std(0, ddof=1) / np.sqrt(K)), n
        lw = logw.ravel() + 0.5 * t.ravel() ** 2 - 0.5 * ((t.ravel() - mean) / sd) ** 2 \
            - 0.5 * (((gflat[:, ~m] - x[~m]) / noise[~m]) ** 2).sum(1)
        w = np.exp(lw - lw.max())
        keep = w > 1e-16 * w.sum()
        w, g = w[keep] / w[keep].sum(), gflat[keep]
        for j in np.flatnonzero(m):
            cdf = lambda v: np.concatenate([stats.norm.cdf((c[:, None] - g[None, :, j]) / noise[j]) @ w
                                            for c in np.array_split(np.asarray(v), 10)])
            assert stats.kstest(draws[:, n, j], cdf).pvalue > 1e-3, (n, j)


def test_cli_json_reports_the_cache_status(files):
    """impute --json says what it did with the partition cache, as score and partition do."""
    d, X, _ = files
    cache = d / "status_cache.h5"
    for want in ("computed", "loaded"):
        r = run(d / "gen.h5", d / "data.csv", "-o", d / "status.csv", "--cache", cache, "--json", "-q",
                "--device", "cpu")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["cache_status"] == want


@pytest.mark.parametrize("seed", ["a", -1, 1.5])
def test_a_seed_numpy_does_not_take_is_one_cpadgn_error(seed):
    """impute(draws=K, seed=...) and sample(seed=...) raised numpy's TypeError / ValueError
    ("SeedSequence expects int or sequence of ints for entropy not a")."""
    from cpadgn.errors import CpadgnError
    model, *_ = random_linear_model(np.random.default_rng(0), 1, 3, 0.8)
    X = np.array([[0.5, np.nan, 1.0]])
    for call in (lambda: model.impute(X, draws=2, seed=seed), lambda: model.sample(2, seed=seed)):
        with pytest.raises(CpadgnError, match=r"^seed must be None, a non-negative integer .*; pass e\.g\. seed=0$"):
            call()
