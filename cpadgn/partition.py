"""The partition of the latent space R^S into the linear regions of a generator.

A region is the convex polyhedron {z : G z <= h} of one sign pattern (see
``PiecewiseAffineNet.region_constraints``); only its facets (non-redundant rows) are
kept.  The regions tile R^S, unbounded ones included.

Three exact enumeration algorithms (``compute_partition(method=...)``):

``"intervals"`` (S = 1)
    Split the whole line layer by layer: inside an interval every pre-activation of the
    next layer is affine, so its root (if inside) is a new breakpoint.

``"subdivision"`` (S >= 2)
    Edge subdivision (Berzins, ICML 2023) made exact over all of R^S with homogeneous
    coordinates.  A point (z, t), t > 0, stands for z / t and (z, 0) for the point at
    infinity in direction z; the homogenised network (every bias times t) is linear in
    (z, t) inside every region cone because the activations are positively homogeneous.
    R^S with its sphere at infinity is the surface of the prism [-R, R]^S x [0, 1]
    without its bottom: the top face t = 1 (the box) and 2S side faces z_j = +-R,
    t in [0, 1] (the outside of the box; t = 0 is infinity).  Every ray of the half
    space t >= 0 meets that surface exactly once, so the region cones cut it into
    convex cells, at most one per region and face.  The 2S + 1 faces, each an S-cube,
    are subdivided together (one set of arrays; the face id is part of every hash key),
    neuron by neuron, layer by layer:

    * the layer's pre-activations are computed at all vertices from the previous
      layer's activations; along a split edge the whole pre-activation vector is
      interpolated linearly (exact: each edge lies inside one cell of the complex);
    * every edge with a strict sign change is split (an exact 0 counts as +, a
      symbolic perturbation);
    * the two new vertices on a common 2-face of the old complex are joined.  A face is
      named by its sign vector over the face id, the processed units and the 2S cube
      constraints; a 2-face has S - 2 zeros.  Sign vectors are hashed with random
      64-bit keys (h = sum_k sign_k r_k mod 2^64), so the 2-faces at a new vertex are
      its old edge's hash with one zero relaxed to +-r_j (cube constraints only to the
      inside).

    Every vertex carries exactly S zeros by construction (the complex is simple).  The
    cells around a vertex are the 2^m sign assignments of its m unit zeros; cells are
    deduplicated per face, then regions by unit pattern across faces.  Per region: the
    interior point is the mean of the homogeneous coordinates of the vertices of one of
    its cells (the one with the largest mean t) divided by t; the facets are the units
    that are zero at some vertex with t > 0 and whose zero vertices span rank S in
    homogeneous coordinates (a hyperplane through an edge of the region is none); it is
    bounded when none of its vertices lies at t = 0.  A unit that is 0 up to rounding
    over a whole face (relative to the magnitudes it is summed from) is 0 there.  The
    box half-width R only changes the work, never the result.

``"lp-walk"`` (any S, the reference)
    Breadth-first search over the region adjacency graph from the region of z = 0:
    per region a Chebyshev-centre LP (HiGHS), its facets as the extreme rays of the
    cone spanned by the constraint normals of its homogenised cone (a convex hull in
    S dimensions; for unbounded regions each hull facet is confirmed by one LP), then
    each facet is crossed to the neighbour (the pattern with that unit flipped; a
    forward pass just across the facet when the flip is empty).  Dead and duplicate
    units are skipped as in the subdivision, and a unit identically 0 on a region (up
    to rounding: ``_region_constraints_snapped``) counts as >= 0 there, as in the
    subdivision (else the region comes once per sign).  Rows of units whose hyperplanes
    coincide up to rounding are one facet (``_same_hyperplane``).

Every region's interior point is checked by a forward pass; its clearance (distance to
the nearest facet) is computed, a Chebyshev LP re-centres the few that look thin, and
regions with clearance < 1e-7 are flagged ``degenerate`` (kept, never dropped).
"""
from __future__ import annotations

import time
import warnings
from collections import deque
from dataclasses import dataclass

import numpy as np
from scipy.special import log_ndtr

from .errors import CpadgnError
from .network import PiecewiseAffineNet
from .numerics import MIN_CHUNK_BUDGET

DEGENERATE_CLEARANCE = 1e-7
LP_MIN_RADIUS = 1e-10     # lp-walk: a pattern whose Chebyshev radius the LP cannot certify above this is no region
LP_FACET_TOL = 1e-9       # lp-walk: a row the others keep below this on the facet LP's box is redundant
SNAP_RTOL = 1e-11          # subdivision: |u| <= SNAP_RTOL * max|u| counts as u = 0
RANK_TOL = 1e-20           # subdivision: a squared width (relative) below this is no extent


@dataclass
class Partition:
    """All linear regions of one generator (R regions, K hidden units, S latent dims).

    patterns:        (R, K) bool, True where the unit's pre-activation is >= 0
    interior:        (R, S) a point strictly inside each region
    facet_ptr:       (R + 1,) int64 CSR offsets into facet_units
    facet_units:     (nnz,) int64, the unit k of every facet of every region
    bounded:         (R,) bool
    log_prior_mass:  (R,) log P[z in region] under N(0, I)
    log_prior_mass_stderr: (R,) its standard error (0 where computed exactly)
    clearance:       (R,) distance from the interior point to the nearest facet, a
                     lower bound on the region's inradius
    degenerate:      (R,) bool, near-degenerate regions (clearance < 1e-7): kept, flagged
    fingerprint:     the generator's fingerprint (PiecewiseAffineNet.fingerprint)
    method:          the enumeration algorithm used
    seconds:         wall time of the enumeration
    """

    patterns: np.ndarray
    interior: np.ndarray
    facet_ptr: np.ndarray
    facet_units: np.ndarray
    bounded: np.ndarray
    log_prior_mass: np.ndarray
    log_prior_mass_stderr: np.ndarray
    clearance: np.ndarray
    degenerate: np.ndarray
    fingerprint: str
    method: str
    seconds: float

    @property
    def n_regions(self) -> int:
        return int(self.patterns.shape[0])

    @property
    def n_facets(self) -> np.ndarray:
        """(R,) number of facets per region."""
        return np.diff(self.facet_ptr)

    def facets(self, net: PiecewiseAffineNet, regions: np.ndarray | None = None):
        """Padded facet constraints of some regions: {z : G z <= h}.

        regions: (B,) indices (default all).  Returns G (B, F, S), h (B, F) and
        mask (B, F) bool (False on padding rows, which are 0 <= 1), F the largest
        facet count among them.
        """
        idx = np.arange(self.n_regions) if regions is None else np.asarray(regions, dtype=np.int64)
        counts = self.n_facets[idx]
        F = int(counts.max(initial=0))
        B, S = idx.size, net.latent_dim
        G = np.zeros((B, F, S))
        h = np.ones((B, F))
        mask = np.arange(F)[None, :] < counts[:, None]
        if B == 0 or F == 0:
            return G, h, mask
        rows = np.repeat(np.arange(B), counts)
        units = self.facet_units[_csr_positions(self.facet_ptr, idx)]
        Gm, hm = np.zeros((rows.size, S)), np.zeros(rows.size)
        ends = np.concatenate([[0], np.cumsum(counts)])
        step = max(1, 2 ** 24 // (S * max(net.n_units, 1)))        # the layers' maps: ~128 MB a step
        for b0 in range(0, B, step):                               # facets of a region are contiguous
            sel = slice(ends[b0], ends[min(B, b0 + step)])
            Gm[sel], hm[sel] = _constraint_rows(net, self.patterns[idx[b0:b0 + step]], rows[sel] - b0, units[sel])
        G[mask], h[mask] = Gm, hm
        return G, h, mask

    def locate(self, net: PiecewiseAffineNet, z: np.ndarray) -> np.ndarray:
        """Region index of each point (N, S) -> (N,) int64, -1 where the pattern is unknown.

        A point whose pattern is no region is on a tie the enumeration resolved its own
        way, and is looked up again with every unit within the enumeration's resolution
        of 0 (``_resolution``) counted as >= 0 (e.g. max(a, b) where a clamp saturates
        both a and b makes a - b rounding noise of either sign over a whole region), then
        with the columns of dead and duplicate units from their constants / originals
        (``_fill_inactive``: a flipped copy of a unit that is 0 on a whole region is >= 0
        there, as the unit is, but the subdivision and the walk store it flipped)."""
        keys = _pattern_keys(self.patterns)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]

        def lookup(patterns):
            q = _pattern_keys(patterns)
            pos = np.clip(np.searchsorted(sorted_keys, q), 0, max(len(keys) - 1, 0))
            found = (sorted_keys[pos] == q) if len(keys) else np.zeros(len(q), bool)
            return np.where(found, order[pos], -1)

        z = np.asarray(z, dtype=np.float64).reshape(-1, net.latent_dim)
        u = net.preactivations(z)
        signs = (u >= 0) | net.linear_units
        where = lookup(signs)
        miss = np.flatnonzero(where < 0)
        if miss.size:
            signs = signs[miss]
            snapped = signs | (np.abs(u[miss]) <= _resolution(net) * net.preactivation_scale(z[miss]))
            classes = _unit_classes(net)
            for q in (snapped, _fill_inactive(signs, *classes), _fill_inactive(snapped.copy(), *classes)):
                left = np.flatnonzero(where[miss] < 0)
                where[miss[left]] = lookup(q[left])
        return where


