"""Exact likelihood and posterior against independent oracles (tests/oracles.py)."""
import re

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from cpadgn.model import CPAModel
from cpadgn.network import PiecewiseAffineNet

from oracles import (Quadrature3D, ldp_distance, kappa_rounding_tol, line_breakpoints, loglik_1d, loglik_2d, loglik_importance,
                     loglik_importance_mixture,
                     posterior_spread, random_linear_model, random_net, small_s3_net_and_quadrature)


def test_setting_noise_std_scores_with_the_new_noise():
    """model.noise_std = s after a first log_prob kept the region table of the old noise:
    every later log_prob was the old model's, silently (-1 was taken too).  Oracle: the
    PPCA closed form at the new noise."""
    rng = np.random.default_rng(7)
    model, A, b, mu, cov_z, sigma = random_linear_model(rng, 2, 4, 0.8)
    X = rng.normal(size=(5, 4))
    model.log_prob(X)
    for new in (2 * sigma, 0.5):
        model.noise_std = new
        C = A @ cov_z @ A.T + np.diag(np.broadcast_to(new, 4) ** 2)
        want = multivariate_normal(A @ mu + b, C).logpdf(X)
        assert np.all(np.abs(model.log_prob(X) - want) <= kappa_rounding_tol(model, X, model.posterior(X))
                      + 8 * np.finfo(float).eps * (1 + np.abs(want)))


def test_noise_std_and_prior_may_be_torch_tensors_that_require_grad():
    """A torch user's learned noise (log_sigma.exp()) and prior are tensors that require
    grad: CPAModel, load and with_noise_std raised torch's RuntimeError ('Can't call
    numpy() on Tensor that requires grad'), and a bfloat16 std was refused.  Oracle: the
    PPCA closed form at those values."""
    import torch
    rng = np.random.default_rng(8)
    model, A, b, mu, cov_z, sigma = random_linear_model(rng, 2, 4, 0.8)
    X = rng.normal(size=(5, 4))
    log_sigma = torch.nn.Parameter(torch.tensor(np.log(sigma)))
    t = CPAModel(model.generator, prior_mean=torch.nn.Parameter(torch.tensor(mu)),
                 prior_cov=torch.nn.Parameter(torch.tensor(cov_z)), noise_std=log_sigma.exp(), device="cpu")
    for m, s in ((t, np.exp(np.log(sigma))), (t.with_noise_std(torch.tensor(0.5, dtype=torch.bfloat16)), 0.5)):
        C = A @ cov_z @ A.T + np.diag(np.broadcast_to(s, 4) ** 2)
        want = multivariate_normal(A @ mu + b, C).logpdf(X)
        assert np.all(np.abs(m.log_prob(X) - want) <= kappa_rounding_tol(m, X, m.posterior(X))
                      + 8 * np.finfo(float).eps * (1 + np.abs(want)))


def test_setting_memory_budget_rebuilds_the_region_table_within_it():
    """model.memory_budget = smaller after a first log_prob kept the region table sized
    by the old budget (kept whole, not streamed); setting it now drops the table, and the
    next one is streamed in chunks within the new budget, with the same log p up to
    rounding (``kappa_rounding_tol``)."""
    net = random_net(2, (64, 64), 5, seed=3)
    model = CPAModel(net, noise_std=0.3, device="cpu")
    X = net.forward(np.random.default_rng(0).standard_normal((6, 2)))
    before = model.log_prob(X)
    assert not model._table.streamed
    model.memory_budget = 1e6          # counted as MIN_CHUNK_BUDGET (8 MiB): 2 MiB of region maps
    assert model._table is None
    after = model.log_prob(X)
    assert model._table.streamed and model.partition().n_regions > model._table.region_chunk
    tol = kappa_rounding_tol(model, X, model.posterior(X)) + 8 * np.finfo(float).eps * (1 + np.abs(before))
    assert np.all(np.abs(after - before) <= tol)


def test_linear_generator_is_ppca_closed_form():
    rng = np.random.default_rng(1)
    D = 6
    model, A, b, mu, cov_z, sigma = random_linear_model(rng, 3, D, 1.0)
    X = rng.normal(size=(20, D)) * 3
    X[3, [1, 4]] = np.nan
    X[5, :] = np.nan
    post = model.posterior(X)
    for n, x in enumerate(X):
        o = ~np.isnan(x)
        if not o.any():
            assert np.isnan(post.log_likelihood[n]) and post.n_observed[n] == 0   # nothing to score
            # the prior: its mean exactly, its covariance as L L^T (S = 3 O(1) terms, ~3 eps)
            np.testing.assert_allclose(post.z_mean[n], mu, atol=1e-12)
            np.testing.assert_allclose(post.z_cov[n], cov_z, atol=1e-12)
            continue
        Ao, bo = A[o], b[o]
        C = np.diag(sigma[o] ** 2) + Ao @ cov_z @ Ao.T
        want = multivariate_normal(bo + Ao @ mu, C).logpdf(x[o])
        assert abs(post.log_likelihood[n] - want) < 1e-10
        # Gaussian posterior in closed form.
        prec = np.linalg.inv(cov_z) + Ao.T @ np.diag(sigma[o] ** -2) @ Ao
        cov = np.linalg.inv(prec)
        mean = cov @ (Ao.T @ ((x[o] - bo) / sigma[o] ** 2) + np.linalg.solve(cov_z, mu))
        np.testing.assert_allclose(post.z_mean[n], mean, atol=1e-10)
        np.testing.assert_allclose(post.z_cov[n], cov, atol=1e-10)
    assert post.n_observed[3] == D - 2


@pytest.fixture(scope="module")
def net1():
    return random_net(1, (8, 8), 3, seed=3, slope=0.1, scale=2.0)


def test_s1_loglik_and_posterior_mean_match_quadrature(net1):
    model = CPAModel(net1, noise_std=0.3, device="cpu")
    X = model.sample(6, seed=1)
    X[5] += 4.0                       # an off-manifold row
    post = model.posterior(X)
    for n, x in enumerate(X):
        lz, m1, m2 = loglik_1d(net1, x, 0.3)
        assert abs(post.log_likelihood[n] - lz) < 1e-9
        assert abs(post.z_mean[n, 0] - m1) < 1e-8
        assert abs(post.z_cov[n, 0, 0] - (m2 - m1 ** 2)) < 1e-8
    assert np.all(post.error_bound <= np.log1p(1e-10) * 1.0001)      # the default rtol's certificate


def test_s1_missing_entries_give_the_exact_marginal(net1):
    model = CPAModel(net1, noise_std=np.array([0.3, 0.5, 0.2]), device="cpu")
    X = model.sample(3, seed=2)
    X[0, 1] = np.nan
    X[1, [0, 2]] = np.nan
    post = model.posterior(X)
    for n, x in enumerate(X):
        lz, m1, _ = loglik_1d(net1, x, np.array([0.3, 0.5, 0.2]))
        assert abs(post.log_likelihood[n] - lz) < 1e-9
        assert abs(post.z_mean[n, 0] - m1) < 1e-8


