"""Anomaly detection: model-based p-values, exact explanations, and the score command's
--pvalues / --alpha / --explain, against oracles written here (quadrature, importance
sampling, scipy's binomial interval, a model on the observed columns only)."""
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from cli.main import main
from cpadgn import CPAModel, PiecewiseAffineNet
from cpadgn.errors import CpadgnError
from cpadgn.anomaly import clopper_pearson, expected_squared_residuals, pvalues, top_features
from cpadgn.modelfile import save_model

from oracles import GL_W, GL_X, kappa_rounding_tol, line_breakpoints, posterior_spread, random_net
from test_cli import assert_one_line_error


# ------------------------------------------------------------------ oracles
def esr_quadrature_1d(net, x, noise_std, prior_mean=0.0, prior_sd=1.0, half_width=12.0):
    """E[(x_d - g_d(z))^2 | x_o] / sigma_d^2 for S = 1 by piecewise 60-point
    Gauss-Legendre over the breakpoints of g and a fine grid (user prior N(m, s^2))."""
    var = np.broadcast_to(np.asarray(noise_std, float) ** 2, (net.output_dim,))
    lo, hi = prior_mean - half_width * prior_sd, prior_mean + half_width * prior_sd
    breaks = line_breakpoints(lambda t: net.preactivations(t[:, None]), lo, hi)
    edges = np.union1d(np.union1d(breaks, np.linspace(lo, hi, 2001)), [lo, hi])
    a, b = edges[:-1, None], edges[1:, None]
    t = (0.5 * (b - a) * GL_X + 0.5 * (a + b)).ravel()
    g = net.forward(t[:, None])
    obs = ~np.isnan(x)
    lw = (np.log((0.5 * (b - a) * GL_W).ravel()) - 0.5 * ((t - prior_mean) / prior_sd) ** 2
          - 0.5 * ((g[:, obs] - x[obs]) ** 2 / var[obs]).sum(1))
    w = np.exp(lw - lw.max())
    w /= w.sum()
    out = ((x[None] - g) ** 2 * w[:, None]).sum(0) / var
    return np.where(obs, out, np.nan)


def esr_importance(net, x, noise_std, n=400_000, seed=1):
    """Self-normalised importance sampling (prior proposal, prior N(0, I)): the estimate
    (D,) and its delta-method standard error (D,)."""
    rng = np.random.default_rng(seed)
    var = np.broadcast_to(np.asarray(noise_std, float) ** 2, (net.output_dim,))
    g = net.forward(rng.standard_normal((n, net.latent_dim)))
    lw = -0.5 * ((g - x) ** 2 / var).sum(1)
    w = np.exp(lw - lw.max())
    f = (x - g) ** 2 / var
    est = (w[:, None] * f).sum(0) / w.sum()
    se = np.sqrt((w[:, None] ** 2 * (f - est) ** 2).sum(0)) / w.sum()
    return est, se


def observed_columns_model(net, cols, noise_std):
    """An independent model of x_o: the generator with the other output rows deleted."""
    Ws, bs = list(net.weights), list(net.biases)
    Ws[-1], bs[-1] = Ws[-1][cols], bs[-1][cols]
    sub = PiecewiseAffineNet.from_arrays(Ws, bs, net.slopes)
    return CPAModel(sub, noise_std=np.broadcast_to(noise_std, (net.output_dim,))[cols], device="cpu")


@pytest.fixture(scope="module")
def model1():
    net = random_net(1, (6, 6), 4, seed=3, slope=0.1, scale=2.0)
    return CPAModel(net, noise_std=0.3, device="cpu")


# ------------------------------------------------------------------ p-values
def test_pvalues_of_model_draws_are_uniform(model1):
    X = model1.sample(400, seed=123)
    pv = pvalues(model1, model1.log_prob(X), 1000, seed=7)
    assert stats.kstest(pv.pvalue, "uniform").pvalue > 0.01
    assert pv.n_patterns == 1 and np.all(pv.pvalue >= 1 / 1001) and np.all(pv.pvalue <= 1)
    assert np.all((pv.lower <= pv.count / 1000) & (pv.count / 1000 <= pv.upper))


