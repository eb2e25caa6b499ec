"""How far the S = 3 speed target lies from what the exact engine's own arithmetic needs.

    python benchmarks/bench_s3_floor.py [--rows 20]

The S = 3 case of bench_likelihood.py: random 32-32, D = 64, noise std 0.1, rtol 1e-9;
issue #12 asks for 1,000 rows in 20 s on this 2-core machine.  The exact mass of a
(row, region) pair is a signed sum of 1-D Gauss-Legendre integrals along the region's
edges (DESIGN section 4; ``polyhedron._twin_edge_terms``, one edge line serving both of
its facets).  This script scores --rows rows, records every edge line integrated, and
prints, from one run:
1. the engine's time per integrated pair (all threads);
2. edge lines per pair, and Gauss-Legendre nodes per line at the engine's 2^-52 target
   and, for comparison, at a looser 1e-12;
3. the time per node of the vectorised integrand alone (``gauss_legendre_sums`` on the
   recorded lines, one thread: per node one exp, one erfc, one sqrt, two divisions);
4. the floor these give for 1,000 rows on 2 cores: the pairs that even a pruning knowing
   every pair's value needs (bench_likelihood's ``fewest_pairs``) times lines per pair
   times nodes per line times the time per node, halved for two perfectly parallel
   cores, and nothing else (no pruning, no rule, no moments).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_likelihood import HIGHER, fewest_pairs, make_net  # noqa: E402

from cpadgn import likelihood, polyhedron  # noqa: E402
from cpadgn import polytope  # noqa: E402
from cpadgn.model import CPAModel  # noqa: E402


def recorded_lines(model, X, rtol):
    """Score X as ``score`` does, recording the (b, c, b_twin, c_twin, tau_lo, tau_hi) of
    every edge line integrated: returns the posterior, its seconds and lines (6, L)."""
    tab = model._region_table()
    likelihood._facet_polygons(tab)
    lines, integrate = [], polyhedron._twin_edge_terms

    def recording(b, c, b_twin, c_twin, tau_lo, tau_hi, owen=False):
        lines.append(np.stack([b, c, b_twin, c_twin, tau_lo, tau_hi]))
        return integrate(b, c, b_twin, c_twin, tau_lo, tau_hi, owen)

    polyhedron._twin_edge_terms = recording
    try:
        t0 = time.perf_counter()
        post = likelihood.posterior(model.net, model.partition(), model.noise_std, X, tab=tab, rtol=rtol,
                                    moments=False)
        seconds = time.perf_counter() - t0
    finally:
        polyhedron._twin_edge_terms = integrate
    return post, seconds, np.concatenate(lines, 1)


def rule(lines, eps):
    """The engine's rule for the lines at relative target eps: (v0, width, panels, nodes, args)."""
    b, c, _, c_twin, tau_lo, tau_hi = (np.minimum(x, 1e150) if i < 4 else x for i, x in enumerate(lines))
    count = polytope.gauss_legendre_count
    polyhedron.gauss_legendre_count = lambda growth, half, eta: count(growth, half, eta, eps)
    try:
        tau_star, _, _, v0, width, panels, nodes = polyhedron._edge_rule(b, c, tau_lo, tau_hi, c_twin)
    finally:
        polyhedron.gauss_legendre_count = count
    far = b * b + c * c + tau_star * tau_star > polyhedron._NEAR_R2
    return v0, width, panels, nodes, (b * b + c * c, c, tau_star, far, c_twin * c_twin)


def seconds_per_node(lines, repeats=3):
    """Best of repeats: seconds per node of the engine's integrand sums alone, one thread."""
    v0, width, panels, nodes, args = rule(lines, polytope.GL_EPS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = np.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            polytope.gauss_legendre_sums(v0, width, panels, nodes.copy(), polyhedron._near_edge_integrands, *args,
                                         outputs=2)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return best / float((panels * nodes).sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--cache-dir", default="out/bench_likelihood")
    args = ap.parse_args()
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    hidden, target_rows, target_s, rtol = HIGHER[3]["hidden"], HIGHER[3]["rows"], 20.0, 1e-9
    model = CPAModel(make_net(S=3, hidden=hidden, D=64), noise_std=0.1, device="cpu",
                     cache_path=Path(args.cache_dir) / f"S3_{'-'.join(map(str, hidden))}.partition.h5")
    X = model.sample(args.rows, seed=1)
    model.partition()
    post, seconds, lines = recorded_lines(model, X, rtol)
    pairs = post.pair_row.size
    needed = fewest_pairs(post, rtol) / args.rows
    per_line = {}                                         # nodes a line (panels x nodes a panel)
    for eps in (polytope.GL_EPS, 1e-12):
        _, _, panels, nodes, _ = rule(lines, eps)
        per_line[eps] = float((panels * nodes).mean())
    per_node = seconds_per_node(lines[:, :400_000])
    lines_per_pair = lines.shape[1] / pairs
    floor = target_rows * needed * lines_per_pair * per_line[polytope.GL_EPS] * per_node / 2
    print(f"S=3 32-32, D=64, noise std 0.1, rtol {rtol:g}, {args.rows} rows, {torch.get_num_threads()} threads:")
    print(f"  engine: {seconds:.2f} s, {pairs / args.rows:,.0f} pairs per row, {1e6 * seconds / pairs:.1f} us per pair "
          f"(wall); {target_rows:,} rows at this rate: {target_rows * seconds / args.rows:.0f} s (target {target_s:g} s)")
    print(f"  edge lines per pair {lines_per_pair:.1f}; Gauss-Legendre nodes per line {per_line[polytope.GL_EPS]:.2f} "
          f"(at 1e-12: {per_line[1e-12]:.2f}); integrand {1e9 * per_node:.1f} ns per node (one thread)")
    print(f"  fewest pairs any certified pruning needs: {needed:,.0f} per row; floor for {target_rows:,} rows on 2 "
          f"cores, node evaluations only: {floor:.1f} s ({floor / target_s:.2f} of the target; the engine takes "
          f"{target_rows * seconds / args.rows / floor:.1f}x this floor)")


if __name__ == "__main__":
    main()
