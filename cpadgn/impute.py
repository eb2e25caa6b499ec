"""Exact conditional imputation and exact multiple-imputation draws.

Model (prior folded to N(0, I), see ``network.fold_prior``): z ~ N(0, I_S),
x | z ~ N(g(z), diag(sigma^2)), g(z) = A_w z + b_w on region w.  For a row with
observed entries o and missing entries m, the posterior given x_o is the mixture
p(z | x_o) = sum_w r_w(x_o) TN_w(mu_w(x_o), Sigma_w) of Gaussians truncated to their
regions (``likelihood.posterior`` with the rows o of A_w, b_w), so with
E_w = E[z | x_o, z in w], C_w = Cov[z | x_o, z in w] and m_w = A_w,m E_w + b_w,m:

    E[x_m | x_o]   = sum_w r_w m_w
    Cov[x_m | x_o] = diag(sigma_m^2) + sum_w r_w (A_w,m C_w A_w,m^T + (m_w - E)(m_w - E)^T)

(the second term in centred form, which does not cancel).  Exact draws from
p(x_m | x_o): a region w with probability r_w, then z from N(mu_w, Sigma_w) restricted
to w (``sampling.sample_truncated_gaussian``, exact iid), then
x_m = A_w,m z + b_w,m + sigma_m eps.

Exactness: for S <= 3 the region masses and truncated moments are exact (log space);
for S >= 4 they come from randomised QMC (``polytope``), with a standard error, and so
E[x_m | x_o] has one (``mean_stderr``).  Write l_w = log(kappa_w Phi_w) for a pair's
estimated log weight (so r_w = exp(l_w) / sum_v exp(l_v)).  Each pair's l_w and E_w come
from the same independent randomisations, independent of every other pair's, and
linearised

    d E[x_m | x_o] = sum_w r_w ((m_w - E) d l_w + A_w,m d E_w)

so that, with s_w = Var[l_w], g_w = Cov[l_w, E_w] (S,) and V_w = Cov[E_w] (S, S)
(``likelihood.PosteriorResult``'s pair_weight_stderr^2, pair_weight_mean_mc_cov,
pair_mean_mc_cov), entry j has the variance

    sum_w r_w^2 (s_w (m_w,j - E_j)^2 + 2 (m_w,j - E_j) (A_w,m g_w)_j + (A_w,m V_w A_w,m^T)_jj)

(``mean_stderr_terms``): no integral beyond those of the mean itself.  Regions
are pruned only under the certified bound of ``likelihood.posterior`` (relative
responsibility <= 1e-10 by default), reported per row as ``error_bound``.  Rows with nothing
missing pass through unchanged; rows with nothing observed get the model's marginal
mean, covariance and draws (the prior is their posterior).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy import sparse
import torch

from . import likelihood
from .data import check_rows
from .errors import CpadgnError
from .network import PiecewiseAffineNet
from .numerics import check_representable, is_integer, seeded_rng
from .partition import Partition
from .sampling import sample_truncated_gaussian


class Conditional(NamedTuple):
    """E[x | x_o] and Cov[x | x_o] per row (observed entries: their value, variance 0).

    mean (N, D); cov (N, D, D) or None; std (N, D) the conditional standard deviations
    (sqrt of the diagonal of cov).
    """

    mean: np.ndarray
    cov: np.ndarray | None
    std: np.ndarray


@dataclass
class ImputeResult:
    """mean (N, D): E[x | x_o], observed entries copied from X (X's float dtype);
    std (N, D) or None: conditional standard deviation (0 on observed entries);
    cov (N, D, D) or None: conditional covariance (zero rows/columns on observed entries);
    draws (K, N, D) or None: K completed data sets, observed entries copied;
    z_draws (K, N, S) or None: the latent draws behind them, in the folded latent
    coordinates (prior N(0, I)), NaN for rows with nothing missing;
    error_bound (N,): certified bound from pruning on |log p(x_o) - computed| (0 where
    nothing is missing); n_missing (N,);
    mean_stderr (N, D): the Monte Carlo standard error of each entry of ``mean`` over the
    randomisation of the S >= 4 region integrals (delta method, see the module's
    docstring); 0 on observed entries and where the integrals are exact (S <= 3).  It
    says how far a rerun with other random points may move the mean, not how far the
    truth lies from it (that is ``std``)."""

    mean: np.ndarray
    std: np.ndarray | None
    cov: np.ndarray | None
    draws: np.ndarray | None
    z_draws: np.ndarray | None
    error_bound: np.ndarray
    n_missing: np.ndarray
    mean_stderr: np.ndarray | None = None


def check_draws(draws) -> None:
    """Refuse a number of draws that is neither None (the mean) nor a positive integer
    (True would be read as 1, 2.5 truncated)."""
    if draws is not None and not (is_integer(draws) and draws >= 1):
        raise CpadgnError(f"draws must be a positive integer, got {draws!r}; pass draws=1 or more, or "
                          "leave it out for the mean")


def impute(net: PiecewiseAffineNet, part: Partition, noise_std, X, *, draws: int | None = None,
           seed=None, std: bool = False, full_cov: bool = False,
           tab: likelihood.RegionTable | None = None, device="cpu", memory_budget: float = 2e9,
           rtol: float = 1e-10, stderr_target: float = 1e-4, row_chunk: int | None = None,
           progress=None) -> ImputeResult:
    """Exact conditional mean (and optionally std, covariance and K exact draws) of the
    missing entries (NaN) of X (N, D) given the observed ones, the regions pruned to rtol
    (``error_bound``).  At S >= 4 the region weights are QMC estimates aiming at
    stderr_target nats per row (``likelihood.posterior``).

    Same seed, data, device and memory_budget: same draws (the budget sets the rows per
    chunk, ``rows_per_chunk``, unless row_chunk does).  ``progress(done_rows, total_rows)``
    is called after each chunk of rows with missing entries.
    """
    if noise_std is None:
        raise CpadgnError("the model has no noise std: pass --noise-std X or noise_std=")
    S, D = net.latent_dim, net.output_dim
    X = check_rows(X, D)     # its float dtype kept, for the results
    check_draws(draws)
    out_dtype = X.dtype if X.dtype.kind == "f" else np.dtype(np.float64)
    X64 = X.astype(np.float64)
    N = X.shape[0]
    miss = np.isnan(X64)
    n_missing = miss.sum(1)
    todo = np.flatnonzero(n_missing > 0)
    sigma = np.broadcast_to(np.asarray(noise_std, dtype=np.float64), (D,))
    check_representable(X64[todo], net.biases[-1], sigma, row_numbers=todo + 1, memory_budget=memory_budget)
    rng = seeded_rng(seed)
    K = None if draws is None else int(draws)

    mean = X64.copy()
    var = np.zeros((N, D)) if (std or full_cov) else None
    cov = np.zeros((N, D, D)) if full_cov else None
    # the draws go straight into the result (observed entries copied once, as _restore does)
    xd = None if K is None else np.empty((K, N, D), dtype=out_dtype)
    if xd is not None:
        xd[...] = np.asarray(X, dtype=out_dtype)
    zd = None if K is None else np.full((K, N, S), np.nan)
    bound = np.zeros(N)
    mean_var = np.zeros((N, D))
    # equal rows (bit for bit, NaN in the same places) next to each other, so that a chunk's
    # posterior scores them once, and in the end given the first one's results (a chunk's
    # sums run in blocks of pairs, and a chunk's end, that may split them differently)
    _, group = likelihood.distinct_rows(X64[todo], memory_budget)
    order = np.argsort(group, kind="stable")
    todo, group = todo[order], group[order]
    leader = todo[np.searchsorted(group, group)]            # (rows to do,) the first row equal to each
    if todo.size:
        tab = tab or likelihood.RegionTable(net, part, noise_std, device, memory_budget)
        pairs_per_row, most_seen, start = part.n_regions, 1, 0    # every region, until a chunk shows
        while start < todo.size:
            rows = row_chunk or rows_per_chunk(S, pairs_per_row, memory_budget)
            idx = todo[start:start + rows]
            most = _impute_chunk(net, part, tab, sigma, X64[idx], idx, miss[idx], device, memory_budget,
                                 rtol, stderr_target, rng, K, mean, var, cov, xd, zd, bound, mean_var)
            # twice the most a row has had, a margin for rows with more pairs than those seen
            most_seen = max(most_seen, most)
            pairs_per_row = min(part.n_regions, 2 * most_seen)
            start += idx.size
            if progress is not None:
                progress(start, todo.size)
        for result in (mean, var, cov, bound, mean_var):
            if result is not None:
                result[todo] = result[leader]

    res_mean = _restore(X, mean, miss, out_dtype)
    sd = None if var is None else np.sqrt(var).astype(out_dtype)
    return ImputeResult(mean=res_mean, std=sd if std else None, cov=cov, draws=xd, z_draws=zd,
                        error_bound=bound, n_missing=n_missing, mean_stderr=np.sqrt(mean_var).astype(out_dtype))


def rows_per_chunk(S: int, pairs_per_row: int, memory_budget: float, most: int = 512) -> int:
    """Rows of a chunk whose (row, region) pairs, pairs_per_row a row (at first every region,
    the worst case posterior's own chunks are sized for), fit a quarter of memory_budget
    (counted as at least ``likelihood.MIN_CHUNK_BUDGET``, as ``likelihood.posterior`` does):
    8 (S^2 + S + 3) bytes a pair (S >= 4: 8 (S^2 + S + 1) more for its QMC errors), held
    about 4 times (posterior's chunks, their join, the sorted copy, the sparse weights; 3.4
    measured)."""
    per_pair = 8.0 * (S * S + S + 3 + (S * S + S + 1 if S >= 4 else 0))
    share = max(memory_budget, likelihood.MIN_CHUNK_BUDGET) / 4
    return int(max(1, min(most, share // (4 * per_pair * pairs_per_row))))


def conditional(net, part, noise_std, X, *, full_cov: bool = True, **kw) -> Conditional:
    """E[x | x_o], Cov[x | x_o] (full_cov) and the conditional std of every entry."""
    res = impute(net, part, noise_std, X, std=True, full_cov=full_cov, **kw)
    return Conditional(res.mean, res.cov, res.std)


def _restore(X, values, miss, dtype):
    """A copy of X (bit for bit on observed entries) with the missing entries filled."""
    out = np.array(X, dtype=dtype, copy=True)
    out[miss] = values[miss].astype(dtype)
    return out


def _impute_chunk(net, part, tab, sigma, Xc, idx, miss, device, memory_budget, rtol, stderr_target, rng, K,
                  mean, var, cov, xd, zd, bound, mean_var):
    """Fill the outputs for rows idx (data Xc, all with something missing); returns the most
    (row, region) pairs a row of them had."""
    n, D = Xc.shape
    post = likelihood.posterior(net, part, sigma, Xc, tab=tab, device=device, memory_budget=memory_budget,
                                rtol=rtol, stderr_target=stderr_target)
    bound[idx] = post.error_bound
    order = np.lexsort((post.pair_region, post.pair_row))
    prow, preg = post.pair_row[order], post.pair_region[order]
    r, zm, zc = post.pair_responsibility[order], post.pair_mean[order], post.pair_cov[order]
    mc = None if post.pair_mean_mc_cov is None else (post.pair_weight_stderr[order] ** 2,
                                                      post.pair_weight_mean_mc_cov[order],
                                                      post.pair_mean_mc_cov[order])
    P = prow.size
    most_pairs = int(np.bincount(prow, minlength=1).max())
    W = sparse.csr_matrix((r, (prow, np.arange(P))), shape=(n, P))  # rows x pairs, responsibilities
    # region maps (P, D, S) do not fit at once for large partitions: pairs in chunks
    step = int(max(1, memory_budget / 4 // (8.0 * D * ((2 if mc is None else 3) * tab.S + 6))))
    chunks = [slice(s0, min(P, s0 + step)) for s0 in range(0, P, step)]
    mu_x = np.zeros((n, D))
    for sl in chunks:
        A, b = _region_maps(tab, preg[sl])
        mu_x += np.asarray(W[:, sl] @ (np.einsum("pds,ps->pd", A, zm[sl]) + b))   # E[g(z) | x_o, w]
    mean[idx] = np.where(miss, mu_x, mean[idx])
    if mc is not None:
        W2 = W.multiply(W).tocsr()
        mv = np.zeros((n, D))
        for sl in chunks:
            A, b = _region_maps(tab, preg[sl])
            dev = np.einsum("pds,ps->pd", A, zm[sl]) + b - mu_x[prow[sl]]
            mv += np.asarray(W2[:, sl] @ mean_stderr_terms(A, dev, *(x[sl] for x in mc)))
        mean_var[idx] = np.where(miss, np.maximum(mv, 0.0), 0.0)
    if var is not None:
        v = np.zeros((n, D)) + sigma ** 2
        full = np.zeros((n, D * D)) if cov is not None else None
        for sl in chunks:
            A, b = _region_maps(tab, preg[sl])
            dev = np.einsum("pds,ps->pd", A, zm[sl]) + b - mu_x[prow[sl]]
            # diag(A Cov A^T) >= 0, so Var[x_d | x_o] >= sigma_d^2; a pair far from the row (a
            # tiny noise std) can get a negative Cov from E[zz'] - E[z]E[z]' cancelling
            within = np.maximum(np.einsum("pds,pst,pdt->pd", A, zc[sl], A), 0.0)
            v += np.asarray(W[:, sl] @ (within + dev * dev))
            if full is None:
                continue
            sub = max(1, int(2e7 // max(1, D * D)))
            for s0 in range(0, dev.shape[0], sub):
                Ap, dp = A[s0:s0 + sub], dev[s0:s0 + sub]
                blk = np.einsum("pds,pst,pet->pde", Ap, zc[sl][s0:s0 + sub], Ap) + dp[:, :, None] * dp[:, None, :]
                full += np.asarray(W[:, sl][:, s0:s0 + sub] @ blk.reshape(-1, D * D))
        var[idx] = np.where(miss, np.maximum(v, 0.0), 0.0)
        if cov is not None:
            full = full.reshape(n, D, D) + np.diag(sigma ** 2)[None]
            full = 0.5 * (full + np.swapaxes(full, 1, 2))
            keep = miss[:, :, None] & miss[:, None, :]
            cov[idx] = np.where(keep, full, 0.0)
    if K is None:
        return most_pairs
    # ---- exact draws: a region by responsibility, z from its truncated Gaussian, noise
    starts = np.searchsorted(prow, np.arange(n))
    ends = np.searchsorted(prow, np.arange(n), side="right")
    U = rng.random((n, K))
    pick = np.empty((n, K), dtype=np.int64)                           # the pair of every draw
    for i in range(n):
        c = np.cumsum(r[starts[i]:ends[i]])
        pick[i] = starts[i] + np.minimum(np.searchsorted(c / c[-1], U[i], side="right"),
                                         ends[i] - starts[i] - 1)
    counts = np.bincount(pick.ravel(), minlength=P)
    sel = np.flatnonzero(counts)
    mu, L = likelihood.pair_gaussians(tab, Xc, prow[sel], preg[sel])
    C = np.linalg.inv(np.swapaxes(L, 1, 2))                           # C C^T = Lambda^-1
    G, h, fmask = tab.G[preg[sel]], tab.h[preg[sel]], tab.mask[preg[sel]]
    z = sample_truncated_gaussian(mu, C, G, h, fmask, counts[sel], rng)
    slots = np.argsort(pick.ravel(), kind="stable")                   # draws grouped by pair
    z_slot = np.empty((n * K, z.shape[1]))
    z_slot[slots] = z
    pair_of = pick.ravel()
    # draw slot t is row t // K, draw t % K; in blocks of `step` slots (the noise drawn block
    # by block is the stream one (n K, D) call gives), written straight into the result xd
    for s0 in range(0, n * K, step):
        A, b = _region_maps(tab, preg[pair_of[s0:s0 + step]])
        zs = z_slot[s0:s0 + step]
        for s in range(zs.shape[1]):                                  # g(z) = A z + b written out over S
            b += A[:, :, s] * zs[:, s, None]                          # (np.einsum is slow here)
        b += rng.standard_normal(b.shape) * sigma
        row, k = np.divmod(np.arange(s0, s0 + b.shape[0]), K)
        r, d = np.nonzero(miss[row])
        xd[k[r], idx[row[r]], d] = b[r, d]
    zd[:, idx] = z_slot.reshape(n, K, -1).transpose(1, 0, 2)
    return most_pairs


def mean_stderr_terms(A, dev, weight_var, weight_mean_cov, mean_cov):
    """Each pair's share of the variance of E[x | x_o] over the QMC randomisation, per
    unit squared responsibility (the module's docstring): s (m - E)^2 + 2 (m - E) (A g)
    + diag(A V A^T), for maps A (P, D, S), dev = m - E (P, D), s = Var[log weight] (P,),
    g = Cov[log weight, E[z|w]] (P, S), V = Cov[E[z|w]] (P, S, S).  Returns (P, D)."""
    Ag = np.einsum("pds,ps->pd", A, weight_mean_cov)
    AVA = np.einsum("pds,pds->pd", A @ mean_cov, A)
    return weight_var[:, None] * dev * dev + 2.0 * dev * Ag + AVA


def _region_maps(tab, regions: np.ndarray):
    """g(z) = A z + b on the regions (P,) of some pairs: A (P, D, S), b (P, D) as numpy."""
    uniq, inv = np.unique(regions, return_inverse=True)
    A, b = tab.region_affine(torch.as_tensor(uniq))
    return A.cpu().numpy()[inv], b.cpu().numpy()[inv]


# ============================================================================ evaluation
def mcar_mask(X, fraction: float, seed=None) -> np.ndarray:
    """Hide round(fraction * n_observed) of the observed entries of X, chosen uniformly
    at random without replacement (seeded): a boolean mask (N, D)."""
    if not 0 < fraction < 1:
        raise CpadgnError(f"the MCAR fraction must be in (0, 1), got {fraction}; pass a fraction such as 0.2")
    obs = np.flatnonzero(~np.isnan(np.asarray(X, dtype=np.float64)).ravel())
    k = int(round(fraction * obs.size))
    if k == 0:
        raise CpadgnError(f"hiding {fraction:g} of {obs.size} observed entries hides none; "
                          "use a larger fraction or more data")
    hide = np.zeros(np.size(X), dtype=bool)
    hide[np.random.default_rng(seed).choice(obs, size=k, replace=False)] = True
    return hide.reshape(np.shape(X))


def conditional_cdf(net: PiecewiseAffineNet, noise_std, z_draws, values) -> np.ndarray:
    """Rao-Blackwellised estimate of the conditional CDF P[x_j <= v_j | x_o] from K exact
    latent draws: mean_k Phi((v_j - g_j(z_k)) / sigma_j).

    net: the folded generator the draws belong to (``CPAModel.net``); z_draws (K, N, S)
    (``ImputeResult.z_draws``); values (N, D).  Unbiased for the exact CDF at every point,
    with only the latent part of the Monte Carlo error.  Returns (N, D), NaN for rows
    without draws (nothing missing).
    """
    from scipy.special import ndtr
    z = np.asarray(z_draws, dtype=np.float64)
    K, N, S = z.shape
    sigma = np.broadcast_to(np.asarray(noise_std, dtype=np.float64), (net.output_dim,))
    out = np.full((N, net.output_dim), np.nan)
    rows = np.flatnonzero(np.isfinite(z[0]).all(1))
    if rows.size:
        g = net.forward(z[:, rows].reshape(-1, S)).reshape(K, rows.size, -1)
        out[rows] = ndtr((np.asarray(values, dtype=np.float64)[rows][None] - g) / sigma).mean(0)
    return out


def imputation_errors(X_true, X_imputed, hidden, draws=None, level: float = 0.9, cdf=None) -> dict:
    """RMSE of the imputed values on the hidden entries, overall and per column; with
    draws (K, N, D) the coverage of the central ``level`` intervals of the draws'
    empirical quantiles ("coverage"; K draws under-cover by about 1/K's order statistics,
    about 0.88 for a perfect model at K = 100); with cdf (N, D), the conditional CDF at
    the true values (``conditional_cdf``), the coverage of the exact central intervals,
    i.e. the fraction with (1 - level)/2 <= cdf <= (1 + level)/2 ("coverage_cdf")."""
    X_true = np.asarray(X_true, dtype=np.float64)
    err = np.where(hidden, np.asarray(X_imputed, dtype=np.float64) - X_true, 0.0)
    count = hidden.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_col = np.sqrt((err ** 2).sum(0) / count)
    out = {"hidden": int(hidden.sum()), "rmse": float(np.sqrt((err ** 2).sum() / max(1, hidden.sum()))),
           "rmse_per_column": per_col, "hidden_per_column": count}
    if draws is not None:
        a = (1 - level) / 2
        d = np.asarray(draws, dtype=np.float64)[:, hidden]          # (K, H)
        lo, hi = np.quantile(d, a, axis=0), np.quantile(d, 1 - a, axis=0)
        t = X_true[hidden]
        out["coverage"] = float(np.mean((t >= lo) & (t <= hi)))
        out["coverage_level"] = level
    if cdf is not None:
        a = (1 - level) / 2
        c = np.asarray(cdf, dtype=np.float64)[hidden]
        out["coverage_cdf"] = float(np.mean((c >= a) & (c <= 1 - a)))
        out["coverage_level"] = level
    return out
