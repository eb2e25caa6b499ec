"""Exact S = 3 Gaussian integrals over polyhedra (cpadgn.polyhedron) against independent
oracles: closed forms (half-spaces, boxes, cones by their solid angle), nested adaptive
quadrature over exact 2-D slices (the S = 2 polygon code, tested on its own in
test_polytope.py), Monte Carlo / importance sampling with its standard error, and the
exact truncated-Gaussian sampler."""
import itertools

import numpy as np
import pytest
from scipy import optimize
from scipy.special import log_ndtr
from scipy.stats import special_ortho_group

from cpadgn.polyhedron import polyhedron_moments, region_facet_polygons, translated_polyhedron_moments
from cpadgn.polytope import polytope_moments

EPS = np.finfo(float).eps


def assert_close(actual, desired, atol):
    """|actual - desired| <= atol elementwise (atol broadcasts)."""
    err = np.abs(np.asarray(actual) - desired)
    assert np.all(err <= atol), (actual, desired, err / atol)


def exact(A, b):
    A, b = np.asarray(A, float)[None], np.asarray(b, float)[None]
    r = polyhedron_moments(A, b, np.ones(b.shape, bool))
    return r.log_mass[0], r.mean[0], r.cov[0]


def interval_moments(lo, hi):
    """log(Phi(hi) - Phi(lo)), mean and variance of N(0, 1) on [lo, hi], from log_ndtr
    in the tail that keeps full precision (mirrored where lo > 0)."""
    flip = lo > 0
    l, h = (-hi, -lo) if flip else (lo, hi)
    lz = log_ndtr(h) + np.log(-np.expm1(log_ndtr(l) - log_ndtr(h)))
    dens = lambda x: np.exp(-0.5 * x * x - 0.5 * np.log(2 * np.pi) - lz) if np.isfinite(x) else 0.0
    xd = lambda x: x * dens(x) if np.isfinite(x) else 0.0
    m = dens(l) - dens(h)
    v = 1.0 + xd(l) - xd(h) - m * m
    return lz, (-m if flip else m), v


# ------------------------------------------------------------------ closed forms
def weight_error(lm):
    """Relative error of the facet weights phi(b_k) M_k / mass that the moments are made of:
    the mass's own (quadrature to ~1e-10, DESIGN) and eps |log mass| from exponentiating a
    difference of logs."""
    return 1e-10 + 8 * EPS * (1 + abs(lm))


@pytest.mark.parametrize("d", [0.3, 5.0, 30.0, 37.4])
def test_half_space_closed_form(d):
    """{a . u >= d}: mass Phi(-d); mean lambda a; cov I + (v - 1) a a^T (1-D moments);
    d = 37.4 puts the log mass at -703."""
    a = special_ortho_group.rvs(3, random_state=int(d * 10))[0]
    lm, mean, cov = exact(-a[None], [-d])
    lz, m1, v1 = interval_moments(d, np.inf)
    assert np.isfinite(lm) and abs(lm - lz) <= 1e-9
    assert_close(mean, m1 * a, (1 + m1) * weight_error(lz))
    # the centred covariance I - sum_k w_k (centroid_k - mean) a_k^T: terms of size ~(1 + |mean|)^2
    assert_close(cov, np.eye(3) + (v1 - 1) * np.outer(a, a), (1 + m1) ** 2 * weight_error(lz))


BOXES = [([-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]),
         ([30.0, -1.0, 0.5], [31.0, 2.0, 0.6]),
         ([0.0, 0.0, 0.0], [1.0, 2.0, 3.0]),
         ([-0.5, 0.0, -np.inf], [0.2, np.inf, 0.0]),            # unbounded
         ([37.0, -3.0, -2.0], [37.2, 3.0, np.inf]),             # log mass near -700
         ([-8.0, 4.0, -6.0], [-7.99, 4.5, 6.0])]


@pytest.mark.parametrize("k", range(len(BOXES)))
def test_rotated_boxes_closed_form(k):
    """A box in a random orientation (plus a repeated row and a redundant one): mass,
    mean and covariance are products of 1-D truncated normals."""
    lo, hi = map(np.array, BOXES[k])
    Q = special_ortho_group.rvs(3, random_state=k)
    A, b = np.concatenate([np.eye(3), -np.eye(3)]) @ Q, np.concatenate([hi, -lo])
    keep = np.isfinite(b)
    A, b = A[keep], b[keep]
    A, b = np.concatenate([A, A[:1], [Q[0]]]), np.concatenate([b, b[:1], [hi[0] + 1 if np.isfinite(hi[0]) else 1e3]])
    lm, mean, cov = exact(A, b)
    mom = [interval_moments(lo[i], hi[i]) for i in range(3)]
    lz = sum(m[0] for m in mom)
    m = np.array([x[1] for x in mom])
    v = np.array([x[2] for x in mom])
    assert np.isfinite(lm) and abs(lm - lz) <= 1e-9, (lm, lz)
    size = 1 + np.abs(m).max()
    assert_close(Q @ mean, m, size * weight_error(lz))
    assert_close(Q @ cov @ Q.T, np.diag(v), size ** 2 * weight_error(lz))


def gl_interval(lo, hi, n=20):
    """log mass, mean and variance of N(0, 1) on a short interval by n-point
    Gauss-Legendre (positive weights: no cancellation, unlike the closed forms)."""
    x, w = np.polynomial.legendre.leggauss(n)
    x = 0.5 * (hi - lo) * x + 0.5 * (hi + lo)
    f = 0.5 * (hi - lo) * w * np.exp(-0.5 * (x - x.mean()) * (x + x.mean()))       # scaled by phi(midpoint)
    m = f @ x / f.sum()
    return np.log(f.sum()) - 0.5 * x.mean() ** 2 - 0.5 * np.log(2 * np.pi), m, f @ (x - m) ** 2 / f.sum()