def test_pvalues_of_incomplete_model_draws_are_uniform(model1):
    """Each row is compared with draws scored on its own observed entries; comparing
    marginals of 3 entries with full 4-entry likelihoods would be far from uniform."""
    rng = np.random.default_rng(5)
    X = model1.sample(400, seed=321)
    X[np.arange(400), rng.integers(0, 4, 400)] = np.nan
    pv = pvalues(model1, model1.log_prob(X), 600, seed=8, observed=~np.isnan(X))
    assert pv.n_patterns == 4
    assert stats.kstest(pv.pvalue, "uniform").pvalue > 0.01
    one_by_one = pvalues(model1, model1.log_prob(X), 600, seed=8, observed=~np.isnan(X), max_block_bytes=1)
    np.testing.assert_array_equal(one_by_one.count, pv.count)


def test_pvalues_score_their_draws_within_the_memory_budget(model1):
    """The M draws of each missing pattern (8 M D bytes) go to log_prob in blocks of a
    tenth of the model's --memory-budget; before, in blocks of 2e8 bytes at any budget."""
    X = model1.sample(4, seed=2)
    X[np.arange(4), np.arange(4)] = np.nan                  # 4 patterns of 8 * 50 * 4 bytes
    calls = []
    small = model1.with_noise_std(0.3)
    small.memory_budget = 10 * 8 * 50 * 4 * 2.5             # a tenth: two patterns' draws and a half
    posterior = small.posterior
    small.posterior = lambda rows, **kw: calls.append(len(rows)) or posterior(rows, **kw)
    ll = posterior(X).log_likelihood
    pvalues(small, ll, 50, observed=~np.isnan(X))
    assert calls == [100, 100]


def test_pvalues_progress_moves_within_one_block_of_draws(model1):
    """The draws of every pattern fit one block at the default budget, and progress came
    once per block: the bar sat at 0 until the end (52 s for 26 patterns of a wine model).
    It now counts the draws scored, (done, Q M), several times per block."""
    X = model1.sample(3, seed=2)
    X[np.arange(3), np.arange(3)] = np.nan                  # 3 patterns
    calls = []
    pvalues(model1, model1.log_prob(X), 40, observed=~np.isnan(X), progress=lambda *a: calls.append(a))
    assert calls[-1] == (120, 120) and all(t == 120 for _, t in calls)
    assert any(0 < d < 120 for d, _ in calls) and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_pvalues_are_deterministic_and_flag_far_rows(model1):
    X = model1.sample(20, seed=1)
    X[0] += 10.0
    ll = model1.log_prob(X)
    a, b = pvalues(model1, ll, 500, seed=3), pvalues(model1, ll, 500, seed=3)
    np.testing.assert_array_equal(a.pvalue, b.pvalue)
    assert a.pvalue[0] == 1 / 501 and a.upper[0] < 0.01


def test_clopper_pearson_matches_scipy():
    for k, n in [(0, 50), (3, 50), (25, 50), (50, 50), (7, 1000)]:
        lo, hi = clopper_pearson(np.array([k]), n, 0.95)
        ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
        assert abs(lo[0] - ci.low) < 1e-10 and abs(hi[0] - ci.high) < 1e-10


# ------------------------------------------------------------------ explanations
def test_expected_squared_residuals_match_quadrature_with_a_general_prior():
    net = random_net(1, (5, 5), 3, seed=11, slope=0.1, scale=2.0)
    model = CPAModel(net, prior_mean=[0.7], prior_cov=[[2.25]], noise_std=[0.2, 0.5, 0.3], device="cpu")
    X = model.sample(4, seed=2)
    X[1, 0] += 3.0
    X[2, 2] = np.nan                                       # a missing entry: marginal posterior
    got = expected_squared_residuals(model, X)
    for n in range(4):
        want = esr_quadrature_1d(net, X[n], model.noise_std, 0.7, 1.5)
        np.testing.assert_array_equal(np.isnan(got[n]), np.isnan(want))
        ok = ~np.isnan(want)
        np.testing.assert_allclose(got[n][ok], want[ok], rtol=1e-8, atol=1e-10)


