"""Polytope Gaussian integrals against closed forms and Monte Carlo."""
import numpy as np
from scipy.stats import norm

from cpadgn.polytope import polytope_moments

EPS = np.finfo(float).eps


def moments(A, b):
    A, b = np.asarray(A, float)[None], np.asarray(b, float)[None]
    return polytope_moments(A, b, np.ones(b.shape, bool))


def test_half_plane_and_quadrant_closed_forms():
    r = moments([[1.0, 0.0]], [0.7])
    assert abs(r.log_mass[0] - norm.logcdf(0.7)) < 1e-14
    assert abs(r.mean[0, 0] + norm.pdf(0.7) / norm.cdf(0.7)) < 1e-13
    r = moments([[1.0, 0.0], [0.0, 1.0]], [1.0, -0.5])
    assert abs(r.log_mass[0] - np.log(norm.cdf(1) * norm.cdf(-0.5))) < 1e-13


def test_origin_on_a_vertex_or_an_edge():
    assert abs(moments([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]).log_mass[0] - np.log(0.25)) < 1e-13
    assert abs(moments([[1.0, 0.0]], [0.0]).log_mass[0] - np.log(0.5)) < 1e-13
    th = np.array([0.3, 2.2, 4.0])
    A = np.stack([np.cos(th), np.sin(th)], -1)            # three lines through the origin
    cells = [moments(A * s[:, None], np.zeros(3)).log_mass[0]
             for s in np.array(np.meshgrid(*[[1, -1]] * 3)).reshape(3, -1).T]
    assert abs(sum(np.exp(c) for c in cells if np.isfinite(c)) - 1) < 1e-12


def test_far_box_in_log_space():
    r = moments([[1, 0], [-1, 0], [0, 1], [0, -1]], [21.0, -20.0, 1.0, 1.0])
    want = np.log(norm.sf(20) - norm.sf(21)) + np.log(norm.cdf(1) - norm.cdf(-1))
    assert abs(r.log_mass[0] - want) < 1e-9
    r = moments([[-1.0]], [-30.0])
    assert abs(r.log_mass[0] - norm.logsf(30)) < 1e-9 and abs(r.mean[0, 0] - 30.0332596) < 1e-6


def test_random_triangle_against_monte_carlo():
    rng = np.random.default_rng(0)
    th = rng.uniform(0, 2 * np.pi, 3)
    A, b = np.stack([np.cos(th), np.sin(th)], -1), np.array([0.3, 0.5, 0.2])
    r = moments(A, b)
    z = rng.standard_normal((1_000_000, 2))
    inside = (z @ A.T <= b).all(1)
    p = inside.mean()
    assert abs(np.exp(r.log_mass[0]) - p) < 4 * np.sqrt(p * (1 - p) / z.shape[0])
    se_mean = z[inside].std(0) / np.sqrt(inside.sum())
    assert np.all(np.abs(r.mean[0] - z[inside].mean(0)) < 4 * se_mean)


def test_three_dimensional_box_is_exact_and_random_polytope_within_error():
    A = np.array([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]])
    r = moments(A, [1, -0.5, 2, 1, 0.3])
    want = np.log((norm.cdf(1) - norm.cdf(.5)) * (norm.cdf(2) - norm.cdf(-1)) * norm.cdf(.3))
    assert abs(r.log_mass[0] - want) < 1e-12
    rng = np.random.default_rng(1)
    A, b = rng.normal(size=(6, 3)), rng.uniform(0.2, 1, 6)
    r = moments(A, b)
    z = rng.standard_normal((1_000_000, 3))
    p = (z @ A.T <= b).all(1).mean()
    se = np.hypot(np.sqrt(p * (1 - p) / z.shape[0]) / p, r.stderr[0])
    assert abs(r.log_mass[0] - np.log(p)) < 4 * se


# --------------------------------------------------------------------------- S >= 3
# Far and thin polytopes (the posterior case): closed forms and brute-force importance
# sampling written here, with scipy only.
from scipy import integrate, optimize  # noqa: E402
from scipy.stats import special_ortho_group, truncnorm  # noqa: E402


def _log_interval(lo, hi):
    """log(Phi(hi) - Phi(lo)) from scipy's tails."""
    if lo > 0:
        return norm.logsf(lo) + np.log(-np.expm1(norm.logsf(hi) - norm.logsf(lo)))
    return norm.logcdf(hi) + np.log(-np.expm1(norm.logcdf(lo) - norm.logcdf(hi)))