@pytest.mark.parametrize("centre, sides", [(0.5, [1e-6, 2e-6, 3e-6]), (0.0, [1e-5, 2e-5, 3e-5]),
                                           (3.0, [1e-4, 2e-4, 3e-4]), (8.0, [1e-3, 2e-3, 3e-3]),
                                           (1.0, [0.05, 0.1, 0.15]), (1.0, [1e-5, 0.3, 0.3]),    # a plate
                                           (0.7, [1e-5, 1e-5, 1.5])])                           # a needle
def test_small_and_thin_boxes(centre, sides):
    """Small or thin boxes: the facet terms of the radial formula cancel to the mass (for
    a cube of side h they are ~h^2, the mass ~h^3), so such polytopes are integrated
    directly."""
    Q = special_ortho_group.rvs(3, random_state=7)
    lo = np.array([centre, 0.2, -0.1])
    hi = lo + np.array(sides)
    lm, mean, cov = exact(np.concatenate([np.eye(3), -np.eye(3)]) @ Q, np.concatenate([hi, -lo]))
    mom = [gl_interval(lo[i], hi[i]) for i in range(3)]
    lz = sum(m[0] for m in mom)
    m = np.array([x[1] for x in mom])
    v = np.array([x[2] for x in mom])
    assert abs(lm - lz) < 1e-10, (lm, lz)
    assert_close(Q @ mean, m, 1e-12 * (1 + np.abs(m)))
    # rotating back mixes in rounding of the largest variance (eps-level relative to it)
    assert_close(Q @ cov @ Q.T, np.diag(v), 1e-9 * np.sqrt(np.outer(v, v)) + 1e-13 * v.max())


def _solid_angle(g):
    """Solid angle of the cone spanned by three unit vectors g (3, 3) (rows), by the
    Van Oosterom-Strackee formula."""
    num = abs(np.linalg.det(g))
    den = 1 + g[0] @ g[1] + g[1] @ g[2] + g[2] @ g[0]
    return 2 * np.arctan2(num, den)


