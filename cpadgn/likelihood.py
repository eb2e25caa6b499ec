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
same identities restricted to their observed coordinates: mask products in data space
for the bounds, a QR factorisation per pair integrated (``_pair_gaussians_incomplete``).

Pruning is certified: Phi_w is at most the Gaussian mass on the inner side of any one
facet, Phi(slack_k / std_k), so kappa_w min_k Phi(slack_k / std_k) bounds each region's
term.  Regions are skipped only while the sum of their bounds stays below ``rtol`` p(x);
the resulting bound log(1 + skipped / p) is returned as ``error_bound``.
"""
from __future__ import annotations

import threading
from contextlib import closing
from dataclasses import dataclass
from numbers import Real

import numpy as np
import torch
from scipy.special import log_ndtr

from .edges import distance_to_packed, pack_facets, pack_segments, padding_segments, polyhedron_edges
from .errors import CpadgnError
from .polyhedron import facet_count_groups, real_first, region_facet_polygons, translated_polyhedron_moments
from .polytope import (PolytopeMoments, QMCGeometry, combine_ids, content_hash, distance_lower_bound,
                       dual_ascent_distance_bound, facet_segments, halfspace_mc, polygon_moments, polytope_moments,
                       polytope_qmc_draws, solve_in_groups)
from .network import PiecewiseAffineNet
from .numerics import MIN_CHUNK_BUDGET, check_representable, rounding_error_estimate, row_blocks
from .partition import Partition
from .stop import map_in_threads, stop_check

LOG_2PI = float(np.log(2 * np.pi))
LOG_2 = float(np.log(2.0))


@dataclass
class PosteriorResult:
    """Exact log-likelihood and posterior summaries for N rows (latent coordinates of
    the folded prior N(0, I); ``CPAModel`` maps them back to the user's prior).

    log_likelihood: (N,) log p(x_o) in nats; NaN for a row with nothing observed
    error_bound:    (N,) certified bound on |log p - log_likelihood| from pruning
    stderr:         (N,) Monte Carlo standard error (0 where exact, S <= 3)
    n_observed:     (N,) number of observed coordinates
    z_mean:         (N, S) E[z | x];  z_cov: (N, S, S) Cov[z | x]
    top_region:     (N,) index of the region with the largest responsibility
    top_responsibility: (N,)
    n_pairs:        (N,) regions integrated for the row (those the pruning kept): the
                    cost of the row, which grows with its posterior's width
    pair_row, pair_region, pair_responsibility: the (row, region) pairs evaluated
                    and their responsibilities r_w(x) (pairs not listed have r <= bound)
    pair_mean (P, S), pair_cov (P, S, S): E[z | x, z in w] and Cov[z | x, z in w]
    pair_weight_stderr (P,), pair_mean_mc_cov (P, S, S), pair_weight_mean_mc_cov (P, S):
                    S >= 4 (None where exact, S <= 3): the Monte Carlo standard error of
                    each pair's estimate of log(kappa_w Phi_w), the covariance of its
                    estimate of pair_mean, and the covariance of the two (each pair's
                    integrals are independent of every other pair's; see
                    ``polytope.PolytopeMoments`` and ``impute.mean_stderr_terms``)
    rounding_error: (N,) estimate of how far float64 rounding may move log_likelihood,
                    in nats (``numerics.rounding_error_estimate``: the leading term, not a
                    bound; beyond ~1e-3 the row lies too far from the model in noise units)
    With ``posterior(..., pairs=False)`` the pair fields are empty (P = 0).
    """

    log_likelihood: np.ndarray
    error_bound: np.ndarray
    stderr: np.ndarray
    n_observed: np.ndarray
    z_mean: np.ndarray
    z_cov: np.ndarray
    top_region: np.ndarray
    top_responsibility: np.ndarray
    n_pairs: np.ndarray
    pair_row: np.ndarray
    pair_region: np.ndarray
    pair_responsibility: np.ndarray
    pair_mean: np.ndarray
    pair_cov: np.ndarray
    pair_weight_stderr: np.ndarray | None = None
    pair_mean_mc_cov: np.ndarray | None = None
    pair_weight_mean_mc_cov: np.ndarray | None = None
    rounding_error: np.ndarray | None = None


class RegionTable:
    """Per-region quantities for one partition and one noise level, on one device.

    M (R, H, S), c (R, H): last hidden activation h = M z + c inside each region;
    U (D, H), b0 (D,): the output layer (U = I_D when that is cheaper);
    G (R, F, S), h (R, F), mask (R, F): the facets {z : G z <= h};
    degenerate (R,) or None: regions flagged near-degenerate by the partition.
    For complete rows, with Q = U^T P U = Q_factor^T Q_factor, Lambda_w = I + M^T Q M = L L^T and C = L^-T
    (so Sigma_w = C C^T): chol_lambda L (R, S, S), C (R, S, S), ``stacked`` (H + 2, (1 + S) R)
    the per-region coefficients of log kappa and v (see ``_log_kappa_complete``); and
    the facets in the whitened frame u = C^-1 (z - mu):
    unit normals GC_unit (R, F, S) and offsets h_unit (R, F) (+inf on padding).
    S = 2: ``polygons``, each region's whitened polygon at v = 0 with its facet segments
    (a, d, c, t_lo, t_hi, live, real, real facets first; see ``polytope.polygon_moments``)
    and ``polygon_size`` (R,) its facet count; None otherwise.
    S = 3: ``polyhedra`` (GC_unit, c0 (R, F), real (R, F), volume (R,)), each region's
    whitened polyhedron at v = 0, and ``packed_polyhedra`` (facets, segments, facet
    count (R,) (one past the last real facet), edge count (R,)): it and its edges as
    ``edges.pack_polyhedra`` gives them (live edges first); None otherwise.
    memory_budget (bytes, counted as at least MIN_CHUNK_BUDGET, as in ``posterior``; below it
    the table was built in chunks of a few regions): when M, c and ``stacked`` would take over a quarter of it they
    are not kept (``streamed``; M, c, stacked are None): ``stacked_chunks``,
    ``stacked_for`` and ``region_affine`` rebuild them per chunk of ``region_chunk``
    regions, from the last layer's pre-activation map per prefix pattern where those fit
    (``_prefix``, see ``PiecewiseAffineNet.prefix_maps``), else from the sign patterns.
    """

    def __init__(self, net: PiecewiseAffineNet, part: Partition, noise_std: np.ndarray,
                 device: torch.device, memory_budget: float | None = None):
        device = torch.device(device)
        if memory_budget is not None:
            memory_budget = max(memory_budget, MIN_CHUNK_BUDGET)
        t = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=torch.float64, device=device)
        S, D = net.latent_dim, net.output_dim
        W, b0 = net.weights[-1], net.biases[-1]
        # the last hidden layer is wider than the data: work in data space
        self.data_space = W.shape[1] > D
        if self.data_space:
            W = np.eye(D)
        self.device, self.S, self.D = device, S, D
        self.n_regions = R = part.n_regions
        self._net, self._patterns = net, part.patterns
        H = W.shape[1]
        # M, c, ``stacked`` and the frames take ~3 (H + 2)(S + 1) + (S + 1)(S + K) floats per
        # region: past a quarter of the budget they are not kept but rebuilt per chunk of
        # regions (``stacked_chunks``, ``pair_frames``)
        sparse = torch.device(device).type == "cpu" and int((W != 0).sum()) < 0.25 * W.size
        K = D if sparse else H
        per_region = 8.0 * (3 * (H + 2) * (S + 1) + (S + 1) * (S + K))
        self.region_chunk = R if memory_budget is None else int(max(1, min(R, memory_budget / 4 // per_region)))
        self.streamed = self.region_chunk < R
        degenerate = getattr(part, "degenerate", None)
        self.degenerate = np.asarray(degenerate, bool) if degenerate is not None and np.any(degenerate) else None
        self.var = t(np.broadcast_to(np.asarray(noise_std, dtype=np.float64) ** 2, (D,)))
        self.U, self.b0 = t(W), t(b0)
        # a sparse output layer (a convolution's): M'QM = (UM)'P(UM) through sparse U is far cheaper
        self.U_sparse = self.U.to_sparse() if sparse else None
        # else P^1/2 U = Q_basis Q_factor (Q_basis (D, H) orthonormal, F = Q_factor (H, H)
        # triangular), Q = U^T P U = F^T F: a region's precision factor is the QR of [I; F M]
        # (``_region_constants``), whose rounding is eps |F M|, not eps |M|^T |Q| |M|: where
        # the output layer cancels (U M ~ 0) at a small noise std the latter exceeded 1, and
        # the Cholesky factor of I + M^T Q M failed (or lost its identity); Q_basis carries a
        # complete row into the same frame (``_pair_gaussians_complete``)
        self.Q_basis = self.Q_factor = None
        if not sparse:
            self.Q_basis, self.Q_factor = torch.linalg.qr(self.U / self.var.sqrt()[:, None])
        self.kappa_const0 = D * LOG_2PI + torch.log(self.var).sum()
        self.M = self.c = self.stacked = self._prefix = self.frames = None
        if self.streamed and not self.data_space and net.hidden_sizes:
            # regions sharing the layers before the last share its pre-activation map: keep
            # those (if they fit in a quarter of the budget), and a chunk's M, c are a gather
            maps = net.prefix_maps(part.patterns, int(memory_budget / 4 // (8.0 * H * (S + 1))))
            if maps is not None:
                Gc = t(np.concatenate([maps[1][:, :, None], maps[0]], 2))          # (P, H, S + 1): [c, G]
                self._prefix = (Gc[:, :, 1:], Gc[:, :, 0], torch.as_tensor(maps[2], device=device),
                                t(net.slopes[-1]), net.n_units - H)
                self._prefix_maps = Gc
                order = np.argsort(maps[2], kind="stable")
                starts = np.searchsorted(maps[2][order], np.arange(maps[0].shape[0] + 1))
                self._prefix_groups = (torch.as_tensor(order, device=device), torch.as_tensor(starts))
        constants = []
        for lo in range(0, R, self.region_chunk):
            stop_check()
            M, c = self._hidden(np.arange(lo, min(R, lo + self.region_chunk)))
            *consts, frames = self._region_constants(M, c)
            constants.append(consts)
            if not self.streamed:
                self.M, self.c, self.frames = M, c, frames
                self.stacked = self._stacked(M, c, *constants[0][1:]).reshape(H + 2, -1)
        empty = torch.zeros((0, S, S), dtype=torch.float64, device=device)
        self.chol_lambda, self.C, self.kappa_const, self.v_shift = (
            torch.cat(x) for x in zip(*constants)) if constants else (empty, empty, empty[:, 0, 0], empty[:, 0])
        self._facet_tables(net, part, device, memory_budget)

    def _hidden(self, regions: np.ndarray):
        """M (B, H, S), c (B, H) of the last hidden activation (in data space when it is the
        narrower one) of regions (B,), as tensors: from the table when it is kept, else
        rebuilt from the sign patterns."""
        if self.M is not None:
            idx = torch.as_tensor(regions, device=self.device)
            return self.M[idx], self.c[idx]
        if self._prefix is not None:
            G, cu, prefix_of, alpha, first_unit = self._prefix
            idx = torch.as_tensor(np.asarray(regions), device=self.device)
            q = torch.as_tensor(self._patterns[np.asarray(regions), first_unit:], device=self.device)
            slope = torch.where(q, torch.ones((), dtype=torch.float64, device=self.device), alpha)
            M = G[prefix_of[idx]]
            M *= slope[:, :, None]
            return M, cu[prefix_of[idx]] * slope
        M, c = self._net.last_hidden_affine(self._patterns[np.asarray(regions)])
        if self.data_space:
            W = self._net.weights[-1]
            M, c = np.matmul(W, M), c @ W.T
        t = lambda a: torch.as_tensor(np.require(a, np.float64, ["C", "W"]), device=self.device)
        return t(M), t(c)

    def _region_constants(self, M: torch.Tensor, c: torch.Tensor):
        """Per region of M (B, H, S), c (B, H): chol Lambda (B, S, S), C = L^-T (B, S, S), the
        constant of -2 log kappa (B,), v_shift = C^T M^T Q c (B, S) and the frames of
        ``_pair_gaussians_complete``: Q_w (B, S + K, S), Bc (B, K).

        In the frame of the output layer (K = H, P^1/2 U = Q_basis F: B_w = F M_w, Bc = F c;
        a sparse U: K = D, B_w = P^1/2 U M_w, Bc = P^1/2 U c), the Householder QR
        factorisation [I; B_w] = Q_w L^T gives L and the orthonormal Q_w (to rounding), not
        the Cholesky factor of I + B_w^T B_w: that Gram matrix rounds to eps |B_w|^2 per
        entry, which drowns the identity where U M_w is (nearly) rank deficient at a small
        noise std (L 1e-3 relative off at sigma = 1e-7 for a direction A_w maps to ~sigma)."""
        S, (B, H) = self.S, c.shape
        if self.U_sparse is not None:
            Mc = torch.cat([M, c[:, :, None]], 2).permute(1, 0, 2).reshape(H, -1)
            UMc = torch.sparse.mm(self.U_sparse, Mc).reshape(-1, B, S + 1).permute(1, 0, 2)   # (B, D, S + 1)
            BMc = UMc / self.var.sqrt()[:, None]                                   # P^1/2 U [M, c]
        else:
            BMc = self.Q_factor @ torch.cat([M, c[:, :, None]], 2)                 # (B, H, S + 1): F [M, c]
        Bw, Bc = BMc[:, :, :S], BMc[:, :, S]
        if not bool(torch.isfinite((Bw * Bw).sum(1)).all()):
            raise CpadgnError("the generator's slopes over the noise std overflow float64 (M^T M / sigma^2 "
                              "beyond 1e308 in some region): the model is broken or badly scaled; "
                              "retrain it on standardised data")
        eye = torch.eye(S, dtype=M.dtype, device=M.device).expand(B, S, S)
        a, tau = torch.geqrf(torch.cat([eye, Bw], 1))
        Q = torch.linalg.householder_product(a, tau)                                # (B, S + K, S)
        R = torch.triu(a[:, :S])
        sign = torch.where(torch.diagonal(R, dim1=1, dim2=2) < 0, -1.0, 1.0)       # L's diagonal > 0
        chol = (R * sign[:, :, None]).transpose(1, 2)
        Q *= sign[:, None, :]
        C = _inverse_transpose(chol)
        logdet = 2 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(1)
        v_shift = (C.transpose(1, 2) @ (Bw.transpose(1, 2) @ Bc[:, :, None]))[..., 0]   # C^T M^T Q c
        return chol, C, self.kappa_const0 + logdet + (Bc * Bc).sum(1), v_shift, (Q, Bc)

    def pair_frames(self, regions: np.ndarray):
        """The frames (Q_w (B, S + K, S), Bc (B, K)) of some regions (B,)
        (``_region_constants``): from the table when it is kept, else rebuilt."""
        if self.frames is not None:
            idx = torch.as_tensor(regions, device=self.device)
            return self.frames[0][idx], self.frames[1][idx]
        return self._region_constants(*self._hidden(regions))[-1]

    def _stacked(self, M, c, C, kappa_const, v_shift) -> torch.Tensor:
        """[xhat, 1, x'Px] @ stacked = [-1/2 (const + x'Px - 2 c.xhat), v_1..v_S] per region:
        (H + 2, S + 1, B) for regions with M (B, H, S), c (B, H) and their constants."""
        H, S, B = M.shape[1], self.S, M.shape[0]
        stacked = torch.zeros((H + 2, S + 1, B), dtype=torch.float64, device=self.device)
        stacked[:H, 0], stacked[H, 0], stacked[H + 1, 0] = c.T, -0.5 * kappa_const, -0.5
        stacked[:H, 1:] = (M @ C).permute(1, 2, 0)
        stacked[H, 1:] = -v_shift.T
        return stacked

    def stacked_for(self, regions) -> torch.Tensor:
        """``stacked`` of some regions (B,): (H + 2, S + 1, B)."""
        idx = torch.as_tensor(np.asarray(regions), device=self.device)
        if self.stacked is not None:
            return self.stacked.view(self.stacked.shape[0], self.S + 1, self.n_regions)[:, :, idx]
        M, c = self._hidden(np.asarray(regions))
        return self._stacked(M, c, self.C[idx], self.kappa_const[idx], self.v_shift[idx])

    def stacked_chunks(self):
        """(lo, hi, stacked of regions lo..hi-1 as (H + 2, (S + 1) (hi - lo))) over all regions."""
        if self.stacked is not None:
            yield 0, self.n_regions, self.stacked
            return
        for lo in range(0, self.n_regions, self.region_chunk):
            stop_check()
            hi = min(self.n_regions, lo + self.region_chunk)
            st = self.stacked_for(np.arange(lo, hi))
            yield lo, hi, st.reshape(st.shape[0], -1)

    def _facet_tables(self, net, part, device, memory_budget):
        """The facets G, h, mask and their whitened forms (and S = 2 polygons, S = 3
        polyhedra), built in region chunks: the polygon segments take (F, F) per region."""
        S, R = self.S, self.n_regions
        F = int(part.n_facets.max(initial=0))
        t = (lambda a: torch.from_numpy(a)) if device.type == "cpu" else \
            (lambda a: torch.tensor(a, device=device))
        G, h = np.zeros((R, F, S)), np.ones((R, F))
        mask = np.arange(F)[None, :] < part.n_facets[:, None]
        GC_unit, h_unit = np.zeros((R, F, S)), np.full((R, F), np.inf)
        polygons = S == 2 and F > 0
        if polygons:
            a, d, c0 = np.zeros((R, F, 2)), np.zeros((R, F, 2)), np.zeros((R, F))
            t_lo, t_hi = np.full((R, F), -np.inf), np.full((R, F), np.inf)
            live, real_sorted = np.zeros((R, F), bool), np.zeros((R, F), bool)
        chunk = R if memory_budget is None else int(max(1, memory_budget / 8 // (8.0 * max(F, 1) * (
            6 * max(F, 1) + 4 * S + max(net.n_units, 1) * S))))
        any_real = False
        for lo in range(0, R, chunk):
            stop_check()
            sl = slice(lo, min(R, lo + chunk))
            Gc, hc, mc = part.facets(net, np.arange(sl.start, sl.stop))
            f = Gc.shape[1]
            G[sl, :f], h[sl, :f] = Gc, hc
            # ``_whitened_facets`` with the elementwise part in numpy: each torch call pays for
            # waking its threads, which on a busy machine costs more than the arithmetic
            GC, norm = (x.cpu().numpy() for x in _whitened_normals(torch.as_tensor(Gc, device=device), self.C[sl]))
            real = mc & (norm > 0)
            np.divide(GC, norm[..., None], out=GC_unit[sl, :f], where=real[..., None])
            np.divide(hc, norm, out=h_unit[sl, :f], where=real)
            any_real |= bool(real.any())
            if polygons:
                # Each region's whitened polygon (v = 0) and its facet segments, once: a pair
                # with whitened mean v sees the same polygon translated by -v.
                # Real facets first, so that pairs can be grouped by their facet count.
                order = np.argsort(~real, axis=1, kind="stable")
                rs = np.take_along_axis(real, order, 1)
                ac = np.take_along_axis(GC_unit[sl, :f], order[..., None], 1)
                cc = np.where(rs, np.take_along_axis(h_unit[sl, :f], order, 1), 0.0)
                lo_, hi_, lv = facet_segments(ac, cc, rs)
                a[sl, :f], d[sl, :f], c0[sl, :f] = ac, np.stack([-ac[..., 1], ac[..., 0]], -1), cc
                t_lo[sl, :f], t_hi[sl, :f], live[sl, :f], real_sorted[sl, :f] = lo_, hi_, lv, rs
        self.G, self.h, self.mask = G, h, mask          # numpy: the polytope integrals run on the CPU
        self.G_t, self.h_t, self.mask_t = t(G), t(h), t(mask)
        self.n_facets_t = t(part.n_facets.astype(np.int64))
        self.GC_unit, self.h_unit = t(GC_unit), t(h_unit)
        self.polygons = None
        if polygons and any_real:
            self.polygons = (a, d, c0, t_lo, t_hi, live, real_sorted)
            self.polygon_size = real_sorted.sum(1)
        self.polyhedra = self.packed_polyhedra = None
        self.has_nearest = self.polygons is not None
        if S == 3 and any_real:
            # Each region's whitened polyhedron (v = 0) and its edges, once: the distance
            # from a pair's whitened mean to its region needs nothing else.
            real_np = np.isfinite(h_unit)
            c0 = np.where(real_np, h_unit, 0.0)
            segments, n_edges, volume = _packed_edges(GC_unit, c0, real_np)
            self.polyhedra = (GC_unit, c0, real_np, volume)
            n_facets = np.where(real_np.any(1), real_np.shape[1] - np.argmax(real_np[:, ::-1], 1), 0)
            self.packed_polyhedra = (pack_facets(GC_unit, c0, real_np), segments, n_facets, n_edges)
            self.has_nearest = True
        self.has_nearest |= S >= 4 and any_real          # the distance bound of polytope.distance_lower_bound

    def region_affine(self, regions: torch.Tensor):
        """A (B, D, S), b (B, D) of some regions."""
        M, c = self._hidden(regions.cpu().numpy())
        return torch.einsum("dh,bhs->bds", self.U, M), c @ self.U.T + self.b0


def _whitened_facets(G: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, C: torch.Tensor):
    """The facets {z : G z <= h} in the whitened frame u = C^-1 (z - mu), as unit normals
    GC_unit (..., F, S), offsets at v = 0 h_unit (..., F) (+inf on padding) and real (..., F):
    G (..., F, S), h (..., F), mask (..., F) bool, C (..., S, S)."""
    GC, norm = _whitened_normals(G, C)
    real = mask & (norm > 0)
    safe = torch.where(real, norm, 1.0)
    GC_unit = GC.div_(safe[..., None]).masked_fill_(~real[..., None], 0.0)
    h_unit = (h / safe).masked_fill_(~real, torch.inf)
    return GC_unit, h_unit, real


def _whitened_normals(G: torch.Tensor, C: torch.Tensor):
    """GC = G C (..., F, S) and its rows' norms (..., F): G (..., F, S), C (..., S, S)."""
    GC = G @ C
    return GC, torch.linalg.vector_norm(GC, dim=-1)