def test_expected_squared_residuals_of_equal_rows_are_equal_bit_for_bit():
    """Copies of a row had their pairs' sums split differently by the blocks of pairs
    (max_pair_bytes), so their explanations differed in the last bits (here in blocks of
    3 pairs; 18 of 40 digits rows' copies in blocks of 7); each distinct row is now summed
    once, and the results still match the quadrature oracle."""
    net = random_net(1, (5, 5), 3, seed=11, slope=0.1, scale=2.0)
    model = CPAModel(net, prior_mean=[0.7], prior_cov=[[2.25]], noise_std=[0.2, 0.5, 0.3], device="cpu")
    X = model.sample(4, seed=2)
    X[1, 0] += 3.0
    X[2, 2] = np.nan
    where = np.array([0, 1, 2, 0, 3, 2, 1, 0, 2, 3, 0])
    got = expected_squared_residuals(model, X[where], max_pair_bytes=8 * 3 * 7 * 3)     # 3 pairs a block
    for i, n in enumerate(where):
        want = esr_quadrature_1d(net, X[n], model.noise_std, 0.7, 1.5)
        ok = ~np.isnan(want)
        np.testing.assert_allclose(got[i][ok], want[ok], rtol=1e-8, atol=1e-10)
        np.testing.assert_array_equal(got[i], got[np.argmax(where == n)])


def test_expected_squared_residuals_match_importance_sampling_s2():
    net = random_net(2, (6, 6), 3, seed=4, slope=0.2, scale=1.5)
    model = CPAModel(net, noise_std=0.5, device="cpu")
    X = model.sample(3, seed=9)
    got = expected_squared_residuals(model, X)
    for n in range(3):
        est, se = esr_importance(net, X[n], 0.5)
        assert np.all(np.abs(got[n] - est) <= 5 * se + 1e-9), (got[n], est, se)


def test_far_shifted_feature_is_ranked_first():
    net = random_net(1, (8, 8), 6, seed=21, slope=0.1, scale=2.0)
    model = CPAModel(net, noise_std=0.2, device="cpu")
    X = model.sample(6, seed=4)
    for d in range(6):
        X[d, d] += 4.0                                     # 20 noise std on feature d of row d
    index, value = top_features(expected_squared_residuals(model, X), 2)
    np.testing.assert_array_equal(index[:, 0], np.arange(6))
    assert np.all(value[:, 0] > 25) and np.all(value[:, 0] > value[:, 1])


def test_top_features_skip_missing_entries():
    scores = np.array([[1.0, np.nan, 3.0], [np.nan, np.nan, 2.0], [5.0, 5.0, 1.0]])
    index, value = top_features(scores, 2)
    np.testing.assert_array_equal(index, [[2, 0], [2, -1], [0, 1]])
    np.testing.assert_array_equal(value[1], [2.0, np.nan])



def test_top_features_give_k_columns_and_refuse_a_negative_k():
    """k above D gave D columns, not the (N, k) the docstring promises (-1 / NaN beyond
    the finite entries); k = -1 silently gave all but the last column."""
    index, value = top_features(np.array([[1.0, np.nan, 3.0]]), 5)
    np.testing.assert_array_equal(index, [[2, 0, -1, -1, -1]])
    np.testing.assert_array_equal(value, [[3.0, 1.0, np.nan, np.nan, np.nan]])
    with pytest.raises(CpadgnError, match="k must be a non-negative integer, got -1"):
        top_features(np.ones((2, 3)), -1)


@pytest.mark.parametrize("call, fragment", [
    (lambda m, ll: pvalues(m, ll, 2.5), "n_samples must be a positive integer, got 2.5"),
    (lambda m, ll: pvalues(m, ll, 0), "n_samples must be a positive integer, got 0"),
    (lambda m, ll: pvalues(m, ll, 10, level=95), "level must be in (0, 1), got 95"),
    (lambda m, ll: pvalues(m, np.stack([ll, ll]), 10), "log_prob must be one log p per row"),
    (lambda m, ll: pvalues(m, ll, 10, observed=np.ones((2, 4), bool)), "observed must have shape (3, 4)"),
])
def test_pvalues_bad_arguments_are_cpadgn_errors(model1, call, fragment):
    """The README promises CpadgnError for every user error; pvalues raised a bare ValueError
    (and truncated n_samples=2.5 to 2)."""
    with pytest.raises(CpadgnError) as err:
        call(model1, np.zeros(3))
    assert fragment in str(err.value) and "; pass" in str(err.value) and "\n" not in str(err.value)