def _layer_affine(net: PiecewiseAffineNet, patterns: np.ndarray):
    """Pre-activations u_l = G_l z + c_l of every hidden layer inside regions, in the
    layout G_l (n_l, R, S), c_l (n_l, R): one matrix product per layer (fast for large R)."""
    patterns = np.asarray(patterns, dtype=bool)
    R, S = patterns.shape[0], net.latent_dim
    M = np.repeat(np.eye(S)[:, None, :], R, axis=1).reshape(S, R * S)
    c = np.zeros((S, R))
    off = 0
    for W, b, alpha in zip(net.weights[:-1], net.biases[:-1], net.slopes):
        n = W.shape[0]
        G = W @ M
        cu = W @ c + b[:, None]
        yield G.reshape(n, R, S), cu
        slope = np.where(patterns[:, off:off + n].T, 1.0, alpha[:, None])
        M = (G.reshape(n, R, S) * slope[:, :, None]).reshape(n, R * S)
        c = slope * cu
        off += n


def _constraint_rows(net: PiecewiseAffineNet, patterns: np.ndarray, rows: np.ndarray, units: np.ndarray,
                     chunk: int = 8192):
    """Rows (G (N, S), h (N,)) of ``net.region_constraints(patterns)`` at the pairs (rows, units).

    Layers before the last hidden one are propagated for all regions (one matrix product
    each); the last hidden layer is evaluated only at the requested pairs."""
    patterns = np.asarray(patterns, dtype=bool)
    R, S = patterns.shape[0], net.latent_dim
    G = np.zeros((rows.size, S))
    h = np.zeros(rows.size)
    M = np.repeat(np.eye(S)[:, None, :], R, axis=1).reshape(S, R * S)
    c = np.zeros((S, R))
    off = 0
    L = len(net.hidden_sizes)
    for li, (W, b, alpha) in enumerate(zip(net.weights[:-1], net.biases[:-1], net.slopes)):
        n = W.shape[0]
        w = np.flatnonzero((units >= off) & (units < off + n))
        if li == L - 1:
            Mr = np.ascontiguousarray(M.reshape(-1, R, S).transpose(1, 2, 0))      # (R, S, n_prev)
            cr = np.ascontiguousarray(c.T)                                         # (R, n_prev)
            for s0 in range(0, w.size, chunk):
                ww = w[s0:s0 + chunk]
                k, r = units[ww] - off, rows[ww]
                Wk = W[k]
                G[ww] = np.matmul(Mr[r], Wk[:, :, None])[:, :, 0]
                h[ww] = np.einsum("pn,pn->p", Wk, cr[r]) + b[k]
            break
        Gl = W @ M
        cu = W @ c + b[:, None]
        G[w] = Gl.reshape(n, R, S)[units[w] - off, rows[w]]
        h[w] = cu[units[w] - off, rows[w]]
        slope = np.where(patterns[:, off:off + n].T, 1.0, alpha[:, None])
        M = (Gl.reshape(n, R, S) * slope[:, :, None]).reshape(n, R * S)
        c = slope * cu
        off += n
    sign = np.where(patterns[rows, units], -1.0, 1.0)
    return sign[:, None] * G, -sign * h


def _region_constraints(net: PiecewiseAffineNet, patterns: np.ndarray):
    """Same as ``net.region_constraints``: G (R, K, S), h (R, K)."""
    patterns = np.asarray(patterns, dtype=bool)
    R, S = patterns.shape[0], net.latent_dim
    if net.n_units == 0:
        return np.zeros((R, 0, S)), np.zeros((R, 0))
    parts = list(_layer_affine(net, patterns))
    G = np.concatenate([g for g, _ in parts], axis=0).transpose(1, 0, 2)
    cu = np.concatenate([c for _, c in parts], axis=0).T
    sign = np.where(patterns, -1.0, 1.0) * ~net.linear_units          # slope 1: 0 <= 0
    return sign[:, :, None] * G, -sign * cu


def _region_constraints_snapped(net: PiecewiseAffineNet, patterns: np.ndarray):
    """``_region_constraints`` with every row that is 0 up to rounding set to exactly 0.

    A row whose G entries are all within ``_resolution`` of the magnitudes they are summed
    from (the same products with |W|, |b| and |slope|) is 0: e.g. the unit a - b of
    max(a, b) where a clamp saturates both a and b (their maps cancel up to rounding).
    Left as it is, its rounding noise, normalised, is a hyperplane in a random direction.
    Its h is then 0 too where within the resolution of its magnitude, so that the unit
    counts as identically 0 there (as the subdivision's snapping makes it)."""
    G, h = _region_constraints(net, patterns)
    if net.n_units == 0:
        return G, h
    magnitudes = PiecewiseAffineNet.from_arrays([np.abs(W) for W in net.weights],
                                                [np.abs(b) for b in net.biases],
                                                [np.abs(a) for a in net.slopes])
    # not _region_constraints: it reads an abs unit's |slope| = 1 as linear and zeroes its row
    parts = list(_layer_affine(magnitudes, patterns))
    Gm = np.concatenate([g for g, _ in parts], axis=0).transpose(1, 0, 2)
    hm = np.concatenate([c for _, c in parts], axis=0).T
    tol = _resolution(net)
    zero_row = np.all(np.abs(G) <= tol * Gm, axis=2)
    G[zero_row] = 0.0
    h[zero_row & (np.abs(h) <= tol * hm)] = 0.0
    return G, h


def _pattern_keys(patterns: np.ndarray) -> np.ndarray:
    """Sign patterns (N, K) bool -> (N,) sortable, comparable keys (packed bits as np.void)."""
    packed = np.ascontiguousarray(np.packbits(np.asarray(patterns, dtype=bool), axis=1))
    if packed.shape[1] == 0:
        packed = np.zeros((packed.shape[0], 1), np.uint8)
    return packed.view(np.dtype((np.void, packed.shape[1]))).ravel()


