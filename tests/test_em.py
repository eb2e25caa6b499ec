"""EM training (cpadgn.em, cpadgn.fit, cpadgn fit): the closed-form M-step against
torch autograd, convergence to the PPCA closed form, monotone exact likelihood, the
VAE baseline's ELBO <= log p(x), determinism of the model file, and the command line."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import multivariate_normal

from cpadgn import em
from cpadgn.errors import CpadgnError
from cpadgn.fit import fit_em, fit_vae, parse_activation, parse_hidden
from cpadgn.network import PiecewiseAffineNet
from cpadgn.ppca import ppca_parameters

EPS = np.finfo(float).eps


# ====================================================================== M-step vs autograd
def _random_problem(S, hidden, D, N, R, seed, slope=0.1):
    """A random net, R random sign patterns, and random (row, region) pairs with
    responsibilities summing to 1 per row and random truncated moments."""
    rng = np.random.default_rng(seed)
    sizes = [S, *hidden, D]
    Ws = [rng.normal(size=(o, i)) for i, o in zip(sizes[:-1], sizes[1:])]
    bs = [rng.normal(size=o) for o in sizes[1:]]
    net = PiecewiseAffineNet.from_arrays(Ws, bs, [slope] * len(hidden))
    patterns = rng.random((R, sum(hidden))) < 0.5
    P = 3 * N
    rows = np.concatenate([np.arange(N), rng.integers(0, N, P - N)])
    regions = rng.integers(0, R, P)
    r = rng.random(P)
    r /= np.bincount(rows, weights=r)[rows]
    m = rng.normal(size=(P, S))
    Lc = 0.3 * rng.normal(size=(P, S, S))
    V = Lc @ np.swapaxes(Lc, 1, 2)
    X = rng.normal(size=(N, D))
    return net, patterns, rows, regions, r, m, V, X


def _q_torch(Ws, bs, slopes, patterns, rows, regions, r, m, V, X, var):
    """sum_pairs r E[log N(x; A_w z + b_w, diag var)] for z ~ (m, V), with A_w, b_w built
    by torch from the weights and the fixed slope masks (independent of cpadgn.em)."""
    S = m.shape[1]
    R = patterns.shape[0]
    splits = np.cumsum([W.shape[0] for W in Ws[:-1]])[:-1]
    masks = [torch.as_tensor(np.where(q, 1.0, a)) for q, a in zip(np.split(patterns, splits, axis=1), slopes)]
    M = torch.eye(S, dtype=torch.float64).expand(R, S, S)
    c = torch.zeros(R, S, dtype=torch.float64)
    for W, b, mk in zip(Ws[:-1], bs[:-1], masks):
        M = mk[:, :, None] * torch.einsum("ij,rjs->ris", W, M)
        c = mk * (c @ W.T + b)
    A = torch.einsum("dh,rhs->rds", Ws[-1], M)[regions]
    b = (c @ Ws[-1].T + bs[-1])[regions]
    mt, Vt, Xt = torch.as_tensor(m), torch.as_tensor(V), torch.as_tensor(X[rows])
    res = Xt - torch.einsum("pds,ps->pd", A, mt) - b
    quad = res ** 2 + torch.einsum("pds,pst,pdt->pd", A, Vt, A)
    return (torch.as_tensor(r) * (-0.5 * (np.log(2 * np.pi) + torch.log(var) + quad / var).sum(1))).sum()


def _grads(net, var, problem):
    _, patterns, rows, regions, r, m, V, X = problem
    Ws = [torch.tensor(W, requires_grad=True) for W in net.weights]
    bs = [torch.tensor(b, requires_grad=True) for b in net.biases]
    vt = torch.tensor(np.asarray(var, dtype=np.float64), requires_grad=True)
    q = _q_torch(Ws, bs, net.slopes, patterns, rows, regions, r, m, V, X, vt)
    q.backward()
    return q.item(), [W.grad.numpy() for W in Ws], [b.grad.numpy() for b in bs], vt.grad.numpy()


@pytest.mark.parametrize("hidden,seed", [((5, 4), 0), ((3, 4, 5), 1), ((6,), 2), ((), 3)])
def test_m_step_layer_solutions_are_stationary(hidden, seed):
    """Each layer's closed-form update zeroes the gradient of the expected complete-data
    log-likelihood in that layer (the others and the regions fixed); dense and CG agree."""
    problem = _random_problem(2, hidden, 6, 30, 7, seed)
    net, patterns, rows, regions, r, m, V, X = problem
    stats = em.region_stats(rows, regions, r, m, V, X)
    var = np.linspace(0.3, 1.2, X.shape[1])
    q0, gW0, gb0, _ = _grads(net, var, problem)
    L = len(net.weights)
    for l in range(L):
        sols = []
        for dense_max in (10 ** 6, 0):          # dense solve, then conjugate gradients
            new, _, info = em.m_step(net, patterns[stats.regions], stats, var, layers=[l],
                                     update_noise=False, dense_max=dense_max)
            q, gW, gb, _ = _grads(new, var, problem)
            scale = max(np.abs(gW0[l]).max(), np.abs(gb0[l]).max())
            assert np.abs(gW[l]).max() < 1e-8 * scale and np.abs(gb[l]).max() < 1e-8 * scale
            assert q >= q0 - 1e-9                                      # it is a maximum
            assert info.q_after - info.q_before == pytest.approx(q - q0, rel=1e-8, abs=1e-8)
            sols.append(new.weights[l])
        np.testing.assert_allclose(sols[0], sols[1], rtol=1e-6, atol=1e-7)


def test_output_solve_on_a_rank_deficient_normal_matrix_is_the_minimum_change_solution():
    """S = 1, one hidden layer of 4 (m = 5 unknowns per output), data in 3 adjacent regions
    (masks differing in one unit each): C = sum_w T_w Z_w T_w^T has rank R + 1 = 4 exactly.
    The output layer's least squares then has a null direction u, where (B - Theta0 C) u
    is 0 but for rounding (~ eps ||Theta0|| ||C||); a ridge of 1e-12 mean(diag C) turned that
    into a step of ~1e-3, so a one-ulp change of the data moved EM's weights by 4e-4 and
    its log-likelihood by 4.5e-6 nats per row two iterations later (wave.csv, 40 rows).
    Oracle: the minimum-change solution Theta0 + G pinv(C) in 50-digit arithmetic (mpmath).
    Bound (first-order perturbation of the solve on the range of C): with ||dC|| <=
    gamma ||C||, ||dG|| <= gamma (||B|| + ||Theta0|| ||C||), gamma = 10 m eps,
    ||Theta - Theta*|| <= 2 gamma kappa (||Theta0|| + ||Theta*|| + ||B|| / ||C||), kappa =
    lambda_max / lambda_min over C's nonzero eigenvalues."""
    mpmath = pytest.importorskip("mpmath")
    rng = np.random.default_rng(7)
    slope, n, D = 0.1, 4, 2
    W, b = rng.normal(size=(n, 1)), rng.normal(size=n)
    masks = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [1, 0, 0, 0]], dtype=bool)   # adjacent regions
    D_ = np.where(masks, 1.0, slope)
    T = np.zeros((3, n + 1, 2))
    T[:, :n, 0], T[:, :n, 1], T[:, n, 1] = D_ * W[:, 0], D_ * b, 1.0
    L = rng.normal(size=(3, 2, 2))
    Z = 15.0 * L @ np.swapaxes(L, 1, 2) + 5.0 * np.eye(2)
    XZ = 10.0 * rng.normal(size=(3, D, 2))
    Theta0 = 20.0 * rng.normal(size=(D, n + 1))
    C, B = em.output_normal_equations(T, Z, XZ)
    Theta = em.solve_output(C, B, Theta0)

    mpmath.mp.dps = 50
    mp = lambda a: mpmath.matrix(a.tolist())
    Cm = sum((mp(T[w]) * mp(Z[w]) * mp(T[w]).T for w in range(3)), mpmath.zeros(n + 1))
    Bm = sum((mp(XZ[w]) * mp(T[w]).T for w in range(3)), mpmath.zeros(D, n + 1))
    lam, U = mpmath.eigsy(Cm)
    lam = np.array([float(v) for v in lam])
    keep = np.flatnonzero(lam > 1e-30 * lam.max())
    assert keep.size == 4                                       # rank R + 1, one exact null direction
    Gm = Bm - mp(Theta0) * Cm
    dm = mpmath.zeros(D, n + 1)
    for k in keep:
        u = U[:, int(k)]
        dm += (Gm * u) * u.T / lam[k]
    exact = Theta0 + np.array(dm.tolist(), dtype=float)
    gamma = 10 * (n + 1) * EPS
    kappa = lam[keep].max() / lam[keep].min()
    normC = lam.max()
    bound = 2 * gamma * kappa * (np.linalg.norm(Theta0) + np.linalg.norm(exact) + np.linalg.norm(B) / normC)
    assert np.linalg.norm(Theta - exact) <= bound


