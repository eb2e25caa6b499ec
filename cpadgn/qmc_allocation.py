"""How many randomised-QMC points each (row, region) pair gets at S >= 4.

A row's log p(x) = log sum_p kappa_p Phi_p has, by the delta method, the variance
sum_p r_p^2 s_p^2, with r_p the pair's responsibility and s_p the relative standard error
of its estimate of Phi_p.  Scrambled-Sobol estimates of these integrals converge like
s_p(n) = c_p / n (measured on the S = 4 16-16 benchmark's pairs from 32 to 32,768 points:
the relative SE falls 4x per 4x points), so the cheapest n_p meeting a row target T
minimises sum n_p subject to sum (r_p c_p / n_p)^2 <= T^2:
n_p = lambda (r_p c_p)^(2/3), lambda = sqrt(sum_p (r_p c_p)^(2/3)) / T.

The n points come in R independently scrambled sets (the standard error is their
spread).  A set of m points errs like 1/m, so the mean of R sets of n / R points errs
like sqrt(R) / n: c_p scales with sqrt(R / R_pilot).  (On the benchmark's heaviest
pairs at 4,096 points: 8 sets 1.42x and 4 sets 2.1x less error than 16.)  Fewer sets
cost degrees of freedom of the standard error, which ``qmc_sets`` keeps where one pair
carries much of its row's variance.
"""
from __future__ import annotations

import numpy as np


