"""The S >= 4 second-stage point allocation (``qmc_allocation``): under its own rate model
(relative SE c_p / n) the predicted standard error of each row's log p meets the target,
rows already within it get nothing, and the counts are whole Sobol sets."""
import numpy as np

from cpadgn.qmc_allocation import qmc_allocation


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