def test_incomplete_rows_are_scored_by_the_observed_columns_model(model1):
    X = model1.sample(5, seed=6)
    X[:, 1] = np.nan
    X[3, 2] = np.nan
    got = model1.log_prob(X)
    for cols, rows in [([0, 2, 3], [0, 1, 2, 4]), ([0, 3], [3])]:
        want = observed_columns_model(model1.net, cols, 0.3).log_prob(X[np.ix_(rows, cols)])
        np.testing.assert_allclose(got[rows], want, rtol=0, atol=1e-10)


# ------------------------------------------------------------------ the command line
@pytest.fixture()
def files(tmp_path):
    net = random_net(1, (6, 6), 4, seed=3, slope=0.1, scale=2.0)
    model = tmp_path / "gen.h5"
    save_model(model, net, noise_std=0.3)
    X = CPAModel(net, noise_std=0.3, device="cpu").sample(40, seed=0)
    X[0, 2] += 5.0
    X[5, 1] = np.nan
    data = tmp_path / "data.csv"
    np.savetxt(data, X, delimiter=",", header="a,b,c,d", comments="")
    return dict(dir=tmp_path, net=net, model=model, data=data, X=X)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def table(path):
    return np.genfromtxt(path, delimiter=",", names=True)


def test_score_pvalues_alpha_and_explain(files):
    out = files["dir"] / "s.csv"
    res = run("score", files["model"], files["data"], "-o", out, "-q", "--alpha", "0.05",
              "--samples", "400", "--seed", "3", "--explain", "2", "--device", "cpu")
    assert res.exit_code == 0, res.output
    t = table(out)
    model = CPAModel(files["net"], noise_std=0.3, device="cpu")
    X = files["X"]
    pv = pvalues(model, model.log_prob(X), 400, seed=3, observed=~np.isnan(X))
    np.testing.assert_array_equal(t["pvalue"], pv.pvalue)
    np.testing.assert_array_equal(t["pvalue_lower"], pv.lower)
    np.testing.assert_array_equal(t["is_anomaly"], pv.pvalue < 0.05)
    assert t["is_anomaly"][0] == 1 and t["explain_1"][0] == 3        # the shifted column, 1-based
    esr = expected_squared_residuals(model, X)
    np.testing.assert_allclose(t["explain_1_residual"], np.nanmax(esr, axis=1), rtol=1e-12)
    assert t["explain_1"][5] != 2 and t["explain_2"][5] != 2          # the missing entry is never named
    import csv
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))                                  # DATA's header is a,b,c,d
    for k in (1, 2):
        assert [r[f"explain_{k}_name"] for r in rows] == ["abcd"[int(r[f"explain_{k}"]) - 1] for r in rows]
    assert rows[0]["explain_1_name"] == "c"


def test_explain_k_is_0_when_fewer_than_k_entries_are_observed(files):
    """score --help said explain_1..K are 0 "when fewer than K entries are observed"; it is
    explain_k, for fewer than k (README's column table): a row with one observed entry
    names it as explain_1, and explain_2 is 0 with an empty name and a NaN residual."""
    X = files["X"][:3].copy()
    X[1, 1:] = np.nan
    data, out = files["dir"] / "one.csv", files["dir"] / "one_s.csv"
    np.savetxt(data, X, delimiter=",", header="a,b,c,d", comments="")
    assert run("score", files["model"], data, "-o", out, "-q", "--explain", "2").exit_code == 0
    import csv
    with open(out, newline="") as f:
        row = list(csv.DictReader(f))[1]
    assert (row["explain_1"], row["explain_1_name"], row["explain_2"], row["explain_2_name"]) == ("1", "a", "0", "")
    assert np.isfinite(float(row["explain_1_residual"])) and np.isnan(float(row["explain_2_residual"]))
    text = " ".join(run("score", "--help").output.split())
    assert "0 when fewer than k entries are observed" in text, text