def _packed_edges(a: np.ndarray, c: np.ndarray, real: np.ndarray, group: int = 4096):
    """The edges of R polyhedra, a (R, F, 3), c (R, F), real (R, F) (``polyhedron_edges``),
    as ``edges.pack_segments`` lays them out: segments (R, E, 8) (E the largest edge count),
    edge counts (R,) and volumes (R,) (inf for a region without real facets), found in
    groups of equal facet count on torch's thread count (``facet_count_groups``)."""
    R = a.shape[0]
    a, c, real = real_first(a, c, real)

    def edges_of(k, g):
        stop_check()
        edges = polyhedron_edges(a[g, :k], c[g, :k], real[g, :k])
        return g, pack_segments(edges), edges.real.sum(1), edges.volume
    with closing(map_in_threads(edges_of, facet_count_groups(real.sum(1), group), torch.get_num_threads())) \
            as results:
        parts = list(results)
    segments = padding_segments(R, max([s.shape[1] for _, s, _, _ in parts], default=1))
    n_edges, volume = np.zeros(R, np.int64), np.full(R, np.inf)
    for g, seg, n, vol in parts:
        segments[g, :seg.shape[1]], n_edges[g], volume[g] = seg, n, vol
    return segments, n_edges, volume


def _inverse_transpose(L: torch.Tensor) -> torch.Tensor:
    """L^-T for lower-triangular L (..., S, S)."""
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand_as(L)
    return torch.linalg.solve_triangular(L, eye, upper=False).transpose(-1, -2)


def _whitened_qr(Bt: torch.Tensor, r: torch.Tensor):
    """The least-squares system min_z |z|^2 + |B z - r|^2 of each of p pairs, Bt = B^T
    (p, S, K), r (p, K), by one QR factorisation, [[I, 0], [B, r]] = Q [[L^T, v], [0, rho]]:
    returns L^T (p, S, S) (diagonal > 0), v = L^-1 B^T r (p, S) and rho (p,), so that
    I + B^T B = L L^T and rho^2 = |r|^2 - |v|^2 (the residual).  Orthogonal
    transformations round to eps times the sizes of B and r themselves, where the products
    B^T B, B^T r and |r|^2 - |v|^2 lose eps |B|^2, eps |B| |r| and eps |r|^2."""
    p, S, K = Bt.shape
    # the system transposed, (p, S + 1, S + K), is LAPACK's column-major layout
    system = torch.zeros((p, S + 1, S + K), dtype=Bt.dtype, device=Bt.device)
    system[:, :S, :S] = torch.eye(S, dtype=Bt.dtype, device=Bt.device)
    system[:, :S, S:] = Bt
    system[:, S, S:] = r
    R = torch.linalg.qr(system.mT, mode="r").R                         # (p, S + 1, S + 1)
    sign = torch.where(torch.diagonal(R, dim1=1, dim2=2)[:, :S] < 0, -1.0, 1.0)   # L's diagonal > 0
    return R[:, :S, :S] * sign[:, :, None], R[:, :S, S] * sign, R[:, S, S]


def _log_kappa_complete(tab: RegionTable, X: torch.Tensor):
    """Complete rows X (N, D) -> log kappa (N, R) and the whitened posterior means
    v = C^T y (N, S, R), mu_w(x) = C_w v.

    -2 log kappa = const_w + |x - b_w|_P^2 - y^T Sigma_w y, where y^T Sigma_w y = |v|^2 and
    |x - b_w|_P^2 = x'Px - 2 c_w . xhat + c_w' Q c_w: everything but |v|^2 is one matrix
    product (``RegionTable.stacked``), whose output becomes the result in place.
    """
    N, R, S = X.shape[0], tab.n_regions, tab.S
    Xc = X - tab.b0
    xhat = (Xc / tab.var) @ tab.U                                      # (N, H)
    xPx = (Xc * Xc / tab.var).sum(1)                                   # (N,)
    xaug = torch.cat([xhat, torch.ones_like(xPx)[:, None], xPx[:, None]], dim=1)
    if tab._prefix is not None:
        prod = _products_by_prefix(tab, xhat, xPx)
        for k in range(1, S + 1):
            prod[:, 0].addcmul_(prod[:, k], prod[:, k], value=0.5)
        return prod[:, 0], prod[:, 1:]
    chunks = tab.stacked_chunks()
    lo, hi, st = next(chunks)
    if hi == R:
        prod = (xaug @ st).view(N, S + 1, R)                           # the dominant step
    else:                                                              # region maps streamed
        prod = torch.empty((N, S + 1, R), dtype=X.dtype, device=X.device)
        for lo, hi, st in [(lo, hi, st), *chunks]:
            prod[:, :, lo:hi] = (xaug @ st).view(N, S + 1, hi - lo)
    for k in range(1, S + 1):
        prod[:, 0].addcmul_(prod[:, k], prod[:, k], value=0.5)
    return prod[:, 0], prod[:, 1:]


