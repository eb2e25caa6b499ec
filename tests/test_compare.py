"""cpadgn compare: the statistics against direct computations and a bootstrap, the PPCA
baseline against scipy's Gaussian, the exact ELBO against quadrature and Monte Carlo,
and the command line (tables, reports, determinism, refusals)."""
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.stats import multivariate_normal, norm

import cpadgn
from cpadgn.comparison import (NO_DIFFERENCE, information_criteria, mean_and_se, paired_difference,
                            vuong_test)
from cpadgn.errors import CpadgnError
from cpadgn.model import CPAModel
from cpadgn.modelfile import save_model
from cpadgn.network import PiecewiseAffineNet
from cpadgn.ppca import fit_ppca, ppca_parameters
from cpadgn.vae import GaussianVAE, exact_elbo, expected_sq_error, model_encoder

from oracles import GL_W, GL_X, forward_rounding_tol, line_breakpoints, random_net

EPS = np.finfo(float).eps


def perturbed(net, scale, seed):
    rng = np.random.default_rng(seed)
    return PiecewiseAffineNet.from_arrays([W + scale * rng.normal(size=W.shape) for W in net.weights],
                                          net.biases, net.slopes)


@pytest.fixture(scope="module")
def setup():
    """Generator A (S = 1, D = 3), a perturbed B, data drawn from A."""
    netA = random_net(1, (8, 8), 3, seed=3, slope=0.1, scale=2.0)
    A = CPAModel(netA, noise_std=0.3, device="cpu")
    B = CPAModel(perturbed(netA, 0.15, seed=1), noise_std=0.3, device="cpu")
    X_test, X_train = A.sample(400, seed=1), A.sample(300, seed=2)
    res = cpadgn.compare({"A": A, "B": B}, X_test, X_train, baseline="ppca:2")
    return A, B, X_test, X_train, res


# ================================================================ statistics
def test_standard_errors_agree_with_bootstrap(setup):
    A, B, X, _, res = setup
    rng = np.random.default_rng(0)
    la, lb = res.log_likelihoods["A"], res.log_likelihoods["B"]
    idx = rng.integers(0, la.size, size=(4000, la.size))
    boot_a = la[idx].mean(1).std(ddof=1)
    boot_d = (la - lb)[idx].mean(1).std(ddof=1)
    se_a = res.model("A").mean_log_likelihood_se
    se_d = res.pair("A", "B").se
    assert abs(boot_a / se_a - 1) < 0.10
    assert abs(boot_d / se_d - 1) < 0.10
    assert se_a == pytest.approx(la.std(ddof=1) / np.sqrt(la.size), rel=1e-12)


def test_vuong_matches_direct_computation(setup):
    *_, res = setup
    for p in res.pairs:
        d = res.log_likelihoods[p.model_a] - res.log_likelihoods[p.model_b]
        z = np.sqrt(d.size) * d.mean() / d.std(ddof=1)
        assert p.vuong_z == pytest.approx(z, rel=1e-12)
        assert p.p_value == pytest.approx(2 * norm.sf(abs(z)), rel=1e-9, abs=1e-300)
        assert p.mean_difference == pytest.approx(d.mean(), rel=1e-12)
        half = 1.959963984540054 * d.std(ddof=1) / np.sqrt(d.size)
        assert (p.ci_low, p.ci_high) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-12)


def test_true_generator_is_preferred_and_itself_gives_no_difference(setup):
    A, B, X, X_train, res = setup
    assert [m.name for m in res.models][0] == "A"
    assert res.pair("A", "B").preferred == "A"
    assert res.pair("A", "B").p_value < 0.05
    same = cpadgn.compare({"A": A, "A again": A}, X)
    p = same.pairs[0]
    assert p.preferred == NO_DIFFERENCE
    assert (p.vuong_z, p.p_value, p.se, p.mean_difference) == (0.0, 1.0, 0.0, 0.0)
    # the same object twice in a list is kept, named apart
    twice = cpadgn.compare([A, A], X)
    assert [m.name for m in twice.models] == ["model_1", "model_2"]