def pilot_responsibilities(rows: np.ndarray, log_w: np.ndarray, n_rows: int) -> np.ndarray:
    """The pairs' responsibilities within their rows (P,) from estimates log_w (P,) of
    log(kappa Phi); rows (P,) in 0..n_rows-1.  NaN where a row has no finite estimate."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        top = np.full(n_rows, -np.inf)
        np.maximum.at(top, rows, log_w)
        w = np.exp(log_w - np.where(np.isfinite(top), top, 0.0)[rows])
        return w / np.bincount(rows, weights=w, minlength=n_rows)[rows]


def _weighted_rel_se(rows: np.ndarray, log_w: np.ndarray, rel_se: np.ndarray, n_pilot, n_rows: int) -> np.ndarray:
    """r_p c_p (P,): the pairs' responsibilities within their rows (from the pilot
    estimates log_w) times their rate constants c_p = rel_se n_pilot (n_pilot: one number
    or (P,)); 0 where not finite."""
    with np.errstate(invalid="ignore", over="ignore"):
        a = pilot_responsibilities(rows, log_w, n_rows) * rel_se * n_pilot
    return np.where(np.isfinite(a), a, 0.0)


def qmc_allocation(rows: np.ndarray, log_w: np.ndarray, rel_se: np.ndarray, n_pilot, n_first: int,
                   target: float, n_rows: int, safety: float = 4.0, n_max: int = 2 ** 20,
                   n_randomisations=16, pilot_sets: int = 16) -> np.ndarray:
    """Second-stage points per pair (0: the pair keeps its first-stage estimate).

    rows (P,) the pairs' rows in 0..n_rows-1, log_w (P,) pilot estimates of log(kappa Phi),
    rel_se (P,) their relative standard errors at n_pilot points (one number or (P,)) in
    pilot_sets sets;
    n_first: the points of the first-stage estimate (as the pilot's sets) a pair keeps
    when it gets no more; n_randomisations: the second stage's sets, one number or (P,).
    Rows whose predicted standard error at n_first points is within target / safety get
    nothing; elsewhere the pairs whose allocation exceeds n_first get it, rounded up to
    their sets times a power of 2 (at most n_max), with the others' predicted variance
    taken off the budget.  Returns (P,) int.

    The safety factor covers the pilots' error in predicting c_p.  With 32-point pilots
    alone, on 40 rows of tests' random_net(4, (6, 6), 6) the achieved standard error
    exceeded the target in 20% of rows with safety 2 (up to 1.5x), 2.5% with 3 and none
    with 4.  Recalibrated with the second pilot (likelihood.QMC_SECOND_PILOT), at target
    1e-4, rows above the target (worst ratio) with safety 4 / 3 / 2: 200 rows of that
    net (noise 0.3, model.sample(40, seed) for seeds 4-8): 0 (0.76x) / 0 (0.78x) /
    0 (0.96x); the 120 rows of tests' _one_dominant_region(seed 0-119): 4 (1.52x) /
    9 (1.52x) / 30 (2.97x); the 1,497 rows of sample_data/digits_train.csv under an
    S = 4 8-8 generator of the digits (cpadgn fit sample_data/digits_train.csv --latent-dim 4
    --hidden 8,8 --max-iter 1): 11 (5.9x) / 24 (11.9x) / 52 (11.9x), 99th
    percentile of the ratio 0.92 / 1.33 / 1.57, for 77.7 / 62.1 / 46.0 s of CPU; the
    S = 4 16-16 benchmark's 20 score rows: max SE 2.5e-5 / 4.0e-5 / 5.1e-5 nats for
    31.9 / 28.9 / 25.9 s of CPU.  Safety 3 would double the rows above the target for
    10-20% less time, so 4 stays.  (A few rows stay above at any factor: spikes that
    both pilots miss.)
    """
    T2 = (target / safety) ** 2
    a = _weighted_rel_se(rows, log_w, rel_se, n_pilot, n_rows)                 # r_p c_p
    a2 = a * np.sqrt(np.asarray(n_randomisations) / pilot_sets)                # ... with the second stage's sets
    var_first = np.bincount(rows, weights=(a / n_first) ** 2, minlength=n_rows)
    need = var_first > T2
    out = np.zeros(rows.size)
    taken = need[rows] & (a > 0)
    for _ in range(4):          # the pairs left at n_first shrink the others' budget
        left = np.bincount(rows, weights=np.where(taken, 0.0, (a / n_first) ** 2), minlength=n_rows)
        budget = np.maximum(T2 - left, 0.25 * T2)
        a23 = np.where(taken, a2, 0.0) ** (2.0 / 3.0)
        lam = np.sqrt(np.bincount(rows, weights=a23, minlength=n_rows) / budget)
        out = np.where(taken, lam[rows] * a23, 0.0)
        more = taken & (out > n_first)
        if np.array_equal(more, taken):
            break
        taken = more
    m = np.ceil(np.maximum(out, 1.0) / n_randomisations)
    m = 2.0 ** np.ceil(np.log2(np.maximum(m, 2.0)))
    return np.where(out > n_first, np.minimum(m * n_randomisations, n_max), 0).astype(np.int64)


def qmc_sets(rows: np.ndarray, log_w: np.ndarray, rel_se: np.ndarray, n_pilot, n_first: int,
             target: float, n_rows: int, few: int = 4, many: int = 16, max_share: float = 1 / 16,
             **kw) -> np.ndarray:
    """The second stage's sets per pair (P,): ``few`` (fewer points for the same error),
    except ``many`` for the pairs that would carry more than max_share of their row's
    predicted variance with ``few`` (arguments as ``qmc_allocation``, kw passed on).
    A row's variance estimate then has about 3 / max_share = 48 degrees of freedom where
    pairs with few sets carry it (sum of shares^2 / 3 <= max_share / 3), and never fewer
    than a single 16-set pair's 15."""
    a = _weighted_rel_se(rows, log_w, rel_se, n_pilot, n_rows)
    n = qmc_allocation(rows, log_w, rel_se, n_pilot, n_first, target, n_rows, n_randomisations=few, **kw)
    var = np.where(n > 0, a * np.sqrt(few / kw.get("pilot_sets", 16)) / np.maximum(n, 1), a / n_first) ** 2
    total = np.bincount(rows, weights=var, minlength=n_rows)[rows]
    with np.errstate(invalid="ignore", divide="ignore"):
        heavy = var > max_share * total
    return np.where((n > 0) & heavy, many, few).astype(np.int64)
