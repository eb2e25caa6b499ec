"""How many pairs would a sharper certified bound spare at S = 4?  (A study, not a timing.)

On the S = 4 16-16 benchmark model (``bench_likelihood.higher_latent_case``), for each of
a few rows, the fewest (row, region) pairs a pruning must integrate so that the bounds of
the pairs it leaves out sum to at most rtol p(x), when each pair's bound is:

- ``distance``: log kappa + log Phi(-r), r the certified distance from the pair's whitened
  posterior mean to its region (what ``likelihood._evaluate_pairs`` uses at S = 4);
- ``+ volume``: also log kappa + log(vol_w) - 2 log(2 pi) - r^2 / 2, the region's exact
  whitened 4-D volume (qhull's, bounded regions) times the largest density on it: the
  bound that S = 3 adds to the distance bound (``likelihood._nearest_point_bound``);
- ``+ box`` (--boxes): also the Gaussian mass of the region's bounding box along the
  whitened axes, from 8 LPs per region (~16 ms a region: minutes for a partition);
- ``oracle``: every integrated pair's own value (``bench_likelihood.fewest_pairs``).

    python benchmarks/bench_s4_bounds.py --rows 4 [--boxes]
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linprog
from scipy.spatial import ConvexHull, HalfspaceIntersection
from scipy.special import ndtr
from scipy.stats import norm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_likelihood import fewest_pairs, make_net  # noqa: E402

from cpadgn import likelihood  # noqa: E402
from cpadgn.model import CPAModel  # noqa: E402

LOG_2PI = float(np.log(2 * np.pi))


def whitened_volumes(net, part, tab):
    """(R,) each bounded region's whitened volume vol_z / |det C| (qhull), inf if unbounded."""
    det_C = np.abs(np.linalg.det(tab.C.cpu().numpy()))
    vol = np.full(part.n_regions, np.inf)
    for r in range(part.n_regions):
        G, h, m = part.facets(net, np.array([r]))
        G, h = G[0][m[0]], h[0][m[0]]
        if not part.bounded[r]:
            continue
        hs = HalfspaceIntersection(np.hstack([G, -h[:, None]]), part.interior[r])
        vol[r] = ConvexHull(hs.intersections).volume / det_C[r]
    return vol


def whitened_boxes(tab):
    """(R, S) lower and upper ends of each region's whitened polytope along the axes."""
    A, h = tab.GC_unit.cpu().numpy(), tab.h_unit.cpu().numpy()
    R, _, S = A.shape
    lo, hi = np.full((R, S), -np.inf), np.full((R, S), np.inf)
    for r in range(R):
        real = np.isfinite(h[r])
        for i in range(S):
            for sign, ends in ((1.0, lo), (-1.0, hi)):
                c = np.zeros(S)
                c[i] = sign
                res = linprog(c, A_ub=A[r][real], b_ub=h[r][real], bounds=[(None, None)] * S, method="highs")
                if res.status == 0:
                    ends[r, i] = sign * res.fun
    return lo, hi


def needed(bound, log_p, rtol):
    """The fewest pairs left after leaving out the smallest bounds (P,) summing to <= rtol p."""
    s = np.logaddexp.accumulate(np.sort(bound))
    return bound.size - np.searchsorted(s, log_p + np.log(rtol), side="right")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--rtol", type=float, default=1e-9)
    ap.add_argument("--boxes", action="store_true", help="also the bounding-box bound (minutes of LPs)")
    ap.add_argument("--cache-dir", default="out/bench_likelihood")
    args = ap.parse_args()
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    net = make_net(S=4, hidden=(16, 16), D=64)
    model = CPAModel(net, noise_std=0.1, device="cpu", cache_path=Path(args.cache_dir) / "S4_16-16.partition.h5")
    part, tab = model.partition(), model._region_table()
    t0 = time.perf_counter()
    vol = whitened_volumes(net, part, tab)
    print(f"S=4 16-16: {part.n_regions:,} regions, {np.isfinite(vol).sum():,} bounded; "
          f"volumes {time.perf_counter() - t0:.0f} s")
    if args.boxes:
        t0 = time.perf_counter()
        lo, hi = whitened_boxes(tab)
        print(f"bounding boxes: {time.perf_counter() - t0:.0f} s")
    X = model.sample(args.rows, seed=1)
    post = likelihood.posterior(net, part, model.noise_std, X, tab=tab, rtol=args.rtol, moments=False)
    log_kappa, v = (x.cpu().numpy() for x in likelihood._log_kappa_complete(tab, torch.as_tensor(X)))
    regions = np.arange(part.n_regions)
    for i in range(args.rows):
        vi = np.ascontiguousarray(v[i].T)
        dist, _ = likelihood._dual_distance_bound(tab, vi, regions)
        r = np.where(dist < 0, -norm.ppf(np.exp(dist)), 0.0)
        with np.errstate(invalid="ignore"):        # inf - inf where unbounded: not taken
            by_volume = np.where(np.isfinite(vol), np.log(vol) - 2 * LOG_2PI - 0.5 * r * r, np.inf)
        bounds = {"distance": dist, "+ volume": np.minimum(dist, by_volume)}
        if args.boxes:
            with np.errstate(divide="ignore"):
                box = np.log(ndtr(hi - vi) - ndtr(lo - vi)).sum(1)
            box = np.where(np.isfinite(box), box, 0.0)       # rounded to 0: no bound
            bounds["+ box"] = np.minimum(bounds["+ volume"], box)
        log_p = post.log_likelihood[i]
        counts = ", ".join(f"{k} {needed(log_kappa[i] + b, log_p, args.rtol):,}" for k, b in bounds.items())
        oracle = fewest_pairs(_one_row(post, i), args.rtol)
        print(f"row {i}: integrated {(post.pair_row == i).sum():,}; pairs needed with bound {counts}; "
              f"oracle {oracle:,}")


def _one_row(post, i):
    """A view of post holding row i's pairs only, as ``fewest_pairs`` reads it."""
    keep = post.pair_row == i
    return argparse.Namespace(log_likelihood=post.log_likelihood[i:i + 1], pair_row=np.zeros(keep.sum(), int),
                              pair_responsibility=post.pair_responsibility[keep])


if __name__ == "__main__":
    main()