@pytest.mark.parametrize("noise", ["iso", "diag"])
def test_m_step_full_sweep_output_and_noise_stationary(noise):
    problem = _random_problem(2, (5, 4), 6, 30, 7, 4)
    net, patterns, rows, regions, r, m, V, X = problem
    stats = em.region_stats(rows, regions, r, m, V, X)
    var = np.full(X.shape[1], 0.7)
    new, new_var, info = em.m_step(net, patterns[stats.regions], stats, var, noise=noise, sweeps=2)
    q, gW, gb, gv = _grads(new, new_var, problem)
    assert np.abs(gW[-1]).max() < 1e-7 and np.abs(gb[-1]).max() < 1e-7
    if noise == "diag":
        assert np.abs(gv).max() < 1e-8
    else:
        assert abs(gv.sum()) < 1e-8                                    # d/d(sigma^2) of sigma^2 1
    assert info.q_after == pytest.approx(q, rel=1e-12)
    assert info.q_after > info.q_before


def test_e_step_matches_posterior():
    """em.e_step (the training E-step, with its own pruning tolerance) against
    likelihood.posterior: log-likelihoods within the certified bound, same moments."""
    from oracles import random_net

    from cpadgn.likelihood import posterior
    from cpadgn.partition import compute_partition
    for S, seed in ((1, 0), (2, 1)):
        net = random_net(S, (8, 8), 5, seed=seed, slope=0.1, scale=2.0)
        part = compute_partition(net)
        rng = np.random.default_rng(seed)
        X = net.forward(rng.normal(size=(40, S))) + 0.3 * rng.normal(size=(40, 5))
        X[0] += 5.0
        ref = posterior(net, part, 0.3, X)
        for rtol in (1e-13, 1e-4):
            es = em.e_step(net, part, 0.3, X, rtol=rtol)
            assert np.all(es.error_bound <= np.log1p(rtol) * 1.0001)
            assert np.all(es.log_likelihood <= ref.log_likelihood + 1e-9)
            assert np.all(es.log_likelihood >= ref.log_likelihood - es.error_bound - 1e-9)
            zm = np.zeros((40, S))
            np.add.at(zm, es.pair_row, es.pair_responsibility[:, None] * es.pair_mean)
            np.testing.assert_allclose(zm, ref.z_mean, atol=max(1e-9, 10 * rtol))
            # r_k = exp(l_k - max l) / total: each r_k off by eps (2 + |l_k - max l|) relative,
            # and r |l - max l| <= 1/e; the sum of K of them adds K eps
            K = np.bincount(es.pair_row, minlength=40)
            sums = np.bincount(es.pair_row, es.pair_responsibility, minlength=40)
            assert np.all(np.abs(sums - 1.0) <= 4 * EPS * (K + 2))


