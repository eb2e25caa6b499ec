"""Audit of the statistics of `cpadgn score` (p-values, flags) and `cpadgn compare`
(paired differences, Vuong's z, intervals, AIC/BIC) against oracles that share no code
with them: data drawn from known models, closed forms of linear-Gaussian models
(log p, exact p-values chi2.sf, expected log-likelihood differences), and simulation
rates with their binomial standard errors.  Deterministic (fixed seeds).

    PYTHONPATH=. python benchmarks/audit_score_compare.py      # ~2 min on one core
"""
import math

import numpy as np
from scipy import stats

import cpadgn
from cpadgn.anomaly import alpha_threshold, pvalues
from cpadgn.model import CPAModel
from cpadgn.network import PiecewiseAffineNet

import sys
sys.path.insert(0, "tests")
from oracles import random_net  # noqa: E402


def linear(W, b, noise):
    return CPAModel(PiecewiseAffineNet.from_arrays([W], [b], []), noise_std=noise, device="cpu")


def gauss_logpdf(X, mu, C):
    """Closed-form log N(x_o; mu_o, C_oo) per row, NaN entries marginalised."""
    out = np.empty(len(X))
    for i, x in enumerate(X):
        o = ~np.isnan(x)
        out[i] = stats.multivariate_normal(mu[o], C[np.ix_(o, o)]).logpdf(x[o])
    return out


def cross_entropy(mu_t, C_t, mu, C):
    """-E_T[log N(x; mu, C)], x ~ N(mu_t, C_t)."""
    D = len(mu)
    Ci = np.linalg.inv(C)
    dm = mu_t - mu
    return 0.5 * (D * math.log(2 * math.pi) + np.linalg.slogdet(C)[1] + np.trace(Ci @ C_t) + dm @ Ci @ dm)


def binom_ok(rate, p, n, k=3.0):
    se = math.sqrt(p * (1 - p) / n)
    return abs(rate - p) <= k * se, se