def test_one_distribution_in_two_parametrisations_gives_no_verdict():
    """PPCA's W and W R (R a rotation) define the same Gaussian, N(b, W W^T + s^2 I) exactly, so
    the true difference is 0; the computed rows differ by rounding only (~1e-14 nats), which
    before gave z = 15.5, p = 2e-54, "A better" on these 2,000 rows."""
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(6, 2)), rng.normal(size=6)
    R = np.array([[np.cos(0.7), -np.sin(0.7)], [np.sin(0.7), np.cos(0.7)]])
    A = CPAModel(PiecewiseAffineNet.from_arrays([W], [b], []), noise_std=0.3, device="cpu")
    B = CPAModel(PiecewiseAffineNet.from_arrays([W @ R], [b], []), noise_std=0.3, device="cpu")
    # the oracle: one covariance, up to rounding: W R (2 terms a sum, 2 eps), its Gram matrix
    # (2 x 2 eps + 2 eps), W W^T (2 eps) and R R^T - I (cos^2 + sin^2 rounded, 2 eps), each
    # relative to M M^T with M = |W| |R|
    M = np.abs(W) @ np.abs(R)
    np.testing.assert_allclose((W @ R) @ (W @ R).T, W @ W.T, rtol=0, atol=10 * EPS * (M @ M.T).max())
    res = cpadgn.compare({"A": A, "B": B}, A.sample(2000, seed=1))
    p = res.pairs[0]
    assert p.preferred == NO_DIFFERENCE
    assert abs(p.mean_difference) <= p.numerical_resolution < 1e-10
    assert any("numerical resolution" in n for n in res.notes) or p.p_value >= 0.05


def test_pure_statistics_edge_cases():
    assert vuong_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == (0.0, 1.0)
    st = paired_difference([0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0])
    assert st.mean_difference == 1.5 and st.vuong_z > 0
    assert mean_and_se([1.0, 3.0]) == (2.0, 1.0)
    with pytest.raises(CpadgnError):
        mean_and_se([1.0])
    aic, bic = information_criteria(-100.0, 7, 50)
    assert aic == 2 * 7 + 200 and bic == pytest.approx(7 * np.log(50) + 200)


def test_aic_bic_from_exact_training_likelihood(setup):
    A, _, _, X_train, res = setup
    row = res.model("A")
    # k counted here from the architecture S = 1 -> 8 -> 8 -> D = 3 with fixed slopes:
    # weights 1*8 + 8*8 + 8*3, biases 8 + 8 + 3, one isotropic noise variance.
    assert row.n_parameters == (8 + 64 + 24) + (8 + 8 + 3) + 1
    ll = A.log_prob(X_train).sum()
    assert row.train_log_likelihood == pytest.approx(ll, rel=1e-12)
    assert row.aic == pytest.approx(2 * A.n_parameters - 2 * ll, rel=1e-12)
    assert row.bic == pytest.approx(A.n_parameters * np.log(X_train.shape[0]) - 2 * ll, rel=1e-12)


# ================================================================ PPCA baseline
def test_ppca_baseline_equals_closed_form_likelihood(setup):
    _, _, X_test, X_train, res = setup
    K = 2
    # closed form written independently: SVD of the centred data
    mu = X_train.mean(0)
    _, s, Vt = np.linalg.svd(X_train - mu, full_matrices=False)
    lam = s ** 2 / X_train.shape[0]
    s2 = lam[K:].mean()
    W = Vt[:K].T * np.sqrt(lam[:K] - s2)
    want = multivariate_normal(mu, W @ W.T + s2 * np.eye(mu.size)).logpdf(X_test)
    got = res.log_likelihoods["ppca:2"]
    assert np.max(np.abs(got - want)) < 1e-10
    row = res.model("ppca:2")
    assert row.kind == "ppca" and row.n_regions == 1 and row.latent_dim == 2
    W2, mu2, s22 = ppca_parameters(X_train, K)
    # Both routes are backward stable: each is the exact eigensystem of the covariance
    # perturbed by E: forming the covariance costs gamma_N |X_c|^2 / N = gamma_N lam.sum()
    # (Higham 3.5), the eigensolver or SVD a further O(D eps |C|); 4 N eps lam.sum()
    # bounds both for N >= D.  The eigenvalues move by at most |E| (Weyl) and the
    # K-dimensional eigenspace turns by at most |E| / gap (Davis-Kahan), so
    # W W' = sum_k (lam_k - s2) v_k v_k' moves by at most |E| (2 + 2 lam_0 / gap);
    # both routes err, hence twice that.
    eps = np.finfo(float).eps
    E = X_train.shape[0] * eps * lam.sum() * 4
    np.testing.assert_allclose(W2 @ W2.T, W @ W.T, rtol=0, atol=2 * E * (2 + 2 * lam[0] / (lam[K - 1] - lam[K])))
    assert abs(s22 - s2) <= 2 * E


