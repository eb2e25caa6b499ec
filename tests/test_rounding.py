"""The rounding estimate of log p (numerics.rounding_error_estimate) against a closed-form
Gaussian marginal, and the CLI's warning for rows whose log p it makes unreliable."""
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import multivariate_normal

from cli.main import main, rounding_errors, warn_rounding
from cpadgn.data import read_data
from cpadgn.model import load
from cpadgn.modelfile import save_model
from cpadgn.network import PiecewiseAffineNet

from oracles import random_linear_model

ROOT = Path(__file__).resolve().parents[1]


def linear_case(seed, noise, S, D, n=40):
    """A linear generator at isotropic noise std ``noise``, n rows drawn from its prior's
    image (so the exact log p is O(1) whatever the noise), and their exact log p (n,)."""
    rng = np.random.default_rng(seed)
    model, A, b, mu, cov_z, _ = random_linear_model(rng, S, D, 1.0)
    model = model.with_noise_std(np.full(D, noise))
    Z = mu + rng.standard_normal((n, S)) @ np.linalg.cholesky(cov_z).T
    X = Z @ A.T + b
    exact = multivariate_normal(b + A @ mu, noise ** 2 * np.eye(D) + A @ cov_z @ A.T).logpdf(X)
    return model, A, b, mu, cov_z, X, exact


@pytest.mark.parametrize("seed,noise", [(4, 1e-16), (0, 1e-20), (3, 1e-40)])
def test_estimate_is_above_the_actual_rounding_error_at_tiny_noise(seed, noise):
    # S = D: the model spans the data space, so the exact log p stays O(1) while x'Px ~ 1/noise^2
    model, A, b, mu, cov_z, X, exact = linear_case(seed, noise, 2, 2)
    post = model.posterior(X)
    err = np.abs(post.log_likelihood - exact)
    est = post.rounding_error
    np.testing.assert_array_equal(est, model.rounding_error(X))
    assert np.all(est > 1e-3)                       # every row would be warned about
    # the estimate is the dense bounds' rounding, 4 n eps x'Px; the pair integrated is
    # formed by a QR of its centred system, whose residual rho (rho^2 = (x - b)' Cov[x]^-1
    # (x - b), -2 log p = rho^2 + ...) is exact for a system perturbed by d = eps times
    # its magnitude (|A z| + |b| + |x|) / sigma, so rho^2 / 2 moves by d (rho + d / 2)
    # (8 eps for the few roundings).  Before, it came from the dense products: errors up
    # to 0.8 of the estimate
    rho = np.sqrt(-2 * exact - 2 * np.log(2 * np.pi) - np.linalg.slogdet(A @ cov_z @ A.T)[1])
    z = np.linalg.solve(A, (X - b).T)
    d = 8 * np.finfo(float).eps * (np.abs(A) @ np.abs(z) + np.abs(b)[:, None] + np.abs(X).T).max(0) / noise
    assert np.all(err <= d * (rho + d)), np.max(err / (d * (rho + d)))
    assert np.all(err <= 1e-3 * est)


def test_estimate_is_small_where_log_p_is_accurate():
    model, *_, X, exact = linear_case(1, 0.5, 2, 3)
    post = model.posterior(X)
    assert np.all(post.rounding_error < 1e-10)          # x'Px ~ 100
    assert np.all(np.abs(post.log_likelihood - exact) < 1e-10)


def test_digits_at_their_noise_std_give_no_warning(capsys):
    # README (Precision): x'Px up to 4.6e6 there, log p moves by ~1e-9 between batch sizes
    model = load(ROOT / "sample_data" / "digits_generator.h5", device="cpu")
    X = read_data(ROOT / "sample_data" / "digits_test.csv")
    assert warn_rounding(rounding_errors(model, X), quiet=False) == 0
    assert capsys.readouterr().err == ""
    assert model.rounding_error(X).max() < 1e-5