# ====================================================================== EM against closed forms
def test_linear_em_converges_to_ppca_closed_form():
    rng = np.random.default_rng(0)
    D, S, N = 6, 2, 400
    W = rng.normal(size=(D, S)) * np.array([3.0, 1.5])
    X = rng.normal(size=(N, S)) @ W.T + 0.7 * rng.normal(size=(N, D)) + rng.normal(size=D)
    Wp, mu, s2 = ppca_parameters(X, S)
    ll_ml = multivariate_normal(mu, Wp @ Wp.T + s2 * np.eye(D)).logpdf(X).mean()
    res = fit_em(X, S, (), max_iter=1000, tol=1e-14, init="random", init_noise=1.0, seed=1,
                 noise="iso", overrelax=True)
    ll = res.history["train_loglik"]
    assert abs(res.train_loglik - ll_ml) < 1e-6
    assert np.all(np.diff(ll) >= 0)
    # the same model in closed form: the fitted covariance is PPCA's
    A, b = res.net.weights[0], res.net.biases[0]
    np.testing.assert_allclose(A @ A.T + res.noise_std ** 2 * np.eye(D), Wp @ Wp.T + s2 * np.eye(D),
                               atol=1e-4)
    np.testing.assert_allclose(b, mu, atol=1e-4)


def _ppca_observed_loglik(params, X, D):
    """Mean exact log p(x_o) of PPCA x ~ N(b, a a^T + s^2 I) over rows with NaN entries:
    each row's marginal is the observed block (closed form, independent of cpadgn)."""
    a, b, log_s = params[:D], params[D:2 * D], params[-1]
    C = np.outer(a, a) + np.exp(2 * log_s) * np.eye(D)
    total = 0.0
    patterns, which = np.unique(~np.isnan(X), axis=0, return_inverse=True)
    for k, o in enumerate(patterns):
        total += np.sum(multivariate_normal(b[o], C[np.ix_(o, o)]).logpdf(X[which.ravel() == k][:, o]))
    return total / len(X)


def test_linear_em_with_missing_values_reaches_the_observed_data_maximum():
    """EM on rows with 30% of their entries missing maximises the exact likelihood of the
    observed entries: for a linear generator (PPCA) that likelihood is a closed form,
    maximised here directly by L-BFGS from several starts."""
    from scipy.optimize import minimize
    rng = np.random.default_rng(4)
    D, N = 4, 150
    a_true = np.array([2.0, -1.0, 1.5, 0.5])
    X = rng.normal(size=(N, 1)) * a_true + 0.5 * rng.normal(size=(N, D)) + np.arange(D)
    X[rng.random(X.shape) < 0.3] = np.nan
    X = X[~np.isnan(X).all(1)]
    best = max((minimize(lambda p: -_ppca_observed_loglik(p, X, D), x0, method="L-BFGS-B",
                         options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 2000})
                for x0 in [np.r_[rng.normal(size=D), np.nanmean(X, 0), 0.0] for _ in range(3)]),
               key=lambda r: -r.fun)
    res = fit_em(X, 1, (), max_iter=2000, tol=1e-13, init="random", init_noise=1.0, seed=1)
    assert np.all(np.diff(res.history["train_loglik"]) >= 0)
    assert res.train_loglik == pytest.approx(-best.fun, abs=1e-6)
    a, b, s = res.net.weights[0][:, 0], res.net.biases[0], float(np.mean(res.noise_std))
    assert _ppca_observed_loglik(np.r_[a, b, np.log(s)], X, D) == pytest.approx(res.train_loglik, abs=1e-9)
    a_opt, b_opt, s_opt = best.x[:D], best.x[D:2 * D], np.exp(best.x[-1])
    np.testing.assert_allclose(np.outer(a, a) + s ** 2 * np.eye(D),
                               np.outer(a_opt, a_opt) + s_opt ** 2 * np.eye(D), atol=2e-3)
    np.testing.assert_allclose(b, b_opt, atol=2e-3)


def test_em_step_with_missing_values_never_lowers_the_observed_likelihood(wave, wave_fit):
    """One M-step of the output layer and noise (the partition does not move) on rows with
    30% missing entries is an exact EM step, so log p(x_o) cannot go down: from the
    complete-data fit (near its optimum, where a wrong treatment of the missing entries
    shows) and from random starts."""
    from cpadgn.model import CPAModel
    rng = np.random.default_rng(5)
    X = wave[0].copy()
    X[rng.random(X.shape) < 0.3] = np.nan
    X = X[~np.isnan(X).all(1)]
    starts = [(wave_fit.net, np.broadcast_to(wave_fit.noise_std ** 2, (2,)))]
    starts += [em.init_random(np.where(np.isnan(X), 0.0, X), 1, (6, 6), 0.1, seed) for seed in range(2)]
    for net, var in starts:
        part = CPAModel(net, noise_std=np.sqrt(var), device="cpu").partition()
        post = em.e_step(net, part, np.sqrt(var), X, rtol=1e-12)
        stats = em.stats_from_posterior(post, X, net=net, patterns=part.patterns, var=var)
        new, new_var, _ = em.m_step(net, part.patterns[stats.regions], stats, var, noise="diag",
                                    output_only=True)
        after = em.e_step(new, part, np.sqrt(new_var), X, rtol=1e-12).log_likelihood.mean()
        assert after >= post.log_likelihood.mean() - 1e-9


def test_ppca_init_is_exact_ppca():
    rng = np.random.default_rng(2)
    X = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 5))
    for slope in (0.1, 0.0, -1.0):
        net, var = em.init_ppca(X, 2, (8, 6), slope, seed=3)
        Wp, mu, s2 = ppca_parameters(X, 2)
        z = np.maximum(rng.normal(size=(500, 2)) * 3, -9.9)     # exact where min_i z_i > -10
        np.testing.assert_allclose(net.forward(z), z @ Wp.T + mu, atol=1e-10)
        assert np.allclose(var, s2)


@pytest.fixture(scope="module")
def wave():
    rng = np.random.default_rng(0)
    t = rng.normal(0.0, 2.0, 500)
    X = np.column_stack([t, np.cos(1.4 * t)]) + rng.normal(0.0, 0.1, (500, 2))
    X = (X - X.mean(0)) / X.std(0)
    return X[:400], X[400:]


@pytest.fixture(scope="module")
def wave_fit(wave):
    X, Xv = wave
    return fit_em(X, 1, (8, 8), 0.1, max_iter=12, tol=0, X_val=Xv, seed=0)


