"""Exact iid draws of Gaussians truncated to convex polyhedra (no MCMC).

Target: z ~ N(m, C C^T) restricted to {z : G z <= h}.  Whitening z = m + C u turns it
into u ~ N(0, I_S) restricted to P = {u : a_k . u <= b_k} (unit rows a_k after scaling).

S = 1
    P is an interval [lo, hi]: exact inverse CDF in log space (``truncated_normal_1d``,
    scipy.special.ndtri_exp), working in whichever tail keeps full precision.

S >= 2: accept-reject from a tilted cone proposal (Botev-style, exact)
    Pick a set J of j <= S linearly independent rows (the constraints active near the
    mode of N(0, I) on P; see ``_choose_cone``).  With M = (A_J A_J^T)^-1, the apex
    u0 = A_J^T M b_J (the point of the face {A_J u = b_J} closest to 0), slacks
    s = b_J - A_J u >= 0 and lambda = -M b_J, every u splits as
    u = u0 - A_J^T M s + u_perp (u_perp orthogonal to the rows of J), and

        ||u||^2 = ||u0||^2 + 2 lambda . s + s^T M s + ||u_perp||^2.

    For a diagonal D with s^T D s <= s^T M s on the orthant s >= 0 (D = d I with d the
    smallest eigenvalue of M, or the copositive bound D_i = M_ii - sum_{j != i}
    max(-M_ij, 0), whichever accepts more), the envelope
    exp(-lambda . s - s^T D s / 2) exp(-||u_perp||^2 / 2) on the cone {s >= 0}
    dominates the target there.  It factorises: every s_i is an exact 1-D truncated
    normal N(-lambda_i / D_i, 1 / D_i) on [0, inf), u_perp a free standard normal.  A
    proposal is accepted with probability exp(-(s^T M s - s^T D s) / 2) and only if it
    satisfies the rows outside J, which gives exact iid draws from the target.

    The acceptance rate is known in closed form,
        log acc = log P[P] + j/2 log 2 pi + ||u0||^2 / 2 - 1/2 log det M - sum_i log Z_i,
        log Z_i = 1/2 log(2 pi / D_i) + lambda_i^2 / (2 D_i) + log Phi(-lambda_i / sqrt D_i),
    so J is chosen to maximise it (J = {} is plain rejection from N(0, I); one row is
    the exact half-space proposal; orthogonal active rows give acceptance 1 on their
    cone), and the number of proposals per round is sized from it.  When acceptance is
    low the sampler simply makes more proposals, in rounds of bounded memory: draws
    stay exact, only the time grows (``max_proposals`` caps the total).
"""
from __future__ import annotations

import numpy as np
from scipy.special import log_ndtr, ndtri_exp

from .errors import CpadgnError
from .polytope import _normalise, least_distance_point, log_diff_ndtr, polytope_log_mass

LOG_2PI = float(np.log(2 * np.pi))


# ============================================================================ 1-D
def truncated_normal_1d(lo, hi, rng: np.random.Generator | None = None, *, uniform=None) -> np.ndarray:
    """Exact draws of N(0, 1) restricted to [lo, hi] (arrays, broadcast; +-inf allowed).

    Inverse CDF in log space: x = Phi^-1(Phi(l) + w (Phi(h) - Phi(l))) evaluated as
    ndtri_exp(logaddexp(log Phi(l), log w + log(Phi(h) - Phi(l)))), in the lower tail
    where lo <= 0 and mirrored (x -> -x) where lo > 0, so intervals far out in either
    tail keep full relative precision.  ``uniform`` in (0, 1] replaces the draws of w.
    """
    lo, hi = np.broadcast_arrays(np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64))
    if uniform is None:
        uniform = 1.0 - rng.random(lo.shape)                      # (0, 1]: log w is finite
    w = np.broadcast_to(np.asarray(uniform, dtype=np.float64), lo.shape)
    flip = lo > 0
    l, h = np.where(flip, -hi, lo), np.where(flip, -lo, hi)
    u = np.where(flip, 1.0 - w, w)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_mass = log_diff_ndtr(l, h)
        x = ndtri_exp(np.minimum(np.logaddexp(log_ndtr(l), np.log(u) + log_mass), 0.0))
    x = np.clip(x, l, h)
    return np.where(flip, -x, x)