def test_score_impute_and_compare_warn_once_and_count_the_rows(tmp_path):
    rng = np.random.default_rng(2)
    S, D, noise = 2, 3, 1e-20
    A, b = rng.normal(size=(D, S)), rng.normal(size=D)
    path = tmp_path / "lin.h5"
    save_model(path, PiecewiseAffineNet.from_arrays([A], [b], []), noise_std=noise)
    X = rng.standard_normal((6, S)) @ A.T + b        # on the model: exact log p O(1)
    X[0] = b                                         # x'Px = 0: not warned about
    X[1:4, 2] = np.nan                               # 3 rows for impute, far from b in noise units
    data = tmp_path / "x.npy"
    np.save(data, X)
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])

    res = run("score", path, data, "-o", tmp_path / "s.csv", "--json")
    assert res.exit_code == 0, res.output
    warnings = [l for l in res.stderr.splitlines() if l.startswith("Warning:")]
    assert len(warnings) == 1 and "5 row(s)" in warnings[0] and "--noise-std" in warnings[0]
    assert json.loads(res.stdout)["rows_unreliable_by_rounding"] == 5

    res = run("score", path, data, "-o", tmp_path / "s2.csv", "--json", "--quiet")
    assert res.exit_code == 0 and "Warning" not in res.stderr
    assert json.loads(res.stdout)["rows_unreliable_by_rounding"] == 5

    res = run("impute", path, data, "-o", tmp_path / "i.csv", "--json")
    assert res.exit_code == 0, res.output
    assert sum(l.startswith("Warning: 3 row(s)") for l in res.stderr.splitlines()) == 1
    assert json.loads(res.stdout)["rows_unreliable_by_rounding"] == 3

    res = run("compare", path, "--data", data, "--json")
    assert res.exit_code == 0, res.output
    assert sum(l.startswith("Warning: 5 row(s)") and str(path) in l for l in res.stderr.splitlines()) == 1


def test_missing_entries_beyond_float64_are_refused_in_one_line(tmp_path):
    # one observed entry of two, S = 2: Lambda = I + A_o^T P_o A_o is rank one plus the
    # identity, which float64 cannot hold beside 1 / sigma^2 = 1e24 (an internal error before)
    rng = np.random.default_rng(3)
    A, b = rng.normal(size=(2, 2)), rng.normal(size=2)
    path = tmp_path / "lin.h5"
    save_model(path, PiecewiseAffineNet.from_arrays([A], [b], []), noise_std=1e-12)
    X = rng.standard_normal((5, 2)) @ A.T + b
    X[:, 0] = np.nan
    np.save(tmp_path / "x.npy", X)
    out = tmp_path / "s.csv"
    res = CliRunner().invoke(main, ["score", str(path), str(tmp_path / "x.npy"), "-o", str(out)])
    assert res.exit_code == 1, res.output
    errors = [l for l in res.stderr.splitlines() if l.startswith("Error:")]
    assert len(errors) == 1 and "--noise-std" in errors[0] and "Traceback" not in res.output
    assert not out.exists()


def test_an_output_layer_that_cancels_at_a_small_noise_std_scores_exactly():
    # Two units with the same breakpoint and output columns a w and -w: g(z) = 0 for every z,
    # so p(x) = N(x; 0, sigma^2 I) exactly.  With Q = U'PU formed explicitly, M'QM (exactly
    # 0) came out as -60 at sigma = 1e-7 (rounding eps |M|'|Q||M| ~ 1e1): the Cholesky factor
    # of I + M'QM failed (an internal error, 46 of 200 values of a) or lost its identity
    # (log p silently 92 nats off at a = 2.66)
    from cpadgn.model import CPAModel
    w, sigma = np.array([1.0, 2.0, 3.0]), 1e-7
    X = sigma * np.random.default_rng(0).standard_normal((4, 3))
    exact = multivariate_normal(np.zeros(3), sigma ** 2 * np.eye(3)).logpdf(X)
    for a in np.random.default_rng(1).uniform(0.2, 5.0, 20):
        net = PiecewiseAffineNet.from_arrays([np.array([[1.0], [a]]), np.column_stack([w * a, -w])],
                                             [np.array([10.0, 10.0 * a]), np.zeros(3)], [0.1])
        lp = CPAModel(net, noise_std=sigma, device="cpu").log_prob(X)
        # what remains is the rounding of the terms of log kappa that cancel, the largest
        # c . U'P(x - b) with c = 10 (1, a) the hidden output at z = 0 (|U M|, |U c| ~ eps)
        cancel = 10 * (1 + a) * (np.abs(X) @ np.abs(w)) * (1 + a) / sigma ** 2
        assert np.all(np.abs(lp - exact) <= 16 * np.finfo(float).eps * cancel + 1e-12), (a, lp - exact)


