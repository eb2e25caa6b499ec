"""Audit: are ``cpadgn impute``'s means, stds and draws the exact p(x_m | x_o)?

Data sampled from the model itself makes the exact conditional the truth, so:

1. closed form: generators that are affine although their hidden units switch (units in
   pairs (a, -a) with output weights (1, -1) / (1 + slope): the partition has real
   regions, g is one affine map A z + b), so p(x_m | x_o) is Gaussian; conditioning done
   in the latent space (stable at tiny noise).  Rows with nothing observed, one entry
   observed, one missing, half missing, nothing missing.  Prints the largest error of
   the mean and std in units of the exact conditional std.
2. calibration on model rows (nonlinear nets, MCAR and a MAR mask that depends on the
   always-observed x_1): z = (x_true - mean) / std must have mean 0 and E z^2 = 1 (SEs
   clustered by row); the rank of x_true among K = 99 draws is uniform on 0..K (chi^2 on
   10 bins) and ranks 5..94 cover exactly 90%; the Gaussian interval mean +- 1.645 std is
   printed for contrast (the conditional is a mixture: not exactly 90%); the draws' means
   and variances against the reported mean and std.
3. S = 2 quadrature: a 2-point Gauss-Legendre tensor grid on [-L, L]^2 (n = 700 and 1400
   cells a side, around each row's posterior; kinks make its error O(h^2), so |code -
   fine| must stay below the coarse-fine difference, or 1e-9 where that is rounding).

Deterministic.  Run from the repository root (about 1 to 2 minutes):

    PYTHONPATH=. python benchmarks/audit_impute_calibration.py
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from oracles import random_net  # noqa: E402

from cpadgn.impute import impute  # noqa: E402
from cpadgn.model import CPAModel  # noqa: E402
from cpadgn.network import PiecewiseAffineNet  # noqa: E402


def affine_net(S, H, D, seed, slope=0.2):
    """A net with H switching pairs whose g is affine: (net, A (D, S), b (D,))."""
    rng = np.random.default_rng(seed)
    W, c1 = rng.normal(size=(H, S)), rng.normal(size=H)
    V, c = rng.normal(size=(D, H)) / np.sqrt(H), rng.normal(size=D)
    net = PiecewiseAffineNet.from_arrays([np.concatenate([W, -W]), np.concatenate([V, -V], 1) / (1 + slope)],
                                         [np.concatenate([c1, -c1]), c], [slope])
    return net, V @ W, V @ c1 + c


def gaussian_conditional(A, b, sigma, x):
    """Exact E[x_m | x_o] and the conditional std (D,) (0 where observed) of x = A z + b + noise."""
    o, m = ~np.isnan(x), np.isnan(x)
    Ao = A[o] / sigma[o, None]
    # I + Ao'Ao = R'R from the QR of [I; Ao]: formed entrywise its unit eigenvalues (fewer
    # observed entries than S) drown in the sum's rounding at a tiny noise std
    Q, R = np.linalg.qr(np.vstack([np.eye(A.shape[1]), Ao]))
    R_inv = np.linalg.inv(R)
    Sz = R_inv @ R_inv.T
    mu = R_inv @ (Q[A.shape[1]:].T @ ((x[o] - b[o]) / sigma[o]))
    mean, sd = x.copy(), np.zeros_like(x)
    mean[m] = A[m] @ mu + b[m]
    sd[m] = np.sqrt(np.einsum("ds,st,dt->d", A[m], Sz, A[m]) + sigma[m] ** 2)
    return mean, sd


def patterns(X, rng):
    """Cycle: nothing observed, one observed, one missing, ~half missing, complete."""
    X, D = X.copy(), X.shape[1]
    for n in range(len(X)):
        k = n % 5
        if k == 0:
            X[n] = np.nan
        elif k == 1:
            X[n, np.arange(D) != rng.integers(D)] = np.nan
        elif k == 2:
            X[n, rng.integers(D)] = np.nan
        elif k == 3:
            X[n, rng.random(D) < 0.5] = np.nan
    return X


def closed_form():
    print("1. affine generators with switching units: error in conditional-std units")
    for S, H, D, sig, seed in [(1, 5, 4, 0.3, 0), (2, 6, 5, 0.5, 1), (3, 4, 5, 0.4, 2),
                               (2, 6, 6, [0.05, 0.3, 1.0, 2.0, 0.5, 0.1], 3), (2, 5, 4, 1e3, 5),
                               (2, 5, 4, 1e-4, 6), (3, 5, 4, 1e-3, 7), (2, 5, 4, 1e-6, 6)]:
        net, A, b = affine_net(S, H, D, seed)
        sigma = np.broadcast_to(np.asarray(sig, float), (D,))
        model = CPAModel(net, noise_std=sig, device="cpu")
        X = patterns(model.sample(50, seed=seed), np.random.default_rng(seed))
        X[3] += 5 * np.sqrt((A ** 2).sum(1) + sigma ** 2)                     # an outlier row
        res = model.imputation(X, std=True)
        err, obs_ok = 0.0, True
        for n, x in enumerate(X):
            mean, sd = gaussian_conditional(A, b, sigma, x)
            m = np.isnan(x)
            if m.any():
                err = max(err, (np.abs(res.mean[n, m] - mean[m]) / sd[m]).max(),
                          (np.abs(res.std[n, m] - sd[m]) / sd[m]).max())
            obs_ok &= res.mean[n, ~m].tobytes() == x[~m].tobytes() and not res.std[n, ~m].any()
        rounding = model.rounding_error(X).max()
        print(f"  S={S} regions={model.partition().n_regions:3d} sigma={np.ravel(sig)[0]:<7g} max error {err:.1e} "
              f"(rounding estimate of log p {rounding:.1e} nats)  observed bit for bit: {obs_ok}")


def masks(X, kind, rng):
    N, D = X.shape
    if kind == "MCAR":
        h = rng.random((N, D)) < 0.3
        h[: N // 20] = True                                                  # nothing observed
    else:
        p = 1 / (1 + np.exp(-2 * (X[:, :1] - np.median(X[:, 0]))))
        h = rng.random((N, D)) < 0.7 * p
        h[: N // 20] = True
        h[:, 0] = False
    return h


def cluster_mean(v, rows, N):
    """Mean of v and its standard error with the entries of a row as one cluster."""
    mu = v.mean()
    return mu, np.sqrt((np.bincount(rows, v - mu, minlength=N) ** 2).sum()) / v.size


def calibration():
    print("2. calibration on rows sampled from the model (K = 99 draws; +- one SE)")
    K = 99
    for S, hidden, D, sig, N, seed in [(1, (8, 8), 4, 0.2, 4000, 1), (2, (8, 8), 5, 0.3, 1500, 2),
                                       (2, (10,), 4, [0.1, 0.4, 0.2, 0.05], 1500, 3), (3, (5, 5), 4, 0.3, 300, 4)]:
        model = CPAModel(random_net(S, hidden, D, seed, slope=0.1, scale=2.0), noise_std=sig, device="cpu")
        X = model.sample(N, seed=seed)
        for kind in ("MCAR", "MAR"):
            h = masks(X, kind, np.random.default_rng(seed + 100))
            res = impute(model.net, model.partition(), model.noise_std, np.where(h, np.nan, X), std=True,
                         draws=K, seed=seed)
            rows = np.nonzero(h)[0]
            z = ((X - res.mean) / np.where(h, res.std, 1))[h]
            zm, zs = cluster_mean(z, rows, N)
            z2, z2s = cluster_mean(z * z, rows, N)
            gm, gs = cluster_mean((np.abs(z) <= stats.norm.ppf(0.95)).astype(float), rows, N)
            d = res.draws[:, h]
            rank = (d < X[h]).sum(0)                                         # uniform on 0..K
            cm, cs = cluster_mean(((rank >= 5) & (rank <= 94)).astype(float), rows, N)
            p = stats.chisquare(np.bincount(rank // 10, minlength=10)).pvalue
            dz2 = np.mean(((d.mean(0) - res.mean[h]) / (res.std[h] / np.sqrt(K))) ** 2)
            vr = np.mean(d.var(0, ddof=1) / res.std[h] ** 2)
            print(f"  S={S} {kind:4s} {h.sum():5d} entries: z mean {zm:+.3f}±{zs:.3f}  E z^2 {z2:.3f}±{z2s:.3f}  "
                  f"rank-90% {cm:.3f}±{cs:.3f}  Gaussian-90% {gm:.3f}±{gs:.3f}  rank chi2 p {p:.2f}  "
                  f"draws: mean z^2 {dz2:.3f} (1), var/std^2 {vr:.4f} (1)", flush=True)


def grid_moments(net, sigma, x, centre, L, n):
    """E[x_m | x_o] and its std by a 2-point Gauss-Legendre tensor grid on centre + [-L, L]^2 (S = 2)."""
    D = x.size
    sigma = np.broadcast_to(np.asarray(sigma, float), (D,))
    e = np.linspace(-L, L, n + 1)
    t = (0.5 * (e[1:] + e[:-1])[:, None] + 0.5 * (e[1] - e[0]) * np.array([-1, 1]) / np.sqrt(3)).ravel()
    Z = np.stack(np.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2) + centre
    o, m = ~np.isnan(x), np.isnan(x)
    G = net.forward(Z)
    lw = -0.5 * (Z ** 2).sum(1) - 0.5 * (((G[:, o] - x[o]) / sigma[o]) ** 2).sum(1)
    w = np.exp(lw - lw.max())
    w /= w.sum()
    mean = w @ G[:, m]
    return mean, np.sqrt(w @ (G[:, m] - mean) ** 2 + sigma[m] ** 2)


def quadrature():
    print("3. S = 2 rows against quadrature: max |code - fine| / max(|coarse - fine|, 1e-9) (must be < 1)")
    rng = np.random.default_rng(0)
    for hidden, D, sig, far in [((8, 8), 5, 0.3, 0.0), ((10,), 4, [0.1, 0.4, 0.2, 0.05], 0.0), ((8,), 4, 0.3, 8.0)]:
        net = random_net(2, hidden, D, int(rng.integers(100)), slope=0.1, scale=2.0)
        model = CPAModel(net, noise_std=sig, device="cpu")
        X = model.sample(6, seed=1) + far
        for i in range(len(X)):
            X[i, rng.permutation(D)[: 1 + i % (D - 1)]] = np.nan
        res = model.imputation(X, std=True)
        post = model.posterior(X)
        ratio = 0.0
        for i, x in enumerate(X):
            m = np.isnan(x)
            # the grid around the posterior: its mean +- 9 plus the spread of its regions' means
            L = 9.0 + np.abs(post.pair_mean[post.pair_row == i] - post.z_mean[i]).max()
            (a1, s1), (a2, s2) = (grid_moments(net, sig, x, post.z_mean[i], L, n) for n in (700, 1400))
            q = max(np.abs(a1 - a2).max(), np.abs(s1 - s2).max())
            e = max(np.abs(res.mean[i, m] - a2).max(), np.abs(res.std[i, m] - s2).max())
            ratio = max(ratio, e / max(q, 1e-9))          # an affine posterior: both ~1e-14
        print(f"  hidden={hidden} sigma={np.ravel(sig)[0]} rows shifted by {far}: {ratio:.3f}")


if __name__ == "__main__":
    warnings.simplefilter("ignore", RuntimeWarning)
    closed_form()
    calibration()
    quadrature()
