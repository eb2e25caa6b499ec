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
def test_estimate_is_the_order_of_the_actual_rounding_error_at_tiny_noise(seed, noise):
    # S = D: the model spans the data space, so the exact log p stays O(1) while x'Px ~ 1/noise^2
    model, *_, X, exact = linear_case(seed, noise, 2, 2)
    post = model.posterior(X)
    err = np.abs(post.log_likelihood - exact)
    est = post.rounding_error
    np.testing.assert_array_equal(est, model.rounding_error(X))
    assert np.all(est > 1e-3)                       # every row would be warned about
    # the estimate is the leading term (4 n eps x'Px), not a bound: the dot products'
    # other terms (|C|^T |U|^T |x - b0| for v) can exceed it by the conditioning of the
    # output map (seen up to 4x); seen 0.04..0.8 at its largest
    assert np.all(err <= 10 * est), np.max(err / est)
    assert np.max(err / est) >= 1e-2, np.max(err / est)


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
    X[1:4, 2] = np.nan                               # 3 rows for impute, far in uncentred units
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
