"""Edges of 3-D polyhedra and the distance from a point to a polyhedron.

A polyhedron P = {u : a_k . u <= c_k} (unit normals a_k) in R^3.  Its nearest point to
the origin is either the foot c_k a_k of a facet whose plane it crosses, or a point of
an edge (the line where two facets meet, cut to P by the others).  So the exact
distance is a minimum over the facet feet that lie in P and over the edges' nearest
points, and translating P (moving every c_k by -a_k . v and every edge by -v) changes
nothing else: the edges are found once per polyhedron and reused for every translate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_PARALLEL = 1e-9     # |a_j x a_k| below which two planes count as parallel (no edge)
_ROUGH_ARM = 1e-6    # |a_j x a_k| below which an edge's volume term is too rough to claim a volume


@dataclass
class Edges:
    """The edges of B polyhedra, padded to E per polyhedron: each the segment
    {p + t e : lo <= t <= hi} (lo = -inf or hi = +inf for rays and lines).

    p (B, E, 3) the point of the edge's line nearest the origin, e (B, E, 3) unit
    directions, lo, hi (B, E), real (B, E) bool (False: padding); volume (B,) the
    polyhedron's volume (inf where it is unbounded)."""

    p: np.ndarray
    e: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    real: np.ndarray
    volume: np.ndarray


def polyhedron_edges(a: np.ndarray, c: np.ndarray, mask: np.ndarray, *, tol: float = 1e-9) -> Edges:
    """All edges of P = {u : a_k . u <= c_k}: a (B, F, 3) unit normals, c (B, F), mask (B, F).

    An edge is kept when its interval is non-empty up to ``tol`` (relative): keeping a
    sliver that is not quite an edge only adds a candidate point just outside P, which
    can only lower a distance computed from them, never raise it.
    """
    B, F, _ = a.shape
    j, k = np.triu_indices(F, 1)
    aj, ak = a[:, j], a[:, k]                                          # (B, Q, 3)
    cross = np.cross(aj, ak)
    norm = np.linalg.norm(cross, axis=-1)
    ok = mask[:, j] & mask[:, k] & (norm > _PARALLEL)
    e = cross / np.where(ok, norm, 1.0)[..., None]
    g = np.einsum("bqs,bqs->bq", aj, ak)
    # the line's point nearest the origin, (c_j (a_k x n) + c_k (n x a_j)) / |n|^2 with
    # n = a_j x a_k: cross products only (1 - g^2 rounds to 0 for planes within ~1e-8
    # of parallel, which divided by zero)
    n2 = np.where(ok, norm * norm, 1.0)[..., None]
    p = np.where(ok[..., None], (c[:, j, None] * np.cross(ak, cross) + c[:, k, None] * np.cross(cross, aj)) / n2,
                 0.0)
    # the other facets cut the line p + t e to t in [lo, hi]
    ae = np.einsum("bfs,bqs->bqf", a, e)                               # (B, Q, F)
    slack = c[:, None, :] - np.einsum("bfs,bqs->bqf", a, p)
    other = mask[:, None, :] & (np.arange(F)[None, None, :] != j[None, :, None]) \
        & (np.arange(F)[None, None, :] != k[None, :, None])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = slack / ae
    up = other & (ae > _PARALLEL)
    down = other & (ae < -_PARALLEL)
    hi = np.where(up, ratio, np.inf).min(-1)
    lo = np.where(down, ratio, -np.inf).max(-1)
    # a facet parallel to the line blocks it when the line is outside (the few such triples)
    blocked = np.zeros(ok.shape, bool)
    b_, q_, f_ = np.nonzero(other & ~up & ~down)
    scale = 1.0 + np.abs(c[b_, f_]) + np.linalg.norm(p[b_, q_], axis=-1)
    out = slack[b_, q_, f_] < -tol * scale
    blocked[b_[out], q_[out]] = True
    live = ok & ~blocked & (hi >= lo - tol * (1.0 + np.abs(lo) + np.abs(hi)))
    # volume = 1/3 sum_k c_k area_k, area_k = 1/2 sum over facet k's edges of their length
    # times their signed in-plane distance from facet k's foot, (c_j - g c_k) / |a_j x a_k|
    with np.errstate(invalid="ignore"):
        length = np.where(live, hi - lo, 0.0)
        arm = np.where(live, (c[:, k] * (c[:, j] - g * c[:, k]) + c[:, j] * (c[:, k] - g * c[:, j]))
                       / np.where(ok, norm, 1.0), 0.0)
        volume = np.where((live & ~np.isfinite(length)).any(-1), np.inf,
                          np.where(live, length * arm, 0.0).sum(-1) / 6.0)
    # compact: live edges first, padded to the largest count
    n = live.sum(1)
    E = max(int(n.max(initial=0)), 1)
    order = np.argsort(~live, axis=1, kind="stable")[:, :E]
    take = lambda x: np.take_along_axis(x, order if x.ndim == 2 else order[..., None], 1)
    real = take(live)
    p, e = np.where(real[..., None], take(p), 0.0), np.where(real[..., None], take(e), 0.0)
    # Where two edges share a line (three facets through it: a degenerate region) the
    # sum counts that line twice, so no volume is claimed there.
    # Nor where two facets of a live edge are within _ROUGH_ARM of parallel: its arm
    # (c_j - g c_k) / |a_j x a_k| rounds by eps / |a_j x a_k|, beyond the 1e-9 relative
    # margin the likelihood adds to the volume (and 1 - g^2 can round to 0).
    rough = (live & (norm < _ROUGH_ARM)).any(-1)
    volume = np.where(_shared_lines(p, e, real) | ~(volume > 0) | rough, np.inf, volume)
    return Edges(p=p, e=e, lo=np.where(real, take(lo), 0.0), hi=np.where(real, take(hi), 0.0), real=real,
                 volume=volume)


