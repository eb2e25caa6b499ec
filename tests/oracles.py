"""Independent oracles for the exact likelihood: quadrature written from scratch here,
sharing no code with cpadgn beyond the network's forward pass."""
import functools

import numpy as np
from scipy import integrate
from scipy.optimize import nnls

from cpadgn.network import PiecewiseAffineNet

GL_X, GL_W = np.polynomial.legendre.leggauss(60)


def torch_forward(model, z):
    """torch's own forward pass of a decoder on latents z (N, S) (float64 numpy in and out):
    the oracle every loaded generator must reproduce."""
    import torch
    with torch.no_grad():
        return model(torch.from_numpy(z)).numpy()


def forward_rounding_tol(net, z):
    """Bound on |fl(g(z)) - g(z)| per output, (N, D), for two forward passes of the same
    generator that differ only in rounding (torch's layers against the folded dense net).

    Derivation (Higham, Accuracy and Stability, 3.5).  A layer u = W a + b computed in
    float64 errs by at most gamma_n (|W| |a| + |b|), gamma_n = n eps / (1 - n eps) with n
    its fan-in, whatever the kernel; an activation with |slope| <= 1 does not grow an
    error, and a later layer carries an earlier error through |W|.  The magnitudes
    m_0 = |z|, m_l = |W_l| m_(l-1) + |b_l| (1 + 2 |m_(l-1)|_1) therefore bound every term
    that rounds, the second part covering the folding of a layer as fn(e_j) - fn(0)
    (each folded column carries one rounding of the bias).  Each of the L layers adds at
    most gamma_n m_L at the output; twice that covers both passes.
    """
    eps = np.finfo(np.float64).eps
    n = max(W.shape[1] for W in net.weights) + 1
    gamma = n * eps / (1 - n * eps)
    m = np.abs(np.asarray(z, dtype=np.float64))
    for W, b, slope in zip(net.weights, net.biases, (*net.slopes, None)):
        m = m @ np.abs(W).T + np.abs(b) * (1 + 2 * m.sum(1, keepdims=True))
        if slope is not None:
            m = m * np.maximum(1.0, np.abs(slope))
    return 2 * len(net.weights) * gamma * m


def assert_matches_torch(net, model, z, err_msg=""):
    """The folded net reproduces torch's forward pass of model on z to rounding."""
    got, want = net.forward(z), torch_forward(model, z)
    tol = forward_rounding_tol(net, z)
    bad = np.abs(got - want) > tol
    assert not bad.any(), f"{err_msg}: max excess {np.max(np.abs(got - want) - tol):.3g} over the rounding bound"


def random_net(S, hidden, D, seed, slope=0.1, scale=1.0):
    rng = np.random.default_rng(seed)
    sizes = [S, *hidden, D]
    Ws = [scale * rng.normal(size=(o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])]
    bs = [scale * rng.normal(size=o) * 0.5 for o in sizes[1:]]
    return PiecewiseAffineNet.from_arrays(Ws, bs, [slope] * len(hidden))


def line_breakpoints(f_pre, lo, hi, n=20001):
    """Points in [lo, hi] where a pre-activation of a 1-D piecewise-affine map changes
    sign: a dense grid, then vectorised bracketing on each unit's own pre-activation:
    10 rounds of 63 points a bracket (each keeps the first sign change), 2^-60 of the grid
    step as 60 bisections would give, in 10 calls of f_pre instead of 60."""
    t = np.linspace(lo, hi, n)
    s = f_pre(t) >= 0
    i, k = np.nonzero(s[1:] != s[:-1])
    a, b = t[i], t[i + 1]
    sa = s[i, k]
    split, pairs = 64, np.arange(a.size)
    frac = np.arange(1, split) / split
    for _ in range(10):
        pts = np.concatenate([a[:, None], a[:, None] + (b - a)[:, None] * frac, b[:, None]], axis=1)
        u = f_pre(pts[:, 1:-1].ravel()).reshape(a.size, split - 1, -1)
        changed = (u[pairs, :, k] >= 0) != sa[:, None]                 # (P, split - 1)
        j = np.where(changed.any(1), changed.argmax(1) + 1, split)     # first point past the change
        a, b = pts[pairs, j - 1], pts[pairs, j]
    return np.unique(0.5 * (a + b))