def test_cones_through_the_origin():
    """{A u <= 0} with three rows: mass = solid angle / 4 pi (every facet and edge passes
    through the origin); the cells of four planes through the origin sum to 1."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        A = rng.normal(size=(3, 3))
        g = -np.linalg.inv(A).T                         # generators: A g_i = -e_i
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        lm = exact(A, np.zeros(3))[0]
        assert abs(np.exp(lm) - _solid_angle(g) / (4 * np.pi)) < 1e-13
    A = rng.normal(size=(4, 3))
    cells = [exact(A * np.array(s)[:, None], np.zeros(4))[0] for s in itertools.product([1, -1], repeat=4)]
    assert abs(sum(np.exp(c) for c in cells if np.isfinite(c)) - 1) < 1e-13


# ------------------------------------------------------------------ nested quadrature
def _vertices(A, b):
    pts = []
    for J in itertools.combinations(range(len(b)), 3):
        M = A[list(J)]
        if abs(np.linalg.det(M)) > 1e-9:
            p = np.linalg.solve(M, b[list(J)])
            if np.all(A @ p <= b + 1e-9):
                pts.append(p)
    return np.array(pts).reshape(-1, 3)


def slice_oracle(A, b, nodes=20, span=12.0):
    """Mass, mean and covariance by quadrature over u_1 of the exact 2-D mass and moments of
    the slices {(u_2, u_3) : A[:, 1:] v <= b - A[:, 0] u_1} (all slices in one batch):
    composite Gauss-Legendre on panels of width <= 0.5 between the vertex heights, where
    the slice changes shape (in between the integrand is analytic)."""
    V = _vertices(A, b)
    lo = min(V[:, 0].min(initial=0.0), 0.0) - span
    hi = max(V[:, 0].max(initial=0.0), 0.0) + span
    cuts = np.unique(np.concatenate([[lo, hi], V[:, 0]]))
    cuts = cuts[(cuts >= lo) & (cuts <= hi)]
    fine = np.concatenate([np.linspace(a, c, int(np.ceil((c - a) / 0.5)) + 1)[:-1] for a, c in zip(cuts[:-1], cuts[1:])]
                          + [[hi]])
    gx, gw = np.polynomial.legendre.leggauss(nodes)
    half = 0.5 * np.diff(fine)[:, None]
    x = ((fine[:-1, None] + fine[1:, None]) / 2 + half * gx).ravel()
    wq = (half * gw).ravel()
    r = polytope_moments(np.broadcast_to(A[:, 1:], (x.size,) + A[:, 1:].shape), b - np.outer(x, A[:, 0]))
    lw = r.log_mass - 0.5 * x * x + np.log(wq)
    shift = lw.max()
    w = np.exp(lw - shift)
    m2, s2 = r.mean, r.cov + r.mean[:, :, None] * r.mean[:, None, :]
    tot = w @ np.column_stack([np.ones_like(x), x, m2[:, 0], m2[:, 1], x * x, x * m2[:, 0], x * m2[:, 1],
                               s2[:, 0, 0], s2[:, 0, 1], s2[:, 1, 1]])
    mean = tot[1:4] / tot[0]
    E2 = np.array([[tot[4], tot[5], tot[6]], [tot[5], tot[7], tot[8]], [tot[6], tot[8], tot[9]]]) / tot[0]
    return shift + np.log(tot[0]) - 0.5 * np.log(2 * np.pi), mean, E2 - np.outer(mean, mean)


def test_against_nested_quadrature_of_exact_slices():
    rng = np.random.default_rng(5)
    cases = []
    for F, shift in [(6, 0.0), (7, 0.8), (3, 0.0), (5, 4.0), (4, 8.0)]:
        A = rng.normal(size=(F, 3))
        A /= np.linalg.norm(A, axis=1, keepdims=True)
        x0 = shift * A[0] * -1 if shift else np.zeros(3)            # a point deep in the first row's far side
        b = A @ x0 + rng.uniform(0.3, 1.2, F)
        cases.append((A, b))
    for A, b in cases:
        lm, mean, cov = exact(A, b)
        lz, m, C = slice_oracle(A, b)
        assert abs(slice_oracle(A, b, nodes=30)[0] - lz) < 1e-12             # the oracle has converged
        assert abs(lm - lz) < 1e-10, (lm, lz)
        size = 1 + np.abs(m).max()
        assert_close(mean, m, size * weight_error(lz))
        assert_close(cov, C, size ** 2 * weight_error(lz))


# ------------------------------------------------------------------ Monte Carlo
def _mode(A, b, x0):
    res = optimize.minimize(lambda u: 0.5 * u @ u, x0, jac=lambda u: u, method="SLSQP",
                            constraints=[{"type": "ineq", "fun": lambda u: b - A @ u, "jac": lambda u: -A}],
                            options={"ftol": 1e-14, "maxiter": 500})
    return res.x


def _random_polytope(rng, i):
    """Bounded (even i) or unbounded, around a point x0 at distance 0 .. 9.5."""
    d = [0.0, 0.0, 1.5, 3.0, 5.0, 7.0, 10.5][i % 7]
    e = rng.normal(size=3)
    e /= np.linalg.norm(e)
    x0 = d * e
    if i % 2 == 0:
        rows = np.concatenate([np.eye(3), -np.eye(3), rng.normal(size=(2, 3))])
        A = rows @ special_ortho_group.rvs(3, random_state=rng)
    else:
        first = -e + 0.3 * rng.normal(size=3)
        A = np.concatenate([first[None], rng.normal(size=(rng.integers(0, 4), 3))])
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    return A, A @ x0 + rng.uniform(0.2, 1.5, len(A)), x0


def _importance_sums(A, b, mu, lm, mean, cov, zt):
    """One chunk of the importance-sampling checks: u = mu + z ~ N(mu, I) (zt (3, n) holds
    z), weight w = phi(u) / phi(u - mu) = exp(-mu . u + |mu|^2 / 2), bounded on P when mu
    is its point nearest 0.  The terms w 1_P / mass, w 1_P (u - mean) / mass and
    w 1_P ((u - mean)(u - mean)^T - cov) / mass have means 1, 0 and 0: returns their sums
    and sums of squares over the chunk, (2, 10)."""
    u = zt + mu[:, None]
    inside = np.ones(zt.shape[1], bool)
    s, t, below = np.empty(zt.shape[1]), np.empty(zt.shape[1]), np.empty(zt.shape[1], bool)
    for a, c in zip(A, b):          # row by row (no BLAS threads), in place: a . u <= c
        np.multiply(u[0], a[0], out=s)
        s += np.multiply(u[1], a[1], out=t)
        s += np.multiply(u[2], a[2], out=t)
        inside &= np.less_equal(s, c, out=below)
    u = u[:, inside]
    w = np.exp(-(mu[0] * u[0] + mu[1] * u[1] + mu[2] * u[2]) + 0.5 * mu @ mu - lm)
    dev = u - mean[:, None]
    terms = np.empty((10, u.shape[1]))                       # filled in place, no concatenation
    terms[0] = w
    np.multiply(w, dev, out=terms[1:4])
    for k, (i, j) in enumerate(zip(*np.triu_indices(3))):
        np.multiply(dev[i], dev[j], out=terms[4 + k])
        terms[4 + k] -= cov[i, j]
        terms[4 + k] *= w
    return np.stack([terms.sum(1), np.einsum("ij,ij->i", terms, terms)])


def test_random_polytopes_against_monte_carlo():
    """20 polytopes, bounded and unbounded, log mass 0 .. -50: mass, mean and covariance
    within 4 standard errors of 1e7-sample importance sampling from N(mode, I) (plain Monte
    Carlo where the polytope holds the origin); one draw of z per chunk serves all."""
    rng = np.random.default_rng(11)
    polys = []
    for i in range(20):
        A, b, x0 = _random_polytope(rng, i)
        mu = np.zeros(3) if np.all(b >= 0) else _mode(A, b, x0)
        polys.append((A, b, mu) + exact(A, b))
    lms = [p[3] for p in polys]
    assert min(lms) < -45 and max(lms) > -1 and sum(len(p[1]) <= 4 for p in polys) >= 8
    n, chunk = 10_000_000, 1_000_000
    sums = np.zeros((len(polys), 2, 10))
    for _ in range(n // chunk):
        zt = rng.standard_normal((3, chunk))
        for k, p in enumerate(polys):
            sums[k] += _importance_sums(*p, zt)
    est = sums[:, 0] / n
    se = np.sqrt(np.maximum(sums[:, 1] / n - est * est, 0) / n)
    est[:, 0] -= 1.0
    z = est / se
    assert np.all(np.abs(z) < 4), (np.abs(z).max(1), lms)


# ------------------------------------------------------------------ the sampler
def test_sampler_draws_match_exact_moments():
    """sample_standard_polytope (exact accept-reject) against the exact mean and
    covariance: the averages of u - mean and (u - mean)(u - mean)^T - cov within 4 SE."""
    from cpadgn.sampling import sample_standard_polytope
    rng = np.random.default_rng(2)
    polys = [_random_polytope(rng, i)[:2] for i in (0, 3, 4, 6, 1)]
    F = max(len(b) for _, b in polys)
    A = np.zeros((len(polys), F, 3))
    b = np.ones((len(polys), F))
    mask = np.zeros((len(polys), F), bool)
    for k, (a, c) in enumerate(polys):
        A[k, :len(c)], b[k, :len(c)], mask[k, :len(c)] = a, c, True
    n = 200_000
    draws = sample_standard_polytope(A, b, mask, np.full(len(polys), n), rng).reshape(len(polys), n, 3)
    res = polyhedron_moments(A, b, mask)
    iu = np.triu_indices(3)
    for k in range(len(polys)):
        dev = draws[k] - res.mean[k]
        terms = np.concatenate([dev, (dev[:, :, None] * dev[:, None, :] - res.cov[k])[:, iu[0], iu[1]]], 1)
        z = terms.mean(0) / (terms.std(0) / np.sqrt(n))
        assert np.all(np.abs(z) < 4), (k, z)


# ------------------------------------------------------------------ translates (the likelihood's pairs)
def test_translates_against_nested_quadrature_of_exact_slices():
    """``translated_polyhedron_moments`` (each polyhedron's facet polygons found once, a
    pair integrated as its translate) against the slice oracle on the translate itself,
    for bounded and unbounded polyhedra moved near and far, and a small far cube whose
    facet terms cancel (integrated directly)."""
    from cpadgn.polyhedron import region_facet_polygons, translated_polyhedron_moments
    rng = np.random.default_rng(8)
    polys = [_random_polytope(rng, i)[:2] for i in range(4)]
    Q = special_ortho_group.rvs(3, random_state=2)
    polys.append((np.concatenate([np.eye(3), -np.eye(3)]) @ Q, np.full(6, 0.01)))    # side 0.02
    F = max(len(b) for _, b in polys)
    a, c, real = np.zeros((len(polys), F, 3)), np.zeros((len(polys), F)), np.zeros((len(polys), F), bool)
    for r, (A, b) in enumerate(polys):
        a[r, :len(b)], c[r, :len(b)], real[r, :len(b)] = A, b, True
    fp = region_facet_polygons(a, c, real)
    assert 2 * fp.line_first.size > 0.5 * fp.c2.size           # most edges share one rule with their twin
    regions = np.repeat(np.arange(len(polys)), 3)
    v = rng.normal(size=(regions.size, 3)) * np.tile([0.5, 2.0, 4.0], len(polys))[:, None]
    v[-3:] = [[0.0, 0.0, 0.0], [0.0, 2.0, 1.0], [3.0, -1.0, 0.5]]                         # the cube: mass ~1e-5..1e-8
    res = translated_polyhedron_moments(fp, regions, v)                           # twin edges: one rule for two,
    mass_only = translated_polyhedron_moments(fp, regions, v, moments=False)      # with and without moments
    for p, r in enumerate(regions):
        A, b = polys[r]
        lz, m, C = slice_oracle(A, b - A @ v[p])
        assert abs(res.log_mass[p] - lz) < 1e-10, (p, res.log_mass[p], lz)
        assert abs(mass_only.log_mass[p] - lz) < 1e-10, (p, mass_only.log_mass[p], lz)
        size = 1 + np.abs(m).max()
        assert_close(res.mean[p], m, size * weight_error(lz))
        assert_close(res.cov[p], C, size ** 2 * weight_error(lz) + 1e-9 * np.abs(C).max())


# ------------------------------------------------------------------ node counts of the 1-D integrals
from oracles import peak_points, quadrature_rounding, select_by_rule  # noqa: E402


def _mpmath_edge_terms(B, C, lo, hi):
    """log T and log G (floats) of an edge (B = |b_k|, C = |c_e|) in its
    facet's v on [lo, hi] (mpmath numbers, at the caller's working precision):
    T = B / (2 pi) int Phi(-r) / (r cosh v) dv, r = sqrt(B^2 + C^2 cosh^2 v), and
    G = 1/(2 pi) int exp(-C^2 cosh^2 v / 2) / cosh v dv.  Each integrand is taken
    relative to its value at the point nearest 0: mpmath.quad stops at an absolute
    10^-dps, which a far edge's integrand (~1e-330) meets at its first, coarse level."""
    import mpmath
    points = peak_points(lo, hi, C)
    r = lambda v: mpmath.sqrt(B ** 2 + (C * mpmath.cosh(v)) ** 2)
    f_t = lambda v: mpmath.erfc(r(v) / mpmath.sqrt(2)) / 2 / (r(v) * mpmath.cosh(v))
    f_g = lambda v: mpmath.exp(-(C * mpmath.cosh(v)) ** 2 / 2) / mpmath.cosh(v)
    star = min(max(mpmath.mpf(0), lo), hi)
    t_star, g_star = f_t(star), f_g(star)          # once, not at every node
    t = B / (2 * mpmath.pi) * t_star * mpmath.quad(lambda v: f_t(v) / t_star, points)
    g = g_star * mpmath.quad(lambda v: f_g(v) / g_star, points) / (2 * mpmath.pi)
    return float(mpmath.log(t)), float(mpmath.log(g))