def test_em_exact_loglik_never_decreases(wave, wave_fit):
    ll = wave_fit.history["train_loglik"]
    assert ll.size == 13
    assert np.all(np.diff(ll) >= 0)
    assert ll[-1] > ll[0] + 1.0                                       # it learned something
    assert np.all(np.isfinite(wave_fit.history["val_loglik"]))
    # the recorded value is the exact likelihood of the returned model
    from cpadgn.model import CPAModel
    model = CPAModel(wave_fit.net, noise_std=wave_fit.noise_std, device="cpu")
    post = model.posterior(wave[0])
    # both are exact up to their certified pruning bounds (EM scores at its rtol 1e-6)
    tol = wave_fit.history["error_bound"][-1] + post.error_bound.max() + 1e-12
    assert post.log_likelihood.mean() == pytest.approx(wave_fit.train_loglik, abs=tol)


def test_em_beats_ppca_on_wave(wave, wave_fit):
    X, Xv = wave
    Wp, mu, s2 = ppca_parameters(X, 1)
    ppca_val = multivariate_normal(mu, Wp @ Wp.T + s2 * np.eye(2)).logpdf(Xv).mean()
    assert wave_fit.val_loglik > ppca_val + 0.2


def test_em_is_deterministic(wave):
    X, Xv = wave
    a = fit_em(X, 1, (6, 6), max_iter=3, tol=0, X_val=Xv, seed=5)
    b = fit_em(X, 1, (6, 6), max_iter=3, tol=0, X_val=Xv, seed=5)
    for Wa, Wb in zip(a.net.weights, b.net.weights):
        assert np.array_equal(Wa, Wb)
    for k in a.history:
        assert np.array_equal(a.history[k], b.history[k], equal_nan=True)