def _log_bivariate(b1, b2, rho):
    """log P[X <= b1, rho X + sqrt(1 - rho^2) Y <= b2], X, Y iid N(0, 1): adaptive
    quadrature of phi(x) Phi((b2 - rho x) / sqrt(1 - rho^2)) over x <= b1, scaled by its
    largest value on a grid."""
    s = np.sqrt(1 - rho * rho)
    logf = lambda x: norm.logpdf(x) + norm.logcdf((b2 - rho * x) / s)
    xs = np.linspace(min(b1, -60.0), b1, 200001)
    lf = logf(xs)
    k = lf.argmax()
    f = lambda x: np.exp(logf(x) - lf[k])
    tot = sum(integrate.quad(f, a, c, epsabs=0, epsrel=1e-12, limit=500)[0]
              for a, c in [(-np.inf, xs[k]), (xs[k], b1)] if c > a)
    return lf[k] + np.log(tot)


def _check(A, b, want, rel=5e-3, floor=1e-3):
    """log mass within 5 standard errors (plus ``floor``: randomised QMC errors of thin
    polytopes have heavier tails than the 8-randomisation SE shows) and within ``rel``."""
    r = moments(A, b)
    err = r.log_mass[0] - want
    assert np.isfinite(r.log_mass[0]) and np.isfinite(r.stderr[0])
    assert abs(err) <= 5 * r.stderr[0] + floor, (err, r.stderr[0])
    assert abs(err) < rel, (err, r.stderr[0])
    return r


def test_far_half_spaces_and_rotated_boxes_3d():
    rng = np.random.default_rng(0)
    for d in (5.0, 30.0, 300.0):                          # a half-space at distance d
        a = rng.normal(size=3)
        _check(a[None] / np.linalg.norm(a) * 2.0, [-2.0 * d], norm.logsf(d), rel=1e-9, floor=1e-9)
    for trial in range(6):                                # boxes in a random orientation
        lo = np.array([rng.uniform(15, 40), -rng.uniform(0.5, 2), rng.uniform(-1, 1)])
        hi = lo + np.array([rng.uniform(0.01, 1), rng.uniform(0.5, 3), 10 ** rng.uniform(-3, 0)])
        Q = special_ortho_group.rvs(3, random_state=rng)
        A, b = np.concatenate([Q, -Q]), np.concatenate([hi, -lo])
        if trial % 3 == 2:                                # one side unbounded
            A, b = A[1:], b[1:]
            hi[0] = np.inf
        want = sum(_log_interval(lo[i], hi[i]) for i in range(3))
        r = _check(A, b, want)
        m = np.array([truncnorm.mean(lo[i], hi[i]) for i in range(3)])
        v = np.array([truncnorm.var(lo[i], hi[i]) for i in range(3)])
        assert np.all(np.abs(Q @ r.mean[0] - m) < 0.01 * np.sqrt(v))
        C = Q @ r.cov[0] @ Q.T
        assert np.all(np.abs(C - np.diag(v)) < 0.01 * np.sqrt(np.outer(v, v)))


def test_far_thin_wedges_3d():
    """Two nearly opposite half-spaces (a wedge of opening 1e-3..0.1 rad whose apex is
    20-40 std from 0) times a line or a far half-line, randomly rotated: the mass is a
    bivariate normal probability (times a 1-D tail), the wedge's edge or apex far out."""
    rng = np.random.default_rng(1)
    for trial in range(8):
        ang = 10 ** rng.uniform(-3, -1)
        rho = -np.cos(ang)
        th = rng.uniform(0, 2 * np.pi)
        apex = rng.uniform(20, 40) * np.array([np.cos(th), np.sin(th)])
        a1, a2 = np.array([1.0, 0.0]), np.array([rho, np.sin(ang)])
        rows, offs = [np.r_[a1, 0], np.r_[a2, 0]], [a1 @ apex, a2 @ apex]
        want = _log_bivariate(offs[0], offs[1], rho)
        if trial % 2:                                     # and u_3 >= c: the mode is a vertex
            c = rng.uniform(5, 30)
            rows.append(np.array([0.0, 0.0, -1.0]))
            offs.append(-c)
            want += norm.logsf(c)
        Q = special_ortho_group.rvs(3, random_state=rng)
        _check(np.array(rows) @ Q, np.array(offs), want, rel=1e-2)


