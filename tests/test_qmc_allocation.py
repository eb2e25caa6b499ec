"""The S >= 4 second-stage point allocation (``qmc_allocation``): under its own rate model
(relative SE c_p / n) the predicted standard error of each row's log p meets the target,
rows already within it get nothing, and the counts are whole Sobol sets."""
import numpy as np

from cpadgn.qmc_allocation import qmc_allocation, qmc_sets


def test_allocation_meets_the_target_under_the_rate_model():
    rng = np.random.default_rng(0)
    n_rows, P, n_first, target, safety = 6, 3000, 32, 1e-4, 2.0
    rows = np.sort(rng.integers(0, n_rows, P))
    log_w = rng.normal(scale=6.0, size=P) - 3.0 * rows               # a few dominant pairs per row
    rel_se = rng.uniform(0.02, 0.5, P)
    rel_se[rows == 5] = 1e-9                                         # a row already within the target
    n = qmc_allocation(rows, log_w, rel_se, n_first, n_first, target, n_rows, safety=safety)
    w = np.exp(log_w - np.array([np.logaddexp.reduce(log_w[rows == i]) for i in range(n_rows)])[rows])
    c = rel_se * n_first
    pts = np.where(n > 0, n, n_first)
    var = np.bincount(rows, weights=(w * c / pts) ** 2, minlength=n_rows)
    assert np.all(np.sqrt(var) <= target / safety * (1 + 1e-12)), np.sqrt(var)
    assert np.all(n[rows == 5] == 0) and np.all(n[rows < 5].max() > n_first)
    m = n[n > 0] // 16
    assert np.all(n[n > 0] % 16 == 0) and np.all(m & (m - 1) == 0)  # 16 sets of 2^k points
    assert np.sum(n > 0) < P / 2                                      # points go where the variance is


def _rows_with_one_dominant_pair(seed=1):
    """Row 0: one pair with most of the weight and a large relative SE among 30 small
    precise ones; row 1: 300 alike pairs; row 2: 300 pairs of spread weights."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(3), [31, 300, 300])
    log_w = np.concatenate([np.r_[5.0, rng.normal(size=30) - 2.0], np.zeros(300), rng.normal(scale=4.0, size=300)])
    rel_se = np.concatenate([np.r_[0.5, rng.uniform(0.001, 0.01, 30)], np.full(300, 0.2),
                             rng.uniform(0.02, 0.5, 300)])
    return rows, log_w, rel_se


def test_sets_keep_the_row_variance_estimates_degrees_of_freedom():
    """With the sets ``qmc_sets`` picks and the allocation for them, under the rate model
    (a pair of R sets errs like c sqrt(R / 16) / n): each row's predicted SE meets the
    target, its variance estimate has at least 15 effective degrees of freedom
    (Welch-Satterthwaite: (sum v)^2 / sum v^2 / (R - 1); first-stage pairs: 16 sets),
    the dominant pair keeps 16 sets, the alike pairs get 4, a pair with 4 sets carries at
    most 1/16 of its row's variance, and the counts are whole sets of a power of 2 (at
    least 2) points."""
    rows, log_w, rel_se = _rows_with_one_dominant_pair()
    n_first, target, safety = 32, 1e-4, 4.0
    sets = qmc_sets(rows, log_w, rel_se, n_first, n_first, target, 3)
    n = qmc_allocation(rows, log_w, rel_se, n_first, n_first, target, 3, n_randomisations=sets)
    w = np.exp(log_w - np.array([np.logaddexp.reduce(log_w[rows == i]) for i in range(3)])[rows])
    c = rel_se * n_first
    v = np.where(n > 0, w * c * np.sqrt(sets / 16) / np.maximum(n, 1), w * c / n_first) ** 2
    dof = np.where(n > 0, sets - 1, 15)
    for i in range(3):
        s = rows == i
        assert np.sqrt(v[s].sum()) <= target / safety * (1 + 1e-12)
        assert v[s].sum() ** 2 / np.sum(v[s] ** 2 / dof[s]) >= 15.0, i
    share = v / np.bincount(rows, weights=v)[rows]
    assert np.all(share[(n > 0) & (sets == 4)] <= 1 / 16) and np.any((n > 0) & (sets == 16) & (rows == 2))
    assert sets[0] == 16 and n[0] > 0
    assert np.all(sets[rows == 1] == 4) and np.all(n[rows == 1] > 0)
    # 300 alike pairs share the budget equally: n = sqrt(300) r c sqrt(4 / 16) / (T / safety),
    # r = 1/300, rounded up to 4 sets of a power of 2
    n_alike = np.sqrt(300) * (0.2 * n_first / 300) * 0.5 / (target / safety)
    assert np.all(n[rows == 1] == 4 * 2 ** np.ceil(np.log2(n_alike / 4)))
    m = n[n > 0] // sets[n > 0]
    assert np.all(n[n > 0] % sets[n > 0] == 0) and np.all(m >= 2) and np.all(m & (m - 1) == 0)


def test_pilots_of_different_sizes_enter_through_their_rate_constants():
    """A pair piloted with more points (the second pilot, ``likelihood.QMC_SECOND_PILOT``)
    enters the allocation through c_p = rel_se n_pilot alone: the same c from a 1,024-point
    pilot (relative SE c / 1024) and from a 32-point one (c / 32) give the same points,
    and a larger c (a pilot that saw more of the integrand) gives the pair more."""
    rows, log_w, rel_se = _rows_with_one_dominant_pair()
    args = (32, 1e-4, 3)
    n_pilot = np.where(np.arange(rows.size) % 3 == 0, 1024, 32)
    same = qmc_allocation(rows, log_w, rel_se * 32 / n_pilot, n_pilot, *args)
    np.testing.assert_array_equal(same, qmc_allocation(rows, log_w, rel_se, 32, *args))
    k = np.flatnonzero((same > 0) & (same < 2 ** 16))[0]             # below n_max with room to grow
    more = qmc_allocation(rows, log_w, np.where(np.arange(rows.size) == k, 4.0, 1.0) * rel_se * 32 / n_pilot,
                          n_pilot, *args)
    assert more[k] > same[k]