def test_ppca_is_the_maximum_likelihood_fit():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
    W, mu, s2 = ppca_parameters(X, 2)
    ll = lambda W, mu, s2: multivariate_normal(mu, W @ W.T + s2 * np.eye(5)).logpdf(X).sum()
    best = ll(W, mu, s2)
    for _ in range(5):
        assert ll(W + 0.01 * rng.normal(size=W.shape), mu, s2) < best
        assert ll(W, mu, s2 * (1 + 0.01 * rng.normal())) < best
    model = fit_ppca(X, 2)
    assert model.partition().n_regions == 1
    assert model.log_prob(X).sum() == pytest.approx(best, rel=1e-12)
    with pytest.raises(CpadgnError, match="between 1 and D - 1"):
        ppca_parameters(X, 5)
    X[3, 1] = np.nan        # the closed form needs complete rows; EM fits PPCA with them
    with pytest.raises(CpadgnError, match=r"complete training rows .*cpadgn fit TRAIN -o ppca.h5 -S 2 "
                                          r"--hidden none\) and compare that file as a model"):
        ppca_parameters(X, 2)


def test_ppca_of_wide_data_skips_the_d_by_d_covariance(monkeypatch):
    """Fewer rows than columns (30 x 5,000: fit's PPCA start took 77 s and 1.2 GB, nearly all
    of it the eigh of the 5,000 x 5,000 covariance) are fitted from the thin SVD of the rows,
    never forming that matrix; the result is the closed form from the covariance's own eigh,
    written here, to the rounding bound derived in the test above (with max(N, D) for the
    D x D eigensolver's O(D eps |C|)), and still the maximum-likelihood fit."""
    rng = np.random.default_rng(11)
    N, D, K = 12, 300, 2
    X = rng.normal(size=(N, 3)) @ (rng.normal(size=(3, D)) * [[3.0], [2.0], [1.0]]) + 0.1 * rng.normal(size=(N, D))
    Xc = X - X.mean(0)
    C = Xc.T @ Xc / N
    lam, U = np.linalg.eigh(C)
    lam, U = lam[::-1], U[:, ::-1]
    s2 = (np.trace(C) - lam[:K].sum()) / (D - K)
    W = U[:, :K] * np.sqrt(lam[:K] - s2)
    eigh = np.linalg.eigh

    def small_eigh(a, *args, **kwargs):
        assert np.shape(a)[-1] < D, "PPCA formed the D x D covariance of wide data"
        return eigh(a, *args, **kwargs)
    monkeypatch.setattr(np.linalg, "eigh", small_eigh)
    W2, mu2, s22 = ppca_parameters(X, K)
    E = 4 * max(N, D) * np.finfo(float).eps * lam.sum()
    np.testing.assert_allclose(W2 @ W2.T, W @ W.T, rtol=0, atol=2 * E * (2 + 2 * lam[0] / (lam[K - 1] - lam[K])))
    assert abs(s22 - s2) <= 2 * E and np.array_equal(mu2, X.mean(0))
    ll = lambda W, s2: multivariate_normal(mu2, W @ W.T + s2 * np.eye(D)).logpdf(X).sum()
    best = ll(W2, s22)
    for _ in range(3):
        assert ll(W2 + 0.01 * rng.normal(size=W2.shape), s22) < best
        assert ll(W2, s22 * (1 + 0.01 * rng.normal())) < best
    with pytest.raises(CpadgnError, match=r"3 rows span at most 2 direction"):
        ppca_parameters(X[:3], 2)                 # N <= K + 1 still named, on the SVD route


def test_baseline_needs_training_data(setup):
    A, _, X, _, _ = setup
    with pytest.raises(CpadgnError, match="X_train"):
        cpadgn.compare([A], X, baseline="ppca")
    with pytest.raises(CpadgnError, match="unknown baseline"):
        cpadgn.compare([A], X, X, baseline="pca")


# ================================================================ the exact ELBO
def quadrature_sq_error(net, x, sigma, m, s):
    """E ||x - g(z)||^2 / sigma^2 for z ~ N(m, s^2), S = 1, by piecewise Gauss-Legendre."""
    lo, hi = m - 15 * s, m + 15 * s
    br = line_breakpoints(lambda t: net.preactivations(t[:, None]), lo, hi)
    edges = np.union1d(np.concatenate([[lo, hi], br]), np.linspace(lo, hi, 201))
    a, b = edges[:-1, None], edges[1:, None]
    t = (0.5 * (b - a) * GL_X + 0.5 * (a + b)).ravel()
    w = (0.5 * (b - a) * GL_W).ravel()
    f = ((x - net.forward(t[:, None])) ** 2).sum(1) / sigma ** 2
    return (w * norm.pdf(t, m, s) * f).sum()