def _exact_conditional(A, b, sigma, x):
    """log p(x_o), E[x_m | x_o] and the conditional stds of x = A z + b + N(0, sigma^2 I),
    z ~ N(0, I), in 40-digit mpmath: A (D, S), b (D,) mpmath matrices, x (D,) float (NaN
    missing).  Returns (log p, {d: mean}, {d: std}) for the missing d."""
    import mpmath as mp
    o = [d for d in range(len(x)) if not np.isnan(x[d])]
    m = [d for d in range(len(x)) if np.isnan(x[d])]
    S, s2 = A.cols, mp.mpf(sigma) ** 2
    Ao = mp.matrix([[A[d, s] for s in range(S)] for d in o])
    cov = Ao * Ao.T + s2 * mp.eye(len(o))
    r = mp.matrix([mp.mpf(x[d]) - b[d] for d in o])
    w = mp.lu_solve(cov, r)
    log_p = -(len(o) * mp.log(2 * mp.pi) + mp.log(mp.det(cov)) + (r.T * w)[0]) / 2
    mean, std = {}, {}
    for d in m:
        a = mp.matrix([[A[d, s] for s in range(S)]])
        k = a * Ao.T                                                   # Cov[x_d, x_o]
        mean[d] = b[d] + (k * w)[0]
        std[d] = mp.sqrt((a * a.T)[0] + s2 - (k * mp.lu_solve(cov, k.T))[0])
    return log_p, mean, std


def _check_against_exact(model, X, A, b, sigma, magnitude):
    """log p, impute's means and stds of rows X against ``_exact_conditional``.  Every
    quantity is formed from B = P_o^1/2 A_w and the centred r = P_o^1/2 (x - b_w) by
    orthogonal transformations, so the error is that of B and r themselves: A_w = U M_w
    and b_w = U c_w + b0 round to eps times magnitude (the largest of |U||M_w|, |U||c_w| +
    |b0| and |x|), in noise units eps magnitude / sigma; that moves a mean by about as many
    conditional stds (a direction the observed entries fix has std sigma / |A|, one they
    leave free std ~1) and log kappa = -|r|^2 / 2 + ... by |r| times it.  64 eps for the
    sums of ~H + D terms and the QR's own rounding (the errors found are below 1 eps)."""
    tol = 64 * np.finfo(float).eps * magnitude / sigma
    log_p = model.log_prob(X)
    res = model.imputation(X, std=True)
    for n, x in enumerate(X):
        exact_lp, mean, std = _exact_conditional(A, b, sigma, x)
        r = float(np.sqrt(np.nansum(((x - np.array(b.tolist(), float)[:, 0]) / sigma) ** 2)))
        assert abs(log_p[n] - float(exact_lp)) <= (1 + r) * tol, (n, log_p[n] - float(exact_lp))
        for d in mean:
            assert abs(res.mean[n, d] - float(mean[d])) <= tol * float(std[d]), (n, d, res.mean[n, d] - float(mean[d]))
            assert abs(res.std[n, d] - float(std[d])) <= tol * float(std[d]), (n, d, res.std[n, d] - float(std[d]))