def _log_joint(net, x, var, z):
    """log N(x_o; g(z), var) + log N(z; 0, I) for z (n, S), NaN in x = missing."""
    obs = ~np.isnan(x)
    r = net.forward(z)[:, obs] - x[obs]
    S = z.shape[1]
    return (-0.5 * (r * r / var[obs]).sum(1) - 0.5 * obs.sum() * np.log(2 * np.pi)
            - 0.5 * np.log(var[obs]).sum() - 0.5 * (z * z).sum(1) - 0.5 * S * np.log(2 * np.pi))


def _piecewise_gl(logf, breaks, lo, hi):
    """log int_lo^hi exp(logf) over the pieces between breaks, 60-point GL per piece
    (each piece is a Gaussian in t, so GL on it converges spectrally); also returns
    int t exp(logf) and int t^2 exp(logf) relative to the same scale."""
    edges = np.concatenate([[lo], breaks[(breaks > lo) & (breaks < hi)], [hi]])
    a, b = edges[:-1, None], edges[1:, None]
    t = (0.5 * (b - a) * GL_X + 0.5 * (a + b)).ravel()
    logw = np.log((0.5 * (b - a) * GL_W).ravel())
    lf = logf(t) + logw
    m = lf.max()
    w = np.exp(lf - m)
    return m + np.log(w.sum()), (w * t).sum() / w.sum(), (w * t * t).sum() / w.sum()


def loglik_1d(net, x, noise_std, lo=-40.0, hi=40.0):
    """Exact-by-quadrature log p(x), E[z|x], E[z^2|x] for S = 1."""
    var = np.broadcast_to(np.asarray(noise_std, float) ** 2, (net.output_dim,))
    breaks = line_breakpoints(lambda t: net.preactivations(t[:, None]), lo, hi)
    # Refine: the Gaussian factor is narrow when the noise is small, so split at a fine grid too.
    grid = np.linspace(lo, hi, 4001)
    lz, m1, m2 = _piecewise_gl(lambda t: _log_joint(net, x, var, t[:, None]), np.union1d(breaks, grid), lo, hi)
    return lz, m1, m2


def loglik_2d(net, x, noise_std, lo=-12.0, hi=12.0):
    """log p(x) and E[z|x] for S = 2 by nested quadrature: exact piecewise GL along z2
    (breakpoints of the 1-D restriction) and adaptive vector quadrature over z1."""
    var = np.broadcast_to(np.asarray(noise_std, float) ** 2, (net.output_dim,))

    def inner(z1):
        line = lambda t: np.column_stack([np.full_like(t, z1), t])
        br = line_breakpoints(lambda t: net.preactivations(line(t)), lo, hi, n=1201)
        return _piecewise_gl(lambda t: _log_joint(net, x, var, line(t)),
                             np.union1d(br, np.linspace(lo, hi, 49)), lo, hi)

    shift = max(inner(z)[0] for z in np.linspace(lo, hi, 97))

    def outer(z1):
        lz, m1, _ = inner(z1)
        f = np.exp(lz - shift)
        return np.array([f, z1 * f, m1 * f])

    I, _ = integrate.quad_vec(outer, lo, hi, epsabs=0, epsrel=1e-11, limit=2000)
    return shift + np.log(I[0]), I[1:] / I[0]


def loglik_importance(net, x, noise_std, n=400_000, seed=0):
    """Prior importance sampling: log p(x) estimate and its standard error (delta method)."""
    rng = np.random.default_rng(seed)
    var = np.broadcast_to(np.asarray(noise_std, float) ** 2, (net.output_dim,))
    z = rng.standard_normal((n, net.latent_dim))
    lw = _log_joint(net, x, var, z) + 0.5 * (z * z).sum(1) + 0.5 * net.latent_dim * np.log(2 * np.pi)
    m = lw.max()
    w = np.exp(lw - m)
    est = m + np.log(w.mean())
    se = w.std(ddof=1) / np.sqrt(n) / w.mean()
    return est, se