def _shared_lines(p, e, live, tol=1e-9):
    """(B,) True where two live edges lie on one line: p, e (B, Q, 3) (e unit where live),
    live (B, Q), tol < 0.04.  Only pairs with |e_i . e_j| > 0.999 in a Gram product get the
    test: any other pair has |e_i x e_j| > 0.04 > tol, so it is not parallel."""
    gram = np.matmul(e, e.transpose(0, 2, 1))                            # (B, Q, Q)
    near = np.triu(live[:, :, None] & live[:, None, :] & (np.abs(gram) > 0.999), 1)
    b, i, j = np.nonzero(near)
    parallel = np.linalg.norm(np.cross(e[b, i], e[b, j]), axis=-1) <= tol
    close = np.linalg.norm(p[b, i] - p[b, j], axis=-1) <= tol * (1.0 + np.linalg.norm(p[b, i], axis=-1))
    shared = np.zeros(p.shape[0], bool)
    shared[b[parallel & close]] = True
    return shared


_FAR = 1e300        # a padding edge's point: |q|^2 overflows to +inf from any v with |v| < 1e300


def pack_polyhedra(a, c, mask, edges: Edges):
    """P and its edges as two dense arrays for ``distance_to_packed``: a (B, F, 3), c (B, F),
    mask (B, F), ``edges`` (B, E, ...) -> facets (B, F, 4) records a_0, a_1, a_2, c (padding
    0, 0, 0, +inf: never crossed, never blocks a foot) and segments (B, E, 8) records p_0..2,
    e_0..2, lo, hi (padding p = (1e300, 0, 0), e = 0, lo = hi = 0: at distance +inf).
    A pair's gather is then two blocks, not eight arrays, and no masks are needed; records
    (not fields) last, so that a pair's first E' edges are one contiguous run of memory
    (gathering the fields' rows apart, 8 scattered reads a pair, took ~4x as long)."""
    return pack_facets(a, c, mask), pack_segments(edges)


def pack_facets(a, c, mask):
    """The facets block of ``pack_polyhedra``: (B, F, 4)."""
    facets = np.empty(a.shape[:2] + (4,))
    facets[..., :3] = np.where(mask[..., None], a, 0.0)
    facets[..., 3] = np.where(mask, c, np.inf)
    return facets


def padding_segments(B, E):
    """(B, E, 8) segments blocks of padding only (``pack_polyhedra``)."""
    segments = np.zeros((B, E, 8))
    segments[..., 0] = _FAR
    return segments


def pack_segments(edges: Edges):
    """The segments block of ``pack_polyhedra``: (B, E, 8)."""
    real = edges.real[..., None]
    segments = np.empty(edges.real.shape + (8,))
    segments[..., :3] = np.where(real, edges.p, np.array([_FAR, 0.0, 0.0]))
    segments[..., 3:6] = np.where(real, edges.e, 0.0)
    segments[..., 6] = np.where(edges.real, edges.lo, 0.0)
    segments[..., 7] = np.where(edges.real, edges.hi, 0.0)
    return segments


def distance_to_polyhedron(a, c, mask, edges: Edges, v) -> np.ndarray:
    """Distance from v to P = {u : a_k . u <= c_k} (0 inside), for P-translates: a (B, F, 3),
    c (B, F), mask (B, F), ``edges`` of P (B, ...), v (B, 3) -> (B,).  ``distance_to_packed``
    on ``pack_polyhedra``."""
    return distance_to_packed(*pack_polyhedra(a, c, mask, edges), v)


def distance_to_packed(facets, segments, v) -> np.ndarray:
    """Distance from v to P = {u : a_k . u <= c_k} (0 inside), for P-translates: facets
    (B, F, 4), segments (B, E, 8) (``pack_polyhedra``), v (B, 3) -> (B,).  Every
    crossed facet's plane separates v from P, so the distance is at least the largest
    violation a_k . v - c_k; where the nearest point is inside a facet it equals that
    facet's violation, so that facet is the most violated one.  Hence only the foot of the
    most violated facet is a candidate, kept when it satisfies the other facets (loosely:
    an extra candidate can only make the result smaller); otherwise the nearest point is
    on an edge.
    """
    v0, v1, v2 = (v[:, i, None] for i in range(3))
    a0, a1, a2, c = (facets[..., i] for i in range(4))
    cv = c - (a0 * v0 + a1 * v1 + a2 * v2)                              # offsets seen from v (+inf: padding)
    k = np.argmin(cv, -1)[:, None]
    ck = np.take_along_axis(cv, k, 1)
    crossed = ck[:, 0] < 0
    with np.errstate(invalid="ignore"):                                  # no real facet: inf * 0
        g = a0 * np.take_along_axis(a0, k, 1) + a1 * np.take_along_axis(a1, k, 1) + a2 * np.take_along_axis(a2, k, 1)
        inside_foot = (ck * g <= cv + 1e-9 * (1.0 + np.abs(cv))).all(-1)
    foot = np.where(crossed & inside_foot, ck[:, 0] * ck[:, 0], np.inf)
    p0, p1, p2 = segments[..., 0] - v0, segments[..., 1] - v1, segments[..., 2] - v2
    e0, e1, e2, lo, hi = (segments[..., i] for i in range(3, 8))
    t = np.clip(-(p0 * e0 + p1 * e1 + p2 * e2), lo, hi)
    p0 += t * e0
    p1 += t * e1
    p2 += t * e2
    with np.errstate(over="ignore"):                                     # padding: +inf
        along = (p0 * p0 + p1 * p1 + p2 * p2).min(-1, initial=np.inf)
    return np.where(crossed, np.sqrt(np.minimum(foot, along)), 0.0)