def test_edge_node_counts_against_mpmath():
    """log T and log G of ``log_edge_and_owen_terms`` with the node counts that their
    Bernstein-ellipse bound picks (every count from 1 to 16, and 16-node panels where it
    asks for more), against mpmath quadrature (60 digits: at 30 and
    40 its tanh-sinh rule misjudged one case by 2e-12) of the same integrals in
    v: T = b/(2 pi) int Phi(-r) / (r cosh v), G = 1/(2 pi) int exp(-c^2 cosh^2 v / 2) /
    cosh v, r^2 = b^2 + c^2 cosh^2 v; edges near and far, short and long, rays.  log T
    alone (``log_edge_term``, the likelihood's path: erfc on the nodes, unscaled, for
    r*^2 <= 1100, and 21 edges beyond that) against the same values."""
    import mpmath
    from cpadgn.polyhedron import _NEAR_R2, _edge_rule, log_edge_and_owen_terms, log_edge_term
    rng = np.random.default_rng(11)
    n = 20_000
    b, c = 10 ** rng.uniform(-3, 1.2, n), 10 ** rng.uniform(-4, 1.2, n)
    v_lo = rng.uniform(-5, 5, n)
    v_hi = v_lo + 10 ** rng.uniform(-9, 1.2, n)
    tau_lo, tau_hi = c * np.sinh(v_lo), np.where(rng.random(n) < 0.05, np.inf, c * np.sinh(v_hi))
    # far edges: b up to 60 (r*^2 up to 3600, beyond _NEAR_R2), short and long
    b[-21:], c[-21:], v_lo[-21:] = np.linspace(20, 60, 21), 10 ** np.linspace(-3, 1, 21), np.linspace(-2, 2, 21)
    v_hi[-21:] = v_lo[-21:] + 10 ** np.linspace(-6, 1, 21)
    tau_lo[-21:], tau_hi[-21:] = c[-21:] * np.sinh(v_lo[-21:]), c[-21:] * np.sinh(v_hi[-21:])
    _, _, r_star, v0, width, panels, nodes = _edge_rule(b, c, tau_lo, tau_hi)
    idx = np.concatenate([select_by_rule(nodes[:-21], panels[:-21], width[:-21]), np.arange(n - 21, n)])
    assert (r_star[-21:] ** 2 > _NEAR_R2).sum() >= 10 and (r_star[idx] ** 2 <= _NEAR_R2).sum() >= 19
    log_t, log_g = log_edge_and_owen_terms(b[idx], c[idx], tau_lo[idx], tau_hi[idx])
    log_t_alone = log_edge_term(b[idx], c[idx], tau_lo[idx], tau_hi[idx])
    with mpmath.workdps(60):
        for k, i in enumerate(idx):
            B, Cc = mpmath.mpf(b[i]), mpmath.mpf(c[i])
            lo = mpmath.asinh(mpmath.mpf(tau_lo[i]) / Cc)
            # a ray ends where exp(-(tau^2 - tau*^2) / 2), which bounds the integrands' fall, is e^-150
            tau_end = tau_hi[i] if np.isfinite(tau_hi[i]) else mpmath.sqrt(max(tau_lo[i], 0.0) ** 2 + 300)
            hi = mpmath.asinh(mpmath.mpf(tau_end) / Cc)
            want_t, want_g = _mpmath_edge_terms(B, Cc, lo, hi)
            for got, want in ((log_t[k], want_t), (log_t_alone[k], want_t), (log_g[k], want_g)):
                tol = quadrature_rounding(v0[i], width[i], c[i], want)
                assert abs(got - want) <= tol, (i, nodes[i], panels[i], got, want, (got - want) / tol)