def _upper_tail_normal(lo, rng):
    """``truncated_normal_1d(lo, inf)``, the one-sided case, cheaper."""
    w = np.log(1.0 - rng.random(lo.shape))
    flip = lo > 0
    with np.errstate(divide="ignore"):
        x = np.where(flip, -ndtri_exp(np.minimum(w + log_ndtr(-lo), 0.0)),
                     ndtri_exp(np.minimum(np.logaddexp(log_ndtr(lo), w + log_ndtr(-lo)), 0.0)))
    return np.maximum(x, lo)


# ============================================================================ geometry
def _cone_params(A, b, J):
    """Proposal parameters of index sets J (..., S) (-1 = unused slot).

    A (..., F, S) unit rows, b (..., F).  Returns AJ (..., S, S) (zero rows on unused
    slots), M (..., S, S), lam (..., S), D (..., S), u0 (..., S), score (...), where
    diag(D) is the better (higher score) of two lower bounds s^T diag(D) s <= s^T M s on
    the orthant s >= 0: d I (d the smallest eigenvalue of M, valid everywhere) and the
    copositive bound D_i = M_ii - sum_{j != i} max(-M_ij, 0) (valid for s >= 0, since
    2 s_i s_j <= s_i^2 + s_j^2); score is log acceptance minus log P[P] (module
    docstring).
    """
    S = A.shape[-1]
    used = J >= 0
    idx = np.where(used, J, 0)
    AJ = np.take_along_axis(A, idx[..., None], axis=-2) * used[..., None]
    bJ = np.take_along_axis(b, idx, axis=-1) * used
    Gm = AJ @ np.swapaxes(AJ, -1, -2) + np.eye(S) * (~used)[..., None, :]
    M = np.linalg.inv(Gm)
    M = 0.5 * (M + np.swapaxes(M, -1, -2))
    lam = -np.einsum("...ij,...j->...i", M, bJ)
    u0 = np.einsum("...ji,...j->...i", AJ, np.einsum("...ij,...j->...i", M, bJ))
    j = used.sum(-1)
    logdet_m = np.linalg.slogdet(M)[1]
    base = 0.5 * j * LOG_2PI + 0.5 * (u0 * u0).sum(-1) - 0.5 * logdet_m
    # (a) d I: the smallest eigenvalue of M on the used block; the unused block adds
    # eigenvalues 1, never below it (trace(A_J A_J^T) = j, so max eig >= 1)
    d = np.linalg.eigvalsh(M)[..., 0] * (1 - 1e-12)
    Da = np.broadcast_to(d[..., None], lam.shape)
    # (b) the copositive diagonal bound
    off = M * (1 - np.eye(S))
    Db = (np.einsum("...ii->...i", M) - np.maximum(-off, 0).sum(-1)) * (1 - 1e-12)
    okb = np.all(~used | (Db > 1e-12 * np.einsum("...ii->...i", M)), axis=-1)
    Db = np.where(okb[..., None], Db, Da)
    scores = []
    for D in (Da, Db):
        Dsafe = np.where(used, D, 1.0)
        log_z = 0.5 * (LOG_2PI - np.log(Dsafe)) + lam ** 2 / (2 * Dsafe) + log_ndtr(-lam / np.sqrt(Dsafe))
        scores.append(base - np.where(used, log_z, 0.0).sum(-1))
    pick_b = okb & (scores[1] > scores[0])
    D = np.where(pick_b[..., None], Db, Da)
    D = np.where(used, D, 1.0)
    return AJ, M, lam, D, u0, np.where(pick_b, scores[1], scores[0])


def _mode_active_set(A, b, mask):
    """The constraints active at the mode argmin{||u|| : A u <= b} (least-distance
    programming by NNLS, Lawson and Hanson ch. 23): J (B, S), at most S linearly
    independent active rows, -1 padded; no rows where the mode is 0 (0 in P); and
    feasible (B,), False where P is empty."""
    B, F, S = A.shape
    if S == 2:
        return _mode_active_set_2d(A, b, mask)
    J = -np.ones((B, S), dtype=np.int64)
    feasible = np.ones(B, dtype=bool)
    for i in range(B):
        rows = np.flatnonzero(mask[i])
        if rows.size == 0 or np.all(b[i, rows] >= 0):
            continue
        x, feasible[i] = least_distance_point(A[i, rows], b[i, rows])
        if x is None:
            continue
        slack = b[i, rows] - A[i, rows] @ x
        order = np.argsort(slack)
        basis = []
        for k in order:
            if slack[k] > 1e-7 * (1.0 + np.linalg.norm(x)) or len(basis) == S:
                break
            a = A[i, rows[k]]
            res_ = a - sum((a @ q) * q for q in basis) if basis else a
            if np.linalg.norm(res_) > 1e-6:
                basis.append(res_ / np.linalg.norm(res_))
                J[i, len(basis) - 1] = rows[k]
    return J, feasible


