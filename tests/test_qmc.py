"""The S >= 4 Gaussian mass of a polytope (randomised QMC, ``polytope._qmc``): unbiased,
with a standard error that covers the truth.

Oracles: plain Monte Carlo with independent prior samples located in the partition
(binomial standard error), and closed forms (products of 1-D tails in a rotated frame).
"""
import numpy as np
import pytest
from scipy.special import log_ndtr

from cpadgn.partition import compute_partition
from cpadgn.polytope import polytope_log_mass

from oracles import random_net

N_MC = 2_000_000          # prior samples of the Monte Carlo oracle
MIN_EXPECTED = 100        # regions compared: expected count >= this (binomial ~ normal)


@pytest.fixture(scope="module")
def partition_and_counts():
    """A real S = 4 partition (its prior masses as compute_partition gives them) and the
    counts of N_MC independent N(0, I) samples located in it."""
    net = random_net(4, (8, 8), 2, seed=3)
    part = compute_partition(net)
    rng = np.random.default_rng(12345)
    counts = np.zeros(part.n_regions)
    located = 0
    for _ in range(N_MC // 500_000):
        r = part.locate(net, rng.standard_normal((500_000, 4)))
        located += int((r >= 0).sum())
        counts += np.bincount(r[r >= 0], minlength=part.n_regions)
    return part, counts, located


def test_region_masses_within_three_standard_errors(partition_and_counts):
    """|estimate - Monte Carlo| <= 3 combined SE in >= 99% of the regions (the binomial SE
    is taken at the estimate, the null hypothesis, so that small counts do not skew z)."""
    part, counts, located = partition_and_counts
    assert located == N_MC                                   # the regions tile R^4
    mass = np.exp(part.log_prior_mass)
    se = mass * part.log_prior_mass_stderr                   # delta method: SE of the mass
    assert np.all(np.isfinite(part.log_prior_mass)) and np.all(part.log_prior_mass_stderr >= 0)
    big = mass * N_MC >= MIN_EXPECTED
    assert big.sum() >= 200
    p = counts[big] / N_MC
    m = mass[big]
    z = (m - p) / np.sqrt(m * (1 - m) / N_MC + se[big] ** 2)
    frac = np.mean(np.abs(z) <= 3)
    print(f"{big.sum()} regions, |z| <= 3 in {frac:.4f}, mean z {z.mean():.3f}, mean z^2 {np.mean(z * z):.3f}")
    assert frac >= 0.99, (frac, big.sum(), np.sort(np.abs(z))[-10:])


def test_prior_mass_sum_within_four_standard_errors(partition_and_counts):
    """The masses are independent unbiased estimates: their sum is 1 within 4 SE."""
    part, _, _ = partition_and_counts
    mass = np.exp(part.log_prior_mass)
    se_sum = np.sqrt(np.sum((mass * part.log_prior_mass_stderr) ** 2))
    print(f"{part.n_regions} regions, sum {mass.sum():.6f}, SE {se_sum:.2e}, z {(mass.sum() - 1) / se_sum:.2f}")
    assert 0 < se_sum < 0.01
    assert abs(mass.sum() - 1.0) <= 4 * se_sum, (mass.sum(), se_sum)


def _rotated_orthant(S, bounds, seed):
    """{u : s_i (q_i . u) >= t_i} for an orthonormal Q (random rotation): rows A (1, k, S),
    offsets b (1, k) and the closed form log mass sum_i log Phi(-t_i)."""
    Q = np.linalg.qr(np.random.default_rng(seed).normal(size=(S, S)))[0]
    A = np.array([-Q[i] for i, _ in enumerate(bounds)])
    b = np.array([-t for t in bounds])
    return A[None], b[None], float(sum(log_ndtr(-t) for t in bounds))


@pytest.mark.parametrize("S, bounds", [(4, [20.0]), (4, [20.0, 1.0, -0.5]), (5, [35.0, 0.3]),
                                       (4, [-1.0, -0.5, 0.0, 0.7])])
def test_far_and_near_orthants_closed_form(S, bounds):
    """Log masses down to about -600 (u_1 >= 35): finite, within 4 SE of the closed form,
    with a useful SE (0 for a half-space, which the first level integrates exactly: then
    within rounding, 1e-12 relative to the log_ndtr terms)."""
    A, b, want = _rotated_orthant(S, bounds, seed=len(bounds) + S)
    lm, se = polytope_log_mass(A, b, n_qmc=2 ** 12)
    assert np.isfinite(lm[0]) and 0 <= se[0] < 0.05
    assert abs(lm[0] - want) <= 4 * se[0] + 1e-12 * (1 + abs(want)), (lm[0], want, se[0])


def test_rotated_copies_independent_and_unbiased():
    """64 rotations of one polytope (same mass, same geometry in its own frame): if the
    polytopes shared their random points the estimates would nearly coincide; independent,
    they scatter as their standard errors say (variance ratio within the chi-square(63)
    range at 1e-6 either side), and their mean is within 4 combined SE of plain Monte
    Carlo with 2e6 samples (a test of the bias at about the 0.5% level)."""
    from scipy.stats import chi2
    S, n, n_mc = 4, 64, 2_000_000
    rng = np.random.default_rng(7)
    a = rng.normal(size=(7, S))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    c = rng.uniform(0.2, 1.2, size=7)                          # a polygon-like cell around 0
    z = rng.standard_normal((n_mc, S))
    p = np.mean(np.all(z @ a.T <= c, axis=1))
    Q = np.linalg.qr(rng.normal(size=(n, S, S)))[0]
    A = np.einsum("fs,nts->nft", a, Q)                          # rows of Q^T P (u -> Q u)
    lm, se = polytope_log_mass(A, np.broadcast_to(c, (n, 7)), n_qmc=256)
    mass, se_mass = np.exp(lm), np.exp(lm) * se
    ratio = mass.var(ddof=1) / np.mean(se_mass ** 2)
    lo, hi = chi2.ppf([1e-6, 1 - 1e-6], n - 1) / (n - 1)
    assert lo <= ratio <= hi, (ratio, lo, hi)
    err = np.sqrt(np.mean(se_mass ** 2) / n + p * (1 - p) / n_mc)
    assert abs(mass.mean() - p) <= 4 * err, (mass.mean(), p, err)


def test_same_polytope_same_estimate_in_any_batch():
    """The randomisation belongs to the polytope (its key), not to its place in a batch;
    distinct polytopes get independent randomisations (different errors)."""
    rng = np.random.default_rng(0)
    A = rng.normal(size=(6, 7, 4))
    b = rng.uniform(0.2, 1.5, size=(6, 7))
    lm_all, se_all = polytope_log_mass(A, b, n_qmc=256)
    lm_one, se_one = polytope_log_mass(A[3:4], b[3:4], n_qmc=256)
    assert lm_one[0] == lm_all[3] and se_one[0] == se_all[3]
    # a row scaled by 2 is the same polytope: the same key after normalisation
    A2, b2 = A.copy(), b.copy()
    A2[1, 2] *= 2
    b2[1, 2] *= 2
    assert abs(polytope_log_mass(A2[1:2], b2[1:2], n_qmc=256)[0][0] - lm_all[1]) <= 1e-12


def test_kept_geometry_gives_the_same_estimates():
    """The likelihood's second stage reuses the first stage's QMC geometry
    (``polytope.QMCGeometry``): kept from two batches of different row counts (levels
    padded to different widths), joined, taken in another order, with some polytopes
    not kept (found anew) and under a memory budget that splits the batch and the
    points, it gives bit for bit the estimates, moments and their covariances of a call
    that finds it all anew."""
    from cpadgn.polytope import QMCGeometry, polytope_qmc_draws
    rng = np.random.default_rng(5)
    B, F, S = 40, 10, 4
    A = rng.normal(size=(B, F, S))
    b = rng.uniform(-0.5, 1.5, size=(B, F))            # some hold 0, some get a tilt, some are empty
    mask = np.arange(F) < rng.integers(5, F + 1, size=B)[:, None]
    mask[7] = False                                     # no rows: all of R^4
    halves = [np.arange(0, B, 2), np.arange(1, B, 2)]
    kept = [polytope_qmc_draws(A[h], b[h], mask[h], [(32, 0, True)], with_geometry=True)[1] for h in halves]
    assert kept[0].levels[1][1].shape[1] != kept[1].levels[1][1].shape[1]
    geo = QMCGeometry.concat(kept)[np.argsort(np.concatenate(halves))]
    pick = rng.permutation(B)[:30]
    given = QMCGeometry.concat([QMCGeometry.unknown(5, S), geo[pick[5:]]])
    for budget in (None, 2e5):
        fresh, again = (polytope_qmc_draws(A[pick], b[pick], mask[pick], [(256, 2, True)], budget,
                                           n_randomisations=4, geometry=g)[0] for g in (None, given))
        for name in ("log_mass", "mean", "cov", "stderr", "mean_cov", "mass_mean_cov"):
            assert np.array_equal(getattr(fresh, name), getattr(again, name)), (budget, name)
        assert np.isfinite(fresh.log_mass).sum() >= 20 and (fresh.stderr > 0).sum() >= 20   # not all empty


def _feasible_point_near(a, c, u):
    """A point of {x : a x <= c} on the segment from u toward the polytope's Chebyshev
    centre (scipy linprog), as near u as the rows allow: |it| bounds the distance to 0
    from above whatever u's rounding."""
    from scipy.optimize import linprog
    S = a.shape[1]
    res = linprog(np.r_[np.zeros(S), -1.0], A_ub=np.c_[a, np.ones(len(c))], b_ub=c,
                  bounds=[(None, None)] * S + [(0, 1)])
    x = res.x[:S]
    assert res.status == 0 and res.x[S] > 0                 # full-dimensional
    over = a @ u - c
    if np.all(over <= 0):
        return u
    gap = c - a @ x                                          # > 0 at the centre
    t = np.max(np.where(over > 0, over / (over + gap), 0.0))  # a (u + t (x - u)) <= c
    return u + min(1.0, t * (1 + 1e-12) + 1e-15) * (x - u)


def _translated_regions(part, n, rng):
    """n random regions of the S = 4 fixture's partition (net random_net(4, (8, 8), 2,
    seed=3)), unit rows, translated by v at scales 0.3, 3 and 30 (a third each):
    A (n, F, 4), b (n, F), mask (n, F), v (n, 4)."""
    from cpadgn.polytope import _normalise
    idx = rng.choice(part.n_regions, n, replace=False)
    A, c, m, _ = _normalise(*part.facets(random_net(4, (8, 8), 2, seed=3), idx))
    v = rng.normal(size=(n, 4)) * np.repeat([0.3, 3.0, 30.0], n // 3)[:, None]
    return A, c - np.einsum("pfs,ps->pf", A, v), m, v


def test_distance_lower_bound_is_certified_and_sharp(partition_and_counts):
    """polytope.distance_lower_bound (the S >= 4 likelihood's nearest-point bound) on
    translates of real S = 4 regions, near and far: never above the length of a feasible
    point (found from NNLS least-distance programming, Lawson and Hanson, moved into the
    polytope), and within a relative 1e-6 of the NNLS distance (the bound is the
    distance, not just below it).  0 exactly where 0 is in the polytope."""
    from cpadgn.polytope import distance_lower_bound, least_distance_point
    A, b, m, v = _translated_regions(partition_and_counts[0], 120, np.random.default_rng(1))
    lb = distance_lower_bound(A, b, m)
    outside = ~np.all(~m | (b >= 0), axis=1)
    assert outside.sum() >= 100 and (~outside).sum() >= 1
    for i in range(len(v)):
        a_i, b_i = A[i][m[i]], b[i][m[i]]
        if np.all(b_i >= 0):
            assert lb[i] == 0.0
            continue
        u, _ = least_distance_point(a_i, b_i)
        assert lb[i] <= np.linalg.norm(_feasible_point_near(a_i, b_i, u)), i
        assert lb[i] >= np.linalg.norm(u) * (1 - 1e-6), (i, lb[i], np.linalg.norm(u))


def test_dual_ascent_distance_bound_is_certified(partition_and_counts):
    """polytope.dual_ascent_distance_bound (the S >= 4 likelihood's first, cheap
    nearest-point bound) on translates of real S = 4 regions, near and far, after 1 to
    200 sweeps: never above the length of a feasible point (found from NNLS
    least-distance programming, Lawson and Hanson, moved into the polytope), 0 where 0
    is in the polytope, and positive for most polytopes that exclude 0 (it bounds
    something); never below after more sweeps on the whole (the ascent improves)."""
    from cpadgn.polytope import dual_ascent_distance_bound, least_distance_point
    A, b, m, v = _translated_regions(partition_and_counts[0], 120, np.random.default_rng(3))
    outside = ~np.all(~m | (b >= 0), axis=1)
    feasible = np.full(len(v), np.inf)
    for i in np.flatnonzero(outside):
        a_i, b_i = A[i][m[i]], b[i][m[i]]
        feasible[i] = np.linalg.norm(_feasible_point_near(a_i, b_i, least_distance_point(a_i, b_i)[0]))
    means = []
    for sweeps in (1, 4, 16, 200):
        lb = dual_ascent_distance_bound(A, b, m, sweeps=sweeps)
        assert np.all(lb[~outside] == 0.0)
        assert np.all(lb[outside] <= feasible[outside]), sweeps
        assert (lb[outside] > 0).mean() >= 0.9, sweeps
        means.append((lb[outside] / feasible[outside]).mean())
    assert means[-1] >= means[0]


def test_dual_ascent_distance_bound_closed_forms():
    """Orthogonal rows (where one sweep of the ascent is exact): a half-space at offset 2
    and a 2-D orthant whose corner is at distance 5, within the 1e-9 relative rounding
    allowance; a polytope holding 0 gets 0."""
    from cpadgn.polytope import dual_ascent_distance_bound
    A = np.array([[[0.6, 0.8, 0, 0], [0, 0, 0, 0]], [[-1.0, 0, 0, 0], [0, -1.0, 0, 0]],
                  [[1.0, 0, 0, 0], [0, 1.0, 0, 0]]])
    b = np.array([[-2.0, 0.0], [-3.0, -4.0], [1.0, 2.0]])
    mask = np.array([[True, False], [True, True], [True, True]])
    np.testing.assert_allclose(dual_ascent_distance_bound(A, b, mask, sweeps=1), [2.0, 5.0, 0.0], rtol=2e-9)


def test_known_modes_are_checked_before_use(partition_and_counts):
    """polytope._known_modes (the integral reusing the nearest-point bound's modes) on
    translates of real S = 4 regions: the modes that distance_lower_bound certifies are
    the NNLS least-distance points (Lawson and Hanson) within a relative 1e-6, and
    _known_modes returns the NNLS point whether it is given that mode, a wrong point
    (the mode pushed outward, the origin) or none (NaN): a wrong mode is never trusted."""
    from cpadgn.polytope import _known_modes, distance_lower_bound, least_distance_point
    rng = np.random.default_rng(2)
    A, b, m, v = _translated_regions(partition_and_counts[0], 60, rng)
    _, mode = distance_lower_bound(A, b, m, with_mode=True)
    truth = np.zeros_like(v)
    for i in range(len(v)):
        if not np.all(b[i][m[i]] >= 0):
            truth[i] = least_distance_point(A[i][m[i]], b[i][m[i]])[0]
    scale = 1.0 + np.linalg.norm(truth, axis=1, keepdims=True)
    certified = np.isfinite(mode).all(1)
    assert certified.sum() >= 50
    assert np.all(np.abs(mode[certified] - truth[certified]) <= 1e-6 * scale[certified])
    wrong = np.where(rng.random((len(v), 1)) < 0.5, 1.5 * truth + 0.1, 0.0)
    wrong[:5] = np.nan
    for given in (np.where(certified[:, None], mode, np.nan), wrong):
        mu, _, exact = _known_modes(A, b, m, given)
        ok = exact
        assert ok.sum() >= 50
        assert np.all(np.abs(mu[ok] - truth[ok]) <= 1e-6 * scale[ok])


def test_distance_lower_bound_closed_forms():
    """Fewer rows than dimensions: a half-space at offset 2 and a 2-D orthant whose corner
    is at distance 5 (within the 1e-9 relative rounding allowance)."""
    from cpadgn.polytope import distance_lower_bound
    A = np.array([[[0.6, 0.8, 0, 0], [0, 0, 0, 0]], [[-1.0, 0, 0, 0], [0, -1.0, 0, 0]]])
    b = np.array([[-2.0, 0.0], [-3.0, -4.0]])
    mask = np.array([[True, False], [True, True]])
    np.testing.assert_allclose(distance_lower_bound(A, b, mask), [2.0, 5.0], rtol=2e-9)


def test_spd_solve_against_lapack():
    """polytope._spd_solve (distance_lower_bound's multipliers) against LAPACK's solve on
    random SPD 4 x 4 systems with condition numbers 1 to 1e6: within 20 k cond eps
    relative (the backward-stable bound of both solvers, summed); systems with a zero or
    1e-12 pivot (dependent rows) are flagged not ok, the others ok."""
    from scipy.stats import special_ortho_group
    from cpadgn.polytope import _spd_solve
    rng = np.random.default_rng(5)
    k, n = 4, 400
    Q = special_ortho_group.rvs(k, size=n, random_state=6)
    cond = 10.0 ** rng.uniform(0, 6, n)
    eig = np.exp(rng.uniform(0, 1, (n, k)) * np.log(cond)[:, None])
    eig[:, 0], eig[:, 1] = 1.0, cond
    G = Q @ (eig[:, :, None] * np.swapaxes(Q, 1, 2))
    G = 0.5 * (G + np.swapaxes(G, 1, 2))
    r = rng.normal(size=(n, k))
    x, ok = _spd_solve(G, r)
    ref = np.linalg.solve(G, r[..., None])[..., 0]
    assert ok.all()
    err = np.linalg.norm(x - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert np.all(err <= 20 * k * cond * np.finfo(float).eps), err.max()
    V = rng.normal(size=(2, 3, k))
    singular = np.concatenate([V @ np.swapaxes(V, 1, 2), np.zeros((2, 1, 3))], 1)
    singular = np.concatenate([singular, np.zeros((2, 4, 1))], 2)
    singular[1, 3, 3] = 1e-12 * singular[1].max()
    assert not _spd_solve(singular, np.ones((2, k)))[1].any()


def test_draws_beyond_the_memory_budget_go_in_blocks_of_points():
    """n_qmc = 2^14 under a budget that holds a few hundred points at once: the points go
    through in blocks (``polytope._SetSums``), the same estimate as in one pass up to the
    summation order (positive weights: each sum of the 1,024 points of a set to a
    relative 1,024 eps; the means' sums to that times max |z|, a few units here), and
    within 4 SE of the closed form (a rotated orthant)."""
    from cpadgn.polytope import polytope_moments
    A, b, want = _rotated_orthant(4, [-1.0, -0.5, 0.0, 0.7], seed=11)
    blocks = polytope_moments(A, b, n_qmc=2 ** 14, memory_budget=1e5)
    whole = polytope_moments(A, b, n_qmc=2 ** 14)
    tol = 4 * 2 ** 10 * np.finfo(float).eps
    assert abs(blocks.log_mass[0] - whole.log_mass[0]) <= tol
    assert abs(blocks.stderr[0] - whole.stderr[0]) <= tol * whole.stderr[0] * 2 ** 4     # 16 sets' spread
    scale = 10.0 + np.abs(whole.mean).max()
    assert np.allclose(blocks.mean, whole.mean, rtol=0, atol=tol * scale)
    assert np.allclose(blocks.cov, whole.cov, rtol=0, atol=tol * scale ** 2)
    assert abs(blocks.log_mass[0] - want) <= 4 * blocks.stderr[0]


def _tn_oracle(lo, hi, u):
    """50-digit x = Phi^-1(Phi(lo) + u (Phi(hi) - Phi(lo))) (drawn from 1 - u in the
    mirrored upper tail, lo > 0, as the sampler does) and log(Phi(hi) - Phi(lo))."""
    import mpmath
    mpmath.mp.dps = 50
    Phi = lambda t: mpmath.ncdf(mpmath.mpf(t))
    flip = lo > 0
    a, c, w = (-hi, -lo, 1 - mpmath.mpf(u)) if flip else (lo, hi, mpmath.mpf(u))
    pa, pc = Phi(a), Phi(c)
    p = pa + w * (pc - pa)
    x_lo, x_hi = mpmath.mpf(max(a, -60.0)), mpmath.mpf(min(c, 60.0))
    for _ in range(120):                       # bisection on Phi(x) = p: 2^-120 of 120
        mid = (x_lo + x_hi) / 2
        x_lo, x_hi = (mid, x_hi) if Phi(mid) < p else (x_lo, mid)
    x = (x_lo + x_hi) / 2
    return float(-x if flip else x), float(mpmath.log(pc - pa))


@pytest.mark.parametrize("which", ["all", "none reflected", "none above the median"])
def test_truncated_normal_draws_against_50_digit_arithmetic(which):
    """``_tn_draw`` (a draw by probabilities where that is exact, log space elsewhere)
    against mpmath on intervals that take both paths: wide, half-infinite, both tails
    (lo > 0 mirrored), deep (beyond -30: log space), narrow (width 1e-9: log space) and
    narrow-but-direct ones, with uniforms near 0, 1/2 and 1 (2^-33 from the ends, as on
    the sampler's grid).  The direct path's mass is Phi(hi) - Phi(lo) to ~4 eps Phi(hi),
    kept at >= 2^-10 Phi(hi): a relative 1e-12, hence 5e-12 on the log mass; x moves by
    that times p / phi(x) <= 1.3 (the tail ratio), so 1e-10 (1 + |x|) on the draw.
    Broadcasting as the first variable uses it: intervals (k, 1) against points (k, M).
    The subsets take the shortcuts of batches where no interval is reflected and where
    no draw lies above the median."""
    from cpadgn.polytope import _tn_draw
    inf = np.inf
    intervals = [(-inf, inf), (-inf, -2.0), (0.5, inf), (-1.0, 3.0), (-0.2, 0.3), (4.0, 9.0), (-9.0, -4.0),
                 (-45.0, -40.0), (38.0, 39.0), (-inf, -31.0), (1.0, 1.0 + 1e-9), (-3.0, -3.0 + 1e-9),
                 (-5.0, -4.99), (0.0, 0.001), (-12.0, -11.99), (-1.0, inf), (-0.3, 8.0)]
    if which != "all":
        intervals = [(a, b) for a, b in intervals if a <= 0 and (which == "none reflected" or b <= 0)]
    us = np.array([2.0 ** -33, 0.1, 0.5, 0.9, 1 - 2.0 ** -33])
    lo = np.array([[a] for a, _ in intervals])
    hi = np.array([[b] for _, b in intervals])
    x, lm = _tn_draw(lo, hi, np.broadcast_to(us, (len(intervals), us.size)))
    assert x.shape == (len(intervals), us.size)
    for i, (a, b) in enumerate(intervals):
        for k, u in enumerate(us):
            want_x, want_lm = _tn_oracle(a, b, u)
            assert abs(np.broadcast_to(lm, x.shape)[i, k] - want_lm) <= 5e-12 * (1 + abs(want_lm)), (a, b, u)
            assert abs(x[i, k] - want_x) <= 1e-10 * (1 + abs(want_x)), (a, b, u, x[i, k], want_x)
            assert a <= x[i, k] <= b


def test_four_set_estimates_scatter_as_their_standard_errors_say():
    """The likelihood's second stage takes 4 sets (``qmc_allocation.qmc_sets``): 256
    rotated copies of one cell, 1,024 points in 4 sets each, scatter as their standard
    errors say (variance ratio within the F(255, 768) range at 1e-6 either side: each SE^2
    has 3 degrees of freedom) and their mean is within 4 combined SE of plain Monte
    Carlo with 2e6 samples.  Also the reason for 4 sets: at the same points they err
    less than 16 sets (their variance ratio is beyond the F(255, 255) range at 1e-6, 1.8;
    it is ~3-4: a set of 4x the points errs ~4x less, the mean of 4x fewer sets 2x more)."""
    from scipy.stats import f
    from cpadgn.polytope import polytope_qmc_draws
    S, n, n_mc, n_pts = 4, 256, 2_000_000, 1024
    rng = np.random.default_rng(11)
    a = rng.normal(size=(7, S))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    c = rng.uniform(0.2, 1.2, size=7)
    p = np.mean(np.all(rng.standard_normal((n_mc, S)) @ a.T <= c, axis=1))
    Q = np.linalg.qr(rng.normal(size=(n, S, S)))[0]
    A, b = np.einsum("fs,nts->nft", a, Q), np.broadcast_to(c, (n, 7))
    spread = {}
    for sets in (4, 16):
        res = polytope_qmc_draws(A, b, None, [(n_pts, 0, False)], n_randomisations=sets)[0]
        mass, se_mass = np.exp(res.log_mass), np.exp(res.log_mass) * res.stderr
        spread[sets] = mass.var(ddof=1)
        if sets == 4:
            ratio = spread[4] / np.mean(se_mass ** 2)
            assert f.ppf(1e-6, n - 1, 3 * n) <= ratio <= f.ppf(1 - 1e-6, n - 1, 3 * n), ratio
            err = np.sqrt(np.mean(se_mass ** 2) / n + p * (1 - p) / n_mc)
            assert abs(mass.mean() - p) <= 4 * err, (mass.mean(), p, err)
    assert spread[16] / spread[4] > f.ppf(1 - 1e-6, n - 1, n - 1), spread


def test_halfspace_monte_carlo_unbiased_with_its_certified_variance():
    """``halfspace_mc`` (the likelihood's cheap estimate for pairs that matter little) on
    400 random rotations of the orthant {q_i . u >= t_i} (closed forms: mass
    prod Phi(-t_i), mode sum max(t_i, 0) q_i, mean phi(t_i) / Phi(-t_i) along q_i), 128
    points each: the estimates' mean is within 4 SE of the mass; their variance is the
    binomial M Phi (1 - Phi / M) / n (M = Phi(-|mode|); points independent) within the
    chi-square(399) range at 1e-6 either side, so below the certified M Phi / n; and the
    mean of the points in P, rotated back, is within 4 SE of the closed form.  In slices
    under a memory budget: the same numbers; without moments, the same mass and SE."""
    from scipy.stats import chi2, norm
    from cpadgn.polytope import halfspace_mc
    S, copies, n = 4, 400, 128
    t = np.array([1.5, 0.4, -0.3])
    rng = np.random.default_rng(5)
    Q = np.linalg.qr(rng.normal(size=(copies, S, S)))[0]            # rows q_i: Q[:, i]
    A, b = -Q[:, :3], np.broadcast_to(-t, (copies, 3))
    mode = np.einsum("i,cis->cs", np.maximum(t, 0), Q[:, :3])
    res = halfspace_mc(A, b, np.ones((copies, 3), bool), mode, n, seed=0)
    phi_true = np.exp(np.sum(norm.logsf(t)))
    M = norm.sf(np.linalg.norm(np.maximum(t, 0)))
    est = np.exp(res.log_mass)
    var = M * phi_true * (1 - phi_true / M) / n
    assert abs(est.mean() - phi_true) <= 4 * np.sqrt(var / copies), (est.mean(), phi_true)
    ratio = est.var(ddof=1) / var
    lo, hi = chi2.ppf([1e-6, 1 - 1e-6], copies - 1) / (copies - 1)
    assert lo <= ratio <= hi, (ratio, lo, hi)
    want = np.r_[norm.pdf(t) / norm.sf(t), 0.0]                      # in the frame of the q_i
    seen = np.isfinite(res.log_mass)
    got = np.einsum("cis,cs->ci", Q, res.mean)[seen]
    se = got.std(0, ddof=1) / np.sqrt(seen.sum())
    assert np.all(np.abs(got.mean(0) - want) <= 4 * se + 1e-12), (got.mean(0), want, se)
    # a memory budget for 7 polytopes at a time: slices, each polytope with the same points
    sliced = halfspace_mc(A, b, np.ones((copies, 3), bool), mode, n, seed=0,
                          memory_budget=7 * 8.0 * n * (3 + 4 * S + 2))
    assert np.array_equal(sliced.log_mass, res.log_mass) and np.array_equal(sliced.mean, res.mean)
    mass_only = halfspace_mc(A, b, np.ones((copies, 3), bool), mode, n, seed=0, moments=False)
    assert np.array_equal(mass_only.log_mass, res.log_mass) and np.array_equal(mass_only.stderr, res.stderr)


@pytest.mark.parametrize("shift, n_qmc, budget", [(0.0, 256, None), (1.5, 256, None), (0.0, 2 ** 13, 1e5)])
def test_mean_and_mass_errors_covary_as_reported(shift, n_qmc, budget):
    """The randomisation covariance of (log mass, mean) that QMC reports (stderr^2,
    mass_mean_cov, mean_cov: the delta method over its independent sets, also when the
    points go in blocks under a small memory budget) against the scatter of
    256 independent estimates: rotated copies of one cell (near, and far at log mass
    ~ -850), each estimate rotated back.  For the mass alone, each mean coordinate, and
    the mass plus or minus each coordinate (both scaled to unit reported variance, where a
    wrong mass-mean covariance shows), the empirical variance over the copies and the
    mean reported one agree within 4 standard deviations of their ratio: a variance from
    n replicates of kurtosis k has relative sd sqrt((k - 1) / (n - 1)) (k measured), the
    mean of n reported ones, each from 16 sets, about sqrt(2 / (15 n))."""
    from cpadgn.polytope import polytope_moments
    S, n = 4, 256
    rng = np.random.default_rng(11)
    a = rng.normal(size=(7, S))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    c = rng.uniform(0.2, 1.2, size=7) - shift
    Q = np.linalg.qr(rng.normal(size=(n, S, S)))[0]
    A, b = np.einsum("fs,nts->nft", a, Q), np.broadcast_to(c, (n, 7))   # {u : Q^T u in P}
    res = polytope_moments(A, b, n_qmc=n_qmc, memory_budget=budget)
    assert np.all(np.isfinite(res.log_mass)) and res.mean_cov is not None
    Qt = np.swapaxes(Q, 1, 2)
    Y = np.c_[res.log_mass, np.einsum("nts,ns->nt", Qt, res.mean)]        # (n, 1 + S), in P's frame
    cov = np.zeros((n, S + 1, S + 1))
    cov[:, 0, 0] = res.stderr ** 2
    cov[:, 0, 1:] = cov[:, 1:, 0] = np.einsum("nts,ns->nt", Qt, res.mass_mean_cov)
    cov[:, 1:, 1:] = Qt @ res.mean_cov @ Q
    reported = cov.mean(0)
    scale = 1.0 / np.sqrt(np.diag(reported))
    directions = [np.eye(S + 1)[i] for i in range(S + 1)]
    directions += [np.eye(S + 1)[0] + sign * np.eye(S + 1)[i] for i in range(1, S + 1) for sign in (1, -1)]
    for d in directions:
        d = d * scale
        y = Y @ d - (Y @ d).mean()
        kurtosis = np.mean(y ** 4) / np.mean(y ** 2) ** 2
        ratio = y.var(ddof=1) / (d @ reported @ d)
        band = 4 * np.sqrt((kurtosis - 1) / (n - 1) + 2 / (15 * n))
        assert abs(ratio - 1) <= band, (d, ratio, band)


def test_splitmix64_against_python_integers():
    """``_splitmix64`` (scalars) and ``_splitmix64_inplace`` (arrays, written over) against
    the splitmix64 finaliser in Python's exact integers modulo 2^64, on the ends of the
    range and random words."""
    from cpadgn.polytope import _splitmix64, _splitmix64_inplace
    M = 2 ** 64 - 1

    def oracle(x):
        z = (x + 0x9E3779B97F4A7C15) & M
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)
    words = [0, 1, 2, 2 ** 63, M] + [int(w) for w in np.random.default_rng(4).integers(0, 2 ** 63, 50)]
    x = np.array(words, dtype=np.uint64).reshape(5, 11)
    want = [oracle(w) for w in words]
    assert [int(v) for v in _splitmix64(x).ravel()] == want
    out = _splitmix64_inplace(x)
    assert out is x and [int(v) for v in x.ravel()] == want
    assert [int(_splitmix64(np.uint64(w))) for w in words] == want
