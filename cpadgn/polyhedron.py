"""Exact standard-normal mass and moments over 3-D polyhedra P = {u : a_k . u <= b_k}.

The radial face formula of DESIGN section 4.  For every facet k (unit normal a_k,
foot f_k = b_k a_k) let B_k be the mass of the cone {t y : y in F_k, t >= 1} beyond its
polygon F_k; then

    mass = 1{0 in P} - sum_k sign(b_k) B_k,
    B_k  = 1{f_k in F_k} Phi(-|b_k|) - sum_e sign(c_e) T_ke,
    T_ke = |b_k| / (2 pi) int_{th_lo}^{th_hi} Phi(-r) / r dth,  r^2 = b_k^2 + c_e^2 + tau^2,

over the edges e = {n_e . u = c_e} of F_k in its plane (origin at the foot, tangent
coordinate tau = |c_e| tan th in [tau_lo, tau_hi]).  In S = 3 the radial integral of the
Gaussian over the cone has a closed form, int_1^inf phi_3(t y) t^2 dt = q(|y|), and so
does the in-plane radial integral of q, which leaves the 1-D edge integrals T.  The
moments follow from the divergence identities with each facet's exact 2-D mass and
first moment (the S = 2 polygon code on the facet's polygon).

The signed terms cancel to the mass; where the mass is below 1e-3 of them (small or thin
polytopes: for a cube of side h the terms are ~h^2, the mass ~h^3) and the polytope is
bounded and small against the Gaussian's scale, it is integrated directly instead, by a
positive-weight cubature on tetrahedra (``_cubature``).

Facets or edges through the origin (b_k = 0, c_e = 0) are moved just inside, as the
S = 2 code does: the formula is continuous from there.  Facets move by more than edges
(1e-100 against 1e-150), so that the in-plane offsets of facets that all pass through
the origin, b_j - b_k a_j . a_k = 1e-100 (1 - a_j . a_k), keep their true ratios.
"""
from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import erfcx, log_ndtr, roots_jacobi

from .stop import map_in_threads, stop_check
from .polytope import (LOG_SQRT_2PI, PolytopeMoments, _assemble, _by_row_count, _log1mexp,
                       _masked_logsumexp, _normalise, facet_segments, gauss_legendre_count, gauss_legendre_sums,
                       log_diff_ndtr, log_phi, panels_where_needed, polygon_moments)

TINY_B = 1e-100                    # facet offsets below this are moved to +TINY_B (just inside)
TINY = 1e-150                      # in-plane edge offsets below this are moved to +TINY
_SQRT_HALF = np.sqrt(0.5)
_PARALLEL = 1e-10                  # |in-plane normal| below this: a row parallel to the facet