def test_twin_edge_terms_against_mpmath():
    """``_twin_edge_terms``: an edge's T in both of its facets on the nodes of the one
    whose in-plane offset c is smaller, against mpmath quadrature (60 digits) of each in
    its own facet's v (as in test_edge_node_counts_against_mpmath).  The two facets meet
    the edge's line at the same distance rho, b^2 + c^2 = b_twin^2 + c_twin^2 = rho^2;
    offsets from equal to 1e3 apart, edges short and long, near and far (r*^2 beyond
    1100), one per joint node count 2..16 (its log 3 leaves 1 out of reach) and four
    with 16-node panels.  With owen (the moments path) the same rule gives T, T_twin
    (scaled integrands) and the Owen segments G, G_twin, each checked against mpmath in
    its own facet's v: G = 1/(2 pi) int exp(-c^2 cosh^2 v / 2) / cosh v."""
    import mpmath
    from cpadgn.polyhedron import _twin_edge_terms
    rng = np.random.default_rng(12)
    n = 20_000
    rho = 10 ** rng.uniform(-2, 1.2, n)
    rho[:200] = rng.uniform(34, 45, 200)                       # far: r*^2 > 1100
    c_twin = rho * rng.uniform(0.02, 0.999, n)
    c = c_twin / 10 ** rng.uniform(0, 3, n)
    b, b_twin = np.sqrt(rho ** 2 - c ** 2), np.sqrt(rho ** 2 - c_twin ** 2)
    tau_lo = rho * rng.uniform(-3, 3, n)
    tau_hi = np.where(rng.random(n) < 0.05, np.inf, tau_lo + rho * 10 ** rng.uniform(-6, 0.5, n))
    lt, ltw = _twin_edge_terms(b, c, b_twin, c_twin, tau_lo, tau_hi)
    lt_o, ltw_o, lg, lgw = _twin_edge_terms(b, c, b_twin, c_twin, tau_lo, tau_hi, owen=True)
    # the joint rule's own node count and range, to pick cases across it
    t2 = np.clip(0.0, tau_lo, tau_hi) ** 2
    cut = np.minimum(np.sqrt(t2 + 80.0), np.sqrt(c_twin ** 2 + t2) * np.exp(40.0))
    t0, t1 = np.maximum(tau_lo, -cut), np.minimum(tau_hi, cut)
    v0, v1 = np.arcsinh(t0 / c), np.arcsinh(t1 / c)
    from cpadgn.polyhedron import _edge_node_count
    nodes = _edge_node_count(b, c, np.where(np.abs(t0) > np.abs(t1), t0, t1), v0, v1,
                             np.log(3.0 * (c_twin ** 2 + t2) / (c ** 2 + t2)))
    picks = [np.flatnonzero((nodes == k) & (v1 > v0))[:1] for k in range(2, 17)]
    assert all(p.size for p in picks), [k + 2 for k, p in enumerate(picks) if not p.size]
    far = np.flatnonzero((nodes <= 16) & (v1 > v0) & (rho > 34))[:3]
    ratio = c_twin / c
    panels = [np.flatnonzero((nodes > 16) & (v1 > v0) & (ratio > lo))[:2] for lo in (1, 100)]
    idx = np.concatenate(picks + [far] + panels)
    assert far.size == 3 and sum(p.size for p in panels) == 4 and ratio[idx].max() > 100
    with mpmath.workdps(60):
        for i in idx:
            for B, Cc, t_got, g_got in ((b[i], c[i], (lt[i], lt_o[i]), lg[i]),
                                        (b_twin[i], c_twin[i], (ltw[i], ltw_o[i]), lgw[i])):
                B, Cc = mpmath.mpf(B), mpmath.mpf(Cc)
                lo = mpmath.asinh(mpmath.mpf(tau_lo[i]) / Cc)
                tau_end = tau_hi[i] if np.isfinite(tau_hi[i]) else mpmath.sqrt(max(tau_lo[i], 0.0) ** 2 + 300)
                hi = mpmath.asinh(mpmath.mpf(tau_end) / Cc)
                want_t, want_g = _mpmath_edge_terms(B, Cc, lo, hi)
                for got, want in ((t_got[0], want_t), (t_got[1], want_t), (g_got, want_g)):
                    # rounding as for the single rule, in the joint rule's v (the first facet's)
                    tol = quadrature_rounding(v0[i], v1[i] - v0[i], c[i], want)
                    assert abs(got - want) <= tol, (i, nodes[i], float(Cc), got, want, (got - want) / tol)