def test_missing_entries_equal_the_model_without_those_outputs():
    """Rows with missing entries (the batched path: one product for all (row, region) terms,
    shared by rows with one missing pattern, pairs' own whitened facets and polygons) against
    an independent computation: for each row, the generator with the missing coordinates
    deleted from its last layer is a complete-data model of dimension |o| whose exact
    log p(x_o), E[z | x_o] and Cov[z | x_o] the complete-row path gives.  Repeated patterns,
    unique ones, a row with one observed entry, one with one missing, a far row.
    Tolerance: both certified pruning bounds plus both rounding bounds
    (``kappa_rounding_tol``); posterior moments as in test_results_do_not_depend_on_chunking."""
    D, sigma = 8, np.array([0.3, 0.5, 0.4, 0.35, 0.45, 0.3, 0.6, 0.4])
    net = random_net(2, (6, 6), D, seed=11, slope=0.1, scale=2.0)
    model = CPAModel(net, noise_std=sigma, device="cpu")
    X = model.sample(15, seed=12)
    rng = np.random.default_rng(13)
    miss = np.zeros(X.shape, bool)
    A, B = [0, 1, 3, 6], [2, 4, 5, 7]              # two patterns, four rows each, interleaved
    miss[np.ix_(A, [1, 4])] = True
    miss[B] = True
    miss[np.ix_(B, [2, 5])] = False                # two observed entries
    miss[8] = np.arange(D) != 3                    # one observed entry
    miss[9, 7] = True                              # one missing entry
    for n in range(10, 15):                        # unique patterns
        miss[n] = rng.random(D) < 0.4
        miss[n, rng.integers(D)] = False
    X[14] += 6.0                                   # a far row
    X[miss] = np.nan
    post = model.posterior(X)
    tol = post.error_bound + kappa_rounding_tol(model, X, post)
    for n, x in enumerate(X):
        o = ~np.isnan(x)
        sub_net = PiecewiseAffineNet.from_arrays([*net.weights[:-1], net.weights[-1][o]],
                                                 [*net.biases[:-1], net.biases[-1][o]], net.slopes)
        sub = CPAModel(sub_net, noise_std=sigma[o], device="cpu")
        want = sub.posterior(x[o][None])
        e = tol[n] + want.error_bound[0] + kappa_rounding_tol(sub, x[o][None], want)[0]
        assert abs(post.log_likelihood[n] - want.log_likelihood[0]) <= e, (n, post.log_likelihood[n] - want.log_likelihood[0], e)
        spread = np.linalg.norm(want.pair_mean, axis=1).max()
        assert np.abs(post.z_mean[n] - want.z_mean[0]).max() <= e * (1 + 2 * spread)
        assert np.abs(post.z_cov[n] - want.z_cov[0]).max() <= e * (1 + 2 * spread) ** 2
    assert post.n_observed[8] == 1 and tol.max() < 1e-6


def test_far_outlier_is_finite_and_exact(net1):
    model = CPAModel(net1, noise_std=0.3, device="cpu")
    x = np.array([[300.0, -250.0, 400.0]])
    ll = model.log_prob(x)[0]
    assert np.isfinite(ll) and ll < -1e5
    lz, _, _ = loglik_1d(net1, x[0], 0.3, lo=-400, hi=400)
    assert abs(ll - lz) < 1e-9 * abs(lz)


def test_s2_loglik_matches_nested_quadrature():
    net = random_net(2, (6, 6), 3, seed=5, slope=0.1, scale=2.0)
    model = CPAModel(net, noise_std=0.4, device="cpu")
    X = model.sample(2, seed=3)
    post = model.posterior(X)
    for n, x in enumerate(X):
        lz, mean = loglik_2d(net, x, 0.4)
        assert abs(post.log_likelihood[n] - lz) < 1e-8
        np.testing.assert_allclose(post.z_mean[n], mean, atol=1e-7)


# ----------------------------------------------------------------------------- S = 3: exact
# Oracle: nested quadrature (``oracles.Quadrature3D``): closed form along z3 between exact
# breakpoints, Gauss-Legendre between located kinks along z2 and z1.  Its own error is
# measured by doubling its nodes (test_s3_oracle_converges, |change| <= ORACLE_TOL); the
# comparisons allow twice that plus cpadgn's certified pruning bound and its rounding bound.
ORACLE_TOL = 1e-9          # log p (nats) and E[z|x] (latent units, posterior std ~0.1..1)
S3_SIGMA = 0.4