def test_em_stops_keeping_its_iterations_when_the_m_step_outgrows_the_memory_budget(tmp_path, wave, monkeypatch):
    """The regions the data reach can grow as EM goes on (wave, 1-(8,8)-2: 18, 17, 18, 20
    at the first four M-steps); a budget between the two stops EM with stop_reason
    "memory_budget" and returns the last iterate, the same as a run told to stop there.
    It raised a CpadgnError, which lost every finished iteration (digits, 2-(32,32):
    'EM cannot update this generator' after the first, at --memory-budget 3.2e7)."""
    import cpadgn.fit as fit_module
    X, _ = wave
    seen, check = [], fit_module.check_m_step_memory

    def spy(net, n_regions, budget):
        seen.append(n_regions)
        return check(net, n_regions, budget)

    monkeypatch.setattr(fit_module, "check_m_step_memory", spy)
    free = fit_em(X, 1, (8, 8), max_iter=6, tol=0, seed=0)
    monkeypatch.undo()
    grow = next(i for i in range(1, len(seen)) if seen[i] > max(seen[:i]))      # 0-based M-step
    per_region = 2 * (8 * 8 + 8 * 3) + 9 * 9           # bytes / 8 (check_m_step_widths, S = 1, 8-8)
    budget = 8.0 * per_region * max(seen[:grow])
    res = fit_em(X, 1, (8, 8), max_iter=6, tol=0, seed=0, memory_budget=budget)
    assert res.stop_reason == "memory_budget"
    assert res.history["iteration"].tolist() == list(range(grow + 1))
    assert np.array_equal(res.history["train_loglik"], free.history["train_loglik"][:grow + 1])
    short = fit_em(X, 1, (8, 8), max_iter=grow, tol=0, seed=0)
    for Wa, Wb in zip(res.net.weights, short.net.weights):
        assert np.array_equal(Wa, Wb)
    with pytest.raises(CpadgnError, match="memory budget"):    # the first M-step: refused as before
        fit_em(X, 1, (8, 8), max_iter=6, tol=0, seed=0, memory_budget=8.0 * per_region * (seen[0] - 1))
    from cli.main import main                 # the command line writes the model of those iterations
    data, out = tmp_path / "wave.csv", tmp_path / "em.h5"
    _write_wave(data, X)
    r = CliRunner().invoke(main, ["fit", str(data), "-o", str(out), "-S", "1", "--hidden", "8,8", "--max-iter", "6",
                                  "--tol", "0", "--val-fraction", "0", "--memory-budget", repr(budget), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["stop_reason"] == "memory_budget" and summary["iterations"] == grow
    assert summary["train_log_likelihood"] == res.train_loglik


# ====================================================================== VAE baseline
def test_vae_elbo_below_exact_loglik(wave):
    from cpadgn.model import CPAModel
    from cpadgn.vae import Encoder, exact_elbo
    X, Xv = wave
    res = fit_vae(X, 1, (8, 8), 0.1, max_iter=15, X_val=Xv, seed=0, eval_every=5)
    h = res.history
    assert h["epoch"].size == 15 and np.isfinite(h["val_loglik"][[4, 9, 14]]).all()
    model = CPAModel(res.net, noise_std=res.noise_std, device="cpu")
    n = len(res.encoder) // 2
    enc = Encoder.from_arrays([res.encoder[f"weight_{i}"] for i in range(n)],
                              [res.encoder[f"bias_{i}"] for i in range(n)], res.encoder_slope)
    el = exact_elbo(model, Xv, encoder=enc)
    ll = model.log_prob(Xv)
    assert np.all(el.elbo - el.error_bound <= ll + 1e-9)
    assert np.all(el.elbo <= ll + 1e-9)
    # and the exact ELBO agrees with a Monte Carlo estimate from the torch VAE
    assert res.val_loglik == pytest.approx(ll.mean(), abs=1e-9)


def test_em_result_does_not_depend_on_the_memory_layout_of_the_data():
    """The same numbers give the same fit: a DataFrame's .values (and CPADGN.fit(df)) are
    column-major, and EM on them ended 8e-7 nats per row away from EM on the row-major
    array the command line reads from the same CSV (BLAS sums in another order, and EM's
    steps amplify that), so fit_em(df) and cpadgn fit disagreed."""
    from cpadgn.data import read_data
    X = read_data(__import__("pathlib").Path(__file__).resolve().parents[1] / "sample_data" / "wave.csv")[:40]
    a = fit_em(X, 1, (4,), max_iter=2)
    b = fit_em(np.asfortranarray(X), 1, (4,), max_iter=2)
    assert np.array_equal(a.history["train_loglik"], b.history["train_loglik"])
    assert all(np.array_equal(u, v) for u, v in zip(a.net.weights, b.net.weights))


def test_save_fit_refuses_a_name_that_is_not_a_model_file(tmp_path, wave):
    """save_fit('data.csv', res) replaced the user's data file by an HDF5 model file (the
    command line refuses such a name before fitting; the library wrote it)."""
    X, _ = wave
    data = tmp_path / "data.csv"
    np.savetxt(data, X[:20], delimiter=",")
    before = data.read_bytes()
    res = fit_em(X[:20], 1, (4,), max_iter=0)
    from cpadgn.fit import save_fit
    with pytest.raises(CpadgnError, match=r"cannot write .*data.csv: a model file must end in .h5 or .hdf5; "
                                          r"name it e.g. data.h5"):
        save_fit(data, res)
    assert data.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["data.csv"]


def test_vae_leaves_the_callers_torch_random_stream_alone(wave):
    """fit_vae seeds its own weights and minibatches; it called torch.manual_seed(seed) on
    the global generator, so a notebook's torch.randn after it was reseeded to seed 0."""
    X, _ = wave
    torch.manual_seed(123)
    expected = torch.randn(3)
    torch.manual_seed(123)
    a = fit_vae(X[:40], 1, (4,), 0.1, max_iter=1, seed=0, score_train=False)
    assert torch.equal(torch.randn(3), expected)
    b = fit_vae(X[:40], 1, (4,), 0.1, max_iter=1, seed=0, score_train=False)   # still deterministic
    assert all(np.array_equal(u, v) for u, v in zip(a.net.weights, b.net.weights))


def test_vae_leaves_the_gpus_random_streams_alone(wave, monkeypatch):
    """torch.manual_seed also reseeds every GPU's generator (lazily, where CUDA is not yet
    started), which the fork of the CPU's generator does not restore: on a GPU machine a
    notebook's torch.randn(device='cuda') after fit_vae was reseeded to seed 0."""
    X, _ = wave
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: seeded.append(s))
    fit_vae(X[:40], 1, (4,), 0.1, max_iter=1, seed=0, score_train=False)
    assert seeded == []


# ====================================================================== options and the CLI
def test_parse_options():
    assert parse_hidden("32,32") == (32, 32)
    assert parse_hidden(" 16 , 8 ") == (16, 8)
    assert parse_hidden("none") == ()
    assert parse_hidden((16, 8.0)) == (16, 8)
    # a Python width of 8.5 or True is refused, not truncated to 8 or read as 1
    for bad in ("32,x", "0,4", "-3", "1.5", (8.5,), (True, 4), [16, None]):
        with pytest.raises(CpadgnError, match="--hidden 32,32 .hidden=.32, 32. in Python"):
            parse_hidden(bad)
    assert parse_activation("leaky_relu:0.2") == 0.2
    assert parse_activation("relu") == 0.0 and parse_activation("abs") == -1.0
    for bad in ("tanh", "leaky_relu:x", "leaky_relu:-0.5"):
        with pytest.raises(CpadgnError, match="activation"):
            parse_activation(bad)


def _write_wave(path, X):
    np.savetxt(path, X, delimiter=",", header="a,b", comments="")


def test_cli_fit_writes_identical_files_and_history(tmp_path, wave):
    from cli.main import main
    from cpadgn.modelfile import read_model
    X, _ = wave
    data = tmp_path / "wave.csv"
    _write_wave(data, X)
    runner = CliRunner()
    outs = []
    for name in ("a.h5", "b.h5"):
        out = tmp_path / name
        r = runner.invoke(main, ["fit", str(data), "-o", str(out), "--latent-dim", "1", "--hidden", "6,6",
                                 "--max-iter", "3", "--seed", "7", "--quiet", "--json"])
        assert r.exit_code == 0, r.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    gen = read_model(tmp_path / "a.h5")
    hist = gen.extra["groups"]["training"]
    assert {"iteration", "train_loglik", "val_loglik", "noise_std", "n_regions"} <= set(hist)
    assert np.all(np.diff(hist["train_loglik"]) >= 0)
    attrs = gen.extra["attrs"]
    assert attrs["method"] == "em" and attrs["fit_options"]["seed"] == 7
    assert gen.net.hidden_sizes == (6, 6) and gen.noise_std is not None
    # every other command loads it
    r = runner.invoke(main, ["score", str(tmp_path / "a.h5"), str(data), "-o", str(tmp_path / "s.csv"),
                             "--quiet", "--json", "--cache", str(tmp_path / "c.h5")])
    assert r.exit_code == 0, r.output


def test_cli_fit_max_regions_rejects_steps_beyond_it(tmp_path, wave):
    """fit --help said --max-regions makes the fit "stop with an error if a partition has
    more regions than this"; EM refuses only a start beyond it and rejects the steps whose
    new partition is (the uncapped run here reaches 17 regions from a 16-region start)."""
    from cli.main import main
    from cpadgn.modelfile import read_model
    X, _ = wave
    data = tmp_path / "wave.csv"
    _write_wave(data, X)
    argv = ["fit", str(data), "-S", "1", "--hidden", "6,6", "--max-iter", "6", "--tol", "0",
            "--val-fraction", "0", "-q", "--json"]
    counts = {}
    for cap in (None, 16):
        out = tmp_path / f"m{cap}.h5"
        r = CliRunner().invoke(main, argv + ["-o", str(out)] + ([] if cap is None else ["--max-regions", str(cap)]))
        assert r.exit_code == 0, r.output
        counts[cap] = read_model(out).extra["groups"]["training"]["n_regions"]
    assert counts[None][0] == 16 and counts[None].max() > 16
    assert counts[16].max() <= 16
    r = CliRunner().invoke(main, argv + ["-o", str(tmp_path / "small.h5"), "--max-regions", "10"])
    assert r.exit_code == 1 and "raise --max-regions" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "small.h5").exists()
    text = " ".join(CliRunner().invoke(main, ["fit", "--help"]).output.split())
    entry = text[text.index("--max-regions"):text.index("--device")]
    assert "rejected" in entry and "Stop with an error" not in entry, entry