def _importance_sampling(A, b, n, rng):
    """log P[u in P] by importance sampling from the mode mu (scipy's SLSQP): P lies in
    {e . u >= |mu|}, e = mu / |mu|, so draw u = mu + t e + v, t ~ Exp(|mu|), v ~ N(0, I)
    across e; the weight phi(|mu|) exp(-t^2 / 2) / |mu| is bounded.  (log mean, SE of it)."""
    S = A.shape[1]
    lp = optimize.linprog(np.r_[np.zeros(S), -1.0], A_ub=np.hstack([A, np.ones((len(b), 1))]), b_ub=b,
                          bounds=[(None, None)] * S + [(None, 1.0)])
    res = optimize.minimize(lambda u: 0.5 * u @ u, lp.x[:S], jac=lambda u: u, method="SLSQP",
                            constraints=[{"type": "ineq", "fun": lambda u: b - A @ u, "jac": lambda u: -A}],
                            options={"ftol": 1e-15, "maxiter": 1000})
    mu = res.x
    L = np.linalg.norm(mu)
    e = mu / L
    t = rng.exponential(1 / L, n)
    v = rng.standard_normal((n, S))
    v -= np.outer(v @ e, e)
    u = mu + t[:, None] * e + v
    inside = (u @ A.T <= b).all(1)
    w = np.where(inside, np.exp(-0.5 * t * t), 0.0)
    m, se = w.mean(), w.std() / np.sqrt(n)
    return norm.logpdf(L) - np.log(L) + np.log(m), se / m


def test_partition_polytopes_far_from_the_origin():
    """Regions of a real partition, shifted 3 and 30 std away (as the posterior does):
    all get a finite log mass with a small standard error, and a sample of them agrees
    with brute-force importance sampling."""
    from oracles import random_net
    from cpadgn.partition import compute_partition
    net = random_net(3, (16, 16), 5, seed=1, slope=0.1, scale=1.5)
    part = compute_partition(net)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(part.patterns), 300, replace=False)
    G, h, mask = part.facets(net, idx)
    for shift in (3.0, 30.0):
        c = rng.normal(size=(len(idx), 3)) * shift
        b = h - np.einsum("bks,bs->bk", G, c)
        r = polytope_moments(G, b, mask)
        assert np.all(np.isfinite(r.log_mass)) and np.all(r.stderr < 0.01)
        assert np.all(np.isfinite(r.mean)) and np.all(np.isfinite(r.cov))
        for i in rng.choice(len(idx), 6, replace=False):
            want, se = _importance_sampling(G[i][mask[i]], b[i][mask[i]], 200_000, rng)
            assert abs(r.log_mass[i] - want) < 5 * np.hypot(se, r.stderr[i]) + 1e-3, (i, r.log_mass[i], want, se)


def test_four_dimensional_far_rotated_box():
    rng = np.random.default_rng(2)
    lo, hi = np.array([12.0, -1.0, 0.3, -0.5]), np.array([12.4, 1.5, 2.0, 0.5])
    Q = special_ortho_group.rvs(4, random_state=rng)
    _check(np.concatenate([Q, -Q]), np.concatenate([hi, -lo]),
           sum(_log_interval(lo[i], hi[i]) for i in range(4)), rel=5e-3)


def test_s1_far_intervals_match_50_digit_arithmetic():
    """S = 1 interval masses in either far tail (where Phi(lo) and Phi(hi) both round to 1
    or 0 in float64) and their means, against mpmath with 50 digits."""
    import mpmath
    mpmath.mp.dps = 50
    cases = [(30.0, 31.0), (40.0, 41.0), (-41.0, -40.0), (200.0, 200.5), (38.0, np.inf),
             (5.0, 5.0 + 1e-9), (-1.0, 2.0), (-np.inf, -45.0)]
    for lo, hi in cases:
        A = [[1.0], [-1.0]] if np.isfinite(lo) and np.isfinite(hi) else ([[-1.0]] if np.isfinite(lo) else [[1.0]])
        b = [hi, -lo] if np.isfinite(lo) and np.isfinite(hi) else ([-lo] if np.isfinite(lo) else [hi])
        r = moments(A, b)
        L = mpmath.mpf(lo) if np.isfinite(lo) else -mpmath.inf
        U = mpmath.mpf(hi) if np.isfinite(hi) else mpmath.inf
        # P[L < Z < U] from the tail on the side away from 0 (erfc keeps its tiny values)
        tail = lambda t: mpmath.erfc(t / mpmath.sqrt(2)) / 2          # P[Z > t]
        mass = tail(L) - tail(U) if L >= 0 else (tail(-U) - tail(-L) if U <= 0 else 1 - tail(U) - tail(-L))
        phi = lambda t: mpmath.npdf(t) if mpmath.isfinite(t) else mpmath.mpf(0)
        want = float(mpmath.log(mass))
        assert abs(r.log_mass[0] - want) <= 1e-10 * abs(want) + 1e-14, (lo, hi, r.log_mass[0], want)
        if hi - lo > 1e-3:     # (phi(lo) - phi(hi)) / mass cancels for narrow intervals: log mass only
            mean = float((phi(L) - phi(U)) / mass)
            assert abs(r.mean[0, 0] - mean) <= 1e-9 * (1 + abs(mean)), (lo, hi, r.mean[0, 0], mean)