def _products_by_prefix(tab: RegionTable, xhat: torch.Tensor, xPx: torch.Tensor) -> torch.Tensor:
    """``xaug @ stacked`` (N, S + 1, R) without the per-region maps: in a region of prefix u,
    M_w = s_w G_u and c_w = s_w c_u (s_w the last layer's slopes), so c_w . xhat and
    M_w^T xhat are s_w @ (xhat * [c_u, G_u]): one product per prefix, then v = C_w^T M_w^T
    xhat - v_shift_w.  xhat (N, H), xPx (N,)."""
    G, cu, prefix_of, alpha, first_unit = tab._prefix
    order, starts = tab._prefix_groups
    N, S, R = xhat.shape[0], tab.S, tab.n_regions
    Gc = tab._prefix_maps                                              # (P, H, S + 1): [c_u, G_u]
    q = torch.from_numpy(tab._patterns)[:, first_unit:] if tab.device.type == "cpu" else None
    one = torch.ones((), dtype=xhat.dtype, device=xhat.device)
    prod = torch.empty((N, S + 1, R), dtype=xhat.dtype, device=xhat.device)
    for g in range(starts.numel() - 1):
        if g % 256 == 0:
            stop_check()
        regs = order[int(starts[g]):int(starts[g + 1])]
        qg = q[regs] if q is not None else torch.as_tensor(tab._patterns[regs.cpu().numpy(), first_unit:],
                                                          device=xhat.device)
        Y = xhat.T[:, :, None] * Gc[prefix_of[regs[0]]][:, None, :]  # (H, N, S + 1)
        prod[:, :, regs] = (torch.where(qg, one, alpha) @ Y.reshape(Y.shape[0], -1)).view(-1, N, S + 1).permute(1, 2, 0)
    prod[:, 0] -= 0.5 * (tab.kappa_const[None, :] + xPx[:, None])
    prod[:, 1:] = torch.einsum("rst,nsr->ntr", tab.C, prod[:, 1:]) - tab.v_shift.T[None]
    return prod