def test_edge_terms_of_very_far_edges_against_mpmath():
    """Edges 1e11 to 1e60 from the origin (a row far off the manifold): a range of
    ~1e-20 in v, where the Bernstein bound's c^2 / 4 once asked for more nodes than an
    int64 holds (a garbage rule, or a crash).  log T, log G and the twin rule's four
    terms against 60-digit mpmath in each facet's own v."""
    import mpmath
    from cpadgn.polyhedron import _twin_edge_terms, log_edge_and_owen_terms, log_edge_term
    rho = np.array([1e11, 3e14, 1e20, 1e60])
    c, c_twin = 0.3 * rho, 0.7 * rho
    b, b_twin = np.sqrt(rho ** 2 - c ** 2), np.sqrt(rho ** 2 - c_twin ** 2)
    tau_lo, tau_hi = -0.5 * rho, np.array([3.0, 0.3 * rho[1], np.inf, 0.3 * rho[3]])
    lt, lg = log_edge_and_owen_terms(b, c, tau_lo, tau_hi)
    got = {"T": [lt, log_edge_term(b, c, tau_lo, tau_hi)], "G": [lg]}
    lt1, ltw1 = _twin_edge_terms(b, c, b_twin, c_twin, tau_lo, tau_hi)
    lt2, ltw2, lg2, lgw2 = _twin_edge_terms(b, c, b_twin, c_twin, tau_lo, tau_hi, owen=True)
    got_twin = {"T": [ltw1, ltw2], "G": [lgw2]}
    got["T"] += [lt1, lt2]
    got["G"] += [lg2]
    with mpmath.workdps(60):
        for i in range(rho.size):
            for B, Cc, terms in ((b[i], c[i], got), (b_twin[i], c_twin[i], got_twin)):
                B, Cc = mpmath.mpf(B), mpmath.mpf(Cc)
                # the integrands fall like exp(-tau^2 / 2) from tau = 0: |tau| <= 30 holds all
                lo = mpmath.asinh(max(mpmath.mpf(tau_lo[i]), -30) / Cc)
                hi = mpmath.asinh(min(mpmath.mpf(tau_hi[i]), 30) / Cc)
                want = dict(zip("TG", _mpmath_edge_terms(B, Cc, lo, hi)))
                for key, values in terms.items():
                    for value in values:
                        # rounding: eps |log| from the final logarithm and the r*^2 / 2 it holds
                        tol = 8 * np.finfo(float).eps * abs(want[key])
                        assert abs(value[i] - want[key]) <= tol, (i, key, value[i], want[key])


def test_collapsed_rules_integrate_their_degree():
    """The cubature's collapsed Gauss-Jacobi rules on the unit tetrahedron integrate every
    monomial x^i y^j z^k of degree <= 2n - 1 to i! j! k! / (i + j + k + 3)!, within the
    rounding of a sum of n^3 positive terms of degree-d products."""
    from math import factorial
    from cpadgn.polyhedron import _RULES
    for _, (nodes, weights) in _RULES:
        n = round(len(weights) ** (1 / 3))
        d = 2 * n - 1
        for i, j, k in itertools.product(range(d + 1), repeat=3):
            if i + j + k <= d:
                got = weights @ (nodes[:, 0] ** i * nodes[:, 1] ** j * nodes[:, 2] ** k)
                want = factorial(i) * factorial(j) * factorial(k) / factorial(i + j + k + 3)
                assert abs(got / want - 1) <= (len(weights) + 4 * d) * EPS, (n, i, j, k, got / want - 1)


