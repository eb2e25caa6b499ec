"""Probabilistic PCA by its closed form (Tipping & Bishop 1999), as a CPAModel.

    z ~ N(0, I_K),   x | z ~ N(W z + mu, s^2 I_D),   so   x ~ N(mu, W W^T + s^2 I).

The maximum-likelihood fit on rows X (N, D): mu the data mean; with the sample
covariance C = (1/N) sum (x - mu)(x - mu)^T = U diag(lambda) U^T (lambda descending),
    s^2 = mean(lambda_{K+1}, ..., lambda_D),   W = U_K (diag(lambda_1..K) - s^2 I)^{1/2}
(the rotation R = I; each column's sign is fixed so its largest-|.| entry is
positive, for reproducibility).  A linear generator has no hidden units, so the
likelihood engine scores it exactly with one region: the PPCA baseline of
``cpadgn compare``.
"""
from __future__ import annotations

import numpy as np

from .errors import CpadgnError
from .network import PiecewiseAffineNet
from .numerics import check_magnitude, check_spread


def ppca_parameters(X, K: int):
    """Closed-form PPCA fit: X (N, D), 1 <= K < D -> W (D, K), mu (D,), s2 (float)."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise CpadgnError(f"PPCA needs a 2-D table of rows, got shape {X.shape}; pass an (N, D) array")
    N, D = X.shape
    if not 1 <= K < D:
        raise CpadgnError(f"the PPCA latent dimension must be between 1 and D - 1 = {D - 1}, "
                          f"got {K}; use --baseline ppca:K with a smaller K")
    if N < 2:
        raise CpadgnError(f"PPCA needs at least 2 training rows, got {N}; pass more rows with --train")
    if not np.all(np.isfinite(X)):
        raise CpadgnError("the PPCA baseline is fitted in closed form, which needs complete training rows "
                          "(no NaN or inf); drop or impute the incomplete rows, or fit PPCA with the missing "
                          f"values by exact EM (cpadgn fit TRAIN -o ppca.h5 -S {K} --hidden none) and compare "
                          "that file as a model")
    check_magnitude(X, "training data")
    check_spread(X, "training data")
    mu = X.mean(axis=0)
    Xc = X - mu
    if N < D:
        # wide data: C's nonzero eigenpairs from the thin SVD of Xc, N^2 D work and N D memory
        # (the D x D matrix and its eigh took 77 s and 1.2 GB for 30 rows of 5,000 columns)
        sv, Vt = np.linalg.svd(Xc, full_matrices=False)[1:]
        lam, U = sv ** 2 / N, Vt.T
        total = float(np.einsum("ij,ij->", Xc, Xc) / N)
    else:
        C = (Xc.T @ Xc) / N
        lam, U = np.linalg.eigh(C)
        lam, U = lam[::-1], U[:, ::-1]
        total = float(np.trace(C))
    s2 = float((total - lam[:K].sum()) / (D - K))   # the mean of the discarded eigenvalues
    if total == 0:
        raise CpadgnError("every column of the training data is constant; there is nothing to fit: "
                          "pass rows that vary")
    if not s2 > 1e-12 * total and N <= K + 1:
        raise CpadgnError(f"{N} rows span at most {N - 1} direction(s) around their mean, no more than the "
                          f"latent dimension {K}, so the PPCA noise variance is 0; pass at least {K + 2} rows "
                          "or use a smaller latent dimension")
    if not s2 > 1e-12 * total:
        smaller = "use a smaller latent dimension (--latent-dim, or K in --baseline ppca:K), " if K > 1 else ""
        raise CpadgnError(f"the training data varies in at most {K} direction(s) to float64 precision "
                          f"(the other {D - K} hold less than 1e-12 of its variance), so the PPCA noise variance is 0; {smaller}check for a value far "
                          "larger than the rest, or pass more varied rows")
    UK = U[:, :K]
    flip = np.sign(UK[np.argmax(np.abs(UK), axis=0), np.arange(K)])
    UK = UK * np.where(flip == 0, 1.0, flip)
    W = UK * np.sqrt(np.maximum(lam[:K] - s2, 0.0))
    return W, mu, s2


def fit_ppca(X, K: int, *, device="cpu"):
    """PPCA fitted on X (N, D) with K latent dimensions, as a CPAModel (one linear
    layer W (D, K), bias mu, isotropic noise std s, prior N(0, I); no partition cache)."""
    from .model import CPAModel
    W, mu, s2 = ppca_parameters(X, K)
    net = PiecewiseAffineNet.from_arrays([W], [mu], [])
    return CPAModel(net, noise_std=np.sqrt(s2), device=device, cache_path=None)