def _mode_active_set_2d(A, b, mask):
    """``_mode_active_set`` for S = 2, vectorised: the mode is 0, the foot of the
    perpendicular on one facet line, or a vertex (two lines), whichever feasible
    candidate is nearest to 0."""
    B, F, _ = A.shape
    tol = 1e-9 * (1.0 + np.abs(b))

    def feasible(u):                                   # u (B, C, 2) -> (B, C)
        return np.all((np.einsum("bfs,bcs->bcf", A, u) - b[:, None, :] <= tol[:, None, :])
                      | ~mask[:, None, :], axis=-1)

    J = -np.ones((B, 2), dtype=np.int64)
    best = np.where(np.all((b >= 0) | ~mask, axis=1), 0.0, np.inf)
    foot = b[..., None] * A                                                   # (B, F, 2)
    ok = feasible(foot) & mask
    n1 = np.where(ok, (foot ** 2).sum(-1), np.inf)
    k = n1.argmin(1)
    take = n1[np.arange(B), k] < best
    J[take, 0] = k[take]
    best = np.where(take, n1[np.arange(B), k], best)
    if F >= 2:
        kk, ll = np.triu_indices(F, 1)
        a1, a2 = A[:, kk], A[:, ll]                                           # (B, C, 2)
        det = a1[..., 0] * a2[..., 1] - a1[..., 1] * a2[..., 0]
        good = (np.abs(det) > 1e-10) & mask[:, kk] & mask[:, ll]
        safe = np.where(good, det, 1.0)
        b1, b2 = b[:, kk], b[:, ll]
        v = np.stack([(b1 * a2[..., 1] - b2 * a1[..., 1]) / safe,
                      (a1[..., 0] * b2 - a2[..., 0] * b1) / safe], -1)
        ok = good & feasible(v)
        n2 = np.where(ok, (v ** 2).sum(-1), np.inf)
        c = n2.argmin(1)
        take = n2[np.arange(B), c] < best * (1 - 1e-12)
        J[take, 0], J[take, 1] = kk[c[take]], ll[c[take]]
        best = np.where(take, n2[np.arange(B), c], best)
    return J, np.isfinite(best)