@pytest.mark.parametrize("width", [(0.2, 2.0), (0.01, 0.05)])
def test_expected_sq_error_matches_quadrature(setup, width):
    A, _, X, _, _ = setup
    rng = np.random.default_rng(0)
    m = rng.normal(size=(6, 1))
    C = rng.uniform(*width, size=(6, 1, 1))
    val, bound, se, mass = expected_sq_error(A.net, A.partition(), 0.3, X[:6], m, C)
    for n in range(6):
        want = quadrature_sq_error(A.net, X[n], 0.3, m[n, 0], C[n, 0, 0])
        assert abs(val[n] - want) <= 1e-10 * want + bound[n] + 1e-9
    assert np.all(bound < 1e-8) and np.all(se == 0)
    # the S = 1 interval masses are differences of normal cdfs, each within a few eps of
    # its value, summed over the regions; skipped pairs carry < exp(-60) each
    n_regions = A.partition().n_regions
    np.testing.assert_allclose(mass, 1.0, rtol=0, atol=8 * n_regions * np.finfo(float).eps)


def test_elbo_gap_is_zero_when_q_is_the_exact_posterior():
    """A linear generator's posterior is Gaussian: with q equal to it, ELBO = log p."""
    rng = np.random.default_rng(2)
    S, D = 2, 5
    net = PiecewiseAffineNet.from_arrays([rng.normal(size=(D, S))], [rng.normal(size=D)], [])
    model = CPAModel(net, noise_std=0.5, device="cpu")
    X = model.sample(20, seed=3)
    post = model.posterior(X)
    C = np.linalg.cholesky(post.z_cov)
    quad, bound, _, _ = expected_sq_error(model.net, model.partition(), 0.5, X, post.z_mean, C)
    ell = -0.5 * (D * np.log(2 * np.pi) + D * np.log(0.25) + quad)
    kl = 0.5 * (np.einsum("nii->n", post.z_cov) + (post.z_mean ** 2).sum(1) - S
                - np.linalg.slogdet(post.z_cov)[1])
    np.testing.assert_allclose(ell - kl, post.log_likelihood, atol=1e-9)


@pytest.fixture(scope="module")
def vae_model():
    """An (untrained) GaussianVAE's decoder and encoder as a CPAModel, D = 3, S = 1."""
    import torch
    torch.manual_seed(0)
    vae = GaussianVAE(3, 1, [8, 8], slope=0.1, noise="iso").double()
    model = CPAModel(vae.generator(), noise_std=0.4, device="cpu")
    model.extra = {"attrs": {"activations": ["leaky_relu:0.1"] * 2},
                   "groups": {"encoder": vae.encoder_arrays()}}
    return vae, model


def test_encoder_rebuilt_from_file_group_matches_the_vae(vae_model):
    import torch
    vae, model = vae_model
    X = np.random.default_rng(0).normal(size=(10, 3))
    enc = model_encoder(model)
    m, logv = enc(X)
    with torch.no_grad():
        mt, lt = vae.encode(torch.as_tensor(X))
    arrays = vae.encoder_arrays()
    n_layers = len(arrays) // 2
    as_net = PiecewiseAffineNet.from_arrays([arrays[f"weight_{i}"] for i in range(n_layers)],
                                            [arrays[f"bias_{i}"] for i in range(n_layers)],
                                            [0.1] * (n_layers - 1))
    tol = forward_rounding_tol(as_net, X)                  # (N, 2S): the means, then log-variances
    np.testing.assert_array_less(np.abs(m - mt.numpy()), tol[:, :1] + 1e-300)
    np.testing.assert_array_less(np.abs(logv - lt.numpy()), tol[:, 1:] + 1e-300)


def test_exact_elbo_is_below_log_p_and_matches_monte_carlo(vae_model):
    vae, model = vae_model
    X = model.sample(40, seed=4)
    res = exact_elbo(model, X)
    ll = model.log_prob(X)
    gap = ll - res.elbo
    assert np.all(gap >= 0)
    assert np.all(res.error_bound < 1e-8)
    # Monte Carlo check of E_q[log p(x|z)] on a few rows
    rng = np.random.default_rng(1)
    m, logv = model_encoder(model)(X[:5])
    z = m[:, None, :] + np.exp(0.5 * logv)[:, None, :] * rng.standard_normal((5, 100_000, 1))
    g = model.net.forward(z.reshape(-1, 1)).reshape(5, 100_000, 3)
    lp = (-0.5 * ((X[:5, None] - g) ** 2 / 0.16 + np.log(2 * np.pi * 0.16))).sum(-1)
    est, se = lp.mean(1), lp.std(1) / np.sqrt(lp.shape[1])
    assert np.all(np.abs(res.expected_log_lik[:5] - est) < 5 * se)


def test_compare_reports_elbo_and_gap(vae_model):
    _, model = vae_model
    X = model.sample(100, seed=5)
    res = cpadgn.compare({"vae": model}, X)
    row = res.model("vae")
    assert row.kind == "vae"
    assert row.mean_gap >= 0 and row.mean_gap_se > 0
    assert row.mean_elbo == pytest.approx(res.elbos["vae"].mean())
    assert row.mean_elbo + row.mean_gap == pytest.approx(row.mean_log_likelihood)
    Xn = X.copy()
    Xn[0, 1] = np.nan
    res = cpadgn.compare({"vae": model}, Xn)
    assert res.model("vae").mean_elbo is None and "missing" in res.notes[0]
    with pytest.raises(CpadgnError, match="complete rows"):
        exact_elbo(model, Xn)