def test_cli_fit_vae_keeps_encoder(tmp_path, wave):
    from cli.main import main
    from cpadgn.modelfile import read_model
    X, _ = wave
    data = tmp_path / "wave.csv"
    _write_wave(data, X)
    out = tmp_path / "vae.h5"
    r = CliRunner().invoke(main, ["fit", str(data), "-o", str(out), "-S", "1", "--hidden", "6,6",
                                  "--method", "vae", "--max-iter", "4", "--eval-every", "2", "-q"])
    assert r.exit_code == 0, r.output
    gen = read_model(out)
    assert "weight_0" in gen.extra["groups"]["encoder"]
    assert gen.extra["attrs"]["method"] == "vae"
    h = gen.extra["groups"]["training"]
    assert h["epoch"].tolist() == [1, 2, 3, 4]
    # between the --eval-every epochs: val_loglik NaN and n_regions -1 (README)
    assert np.isnan(h["val_loglik"][[0, 2]]).all() and np.isfinite(h["val_loglik"][[1, 3]]).all()
    assert h["n_regions"][0] == h["n_regions"][2] == -1 and (h["n_regions"][[1, 3]] > 0).all()


@pytest.mark.parametrize("method, extra", [
    ("em", ["--lr", "0.01"]), ("em", ["--batch-size", "16"]), ("em", ["--eval-every", "2"]),
    ("vae", ["--tol", "0.1"]), ("vae", ["--init-noise", "0.5"]), ("vae", ["--sweeps", "2"]),
    ("vae", ["--rtol", "1e-4"]), ("vae", ["--var-floor", "0.01"]), ("vae", ["--init", "random"])])
def test_cli_fit_refuses_the_other_methods_options(tmp_path, wave, method, extra):
    """An option of the other --method was silently ignored (fit --lr 0.01 trained EM as
    without it, --method vae --var-floor 0.01 a VAE as without it): a usage error now (exit
    2, one line naming the option and the method it belongs to), before any work."""
    from cli.main import main
    X, _ = wave
    data = tmp_path / "wave.csv"
    _write_wave(data, X[:60])
    r = CliRunner().invoke(main, ["fit", str(data), "-o", str(tmp_path / "m.h5"), "-S", "1", "--hidden", "4",
                                  "--method", method, "--max-iter", "1", "-q"] + extra)
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert err.startswith("Error: " + extra[0]) and "\n" not in err and "--method" in err, err
    assert list(tmp_path.iterdir()) == [data]