def s3_rows(net, seed, n=3):
    """Latent points z (n, 3), rows g(z) + noise (n, D), and the unit normal of the
    manifold at each g(z) (n, D; D = S + 1, the Jacobian's left null vector)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 3))
    X = net.forward(z) + S3_SIGMA * rng.standard_normal((n, net.output_dim))
    h = 1e-6
    J = np.stack([(net.forward(z + h * e) - net.forward(z)) / h for e in np.eye(3)], axis=2)    # (n, D, 3)
    return z, X, np.linalg.svd(J)[0][:, :, -1]


def assert_matches_oracle(model, X, quad, mean_tol=10 * ORACLE_TOL):
    post = model.posterior(X)
    assert np.all(post.stderr == 0)                              # S = 3 is exact, not Monte Carlo
    tol = 2 * ORACLE_TOL + post.error_bound + kappa_rounding_tol(model, X, post)
    for n, x in enumerate(X):
        lz, ez, _ = quad.integrate(x, S3_SIGMA)
        assert abs(post.log_likelihood[n] - lz) <= tol[n], (n, post.log_likelihood[n] - lz, tol[n])
        np.testing.assert_allclose(post.z_mean[n], ez, atol=mean_tol, rtol=0)
    return post


def test_s3_oracle_converges():
    """Doubling the oracle's Gauss-Legendre nodes (same located kinks) moves log p,
    E[z|x], E[g(z)|x] and E[g(z) g(z)^T|x] by at most ORACLE_TOL, on a complete, an incomplete
    and a far row."""
    net, quad = small_s3_net_and_quadrature()
    fine = Quadrature3D(net, n_gl=2 * 12, n_min=2 * 4, vertices=quad.vertices)
    _, X, normal = s3_rows(net, seed=1)
    X[1, 2] = np.nan
    X[2] += 50 * S3_SIGMA * normal[2]
    for x in X:
        (l1, m1, g1, gg1), (l2, m2, g2, gg2) = (q.integrate(x, S3_SIGMA, second=True) for q in (quad, fine))
        assert abs(l1 - l2) <= ORACLE_TOL
        assert np.abs(m1 - m2).max() <= ORACLE_TOL and np.abs(g1 - g2).max() <= ORACLE_TOL
        assert np.abs(gg1 - gg2).max() <= ORACLE_TOL


def test_s3_loglik_and_posterior_mean_match_nested_quadrature_near_the_manifold():
    net, quad = small_s3_net_and_quadrature()
    _, X, _ = s3_rows(net, seed=2)
    assert_matches_oracle(CPAModel(net, noise_std=S3_SIGMA, device="cpu"), X, quad)


def test_s3_far_outliers_are_finite_and_exact():
    """Rows moved 5, 20 and 50 noise units off the manifold along its normal (the posterior
    stays inside the oracle's box): log p down to ~ -1250, exact to the same tolerance."""
    net, quad = small_s3_net_and_quadrature()
    _, X, normal = s3_rows(net, seed=3)
    X += np.array([5.0, 20.0, 50.0])[:, None] * S3_SIGMA * normal
    post = assert_matches_oracle(CPAModel(net, noise_std=S3_SIGMA, device="cpu"), X, quad)
    assert np.all(np.isfinite(post.log_likelihood)) and post.log_likelihood[2] < -1000


def test_s3_missing_entries_give_the_exact_marginal():
    net, quad = small_s3_net_and_quadrature()
    _, X, _ = s3_rows(net, seed=4)
    X[0, 1] = np.nan
    X[1, [0, 3]] = np.nan
    X[2, [0, 1, 2]] = np.nan
    assert_matches_oracle(CPAModel(net, noise_std=S3_SIGMA, device="cpu"), X, quad)


# ----------------------------------------------------------------------------- S = 4: randomised QMC
def test_s4_loglik_within_importance_sampling_interval():
    net = random_net(4, (5,), 5, seed=7, slope=0.2)
    model = CPAModel(net, noise_std=0.6, device="cpu")
    X = model.sample(3, seed=4)
    post = model.posterior(X)
    assert np.all(np.isfinite(post.stderr))
    for n, x in enumerate(X):
        est, se = loglik_importance(net, x, 0.6, seed=n)
        assert abs(post.log_likelihood[n] - est) < 4 * np.hypot(se, post.stderr[n])


def test_s4_adaptive_points_meet_the_stderr_target_and_match_importance_sampling():
    """S = 4 with hundreds of pairs per row: the two-stage allocation reports a standard
    error within stderr_target, and that standard error is honest: log p agrees with
    importance sampling (defensive mixture proposal, 1e6 draws, its own SE) within 4
    combined SE.  With the first stage's estimates alone (32 points a pair) the error is
    ~1e-2 nats, far outside the SE that the second stage claims."""
    from cpadgn import likelihood
    net = random_net(4, (6, 6), 6, seed=7, slope=0.2)
    model = CPAModel(net, noise_std=0.3, device="cpu")
    X = model.sample(3, seed=4)
    target = 1e-4
    post = likelihood.posterior(model.net, model.partition(), model.noise_std, X, tab=model._region_table(),
                                stderr_target=target)
    assert np.unique(post.pair_row, return_counts=True)[1].min() > 100
    assert np.all(post.stderr > 0) and np.all(post.stderr <= target)
    for n, x in enumerate(X):
        est, se = loglik_importance_mixture(net, x, 0.3, n=1_000_000, seed=n)
        assert abs(post.log_likelihood[n] - est) < 4 * np.hypot(se, post.stderr[n]), (n, post.log_likelihood[n], est, se)


def _one_dominant_region(seed, S=4, K=8, D=6, sigma=0.3, slope=0.1):
    """A one-hidden-layer S = 4 net and the row x = g(0) whose posterior sits mostly in the
    region of z = 0 (81-99% for seeds 0-119): each of the K hyperplanes lies 2.3 to 3.3
    posterior standard deviations (of that region's Gaussian) from 0."""
    rng = np.random.default_rng(seed)
    W1, W2 = rng.normal(size=(K, S)), rng.normal(size=(D, K)) / np.sqrt(K)
    sign = rng.choice([-1.0, 1.0], K)                       # the units' signs at z = 0
    A = W2 @ (np.where(sign > 0, 1.0, slope)[:, None] * W1)
    Sigma = np.linalg.inv(np.eye(S) + A.T @ A / sigma ** 2)
    b1 = sign * rng.uniform(2.3, 3.3, K) * np.sqrt(np.einsum("ks,st,kt->k", W1, Sigma, W1))
    net = PiecewiseAffineNet.from_arrays([W1, W2], [b1, rng.normal(size=D)], [slope])
    return net, net.forward(np.zeros((1, S)))[0]


def test_s4_stderr_target_met_where_one_region_dominates():
    """12 rows whose posterior is 90-98% in one region whose Gaussian mass is close to
    1: a 32-point pilot (16 sets of 2) mostly misses where that pair's integrand
    varies, and the allocation then under-plans it.  Each row's reported standard error
    must meet stderr_target up to the error of a 16-set standard error: relative SE of
    the SE 1 / sqrt(2 x 15) = 0.18 for normal set means, so at most
    target (1 + 4 x 0.18); and their mean square, an unbiased estimate of the mean
    variance, at most target^2 (the allocation plans for (target / 4)^2).  With the
    32-point pilots alone 95 of 120 such rows ended above the target (up to 16x, mean
    squares 4.6-28 per 12 rows); with the second pilot 4 of 120 (at most 1.52x, mean
    squares 0.15-0.46)."""
    target, ratios = 1e-4, []
    for seed in range(12):
        net, x = _one_dominant_region(seed)
        post = CPAModel(net, noise_std=0.3, device="cpu").posterior(x[None], moments=False)
        assert 0.85 < post.top_responsibility[0] < 0.99
        ratios.append(post.stderr[0] / target)
    ratios = np.array(ratios)
    assert np.all(ratios <= 1 + 4 / np.sqrt(2 * 15)), ratios
    assert np.mean(ratios ** 2) <= 1.0, ratios


def test_s4_model_stderr_target_reaches_the_integrals():
    """CPAModel.stderr_target is what posterior aims at: a loose 0.05 nats spends no
    second-stage points, so some row keeps the first stage's larger standard error
    (well above what the default 1e-4 would allow), and none exceeds 0.05."""
    net = random_net(4, (6, 6), 6, seed=7, slope=0.2)
    model = CPAModel(net, noise_std=0.3, device="cpu")
    model.stderr_target = 0.05
    se = model.posterior(model.sample(3, seed=4), moments=False).stderr
    assert np.all(se <= 0.05) and se.max() > 1e-3, se


def test_results_do_not_depend_on_chunking(net1, monkeypatch):
    """Batch sizes change the GEMM kernels, so results may differ by rounding only: at most
    twice the per-row rounding bound plus both certified pruning bounds (``kappa_rounding_tol``).
    E[z|x] = sum_w r_w m_w moves by at most 2 e max|m_w| through the responsibilities and by
    the error of v through m_w (d m_w / d v = the truncated covariance <= I, Sigma_w <= I).
    The chunks' floor (MIN_CHUNK_BUDGET) is lifted so that 2e3 bytes cuts them small."""
    monkeypatch.setattr("cpadgn.likelihood.MIN_CHUNK_BUDGET", 0.0)
    model = CPAModel(net1, noise_std=0.3, device="cpu")
    X = model.sample(50, seed=5)
    X[::7, 1] = np.nan
    X[3] *= 30.0                                 # a far row: large terms that cancel
    a = model.posterior(X)
    np.testing.assert_array_equal(model.posterior(X).log_likelihood, a.log_likelihood)   # same call
    small = CPAModel(net1, noise_std=0.3, device="cpu", memory_budget=2e3)
    b = small.posterior(X)
    tol = 2 * kappa_rounding_tol(model, X, a) + a.error_bound + b.error_bound
    assert np.all(np.abs(a.log_likelihood - b.log_likelihood) <= tol)
    spread = posterior_spread(a, len(X))
    assert np.all(np.abs(a.z_mean - b.z_mean).max(1) <= tol * (1 + 2 * spread))
    assert tol.max() < 1e-6 * np.abs(a.log_likelihood).max()          # the bound is not vacuous


def test_s4_estimates_do_not_depend_on_the_rows_beside_them_or_the_budget(tmp_path):
    """At S >= 4 a (row, region) pair's QMC points are keyed by the row's values and the
    region (``likelihood._pair_ids``), a draw too large for the budget goes in blocks of
    its points (``polytope._SetSums``), and frame ties are broken by a tolerance
    (``polytope._frame``): a row scored with others, in another order, alone or under a
    tiny budget gets the same estimate up to rounding.  With
    the same points an estimate moves with v as the mass does, so the rounding bound is
    ``kappa_rounding_tol``'s (plus both pruning bounds); other points would move it by
    about its stderr, far above that bound."""
    net = random_net(4, (8, 8), 6, seed=3, slope=0.2)
    cache = tmp_path / "net.partition.h5"                           # computed at 2e9, loaded at 2e5
    model = CPAModel(net, noise_std=0.3, device="cpu", cache_path=cache)
    model.stderr_target = 1e-3                                      # fewer points, the same paths
    X = model.sample(16, seed=4)
    X[::3, 1] = np.nan
    a = model.posterior(X)
    # every row once more beside other rows (second half: also in reverse order)
    others = {"first half": (np.arange(8), model.posterior(X[:8])),
              "second half reversed": (np.arange(15, 7, -1), model.posterior(X[:7:-1])),
              "alone": (np.array([7]), model.posterior(X[7:8]))}
    small = CPAModel(net, noise_std=0.3, device="cpu", cache_path=cache, memory_budget=1e5)
    small.stderr_target = 1e-3                                      # its integrals' chunks: 1e4 elements
    # row 0 (a missing entry) has a draw that goes in blocks at this budget; row 7 is complete
    others["budget 1e5"] = (np.array([0, 7]), small.posterior(X[[0, 7]]))
    tol = 2 * kappa_rounding_tol(model, X, a) + a.error_bound
    assert np.median(a.stderr) > 1e3 * tol.max()                  # a different draw would show
    for name, (rows, b) in others.items():
        err = np.abs(a.log_likelihood[rows] - b.log_likelihood)
        assert np.all(err <= tol[rows] + b.error_bound), (name, err.max())
        assert np.allclose(a.stderr[rows], b.stderr, rtol=1e-6, atol=0), name
        spread = posterior_spread(a, len(X))[rows]
        assert np.all(np.abs(a.z_mean[rows] - b.z_mean).max(1) <= (tol[rows] + b.error_bound) * (1 + 2 * spread)), name


def test_region_table_is_not_cut_below_the_chunk_floor(tmp_path):
    """A budget below MIN_CHUNK_BUDGET builds the region table as the floor does (README,
    --memory-budget: a batch is sized as for at least 8 MB): at 3e4 bytes this net's table
    was built and streamed in chunks of 13 of its 145 regions (the digits generator's in
    chunks of 3, rebuilt for every row chunk: `cpadgn score` 24x slower than at 2e9).  Its
    answers still equal the unlimited table's to the rounding bound (kappa_rounding_tol)."""
    from cpadgn import likelihood as lik
    net = random_net(2, (8, 8), 6, seed=4, slope=0.1, scale=2.0)
    cache = tmp_path / "net.partition.h5"            # computed at 2e9, loaded at 3e4
    big, small = (CPAModel(net, noise_std=0.3, device="cpu", cache_path=cache, memory_budget=b)
                  for b in (2e9, 3e4))
    big.partition()
    floor = lik.RegionTable(net, big.partition(), big.noise_std, "cpu", lik.MIN_CHUNK_BUDGET)
    table = small._region_table()
    assert table.region_chunk == floor.region_chunk and table.streamed == floor.streamed
    X = big.sample(20, seed=3)
    X[::4, 2] = np.nan
    a, b = big.posterior(X), small.posterior(X)
    tol = 2 * kappa_rounding_tol(big, X, a) + a.error_bound + b.error_bound
    assert np.all(np.abs(a.log_likelihood - b.log_likelihood) <= tol)


def test_noise_auto_recovers_the_generating_noise(net1):
    model = CPAModel(net1, noise_std=0.25, device="cpu")
    X = model.sample(400, seed=6)
    steps = []
    sigma = model.fit_noise_std(X, progress=lambda k, total, message: steps.append((k, message)))
    # ML estimate: within a few standard errors of the truth (se ~ sigma / sqrt(2 N D)).
    assert abs(sigma - 0.25) < 4 * 0.25 / np.sqrt(2 * 400 * 3) + 0.01
    ll = lambda s: model.with_noise_std(s).log_prob(X).sum()
    assert ll(sigma) >= max(ll(sigma * 1.02), ll(sigma / 1.02))
    # progress once per evaluation, each naming the sigma it tried and that sigma's log p
    assert [k for k, _ in steps] == list(range(1, len(steps) + 1)) and len(steps) >= 5
    s, lp = (float(v) for v in re.fullmatch(r"sigma (\S+): log p (\S+)", steps[-1][1]).groups())
    assert abs(lp - ll(s)) <= 1e-5 * abs(lp)      # both to 6 digits, s near the optimum (flat there)


@pytest.mark.parametrize("S, hidden", [(2, (8, 8)), (3, (5, 5))])
def test_pruning_bounds_are_never_below_the_region_mass(S, hidden):
    """Both certified bounds on Phi_w (one facet's half-space; the half-space beyond the
    region's nearest point, and at S = 3 also volume times the largest density) are at
    least the exact mass, for every (row, region) pair."""
    import torch

    from cpadgn import likelihood as lik
    net = random_net(S, hidden, 4, seed=11, slope=0.1, scale=2.0)
    model = CPAModel(net, noise_std=0.1, device="cpu")
    X = model.sample(12, seed=2)
    X[::3] += 1.5                                            # off-manifold rows: far polygons
    tab = model._region_table()
    Xt = torch.as_tensor(X)
    log_kappa, v_dense = lik._log_kappa_complete(tab, Xt)
    rows, regions = (torch.as_tensor(a.ravel()) for a in np.meshgrid(np.arange(len(X)), np.arange(tab.n_regions),
                                                                     indexing="ij"))
    v = v_dense[rows, :, regions]
    exact, *_ = lik._truncated_moments(tab, v, tab.C[regions], regions.numpy(), False, complete=False)
    near = lik._nearest_point_bound(tab, v.numpy(), regions.numpy())
    facet = lik._facet_bound(tab, v, regions).numpy()
    slack = 1e-9 * (1 + np.abs(exact))
    assert np.all(near >= exact - slack) and np.all(facet >= exact - slack)
    outside = exact < np.log(0.5)
    assert np.median((facet - near)[outside]) > 1.0          # the nearest point is the sharper bound


@pytest.mark.parametrize("S, hidden", [(2, (8, 8)), (3, (5, 5))])
def test_facet_bound_is_the_smallest_facet_probability_from_the_raw_facets(S, hidden):
    """The facet bound, from the whitened table on pairs in chunks cut to their regions'
    facet counts (chunks of 7: many, of mixed counts), is min_k log Phi((h_k - G_k mu) /
    |G_k C|) over each region's real facets, mu = C v, from the raw facets G, h: a facet
    left out of a chunk would only loosen the bound, which the mass test above cannot see."""
    import torch
    from scipy.special import log_ndtr

    from cpadgn import likelihood as lik
    model = CPAModel(random_net(S, hidden, 4, seed=11, slope=0.1, scale=2.0), noise_std=0.1, device="cpu")
    X = model.sample(6, seed=2)
    X[::2] += 1.5                                            # off-manifold rows: far regions
    tab = model._region_table()
    assert len(set(tab.mask.sum(1))) > 2                     # regions of several facet counts
    rows, regions = (torch.as_tensor(a.ravel()) for a in np.meshgrid(np.arange(len(X)), np.arange(tab.n_regions),
                                                                     indexing="ij"))
    v = lik._log_kappa_complete(tab, torch.as_tensor(X))[1][rows, :, regions]
    bound = lik._facet_bound(tab, v, regions, chunk=7).numpy()
    C, v, r = tab.C[regions].numpy(), v.numpy(), regions.numpy()
    mu = np.einsum("pst,pt->ps", C, v)
    G, h = tab.G[r], tab.h[r]
    norm = np.linalg.norm(np.einsum("pfs,pst->pft", G, C), axis=-1)
    real = tab.mask[r] & (norm > 0)
    z = np.where(real, (h - np.einsum("pfs,ps->pf", G, mu)) / np.where(real, norm, 1.0), np.inf)
    ref = log_ndtr(z.min(1))
    # z rounds to ~10 eps (|h| + |G| |mu|) / |G C| (one product more in the whitened table);
    # d log Phi(z) / dz = phi / Phi(z) <= |z| + 1
    dz = 10 * np.finfo(float).eps * (np.abs(h) + np.linalg.norm(G, axis=-1) * np.linalg.norm(mu, axis=-1)[:, None])
    tol = np.where(real, dz / np.where(real, norm, 1.0), 0.0).max(1) * (1 + np.abs(z.min(1)))
    assert np.all(np.abs(bound - ref) <= tol + 1e-300)
    assert (ref < np.log(0.5)).mean() > 0.5                  # most pairs lie beyond a facet


def test_distances_to_whitened_regions_match_least_distance_programming():
    """S = 3: the distance from pairs' whitened means to their regions, from the packed
    tables in chunks cut to their own facet and edge counts, against NNLS least-distance
    programming on each region's own facets (an independent algorithm)."""
    import torch

    from cpadgn import likelihood as lik
    net = random_net(3, (5, 5), 4, seed=11, slope=0.1, scale=2.0)
    model = CPAModel(net, noise_std=0.1, device="cpu")
    X = model.sample(6, seed=2)
    X[::2] += 1.5                                            # off-manifold rows: far regions
    tab = model._region_table()
    rows, regions = (a.ravel() for a in np.meshgrid(np.arange(len(X)), np.arange(tab.n_regions), indexing="ij"))
    v = lik._log_kappa_complete(tab, torch.as_tensor(X))[1][rows, :, regions].numpy()
    dist = lik._distance_to_regions(tab, v, regions, chunk=7)   # many chunks of mixed sizes
    a, c, real, _ = tab.polyhedra
    ref = np.array([ldp_distance(a[r][real[r]], c[r][real[r]], x) for r, x in zip(regions, v)])
    # offsets and edge points round to ~eps (|v| + |c|) and the vertices and edge points
    # to that times their conditioning; where the nearest point is far beyond the data's
    # scale (near-coplanar normals put a cone's apex thousands out) both algorithms lose
    # digits to it, so those few pairs are left out
    scale = 1 + np.abs(v).sum(1) + np.where(real, np.abs(c), 0.0)[regions].max(1)
    fine = ref <= 10 * scale
    assert fine.mean() > 0.98 and (ref[fine] == 0).sum() >= len(X) and (ref[fine] > 0).sum() > regions.size // 2
    err = np.abs(dist - ref)[fine] / scale[fine]
    assert err.max() <= 1e-9, err.max()


def test_rows_with_missing_entries_at_a_tiny_noise_std_stay_finite():
    """Noise std 1e-80 is inside numerics.NOISE_RANGE: a row with a missing entry has
    y = A' P_o (x - b) ~ 1 / sigma^2 = 1e160, whose square overflowed in y' Lambda^-1 y
    (log p = -inf or NaN: exit 70 in cpadgn score, an imputed mean of 0.0).  The imputed
    mean of a linear model is the closed-form Gaussian conditional mean (its 2 x 2 solve
    has condition < 1e3 here: rtol 1e-10 is that times eps with room); log p itself is
    only as good as README "Precision" says at such a noise, so only its finiteness is
    asserted."""
    rng = np.random.default_rng(5)
    model, A, b, mu, cov_z, _ = random_linear_model(rng, 2, 3, 1.0)
    x = b + A @ (mu + np.array([0.3, -0.2]))
    x[1] = np.nan
    o, sigma = [0, 2], 1e-80
    C_oo = A[o] @ cov_z @ A[o].T + sigma ** 2 * np.eye(2)
    assert np.linalg.cond(C_oo) < 1e3
    want = b[1] + A[1] @ mu + A[1] @ cov_z @ A[o].T @ np.linalg.solve(C_oo, x[o] - b[o] - A[o] @ mu)
    tiny = model.with_noise_std(sigma)
    assert np.isfinite(tiny.log_prob(x[None])).all()
    assert abs(tiny.impute(x[None])[0, 1] - want) <= 1e-10 * (1 + abs(want))
    net = random_net(1, (6, 6), 3, seed=2, slope=0.1, scale=2.0)         # piecewise: many regions
    X = net.forward(rng.standard_normal((6, 1)))
    X[::2, 1] = np.nan
    post = CPAModel(net, noise_std=sigma, device="cpu").posterior(X)
    assert np.isfinite(post.log_likelihood).all() and np.isfinite(post.z_mean).all()


def test_extreme_finite_input_gives_the_closed_form_or_a_clear_refusal():
    """Far rows are finite and exact (PPCA closed form) while float64 can hold their
    terms; beyond that (squared noise-unit distance > 1e200: 1e160 in a cell, data times
    1e300, noise 1e-300 or 1e300, all-NaN data for a fitted noise) a CpadgnError names
    the limit.  Never -inf, NaN or an internal error."""
    from cpadgn.errors import CpadgnError
    rng = np.random.default_rng(2)
    model, A, b, mu, cov_z, sigma = random_linear_model(rng, 2, 4, 1.0)
    C = np.diag(sigma ** 2) + A @ cov_z @ A.T
    for v in (1e50, 1e95):
        x = np.array([[v, -v, 0.5 * v, 1.0]])
        want = multivariate_normal(b + A @ mu, C).logpdf(x[0])
        assert abs(model.log_prob(x)[0] - want) <= 1e-12 * abs(want)
    net = random_net(2, (6, 6), 3, seed=3, slope=0.1, scale=2.0)
    m = CPAModel(net, noise_std=0.3, device="cpu")
    far = m.posterior(np.array([[1e60, -1e60, 5e59]]))
    assert np.isfinite(far.log_likelihood).all() and np.isfinite(far.z_mean).all()
    assert np.isfinite(far.error_bound).all()
    X = m.sample(4, seed=0)
    for cell in (1e308, 1e160):
        Y = X.copy()
        Y[2, 1] = cell
        with pytest.raises(CpadgnError, match="row 3 is too far from the model for float64"):
            m.log_prob(Y)
        Y[2, 0] = np.nan
        with pytest.raises(CpadgnError, match="row 3 is too far"):      # imputation, EM: the same check
            m.impute(Y)
    with pytest.raises(CpadgnError, match="row 1 is too far"):
        m.log_prob(X * 1e300)
    for s in (1e-300, 1e300):
        with pytest.raises(CpadgnError, match="outside \\[1e-100, 1e\\+100\\]"):
            m.with_noise_std(s)
    with pytest.raises(CpadgnError, match="spread .*rescale the data"):
        m.fit_noise_std(X * 1e300)
    with pytest.raises(CpadgnError, match="no observed value"):
        m.fit_noise_std(np.full_like(X, np.nan))


def test_api_refusals_say_what_to_do(net1):
    from cpadgn.errors import CpadgnError
    model = CPAModel(net1, noise_std=0.3, device="cpu")
    with pytest.raises(CpadgnError, match="2-D array .N, 3.*reshape\\(1, -1\\)"):
        model.log_prob(np.zeros(3))
    with pytest.raises(CpadgnError, match="positive number .*'abc'"):
        model.with_noise_std("abc")
    from cpadgn import likelihood
    for bad in (0.0, -1e-4, float("nan"), "1e-4"):
        with pytest.raises(CpadgnError, match="stderr_target must be a positive number"):
            likelihood.posterior(model.net, model.partition(), model.noise_std, np.zeros((1, 3)), stderr_target=bad)


def test_rows_with_nothing_observed_have_no_likelihood(net1):
    """log p of nothing is undefined: NaN (not the 0 of an empty product), the posterior
    the prior, the other rows unchanged; the noise fit ignores such rows."""
    model = CPAModel(net1, noise_std=0.3, device="cpu")
    X = model.sample(6, seed=3)
    Y = X.copy()
    Y[[1, 4]] = np.nan
    post = model.posterior(Y)
    assert np.isnan(post.log_likelihood[[1, 4]]).all() and (post.n_observed[[1, 4]] == 0).all()
    assert (post.z_mean[[1, 4]] == 0.0).all() and (post.z_cov[[1, 4]] == 1.0).all()     # the prior, exactly
    keep = [0, 2, 3, 5]
    ref = model.posterior(X[keep])
    tol = 2 * kappa_rounding_tol(model, X[keep], ref) + ref.error_bound + post.error_bound[keep]
    assert np.all(np.abs(post.log_likelihood[keep] - ref.log_likelihood) <= tol)
    assert model.fit_noise_std(Y) == model.fit_noise_std(X[keep])


def test_a_row_with_nothing_observed_has_the_prior_as_posterior_at_s4():
    """At S = 4 the mixture of the regions' moments under their QMC prior masses is off
    the prior by its Monte Carlo error (~1e-4 here) with a standard error of 0; the
    posterior of a row with nothing observed is the prior N(prior_mean, prior_cov),
    exactly up to the rounding of L L^T (S terms of size |prior_cov|)."""
    prior_cov = np.array([[2.0, 0.3, 0.0, 0.1], [0.3, 1.0, 0.2, 0.0], [0.0, 0.2, 0.5, 0.0], [0.1, 0.0, 0.0, 1.5]])
    model = CPAModel(random_net(4, (6,), 5, seed=2), prior_mean=[1.0, -2.0, 0.5, 3.0], prior_cov=prior_cov,
                     noise_std=0.2, device="cpu")
    X = model.sample(3, seed=1)
    X[1] = np.nan
    post = model.posterior(X)
    assert (post.z_mean[1] == model.prior_mean).all()
    np.testing.assert_allclose(post.z_cov[1], prior_cov, rtol=0, atol=8 * 4 * np.finfo(float).eps * 2.0)
    assert np.isfinite(post.log_likelihood[[0, 2]]).all()


def _zigzag_net(cross, flat):
    """A ReLU net g: R -> R crossing 0 at z_c with slope a for each (z_c, a) of cross
    (alternating signs), then back to 0 at flat[0], 0 on flat, slope 1 after."""
    from cpadgn.network import PiecewiseAffineNet
    knots = [(a1 * z1 - a2 * z2) / (a1 - a2) for (z1, a1), (z2, a2) in zip(cross[:-1], cross[1:])]
    slopes = [a for _, a in cross]
    z_last, a_last = cross[-1]
    t = 0.5 * (z_last + flat[0])
    knots += [t, flat[0], flat[1]]
    slopes += [-a_last * (t - z_last) / (flat[0] - t), 0.0, 1.0]
    z0, a0 = cross[0]
    W0 = np.concatenate([np.ones(len(knots)), [1.0, -1.0]])[:, None]       # a0 z = a0 (relu(z) - relu(-z))
    b0 = np.concatenate([-np.array(knots), [0.0, 0.0]])
    W1 = np.concatenate([np.diff(slopes), [a0, -a0]])[None]
    return PiecewiseAffineNet.from_arrays([W0, W1], [b0, np.array([-a0 * z0])], [np.zeros(len(b0))])


def _exact_piecewise_1d(net, x, sigma, lo=-40.0, hi=40.0):
    """log p(x) for S = D = 1, piece by piece in closed form: on a piece [l, u] where
    g(z) = a z + b, int_l^u N(x; a z + b, s^2) phi(z) dz = N(x; b, s^2 + a^2) P[l < Z < u]
    with Z ~ N(a (x - b) / (s^2 + a^2), s^2 / (s^2 + a^2)); pieces from bisection."""
    from scipy.special import logsumexp
    from scipy.stats import norm
    br = np.concatenate([[-np.inf], line_breakpoints(lambda t: net.preactivations(t[:, None]), lo, hi), [np.inf]])
    terms = []
    for l, u in zip(br[:-1], br[1:]):
        m = 0.5 * (l + u) if np.isfinite(l + u) else (u - 1.0 if np.isfinite(u) else l + 1.0)
        h = 1e-3 * min(1.0, u - l)
        g0, g1 = net.forward(np.array([[m], [m + h]]))[:, 0]
        a = (g1 - g0) / h
        b = g0 - a * m
        v = sigma ** 2 + a * a
        mu, sd = a * (x - b) / v, sigma / np.sqrt(v)
        zl, zu = (l - mu) / sd, (u - mu) / sd
        with np.errstate(divide="ignore"):              # an empty piece has log mass -inf
            log_mass = (norm.logsf(zl) + np.log(-np.expm1(norm.logsf(zu) - norm.logsf(zl))) if zl > 0 else
                        norm.logcdf(zu) + np.log(-np.expm1(norm.logcdf(zl) - norm.logcdf(zu))))
        terms.append(norm.logpdf(x, b, np.sqrt(v)) + log_mass)
    return logsumexp(terms)


def test_the_pruning_certificate_holds_against_an_exact_sum_over_all_regions():
    """|log p - exact| <= error_bound (+ rounding), with error_bound <= log(1 + rtol), on a
    row built so that the listing threshold's log R matters: one region (g = 0 on [8, 9])
    has a dense bound e^14 above p but no mass, so the first threshold lists only the main
    region (60% of p), and five regions of 8% each stay unlisted unless the threshold
    leaves room for R of them (log p + log rtol - log R - 1).  Without log R the run stops
    with 40% of p missing under a bound of 18%.  Oracle: the closed-form sum over the
    linear pieces of g (no pruning)."""
    from scipy.stats import norm

    from cpadgn import likelihood as lik
    share = 1.16e-4                      # phi(z_c) / |a| of each small crossing
    cross = [(3.5, 1.0)] + [(z, (-1) ** (k + 1) * norm.pdf(z) / share)
                            for k, z in enumerate([3.8, 4.0, 4.2, 4.4, 4.6])]
    net = _zigzag_net(cross, (8.0, 9.0))
    sigma = 1.4e-4
    model = CPAModel(net, noise_std=sigma, device="cpu")
    X = np.zeros((1, 1))
    exact = _exact_piecewise_1d(net, 0.0, sigma)
    for rtol in (0.5, 0.1, 1e-3, 1e-10):
        res = lik.posterior(model.net, model.partition(), model.noise_std, X, tab=model._region_table(),
                            rtol=rtol, moments=False)
        assert res.error_bound[0] <= np.log1p(rtol) * (1 + 1e-12)
        assert abs(res.log_likelihood[0] - exact) <= res.error_bound[0] + 2 * kappa_rounding_tol(model, X, res)[0]


def test_cheap_pairs_are_the_smallest_variances_within_the_budget():
    """``_cheap_pairs``: per row, the candidates of smallest certified variance whose sum,
    with what the row already spent, is at most (stderr_target / 16)^2 p^2, and no more
    of them fit (checked by direct sums); a row without an estimate of p takes none."""
    import torch
    from cpadgn.likelihood import _cheap_pairs
    rng = np.random.default_rng(3)
    rows = torch.as_tensor(np.repeat(np.arange(3), 60))
    log_var = torch.as_tensor(rng.uniform(-35.0, -10.0, 180))
    candidate = torch.as_tensor(rng.random(180) < 0.8)
    log_p = torch.tensor([0.0, 3.0, -np.inf], dtype=torch.float64)
    target = 1e-4
    budget = (target / 16) ** 2 * np.exp(2 * log_p.numpy())
    spent = torch.as_tensor(np.log([1e-30, 0.5 * budget[1], 1e-30]))
    sel = _cheap_pairs(rows, log_var, candidate, log_p, spent, target, 3).numpy()
    v, cand, r = np.exp(log_var.numpy()), candidate.numpy(), rows.numpy()
    assert not sel[r == 2].any() and np.all(cand[sel])
    for i in range(2):
        mine = (r == i) & cand
        total = np.exp(spent[i].item()) + v[sel & (r == i)].sum()
        assert total <= budget[i] * (1 + 1e-12) and (sel & (r == i)).sum() > 0
        rest = np.sort(v[mine & ~sel])
        assert np.all(v[sel & (r == i)].max() <= rest.min()) and total + rest[0] > budget[i]


def _min_half_sq_distance(net, patterns, x, sigma):
    """J* = min_z |x - g(z)|^2 / (2 sigma^2) + |z|^2 / 2 at S = 2: per region a convex
    quadratic on the polygon {G z <= h}, whose minimum lies at the unconstrained
    minimiser, on a facet line or at a vertex: the smallest such point inside its region."""
    import itertools
    A, b = net.region_maps(patterns)
    G, h = net.region_constraints(patterns)
    best = np.inf
    for Aw, bw, Gw, hw in zip(A, b, G, h):
        H, f = Aw.T @ Aw / sigma ** 2 + np.eye(2), Aw.T @ (x - bw) / sigma ** 2
        points = [np.linalg.solve(H, f)]
        live = [k for k in range(len(hw)) if np.any(Gw[k] != 0)]
        for k in live:                                   # the minimum on the line G_k z = h_k
            g2 = Gw[k] @ Gw[k]
            z0, d = Gw[k] * hw[k] / g2, np.array([-Gw[k, 1], Gw[k, 0]])
            points.append(z0 + (d @ (f - H @ z0)) / (d @ H @ d) * d)
        for k, m in itertools.combinations(live, 2):
            M = np.array([Gw[k], Gw[m]])
            if abs(np.linalg.det(M)) > 1e-12 * np.sum(M * M):
                points.append(np.linalg.solve(M, [hw[k], hw[m]]))
        for z in points:
            if np.all(Gw @ z <= hw + 1e-9 * (np.abs(Gw) @ np.abs(z) + np.abs(hw))):
                best = min(best, np.sum((x - bw - Aw @ z) ** 2) / (2 * sigma ** 2) + z @ z / 2)
    return best


@pytest.mark.parametrize("seed", [0, 4])
def test_s2_rows_1e30_from_the_model(seed):
    """Rows 1e20..1e30 from an S = 2 model (r^2 ~ 1e63, inside numerics.MAX_WHITENED_SQ):
    the Owen-segment quadrature's range is one float step of s wide there, so its panel
    count (a fall of ~1e47 from rounding) overflowed int64 (ZeroDivisionError, exit 70) and
    its integrand rounded to exp(+1e47) (log p NaN, exit 0).  log p is now the Laplace
    limit -J*, J* = min_z |x - g(z)|^2 / (2 sigma^2) + |z|^2 / 2 found exactly per region;
    the terms -J* leaves out (log-determinants, log masses) are O(1e3) nats against
    J* >= 1e40, and both sides round terms of |x / sigma|^2 ~ 1e63 that cancel to ~1%:
    relative 1e-10."""
    net = random_net(2, (6, 6), 3, seed=seed, slope=0.1)
    model = CPAModel(net, noise_std=0.03, device="cpu")
    X = np.array([[0.1, 1e30, -0.2], [1e30, 0, 0], [0.3, -0.1, -1e25], [1e20, 1e20, 1e20]])
    ll = model.log_prob(X)
    assert np.all(np.isfinite(ll)), ll
    for x, got in zip(X, ll):
        want = -_min_half_sq_distance(net, model.partition().patterns, x, 0.03)
        assert abs(got - want) <= 1e-10 * abs(want), (got, want)


@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_s1_moments_of_a_row_far_off_the_curve(offset):
    """A row offset*n from g(z_b) (n a unit vector, z_b the breakpoint nearest 0) pins
    the S = 1 posterior near z_b, and the regions' intervals lie thousands of their
    standard deviations out: _interval's phi(.) / mass then lost a^2 eps (variance 0.3%
    off at 1e4) and overflowed beyond 1e154 (infinite means, z_mean NaN); its tail form
    keeps them.  Oracle: loglik_1d's quadrature.  The regions' log weights ~ -(offset /
    sigma)^2 / 2 round to eps relative, so the responsibilities, and the moments with
    them, carry up to ~ eps (offset / sigma)^2 (times a spread of the region moments
    below 1): tolerance 4 eps (offset / sigma)^2."""
    sigma = 0.3
    net = random_net(1, (6, 6), 3, seed=2, slope=0.1, scale=2.0)
    model = CPAModel(net, noise_std=sigma, device="cpu")
    G, h = net.region_constraints(model.partition().patterns)
    breaks = np.concatenate([hr[Gr[:, 0] != 0] / Gr[Gr[:, 0] != 0, 0] for Gr, hr in zip(G, h)])
    zb = breaks[np.argmin(np.abs(breaks))]
    n = np.array([1.0, -2.0, 0.5]) / np.linalg.norm([1.0, -2.0, 0.5])
    x = net.forward(np.array([[zb]]))[0] + offset * n
    post = model.posterior(x[None])
    lz, m1, m2 = loglik_1d(net, x, sigma)
    tol = 4 * np.finfo(float).eps * (offset / sigma) ** 2
    assert abs(post.log_likelihood[0] - lz) <= tol * abs(lz)
    assert abs(post.z_mean[0, 0] - m1) <= tol, (post.z_mean[0, 0], m1)
    assert abs(post.z_cov[0, 0, 0] - (m2 - m1 * m1)) <= tol, (post.z_cov[0, 0, 0], m2 - m1 * m1)


def test_linear_generator_at_s4_matches_the_gaussian_closed_form():
    """A linear generator at S >= 4 (one region, no facets: nothing for QMC to estimate)
    crashed the likelihood's pair bookkeeping (`cpadgn compare --baseline ppca:4`
    exited 70).  Oracle: x ~ N(b, W W^T + sigma^2 I), z | x Gaussian, and the
    conditional mean of a Gaussian, with zero Monte Carlo errors."""
    net = random_net(4, (), 6, seed=1)
    model = CPAModel(net, noise_std=0.5, device="cpu")
    X = model.sample(5, seed=2)
    W, b = net.weights[0], net.biases[0]
    cov_x = W @ W.T + 0.25 * np.eye(6)
    tol = 1e-12 * (1 + np.abs(X).max())           # eps times the O(10-100) terms that cancel, with room
    assert np.allclose(model.log_prob(X), multivariate_normal(b, cov_x).logpdf(X), rtol=0, atol=tol)
    post = model.posterior(X)
    z_cov = np.linalg.inv(np.eye(4) + W.T @ W / 0.25)
    assert np.allclose(post.z_mean, (X - b) @ (W / 0.25) @ z_cov, rtol=0, atol=tol)
    assert np.allclose(post.z_cov, z_cov, rtol=0, atol=tol) and not post.stderr.any()
    X[0, :3] = np.nan
    res = model.imputation(X, std=True)
    want = b[:3] + cov_x[:3, 3:] @ np.linalg.solve(cov_x[3:, 3:], X[0, 3:] - b[3:])
    assert np.allclose(res.mean[0, :3], want, rtol=0, atol=tol) and not res.mean_stderr.any()


def test_s3_zero_width_regions_of_coincident_hyperplanes_carry_no_likelihood():
    """A layer that repeats the previous one's units (relu(c relu(u)), e.g. two activations
    with a positive rescaling between them) puts two hyperplanes on one plane, and the
    partition lists the zero-width regions between them (flagged degenerate).  At S = 3
    the translated polyhedron formula gave such a region up to half of the Gaussian:
    log p was 0.8 nats too high here.  Oracle: importance sampling, and the same function
    written without the repeated layer."""
    rng = np.random.default_rng(0)
    W1, b1, A = rng.normal(size=(6, 3)), 0.5 * rng.normal(size=6), rng.normal(size=(2, 6))
    twice = PiecewiseAffineNet.from_arrays([W1, np.eye(6), A], [b1, np.zeros(6), np.zeros(2)], [0.1, -0.05])
    once = PiecewiseAffineNet.from_arrays([W1, A], [b1, np.zeros(2)], [-0.005])
    X = once.forward(rng.normal(size=(3, 3))) + 0.3 * rng.normal(size=(3, 2))
    model = CPAModel(twice, noise_std=0.3, device="cpu")
    assert model.partition().degenerate.any()
    got = model.log_prob(X)
    np.testing.assert_allclose(got, CPAModel(once, noise_std=0.3, device="cpu").log_prob(X), rtol=0, atol=1e-8)
    want, se = loglik_importance_mixture(twice, X[0], 0.3, n=100_000)
    assert abs(got[0] - want) < 4 * se, (got[0], want, se)


def test_n_pairs_counts_the_regions_integrated_for_each_row(net1):
    """n_pairs, the cost of each row: 1 under a linear generator (one region, all of R^S),
    and for a piecewise one the number of pairs the row lists (pairs=True), which
    pairs=False reports alike without listing them, between 1 and the region count."""
    rng = np.random.default_rng(3)
    lin, *_ = random_linear_model(rng, 2, 5, 1.0)
    X = rng.normal(size=(6, 5))
    X[2, :3] = np.nan
    np.testing.assert_array_equal(lin.posterior(X).n_pairs, 1)
    model = CPAModel(net1, noise_std=0.3, device="cpu")
    X = model.sample(40, seed=5)
    X[::4, 0] = np.nan
    post = model.posterior(X)
    np.testing.assert_array_equal(post.n_pairs, np.bincount(post.pair_row, minlength=40))
    np.testing.assert_array_equal(model.posterior(X, pairs=False, moments=False).n_pairs, post.n_pairs)
    assert post.n_pairs.min() >= 1 and post.n_pairs.max() <= model.partition().n_regions
    assert post.n_pairs.max() > 1


# ----------------------------------------------------------------------------- equal rows
PER_ROW = ("log_likelihood", "error_bound", "stderr", "n_observed", "z_mean", "z_cov", "top_region",
           "top_responsibility", "n_pairs", "rounding_error")


def assert_copies_equal(post, Y, D0, where):
    """Every row of Y (rows D0[where]) has D0's row's results bit for bit, its own pairs
    (those of its leader, listed again), and responsibilities that sum to 1."""
    leader = {}
    for i, j in enumerate(where):
        leader.setdefault(j, i)
    np.testing.assert_array_equal(post.n_pairs, np.bincount(post.pair_row, minlength=len(Y)))
    sums = np.bincount(post.pair_row, weights=post.pair_responsibility, minlength=len(Y))
    assert np.all(np.abs(sums - 1) <= 1e-14 * post.n_pairs), sums
    for i, j in enumerate(where):
        k = leader[j]
        for f in PER_ROW:
            np.testing.assert_array_equal(getattr(post, f)[i], getattr(post, f)[k], err_msg=f"{f} row {i}")
        mine, theirs = np.flatnonzero(post.pair_row == i), np.flatnonzero(post.pair_row == k)
        for f in ("pair_region", "pair_responsibility", "pair_mean", "pair_cov", "pair_weight_stderr"):
            if getattr(post, f) is not None:
                np.testing.assert_array_equal(getattr(post, f)[mine], getattr(post, f)[theirs], err_msg=f)


@pytest.mark.parametrize("S", [1, 2, 3, 4])
def test_equal_rows_get_equal_bits_wherever_they_sit(S, net1):
    """Equal rows (NaN in the same places, -0 as 0) are scored once and share the bits of
    every result, wherever they sit in the batch; the distinct rows' results are those of
    the distinct rows scored alone, and at S <= 2 those of the quadrature oracles."""
    net = {1: net1, 2: random_net(2, (6, 6), 3, seed=5, slope=0.1, scale=2.0),
           3: random_net(3, (5, 5), 4, seed=1, slope=0.2), 4: random_net(4, (8, 8), 6, seed=3, slope=0.2)}[S]
    model = CPAModel(net, noise_std=0.4, device="cpu")
    model.stderr_target = 1e-3
    D0 = model.sample(5, seed=7)
    D0[3, 1] = np.nan
    D0[4, [0, 2]] = np.nan
    D0[1, 0] = 0.0
    where = np.array([0, 1, 0, 3, 2, 3, 0, 4, 3, 0, 4, 1, 0])
    Y = D0[where]
    Y[11, 0] = -0.0                                                  # D0[1, 0] is 0
    Y[8, 1] = np.array([0x7FF8000000000001], dtype=np.uint64).view(np.float64)[0]     # another NaN
    post = model.posterior(Y)
    assert_copies_equal(post, Y, D0, where)
    alone = model.posterior(D0)
    first = np.unique(where, return_index=True)[1]
    for f in PER_ROW:
        np.testing.assert_array_equal(getattr(post, f)[first], getattr(alone, f), err_msg=f)
    np.testing.assert_array_equal(model.log_prob(Y), post.log_likelihood)
    oracle = {1: lambda x: loglik_1d(net, x, 0.4)[0], 2: lambda x: loglik_2d(net, x, 0.4)[0]}.get(S)
    for i in range(3) if oracle else ():                       # the complete rows
        assert abs(post.log_likelihood[first[i]] - oracle(D0[i])) < 1e-8


def test_equal_digits_rows_get_one_log_likelihood():
    """The bundled digits model gave 17 copies of its least likely test row, shuffled among
    80 others, 2 values ~1e-13 nats apart (BLAS's blocking of the (row, region) products
    depends on a row's place), so a --contamination threshold could flag some copies only."""
    from pathlib import Path
    import cpadgn
    samples = Path(__file__).resolve().parents[1] / "sample_data"
    model = cpadgn.load(samples / "digits_generator.h5", cache=False)
    X = np.loadtxt(samples / "digits_test.csv", delimiter=",", skiprows=1)[:80]
    i = int(np.argmin(model.log_prob(X)))
    Y = np.vstack([X, np.repeat(X[i:i + 1], 17, 0)])[np.random.default_rng(0).permutation(97)]
    post = model.posterior(Y)
    where = np.where(np.all(Y == X[i], axis=1), i, np.arange(97) + 80)
    assert_copies_equal(post, Y, None, where)


def test_distinct_rows_are_found_bit_for_bit_even_when_hashes_collide(monkeypatch):
    """distinct_rows against numpy's np.unique of the rows (NaN made one value, -0 as 0),
    and the same answer when every row hashes alike (the bitwise check's fallback)."""
    from cpadgn import likelihood
    rng = np.random.default_rng(1)
    X = rng.random((50, 3))
    X[::5, 1] = np.nan
    X[1, 0] = 0.0
    Y = X[rng.integers(0, 50, 400)]
    Y[Y == 0] = -0.0
    first, inverse = likelihood.distinct_rows(Y)
    key = np.where(np.isnan(Y), 7.0, Y + 0.0)                 # 7 is no value of X
    _, want = np.unique(key, axis=0, return_inverse=True)
    assert first.size == want.max() + 1 and np.all(np.diff(first) > 0)
    np.testing.assert_array_equal(key[first][inverse], key)
    monkeypatch.setattr(likelihood, "content_hash", lambda v: np.zeros(len(v), np.uint64))
    again = likelihood.distinct_rows(Y)
    np.testing.assert_array_equal(again[0], first)
    np.testing.assert_array_equal(again[1], inverse)