def test_explain_names_only_what_a_header_names(files):
    """explain_k_name comes from a CSV header; .npy DATA (no names) gets none, and an .h5
    OUT stores the names as strings."""
    np.save(files["dir"] / "x.npy", files["X"])
    out = files["dir"] / "s.csv"
    assert run("score", files["model"], files["dir"] / "x.npy", "-o", out, "-q", "--explain", "1").exit_code == 0
    assert "explain_1_name" not in table(out).dtype.names and "explain_1" in table(out).dtype.names
    h5 = files["dir"] / "s.h5"
    assert run("score", files["model"], files["data"], "-o", h5, "-q", "--explain", "1").exit_code == 0
    import h5py
    with h5py.File(h5, "r") as f:
        names = [n.decode() for n in f["explain_1_name"][:]]
        assert names == ["abcd"[i - 1] for i in f["explain_1"][:]]


def test_score_is_bit_identical_across_runs_and_equal_across_batch_sizes(files):
    args = ["--pvalues", "--samples", "300", "--explain", "3", "-q", "--device", "cpu"]
    a, b, c = (files["dir"] / f"{n}.csv" for n in "abc")
    for out in (a, b):
        assert run("score", files["model"], files["data"], "-o", out, *args).exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    res = run("score", files["model"], files["data"], "-o", c, *args, "--memory-budget", "2e3")
    assert res.exit_code == 0, res.output
    ta, tc = table(a), table(c)
    assert ta.dtype.names == tc.dtype.names
    # Another batch size changes only rounding (and, within the certified bounds, pruning):
    # tolerances from kappa_rounding_tol, propagated column by column.
    model = CPAModel(files["net"], noise_std=0.3, device="cpu")
    X = files["X"]
    post = model.posterior(X)
    bound = "log_likelihood_error_bound"
    assert np.all(ta[bound] <= np.log1p(1e-10) * (1 + 1e-6)) and np.all(tc[bound] <= np.log1p(1e-10) * (1 + 1e-6))
    tol = 2 * kappa_rounding_tol(model, X, post) + ta[bound] + tc[bound]
    close = lambda name, t: np.testing.assert_array_less(np.abs(tc[name] - ta[name]), t + 1e-300, err_msg=name)
    close("log_likelihood", tol)
    close("anomaly_score", tol)
    spread = posterior_spread(post, len(X))
    close("z_mean_1", tol * (1 + 2 * spread))               # see test_likelihood's chunking test
    close("top_region_responsibility", 2 * tol)             # r = exp(l_w - log p), r <= 1
    # e_d = sum_w r_w q_w / sigma^2, q_w = (x_d - A_w,d m_w - b_w,d)^2 + A_w,d C_w A_w,d^T:
    # |dr_w| <= 2 tol r_w gives 2 tol e_d; |dm_w| <= tol (d m / d v <= I) gives, by Jensen,
    # 2 sqrt(e_d) max_w |A_w,d| tol / sigma_d.
    A, _ = model.generator.region_maps(model.partition().patterns)
    a_max = np.abs(A).max(axis=(0, 2))                      # (D,)
    for k in (1, 2, 3):
        np.testing.assert_array_equal(tc[f"explain_{k}"], ta[f"explain_{k}"])
        e = ta[f"explain_{k}_residual"]
        d = np.nan_to_num(ta[f"explain_{k}"]).astype(int) - 1
        close(f"explain_{k}_residual", tol * (2 * e + 2 * np.sqrt(e) * a_max[d] / 0.3))
    # Counts of reference rows at most as likely: equal unless a reference log p lies within
    # rounding of a row's (probability ~ rows x draws x tol / spread, about 1e-8 here).
    for name in ("n_observed", "top_region", "pvalue", "pvalue_lower", "pvalue_upper"):
        np.testing.assert_array_equal(tc[name], ta[name], err_msg=name)


@pytest.mark.parametrize("options, fragments, code", [
    (["--alpha", "0.05", "--contamination", "0.1"], ["--alpha", "--contamination"], 2),    # the command line alone
    (["--alpha", "0.001", "--samples", "100"], ["--samples", "smallest p-value"], 2),
    (["--samples", "100"], ["--pvalues"], 2),
    (["--explain", "5"], ["--explain", "4"], 1),                 # DATA has 3 columns: seen once it is read
])
def test_score_bad_options(files, options, fragments, code):
    out = files["dir"] / "s.csv"
    assert_one_line_error(run("score", files["model"], files["data"], "-o", out, *options), *fragments, code=code)
    assert not out.exists()