def test_cli_fit_dataset_names_the_key_of_the_h5_file_beside_a_csv(tmp_path, wave):
    """DATA .csv with --val FILE.h5 holding several datasets was a dead end: without
    --dataset 'choose one with --dataset KEY', with it '--dataset names a dataset inside an
    .h5 file, but DATA is a .csv file'.  --dataset is now the key of the .h5 files among
    DATA and --val (as compare's --data and --train): the validation rows are dataset a's."""
    import h5py

    from cli.main import main
    X, _ = wave
    data = tmp_path / "wave.csv"
    _write_wave(data, X[:60])
    with h5py.File(tmp_path / "val.h5", "w") as f:
        f["a"], f["b"] = X[60:85], X[60:100]
    argv = ["fit", str(data), "-o", str(tmp_path / "m.h5"), "-S", "1", "--hidden", "4", "--max-iter", "1", "-q",
            "--json", "--val", str(tmp_path / "val.h5")]
    r = CliRunner().invoke(main, argv + ["--dataset", "a"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["val_rows"] == 25 and json.loads(r.stdout)["train_rows"] == 60
    r = CliRunner().invoke(main, argv)                     # still: which of the two datasets
    assert r.exit_code == 1 and "--dataset KEY" in r.stderr


def test_cli_fit_refuses_an_activation_for_a_linear_generator(tmp_path, wave):
    """--hidden none --activation relu silently fitted PPCA (a linear generator has no
    activation; the summary said 'none'): a usage error now; without --activation it fits."""
    from cli.main import main
    X, _ = wave
    data = tmp_path / "wave.csv"
    _write_wave(data, X[:60])
    argv = ["fit", str(data), "-o", str(tmp_path / "m.h5"), "-S", "1", "--hidden", "none", "--max-iter", "1", "-q"]
    r = CliRunner().invoke(main, argv + ["--activation", "relu"])
    assert r.exit_code == 2 and r.stderr.strip().startswith("Error: --activation") and "\n" not in r.stderr.strip()
    assert list(tmp_path.iterdir()) == [data]
    assert CliRunner().invoke(main, argv).exit_code == 0


def test_cli_fit_vae_divergence_names_the_learning_rate(tmp_path, wave):
    """A learning rate that sends the ELBO to inf or NaN stops training with one line
    naming --lr (it went on and was refused later as 'a badly scaled model'), no output."""
    from cli.main import main
    X, _ = wave
    data = tmp_path / "wave.csv"
    _write_wave(data, X)
    r = CliRunner().invoke(main, ["fit", str(data), "-o", str(tmp_path / "vae.h5"), "-S", "1", "--hidden", "6,6",
                                  "--method", "vae", "--max-iter", "2", "--lr", "1e300", "-q"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == ["Error: VAE training diverged in epoch 1 (the ELBO is not finite); "
                                             "lower --lr (now 1e+300)"]
    assert list(tmp_path.iterdir()) == [data]


def test_cli_fit_vae_overflowing_noise_names_the_learning_rate(tmp_path, wave):
    """A learning rate whose last Adam step overflows the noise std (its log moves by ~lr
    while the ELBO of that step was finite) stops training with the same one line naming
    --lr; it was a RuntimeWarning from the likelihood and 'OUT: noise std must be finite
    and > 0 ... save the model with positive noise stds', which is about no step of the
    user's."""
    from cli.main import main
    X, _ = wave
    data = tmp_path / "wave.csv"
    _write_wave(data, X)
    r = CliRunner().invoke(main, ["fit", str(data), "-o", str(tmp_path / "vae.h5"), "-S", "1", "--hidden", "6,6",
                                  "--method", "vae", "--max-iter", "1", "--batch-size", "1000", "--lr", "1e6",
                                  "-q"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == ["Error: VAE training diverged in epoch 1 (its weights or noise std "
                                             "overflowed); lower --lr (now 1e+06)"]
    assert list(tmp_path.iterdir()) == [data]


@pytest.mark.parametrize("args,message,code", [
    (["--hidden", "32,abc"], "--hidden", 2),              # wrong on the command line alone: usage errors
    (["--activation", "tanh"], "--activation", 2),
    (["--latent-dim", "2"], "--latent-dim", 1),           # wrong for DATA's 2 columns: seen once it is read
    (["-o", "model.csv"], ".h5", 2),
])
def test_cli_fit_refuses_bad_options(tmp_path, wave, args, message, code):
    from cli.main import main
    X, _ = wave
    data = tmp_path / "wave.csv"
    _write_wave(data, X)
    base = {"-o": str(tmp_path / "m.h5"), "--latent-dim": "1"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v if k != "-o" else str(tmp_path / v)
    argv = ["fit", str(data)] + [x for kv in base.items() for x in kv] + ["--max-iter", "1", "-q"]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == code, r.output
    assert message in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_cli_fit_missing_values(tmp_path, wave):
    """EM fits rows with missing entries (and says nothing about them); the VAE, a column
    with nothing observed and a row with nothing observed are refused in one line."""
    from cli.main import main
    from cpadgn.modelfile import read_model
    X = wave[0].copy()
    X[3, 1] = X[10, 0] = np.nan
    data = tmp_path / "wave_nan.csv"
    _write_wave(data, X)
    out = tmp_path / "m.h5"
    r = CliRunner().invoke(main, ["fit", str(data), "-o", str(out), "-S", "1", "--hidden", "4",
                                  "--max-iter", "2", "-q"])
    assert r.exit_code == 0, r.output
    assert np.all(np.isfinite(read_model(out).extra["groups"]["training"]["train_loglik"]))
    bad = {"vae": (X, ["--method", "vae"], "missing values"),
           "column": (np.column_stack([X, np.full(len(X), np.nan)]), [], "column 3"),
           "row": (np.vstack([X, [np.nan, np.nan]]), [], f"row {len(X) + 1}")}
    for name, (Xb, args, message) in bad.items():
        path = tmp_path / f"{name}.csv"
        np.savetxt(path, Xb, delimiter=",")
        r = CliRunner().invoke(main, ["fit", str(path), "-o", str(tmp_path / f"{name}.h5"), "-S", "1",
                                      "--max-iter", "1", "-q", *args])
        assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output, (name, r.output)
        assert len(r.output.strip().splitlines()) == 1
        assert not (tmp_path / f"{name}.h5").exists()


def test_cli_fit_var_floor_bounds_every_noise_variance(tmp_path, wave):
    """A nearly constant column: per-column ML would shrink its variance towards 0;
    --var-floor keeps every variance at or above its fraction of the mean column variance."""
    from cli.main import main
    from cpadgn.modelfile import read_model
    X, _ = wave
    X3 = np.column_stack([X, 1e-4 * np.random.default_rng(0).standard_normal(len(X))])
    data = tmp_path / "wave3.csv"
    np.savetxt(data, X3, delimiter=",")
    var = {}
    for floor in ("1e-6", "0.05"):
        out = tmp_path / f"m{floor}.h5"
        r = CliRunner().invoke(main, ["fit", str(data), "-o", str(out), "-S", "1", "--hidden", "6,6",
                                      "--noise", "diag", "--var-floor", floor, "--max-iter", "2", "-q"])
        assert r.exit_code == 0, r.output
        var[floor] = np.asarray(read_model(out).noise_std) ** 2
        # the history's noise_std is the root mean square of the column stds (README)
        assert read_model(out).extra["groups"]["training"]["noise_std"][-1] == \
            pytest.approx(np.sqrt(var[floor].mean()), rel=1e-14)
    mean_var = X3.var(0).mean()
    assert var["1e-6"][2] < 1e-3 * mean_var                  # ML shrinks the constant column ...
    assert np.all(var["0.05"] >= 0.05 * mean_var * 0.8)       # ... the floor (train split ~ all rows) stops it


def test_cli_fit_var_floor_zero_on_a_constant_column_is_refused_in_one_line(tmp_path, wave):
    """--noise diag --var-floor 0 with a constant column: its ML noise variance is exactly
    0 and the likelihood unbounded.  Refused in one line naming the column and --var-floor,
    with no RuntimeWarning and no file (it divided by 0, then blamed the data's scale)."""
    import warnings
    from cli.main import main
    X, _ = wave
    data = tmp_path / "const.csv"
    np.savetxt(data, np.column_stack([X, np.ones(len(X))]), delimiter=",")
    out = tmp_path / "m.h5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = CliRunner().invoke(main, ["fit", str(data), "-o", str(out), "-S", "1", "--hidden", "4",
                                      "--noise", "diag", "--var-floor", "0", "--max-iter", "2", "-q"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1
    assert "column 3" in r.output and "--var-floor" in r.output, r.output
    assert not out.exists()


def _loglik_1d_sharp(net, x, noise_std):
    """log p(x) for S = 1 by the trapezoid rule, fine enough for a posterior far narrower
    than tests/oracles.loglik_1d's grid: a pass over [-10, 10] (steps 1e-4) finds where
    the integrand is within e^-40 of its peak, 200,001 points cover each such stretch."""
    var = np.broadcast_to(np.asarray(noise_std, float) ** 2, x.shape)

    def log_f(z):
        g = net.forward(z[:, None])
        return (-0.5 * (((x - g) ** 2 / var).sum(1) + np.log(2 * np.pi * var).sum() + z * z
                        + np.log(2 * np.pi)))

    coarse = np.linspace(-10.0, 10.0, 200_001)
    lf = log_f(coarse)
    near = np.flatnonzero(lf >= lf.max() - 40.0)
    runs = np.split(near, np.flatnonzero(np.diff(near) > 1) + 1)
    top, total = lf.max(), 0.0
    for run in runs:
        z = np.linspace(coarse[max(run[0] - 2, 0)], coarse[min(run[-1] + 2, coarse.size - 1)], 200_001)
        total += np.trapezoid(np.exp(log_f(z) - top), z)
    return top + np.log(total)


def test_em_stops_before_rounding_swamps_the_likelihood():
    """--var-floor 0 on three rows: the curve can pass through them all, so the
    maximum-likelihood noise is 0 and EM shrinks it step by step until float64 rounding
    of log p exceeds the gains.  It went on comparing rounding noise and reported 116.5
    nats per row, with a rounding estimate of 1.9e3 nats and no word.  EM now rejects
    steps whose log-likelihood rounding may move by more than ROUNDING_WARN_NATS and stops
    with 'rounding'; the last recorded value is the model's exact one (trapezoid
    quadrature at ~1e-9 steps)."""
    X = np.array([[-0.73, -0.54, -0.32, 0.41], [1.04, -0.13, 1.37, -0.67], [0.35, 0.9, 0.09, -0.74]])
    res = fit_em(X, 1, (4, 4), max_iter=40, tol=0, var_floor=0.0, seed=0, init="random", init_noise=0.1)
    assert res.stop_reason == "rounding"
    assert np.all(np.diff(res.history["train_loglik"]) >= 0)
    quad = np.mean([_loglik_1d_sharp(res.net, x, res.noise_std) for x in X])
    # the value is reliable to ROUNDING_WARN_NATS (an estimate of the order: 10x for the test)
    assert res.train_loglik == pytest.approx(quad, abs=1e-2)


def test_too_few_rows_for_the_latent_dimension_are_named():
    """N <= S + 1 rows span at most S directions: PPCA's noise variance is 0.  The message
    blamed an outlier and --baseline (compare's option); it now names the row count."""
    X = np.array([[1.0, 2.0, -1.0], [-1.0, 0.5, 2.0], [0.3, 0.1, 0.7]])
    for S in (1, 2):
        with pytest.raises(CpadgnError, match=f"{S + 1} rows span at most {S} direction.*at least {S + 2} rows"):
            fit_em(X[:S + 1], S, (4,), max_iter=1)


def test_cli_fit_warns_of_columns_on_different_scales(tmp_path):
    """Raw load_wine (proline's std 390x the median column's) was fitted without a word, one
    isotropic noise std then fitting proline alone; fit warns, naming the column, unless the
    noise is diagonal or the columns are on comparable scales."""
    from cli.main import main
    X = np.random.default_rng(0).standard_normal((40, 4)) * [1.0, 0.5, 2.0, 300.0]
    data = tmp_path / "raw.csv"
    np.savetxt(data, X, delimiter=",", header="a,b,c,proline", comments="")

    def fit(path, *args):
        r = CliRunner().invoke(main, ["fit", str(path), "-o", str(tmp_path / "m.h5"), "-S", "1", "--hidden", "4",
                                      "--max-iter", "0", *args])
        assert r.exit_code == 0, r.output
        return " ".join(r.output.split())
    assert "Warning: column 4 (proline) has std" in fit(data) and "standardise the columns" in fit(data)
    assert "Warning" not in fit(data, "--noise", "diag")
    np.savetxt(tmp_path / "z.csv", (X - X.mean(0)) / X.std(0), delimiter=",")
    assert "Warning" not in fit(tmp_path / "z.csv")
    # one line on stderr, also under --json (it said nothing there), whose stdout stays JSON; none under -q
    r = CliRunner().invoke(main, ["fit", str(data), "-o", str(tmp_path / "m.h5"), "-S", "1", "--hidden", "4",
                                  "--max-iter", "0", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["iterations"] == 0
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("Warning: column 4 (proline) has std")
    r = CliRunner().invoke(main, ["fit", str(data), "-o", str(tmp_path / "m.h5"), "-S", "1", "--hidden", "4",
                                  "--max-iter", "0", "-q"])
    assert r.exit_code == 0 and "Warning" not in r.stderr


def test_cli_fit_vae_warns_of_few_adam_steps(tmp_path, wave):
    """An epoch is ceil(N / --batch-size) Adam steps: 126 wine rows made 1 step per epoch,
    300 steps in all, and the VAE's exact log-likelihood stayed at -212 per row (-33 with
    --batch-size 16) while compare reported it as the VAE baseline; fit now says so."""
    from cli.fit import vae_steps_warning
    from cli.main import main
    X, _ = wave
    data = tmp_path / "wave.csv"
    _write_wave(data, X[:60])
    r = CliRunner().invoke(main, ["fit", str(data), "-o", str(tmp_path / "vae.h5"), "-S", "1", "--hidden", "4",
                                  "--method", "vae", "--max-iter", "2", "--val-fraction", "0"])
    assert r.exit_code == 0, r.output
    assert ("Warning: --method vae: 60 training rows at --batch-size 128 make 1 Adam step(s) per epoch, 2 in 2 "
            "epochs") in " ".join(r.output.split())
    assert vae_steps_warning(126, 128, 300) and not vae_steps_warning(126, 16, 300)
    assert not vae_steps_warning(1347, 128, 300)               # the digits: 11 steps per epoch


def test_cli_fit_warns_on_stderr_also_under_json(tmp_path, wave):
    """fit's warnings (too few VAE steps, a column on another scale) vanished under --json,
    which other commands keep on stderr (stdout stays JSON); the README says fit warns,
    with no exception for --json.  Only --quiet silences them."""
    import json
    from cli.main import main
    X, _ = wave
    data = tmp_path / "wave.csv"
    _write_wave(data, X[:60])
    argv = ["fit", str(data), "-o", str(tmp_path / "vae.h5"), "-S", "1", "--hidden", "4", "--method", "vae",
            "--max-iter", "2", "--val-fraction", "0", "--json"]
    r = CliRunner().invoke(main, argv)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["method"] == "vae"
    assert "Warning: --method vae: 60 training rows" in " ".join(r.stderr.split())
    r = CliRunner().invoke(main, argv + ["--quiet"])
    assert r.exit_code == 0 and json.loads(r.stdout)["method"] == "vae" and "Warning" not in r.stderr