def test_dimension_mismatch_is_refused(setup):
    A, _, X, _, _ = setup
    other = CPAModel(random_net(1, (4,), 4, seed=0), noise_std=0.3, device="cpu")
    with pytest.raises(CpadgnError, match="different data dimensions"):
        cpadgn.compare({"A": A, "other": other}, X)
    with pytest.raises(CpadgnError, match="3 columns but the models output D=4"):
        cpadgn.compare([other], X)


# ================================================================ command line
@pytest.fixture(scope="module")
def files(tmp_path_factory, setup, vae_model):
    A, B, X_test, X_train, _ = setup
    vae, vm = vae_model
    d = tmp_path_factory.mktemp("compare")
    save_model(d / "a.h5", A.net, noise_std=0.3)
    save_model(d / "b.h5", B.net, noise_std=0.3)
    save_model(d / "vae.h5", vae.generator(), noise_std=0.4,
               attrs={"activations": ["leaky_relu:0.1"] * 2}, groups={"encoder": vae.encoder_arrays()})
    save_model(d / "d4.h5", random_net(1, (4,), 4, seed=0), noise_std=0.3)
    np.savetxt(d / "test.csv", X_test, delimiter=",")
    np.savetxt(d / "train.csv", X_train, delimiter=",")
    return d


def run(args):
    from cli.main import main
    return CliRunner().invoke(main, ["compare", *map(str, args)])


def test_cli_tables_reports_and_determinism(files):
    d = files
    args = [d / "a.h5", d / "b.h5", d / "vae.h5", "--data", d / "test.csv", "--train", d / "train.csv",
            "--baseline", "ppca", "--device", "cpu"]
    r = run(args + ["-o", d / "r1.json"])
    assert r.exit_code == 0, r.output
    # the tables name the models by file stem (all three are .h5) and the better one as A or B
    assert "better" in r.output and "ppca:1" in r.output and re.search(r"^vae +vae ", r.output, re.M)
    r2 = run(args + ["-o", d / "r2.json", "--json"])
    assert r2.exit_code == 0, r2.output
    assert (d / "r1.json").read_bytes() == (d / "r2.json").read_bytes()
    assert r2.stdout == (d / "r1.json").read_text()
    rep = json.loads(r2.stdout)
    names = [m["name"] for m in rep["models"]]
    assert names[0].endswith("a.h5")
    assert len(rep["pairs"]) == 6 and "seconds" not in rep["models"][0]
    vrow = next(m for m in rep["models"] if m["name"].endswith("vae.h5"))
    assert vrow["kind"] == "vae" and vrow["mean_gap"] >= 0
    pair = next(p for p in rep["pairs"] if p["model_a"].endswith("a.h5") and p["model_b"].endswith("b.h5"))
    assert pair["preferred"].endswith("a.h5")
    # CSV: model rows then pair rows, the same numbers
    r3 = run(args + ["-o", d / "r.csv", "-q"])
    assert r3.exit_code == 0, r3.output
    lines = (d / "r.csv").read_text().splitlines()
    assert lines[0].startswith("table,rank,name")
    assert [ln.split(",")[0] for ln in lines[1:]] == ["model"] * 4 + ["pair"] * 6
    first = dict(zip(lines[0].split(","), lines[1].split(",")))
    assert float(first["mean_log_likelihood"]) == rep["models"][0]["mean_log_likelihood"]