def loglik_importance_mixture(net, x, noise_std, n=2_000_000, n_pilot=200_000, seed=0):
    """log p(x) by importance sampling with a defensive mixture proposal, 0.8 N(m, 2 C) +
    0.2 N(0, I), m and C the posterior mean and covariance estimated from prior-weighted
    pilot draws (any proposal with heavier tails than the posterior is unbiased; this one
    keeps the weights bounded by 5 p(x) / prior-IS weight).  Returns the estimate from
    the n fresh draws and its standard error (delta method)."""
    rng = np.random.default_rng(seed)
    S = net.latent_dim
    var = np.broadcast_to(np.asarray(noise_std, float) ** 2, (net.output_dim,))
    z = rng.standard_normal((n_pilot, S))
    lw = _log_joint(net, x, var, z) + 0.5 * (z * z).sum(1)
    w = np.exp(lw - lw.max())
    w /= w.sum()
    m = w @ z
    C = 2.0 * ((z - m).T * w) @ (z - m) + 1e-6 * np.eye(S)
    L = np.linalg.cholesky(C)
    n_mix = rng.binomial(n, 0.8)
    z = np.concatenate([m + rng.standard_normal((n_mix, S)) @ L.T, rng.standard_normal((n - n_mix, S))])
    e = np.linalg.solve(L, (z - m).T).T
    log_q_post = -0.5 * (e * e).sum(1) - np.log(np.diag(L)).sum() - 0.5 * S * np.log(2 * np.pi)
    log_q_prior = -0.5 * (z * z).sum(1) - 0.5 * S * np.log(2 * np.pi)
    log_q = np.logaddexp(np.log(0.8) + log_q_post, np.log(0.2) + log_q_prior)
    lw = _log_joint(net, x, var, z) - log_q
    top = lw.max()
    w = np.exp(lw - top)
    return top + np.log(w.mean()), w.std(ddof=1) / np.sqrt(n) / w.mean()


def random_linear_model(rng, S, D, sigma_max):
    """A random linear generator x = A z + b + noise with a non-standard Gaussian prior,
    whose marginal and conditionals are closed-form Gaussians.  Returns the CPAModel and
    A (D, S), b (D,), prior mean (S,), prior cov (S, S), noise std (D,)."""
    from cpadgn.model import CPAModel
    A, b = rng.normal(size=(D, S)), rng.normal(size=D)
    mu = rng.normal(size=S)
    Lz = np.tril(rng.normal(size=(S, S))) + 2 * np.eye(S)
    cov_z = Lz @ Lz.T
    sigma = rng.uniform(0.2, sigma_max, size=D)
    model = CPAModel(PiecewiseAffineNet.from_arrays([A], [b], []), prior_mean=mu, prior_cov=cov_z,
                     noise_std=sigma, device="cpu")
    return model, A, b, mu, cov_z, sigma


def posterior_spread(post, n):
    """max over a row's (row, region) pairs of |E[z | x, z in w]|, (n,): the factor by which
    an error e in the responsibilities moves E[z | x] (by at most 2 e times it, plus e)."""
    out = np.zeros(n)
    np.maximum.at(out, post.pair_row, np.linalg.norm(post.pair_mean, axis=1))
    return out