def test_translated_far_bounded_polyhedron_is_below_its_half_spaces():
    """A bounded region far from the posterior mean (a conv-residual-maxpool decoder at
    S = 3, found by benchmarks/fuzz_loader.py): the translated formula gave it log mass
    -0.86, above its facets' own half-space masses (min log Phi(b_k) = -2.8), where the
    true value is e^-17 (no hit in 10^6 samples); log p was 0.39 nats off."""
    A0 = np.array([[-0.36103373075355505, -0.46308966379011046, -0.8094458651132465],
                   [0.19567910974533495, 0.03988030396112906, 0.9798567483899067],
                   [-0.6712788158878708, 0.7341230413561232, 0.10221600408064263],
                   [0.31193880022663906, 0.8818940651350812, -0.3534926347078341],
                   [0.40303361961301803, 0.8062455358158346, 0.4330496939597891],
                   [0.3134215856899038, 0.9079312800381505, -0.2782583338408969],
                   [-0.31458546413003835, -0.9443640739300665, -0.09598167339808308],
                   [0.0504751899885436, -0.9331987568783855, -0.3557981666004711],
                   [-0.0799487498577962, 0.17534310884299717, -0.9812558237164498]])
    c0 = np.array([0.6112931270457987, 1.370522983165892, 22.27059216152532, 0.29219470579469814,
                   1.7110442387312026, 0.8992405626668897, 0.9258608096443404, -2.7021155726826027,
                   -1.681300135318214])
    v = np.array([-2.2316941780003883, 1.5849957525577252, 0.6173365173676238])
    b = c0 - A0 @ v
    u = np.random.default_rng(0).normal(size=(1_000_000, 3))
    assert not (u @ A0.T <= b).all(1).any()                      # mass below ~1e-5
    fp = region_facet_polygons(A0[None], c0[None], np.ones((1, 9), bool))
    # two facet polygons are degenerate (listed with 1 and 2 edges): their feet must not count;
    # untranslated, the sum went negative (log mass -inf against -31.5)
    for t in (0.0, 0.5):
        got = translated_polyhedron_moments(fp, np.array([0]), t * v[None], moments=False)
        want = polyhedron_moments(A0[None], (c0 - t * A0 @ v)[None], np.ones((1, 9), bool), moments=False)
        np.testing.assert_allclose(got.log_mass, want.log_mass, rtol=1e-10)
    got = translated_polyhedron_moments(fp, np.array([0]), v[None], moments=True)
    assert got.log_mass[0] <= log_ndtr(b).min()
    want = polyhedron_moments(A0[None], b[None], np.ones((1, 9), bool))
    np.testing.assert_allclose(got.log_mass, want.log_mass, rtol=1e-10)
    assert -20 < got.log_mass[0] < np.log(1e-5)


# ------------------------------------------------------------------ prisms: every facet plane through one line
def _bivariate_cdf(h, k, rho):
    """P(Y_1 <= h, Y_2 <= k) for unit normals of correlation rho, by adaptive quadrature of
    phi(x) Phi((k - rho x) / sqrt(1 - rho^2)) over x <= h."""
    from scipy import integrate
    from scipy.stats import norm
    s = np.sqrt(1 - rho * rho)
    f = lambda x: norm.pdf(x) * norm.cdf((k - rho * x) / s)
    return integrate.quad(f, -np.inf, h, epsabs=1e-15, epsrel=1e-13, limit=200)[0]


_WEDGE = np.radians([170.0, 323.0])                    # the 27-degree wedge of benchmarks/compare_lp_walk.py
_THROUGH_EDGE = np.radians(252.0)                      # a row between them: redundant through the edge


def _in_plane(t, Q):
    return np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], -1) @ Q.T


@pytest.mark.parametrize("b1, b3", [(0.0, 0.0), (1e-20, 1e-20), (1e-20, 3e-20), (1e-8, 1e-8), (0.3, -0.2),
                                    (-0.5, 0.4)])
def test_wedges_with_rows_through_their_edge(b1, b3):
    """Prisms {a_1 . u <= b_1, a_3 . u <= b_3} x R (rotated) with extra rows that are
    redundant: a row through the edge line (touching only along it), the same a little
    outside, a parallel copy of a wedge row further out (before or after it); in any
    order.  Mass = P(a_1 . u <= b_1, a_3 . u <= b_3) (bivariate normal, quadrature), and at
    b = 0 alpha / (2 pi) with mean sqrt(pi / 2) (sin th_2 - sin th_1, cos th_1 - cos th_2) / alpha
    in the wedge's plane.  Tiny offsets once lost the mass: facet polygons compared
    their offsets with absolute tolerances (1e-12), wrong where the offsets are ~b."""
    Q = special_ortho_group.rvs(3, random_state=11)
    a1, a3 = _in_plane(_WEDGE, Q)
    a2 = _in_plane(_THROUGH_EDGE, Q)
    apex = np.linalg.lstsq(np.stack([a1, a3]), [b1, b3], rcond=None)[0]
    rho = a1 @ a3
    truth = _bivariate_cdf(b1, b3, rho)
    scale = abs(b1) + abs(b3)
    cases = [([a1, a2, a3], [b1, a2 @ apex, b3]), ([a2, a3, a1], [a2 @ apex, b3, b1]),
             ([a1, a2, a3], [b1, a2 @ apex + 0.5 * scale, b3]),
             ([a1, a1, a3], [b1 + 2 * scale + 1e-20, b1, b3]), ([a1, a1, a3], [b1, b1 + 2 * scale + 1e-20, b3])]
    for A, b in cases:
        lm, mean, _ = exact(np.array(A), np.array(b))
        # the quadrature's 1e-13; the row through the edge computed to eps |apex|
        assert abs(np.exp(lm) - truth) <= 1e-12 + 1e-14 * truth, (A, b, np.exp(lm), truth)
        if scale == 0:
            th1, th2 = np.radians(53.0), np.radians(80.0)     # the wedge's directions
            alpha = th2 - th1
            assert abs(np.exp(lm) - alpha / (2 * np.pi)) < 1e-13
            m2 = np.sqrt(np.pi / 2) * np.array([np.sin(th2) - np.sin(th1), np.cos(th1) - np.cos(th2), 0.0]) / alpha
            assert_close(mean, Q @ m2, 1e-10)