def _twin_unit_net(W, c1, V, c, s):
    """A generator that is affine although its units switch: each unit h (W (H, S), c1
    (H,)) has a twin with weights -W_h, bias -c1_h and output weight -V_h (V (D, H) the
    stored output weights, c (D,) the output bias, s the leaky slope); whichever of the two
    is on, their sum is V_h (1 + s) (W_h z + c1_h), so g(z) = A z + b exactly for these
    float64 weights, A = V (1 + s) W, b = V (1 + s) c1 + c.  Returns the net, A (D, S)
    and b (D, 1) in mpmath (at its current precision), and the magnitudes (D,) its
    regions' A_w and b_w are formed from, |V|(1 + s)|W| 1 + |V||c1|(1 + s) + |c|."""
    import mpmath as mp
    net = PiecewiseAffineNet.from_arrays([np.concatenate([W, -W]), np.concatenate([V, -V], 1)],
                                         [np.concatenate([c1, -c1]), c], [s])
    scale = mp.matrix(V) * (1 + mp.mpf(s))
    magnitude = (np.abs(V) * (1 + s)) @ np.abs(W) @ np.ones(W.shape[1]) + np.abs(V) @ np.abs(c1) * (1 + s) + np.abs(c)
    return net, scale * mp.matrix(W), scale * mp.matrix(c1) + mp.matrix(c), magnitude