def _csr_positions(ptr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Positions in the CSR data array of the rows idx, concatenated in order."""
    starts, counts = ptr[idx], ptr[idx + 1] - ptr[idx]
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offs = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return np.arange(total, dtype=np.int64) + offs


# ============================================================================ public API
def compute_partition(net: PiecewiseAffineNet, *, max_regions: int | None = None, progress=None,
                      method: str = "auto", box_half_width: float | None = None,
                      memory_budget: float | None = 2e9, prior_masses: bool = True) -> Partition:
    """All linear regions of ``net`` over the whole latent space R^S (exact).

    method: "auto" ("intervals" for S = 1, "subdivision" for S >= 2), "intervals",
        "subdivision" or "lp-walk" (the slow reference, any S).
    max_regions: stop with a CpadgnError as soon as more regions than this are certain
        (S >= 3: distinct sign patterns of random points count before the enumeration).
    memory_budget: bytes; the subdivision stops with a CpadgnError before a step whose
        working arrays would exceed it (None: no limit).
    progress: optional callable(done: int, total: int | None, message: str).
    box_half_width: R of the subdivision's prism (default 4); changes the work only.
    prior_masses: False skips the prior masses for S >= 2 (log_prior_mass and its stderr
        are NaN then): the likelihood never needs them, and EM's transient partitions
        skip their cost, large at S >= 3.
    """
    t0 = time.perf_counter()
    S, K = net.latent_dim, net.n_units
    if method == "auto":
        method = "intervals" if S == 1 else "subdivision"
    if method not in ("intervals", "subdivision", "lp-walk"):
        raise ValueError(f"unknown partition method {method!r}: use auto, intervals, subdivision or lp-walk")
    if method == "intervals" and S != 1:
        raise ValueError(f"the 'intervals' method needs a 1-dimensional latent space, got S = {S}; use "
                         "method='auto' or 'subdivision'")
    if max_regions is not None and max_regions < 1:
        raise ValueError(f"max_regions must be positive, got {max_regions}; pass 1 or more, or None for "
                         "no limit")
    if K == 0:
        return _linear_partition(net, t0)
    if method == "intervals":
        return _intervals(net, max_regions, progress, t0, memory_budget)
    if max_regions is not None and S >= 3:
        _sampled_region_bound(net, max_regions, progress)
    if method == "subdivision":
        if S == 1:
            return _intervals(net, max_regions, progress, t0, memory_budget)
        raw = _tiled_subdivision(net, 4.0 if box_half_width is None else float(box_half_width),
                                 max_regions, progress, memory_budget)
    else:
        raw = _lp_walk(net, max_regions=max_regions, progress=progress)
    return _finish(net, raw, method, t0, progress, prior_masses)


def check_partition(net: PiecewiseAffineNet, part: Partition, n_samples: int = 100_000,
                    seed: int = 0) -> dict:
    """Independent checks of a partition.

    Returns {'mass_sum': sum of prior masses, 'mass_error': |mass_sum - 1|,
    'samples_located': fraction of N(0, I) samples whose sign pattern is a listed region,
    'interior_ok': fraction of regions whose interior point has the region's pattern}.

    A unit whose pre-activation at the interior point is within the enumeration's
    resolution of 0 (``_pattern_within_resolution``) matches either sign: its computed
    sign says nothing there.  That happens at the interior points of near-degenerate
    regions (kept and flagged), e.g. the zero-width ones where max pooling over ReLU
    outputs bends a unit's hyperplane onto an earlier one.
    """
    rng = np.random.default_rng(seed)
    lm = np.asarray(part.log_prior_mass, dtype=np.float64)
    mass_sum = float(np.exp(lm).sum()) if lm.size else 0.0
    located = 0
    for start in range(0, n_samples, 50_000):
        z = rng.standard_normal((min(50_000, n_samples - start), net.latent_dim))
        located += int((part.locate(net, z) >= 0).sum())
    step = max(1, 2 ** 27 // (48 * max(net.n_units, 1)))     # preactivations, bounds, patterns: ~128 MB a step
    ok = np.concatenate([np.zeros(0, bool)] + [
        _pattern_within_resolution(net, part.interior[i:i + step], part.patterns[i:i + step])
        for i in range(0, part.n_regions, step)])
    return {"mass_sum": mass_sum, "mass_error": abs(mass_sum - 1.0),
            "samples_located": located / max(n_samples, 1),
            "interior_ok": float(ok.mean()) if ok.size else 1.0}


# ============================================================================ helpers
def _pattern_within_resolution(net: PiecewiseAffineNet, z: np.ndarray, patterns: np.ndarray) -> np.ndarray:
    """(N,) bool: the points z (N, S) have the patterns (N, K), a unit within the
    enumeration's resolution of 0 matching either sign.

    That resolution is (SNAP_RTOL + L gamma_n) m (``net.preactivation_scale``): the
    subdivision puts a vertex within SNAP_RTOL of the scale on the hyperplane, and the
    forward pass errs by L gamma_n m.  A region that is not near-degenerate (clearance
    >= 1e-7) has every |u| far above it at its interior point, so a wrong pattern there
    still fails."""
    u = net.preactivations(z)
    agree = ((u >= 0) | net.linear_units) == patterns
    return (agree | (np.abs(u) <= _resolution(net) * net.preactivation_scale(z))).all(axis=1)


def _resolution(net: PiecewiseAffineNet) -> float:
    """SNAP_RTOL + L gamma_n, n the largest fan-in + 1: relative to the magnitudes a
    pre-activation (or a region's constraint row) is summed from, a value below it is
    0 up to the subdivision's snapping and float64's rounding (Higham, 3.5)."""
    eps = np.finfo(np.float64).eps
    n = max(W.shape[1] for W in net.weights) + 1
    return SNAP_RTOL + len(net.weights) * n * eps / (1 - n * eps)


def _linear_partition(net, t0) -> Partition:
    S = net.latent_dim
    return Partition(patterns=np.zeros((1, 0), bool), interior=np.zeros((1, S)),
                     facet_ptr=np.zeros(2, np.int64), facet_units=np.zeros(0, np.int64),
                     bounded=np.array([False]), log_prior_mass=np.zeros(1),
                     log_prior_mass_stderr=np.zeros(1), clearance=np.array([np.inf]),
                     degenerate=np.array([False]), fingerprint=net.fingerprint(),
                     method="linear", seconds=time.perf_counter() - t0)


def _too_many(n, max_regions):
    raise CpadgnError(f"the partition has more than {max_regions:,} regions (at least {n:,} found); "
                      f"raise --max-regions or use a generator with fewer hidden units")


class _OverBudget(CpadgnError):
    """A subdivision step would exceed the memory budget."""


def _too_big(need, budget):
    raise _OverBudget(f"enumerating the partition needs more than {need / 1e9:.3g} GB of working memory, "
                      f"over the memory budget of {budget / 1e9:.3g} GB; raise --memory-budget, "
                      f"or use a generator with fewer hidden units")


def _sampled_region_bound(net, max_regions, progress, chunk=50_000, seed=0):
    """Stop (``_too_many``) if random points show more than max_regions distinct sign
    patterns: each one, from a point off every boundary (almost surely), is a region.

    Points come from N(0, s^2 I) with s in {1, 2, 4, 8}, in rounds of ``chunk``, until
    a round adds under 5% new patterns or 20 max_regions points were drawn: a partition
    with fewer regions costs a few rounds.
    """
    rng = np.random.default_rng(seed)
    K = net.n_units
    seen = None
    drawn = 0
    while drawn < 20 * max_regions:
        z = rng.standard_normal((chunk, net.latent_dim)) * rng.choice([1.0, 2.0, 4.0, 8.0], size=(chunk, 1))
        patterns = net.patterns(z)
        if K <= 64:                                         # one integer per pattern: faster to sort
            packed = np.packbits(patterns, axis=1)
            keys = np.pad(packed, ((0, 0), (0, 8 - packed.shape[1]))).view(np.uint64).ravel()
        else:
            keys = _pattern_keys(patterns)
        before = 0 if seen is None else seen.size
        seen = np.unique(keys if seen is None else np.concatenate([seen, keys]))
        drawn += chunk
        if seen.size > max_regions:
            _too_many(seen.size, max_regions)
        if progress is not None:
            progress(drawn, None, f"sampling: {seen.size:,} distinct regions")
        if seen.size - before < 0.05 * chunk:
            return


def _log_interval_mass(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """log(Phi(hi) - Phi(lo)) for lo < hi, stable in both tails."""
    flip = lo > 0
    a = np.where(flip, -hi, lo)
    b = np.where(flip, -lo, hi)
    la, lb = log_ndtr(a), log_ndtr(b)
    with np.errstate(divide="ignore"):
        return lb + np.log1p(-np.exp(la - lb))


def _unit_classes(net, rtol=1e-13):
    """Dead units (all-zero incoming weights) and duplicates within a layer.

    A unit whose (weights, bias) row is a positive (negative) multiple of an earlier
    unit's row, to ``rtol``, has the same (the opposite) sign pattern: it adds no
    hyperplane, so the subdivision skips it and its pattern column is copied.
    Returns (active (K,) bool, dead_sign (K,) bool, dup_of (K,) int64 (-1: none),
    dup_flip (K,) bool).
    """
    K = net.n_units
    active = np.ones(K, bool)
    dead_sign = np.zeros(K, bool)
    dup_of = -np.ones(K, np.int64)
    dup_flip = np.zeros(K, bool)
    off = 0
    for W, b, alpha in zip(net.weights[:-1], net.biases[:-1], net.slopes):
        n = W.shape[0]
        dead = ~W.any(axis=1) | (alpha == 1.0)      # slope 1: linear, no hyperplane
        dead_sign[off:off + n] = (b >= 0) | (alpha == 1.0)
        active[off:off + n] &= ~dead
        rows = np.concatenate([W, b[:, None]], axis=1)
        live = np.flatnonzero(~dead)
        if live.size > 1:
            r = rows[live] / np.linalg.norm(rows[live], axis=1, keepdims=True)
            lead = r[np.arange(live.size), np.argmax(np.abs(r) > 1e-3, axis=1)]
            flip = lead < 0
            r[flip] *= -1
            o = np.lexsort(r.T[::-1])
            rs = r[o]
            close = np.all(np.abs(rs[1:] - rs[:-1]) <= rtol, axis=1)
            # chains of neighbours that are equal: attach each to the chain's first unit
            head = o[0]
            for j in range(1, live.size):
                if close[j - 1]:
                    u, h0 = live[o[j]], live[head]
                    orig, dup = min(u, h0), max(u, h0)
                    if dup != h0:
                        dup_of[off + dup] = off + orig
                        dup_flip[off + dup] = flip[o[j]] != flip[head]
                        active[off + dup] = False
                    else:           # the chain head is the later unit: make u the head
                        dup_of[off + h0] = off + u
                        dup_flip[off + h0] = flip[o[j]] != flip[head]
                        active[off + h0] = False
                        head = o[j]
                else:
                    head = o[j]
        off += n
    # resolve chains so that dup_of always points to an active unit
    for k in range(K):
        f = False
        j = k
        while dup_of[j] >= 0 and not active[j] and dup_of[j] != j:
            f ^= dup_flip[j]
            j = dup_of[j]
            if active[j]:
                break
        if dup_of[k] >= 0:
            dup_of[k], dup_flip[k] = j, f
    return active, dead_sign, dup_of, dup_flip


def _fill_inactive(patterns, active, dead_sign, dup_of, dup_flip):
    """Columns of dead and duplicated units (not subdivided) from their constants/originals."""
    for k in np.flatnonzero(~active):
        patterns[:, k] = (patterns[:, dup_of[k]] ^ dup_flip[k]) if dup_of[k] >= 0 else dead_sign[k]
    return patterns


# ============================================================================ S = 1
def _intervals(net, max_regions, progress, t0, memory_budget=None) -> Partition:
    """Exact interval splitting of the whole line, layer by layer; a layer whose (intervals,
    units) arrays would exceed memory_budget (bytes) stops it with a CpadgnError first."""
    def check_budget(intervals, n):       # ~4 float (I, n) arrays at once, and the patterns (I, K)
        need = intervals * (33.0 * n + K)
        if memory_budget is not None and need > max(memory_budget, MIN_CHUNK_BUDGET):
            _too_big(need, memory_budget)

    K = net.n_units
    bps = np.zeros(0)                       # sorted breakpoints
    bp_unit = np.zeros(0, np.int64)         # unit creating each breakpoint
    M = np.ones((1, 1))                     # h = M z + c per interval
    c = np.zeros((1, 1))
    pats = np.zeros((1, 0), bool)
    off = 0
    tol = _resolution(net)
    for li, (W, b, alpha) in enumerate(zip(net.weights[:-1], net.biases[:-1], net.slopes)):
        n = W.shape[0]
        check_budget(M.shape[0], n)
        Ua, Uc = M @ W.T, c @ W.T + b        # (I, n)
        # a slope or constant within rounding of 0 (max(a, b) of two saturated clamps) is 0,
        # so the unit is >= 0 there as in the forward pass, locate and the other enumerations
        Ua = np.where(np.abs(Ua) <= tol * (np.abs(M) @ np.abs(W).T), 0.0, Ua)
        Uc = np.where((Ua == 0) & (np.abs(Uc) <= tol * (np.abs(c) @ np.abs(W).T + np.abs(b))), 0.0, Uc)
        lo = np.concatenate([[-np.inf], bps])
        hi = np.concatenate([bps, [np.inf]])
        with np.errstate(divide="ignore", invalid="ignore"):
            r = -Uc / Ua
        inside = (Ua != 0) & np.isfinite(r) & (r > lo[:, None]) & (r < hi[:, None]) & (alpha != 1.0)
        ii, kk = np.nonzero(inside)
        roots, units = r[ii, kk], kk + off
        order = np.lexsort((units, roots))
        roots, units = roots[order], units[order]
        keep = np.ones(roots.size, bool)
        keep[1:] = roots[1:] != roots[:-1]
        roots, units = roots[keep], units[keep]
        old = bps
        bps = np.concatenate([bps, roots])
        bp_unit = np.concatenate([bp_unit, units])
        o = np.argsort(bps, kind="stable")
        bps, bp_unit = bps[o], bp_unit[o]
        if bps.size and np.any(bps[1:] == bps[:-1]):      # a root exactly on an old breakpoint
            keep = np.concatenate([[True], bps[1:] != bps[:-1]])
            bps, bp_unit = bps[keep], bp_unit[keep]
        lo = np.concatenate([[-np.inf], bps])
        hi = np.concatenate([bps, [np.inf]])
        parent = np.searchsorted(old, lo, side="right")
        if max_regions is not None and lo.size > max_regions:
            _too_many(lo.size, max_regions)
        check_budget(lo.size, n)
        a, cc = Ua[parent], Uc[parent]
        with np.errstate(divide="ignore", invalid="ignore"):
            rr = -cc / a
        right = rr <= lo[:, None]                           # the interval lies right of the root
        q = np.where(a == 0, cc >= 0, np.where(right, a > 0, a < 0)) | (alpha == 1.0)
        slope = np.where(q, 1.0, alpha)
        M, c = slope * a, slope * cc
        pats = np.concatenate([pats[parent], q], axis=1)
        off += n
        if progress is not None:
            progress(off, K, f"layer {li + 1}: {lo.size} intervals")
    lo = np.concatenate([[-np.inf], bps])
    hi = np.concatenate([bps, [np.inf]])
    Rn = lo.size
    with np.errstate(invalid="ignore"):                      # -inf + inf where no breakpoint: not used
        mid = np.where(np.isfinite(lo) & np.isfinite(hi), 0.5 * (lo + hi),
                       np.where(np.isfinite(hi), hi - 1.0, np.where(np.isfinite(lo), lo + 1.0, 0.0)))
    units_lo = np.concatenate([[-1], bp_unit])
    units_hi = np.concatenate([bp_unit, [-1]])
    fac = np.stack([units_lo, units_hi], axis=1)
    counts = (fac >= 0).sum(1)
    facet_units = fac[fac >= 0].astype(np.int64)
    facet_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    clearance = np.minimum(mid - lo, hi - mid)
    ok = (net.patterns(mid[:, None]) == pats).all(axis=1)
    degenerate = (clearance < DEGENERATE_CLEARANCE) | ~ok
    logm = _log_interval_mass(lo, hi)
    return Partition(patterns=pats, interior=mid[:, None], facet_ptr=facet_ptr, facet_units=facet_units,
                     bounded=np.isfinite(lo) & np.isfinite(hi), log_prior_mass=logm,
                     log_prior_mass_stderr=np.zeros(Rn), clearance=clearance, degenerate=degenerate,
                     fingerprint=net.fingerprint(), method="intervals", seconds=time.perf_counter() - t0)


# ============================================================================ S >= 2: subdivision
class _Grow:
    """Column-growable storage: arrays whose first (or given) axis grows by doubling."""

    def __init__(self, arr, axis=0):
        self.a, self.axis, self.n = arr, axis, arr.shape[axis]

    def reserve(self, n):
        cap = self.a.shape[self.axis]
        if n <= cap:
            return
        new_cap = max(n, 2 * cap, 1024)
        shape = list(self.a.shape)
        shape[self.axis] = new_cap
        b = np.zeros(shape, dtype=self.a.dtype, order="C")
        sl = [slice(None)] * self.a.ndim
        sl[self.axis] = slice(0, self.n)
        b[tuple(sl)] = self.a[tuple(sl)]
        self.a = b


def _face_frames(S, R):
    """Affine embeddings X = O_f + x @ E_f of the 2S + 1 prism faces, x in [0, 1]^S.

    Face 0 is the top (t = 1, z in [-R, R]^S); face 1 + 2j + (s > 0) is the side z_j = s R,
    whose local coordinate j is t (x_j = 0: infinity).
    """
    O = np.zeros((2 * S + 1, S + 1))
    E = np.zeros((2 * S + 1, S, S + 1))
    O[0, :S], O[0, S] = -R, 1.0
    E[0, np.arange(S), np.arange(S)] = 2 * R
    for j in range(S):
        for si, s in enumerate((-1.0, 1.0)):
            f = 1 + 2 * j + si
            O[f, :S] = -R
            O[f, j] = s * R
            for i in range(S):
                if i == j:
                    E[f, i, S] = 1.0
                else:
                    E[f, i, i] = 2 * R
    return O, E


def _neg(x):
    """-x mod 2^64 for uint64 arrays/scalars."""
    return (~x) + np.uint64(1)


def _tiled_subdivision(net, R, max_regions, progress, memory_budget, frames=None, depth=0, max_depth=None):
    """``_subdivision`` of the prism's faces (``frames``, default all); where it would
    exceed the memory budget, the same on each of the 2^S sub-cubes of every face in turn
    (recursively, up to max_depth halvings), merged by sign pattern (``_merge_raw``): a
    tile's boundary is no unit's hyperplane, so a region cut by it is found in several
    tiles, as a region on several faces is.  Tiles multiply by 2^S a level: S = 2 goes
    4 levels deep, S = 3 two, S >= 4 refuses as the untiled subdivision does."""
    S = net.latent_dim
    max_depth = {2: 4, 3: 2}.get(S, 0) if max_depth is None else max_depth
    try:
        raw = _subdivision(net, R, max_regions, progress, memory_budget, frames)
        raw["patterns"] = np.packbits(raw["patterns"], axis=1)      # held packed until the merge
        return raw if depth else _merge_raw([raw], net.n_units)
    except _OverBudget:
        if depth >= max_depth:
            raise
    O, E = _face_frames(S, R) if frames is None else frames
    bits = ((np.arange(2 ** S)[:, None] >> np.arange(S)[None, :]) & 1).astype(float)
    raws = []
    for f in range(O.shape[0]):
        for b in bits:
            tile = ((O[f] + 0.5 * b @ E[f])[None], 0.5 * E[f][None])
            sub = _tiled_subdivision(net, R, max_regions, progress, memory_budget, tile, depth + 1, max_depth)
            raws.extend(sub if isinstance(sub, list) else [sub])
    return raws if depth else _merge_raw(raws, net.n_units)


def _merge_raw(raws, K):
    """One raw region list from those of several tiles (patterns packed): regions by
    pattern; the interior point of the first tile that has the region; facets the union;
    bounded where no tile reaches infinity."""
    packed = np.concatenate([r["patterns"] for r in raws])
    n = [r["patterns"].shape[0] for r in raws]
    width = max(packed.shape[1], 1)
    view = np.ascontiguousarray(packed if packed.shape[1] else np.zeros((packed.shape[0], 1), np.uint8))
    _, first, inv = np.unique(view.view(np.dtype((np.void, width))).ravel(), return_index=True, return_inverse=True)
    inv = inv.ravel()
    nR = first.size
    bounded = np.bincount(inv, weights=~np.concatenate([r["bounded"] for r in raws]), minlength=nR) == 0
    regs = [inv[o:o + k] for o, k in zip(np.cumsum([0] + n[:-1]), n)]
    fr = np.concatenate([np.repeat(g, np.diff(r["facet_ptr"])) for g, r in zip(regs, raws)])
    fu = np.concatenate([r["facet_units"] for r in raws])
    pair = np.unique(fr.astype(np.int64) * (K + 1) + fu)
    info = {}
    for r in raws:
        for k, v in r["info"].items():
            info[k] = info.get(k, 0) + v
    info["tiles"] = len(raws)
    return {"patterns": np.unpackbits(packed[first], axis=1, count=K).view(bool),        # sorted by pattern
            "interior": np.concatenate([r["interior"] for r in raws])[first],
            "facet_ptr": np.concatenate([[0], np.cumsum(np.bincount(pair // (K + 1), minlength=nR))]).astype(np.int64),
            "facet_units": (pair % (K + 1)).astype(np.int64), "bounded": bounded, "info": info}


def _subdivision(net, R, max_regions, progress, memory_budget=None, frames=None):
    """Edge subdivision of the compactified latent space (or of the faces ``frames``,
    (O, E) as ``_face_frames`` gives them); returns the raw region list.

    Before each split the bytes it needs (``_split_bytes``) and those the final region
    extraction will need (at least ``_extract_bytes`` of the incidences so far) are
    checked against memory_budget."""
    S, K = net.latent_dim, net.n_units
    NH = K + 2 * S                         # hyperplanes: units, then cube constraints (lo, hi)
    rng = np.random.default_rng(0x5EED)
    RH = rng.integers(0, np.iinfo(np.uint64).max, size=NH, dtype=np.uint64, endpoint=True)
    O, Emb = _face_frames(S, R) if frames is None else frames
    RF = rng.integers(0, np.iinfo(np.uint64).max, size=O.shape[0], dtype=np.uint64, endpoint=True)
    RHneg = _neg(RH)
    active, dead_sign, dup_of, dup_flip = _unit_classes(net)

    # ---- the initial complex: 2S + 1 cubes
    F = O.shape[0]
    bits = ((np.arange(2 ** S)[:, None] >> np.arange(S)[None, :]) & 1)          # (2^S, S)
    cube_edges = np.array([(v, v | (1 << i)) for v in range(2 ** S) for i in range(S) if not v >> i & 1])
    nv0 = 2 ** S
    X0 = (O[:, None, :] + np.einsum("vs,fsd->fvd", bits.astype(float), Emb)).reshape(-1, S + 1)
    face0 = np.repeat(np.arange(F), nv0)
    sg0 = np.zeros((F * nv0, NH), np.int8)
    Z0 = np.zeros((F * nv0, S), np.int64)
    for i in range(S):
        xi = np.tile(bits[:, i], F)
        sg0[:, K + 2 * i] = np.where(xi == 0, 0, 1)
        sg0[:, K + 2 * i + 1] = np.where(xi == 1, 0, 1)
        Z0[:, i] = K + 2 * i + xi
    hv0 = RF[face0] + (sg0[:, K:].astype(np.uint64) * RH[K:]).sum(axis=1, dtype=np.uint64)
    E0 = (cube_edges[None, :, :] + nv0 * np.arange(F)[:, None, None]).reshape(-1, 2)

    Xg, fg, sgg, Zg, hg = _Grow(X0), _Grow(face0.astype(np.int64)), _Grow(sg0), _Grow(Z0), _Grow(hv0)
    Eg = _Grow(E0.astype(np.int64))
    V, nE = X0.shape[0], E0.shape[0]
    incidences = V                          # (vertex, cell) pairs of the extraction: 2^(unit zeros) each
    cells = np.ones(F, np.int64)            # cells per face so far (a lower bound on regions)
    anomalies = 0
    n_snapped = 0
    relax_sets = None
    if S >= 3 and max_regions is not None:
        relax_sets = np.array(np.meshgrid(*[[1, -1]] * (S - 1), indexing="ij")).reshape(S - 1, -1).T

    off = 0
    n_layers = len(net.hidden_sizes)
    H = None
    rounding = _resolution(net) - SNAP_RTOL
    mag = np.abs(Xg.a[:V, :S]).max(axis=0)           # (n_in,) bound on the magnitudes of the layer's inputs
    for li, (W, b, alpha) in enumerate(zip(net.weights[:-1], net.biases[:-1], net.slopes)):
        n = W.shape[0]
        X = Xg.a[:V]
        inp = X[:, :S].T if H is None else H                             # (n_in, V)
        Ug = _Grow(np.ascontiguousarray(W @ inp + b[:, None] * X[None, :, S]), axis=1)
        mag = np.abs(W) @ mag + np.abs(b) * X[:, S].max(initial=0.0)
        # round-off scale per unit: interpolation never exceeds the values at layer start.
        # A unit that is 0 up to rounding on the whole face (max(a, b) where a clamp
        # saturates a and b) has only noise there: relative to the magnitudes it is
        # summed from it is 0, else the noise would split it into random regions.
        tol_layer = np.maximum(SNAP_RTOL * np.abs(Ug.a).max(axis=1, initial=0.0), rounding * mag)
        mag = mag * np.maximum(1.0, np.abs(alpha))
        for kl in range(n):
            k = off + kl
            if not active[k]:
                continue
            U = Ug.a
            f = U[kl, :V]
            # values within round-off of 0 are 0 (counted as +): exact degeneracies such
            # as hyperplanes through a common point stay combinatorially consistent
            tol = tol_layer[kl]
            pos = f >= -tol
            col = pos.view(np.int8) * np.int8(2)
            col -= np.int8(1)
            sgg.a[:V, k] = col
            hv = hg.a
            hv[:V] += np.where(pos, RH[k], RHneg[k])
            E = Eg.a
            ea, eb = E[:nE, 0], E[:nE, 1]
            ci = np.flatnonzero(pos[ea] != pos[eb])
            m = ci.size
            if m == 0:
                continue
            if memory_budget is not None:
                need = max(_split_bytes([Xg, fg, sgg, Zg, hg, Ug], Eg, V, nE, m, n, S, NH, max_regions),
                           _extract_bytes(incidences, S))
                if need > memory_budget:
                    _too_big(need, memory_budget)
            a, bb = ea[ci], eb[ci]
            za, zb = Zg.a[a], Zg.a[bb]
            common = (za[:, :, None] == zb[:, None, :]).any(axis=2)
            good = common.sum(axis=1) == S - 1
            if not good.all():          # cannot happen in a consistent complex: skip, count, warn
                anomalies += int((~good).sum())
                ci, a, bb, za, zb, common = ci[good], a[good], bb[good], za[good], zb[good], common[good]
                m = ci.size
                if m == 0:
                    continue
            fa, fb = f[a], f[bb]
            sa0, sb0 = np.abs(fa) <= tol, np.abs(fb) <= tol
            if sa0.any() or sb0.any():
                n_snapped += int(np.count_nonzero(sa0 & (fa != 0)) + np.count_nonzero(sb0 & (fb != 0)))
                fa, fb = np.where(sa0, 0.0, fa), np.where(sb0, 0.0, fb)
            lam = fa / (fa - fb)
            new = np.arange(V, V + m)
            # ---- new vertices
            for g in (Xg, fg, sgg, Zg, hg):
                g.reserve(V + m)
            Ug.reserve(V + m)
            U = Ug.a
            Xa = Xg.a
            Xa[V:V + m] = Xa[a] + lam[:, None] * (Xa[bb] - Xa[a])
            Ua = U[:, a]
            Un = Ua + lam[None, :] * (U[:, bb] - Ua)
            Un[kl] = 0.0
            U[:, V:V + m] = Un
            fg.a[V:V + m] = fg.a[a]
            sa, sb = sgg.a[a], sgg.a[bb]
            sv = np.where(sa != 0, sa, sb)
            sv[:, k] = 0
            sgg.a[V:V + m] = sv
            ze = za[common].reshape(m, S - 1)
            ja = za[~common]
            sbj = sgg.a[bb, ja]
            hv = hg.a
            he = hv[a] - np.where(pos[a], RH[k], RHneg[k]) + np.where(sbj > 0, RH[ja], RHneg[ja])
            hv[V:V + m] = he
            Zg.a[V:V + m, :S - 1] = ze
            Zg.a[V:V + m, S - 1] = k
            incidences += int(np.sum(np.left_shift(1, (ze < K).sum(1) + 1)))
            # ---- join the two new vertices of every cut 2-face
            rj = RH[ze]                                                   # (m, S-1)
            isunit = ze < K
            kp = he[:, None] + rj
            kn = he[:, None] - rj
            keys = np.concatenate([kp.ravel(), kn[isunit]])
            owner = np.concatenate([np.repeat(new, S - 1), np.broadcast_to(new[:, None], (m, S - 1))[isunit]])
            o = np.argsort(keys, kind="stable")
            ks, ow = keys[o], owner[o]
            eq = ks[1:] == ks[:-1]
            if eq.size:
                first = np.flatnonzero(eq)
                # groups of exactly two: not equal to the previous and the next
                okp = np.ones(first.size, bool)
                okp &= (first == 0) | ~np.concatenate([[False], eq])[first]
                nxt = first + 1
                okp &= (nxt >= eq.size) | ~np.concatenate([eq, [False]])[nxt]
                pairs = np.stack([ow[first[okp]], ow[first[okp] + 1]], axis=1)
                n_single = keys.size - 2 * int(okp.sum())
            else:
                pairs = np.zeros((0, 2), np.int64)
                n_single = keys.size
            if n_single:
                anomalies += n_single
            npairs = pairs.shape[0]
            Eg.reserve(nE + m + npairs)
            E = Eg.a
            E[ci, 1] = new
            E[nE:nE + m, 0] = new
            E[nE:nE + m, 1] = bb
            E[nE + m:nE + m + npairs] = pairs
            nE += m + npairs
            V += m
            for g in (Xg, fg, sgg, Zg, hg):
                g.n = V
            Ug.n = V
            Eg.n = nE
            # ---- region count lower bound
            if max_regions is not None:
                if S == 2:
                    cells += np.bincount(fg.a[pairs[:, 0]], minlength=F)
                else:
                    sel = np.where(isunit[:, None, :], relax_sets[None, :, :], 1)       # (m, 2^(S-1), S-1)
                    valid = (isunit[:, None, :] | (sel > 0)).all(axis=2)
                    ck = he[:, None] + np.where(sel > 0, rj[:, None, :], _neg(rj)[:, None, :]).sum(
                        axis=2, dtype=np.uint64)
                    fo = np.broadcast_to(fg.a[new][:, None], valid.shape)[valid]
                    _, ui = np.unique(ck[valid], return_index=True)
                    cells += np.bincount(fo[ui], minlength=F)
                if cells.max() > max_regions:
                    _too_many(int(cells.max()), max_regions)
            if progress is not None and (kl % 8 == 7 or kl == n - 1):
                progress(k + 1, K, f"layer {li + 1}/{n_layers}: {V:,} vertices")
        U = Ug.a[:, :V]
        H = np.where(U >= 0, U, alpha[:, None] * U)
        off += n
    if memory_budget is not None and _extract_bytes(incidences, S) > memory_budget:
        _too_big(_extract_bytes(incidences, S), memory_budget)
    res = _extract_regions(net, Xg.a[:V], fg.a[:V], sgg.a[:V], Zg.a[:V], hg.a[:V], RH, RF,
                            active, dead_sign, dup_of, dup_flip, anomalies, max_regions)
    res["info"]["snapped_values"] = n_snapped
    return res


def _split_bytes(vertex_arrays, edges, V, nE, m, n, S, NH, max_regions):
    """Bytes held during a split of m edges: the growable vertex and edge arrays (a
    doubling holds the old and the new copy), and the split's temporaries per cut edge
    (n pre-activations, sign rows, hash keys; with max_regions at S >= 3 the
    2^(S-1) cell keys of ``_subdivision``'s region bound)."""
    total = 0.0
    for g, count in [(x, V + m) for x in vertex_arrays] + [(edges, nE + m * S)]:
        per = g.a.nbytes / max(g.a.shape[g.axis], 1)
        cap = g.a.shape[g.axis]
        total += per * (cap if count <= cap else cap + max(count, 2 * cap))
    temp = 24.0 * n + 4 * NH + 8 * S * S + 256 * S
    if max_regions is not None and S >= 3:
        temp += 32.0 * 2 ** (S - 1) * S
    return total + m * temp


def _extract_bytes(incidences, S):
    """Bytes of ``_extract_regions`` for this many (vertex, cell) incidences: keys,
    vertex and code per incidence, the sort and unique temporaries, the sign sums."""
    return incidences * (96.0 + 16 * S)


def _sign_combos(m):
    """(2^m, m) all +-1 assignments."""
    if m == 0:
        return np.zeros((1, 0), np.int8)
    return (1 - 2 * ((np.arange(2 ** m)[:, None] >> np.arange(m)[None, :]) & 1)).astype(np.int8)


def _extract_regions(net, X, face, sg, Z, hv, RH, RF, active, dead_sign, dup_of, dup_flip, anomalies, max_regions):
    """Regions from the final simple complex: cells around every vertex, deduplicated."""
    S, K = net.latent_dim, net.n_units
    V = X.shape[0]
    t = X[:, S]
    isu = Z < K
    mcount = isu.sum(axis=1)
    hbox = (sg[:, K:].astype(np.uint64) * RH[K:]).sum(axis=1, dtype=np.uint64)
    hn = hv - hbox - RF[face]                               # unit signs only
    inc_v, inc_key, inc_code = [], [], []
    for mm in range(S + 1):
        idx = np.flatnonzero(mcount == mm)
        if idx.size == 0:
            continue
        uz = Z[idx][isu[idx]].reshape(idx.size, mm)
        combos = _sign_combos(mm)                            # (C, mm)
        r = RH[uz]                                            # (n, mm)
        key = hn[idx][:, None] + np.where(combos[None, :, :] > 0, r[:, None, :],
                                          _neg(r)[:, None, :]).sum(axis=2, dtype=np.uint64)
        inc_v.append(np.repeat(idx, combos.shape[0]))
        inc_key.append(key.ravel())
        inc_code.append(np.tile(np.arange(combos.shape[0]), idx.size))
    inc_v = np.concatenate(inc_v)
    inc_key = np.concatenate(inc_key)
    inc_code = np.concatenate(inc_code)
    # ---- cells (per face)
    ckey = inc_key + RF[face[inc_v]]
    _, cfirst, cinv = np.unique(ckey, return_index=True, return_inverse=True)
    cinv = cinv.ravel()
    nc = cfirst.size
    tv = t[inc_v]
    cnt = np.bincount(cinv, minlength=nc).astype(float)
    tsum = np.bincount(cinv, weights=tv, minlength=nc)
    tmax = np.zeros(nc)
    np.maximum.at(tmax, cinv, tv)
    live = tmax > 0                                        # cells lying wholly at infinity are no regions
    n_at_infinity = int((~live).sum())
    # ---- regions (across faces)
    _, rfirst, rinv_c = np.unique(inc_key[cfirst], return_index=True, return_inverse=True)
    rinv_c = rinv_c.ravel()
    # regions that only have cells at infinity are dropped with those cells
    live_region = np.zeros(rfirst.size, bool)
    live_region[rinv_c[live]] = True
    remap = -np.ones(rfirst.size, np.int64)
    remap[live_region] = np.arange(int(live_region.sum()))
    creg = np.where(live, remap[rinv_c], -1)               # region of every cell (-1: dropped)
    nR = int(live_region.sum())
    if max_regions is not None and nR > max_regions:
        _too_many(nR, max_regions)
    # chosen cell per region: the live one with the largest mean t
    meant = tsum / cnt
    cl = np.flatnonzero(live)
    o = np.lexsort((-meant[cl], creg[cl]))
    cl = cl[o]
    firstpos = np.concatenate([[True], creg[cl][1:] != creg[cl][:-1]])
    chosen = np.empty(nR, np.int64)
    chosen[creg[cl[firstpos]]] = cl[firstpos]
    # interior: vertex mean of the chosen cell, dehomogenised
    sel = np.zeros(nc, bool)
    sel[chosen] = True
    inc_sel = sel[cinv]
    csum = np.zeros((nc, S + 1))
    for d in range(S + 1):
        csum[:, d] = np.bincount(cinv[inc_sel], weights=X[inc_v[inc_sel], d], minlength=nc)
    cs = csum[chosen]
    interior = cs[:, :S] / cs[:, S:]
    # patterns from one incidence of every region
    rep = cfirst[chosen]
    rv, rc = inc_v[rep], inc_code[rep]
    patterns = sg[rv, :K] > 0
    for mm in range(1, S + 1):
        w = np.flatnonzero(mcount[rv] == mm)
        if w.size == 0:
            continue
        uz = Z[rv[w]][isu[rv[w]]].reshape(w.size, mm)
        vals = _sign_combos(mm)[rc[w]] > 0
        patterns[np.repeat(w, mm), uz.ravel()] = vals.ravel()
    patterns = _fill_inactive(patterns, active, dead_sign, dup_of, dup_flip)
    # bounded: no live-cell vertex at infinity
    inc_reg = creg[cinv]
    keep = inc_reg >= 0
    bounded = np.ones(nR, bool)
    bounded[inc_reg[keep & (tv == 0)]] = False
    # facets: unit zeros of the region's vertices with t > 0 that span a facet
    zz = Z[inc_v[keep]]
    uu = isu[inc_v[keep]]
    on = np.broadcast_to(inc_reg[keep][:, None], zz.shape)[uu].astype(np.int64) * (K + 1) + zz[uu]
    on_v = np.broadcast_to(inc_v[keep][:, None], zz.shape)[uu]
    pair = np.unique(on[t[on_v] > 0])
    # a unit whose hyperplane only touches a region along an edge or at a vertex (zero
    # biases, a latent coordinate the net ignores: hyperplanes sharing a line through 0)
    # is zero at some of its vertices but spans no facet there: rank < S in homogeneous
    # coordinates.  Regions of zero volume (rank < S + 1: ties of the symbolic
    # perturbation, flagged degenerate) keep all, else they would be left unbounded.
    # Eigenvalues below RANK_TOL (a cross-section of relative width ~1e-10) are rounding
    # or snapping (SNAP_RTOL moves a vertex by ~1e-11 of the scale).
    use = np.isin(on, pair)
    facet = _spans(X, on_v[use], np.searchsorted(pair, on[use]), pair.size, 1)
    if not facet.all():
        full = _spans(X, inc_v[keep], inc_reg[keep], nR, 0)
        facet |= ~full[pair // (K + 1)]
    pair = pair[facet]
    fr, fu = pair // (K + 1), pair % (K + 1)
    facet_ptr = np.concatenate([[0], np.cumsum(np.bincount(fr, minlength=nR))]).astype(np.int64)
    info = {"vertices": V, "cells": nc, "cells_at_infinity": n_at_infinity, "pairing_anomalies": anomalies}
    if anomalies:
        warnings.warn(f"edge subdivision: {anomalies} combinatorial anomalies (unmatched 2-face keys or "
                      f"inconsistent edges: a degenerate arrangement); "
                      "check the partition with check_partition", RuntimeWarning, stacklevel=3)
    return {"patterns": patterns, "interior": interior, "facet_ptr": facet_ptr,
            "facet_units": fu.astype(np.int64), "bounded": bounded, "info": info}


def _det(m):
    """Determinants of (..., r, r): closed forms up to r = 3 (LAPACK's batched LU costs
    ~1 us a matrix), else np.linalg.det."""
    r = m.shape[-1]
    if r > 3:
        return np.linalg.det(m)
    if r == 1:
        return m[..., 0, 0]
    if r == 2:
        return m[..., 0, 0] * m[..., 1, 1] - m[..., 0, 1] * m[..., 1, 0]
    return (m[..., 0, 0] * (m[..., 1, 1] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 1])
            - m[..., 0, 1] * (m[..., 1, 0] * m[..., 2, 2] - m[..., 1, 2] * m[..., 2, 0])
            + m[..., 0, 2] * (m[..., 1, 0] * m[..., 2, 1] - m[..., 1, 1] * m[..., 2, 0]))


def _spans(X, v, group, n_groups, deficiency):
    """(n_groups,) bool: the vectors X[v] of each group span rank >= S + 1 - deficiency
    (X (V, S + 1) homogeneous coordinates, v (N,) vertices, group (N,) their group index).

    On the Gram matrix of the unit vectors (trace 1, eigenvalues l_0 <= ... <= l_S): the
    sum of its principal minors of order r = S + 1 - deficiency is at most C(S + 1, r)
    l_deficiency, so where it is above 1e-12 the rank is r (it errs by ~eps).  The rest
    are decided on the projections onto the Gram matrix's two smallest eigenvectors,
    whose own Gram matrix has l_0, l_1 to ~eps^2 (the first one's eigenvalues err by
    ~eps): l_deficiency above RANK_TOL."""
    from itertools import combinations
    d = X.shape[1]
    x = X[v]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)

    def gram(y, g, n):
        out = np.empty((n, y.shape[1], y.shape[1]))
        for i in range(y.shape[1]):
            for j in range(i, y.shape[1]):
                out[:, i, j] = out[:, j, i] = np.bincount(g, weights=y[:, i] * y[:, j], minlength=n)
        return out / np.maximum(np.bincount(g, minlength=n), 1)[:, None, None]

    g = gram(x, group, n_groups)
    idx = np.array(list(combinations(range(d), d - deficiency)))
    out = _det(g[:, idx[:, :, None], idx[:, None, :]]).sum(axis=1) > 1e-12
    rest = np.flatnonzero(~out)
    if rest.size:
        where = -np.ones(n_groups, np.int64)
        where[rest] = np.arange(rest.size)
        sel = where[group] >= 0
        small = np.linalg.eigh(g[rest])[1][:, :, :2]                   # (n_rest, S + 1, 2)
        y = np.einsum("nd,ndk->nk", x[sel], small[where[group[sel]]])
        out[rest] = np.linalg.eigvalsh(gram(y, where[group[sel]], rest.size))[:, deficiency] > RANK_TOL
    return out


# ============================================================================ LP walk (reference)
def _normalised_rows(G, h):
    """Drop zero rows (None if one of them is violated) and scale the rest to unit normals."""
    nrm = np.linalg.norm(G, axis=1)
    zero = nrm == 0
    if np.any(h[zero] < 0):
        return None
    keep = np.flatnonzero(~zero)
    return G[keep] / nrm[keep, None], h[keep] / nrm[keep], keep


LP_SECONDS = 10.0    # per LP: ours (S + 1 variables) take milliseconds, but HiGHS's interior
                     # point ran for minutes, deaf to Ctrl-C, on rows of rounding noise


def _linprog(c, **kw):
    """scipy's HiGHS, falling back to its interior-point solver when the simplex gives up
    (it does on some small LPs with an unbounded optimal face).  None if neither solves;
    a CpadgnError if the last try ran out of time (LP_SECONDS)."""
    from scipy.optimize import linprog
    res = None
    for method in ("highs", "highs-ipm"):
        res = linprog(c, method=method, options={"time_limit": LP_SECONDS}, **kw)
        if res.status in (0, 2):
            break
    if res.status == 1:
        raise CpadgnError(f"a linear program of the partition ran past its {LP_SECONDS:g} s limit; the generator "
                          "may be badly scaled: retrain it on standardised data, or report it")
    return res if res.status == 0 else None


def _chebyshev(Gn, hn, cap=1.0):
    """Chebyshev centre of {z : Gn z <= hn} (unit rows), radius capped at ``cap``.

    Returns (centre (S,), radius) or None when infeasible.
    """
    S = Gn.shape[1]
    if Gn.shape[0] == 0:
        return np.zeros(S), cap
    res = _linprog(np.r_[np.zeros(S), -1.0], A_ub=np.hstack([Gn, np.ones((Gn.shape[0], 1))]), b_ub=hn,
                   bounds=[(None, None)] * S + [(0.0, cap)])
    if res is None:
        return None
    return res.x[:S], float(res.x[S])


def _same_hyperplane(A):
    """(n,) for each row of A (n, S + 1) (rows [Gn, -hn], unit normals) the first row of
    its hyperplane: rows within L1 distance LP_FACET_TOL of each other are one hyperplane
    (units whose hyperplanes coincide up to rounding), since then A_i y <= A_j y +
    LP_FACET_TOL on the facet LP's box |y|_inf <= 1."""
    close = np.abs(A[:, None, :] - A[None, :, :]).sum(axis=2) <= LP_FACET_TOL
    first = np.argmax(close, axis=1) if len(A) else np.zeros(0, np.int64)
    while np.any(first[first] != first):          # chains of close rows: one first row per chain
        first = first[first]
    return first


def _facets_by_lp(Gn, hn, cand=None):
    """Non-redundant rows of {Gn z <= hn} (unit rows, non-empty interior) by one LP each.

    Row i is a facet of the region iff it is one of its homogenised cone
    {y = (z, t) : Gn z - hn t <= 0, t >= 0}, i.e. iff some y in the cone of the other
    rows, normalised to the box |y|_inf <= 1, has Gn_i z - hn_i t > 0 (a bounded LP).
    Rows of one hyperplane (``_same_hyperplane``): the first one counts, and only it is
    tested (tested against each other, each would be redundant and the facet lost).
    cand: the rows to test (default all).
    """
    S = Gn.shape[1]
    A = np.hstack([Gn, -hn[:, None]])
    first = _same_hyperplane(A)
    uniq = np.flatnonzero(first == np.arange(first.size))
    cand = uniq if cand is None else np.unique(first[cand])
    out = []
    for i in cand:
        others = uniq[uniq != i]
        res = _linprog(-A[i], A_ub=A[others], b_ub=np.zeros(others.size),
                       bounds=[(-1.0, 1.0)] * S + [(0.0, 1.0)])
        # an LP that no solver can settle keeps the row (listing a redundant row is safe)
        if res is None or -res.fun > LP_FACET_TOL:
            out.append(i)
    return np.array(out, dtype=np.int64)


def _cone_facets(Gn, hn, c):
    """Non-redundant rows of {Gn z <= hn} given an interior point c; (rows, found by LP).

    The region's homogenised cone {(z, t): Gn z <= hn t, t >= 0} has as facets exactly the
    region's facets (plus possibly t >= 0); they are the extreme rays of the cone spanned
    by the constraint normals, i.e. the vertices of the convex hull of the normals scaled
    onto the hyperplane {y : y . (c, 1) = -1}: an S-dimensional hull.
    """
    from scipy.spatial import ConvexHull, QhullError
    S = Gn.shape[1]
    slack = hn - Gn @ c
    pts = np.vstack([np.hstack([Gn, -hn[:, None]]) / slack[:, None], np.r_[np.zeros(S), -1.0]])
    x0 = np.r_[c, 1.0]
    Q = np.linalg.svd(x0[None, :])[2][1:].T                 # (S+1, S) basis of x0^perp
    P = pts @ Q
    try:
        hull = ConvexHull(P)
    except (QhullError, ValueError):
        return _facets_by_lp(Gn, hn), True
    v = hull.vertices
    return np.sort(v[v < Gn.shape[0]]), False


def _is_bounded(GnF):
    """A polyhedron with facet normals GnF is bounded iff they positively span R^S."""
    from scipy.spatial import ConvexHull, QhullError
    S = GnF.shape[1]
    if GnF.shape[0] <= S:
        return False
    try:
        hull = ConvexHull(GnF)
    except (QhullError, ValueError):
        return False
    return bool(np.all(hull.equations[:, -1] < -1e-12))


def _region_geometry(net, pattern, classes=None):
    """(centre, radius, facet units, bounded, ...) of one sign pattern, or None if it has
    no interior point the LP can certify (Chebyshev radius <= LP_MIN_RADIUS)."""
    G, h = _region_constraints_snapped(net, pattern[None])
    nr = _normalised_rows(G[0], h[0])
    if nr is None:
        return None
    Gn, hn, keep = nr
    if classes is not None:                 # dead and duplicate units add no facet
        act = classes[0][keep]
        Gn, hn, keep = Gn[act], hn[act], keep[act]
    ch = _chebyshev(Gn, hn)
    if ch is None or ch[1] <= LP_MIN_RADIUS:
        return None
    c, r = ch
    fac, by_lp = _cone_facets(Gn, hn, c)
    bounded = _is_bounded(Gn[fac])
    if not bounded and not by_lp:
        # rows that are exact combinations of others and of t >= 0 (ReLU nets make them:
        # a deeper unit's affine map is a combination of its active inputs' maps plus its bias)
        # lie on the hull's boundary, and round-off may keep them: confirm by LP
        fac = _facets_by_lp(Gn, hn, fac)
    return c, r, keep[fac], bounded, Gn, hn, keep


def _cross_point_pattern(net, geom, k):
    """Pattern just across facet unit k of a region, from a point in the facet's interior."""
    c, r, fac, bounded, Gn, hn, keep = geom
    i = int(np.flatnonzero(keep == k)[0])
    first = _same_hyperplane(np.hstack([Gn, -hn[:, None]]))
    same = first == first[i]
    S = Gn.shape[1]
    oth = np.flatnonzero(~same)
    res = _linprog(np.r_[np.zeros(S), -1.0], A_ub=np.hstack([Gn[oth], np.ones((oth.size, 1))]), b_ub=hn[oth],
                   A_eq=np.r_[Gn[i], 0.0][None, :], b_eq=[hn[i]], bounds=[(None, None)] * S + [(0.0, 1.0)])
    if res is None or res.x[S] <= 0:
        return None
    z = res.x[:S] + 0.5 * res.x[S] * Gn[i]
    return net.patterns(z[None])[0]


def _canonical_pattern(net, pattern, classes):
    """(K,) bool -> (K,) bool: the one pattern the subdivision gives the region of ``pattern``.

    Inactive units come from their constants/originals (``_fill_inactive``), and an active
    unit whose pre-activation is identically 0 on the region (a zero constraint row: e.g.
    relu(a - b) in max(a, b) = b + relu(a - b) where a = b = 0 after a ReLU) counts as
    >= 0, as in ``net.patterns`` and the subdivision; either sign satisfies its constraint,
    so without this the walk lists the region once per sign.  One pass suffices: such a
    unit outputs 0 whatever its sign, so no other row changes.
    """
    q = _fill_inactive(pattern[None].copy(), *classes)
    G, h = _region_constraints_snapped(net, q)
    identically_zero = ~G[0].any(axis=1) & (h[0] == 0) & classes[0]
    return _fill_inactive(q | identically_zero, *classes)[0]


def _lp_walk(net, *, max_regions=None, progress=None, limit=None, time_limit=None):
    """BFS over the region adjacency graph; stops early (complete=False) at limit/time_limit."""
    S, K = net.latent_dim, net.n_units
    t_start = time.perf_counter()
    classes = _unit_classes(net)
    fill = lambda q: _canonical_pattern(net, q, classes)
    rng = np.random.default_rng(0)
    start = None
    for trial in range(20):
        z0 = np.zeros((1, S)) if trial == 0 else rng.standard_normal((1, S))
        q0 = fill(net.patterns(z0)[0])
        if _region_geometry(net, q0, classes) is not None:
            start = q0
            break
    if start is None:
        raise RuntimeError("lp-walk: no full-dimensional region found at the start points")
    seen = {start.tobytes()}
    queue = deque([(start, None, -1)])
    pats, cents, facs, bnds = [], [], [], []
    complete = True
    while queue:
        if (limit is not None and len(pats) >= limit) or \
                (time_limit is not None and time.perf_counter() - t_start > time_limit):
            complete = False
            break
        q, parent_geom, k = queue.popleft()
        geom = _region_geometry(net, q, classes)
        if geom is None:
            # the flip of facet k is empty (a degenerate crossing): cross geometrically
            if parent_geom is not None:
                q2 = _cross_point_pattern(net, parent_geom, k)
                q2 = None if q2 is None else fill(q2)
                if q2 is not None and q2.tobytes() not in seen:
                    seen.add(q2.tobytes())
                    queue.appendleft((q2, None, -1))
            continue
        c, r, fac, bounded = geom[:4]
        pats.append(q)
        cents.append(c)
        facs.append(fac)
        bnds.append(bounded)
        if max_regions is not None and len(pats) > max_regions:
            _too_many(len(pats), max_regions)
        for kk in fac:
            q2 = q.copy()
            q2[kk] = ~q2[kk]
            q2 = fill(q2)
            key = q2.tobytes()
            if key not in seen:
                seen.add(key)
                queue.append((q2, geom, int(kk)))
        if progress is not None and len(pats) % 200 == 0:
            progress(len(pats), None, f"lp-walk: {len(pats):,} regions, {len(queue):,} queued")
    counts = np.array([f.size for f in facs], dtype=np.int64)
    return {"patterns": np.array(pats, dtype=bool).reshape(-1, K), "interior": np.array(cents).reshape(-1, S),
            "facet_ptr": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "facet_units": np.concatenate(facs).astype(np.int64) if facs else np.zeros(0, np.int64),
            "bounded": np.array(bnds, dtype=bool), "info": {"complete": complete},
            "seconds": time.perf_counter() - t_start}


# ============================================================================ finishing
def _log_prior_masses(G, h, mask):
    """log P[z in {G z <= h}] for z ~ N(0, I), batched: (log_mass (B,), stderr (B,))."""
    from .polytope import polytope_log_mass
    B = G.shape[0]
    out, err = np.zeros(B), np.zeros(B)
    has = mask.any(axis=1)
    if has.any():
        # S >= 4 masses are randomised QMC: 16 independent sets of 16 points per region
        # (independent across regions too), each mass with its standard error
        lm, se = polytope_log_mass(G[has], h[has], mask[has], n_qmc=256)
        out[has], err[has] = lm, se
    return out, err


def _finish(net, raw, method, t0, progress, prior_masses=True, chunk=4096) -> Partition:
    """Canonical order, interior checks (re-centring thin-looking regions), clearance, masses."""
    pats = raw["patterns"]
    nR = pats.shape[0]
    packed = np.packbits(pats, axis=1)
    order = np.lexsort(packed.T[::-1]) if packed.shape[1] else np.arange(nR)
    ptr = raw["facet_ptr"]
    units = raw["facet_units"][_csr_positions(ptr, order)]
    counts = (ptr[1:] - ptr[:-1])[order]
    sorted_already = np.array_equal(order, np.arange(nR))         # the subdivision's are: no copy
    part = Partition(patterns=pats if sorted_already else pats[order], interior=raw["interior"][order].copy(),
                     facet_ptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), facet_units=units,
                     bounded=raw["bounded"][order], log_prior_mass=np.zeros(nR),
                     log_prior_mass_stderr=np.zeros(nR), clearance=np.full(nR, np.inf),
                     degenerate=np.zeros(nR, bool), fingerprint=net.fingerprint(), method=method, seconds=0.0)
    ok = np.zeros(nR, bool)
    for s0 in range(0, nR, chunk):
        idx = np.arange(s0, min(nR, s0 + chunk))
        G, h, mask = part.facets(net, idx)
        part.clearance[idx] = _clearance(G, h, mask, part.interior[idx])
        ok[idx] = (net.patterns(part.interior[idx]) == part.patterns[idx]).all(axis=1)
        lm, se = _log_prior_masses(G, h, mask) if prior_masses else (np.nan, np.nan)
        part.log_prior_mass[idx], part.log_prior_mass_stderr[idx] = lm, se
        if progress is not None:
            progress(int(idx[-1]) + 1, nR, "region checks and prior masses")
    # re-centre the few regions whose interior point looks thin or wrong
    for i in np.flatnonzero(~ok | (part.clearance < DEGENERATE_CLEARANCE)):
        G, h = _region_constraints_snapped(net, part.patterns[i:i + 1])
        nr = _normalised_rows(G[0], h[0])
        ch = None if nr is None else _chebyshev(nr[0], nr[1])
        if ch is not None and ch[1] > 0:
            Gf, hf, mf = part.facets(net, np.array([i]))
            cl = _clearance(Gf, hf, mf, ch[0][None])[0]
            okc = bool((net.patterns(ch[0][None])[0] == part.patterns[i]).all())
            if okc and (not ok[i] or cl > part.clearance[i]):
                part.interior[i], part.clearance[i], ok[i] = ch[0], cl, True
    part.degenerate = (part.clearance < DEGENERATE_CLEARANCE) | ~ok
    part.seconds = time.perf_counter() - t0
    return part


def _clearance(G, h, mask, c):
    """min over facets of (h - G c) / |G|: (B, F, S), (B, F), (B, F), (B, S) -> (B,)."""
    nrm = np.linalg.norm(G, axis=2)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = (h - np.einsum("bfs,bs->bf", G, c)) / nrm
    d = np.where(mask & (nrm > 0), d, np.inf)
    return d.min(axis=1, initial=np.inf)