def test_translated_wedges_with_a_row_through_their_edge():
    """``translated_polyhedron_moments`` of the wedge above with its row through the edge
    (offsets 0 and 1e-20: the polygons found at v = 0) moved by -v, which keeps all
    three planes through one line: mass P(a_1 . u <= b_1, a_3 . u <= b_3) as above."""
    Q = special_ortho_group.rvs(3, random_state=12)
    a1, a3 = _in_plane(_WEDGE, Q)
    a2 = _in_plane(_THROUGH_EDGE, Q)
    A = np.stack([a1, a2, a3])
    c = np.array([[0.0, 0.0, 0.0], [1e-20, 1e-20, 1e-20]])
    fp = region_facet_polygons(np.stack([A, A]), c, np.ones((2, 3), bool))
    v = np.array([[0.0, 0.0, 0.0], [1e-20, -2e-20, 0.0], [1e-6, 0.0, 3.0], [0.3, -0.4, 1.0], [-1.0, 0.5, -2.0]]) @ Q.T
    regions = np.repeat([0, 1], len(v))
    v = np.tile(v, (2, 1))
    res = translated_polyhedron_moments(fp, regions, v)
    for p, r in enumerate(regions):
        b = c[r] - A @ v[p]
        truth = _bivariate_cdf(b[0], b[2], a1 @ a3)
        # translated offsets carry rounding eps |v|, which the terms amplify by 1 / (the
        # distance of the origin from the edge line, in the plane of the wedge)
        dist = np.linalg.norm(v[p] - (v[p] @ Q[:, 2]) * Q[:, 2])
        tol = 1e-12 + 64 * EPS * np.linalg.norm(v[p]) / max(dist, 1e-300)
        assert abs(np.exp(res.log_mass[p]) - truth) <= tol, (p, np.exp(res.log_mass[p]), truth)


def test_translated_cones_with_a_foot_at_their_apex():
    """Cones {A u <= 0} moved by -v with v along a facet normal, so that the foot of that
    facet is the apex (the likelihood meets this: benchmarks/compare_lp_walk.py --kind mlp
    --only 114), against the slice oracle on the translate.  The translated in-plane
    offset and ends of the apex's edges are then rounding noise ~eps |v|, and so were the
    angles the facet's edge terms take there (masses 0.11 for 0.047)."""
    rng = np.random.default_rng(21)
    cones = [np.array([[0.46493359076916885, 0.22940354722006573, 0.8551086297642763],     # mlp 114's region 0
                       [-0.47626637539844896, 0.19060254280660913, 0.8583944375055551],
                       [-0.00469095764591799, 0.4008639405785135, -0.916125589676563]])]
    cones += [x / np.linalg.norm(x, axis=1, keepdims=True) for x in rng.normal(size=(3, 3, 3))]
    fp = region_facet_polygons(np.stack(cones), np.zeros((len(cones), 3)), np.ones((len(cones), 3), bool))
    regions = np.repeat(np.arange(len(cones)), 3)
    v = np.concatenate([A * s for A, s in zip(cones, [0.0691, 0.5, -1.0, 2.0])])      # v = s a_k
    res = translated_polyhedron_moments(fp, regions, v)
    for p, r in enumerate(regions):
        lz, m, _ = slice_oracle(cones[r], -cones[r] @ v[p])
        assert abs(res.log_mass[p] - lz) < 1e-10, (p, res.log_mass[p], lz)
        assert_close(res.mean[p], m, (1 + np.abs(m).max()) * weight_error(lz))


def test_translated_cones_with_a_row_touching_them_at_a_point_or_ray():
    """Cones {a_i . u <= a_i . p} (apex p, i = 1..3) with a fourth row that is no facet: a
    positive combination of all three normals through p (it touches the cone at the apex
    only) or of two (along their edge ray), moved by -v; against the slice oracle of the
    cone without that row, its error estimated by a coarser rule.  That row's polygon is a
    point or a ray, which rounding listed with an edge or two; its foot was tested against
    those edges only, and counted in unbounded regions (cone 1: log mass -inf for -6.32).  The partitions of benchmarks/compare_lp_walk.py --kind mlp --only
    100 105 171 listed such rows until the subdivision's facet rank test (7bd7535), and log p
    lost those pairs: 4e-6 to 1.4e-5 nats against nested quadrature."""
    rng = np.random.default_rng(4)
    n = 16
    A, p, v, lam = rng.normal(size=(n, 3, 3)), rng.normal(size=(n, 3)), 2 * rng.normal(size=(n, 3)), \
        rng.random((n, 3)) + 0.05
    A /= np.linalg.norm(A, axis=2, keepdims=True)
    lam[::2, 2] = 0                                             # even: along the edge ray; odd: the apex
    extra = np.einsum("ri,ris->rs", lam, A)
    A4 = np.concatenate([A, (extra / np.linalg.norm(extra, axis=1, keepdims=True))[:, None]], 1)
    fp = region_facet_polygons(A4, np.einsum("rfs,rs->rf", A4, p), np.ones((n, 4), bool))
    res = translated_polyhedron_moments(fp, np.arange(n), v)
    for r in range(n):
        b = A[r] @ (p[r] - v[r])
        lz, m, _ = slice_oracle(A[r], b, nodes=60)              # cones' slices converge slowly in u_1
        lz_coarse, m_coarse, _ = slice_oracle(A[r], b, nodes=40)
        assert abs(res.log_mass[r] - lz) <= 1e-10 + abs(lz - lz_coarse), (r, res.log_mass[r], lz, lz_coarse)
        assert_close(res.mean[r], m, (1 + np.abs(m).max()) * weight_error(lz) + np.abs(m - m_coarse).max())