def test_rows_with_missing_entries_at_a_small_noise_std_condition_exactly():
    # With fewer observed entries than S, A_o^T P_o A_o is singular and I + A_o^T P_o A_o keeps
    # eigenvalues 1 beside ~|A|^2 / sigma^2 = 1e12.  Formed entrywise (each entry rounded to
    # eps |A|^2 / sigma^2 = 1e-4) those drowned: impute's means were up to 1e-3 conditional
    # stds off at sigma = 1e-6 (4e-4 on benchmarks/audit_impute_calibration.py's), and y,
    # |x - b|^2_P from uncentred products cost log p eps |x|^2 / sigma^2 ~ 1e-3 nats.
    # g is affine (``_twin_unit_net``), so p(x_m | x_o) is Gaussian
    import mpmath as mp
    from cpadgn.model import CPAModel
    mp.mp.dps = 40
    for S, D, sigma, seed in [(2, 4, 1e-6, 6), (3, 5, 1e-5, 7)]:
        rng = np.random.default_rng(seed)
        H, s = 3, 0.2
        W, c1 = rng.normal(size=(H, S)), rng.normal(size=H)
        V, c = rng.normal(size=(D, H)) / (1 + s), rng.normal(size=D)
        net, A, b, magnitude = _twin_unit_net(W, c1, V, c, s)
        Af, bf = np.array(A.tolist(), float), np.array(b.tolist(), float)[:, 0]
        X = rng.standard_normal((6, S)) @ Af.T + bf + sigma * rng.standard_normal((6, D))
        for n in range(6):                              # 1 .. S observed entries, then half
            X[n, rng.permutation(D)[: D - 1 - n % S if n < 4 else D // 2]] = np.nan
        model = CPAModel(net, noise_std=sigma, device="cpu")
        _check_against_exact(model, X, A, b, sigma, magnitude.max() + np.nanmax(np.abs(X)))


def test_missing_entries_where_the_output_layer_cancels_condition_exactly():
    # test_an_output_layer_that_cancels_...'s generator with entries missing and an output
    # bias b0: g(z) = b0 exactly (a w and 10 a are exact for these a), so p(x_o) = N(b0_o,
    # sigma^2 I) and E[x_m | x_o] = b0_m, std sigma.  The products formed in uncentred data
    # space rounded |x|^2 / sigma^2 ~ 1e14: log p was 0.03 nats off at sigma = 1e-7
    import mpmath as mp
    from cpadgn.model import CPAModel
    mp.mp.dps = 40
    w, b0, sigma = np.array([1.0, 2.0, 3.0]), np.array([0.5, -1.0, 2.0]), 1e-7
    X = b0 + sigma * np.random.default_rng(0).standard_normal((5, 3))
    X[0, 0] = X[1, 1] = X[2, 2] = np.nan
    X[3, :2] = X[4, 1:] = np.nan
    for a in [0.5, 1.25, 3.0, 5.0]:
        net = PiecewiseAffineNet.from_arrays([np.array([[1.0], [a]]), np.column_stack([w * a, -w])],
                                             [np.array([10.0, 10.0 * a]), b0], [0.1])
        model = CPAModel(net, noise_std=sigma, device="cpu")
        # |U||c| = 20 a |w| (c = 10 (1, a) at z = 0), |U||M| = 2 a |w|, beside |b0|, |x| <= 3
        _check_against_exact(model, X, mp.zeros(3, 1), mp.matrix(b0), sigma, 20 * a * 3 + 2 * a * 3 + 2 * 3)


def _exact_posterior(A, b, sigma, x):
    """log p(x), E[z | x] (S,) and Cov[z | x]^-1 (S, S) of x = A z + b + N(0, sigma^2 I),
    z ~ N(0, I), in 40-digit mpmath: A (D, S), b (D,) mpmath matrices, x (D,) float."""
    import mpmath as mp
    D, S, s2 = A.rows, A.cols, mp.mpf(sigma) ** 2
    r = mp.matrix([mp.mpf(x[d]) - b[d] for d in range(D)])
    cov = A * A.T + s2 * mp.eye(D)
    log_p = -(D * mp.log(2 * mp.pi) + mp.log(mp.det(cov)) + (r.T * mp.lu_solve(cov, r))[0]) / 2
    precision = mp.eye(S) + A.T * A / s2
    return log_p, mp.lu_solve(precision, A.T * r / s2), precision


def _check_complete_against_exact(model, X, A, b, sigma, magnitude):
    """log p and E[z | x] of complete rows X against ``_exact_posterior``.  Each pair's
    system [[I, 0], [P^1/2 A_w, P^1/2 (x - b_w)]] is formed to eps times magnitude (the
    largest of |U||M_w|, |U||c_w| + |b0| and |x|) and factorised by orthogonal
    transformations: in noise units it is exact for a system perturbed by d = 64 eps
    magnitude / sigma (as ``_check_against_exact``), which moves the whitened mean by d
    conditional stds and the residual rho (rho^2 = -2 log kappa + ...) by d, so log p by
    d (rho + d); the responsibilities move by as much, times means O(1) stds apart."""
    import mpmath as mp
    d = 64 * np.finfo(float).eps * magnitude / sigma
    post = model.posterior(X)
    S = A.cols
    for n, x in enumerate(X):
        log_p, mean, precision = _exact_posterior(A, b, sigma, x)
        rho = float(mp.sqrt(-2 * log_p - x.size * mp.log(2 * mp.pi) - mp.log(mp.det(A * A.T + mp.mpf(sigma) ** 2
                                                                                     * mp.eye(A.rows)))))
        assert abs(post.log_likelihood[n] - float(log_p)) <= d * (rho + d), (n, post.log_likelihood[n] - float(log_p))
        e = mp.matrix([mp.mpf(post.z_mean[n, s]) - mean[s] for s in range(S)])
        err = float(mp.sqrt((e.T * precision * e)[0]))                # in conditional stds
        assert err <= d * (1 + rho + d), (n, err)


def test_complete_rows_at_a_small_noise_std_condition_exactly():
    # A linear generator with a direction that A maps to ~sigma or less: the dense products
    # y = A'P(x - b0) (size |A| |x - b0| / sigma^2) and log kappa (terms of |x - b0|^2 /
    # sigma^2 that cancel) put the posterior mean 1e-2 conditional stds off at sigma = 1e-7
    # (3e-6 at an A 1e3 from singular) and log p 0.02..0.1 nats off; at sigma = 1e-5, 7e-7
    # stds and 4e-6 nats, with no warning (the dense rounding estimate below 1e-3)
    import mpmath as mp
    from cpadgn.model import CPAModel
    mp.mp.dps = 40
    S, D = 2, 3
    for sigma, kappa, seed in [(1e-7, 1e-3, 0), (1e-7, 1e-7, 1), (1e-5, 1e-6, 2)]:
        rng = np.random.default_rng(seed)
        Q1, Q2 = np.linalg.qr(rng.normal(size=(D, S)))[0], np.linalg.qr(rng.normal(size=(S, S)))[0]
        A, b = Q1 @ np.diag([1.0, kappa]) @ Q2.T, rng.normal(size=D)
        X = rng.standard_normal((6, S)) @ A.T + b + sigma * rng.standard_normal((6, D))
        model = CPAModel(PiecewiseAffineNet.from_arrays([A], [b], []), noise_std=sigma, device="cpu")
        if sigma == 1e-5:
            assert np.all(model.rounding_error(X) < 1e-3)
        _check_complete_against_exact(model, X, mp.matrix(A), mp.matrix(b), sigma, np.abs(A).sum(1).max()
                                      + np.abs(b).max() + np.abs(X).max())


def test_complete_rows_where_the_output_layer_cancels_condition_exactly():
    # test_rows_with_missing_entries_...'s twin units (g affine, 11 regions), with output
    # weights V = A W^+ + K, K W = 0: |V||W| ~ 3 beside |A| = 1 with a direction A maps to
    # sigma.  The dense products put E[z | x] 1e-2 conditional stds and log p 0.03 nats off
    import mpmath as mp
    from cpadgn.model import CPAModel
    mp.mp.dps = 40
    S, D, H, s, sigma = 2, 5, 4, 0.2, 1e-6
    rng = np.random.default_rng(1)
    W = rng.normal(size=(H, S))
    Q1, Q2 = np.linalg.qr(rng.normal(size=(D, S)))[0], np.linalg.qr(rng.normal(size=(S, S)))[0]
    null = np.linalg.svd(W.T)[2][S:]                                   # (H - S, H): null W = 0
    V = (Q1 @ np.diag([1.0, sigma]) @ Q2.T @ np.linalg.pinv(W) + 3 * rng.normal(size=(D, H - S)) @ null) / (1 + s)
    c1, c = rng.normal(size=H), rng.normal(size=D)
    net, A, b, magnitude = _twin_unit_net(W, c1, V, c, s)
    Af, bf = np.array(A.tolist(), float), np.array(b.tolist(), float)[:, 0]
    X = rng.standard_normal((8, S)) @ Af.T + bf + sigma * rng.standard_normal((8, D))
    model = CPAModel(net, noise_std=sigma, device="cpu")
    _check_complete_against_exact(model, X, A, b, sigma, magnitude.max() + np.abs(X).max())


def test_rows_with_missing_entries_far_from_the_origin_are_warned_about_by_their_distance_to_the_model():
    # Rows near the model, far from the origin (output bias 1e3, noise 1e-5): the dense
    # products of rows with missing entries were formed in uncentred data space, their
    # bounds' log kappa off by eps (|x| + |b0|)^2 / sigma^2 ~ 10 nats, and their rounding
    # estimate, 4 n eps (|x| + |b0|)'P(|x| + |b0|) ~ 300, warned about every one of them.
    # Centred at b0, the bounds round to eps |x - b0|^2 / sigma^2 as the complete rows' do
    # and the estimate is that: below 1e-3 here, above it where the noise is 1e-9
    import mpmath as mp
    import torch
    from cpadgn import likelihood
    from cpadgn.model import CPAModel
    mp.mp.dps = 40
    rng = np.random.default_rng(5)
    S, D = 2, 4
    A, b = rng.normal(size=(D, S)), 1e3 * (1 + rng.random(D))
    X = rng.standard_normal((6, S)) @ A.T + b
    X[np.arange(6), rng.integers(0, D, 6)] = np.nan
    for sigma, warned in [(1e-5, False), (1e-9, True)]:
        model = CPAModel(PiecewiseAffineNet.from_arrays([A], [b], []), noise_std=sigma, device="cpu")
        est = model.rounding_error(X)
        assert np.all((est > 1e-3) == warned), est
        if warned:
            continue
        Xs = X + sigma * rng.standard_normal(X.shape)
        dense = likelihood._log_kappa_incomplete(model._region_table(), torch.as_tensor(Xs), 1)[0][:, 0].numpy()
        log_p = model.log_prob(Xs)
        for n, x in enumerate(Xs):
            exact = float(_exact_conditional(mp.matrix(A), mp.matrix(b), sigma, x)[0])
            assert abs(dense[n] - exact) <= est[n], (n, dense[n] - exact, est[n])   # one region: kappa = p
            assert abs(log_p[n] - exact) <= 1e-3 * est[n], (n, log_p[n] - exact)