def kappa_rounding_tol(model, X, post):
    """Per-row bound on the floating-point error of log p(x) as cpadgn computes it, (N,):
    the tolerance for comparing results that differ only in rounding (batch sizes, GEMM
    kernels, devices, CPUs).

    Derivation.  log p(x) = log sum_w exp(l_w), l_w = log kappa_w + log Phi_w, so an error
    e_w in each l_w moves log p by sum_w r_w e_w <= max_{w: r_w > 0} |e_w| (r_w the
    responsibilities).  For complete rows log kappa_w is one dot product of length
    n = H + 2 (``likelihood._log_kappa_complete``):
        [xhat, 1, x'Px] . [c_w, -const_w / 2, -1/2] + |v_w|^2 / 2,
    with xhat = U^T P (x - b0) itself a dot product of length D.  A dot product of length
    n is exact up to gamma_n sum_i |a_i b_i|, gamma_n = n eps / (1 - n eps) (Higham,
    Accuracy and Stability, 3.1), whatever the summation order or kernel; the terms
    cancel (x'Px against 2 c.xhat and c'Qc), so the magnitudes T_w that enter are
        T_w = (|x - b0| P |U|) . |c_w| + |const_w| / 2 + x'Px / 2 + |v_w|^2 / 2,
    and the whitened mean v_w = (M_w C_w)^T xhat - C_w^T M_w^T Q c_w has error at most
    gamma_n V_w, V_w = |M_w C_w|^T (|x - b0| P |U|) + |C_w^T M_w^T Q c_w| per component.
    It enters |v|^2 / 2 with weight |v_w| and log Phi_w with weight |grad_v log Phi_w| =
    |E[u | u + v_w in w]| for u ~ N(0, I) (the truncated mean's offset), which for a
    region that carries mass is at most |v_w| + sqrt(S) + 1 to first order.  Rows with
    missing entries use the same sums in data space over their observed coordinates
    (``likelihood._log_kappa_incomplete``): T_w = sum_o (x^2 + 2 |x b_w| + b_w^2) / sigma^2
    + |logdet| + y'Sigma y, n = D.  The result is 4 gamma_n max_w (T_w + (2 |v_w| +
    sqrt(S) + 1) |V_w|): the factor 4 covers the few roundings outside the dot products
    (log-sum-exp, the Cholesky factors, the mass integrals' own few ulps).
    """
    import torch
    X = np.asarray(X, dtype=np.float64)
    tab = model._region_table()
    eps = np.finfo(np.float64).eps
    U, b0, var = tab.U.numpy(), tab.b0.numpy(), tab.var.numpy()
    H, S = U.shape[1], tab.S
    gamma = lambda n: n * eps / (1 - n * eps)
    rows, regions = post.pair_row[post.pair_responsibility > 0], post.pair_region[post.pair_responsibility > 0]
    err = np.zeros(len(X))
    complete = ~np.isnan(X).any(1)
    for n in np.unique(rows):
        w = regions[rows == n]
        if complete[n]:
            xc = X[n] - b0
            xhat_abs = (np.abs(xc) / var) @ np.abs(U)                          # (H,)
            xPx = (xc * xc / var).sum()
            xhat = (xc / var) @ U
            st = tab.stacked_for(w).cpu().numpy()                              # (H + 2, S + 1, P)
            v = np.einsum("h,hsp->sp", xhat, st[:H, 1:]) + st[H, 1:]           # (S, P)
            T = xhat_abs @ np.abs(st[:H, 0]) + np.abs(st[H, 0]) + 0.5 * xPx + 0.5 * (v * v).sum(0)
            V = np.linalg.norm(np.einsum("h,hsp->sp", xhat_abs, np.abs(st[:H, 1:])) + np.abs(st[H, 1:]), axis=0)
            g = gamma(H + 2 + U.shape[0])                # xhat's own errors ride on |c_w|
        else:
            o = ~np.isnan(X[n])
            A, b = (a.numpy() for a in tab.region_affine(torch.as_tensor(w)))
            x = X[n, o]
            T = ((x * x)[None] + 2 * np.abs(x[None] * b[:, o]) + b[:, o] ** 2) @ (1 / var[o])
            Ay = np.abs(A[:, o]).transpose(0, 2, 1) @ ((np.abs(x)[None] + np.abs(b[:, o])) / var[o])[..., None]
            V = np.linalg.norm(Ay[..., 0], axis=1)
            v = np.sqrt(np.maximum(T, 0))[None]         # |y' Sigma y| <= T: a bound on |v|
            T = 2 * T
            g = gamma(o.sum() + 2)
        vnorm = np.linalg.norm(v, axis=0)
        err[n] = 4 * g * np.max(T + (2 * vnorm + np.sqrt(S) + 1) * V)
    return err



# ============================================================================ S = 3: nested quadrature
def _log_ndtr_diff(A, B):
    """log(Phi(B) - Phi(A)) for A <= B elementwise, stable in both tails (-inf where A == B)."""
    from scipy.special import log_ndtr
    flip = A > 0                                   # Phi(B) - Phi(A) = Phi(-A) - Phi(-B)
    hi, lo = np.where(flip, -A, B), np.where(flip, -B, A)
    lh, ll = log_ndtr(hi), log_ndtr(lo)
    with np.errstate(divide="ignore"):
        return lh + np.log(-np.expm1(ll - lh))