def test_log_diff_ndtr_against_50_digit_arithmetic():
    """log(Phi(hi) - Phi(lo)) on 3,000 intervals (wide, narrow and very narrow, around 0,
    in both tails down to -60 and at 1e3, half-lines) against mpmath with 50 digits.
    Rounding allows: in probability space (Phi(c) > 4e-198, c the mirrored upper end) a
    few eps of each ndtr times the loss of the subtraction, (Phi(c) + Phi(a)) /
    (Phi(c) - Phi(a)) < 63 outside the narrow intervals (log Phi has slope >= 0.79 on
    [a, c] <= 0); from the logarithms, eps (|log Phi(a)| + |log Phi(c)|) times the same
    31; the narrow series, 1e-14 relative."""
    import mpmath
    from cpadgn.polytope import log_diff_ndtr
    rng = np.random.default_rng(5)
    n = 3000
    lo = np.concatenate([rng.uniform(-8, 8, n // 3), rng.uniform(-60, 60, n // 3), rng.uniform(-1e3, 1e3, n // 3)])
    width = 10 ** rng.uniform(-12, 1.5, n)
    hi = lo + width
    lo[:50], hi[50:100] = -np.inf, np.inf
    got = log_diff_ndtr(lo, hi)
    tail = lambda t: mpmath.erfc(t / mpmath.sqrt(2)) / 2              # P[Z > t], exact in either tail
    with mpmath.workdps(50):
        for i in range(n):
            L = mpmath.mpf(lo[i]) if np.isfinite(lo[i]) else -mpmath.inf
            U = mpmath.mpf(hi[i]) if np.isfinite(hi[i]) else mpmath.inf
            mass = tail(L) - tail(U) if L >= 0 else (tail(-U) - tail(-L) if U <= 0 else 1 - tail(U) - tail(-L))
            want = float(mpmath.log(mass))
            a, c = (-hi[i], -lo[i]) if lo[i] > 0 else (lo[i], hi[i])
            log_cdf = lambda t: abs(float(mpmath.log(tail(-mpmath.mpf(t))))) if np.isfinite(t) else 0.0
            logs = log_cdf(a) + log_cdf(c)
            tol = 1e-14 * (1 + abs(want)) + 63 * 8 * EPS + 31 * 2 * EPS * logs
            assert abs(got[i] - want) <= tol, (lo[i], hi[i], got[i], want, (got[i] - want) / tol)


def test_owen_segment_far_from_the_origin_against_mpmath():
    """``log_owen_segment`` for p from 1e3 to 1e150 (a facet that far from a row's
    posterior mean): finite, as log G is (about -p^2 / 2), where the clipped range in s
    (~9 / p wide) used to round to nothing (-inf from p ~ 1e9).  Against 60-digit mpmath
    of log G = -p^2 / 2 + log(1/(2 pi) int p exp(-t^2 / 2) / (p^2 + t^2) dt).  Tolerance:
    u*^2 = p^2 + t*^2 is rounded to ~2 eps u*^2 (its half enters log G) and the result to
    eps |log G|: 4 eps (u*^2 / 2 + |log G|), and 1e-12 for the quadrature."""
    import mpmath
    from cpadgn.polytope import log_owen_segment
    segments = [(-1.0, 2.0), (-np.inf, np.inf), (0.5, 3.0), (-1e-3, 1e-3), (2.0, np.inf)]
    ps = [1e3, 1e6, 1e7, 1e8, 1e9, 1e12, 1e50, 1e150]
    p, t_lo, t_hi = (np.array(x) for x in zip(*[(q, lo, hi) for q in ps for lo, hi in segments]))
    got = log_owen_segment(p, t_lo, t_hi)
    assert np.isfinite(got).all()
    with mpmath.workdps(60):
        for k in range(p.size):
            P = mpmath.mpf(p[k])
            a = -mpmath.inf if np.isinf(t_lo[k]) else mpmath.mpf(t_lo[k])
            b = mpmath.inf if np.isinf(t_hi[k]) else mpmath.mpf(t_hi[k])
            cuts = [a] + [mpmath.mpf(x) for x in (-1, 0, 1) if a < x < b] + [b]
            g = mpmath.quad(lambda t: P * mpmath.exp(-t * t / 2) / (P * P + t * t), cuts) / (2 * mpmath.pi)
            want = float(-P * P / 2 + mpmath.log(g))
            t_star = float(np.clip(0.0, t_lo[k], t_hi[k]))
            tol = 4 * EPS * ((p[k] ** 2 + t_star ** 2) / 2 + abs(want)) + 1e-12
            assert abs(got[k] - want) <= tol, (p[k], t_lo[k], t_hi[k], got[k], want)


def test_owen_segment_node_counts_against_mpmath():
    """``log_owen_segment`` with the node counts that its Bernstein-ellipse bound picks
    (every count from 1 to 16, and 16-node panels where it asks for more), against
    mpmath quadrature (60 digits: at 30 and
    40 its tanh-sinh rule misjudged one case by 2e-12) of G = 1/(2 pi) int exp(-p^2 cosh^2 s / 2) / cosh s ds
    over s = asinh(t / p): segments near and far (p up to 40, log G near -800), short
    and long, rays."""
    import mpmath
    from cpadgn.polytope import _owen_rule, log_owen_segment
    from oracles import peak_points, quadrature_rounding, select_by_rule
    rng = np.random.default_rng(12)
    n = 20_000
    p = 10 ** rng.uniform(-4, 1.6, n)
    s_lo = rng.uniform(-5, 5, n)
    s_hi = s_lo + 10 ** rng.uniform(-9, 1.2, n)
    t_lo, t_hi = p * np.sinh(s_lo), np.where(rng.random(n) < 0.05, np.inf, p * np.sinh(s_hi))
    lo, width, panels, nodes, _ = _owen_rule(p, t_lo, t_hi)
    idx = select_by_rule(nodes, panels, width)
    got = log_owen_segment(p[idx], t_lo[idx], t_hi[idx])
    with mpmath.workdps(60):
        for k, i in enumerate(idx):
            P = mpmath.mpf(p[i])
            a = mpmath.asinh(mpmath.mpf(t_lo[i]) / P)
            b = mpmath.asinh(mpmath.mpf(t_hi[i]) / P) if np.isfinite(t_hi[i]) else mpmath.inf
            g = mpmath.quad(lambda s: mpmath.exp(-(P * mpmath.cosh(s)) ** 2 / 2) / mpmath.cosh(s),
                            peak_points(a, b, P)) / (2 * mpmath.pi)
            want = float(mpmath.log(g))
            tol = quadrature_rounding(lo[i], width[i], p[i], want)
            assert abs(got[k] - want) <= tol, (i, nodes[i], panels[i], got[k], want, (got[k] - want) / tol)


def test_masked_extreme_gives_the_masked_reductions_bits():
    """``_masked_extreme`` (the unmasked reduction, rows with a 0 or NaN result redone) against
    numpy's masked reduction itself, bit for bit: signed zeros in either order, NaN, inf,
    rows with nothing selected."""
    from cpadgn.polytope import _masked_extreme
    rng = np.random.default_rng(0)
    x = np.where(rng.random((4000, 7)) < 0.5, rng.choice([0.0, -0.0, 1.5, -2.0, np.inf, -np.inf], size=(4000, 7)),
                 rng.normal(size=(4000, 7)))
    x[::97, 3] = np.nan
    where = rng.random(x.shape) < 0.6
    where[::13] = False                                        # nothing selected: the initial value
    for extreme, initial in ((np.minimum, np.inf), (np.maximum, -np.inf)):
        got = _masked_extreme(extreme, x, where, initial)
        want = extreme.reduce(x, axis=-1, where=where, initial=initial)
        assert got.tobytes() == want.tobytes()
        assert (got == 0).sum() > 100 and np.isnan(got).sum() > 5 and np.signbit(got[got == 0]).any()


def test_duplicated_facet_at_the_mode_4d():
    """A facet listed twice and active at the mode made the KKT check's Gram matrix
    singular (LinAlgError: `cpadgn score` of an S = 4 PPCA-started model failed as an
    internal error); the mass is the closed form within the reported QMC error."""
    S = 4
    A = np.vstack([np.eye(S)[:1], np.eye(S)[:1], -np.eye(S)])          # z1 <= -1 twice, z >= -8
    b = np.array([-1.0, -1.0] + [8.0] * S)
    r = moments(A, b)
    want = np.log(norm.cdf(-1) - norm.cdf(-8)) + (S - 1) * norm.logsf(-8)
    assert 0 < r.stderr[0] < 0.05 and abs(r.log_mass[0] - want) <= 5 * r.stderr[0], (r.log_mass, r.stderr)


def test_a_facet_listed_twice_gives_the_mode_not_a_singular_matrix_error():
    """Rows alike among the active ones made the batched solves of ``_hull_point`` and
    ``_kkt`` exactly singular, and LAPACK stopped the whole batch: an S = 4 model fitted
    for one EM iteration on 40 digits rows (hidden 4-4) ended ``partition`` and ``score`` in
    'internal error (LinAlgError: Singular matrix)'.  The box [1, 5]^4 with its facet
    u1 >= 1 listed twice, beside the same box listed once: both modes are (1, 1, 1, 1),
    the nearest point to 0 (closed form)."""
    from cpadgn.polytope import _hull_point, _mode_dual
    S = 4
    A = np.concatenate([-np.eye(S), np.eye(S)])                     # -u_i <= -1, u_i <= 5
    b = np.concatenate([-np.ones(S), 5 * np.ones(S)])
    A2, b2 = np.concatenate([A[:1], A]), np.concatenate([b[:1], b])    # u1 >= 1 twice
    pad = lambda a, n: np.concatenate([a, np.zeros((n - len(a),) + a.shape[1:])])
    As, bs = np.stack([pad(A, 9), A2]), np.stack([pad(b, 9), b2])
    mask = np.stack([np.arange(9) < 8, np.ones(9, bool)])
    u, _, exact = _mode_dual(As, bs, mask)
    np.testing.assert_allclose(u, np.ones((2, S)), atol=1e-12)
    assert exact.all()
    # the hull of the duplicated rows alone: dependent, so 0 (as documented), and the
    # other polytope of the batch still gets its point
    lam = np.stack([np.r_[np.ones(S), np.zeros(5)], np.r_[np.ones(2), np.zeros(7)]])
    rank = np.tile(np.arange(9), (2, 1))
    h = _hull_point(As * mask[..., None], np.where(mask, bs, 0.0), lam, rank)
    np.testing.assert_allclose(h, [np.ones(S), np.zeros(S)], atol=1e-12)


def test_the_s4_model_whose_regions_list_a_facet_twice_scores(tmp_path):
    """The model of the case above, as a user made it (``cpadgn fit`` of the first 40
    sample digits at S = 4, hidden 4-4, one EM iteration): partition and score exit 0 with
    finite log-likelihoods (they ended in exit 70, 'internal error (LinAlgError ...)')."""
    from click.testing import CliRunner

    from cli.main import main
    from pathlib import Path
    rows = Path(__file__).resolve().parents[1] / "sample_data" / "digits_train.csv"
    data = tmp_path / "rows.csv"
    data.write_text("".join(rows.read_text().splitlines(keepends=True)[:41]))
    run = lambda *a: CliRunner().invoke(main, [str(x) for x in a])
    r = run("fit", data, "-o", tmp_path / "s4.h5", "--latent-dim", "4", "--hidden", "4,4", "--max-iter", "1", "-q")
    assert r.exit_code == 0, r.output
    r = run("score", tmp_path / "s4.h5", data, "-o", tmp_path / "s.csv", "-q")
    assert r.exit_code == 0, r.output
    ll = np.genfromtxt(tmp_path / "s.csv", delimiter=",", names=True)["log_likelihood"]
    assert ll.shape == (40,) and np.isfinite(ll).all()