def test_cli_plot(files, monkeypatch):
    d = files
    args = [d / "a.h5", d / "b.h5", "--data", d / "test.csv", "--device", "cpu", "-q"]
    import matplotlib  # noqa: F401  (in the test extra, so that the plot branch always runs)
    r = run(args + ["--plot", d / "p.png"])
    assert r.exit_code == 0, r.output
    assert (d / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # .pdf and .svg as for every other picture (they were refused: '--plot writes a .png file')
    for suffix, head in [(".pdf", b"%PDF"), (".svg", b"<svg")]:
        r = run(args + ["--plot", d / f"p{suffix}"])
        assert r.exit_code == 0, r.output
        assert head in (d / f"p{suffix}").read_bytes()[:400]
    r = run(args + ["--plot", d / "p.jpg"])
    assert r.exit_code == 2 and ".png, .pdf, .svg" in r.output and not (d / "p.jpg").exists()   # usage error
    assert len(r.output.strip().splitlines()) == 1
    # one model: its histogram, titled without 'against the others'
    r = run([d / "a.h5", "--data", d / "test.csv", "--device", "cpu", "-q", "--plot", d / "one.svg"])
    assert r.exit_code == 0, r.output
    svg = (d / "one.svg").read_text()
    assert "Exact held-out log-likelihood: a (" in svg and "against the others" not in svg
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    r = run(args + ["--plot", d / "p2.png"])
    assert r.exit_code == 1 and "pip install 'cpadgn[plot]'" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not (d / "p2.png").exists()


@pytest.mark.parametrize("extra, message, code", [
    (["d4.h5"], "different data dimensions", 1),                         # seen in the model files
    ([], "--baseline ppca is fitted on training data", 2),               # the command line alone
])
def test_cli_refusals_are_one_line(files, extra, message, code):
    d = files
    args = [d / "a.h5", *[d / e for e in extra], "--data", d / "test.csv", "--device", "cpu"]
    if not extra:
        args += ["--baseline", "ppca"]
    r = run(args)
    assert r.exit_code == code
    assert message in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_dataset_applies_to_the_h5_files_only(files):
    """--dataset names the key inside the .h5 file among --data and --train: a .npy test
    file beside an .h5 training file (it was refused as 'a .npy file; drop --dataset')
    gives the report of the same rows as CSV; with no .h5 file it is refused."""
    import h5py
    d = files
    np.save(d / "test.npy", np.loadtxt(d / "test.csv", delimiter=","))
    with h5py.File(d / "train_rows.h5", "w") as f:
        f["rows"] = np.loadtxt(d / "train.csv", delimiter=",")
        f["other"] = np.zeros((3, 3))
    common = [d / "a.h5", "--baseline", "ppca", "--device", "cpu", "--json"]
    mixed = run(common + ["--data", d / "test.npy", "--train", d / "train_rows.h5", "--dataset", "rows"])
    plain = run(common + ["--data", d / "test.csv", "--train", d / "train.csv"])
    assert mixed.exit_code == 0 and plain.exit_code == 0, mixed.output
    strip = lambda out: [{k: v for k, v in m.items() if k != "seconds"} for m in json.loads(out)["models"]]
    assert strip(mixed.stdout) == strip(plain.stdout)
    refused = run([d / "a.h5", "--data", d / "test.npy", "--dataset", "rows", "--device", "cpu"])
    assert refused.exit_code == 1 and "drop --dataset" in refused.output
    assert len(refused.output.strip().splitlines()) == 1


def test_cli_data_dimension_mismatch(files):
    d = files
    r = run([d / "d4.h5", "--data", d / "test.csv", "--device", "cpu"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        f"Error: --data {d / 'test.csv'} has 3 columns but the models output D=4; pass data with 4 columns"]


def test_cli_warns_of_test_rows_on_another_scale_per_model(files, tmp_path):
    """Test rows left unstandardised (column 2 times 300) are refused by nothing and were
    compared in silence; each model now gets score's scale warning, naming the header's
    column.  The models' own rows stay silent."""
    d = files
    X = np.loadtxt(d / "test.csv", delimiter=",")
    raw = tmp_path / "raw.csv"
    np.savetxt(raw, X * [1, 300, 1], delimiter=",", header="u,v,w", comments="")
    r = run([d / "a.h5", d / "b.h5", "--data", raw, "--device", "cpu"])
    assert r.exit_code == 0, r.output
    for m in ("a.h5", "b.h5"):
        assert f"Warning: {d / m}: column 2 ('v') of --data {raw} is" in r.stderr, r.stderr
    r = run([d / "a.h5", d / "b.h5", "--data", d / "test.csv", "--device", "cpu"])
    assert r.exit_code == 0 and "Warning" not in r.stderr, r.stderr


def test_cli_bad_report_suffix(files):
    d = files
    r = run([d / "a.h5", "--data", d / "test.csv", "-o", d / "r.txt"])
    assert r.exit_code == 2 and ".json or .csv" in r.output     # a usage error: the command line alone


def test_expected_sq_error_s2_matches_monte_carlo():
    """S = 2 (exact polygon integrals): against Monte Carlo, and the q-masses sum to 1."""
    net = random_net(2, (12, 12), 4, seed=7, slope=0.1, scale=1.5)
    model = CPAModel(net, noise_std=0.5, device="cpu")
    X = model.sample(4, seed=0)
    rng = np.random.default_rng(3)
    m = rng.normal(size=(4, 2))
    L = np.tril(rng.normal(size=(4, 2, 2)) * 0.3)
    L[:, [0, 1], [0, 1]] = np.abs(L[:, [0, 1], [0, 1]]) + 0.2
    val, bound, se, mass = expected_sq_error(model.net, model.partition(), 0.5, X, m, L)
    np.testing.assert_allclose(mass, 1.0, atol=1e-9)
    assert np.all(bound < 1e-8) and np.all(se == 0)
    u = rng.standard_normal((200_000, 2))
    for n in range(4):
        z = m[n] + u @ L[n].T
        f = ((X[n] - net.forward(z)) ** 2).sum(1) / 0.25
        assert abs(val[n] - f.mean()) < 5 * f.std() / np.sqrt(f.size)


def test_elbo_gap_nonnegative_s2():
    import torch
    torch.manual_seed(1)
    vae = GaussianVAE(4, 2, [10, 10], slope=0.1, noise="iso").double()
    model = CPAModel(vae.generator(), noise_std=0.5, device="cpu")
    model.extra = {"attrs": {}, "groups": {"encoder": vae.encoder_arrays()}}
    X = model.sample(30, seed=2)
    res = exact_elbo(model, X)
    assert np.all(model.log_prob(X) - res.elbo >= 0)
    np.testing.assert_allclose(res.mass, 1.0, atol=1e-9)


def test_rows_with_nothing_observed_are_left_out_with_a_note(setup):
    A, B, X_test, X_train, _ = setup
    X = X_test[:30].copy()
    X[[3, 17]] = np.nan
    res = cpadgn.compare({"A": A, "B": B}, X)
    keep = np.ones(30, bool)
    keep[[3, 17]] = False
    ref = cpadgn.compare({"A": A, "B": B}, X_test[:30][keep])
    assert res.n_test == 28 and any("2 test row(s) have nothing observed" in n for n in res.notes)
    for name in ("A", "B"):
        assert np.isfinite(res.log_likelihoods[name]).all()
        np.testing.assert_array_equal(res.log_likelihoods[name], ref.log_likelihoods[name])
    with pytest.raises(CpadgnError, match="0 row"):
        cpadgn.compare({"A": A}, np.full((5, 3), np.nan))
    # training rows with nothing observed: no training log-likelihood, refused in one line
    # (it was log(0) in BIC: an internal error)
    with pytest.raises(CpadgnError, match="training data has no row with an observed entry"):
        cpadgn.compare({"A": A}, X_test[:5], np.full((4, 3), np.nan))


def test_cli_noise_once_per_model_matches_score_with_each(files):
    """--noise-std once per model: each model's mean is `cpadgn score`'s with that noise."""
    import csv as _csv
    from cli.main import main
    d = files
    noises = {"a.h5": 0.5, "b.h5": 0.2}
    r = run([d / "a.h5", d / "b.h5", "--data", d / "test.csv", "--device", "cpu", "--json",
             "--noise-std", noises["a.h5"], "--noise-std", noises["b.h5"]])
    assert r.exit_code == 0, r.output
    from pathlib import Path
    got = {Path(m["name"]).name: m["mean_log_likelihood"] for m in json.loads(r.stdout)["models"]}
    for name, s in noises.items():
        out = d / f"score-{name}.csv"
        rs = CliRunner().invoke(main, ["score", str(d / name), str(d / "test.csv"), "-o", str(out),
                                       "--noise-std", str(s), "--device", "cpu", "-q"])
        assert rs.exit_code == 0, rs.output
        with open(out) as f:
            ll = [float(row["log_likelihood"]) for row in _csv.DictReader(f)]
        # the same exact sums, averaged in another order: a few eps of |log p| ~ 10
        assert abs(got[name] - np.mean(ll)) < 1e-10
    r = run([d / "a.h5", d / "b.h5", "--data", d / "test.csv", "--device", "cpu",
             "--noise-std", 0.5, "--noise-std", 0.2, "--noise-std", 0.1])
    assert r.exit_code == 2 and "given 3 times for 2 models" in r.output      # usage errors

    r = run([d / "a.h5", d / "b.h5", "--data", d / "test.csv", "--device", "cpu",
             "--noise-std", 0.5, "--noise-std", "auto"])
    assert r.exit_code == 2 and "pass --train" in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_noise_auto_fits_on_train_per_model(files):
    d = files
    r = run([d / "a.h5", d / "b.h5", "--data", d / "test.csv", "--train", d / "train.csv",
             "--device", "cpu", "--json", "--noise-std", "auto", "--noise-std", 0.3])
    assert r.exit_code == 0, r.output
    from pathlib import Path
    got = {Path(m["name"]).name: m["mean_log_likelihood"] for m in json.loads(r.stdout)["models"]}
    noise = {Path(m["name"]).name: m["noise_std"] for m in json.loads(r.stdout)["models"]}
    from cpadgn.data import read_data
    from cpadgn.model import load
    X_train, X_test = read_data(d / "train.csv"), read_data(d / "test.csv")
    a = load(d / "a.h5", device="cpu")
    sigma = a.fit_noise_std(X_train)
    # the fit is a maximum: the exact training log-likelihood is lower 1% either side
    ll = lambda s: a.with_noise_std(s).log_prob(X_train).sum()
    assert ll(sigma) > max(ll(0.99 * sigma), ll(1.01 * sigma))
    # the report says which noise std each model was scored with (under --json the fitted
    # one was printed nowhere): the fitted one, and the one given
    assert noise["b.h5"] == 0.3 and noise["a.h5"] == pytest.approx(sigma, rel=1e-9)
    assert abs(got["a.h5"] - a.with_noise_std(sigma).log_prob(X_test).mean()) < 1e-9
    assert abs(got["b.h5"] - load(d / "b.h5", noise_std=0.3, device="cpu").log_prob(X_test).mean()) < 1e-10


def test_cli_memory_budget_reaches_the_models(files, monkeypatch):
    """--memory-budget, as score and impute take it, is the budget of every model's
    posterior (the training rows' too); 0 is refused in one line."""
    from cpadgn.model import CPAModel
    seen = []
    posterior = CPAModel.posterior
    monkeypatch.setattr(CPAModel, "posterior", lambda self, *a, **k: seen.append(self.memory_budget)
                        or posterior(self, *a, **k))
    d = files
    r = run([d / "a.h5", d / "b.h5", "--data", d / "test.csv", "--train", d / "train.csv", "--device", "cpu",
             "--memory-budget", "3e7", "--json"])
    assert r.exit_code == 0, r.output
    assert len(seen) >= 4 and set(seen) == {3e7}
    r = run([d / "a.h5", "--data", d / "test.csv", "--memory-budget", "0"])
    assert r.exit_code == 2 and "positive number of bytes" in r.output


def test_pairwise_note_is_one_line_below_a_narrow_table():
    """The note under the pairwise table is its own line: as a rich caption it wrapped at
    the table's width, 'no' / 'significant difference' on two lines (two short model names)."""
    from rich.console import Console
    from cli.compare import _table
    note = "better: preferred at the 5% level (n.s.: no significant difference)"
    out = Console(width=100, record=True)
    out.print(_table("Pairwise", ["A", "B", "mean d", "better"], [["res", "conv", "5.98", "A"]], note=note))
    lines = [ln.rstrip() for ln in out.export_text().splitlines()]
    assert note in lines and max(map(len, lines[:-1])) < len(note)


def test_a_fitted_estimator_is_compared_as_its_model():
    """compare({"det": fitted CPADGN}, X) said 'model 1 is a CPADGN, not a CPAModel', and a
    lone estimator (not in a list) raised "'CPADGN' object is not iterable".  Oracle: the
    closed-form Gaussian log-likelihood of the fitted linear generator."""
    X = np.random.default_rng(0).normal(size=(30, 3)) @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0, 0, 1]])
    det = cpadgn.CPADGN(latent_dim=1, hidden=(), max_iter=2).fit(X)
    net, sigma = det.model_.generator, float(det.model_.noise_std)
    A, b = net.weights[0], net.biases[0]
    want = multivariate_normal(A @ det.model_.prior_mean + b,
                               A @ det.model_.prior_cov @ A.T + sigma ** 2 * np.eye(3)).logpdf(X).mean()
    for models in ({"det": det}, det, [cpadgn.CPADGNDetector(latent_dim=1, hidden=(), max_iter=2).fit(X)]):
        res = cpadgn.compare(models, X)
        np.testing.assert_allclose(res.models[0].mean_log_likelihood, want, rtol=0, atol=1e-12)
    with pytest.raises(CpadgnError, match="model 1 is a int, not a CPAModel or a model path; pass CPAModel objects, "
                                          "fitted cpadgn estimators"):
        cpadgn.compare(3, X)


def test_cli_notes_are_part_of_the_tables_on_stdout(files, tmp_path):
    """The result's notes (here: rows with nothing observed, left out) went to stderr, also
    under -q, while the tables they qualify went to stdout: `compare ... -q > report.txt`
    lost them from the report and left stray text on stderr.  They follow the tables on
    stdout, as they are in the --json report's notes."""
    X = np.loadtxt(files / "test.csv", delimiter=",")[:12]
    X[3] = np.nan
    np.savetxt(tmp_path / "holes.csv", X, delimiter=",")
    for quiet in ([], ["-q"]):
        r = run([files / "a.h5", files / "b.h5", "--data", tmp_path / "holes.csv", "--device", "cpu", *quiet])
        assert r.exit_code == 0, r.output
        assert "note: 1 test row(s) have nothing observed" in r.stdout, r.stdout
        assert "note:" not in r.stderr and (not quiet or r.stderr == ""), r.stderr