def _choose_cone(A, b, mask):
    """Per polytope the index set J (B, S) of largest predicted acceptance and its score.

    Candidates: J = {}, the constraints active at the mode of N(0, I) on P (as in
    Botev's exponential tilting), and, from every facet k as a start, the greedy chain
    that keeps adding the row most violated at the current apex (if linearly
    independent of J), every prefix of it counted.
    """
    B, F, S = A.shape
    best_J = -np.ones((B, S), dtype=np.int64)
    best = np.zeros(B)
    if F == 0:
        return best_J, best, np.ones(B, dtype=bool)
    chunk = int(max(1, 2e7 // (F * F * (S + 2))))
    if B > chunk:
        feasible = np.ones(B, dtype=bool)
        for i in range(0, B, chunk):
            sl = slice(i, i + chunk)
            best_J[sl], best[sl], feasible[sl] = _choose_cone(A[sl], b[sl], mask[sl])
        return best_J, best, feasible
    J = -np.ones((B, F, S), dtype=np.int64)
    J[:, :, 0] = np.where(mask, np.arange(F)[None, :], -1)
    alive = mask.copy()                                          # (B, F) chains still growing
    Ab, bb = np.broadcast_to(A[:, None], (B, F, F, S)), np.broadcast_to(b[:, None], (B, F, F))
    rows = np.arange(F)
    for step in range(S):
        AJ, M, lam, D, u0, score = _cone_params(Ab, bb, J)
        score = np.where(alive, score, -np.inf)
        k = score.argmax(1)
        top = score[np.arange(B), k]
        better = top > best
        best_J[better] = J[np.arange(B), k][better]
        best[better] = top[better]
        if step == S - 1:
            break
        viol = np.einsum("bkfs,bks->bkf", Ab, u0) - bb                  # (B, F, F)
        in_J = (J[..., :, None] == rows[None, None, None, :]).any(-2)
        proj = np.einsum("bkij,bkfj->bkfi", AJ, Ab)                  # A_J a_f
        resid = 1.0 - np.einsum("bkfi,bkij,bkfj->bkf", proj, M, proj)  # ||a_f - Pi a_f||^2
        ok = mask[:, None, :] & ~in_J & (resid > 1e-10) & (viol > 1e-12)
        viol = np.where(ok, viol, -np.inf)
        nxt = viol.argmax(-1)
        alive = alive & np.isfinite(np.take_along_axis(viol, nxt[..., None], -1)[..., 0])
        J[..., step + 1] = np.where(alive, nxt, -1)
    Jm, feasible = _mode_active_set(A, b, mask)
    has = (Jm >= 0).any(1)
    if has.any():
        score_m = _cone_params(A[has], b[has], Jm[has])[-1]
        better = score_m > best[has]
        idx = np.flatnonzero(has)[better]
        best_J[idx], best[idx] = Jm[has][better], score_m[better]
    return best_J, best, feasible


# ============================================================================ sampler
def sample_standard_polytope(A, b, mask, counts, rng: np.random.Generator, *, log_mass=None,
                             max_proposals: float = 2e9, round_bytes: float = 2e8,
                             stats: dict | None = None) -> np.ndarray:
    """Exact iid draws of u ~ N(0, I_S) restricted to P_i = {u : A_i u <= b_i}.

    A (B, F, S), b (B, F), mask (B, F) bool (False: padding row), counts (B,) the
    number of draws from each polytope.  Returns (sum(counts), S), the draws of
    polytope 0 first, then polytope 1, ...  ``log_mass`` (B,): log P[P_i] if known
    (only used to size the proposal rounds; computed when not given).  ``stats``, a
    dict, receives "proposals" and "accepted" (B,) and "predicted_acceptance" (B,).
    """
    A, b = np.asarray(A, dtype=np.float64), np.asarray(b, dtype=np.float64)
    B, F, S = A.shape
    mask = np.ones((B, F), bool) if mask is None else np.asarray(mask, bool)
    counts = np.asarray(counts, dtype=np.int64)
    out = np.empty((int(counts.sum()), S))
    if out.shape[0] == 0:
        return out
    A, b, mask, empty = _normalise(A, b, mask)
    if S == 1:
        a = A[..., 0]
        hi = np.where(mask & (a > 0), b, np.inf).min(-1)
        lo = np.where(mask & (a < 0), -b, -np.inf).max(-1)
        if np.any((empty | (lo >= hi)) & (counts > 0)):
            raise CpadgnError("cannot sample a truncated Gaussian on an empty interval")
        out[:, 0] = truncated_normal_1d(np.repeat(lo, counts), np.repeat(hi, counts), rng)
        return out
    if log_mass is None:
        log_mass = np.zeros(B)
        need = counts > 0
        if need.any():
            log_mass[need] = polytope_log_mass(A[need], b[need], mask[need])[0]
    log_mass = np.asarray(log_mass, dtype=np.float64)
    J, score, feasible = _choose_cone(A, b, mask)
    if np.any((empty | ~feasible | ((S <= 2) & ~np.isfinite(log_mass))) & (counts > 0)):
        raise CpadgnError("cannot sample a truncated Gaussian on a region of zero probability")
    # S >= 3: where a mass came out -inf (a QMC miss, or a sliver at S = 3), size the rounds for 1e-3
    log_mass = np.where(np.isfinite(log_mass), log_mass, np.log(1e-3) - score)
    AJ, M, lam, D, u0, _ = _cone_params(A, b, J)
    used = J >= 0
    check = mask.copy()
    for s in range(S):                                            # rows of J hold by construction
        check[np.arange(B), np.where(used[:, s], J[:, s], 0)] &= ~used[:, s]
    AJtM = np.swapaxes(AJ, 1, 2) @ M                               # (B, S, S): u_par = u0 - AJtM s
    Pi = AJtM @ AJ                                                 # projector onto span A_J
    Mdiff = M - D[:, :, None] * np.eye(S)                          # s^T Mdiff s >= 0 for s >= 0
    sd = np.sqrt(D)
    acc = np.exp(np.minimum(log_mass + score, 0.0))
    starts = np.concatenate([[0], np.cumsum(counts)])
    remaining = counts.copy()
    filled = np.zeros(B, dtype=np.int64)
    per_prop = 8.0 * (F * S + 3 * S * S + F + 4 * S + 8)
    round_max = int(max(1024, round_bytes // per_prop))
    total = 0
    n_prop = np.zeros(B, dtype=np.int64)
    n_acc = np.zeros(B, dtype=np.int64)
    while remaining.any():
        todo = np.flatnonzero(remaining > 0)
        want = np.ceil(remaining[todo] / np.maximum(acc[todo], 1e-300) * 1.2 + 16)
        if want.sum() > round_max:                                 # fair share of a bounded round
            want = np.maximum(1, np.floor(want * (round_max / want.sum())))
        want = want.astype(np.int64)
        total += int(want.sum())
        if total > max_proposals:
            worst = float(acc[todo].min())
            raise CpadgnError(f"truncated-Gaussian sampler: more than {max_proposals:.3g} proposals "
                              f"(lowest acceptance rate {worst:.3g}); the region is too thin to sample "
                              "by rejection")
        bid = np.repeat(todo, want)
        n = bid.size
        # slacks: s_i = (t - lam_i / sqrt D_i) / sqrt D_i, t ~ N(0, 1) on [lam_i / sqrt D_i, inf)
        s = np.zeros((n, S))
        ub = used[bid]
        lo = lam[bid][ub] / sd[bid][ub]
        s[ub] = (_upper_tail_normal(lo, rng) - lo) / sd[bid][ub]
        v = rng.standard_normal((n, S))
        u = u0[bid] - np.einsum("nij,nj->ni", AJtM[bid], s) + v - np.einsum("nij,nj->ni", Pi[bid], v)
        q = np.maximum(np.einsum("ni,nij,nj->n", s, Mdiff[bid], s), 0.0)
        ok = np.log(1.0 - rng.random(n)) <= -0.5 * q
        viol = np.einsum("nfs,ns->nf", A[bid], u) - b[bid]
        ok &= ~((viol > 0) & check[bid]).any(1)
        # the first `remaining` accepted proposals of each polytope, in proposal order
        cs = np.cumsum(ok)
        first = np.repeat(np.concatenate([[0], np.cumsum(want)[:-1]]), want)
        rank_in = cs - 1 - (cs[first] - ok[first])             # accepted before, same polytope
        take = ok & (rank_in < remaining[bid])
        pos = starts[bid] + filled[bid] + rank_in
        out[pos[take]] = u[take]
        got = np.bincount(bid[take], minlength=B)
        filled += got
        remaining -= got
        n_prop += np.bincount(bid, minlength=B)
        n_acc += np.bincount(bid[ok], minlength=B)
    if stats is not None:
        stats.update(proposals=n_prop, accepted=n_acc, predicted_acceptance=acc)
    return out


def sample_truncated_gaussian(mean, cov_factor, G, h, mask, counts, rng: np.random.Generator, *,
                              log_mass=None, **kw) -> np.ndarray:
    """Exact iid draws of z ~ N(mean_i, C_i C_i^T) restricted to {z : G_i z <= h_i}.

    mean (B, S), cov_factor C (B, S, S) (any factor with C C^T = covariance),
    G (B, F, S), h (B, F), mask (B, F), counts (B,).  Returns (sum(counts), S) ordered
    by polytope.  ``log_mass``: log P[z in region] per polytope, when known.
    """
    mean, C = np.asarray(mean, dtype=np.float64), np.asarray(cov_factor, dtype=np.float64)
    G, h = np.asarray(G, dtype=np.float64), np.asarray(h, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    A = G @ C
    b = h - np.einsum("bfs,bs->bf", G, mean)
    u = sample_standard_polytope(A, b, mask, counts, rng, log_mass=log_mass, **kw)
    bid = np.repeat(np.arange(mean.shape[0]), counts)
    return mean[bid] + np.einsum("nst,nt->ns", C[bid], u)