def line_pieces_z3(net, P, lo, hi):
    """Exact breakpoints of g along the lines z = (P1, P2, t), t in [lo, hi], layer by layer:
    between consecutive breakpoints of layers < l the pre-activations of layer l are affine
    in t, so their roots there are exact linear interpolations.  P (L, 2) -> edges (L, M)
    sorted, lo first, hi last (padded with hi), and the unit of each breakpoint (L, M)
    (-1 for lo, hi and padding)."""
    L = len(P)
    offs = np.cumsum([0, *net.hidden_sizes])
    t = np.tile([lo, hi], (L, 1)).astype(float)
    ids = np.full((L, 2), -1)
    for l in range(len(net.hidden_sizes)):
        M = t.shape[1]
        z = np.concatenate([np.repeat(P[:, None, :], M, 1), t[..., None]], axis=2).reshape(-1, 3)
        u = net.preactivations(z).reshape(L, M, -1)[:, :, offs[l]:offs[l + 1]]
        ua, ub = u[:, :-1], u[:, 1:]
        cross = (ua >= 0) != (ub >= 0)
        ta, tb = t[:, :-1, None], t[:, 1:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(cross, ta + (tb - ta) * (ua / (ua - ub)), hi)
        new = np.where(cross, np.arange(offs[l], offs[l + 1]), -1)
        t = np.concatenate([t, r.reshape(L, -1)], 1)
        ids = np.concatenate([ids, new.reshape(L, -1)], 1)
        order = np.argsort(np.where(ids < 0, np.where(t <= lo, -np.inf, np.inf), t), axis=1, kind="stable")
        t, ids = np.take_along_axis(t, order, 1), np.take_along_axis(ids, order, 1)
        keep = (ids >= 0).sum(1).max() + 2
        t, ids = t[:, :keep], ids[:, :keep]
        t[:, -1] = np.where(ids[:, -1] < 0, hi, t[:, -1])
    return t, ids


_HASH = np.random.default_rng(12345).integers(1, 2 ** 62, size=(4096, 4096), dtype=np.int64) | 1


def _line_signature(ids):
    """An int64 hash (L,) of the sequence of units crossed along each line (ids (L, M))."""
    w = _HASH[:ids.shape[1], :ids.max() + 2].copy()
    w[:, 0] = 0                                    # ends and padding do not count
    return w[np.arange(ids.shape[1]), ids + 1].sum(1)


def _slice_signature(line_sigs):
    """An int64 hash per row of line_sigs (n, m): the sequence of distinct consecutive values."""
    keep = np.ones(line_sigs.shape, bool)
    keep[:, 1:] = line_sigs[:, 1:] != line_sigs[:, :-1]
    pos = np.cumsum(keep, 1) - 1
    return np.where(keep, line_sigs * _HASH[0][pos] + _HASH[1][pos], 0).sum(1)


def _changes(sig, grid, iters):
    """Points where sig (a vectorised map from a 1-D coordinate array to hashes) changes:
    every grid cell whose ends differ, bisected iters times.  grid (F, n) for F families
    (sig takes (family index, coordinate) arrays).  Returns family index and point arrays."""
    F, n = grid.shape
    fam = np.repeat(np.arange(F), n)
    s = sig(fam, grid.ravel()).reshape(F, n)
    f, i = np.nonzero(s[:, 1:] != s[:, :-1])
    a, b, sa = grid[f, i], grid[f, i + 1], s[f, i]
    for _ in range(iters):
        m = 0.5 * (a + b)
        same = sig(f, m) == sa
        a, b = np.where(same, m, a), np.where(same, b, m)
    return f, 0.5 * (a + b)


@functools.lru_cache(maxsize=None)
def _leggauss(k):
    """Gauss-Legendre nodes and weights of order k, computed once per k (an eigenproblem;
    ``_gl_panels`` asks for the same few orders thousands of times)."""
    x, w = np.polynomial.legendre.leggauss(k)
    x.flags.writeable = w.flags.writeable = False
    return x, w


def _gl_panels(breaks, lo, hi, width, n_gl, n_min):
    """Gauss-Legendre nodes and log weights on [lo, hi] split at breaks and every ~width:
    n_gl nodes on a piece of length width, fewer (n_gl sqrt(length / width), at least n_min)
    on shorter ones (the integrand is analytic on each piece)."""
    edges = np.union1d(np.clip(breaks, lo, hi), np.linspace(lo, hi, int(np.ceil((hi - lo) / width)) + 1))
    n = np.clip(np.ceil(n_gl * np.sqrt(np.diff(edges) / width)), n_min, n_gl).astype(int)
    t, lw = [], []
    for k in np.unique(n):
        x, w = _leggauss(int(k))
        a, b = edges[:-1][n == k, None], edges[1:][n == k, None]
        t.append((0.5 * (b - a) * x + 0.5 * (a + b)).ravel())
        lw.append(np.log(0.5 * (b - a) * w).ravel())
    return np.concatenate(t), np.concatenate(lw)


class Quadrature3D:
    """Nested piecewise quadrature over z in [-L, L]^3 for an S = 3 net, independent of cpadgn's
    partition and polytope code.

    z3 (innermost): exact, in closed form: along each line (z1, z2, .) the breakpoints come from
    ``line_pieces_z3`` and on each piece g is affine, so the integrand is a Gaussian in z3
    (erf differences).  z2: for fixed z1 the line integral F(z1, z2) is analytic except where
    the sequence of units crossed along the z3-line changes (the line meets an edge of the
    arrangement); those points are located by bisection on a grid (to ~1e-13) and Gauss-Legendre
    runs on the pieces between them (plus pieces of length <= width).  z1: G(z1) = int F dz2 is
    analytic except at the z1 of the arrangement's vertices, where the sequence of line
    signatures along the slice changes; located the same way (to ~1e-9), Gauss-Legendre between.
    Geometry depends on the net only: built once, reused for every row."""

    def __init__(self, net, L=7.0, width=1.0, n_gl=12, n_grid=300, n_grid1=200, n_min=4, vertices=None):
        assert net.latent_dim == 3
        self.net, self.L = net, L
        lines = lambda z1, z2: line_pieces_z3(self.net, np.column_stack([z1, z2]), -L, L)[1]
        g2 = np.linspace(-L, L, n_grid)

        def slice_sig(_, z1):
            s = _line_signature(lines(np.repeat(z1, n_grid), np.tile(g2, len(z1))))
            return _slice_signature(s.reshape(len(z1), n_grid))

        v1 = vertices
        if v1 is None:                                # pass a coarser rule's to refine it cheaply
            _, v1 = _changes(slice_sig, np.linspace(-L, L, n_grid1)[None], 24)
        self.vertices = v1
        z1, lw1 = _gl_panels(v1, -L, L, width, n_gl, n_min)
        f, k2 = _changes(lambda fam, z2: _line_signature(lines(z1[fam], z2)),
                         np.tile(g2, (len(z1), 1)), 44)
        P, lw = [], []
        for j in range(len(z1)):
            z2, lw2 = _gl_panels(k2[f == j], -L, L, width, n_gl, n_min)
            P.append(np.column_stack([np.full_like(z2, z1[j]), z2]))
            lw.append(lw1[j] + lw2)
        self.P, self.logw = np.concatenate(P), np.concatenate(lw)
        self.edges, _ = line_pieces_z3(net, self.P, -L, L)
        Lines, M = self.edges.shape
        z = np.concatenate([np.repeat(self.P[:, None], M, 1), self.edges[..., None]], 2).reshape(-1, 3)
        self.g_edges = net.forward(z).reshape(Lines, M, -1)
        self.n_nodes = Lines

    def integrate(self, x, noise_std, second=False):
        """log p(x) (NaN in x = missing), E[z | x] (3,) and E[g(z) | x] (D,); with second,
        also E[g(z) g(z)^T | x] (D, D)."""
        D = self.g_edges.shape[2]
        var = np.broadcast_to(np.asarray(noise_std, float) ** 2, (D,))
        o = ~np.isnan(x)
        a, b = self.edges[:, :-1], self.edges[:, 1:]
        h = b - a
        Ga, Gb = self.g_edges[:, :-1], self.g_edges[:, 1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(h[..., None] > 0, (Gb - Ga) / h[..., None], 0.0)     # dg/dz3 on each piece
        gm = 0.5 * (Ga + Gb)                                                   # g at the piece middles
        m = 0.5 * (a + b)
        r, do = gm[..., o] - x[o], d[..., o]
        # log integrand at z3 = m + s: -(alpha s^2 + 2 beta s + c) / 2 + const
        alpha = 1 + (do * do / var[o]).sum(-1)
        beta = (r * do / var[o]).sum(-1) + m
        c = (r * r / var[o]).sum(-1) + m * m
        mu = -beta / alpha
        sa = np.sqrt(alpha)
        A, B = sa * (-0.5 * h - mu), sa * (0.5 * h - mu)
        ldiff = _log_ndtr_diff(A, B)
        lmass = 0.5 * (alpha * mu * mu - c) + 0.5 * np.log(2 * np.pi / alpha) + ldiff
        lmass = np.where(h > 0, lmass, -np.inf)
        lphi = lambda u: -0.5 * u * u - 0.5 * np.log(2 * np.pi)
        with np.errstate(invalid="ignore", over="ignore"):
            es = mu + (np.exp(lphi(A) - ldiff) - np.exp(lphi(B) - ldiff)) / sa        # E[s] on the piece
        es = np.where(h > 0, es, 0.0)
        if second:          # E[s^2] = mu^2 + 2 mu E[t] / sa + E[t^2] / alpha, t = sa (s - mu) truncated to [A, B]
            with np.errstate(invalid="ignore", over="ignore"):
                et2 = 1 + A * np.exp(lphi(A) - ldiff) - B * np.exp(lphi(B) - ldiff)
            es2 = np.where(h > 0, mu * mu + 2 * mu * (es - mu) + et2 / alpha, 0.0)
        const = (-0.5 * (self.P ** 2).sum(1) + self.logw - 1.5 * np.log(2 * np.pi)
                 - 0.5 * o.sum() * np.log(2 * np.pi) - 0.5 * np.log(var[o]).sum())
        lw = lmass + const[:, None]
        top = lw.max()
        w = np.exp(lw - top)
        total = w.sum()
        ez = np.array([(w.sum(1) * self.P[:, 0]).sum(), (w.sum(1) * self.P[:, 1]).sum(),
                       (w * (m + es)).sum()]) / total
        eg = np.einsum("lk,lkd->d", w, gm + d * es[..., None]) / total
        if not second:
            return top + np.log(total), ez, eg
        cross = np.einsum("lk,lkd,lke->de", w * es, gm, d)
        egg = (np.einsum("lk,lkd,lke->de", w, gm, gm) + cross + cross.T
               + np.einsum("lk,lkd,lke->de", w * es2, d, d)) / total
        return top + np.log(total), ez, eg, egg


def loglik_3d(net, x, noise_std, quad=None, **kw):
    """log p(x), E[z|x] and E[g(z)|x] for S = 3 by ``Quadrature3D`` (pass quad to reuse one)."""
    return (quad or Quadrature3D(net, **kw)).integrate(np.asarray(x, float), noise_std)


@functools.lru_cache(maxsize=None)
def small_s3_net_and_quadrature():
    """A small S = 3 net (hidden (3, 3), D = 4) and its ``Quadrature3D``, built once per
    test session (the geometry does not depend on the rows or the noise)."""
    net = random_net(3, (3, 3), 4, seed=7, slope=0.1, scale=1.5)
    return net, Quadrature3D(net)


# ------------------------------------------------------------------ 1-D integrals in v (tau = c sinh v)
def select_by_rule(nodes, panels, width):
    """One case for each single-panel node count 1..16 and three with 16-node panels,
    asserting that the random draw reached every one of them (the regime's boundaries)."""
    picks = [np.flatnonzero((panels == 1) & (nodes == n) & (width > 0))[:1] for n in range(1, 17)]
    assert all(p.size for p in picks), [n + 1 for n, p in enumerate(picks) if not p.size]
    return np.concatenate(picks + [np.flatnonzero((panels > 1) & (width > 0))[:3]])


def quadrature_rounding(v0, width, c, log_value):
    """What rounding allows in a log integral over v in [v0, v0 + width] (tau = c sinh v):
    the ends v = asinh(tau / c) are off by 2 eps (|v| + 1), a relative 4 eps (|v| + 1) /
    width of a short range; a node's v is off by eps |v|, which moves the log integrand
    by eps |v| times its slope, at most |tau| (h + 2) + 1 (h = c cosh v; the
    exp(-tau^2 / 2), erfcx(r/sqrt 2) / r and 1 / cosh v factors); a few eps per node's
    arithmetic and eps |log| from the final logarithm; plus the rule's own truncation
    bound, 2^-52."""
    V = np.maximum(np.abs(v0), np.abs(v0 + width))
    tau, h = c * np.sinh(V), c * np.cosh(V)
    return (2.0 ** -52 + 8 * np.finfo(float).eps * (V + 1) / width + 16 * np.finfo(float).eps * (1 + V * (1 + tau * (h + 2)))
            + 4 * np.finfo(float).eps * np.abs(log_value))


def peak_points(lo, hi, c):
    """Subdivision points for mpmath.quad over [lo, hi] in v (tau = c sinh v) of an
    integrand that peaks at v*, the point nearest 0, on a scale ~1 / (1 + |tau*| h*):
    geometrically spaced away from v* (tanh-sinh alone misses a peak ~1e-3 wide)."""
    import mpmath
    star = min(max(mpmath.mpf(0), lo), hi)
    scale = 1 / (1 + abs(c * mpmath.sinh(star)) * c * mpmath.cosh(star))
    steps = [scale * mpmath.mpf(2) ** k for k in range(-4, 16)]
    inner = sorted({star + s for s in steps} | {star - s for s in steps} | {star})
    return [lo] + [p for p in inner if lo < p < hi] + [hi]


def ldp_distance(a, c, v):
    """min |u - v| over {u : a u <= c} by NNLS on the dual (Lawson and Hanson, ch. 23)."""
    cv = c - a @ v
    if np.all(cv >= 0):
        return 0.0
    E = np.vstack([-a.T, -cv[None, :]])
    f = np.zeros(a.shape[1] + 1)
    f[-1] = 1.0
    r = E @ nnls(E, f, maxiter=5000)[0] - f
    return float(np.linalg.norm(r[:-1] / r[-1]))


# ----------------------------------------------- S >= 4: the QMC standard error of a mean
def s4_imputation_case():
    """The S = 4 imputation case of the mean_stderr oracle: a 4-(8)-5 net (~160 pairs a
    row, so the weights' error matters too), noise 0.6, a loose stderr_target 0.01 that
    keeps the points few and the standard errors large enough to measure, and 4 rows
    drawn from it with 4 of their 5 entries missing.  Returns (model, X)."""
    from cpadgn.model import CPAModel
    model = CPAModel(random_net(4, (8,), 5, seed=3, slope=0.2), noise_std=0.6, device="cpu")
    model.stderr_target = 0.01
    X = model.sample(4, seed=4)
    rng = np.random.default_rng(0)
    for row in X:
        row[rng.choice(5, 4, replace=False)] = np.nan
    return model, X


def salt_qmc(salt: int) -> None:
    """Give every randomised-QMC integral of this process points independent of those
    of any other salt: salt the polytope keys and the Sobol scrambles of
    ``cpadgn.polytope`` (salt 0 restores them).  Self-contained, so that Dask workers
    can run it (``client.run(salt_qmc, salt)`` with this module pickled by value)."""
    from cpadgn import polytope
    if not hasattr(polytope, "_unsalted"):
        polytope._unsalted = (polytope._polytope_keys, polytope._sobol_sets)
    keys, sets = polytope._unsalted
    if salt == 0:
        polytope._polytope_keys, polytope._sobol_sets = keys, sets
        return
    polytope._polytope_keys = lambda A, b, m, seed, ids=None: keys(A, b, m, seed + salt * 10 ** 9, ids)
    polytope._sobol_sets = lambda S, m, n, seed: sets(S, m, n, seed + salt * 10 ** 6)


def assert_stderr_matches_spread(means, stderrs, miss, n_sets: int = 16, min_measurable: int = 12):
    """The reported QMC standard errors of the imputed means agree with the spread of the
    means over R reruns with independent random points (``salt_qmc``).

    means, stderrs (R, N, D): each rerun's means and reported standard errors; miss (N, D)
    the missing entries.  An sd estimated from R replicates of kurtosis k has a relative
    sd of sqrt((k - 1) / (4 (R - 1))) (1 / sqrt(2 (R - 1)) for normal ones; a pair whose
    integral now and then meets a feature its points rarely see gives heavier tails, so
    k is measured per entry); the reported SE of one run is itself estimated from n_sets
    randomisations (relative sd ~ 1 / sqrt(2 (n_sets - 1))), averaged (in quadrature)
    over the R runs; the ratio of the two must lie within 4 of those combined, on the
    entries whose SE is far above the mean's rounding (~1e-16; at least min_measurable)."""
    means, stderrs = np.asarray(means), np.asarray(stderrs)
    R = means.shape[0]
    assert np.all(stderrs[:, ~miss] == 0.0)
    dev = (means - means.mean(0))[:, miss]
    empirical = means.std(0, ddof=1)[miss]
    kurtosis = (dev ** 4).mean(0) / (dev ** 2).mean(0) ** 2
    reported = np.sqrt((stderrs ** 2).mean(0))[miss]
    measurable = reported > 1e-8
    assert measurable.sum() >= min_measurable, reported
    band = 4 * np.sqrt((kurtosis - 1) / (4 * (R - 1)) + 1 / (2 * (n_sets - 1) * R))
    ratio = empirical / reported
    assert np.all((np.abs(ratio - 1) <= band)[measurable]), (ratio, band)