@pytest.mark.parametrize("options, fragments", [
    (["--alpha", "1.5"], ["--alpha", "0<x<1"]),
    (["--alpha", "0"], ["--alpha"]),
    (["--alpha", "nan"], ["--alpha"]),
    (["--pvalues", "--samples", "0"], ["--samples", "x>=1"]),
    (["--explain", "0"], ["--explain"]),
])
def test_score_option_values_out_of_range_are_usage_errors(files, options, fragments):
    """A bad option value exits 2 (README: Exit codes), as click's own range checks do."""
    out = files["dir"] / "s.csv"
    res = run("score", files["model"], files["data"], "-o", out, *options)
    err = res.stderr.strip()
    assert res.exit_code == 2 and err.startswith("Error:") and "\n" not in err, (res.exit_code, err)
    assert all(f.lower() in err.lower() for f in fragments), err
    assert not out.exists()


def test_a_region_whose_mass_underflows_gives_no_nan():
    """A far thin wedge (two nearly opposite facets, vertex ~1e8 away, met when scoring a
    far outlier): its mass underflows to exp(-inf) and its moments must stay finite,
    else the whole row's log-likelihood and posterior mean become NaN."""
    from cpadgn.polytope import polytope_moments
    A = np.array([[[0.00063434, -0.00164125], [-0.00029247, 0.00075677]]])
    b = np.array([[6.37405168, -7.4531028]])
    res = polytope_moments(A, b)
    assert res.log_mass[0] == -np.inf
    assert np.isfinite(res.mean).all() and np.isfinite(res.cov).all()


def test_rows_with_nothing_observed_have_no_pvalue(model1):
    X = model1.sample(10, seed=2)
    X[3] = np.nan
    pv = pvalues(model1, model1.log_prob(X), 200, seed=1, observed=~np.isnan(X))
    assert np.isnan(pv.pvalue[3]) and np.isnan(pv.lower[3]) and np.isnan(pv.upper[3])
    others = np.delete(np.arange(10), 3)
    # The same draws decide the other rows (equal unless a reference log p lies within
    # rounding of a row's: probability ~ rows x draws x 1e-12).
    ref = pvalues(model1, model1.log_prob(X[others]), 200, seed=1)
    np.testing.assert_array_equal(pv.pvalue[others], ref.pvalue)


def test_pvalues_match_an_independent_monte_carlo_oracle_with_a_general_prior():
    """p(x) = P[log p(Y) <= log p(x)] with Y drawn here by hand (z = m + s u through the
    generator's layers, diagonal noise), not by the model's sampler: a prior ignored or
    misapplied in the reference draws moves the reference distribution (two-sample KS at
    level 1e-3) and p by binomial standard errors.  Rows span p from ~0 to ~1."""
    net = random_net(1, (6, 6), 3, seed=11, slope=0.1, scale=2.0)
    mean, sd, noise = 0.7, 1.5, np.array([0.2, 0.5, 0.3])
    model = CPAModel(net, prior_mean=[mean], prior_cov=[[sd * sd]], noise_std=noise, device="cpu")
    rng = np.random.default_rng(17)

    def draw(n):
        h = mean + sd * rng.standard_normal((n, 1))
        for i, (W, b) in enumerate(zip(net.weights, net.biases)):
            h = h @ np.asarray(W).T + np.asarray(b)
            if i < len(net.weights) - 1:
                h = np.where(h > 0, h, net.slopes[i] * h)
        return h + noise * rng.standard_normal(h.shape)

    X = draw(12)
    M, M_oracle = 5000, 20000
    pv = pvalues(model, model.log_prob(X), M, seed=5)
    reference = np.sort(model.log_prob(draw(M_oracle)))
    assert stats.ks_2samp(pv.reference_log_prob[0], reference).pvalue > 1e-3
    p = np.searchsorted(reference, model.log_prob(X), side="right") / M_oracle
    assert p.min() < 0.2 and p.max() > 0.8
    # both are binomial proportions of the same p (pvalue adds (1 - p) / (M + 1)); 5 sigma
    se = np.sqrt(p * (1 - p) * (1 / M + 1 / M_oracle)) + 1 / (M + 1)
    assert np.all(np.abs(pv.pvalue - p) <= 5 * se + 1 / M_oracle)
