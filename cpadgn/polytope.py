"""Standard-normal mass and moments over convex polyhedra P = {u : A u <= b}.

u ~ N(0, I_S).  S = 1 and S = 2 are exact and deterministic (log space throughout);
S >= 3 uses randomised quasi-Monte Carlo with a standard error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.polynomial.legendre import leggauss
from scipy.special import log_ndtr, ndtri_exp
from scipy.stats import qmc

LOG_SQRT_2PI = 0.5 * np.log(2 * np.pi)
_GL_X, _GL_W = leggauss(16)


@dataclass
class PolytopeMoments:
    """log_mass (B,), mean (B, S) = E[u | P], cov (B, S, S) = Cov[u | P],
    stderr (B,) standard error of log_mass (0 where exact)."""

    log_mass: np.ndarray
    mean: np.ndarray
    cov: np.ndarray
    stderr: np.ndarray


def log_phi(x):
    return -0.5 * x * x - LOG_SQRT_2PI


def log_diff_ndtr(lo, hi):
    """log(Phi(hi) - Phi(lo)) for lo <= hi, stable in both tails (broadcasts)."""
    lo, hi = np.broadcast_arrays(np.asarray(lo, float), np.asarray(hi, float))
    flip = lo > 0  # use the upper tail: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    a = np.where(flip, -hi, lo)
    c = np.where(flip, -lo, hi)
    la, lc = log_ndtr(a), log_ndtr(c)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        out = lc + np.log1p(-np.exp(la - lc))
    return np.where(lo >= hi, -np.inf, out)


def _normalise(A, b, mask):
    """Unit rows; zero rows are void when b >= 0 and make P empty when b < 0."""
    norm = np.linalg.norm(A, axis=-1)
    zero = norm <= 1e-300
    empty = (mask & zero & (b < 0)).any(-1)
    mask = mask & ~zero
    safe = np.where(zero, 1.0, norm)
    return A / safe[..., None], b / safe, mask, empty


def polytope_moments(A, b, mask=None, *, moments=True, n_qmc=2 ** 12, seed=0) -> PolytopeMoments:
    """Mass and moments of N(0, I) on P = {u : A u <= b}.

    A (B, F, S), b (B, F), mask (B, F) bool (False: padding row, ignored).
    """
    A, b = np.asarray(A, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mask = np.ones(b.shape, bool) if mask is None else np.asarray(mask, bool)
    B, F, S = A.shape
    A, b, mask, empty = _normalise(A, b, mask)
    out = PolytopeMoments(np.zeros(B), np.zeros((B, S)), np.broadcast_to(np.eye(S), (B, S, S)).copy(),
                          np.zeros(B))
    sel = np.flatnonzero(mask.any(-1))       # the others are all of R^S
    if sel.size:
        A, b, mask = A[sel], b[sel], mask[sel]
        if S == 1:
            res = _interval(A[..., 0], b, mask)
        elif S == 2:
            res = _polygon(A, b, mask, moments)
        else:
            res = _qmc(A, b, mask, n_qmc, seed)
        for name in ("log_mass", "mean", "cov", "stderr"):
            getattr(out, name)[sel] = getattr(res, name)
    out.log_mass = np.where(empty, -np.inf, out.log_mass)
    return out


def polytope_log_mass(A, b, mask=None, **kw):
    """(log_mass (B,), stderr (B,)) of N(0, I) on {u : A u <= b}."""
    res = polytope_moments(A, b, mask, moments=False, **kw)
    return res.log_mass, res.stderr


# ----------------------------------------------------------------------- S = 1
def _interval(a, b, mask):
    """Rows a u <= b with a = +-1 (after normalisation): the interval [lo, hi]."""
    big = np.inf
    hi = np.where(mask & (a > 0), b, big).min(-1)
    lo = np.where(mask & (a < 0), -b, -big).max(-1)
    log_mass = log_diff_ndtr(lo, hi)
    with np.errstate(invalid="ignore", over="ignore"):
        pl = np.exp(log_phi(lo) - log_mass)          # phi(lo) / mass
        pu = np.exp(log_phi(hi) - log_mass)
        mean = pl - pu
        tl = np.where(np.isfinite(lo), lo * pl, 0.0)
        tu = np.where(np.isfinite(hi), hi * pu, 0.0)
        var = 1.0 + tl - tu - mean * mean
    B = a.shape[0]
    return PolytopeMoments(log_mass, mean[:, None], np.maximum(var, 0.0)[:, None, None], np.zeros(B))


# ----------------------------------------------------------------------- S = 2
def facet_segments(a, c, mask):
    """Each facet's segment inside the polygon.

    a (B, F, 2) unit normals, c (B, F) offsets.  Facet k is the set
    {c_k a_k + t d_k : t_lo <= t <= t_hi} with d_k = (-a_k2, a_k1).
    Returns t_lo, t_hi (B, F) and live (B, F): the segment is non-empty.
    """
    d = np.stack([-a[..., 1], a[..., 0]], -1)
    a1, a2 = a[:, None, :, 0], a[:, None, :, 1]                   # rows j, broadcast over k
    ad = a1 * d[:, :, None, 0] + a2 * d[:, :, None, 1]             # a_j . d_k, (B, k, j)
    aa = a1 * a[:, :, None, 0] + a2 * a[:, :, None, 1]             # a_j . a_k
    slack = c[:, None, :] - aa * c[:, :, None]                     # c_j - a_j . (c_k a_k)
    other = mask[:, None, :] & ~np.eye(a.shape[1], dtype=bool)[None]
    tol = 1e-12
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = slack / ad
    t_hi = np.where(other & (ad > tol), ratio, np.inf).min(-1)
    t_lo = np.where(other & (ad < -tol), ratio, -np.inf).max(-1)
    parallel = other & (np.abs(ad) <= tol)
    blocked = (parallel & (slack < -1e-12)).any(-1)
    # Identical lines: keep the first copy only.
    same = parallel & (aa > 0) & (np.abs(slack) <= 1e-12)
    dup = (same & (np.arange(a.shape[1])[None, None, :] < np.arange(a.shape[1])[None, :, None])).any(-1)
    live = mask & ~blocked & ~dup & (t_hi > t_lo)
    return t_lo, t_hi, live


def _log_cosh(s):
    s = np.abs(s)
    return s + np.log1p(np.exp(-2 * s)) - np.log(2.0)


def _acosh_of_log(ly):
    """acosh(exp(ly)) without overflow, ly >= 0."""
    with np.errstate(over="ignore"):
        return np.where(ly > 20, ly + np.log(2.0), np.arccosh(np.exp(np.minimum(ly, 20))))


def log_owen_segment(p, t_lo, t_hi):
    """log G = log (1/2pi) int_{t_lo}^{t_hi} p exp(-(p^2 + t^2)/2) / (p^2 + t^2) dt, p > 0.

    With t = p sinh s the integrand becomes exp(-p^2 cosh^2 s / 2) / cosh s: analytic,
    poles of 1/cosh at s = +-i pi/2, so composite Gauss-Legendre in s converges
    geometrically.  The range is clipped where the integrand has fallen by e^-40 from
    its maximum on the interval, and split into panels of width <= 1.5.  All inputs
    (n,), output (n,).
    """
    p = np.maximum(p, 1e-300)
    with np.errstate(over="ignore", divide="ignore"):
        s_lo, s_hi = np.arcsinh(t_lo / p), np.arcsinh(t_hi / p)
    s_star = np.clip(0.0, s_lo, s_hi)
    lc_star = _log_cosh(s_star)
    # p^2 cosh^2 s / 2 <= p^2 cosh^2 s* / 2 + 40  and  log cosh s <= log cosh s* + 40
    ly = 0.5 * np.logaddexp(2 * lc_star, np.log(80.0) - 2 * np.log(p))
    s_cut = np.minimum(_acosh_of_log(ly), np.abs(s_star) + 41.0)
    lo, hi = np.maximum(s_lo, -s_cut), np.minimum(s_hi, s_cut)
    width = np.maximum(hi - lo, 0.0)
    # Panels: width <= 1.5 (the poles of 1/cosh are pi/2 away) and a fall of the
    # integrand's log by at most 8 per panel, where 16-point GL is exact to ~1e-16.
    log_p2 = 2 * np.log(p)
    fall = lambda s: 0.5 * np.exp(np.minimum(log_p2 + 2 * _log_cosh(s), 700)) + _log_cosh(s)
    e_star = fall(s_star)
    drop = np.where(width > 0, fall(lo) + fall(hi) - 2 * e_star, 0.0)
    n_panels = np.maximum(1, np.ceil(np.maximum(width / 1.5, drop / 8.0))).astype(int)
    out = np.empty(p.shape)
    for n in np.unique(n_panels):  # group by panel count to vectorise
        sel = n_panels == n
        edges = lo[sel, None] + width[sel, None] * np.linspace(0, 1, n + 1)[None]
        half = 0.5 * (edges[:, 1:] - edges[:, :-1])
        mid = 0.5 * (edges[:, 1:] + edges[:, :-1])
        s = mid[..., None] + half[..., None] * _GL_X                     # (m, n, 16)
        lcs = _log_cosh(s)
        logf = -0.5 * np.exp(log_p2[sel, None, None] + 2 * lcs) - lcs
        with np.errstate(divide="ignore"):
            logw = np.log(half)[..., None] + np.log(_GL_W)
        v = (logf + logw).reshape(s.shape[0], -1)
        m = v.max(-1)
        out[sel] = m + np.log(np.exp(v - m[:, None]).sum(-1))
    return np.where(width > 0, out - np.log(2 * np.pi), -np.inf)


def _polygon(a, c, mask, moments):
    B, F, _ = a.shape
    # A facet through the origin is moved just inside (the formula is continuous from
    # there); taken literally, "b = 0 counts as +" is wrong when 0 is a vertex of P.
    c = np.where(mask & (np.abs(c) < 1e-300), 1e-300, c)
    t_lo, t_hi, live = facet_segments(a, c, mask)
    inside = ~((c < 0) & mask).any(-1)                                  # 0 in P (b = 0 counts +)
    logG = np.full((B, F), -np.inf)
    if live.any():
        logG[live] = log_owen_segment(np.abs(c[live]), t_lo[live], t_hi[live])
    entry = live & (c < 0)
    exit_ = live & (c >= 0)
    lse = lambda x, m: _masked_logsumexp(x, m)
    log_exit = lse(logG, exit_)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_in = np.log1p(-np.minimum(np.exp(log_exit), 1.0))
        log_entry = lse(logG, entry)
        log_out = log_entry + np.log1p(-np.exp(np.minimum(log_exit - log_entry, 0.0)))
    log_mass = np.where(inside, log_in, log_out)
    if not moments:
        return PolytopeMoments(log_mass, np.zeros((B, 2)), np.zeros((B, 2, 2)), np.zeros(B))
    d = np.stack([-a[..., 1], a[..., 0]], -1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lphi_c = log_phi(c) - log_mass[:, None]
        w = np.where(live, np.exp(lphi_c + log_diff_ndtr(t_lo, t_hi)), 0.0)  # phi(c) M / mass
        v = np.where(live, np.exp(lphi_c + log_phi(t_lo)) - np.exp(lphi_c + log_phi(t_hi)), 0.0)
    mean = -np.einsum("bf,bfs->bs", w, a)
    vec = (c * w)[..., None] * a + v[..., None] * d                      # (B, F, 2)
    second = np.eye(2) - np.einsum("bfs,bft->bst", vec, a)
    second = 0.5 * (second + np.swapaxes(second, 1, 2))
    cov = second - mean[:, :, None] * mean[:, None, :]
    return PolytopeMoments(log_mass, mean, cov, np.zeros(B))


def _masked_logsumexp(x, m):
    x = np.where(m, x, -np.inf)
    top = x.max(-1)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return safe + np.log(np.exp(x - safe[:, None]).sum(-1))


# ---------------------------------------------------------------------- S >= 3
def _pivot_basis(a, c, mask):
    """Rotation for separation of variables: pivot rows chosen greedily by smallest
    offset (the most restrictive constraints), made lower triangular by Gram-Schmidt.

    a (F, S) unit rows, c (F,) -> Q (S, S) orthogonal with the pivot rows of a Q
    lower triangular.
    """
    S = a.shape[1]
    basis = []
    for k in np.argsort(np.where(mask, c, np.inf)):
        if not mask[k] or len(basis) == S:
            break
        r = a[k] - sum((a[k] @ q) * q for q in basis)
        if np.linalg.norm(r) > 1e-8:
            basis.append(r / np.linalg.norm(r))
    for e in np.eye(S):  # complete to an orthonormal basis
        r = e - sum((e @ q) * q for q in basis)
        if len(basis) < S and np.linalg.norm(r) > 1e-8:
            basis.append(r / np.linalg.norm(r))
    return np.stack(basis, axis=1)


def _sample_truncated_1d(lo, hi, w):
    """Inverse-CDF draw of N(0,1) truncated to [lo, hi] from uniforms w, in log space;
    returns the draw and log(Phi(hi) - Phi(lo)).  Uses the lower tail where lo <= 0 and
    the mirrored upper tail otherwise, so far tails keep full precision."""
    flip = lo > 0
    l, h = np.where(flip, -hi, lo), np.where(flip, -lo, hi)
    log_mass = log_diff_ndtr(l, h)
    with np.errstate(divide="ignore", invalid="ignore"):
        u = np.where(flip, 1 - w, w)
        x = ndtri_exp(np.logaddexp(log_ndtr(l), np.log(u) + log_mass))
    x = np.clip(x, l, h)
    return np.where(flip, -x, x), log_mass


def _qmc(A, b, mask, n_qmc, seed, n_randomisations=8, chunk=64):
    """Genz's separation of variables with scrambled Sobol points.

    In the rotated frame v = Q^T u (Q from ``_pivot_basis``) every row bounds the last
    coordinate it involves; v_1, ..., v_S are drawn one by one from their truncated
    normals and the weight is the product of the truncation masses.  Returns log mass
    with its standard error over independent randomisations, and weighted moments.
    """
    B, F, S = A.shape
    m = max(2, n_qmc // n_randomisations)
    w = np.concatenate([qmc.Sobol(S, scramble=True, seed=seed * 1000 + r).random(m)
                        for r in range(n_randomisations)])                 # (R m, S)
    Q = np.stack([_pivot_basis(A[i], b[i], mask[i]) for i in range(B)])  # (B, S, S)
    rows = np.where(mask[..., None], A @ Q, 0.0)                         # (B, F, S)
    nz = np.abs(rows) > 1e-12
    last = np.where(nz.any(-1), S - 1 - np.argmax(nz[..., ::-1], axis=-1), -1)
    void_violated = (mask & (last < 0) & (b < 0)).any(-1)
    out = PolytopeMoments(np.empty(B), np.empty((B, S)), np.empty((B, S, S)), np.empty(B))
    for start in range(0, B, chunk):
        sl = slice(start, min(start + chunk, B))
        r_, b_, last_ = rows[sl], b[sl], last[sl]
        n = r_.shape[0]
        v = np.zeros((n, w.shape[0], S))
        logw = np.zeros((n, w.shape[0]))
        for j in range(S):
            sel = (last_ == j)[:, None, :]
            coef = r_[:, None, :, j]
            rest = b_[:, None, :] - np.einsum("bmj,bfj->bmf", v[:, :, :j], r_[:, :, :j])
            with np.errstate(divide="ignore", invalid="ignore"):
                bound = rest / coef
            hi = np.where(sel & (coef > 0), bound, np.inf).min(-1)
            lo = np.where(sel & (coef < 0), bound, -np.inf).max(-1)
            v[:, :, j], lm = _sample_truncated_1d(lo, hi, np.broadcast_to(w[:, j], lo.shape))
            logw += lm
        logw[void_violated[sl]] = -np.inf
        est = _logmeanexp(logw.reshape(n, n_randomisations, m), axis=-1)   # (n, R)
        log_mass = _logmeanexp(est, axis=-1)
        with np.errstate(invalid="ignore"):
            rel = np.exp(est - log_mass[:, None])
            se = rel.std(-1, ddof=1) / np.sqrt(n_randomisations)
        out.log_mass[sl] = log_mass
        out.stderr[sl] = np.where(np.isfinite(log_mass), se, 0.0)
        top = logw.max(-1)
        wt = np.exp(logw - np.where(np.isfinite(top), top, 0.0)[:, None])
        wt /= np.maximum(wt.sum(-1, keepdims=True), 1e-300)
        mv = np.einsum("bm,bms->bs", wt, v)
        dv = v - mv[:, None, :]
        out.mean[sl] = np.einsum("bst,bt->bs", Q[sl], mv)
        out.cov[sl] = Q[sl] @ np.einsum("bm,bms,bmt->bst", wt, dv, dv) @ np.swapaxes(Q[sl], 1, 2)
    return out


def _logmeanexp(x, axis):
    top = np.max(x, axis=axis, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (safe + np.log(np.mean(np.exp(x - safe), axis=axis, keepdims=True))).squeeze(axis)
