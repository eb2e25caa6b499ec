"""Exact likelihood and posterior against independent oracles (tests/oracles.py)."""
import numpy as np
import pytest
from scipy.stats import multivariate_normal

from cpadgn.model import CPAModel

from oracles import loglik_1d, loglik_2d, loglik_importance, random_linear_model, random_net


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
            assert post.log_likelihood[n] == 0.0 and post.n_observed[n] == 0
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


def test_s3_loglik_within_importance_sampling_interval():
    net = random_net(3, (5, 5), 2, seed=7, slope=0.2)
    model = CPAModel(net, noise_std=0.6, device="cpu")
    X = model.sample(3, seed=4)
    post = model.posterior(X)
    for n, x in enumerate(X):
        est, se = loglik_importance(net, x, 0.6, seed=n)
        assert abs(post.log_likelihood[n] - est) < 4 * np.hypot(se, post.stderr[n])


def test_results_do_not_depend_on_chunking(net1):
    model = CPAModel(net1, noise_std=0.3, device="cpu")
    X = model.sample(50, seed=5)
    X[::7, 1] = np.nan
    a = model.posterior(X)
    small = CPAModel(net1, noise_std=0.3, device="cpu", memory_budget=2e3)
    b = small.posterior(X)
    np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=0, atol=1e-12)
    np.testing.assert_allclose(a.z_mean, b.z_mean, rtol=0, atol=1e-12)


def test_noise_auto_recovers_the_generating_noise(net1):
    model = CPAModel(net1, noise_std=0.25, device="cpu")
    X = model.sample(400, seed=6)
    sigma = model.fit_noise_std(X)
    # ML estimate: within a few standard errors of the truth (se ~ sigma / sqrt(2 N D)).
    assert abs(sigma - 0.25) < 4 * 0.25 / np.sqrt(2 * 400 * 3) + 0.01
    ll = lambda s: model.with_noise_std(s).log_prob(X).sum()
    assert ll(sigma) >= max(ll(sigma * 1.02), ll(sigma / 1.02))


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