def polyhedron_moments(A, b, mask=None, *, moments=True, memory_budget=None) -> PolytopeMoments:
    """Mass and moments of N(0, I_3) on P = {u : A u <= b}, exactly (stderr 0).

    A (B, F, 3), b (B, F), mask (B, F) bool (False: padding row).  Rows need not be
    unit; polytopes are grouped by their number of real rows and go through in chunks
    whose arrays (about a dozen of (chunk, F, F, F) float64) fit ``memory_budget`` bytes.
    """
    A, b = np.asarray(A, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mask = np.ones(b.shape, bool) if mask is None else np.asarray(mask, bool)
    B = A.shape[0]
    A, b, mask, empty = _normalise(A, b, mask)
    sel = np.flatnonzero(mask.any(-1))
    work = 3e6 if memory_budget is None else max(memory_budget / (8 * 12), 1e4)
    res = _by_row_count(_polyhedron_chunked, A[sel], b[sel], mask[sel], moments, work) if sel.size else None
    return _assemble(B, 3, sel, res, empty)


def _polyhedron_chunked(A, b, mask, moments, work=3e6):
    """``_polyhedron`` in chunks whose (B, F, F, F) facet-polygon arrays stay small."""
    B, F, _ = A.shape
    step = int(max(1, work // max(F, 1) ** 3))
    parts = []
    for s in range(0, B, step):
        stop_check()
        parts.append(_polyhedron(A[s:s + step], b[s:s + step], mask[s:s + step], moments))
    return PolytopeMoments.concat(parts)


# ------------------------------------------------------------------ facet polygons
def facet_polygons(A, b, mask):
    """Each facet's polygon in its own plane, origin at the foot b_k a_k.

    A (B, F, 3) unit rows, b (B, F) (no |b| < TINY_B), mask (B, F).  Returns
    E (B, F, 2, 3) an orthonormal basis of each facet's plane (rows),
    a2 (B, F, F, 2) unit in-plane normals and c2 (B, F, F) offsets of the other rows
    j restricted to facet k's plane ({u2 : a2[k, j] . u2 <= c2[k, j]}, |c2| >= TINY),
    rows (B, F, F) where row j is a real edge constraint of facet k, and
    alive (B, F): facet k is a real facet (not blocked by a parallel row, not a
    repeat of an earlier identical row).
    """
    B, F, _ = A.shape
    axis = np.argmin(np.abs(A), -1)                                     # least aligned unit vector
    e = np.eye(3)[axis]
    e1 = e - np.sum(e * A, -1, keepdims=True) * A
    e1 /= np.linalg.norm(e1, axis=-1, keepdims=True)
    E = np.stack([e1, np.cross(A, e1)], -2)                              # (B, F, 2, 3)
    g = np.einsum("bks,bjs->bkj", A, A)                                   # a_j . a_k
    a2 = np.einsum("bkis,bjs->bkji", E, A)
    c2 = b[:, None, :] - b[:, :, None] * g                               # b_j - b_k a_j . a_k
    nrm = np.linalg.norm(a2, axis=-1)
    other = mask[:, :, None] & mask[:, None, :] & ~np.eye(F, dtype=bool)
    parallel = other & (nrm <= _PARALLEL)
    # Relative, not absolute: near the origin the terms depend on the offsets' ratios.
    tol = 1e-12 * (np.abs(b)[:, None, :] + np.abs(b)[:, :, None])
    blocked = (parallel & (c2 < -tol)).any(-1)
    earlier = np.arange(F)[None, :] < np.arange(F)[:, None]              # j < k
    repeat = (parallel & (g > 0) & (np.abs(c2) <= tol) & earlier).any(-1)
    alive = mask & ~blocked & ~repeat
    rows = other & ~parallel & alive[:, :, None]
    safe = np.where(rows, nrm, 1.0)
    a2 = np.where(rows[..., None], a2 / safe[..., None], 0.0)
    c2 = np.where(rows, c2 / safe, 1.0)
    c2 = np.where(np.abs(c2) < TINY, TINY, c2)
    return E, a2, c2, rows, alive


# ------------------------------------------------------------------ edge integrals
def log_edge_term(b, c, tau_lo, tau_hi):
    """``log_edge_and_owen_terms`` without the Owen segments: log T (n,)."""
    return _edge_terms(b, c, tau_lo, tau_hi, False)[0]


def log_edge_and_owen_terms(b, c, tau_lo, tau_hi):
    """log T and log G of each edge, on the same nodes (n,), (n,).

    G = (1/2pi) int_{tau_lo}^{tau_hi} c exp(-(c^2 + t^2)/2) / (c^2 + t^2) dt is the edge's
    term in its facet's 2-D mass (``polytope.log_owen_segment``, p = c).  With t = c sinh v
    its integrand is exp(-c^2 cosh^2 v / 2) / cosh v = exp(-(tau^2 - tau*^2) / 2) (c / h)
    exp(-h*^2 / 2): T's without the factors erfcx(r / sqrt 2) / r, whose ratios to their
    peak values only raise T's growth bound and fall, so T's node count (and panels)
    serve G too, and G costs two operations per node."""
    return _edge_terms(b, c, tau_lo, tau_hi, True)


def _edge_terms(b, c, tau_lo, tau_hi, owen):
    """log T = log (b / 2 pi) int_{th_lo}^{th_hi} Phi(-r) / r dth, r^2 = b^2 + c^2 + tau^2,
    tau = c tan th, for b = |b_k| > 0, c = |c_e| > 0 and tau_lo <= tau_hi (+-inf for rays).
    All inputs (n,); returns log T (n,) and, with owen, log G (n,) of
    ``log_edge_and_owen_terms`` (else None).

    With tau = c sinh v (th the Gudermannian of v, dth = dv / cosh v) the integrand
    g(v) = Phi(-r) / (r cosh v), r = hypot(b, c cosh v), is analytic in the strip
    |Im v| < pi/2 (poles of 1/cosh, branch points of r), so Gauss-Legendre in v converges
    geometrically at any c (c -> 0: a Lorentzian of width c in tau becomes 1/cosh v).
    g is largest at v*, the point of the range nearest 0, and falls at least like
    cosh v* / cosh v and exp(-(tau^2 - tau*^2) / 2); the range is clipped where either
    bound reaches e^-40.

    Node count (``_edge_node_count``): on |Im v| <= pi/4, Re r^2 = b^2 + c^2 (cosh 2x
    cos 2y + 1) / 2 >= Q = b^2 + c^2 / 2 (v = x + iy), so r = sqrt(r^2) is analytic with
    Re r >= sqrt Q, and with Phi(-r) = exp(-r^2 / 2) erfcx(r / sqrt 2) / 2,
    |erfcx(z)| <= erfcx(Re z) (erfcx(z) = 2 / sqrt(pi) int_0^inf exp(-t^2 - 2 z t) dt) and
    |cosh v| >= cosh x cos y,
        |g(v)| <= M = Phi(-sqrt Q) / (sqrt Q cosh x_n cos(pi/4)),
    x_n the real part nearest 0 in the rectangle around the interval's Bernstein ellipse.
    Against g(v*) = Phi(-r*) / (r* cosh v*) (r*^2 - Q = c^2 / 2 + tau*^2) and the fall
    across the interval (bounded above, ``_edge_rule``), ``polytope.gauss_legendre_count`` gives the nodes for a relative
    truncation error below 2^-52; erfcx(sqrt(Q / 2)) is bounded above by
    2 / (sqrt(pi) (s + sqrt(s^2 + 4 / pi))) (Abramowitz-Stegun 7.1.13).  Ranges that would
    need more than 16 nodes are split into panels of width <= 1.5 and a fall of at most
    8, 16 nodes each (checked against mpmath, not covered by the bound:
    ``polytope.panels_where_needed``).  Nodes are summed relative to the peak, Phi(-r) = erfcx(r / sqrt 2)
    exp(-r^2 / 2) / 2 giving the ratio without logarithms, so T keeps its relative
    accuracy far out (log T down to -1e4 and beyond):
        T = b c exp(-r*^2 / 2) / (4 pi) int exp(-(tau^2 - tau*^2) / 2) erfcx(r / sqrt 2) / (r h) dv,
    h = c cosh v.  b and c above 1e150 are taken as 1e150 (T below exp(-5e299) either
    way), so that b^2 + c^2 + tau^2 is finite and r needs no hypot (slow in libm).
    T's nodes on edges with r*^2 <= ``_NEAR_R2`` take the same integrand times
    exp(-r*^2 / 2), erfc(r / sqrt 2) / (r h) (``_near_edge_integrands``): over the clipped
    range r^2 <= r*^2 + 80, so erfc stays a normal number, and one erfc per node replaces
    an exp and an erfcx (the same function up to a constant: the same nodes).
    """
    b, c = np.minimum(b, 1e150), np.minimum(c, 1e150)
    tau_star, h_star, r_star, v0, width, n_panels, nodes = _edge_rule(b, c, tau_lo, tau_hi)
    bc2 = b * b + c * c
    far = r_star * r_star > _NEAR_R2
    shift = np.where(far, 0.5 * r_star * r_star, 0.0)
    if not owen:
        total = gauss_legendre_sums(v0, width, n_panels, nodes, _near_edge_integrands, bc2, c, tau_star, far)
        return np.where(width > 0, _log_product(b * c / (4 * np.pi), total) - shift, -np.inf), None
    total, total_g = gauss_legendre_sums(v0, width, n_panels, nodes, _edge_and_owen_integrands, bc2, c, tau_star,
                                         far, outputs=2)
    log_t = np.where(width > 0, _log_product(b * c / (4 * np.pi), total) - shift, -np.inf)
    return log_t, np.where(width > 0, _log_product(c / (2 * np.pi), total_g) - 0.5 * h_star * h_star, -np.inf)


def _edge_rule(b, c, tau_lo, tau_hi, c_twin=None):
    """The quadrature of ``log_edge_and_owen_terms`` (see ``_edge_terms``; b, c <= 1e150):
    tau*, c cosh v*, r*, the clipped range's start v0 and width in v, and the panels and
    nodes per panel (all (n,)).  With c_twin (n,) (>= c, ``_twin_edge_terms``) the rule
    that serves the twin facet too: the range clipped as for the twin and the node count
    raised by log 3 - log w(tau*)."""
    tau_lo, tau_hi = np.clip(tau_lo, -1e100, 1e100), np.clip(tau_hi, -1e100, 1e100)
    tau_star = np.clip(0.0, tau_lo, tau_hi)
    t2_star = tau_star * tau_star
    c2 = c * c
    bc2 = b * b + c2
    h_star = np.sqrt(c2 + t2_star)                                       # c cosh v*
    r_star = np.sqrt(bc2 + t2_star)
    h_cut = h_star if c_twin is None else np.sqrt(c_twin * c_twin + t2_star)
    tau_cut = np.minimum(np.sqrt(t2_star + 80.0), h_cut * np.exp(40.0))
    t0, t1 = np.maximum(tau_lo, -tau_cut), np.minimum(tau_hi, tau_cut)
    v0, v1 = _asinh(t0 / c), _asinh(t1 / c)
    width = np.maximum(v1 - v0, 0.0)
    extra = 0.0 if c_twin is None else np.log(3.0 * (c_twin * c_twin + t2_star) / (c2 + t2_star))
    # g falls monotonically away from v*: its least value is at the end farther from 0
    nodes = _edge_node_count(b, c, np.where(np.abs(t0) > np.abs(t1), t0, t1), v0, v1, extra)
    fall = _edge_fall(b, c, tau_star, r_star, h_star)
    return tau_star, h_star, r_star, v0, width, panels_where_needed(nodes, width, fall, t0, t1), nodes


def _asinh(x):
    """arcsinh of x (n,), to ~1 ulp as numpy's (sign(x) log1p(|x| + x^2 / (1 + sqrt(1 + x^2))),
    log(2 |x|) beyond 1e150, where x^2 would overflow and 1 / (4 x^2) is below eps), at
    about half its cost (torch's vectorised log1p)."""
    a = np.abs(x)
    with np.errstate(over="ignore", invalid="ignore"):
        a2 = a * a
        y = np.sqrt(a2 + 1.0)
        y += 1.0
        np.divide(a2, y, out=y)
        y += a
        out = torch.log1p(torch.from_numpy(y)).numpy()
    big = np.flatnonzero(a > 1e150)
    out[big] = np.log(2.0 * a[big])
    return np.copysign(out, x, out=out)


def _edge_fall(b, c, tau_star, r_star, h_star):
    """fall(tau, i): an upper bound on log g(v*) / g(v) (>= 0) at tau (k,) of the edges i
    (k,) (``_edge_terms``'s g; all arguments (n,), as ``_edge_rule`` finds them)."""
    def fall(tau, i):
        ex_star = erfcx(r_star[i] * _SQRT_HALF)
        with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
            return (0.5 * (tau - tau_star[i]) * (tau + tau_star[i])
                    + np.log(ex_star * _lower_erfcx_ratio(b[i], c[i], tau) / (r_star[i] * h_star[i])))
    return fall


def _log_product(front, total):
    """log(front total) (n,).  front and the node sum can be ~1e-200 and ~1e200 (a
    polytope at the origin's scale): one logarithm of their product, where it is a
    normal number, keeps the rounding at eps |log(front total)| rather than eps |log front|."""
    with np.errstate(divide="ignore", over="ignore", under="ignore"):
        prod = front * total
        out = np.log(prod)
        far = np.flatnonzero(~((prod > 1e-300) & (prod < 1e300)))
        out[far] = np.log(front[far]) + np.log(total[far])
    return out


def _edge_integrand(v, bc2, c, tau_star):
    """exp(-(tau^2 - tau*^2) / 2) erfcx(r / sqrt 2) / (r h) at nodes v (m, k) of k edges
    (bc2 = b^2 + c^2, c, tau_star (k,)), tau = c sinh v, h = c cosh v,
    r = sqrt(bc2 + tau^2) (= hypot(b, h))."""
    return _edge_integrands(v, bc2, c, tau_star, False)


def _erfc_in_place(x):
    """erfc of a float64 array x (m, k), in place.  torch's vectorised erfc (SLEEF's,
    within 1.5 ulp; libm's where the CPU lacks AVX) is about twice as fast as scipy's,
    whose exp(-x^2) errs by ~0.6 eps x^2 relative (~250 ulp at the near edges' x ~ 24)."""
    t = torch.from_numpy(x)
    torch.special.erfc(t, out=t)
    return x


def _exp(x):
    """exp of a float64 array x (m, k), a new array: torch's vectorised exp (SLEEF's, within
    1 ulp) is about twice as fast as numpy's on the node blocks."""
    return torch.exp(torch.from_numpy(x)).numpy()


def _exp_in_place(x):
    """``_exp`` in place."""
    t = torch.from_numpy(x)
    torch.exp(t, out=t)
    return x


def _tau_and_h(v, c):
    """tau = c sinh v and h = c cosh v at nodes v (m, k) of edges c (k,), from one exp
    (|v| < 600 here: no overflow; the absolute error of sinh near 0 moves tau by ~c eps,
    which the integrands do not see), and a spare (m, k) array for the caller."""
    e = _exp(v)
    spare = np.divide(1.0, e)
    half_c = 0.5 * c
    tau = np.subtract(e, spare)
    tau *= half_c
    h = np.add(e, spare, out=e)
    h *= half_c
    return tau, h, spare


_NEAR_R2 = 1100.0                  # r*^2 up to which T's nodes take erfc unscaled (erfc > 1e-257 on them)


def _near_edge_integrands(v, bc2, c, tau_star, far, c2_twin=None):
    """erfc(r / sqrt 2) / (r h) at nodes v (m, k) of k edges (bc2 = b^2 + c^2, c,
    tau_star, far (k,)), tau = c sinh v, h = c cosh v, r = sqrt(bc2 + tau^2):
    ``_edge_integrand`` times exp(-r*^2 / 2), on the rows with r*^2 <= ``_NEAR_R2``, and
    ``_edge_integrand`` itself on the rows where far (r*^2 > ``_NEAR_R2``).  erfc
    (``_erfc_in_place``) errs by ~1 ulp, below what r's own rounding makes (erfc's
    condition number is 2 x^2) and what ``_edge_integrand``'s exp(-r*^2 / 2) factor
    makes, eps r*^2 / 2.  (m, k); with c2_twin (k,) also it times w = (c^2 + tau^2) /
    (c_twin^2 + tau^2) (``_twin_edge_terms``): (2, m, k)."""
    tau, h, spare = _tau_and_h(v, c)
    twin = c2_twin is not None
    out = np.empty((2,) + v.shape) if twin else None
    t2 = np.multiply(tau, tau, out=tau)
    if twin:
        w = np.add(t2, c2_twin, out=out[1])
        np.divide(np.multiply(h, h, out=spare), w, out=w)
    r = np.add(t2, bc2, out=t2)
    np.sqrt(r, out=r)
    x = np.multiply(r, _SQRT_HALF, out=out[0] if twin else spare)
    _erfc_in_place(x)
    r *= h
    x /= r
    cols = np.flatnonzero(far)
    if cols.size:
        x[:, cols] = _edge_integrand(v[:, cols], bc2[cols], c[cols], tau_star[cols])
    if not twin:
        return x
    w *= x
    return out


def _edge_and_owen_integrands(v, bc2, c, tau_star, far, c2_twin=None):
    """T's integrand, as ``_near_edge_integrands`` takes it (``_edge_integrand`` where far
    (k,), else times exp(-r*^2 / 2)), and exp(-(tau^2 - tau*^2) / 2) / h (G's), (2, m, k);
    with c2_twin (k,) also both times w = (c^2 + tau^2) / (c_twin^2 + tau^2), the twin
    facet's (``_twin_edge_terms``): T, G, T w, G w (4, m, k)."""
    return _edge_integrands(v, bc2, c, tau_star, True, c2_twin, far)


def _edge_integrands(v, bc2, c, tau_star, owen, c2_twin=None, far=None):
    """``_edge_and_owen_integrands`` (2 or 4, m, k) with owen, else ``_edge_integrand``
    (m, k), on few temporaries (the node blocks are cache-sized; ``_tau_and_h``).  With
    far (k,), T's integrand is erfc(r / sqrt 2) / (r h) but where far (one erfc per node
    for an erfcx, ``_near_edge_integrands``)."""
    tau, h, spare = _tau_and_h(v, c)
    twin = owen and c2_twin is not None
    out = np.empty((4 if twin else 2,) + v.shape) if owen else None
    g = out[1] if owen else np.empty(v.shape)                          # exp(-(tau^2 - tau*^2) / 2) / h
    with np.errstate(under="ignore"):
        np.subtract(tau, tau_star, out=g)
        g *= -0.5
        g *= tau + tau_star
        _exp_in_place(g)
        g /= h
        r = np.multiply(tau, tau, out=tau)
        if twin:
            w = np.add(r, c2_twin, out=out[2])
            np.divide(np.multiply(h, h, out=out[3]), w, out=w)
        r += bc2
        np.sqrt(r, out=r)
        ratio = np.multiply(r, _SQRT_HALF, out=spare)
        if far is None:                                                     # erfcx(r / sqrt 2) / r
            erfcx(ratio, out=ratio)
            ratio /= r
            edge = np.multiply(g, ratio, out=out[0] if owen else g)
        else:                                                               # erfc(r / sqrt 2) / (r h)
            _erfc_in_place(ratio)
            r *= h
            edge = np.divide(ratio, r, out=out[0])
            cols = np.flatnonzero(far)
            if cols.size:
                edge[:, cols] = _edge_integrand(v[:, cols], bc2[cols], c[cols], tau_star[cols])
        if twin:
            np.multiply(g, out[2], out=out[3])
            out[2] *= edge
    return out if owen else edge


def _lower_erfcx_ratio(b, c, tau):
    """r h / erfcx(r / sqrt 2) bounded above, at tau (n,) of edges (b, c (n,)) with
    h = hypot(c, tau), r = hypot(b, h): 1 / erfcx(x) < sqrt(pi) (x + sqrt(x^2 + 2)) / 2
    (Abramowitz-Stegun 7.1.13; at most 0.23 in log above the truth).  (n,)"""
    h2 = c * c + tau * tau
    r2 = b * b + h2
    x = np.sqrt(0.5 * r2)
    return np.sqrt(r2) * np.sqrt(h2) * (0.5 * np.sqrt(np.pi)) * (x + np.sqrt(x * x + 2.0))


def _edge_node_count(b, c, tau_end, v0, v1, extra_growth=0.0):
    """Gauss-Legendre nodes for ``log_edge_term``'s integral over [v0, v1] (see there),
    tau_end the end farther from 0, where g is least: all (n,), int (n,).  The growth
    bound log(M / g(v*)) + log(g(v*) / g(v_end)) needs no erfcx at v*: g(v*) cancels.
    extra_growth (n,): added to it, for g times another factor (``_twin_edge_terms``)."""
    eta = 0.25 * np.pi
    half = 0.5 * (v1 - v0)
    mid = 0.5 * (v1 + v0)
    reach = np.sqrt(eta * eta + half * half)
    x_n = np.clip(0.0, mid - reach, mid + reach)
    q = b * b + 0.5 * c * c
    s = np.sqrt(0.5 * q)
    erfcx_q = 2.0 / (np.sqrt(np.pi) * (s + np.sqrt(s * s + 4.0 / np.pi)))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        growth = (0.5 * (0.5 * c * c + tau_end * tau_end)
                  + np.log(erfcx_q * np.sqrt(2.0) * _lower_erfcx_ratio(b, c, tau_end) / (np.sqrt(q) * c * np.cosh(x_n))))
    return gauss_legendre_count(growth + extra_growth, half, eta)


def _twin_edge_terms(b, c, b_twin, c_twin, tau_lo, tau_hi, owen=False):
    """log T of an edge in both of its facets at once: b, c (n,) its offsets |b_k|, |c_e|
    in the facet where c is the smaller, b_twin, c_twin (n,) in the other (c_twin >= c),
    [tau_lo, tau_hi] (n,) its segment in the first.  Returns log T, log T_twin (n,), and
    with owen also the two facets' Owen segments log G, log G_twin (n,)
    (``log_edge_and_owen_terms``), all on the same nodes.

    Both facets' tangent coordinates start at the projection of 0 onto the edge's line
    (their feet project there), so tau is one coordinate up to sign, and r^2 = b^2 + c^2
    + tau^2 = b_twin^2 + c_twin^2 + tau^2 is the same; with dth = c dtau / (c^2 + tau^2),
        T_twin = b_twin c_twin / (4 pi) int erfc(r / sqrt 2) / (r h) w dv,
        w = (c^2 + tau^2) / (c_twin^2 + tau^2),
    in the first facet's v (tau = c sinh v, h = c cosh v): its nodes serve both, one erfc
    for two integrals.  G's integrand in tau, c exp(-(c^2 + tau^2) / 2) / (c^2 + tau^2),
    is even in tau too, and dtau = h dv, so
        G_twin = c_twin exp(-h_twin*^2 / 2) / (2 pi) int exp(-(tau^2 - tau*^2) / 2) / h w dv,
    h_twin*^2 = c_twin^2 + tau*^2: G's integrand times the same w, and its constant's
    exp(-(c_twin^2 - c^2) / 2) (which can underflow) kept in the logarithm.  With owen all
    four come from one pass (``_edge_and_owen_integrands``: T's near edges unscaled, as
    without owen), as ``log_edge_and_owen_terms`` does.

    Range: each integrand, in its own facet's v, falls at least like its h* / h and
    exp(-(tau^2 - tau*^2) / 2) (``_edge_terms``), so each facet's own clip is where one
    of those reaches e^-40; the range is clipped as for the twin (its h* e^40, the larger),
    which contains the first facet's own range.

    Node count: w = 1 - (c_twin^2 - c^2) / (c_twin^2 + tau^2), and on |Im v| <= pi/4
    Re tau^2 >= -c^2 / 2, so |c_twin^2 + tau^2| >= c_twin^2 / 2 and |w| <= 3 (analytic
    there); on the real range w rises with tau^2, so it is least at tau*.  For any
    integrand f > 0 with growth bound log(M / min f), f w has M w <= 3 M and min f w >=
    w(tau*) min f: its bound is f's plus log 3 - log w(tau*).  T's bound
    (``_edge_node_count``) is at least G's (``log_edge_and_owen_terms``: G's integrand is
    T's without erfcx(r / sqrt 2) / r, whose bound on the strip over its least value on
    the range is >= 1), so T's bound plus log 3 - log w(tau*) bounds all four: T, G (its
    own bound and more), T_twin, G_twin; the 2^-52 target holds for each.  Ranges that
    would need more than 16 nodes take the single rule's 16-node panels
    (``panels_where_needed``) by the first facet's T fall, which bounds G's (the same
    erfcx ratio) and the twins' (w rises away from tau*); like that rule's, checked
    against mpmath, not covered by the bound."""
    b, c = np.minimum(b, 1e150), np.minimum(c, 1e150)
    b_twin, c_twin = np.minimum(b_twin, 1e150), np.minimum(c_twin, 1e150)
    tau_star, _, _, v0, width, n_panels, nodes = _edge_rule(b, c, tau_lo, tau_hi, c_twin)
    t2_star = tau_star * tau_star
    c2, c2_twin = c * c, c_twin * c_twin
    bc2 = b * b + c2
    r2_star = bc2 + t2_star
    live = width > 0
    log_of = lambda front, total, shift: np.where(live, _log_product(front, total) - shift, -np.inf)
    far = r2_star > _NEAR_R2
    shift = np.where(far, 0.5 * r2_star, 0.0)
    if owen:
        total = gauss_legendre_sums(v0, width, n_panels, nodes, _edge_and_owen_integrands, bc2, c, tau_star,
                                    far, c2_twin, outputs=4)
        return (log_of(b * c / (4 * np.pi), total[0], shift),
                log_of(b_twin * c_twin / (4 * np.pi), total[2], shift),
                log_of(c / (2 * np.pi), total[1], 0.5 * (c2 + t2_star)),
                log_of(c_twin / (2 * np.pi), total[3], 0.5 * (c2_twin + t2_star)))
    total = gauss_legendre_sums(v0, width, n_panels, nodes, _near_edge_integrands, bc2, c, tau_star, far, c2_twin,
                                outputs=2)
    return log_of(b * c / (4 * np.pi), total[0], shift), log_of(b_twin * c_twin / (4 * np.pi), total[1], shift)


# ------------------------------------------------------------------ the polyhedron
def _polyhedron(A, b, mask, moments):
    """Mass (and moments) for unit rows A (B, F, 3), b (B, F), mask (B, F); every
    polytope has a real row."""
    B, F, _ = A.shape
    b = np.where(mask & (np.abs(b) < TINY_B), TINY_B, b)
    E, a2, c2, rows, alive = facet_polygons(A, b, mask)
    t_lo, t_hi, live = (x.reshape(B, F, F) for x in facet_segments(a2.reshape(-1, F, 2), c2.reshape(-1, F),
                                                                    rows.reshape(-1, F)))
    inside = ~((b < 0) & mask).any(-1)
    foot_in = alive & ~((c2 < 0) & rows).any(-1)                          # f_k in F_k
    log_mass, log_terms = _signed_sum(b, c2, t_lo, t_hi, live, inside, foot_in)
    redo, direct = _direct_where_cancelled(A, b, E, a2, c2, t_lo, t_hi, live, log_mass, log_terms, moments)
    if redo.size:
        log_mass[redo] = direct.log_mass
    if not moments:
        return PolytopeMoments(log_mass, np.zeros((B, 3)), np.zeros((B, 3, 3)), np.zeros(B))
    mean, cov = _facet_moments(A, b, E, a2, c2, t_lo, t_hi, live, rows, alive, log_mass)
    if redo.size:
        mean[redo], cov[redo] = direct.mean, direct.cov
    return PolytopeMoments(log_mass, mean, cov, np.zeros(B))


def _signed_sum(b, c2, t_lo, t_hi, live, inside, foot_in):
    """log mass = log(1{0 in P} - sum_k sign(b_k) 1{f_k in F_k} Phi(-|b_k|)
    + sum_k sum_e sign(b_k) sign(c_e) T_ke), the positive and the negative terms summed
    apart (log-sum-exp) and then subtracted (log1p(-exp)); also the log of the positive
    sum, against which the mass's rounding error is measured.  (B,), (B,)."""
    B, F = b.shape
    absb = np.abs(b)
    log_T = np.full((B, F, F), -np.inf)
    if live.any():
        bb = np.broadcast_to(absb[:, :, None], (B, F, F))
        log_T[live] = log_edge_term(bb[live], np.abs(c2[live]), t_lo[live], t_hi[live])
    edge_pos = live & ((b[:, :, None] < 0) == (c2 < 0))
    terms = np.concatenate([np.zeros((B, 1)), log_ndtr(-absb), log_T.reshape(B, -1)], 1)
    pos = np.concatenate([inside[:, None], foot_in & (b < 0), edge_pos.reshape(B, -1)], 1)
    neg = np.concatenate([np.zeros((B, 1), bool), foot_in & (b > 0), (live & ~edge_pos).reshape(B, -1)], 1)
    log_pos, log_neg = _masked_logsumexp(terms, pos), _masked_logsumexp(terms, neg)
    with np.errstate(invalid="ignore"):
        log_mass = log_pos + _log1mexp(np.minimum(log_neg - log_pos, 0.0))
    return np.where(np.isneginf(log_pos), -np.inf, log_mass), log_pos


def _cancelled(bounded, log_mass, log_pos, ratio=1e3):
    """Where a bounded polyhedron's mass is below 1/ratio of the positive terms that
    cancel to it (all (B,)): there it is integrated directly when small (``_direct_if_small``)."""
    return bounded & np.isfinite(log_pos) & ~(log_mass > log_pos - np.log(ratio))


def _direct_where_cancelled(A, b, E, a2, c2, t_lo, t_hi, live, log_mass, log_pos, moments):
    """The ``_cancelled`` polytopes that are small against the Gaussian's scale (indices
    (R,)), and their direct integrals (``_direct_if_small``)."""
    bounded = live.any((1, 2)) & ~(live & ~(np.isfinite(t_lo) & np.isfinite(t_hi))).any((1, 2))
    redo = np.flatnonzero(_cancelled(bounded, log_mass, log_pos))
    if not redo.size:
        return redo, None
    F = b.shape[1]
    A, b, E, a2, c2, t_lo, t_hi, live = (x[redo] for x in (A, b, E, a2, c2, t_lo, t_hi, live))
    i, k, j = np.nonzero(live)
    ends = _edge_ends(A[i, k], b[i, k], *_in_plane_3d(E[i, k], a2[i, k, j]), c2[i, k, j], t_lo[i, k, j],
                      t_hi[i, k, j])
    small, direct = _direct_if_small(ends, i * F + k, np.repeat(np.arange(redo.size), F), A.reshape(-1, 3),
                                     b.reshape(-1), redo.size, moments)
    return redo[small], direct


def _facet_moments(A, b, E, a2, c2, t_lo, t_hi, live, rows, alive, log_mass):
    """Mean (B, 3) and covariance (B, 3, 3) from the divergence identities with the
    facets' exact 2-D masses M_k and first moments (the S = 2 polygon code)."""
    B, F, _ = A.shape
    n = B * F
    fm = polygon_moments(a2.reshape(n, F, 2), c2.reshape(n, F), t_lo.reshape(n, F), t_hi.reshape(n, F),
                         live.reshape(n, F), rows.reshape(n, F))
    log_M = np.where(alive, fm.log_mass.reshape(B, F), -np.inf)
    centroid = b[..., None] * A + np.einsum("bki,bkis->bks", fm.mean.reshape(B, F, 2), E)   # E[u | F_k]
    with np.errstate(invalid="ignore", over="ignore"):
        w = np.exp(log_phi(b) + log_M - log_mass[:, None])                # phi(b_k) M_k / mass
    w = np.where(alive & np.isfinite(log_mass)[:, None], w, 0.0)
    mean = -np.einsum("bk,bks->bs", w, A)
    # E[u u^T | P] = I - sum_k w_k centroid_k a_k^T, and mean = -sum_k w_k a_k, so
    # Cov = I - sum_k w_k (centroid_k - mean) a_k^T: centred, no m m^T cancellation.
    cov = np.eye(3) - np.einsum("bk,bks,bkt->bst", w, centroid - mean[:, None, :], A)
    return mean, 0.5 * (cov + np.swapaxes(cov, 1, 2))


# ------------------------------------------------------------------ small polytopes
def _edge_ends(a, b, normal, tangent, c2, t_lo, t_hi):
    """The two ends of facet edges in 3-D, b a + c2 normal + t tangent at t = t_lo, t_hi:
    per edge its facet's unit normal a (n, 3) and offset b (n,), the edge's in-plane
    normal and tangent in 3-D (n, 3) (``_in_plane_3d``), offset c2 (n,) and segment
    [t_lo, t_hi] (n,) (finite).  Returns (n, 2, 3)."""
    base = b[:, None] * a + c2[:, None] * normal
    return np.stack([base + t_lo[:, None] * tangent, base + t_hi[:, None] * tangent], 1)


def _in_plane_3d(E, a2):
    """An edge's in-plane unit normal a2 (n, 2) and tangent d2 = (-a2_1, a2_0) in 3-D, with
    its facet's in-plane basis E (n, 2, 3) (rows): (n, 3), (n, 3)."""
    return (a2[:, :1] * E[:, 0] + a2[:, 1:] * E[:, 1]), (a2[:, :1] * E[:, 1] - a2[:, 1:] * E[:, 0])


def _direct_if_small(ends, edge_facet, facet_pair, a, b, P, moments):
    """Bounded polyhedra given by their edges, integrated directly (``_cubature``) where
    they are small against the Gaussian's scale: spread = size (|centre| + size) <= 2,
    the variation of |u|^2 / 2 across the listed vertices (centre their mean, size the
    largest distance from it).  ends (NE, 2, 3) of every edge of every facet, grouped
    by facet (edge_facet (NE,) nondecreasing indices into the facets), facet_pair (NF,)
    nondecreasing indices of the P polyhedra, a (NF, 3) unit normals, b (NF,) offsets.
    Returns small (P,) bool and the small ones' PolytopeMoments."""
    owner = np.repeat(facet_pair[edge_facet], 2)
    V = ends.reshape(-1, 3)
    count = np.bincount(owner, minlength=P)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = np.stack([np.bincount(owner, V[:, s], P) for s in range(3)], -1) / count[:, None]
    size = np.zeros(P)
    np.maximum.at(size, owner, np.linalg.norm(V - centre.take(owner, 0), axis=-1))
    spread = size * (np.linalg.norm(centre, axis=-1) + size)
    small = (count > 0) & (spread <= 2.0)
    if not small.any():
        return small, None
    keep = small[facet_pair]
    new_facet = np.cumsum(keep) - 1
    e = np.flatnonzero(keep[edge_facet])
    corners, owner = _tetrahedra(ends.take(e, 0), new_facet[edge_facet[e]], (np.cumsum(small) - 1)[facet_pair[keep]],
                                 a.compress(keep, 0), b[keep])
    return small, _cubature(corners, owner, spread[small], moments)


def _tetrahedra(ends, edge_facet, facet_pair, a, b):
    """Split bounded convex polyhedra into tetrahedra: a cone from one vertex (the apex)
    over the facets that do not contain it, each facet fanned from one of its vertices.
    ends (NE, 2, 3), edge_facet (NE,), facet_pair (NF,), a (NF, 3), b (NF,) as for
    ``_direct_if_small`` (every polyhedron with an edge).  Returns the corners (T, 4, 3)
    and their polyhedron (T,).

    A facet whose plane passes within rounding (8 eps (|b_k| + |apex|)) of the apex, and
    an edge with an end that close to its facet's fan vertex, would only give
    tetrahedra of (near) zero volume and are left out."""
    NF = b.size
    first = np.searchsorted(edge_facet, np.arange(NF))                  # each facet's first edge
    has = first < np.append(first[1:], edge_facet.size)
    fan = ends[:, 0].take(np.minimum(first, edge_facet.size - 1), 0)    # (NF, 3), where has
    with_edges = np.flatnonzero(has)
    _, lead = np.unique(facet_pair[with_edges], return_index=True)
    apex = fan.take(with_edges[lead], 0)                                 # (P, 3)
    tol = 8 * np.finfo(float).eps
    height = b - np.einsum("ks,ks->k", a, apex.take(facet_pair, 0))
    keep_facet = has & (height > tol * (np.abs(b) + np.linalg.norm(apex, axis=-1)[facet_pair]))
    f = fan.take(edge_facet, 0)
    near = (np.linalg.norm(ends - f[:, None], axis=-1) <= tol * (1 + np.linalg.norm(f, axis=-1))[:, None]).any(1)
    e = np.flatnonzero(keep_facet[edge_facet] & ~near)
    owner = facet_pair[edge_facet[e]]
    ends = ends.take(e, 0)
    return np.stack([apex.take(owner, 0), f.take(e, 0), ends[:, 0], ends[:, 1]], 1), owner


def _collapsed_rule(n):
    """n^3-node rule on the unit tetrahedron {x, y, z >= 0, x + y + z <= 1}, exact for
    polynomials of degree 2n - 1: the Duffy collapse x = s, y = (1 - s) t,
    z = (1 - s)(1 - t) r has Jacobian (1 - s)^2 (1 - t), which Gauss-Jacobi rules in s
    (weight (1 - s)^2) and t (weight (1 - t)) absorb, and a degree-d polynomial in x, y, z
    is of degree <= d in each of s, t, r.  Nodes (n^3, 3), weights (n^3,) (positive,
    summing to 1/6)."""
    def on_unit(x, w, alpha):                                   # [-1, 1] -> [0, 1], weight (1 - s)^alpha
        return 0.5 * (x + 1), w / 2.0 ** (alpha + 1)
    s, ws = on_unit(*roots_jacobi(n, 2, 0), 2)
    t, wt = on_unit(*roots_jacobi(n, 1, 0), 1)
    r, wr = on_unit(*np.polynomial.legendre.leggauss(n), 0)
    S, T, R = np.meshgrid(s, t, r, indexing="ij")
    nodes = np.stack([S, (1 - S) * T, (1 - S) * (1 - T) * R], -1).reshape(-1, 3)
    return nodes, np.einsum("i,j,k->ijk", ws, wt, wr).reshape(-1)


# nodes per axis by the variation of |u|^2 / 2 across the polytope (Taylor remainder
# spread^(d+1) / (d+1)! of the rules' degree d = 9, 13, 17: below ~1e-15 for the first
# two, ~1e-11 at spread 2 for the third)
_RULES = [(0.15, _collapsed_rule(5)), (0.5, _collapsed_rule(7)), (2.0, _collapsed_rule(9))]


def _quadratic_features(o):
    """o (N, 3) -> (N, 9): o_0, o_1, o_2, o_0^2, o_1^2, o_2^2, o_0 o_1, o_0 o_2, o_1 o_2."""
    return np.concatenate([o, o * o, o[:, [0, 0, 1]] * o[:, [1, 2, 2]]], 1)


def _exponent_coefficients(edges, centre):
    """-c . d - |d|^2 / 2 at d = o @ edges as ``_quadratic_features``(o) @ coefficients:
    edges (T, 3, 3) (rows: the edge vectors), centre c (T, 3) -> (T, 9), so that the
    exponent at every node of a rule is one matrix product."""
    lin = np.einsum("tjs,ts->tj", edges, centre)                                      # e_j . c
    gram = np.einsum("tjs,tks->tjk", edges, edges)                                    # e_j . e_k
    return -np.concatenate([lin, 0.5 * gram[:, [0, 1, 2], [0, 1, 2]], gram[:, [0, 0, 1], [1, 2, 2]]], 1)


def _cubature(corners, owner, spread, moments, work=16384):
    """Mass and moments of N(0, I_3) on B small bounded polyhedra, given as tetrahedra
    (``_tetrahedra``: corners (T, 4, 3), owner (T,) in [0, B)), by a collapsed
    Gauss-Jacobi rule (``_collapsed_rule``) on each: all weights positive, so nothing
    cancels; exact to rounding while the Gaussian is close to a low-degree polynomial
    across the polytope (spread (B,) = diameter (|centre| + diameter) <= 2).
    Nodes are taken relative to their tetrahedron's centroid c, u = c + d, and weighted
    by exp(-c . d - |d|^2 / 2), a quadratic in the rule's reference coordinates whose nine
    coefficients are found once per tetrahedron (``_exponent_coefficients``; the exponent
    is at most the tetrahedron's own spread size (|c| + size) in size), so the large
    |c|^2 / 2 of a far tetrahedron enters its log mass exactly and nothing is lost to it.
    Tetrahedra go in chunks of about ``work`` nodes (cache-sized; and 9 x work multiply-adds
    stay below OpenBLAS's 2^18 threshold for threading its product, whose threads would
    spin against the callers' worker threads: S = 3 rows 1.14x slower at 65,536); each one's
    mass, mean and covariance are combined per polytope with log-sum-exp weights and the
    parallel-axis rule."""
    B = spread.size
    T = len(owner)
    edges = corners[:, 1:] - corners[:, :1]                                           # (T, 3, 3)
    with np.errstate(divide="ignore"):
        log_vol = np.log(np.abs(np.linalg.det(edges)))                                # 6 x volume
    # Each tetrahedron's rule by its own spread (the relative error of a sum of positive
    # parts is at most the largest part's): never above its polytope's, often well below.
    centre = corners.mean(1)
    size = np.linalg.norm(corners - centre[:, None], axis=-1).max(1)
    own = np.minimum(size * (np.linalg.norm(centre, axis=-1) + size), spread[owner])
    tier = np.searchsorted([r[0] for r in _RULES], own)
    lm, mt, ct = np.full(T, -np.inf), np.zeros((T, 3)), np.zeros((T, 3, 3))
    coef = _exponent_coefficients(edges, centre)                                      # (T, 9)
    for k, (_, (bary, jac)) in enumerate(_RULES):
        idx = np.flatnonzero(tier == k)
        step = int(max(1, work // len(jac)))
        offsets = bary - 0.25                                                       # from the centroid
        features = _quadratic_features(offsets)                                       # (N, 9)
        for t in np.array_split(idx, max(1, -(-idx.size // step))) if idx.size else []:
            w = _exp_in_place(features @ coef.take(t, 0).T)                           # (N, t)
            c = centre.take(t, 0)
            tot = jac @ w
            lm[t] = log_vol[t] + np.log(tot) - 0.5 * (c * c).sum(1)
            if moments:
                w *= jac[:, None]
                d = [offsets @ edges[t, :, s].T for s in range(3)]                    # 3 x (N, t)
                p = w / tot
                md = [(p * x).sum(0) for x in d]
                mt[t] = c + np.stack(md, -1)
                dev = [x - m for x, m in zip(d, md)]
                for i in range(3):
                    pd = p * dev[i]
                    for j in range(i + 1):
                        ct[t, i, j] = ct[t, j, i] = (pd * dev[j]).sum(0)
    top = np.full(B, -np.inf)
    np.maximum.at(top, owner, lm)
    safe = np.where(np.isfinite(top), top, 0.0)
    wt = np.exp(lm - safe[owner])
    tot = np.bincount(owner, wt, B)
    with np.errstate(divide="ignore"):
        log_mass = safe + np.log(tot) - 3 * LOG_SQRT_2PI
    mean, cov = np.zeros((B, 3)), np.zeros((B, 3, 3))
    if moments:
        p = wt / np.where(tot > 0, tot, 1.0)[owner]
        np.add.at(mean, owner, p[:, None] * mt)
        dev = mt - mean[owner]
        np.add.at(cov, owner, p[:, None, None] * (ct + dev[:, :, None] * dev[:, None, :]))
    return PolytopeMoments(log_mass, mean, cov, np.zeros(B))


# ------------------------------------------------------------------ translates of fixed polyhedra
@dataclass
class FacetPolygons:
    """The facet polygons of R polyhedra {u : a_k . u <= c_k} (unit rows), flattened,
    for the mass of their translates (``translated_polyhedron_moments``).

    Facets of region r are facet_start[r]:facet_start[r + 1] of the (NF, ...) arrays:
    a (NF, 3) unit normals, c (NF,) offsets, nonempty (NF,) the facet's polygon is not
    empty.  Edges of region r are edge_start[r]:edge_start[r + 1] of the (NE, ...)
    arrays, grouped by facet: edge_facet (NE,) the facet's index within its region,
    c2 (NE,) in-plane offset from the facet's foot, [t_lo, t_hi] (NE,) the edge's
    segment (``facet_polygons``, ``polytope.facet_segments``), normal3, tangent3 (3, NE)
    its unit in-plane normal and tangent in 3-D, by component (translating by -v moves
    the offset by -normal3 . v and the segment by -tangent3 . v); bounded (R,).  An edge lies in two
    facets; where both list the same segment and distance to the edge's line (one rule
    serves both, ``_twin_edge_terms``) the pair is listed once as a line: those of region
    r are line_start[r]:line_start[r + 1] of line_first, line_second (NL,), the two edges'
    indices within the region.
    """

    facet_start: np.ndarray
    a: np.ndarray
    c: np.ndarray
    nonempty: np.ndarray
    edge_start: np.ndarray
    edge_facet: np.ndarray
    c2: np.ndarray
    t_lo: np.ndarray
    t_hi: np.ndarray
    normal3: np.ndarray
    tangent3: np.ndarray
    bounded: np.ndarray
    line_start: np.ndarray
    line_first: np.ndarray
    line_second: np.ndarray


def real_first(a, c, real):
    """Each row's real facets first (in their order, then the others): a (R, F, 3), c (R, F),
    real (R, F) sorted alike (the arrays themselves where they already are)."""
    if (real[:, 1:] <= real[:, :-1]).all():
        return a, c, real
    order = np.argsort(~real, axis=1, kind="stable")
    return (np.take_along_axis(a, order[..., None], 1), np.take_along_axis(c, order, 1),
            np.take_along_axis(real, order, 1))


def facet_count_groups(sizes, group: int) -> list:
    """Jobs (k, regions) over the regions with k > 0 real facets (sizes (R,)), each of equal
    k (the work is cubic in it) and at most about group / (torch's thread count) regions,
    for ``stop.map_in_threads``."""
    step = max(1, group // max(1, torch.get_num_threads()))
    jobs = []
    for k in np.unique(sizes[sizes > 0]):
        idx = np.flatnonzero(sizes == k)
        jobs += [(int(k), g) for g in np.array_split(idx, -(-idx.size // step))]
    return jobs


def region_facet_polygons(a, c, real, group=4096) -> FacetPolygons:
    """``FacetPolygons`` of R polyhedra: a (R, F, 3) unit rows, c (R, F), real (R, F).

    A translate of P by -v is {u : a_k . u <= c_k - a_k . v}: facet k's polygon is the
    same polygon moved in its plane by -E_k v, so its edges' offsets move by -a2 . E_k v
    and their segments by -d2 . E_k v (d2 = a2 rotated by +90 degrees), and which rows are
    edges does not change.  So the polygons are found once per polyhedron, in groups of equal
    facet count on torch's thread count, ``group`` regions at a time in all."""
    R, F, _ = a.shape
    a, c, real = real_first(a, c, real)

    def polygons_of(k, g):
        stop_check()
        A, b, m = a[g, :k], c[g, :k], real[g, :k]
        B = g.size
        b = np.where(np.abs(b) < TINY_B, TINY_B, b)
        E, a2, c2, rows, alive = facet_polygons(A, b, m)
        t_lo, t_hi, live = (x.reshape(B, k, k) for x in facet_segments(
            a2.reshape(-1, k, 2), c2.reshape(-1, k), rows.reshape(-1, k)))
        nonempty = alive & (live.any(2) | ~rows.any(2))
        bounded = live.any((1, 2)) & ~(live & ~(np.isfinite(t_lo) & np.isfinite(t_hi))).any((1, 2))
        i, f, j = np.nonzero(live)
        return (g, bounded, (np.repeat(g, k), A.reshape(-1, 3), b.reshape(-1), nonempty.reshape(-1)),
                (g[i], f, j, c2[i, f, j], t_lo[i, f, j], t_hi[i, f, j], *_in_plane_3d(E[i, f], a2[i, f, j]), b[i, f]))
    facets, edges = [], []
    bounded = np.zeros(R, bool)
    with closing(map_in_threads(polygons_of, facet_count_groups(real.sum(1), group), torch.get_num_threads())) \
            as results:
        for g, bounded_g, facet_part, edge_part in results:
            bounded[g] = bounded_g
            facets.append(facet_part)
            edges.append(edge_part)
    cat = lambda parts, shape: [np.concatenate(x) for x in zip(*parts)] if parts else \
        [np.zeros((0,) + s) for s in shape]
    f_region, fa, fc, fne = cat(facets, [(), (3,), (), ()])
    e_region, ef, ej, ec2, elo, ehi, normal3, tangent3, b = cat(edges, [(), (), (), (), (), (), (3,), (3,), ()])
    fo, eo = np.argsort(f_region, kind="stable"), np.argsort(e_region, kind="stable")
    start = lambda region: np.concatenate([[0], np.cumsum(np.bincount(region.astype(np.int64), minlength=R))])
    e_start = start(e_region)
    e_region, ef, ej = (x[eo].astype(np.int64) for x in (e_region, ef, ej))
    # edge (k, j) of a region is listed at key (region, k, j), increasing within the sort
    key, twin_key = (e_region * F + ef) * F + ej, (e_region * F + ej) * F + ef
    at = np.minimum(np.searchsorted(key, twin_key), max(key.size - 1, 0))
    twin = np.where(key[at] == twin_key, at - e_start[e_region], -1) if key.size else np.zeros(0, np.int64)
    f_start = start(f_region)
    fa, fc = fa[fo], fc[fo]
    ec2, elo, ehi, b = (x[eo] for x in (ec2, elo, ehi, b))
    normal3, tangent3 = normal3.T.take(eo, 1), tangent3.T.take(eo, 1)   # by component: contiguous gathers
    first, second = _twin_lines(twin, e_start[e_region], b, ec2, elo, ehi)
    line_region = e_region[first]
    return FacetPolygons(f_start, fa, fc, fne[fo].astype(bool), e_start, ef, ec2, elo, ehi, normal3, tangent3,
                         bounded, start(line_region), first - e_start[line_region], second - e_start[line_region])


def _twin_lines(twin, region_start, b, c, t_lo, t_hi):
    """The twin edges that one rule serves (``_twin_edge_terms``): where the two facets
    list the same segment (up to orientation, within rounding) and the same distance to
    the edge's line.  twin (NE,) the twin's index within the region (-1: none),
    region_start (NE,) the region's first edge, b (NE,) the edge's facet's offset, c,
    t_lo, t_hi (NE,) the edge's.  Returns the two edges of each such line (NL,), (NL,)
    (global indices, the first the smaller)."""
    me = np.arange(twin.size)
    other = np.where(twin >= 0, region_start + twin, -1)
    p = np.flatnonzero(other > me)                                     # each twin pair once
    q = other[p]
    tol = 64 * np.finfo(float).eps
    same = lambda x, y: (x == y) | (np.abs(x - y) <= tol * (1.0 + np.abs(x) + np.abs(y)))
    rho2_p, rho2_q = b[p] * b[p] + c[p] * c[p], b[q] * b[q] + c[q] * c[q]
    with np.errstate(invalid="ignore"):                                 # rays: inf - inf
        match = (same(t_lo[q], t_lo[p]) & same(t_hi[q], t_hi[p])) | (same(t_lo[q], -t_hi[p]) & same(t_hi[q], -t_lo[p]))
    match &= np.abs(rho2_p - rho2_q) <= tol * (rho2_p + rho2_q)
    return p[match], q[match]


def _ranges(starts, counts):
    """Concatenated aranges: starts (P,), counts (P,) -> (sum counts,)."""
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(counts.sum())


def _signed_logsumexps(values, ids, positive, n):
    """Per-segment log-sum-exp of the positive and of the negative terms, apart:
    values (N,), ids (N,) in [0, n), positive (N,) bool -> (n,), (n,), -inf for none.
    Both are shifted by the segment's largest term, which is within log N of the larger
    of the two sums, the one a signed sum that is positive is dominated by."""
    top = np.full(n, -np.inf)
    np.maximum.at(top, ids, values)
    safe = np.where(np.isfinite(top), top, 0.0)
    w = _exp_in_place(values - safe[ids])
    sums = np.bincount(2 * ids + positive, w, 2 * n).reshape(n, 2)       # [negative, positive] per segment
    with np.errstate(divide="ignore"):
        return safe + np.log(sums[:, 1]), safe + np.log(sums[:, 0])


def translated_polyhedron_moments(fp: FacetPolygons, regions, v, moments=True) -> PolytopeMoments:
    """Mass and moments of N(0, I_3) on polyhedra translated by -v: pair p is region
    regions[p] of ``fp`` moved to {u : a_k . u <= c_k - a_k . v_p}.  regions (P,), v (P, 3).

    The same radial face formula and divergence identities as ``polyhedron_moments``, on
    flat arrays of the pairs' facets and edges (only the real edges of each facet enter);
    each edge's terms in its two facets (T, and with moments the Owen segments G) share
    one rule (``_edge_terms_by_lines``).  Pairs for which that routine would move a facet through
    the origin go through ``polyhedron_moments`` itself; those whose mass cancelled are
    integrated directly where they are small, as there (``_direct_if_small``)."""
    regions = np.asarray(regions, np.int64)
    v = np.asarray(v, np.float64)
    P = regions.size
    nf = fp.facet_start[regions + 1] - fp.facet_start[regions]
    ne = fp.edge_start[regions + 1] - fp.edge_start[regions]
    nl = fp.line_start[regions + 1] - fp.line_start[regions]
    fpair, gf = np.repeat(np.arange(P), nf), _ranges(fp.facet_start[regions], nf)
    epair, ge = np.repeat(np.arange(P), ne), _ranges(fp.edge_start[regions], ne)
    lpair, gl = np.repeat(np.arange(P), nl), _ranges(fp.line_start[regions], nl)
    facet_first = np.cumsum(nf) - nf                                    # each pair's first among the pairs' facets
    ef = facet_first[epair] + fp.edge_facet[ge]                         # the edge's facet among the pairs'
    NF = gf.size
    a, vf = fp.a.take(gf, 0), np.repeat(v, nf, 0)           # take and repeat: ~5x faster than x[idx] on rows
    b = fp.c[gf] - (a[:, 0] * vf[:, 0] + a[:, 1] * vf[:, 1] + a[:, 2] * vf[:, 2])
    ve, normal, tangent = np.repeat(v.T, ne, 1), fp.normal3.take(ge, 1), fp.tangent3.take(ge, 1)   # (3, NE)
    c0, lo0, hi0 = fp.c2[ge], fp.t_lo[ge], fp.t_hi[ge]                  # untranslated
    c = c0 - (normal[0] * ve[0] + normal[1] * ve[1] + normal[2] * ve[2])
    dv = tangent[0] * ve[0] + tangent[1] * ve[1] + tangent[2] * ve[2]
    t_lo, t_hi = lo0 - dv, hi0 - dv
    c = np.where(np.abs(c) < TINY, TINY, c)
    fallback = np.bincount(fpair, np.abs(b) < TINY_B, P) > 0
    v_norm = np.linalg.norm(v, axis=1)
    ill = _ill_conditioned(np.repeat(v_norm, ne), c0, lo0, hi0, b, ef, c, t_lo, t_hi)
    fallback[epair[ill]] = True
    neg_b = b < 0
    inside = np.bincount(fpair, neg_b, P) == 0
    # The foot is outside F_k where it is outside an edge, or outside P: the listed edges
    # bound a polygon of positive area, but one of zero area (a point or segment where a
    # row touches P without being a facet, which rounding listed with a few edges) is cut
    # only by rows that are not its edges, and its true terms are 0 (its foot counted gave
    # Phi(-|b_k|) = e^-0.86 for a true mass of e^-17, or a sum gone negative: log mass -inf)
    outside = np.bincount(ef, c < 0, NF) > 0
    inside_edges = np.flatnonzero(fp.nonempty[gf] & ~outside)
    outside[inside_edges] = _outside_polyhedron(inside_edges, fpair, facet_first, nf, a, b, v_norm)
    foot_in = fp.nonempty[gf] & ~outside
    absb = np.abs(b)
    edge_start = (np.cumsum(ne) - ne)[lpair]
    first, second = edge_start + fp.line_first[gl], edge_start + fp.line_second[gl]
    log_T, log_G = _edge_terms_by_lines(first, second, absb[ef], np.abs(c), t_lo, t_hi, moments)
    edge_pos = neg_b[ef] == (c < 0)
    origin = np.flatnonzero(inside)                                     # the terms 1{0 in P}, 1{f_k in F_k}
    feet = np.flatnonzero(foot_in)                                      # Phi(-|b_k|), and the edges' T
    log_pos, log_neg = _signed_logsumexps(
        np.concatenate([np.zeros(origin.size), log_ndtr(-absb[feet]), log_T]),
        np.concatenate([origin, fpair[feet], epair]),
        np.concatenate([np.ones(origin.size, bool), neg_b[feet], edge_pos]), P)
    with np.errstate(invalid="ignore"):
        log_mass = log_pos + _log1mexp(np.minimum(log_neg - log_pos, 0.0))
    log_mass = np.where(np.isneginf(log_pos), -np.inf, log_mass)
    mean, cov = np.zeros((P, 3)), np.zeros((P, 3, 3))
    if moments:
        mean, cov = _translated_moments(fpair, ef, a, b, fp.nonempty[gf], normal, c,
                                        _log_segment_masses(t_lo, t_hi, first, second), outside, log_mass, log_G)
    # P lies in each facet's half-space, so its mass is at most min_k Phi(b_k): a pair above
    # that bound (signed terms gone wrong, as with the degenerate polygons above) goes
    # through polyhedron_moments itself.  (log Phi rises: min_k log Phi(b_k) = log Phi(min_k b_k).)
    nearest = np.full(P, np.inf)
    has = np.flatnonzero(nf > 0)                  # a pair's facets are one run: reduceat, ~10x np.minimum.at's speed
    nearest[has] = np.minimum.reduceat(b, facet_first[has])
    bound = log_ndtr(nearest)
    fallback |= log_mass > bound + 1e-9 * np.abs(bound) + 1e-12
    cancelled = ~fallback & _cancelled(fp.bounded[regions], log_mass, log_pos)
    if cancelled.any():
        direct_pairs = np.flatnonzero(cancelled)
        f, e = np.flatnonzero(cancelled[fpair]), np.flatnonzero(cancelled[epair])
        ends = _edge_ends(a.take(ef[e], 0), b[ef[e]], normal.take(e, 1).T, tangent.take(e, 1).T, c[e], t_lo[e], t_hi[e])
        facet_index = np.cumsum(cancelled[fpair]) - 1                   # among the cancelled pairs' facets
        small, direct = _direct_if_small(ends, facet_index[ef[e]], (np.cumsum(cancelled) - 1)[fpair[f]], a.take(f, 0),
                                         b[f], direct_pairs.size, moments)
        direct_pairs = direct_pairs[small]
        if direct_pairs.size:
            log_mass[direct_pairs], mean[direct_pairs], cov[direct_pairs] = direct.log_mass, direct.mean, direct.cov
    redo = np.flatnonzero(fallback)
    if redo.size:
        A, bb, mask = _padded(fp, regions[redo], v[redo])
        direct = polyhedron_moments(A, bb, mask, moments=moments)
        log_mass[redo], mean[redo], cov[redo] = direct.log_mass, direct.mean, direct.cov
    return PolytopeMoments(log_mass, mean, cov, np.zeros(P))


def _outside_polyhedron(facets, fpair, facet_first, nf, a, b, v_norm, rel=1e-9):
    """(n,) where the foot b_k a_k of each of some of the pairs' facets (facets (n,)) lies
    outside its pair's polyhedron {u : a_j . u <= b_j}, by more than rel times the
    magnitudes (rounding is ~eps of them; a foot that close to a row of P is that close to
    its polygon's boundary, where the edge test decides).  fpair (NF,) the facets' pairs,
    facet_first, nf (P,) each pair's first facet and count, a (NF, 3), b (NF,) the
    translated offsets, v_norm (P,) the translations' lengths."""
    pair = fpair[facets]
    reps = nf[pair]
    k = np.repeat(np.arange(facets.size), reps)
    fk = facets[k]
    j = _ranges(facet_first[pair], reps)                                # every facet of its pair
    g = np.einsum("ns,ns->n", a.take(fk, 0), a.take(j, 0))
    bk, bj = b[fk], b[j]
    slack = rel * (1.0 + np.abs(bk) + np.abs(bj) + v_norm[pair[k]])
    return np.bincount(k, bk * g > bj + slack, facets.size) > 0


def _ill_conditioned(v_norm, c0, lo0, hi0, b, ef, c, t_lo, t_hi, rel=1e-6):
    """The translated edges whose terms the translation's rounding spoils, as indices
    into the edges (NE,): the offsets b[ef], c and ends t_lo, t_hi (NE,) each carry
    ~eps s (s = |v| (NE,) plus the untranslated magnitudes c0, lo0, hi0 (NE,)), and the
    terms depend on the angle atan(t / |c|) at a finite end and on the ratio of b and c,
    so an end within rel s of the facet's foot (the foot at a vertex: O(1) errors, the
    angle is rounding noise) or an edge line within rel s of the origin is
    ill-conditioned.  polyhedron_moments finds c and t from the translated b itself,
    consistently.  b (NF,) the facets' offsets, ef (NE,) each edge's facet.  Both tests
    need |c| < rel s (hypot(c, t) >= |c|), which few edges meet: only those are tested."""
    finite = lambda t: np.where(np.isfinite(t), np.abs(t), 0.0)
    s = rel * (v_norm + np.abs(c0) + finite(lo0) + finite(hi0))
    near = np.flatnonzero(np.abs(c) < s)
    c, s = c[near], s[near]
    end = np.minimum(np.hypot(c, t_lo[near]), np.hypot(c, t_hi[near]))     # inf where both ends are
    return near[(end < s) | (np.hypot(b[ef[near]], c) < s)]


def _edge_terms_by_lines(first, second, b, c, t_lo, t_hi, owen=False):
    """log T (NE,) of the pairs' edges, the two edges of each line (first, second (NL,):
    twins that list the same segment, ``FacetPolygons``) at once (``_twin_edge_terms``,
    on the first's segment: the integrands are even in tau) where their distances to the
    line still agree after the translation; the rest in the same call as their own twins
    (c_twin = c: the twin factor is 1, and the rule's node count allows for a factor up
    to 3, a few more nodes on these few edges than ``_edge_terms`` takes); with owen
    also their Owen segments log G (NE,) on the same nodes (else None).  b = |b_k|,
    c = |c_e|, t_lo, t_hi (NE,)."""
    NE = b.size
    swap = c[second] < c[first]
    m, j = np.where(swap, second, first), np.where(swap, first, second)   # m: the smaller c
    rho2_m, rho2_j = b[m] * b[m] + c[m] * c[m], b[j] * b[j] + c[j] * c[j]
    agree = np.abs(rho2_m - rho2_j) <= 64 * np.finfo(float).eps * (rho2_m + rho2_j)
    alone = np.ones(NE, bool)
    alone[m[agree]] = alone[j[agree]] = False
    rest = np.flatnonzero(alone)
    f, m, j = (np.concatenate([x[agree], rest]) for x in (first, m, j))
    log_T, log_G = np.empty(NE), np.empty(NE) if owen else None
    terms = _twin_edge_terms(b[m], c[m], b[j], c[j], t_lo[f], t_hi[f], owen)
    log_T[j], log_T[m] = terms[1], terms[0]                              # an edge alone: m = j, its own T
    if owen:
        log_G[j], log_G[m] = terms[3], terms[2]
    return log_T, log_G


def _log_segment_masses(t_lo, t_hi, first, second):
    """log(Phi(t_hi) - Phi(t_lo)) (NE,) of the edges' segments [t_lo, t_hi] (NE,); the
    second edge of each line (first, second (NL,), ``FacetPolygons``) lists its first's
    segment (up to orientation, the same mass) and takes the first's value."""
    own = np.ones(t_lo.size, bool)
    own[second] = False
    i = np.flatnonzero(own)
    out = np.empty(t_lo.size)
    out[i] = log_diff_ndtr(t_lo[i], t_hi[i])
    out[second] = out[first]
    return out


def _translated_moments(fpair, ef, a, b, nonempty, normal, c, log_segment, outside, log_mass, log_G):
    """Mean (P, 3) and covariance (P, 3, 3) from the divergence identities, as
    ``_facet_moments`` but on flat facets (NF, ...) and edges (NE, ...): each facet's
    2-D mass and first moment by the S = 2 polygon formula over its edges, whose Owen
    segments log_G (NE,) come from ``_edge_terms_by_lines`` (``log_edge_and_owen_terms``)
    and segment masses log_segment (NE,) from ``_log_segment_masses``; normal (3, NE) the
    edges' in-plane normals in 3-D (``FacetPolygons.normal3``)."""
    P, NF = log_mass.size, b.size
    log_exit, log_entry = _signed_logsumexps(log_G, ef, c >= 0, NF)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_in = np.log1p(-np.minimum(np.exp(log_exit), 1.0))
        log_out = log_entry + np.log1p(-np.exp(np.minimum(log_exit - log_entry, 0.0)))
    log_out = np.where(np.isneginf(log_entry), -np.inf, log_out)
    log_M = np.where(nonempty, np.where(outside, log_out, log_in), -np.inf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        we = np.exp(log_phi(c) - log_M[ef] + log_segment)                   # phi(c) M_e / M_k
    we = np.where(np.isfinite(log_M[ef]), we, 0.0)
    # E[u | F_k] = b_k a_k + E_k^T E[u2 | F_k], E[u2 | F_k] = -sum_e we a2_e, and E_k^T a2_e = normal_e
    centroid = b[:, None] * a - np.stack([np.bincount(ef, we * normal[s], NF) for s in range(3)], -1)
    lm = log_mass[fpair]
    with np.errstate(invalid="ignore", over="ignore"):
        wk = np.exp(log_phi(b) + log_M - lm)                                 # phi(b_k) M_k / mass
    wk = np.where(nonempty & np.isfinite(lm), wk, 0.0)
    mean = -np.stack([np.bincount(fpair, wk * a[:, s], P) for s in range(3)], -1)
    outer = wk[:, None, None] * (centroid - mean.take(fpair, 0))[:, :, None] * a[:, None, :]
    cov = np.eye(3) - np.stack([np.bincount(fpair, x, P) for x in outer.reshape(NF, 9).T], -1).reshape(P, 3, 3)
    return mean, 0.5 * (cov + np.swapaxes(cov, 1, 2))


def _padded(fp: FacetPolygons, regions, v):
    """The translated polyhedra of some pairs as padded rows: A (P, F, 3), b (P, F), mask (P, F)."""
    nf = fp.facet_start[regions + 1] - fp.facet_start[regions]
    F = max(int(nf.max(initial=0)), 1)
    pair = np.repeat(np.arange(regions.size), nf)
    local = np.arange(nf.sum()) - np.repeat(np.cumsum(nf) - nf, nf)
    gf = _ranges(fp.facet_start[regions], nf)
    A, b, mask = np.zeros((regions.size, F, 3)), np.zeros((regions.size, F)), np.zeros((regions.size, F), bool)
    A[pair, local] = fp.a[gf]
    b[pair, local] = fp.c[gf] - np.einsum("fs,fs->f", fp.a[gf], v[pair])
    mask[pair, local] = True
    return A, b, mask
