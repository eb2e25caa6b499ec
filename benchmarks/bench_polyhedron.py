"""Throughput of the exact S = 3 polyhedron integrals against the old randomised QMC.

    python benchmarks/bench_polyhedron.py [--hidden 32 32] [--regions 2000] [--repeats 3]

Generator: S = 3, leaky ReLU 0.1, D = 64, PyTorch's default init (seed 0).  Polytopes:
regions of its partition (a random sample of --regions), as the prior sees them and as
a posterior sees them after whitening (w = (z - c) / s: each region shifted to a random
centre c ~ N(0, 2^2 I) and scaled by 1 / s, s = 0.1).  Prints polytopes per second
(best of --repeats) for the mass alone and with mean and covariance, exact and QMC
(n_qmc = 4096, the likelihood's default; 128 is what the partition used for masses),
and the largest |log mass| difference between them in QMC standard errors.
"""
import argparse
import time

import numpy as np
import torch
from torch import nn

from cpadgn.network import PiecewiseAffineNet
from cpadgn.partition import compute_partition
from cpadgn.polyhedron import polyhedron_moments
from cpadgn.polytope import _qmc, _normalise


def make_net(hidden, S=3, D=64, seed=0):
    torch.manual_seed(seed)
    sizes = [S, *hidden, D]
    lins = [nn.Linear(a, b).double() for a, b in zip(sizes[:-1], sizes[1:])]
    return PiecewiseAffineNet.from_arrays([l.weight.detach().numpy() for l in lins],
                                          [l.bias.detach().numpy() for l in lins], [0.1] * len(hidden))


def best_rate(f, n, repeats):
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t)
    return n / best, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, nargs="+", default=[32, 32])
    ap.add_argument("--regions", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    net = make_net(args.hidden)
    t = time.perf_counter()
    part = compute_partition(net)
    print(f"partition S = 3 {'-'.join(map(str, args.hidden))}: {part.n_regions} regions in "
          f"{time.perf_counter() - t:.1f} s; prior masses sum to {np.exp(part.log_prior_mass).sum():.12f}")
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(part.n_regions, min(args.regions, part.n_regions), replace=False))
    G, h, mask = part.facets(net, idx)
    c = rng.normal(size=(idx.size, 3)) * 2.0
    s = 0.1
    sets = {"prior": (G, h), "posterior-like": (G * s, h - np.einsum("bfs,bs->bf", G, c))}
    print(f"{idx.size} polytopes, facets per region: mean {mask.sum(1).mean():.1f}, max {mask.sum(1).max()}")
    for name, (A, b) in sets.items():
        n = A.shape[0]
        r_mass, ex = best_rate(lambda: polyhedron_moments(A, b, mask, moments=False), n, args.repeats)
        r_mom, _ = best_rate(lambda: polyhedron_moments(A, b, mask, moments=True), n, args.repeats)
        An, bn, mn, _ = _normalise(A, b, mask)
        q_mass, q = best_rate(lambda: _qmc(An, bn, mn, 4096, 0, moments=False), n, args.repeats)
        q_mom, _ = best_rate(lambda: _qmc(An, bn, mn, 4096, 0, moments=True), n, args.repeats)
        q128, q1 = best_rate(lambda: _qmc(An, bn, mn, 128, 0, moments=False), n, args.repeats)
        z = np.abs(ex.log_mass - q.log_mass) / np.maximum(q.stderr, 1e-300)
        print(f"{name:15s} exact: {r_mass:9.0f} /s mass, {r_mom:9.0f} /s with moments | "
              f"QMC 4096: {q_mass:7.0f} /s mass, {q_mom:7.0f} /s moments; QMC 128: {q128:7.0f} /s | "
              f"log mass range [{ex.log_mass.min():.1f}, {ex.log_mass.max():.2f}]; "
              f"|exact - QMC4096| / SE: median {np.median(z):.2f}, max {z.max():.1f}")


if __name__ == "__main__":
    main()
