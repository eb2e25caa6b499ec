"""Standard-normal mass and moments over convex polyhedra P = {u : A u <= b}.

u ~ N(0, I_S).  S = 1, 2 and 3 are exact and deterministic (log space throughout; S = 3
in ``polyhedron``); S >= 4 uses randomised quasi-Monte Carlo with a standard error.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.polynomial.legendre import leggauss
from scipy.special import erfcx, log_ndtr, ndtr, ndtri, ndtri_exp

from .stop import stop_check

LOG_SQRT_2PI = 0.5 * np.log(2 * np.pi)
_SQRT_HALF = np.sqrt(0.5)


@dataclass
class PolytopeMoments:
    """log_mass (B,), mean (B, S) = E[u | P], cov (B, S, S) = Cov[u | P],
    stderr (B,) standard error of log_mass (0 where exact).

    Randomised estimates (QMC, S >= 4) also carry, by the delta method over their
    independent randomisations, mean_cov (B, S, S): the covariance of the estimate of
    ``mean``, and mass_mean_cov (B, S): the covariance of the estimates of log_mass and
    ``mean`` (both None where exact)."""

    log_mass: np.ndarray
    mean: np.ndarray
    cov: np.ndarray
    stderr: np.ndarray
    mean_cov: np.ndarray | None = None
    mass_mean_cov: np.ndarray | None = None
    FIELDS = ("log_mass", "mean", "cov", "stderr")       # every result's (the others: QMC only)

    def put(self, where, other: "PolytopeMoments"):
        """Write other's log_mass, mean, cov and stderr into the polytopes ``where`` (in place)."""
        for name in self.FIELDS:
            getattr(self, name)[where] = getattr(other, name)

    def mc_covariances(self):
        """(mean_cov (B, S, S), mass_mean_cov (B, S)), zeros where exact."""
        B, S = self.mean.shape
        if self.mean_cov is None:
            return np.zeros((B, S, S)), np.zeros((B, S))
        return self.mean_cov, self.mass_mean_cov

    @classmethod
    def concat(cls, parts) -> "PolytopeMoments":
        """The results of consecutive slices of the polytopes, joined."""
        out = cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in cls.FIELDS))
        if any(p.mean_cov is not None for p in parts):
            out.mean_cov, out.mass_mean_cov = (np.concatenate(x) for x in zip(*(p.mc_covariances() for p in parts)))
        return out


def log_phi(x):
    return -0.5 * x * x - LOG_SQRT_2PI


