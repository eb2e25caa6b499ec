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
    det = np.where(ok, 1.0 - g * g, 1.0)
    alpha = (c[:, j] - g * c[:, k]) / det
    beta = (c[:, k] - g * c[:, j]) / det
    p = np.where(ok[..., None], alpha[..., None] * aj + beta[..., None] * ak, 0.0)
    # the other facets cut the line p + t e to t in [lo, hi]
    ae = np.einsum("bfs,bqs->bqf", a, e)                               # (B, Q, F)
    slack = c[:, None, :] - np.einsum("bfs,bqs->bqf", a, p)
    other = mask[:, None, :] & (np.arange(F)[None, None, :] != j[None, :, None]) \
        & (np.arange(F)[None, None, :] != k[None, :, None])
    scale = 1.0 + np.abs(c[:, None, :]) + np.linalg.norm(p, axis=-1)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = slack / ae
    up = other & (ae > _PARALLEL)
    down = other & (ae < -_PARALLEL)
    hi = np.where(up, ratio, np.inf).min(-1)
    lo = np.where(down, ratio, -np.inf).max(-1)
    blocked = (other & ~up & ~down & (slack < -tol * scale)).any(-1)
    live = ok & ~blocked & (hi >= lo - tol * (1.0 + np.abs(lo) + np.abs(hi)))
    # volume = 1/3 sum_k c_k area_k, area_k = 1/2 sum over facet k's edges of their length
    # times their signed in-plane distance from facet k's foot, (c_j - g c_k) / |a_j x a_k|
    with np.errstate(invalid="ignore"):
        length = np.where(live, hi - lo, 0.0)
        arm = np.where(live, (c[:, k] * (c[:, j] - g * c[:, k]) + c[:, j] * (c[:, k] - g * c[:, j]))
                       / np.where(ok, norm, 1.0), 0.0)
        volume = np.where((live & ~np.isfinite(length)).any(-1), np.inf,
                          np.where(live, length * arm, 0.0).sum(-1) / 6.0)
    # Where two edges share a line (three facets through it: a degenerate region) the
    # sum counts that line twice, so no volume is claimed there.
    dup = _shared_lines(p, e, live)
    volume = np.where(dup | ~(volume > 0), np.inf, volume)
    # compact: live edges first, padded to the largest count
    n = live.sum(1)
    E = max(int(n.max(initial=0)), 1)
    order = np.argsort(~live, axis=1, kind="stable")[:, :E]
    take = lambda x: np.take_along_axis(x, order if x.ndim == 2 else order[..., None], 1)
    real = take(live)
    return Edges(p=np.where(real[..., None], take(p), 0.0), e=np.where(real[..., None], take(e), 0.0),
                 lo=np.where(real, take(lo), 0.0), hi=np.where(real, take(hi), 0.0), real=real,
                 volume=volume)


def _shared_lines(p, e, live, tol=1e-9):
    """(B,) True where two live edges lie on one line: p, e (B, Q, 3), live (B, Q)."""
    B, Q, _ = p.shape
    i, j = np.triu_indices(Q, 1)
    both = live[:, i] & live[:, j]
    parallel = np.linalg.norm(np.cross(e[:, i], e[:, j]), axis=-1) <= tol
    close = np.linalg.norm(p[:, i] - p[:, j], axis=-1) <= tol * (1.0 + np.linalg.norm(p[:, i], axis=-1))
    return (both & parallel & close).any(-1)


def distance_to_polyhedron(a, c, mask, edges: Edges, v) -> np.ndarray:
    """Distance from v to P = {u : a_k . u <= c_k} (0 inside), for P-translates.

    a (B, F, 3), c (B, F), mask (B, F), ``edges`` of P (B, ...), v (B, 3) -> (B,).  Every
    crossed facet's plane separates v from P, so the distance is at least the largest
    violation a_k . v - c_k; where the nearest point is inside a facet it equals that
    facet's violation, so that facet is the most violated one.  Hence only the foot of the
    most violated facet is a candidate, kept when it satisfies the other facets (loosely:
    an extra candidate can only make the result smaller); otherwise the nearest point is
    on an edge.
    """
    dot = lambda x, y: x[..., 0] * y[..., 0] + x[..., 1] * y[..., 1] + x[..., 2] * y[..., 2]
    cv = np.where(mask, c - dot(a, v[:, None, :]), np.inf)              # offsets seen from v
    k = np.argmin(cv, -1)
    i = np.arange(v.shape[0])
    ck = cv[i, k]
    crossed = ck < 0
    with np.errstate(invalid="ignore"):                                  # no real facet: inf * 0
        inside_foot = ((ck[:, None] * dot(a, a[i, k, None, :]) <= cv + 1e-9 * (1.0 + np.abs(cv))) | ~mask).all(-1)
    foot = np.where(crossed & inside_foot, ck * ck, np.inf)
    p = edges.p - v[:, None, :]
    t = np.clip(-dot(p, edges.e), edges.lo, edges.hi)
    q = p + t[..., None] * edges.e
    along = np.where(edges.real, dot(q, q), np.inf).min(-1)
    return np.where(crossed, np.sqrt(np.minimum(foot, along)), 0.0)