def _log_kappa_incomplete(tab: RegionTable, X: torch.Tensor, region_chunk: int):
    """Rows X (n, D) with missing entries (NaN) against every region -> log kappa (n, R) and
    the pairs' posterior statistics (n, S (S + 1) / 2 + S, R): the lower triangle of
    Lambda_w,o = I + A_w^T P_o A_w (row by row) and y = A_w^T P_o (x - b_w)
    (``_stats_factors`` turns them into v and L of chosen pairs): ``_evaluate_pairs``'
    bounds.  The pairs it integrates get theirs anew (``_pair_gaussians_incomplete``: these
    products lose digits at a small noise std).

    With the 0/1 mask m of a row's observed entries, P_o = diag(m / sigma^2), and x, b_w
    centred at the output bias b0 (x0 = m * (x - b0), b_w' = b_w - b0 = U c_w, so that the
    sums round to eps |x - b0|^2 / sigma^2 as the complete rows' do, not eps (|x| + |b0|)^2 / sigma^2):
        Lambda_w,o = I + sum_d P_o,d A_wd A_wd^T,   y = A_w^T (P_o x0) - (b_w' A_w)^T P_o,
        |x - b_w|^2_{P_o} = x0' P_o x0 - 2 b_w' . P_o x0 + b_w'' P_o b_w',
    so all (row, region) terms of a region chunk are two products in data space,
    [P_o, 1] (n, D + 1) @ [A_wi A_wj; I_ij] and [P_o, P_o x0] (n, 2 D) @ [-b_w' A_w, b_w'^2;
    A_w, -2 b_w'], followed by y' Lambda^-1 y and log det Lambda from an entrywise LDL^T
    (``_entrywise_ldl``).  Rows that share a missing pattern share the first product.
    Region chunks are kept small enough for the (n, chunk) planes to stay in cache.
    """
    n, D, S, R = X.shape[0], tab.D, tab.S, tab.n_regions
    dev, dt = X.device, X.dtype
    obs = ~torch.isnan(X)
    X = X - tab.b0
    Pm = obs / tab.var                                                 # (n, D) precision on observed
    Px = torch.where(obs, X, torch.zeros((), dtype=dt, device=dev)) * Pm
    const = obs.sum(1).to(dt) * LOG_2PI + (obs * torch.log(tab.var)).sum(1) + (Px * torch.nan_to_num(X)).sum(1)
    patterns, inverse = torch.unique(obs, dim=0, return_inverse=True)
    shared = patterns.shape[0] <= n // 2
    Pg = patterns / tab.var if shared else Pm
    Pg = torch.cat([Pg, torch.ones_like(Pg[:, :1])], dim=1)           # the identity of Lambda
    Z = torch.cat([Pm, Px], dim=1)
    tri = [(i, j) for i in range(S) for j in range(i + 1)]
    T = len(tri)
    log_kappa = torch.empty((n, R), dtype=dt, device=dev)
    stats = torch.empty((n, T + S, R), dtype=dt, device=dev)
    step = int(max(1, min(region_chunk, 2 ** 18 // max(n, 1))))
    for start in range(0, R, step):
        stop = min(start + step, R)
        M, c = tab._hidden(np.arange(start, stop))
        A = torch.einsum("dh,bhs->dsb", tab.U, M).contiguous()           # (D, S, B)
        b = tab.U @ c.T                                                    # (D, B): b_w - b0
        B = stop - start
        gram_table = torch.zeros((D + 1, T, B), dtype=dt, device=dev)
        for k, (i, j) in enumerate(tri):
            torch.mul(A[:, i], A[:, j], out=gram_table[:D, k])
            gram_table[D, k] = float(i == j)
        lin_table = torch.empty((2 * D, S + 1, B), dtype=dt, device=dev)
        torch.mul(A, -b[:, None], out=lin_table[:D, :S])
        torch.mul(b, b, out=lin_table[:D, S])
        lin_table[D:, :S] = A
        torch.mul(b, -2.0, out=lin_table[D:, S])
        gram = (Pg @ gram_table.view(D + 1, -1)).view(-1, T, B)
        lin = (Z @ lin_table.view(2 * D, -1)).view(n, S + 1, B)
        st = stats[:, :, start:stop]
        st[:, :T] = gram[inverse] if shared else gram
        st[:, T:] = lin[:, :S]
        logdet, yy = _entrywise_ldl({ij: st[:, k] for k, ij in enumerate(tri)}, [st[:, T + s] for s in range(S)])
        # -2 log kappa = const + log det Lambda + |x - b|^2_P - y' Lambda^-1 y
        out = log_kappa[:, start:stop]
        torch.add(lin[:, S], const[:, None], out=out)
        out += logdet
        out -= yy
        out *= -0.5
    return log_kappa, stats


def _entrywise_ldl(lam: dict, y: list):
    """log det Lambda and y' Lambda^-1 y of many small S x S systems stored entrywise, by
    Lambda = L' diag(d) L'^T (L' unit lower; no square roots): lam {(i, j): (...)} for
    i >= j, y [(...)] * S -> (log det, y' Lambda^-1 y), each (...).  At a tiny noise std
    the pivots d and w reach 1 / sigma^2 (1e160 at sigma = 1e-80): w (w / d) and a sum of
    logs keep every product within float64, where w^2 and prod d overflowed to inf.
    Lambda = I + A^T P_o A has pivots >= 1, each computed to about eps Lambda_jj; a pivot
    below 1/2 or within 1e3 eps Lambda_jj of 0 is rounding noise: the sum lost its identity
    (A^T P_o A ~1e13 times larger or more, fewer observed entries than S), which no later step
    can recover: CpadgnError."""
    S = len(y)
    Lu, d, w = {}, [], []
    for j in range(S):
        d.append(lam[j, j] - sum(Lu[j, k] * Lu[j, k] * d[k] for k in range(j)) if j else lam[0, 0])
        if bool(((d[j] < 0.5) | (d[j] < 1e3 * torch.finfo(d[j].dtype).eps * lam[j, j])).any()):
            raise CpadgnError("a row with missing entries is beyond float64 at this noise std (I + A^T P_o A "
                              "loses its identity to rounding where A^T P_o A is ~1e13 times larger); use a "
                              "larger --noise-std (README: Precision)")
        for i in range(j + 1, S):
            Lu[i, j] = (lam[i, j] - sum(Lu[i, k] * Lu[j, k] * d[k] for k in range(j))) / d[j]
    for i in range(S):
        w.append(y[i] - sum(Lu[i, k] * w[k] for k in range(i)) if i else y[0])
    logdet, yy = torch.log(d[0]), w[0] * (w[0] / d[0])
    for i in range(1, S):
        logdet = logdet + torch.log(d[i])
        yy = yy + w[i] * (w[i] / d[i])
    return logdet, yy


def _stats_factors(stats: torch.Tensor, S: int):
    """Pairs' statistics (P, S (S + 1) / 2 + S) from ``_log_kappa_incomplete`` -> whitened
    posterior means v = L^-1 y (P, S) and L (P, S, S), Lambda = L L^T."""
    tri = [(i, j) for i in range(S) for j in range(i + 1)]
    lam = torch.zeros((stats.shape[0], S, S), dtype=stats.dtype, device=stats.device)
    for k, (i, j) in enumerate(tri):
        lam[:, i, j] = lam[:, j, i] = stats[:, k]
    L = torch.linalg.cholesky(lam)
    v = torch.linalg.solve_triangular(L, stats[:, len(tri):, None], upper=False)[..., 0]
    return v, L


def _pair_gaussians_incomplete(tab: RegionTable, X: torch.Tensor, rows: torch.Tensor, regions: torch.Tensor,
                               max_bytes: float = 1e8):
    """(row, region) pairs of rows with missing entries (NaN): X (N, D), rows, regions (P,)
    -> log kappa (P,), the whitened posterior means v = L^-1 y (P, S) and L (P, S, S),
    Lambda_w,o = I + A_w^T P_o A_w = L L^T, y = A_w^T P_o (x - b_w); batched over the pairs
    (each distinct region's map computed once), in chunks of at most max_bytes.

    With B = P_o^1/2 A_w and r = P_o^1/2 (x - b_w) (D, zero where missing), one QR
    factorisation of the least-squares system min_z |z|^2 + |B z - r|^2 per pair,
        [[I, 0], [B, r]] = Q [[L^T, v], [0, rho]],
    gives Lambda = L L^T, v = L^-1 B^T r and rho^2 = |r|^2 - |v|^2 (the region's residual),
    so -2 log kappa = n_o log 2 pi + sum_o log sigma_o^2 + 2 log det L + rho^2.
    ``_log_kappa_incomplete``'s products, fine for bounds, round to eps |B|^2 per entry of
    Lambda and to eps |P_o^1/2 x|^2 in y and log kappa: where B^T B is (nearly) singular
    (fewer observed entries than S) the identity's unit eigenvalues drown at a small noise
    std (posterior means 1e-3 stds off at sigma = 1e-6), and uncentred x'P_o x ~ 1e14
    costs log kappa 0.05 nats at sigma = 1e-7.  Orthogonal transformations of B and the
    centred r round to eps times their own sizes."""
    P, S, D = rows.numel(), tab.S, tab.D
    dt, dev = X.dtype, X.device
    log_kappa = torch.empty(P, dtype=dt, device=dev)
    v = torch.empty((P, S), dtype=dt, device=dev)
    L = torch.empty((P, S, S), dtype=dt, device=dev)
    uniq, inverse = torch.unique(regions, return_inverse=True)
    A_u, b_u = tab.region_affine(uniq)                                 # (U, D, S), (U, D)
    A_u = A_u.transpose(1, 2).contiguous()                             # (U, S, D): contiguous gathers
    log_var, root_p = torch.log(tab.var), tab.var.rsqrt()
    zero = torch.zeros((), dtype=dt, device=dev)
    step = int(max(1, min(max_bytes, 2 ** 22) // (8.0 * (S + D) * (2 * S + 3))))
    for start in range(0, P, step):
        sl = slice(start, min(start + step, P))
        inv, x = inverse[sl], X[rows[sl]]
        obs = ~torch.isnan(x)
        w = obs * root_p                                               # (p, D) P_o^1/2
        Lt, v[sl], rho = _whitened_qr(A_u[inv] * w[:, None, :], torch.where(obs, x - b_u[inv], zero) * w)
        L[sl] = Lt.transpose(1, 2)
        const = obs.sum(1).to(dt) * LOG_2PI + (obs * log_var).sum(1)
        logdet = 2 * torch.log(torch.diagonal(Lt, dim1=1, dim2=2)).sum(1)
        log_kappa[sl] = -0.5 * (const + logdet + rho ** 2)
    return log_kappa, v, L


def _pair_gaussians_complete(tab: RegionTable, X: torch.Tensor, rows: torch.Tensor, regions: torch.Tensor,
                             max_bytes: float = 2 ** 21):
    """(row, region) pairs of complete rows: X (N, D), rows, regions (P,) -> log kappa (P,)
    and the whitened posterior means v (P, S) in the regions' own frames (tab.C), from the
    centred least-squares system of each pair, as ``_pair_gaussians_incomplete``.

    ``_log_kappa_complete``'s products, fine for bounds, are uncentred (x - b0, not
    x - b_w) and mix two roundings of A_w: L from [I; F M_w] and y from U^T P (x - b0),
    of size |A_w| |x - b0| / sigma^2, so that v erred by eps |A_w| |x - b0| / sigma^2
    along a direction A_w maps to ~sigma or less (1e-2 conditional stds at sigma = 1e-7,
    |x - b0| ~ 1) and log kappa by eps |x - b0|^2 / sigma^2 (0.1 nats).  Here, in the
    frame K of the output layer (``RegionTable._region_constants``): with
    P^1/2 (x - b0) = Q_basis t + e (t (K,), e outside U's range; a sparse U: t itself,
    e = 0), the pair's system is min_z |z|^2 + |B_w z - r|^2, r = t - Bc_w, and with the
    region's [I; B_w] = Q_w L^T (Q_w orthonormal to rounding), v = Q_w^T [0; r] and the
    residual [0; r] - Q_w v, of norm rho, are each exact for r perturbed by eps |r|, so
    -2 log kappa = const_w + 2 log det L + rho^2 + |e|^2 loses eps |r| rho, not eps |r|^2.
    Pairs go in chunks of at most max_bytes of gathers, which stay in cache."""
    P, S = rows.numel(), tab.S
    dt, dev = X.dtype, X.device
    urows, row_of = torch.unique(rows, return_inverse=True)
    y = (X[urows] - tab.b0) / tab.var.sqrt()                           # (n, D) P^1/2 (x - b0)
    if tab.Q_basis is None:
        t, outside = y, torch.zeros(y.shape[0], dtype=dt, device=dev)
    else:
        t = y @ tab.Q_basis                                            # (n, H)
        outside = ((y - t @ tab.Q_basis.T) ** 2).sum(1)                # |e|^2
    uniq, inverse = torch.unique(regions, return_inverse=True)
    log_kappa = torch.empty(P, dtype=dt, device=dev)
    v = torch.empty((P, S), dtype=dt, device=dev)
    # a streamed table rebuilds the frames, a region chunk at a time
    step = uniq.numel() if tab.frames is not None else tab.region_chunk
    for lo in range(0, uniq.numel(), step):
        Q, Bc = tab.pair_frames(uniq[lo:lo + step].cpu().numpy())
        logdet = 2 * torch.log(torch.diagonal(tab.chol_lambda[uniq[lo:lo + step]], dim1=1, dim2=2)).sum(1)
        pairs = torch.nonzero((inverse >= lo) & (inverse < lo + step))[:, 0] if step < uniq.numel() else None
        chunk = int(max(1, max_bytes // (8.0 * Q.shape[1] * (S + 2))))
        for start in range(0, P if pairs is None else pairs.numel(), chunk):
            sl = slice(start, min(start + chunk, P)) if pairs is None else pairs[start:start + chunk]
            inv, ro = inverse[sl] - lo, row_of[sl]
            r = (t[ro] - Bc[inv])[:, :, None]                          # (p, K, 1)
            Qw = Q[inv]                                                # (p, S + K, S)
            vs = torch.bmm(Qw[:, S:].transpose(1, 2), r)               # Q_w^T [0; r] (p, S, 1)
            res = torch.cat([torch.zeros_like(vs), r], 1).baddbmm_(Qw, vs, alpha=-1)   # [0; r] - Q_w v
            v[sl] = vs[..., 0]
            log_kappa[sl] = -0.5 * (tab.kappa_const0 + logdet[inv] + (res * res).sum((1, 2)) + outside[ro])
    return log_kappa, v


def _pair_facets(tab: RegionTable, L: torch.Tensor, regions: torch.Tensor):
    """``_whitened_facets`` of pairs whose posterior precision has its own factor L (P, S, S)
    (rows with missing entries): GC_unit (P, F, S), h_unit (P, F), real (P, F)."""
    return _whitened_facets(tab.G_t[regions], tab.h_t[regions], tab.mask_t[regions], _inverse_transpose(L))


def _pair_polygons(tab: RegionTable, L: np.ndarray, regions: np.ndarray):
    """S = 2: the whitened polygons (v = 0) of pairs whose posterior precision has its own
    factor L (P, 2, 2) (rows with missing entries), as ``RegionTable.polygons``, mapped from
    their regions' precomputed polygons instead of recomputing the facet segments.

    The pair's whitened frame is u' = C_p^-1 z = T u, T = C_p^-1 C_w = L^T C_w, u the
    region's.  A facet a . u <= c0 becomes (a T^-1) . u' <= c0 (normalised), and its
    segment point c0 a + t d maps to T (c0 a + t d), so t' = c0 d'.T a + t d'.T d with
    d'.T d > 0 (det T > 0 keeps the orientation): rays stay rays, empty segments empty."""
    a, d, c0, t_lo, t_hi, live, real = (x[regions] for x in tab.polygons)
    T = (np.swapaxes(L, 1, 2) @ tab.C[regions].cpu().numpy())[:, None]   # (P, 1, 2, 2)
    Tinv = np.linalg.inv(T)
    # 2 x 2 products written out: np.einsum / matmul are slow on many tiny matrices
    apply = lambda M, u: (M[..., 0, 0] * u[..., 0] + M[..., 0, 1] * u[..., 1],
                          M[..., 1, 0] * u[..., 0] + M[..., 1, 1] * u[..., 1])
    n0, n1 = apply(np.swapaxes(Tinv, -1, -2), a)                        # a T^-1
    norm = np.where(real, np.hypot(n0, n1), 1.0)
    a2 = np.where(real[..., None], np.stack([n0 / norm, n1 / norm], -1), 0.0)
    d2 = np.stack([-a2[..., 1], a2[..., 0]], -1)
    dot = lambda u: u[0] * d2[..., 0] + u[1] * d2[..., 1]
    shift, scale = c0 * dot(apply(T, a)), dot(apply(T, d))
    with np.errstate(invalid="ignore"):
        move = lambda t: np.where(real, np.where(np.isfinite(t), shift + t * scale, t), 0.0)
        return a2, d2, np.where(real, c0 / norm, 0.0), move(t_lo), move(t_hi), live, real


def _facet_bound(tab: RegionTable, v: torch.Tensor, regions: torch.Tensor, facets=None,
                 chunk: int = 65536) -> torch.Tensor:
    """log of the largest one-facet mass bound, min_k Phi(slack_k / std_k), for pairs with
    whitened posterior means v (P, S) in regions (P,) -> (P,).  facets: the pairs' own
    whitened facets (GC_unit, h_unit, real) (``_pair_facets``, rows with missing entries);
    None: the regions' (complete rows), gathered on pairs sorted by their regions' facet
    counts, each chunk's cut to its own largest count (the table is padded to the largest
    region's: at S = 3 32-32 16 facets against ~6 on average, ~2.5x the time)."""
    if tab.h_unit.shape[-1] == 0:
        return torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    if facets is not None:
        GC_unit, h_unit = facets[:2]
        return torch.special.log_ndtr((h_unit - (GC_unit @ v[:, :, None])[..., 0]).min(dim=-1).values)
    count = tab.n_facets_t[regions]
    order = torch.argsort(count)
    slack = torch.empty(regions.shape, dtype=v.dtype, device=v.device)
    for i in torch.split(order, chunk) if order.numel() else []:
        f, r = max(int(count[i[-1]]), 1), regions[i]
        # slice, then index_select: ~3x faster than the mixed index [r, :f] (same values)
        h, GC = tab.h_unit[:, :f].index_select(0, r), tab.GC_unit[:, :f].index_select(0, r)
        slack[i] = (h - (GC @ v[i][:, :, None])[..., 0]).min(dim=-1).values
    return torch.special.log_ndtr(slack)


def _nearest_point_bound(tab: RegionTable, v: np.ndarray, regions: np.ndarray, polygons=None) -> np.ndarray:
    """log Phi(-r) >= log Phi_w for pairs, r the distance from the
    posterior mean to the region in the whitened frame (0 inside): the region lies
    beyond the (hyper)plane through its nearest point.  v (P, S) -> (P,).  polygons: at
    S = 2 the pairs' own whitened polygons (``_pair_polygons``; rows with missing
    entries), None: the regions' (complete rows; S = 3 needs these).

    S = 2: the nearest point is on a facet the mean violates, so r = min over such facets
    of the distance to their segment.  S = 3: ``edges.distance_to_packed``, and for a
    bounded region also its volume times the largest density on it, phi_3(r) (much the
    sharper for regions small beside the posterior); a small relative slack keeps the
    bound above the mass despite rounding.  S >= 4 (complete rows): r from the dual of
    the least-distance problem (``polytope.distance_lower_bound``), certified below the
    distance whether or not the mode search is exact."""
    if tab.S >= 4:
        return _dual_distance_bound(tab, v, regions)[0]
    if tab.S == 3:
        dist = _distance_to_regions(tab, v, regions)
        r = np.maximum(dist * (1 - 1e-9) - 1e-9, 0.0)
        with np.errstate(divide="ignore"):
            log_volume = np.log(tab.polyhedra[3][regions]) + 1e-9
        if tab.degenerate is not None:                 # a missed edge could shrink the volume
            log_volume = np.where(tab.degenerate[regions], np.inf, log_volume)
        return np.minimum(np.where(dist > 0, log_ndtr(-r), 0.0), log_volume - 1.5 * LOG_2PI - 0.5 * r * r)
    _, c, t_lo, t_hi, live, real = _translated(tab, v, regions, polygons)
    with np.errstate(invalid="ignore"):
        t = np.clip(0.0, t_lo, t_hi)                                  # the segment point nearest the foot
    r2 = np.where(live & (c < 0), c * c + t * t, np.inf).min(-1)
    inside = ~(real & (c < 0)).any(-1)
    return np.where(inside, 0.0, log_ndtr(-np.sqrt(r2)))


def _unit_translates(tab: RegionTable, v: np.ndarray, regions: np.ndarray):
    """S >= 4, complete rows: the pairs' regions seen from their whitened means v (P, S),
    {u : a u <= b} with unit rows: a (P, F, S), b (P, F), real (P, F)."""
    a = tab.GC_unit[regions].cpu().numpy()
    c = tab.h_unit[regions].cpu().numpy()
    real = np.isfinite(c)
    return a, np.where(real, c, 1.0) - np.einsum("pfs,ps->pf", a, v), real


def _dual_distance_bound(tab: RegionTable, v: np.ndarray, regions: np.ndarray):
    """S >= 4, complete rows: ``_nearest_point_bound`` (P,) and the modes of the pairs'
    polytopes in the whitened frame, u = z - v (P, S; NaN where not certified), which
    the integral reuses (``polytope.polytope_qmc_draws``'s mode)."""
    r, mode = distance_lower_bound(*_unit_translates(tab, v, regions), with_mode=True)
    return np.where(r > 0, log_ndtr(-r), 0.0), mode


def _ascent_distance_bound(tab: RegionTable, v: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """S >= 4, complete rows: log Phi(-r) >= log Phi_w with r the dual-ascent distance
    bound (``polytope.dual_ascent_distance_bound``): v (P, S), regions (P,) -> (P,)."""
    r = dual_ascent_distance_bound(*_unit_translates(tab, v, regions))
    return np.where(r > 0, log_ndtr(-r), 0.0)


def _distance_to_regions(tab: RegionTable, v: np.ndarray, regions: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """S = 3: ``edges.distance_to_packed`` from v (P, 3) to the whitened regions (P,)
    (``RegionTable.packed_polyhedra``), on pairs sorted by their regions' edge and facet
    counts, each chunk's arrays cut to its own largest counts (the tables are padded to
    the largest region's: ~3x the mean).  (P,)."""
    facets, segments, n_facets, n_edges = tab.packed_polyhedra
    n_facets, n_edges = n_facets[regions], n_edges[regions]
    order = np.lexsort((n_facets, n_edges))
    dist = np.empty(regions.size)
    for i in np.array_split(order, -(-order.size // chunk)) if order.size else []:
        f, e, r = max(int(n_facets[i].max()), 1), max(int(n_edges[i].max()), 1), regions[i]
        dist[i] = distance_to_packed(facets[r, :f], segments[r, :e], v[i])
    return dist


def _pair_factors(tab: RegionTable, X: torch.Tensor, rows: torch.Tensor, regions: torch.Tensor,
                  complete: bool):
    """Posterior Gaussian N(C v, C C^T) of each (row, region) pair, Lambda = L L^T = (C C^T)^-1,
    and its log kappa, formed centred (``_pair_gaussians_complete``,
    ``_pair_gaussians_incomplete``; not the dense bounds' products).

    Returns v (P, S), C (P, S, S), L (P, S, S), log kappa (P,).  Complete rows share
    their regions' C and L (tab.C, tab.chol_lambda); rows with missing entries have their own.
    """
    if complete:
        lk, v = _pair_gaussians_complete(tab, X, rows, regions)
        return v, tab.C[regions], tab.chol_lambda[regions], lk
    lk, v, L = _pair_gaussians_incomplete(tab, X, rows, regions)
    return v, _inverse_transpose(L), L, lk


def pair_gaussians(tab: RegionTable, X: np.ndarray, rows: np.ndarray, regions: np.ndarray):
    """The untruncated posterior Gaussian N(mu_w(x), Lambda_w^-1) of (row, region) pairs.

    X (N, D) (NaN = missing), rows (P,) indices into X, regions (P,).  Returns mu (P, S)
    and the lower Cholesky factor L of Lambda_w (P, S, S) as numpy, Sigma_w = (L L^T)^-1.
    """
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64), device=tab.device)
    rows_t = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=tab.device)
    regions_t = torch.as_tensor(np.asarray(regions, dtype=np.int64), device=tab.device)
    complete = not bool(torch.isnan(Xt[rows_t]).any()) if rows_t.numel() else True
    v, C, L, _ = _pair_factors(tab, Xt, rows_t, regions_t, complete)
    return (C @ v[:, :, None])[..., 0].cpu().numpy(), L.cpu().numpy()


def _truncated_moments(tab: RegionTable, v: torch.Tensor, C: torch.Tensor, regions: np.ndarray,
                       moments: bool, complete: bool, memory_budget: float | None = None, polygons=None,
                       pilot: list | None = None, qmc: tuple = (2 ** 12, 0, 16), mode: np.ndarray | None = None,
                       geometry: QMCGeometry | None = None, ids: np.ndarray | None = None):
    """Mass and moments of N(C v, C C^T) on each pair's region.

    With z = C (v + u), u ~ N(0, I), the facets G z <= h become (G C) u <= h - G C v; for
    complete rows (C fixed per region) and S = 2 that is the region's precomputed
    whitened polygon translated by -v; rows with missing entries may pass their pairs'
    own whitened polygons (``_pair_polygons``).  Returns log Phi (P,), E[z|w] (P, S),
    Cov[z|w] (P, S, S), stderr (P,) as numpy and the Monte Carlo covariances
    (``_in_latent``).  memory_budget: bytes for the S >= 3 integrals' working arrays.
    S >= 4 (randomised QMC): qmc = (points per pair, seed, sets; S = 3 ignores the sets);
    with a list ``pilot``, the first stage instead (``_qmc_first_stage``), whose
    independent pilot (log Phi (P,), its stderr (P,)) and the pairs' QMC geometry
    (``polytope.QMCGeometry``) are appended to the list.  mode (P, S): the S >= 4 pairs'
    modes in the whitened frame where known (NaN: not known; ``_dual_distance_bound``),
    checked before use; geometry: their QMC geometry where the first stage's was kept
    (``_GeometryStore``; the rest is found anew); ids (P,): the pairs' identities
    (``_pair_ids``), which key their QMC points (S >= 4 only; required there).
    """
    v, C = v.cpu().numpy(), C.cpu().numpy()
    if (complete and tab.polygons is not None) or polygons is not None:
        res = _translated_polygons(tab, v, regions, moments, polygons)
    elif complete and tab.polyhedra is not None:
        fp = _facet_polygons(tab)
        res = _in_threads(lambda r, w: translated_polyhedron_moments(fp, r, w, moments), regions, v)
        # A zero-width region (two facets on one plane, e.g. relu(c relu(u)) after relu(u))
        # has facet polygons that rounding makes anything; the translated formula gave such
        # regions half of the Gaussian.  The few flagged regions go through the direct routine.
        thin = np.flatnonzero(tab.degenerate[regions]) if tab.degenerate is not None else regions[:0]
        if thin.size:
            A, b = _whitened_regions(tab, v[thin], C[thin], regions[thin])
            direct = polytope_moments(A, b, tab.mask[regions[thin]], moments=moments, memory_budget=memory_budget)
            res.put(thin, direct)
    else:
        A, b = _whitened_regions(tab, v, C, regions)
        known = np.full(v.shape, np.nan) if mode is None else mode
        if pilot is not None and tab.S >= 4:
            res, pil, geo = _in_threads(_qmc_first_stage, A, b, tab.mask[regions], known, ids, moments=moments,
                                        memory_budget=memory_budget)
            pilot.append((pil.log_mass, pil.stderr, geo))
        elif tab.S >= 4:
            geometry = QMCGeometry.unknown(regions.size, tab.S) if geometry is None else geometry
            res = _in_threads(_qmc_one, A, b, tab.mask[regions], known, geometry, ids, draw=(qmc[0], qmc[1], moments),
                              memory_budget=memory_budget, n_randomisations=qmc[2],
                              min_pairs=max(1, 2 ** 18 // qmc[0]))       # threads where the points are
        else:
            res = _in_threads(polytope_moments, A, b, tab.mask[regions], moments=moments,
                              memory_budget=memory_budget, n_qmc=qmc[0], seed=qmc[1])
    return _in_latent(tab, regions, res, v, C)


def _whitened_regions(tab: RegionTable, v: np.ndarray, C: np.ndarray, regions: np.ndarray):
    """The pairs' regions G z <= h seen by u = C^-1 z - v ~ N(0, I): A = G C (P, F, S),
    b = h - A v (P, F), for whitened means v (P, S) and factors C (P, S, S)."""
    A = tab.G[regions] @ C
    return A, tab.h[regions] - (A @ v[:, :, None])[..., 0]


def _in_latent(tab: RegionTable, regions: np.ndarray, res: PolytopeMoments, v: np.ndarray, C: np.ndarray):
    """``_truncated_moments``'s outputs from the whitened integrals res of pairs (P, ...)
    with whitened means v (P, S) and factors C (P, S, S): z = C (v + u).  A covariance
    that is all 0 (the integrals without moments) stays 0 without the products.  The last
    output, mc: None where exact, else the randomisation covariances of the estimates of
    E[z|w] (P, S, S) and of log Phi with E[z|w] (P, S)."""
    log_phi = res.log_mass
    if tab.degenerate is not None:     # a zero-width region has zero mass, not NaN
        log_phi = np.where(np.isnan(log_phi) & tab.degenerate[regions], -np.inf, log_phi)
    none = np.isneginf(log_phi)
    mean = np.where(none[:, None], 0.0, (C @ (v + res.mean)[:, :, None])[..., 0])
    cov = np.where(none[:, None, None], 0.0, C @ res.cov @ np.swapaxes(C, 1, 2)) if res.cov.any() else \
        np.zeros(res.cov.shape)
    mc = None
    if res.mean_cov is not None:
        mc = (np.where(none[:, None, None], 0.0, C @ res.mean_cov @ np.swapaxes(C, 1, 2)),
              np.where(none[:, None], 0.0, (C @ res.mass_mean_cov[:, :, None])[..., 0]))
    elif tab.S >= 4:        # only regions without facets (all of R^S, exact): zero covariances
        mc = (np.zeros(cov.shape), np.zeros(mean.shape))
    return log_phi, mean, cov, res.stderr, mc


CHEAP_POINTS = 128      # S >= 4: plain Monte Carlo points of a pair that matters little (``_cheap_pairs``)


def _cheap_moments(tab: RegionTable, v: torch.Tensor, C: torch.Tensor, regions: np.ndarray, mode: np.ndarray,
                   ids: np.ndarray, memory_budget: float | None = None, moments: bool = True):
    """``_truncated_moments`` of pairs by ``polytope.halfspace_mc`` (CHEAP_POINTS points)
    from their certified modes (P, S), finite and nonzero; ids (P,): the pairs'
    identities (``_pair_ids``); memory_budget: bytes of its working arrays; moments:
    False for the mass alone (zero moments, as ``_truncated_moments``')."""
    v, C = v.cpu().numpy(), C.cpu().numpy()
    A, b = _whitened_regions(tab, v, C, regions)
    res = _in_threads(_cheap_mc, A, b, tab.mask[regions], mode, ids, min_pairs=2048, memory_budget=memory_budget,
                      moments=moments)
    return _in_latent(tab, regions, res, v, C)


def _cheap_pairs(rows: torch.Tensor, log_var: torch.Tensor, candidate: torch.Tensor, log_p: torch.Tensor,
                 spent: torch.Tensor, stderr_target: float, n: int) -> torch.Tensor:
    """Which candidate pairs (P,) may take the cheap estimate (``_cheap_moments``): per
    row, those of smallest certified variance log_var (P,; log of that of kappa Phi)
    whose variances, with the row's spent (n,; log) ones, sum to at most
    (stderr_target / 16)^2 p^2 (p: the row's running estimate log_p (n,), which only
    grows): a quarter of the standard error the second stage plans for (stderr_target /
    4), which it makes at most 3% larger in quadrature."""
    budget = 2.0 * (log_p + float(np.log(stderr_target / 16)))
    with np.errstate(invalid="ignore"):
        left = torch.where(spent < budget, budget + torch.log1p(-torch.exp(spent - budget)), -torch.inf)
    return _smallest_within(rows, log_var, candidate, left, n)


QMC_FIRST = 32          # S >= 4: points per pair of the first stage and of its pilot (16 sets of 2)


def _row_ids(X: torch.Tensor) -> np.ndarray:
    """A 64-bit identity (n,) uint64 of each row of X (n, D), from its values (NaN made
    canonical): equal rows, equal identities."""
    x = X.cpu().numpy()
    return content_hash(np.where(np.isnan(x), np.nan, x))


def _pair_ids(row_ids: np.ndarray, rows: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """The identities (P,) uint64 of (row, region) pairs, rows (P,) into row_ids (n,)
    (``_row_ids``), regions (P,).  They key the pairs' QMC points
    (``polytope.polytope_qmc_draws``' ids), so that a pair gets the same points in any
    chunk, batch, budget or Dask partition, and a row the same log p up to rounding (a
    polytope's bits, the default key, change with the batch's rounding)."""
    return combine_ids(row_ids[rows], np.asarray(regions, dtype=np.uint64))


def _cheap_mc(A, b, mask, mode, ids, memory_budget: float | None = None, moments: bool = True):
    """``polytope.halfspace_mc`` with CHEAP_POINTS points of the polytopes' identities ids."""
    return halfspace_mc(A, b, mask, mode, CHEAP_POINTS, memory_budget=memory_budget, ids=ids, moments=moments)


def _qmc_first_stage(A, b, mask, mode, ids, moments: bool, memory_budget: float | None = None):
    """S >= 4 first stage: an estimate (seed 0) and an independent pilot of the mass
    (seed 1), QMC_FIRST points each, on one geometry (``polytope.polytope_qmc_draws``;
    mode (P, S) its known modes, NaN rows where not known; ids (P,) the polytopes'
    identities), and that geometry."""
    (res, pil), geo = polytope_qmc_draws(A, b, mask, [(QMC_FIRST, 0, moments), (QMC_FIRST, 1, False)],
                                         memory_budget, mode, with_geometry=True, ids=ids)
    return res, pil, geo


def _qmc_one(A, b, mask, mode, geometry, ids, draw: tuple, memory_budget: float | None = None,
             n_randomisations: int = 16):
    """S >= 4: one draw (n_qmc, seed, moments) of ``polytope.polytope_qmc_draws`` with known
    modes, the QMC geometry where known (``polytope.QMCGeometry``) and identities ids."""
    return polytope_qmc_draws(A, b, mask, [draw], memory_budget, mode, n_randomisations, geometry, ids=ids)[0]


QMC_SECOND_PILOT = 1024     # S >= 4: the second pilot's points (16 sets of 64), for the pairs that carry rows:
SECOND_PILOT_SHARE = 1e-3   # those whose first pilot gives them at least this responsibility


def _refine_qmc_pairs(tab, Xt, complete, found, modes, log_kappa, pilot_logw, pilot_se, cheap,
                      stderr_target, moments, pair_chunk, poly_budget, store=None):
    """S >= 4 second stage: more points for the pairs that dominate their row's variance.

    found: the first stage's rows, regions, log(kappa Phi), E[z|w], Cov[z|w], stderr, the
    Monte Carlo covariances of E[z|w] and of log Phi with E[z|w] (P, ...); modes (P, S):
    the pairs' known modes (``_truncated_moments``); log_kappa, pilot_logw, pilot_se (P,):
    the pairs' log kappa and their first pilots' log(kappa Phi) and relative SE (QMC_FIRST
    points); cheap (P,) bool: the pairs of ``_cheap_pairs``; store: the first stage's QMC
    geometries that were kept (``_GeometryStore``), reused by both integrals below.

    The pairs (not cheap) that their first pilot gives a responsibility of at least
    SECOND_PILOT_SHARE in their row get a second, independent pilot of QMC_SECOND_PILOT
    points (seed 3).  A 32-point pilot (16 sets of 2 points) misses, in most draws, the
    small part of the cube where such a pair's integrand varies: on the 200 digits test
    rows of an S = 4 8-8 EM model the 32-point SE of the dominant pairs was 18x below
    their true spread in the median (ranging over 4 decades), and their error fell like
    n^-0.5 to n^-0.75 (40 independent draws at 32 to 8,192 points), not 1/n, so 32 of
    the 200 rows ended above the target (up to 7.1x; with the second pilot 2 to 3, where
    a spike of the integrand hit by about one point in 1,000 was missed by the pilots:
    README, Limits).  Each
    such pair's rate constant is the larger of its two pilots' c = SE x points (c grows
    with n where the error falls slower than 1/n, so the larger is the one nearer the
    truth).  The pilots set each pair's point count and sets (``qmc_allocation.qmc_sets``,
    ``qmc_allocation.qmc_allocation``, aiming at stderr_target per row); a pair that gets
    points is integrated anew with them (seed 2) and that estimate replaces its first
    stage, the others keep theirs.

    Unbiased: every decision (which pairs get a second pilot: the first pilots; the
    points and sets: both pilots) depends only on the pilots' points (seeds 1 and 3), and
    every estimate kept (first stage, seed 0, or second stage, seed 2) comes from
    independently scrambled points, so given the pilots each kept estimate has mean
    kappa Phi, and so has it unconditionally.  The pilots are never part of an estimate:
    pooling a pilot, or a first stage that a decision saw, with the estimate would bias
    it, and so would a top-up decided on the kept estimates themselves.  (The cheap
    pairs' pilots are their estimates with SE 0: they are never refined, whatever their
    values.)  Returns found updated.
    """
    from .qmc_allocation import pilot_responsibilities, qmc_allocation, qmc_sets
    rows, regions, logw, mean, cov, se, mean_mc, cross_mc = (x.copy() for x in found)
    pilot_logw, c = pilot_logw.copy(), pilot_se * QMC_FIRST
    n_pilot = np.full(rows.size, QMC_FIRST)
    heavy = np.flatnonzero(~cheap & (pilot_responsibilities(rows, pilot_logw, Xt.shape[0]) >= SECOND_PILOT_SHARE))
    if heavy.size:
        log_phi, _, _, rel_se, _, _ = _integrate_pairs(tab, Xt, complete, rows, regions, modes,
                                                       heavy, (QMC_SECOND_PILOT, 3, 16), False, pair_chunk,
                                                       poly_budget, store)
        ok = np.isfinite(log_phi)
        heavy = heavy[ok]
        pilot_logw[heavy] = log_kappa[heavy] + log_phi[ok]
        c[heavy] = np.maximum(c[heavy], rel_se[ok] * QMC_SECOND_PILOT)
        n_pilot[heavy] = QMC_SECOND_PILOT
    pilot = (rows, pilot_logw, c / n_pilot, n_pilot, QMC_FIRST, stderr_target, Xt.shape[0])
    sets = qmc_sets(*pilot)
    n_pts = qmc_allocation(*pilot, n_randomisations=sets)
    for n, n_sets in np.unique(np.stack([n_pts, sets], 1)[n_pts > 0], axis=0):
        sel = np.flatnonzero((n_pts == n) & (sets == n_sets))
        log_phi, mean[sel], cov[sel], se[sel], mean_mc[sel], cross_mc[sel] = _integrate_pairs(
            tab, Xt, complete, rows, regions, modes, sel, (int(n), 2, int(n_sets)), moments,
            pair_chunk, poly_budget, store)
        logw[sel] = log_kappa[sel] + log_phi
    return [rows, regions, logw, mean, cov, se, mean_mc, cross_mc]


def _integrate_pairs(tab, Xt, complete, rows, regions, modes, which, qmc, moments, pair_chunk,
                     poly_budget, store=None):
    """S >= 4: ``_truncated_moments`` of the pairs which (P,), indices into the first
    stage's rows, regions (with known modes (., S) and geometries in store, where kept)
    with one QMC draw qmc = (points, seed, sets), in chunks of about pair_chunk
    first-stage pairs' worth of points.  Returns log Phi (P,), E[z|w] (P, S), Cov[z|w]
    (P, S, S), relative stderr (P,) and the Monte Carlo covariances of E[z|w] (P, S, S)
    and of log Phi with E[z|w] (P, S)."""
    dev, row_ids = Xt.device, _row_ids(Xt)
    step = int(max(1, pair_chunk * QMC_FIRST // qmc[0]))
    parts = []
    for p0 in range(0, which.size, step):
        stop_check()
        sl = which[p0:p0 + step]
        rows_t, regions_t = torch.as_tensor(rows[sl], device=dev), torch.as_tensor(regions[sl], device=dev)
        v, C, _, _ = _pair_factors(tab, Xt, rows_t, regions_t, complete)
        *res, mc = _truncated_moments(tab, v, C, regions[sl], moments, complete, poly_budget, qmc=qmc,
                                      mode=modes[sl], geometry=None if store is None else store.take(sl),
                                      ids=_pair_ids(row_ids, rows[sl], regions[sl]))
        parts.append((*res, *mc))
    return tuple(np.concatenate(x) for x in zip(*parts))


class _GeometryStore:
    """The S >= 4 first stage's QMC geometries (``polytope.QMCGeometry``) of its pairs, kept
    for the second stage (``_refine_qmc_pairs``: the second pilot and the final draws
    integrate some of the same pairs, whose geometry does not depend on the points).
    At most max_bytes: beyond it the pairs whose first pilot weighs least against their
    row's running p go (those are the least likely to be refined), and the second stage
    finds theirs anew.  Which pairs are kept changes the cost only, never a result."""

    def __init__(self, max_bytes: float, S: int):
        self.max_bytes, self.S = max_bytes, S
        self.index, self.rows, self.logw = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        self.parts, self.nbytes = [], 0

    def add(self, index: np.ndarray, rows: np.ndarray, pilot_logw: np.ndarray, geo: QMCGeometry,
            log_p: np.ndarray):
        """Keep the geometry geo of the first-stage pairs index (P,; increasing, above those
        kept) of rows (P,) with first-pilot log(kappa Phi) pilot_logw (P,); log_p (n,): the
        rows' running estimates."""
        self.index, self.rows = np.concatenate([self.index, index]), np.concatenate([self.rows, rows])
        self.logw = np.concatenate([self.logw, pilot_logw])
        self.parts.append(geo)
        self.nbytes += geo.nbytes()
        if self.nbytes > self.max_bytes:
            joined = self._joined()
            keep = int(self.max_bytes // max(1.0, joined.nbytes() / max(1, len(joined))))
            with np.errstate(invalid="ignore"):
                priority = np.nan_to_num(self.logw - log_p[self.rows], nan=-np.inf)
            kept = np.sort(np.argsort(-priority, kind="stable")[:keep])
            self.index, self.rows, self.logw = self.index[kept], self.rows[kept], self.logw[kept]
            self.parts = [joined[kept]]
            self.nbytes = self.parts[0].nbytes()

    def _joined(self) -> QMCGeometry:
        if len(self.parts) != 1:
            self.parts = [QMCGeometry.concat(self.parts) if self.parts else QMCGeometry.unknown(0, self.S)]
        return self.parts[0]

    def take(self, index: np.ndarray) -> QMCGeometry:
        """The geometries of first-stage pairs index (P,), unknown where not kept."""
        out = QMCGeometry.unknown(index.size, self.S)
        if self.index.size == 0:
            return out
        pos = np.minimum(np.searchsorted(self.index, index), self.index.size - 1)
        hit = np.flatnonzero(self.index[pos] == index)
        return out.merged(self._joined()[pos[hit]], hit) if hit.size else out


_FACET_POLYGONS_LOCK = threading.Lock()


def _facet_polygons(tab: RegionTable):
    """The S = 3 regions' whitened facet polygons (``polyhedron.region_facet_polygons``),
    found on first use and kept on the table: a complete-row pair is its region's
    polyhedron translated by -v."""
    with _FACET_POLYGONS_LOCK:
        if getattr(tab, "facet_polygons", None) is None:
            a, c, real, _ = tab.polyhedra
            tab.facet_polygons = region_facet_polygons(a, c, real)
    return tab.facet_polygons


def _translated_polygons(tab: RegionTable, v: np.ndarray, regions: np.ndarray, moments: bool, polygons=None):
    """``polygon_moments`` of each region's whitened polygon (or the pairs' own
    ``polygons``) translated by -v (P, S), in groups of equal facet count (padding dropped)."""
    return solve_in_groups(lambda *x: _in_threads(polygon_moments, *x, moments=moments),
                           tab.polygon_size[regions], _translated(tab, v, regions, polygons))


def _translated(tab: RegionTable, v: np.ndarray, regions: np.ndarray, polygons=None):
    """The whitened polygons of regions (P,) (or the pairs' own ``polygons``, see
    ``_pair_polygons``) translated by -v (P, 2), as ``polygon_moments`` takes them:
    a, c, t_lo, t_hi, live, real (P, F, ...).  Translating by -v moves each facet's offset
    by -a.v and its segment by -d.v."""
    a, d, c0, t_lo, t_hi, live, real = (x[regions] for x in tab.polygons) if polygons is None else polygons
    av, dv = np.einsum("pfs,ps->pf", a, v), np.einsum("pfs,ps->pf", d, v)
    return a, c0 - av, t_lo - dv, t_hi - dv, live, real


def _in_threads(solve, *arrays, min_pairs: int = 4096, max_part: int = 16384, **kw) -> PolytopeMoments:
    """solve(*arrays, **kw) on slices of the pairs (the arrays' first axis) over torch's
    thread count (numpy releases the GIL in its array loops, so threads scale on these
    independent integrals).  Slices of at most max_part pairs, so that a stop request
    (``stop.stop_check``) is seen between them.  A ``memory_budget`` in kw is shared
    by the threads."""
    n = arrays[0].shape[0]
    workers = min(torch.get_num_threads(), n // min_pairs)
    if workers <= 1:
        return solve(*arrays, **kw)
    if kw.get("memory_budget") is not None:
        kw = {**kw, "memory_budget": kw["memory_budget"] / workers}
    parts = np.array_split(np.arange(n), max(2 * workers, -(-n // max_part)))

    def part(i):
        stop_check()
        return solve(*(x[i] for x in arrays), **kw)
    with closing(map_in_threads(part, [(i,) for i in parts], workers)) as results:
        res = list(results)
    return _concat_moments(res)


def _concat_moments(parts: list):
    """PolytopeMoments (or QMCGeometry) of consecutive slices (or tuples of them) joined."""
    if isinstance(parts[0], tuple):
        return tuple(_concat_moments([p[k] for p in parts]) for k in range(len(parts[0])))
    return type(parts[0]).concat(parts)


def posterior(net: PiecewiseAffineNet, part: Partition, noise_std: np.ndarray, X: np.ndarray, *,
              tab: RegionTable | None = None, device: torch.device | str = "cpu",
              rtol: float = 1e-10, memory_budget: float = 2e9, moments: bool = True,
              progress=None, stderr_target: float = 1e-4, pairs: bool = True) -> PosteriorResult:
    """Exact log p(x_o), responsibilities and E[z|x], Cov[z|x] for every row of X (N, D).

    NaN entries of X are missing; a row with nothing observed has log p = NaN (there is
    nothing to score) and the prior as posterior.  Pairs are pruned only while the certified bounds of the skipped
    ones sum to at most rtol p(x) (``error_bound``, at most log(1 + rtol) nats; 0 < rtol < 1).  ``progress(done_rows, total_rows)``
    is called after each chunk.  stderr_target (S >= 4, nats): the standard error of
    log p(x) each row's randomised-QMC integrals aim at (``_refine_qmc_pairs``; the
    reported ``stderr`` is the one achieved).  memory_budget bounds the working arrays (bytes,
    counted as at least MIN_CHUNK_BUDGET; at S >= 3 half of it goes to the pair integrals).  Ctrl-C stops the worker threads
    within a fraction of a second (``stop``).  pairs=False leaves the pair fields empty: they
    take 8 (S^2 + S + 3) bytes per evaluated (row, region) pair (tens to thousands a row), so
    the per-row results alone keep a long run within the budget.  Rows equal bit for bit
    (NaN in the same places) are scored once and share their results bit for bit, each
    with its own copy of the pairs (``distinct_rows``).
    """
    if not (isinstance(stderr_target, Real) and 0 < stderr_target < np.inf):
        raise CpadgnError(f"stderr_target must be a positive number of nats (e.g. 1e-4), got {stderr_target!r}")
    if not (isinstance(rtol, Real) and 0 < rtol < 1):       # numpy's floats too
        raise CpadgnError(f"rtol must be a number in (0, 1), got {rtol!r}; the default 1e-10 makes "
                          "each log-likelihood exact to log(1 + 1e-10) nats")
    device = torch.device(device)
    X = np.asarray(X, dtype=np.float64)
    check_representable(X, net.biases[-1], noise_std, memory_budget=memory_budget)   # else log p overflows
    tab = tab or RegionTable(net, part, noise_std, device, memory_budget)
    # each distinct row is scored once and its results copied to its equals: equal rows,
    # equal bits (BLAS's blocking of the dense (row, region) products and so the pruning
    # depend on a row's place in its chunk, ~1e-13 nats)
    first, inverse = distinct_rows(X, memory_budget)
    stands_for = np.bincount(inverse, minlength=first.size)    # (M,) how many rows of X each is
    # the distinct rows are X[first], taken chunk by chunk (a copy of them all would be
    # a second copy of the data, outside the budget)
    N, S, R = first.size, net.latent_dim, part.n_regions
    out = _empty_result(N, S)
    complete_rows = np.concatenate([~np.isnan(X[b]).any(axis=1) for b in row_blocks(X, memory_budget)])[first]
    # On the CPU two chunks run at once, so one chunk's polygon integrals (numpy, off the
    # GIL) overlap the other's dense work; rows per chunk keep both within the budget.
    workers = 2 if device.type == "cpu" and torch.get_num_threads() > 1 else 1
    F = tab.G.shape[1]
    sizing = max(memory_budget, MIN_CHUNK_BUDGET)
    per_worker = sizing / workers / (2 if tab.streamed else 1)   # streamed: half for the region maps
    poly_budget = None
    if S <= 2:
        per_row = 8.0 * R * (3 * S + 8)
        pair_chunk = int(max(1024, sizing // (8.0 * (6 * max(F, 1) ** 2 + 20 * max(F, 1) + 8 * S * S))))
    else:   # a half for the rows' (row, region) arrays, a quarter each for the pairs and their integrals
        per_row = 8.0 * R * (S * S + 2 * S + 16 + (S * S + S + 1 if S >= 4 else 0))   # dense bounds, listing, results
        per_worker /= 2
        pair_chunk = int(max(1, per_worker / 2 // (8.0 * (6 * F * F + 2 * F * S + 3 * F + 6 * S * S + 4 * S + 10))))
        poly_budget = per_worker / 2
    chunk = int(max(1, min(-(-N // (2 * workers)), per_worker // per_row)))
    # incomplete rows, per region of a chunk (``_log_kappa_incomplete``): the maps M, c and
    # A, b, the Gram and linear tables, and the (row, region) outputs; a quarter of a worker's share
    T, H = S * (S + 1) // 2, tab.U.shape[1]
    per_region = 8.0 * ((H + tab.D) * (S + 1) + (tab.D + 1) * T + 2 * tab.D * (S + 1) + chunk * (2 * T + 2 * S + 2))
    region_chunk = int(max(1, per_worker / 4 // per_region))

    def run(complete, idx):
        Xt = torch.as_tensor(X[first[idx]], device=device)
        found = _evaluate_pairs(tab, Xt, complete, rtol, region_chunk, pair_chunk, moments, poly_budget,
                                stderr_target)
        kept = _summarise(*found, Xt, idx, out)            # fills out[idx]; chunks are disjoint
        return kept if pairs else None

    jobs = [(complete, idx[start:start + chunk]) for complete in (True, False)
            for idx in [np.flatnonzero(complete_rows == complete)] for start in range(0, idx.size, chunk)]
    kept = []
    done = 0
    # on an error or Ctrl-C, queued chunks do not run and running ones stop at their next check
    with closing(map_in_threads(run, jobs, workers)) as results:
        for job, res in zip(jobs, results):
            if pairs:
                kept.append(res)
            done += int(stands_for[job[1]].sum())
            if progress is not None:
                progress(done, X.shape[0])
    if kept:
        joined = list(map(np.concatenate, zip(*kept)))
        kept.clear()                                         # the chunks' pairs, now joined
        (out.pair_row, out.pair_region, out.pair_responsibility, out.pair_mean, out.pair_cov) = joined[:5]
        if len(joined) > 5:
            out.pair_weight_stderr, out.pair_mean_mc_cov, out.pair_weight_mean_mc_cov = joined[5:]
    if S >= 4 and out.pair_weight_stderr is None:
        out.pair_weight_stderr, out.pair_weight_mean_mc_cov = np.zeros(0), np.zeros((0, S))
        out.pair_mean_mc_cov = np.zeros((0, S, S))
    out.rounding_error = rounding_error_estimate(X, net.biases[-1], noise_std, tab.U.shape[1], memory_budget)[first]
    return out if first.size == X.shape[0] else _copied_to_equals(out, inverse)


def distinct_rows(X: np.ndarray, memory_budget: float = 2e9):
    """The distinct rows of X (N, D) float64, bit for bit once NaN and -0 are made canonical
    (rows with NaN in the same places and equal values elsewhere are equal): first (M,),
    the index of each one's first occurrence, ascending, and inverse (N,), each row's
    distinct row, so that X[first][inverse] equals X.  O(N D + N log N): rows grouped by a
    64-bit hash of their bits, the groups checked bit for bit (a collision falls back to
    sorting the rows' bytes), in blocks of rows whose copies (about 4 of a block at once,
    4.1 measured) fit memory_budget (counted as at least MIN_CHUNK_BUDGET); beyond them it
    holds 8 bytes a row, a few times over (the hashes and their sort)."""
    N, D = X.shape
    if N <= 1 or D == 0:
        return np.arange(N), np.arange(N)
    step = max(1, int(max(memory_budget, MIN_CHUNK_BUDGET) // (5 * 8 * D)))
    blocks = [slice(s, s + step) for s in range(0, N, step)]
    _, first, inverse = np.unique(np.concatenate([content_hash(_canonical(X[b]).view(np.float64)) for b in blocks]),
                                  return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    if not all((_canonical(X[b]) == _canonical(X[first[inverse[b]]])).all() for b in blocks):   # a collision
        _, first, inverse = np.unique(_canonical(X).view(np.dtype((np.void, 8 * D))).ravel(), return_index=True,
                                      return_inverse=True)
    if first.size == N:
        return np.arange(N), np.arange(N)
    order = np.argsort(first)                                # renumbered in order of first occurrence
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return first[order], rank[inverse.ravel()]


def _canonical(X: np.ndarray) -> np.ndarray:
    """The bits (n, D) uint64 of rows X (n, D), every NaN one NaN and -0 as 0."""
    return np.ascontiguousarray(np.where(np.isnan(X), np.nan, X + 0.0)).view(np.uint64)


def _copied_to_equals(res: PosteriorResult, inverse: np.ndarray) -> PosteriorResult:
    """The result res of distinct rows (M) given to the N rows they stand for, inverse (N,)
    (``distinct_rows``): per-row fields indexed by inverse, and each row its own copy of
    its distinct row's pairs, listed row by row (pair_row into the N rows)."""
    per_row = ("log_likelihood", "error_bound", "stderr", "n_observed", "z_mean", "z_cov", "top_region",
               "top_responsibility", "n_pairs", "rounding_error")
    out = {f: getattr(res, f)[inverse] for f in per_row}
    order = np.argsort(res.pair_row, kind="stable")          # the distinct rows' pairs, row by row
    per_distinct = np.bincount(res.pair_row, minlength=res.n_pairs.size)     # 0 with pairs=False
    start = np.cumsum(per_distinct) - per_distinct
    count = per_distinct[inverse]
    # pair k of row i: the distinct row's pair start[inverse[i]] + (k - offset[i])
    offset = np.cumsum(count) - count
    take = order[np.repeat(start[inverse] - offset, count) + np.arange(count.sum())]
    out["pair_row"] = np.repeat(np.arange(inverse.size), count)
    for f in ("pair_region", "pair_responsibility", "pair_mean", "pair_cov", "pair_weight_stderr",
              "pair_mean_mc_cov", "pair_weight_mean_mc_cov"):
        v = getattr(res, f)
        out[f] = None if v is None else v[take]
    return PosteriorResult(**out)


def _empty_result(N: int, S: int) -> PosteriorResult:
    return PosteriorResult(
        log_likelihood=np.zeros(N), error_bound=np.zeros(N), stderr=np.zeros(N),
        n_observed=np.zeros(N, dtype=np.int64), z_mean=np.zeros((N, S)),
        z_cov=np.zeros((N, S, S)), top_region=np.zeros(N, dtype=np.int64),
        top_responsibility=np.zeros(N), n_pairs=np.zeros(N, dtype=np.int64), pair_row=np.zeros(0, dtype=np.int64),
        pair_region=np.zeros(0, dtype=np.int64), pair_responsibility=np.zeros(0),
        pair_mean=np.zeros((0, S)), pair_cov=np.zeros((0, S, S)))


def _evaluate_pairs(tab, Xt, complete, rtol, region_chunk, pair_chunk, moments, poly_budget=None,
                    stderr_target=1e-4):
    """The (row, region) pairs of rows Xt (n, D) that p(x) needs to a relative rtol, integrated.

    Every pair has a cheap dense bound, log kappa (Phi <= 1; ``_log_kappa_complete``,
    ``_log_kappa_incomplete``).  Pairs whose dense bound is within reach are *listed* and
    get the sharper facet bound (``_facet_bound``; rows with missing entries with their
    pairs' own whitened facets, ``_pair_facets``); listed pairs are integrated in
    decreasing bound order, margins
    -log(rtol) + 3, then doubling (S >= 3: 8 nats first, for an estimate of p, and each
    round leaves out the smallest bounds that together fit in half of rtol p); a
    pair about to be integrated first gets the nearest-point bound
    (``_nearest_point_bound``, ~3 nats above the truth against ~20 for the facet bound;
    rows with missing entries: S = 2 only), which often lets it be skipped after all
    (S >= 4: first the dual-ascent bound, ``_ascent_distance_bound``, ~1/7 the cost of
    the mode search, which then runs only on the pairs still to be integrated: on the
    S = 4 16-16 benchmark 9.4k pairs a row instead of 22.6k).
    A row is done when its unlisted dense bounds plus its listed-but-skipped bounds sum
    to at most rtol p(x); the listing threshold log p + log rtol - log R - 1 certifies the
    unlisted part on its own.  Returns numpy rows, regions, log(kappa Phi), E[z|w],
    Cov[z|w], stderr, log of a certified variance of kappa Phi (-inf: none) per integrated
    pair and the per-row bound log(1 + skipped / p).
    poly_budget: bytes for the S >= 3 integrals of one pair chunk.  S >= 4: the loop's
    integrals are a cheap first stage with a pilot beside it, and ``_refine_qmc_pairs``
    then spends points where each row's standard error needs them (stderr_target); the
    pairs that matter little take a cheap estimate with a certified variance instead
    (``_cheap_pairs``).
    """
    n, R = Xt.shape[0], tab.n_regions
    dev = Xt.device
    if complete:
        (log_kappa, v_dense), stats = _log_kappa_complete(tab, Xt), None
    else:
        (log_kappa, stats), v_dense = _log_kappa_incomplete(tab, Xt, region_chunk), None
    dense = log_kappa
    nearest = tab.has_nearest and (complete or tab.S == 2)

    def factors(rows, regions):
        """Whitened posterior means v (P, S) of pairs and, for rows with missing entries,
        the factors L (P, S, S) of their own precisions (None for complete rows), for
        the bounds (integrals take ``_pair_factors``')."""
        return (v_dense[rows, :, regions], None) if complete else _stats_factors(stats[rows, :, regions], tab.S)
    log_rtol = float(np.log(rtol))
    first = -log_rtol + 3.0
    log_R = float(np.log(R))
    list_thr = dense.max(dim=1).values - (first + log_R + 10.0)
    listed_to = torch.full((n,), torch.inf, dtype=torch.float64, device=dev)   # listed: dense >= list_thr
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    log_p = torch.full((n,), -torch.inf, dtype=torch.float64, device=dev)
    l_rows = torch.zeros(0, dtype=torch.long, device=dev)
    l_regions, l_bound = l_rows.clone(), torch.zeros(0, dtype=torch.float64, device=dev)
    l_taken = l_sharp = l_ascent = torch.zeros(0, dtype=torch.bool, device=dev)
    l_mode = torch.zeros((0, tab.S), dtype=torch.float64, device=dev)    # S >= 4: the bound's modes, for the integral
    found, pilots, found_modes = [], ([] if tab.S >= 4 else None), []
    row_ids = _row_ids(Xt) if tab.S >= 4 else None      # they key the QMC points (``_pair_ids``)
    # S >= 4: the first stage's QMC geometries, for the second stage, in a quarter of the pairs'
    # share of the budget (pair_chunk is sized for S = 3's F^2 arrays a pair; S >= 4 pairs
    # hold ~F S values and their geometry ~F S + the projections' rows)
    store = _GeometryStore(np.inf if poly_budget is None else poly_budget / 4, tab.S) if tab.S >= 4 else None
    n_found = 0
    spent = torch.full((n,), -torch.inf, dtype=torch.float64, device=dev)   # S >= 4: cheap pairs' variance
    # S >= 3: pairs are costly and a posterior can spread over thousands of regions, so p
    # is first estimated on a small margin, and then the smallest bounds that fit in the
    # budget are left out.  At S <= 2 an integral costs about what that bookkeeping does.
    spread = tab.S >= 3
    margin = min(first, 8.0) if spread else first
    while True:
        stop_check()
        # list_thr only falls, so the new pairs of a row are those in [list_thr, listed_to).
        active = torch.nonzero((list_thr < listed_to) & ~done)[:, 0]
        grew = active.numel() > 0
        if grew:
            sub = dense if active.numel() == n else dense[active]
            new = sub >= list_thr[active, None]
            if bool(torch.isfinite(listed_to[active]).any()):
                new &= sub < listed_to[active, None]
            rows, regions = torch.nonzero(new, as_tuple=True)
            rows = active[rows]
            listed_to[active] = list_thr[active]
            bound = dense[rows, regions]
            v, L = factors(rows, regions)
            bound = bound + _facet_bound(tab, v, regions, None if complete else _pair_facets(tab, L, regions))
            l_rows, l_regions = torch.cat([l_rows, rows]), torch.cat([l_regions, regions])
            l_bound = torch.cat([l_bound, bound])
            l_taken = torch.cat([l_taken, torch.zeros_like(rows, dtype=torch.bool)])
            l_sharp = torch.cat([l_sharp, torch.zeros_like(rows, dtype=torch.bool)])
            l_ascent = torch.cat([l_ascent, torch.zeros_like(rows, dtype=torch.bool)])
            l_mode = torch.cat([l_mode, torch.full((rows.numel(), tab.S), torch.nan, dtype=torch.float64, device=dev)])
        unlisted = list_thr + log_R          # every unlisted dense bound is below list_thr
        while True:
            top = torch.full((n,), -torch.inf, dtype=torch.float64, device=dev).scatter_reduce(
                0, l_rows, l_bound, reduce="amax")
            open_ = (~l_taken) & (~done[l_rows]) & (l_bound > -torch.inf)
            take = open_ & (l_bound >= (top - margin)[l_rows])
            if spread:
                # Of half the row's budget, what the open pairs below the margin leave over
                # is spent on the smallest pairs within it: those need not be integrated.
                below = _segment_logsumexp(l_rows[open_ & ~take], l_bound[open_ & ~take], n)
                half = log_p + log_rtol - LOG_2
                with np.errstate(invalid="ignore"):
                    left = torch.where(below < half, half + torch.log1p(-torch.exp(below - half)), -torch.inf)
                take &= ~_smallest_within(l_rows, l_bound, take, left, n)
            # Before integrating, the sharper nearest-point bound (S = 2, 3 and, for complete rows, S >= 4).
            sharpen = torch.nonzero(take & ~l_sharp)[:, 0] if nearest else []
            if len(sharpen) == 0:
                break
            if tab.S >= 4 and complete:
                # first the dual-ascent bound (~1/7 the cost): most pairs it leaves out of
                # ``take`` never need the mode search
                ascent = sharpen[~l_ascent[sharpen]]
                if ascent.numel():
                    rows, regions = l_rows[ascent], l_regions[ascent]
                    near = np.concatenate([_ascent_distance_bound(
                        tab, v_dense[rows[i:i + pair_chunk], :, regions[i:i + pair_chunk]].cpu().numpy(),
                        regions[i:i + pair_chunk].cpu().numpy()) for i in range(0, ascent.numel(), pair_chunk)])
                    l_bound[ascent] = torch.minimum(l_bound[ascent], log_kappa[rows, regions]
                                                    + torch.as_tensor(near, device=dev))
                    l_ascent[ascent] = True
                    continue
            rows, regions = l_rows[sharpen], l_regions[sharpen]
            v_near, L_near = factors(rows, regions)
            v_near, r_near = v_near.cpu().numpy(), regions.cpu().numpy()
            L_near = None if complete else L_near.cpu().numpy()
            if tab.S >= 4 and complete:
                near, mode = (np.concatenate(x) for x in zip(*(
                    _dual_distance_bound(tab, v_near[i:i + pair_chunk], r_near[i:i + pair_chunk])
                    for i in range(0, r_near.size, pair_chunk))))
                l_mode[sharpen] = torch.as_tensor(mode, device=dev)
            else:
                near = np.concatenate([_nearest_point_bound(
                    tab, v_near[i:i + pair_chunk], r_near[i:i + pair_chunk],
                    None if complete else _pair_polygons(tab, L_near[i:i + pair_chunk], r_near[i:i + pair_chunk]))
                    for i in range(0, r_near.size, pair_chunk)])
            l_bound[sharpen] = torch.minimum(l_bound[sharpen], log_kappa[rows, regions] + torch.as_tensor(near, device=dev))
            l_sharp[sharpen] = True
        cheap = torch.zeros_like(take)
        if pilots is not None:          # S >= 4: the pairs that matter little get a cheap estimate
            norm = torch.linalg.vector_norm(l_mode, dim=1)              # NaN: no certified mode
            log_var = torch.full_like(l_bound, torch.inf)
            known = torch.nonzero(take & torch.isfinite(norm) & (norm > 0))[:, 0]
            log_var[known] = 2.0 * (log_kappa[l_rows[known], l_regions[known]]
                                    + torch.special.log_ndtr(-norm[known])) - float(np.log(CHEAP_POINTS))
            cheap = _cheap_pairs(l_rows, log_var, torch.isfinite(log_var), log_p, spent, stderr_target, n)
            spent = torch.logaddexp(spent, _segment_logsumexp(l_rows[cheap], log_var[cheap], n))
        for idx, is_cheap in ((torch.nonzero(take & ~cheap)[:, 0], False), (torch.nonzero(cheap)[:, 0], True)):
            for p0 in range(0, idx.numel(), pair_chunk):
                stop_check()
                sel = idx[p0:p0 + pair_chunk]
                rows, regions = l_rows[sel], l_regions[sel]
                v, C, L, lk = _pair_factors(tab, Xt, rows, regions, complete)
                r_np = regions.cpu().numpy()
                mode = l_mode[sel].cpu().numpy()
                lk = lk.cpu().numpy()
                ids = None if row_ids is None else _pair_ids(row_ids, rows.cpu().numpy(), r_np)
                if is_cheap:            # kept as it is (its pilot SE 0: never refined); certified variance
                    log_phi, mean, cov, _, _ = _cheap_moments(tab, v, C, r_np, mode, ids, poly_budget, moments)
                    se, var = np.zeros_like(lk), log_var[sel].cpu().numpy()
                    pilots.append((lk, lk + log_phi, se))
                    mc = _cheap_mean_mc(lk + log_phi, var, cov)
                else:
                    polygons = None if complete or tab.polygons is None else _pair_polygons(tab, L.cpu().numpy(),
                                                                                               r_np)
                    log_phi, mean, cov, se, mc = _truncated_moments(tab, v, C, r_np, moments, complete, poly_budget,
                                                                    polygons, pilot=pilots, mode=mode, ids=ids)
                    var = np.full_like(lk, -np.inf)
                    if pilots:
                        pilot_lm, pilot_se, geo = pilots[-1]
                        pilots[-1] = (lk, lk + pilot_lm, pilot_se)
                        store.add(np.arange(n_found, n_found + lk.size), rows.cpu().numpy(), lk + pilot_lm, geo,
                                  log_p.cpu().numpy())
                found_modes.append(mode)
                logw = lk + log_phi
                found.append((rows.cpu().numpy(), regions.cpu().numpy(), logw, mean, cov, se, var,
                              *((None, None) if mc is None else mc)))
                n_found += lk.size
                log_p = torch.logaddexp(log_p, _segment_logsumexp(rows, torch.as_tensor(logw, device=dev), n))
        l_taken |= take
        skipped = torch.logaddexp(unlisted, _segment_logsumexp(l_rows[~l_taken], l_bound[~l_taken], n))
        done = done | (skipped - log_p <= log_rtol)
        if bool(done.all()) or (not grew and not bool(take.any()) and not np.isfinite(margin)):
            break
        list_thr = torch.where(done, list_thr, torch.minimum(list_thr, log_p + log_rtol - log_R - 1.0))
        margin = first if margin < first else 2 * margin if margin < 400 else np.inf
    bound = torch.log1p(torch.exp(skipped - log_p)).cpu().numpy()
    S = tab.S
    mc_empty = (np.zeros((0, S, S)), np.zeros((0, S))) if S >= 4 else (None, None)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros((0, S)),
             np.zeros((0, S, S)), np.zeros(0), np.zeros(0), *mc_empty)
    found = [None if x[0] is None else np.concatenate(x) for x in zip(empty, *found)]
    if pilots:
        (*found[:6], found[7], found[8]) = _refine_qmc_pairs(
            tab, Xt, complete, found[:6] + found[7:9], np.concatenate(found_modes),
            *map(np.concatenate, zip(*pilots)), np.isfinite(found[6]), stderr_target, moments, pair_chunk,
            poly_budget, store)
    return (*found, bound)


def _cheap_mean_mc(logw: np.ndarray, log_var: np.ndarray, cov: np.ndarray):
    """The Monte Carlo covariances (``_in_latent``'s mc) of cheap pairs (``_cheap_moments``):
    log(kappa Phi) estimates logw (P,), certified log variances log_var (P,) of kappa Phi,
    Cov[z|w] (P, S, S).  Each point of ``polytope.halfspace_mc`` adds kappa M 1_w(z) (y(z) - c)
    to the pair's share of sum_w kappa_w Phi_w (E_w y - c), for any affine y and constant c,
    whose variance is at most (kappa M)^2 / n E_w[(y - c)^2] Phi / M <= V E_w[(y - c)^2],
    V = exp(log_var) (Phi <= M).  With relative variance s = V / (kappa Phi)^2, that is
    s (E_w y - c)^2 + s Var_w[y]: a weight with variance s, a mean with covariance
    s Cov[z|w] and no covariance between them (a bound, as the log-likelihood's is)."""
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.where(np.isfinite(logw), np.exp(log_var - 2.0 * logw), 0.0)
    return s[:, None, None] * cov, np.zeros(cov.shape[:2])


def _smallest_within(rows: torch.Tensor, bound: torch.Tensor, candidate: torch.Tensor, log_budget: torch.Tensor,
                     n: int) -> torch.Tensor:
    """Per row, the candidate pairs of smallest bound whose bounds sum to at most the
    row's budget: rows, bound, candidate (P,), log_budget (n,) -> (P,) bool.  Sums are
    taken in units of the budget with each term capped at 2 (a larger one is never in
    the set), so the running sums stay small and exact enough."""
    idx = torch.nonzero(candidate & torch.isfinite(log_budget)[rows])[:, 0]
    out = torch.zeros_like(candidate)
    if idx.numel() == 0:
        return out
    order = idx[torch.argsort(bound[idx])]
    order = order[torch.argsort(rows[order], stable=True)]          # by row, then ascending bound
    r = rows[order]
    rel = torch.exp(torch.clamp(bound[order] - log_budget[r], max=np.log(2.0)))
    cum = torch.cumsum(rel, 0)
    counts = torch.bincount(r, minlength=n)
    before = torch.cumsum(counts, 0) - counts                          # first position of each row
    offset = torch.where(before > 0, cum[(before - 1).clamp(min=0)], torch.zeros_like(cum[:1]))
    out[order] = (cum - offset[r]) <= 1.0
    return out


def _segment_logsumexp(rows: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row log-sum-exp of pair values: rows (P,), values (P,) -> (n,), -inf for no pairs."""
    rowmax = torch.full((n,), -torch.inf, dtype=values.dtype, device=values.device).scatter_reduce(
        0, rows, values, reduce="amax", include_self=True)
    safe = torch.where(torch.isfinite(rowmax), rowmax, torch.zeros_like(rowmax))
    total = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(
        0, rows, torch.exp(values - safe[rows]))
    return safe + torch.log(total)


def _positive_semidefinite(cov: np.ndarray) -> np.ndarray:
    """Covariances (n, S, S) with negative eigenvalues raised to 16 S eps times the largest
    (0 to rounding); the others untouched.  A posterior far from its row in noise units (a
    tiny noise std) is ~1e-15 wide, below the rounding of E[zz'] - E[z]E[z]' (-1e-11 on
    digits at noise std 1e-6): 0 is then within that rounding of the truth, a negative
    variance is not.  Exactly 0 would not do: the product V diag(lam) V^T rounds to
    ~S eps lam_max, which gave an eigenvalue of -5e-32 beside 1e-15 on those digits."""
    finite = np.flatnonzero(np.isfinite(cov).all(axis=(1, 2)))
    bad = finite[np.linalg.eigvalsh(cov[finite])[:, 0] < 0] if finite.size else finite
    if bad.size:
        lam, vec = np.linalg.eigh(cov[bad])
        floor = 16 * cov.shape[-1] * np.finfo(np.float64).eps * np.maximum(lam[:, -1:], 0.0)
        cov = cov.copy()
        cov[bad] = (vec * np.maximum(lam, floor)[:, None, :]) @ np.swapaxes(vec, 1, 2)
    return cov


def _row_sums(rows: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Per-row sums of pair values: rows (P,), values (P, ...) -> (n, ...)."""
    flat = values.reshape(values.shape[0], int(np.prod(values.shape[1:])))
    sums = [np.bincount(rows, weights=flat[:, k], minlength=n) for k in range(flat.shape[1])]
    return np.stack(sums, axis=1).reshape((n,) + values.shape[1:])


def _summarise(rows, regions, logw, mean, cov, se, log_var, mean_mc, cross_mc, bound, Xt, idx, out):
    """Combine the per-pair results of one chunk into per-row summaries; returns the
    pairs' rows (into out), regions, responsibilities, moments and, at S >= 4, their
    Monte Carlo errors (``PosteriorResult``'s pair fields)."""
    n = Xt.shape[0]
    order = np.lexsort((regions, rows))
    rows, regions, logw, mean, cov, se = rows[order], regions[order], logw[order], mean[order], cov[order], se[order]
    log_var = log_var[order]
    mc = None
    if mean_mc is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            rel_var = np.where(np.isfinite(logw), np.exp(log_var - 2.0 * logw), 0.0)     # cheap pairs'
        mc = (np.sqrt(se ** 2 + rel_var), mean_mc[order], cross_mc[order])
    rowmax = np.full(n, -np.inf)
    np.maximum.at(rowmax, rows, logw)
    w = np.exp(logw - rowmax[rows])
    total = np.bincount(rows, weights=w, minlength=n)
    log_p = rowmax + np.log(total)
    r = w / total[rows]
    # a region of no weight adds nothing, even where its own moments over- or underflowed
    # (a row ~1e10 noise stds away: +-inf means in its far regions, and 0 * inf = NaN)
    mean, cov = np.where(r[:, None] > 0, mean, 0.0), np.where(r[:, None, None] > 0, cov, 0.0)
    z_mean = _row_sums(rows, r[:, None] * mean, n)
    z_cov = _row_sums(rows, r[:, None, None] * (cov + mean[:, :, None] * mean[:, None, :]), n)
    z_cov -= z_mean[:, :, None] * z_mean[:, None, :]
    z_cov = _positive_semidefinite(z_cov)
    # Delta method: d log p / d log Phi_w = r_w.
    var = np.bincount(rows, weights=(r * se) ** 2 + np.exp(log_var - 2.0 * log_p[rows]), minlength=n)
    best = np.zeros(n)
    top = np.zeros(n, dtype=np.int64)
    order_r = np.lexsort((-r, rows))
    first = np.ones(rows.size, dtype=bool)
    first[1:] = rows[order_r][1:] != rows[order_r][:-1]
    top[rows[order_r][first]] = regions[order_r][first]
    best[rows[order_r][first]] = r[order_r][first]
    n_obs = (~torch.isnan(Xt)).sum(1).cpu().numpy()
    empty = n_obs == 0          # nothing observed: no likelihood to score (NaN), the prior as posterior
    out.log_likelihood[idx] = np.where(empty, np.nan, log_p)
    out.error_bound[idx] = np.where(empty, 0.0, bound)
    out.stderr[idx] = np.where(empty, 0.0, np.sqrt(var))
    out.n_observed[idx] = n_obs
    # the prior N(0, I) exactly: its mixture over the regions carries their pruning and,
    # at S >= 4, their masses' QMC error
    out.z_mean[idx] = np.where(empty[:, None], 0.0, z_mean)
    out.z_cov[idx] = np.where(empty[:, None, None], np.eye(z_cov.shape[1]), z_cov)
    out.top_region[idx], out.top_responsibility[idx] = top, best
    out.n_pairs[idx] = np.bincount(rows, minlength=n)
    return (idx[rows], regions, r, mean, cov) + (() if mc is None else mc)