def log_diff_ndtr(lo, hi):
    """log(Phi(hi) - Phi(lo)) for lo <= hi, stable in both tails (broadcasts).

    Mirrored to the lower tail (a <= 0, a <= c).  Where Phi(c) is a normal number
    (c > -30: Phi(c) > 4e-198) the difference is taken in probability space: ndtr keeps
    its relative accuracy there, and outside the narrow intervals (the series of
    ``_narrow_log_diff``) the subtraction loses at most a factor
    (Phi(c) + Phi(a)) / (Phi(c) - Phi(a)) < 63 (log Phi has slope >= 0.79 on [a, c] <= 0),
    no more than the logarithms' difference would, and ndtr costs half of log_ndtr.
    Further out, from the logarithms."""
    lo, hi = np.broadcast_arrays(np.asarray(lo, float), np.asarray(hi, float))
    shape = lo.shape
    flip = (lo > 0).ravel()  # use the upper tail: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)
    a = np.where(flip, -hi.ravel(), lo.ravel())
    c = np.where(flip, -lo.ravel(), hi.ravel())
    out = np.empty(a.shape)
    far = np.flatnonzero(~(c > -30.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        out[:] = np.log(ndtr(c) - ndtr(a))
    out[far] = _log_diff_from_logs(a[far], c[far], log_ndtr(a[far]), log_ndtr(c[far]))
    return _narrow_log_diff(a, c, out).reshape(shape)


def _log1mexp(x):
    """log(1 - exp(x)) for x <= 0 (to an absolute error ~1e-16)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.log(-np.expm1(x))


def _log_diff_from_logs(a, c, la, lc):
    """log(Phi(c) - Phi(a)) given la = log Phi(a), lc = log Phi(c), a <= c, a <= 0
    (narrow intervals by ``_narrow_log_diff``)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _narrow_log_diff(a, c, lc + _log1mexp(la - lc))


def _narrow_log_diff(a, c, out):
    """out (log(Phi(c) - Phi(a)), a <= c) with -inf where a >= c and, for narrow
    intervals, where a difference loses its digits, the series
    Phi(m + h) - Phi(m - h) = 2 h phi(m) sum_k He_2k(m) h^2k / (2k + 1)!  (m the
    midpoint, to k = 3: relative error ~1e-14 for (c - a)(1 + |m|) < 0.1)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        w = c - a
        mid = 0.5 * (a + c)
        out = np.where(a >= c, -np.inf, out)
        narrow = (w > 0) & (w * (1.0 + np.abs(mid)) < 0.1)
        if np.any(narrow):
            w, mid = w[narrow], mid[narrow]
            m2, h2 = mid * mid, 0.25 * w * w
            he2, he4, he6 = m2 - 1, (m2 - 6) * m2 + 3, ((m2 - 15) * m2 + 45) * m2 - 15
            out[narrow] = np.log(w) + log_phi(mid) + np.log1p(h2 * (he2 / 6 + h2 * (he4 / 120 + h2 * he6 / 5040)))
    return out


def _normalise(A, b, mask):
    """Unit rows; zero rows are void when b >= 0 and make P empty when b < 0."""
    norm = np.linalg.norm(A, axis=-1)
    zero = norm <= 1e-300
    empty = (mask & zero & (b < 0)).any(-1)
    mask = mask & ~zero
    safe = np.where(zero, 1.0, norm)
    return A / safe[..., None], b / safe, mask, empty


def polytope_moments(A, b, mask=None, *, moments=True, n_qmc=2 ** 12, seed=0,
                     memory_budget=None) -> PolytopeMoments:
    """Mass and moments of N(0, I) on P = {u : A u <= b}.

    A (B, F, S), b (B, F), mask (B, F) bool (False: padding row, ignored).
    memory_budget: bytes of working memory (S >= 3: the polytopes go through in chunks
    sized by ``qmc_bytes``); None: the chunks' default sizes.
    """
    A, b = np.asarray(A, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mask = np.ones(b.shape, bool) if mask is None else np.asarray(mask, bool)
    B, F, S = A.shape
    if S >= 4:
        return polytope_qmc_draws(A, b, mask, [(n_qmc, seed, moments)], memory_budget)[0]
    A, b, mask, empty = _normalise(A, b, mask)
    sel = np.flatnonzero(mask.any(-1))       # the others are all of R^S
    res = None
    if sel.size:
        A, b, mask = A[sel], b[sel], mask[sel]
        if S == 1:
            res = _interval(A[..., 0], b, mask)
        elif S == 2:
            res = _by_row_count(_polygon, A, b, mask, moments)
        else:
            from .polyhedron import polyhedron_moments
            res = polyhedron_moments(A, b, mask, moments=moments, memory_budget=memory_budget)
    return _assemble(B, S, sel, res, empty)


def polytope_qmc_draws(A, b, mask, draws, memory_budget=None, mode=None, n_randomisations=16, geometry=None,
                       with_geometry=False, ids=None) -> list:
    """Randomised-QMC ``polytope_moments`` (any S >= 2; S >= 4 has nothing else) for
    each draw (n_qmc, seed, moments) of ``draws``, on one geometry: the per-polytope
    work that does not depend on the points (mode, frame, projections) is done once.
    Draws with different seeds are independent estimates.  Returns a list of
    PolytopeMoments, one per draw.  memory_budget: bytes of working arrays (the polytopes
    go in chunks, and a polytope's points in blocks, that fit: the estimates do not
    depend on it beyond rounding); None: the chunks' default sizes.
    mode (B, S): the polytopes' modes where already known (NaN rows: not known), for
    example from ``distance_lower_bound``; each is checked (``_kkt``) before it is used.
    n_randomisations: the independently scrambled sets a draw's points come in (its
    standard error has n_randomisations - 1 degrees of freedom).  geometry: a
    QMCGeometry (B,) that an earlier call returned for the same A, b, mask (and mode)
    where known, found where not; with_geometry: also return the geometry (the list
    and a QMCGeometry (B,), unknown where P has no rows).  ids (B,) uint64: the
    polytopes' identities, which key their points with the seed (``_polytope_keys``):
    the same identity gets the same points in any batch; None: the bits of A, b.
    """
    A, b = np.asarray(A, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mask = np.ones(b.shape, bool) if mask is None else np.asarray(mask, bool)
    B, F, S = A.shape
    A, b, mask, empty = _normalise(A, b, mask)
    sel = np.flatnonzero(mask.any(-1))       # the others are all of R^S
    res = [None] * len(draws)
    geo = None
    if sel.size:
        A, b, mask = A[sel], b[sel], mask[sel]
        mode = None if mode is None else np.asarray(mode, dtype=np.float64)[sel]
        given = None if geometry is None else geometry[sel]
        ids = None if ids is None else np.asarray(ids, dtype=_U64)[sel]
        if memory_budget is None:
            res, geo = _qmc_draws(A, b, mask, draws, mode=mode, n_randomisations=n_randomisations, geometry=given,
                                  ids=ids)
        else:
            res, geo = _qmc_chunked(A, b, mask, draws, memory_budget, mode, n_randomisations, given, with_geometry,
                                    ids)
    out = [_assemble(B, S, sel, r, empty) for r in res]
    if not with_geometry:
        return out
    if geo is None or sel.size < B:
        geo = QMCGeometry.unknown(B, S) if geo is None else QMCGeometry.unknown(B, S).merged(geo, sel)
    return out, geo


def qmc_bytes(F: int, S: int, n_qmc: int = 2 ** 12) -> float:
    """Working bytes of ``_qmc`` per polytope with F rows: the Fourier-Motzkin pairs
    (~1 kB per pair of rows, measured with tracemalloc at S = 3, 4) and the sample
    arrays (S + 8 arrays of n_qmc points)."""
    return 1000.0 * F * F + 8.0 * (S + 8) * n_qmc


def _qmc_chunked(A, b, mask, draws, memory_budget, mode=None, n_randomisations=16, geometry=None,
                 with_geometry=False, ids=None):
    """``_qmc_draws`` on chunks of the polytopes that fit memory_budget: a half for the
    per-polytope arrays, a half for the inner arrays (``_qmc``'s chunk, in elements;
    ~24 of them live at once).  Returns its list and the QMCGeometry (with_geometry;
    else None)."""
    B, F, S = A.shape
    inner = max(1e4, min(4e6, memory_budget / 2 / (8.0 * 24)))
    n_qmc = min(max(d[0] for d in draws), inner)                      # a polytope's points go in blocks of inner
    step = int(max(8, memory_budget / 2 // qmc_bytes(F, S, n_qmc)))
    parts = [_qmc_draws(A[i:i + step], b[i:i + step], mask[i:i + step], draws, inner, n_randomisations,
                        mode=None if mode is None else mode[i:i + step],
                        geometry=None if geometry is None else geometry[i:i + step],
                        ids=None if ids is None else ids[i:i + step]) for i in range(0, B, step)]
    return ([PolytopeMoments.concat([p[0][k] for p in parts]) for k in range(len(draws))],
            QMCGeometry.concat([p[1] for p in parts]) if with_geometry else None)


def polygon_moments(a, c, t_lo, t_hi, live, mask, moments=True) -> PolytopeMoments:
    """Mass and moments of N(0, I_2) on a polygon given by its facets: unit normals a
    (B, F, 2), offsets c (B, F) (P = {u : a_k . u <= c_k}), each facet's segment inside P,
    {c_k a_k + t d_k : t_lo <= t <= t_hi} with d_k = (-a_k2, a_k1) (``facet_segments``),
    live (B, F): the segment is non-empty, mask (B, F): real rows.

    For polygons whose segments are already known: translating P by -v moves c by
    -a.v and t by -d.v and leaves everything else as it is.
    """
    B = a.shape[0]
    sel = np.flatnonzero(mask.any(-1))
    res = _polygon_segments(a[sel], c[sel], t_lo[sel], t_hi[sel], live[sel], mask[sel], moments) if sel.size else None
    # A facet through the origin (a region whose posterior mean is its vertex, e.g. a zero
    # map on a cone of bias-free ReLUs): the segments given are those of the facet at 0,
    # which "c = 0 counts as +" gets wrong; find them again with it moved just inside.
    origin = np.flatnonzero((mask[sel] & (np.abs(c[sel]) < 1e-150)).any(-1)) if sel.size else sel
    if origin.size:
        redo = _polygon(a[sel[origin]], c[sel[origin]], mask[sel[origin]], moments)
        res.put(origin, redo)
    return _assemble(B, 2, sel, res)


def _assemble(B, S, sel, res, empty=None):
    """Results res for polytopes sel among B; the others are all of R^S (mass 1, N(0, I))
    unless flagged empty.  Polytopes without mass (empty, or below the float range) get
    zero moments, not NaN."""
    out = PolytopeMoments(np.zeros(B), np.zeros((B, S)), np.broadcast_to(np.eye(S), (B, S, S)).copy(),
                          np.zeros(B))
    if res is not None:
        out.put(sel, res)
        if res.mean_cov is not None:
            out.mean_cov, out.mass_mean_cov = np.zeros((B, S, S)), np.zeros((B, S))
            out.mean_cov[sel], out.mass_mean_cov[sel] = res.mean_cov, res.mass_mean_cov
    if empty is not None:
        out.log_mass = np.where(empty, -np.inf, out.log_mass)
    none = np.isneginf(out.log_mass)
    out.mean[none], out.cov[none] = 0.0, 0.0
    if out.mean_cov is not None:
        out.mean_cov[none], out.mass_mean_cov[none] = 0.0, 0.0
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
    tail = np.maximum(lo, -hi) > TAIL_START
    if tail.any():                     # far from 0: the phi(.) / mass above over- or underflow
        mean[tail], var[tail] = _tail_interval_moments(lo[tail], hi[tail])
    B = a.shape[0]
    return PolytopeMoments(log_mass, mean[:, None], np.maximum(var, 0.0)[:, None, None], np.zeros(B))


TAIL_START = 8.0       # |endpoint| beyond which _interval uses the tail form


def _tail_interval_moments(lo, hi):
    """Mean and variance of N(0, 1) truncated to [lo, hi] (n,), an interval on one side of
    0 beyond TAIL_START, by Mills ratios R(x) = (1 - Phi(x)) / phi(x) relative to phi at
    the near end a: with b the far end, E = phi(b) / phi(a) and Z = R(a) - E R(b) (the
    mass over phi(a)), mean = a + (R(a) m(a) - E R(b) (m(b) + b - a)) / Z and
    var = 1 - mean (mean - a) - (b - a) E / Z, m(x) = 1 / R(x) - x (``_mills_minus_x``).
    No term grows with a, so rows 1e10 noise stds away keep their moments (the direct
    form loses a^2 eps and overflows beyond 1e154)."""
    flip = hi <= 0                                        # mirror to 0 <= a < b
    a, b = np.where(flip, -hi, lo), np.where(flip, -lo, hi)
    R = lambda x: np.sqrt(np.pi / 2) * erfcx(x / np.sqrt(2))
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):     # Z = 0: ``empty`` below
        E = np.exp(-0.5 * (b - a) * (b + a))
        Rb = np.where(np.isfinite(b), R(b), 0.0)
        Z = R(a) - E * Rb
        far = np.where(E > 0, E * Rb * (_mills_minus_x(np.where(np.isfinite(b), b, a)) + b - a), 0.0)
        above = (R(a) * _mills_minus_x(a) - far) / Z             # mean - a
        mean = a + above
        var = 1.0 - mean * above - np.where(E > 0, (b - a) * E / Z, 0.0)
    empty = ~(Z > 0)                                      # b rounds to a: no mass, no moments
    mean, var = np.where(empty, a, mean), np.where(empty, 0.0, var)
    return np.where(flip, -mean, mean), var


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
    t_hi = _masked_extreme(np.minimum, ratio, other & (ad > tol), np.inf)
    t_lo = _masked_extreme(np.maximum, ratio, other & (ad < -tol), -np.inf)
    parallel = other & (np.abs(ad) <= tol)
    blocked, dup = np.zeros(mask.shape, bool), np.zeros(mask.shape, bool)
    b, k = np.nonzero(parallel.any(-1))                           # the few facets with a parallel row
    if b.size:
        par, sl = parallel[b, k], slack[b, k]
        # Relative to the offsets: a facet polygon of a polyhedron near the origin has
        # offsets ~b (down to 1e-100), and its mass depends on their ratios.
        near = 1e-12 * np.maximum(np.abs(c[b, k])[:, None], np.abs(c[b]))
        blocked[b, k] = (par & (sl < -near)).any(-1)
        # Identical lines: keep the first copy only.
        same = par & (aa[b, k] > 0) & (np.abs(sl) <= near)
        dup[b, k] = (same & (np.arange(a.shape[1])[None, :] < k[:, None])).any(-1)
    live = mask & ~blocked & ~dup & (t_hi > t_lo)
    return t_lo, t_hi, live


def _masked_extreme(extreme, x, where, initial):
    """extreme.reduce(x, -1, where=where, initial=initial) (extreme np.minimum or np.maximum)
    through the unmasked reduction, several times faster: it finds the same value, and only
    a 0 (+0 or -0 first?) or a NaN (which payload?) may depend on the order, so rows with
    those are redone masked.  x, where (..., n) -> (...)."""
    out = extreme.reduce(np.where(where, x, initial), axis=-1)
    redo = ~(out != 0)
    if redo.any():
        out[redo] = extreme.reduce(x[redo], axis=-1, where=where[redo], initial=initial)
    return out


def _acosh_of_log(ly):
    """acosh(exp(ly)) without overflow, ly >= 0, to a relative eps also where ly is tiny
    (log(e^y + sqrt(e^2y - 1)) with expm1: about sqrt(2 ly) there, where
    arccosh(exp(ly)) would be 0 once exp(ly) rounds to 1)."""
    y = np.minimum(ly, 20.0)
    return np.where(ly > 20, ly + np.log(2.0), np.log1p(np.expm1(y) + np.sqrt(np.expm1(2.0 * y))))


_GL_RULES = [None] + [leggauss(n) for n in range(1, 17)]    # n-point Gauss-Legendre, n = 1..16
GL_EPS = 2.0 ** -52                 # relative truncation error a per-interval node count aims at


def gauss_legendre_count(log_growth, half_width, eta, eps=GL_EPS):
    """Gauss-Legendre nodes that integrate an analytic g over an interval of half-width
    w > 0 to a relative error eps, from a bound on g off the real axis.  All arrays (n,);
    returns int (n,) (1 to 1e9: compare with the caller's limit).

    The Bernstein ellipse E_rho of the interval with semi-minor axis eta has
    rho = (eta + sqrt(eta^2 + w^2)) / w and lies in the rectangle |Im| <= eta,
    |Re - midpoint| <= sqrt(eta^2 + w^2).  If g is analytic there with |g| <= M, the
    n-point rule errs by at most w (64/15) M rho^-2n / (1 - rho^-2) (Trefethen,
    Approximation Theory and Approximation Practice, Thm 19.3, scaled to the interval),
    while the integral is at least 2 w min g over the interval (g > 0).  So n with
    (32/15) exp(log_growth) rho^-2n / (1 - rho^-2) <= eps suffices, log_growth being an
    upper bound on log(M / min g) that the caller derives for its integrand."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        rho = (eta + np.sqrt(eta * eta + half_width * half_width)) / half_width
        need = (np.log(32.0 / 15.0) + log_growth - np.log1p(-1.0 / (rho * rho)) - np.log(eps)) / (2.0 * np.log(rho))
    # capped at 1e9 (a bound far from any point ~1e17 asks for more than an int64 holds)
    return np.clip(np.ceil(np.nan_to_num(need, nan=1e9, posinf=1e9, neginf=1.0)), 1, 1e9).astype(np.int64)


_NODE_BLOCK = 65536                 # nodes evaluated per numpy pass (cache-sized temporaries)


@lru_cache(maxsize=None)
def _composite_rule(n, m):
    """n panels of the m-point Gauss-Legendre rule: nodes in panel widths from the start
    and weights (n m,) (per panel, on [-1, 1])."""
    x, w = _GL_RULES[m]
    at, weights = (np.arange(n)[:, None] + 0.5 * (1 + x)).reshape(-1), np.tile(w, n)
    at.flags.writeable = weights.flags.writeable = False                # shared by every call
    return at, weights


def gauss_legendre_sums(lo, width, n_panels, nodes, integrand, *args, outputs=None):
    """int_{lo}^{lo + width} integrand by composite Gauss-Legendre: n_panels equal panels
    of nodes points each (all (n,); width 0 gives 0), vectorised over the intervals that
    share a rule and in blocks of ``_NODE_BLOCK`` nodes.  integrand(x (m, k), *(a (k,)
    for a in args)) -> (m, k) takes the m nodes of k intervals (node-major: the
    intervals' args broadcast along rows of k, numpy's fast inner loop; (k, m) blocks with
    (k, 1) args ran 3-5x slower per operation) and their entries of args (n,);
    with outputs = q it returns q integrands at once, (q, m, k), and the result is (q, n)."""
    key = np.where(width > 0, n_panels * 17 + nodes, 0)
    if key.size and key.max() < 2 ** 15:
        key = key.astype(np.int16)                                    # a radix sort
    order = np.argsort(key, kind="stable")
    key, lo, width = key[order], lo[order], width[order]
    args = [a[order] for a in args]                                   # one gather; then slices
    total = np.zeros(lo.shape if outputs is None else (outputs,) + lo.shape)
    keys, starts = np.unique(key, return_index=True)
    for k, start, stop in zip(keys, starts, np.append(starts[1:], key.size)):
        if k == 0:
            continue
        n, m = divmod(int(k), 17)
        at, weights = _composite_rule(n, m)
        block = max(1, _NODE_BLOCK // at.size)
        for s in range(start, stop, block):
            e = min(s + block, stop)
            step = width[s:e] / n
            x = np.multiply.outer(at, step)
            x += lo[s:e]
            f = integrand(x, *(a[s:e] for a in args))
            total[..., s:e] = (weights @ f) * (0.5 * step)
    out = np.empty(total.shape)
    out[..., order] = total
    return out


def log_owen_segment(p, t_lo, t_hi):
    """log G = log (1/2pi) int_{t_lo}^{t_hi} p exp(-(p^2 + t^2)/2) / (p^2 + t^2) dt, p > 0.
    All inputs (n,), output (n,).

    With t = p sinh s the integrand becomes g(s) = exp(-p^2 cosh^2 s / 2) / cosh s:
    analytic but for the poles of 1/cosh at s = +-i pi/2, so Gauss-Legendre in s
    converges geometrically.  The range is clipped where g has fallen by e^-40 from its
    maximum on the interval (at s*, the point nearest 0).  Node count: on |Im s| <= eta
    <= pi/4 (s = x + iy), Re cosh^2 s = (cosh 2x cos 2y + 1) / 2 >= (cosh 2x_n cos 2 eta
    + 1) / 2 and |cosh s| >= cosh x_n cos eta, x_n the real part nearest 0 in the
    rectangle around the interval's Bernstein ellipse (``gauss_legendre_count``).  With
    eta = pi/4, u* = p cosh s* and u_n = p cosh x_n that bounds |g| by
    M = exp(-p^2 / 4) sqrt 2 / cosh x_n, so
        log(M / g(s*)) <= (u*^2 - p^2 / 2) / 2 + log(sqrt 2 u* / u_n),
    which with the fall across the interval gives the nodes for a relative truncation error
    below 2^-52.  Ranges that would need more than 16 nodes are split into panels of
    width <= 1.5 and a fall of at most 8, 16 nodes each (``panels_where_needed``: checked
    against mpmath, not covered by the bound).  The nodes are summed scaled by
    the Gaussian factor at s*, exp(-(u^2 - u*^2)/2) / cosh s <= 1, so no node needs a
    logarithm.
    """
    p = np.maximum(p, 1e-150)              # keeps p cosh s finite on the clipped range
    lo, width, n_panels, nodes, u2_star = _owen_rule(p, t_lo, t_hi)
    total = gauss_legendre_sums(lo, width, n_panels, nodes, _owen_integrand, p, np.clip(0.0, t_lo, t_hi))
    with np.errstate(divide="ignore"):
        return np.where(width > 0, np.log(total) - 0.5 * u2_star - np.log(2 * np.pi), -np.inf)


def _owen_rule(p, t_lo, t_hi):
    """The quadrature of ``log_owen_segment`` (p >= 1e-150): the clipped range's start
    and width in s, the panels and nodes per panel, and (p cosh s*)^2 (all (n,))."""
    with np.errstate(over="ignore", divide="ignore"):
        s_lo, s_hi = np.arcsinh(t_lo / p), np.arcsinh(t_hi / p)
    s_star = np.clip(0.0, s_lo, s_hi)
    r_star = np.hypot(p, np.clip(0.0, t_lo, t_hi))                    # p cosh s*, the distance to 0
    lc_star = np.log(r_star / p)
    # p^2 cosh^2 s / 2 <= p^2 cosh^2 s* / 2 + 40  and  log cosh s <= log cosh s* + 40
    ly = 0.5 * np.logaddexp(2 * lc_star, np.log(80.0) - 2 * np.log(p))
    s_cut = np.minimum(_acosh_of_log(ly), np.abs(s_star) + 41.0)
    lo, hi = np.maximum(s_lo, -s_cut), np.minimum(s_hi, s_cut)
    width = np.maximum(hi - lo, 0.0)
    u2_star = np.minimum(r_star * r_star, np.exp(700.0))              # (p cosh s*)^2

    def fall(s, i=slice(None)):                                       # log g(s*) / g(s)
        ch = np.cosh(s)
        with np.errstate(over="ignore"):
            return 0.5 * np.minimum((p[i] * ch) ** 2, np.exp(700.0)) + np.log(ch) - (0.5 * u2_star[i] + lc_star[i])
    nodes = _owen_node_count(p, r_star, lo, hi, fall(np.where(np.abs(lo) > np.abs(hi), lo, hi)))
    return lo, width, panels_where_needed(nodes, width, fall, lo, hi), nodes, u2_star


def panels_where_needed(nodes, width, fall, lo, hi):
    """Panels per interval: 1, except where one interval would need more than 16 nodes;
    those are split into panels of width <= 1.5 and a fall of at most 8 (log of the
    peak over the integrand; fall(x, i) at points x of the intervals i), 16 nodes each.
    nodes (n,) int is set to 16 there in place; width, lo, hi (n,).  Returns (n,) int.

    This split is a rule of thumb checked against 60-digit mpmath, not a consequence of
    ``gauss_legendre_count``'s bound: at eta = pi/4 that bound asks for ~21 nodes on a
    panel of width 1.5 even without growth.  Certifying every panel by its own bound
    (doubling the panels, a smaller ellipse where the integrand falls fast) was built and
    measured: the same results, S = 3 3-9% and S = 2 35-45% slower."""
    n_panels = np.ones(nodes.shape, np.int64)
    many = np.flatnonzero((nodes > 16) & (width > 0))
    if many.size:
        drop = fall(lo[many], many) + fall(hi[many], many)
        # no panel narrower than 16 float64 steps of s: where the Gaussian is ~1e31 away the
        # whole range is one step wide and falls by ~1e47 across it (rounding: the integral's
        # log then errs by O(10) next to u*^2 / 2 ~ 1e62, below that term's own rounding)
        finest = width[many] / (16 * np.spacing(np.maximum(np.abs(lo[many]), np.abs(hi[many]))))
        n_panels[many] = np.maximum(1, np.ceil(np.fmin(np.maximum(width[many] / 1.5, drop / 8.0), finest)))
        nodes[many] = 16
    return n_panels


def _owen_integrand(s, p, t_star):
    """exp(-(u^2 - u*^2) / 2) / cosh s, u = p cosh s: s (m, k), p and t_star = p sinh s*
    (k,).  u^2 - u*^2 = t^2 - t*^2 (t = p sinh s) keeps its relative accuracy where
    p is large and the range in s tiny (the difference of cosh^2 would round away);
    sinh and cosh from one exp, which overflows only where the integrand is 0 anyway."""
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        e = np.exp(s)
        ie = np.divide(1.0, e)
        t = np.subtract(e, ie)
        t *= 0.5 * p
        ch = np.add(e, ie, out=e)
        ch *= 0.5
        d = np.subtract(t, t_star, out=ie)
        t += t_star
        d *= t
        d *= -0.5
        np.minimum(d, 0.0, out=d)   # |t| >= |t*| on the range; where s is one float step wide
        np.exp(d, out=d)            # (t* ~ 1e31) rounding made d ~ +1e47: exp inf, log p NaN
        d /= ch
        return d


def _owen_node_count(p, u_star, lo, hi, fall):
    """Gauss-Legendre nodes for ``log_owen_segment``'s integral over [lo, hi] (see there),
    fall = log g(s*) / min g: all (n,), int (n,)."""
    eta = 0.25 * np.pi
    half, mid = 0.5 * (hi - lo), 0.5 * (hi + lo)
    reach = np.sqrt(eta * eta + half * half)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        u_n = p * np.cosh(np.clip(0.0, mid - reach, mid + reach))
        growth = 0.5 * (u_star - _SQRT_HALF * p) * (u_star + _SQRT_HALF * p) + np.log(np.sqrt(2.0) * u_star / u_n) + fall
    return gauss_legendre_count(growth, half, eta)


def _by_row_count(solve, A, b, mask, *args):
    """solve(A, b, mask, *args) on groups of polytopes with the same number of real rows,
    padding dropped (the S = 2 work is quadratic in the row count)."""
    order = np.argsort(~mask, axis=1, kind="stable")                  # real rows first
    A = np.take_along_axis(A, order[..., None], 1)
    b, mask = np.take_along_axis(b, order, 1), np.take_along_axis(mask, order, 1)
    return solve_in_groups(lambda *x: solve(*x, *args), mask.sum(1), (A, b, mask))


def solve_in_groups(solve, sizes, arrays) -> PolytopeMoments:
    """solve(*(x[g, :k] for x in arrays)) for each group g of polytopes with the same
    size k (their real rows first), reassembled in order: sizes (B,), arrays (B, F, ...)."""
    B = len(sizes)
    groups = [(g, solve(*(x[g, :k] for x in arrays)))
              for k in np.unique(sizes) for g in [np.flatnonzero(sizes == k)]]
    S = groups[0][1].mean.shape[1] if groups else 0
    out = PolytopeMoments(np.zeros(B), np.zeros((B, S)), np.zeros((B, S, S)), np.zeros(B))
    for g, res in groups:
        out.put(g, res)
    return out


def _polygon(a, c, mask, moments):
    # A facet through the origin is moved just inside (the formula is continuous from
    # there); taken literally, "b = 0 counts as +" is wrong when 0 is a vertex of P.
    c = np.where(mask & (np.abs(c) < 1e-150), 1e-150, c)
    t_lo, t_hi, live = facet_segments(a, c, mask)
    return _polygon_segments(a, c, t_lo, t_hi, live, mask, moments)


def _polygon_segments(a, c, t_lo, t_hi, live, mask, moments):
    """``polygon_moments`` where every polygon has a real row."""
    B, F, _ = a.shape
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
    log_out = np.where(np.isneginf(log_entry), -np.inf, log_out)       # all facet terms underflow
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


# ---------------------------------------------------------------------- S >= 4
#
# Separation of variables (Genz) in a frame adapted to each polytope, with exact
# projections, exponential tilting and randomised quasi-Monte Carlo (``_qmc``):
#
# * the mode mu = argmin{|u| : u in P} (``_mode``) gives the first axis e_1 = mu / |mu|
#   (by the KKT conditions z_1 = e_1 . u >= |mu| on P); the rows active at mu, then the
#   others by slack, give the next axes (``_frame``).  Coordinates are taken relative to
#   the mode, so offsets of thousands of standard deviations cost no digits;
# * every level j sees the exact projection of P onto (z_1..z_j): Fourier-Motzkin
#   elimination of z_S, z_{S-1}, ... adds implied rows (``_levels``; redundant ones dropped
#   by Chernikov's rule, and pruned exactly on the 2-D level), so z_j's interval given z_<j
#   is never empty and no path is lost on a thin or far polytope (where a level would
#   exceed its cap, its nearest rows are kept: still valid, no longer exact);
# * z_1 is drawn from N(m, 1) instead of N(0, 1) on its interval (Botev-type exponential
#   tilting, weight exp(m^2/2 - m z_1)), m the minimax tilt for a slice mass growing like
#   (z_1 - |mu|)^(r-1) above a mode where r rows are active (``_tilt``); z_2..z_S are
#   plain SOV draws.  Without the tilt a far polytope's z_1 would be drawn on the scale
#   1 / |mu| of the Gaussian's tail, while the mass sits within r / |mu| of the mode.
#
# Unbiased in the mass: every level's interval contains the slice of P's projection (the
# implied rows are loosened by a bound on their rounding error, dropping one only widens
# the interval) and the last level enforces the original rows as they are, so the mean
# weight is the mass exactly; the log mass is the log of that mean (its SE by the delta
# method, SE / mass).  Each polytope gets its own randomisation (``_shifted_uniforms``: a
# digital shift of R scrambled Sobol sets keyed by the polytope's rows), so estimates of
# different polytopes are independent and the standard error of a sum over polytopes adds
# in quadrature.  (The earlier version gave every polytope the same points: at S = 4
# 16-16 the partition's prior masses summed to 0.87..1.11 depending on the seed.)  The
# standard error is that of the mean of R = 16 independent sets, so error / SE is
# roughly Student-t with 15 degrees of freedom: over the regions of S = 4 partitions,
# |error| <= 3 SE in >= 99% of them against plain Monte Carlo (benchmarks/bench_qmc.py).
# A feature too small for the points to see (a sliver of a thin polytope) goes unseen by
# the SE too, and such polytopes can be off by several SE.

_EPS_COEF = 1e-12      # |coefficient| below which an implied row ignores a variable
_U64 = np.uint64


def _gram_schmidt_rows(V, tol=1e-6):
    """Greedy orthonormal basis from candidate vectors V (B, C, S), in order, skipping
    those (nearly) in the span of the ones taken; twice-orthogonalised.  Returns E
    (B, S, S), basis vectors as rows, and the count taken (B,) (S unless V is short)."""
    B, C, S = V.shape
    E = np.zeros((B, S, S))
    count = np.zeros(B, dtype=np.int64)
    rows = np.arange(B)
    for i in range(C):
        v = V[:, i].copy()
        for _ in range(2):
            v -= np.einsum("bk,bks->bs", np.einsum("bks,bs->bk", E, v), E)
        nv = np.linalg.norm(v, axis=-1)
        take = (nv > tol) & (count < S)
        if take.any():
            E[rows[take], count[take]] = v[take] / nv[take, None]
            count += take
        if np.all(count >= S):
            break
    return E, count


def _affine_min_norm(AJ, bJ):
    """The point of {u : A_J u = b_J} nearest to 0, for k rows AJ (..., k, S), bJ
    (..., k): u (..., S), the orthonormalised rows Q (..., k, S) (A_J = Lo Q, Lo lower
    triangular, by twice-iterated Gram-Schmidt) and ok (...): the rows are independent."""
    k = AJ.shape[-2]
    Q = np.zeros(AJ.shape)
    Lo = np.zeros(AJ.shape[:-1] + (k,))
    ok = np.ones(AJ.shape[:-2], dtype=bool)
    for i in range(k):
        v = AJ[..., i, :].copy()
        for _ in range(2):
            coef = (Q[..., :i, :] @ v[..., None])[..., 0]
            Lo[..., i, :i] += coef
            v -= (coef[..., None, :] @ Q[..., :i, :])[..., 0, :]
        nv = np.sqrt((v * v).sum(-1))
        Lo[..., i, i] = nv
        ok &= nv > 1e-10
        Q[..., i, :] = v / np.where(nv > 0, nv, 1.0)[..., None]
    y = np.zeros(bJ.shape)
    for i in range(k):                                                     # Lo y = b_J
        y[..., i] = (bJ[..., i] - (Lo[..., i, :i] * y[..., :i]).sum(-1)) / np.where(ok, Lo[..., i, i], 1.0)
    return (y[..., None, :] @ Q)[..., 0, :], Q, ok


def distance_lower_bound(A, b, mask, chunk=4e6, with_mode=False):
    """A certified lower bound on min{|u| : A u <= b} (0 where 0 is in P), for unit rows
    A (B, F, S), b (B, F), mask (B, F) -> (B,).

    The mode (``_mode_dual``) names the active rows J; their multipliers lam from
    -u = A_J^T lam (least squares, clipped at 0) give the dual value
    g = -|A_J^T lam|^2 / 2 - b_J . lam, which for any lam >= 0 is at most
    min |u|^2 / 2 (weak duality), so sqrt(2 g) is a lower bound whether or not the mode
    is exact; where it is, the bound is the distance.  A relative 1e-9 is taken off for
    rounding.  with_mode: also the mode search's point (B, S), NaN where it is not
    certified (for ``polytope_qmc_draws``'s mode)."""
    B, F, S = A.shape
    if B == 0:
        return (np.zeros(0), np.zeros((0, S))) if with_mode else np.zeros(0)
    u, _, exact = _mode_dual(A, b, mask, chunk=chunk)
    nu = np.linalg.norm(u, axis=-1)
    slack = np.where(mask, b - np.einsum("bfs,bs->bf", A, u), np.inf)
    J = np.argsort(slack / (1.0 + np.abs(b) + nu[:, None]), axis=1, kind="stable")[:, :S]
    used = np.take_along_axis(mask, J, 1) & (np.take_along_axis(slack, J, 1) <= 1e-6 * (1.0 + nu[:, None]))
    AJ = np.take_along_axis(A, J[..., None], 1) * used[..., None]
    bJ = np.where(used, np.take_along_axis(b, J, 1), 0.0)
    G = AJ @ np.swapaxes(AJ, 1, 2) + np.eye(J.shape[1]) * (~used)[:, :, None]
    rhs = -(AJ @ u[..., None])[..., 0]
    lam, ok = _spd_solve(G, rhs)
    bad = np.flatnonzero(~ok)                  # (nearly) dependent rows: the least-squares multipliers
    if bad.size:
        with np.errstate(all="ignore"):
            lam[bad] = (np.linalg.pinv(G[bad]) @ rhs[bad, :, None])[..., 0]
    lam = np.where(used & np.isfinite(lam), np.maximum(lam, 0.0), 0.0)
    g = -0.5 * (np.einsum("bk,bks->bs", lam, AJ) ** 2).sum(-1) - (bJ * lam).sum(-1)
    r = np.sqrt(np.maximum(2.0 * g, 0.0))
    inside = np.all(~mask | (b >= 0), axis=1)
    bound = np.where(inside, 0.0, np.maximum(r * (1 - 1e-9) - 1e-9, 0.0))
    return (bound, np.where(exact[:, None], u, np.nan)) if with_mode else bound


def dual_ascent_distance_bound(A, b, mask, sweeps=16):
    """A certified lower bound on min{|u| : A u <= b} from ``sweeps`` sweeps of Hildreth's
    dual ascent alone (no mode search; ~1/7 of ``distance_lower_bound``'s cost, often as
    sharp): for any lam >= 0 and u in P, with w = A^T lam, -w . u >= -b . lam, so
    |u| >= -b . lam / |w| where that is positive.  Unit rows A (B, F, S), b, mask (B, F)
    -> (B,), 0 where the bound is not positive.  Rounding: the computed b . lam and w
    may err by F eps sum|lam_k b_k| and F eps sum lam_k (unit rows); twice that is
    taken off the numerator and added to |w|, and a relative 1e-9 and 1e-9 besides."""
    B, F, S = A.shape
    if B == 0:
        return np.zeros(0)
    Am = A * mask[..., None]
    bm = np.where(mask, b, 0.0)
    lam = _hildreth(Am, bm, sweeps)
    eps = 2.0 * F * np.finfo(np.float64).eps
    num = -(lam * bm).sum(-1) - eps * np.abs(lam * bm).sum(-1)
    den = np.linalg.norm(np.einsum("bf,bfs->bs", lam, Am), axis=-1) + eps * lam.sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where((num > 0) & (den > 0), num / den, 0.0)
    return np.maximum(r * (1 - 1e-9) - 1e-9, 0.0)


def _spd_solve(G, r, rcond=1e-8):
    """x = G^-1 r for symmetric G (B, k, k), r (B, k) by a Cholesky factorisation written
    out over the batch (k small: a few passes over (B,) arrays, not one LAPACK call per
    matrix).  ok (B,): every pivot exceeds rcond times G's largest diagonal entry (G
    positive definite with condition number below ~k / rcond, so that x agrees with
    the pseudo-inverse's to ~1e-8); x is not to be used elsewhere."""
    B, k, _ = G.shape
    L = np.zeros(G.shape)
    scale = np.diagonal(G, axis1=1, axis2=2).max(1)
    ok = np.ones(B, dtype=bool)
    for j in range(k):
        d = G[:, j, j] - (L[:, j, :j] * L[:, j, :j]).sum(-1)
        ok &= d > rcond * scale
        L[:, j, j] = np.sqrt(np.where(ok, d, 1.0))
        for i in range(j + 1, k):
            L[:, i, j] = (G[:, i, j] - (L[:, i, :j] * L[:, j, :j]).sum(-1)) / L[:, j, j]
    y = np.zeros(r.shape)
    for i in range(k):                                                     # L y = r
        y[:, i] = (r[:, i] - (L[:, i, :i] * y[:, :i]).sum(-1)) / L[:, i, i]
    x = np.zeros(r.shape)
    for i in range(k - 1, -1, -1):                                         # L^T x = y
        x[:, i] = (y[:, i] - (L[:, i + 1:, i] * x[:, i + 1:]).sum(-1)) / L[:, i, i]
    return x, ok


def _mode_dual(A, b, mask, chunk=4e6, sweeps=8, budget=500, more_sweeps=16):
    """``_mode`` guided by a few sweeps of Hildreth's dual coordinate ascent on
    min |u|^2 / 2 over A u <= b (u = -A^T lam, lam >= 0): first the point nearest 0 of
    the affine hull of the (at most S) rows with the largest multipliers; where that
    fails the KKT check (``_kkt``, to a relative 1e-7), the same after ``more_sweeps``
    further sweeps; where that fails too, ``_mode`` at a small budget with the rows
    ranked by the first sweeps' lam (then by offset); and last ``_mode``'s full
    search.  Same outputs as ``_mode``.  (The ascent alone converges too slowly on the
    thin regions of a partition; the enumeration costs ~20x a sweep.)"""
    B, F, S = A.shape
    Am = A * mask[..., None]
    bm = np.where(mask, b, 0.0)
    lam = _hildreth(Am, bm, sweeps)
    stop_check()
    ranks = lambda key: np.argsort(np.argsort(key, axis=1, kind="stable"), axis=1)
    # rows with a multiplier first, largest first; then the others by offset
    rank = np.where(lam > 0, ranks(np.where(lam > 0, -lam, np.inf)), F + ranks(np.where(mask, b, np.inf)))
    u = _hull_point(Am, bm, lam, rank)
    scale = 1.0 + np.abs(b)
    exact = _kkt(A, b, mask, u, scale) if F > S else np.zeros(B, dtype=bool)
    redo = np.flatnonzero(~exact)
    if redo.size and more_sweeps and F > S:     # the ascent further on, from where it stopped
        lam2 = _hildreth(Am[redo], bm[redo], more_sweeps, lam[redo])
        rank2 = np.where(lam2 > 0, ranks(np.where(lam2 > 0, -lam2, np.inf)), F)
        u2 = _hull_point(Am[redo], bm[redo], lam2, rank2)
        ok = _kkt(A[redo], b[redo], mask[redo], u2, scale[redo])
        u[redo[ok]], exact[redo[ok]] = u2[ok], True
    r = _n_active(A, b, mask, u, scale)
    redo = np.flatnonzero(~exact)
    if redo.size:              # then the faces among the rows ranked first (exact: KKT checked)
        u[redo], r[redo], exact[redo] = _mode(A[redo], b[redo], mask[redo], budget=budget, chunk=chunk,
                                              rank=rank[redo])
    redo = np.flatnonzero(~exact)
    if redo.size:
        u[redo], r[redo], exact[redo] = _mode(A[redo], b[redo], mask[redo], chunk=chunk)
    return u, r, exact


def _hull_point(Am, bm, lam, rank):
    """The point nearest 0 of the affine hull of the (at most S) rows with a multiplier
    lam > 0 (B, F) ranked first by rank (B, F), for rows Am (B, F, S), bm (B, F) (0 on
    padding): (B, S), 0 where the rows are dependent."""
    S = Am.shape[2]
    J = np.argsort(rank, axis=1, kind="stable")[:, :S]
    used = np.take_along_axis(lam, J, 1) > 0
    AJ = np.take_along_axis(Am, J[..., None], 1) * used[..., None]
    G = AJ @ np.swapaxes(AJ, 1, 2) + np.eye(J.shape[1]) * (~used)[:, :, None]
    rhs = np.where(used, np.take_along_axis(bm, J, 1), 0.0)
    with np.errstate(all="ignore"):
        try:
            y = np.linalg.solve(G, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:     # a G exactly singular (two rows alike): LAPACK stops the batch
            y, ok = _spd_solve(G, rhs)
            y[~ok] = np.nan
    u = np.einsum("bk,bks->bs", y, AJ)
    return np.where(np.isfinite(u).all(1, keepdims=True), u, 0.0)


def _hildreth(A, b, sweeps, lam0=None):
    """The multipliers lam (B, F) >= 0 after ``sweeps`` sweeps of Hildreth's dual
    coordinate ascent on min |u|^2 / 2 over A u <= b (A (B, F, S), padding rows zero),
    u = -A^T lam, from lam0 (B, F) (None: 0).  The polytopes are the last axis of the
    working arrays (each step is a few passes over contiguous (B,) rows, not strided
    (B, S) gathers)."""
    B, F, S = A.shape
    At = np.ascontiguousarray(np.moveaxis(A, 0, -1))                    # (F, S, B)
    bt = np.ascontiguousarray(b.T)                                      # (F, B)
    lam = np.zeros((F, B)) if lam0 is None else np.array(lam0.T, order="C")
    u = -np.einsum("fsb,fb->sb", At, lam) if lam0 is not None else np.zeros((S, B))
    prod = np.empty((S, B))
    for _ in range(sweeps):
        for k in range(F):
            a = At[k]
            np.multiply(a, u, out=prod)
            step = prod.sum(0)
            step -= bt[k]
            np.maximum(step, np.negative(lam[k]), out=step)
            lam[k] += step
            np.multiply(a, step, out=prod)
            u -= prod
    return np.ascontiguousarray(lam.T)


def _known_modes(A, b, mask, mode, chunk=4e6):
    """``_mode_dual``'s outputs where the modes (B, S) are already known (NaN rows: not
    known): a given mode is kept where it passes ``_kkt`` on (A, b) itself (so one found
    on another scaling of the same polytope, or a wrong one, is never trusted), and
    ``_mode_dual`` searches for the others."""
    B, F, S = A.shape
    given = np.isfinite(mode).all(-1)
    mu = np.where(given[:, None], mode, 0.0)
    scale = 1.0 + np.abs(b)
    exact = given & _kkt(A, b, mask, mu, scale)
    r = _n_active(A, b, mask, mu, scale)
    redo = np.flatnonzero(~exact)
    if redo.size:
        mu[redo], r[redo], exact[redo] = _mode_dual(A[redo], b[redo], mask[redo], chunk=chunk)
    return mu, r, exact


def _mode(A, b, mask, budget=3e3, chunk=4e6, rank=None):
    """argmin{|u| : A u <= b} (B, S) for unit rows A (B, F, S), the number of rows
    active there (B,) and exact (B,): all faces were searched.

    By enumeration of faces: the mode lies in the relative interior of a face, where
    it is the point of the face's affine hull {A_J u = b_J} nearest to 0 (J <= S-1
    independent rows); a vertex is reached as the clipped end of an edge (|J| = S - 1:
    a line, clipped to the interval the other rows allow).  Candidates that break a row
    by more than 1e-9 (relative) are dropped; where none is left (rounding on a
    degenerate polytope) the least violating one is taken.  Where enumerating all rows
    would cost more than ``budget`` row checks per polytope (large S or F), J ranges
    over the rows with the smallest offsets only (or the smallest ``rank`` (B, F), where
    given), which may miss the mode.  The mode
    only steers the integration frame and the tilt (which ``_qmc`` applies only where
    the mode is certified), so an error in it costs variance, never bias.
    """
    from itertools import combinations
    from math import comb
    B, F, S = A.shape
    scale = 1.0 + np.abs(b)
    K = F
    while K > S and sum(comb(K, k) for k in range(1, min(S - 1, K) + 1)) * F > budget:
        K -= 1
    cand = np.argsort(np.where(mask, b if rank is None else rank, np.inf), axis=1, kind="stable")[:, :K]
    viol0 = np.where(mask, -b / scale, -np.inf).max(-1)
    best_u = np.zeros((B, S))
    best_n = np.where(viol0 <= 1e-9, 0.0, np.inf)
    best_v = viol0.copy()
    for k in range(1, min(S - 1, K) + 1):
        sub = np.array(list(combinations(range(K), k)), dtype=np.int64)     # (n, k)
        step = int(max(1, chunk // (sub.shape[0] * F * S)))
        for s0 in range(0, B, step):
            stop_check()
            sl = slice(s0, min(s0 + step, B))
            Ab, bb, mb = A[sl], b[sl], mask[sl]
            idx = cand[sl][:, sub]                                         # (n_b, n, k) rows
            r_b = np.arange(idx.shape[0])[:, None, None]
            u, Q, ok = _affine_min_norm(Ab[r_b, idx], bb[r_b, idx])        # (n_b, n, S)
            ok &= mb[r_b, idx].all(-1)
            At = np.swapaxes(Ab, 1, 2)                                     # (n_b, S, F)
            if k == S - 1:                                                 # an edge: clip the line
                R = np.broadcast_to(np.eye(S), Q.shape[:-2] + (S, S)).copy()
                Qt = np.swapaxes(Q, -1, -2)
                for _ in range(2):
                    R -= (R @ Qt) @ Q
                pick = (R * R).sum(-1).argmax(-1)
                d = np.take_along_axis(R, pick[..., None, None], -2)[..., 0, :]
                d /= np.sqrt((d * d).sum(-1, keepdims=True))
                sl_ = bb[:, None, :] - u @ At
                q = d @ At
                other = mb[:, None, :] & ~(idx[..., None] == np.arange(F)).any(-2)
                with np.errstate(divide="ignore", invalid="ignore"):
                    t = sl_ / q
                t_hi = np.where(other & (q > 1e-12), t, np.inf).min(-1)
                t_lo = np.where(other & (q < -1e-12), t, -np.inf).max(-1)
                t_star = np.where(t_lo <= t_hi, np.clip(0.0, t_lo, t_hi),
                                  0.5 * (np.clip(t_lo, -1e300, 1e300) + np.clip(t_hi, -1e300, 1e300)))
                u = u + t_star[..., None] * d
            nu = np.sqrt((u * u).sum(-1))
            viol = np.where(mb[:, None, :], (u @ At - bb[:, None, :])
                            / (scale[sl][:, None, :] + nu[..., None]), -np.inf).max(-1)
            viol = np.where(ok, viol, np.inf)
            n2 = np.where(viol <= 1e-9, (u * u).sum(-1), np.inf)
            j = n2.argmin(1)
            r_ = np.arange(j.size)
            better = n2[r_, j] < best_n[sl]
            jv = viol.argmin(1)
            closer = ~np.isfinite(best_n[sl]) & ~np.isfinite(n2[r_, j]) & (viol[r_, jv] < best_v[sl])
            pick = np.where(better, j, jv)
            upd = better | closer
            best_u[sl][upd] = u[r_, pick][upd]
            best_n[sl] = np.where(better, n2[r_, j], best_n[sl])
            best_v[sl] = np.where(upd, viol[r_, pick], best_v[sl])
    exact = np.isfinite(best_n) if K == F else _kkt(A, b, mask, best_u, scale)
    return best_u, _n_active(A, b, mask, best_u, scale), exact


def _kkt(A, b, mask, u, scale, tol=1e-9):
    """u is the mode: feasible, and -u = A_J^T lam with lam >= 0 for the rows J active at
    u (checked where at most S rows are active; False elsewhere)."""
    B, F, S = A.shape
    nu = np.linalg.norm(u, axis=-1)
    slack = b - np.einsum("bfs,bs->bf", A, u)
    tol_f = tol * (scale + nu[:, None])
    feasible = np.all(~mask | (slack >= -tol_f), axis=1)
    active = mask & (slack <= tol_f)
    na = active.sum(1)
    J = np.argsort(~active, axis=1, kind="stable")[:, :S]                 # active rows first
    used = np.arange(S)[None, :] < na[:, None]
    AJ = np.take_along_axis(A, J[..., None], 1) * used[..., None]
    AJ = AJ + (~used)[..., None] * np.eye(S)[None] * 1e-3               # pad: harmless rows
    _, Q, ok = _affine_min_norm(AJ, np.zeros((B, S)))
    # -u in the span of A_J, with nonnegative coefficients on the used rows
    G = AJ @ np.swapaxes(AJ, 1, 2)
    # dependent active rows (a facet listed twice) make G singular: such a u is not
    # certified here (ok is False), so any invertible stand-in keeps the batch solvable
    G = np.where(ok[:, None, None], G, np.eye(S))
    try:
        lam = np.linalg.solve(G, -(AJ @ u[..., None]))[..., 0]
    except np.linalg.LinAlgError:     # a G exactly singular still (a used row along a pad row): not certified
        lam, solved = _spd_solve(G, -(AJ @ u[..., None])[..., 0])
        ok = ok & solved
    resid = np.linalg.norm(u + np.einsum("bk,bks->bs", lam, AJ), axis=-1)
    good = (resid <= 1e-7 * (1 + nu)) & np.all(~used | (lam >= -1e-9 * (1 + nu[:, None])), axis=1)
    return feasible & ok & (na <= S) & good & (np.abs(lam) * ~used <= 1e-7 * (1 + nu[:, None])).all(1)


def least_distance_point(a, c):
    """argmin ||u|| over {u : a u <= c} for one polytope, a (F, S), c (F,), exactly:
    least-distance programming by NNLS (Lawson and Hanson, ch. 23).

    Returns (u (S,), True); (None, False) where the polytope is empty; (None, True)
    where the solver did not converge.
    """
    from scipy.optimize import nnls
    S = a.shape[1]
    E = np.vstack([-a.T, -c[None, :]])
    f = np.zeros(S + 1)
    f[-1] = 1.0
    try:
        y = nnls(E, f, maxiter=50 * (S + 1 + c.size))[0]
    except RuntimeError:
        return None, True
    r = E @ y - f
    if np.linalg.norm(r) < 1e-12:
        return None, False
    if abs(r[S]) <= 1e-300:
        return None, True
    return -r[:S] / r[S], True


def _mode_ldp(A, b, mask):
    """``_mode`` one polytope at a time, exactly (``least_distance_point``).  The
    origin where P is empty."""
    B, F, S = A.shape
    mu = np.zeros((B, S))
    exact = np.zeros(B, dtype=bool)
    for i in range(B):
        rows = np.flatnonzero(mask[i])
        if rows.size == 0 or np.all(b[i, rows] >= 0):
            continue
        u, _ = least_distance_point(A[i, rows], b[i, rows])
        if u is not None:
            mu[i], exact[i] = u, True
    return mu, _n_active(A, b, mask, mu, 1.0 + np.abs(b)), exact


def _n_active(A, b, mask, u, scale):
    slack = b - np.einsum("bfs,bs->bf", A, u)
    active = mask & (slack <= 1e-9 * (scale + np.linalg.norm(u, axis=-1, keepdims=True)))
    return np.minimum(active.sum(-1), A.shape[-1])


def _frame(A, b, mask, mu):
    """Orthonormal frame (B, S, S), basis vectors as rows: mu / |mu| first, then the
    rows of A by slack at mu (active rows first), then the unit vectors; where mu = 0
    (0 in P) the rows come by offset, the nearest facets first."""
    B, F, S = A.shape
    L = np.linalg.norm(mu, axis=-1)
    slack = np.where(mask, b - np.einsum("bfs,bs->bf", A, mu), np.inf)
    slack[slack <= 1e-9 * (1.0 + np.abs(b) + L[:, None])] = 0.0
    order = np.argsort(slack, axis=1, kind="stable")
    rowsA = np.take_along_axis(A * mask[..., None], order[..., None], 1)
    first = np.where(L[:, None] > 0, mu / np.where(L > 0, L, 1.0)[:, None], 0.0)
    V = np.concatenate([first[:, None], rowsA, np.broadcast_to(np.eye(S), (B, S, S))], 1)
    return _gram_schmidt_rows(V)[0]


def _fm_eliminate(c, d, m, hist, n_elim, zmax, cap):
    """Rows c (B, K, j) . z <= d (B, K), valid where m, with their histories hist (B, K)
    uint64 (bit f: original row f mod 64 took part); return the rows of the projection
    onto z_1..z_{j-1} (padded, normalised) with their histories: the rows without z_j and
    the positive/negative pairs combined (Fourier-Motzkin), implied rows loosened by
    their rounding error.  Pairs whose history holds more than n_elim + 1 rows (n_elim
    variables eliminated after this step) are redundant (Chernikov's rule) and dropped.
    Where more than ``cap`` rows remain, the ``cap`` nearest ones (smallest offsets) are
    kept.  Dropping rows only enlarges the projection, which stays valid (a level's
    interval is then wider than the slice, and some paths die at a later level).
    Also empty (B,): a combination reads 0 <= negative, and exact (B,): nothing was
    dropped but redundant rows."""
    B, K, j = c.shape
    cj = c[..., -1]
    rest, ac = c[..., :-1], np.abs(cj)
    big = m & (ac > _EPS_COEF)
    pos, neg = big & (cj > 0), big & (cj < 0)
    empty = np.zeros(B, dtype=bool)
    # rows without z_j (exactly: kept as they are; tiny coefficient: loosened)
    small = m & ~big
    zn = np.linalg.norm(rest, axis=-1)
    zd = d + ac * zmax * (1 + 1e-12)
    empty |= (small & (zn <= 1e-300) & (zd < 0)).any(1)
    zm = small & (zn > 1e-300)
    safe = np.where(zm, zn, 1.0)
    own = (rest / safe[..., None], zd / safe, zm, hist)
    # the pairs (positive row i, negative row k) Chernikov's rule keeps, as flat lists
    q = np.flatnonzero(pos.any(1) & neg.any(1))
    found = []
    for qs in np.array_split(q, max(1, int(q.size * K * K // 4e6))):   # (chunk, K, K) masks
        qi, i, k = np.nonzero(pos[qs][:, :, None] & neg[qs][:, None, :])
        keep = np.bitwise_count(hist[qs[qi], i] | hist[qs[qi], k]) <= n_elim + 1      # only where pairs are
        found.append((qs[qi[keep]], i[keep], k[keep]))
    bi, i, k = (np.concatenate(x) for x in zip(*found))
    with np.errstate(divide="ignore", invalid="ignore"):
        wi, wk = 1.0 / ac[bi, i], 1.0 / ac[bi, k]
    pc = rest[bi, i] * wi[:, None] + rest[bi, k] * wk[:, None]
    err = 1e-13 * (wi * (np.abs(d[bi, i]) + zmax[bi, 0]) + wk * (np.abs(d[bi, k]) + zmax[bi, 0]))
    pd = d[bi, i] * wi + d[bi, k] * wk + err
    nrm = np.sqrt((pc * pc).sum(-1))
    degenerate = nrm <= 1e-12 * (wi + wk)
    empty[bi[degenerate & (pd < 0)]] = True
    ok = ~degenerate
    bi, pc, pd, ph = bi[ok], pc[ok] / nrm[ok, None], pd[ok] / nrm[ok], hist[bi[ok], i[ok]] | hist[bi[ok], k[ok]]
    cnt = np.bincount(bi, minlength=B)                               # bi is sorted
    slot = np.arange(bi.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    Kp = max(1, int(cnt.max(initial=0)))
    pair_c, pair_d = np.zeros((B, Kp, j - 1)), np.ones((B, Kp))
    pair_m, pair_h = np.zeros((B, Kp), dtype=bool), np.zeros((B, Kp), dtype=_U64)
    pair_c[bi, slot], pair_d[bi, slot], pair_m[bi, slot], pair_h[bi, slot] = pc, pd, True, ph
    c, d, m, h = (np.concatenate(x, 1) for x in zip((pair_c, pair_d, pair_m, pair_h), own))
    exact = m.sum(1) <= cap
    if not exact.all():                          # keep the cap nearest rows
        order = np.argsort(np.where(m, d, np.inf), axis=1, kind="stable")[:, :cap]
        c, d, m, h = (np.take_along_axis(c, order[..., None], 1), np.take_along_axis(d, order, 1),
                      np.take_along_axis(m, order, 1), np.take_along_axis(h, order, 1))
    return c, d, m, h, empty, exact


def _compact(c, d, m, *more):
    """Drop the rows not in m (B, K): the kept rows first, K cut to the largest count
    (more: further (B, K) arrays, reordered alike)."""
    order = np.argsort(~m, axis=1, kind="stable")
    count = m.sum(1)
    K = max(1, int(count.max(initial=0)))
    order = order[:, :K]
    kept = np.arange(K) < count[:, None]                      # the kept rows come first
    return (c[np.arange(c.shape[0])[:, None], order], np.take_along_axis(d, order, 1),
            kept) + tuple(np.take_along_axis(x, order, 1) for x in more)


def _padded_groups(size, cost, chunk, spread=1.5, small=0.0):
    """Groups of polytopes (index arrays, by increasing size) for work padded to each
    group's largest: size (B,) ints, cost (B,) of one polytope, non-decreasing in size.
    A group's count times its largest cost is at most chunk (one polytope at least), and
    its sizes are at most spread times its smallest plus 4, so that padding wastes little
    (a single group padded to the largest size cost 10x the work on S = 4 partitions),
    unless its padded cost is at most ``small`` (where numpy's per-call overhead outweighs
    the padding)."""
    order = np.argsort(size, kind="stable")
    size, cost = size[order], cost[order]
    start, B = 0, size.size
    while start < B:
        padded = np.arange(1, B - start + 1) * cost[start:]
        by_cost = np.searchsorted(padded, chunk, side="right")
        by_size = max(np.searchsorted(size[start:], spread * size[start] + 4, side="right"),
                      np.searchsorted(padded, small, side="right"))
        stop = start + max(1, int(min(by_cost, by_size)))
        yield order[start:stop]
        start = stop


def _levels(c, d, m, zmax, cap=256, chunk=4e6):
    """The bounds of the SOV levels in the frame: rows c (B, F, S) . z <= d.

    Returns (lo1, hi1) (B,) for z_1, a list over j = 2..S of (up_c, up_d, lo_c, lo_d):
    z_j <= up_d - up_c . z_<j and z_j >= lo_d - lo_c . z_<j (padding rows give +-inf),
    empty (B,) and exact (B,).  Level S holds the original rows; the lower levels the
    exact projections by Fourier-Motzkin with Chernikov's rule (rows of the 2-D level
    pruned to the polygon's edges).  Where a level would exceed ``cap`` rows the nearest
    ones are kept (``_fm_eliminate``), which is still valid, but not exact.
    """
    B, F, S = c.shape
    zmax = np.broadcast_to(np.asarray(zmax, dtype=float), (B,))[:, None]
    empty = np.zeros(B, dtype=bool)
    exact = np.ones(B, dtype=bool)
    hist = np.broadcast_to(_U64(1) << (np.arange(F) % 64).astype(_U64), (B, F))
    out = []
    for j in range(S, 1, -1):
        cj = c[..., -1]
        use = m & (cj != 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cd = np.where(use[..., None], c[..., :-1] / cj[..., None], 0.0)
            dd = d / np.where(use, cj, 1.0)
        up, lo = use & (cj > 0), use & (cj < 0)
        up_c, up_d, up_m = _compact(cd, np.where(up, dd, np.inf), up)
        lo_c, lo_d, lo_m = _compact(cd, np.where(lo, dd, -np.inf), lo)
        out.append((np.where(up_m[..., None], up_c, 0.0), np.where(up_m, up_d, np.inf),
                    np.where(lo_m[..., None], lo_c, 0.0), np.where(lo_m, lo_d, -np.inf)))
        nc, nd, nm, nh, e, ex = _fm_eliminate(c, d, m, hist, S - j + 1, zmax, cap)
        empty |= e
        exact &= ex
        c, d, m, hist = _compact(nc, nd, nm, nh)
        if j - 1 == 2 and m.any():                       # prune to the edges of the polygon
            live = np.zeros_like(m)
            count = m.sum(1)
            for sel in _padded_groups(count, np.maximum(count, 1).astype(float) ** 2, chunk):
                stop_check()
                Kc = max(1, int(count[sel].max()))
                cs, ds, ms = c[sel, :Kc], d[sel, :Kc], m[sel, :Kc]
                live[sel, :Kc] = facet_segments(cs, np.where(ms, ds, 1.0), ms)[2]
            m = live | (m & ~live.any(1, keepdims=True))
            c, d, m, hist = _compact(c, d, m, hist)
    c1 = c[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = d / c1
    hi1 = np.where(m & (c1 > 0), bound, np.inf).min(-1)
    lo1 = np.where(m & (c1 < 0), bound, -np.inf).max(-1)
    empty |= (m & (c1 == 0) & (d < 0)).any(-1) | (lo1 > hi1)
    return lo1, hi1, out[::-1], empty, exact


def _mills_minus_x(x):
    """phi(x) / (1 - Phi(x)) - x, stable (asymptotic series for x > 30)."""
    x = np.asarray(x, dtype=float)
    big = x > 30
    xs = np.where(big, 1.0, x)
    direct = np.sqrt(2 / np.pi) / erfcx(xs / np.sqrt(2)) - xs
    xb = np.where(big, x, 1.0)
    y = 1.0 / (xb * xb)
    series = (1 + y * (-2 + y * (10 + y * (-74 + y * (706 - 8162 * y))))) / xb
    return np.where(big, series, direct)


def _tilt(M, r):
    """Minimax tilt m (B,) for z_1 ~ N(m, 1) on [M, hi] against a target
    phi(z) (z - M)^k, k = r - 1 (the slice mass of a cone whose apex is the mode, r
    rows active there): the root of mills(M - m) - (M - m) = k / m, by bisection on
    x = M - m; 0 where k = 0.  The bisection stops once no midpoint differs from both
    ends (from then on every further step would return that midpoint)."""
    k = np.maximum(np.asarray(r) - 1, 0).astype(float)
    M = np.broadcast_to(M, k.shape)
    on = (k > 0) & np.isfinite(M) & (M > 0)
    out = np.zeros(on.shape)
    Mo, k = M[on], k[on]
    a, z = -(k + 2.0), Mo * (1 - 1e-15)
    for _ in range(80):
        x = 0.5 * (a + z)
        if np.all((x == a) | (x == z)):
            break
        pos = _mills_minus_x(x) > k / (Mo - x)
        a, z = np.where(pos, x, a), np.where(pos, z, x)
    out[on] = Mo - 0.5 * (a + z)
    return out


def _logaddexp(a, b):
    """np.logaddexp for a, b not both +inf (a few times faster)."""
    with np.errstate(invalid="ignore"):
        m = np.maximum(a, b)
        d = np.abs(a - b)
    np.negative(d, out=d)
    np.exp(d, out=d)
    np.log1p(d, out=d)
    d += m
    return np.where(np.isnan(d), m, d)


def _tn_draw(lo, hi, u, draw=True):
    """Inverse-CDF draw of N(0, 1) on [lo, hi] from uniforms u on the 2^-32 grid, and
    log(Phi(hi) - Phi(lo)); lo, hi broadcast against u (unused, may be None, without
    a draw).  Intervals reflected to the
    lower tail (lo <= 0; draws from 1 - u, mirrored back) go by probabilities
    (``_tn_draw_direct``) where that is exact enough, the others in log space
    (``_tn_draw_log``)."""
    flip = lo > 0
    flipped = bool(flip.any())                               # else lo, hi and u as they are
    l, h = (np.where(flip, -hi, lo), np.where(flip, -lo, hi)) if flipped else (lo, hi)
    with np.errstate(invalid="ignore", divide="ignore"):
        tail = np.abs(h)
        ndtr(np.negative(tail, out=tail), out=tail)          # Phi(h) for h <= 0, else 1 - Phi(h)
        pl = ndtr(l)
        ph = np.where(h > 0, 1.0 - tail, tail)
        mass = ph - pl
        # mass is ph - pl to an absolute ~4 eps ph: 2^-10 ph keeps it to a relative 1e-12;
        # h > -30 keeps ph a normal number
        ph *= 2.0 ** -10
        direct = mass >= ph
        direct &= h > -30
        lm = np.log(mass)                                    # (the others are replaced below)
    # without a draw (the last level of a mass-only draw) u is not used: lm keeps its shape
    uu = (np.where(flip, 1.0 - u, u) if flipped else u) if draw else None
    x = _tn_draw_direct(l, h, pl, mass, tail, uu) if draw else None
    if not direct.all():
        shape = np.broadcast_shapes(np.shape(l), np.shape(u)) if draw else lm.shape
        slow = np.nonzero(np.broadcast_to(~direct, shape))
        xs, lms = _tn_draw_log(*(np.broadcast_to(a, shape)[slow] for a in (l, h)),
                               np.broadcast_to(uu, shape)[slow] if draw else None, draw)
        if lm.shape != shape:
            lm = np.array(np.broadcast_to(lm, shape))
        lm[slow] = lms
        if draw:
            x[slow] = xs
    if draw and flipped:
        np.negative(x, out=x, where=flip)
    return x, lm


def _tn_draw_direct(l, h, pl, mass, tail, u):
    """Draw of N(0, 1) on [l, h], l <= 0, by probabilities: pl = Phi(l), mass = Phi(h) -
    Phi(l), tail = Phi(-|h|), u uniforms in (0, 1) (broadcast).  Points below the median
    from Phi(x) = pl + u mass, those above (then h > 0) from the upper tail
    1 - Phi(x) = Phi(-h) + (1 - u) mass, so that neither loses digits to 1 - p."""
    with np.errstate(invalid="ignore"):
        p = u * mass
        p += pl
        upper = p > 0.5
        if not upper.any():
            x = ndtri(p, out=p)
        else:
            q = 1.0 - u
            q = np.multiply(q, mass, out=q if q.shape == p.shape else None)
            q += tail
            np.copyto(q, p, where=~upper)
            x = ndtri(q, out=q)
            np.negative(x, out=x, where=upper)
    np.maximum(x, l, out=x)
    np.minimum(x, h, out=x)
    return x


def _tn_draw_log(l, h, u, draw=True):
    """``_tn_draw_direct`` in log space, for l <= 0 (any interval: deep tails, narrow
    ones); also log(Phi(h) - Phi(l))."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        la = log_ndtr(l)
        lm = _log_diff_from_logs(l, h, la, log_ndtr(h))
        if not draw:
            return None, lm
        t = np.log(u)
        t += lm
        t = _logaddexp(la, t)
        np.minimum(t, 0.0, out=t)
        x = ndtri_exp(t)
    np.maximum(x, l, out=x)
    np.minimum(x, h, out=x)
    return x, lm


_GEOMETRY_FIELDS = ("mu", "E", "zs", "lo1", "empty", "L", "tilt", "ya", "yb", "fin1", "ya0", "const1")


class QMCGeometry:
    """What ``_qmc_sample`` needs of B polytopes before any point is drawn
    (``_qmc_geometry``): per-polytope arrays (B, ...) named by _GEOMETRY_FIELDS, the SOV
    levels (a list over j = 2..S of (up_c (B, K, j-1), up_d (B, K), lo_c, lo_d), padded
    with rows 0 . z <= +-inf: ``_levels``) and known (B,) bool: False where nothing was
    found (placeholders, ``unknown``).  Per polytope it does not depend on the batch it
    was found in, so the S >= 4 second stage reuses the first stage's
    (``likelihood._GeometryStore``)."""

    def __init__(self, arrays: dict, levels: list, known: np.ndarray):
        self.arrays, self.levels, self.known = arrays, levels, known

    def __len__(self):
        return self.known.shape[0]

    def __getitem__(self, idx) -> "QMCGeometry":
        """The polytopes idx (an index array or slice), the levels cut to their real rows."""
        levels = []
        for up_c, up_d, lo_c, lo_d in self.levels:
            up_d, lo_d = up_d[idx], lo_d[idx]
            ku = max(1, int(np.isfinite(up_d).sum(1).max(initial=0)))
            kl = max(1, int(np.isfinite(lo_d).sum(1).max(initial=0)))
            levels.append((up_c[idx, :ku], up_d[:, :ku], lo_c[idx, :kl], lo_d[:, :kl]))
        return QMCGeometry({k: v[idx] for k, v in self.arrays.items()}, levels, self.known[idx])

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values()) + sum(a.nbytes for lv in self.levels for a in lv)

    @classmethod
    def unknown(cls, B: int, S: int) -> "QMCGeometry":
        """Placeholders for B polytopes (known False)."""
        shapes = dict(mu=(S,), E=(S, S), zs=(S,))
        arrays = {k: np.zeros((B,) + shapes.get(k, ()), dtype=bool if k in ("empty", "fin1") else float)
                  for k in _GEOMETRY_FIELDS}
        levels = [(np.zeros((B, 1, j - 1)), np.full((B, 1), np.inf), np.zeros((B, 1, j - 1)),
                   np.full((B, 1), -np.inf)) for j in range(2, S + 1)]
        return cls(arrays, levels, np.zeros(B, dtype=bool))

    @classmethod
    def concat(cls, parts) -> "QMCGeometry":
        """Consecutive polytopes' geometries joined, the levels padded to the largest."""
        def padded(a, k, fill):             # (B, K, ...) -> (B, k, ...)
            return np.concatenate([a, np.full((a.shape[0], k - a.shape[1]) + a.shape[2:], fill)], 1)
        arrays = {k: np.concatenate([p.arrays[k] for p in parts]) for k in _GEOMETRY_FIELDS}
        levels = []
        for level in zip(*(p.levels for p in parts)):
            ku, kl = max(lv[1].shape[1] for lv in level), max(lv[3].shape[1] for lv in level)
            levels.append(tuple(np.concatenate([padded(lv[i], k, fill) for lv in level])
                                for i, k, fill in ((0, ku, 0.0), (1, ku, np.inf), (2, kl, 0.0), (3, kl, -np.inf))))
        return cls(arrays, levels, np.concatenate([p.known for p in parts]))

    def merged(self, other: "QMCGeometry", where: np.ndarray) -> "QMCGeometry":
        """This geometry with the polytopes where (index array) taken from other (len(where))."""
        rest = np.setdiff1d(np.arange(len(self)), where)
        joined = QMCGeometry.concat([self[rest], other])
        return joined[np.argsort(np.concatenate([rest, where]), kind="stable")]


def _qmc(A, b, mask, n_qmc, seed, moments=True, chunk=4e6, n_randomisations=16):
    """Separation of variables with exact projections and a tilted first variable,
    scrambled Sobol points (see the comment above).  Returns log mass with its standard
    error over independent randomisations, and the weighted moments (zeros where
    ``moments`` is False: the last variable is then not drawn)."""
    return _qmc_draws(A, b, mask, [(n_qmc, seed, moments)], chunk, n_randomisations)[0][0]


def _qmc_draws(A, b, mask, draws, chunk=4e6, n_randomisations=16, mode=None, geometry=None, ids=None):
    """``_qmc`` for each draw (n_qmc, seed, moments) of ``draws`` on one geometry (mode,
    frame, projections and tilt are found once; they do not depend on the points).  Draws
    with different seeds use independent points.  mode: as ``polytope_qmc_draws``;
    geometry: a QMCGeometry of the polytopes found before, or None (where it is not known
    it is found); ids: as ``polytope_qmc_draws``.  Returns a list of PolytopeMoments and
    the QMCGeometry."""
    if geometry is None:
        geo = _qmc_geometry(A, b, mask, chunk, mode)
    else:
        geo, need = geometry, np.flatnonzero(~geometry.known)
        if need.size:
            found = _qmc_geometry(A[need], b[need], mask[need], chunk, None if mode is None else mode[need])
            geo = geo.merged(found, need)
    return [_qmc_sample(geo, A, b, mask, n, seed, mom, chunk, n_randomisations, ids) for n, seed, mom in draws], geo


def _qmc_geometry(A, b, mask, chunk=4e6, mode=None):
    """What ``_qmc`` needs before any point is drawn: the mode, frame, SOV levels and
    the tilted first variable, as a QMCGeometry.  mode (B, S): known
    modes (NaN rows: not known; see ``_known_modes``)."""
    B, F, S = A.shape
    mu, r, exact_mode = _mode_dual(A, b, mask, chunk=chunk) if mode is None else _known_modes(A, b, mask, mode, chunk)
    redo = np.flatnonzero(~exact_mode)                  # the enumeration missed the mode
    if redo.size:
        mu[redo], r[redo], exact_mode[redo] = _mode_ldp(A[redo], b[redo], mask[redo])
    E = _frame(A, b, mask, mu)                                          # (B, S, S) rows
    c = np.einsum("bfs,bts->bft", A, E)                                 # rows in the frame
    zs = np.einsum("bts,bs->bt", E, mu)                                 # the mode in the frame
    # coordinates v = z - zs: rows c v <= slack
    slack = np.where(mask, b - np.einsum("bfs,bs->bf", A, mu), 1.0)
    lo1, hi1, levels, empty, exact_lev = _levels(c, slack, mask, 10.0, chunk=chunk)
    L = zs[:, 0]
    # the tilt needs z_1 >= L on P (mu the mode): where the projections are exact they
    # tell (lo1 = 0 up to rounding); elsewhere the bound of a mode found exactly is
    # imposed (loosened for rounding)
    certified = (L <= 0) | empty | np.where(exact_lev, lo1 > -1e-6 * (1 + L), exact_mode)
    lo1 = np.where(certified & ~exact_lev & (L > 0), np.maximum(lo1, -1e-9 * (1 + L)), lo1)
    # z_1 = L + v_1 ~ N(m, 1) on [L + lo1, L + hi1]; y = z_1 - m ~ N(0, 1) on [ya, yb]
    tilt = np.where((L > 0) & certified, _tilt(L + lo1, r), 0.0)
    ya, yb = L + lo1 - tilt, L + hi1 - tilt
    lm1 = log_diff_ndtr(ya, yb)
    # log weight = lm1 + m^2/2 - m z_1 = [lm1 - m (m/2 + ya)] - m (v_1 - lo1), where the
    # tilt m is 0 unless ya is finite
    fin1 = np.isfinite(ya)
    ya0 = np.where(fin1, ya, 0.0)
    const1 = lm1 - tilt * (0.5 * tilt + ya0)
    return QMCGeometry(dict(mu=mu, E=E, zs=zs, lo1=lo1, empty=empty, L=L, tilt=tilt, ya=ya, yb=yb, fin1=fin1,
                            ya0=ya0, const1=const1), levels, np.ones(B, dtype=bool))


def _qmc_sample(g, A, b, mask, n_qmc, seed, moments, chunk, n_randomisations, ids=None):
    """The points of ``_qmc`` on a geometry g (``_qmc_geometry``) of the polytopes A, b,
    mask (which, or their ids, key their randomisation with the seed).  A polytope whose
    points would not fit in chunk elements goes through in blocks of each set's points
    (``_SetSums``), so that memory bounds the block, never the draw: a draw is the same
    estimate, up to rounding, under any budget."""
    B, F, S = A.shape
    R = n_randomisations
    mu, E, zs, lo1, empty, L, tilt = (g.arrays[k] for k in ("mu", "E", "zs", "lo1", "empty", "L", "tilt"))
    ya, yb, fin1, ya0, const1 = (g.arrays[k] for k in ("ya", "yb", "fin1", "ya0", "const1"))
    levels = g.levels
    m = max(2, n_qmc // R)
    keys = _polytope_keys(A, b, mask, seed, ids)                        # (B,)
    out = PolytopeMoments(np.empty(B), np.empty((B, S)), np.empty((B, S, S)), np.empty(B), np.zeros((B, S, S)),
                          np.zeros((B, S)))
    # the levels are padded to the batch's largest row count: polytopes go through in
    # order of their own counts, each group cut to its largest (real rows come first)
    counts = [(np.isfinite(lv[1]).sum(1), np.isfinite(lv[3]).sum(1)) for lv in levels]
    total = np.maximum(1, sum(cu + cl for cu, cl in counts)) if counts else np.ones(B, int)
    # small: padded groups of up to 2^19 row-points (the 32-point first stage ran in
    # groups of ~50 polytopes, each numpy call on a few thousand values: 13% faster)
    for sl in _padded_groups(total, R * m * total.astype(float), chunk, small=2.0 ** 19):
        n = sl.size
        cut = [(max(1, int(cu[sl].max())), max(1, int(cl[sl].max()))) for cu, cl in counts]
        rows = [tuple(a[sl, :k] for a, k in zip(lv, (ku, ku, kl, kl))) for lv, (ku, kl) in zip(levels, cut)]
        step = m                                                        # points of each set per block:
        while step > 1 and n * R * step > chunk:                        # ~2 S + 8 arrays of n R step
            step //= 2
        sums = _SetSums(n, S, R, moments)
        for base in _sobol_blocks(S, m, R, seed, step):
            stop_check()
            # (n, S, R step); without moments the last variable is not drawn (only its mass)
            u = _shifted_uniforms(base.reshape(S, R * step), keys[sl], R, S if moments else S - 1)
            y = _tn_draw(ya[sl, None], yb[sl, None], u[:, 0])[0]
            off = y - ya0[sl, None]                                      # y - ya >= 0
            z = np.empty((n, S, R * step))                               # holds v
            z[:, 0] = np.where(fin1[sl, None], lo1[sl, None] + off, y + tilt[sl, None] - L[sl, None])
            logw = const1[sl, None] - tilt[sl, None] * off
            for j in range(1, S):
                up_c, up_d, lo_c, lo_d = rows[j - 1]
                hi = _level_bound(up_c, up_d, z[:, :j], np.minimum)
                lo = _level_bound(lo_c, lo_d, z[:, :j], np.maximum)
                zj = zs[sl, j, None]
                lo += zj
                hi += zj
                uj = u[:, j] if j < u.shape[1] else None                 # None: the mass alone
                xj, lm = _tn_draw(lo, hi, uj, draw=uj is not None)
                if xj is not None:
                    z[:, j] = xj - zj
                logw += lm
            logw[empty[sl]] = -np.inf
            logw[np.isnan(logw)] = -np.inf
            sums.add(logw.reshape(n, R, step), z.reshape(n, S, R, step) if moments else None)
        est = sums.log_set_sums - np.log(m)                             # (n, R): each set's estimate
        log_mass = _logmeanexp(est, axis=-1)
        with np.errstate(invalid="ignore"):
            rel = np.exp(est - log_mass[:, None])
            se = rel.std(-1, ddof=1) / np.sqrt(R)
        out.log_mass[sl] = log_mass
        out.stderr[sl] = np.where(np.isfinite(log_mass), se, 0.0)
        if not moments:
            out.mean[sl], out.cov[sl] = 0.0, 0.0
            continue
        mz, cz, delta = sums.moments()
        Es = E[sl]
        out.mean[sl] = mu[sl] + np.einsum("bts,bt->bs", Es, mz)
        out.cov[sl] = np.swapaxes(Es, 1, 2) @ cz @ Es
        out.mean_cov[sl], out.mass_mean_cov[sl] = _mean_randomisation_cov(rel, delta, Es, R)
    return out


class _SetSums:
    """Running sums over blocks of a draw's points, per polytope (n) and set (R): each
    set's log-sum-exp of the log weights and, with moments, each set's total weight W_r,
    weighted mean and the within-set weighted scatter (summed over the sets), merged
    block by block (Chan, Golub and LeVeque's pairwise update, weighted), the weights
    taken relative to the largest log weight seen (rescaled as it rises)."""

    def __init__(self, n: int, S: int, R: int, moments: bool):
        self.log_set_sums = np.full((n, R), -np.inf)
        self.moments_on = moments
        if moments:
            self.top = np.full(n, -np.inf)
            self.W = np.zeros((n, R))
            self.mean = np.zeros((n, S, R))
            self.scatter = np.zeros((n, S, S))

    def add(self, logw: np.ndarray, z: np.ndarray | None):
        """A block: log weights (n, R, b) and, with moments, its points z (n, S, R, b)."""
        top = logw.max(-1)                                               # (n, R)
        safe = np.where(np.isfinite(top), top, 0.0)
        with np.errstate(divide="ignore"):
            block = safe + np.log(np.exp(logw - safe[..., None]).sum(-1))
        self.log_set_sums = _logaddexp(self.log_set_sums, np.where(np.isfinite(top), block, -np.inf))
        if not self.moments_on:
            return
        new_top = np.maximum(self.top, top.max(-1))
        ref = np.where(np.isfinite(new_top), new_top, 0.0)
        old = np.where(np.isfinite(self.top), np.exp(self.top - ref), 0.0)
        self.top = new_top
        self.W *= old[:, None]
        self.scatter *= old[:, None, None]
        w = np.exp(logw - ref[:, None, None])                            # (n, R, b)
        if not np.all(w > 0):
            z = np.where(w[:, None] > 0, z, 0.0)
        Wb = w.sum(-1)                                                   # (n, R)
        with np.errstate(invalid="ignore", divide="ignore"):
            mb = (z[..., None, :] @ w[:, None, :, :, None])[..., 0, 0]  # (n, S, R)
            mb = np.where(Wb[:, None] > 0, mb / Wb[:, None], 0.0)
        dz = (z - mb[..., None]).reshape(z.shape[0], z.shape[1], -1)     # (n, S, R b)
        dzw = dz * w.reshape(w.shape[0], 1, -1)
        W = self.W + Wb
        with np.errstate(invalid="ignore", divide="ignore"):
            share = np.where(W > 0, Wb / W, 0.0)                         # (n, R)
        d = mb - self.mean
        self.scatter += dzw @ np.swapaxes(dz, 1, 2) + (d * (self.W * share)[:, None]) @ np.swapaxes(d, 1, 2)
        self.mean += d * share[:, None]
        self.W = W

    def moments(self):
        """The weighted mean mz (n, S) and covariance cz (n, S, S) of all points, and each
        set's summed normalised-weight deviation from mz times R, delta (n, S, R)
        (``_mean_randomisation_cov``); 0 where no point has weight."""
        W = self.W.sum(-1)                                               # (n,)
        R = self.W.shape[1]
        norm = np.where(W > 0, W, 1.0)
        mz = (self.mean @ self.W[:, :, None])[..., 0] / norm[:, None]
        d = self.mean - mz[..., None]
        dW = d * self.W[:, None]
        cz = (self.scatter + dW @ np.swapaxes(d, 1, 2)) / norm[:, None, None]
        return mz, cz, R * dW / norm[:, None, None]


def _mean_randomisation_cov(rel, delta, E, R):
    """The delta-method covariances of the ratio estimate mean = F / M (F, M the first
    moment and the mass, each the average of R independent randomisations F_r, M_r)
    over those randomisations: with rho_r = M_r / M and delta_r = (F_r - M_r mean) / M
    (both averaging to 1 and 0), d log M = mean_r (rho_r - 1) and d mean = mean_r delta_r,
    so Var[mean] = sum_r delta_r delta_r^T / (R (R - 1)) and Cov[log M, mean] =
    sum_r (rho_r - 1) delta_r / (R (R - 1)).

    rel (n, R): rho_r; delta (n, S, R): delta_r in the frame (R times set r's points
    minus the weighted mean, times their weights normalised to sum 1: ``_SetSums``);
    E (n, S, S): the frame's rows.  Returns (mean_cov (n, S, S), mass_mean_cov (n, S))
    in the polytope's coordinates (0 where the mass is 0)."""
    with np.errstate(invalid="ignore"):
        dev = np.where(np.isfinite(rel), rel - 1.0, 0.0)                            # (n, R)
    scale = 1.0 / (R * (R - 1))
    V = scale * (delta @ np.swapaxes(delta, 1, 2))
    g = scale * (delta @ dev[:, :, None])[..., 0]
    Et = np.swapaxes(E, 1, 2)
    return Et @ V @ E, (Et @ g[:, :, None])[..., 0]


def halfspace_mc(A, b, mask, mode, n, seed=0, memory_budget=None, ids=None, moments=True) -> PolytopeMoments:
    """Plain Monte Carlo mass and moments of N(0, I) on P = {u : A u <= b} (B, F, S),
    mask (B, F), from n independent points of N(0, I) restricted to the half-space
    H = {u : m.u >= |m|^2} of P's mode m (B, S), which holds P (m is its point nearest
    0; all modes finite and nonzero).  Each point weighs M = Phi(-|m|) (H's mass) where
    it lies in P and 0 elsewhere, so the estimate is unbiased whatever P's shape, with
    variance M Phi_P (1 - Phi_P / M) / n <= M^2 / n: certified by the mode alone, with
    no projections (the cheap estimate for pairs that matter little; see
    ``likelihood._cheap_pairs``).  stderr: the sample's relative standard error (0
    where no point hit P: then log_mass = -inf); mean, cov: of the points in P (zeros
    where ``moments`` is False, as ``_qmc_sample``'s: the mass alone).  memory_budget:
    bytes of working arrays (~F + 4 S + 2 arrays of n points a polytope; the polytopes
    go in slices that fit); ids: as ``polytope_qmc_draws``."""
    B, F, S = A.shape
    step = B if memory_budget is None else max(1, int(memory_budget // (8.0 * n * (F + 4 * S + 2))))
    if step < B:
        return PolytopeMoments.concat([halfspace_mc(A[i:i + step], b[i:i + step], mask[i:i + step],
                                                    mode[i:i + step], n, seed,
                                                    ids=None if ids is None else ids[i:i + step], moments=moments)
                                       for i in range(0, B, step)])
    norm = np.linalg.norm(mode, axis=-1)
    E = _gram_schmidt_rows(np.concatenate([(mode / norm[:, None])[:, None], np.broadcast_to(np.eye(S), (B, S, S))],
                                          1))[0]                         # (B, S, S), E[:, 0] along m
    U = _hashed_uniforms(_polytope_keys(A, b, mask, seed, ids), S, n)    # (B, S, n)
    z = np.empty((B, S, n))
    z[:, 0] = _tn_draw(norm[:, None], np.full((B, 1), np.inf), U[:, 0])[0]
    z[:, 1:] = ndtri(U[:, 1:])
    u = np.einsum("bts,btn->bsn", E, z)                                  # (B, S, n)
    # the real rows first, tested in groups of polytopes by row count (S = 4 partitions'
    # rows are padded to 20 around 8.5 real ones)
    count = mask.sum(1)
    order = np.argsort(~mask, axis=1, kind="stable")
    Ar = np.take_along_axis(np.where(mask[..., None], A, 0.0), order[..., None], 1)   # padding: 0 . u <= inf
    br = np.take_along_axis(np.where(mask, b, np.inf), order, 1)
    hit = np.empty((B, n), dtype=bool)                                   # (B, n): u in P
    for sel in _padded_groups(count, count * float(n), np.inf):
        K = max(1, int(count[sel].max()))
        hit[sel] = (Ar[sel, :K] @ u[sel] <= br[sel, :K, None]).all(1)   # (., K, n) tests
    k = hit.sum(1)
    frac = k / n
    with np.errstate(divide="ignore", invalid="ignore"):
        log_mass = log_ndtr(-norm) + np.log(frac)
        rel_se = np.sqrt((1.0 - frac) / (k * (n - 1) / n))
    if not moments:
        return PolytopeMoments(log_mass, np.zeros((B, S)), np.zeros((B, S, S)), np.where(k > 0, rel_se, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = (u * hit[:, None]).sum(-1) / np.maximum(k, 1)[:, None]
        d = (u - mean[..., None]) * hit[:, None]
        cov = d @ np.swapaxes(d, 1, 2) / np.maximum(k, 1)[:, None, None]
    return PolytopeMoments(log_mass, mean, cov, np.where(k > 0, rel_se, 0.0))


def _hashed_uniforms(keys, S, n):
    """Independent uniforms (B, S, n) in (0, 1) from the polytopes' keys (B,): splitmix64
    of key and point index, 53 bits each (a counter-based generator: a polytope gets the
    same points in any batch, distinct polytopes independent ones)."""
    idx = np.arange(S * n, dtype=_U64).reshape(S, n) + _U64(1)
    bits = _splitmix64_inplace(keys[:, None, None] ^ _splitmix64(idx)[None])
    bits >>= _U64(11)
    out = bits.astype(np.float64)
    out += 0.5
    out *= 2.0 ** -53
    return out


def _level_bound(c, d, z, pick):
    """The tightest of a level's rows at the points: pick (np.minimum or np.maximum)
    over k of d_k - c_k . z, for rows c (n, K, j), d (n, K) and points z (n, j, N) ->
    (n, N), one row at a time (no (n, K, N) array) in one scratch array."""
    out = np.einsum("nj,njm->nm", c[:, 0], z)
    np.subtract(d[:, 0, None], out, out=out)
    row = np.empty_like(out)
    for k in range(1, c.shape[1]):
        np.einsum("nj,njm->nm", c[:, k], z, out=row)
        np.subtract(d[:, k, None], row, out=row)
        pick(out, row, out=out)
    return out


def _splitmix64(x):
    """The splitmix64 finaliser of uint64 values x (any shape): a bijection whose outputs
    for distinct inputs behave as independent uniform 64-bit words."""
    z = np.array(x, dtype=_U64)                                          # a copy
    return _splitmix64_inplace(z.reshape(-1)).reshape(z.shape)


def _splitmix64_inplace(z):
    """``_splitmix64`` of a uint64 array z, written over z (one scratch array instead of
    a fresh array per step); returns z."""
    with np.errstate(over="ignore"):
        z += _U64(0x9E3779B97F4A7C15)
        t = z >> _U64(30)
        z ^= t
        z *= _U64(0xBF58476D1CE4E5B9)
        np.right_shift(z, _U64(27), out=t)
        z ^= t
        z *= _U64(0x94D049BB133111EB)
        np.right_shift(z, _U64(31), out=t)
        z ^= t
    return z


def _polytope_keys(A, b, mask, seed, ids=None):
    """A 64-bit key per polytope (B,) for the draw of seed, from its identity ids (B,)
    uint64 where given, else from the bits of its rows (padding ignored): the same
    polytope (identity) gets the same key whatever batch it comes in."""
    if ids is None:
        ids = content_hash(np.concatenate([A, b[..., None]], -1) * mask[..., None])
    return combine_ids(ids, np.uint64(seed % 2 ** 64))


def combine_ids(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One 64-bit identity from two, a and b uint64 (broadcast): splitmix64 of a XOR that of b."""
    return _splitmix64(a ^ _splitmix64(b))


def content_hash(values: np.ndarray) -> np.ndarray:
    """A 64-bit hash (B,) uint64 of each row of float64 values (B, ...) from its bits
    (-0 counted as 0): equal rows, equal hashes."""
    rows = np.asarray(values, dtype=np.float64) + 0.0                   # + 0.0: -0 -> 0
    words = np.ascontiguousarray(rows).reshape(rows.shape[0], -1).view(_U64)
    mult = _splitmix64(np.arange(words.shape[1], dtype=_U64)) | _U64(1)
    with np.errstate(over="ignore"):
        return (words * mult).sum(-1, dtype=_U64)


def _sobol_sets(S, m, R, seed):
    """R independently scrambled Sobol sets of m points in [0, 1)^S, as 32-bit integers
    (the point is k / 2^32): (S, R m) uint64, set r in columns r m .. (r + 1) m - 1.
    Small sets (at most 2^14 points: scrambling costs more than drawing them) are kept."""
    return _sobol_sets_kept(S, m, R, seed) if m * R <= 2 ** 14 else _sobol_sets_new(S, m, R, seed)


def _sobol_sets_new(S, m, R, seed):
    return _next_points(_sobol_engines(S, R, seed), m).reshape(S, R * m)


def _sobol_blocks(S, m, R, seed, step):
    """The R sets of ``_sobol_sets`` in blocks of step points of each set (step a power
    of 2 dividing m): yields (S, R, step) uint64, points k .. k + step - 1 of every set for
    k = 0, step, ..., drawn block by block (a whole draw's sets could outgrow the budget)."""
    if step == m:
        yield _sobol_sets(S, m, R, seed).reshape(S, R, m)
        return
    engines = _sobol_engines(S, R, seed)
    for _ in range(0, m, step):
        yield _next_points(engines, step)


def _sobol_engines(S, R, seed):
    """The R independently scrambled Sobol engines of a draw's sets."""
    from scipy.stats import qmc          # here: scipy.stats adds ~0.7 s to every command's start
    return [qmc.Sobol(S, scramble=True, bits=32, seed=seed * 1000 + i) for i in range(R)]


def _next_points(engines, k):
    """The next k points of each engine, as 32-bit integers (the point is x / 2^32):
    (S, R, k) uint64."""
    points = np.stack([engine.random(k) for engine in engines], 1)                 # (k, R, S)
    return np.ascontiguousarray(np.rint(points * 2.0 ** 32).astype(_U64).transpose(2, 1, 0))


@lru_cache(maxsize=64)
def _sobol_sets_kept(S, m, R, seed):
    out = _sobol_sets_new(S, m, R, seed)
    out.flags.writeable = False                 # shared by every call
    return out


def _shifted_uniforms(base, keys, R, dims=None):
    """The points base (S, N) as uniforms u (n, S, N) (the first dims coordinates only,
    where given: the same values) under a random digital
    shift (XOR with a 32-bit word per coordinate) for each polytope (keys (n,)) and set
    (R sets of N / R columns), at the centres (k + 1/2) / 2^32 of their grid cells.

    A digital shift leaves a scrambled net a net, and makes every point uniform on the
    2^32 grid: polytopes (and sets) get independent estimates, each unbiased up to the
    midpoint rule at spacing 2^-32.  Without it every polytope would see the same points
    and their errors would add up coherently in any sum over polytopes."""
    S, N = base.shape
    idx = np.arange(R * S, dtype=_U64).reshape(R, S) + _U64(1)
    shift = _splitmix64_inplace(keys[:, None, None] ^ _splitmix64(idx)[None]) >> _U64(32)   # (n, R, S)
    d = S if dims is None else dims
    # set r is columns r N/R .. (r + 1) N/R - 1: (S, R, N/R) against the shifts (n, S, R, 1)
    bits = base[:d].reshape(d, R, N // R)[None] ^ np.swapaxes(shift[..., :d], 1, 2)[..., None]
    out = bits.reshape(keys.shape[0], d, N).astype(np.float64)
    out += 0.5
    out *= 2.0 ** -32
    return out


def _logmeanexp(x, axis):
    top = np.max(x, axis=axis, keepdims=True)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return (safe + np.log(np.mean(np.exp(x - safe), axis=axis, keepdims=True))).squeeze(axis)
