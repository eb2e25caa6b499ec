"""The float64 range cpadgn computes likelihoods in, and the checks that keep inputs inside it.

log p(x) adds terms of size r^2 = sum_d ((x_d - b_d) / sigma_d)^2 that cancel (see
``likelihood``), next to the region constants |b_w / sigma|^2 and the inverse variances
1 / sigma^2.  Noise stds in NOISE_RANGE keep sigma^2 and 1 / sigma^2 within 1e+-200, and
rows with r^2 <= MAX_WHITENED_SQ keep every term below ~1e300 (products with the region
constants add up to ~1e100): inside these limits the answer is finite; outside them
log p, or a term that cancels in it, would overflow, so the input is refused with one
line naming the limit.
"""
from __future__ import annotations

import numpy as np

from .errors import CpadgnError

NOISE_RANGE = (1e-100, 1e100)
MAX_WHITENED_SQ = 1e200
MAX_MAGNITUDE = 1e100       # |weight|, |bias|, |training value|: their squares and sums stay finite
# bytes: the working arrays are sized by a budget of at least this (the likelihood's chunks,
# impute's batches, the S = 1 enumeration's guard, row_blocks).  Below it the chunks
# shrank to one row, one region and one pair, and the per-chunk overhead (tens of
# microseconds a torch call, more on a loaded machine) dominated: an S = 4 8-8 model's
# 20 digits rows with a quarter of their entries missing took 176 s at a budget of
# 1 byte, 4 s at 2e9.  So the working arrays may exceed a smaller budget by ~8 MB.
MIN_CHUNK_BUDGET = 2.0 ** 23


def is_integer(value) -> bool:
    """An integer (Python or numpy), not a bool (True would be read as 1)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_finite_number(value) -> bool:
    """A finite real number (Python or numpy), not a bool."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and bool(np.isfinite(value)))


def seeded_rng(seed) -> np.random.Generator:
    """np.random.default_rng(seed), or a one-line CpadgnError for a seed numpy does not take
    (a string, a float, a negative int: numpy's TypeError or ValueError)."""
    try:
        return np.random.default_rng(seed)
    except (TypeError, ValueError):
        raise CpadgnError(f"seed must be None, a non-negative integer or a numpy Generator, got {seed!r}; "
                          "pass e.g. seed=0") from None


def check_noise_range(noise_std: np.ndarray) -> None:
    """Refuse noise stds (any shape, finite and > 0) outside NOISE_RANGE."""
    lo, hi = NOISE_RANGE
    if np.any(noise_std < lo) or np.any(noise_std > hi):
        bad = float(np.min(noise_std) if np.any(noise_std < lo) else np.max(noise_std))
        raise CpadgnError(f"noise std {bad:g} is outside [{lo:g}, {hi:g}], where float64 computes "
                          "likelihoods reliably; rescale the data so that the noise is nearer 1")