def report(name, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    return ok


def audit_pvalues():
    rng = np.random.default_rng(0)
    D, S = 5, 2
    W, b = rng.normal(size=(D, S)), rng.normal(size=D)
    m = linear(W, b, 0.5)
    C = W @ W.T + 0.25 * np.eye(D)
    X = m.sample(3000, seed=11)
    M = 4000
    # missing entries in a third of the rows
    Xm = X.copy()
    Xm[rng.random(X.shape) < 0.2] = np.nan
    Xm[np.isnan(Xm).all(1), 0] = X[np.isnan(Xm).all(1), 0]
    allok = True
    for label, data in (("complete", X), ("20% missing", Xm)):
        ll = m.log_prob(data)
        err = np.abs(ll - gauss_logpdf(data, b, C)).max()
        pv = pvalues(m, ll, n_samples=M, seed=5, observed=~np.isnan(data))
        exact = np.empty(len(data))
        for i, x in enumerate(data):
            o = ~np.isnan(x)
            r = x[o] - b[o]
            exact[i] = stats.chi2.sf(r @ np.linalg.solve(C[np.ix_(o, o)], r), o.sum())
        # DKW: sup |F_M - F| <= eps with probability 1 - 1e-3 for each of the patterns' reference sets
        eps = math.sqrt(math.log(2 / 1e-3 * pv.n_patterns) / (2 * M))
        dev = np.abs(pv.count / M - exact).max()
        cover = np.mean((pv.lower <= exact) & (exact <= pv.upper))
        ks = stats.kstest(exact, "uniform").pvalue
        allok &= report(f"p-values ({label})", err < 1e-9 and dev <= eps and ks > 1e-3,
                        f"|log p - closed form| {err:.1e}; max |k/M - exact chi2 p| {dev:.4f} <= DKW {eps:.4f}; "
                        f"exact p of model rows KS p {ks:.2f}; CP 95% coverage of exact p {cover:.3f} "
                        f"({pv.n_patterns} patterns)")
    # fraction below alpha on fresh model rows, several independent reference sets
    for alpha in (0.05, 0.01):
        rates = []
        for seed in range(5):
            pv = pvalues(m, m.log_prob(m.sample(2000, seed=100 + seed)), n_samples=2000, seed=200 + seed)
            rates.append(np.mean(pv.pvalue < alpha))
        rate = float(np.mean(rates))
        ok, se = binom_ok(rate, alpha, 10000, 4.0)
        allok &= report(f"P(pvalue < {alpha}) on model rows", ok and rate <= alpha + 4 * se,
                        f"{rate:.4f} (binomial SE {se:.4f}, plus reference MC error)")
    thr = alpha_threshold(np.sort(m.log_prob(m.sample(2000, seed=9))), 0.05)
    pv = pvalues(m, m.log_prob(X), n_samples=2000, seed=9)
    allok &= report("alpha_threshold", np.array_equal(m.log_prob(X) < thr, pv.pvalue < 0.05),
                    "flags log p < threshold exactly when pvalue < alpha")
    shifted = X + 3.0 * np.sqrt(np.diag(C))
    pv = pvalues(m, m.log_prob(shifted), n_samples=2000, seed=3)
    allok &= report("shifted rows", np.median(pv.pvalue) < 0.01,
                    f"median p {np.median(pv.pvalue):.2g}, P(p < 0.05) {np.mean(pv.pvalue < 0.05):.3f}")
    # nonlinear S = 1: uniform p-values, reference much larger than the rows
    net = random_net(1, (8,), 4, seed=2, slope=0.1, scale=2.0)
    g = CPAModel(net, noise_std=0.3, device="cpu")
    Xg = g.sample(2000, seed=1)
    pv = pvalues(g, g.log_prob(Xg), n_samples=20000, seed=2)
    ks = stats.kstest(pv.pvalue, "uniform").pvalue
    ok, se = binom_ok(np.mean(pv.pvalue < 0.05), 0.05, 2000)
    allok &= report("p-values S = 1 network", ks > 1e-3 and ok,
                    f"KS p {ks:.2f}; P(p < 0.05) {np.mean(pv.pvalue < 0.05):.4f} (SE {se:.4f})")
    # contamination convention (score --contamination, PyOD-like): the stated fraction
    from cli.main import is_anomaly
    ll = g.log_prob(Xg)
    for q in (0.01, 0.05, 0.1):
        frac = is_anomaly(ll, q).mean()
        allok &= report(f"--contamination {q}", abs(frac - q) <= 1 / len(ll), f"flags {frac:.4f} of the rows")
    return allok


def audit_compare():
    rng = np.random.default_rng(1)
    D = 4
    allok = True
    # truth T, two wrong linear models A and B with different expected log-likelihoods
    Wt, bt = rng.normal(size=(D, 2)), rng.normal(size=D)
    T = linear(Wt, bt, 0.6)
    A = linear(Wt + 0.3 * rng.normal(size=(D, 2)), bt + 0.2, 0.6)
    B = linear(Wt[:, :1], bt, 0.8)
    Ct = Wt @ Wt.T + 0.36 * np.eye(D)
    cov = lambda m: m.net.weights[0] @ m.net.weights[0].T + np.diag(np.broadcast_to(m.noise_std ** 2, (D,)))
    true_diff = -cross_entropy(bt, Ct, A.net.biases[0], cov(A)) + cross_entropy(bt, Ct, B.net.biases[0], cov(B))
    N, R = 100, 400
    cover = 0
    zs = []
    for r in range(R):
        X = T.sample(N, seed=1000 + r)
        res = cpadgn.compare({"A": A, "B": B}, X)
        pr = res.pair("A", "B")
        sgn = 1.0 if pr.model_a == "A" else -1.0
        lo, hi = sorted((sgn * pr.ci_low, sgn * pr.ci_high))
        cover += lo <= true_diff <= hi
        zs.append(sgn * pr.vuong_z)
        if r == 0:   # everything recomputed from closed-form per-row log p
            la, lb = gauss_logpdf(X, A.net.biases[0], cov(A)), gauss_logpdf(X, B.net.biases[0], cov(B))
            d = la - lb
            se = d.std(ddof=1) / math.sqrt(N)
            z = d.mean() / se
            got = np.array([sgn * pr.mean_difference, pr.se, sgn * pr.vuong_z, pr.p_value])
            want = np.array([d.mean(), se, z, 2 * stats.norm.sf(abs(z))])
            allok &= report("pair statistics vs closed-form rows", np.allclose(got, want, rtol=1e-9, atol=1e-12),
                            f"mean d {want[0]:.6f}, SE {want[1]:.6f}, z {want[2]:.4f}, p {want[3]:.3g}; "
                            f"CI half-width / SE {(pr.ci_high - pr.ci_low) / 2 / pr.se:.6f}")
    rate = cover / R
    ok, se = binom_ok(rate, 0.95, R)
    allok &= report("95% interval covers the closed-form E_T[log p_A - log p_B]", ok,
                    f"true difference {true_diff:.4f} nats; coverage {rate:.3f} (SE {se:.3f}), N = {N}, {R} draws")
    # equal expected log-likelihood: truth N(0, I), A = N(0, diag(2,1,1,1)), B = N(0, diag(1,2,1,1))
    eye = np.eye(D)
    T0 = linear(np.zeros((D, 1)) + 1e-3 * eye[:, :1], np.zeros(D), 1.0)
    A0 = CPAModel(PiecewiseAffineNet.from_arrays([1e-3 * eye[:, :1]], [np.zeros(D)], []),
                  noise_std=np.array([2.0, 1, 1, 1]) ** 0.5, device="cpu")
    B0 = CPAModel(PiecewiseAffineNet.from_arrays([1e-3 * eye[:, 1:2]], [np.zeros(D)], []),
                  noise_std=np.array([1, 2.0, 1, 1]) ** 0.5, device="cpu")
    rej, ps = 0, []
    for r in range(R):
        X = T0.sample(N, seed=5000 + r)
        pr = cpadgn.compare({"A": A0, "B": B0}, X).pairs[0]
        rej += pr.preferred != cpadgn.comparison.NO_DIFFERENCE
        ps.append(pr.p_value)
    ok, se = binom_ok(rej / R, 0.05, R)
    ks = stats.kstest(ps, "uniform").pvalue
    allok &= report("equal models: rejection rate at 5%", ok and ks > 1e-3,
                    f"{rej / R:.3f} (SE {se:.3f}); KS of p-values against U(0,1): p {ks:.2f}")
    # an S = 1 network pair: skewed per-row differences, true difference from 200,000 rows
    net = random_net(1, (8,), 3, seed=3, slope=0.1, scale=2.0)
    r1 = np.random.default_rng(1)
    netB = PiecewiseAffineNet.from_arrays([W + 0.15 * r1.normal(size=W.shape) for W in net.weights],
                                          net.biases, net.slopes)
    Tn = CPAModel(net, noise_std=0.3, device="cpu")
    An, Bn = Tn.with_noise_std(0.25), CPAModel(netB, noise_std=0.35, device="cpu")
    big = Tn.sample(200000, seed=99)
    d = An.log_prob(big) - Bn.log_prob(big)
    true_n, se_n = d.mean(), d.std(ddof=1) / math.sqrt(d.size)
    for N_n, R_n, check in ((100, 300, False), (1000, 200, True)):
        cover = 0
        for r in range(R_n):
            pr = cpadgn.compare({"A": An, "B": Bn}, Tn.sample(N_n, seed=r)).pair("A", "B")
            sgn = 1.0 if pr.model_a == "A" else -1.0
            lo, hi = sorted((sgn * pr.ci_low, sgn * pr.ci_high))
            cover += lo <= true_n <= hi
        ok, se = binom_ok(cover / R_n, 0.95, R_n)
        allok &= report(f"S = 1 pair, {N_n} rows: 95% interval coverage", ok or not check,
                        f"{cover / R_n:.3f} (SE {se:.3f}){'' if check else ' (measured only)'}; true difference "
                        f"{true_n:.3f} +- {se_n:.3f}, per-row skewness {stats.skew(d):.1f}")
    # parameter counts, AIC and BIC against an independent count and closed-form training LL
    Xtr = T.sample(300, seed=7)
    net = random_net(1, (8, 5), D, seed=3)
    G_iso = CPAModel(net, noise_std=0.5, device="cpu")
    G_diag = CPAModel(net, noise_std=np.full(D, 0.5), device="cpu")
    res = cpadgn.compare({"A": A, "iso": G_iso, "diag": G_diag}, T.sample(50, seed=8), Xtr, baseline="ppca:2")
    count = {"A": D * 2 + D + 1, "iso": (1 * 8 + 8) + (8 * 5 + 5) + (5 * D + D) + 1,
             "diag": (1 * 8 + 8) + (8 * 5 + 5) + (5 * D + D) + D, "ppca:2": D * 2 + D + 1}
    got = {m.name: m.n_parameters for m in res.models}
    allok &= report("parameter counts (raw: weights, biases, noise stds)", got == count, str(got))
    llA = gauss_logpdf(Xtr, A.net.biases[0], cov(A)).sum()
    mA = res.model("A")
    allok &= report("AIC, BIC of A", np.allclose([mA.aic, mA.bic], [2 * count["A"] - 2 * llA,
                                                                     count["A"] * math.log(300) - 2 * llA], rtol=1e-10),
                    f"AIC {mA.aic:.4f}, BIC {mA.bic:.4f}")
    return allok


def audit_edges():
    rng = np.random.default_rng(2)
    D = 4
    allok = True
    W, b = rng.normal(size=(D, 2)), rng.normal(size=D)
    m = linear(W, b, 0.5)
    X = m.sample(200, seed=1)
    pr = cpadgn.compare([m, m], X).pairs[0]
    allok &= report("a model against itself", (pr.mean_difference, pr.se, pr.vuong_z, pr.p_value) == (0, 0, 0, 1)
                    and pr.preferred == cpadgn.comparison.NO_DIFFERENCE, str(pr))
    th = 0.7
    Rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    X2 = m.sample(2000, seed=2)
    res = cpadgn.compare({"A": m, "rotated": linear(W @ Rot, b, 0.5)}, X2)
    pr = res.pairs[0]
    allok &= report("one distribution, two parametrisations", pr.preferred == cpadgn.comparison.NO_DIFFERENCE,
                    f"mean d {pr.mean_difference:.2g}, z {pr.vuong_z:.1f}, p {pr.p_value:.2g}, "
                    f"resolution {pr.numerical_resolution:.2g}: {pr.preferred}")
    Xm = X.copy()
    Xm[rng.random(X.shape) < 0.3] = np.nan
    Xm[5] = np.nan
    other = linear(W * 1.2, b, 0.4)
    res = cpadgn.compare({"m": m, "o": other}, Xm)
    keep = ~np.isnan(Xm).all(1)
    C = lambda mm: mm.net.weights[0] @ mm.net.weights[0].T + mm.noise_std ** 2 * np.eye(D)
    e = max(np.abs(res.log_likelihoods["m"] - gauss_logpdf(Xm[keep], b, C(m))).max(),
            np.abs(res.log_likelihoods["o"] - gauss_logpdf(Xm[keep], b, C(other))).max())
    allok &= report("missing entries: both models on the same observed entries", e < 1e-9 and res.n_test == keep.sum(),
                    f"max |log p - closed-form marginal| {e:.1e}; rows {res.n_test} of {len(Xm)} (all-NaN rows left out)")
    far = linear(W, b + 50.0, 1e-3)
    res = cpadgn.compare({"m": m, "far": far}, X)
    d = res.log_likelihoods["m"] - res.log_likelihoods["far"]
    pr = res.pairs[0]
    want = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    allok &= report("a far worse model", np.isfinite([pr.mean_difference, pr.se, pr.vuong_z]).all()
                    and abs(pr.vuong_z / want - 1) < 1e-9,
                    f"mean d {pr.mean_difference:.3g} nats, z {pr.vuong_z:.1f}, p {pr.p_value:.2g}")
    # scale invariance: data and both models times c leave every per-row difference unchanged
    nA, nB = random_net(2, (6,), D, seed=5), random_net(2, (6,), D, seed=6)
    times = lambda n, c: PiecewiseAffineNet.from_arrays(list(n.weights[:-1]) + [c * n.weights[-1]],
                                                        list(n.biases[:-1]) + [c * n.biases[-1]], n.slopes)
    Xs = CPAModel(nA, noise_std=0.3, device="cpu").sample(300, seed=1)
    got = []
    for c in (1.0, 1e6, 1e-6, 1e100):
        pr = cpadgn.compare({"A": CPAModel(times(nA, c), noise_std=0.3 * c, device="cpu"),
                             "B": CPAModel(times(nB, c), noise_std=0.3 * c, device="cpu")}, c * Xs).pair("A", "B")
        sgn = 1.0 if pr.model_a == "A" else -1.0
        got.append([sgn * pr.mean_difference, pr.se, sgn * pr.vuong_z])
    rel = np.abs(np.array(got) / got[0] - 1).max()
    allok &= report("data and models x 1e6, 1e-6, 1e100", rel < 1e-12, f"mean d, SE, z unchanged to {rel:.1e}")
    return allok


if __name__ == "__main__":
    ok = audit_pvalues() & audit_compare() & audit_edges()
    print("all ok" if ok else "SOME CHECKS FAILED")
    raise SystemExit(0 if ok else 1)
