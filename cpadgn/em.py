"""Analytical, gradient-free EM for a piecewise-affine generator (DESIGN.md section 5).

Model (prior N(0, I), the folded coordinates of ``network``):

    z ~ N(0, I_S),   x | z ~ N(g(z), diag(var)),   g(z) = A_w z + b_w on region w.

E-step (``region_stats``)
    ``likelihood.posterior`` gives, for every (row n, region w) pair that matters, the
    responsibility r_nw and the truncated moments m_nw = E[z | x_n, z in w],
    V_nw = Cov[z | x_n, z in w] (pruning certified there).  With z~ = [z; 1] the
    M-step only needs, per region w,

        Z_w  = sum_n r_nw E[z~ z~^T | x_n, w]                 (S+1, S+1)
        XZ_w = sum_n r_nw x_n E[z~ | x_n, w]^T                (D, S+1)

    and sxx = sum_n x_n * x_n (D,): its cost does not depend on the number of rows.
    A missing entry is a latent variable like z (EM for missing data): its moments
    given x_o and w are those of g_d(z) + noise under the current parameters, so
    the same statistics hold with expectations in place of the missing values.

M-step (``m_step``)
    The regions (activation masks) of the current parameters are held fixed.  Inside
    region w, layer l's input is h_l(z) = M_w z + c_w (affine, from the layers below;
    h_0 = z), so with a~ = [h_l; 1] = T_w z~, T_w = [[M_w, c_w], [0, 1]], and
    Theta = [W_l, b_l] (n_{l+1}, n_l + 1):

        g(z) = P_w Theta a~ + e_w,

    P_w (D, n_{l+1}) the product of the layers above with their slope masks and e_w
    their bias contributions.  The expected complete-data log-likelihood

        Q(Theta) = -1/2 sum_{n,w} r_nw E[ ||x_n - e_w - P_w Theta a~||^2_Psi | x_n, w ] + const,

    Psi = diag(1 / var), is a concave quadratic in Theta; its stationary point solves
    the Kronecker-structured normal equations

        sum_w K_w Theta C_w = sum_w (V_w - f_w Z_w[-1]^T) T_w^T                     (*)

    with K_w = P_w^T Psi P_w, C_w = T_w Z_w T_w^T, V_w = P_w^T Psi XZ_w and
    f_w = P_w^T Psi e_w, computed by a backward recursion that never forms P_w:
        K^(l) = D_l W_{l+1}^T K^(l+1) W_{l+1} D_l,   V^(l) = D_l W_{l+1}^T V^(l+1),
        f^(l) = D_l W_{l+1}^T (f^(l+1) + K^(l+1) b_{l+1}),
    starting from K = Psi, V = Psi XZ_w, f = 0 at the output layer (D_l the slope
    mask of hidden layer l in region w).  (*) is solved densely when
    n_{l+1} (n_l + 1) <= ``dense_max`` and by preconditioned conjugate gradients on
    the operator Theta -> sum_w K_w Theta C_w otherwise.  Directions Q does not see
    (dead units, units with zero outgoing weights) are left unchanged.  The output
    layer (P = I) is ordinary least squares: Theta C = B, C = sum_w C_w,
    B = sum_w XZ_w T_w^T, whatever Psi (solved on C's eigen-directions above sqrt(eps)
    of the largest; ``solve_output``).  Layers are updated bottom-up (block
    coordinate ascent; ``sweeps`` passes), then the noise in closed form:

        var_d = (sxx_d - 2 Theta_d . B_d + Theta_d C Theta_d^T) / N   (diagonal)
        var   = mean_d var_d                                          (isotropic)

    floored at ``var_floor``.

Because the partition moves with the hidden weights, the M-step is not guaranteed to
raise the exact likelihood: ``fit.fit_em`` checks it and backtracks.  An update of
the output layer and noise alone never moves the partition, so it is a true EM step
(``m_step(..., output_only=True)``), the fallback that keeps the likelihood monotone.

Initialisation (``init_ppca``, ``init_random``) is deterministic given the seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse

from .errors import CpadgnError
from .network import PiecewiseAffineNet

LOG_2PI = float(np.log(2 * np.pi))


# ===================================================================== E-step statistics
@dataclass
class RegionStats:
    """Sufficient statistics of one E-step, over the Ra regions with responsibility.

    regions: (Ra,) int64 region indices into the partition
    Z:       (Ra, S+1, S+1) sum_n r_nw E[z~ z~^T | x_n, w], z~ = [z; 1]
    XZ:      (Ra, D, S+1)   sum_n r_nw E[x_n z~^T | x_n, w]  (= x_n E[z~ | x_n, w]^T when complete)
    sxx:     (D,)            sum_n E[x_nd^2 | x_n]
    n_rows:  N
    """

    regions: np.ndarray
    Z: np.ndarray
    XZ: np.ndarray
    sxx: np.ndarray
    n_rows: int


def region_stats(pair_row, pair_region, pair_responsibility, pair_mean, pair_cov, X, *,
                 net: PiecewiseAffineNet | None = None, patterns=None, var=None) -> RegionStats:
    """Per-region sums of one E-step from the (row, region) pairs of ``posterior``.

    pair_row, pair_region (P,) int; pair_responsibility (P,); pair_mean (P, S);
    pair_cov (P, S, S) (folded coordinates, prior N(0, I)); X (N, D), NaN = missing.

    A missing x_nd is latent too (EM for missing data): given the region, x_nd =
    theta_wd . z~ + noise with theta_wd = [A_w,d, b_w,d] of the current ``net``, so
    E[x_nd z~^T | x_o, w] = theta_wd E[z~ z~^T | x_o, w] and E[x_nd^2 | x_o, w] =
    theta_wd E[z~ z~^T | x_o, w] theta_wd^T + var_d.  Rows with missing entries need
    ``net``, the partition's ``patterns`` (R, K) and the current ``var`` (D,).
    """
    X = np.asarray(X, dtype=np.float64)
    N, D = X.shape
    r = np.asarray(pair_responsibility, dtype=np.float64)
    keep = r > 0
    rows = np.asarray(pair_row)[keep]
    reg = np.asarray(pair_region)[keep]
    r = r[keep]
    m, V = np.asarray(pair_mean)[keep], np.asarray(pair_cov)[keep]
    P, S = m.shape
    regions, inv = np.unique(reg, return_inverse=True)
    Ra = regions.size
    mt = np.concatenate([m, np.ones((P, 1))], axis=1)                  # E[z~ | x, w]
    E2 = mt[:, :, None] * mt[:, None, :]
    E2[:, :S, :S] += V
    A = scipy.sparse.csr_matrix((r, (inv, np.arange(P))), shape=(Ra, P))
    Z = np.asarray(A @ E2.reshape(P, -1)).reshape(Ra, S + 1, S + 1)
    Z = 0.5 * (Z + np.swapaxes(Z, 1, 2))
    miss = np.isnan(X)
    X0 = np.where(miss, 0.0, X)
    XZ = np.empty((Ra, D, S + 1))
    for k in range(S + 1):
        Bk = scipy.sparse.csr_matrix((r * mt[:, k], (inv, rows)), shape=(Ra, N))
        XZ[:, :, k] = Bk @ X0
    sxx = (X0 * X0).sum(0)
    if miss.any():
        if net is None or patterns is None or var is None:
            raise ValueError("rows with missing entries need net, patterns and var")
        sxx += np.broadcast_to(np.asarray(var, dtype=np.float64), (D,)) * miss.sum(0)
        pairs = np.flatnonzero(miss[rows].any(1))
        step = max(1, int(4e6 // (D * (S + 1))))
        Au, bu = net.region_maps(patterns[regions])                      # each region once
        theta_u = np.concatenate([Au, bu[:, :, None]], axis=2)           # (Ra, D, S+1)
        for start in range(0, pairs.size, step):
            p = pairs[start:start + step]
            theta = theta_u[inv[p]]                                      # (p, D, S+1)
            # E[x_d z~^T] per missing d, theta E2 written out (np.matmul is slow on tiny matrices)
            fill = sum(theta[:, :, j, None] * E2[p, None, j, :] for j in range(S + 1))
            fill *= miss[rows[p], :, None]                               # observed entries: 0
            sxx += r[p] @ (fill * theta).sum(2)
            XZ += np.asarray(A[:, p] @ fill.reshape(p.size, -1)).reshape(Ra, D, S + 1)   # r-weighted
    return RegionStats(regions=regions.astype(np.int64), Z=Z, XZ=XZ, sxx=sxx, n_rows=N)


def stats_from_posterior(post, X, **fill) -> RegionStats:
    """``region_stats`` of a ``likelihood.PosteriorResult`` (folded coordinates); ``fill``
    (net, patterns, var) as there, for rows with missing entries."""
    return region_stats(post.pair_row, post.pair_region, post.pair_responsibility,
                        post.pair_mean, post.pair_cov, X, **fill)


# ===================================================================== the E-step
@dataclass
class EStep:
    """The exact E-step of complete rows (folded coordinates, prior N(0, I)).

    log_likelihood (N,): log p(x_n) summed over the evaluated (row, region) pairs, a
        certified lower bound: the true value is at most ``error_bound`` (N,) above;
    pair_row, pair_region (P,), pair_responsibility (P,), pair_mean (P, S) =
        E[z | x, z in w], pair_cov (P, S, S) = Cov[z | x, z in w] (zeros without moments);
    stderr (N,): Monte Carlo standard error of log_likelihood (S >= 4; 0 otherwise);
    rounding_error (N,): how far float64 rounding may move log_likelihood
    (``numerics.rounding_error_estimate``).
    """

    log_likelihood: np.ndarray
    error_bound: np.ndarray
    stderr: np.ndarray
    rounding_error: np.ndarray
    pair_row: np.ndarray
    pair_region: np.ndarray
    pair_responsibility: np.ndarray
    pair_mean: np.ndarray
    pair_cov: np.ndarray


def e_step(net: PiecewiseAffineNet, part, noise_std, X, *, rtol: float = 1e-8, moments: bool = True,
           device="cpu", memory_budget: float = 5e8, tab=None) -> EStep:
    """Exact log p(x) and the truncated posterior moments of every (row, region) pair that
    matters, for complete rows X (N, D): ``likelihood.posterior`` with the pruning
    tolerance as a parameter.  log_likelihood is exact to log(1 + rtol) (the certified
    per-row ``error_bound``) and the responsibilities to a relative rtol, at a fraction
    of the pairs that the default rtol (1e-10) needs when posteriors are broad.
    """
    from . import likelihood as lik
    post = lik.posterior(net, part, noise_std, X, tab=tab, device=device, rtol=rtol,
                         memory_budget=memory_budget, moments=moments)
    return EStep(post.log_likelihood, post.error_bound, post.stderr, post.rounding_error, post.pair_row,
                 post.pair_region,
                 post.pair_responsibility, post.pair_mean, post.pair_cov)


# ===================================================================== region algebra
def slope_masks(net: PiecewiseAffineNet, patterns: np.ndarray) -> list:
    """Per hidden layer l the slope of every unit in every region: list of (R, n_{l+1})."""
    patterns = np.asarray(patterns, dtype=bool)
    if not net.slopes:
        return []
    splits = np.cumsum(net.hidden_sizes)[:-1]
    return [np.where(q, 1.0, a) for q, a in zip(np.split(patterns, splits, axis=1), net.slopes)]


def _lift(M: np.ndarray, c: np.ndarray) -> np.ndarray:
    """T = [[M, c], [0, 1]]: (R, n, S), (R, n) -> (R, n+1, S+1), so [h; 1] = T [z; 1]."""
    R, n, S = M.shape
    T = np.zeros((R, n + 1, S + 1))
    T[:, :n, :S] = M
    T[:, :n, S] = c
    T[:, n, S] = 1.0
    return T


def _step_forward(W, b, mask, M, c):
    """From h_l = M z + c to h_{l+1} = mask * (W h_l + b): (R, n_l, S), (R, n_l) -> next."""
    G = np.einsum("ij,rjs->ris", W, M)
    cu = c @ W.T + b
    return mask[:, :, None] * G, mask * cu


def _backward(Ws, bs, masks, psi, XZ):
    """K (R, n, n), V (R, n, S+1), f (R, n) of every hidden layer's outputs, l = 0..L-2.

    K_w = P_w^T Psi P_w, V_w = P_w^T Psi XZ_w, f_w = P_w^T Psi e_w for the map
    g = P_w u_{l+1} + e_w from layer l's pre-activation u_{l+1} to the output.
    """
    L = len(Ws)
    out = [None] * (L - 1)
    if L < 2:
        return out
    W, b, mask = Ws[-1], bs[-1], masks[-1]
    Wp = W * psi[:, None]                                                # Psi W (D, n)
    G = W.T @ Wp
    K = mask[:, :, None] * G[None] * mask[:, None, :]
    V = mask[:, :, None] * np.einsum("dn,rdk->rnk", Wp, XZ)
    f = mask * (Wp.T @ b)[None]
    out[L - 2] = (K, V, f)
    for l in range(L - 3, -1, -1):
        W, b, mask = Ws[l + 1], bs[l + 1], masks[l]
        Kp, Vp, fp = out[l + 1]
        K = np.matmul(W.T[None], np.matmul(Kp, W[None]))
        K = mask[:, :, None] * K * mask[:, None, :]
        V = mask[:, :, None] * np.matmul(W.T[None], Vp)
        f = mask * ((fp + Kp @ b) @ W)
        out[l] = (K, V, f)
    return out


# ===================================================================== layer solves
@dataclass
class SolveInfo:
    """How one layer's normal equations were solved."""
    layer: int
    method: str          # "dense", "cg", "lstsq" (output layer)
    size: int            # number of unknowns
    iterations: int = 0  # CG iterations
    residual: float = 0.0  # relative residual of the normal equations