def row_blocks(X: np.ndarray, memory_budget: float):
    """Slices of the rows of X (N, D) whose float64 temporaries, up to 3 copies of a block
    at once, fit memory_budget (counted as at least MIN_CHUNK_BUDGET)."""
    N, D = X.shape
    step = max(1, int(max(memory_budget, MIN_CHUNK_BUDGET) // (3 * 8 * max(D, 1))))
    return [slice(s, s + step) for s in range(0, N, step)] or [slice(0, 0)]


def check_representable(X: np.ndarray, offset: np.ndarray, noise_std, row_numbers=None,
                        memory_budget: float = 2e9) -> None:
    """Refuse rows of X (N, D) (NaN = missing) whose bound on the squared distance from the
    model in noise units, r^2 = sum_o ((|x_d| + |offset_d|) / sigma_d)^2 (offset (D,) the
    generator's output bias), exceeds MAX_WHITENED_SQ.  row_numbers (N,): the 1-based row
    numbers the message names (default 1..N).  Rows go in ``row_blocks`` of memory_budget."""
    with np.errstate(over="ignore", invalid="ignore"):
        r2 = np.concatenate([np.nansum(((np.abs(X[b]) + np.abs(offset)) / noise_std) ** 2, axis=1)
                             for b in row_blocks(X, memory_budget)])
    bad = np.flatnonzero(~(r2 <= MAX_WHITENED_SQ))
    if bad.size:
        n = bad[0]
        size = f"{r2[n]:.1e}" if np.isfinite(r2[n]) else "beyond 1e308"
        number = n + 1 if row_numbers is None else int(row_numbers[n])
        raise CpadgnError(f"row {number} is too far from the model for float64: its squared distance in "
                          f"noise units is {size} (> {MAX_WHITENED_SQ:g}), so log p(x) would overflow; "
                          "check the data's scale and units (or use a larger noise std)")


def check_magnitude(X: np.ndarray, what: str) -> None:
    """Refuse data X (N, D) with an entry beyond MAX_MAGNITUDE, whose square overflows in a
    variance or covariance (NaN entries are missing and pass)."""
    big = np.abs(X) > MAX_MAGNITUDE
    if big.any():
        r, c = np.argwhere(big)[0]
        raise CpadgnError(f"the {what} has {X[r, c]:g} at row {r + 1}, column {c + 1}, beyond "
                          f"{MAX_MAGNITUDE:g}, where float64 squares overflow; rescale (standardise) the "
                          "columns, or mark a bad value missing (NaN)")


def check_spread(X: np.ndarray, what: str) -> None:
    """Refuse training data X (N, D) (NaN = missing, every column observed twice) that vary,
    but so little that the noise std fitted to them falls below NOISE_RANGE: EM's noise
    variance is at least 1e-6 of the columns' mean variance (fit_em's var_floor), so an rms
    std of 1e3 * NOISE_RANGE[0] is the least that is sure to fit.  The variances are taken
    of X / max|X|, since the squares of values below 1e-154 underflow to 0 (which read as
    'every column is constant').  Constant data pass: the fit says so itself."""
    scale = float(np.nanmax(np.abs(X)))
    if not scale > 0:
        return
    rms = scale * float(np.sqrt(np.mean(np.nanvar(X / scale, axis=0))))
    least = 1e3 * NOISE_RANGE[0]
    if 0 < rms < least:
        raise CpadgnError(f"the {what} vary too little for float64: the columns' rms std is {rms:.3g}, "
                          f"below {least:g}, so the fitted noise std would fall below {NOISE_RANGE[0]:g}; "
                          "rescale (standardise) the columns")


ROUNDING_WARN_NATS = 1e-3   # the CLI warns when a row's rounding estimate exceeds this


def rounding_error_estimate(X: np.ndarray, offset: np.ndarray, noise_std, width: int,
                            memory_budget: float = 2e9) -> np.ndarray:
    """Rows X (N, D) (NaN = missing) -> (N,) estimate, in nats, of how far rounding may
    move log p(x): 4 n eps r^2, r^2 = sum_o ((x_o - offset_o) / sigma_o)^2 the row's squared
    distance from the generator's output bias offset (D,) in noise units, over its observed
    entries (README: Precision; ``tests/oracles.py::kappa_rounding_tol``).  It is the
    leading rounding of the dense (row, region) products behind the pruning bounds
    (``likelihood._log_kappa_complete``, ``likelihood._log_kappa_incomplete``, both centred
    at the offset): dot products of length n = width + D + 2 (width: the last hidden
    layer's, at most D) whose terms of size r^2 / 2 cancel.  The pairs integrated are
    formed apart, by orthogonal transformations of their centred systems
    (``likelihood._pair_gaussians_complete``, ``_pair_gaussians_incomplete``), and round to
    ~eps r (rho + eps r) (rho the row's residual in
    noise units, O(sqrt(D)) near the model): far less, so this is an upper estimate of
    log p's error, of the right order for the bounds; not a rigorous bound.  Rows go in
    ``row_blocks`` of memory_budget."""
    X = np.asarray(X, dtype=np.float64)
    offset = np.asarray(offset, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        r2 = np.concatenate([np.nansum(((X[b] - offset) / noise_std) ** 2, axis=1)
                             for b in row_blocks(X, memory_budget)])
    n = min(width, X.shape[1]) + X.shape[1] + 2
    return 4.0 * n * np.finfo(np.float64).eps * r2
