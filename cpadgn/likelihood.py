"""Exact marginal likelihood and posterior of a piecewise-affine generator.

Model (prior already folded to N(0, I), see ``network.fold_prior``):
    z ~ N(0, I_S),   x | z ~ N(g(z), diag(sigma^2)),   g(z) = A_w z + b_w on region w.

Per region w and row x (P = diag(sigma^-2), over the observed coordinates of x):
    Lambda_w = I + A_w^T P A_w,  Sigma_w = Lambda_w^-1,  y = A_w^T P (x - b_w),
    mu_w(x) = Sigma_w y,
    log kappa_w(x) = -1/2 [D_o log 2pi + sum log sigma^2 + log det Lambda_w
                           + (x - b_w)^T P (x - b_w) - y^T Sigma_w y],
    Phi_w(x) = P[z in w], z ~ N(mu_w(x), Sigma_w),
    p(x) = sum_w kappa_w(x) Phi_w(x).

Complete rows use the output basis of the last layer: A_w = U M_w, b_w = U c_w + b_0,
so the (row, region) work is one matrix product of the projected data U^T P (x - b_0)
(N, H) with the stacked [c_w, M_w] (H, R (1 + S)).  Rows with missing entries use the
same identities restricted to their observed coordinates (mask products in data space).

Pruning is certified: Phi_w is at most the Gaussian mass on the inner side of any one
facet, Phi(slack_k / std_k), so kappa_w min_k Phi(slack_k / std_k) bounds each region's
term.  Regions are skipped only while the sum of their bounds stays below ``rtol`` p(x);
the resulting bound log(1 + skipped / p) is returned as ``error_bound``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .polytope import polytope_moments
from .network import PiecewiseAffineNet
from .partition import Partition

LOG_2PI = float(np.log(2 * np.pi))


@dataclass
class PosteriorResult:
    """Exact log-likelihood and posterior summaries for N rows (latent coordinates of
    the folded prior N(0, I); ``CPAModel`` maps them back to the user's prior).

    log_likelihood: (N,) log p(x_o) in nats
    error_bound:    (N,) certified bound on |log p - log_likelihood| from pruning
    stderr:         (N,) Monte Carlo standard error (0 where exact, S <= 2)
    n_observed:     (N,) number of observed coordinates
    z_mean:         (N, S) E[z | x];  z_cov: (N, S, S) Cov[z | x]
    top_region:     (N,) index of the region with the largest responsibility
    top_responsibility: (N,)
    pair_row, pair_region, pair_responsibility: the (row, region) pairs evaluated
                    and their responsibilities r_w(x) (pairs not listed have r <= bound)
    pair_mean (P, S), pair_cov (P, S, S): E[z | x, z in w] and Cov[z | x, z in w]
    """

    log_likelihood: np.ndarray
    error_bound: np.ndarray
    stderr: np.ndarray
    n_observed: np.ndarray
    z_mean: np.ndarray
    z_cov: np.ndarray
    top_region: np.ndarray
    top_responsibility: np.ndarray
    pair_row: np.ndarray
    pair_region: np.ndarray
    pair_responsibility: np.ndarray
    pair_mean: np.ndarray
    pair_cov: np.ndarray


class RegionTable:
    """Per-region quantities for one partition and one noise level, on one device.

    M (R, H, S), c (R, H): last hidden activation h = M z + c inside each region;
    U (D, H), b0 (D,): the output layer (U = I_D when that is cheaper);
    G (R, F, S), h (R, F), mask (R, F): the facets {z : G z <= h}.
    For complete rows: Lambda chol L (R, S, S), Sigma = Lambda^-1, logdet Lambda (R,), c^T Q c (R,),
    M^T Q c (R, S) with Q = U^T P U.
    """

    def __init__(self, net: PiecewiseAffineNet, part: Partition, noise_std: np.ndarray,
                 device: torch.device):
        t = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float64, device=device)
        S, D = net.latent_dim, net.output_dim
        _, (M, c) = net.hidden_affine(part.patterns)
        W, b0 = net.weights[-1], net.biases[-1]
        if W.shape[1] >= D:  # the last hidden layer is wider than the data: work in data space
            M, c, W = np.matmul(W, M), c @ W.T, np.eye(D)
        self.device, self.S, self.D = device, S, D
        self.n_regions = part.n_regions
        self.var = t(np.broadcast_to(np.asarray(noise_std, dtype=np.float64) ** 2, (D,)))
        self.U, self.b0, self.M, self.c = t(W), t(b0), t(M), t(c)
        G, h, mask = part.facets(net)
        self.G, self.h, self.mask = G, h, mask          # numpy: the polytope integrals run on the CPU
        self.G_t, self.h_t, self.mask_t = t(G), t(h), torch.tensor(mask, device=device)

        Q = self.U.T @ (self.U / self.var[:, None])
        MtQ = self.M.transpose(1, 2) @ Q                               # (R, S, H)
        Lam = torch.eye(S, dtype=torch.float64, device=device) + MtQ @ self.M
        self.chol_lambda = torch.linalg.cholesky(Lam)
        self.logdet_lambda = 2 * torch.log(torch.diagonal(self.chol_lambda, dim1=1, dim2=2)).sum(1)
        self.sigma = torch.cholesky_inverse(self.chol_lambda)          # Sigma_w = Lambda_w^-1 (R, S, S)
        self.MtQc = (MtQ @ self.c[:, :, None])[..., 0]                # (R, S)
        self.cQc = torch.einsum("rh,hk,rk->r", self.c, Q, self.c)
        self.stacked = torch.cat([self.c[:, :, None], self.M], dim=2).permute(1, 0, 2).reshape(self.M.shape[1], -1)
        self.facet_std = _facet_std(self.chol_lambda, self.G_t)
        # For complete rows the facet slack of each region's posterior mean is affine in
        # xhat = U^T P (x - b0): h_k - G_k mu_w = h'_k - xhat . q_k, so the slacks of all
        # facets of all regions are one matrix product (columns: the real facets only).
        GS = self.G_t @ self.sigma                                     # (R, F, S)
        q = torch.einsum("rhs,rfs->hrf", self.M, GS)[:, self.mask_t]    # (H, facets)
        h_shift = self.h_t + (GS @ self.MtQc[:, :, None])[..., 0]
        std = self.facet_std[self.mask_t]
        self.slack_q, self.slack_h = q / std, h_shift[self.mask_t] / std
        # Position of each real facet in the padded (R * F) layout; padding stays +inf.
        self.slack_index = torch.nonzero(self.mask_t.reshape(-1))[:, 0]

    def region_affine(self, regions: torch.Tensor):
        """A (B, D, S), b (B, D) of some regions."""
        M, c = self.M[regions], self.c[regions]
        return torch.einsum("dh,bhs->bds", self.U, M), c @ self.U.T + self.b0


def _solve_chol(L: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Lambda^-1 y with Lambda = L L^T: L (..., S, S), y (..., S) -> (..., S)."""
    return torch.cholesky_solve(y[..., None], L)[..., 0]


def _log_kappa_complete(tab: RegionTable, X: torch.Tensor):
    """Complete rows X (N, D) -> log kappa (N, R), xhat = U^T P (x - b0) (N, H)."""
    N, R, S = X.shape[0], tab.n_regions, tab.S
    Xc = X - tab.b0
    xhat = (Xc / tab.var) @ tab.U                                      # (N, H)
    xPx = (Xc * Xc / tab.var).sum(1)                                   # (N,)
    prod = (xhat @ tab.stacked).reshape(N, R, S + 1)                   # the dominant step
    y = prod[..., 1:] - tab.MtQc
    rPr = xPx[:, None] - 2 * prod[..., 0] + tab.cQc
    mu = torch.einsum("rst,nrt->nrs", tab.sigma, y)                   # posterior means (N, R, S)
    ySy = (y * mu).sum(-1)
    const = tab.D * LOG_2PI + torch.log(tab.var).sum()
    return -0.5 * (const + tab.logdet_lambda + rPr - ySy), xhat


def _moments_incomplete(tab: RegionTable, X: torch.Tensor, regions: torch.Tensor):
    """Rows with missing entries (NaN) against some regions.

    X (N, D), regions (B,) -> log kappa (N, B), y (N, B, S), chol Lambda (N, B, S, S).
    """
    A, b = tab.region_affine(regions)                                  # (B, D, S), (B, D)
    obs = ~torch.isnan(X)
    Pm = obs / tab.var                                                 # (N, D) precision on observed
    x0 = torch.where(obs, X, torch.zeros((), dtype=X.dtype, device=X.device))
    B, S = A.shape[0], tab.S
    AA = (A[:, :, :, None] * A[:, :, None, :]).permute(1, 0, 2, 3).reshape(tab.D, -1)
    Lam = torch.eye(S, dtype=X.dtype, device=X.device) + (Pm @ AA).reshape(-1, B, S, S)
    y = ((x0 * Pm) @ A.permute(1, 0, 2).reshape(tab.D, -1)
         - Pm @ (b[:, :, None] * A).permute(1, 0, 2).reshape(tab.D, -1)).reshape(-1, B, S)
    rPr = ((x0 * x0 * Pm).sum(1)[:, None] - 2 * (x0 * Pm) @ b.T + Pm @ (b * b).T)
    L = torch.linalg.cholesky(Lam)
    ySy = (torch.linalg.solve_triangular(L, y[..., None], upper=False)[..., 0] ** 2).sum(-1)
    logdet = 2 * torch.log(torch.diagonal(L, dim1=2, dim2=3)).sum(-1)
    const = (obs.sum(1).to(X.dtype) * LOG_2PI + (obs * torch.log(tab.var)).sum(1))[:, None]
    return -0.5 * (const + logdet + rPr - ySy), y, L


def _facet_std(L: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Posterior std of each facet's normal direction, sqrt(G_k Lambda^-1 G_k^T).

    L (..., B, S, S) chol of Lambda, G (B, F, S) -> (..., B, F).
    """
    v = torch.linalg.solve_triangular(L, G.transpose(-1, -2).expand(*L.shape[:-2], -1, -1), upper=False)
    return torch.linalg.vector_norm(v, dim=-2)


def _log_phi_bound(tab: RegionTable, mu: torch.Tensor, std: torch.Tensor, regions: torch.Tensor):
    """Upper bound on log Phi_w: the Gaussian mass on the side of one facet, minimised over facets.

    mu (N, B, S), std (N or 1, B, F) -> (N, B).
    """
    slack = tab.h_t[regions] - torch.einsum("bfs,nbs->nbf", tab.G_t[regions], mu)
    z = torch.where(tab.mask_t[regions], slack / std, torch.inf)
    if z.shape[-1] == 0:
        return torch.zeros(z.shape[:2], dtype=z.dtype, device=z.device)
    return torch.special.log_ndtr(z.min(dim=-1).values)          # log_ndtr is increasing


def _log_bounds(tab: RegionTable, X: torch.Tensor, complete: bool, region_chunk: int):
    """log kappa (N, R) and a certified upper bound log kappa + log Phi_bound >= log(kappa Phi)."""
    if complete:
        log_kappa, xhat = _log_kappa_complete(tab, X)
        if tab.mask_t.shape[-1] == 0:                                    # one region, no facets
            return log_kappa, log_kappa
        z = (tab.slack_h - xhat @ tab.slack_q)                           # (N, facets), in stds
        padded = torch.full((X.shape[0], tab.mask_t.numel()), torch.inf, dtype=X.dtype, device=X.device)
        padded[:, tab.slack_index] = z
        zmin = padded.reshape(X.shape[0], *tab.mask_t.shape).min(dim=-1).values
        return log_kappa, log_kappa + torch.special.log_ndtr(zmin)
    kappas, bounds = [], []
    for start in range(0, tab.n_regions, region_chunk):
        idx = torch.arange(start, min(start + region_chunk, tab.n_regions), device=X.device)
        lk, y, L = _moments_incomplete(tab, X, idx)
        mu = _solve_chol(L, y)
        kappas.append(lk)
        bounds.append(lk + _log_phi_bound(tab, mu, _facet_std(L, tab.G_t[idx]), idx))
    return torch.cat(kappas, dim=1), torch.cat(bounds, dim=1)


def _pair_gaussians(tab: RegionTable, X: torch.Tensor, rows: torch.Tensor, regions: torch.Tensor,
                    complete: bool):
    """Posterior Gaussian of each (row, region) pair: mu (P, S), chol Sigma... as L_Lambda (P, S, S)."""
    if complete:
        xhat = ((X - tab.b0) / tab.var) @ tab.U                        # once per row, not per pair
        y = torch.einsum("phs,ph->ps", tab.M[regions], xhat[rows]) - tab.MtQc[regions]
        L = tab.chol_lambda[regions]
    else:
        # One row at a time against its own regions keeps memory at O(pairs).
        ys, Ls = [], []
        for r in torch.unique(rows):
            sel = torch.nonzero(rows == r)[:, 0]
            _, y_r, L_r = _moments_incomplete(tab, X[r:r + 1], regions[sel])
            ys.append((sel, y_r[0])), Ls.append(L_r[0])
        y = torch.empty((rows.numel(), tab.S), dtype=X.dtype, device=X.device)
        L = torch.empty((rows.numel(), tab.S, tab.S), dtype=X.dtype, device=X.device)
        for (sel, y_r), L_r in zip(ys, Ls):
            y[sel], L[sel] = y_r, L_r
    return _solve_chol(L, y), L


def pair_gaussians(tab: RegionTable, X: np.ndarray, rows: np.ndarray, regions: np.ndarray):
    """The untruncated posterior Gaussian N(mu_w(x), Lambda_w^-1) of (row, region) pairs.

    X (N, D) (NaN = missing), rows (P,) indices into X, regions (P,).  Returns mu (P, S)
    and the lower Cholesky factor L of Lambda_w (P, S, S) as numpy, Sigma_w = (L L^T)^-1.
    """
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64), device=tab.device)
    rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=tab.device)
    regions_t = torch.as_tensor(np.asarray(regions, dtype=np.int64), device=tab.device)
    complete = not bool(torch.isnan(Xt[rows_t]).any()) if rows_t.numel() else True
    mu, L = _pair_gaussians(tab, Xt, rows_t, regions_t, complete)
    return mu.cpu().numpy(), L.cpu().numpy()


def _truncated_moments(tab: RegionTable, mu: torch.Tensor, L_lambda: torch.Tensor,
                       regions: np.ndarray, moments: bool):
    """Mass and moments of N(mu, Lambda^-1) on each pair's region.

    Whitening z = mu + C u with C = L^-T (so C C^T = Lambda^-1) turns G z <= h into
    (G C) u <= h - G mu.  Returns log Phi (P,), E[z|w] (P, S), Cov[z|w] (P, S, S),
    stderr (P,) as numpy.
    """
    mu, L = mu.cpu().numpy(), L_lambda.cpu().numpy()
    C = np.linalg.inv(np.swapaxes(L, 1, 2))                           # L^-T, (P, S, S)
    G, h, mask = tab.G[regions], tab.h[regions], tab.mask[regions]
    A = G @ C
    b = h - np.einsum("pfs,ps->pf", G, mu)
    res = polytope_moments(A, b, mask, moments=moments)
    mean = mu + np.einsum("pst,pt->ps", C, res.mean)
    cov = C @ res.cov @ np.swapaxes(C, 1, 2)
    return res.log_mass, mean, cov, res.stderr


def posterior(net: PiecewiseAffineNet, part: Partition, noise_std: np.ndarray, X: np.ndarray, *,
              tab: RegionTable | None = None, device: torch.device | str = "cpu",
              rtol: float = 1e-13, memory_budget: float = 2e9, moments: bool = True,
              progress=None) -> PosteriorResult:
    """Exact log p(x_o), responsibilities and E[z|x], Cov[z|x] for every row of X (N, D).

    NaN entries of X are missing; a row with nothing observed has log p = 0 and the
    prior as posterior.  ``progress(done_rows, total_rows)`` is called after each chunk.
    """
    device = torch.device(device)
    tab = tab or RegionTable(net, part, noise_std, device)
    X = np.asarray(X, dtype=np.float64)
    N, S, R = X.shape[0], net.latent_dim, part.n_regions
    out = _empty_result(N, S)
    complete_rows = ~np.isnan(X).any(axis=1)
    # Rows per chunk so that the (rows, regions, S + 1) working arrays fit the budget.
    F = tab.G.shape[1]
    per_row = 8.0 * R * (2 * S + 2 + F) * 4
    chunk = int(max(1, min(N, memory_budget // per_row)))
    region_chunk = int(max(1, memory_budget // (8.0 * 4 * (tab.D * S * (S + 2) + chunk * S * (S + 2)))))
    pairs = []
    done = 0
    for complete in (True, False):
        idx_all = np.flatnonzero(complete_rows == complete)
        for start in range(0, idx_all.size, chunk):
            idx = idx_all[start:start + chunk]
            pairs.append(_posterior_chunk(tab, torch.as_tensor(X[idx], device=device), idx,
                                          complete, rtol, region_chunk, moments, out))
            done += idx.size
            if progress is not None:
                progress(done, N)
    if pairs:
        (out.pair_row, out.pair_region, out.pair_responsibility,
         out.pair_mean, out.pair_cov) = map(np.concatenate, zip(*pairs))
    return out


def _empty_result(N: int, S: int) -> PosteriorResult:
    return PosteriorResult(
        log_likelihood=np.zeros(N), error_bound=np.zeros(N), stderr=np.zeros(N),
        n_observed=np.zeros(N, dtype=np.int64), z_mean=np.zeros((N, S)),
        z_cov=np.zeros((N, S, S)), top_region=np.zeros(N, dtype=np.int64),
        top_responsibility=np.zeros(N), pair_row=np.zeros(0, dtype=np.int64),
        pair_region=np.zeros(0, dtype=np.int64), pair_responsibility=np.zeros(0),
        pair_mean=np.zeros((0, S)), pair_cov=np.zeros((0, S, S)))


def _posterior_chunk(tab, Xt, idx, complete, rtol, region_chunk, moments, out):
    """Fill ``out`` for rows idx (their data Xt on the device); return their pairs."""
    n = Xt.shape[0]
    log_kappa, log_bound = _log_bounds(tab, Xt, complete, region_chunk)  # (n, R) each
    log_rtol = float(np.log(rtol))
    done = torch.zeros(n, dtype=torch.bool, device=Xt.device)
    taken = torch.zeros_like(log_kappa, dtype=torch.bool)
    acc_rows, acc_regions, acc_logw, acc_mean, acc_cov, acc_se = [], [], [], [], [], []
    log_p = torch.full((n,), -torch.inf, dtype=torch.float64, device=Xt.device)
    top = log_bound.max(dim=1).values
    # Certifying rtol needs a margin of about -log(rtol) + log(#regions left) nats.
    for margin in (35.0, 45.0, 60.0, 100.0, torch.inf):
        new = (~taken) & (~done[:, None]) & (log_bound >= (top - margin)[:, None])
        if new.any():
            rows, regions = torch.nonzero(new, as_tuple=True)
            taken |= new
            mu, L = _pair_gaussians(tab, Xt, rows, regions, complete)
            log_phi, mean, cov, se = _truncated_moments(tab, mu, L, regions.cpu().numpy(), moments)
            logw = log_kappa[rows, regions].cpu().numpy() + log_phi
            acc_rows.append(rows.cpu().numpy()), acc_regions.append(regions.cpu().numpy())
            acc_logw.append(logw), acc_mean.append(mean), acc_cov.append(cov), acc_se.append(se)
            log_p = torch.logaddexp(log_p, _segment_logsumexp(rows, torch.as_tensor(logw, device=Xt.device), n))
        skipped = torch.logsumexp(torch.where(taken, -torch.inf, log_bound), dim=1)
        done = done | (skipped - log_p <= log_rtol)
        if bool(done.all()):
            break
    skipped = torch.logsumexp(torch.where(taken, -torch.inf, log_bound), dim=1)
    bound = torch.log1p(torch.exp(skipped - log_p)).cpu().numpy()
    return _summarise(np.concatenate(acc_rows), np.concatenate(acc_regions), np.concatenate(acc_logw),
                      np.concatenate(acc_mean), np.concatenate(acc_cov), np.concatenate(acc_se),
                      Xt, idx, bound, out)


def _segment_logsumexp(rows: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row log-sum-exp of pair values: rows (P,), values (P,) -> (n,), -inf for no pairs."""
    rowmax = torch.full((n,), -torch.inf, dtype=values.dtype, device=values.device).scatter_reduce(
        0, rows, values, reduce="amax", include_self=True)
    safe = torch.where(torch.isfinite(rowmax), rowmax, torch.zeros_like(rowmax))
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(
        0, rows, torch.exp(values - safe[rows]))
    return safe + torch.log(total)


def _summarise(rows, regions, logw, mean, cov, se, Xt, idx, bound, out):
    """Combine the per-pair results of one chunk into per-row summaries."""
    n = Xt.shape[0]
    order = np.lexsort((regions, rows))
    rows, regions, logw, mean, cov, se = rows[order], regions[order], logw[order], mean[order], cov[order], se[order]
    rowmax = np.full(n, -np.inf)
    np.maximum.at(rowmax, rows, logw)
    w = np.exp(logw - rowmax[rows])
    total = np.bincount(rows, weights=w, minlength=n)
    log_p = rowmax + np.log(total)
    r = w / total[rows]
    S = mean.shape[1]
    z_mean = np.zeros((n, S))
    np.add.at(z_mean, rows, r[:, None] * mean)
    second = cov + mean[:, :, None] * mean[:, None, :]
    z_cov = np.zeros((n, S, S))
    np.add.at(z_cov, rows, r[:, None, None] * second)
    z_cov -= z_mean[:, :, None] * z_mean[:, None, :]
    # Delta method: d log p / d log Phi_w = r_w.
    var = np.bincount(rows, weights=(r * se) ** 2, minlength=n)
    best = np.zeros(n)
    top = np.zeros(n, dtype=np.int64)
    order_r = np.lexsort((-r, rows))
    first = np.ones(rows.size, dtype=bool)
    first[1:] = rows[order_r][1:] != rows[order_r][:-1]
    top[rows[order_r][first]] = regions[order_r][first]
    best[rows[order_r][first]] = r[order_r][first]
    n_obs = (~torch.isnan(Xt)).sum(1).cpu().numpy()
    empty = n_obs == 0                      # p of nothing observed is exactly 1
    out.log_likelihood[idx] = np.where(empty, 0.0, log_p)
    out.error_bound[idx] = np.where(empty, 0.0, bound)
    out.stderr[idx] = np.where(empty, 0.0, np.sqrt(var))
    out.n_observed[idx] = n_obs
    out.z_mean[idx], out.z_cov[idx] = z_mean, z_cov
    out.top_region[idx], out.top_responsibility[idx] = top, best
    return idx[rows], regions, r, mean, cov