def _blas_single_thread():
    """A context that runs BLAS/LAPACK single-threaded (threadpoolctl when installed).

    The M-step's dense solves are small (<= ~1500 unknowns), where OpenBLAS's thread
    start-up and spinning cost more than the work, by 10-100x on a loaded machine.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:                                   # pragma: no cover
        import contextlib
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _sym_solve(H: np.ndarray, g: np.ndarray, damping: float = 0.0) -> np.ndarray:
    """Minimum-change solution of H d = g for a symmetric PSD H: (k, k), (k, ...) -> d.

    Directions with zero curvature (exactly zero diagonal: dead units, zero outgoing
    weights) get d = 0; a relative ridge of 1e-12 regularises near-singular ones; an
    eigen-decomposition pseudo-inverse is the fallback.
    """
    diag = np.diag(H)
    scale = float(diag.max(initial=0.0))
    d = np.zeros_like(g)
    if scale <= 0:
        return d
    act = diag > 1e-14 * scale
    Ha = H[np.ix_(act, act)]
    ga = g[act]
    ridge = 1e-12 * float(diag[act].mean())
    Hd = Ha + np.diag(ridge + damping * diag[act])
    try:
        cf = scipy.linalg.cho_factor(Hd, lower=True, check_finite=False)
        da = scipy.linalg.cho_solve(cf, ga, check_finite=False)
    except np.linalg.LinAlgError:
        lam, U = np.linalg.eigh(Hd)
        keep = lam > 1e-12 * lam.max(initial=0.0)
        coef = U[:, keep].T @ ga
        coef = coef / (lam[keep][:, None] if coef.ndim > 1 else lam[keep])
        da = U[:, keep] @ coef
    d[act] = da
    return d


def layer_normal_equations(K, T, Z, V, f):
    """The pieces of (*) for one hidden layer.

    K (R, n, n), T (R, m, S+1) (m = n_l + 1), Z (R, S+1, S+1), V (R, n, S+1), f (R, n)
    -> C (R, m, m) with C_w = T_w Z_w T_w^T, and the right-hand side (n, m).
    """
    C = np.matmul(np.matmul(T, Z), np.swapaxes(T, 1, 2))
    Y = V - f[:, :, None] * Z[:, None, -1, :]
    rhs = np.tensordot(Y, T, axes=([0, 2], [0, 2]))
    return C, rhs


def solve_layer(K, T, Z, V, f, Theta0, *, dense_max=1500, cg_tol=1e-10, cg_maxiter=None,
                layer=0, damping=0.0):
    """Maximise Q over one hidden layer's Theta = [W_l, b_l] (n, m), the others fixed.

    Solves sum_w K_w Theta C_w = rhs for the change from Theta0 (dense when n m <=
    dense_max, else Jacobi-preconditioned CG started at Theta0, whose iterates raise Q
    monotonically even when stopped early).  Returns (Theta (n, m), SolveInfo).
    """
    n, m = Theta0.shape
    C, rhs = layer_normal_equations(K, T, Z, V, f)
    if n * m <= dense_max:
        H = np.tensordot(K, C, axes=([0], [0])).transpose(0, 2, 1, 3).reshape(n * m, n * m)
        H = 0.5 * (H + H.T)
        g = rhs.ravel() - H @ Theta0.ravel()
        d = _sym_solve(H, g, damping)
        res = float(np.linalg.norm(g - H @ d - damping * np.diag(H) * d) / max(np.linalg.norm(rhs), 1e-300))
        return Theta0 + d.reshape(n, m), SolveInfo(layer, "dense", n * m, 0, res)
    # conjugate gradients on the operator, low-rank form C_w = T_w Z_w T_w^T
    TZ = np.matmul(T, Z)                                                   # (R, m, S+1)

    diagK = np.einsum("rii->ri", K)
    diagC = np.einsum("rak,rak->ra", TZ, T)
    dH = diagK.T @ diagC                                                   # (n, m), diag of the operator
    live = dH > 1e-14 * max(float(dH.max(initial=0.0)), 1e-300)

    def op(Th):                                                            # sum_w K_w Th C_w
        Y = np.matmul(K, np.matmul(Th[None], TZ))                          # (R, n, S+1)
        return np.tensordot(Y, T, axes=([0, 2], [0, 2]))

    def op_damped(Th):
        return (op(Th) + damping * dH * Th) * live

    inv_prec = np.where(live, 1.0 / np.where(live, dH * (1.0 + damping), 1.0), 0.0)
    x = np.zeros((n, m))
    r = (rhs - op(Theta0)) * live
    z = r * inv_prec
    p = z.copy()
    rz = float((r * z).sum())
    b_norm = max(float(np.linalg.norm(rhs)), 1e-300)
    maxiter = cg_maxiter or min(4 * n * m, 1000)
    it = 0
    while it < maxiter and np.linalg.norm(r) > cg_tol * b_norm:
        Ap = op_damped(p)
        pAp = float((p * Ap).sum())
        if pAp <= 0:
            break
        alpha = rz / pAp
        x += alpha * p
        r -= alpha * Ap
        z = r * inv_prec
        rz_new = float((r * z).sum())
        p = z + (rz_new / rz) * p
        rz = rz_new
        it += 1
    res = float(np.linalg.norm(r) / b_norm)
    return Theta0 + x, SolveInfo(layer, "cg", n * m, it, res)


def output_normal_equations(T, Z, XZ):
    """C = sum_w T_w Z_w T_w^T (m, m) and B = sum_w XZ_w T_w^T (D, m) of the output layer."""
    C = np.tensordot(np.matmul(T, Z), T, axes=([0, 2], [0, 2]))
    B = np.tensordot(XZ, T, axes=([0, 2], [0, 2]))
    return 0.5 * (C + C.T), B


OUTPUT_RANK_TOL = float(np.sqrt(np.finfo(np.float64).eps))


def solve_output(C, B, Theta0):
    """Weighted least squares of the output layer: Theta C = B (Theta (D, m)), minimum change.

    C (m, m) is often exactly singular: with S = 1 the R regions holding the data lie
    along a line, adjacent ones differ in one unit's mask, so C has rank R + 1 < m when
    R < n_L (a piecewise-linear curve with R - 1 kinks has R + 1 degrees of freedom).
    Along such a null direction u the right-hand side (B - Theta0 C) u is 0 only up to its
    rounding, ~ eps ||Theta0|| ||C||, and a ridge rho turned that into a step of
    eps ||Theta0|| ||C|| / rho: with rho = 1e-12 mean(diag C) a one-ulp change of the data
    moved the weights by 4e-4 (wave.csv, 40 rows, hidden (4,), second iteration), which the
    next steps carried into the likelihood (4.5e-6 nats per row).  So the step is the
    minimum-change solution on the eigen-directions of C with eigenvalue above
    ``OUTPUT_RANK_TOL`` (sqrt(eps)) times the largest; the others keep Theta0's value.
    Rounding then moves Theta by at most ~ eps ||C|| ||Theta0|| / lambda_kept
    <= sqrt(eps) ||Theta0|| along any direction, and Q still does not decrease (the
    step maximises it over the kept directions).  The dropped curvature is below
    sqrt(eps) of the largest: that much posterior weight in a direction is below what
    its rounding can resolve reliably anyway.  Exactly dead columns stay unchanged.
    """
    G = (B - Theta0 @ C).T                                   # (m, D)
    d = np.zeros_like(G)
    diag = np.diag(C)
    scale = float(diag.max(initial=0.0))
    if scale <= 0:
        return Theta0.copy()
    act = diag > 1e-14 * scale
    lam, U = np.linalg.eigh(C[np.ix_(act, act)])
    keep = lam > OUTPUT_RANK_TOL * lam[-1]
    Uk = U[:, keep]
    d[act] = Uk @ ((Uk.T @ G[act]) / lam[keep][:, None])
    return Theta0 + d.T


def expected_sq_residual(C, B, sxx, Theta):
    """sum_{n,w} r_nw E[(x_nd - g_d(z))^2 | x_n, w] per output dim d (D,)."""
    return sxx - 2 * np.einsum("dm,dm->d", Theta, B) + np.einsum("dm,mk,dk->d", Theta, C, Theta)


def noise_update(C, B, sxx, Theta, n_rows, noise, var_floor=0.0):
    """Closed-form noise variance (D,) from the expected squared residuals.

    A variance of 0 (a column the generator fits exactly, e.g. a constant one, with
    var_floor 0) would make the likelihood infinite: refused in one line.  The residual is
    a difference of sums of size sxx, so one within 64 eps sxx of 0 is 0 to rounding: a
    constant column (sxx = 360) came out <= 0 or +5.7e-14 as the E-step's rounding went,
    and the positive one made a noise std of 1.3e-8 instead of the refusal."""
    resid = expected_sq_residual(C, B, sxx, Theta)
    resid = np.where(resid > 64 * np.finfo(np.float64).eps * np.abs(sxx), resid, 0.0) / n_rows
    var = np.maximum(np.full_like(resid, resid.mean()) if noise == "iso" else resid, var_floor)
    if not (var > 0).all():
        where = "every column" if noise == "iso" else f"column {np.flatnonzero(var <= 0)[0] + 1}"
        raise CpadgnError(f"the noise variance of {where} fell to 0: the generator fits it exactly "
                          "(a constant column?), so the likelihood is unbounded; give --var-floor above 0 "
                          "(default 1e-6) or drop the column")
    return var


def expected_complete_loglik(C, B, sxx, Theta, var, n_rows) -> float:
    """sum_{n,w} r_nw E[log p(x_n | z) | x_n, w] (the part of Q that depends on the parameters)."""
    resid = expected_sq_residual(C, B, sxx, Theta)
    return float(-0.5 * (n_rows * (LOG_2PI * var.size + np.log(var).sum()) + (resid / var).sum()))


# ===================================================================== the M-step
@dataclass
class MStepInfo:
    solves: list
    q_before: float          # Q at the old parameters (fixed regions)
    q_after: float           # Q at the new parameters (fixed regions)


def m_step(net: PiecewiseAffineNet, patterns: np.ndarray, stats: RegionStats, var: np.ndarray, *,
           noise: str = "iso", sweeps: int = 1, output_only: bool = False, layers=None,
           update_noise: bool = True, damping: float = 0.0,
           dense_max: int = 1500, var_floor: float = 0.0, cg_tol: float = 1e-10,
           cg_maxiter: int | None = None):
    """Closed-form M-step with the regions ``patterns`` (Ra, K) (those of ``stats.regions``)
    held fixed.

    net: current generator; var: (D,) current noise variance.  Updates every layer
    bottom-up ``sweeps`` times (only the output layer with ``output_only``: that step
    leaves the partition unchanged; only the layers listed in ``layers`` when given),
    then the noise (unless ``update_noise`` is False).  Returns (new net, new var (D,),
    MStepInfo).
    """
    with _blas_single_thread():
        return _m_step(net, patterns, stats, var, noise=noise, sweeps=sweeps, output_only=output_only,
                       layers=layers, update_noise=update_noise, damping=damping, dense_max=dense_max,
                       var_floor=var_floor, cg_tol=cg_tol, cg_maxiter=cg_maxiter)


def _m_step(net, patterns, stats, var, *, noise, sweeps, output_only, layers, update_noise, damping,
            dense_max, var_floor, cg_tol, cg_maxiter):
    var = np.broadcast_to(np.asarray(var, dtype=np.float64), (net.output_dim,)).copy()
    Ws = [W.copy() for W in net.weights]
    bs = [b.copy() for b in net.biases]
    L = len(Ws)
    if output_only:
        layers = [L - 1]
    todo = set(range(L)) if layers is None else {int(l) % L for l in layers}
    R, S = stats.Z.shape[0], net.latent_dim
    masks = slope_masks(net, patterns)
    psi = 1.0 / var
    solves = []
    C, B = _output_stats(Ws, bs, masks, stats)
    q_before = expected_complete_loglik(C, B, stats.sxx, np.concatenate([Ws[-1], bs[-1][:, None]], 1),
                                        var, stats.n_rows)
    hidden_todo = any(l < L - 1 for l in todo)
    for _ in range(max(1, sweeps) if hidden_todo else 1):
        back = _backward(Ws, bs, masks, psi, stats.XZ) if hidden_todo else None
        M = np.broadcast_to(np.eye(S), (R, S, S))
        c = np.zeros((R, S))
        for l in range(L):
            T = _lift(M, c)
            Theta0 = np.concatenate([Ws[l], bs[l][:, None]], axis=1)
            if l == L - 1:
                C, B = output_normal_equations(T, stats.Z, stats.XZ)
                if l in todo:
                    Theta = solve_output(C, B, Theta0)
                    solves.append(SolveInfo(l, "lstsq", Theta.size, 0, 0.0))
                else:
                    Theta = Theta0
            elif l not in todo:
                Theta = Theta0
            else:
                K, V, f = back[l]
                Theta, info = solve_layer(K, T, stats.Z, V, f, Theta0, dense_max=dense_max,
                                          cg_tol=cg_tol, cg_maxiter=cg_maxiter, layer=l,
                                          damping=damping)
                solves.append(info)
            Ws[l], bs[l] = np.ascontiguousarray(Theta[:, :-1]), np.ascontiguousarray(Theta[:, -1])
            if l < L - 1:
                M, c = _step_forward(Ws[l], bs[l], masks[l], M, c)
    Theta = np.concatenate([Ws[-1], bs[-1][:, None]], axis=1)
    if update_noise:
        var = noise_update(C, B, stats.sxx, Theta, stats.n_rows, noise, var_floor)
    q_after = expected_complete_loglik(C, B, stats.sxx, Theta, var, stats.n_rows)
    new = PiecewiseAffineNet.from_arrays(Ws, bs, net.slopes)
    return new, var, MStepInfo(solves, q_before, q_after)


def _output_stats(Ws, bs, masks, stats):
    """C (m, m), B (D, m) of the output layer for the current weights (forward pass)."""
    R, S = stats.Z.shape[0], stats.Z.shape[1] - 1
    M = np.broadcast_to(np.eye(S), (R, S, S))
    c = np.zeros((R, S))
    for l in range(len(Ws) - 1):
        M, c = _step_forward(Ws[l], bs[l], masks[l], M, c)
    return output_normal_equations(_lift(M, c), stats.Z, stats.XZ)


def interpolate(net_old: PiecewiseAffineNet, net_new: PiecewiseAffineNet, var_old, var_new, eta: float):
    """The damped step old + eta (new - old) of every weight and bias, and of log var."""
    Ws = [a + eta * (b - a) for a, b in zip(net_old.weights, net_new.weights)]
    bs = [a + eta * (b - a) for a, b in zip(net_old.biases, net_new.biases)]
    var = np.exp(np.log(var_old) + eta * (np.log(var_new) - np.log(var_old)))
    return PiecewiseAffineNet.from_arrays(Ws, bs, net_old.slopes), var


# ===================================================================== initialisation
def init_ppca(X, latent_dim: int, hidden, slope: float, seed: int, *, noise_scale: float = 1.0,
              random_scale: float = 1.0, offset: float = 10.0):
    """The PPCA maximum-likelihood solution embedded in a network, plus seeded random
    units: returns (net, var (D,)).

    PPCA (Tipping and Bishop): x = W z + mu + noise, W (D, S), var s^2 (``ppca``).
    Hidden unit i < S of every layer carries z_i through with an offset that keeps it
    on its identity side: layer 0 u_i = z_i + ``offset`` (10), layer l > 0
    u_i = h_i + 5, so act(u) = u wherever z_i > -10 for any slope (ReLU, leaky ReLU,
    abs); the output layer is W on those units with bias mu - W (10 + 5 (L - 2)) 1.
    The network therefore computes the PPCA mean exactly on {z : min_i z_i > -10}
    (prior mass outside below 1e-22 S), and its breakpoints there are the random
    units' only; unit pairs +-u would reproduce it everywhere but put duplicate
    hyperplanes through the data, which makes degenerate regions.
    The other units get seeded random incoming weights N(0, random_scale^2 / fan_in)
    (the carried units' offsets compensated in the bias), biases N(0, 0.5^2) in layer
    0 and N(0, 0.1^2) above, and zero outgoing weights.  The noise variance is the
    PPCA one times ``noise_scale``^2: with 1, EM starts at the PPCA likelihood; a small
    scale (``fit_em`` uses 0.1) starts EM with sharp posteriors, which lets it leave the
    PPCA plateau in a few iterations (see ``fit_em``).  Hidden widths below S fall back
    to ``init_random``.
    """
    from .ppca import ppca_parameters
    X = np.asarray(X, dtype=np.float64)
    N, D = X.shape
    S = int(latent_dim)
    hidden = [int(h) for h in hidden]
    if S >= D:
        raise CpadgnError(f"the latent dimension ({S}) must be below the data dimension ({D}); pass a "
                          f"latent dimension of at most {D - 1}")
    Wp, mu, s2 = ppca_parameters(X, S)
    if hidden and min(hidden) < S:
        net, var = init_random(X, S, hidden, slope, seed)
        return net, var * noise_scale ** 2
    rng = np.random.default_rng(seed)
    sizes = [S, *hidden]
    Ws, bs = [], []
    carried = np.zeros(S)                  # offset of the carried units in the previous layer
    for l, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        W = rng.normal(size=(n_out, n_in)) * random_scale / np.sqrt(n_in)
        b = rng.normal(size=n_out) * (0.5 if l == 0 else 0.1)
        if l > 0:
            b -= W[:, :S] @ carried        # the random units see z_i, not z_i + offset
        W[:S] = 0.0
        W[np.arange(S), np.arange(S)] = 1.0
        b[:S] = offset if l == 0 else 5.0
        carried = carried + b[:S]
        Ws.append(W)
        bs.append(b)
    Wo = np.zeros((D, sizes[-1]))
    if hidden:
        Wo[:, :S] = Wp
        bo = mu - Wp @ carried
    else:
        Wo[:] = Wp
        bo = mu.copy()
    Ws.append(Wo)
    bs.append(bo)
    net = PiecewiseAffineNet.from_arrays(Ws, bs, [slope] * len(hidden))
    return net, np.full(D, s2 * noise_scale ** 2)


def init_random(X, latent_dim: int, hidden, slope: float, seed: int):
    """Seeded random initialisation: (net, var (D,)).

    Hidden layers: weights N(0, 2 / (fan_in (1 + a^2))) (He), biases N(0, 0.1^2);
    output layer N(0, 0.1^2 / fan_in) times the data std, bias the data mean; noise
    variance the mean data variance.
    """
    X = np.asarray(X, dtype=np.float64)
    D = X.shape[1]
    rng = np.random.default_rng(seed)
    sizes = [int(latent_dim), *[int(h) for h in hidden]]
    Ws, bs = [], []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        Ws.append(rng.normal(size=(n_out, n_in)) * np.sqrt(2.0 / (n_in * (1 + slope ** 2))))
        bs.append(rng.normal(size=n_out) * 0.1)
    scale = float(np.sqrt(X.var(0).mean()))
    Ws.append(rng.normal(size=(D, sizes[-1])) * 0.1 * scale / np.sqrt(sizes[-1]))
    bs.append(X.mean(0))
    net = PiecewiseAffineNet.from_arrays(Ws, bs, [slope] * len(hidden))
    return net, np.full(D, float(X.var(0).mean()))
