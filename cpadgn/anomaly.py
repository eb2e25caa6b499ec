"""Anomaly detection with an exact likelihood: model-based p-values and explanations.

Model: z ~ N(mu_z, Sigma_z), x | z ~ N(g(z), diag(sigma^2)), g affine on every region w
(g(z) = A_w z + b_w).  Everything below uses the exact log p(x_o) and the exact
posterior p(z | x_o) of ``CPAModel.posterior`` (x_o: the observed entries, NaN =
missing).

p-value of a row x with observed entries o

    p(x) = P_model[ log p(X_o) <= log p(x_o) ],   X ~ the model,

the probability that a row drawn from the model itself is at most as likely as x (a
small p-value: x is unusually unlikely *for this model*, a calibrated statement that
does not depend on any contamination rate).  Estimated from M rows X_1..X_M drawn
from the model (``CPAModel.sample``, exact iid draws) and scored exactly, restricted to
the same observed entries o as x: with k = #{j : log p(X_j,o) <= log p(x_o)},

    p_hat = (1 + k) / (M + 1),

a valid p-value (P[p_hat <= a] <= a for a row from the model, exactly, by
exchangeability), and the Clopper-Pearson interval of k / M at ``level`` is the Monte
Carlo interval of the true p(x).  Rows with different missing patterns are compared
with the same draws, each scored on that pattern's observed entries: the cost grows
with the number of distinct patterns (M rows each).

Explanation of a row: per observed feature d, the exact expected squared residual

    e_d(x) = E[(x_d - g_d(z))^2 | x_o] / sigma_d^2
           = sum_w r_w(x_o) [ (x_d - A_w,d m_w - b_w,d)^2 + A_w,d C_w A_w,d^T ] / sigma_d^2,

with r_w the region responsibilities and m_w, C_w the mean and covariance of the
posterior truncated to region w.  For rows from the model E[e_d] = 1 (the residual is
the noise), so a feature with e_d >> 1 is one the model cannot explain.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse
from scipy.special import betaincinv

from .data import numeric_array
from .errors import CpadgnError
from .numerics import is_integer


@dataclass
class PValues:
    """Model-based p-values of N rows from M reference draws.

    pvalue (N,): (1 + k) / (M + 1) (NaN for a row with nothing observed); lower, upper
    (N,): Clopper-Pearson interval of the true p-value at ``level`` (NaN likewise);
    count (N,): k, the reference draws at most as likely; n_samples: M; n_patterns:
    distinct missing patterns scored (M draws each).
    """

    pvalue: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    count: np.ndarray
    n_samples: int
    n_patterns: int
    level: float
    patterns: np.ndarray | None = None
    reference_log_prob: np.ndarray | None = None


def clopper_pearson(k, n: int, level: float = 0.95):
    """Exact binomial interval of a proportion from k successes (array) out of n."""
    k = np.asarray(k, dtype=np.float64)
    a = (1.0 - level) / 2
    with np.errstate(invalid="ignore"):
        lo = np.where(k > 0, betaincinv(k, n - k + 1, a), 0.0)
        hi = np.where(k < n, betaincinv(k + 1, n - k, 1 - a), 1.0)
    return lo, hi


def pvalues(model, log_prob, n_samples: int = 2000, seed=0, *, observed=None,
            level: float = 0.95, max_block_bytes: float | None = None, progress=None) -> PValues:
    """Model-based p-values P_model[log p(X_o) <= log p(x_o)] of N rows.

    model: a ``CPAModel`` with a noise std; log_prob (N,): the rows' exact log p(x_o)
    (``model.log_prob``); n_samples: M reference draws from the model; seed: their
    seed (same seed, same p-values); observed (N, D) bool: the observed entries of each
    row (default: all); max_block_bytes: memory of the draws scored per call (default a
    tenth of ``model.memory_budget``, 2e8 at its default);
    progress(draws_scored, total_draws) as the M draws of each of the Q missing patterns
    are scored (Q M in all; each call's rows come in several chunks, so a single call,
    often all of the work, does not sit at 0 until it ends).  Returns a ``PValues``.
    """
    log_prob = numeric_array(log_prob, "model.log_prob(X), an (N,) array").astype(np.float64, copy=False)
    if log_prob.ndim != 1:
        raise CpadgnError(f"log_prob must be one log p per row, shape (N,), got shape {log_prob.shape}; "
                          "pass model.log_prob(X)")
    if not (is_integer(n_samples) and n_samples >= 1):
        raise CpadgnError(f"n_samples must be a positive integer, got {n_samples!r}; pass e.g. n_samples=1000")
    if not (isinstance(level, (int, float, np.number)) and 0 < level < 1):
        raise CpadgnError(f"level must be in (0, 1), got {level!r}; pass e.g. level=0.95")
    N, D, M = log_prob.size, model.output_dim, int(n_samples)
    observed = np.ones((N, D), dtype=bool) if observed is None else numeric_array(observed) != 0
    if observed.shape != (N, D):
        raise CpadgnError(f"observed must have shape {(N, D)}, got {observed.shape}; pass one bool per data "
                          "entry (True = observed), e.g. ~np.isnan(X), or None for all")
    patterns, which = np.unique(observed, axis=0, return_inverse=True)    # (Q, D), (N,)
    which = which.reshape(-1)
    ref = model.sample(M, seed=seed)                                        # (M, D)
    count = np.empty(N, dtype=np.int64)
    reference = np.empty((len(patterns), M))
    if max_block_bytes is None:
        max_block_bytes = 0.1 * model.memory_budget
    block = max(1, int(max_block_bytes // (8 * M * D)))                    # patterns per call
    for q0 in range(0, len(patterns), block):
        pat = patterns[q0:q0 + block]                                       # (B, D)
        stacked = np.where(pat[:, None, :], ref[None], np.nan)              # (B, M, D)
        tick = None if progress is None else \
            (lambda done, _, start=q0 * M: progress(start + done, len(patterns) * M))
        ref_ll = model.posterior(stacked.reshape(-1, D), moments=False, pairs=False, progress=tick).log_likelihood
        ref_ll = np.sort(ref_ll.reshape(len(pat), M), axis=1)
        reference[q0:q0 + len(pat)] = ref_ll
        for j in range(len(pat)):
            rows = np.flatnonzero(which == q0 + j)
            count[rows] = np.searchsorted(ref_ll[j], log_prob[rows], side="right")
    lo, hi = clopper_pearson(count, M, level)
    pvalue = (1.0 + count) / (M + 1.0)
    undefined = np.isnan(log_prob)           # nothing observed: no likelihood, no p-value
    pvalue, lo, hi = (np.where(undefined, np.nan, a) for a in (pvalue, lo, hi))
    return PValues(pvalue=pvalue, lower=lo, upper=hi, count=count,
                   n_samples=M, n_patterns=len(patterns), level=float(level),
                   patterns=patterns, reference_log_prob=reference)


def alpha_threshold(reference_log_prob, alpha: float) -> float:
    """The log p below which a row's p-value (1 + k) / (M + 1) is < alpha, from the M
    sorted reference log p (k = #{reference <= log p}): the (j+1)-th smallest reference
    value, j + 1 = #{k in 0..M : (1 + k) / (M + 1) < alpha}, the p-values compared as
    ``pvalues`` computes them, so the same rows as ``pvalue < alpha`` (-inf when no row can
    be flagged; ceil(alpha (M + 1) - 1) gave one rank more when alpha (M + 1) is whole and
    rounds up, e.g. 0.07 * 100 = 7.000000000000001)."""
    ref = np.asarray(reference_log_prob, dtype=np.float64)
    M = ref.size
    j = int(np.count_nonzero((1.0 + np.arange(M + 1)) / (M + 1.0) < alpha)) - 1
    return float(ref[min(j, M - 1)]) if j >= 0 else -np.inf


def expected_squared_residuals(model, X, post=None, *, max_pair_bytes: float | None = None) -> np.ndarray:
    """Exact E[(x_d - g_d(z))^2 | x_o] / sigma_d^2 for every row and feature.

    model: a ``CPAModel``; X (N, D), NaN = missing; post: ``model.posterior(X)`` if
    already computed (with moments).  Returns (N, D), NaN on missing entries.
    max_pair_bytes: the working memory of a block of pairs, 8 D (S + 6) bytes a pair (its
    map, residuals and their temporaries; default ``model.memory_budget``, counted as at
    least MIN_CHUNK_BUDGET).
    """
    from .likelihood import MIN_CHUNK_BUDGET, distinct_rows
    if max_pair_bytes is None:
        max_pair_bytes = max(model.memory_budget, MIN_CHUNK_BUDGET)
    X = model._check_data(X)
    post = model.posterior(X) if post is None else post
    D = X.shape[1]
    sigma2 = np.broadcast_to(np.asarray(model.noise_std, dtype=np.float64) ** 2, (D,))
    rows, mean, cov = post.pair_row, post.pair_mean, post.pair_cov         # user latent coordinates
    resp, region = post.pair_responsibility, post.pair_region
    # each distinct row once (its first copy's pairs), so that equal rows get equal bits
    # whichever blocks of pairs their sums fall in
    first, inverse = distinct_rows(X, max_pair_bytes)
    if first.size < X.shape[0]:
        distinct = np.full(X.shape[0], -1)
        distinct[first] = np.arange(first.size)
        kept = distinct[rows] >= 0
        rows, mean, cov, resp, region = distinct[rows[kept]], mean[kept], cov[kept], resp[kept], region[kept]
    regions, inv = np.unique(region, return_inverse=True)
    A, b = model.generator.region_maps(model.partition().patterns[regions])  # (U, D, S), (U, D)
    X0 = np.nan_to_num(X[first])
    N = first.size
    out = np.zeros((N, D))
    P, S = rows.size, mean.shape[1]
    step = max(1, int(max_pair_bytes // (8 * D * (S + 6))))
    for s0 in range(0, P, step):
        sl = slice(s0, min(P, s0 + step))
        Ap, r = A[inv[sl]], rows[sl]
        resid = X0[r] - np.einsum("pds,ps->pd", Ap, mean[sl]) - b[inv[sl]]
        within = np.einsum("pds,pst,pdt->pd", Ap, cov[sl], Ap)
        W = sparse.csr_matrix((resp[sl], (r, np.arange(r.size))), shape=(N, r.size))
        out += np.asarray(W @ (resid * resid + within))
    return np.where(np.isnan(X), np.nan, out[inverse] / sigma2)


def top_features(scores, k: int):
    """The k largest finite entries of each row of scores (N, D), largest first.

    Returns index (N, k) int64 (0-based; -1 where a row has fewer than k finite
    entries) and value (N, k) (NaN there).  Ties keep the lower index first.
    """
    if not (is_integer(k) and k >= 0):
        raise CpadgnError(f"k must be a non-negative integer, got {k!r}; pass e.g. k=3")
    scores = numeric_array(scores, "an (N, D) array").astype(np.float64, copy=False)
    if scores.ndim != 2:
        raise CpadgnError(f"scores must be an (N, D) array, got shape {scores.shape}; pass "
                          "expected_squared_residuals(model, X)")
    scores = np.pad(scores, ((0, 0), (0, max(0, k - scores.shape[1]))), constant_values=np.nan)
    key = np.where(np.isnan(scores), np.inf, -scores)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    value = np.take_along_axis(scores, order, axis=1)
    missing = np.isnan(value)
    return np.where(missing, -1, order), value
