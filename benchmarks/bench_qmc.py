"""Randomised-QMC prior masses of partition regions (S >= 4) against plain Monte Carlo.

Random generators with PyTorch's default nn.Linear initialisation, LeakyReLU(0.1), D = 10
(as benchmarks/bench_partition.py).  For each net: the partition, its prior masses timed
apart (the routine compute_partition uses), and an independent oracle: --mc-samples
N(0, I) samples located in the partition (counts / n, binomial standard error).  Printed:

* coverage: the fraction of regions with |QMC - MC| <= 3 combined standard errors, over
  the regions whose expected count is >= 100 (where the binomial error is near normal);
  mean z and mean z^2 there (1 for honest standard errors);
* mass sum: sum of the masses, its standard error (independent estimates: quadrature) and
  the z-score of sum - 1;
* time per region of the masses (wall clock, shared machine).

At S = 3 the partition's masses are exact (``polyhedron``); a second row shows the QMC
estimator run on the same regions for comparison (``polytope._qmc``, 256 points).

    python benchmarks/bench_qmc.py [--mc-samples 2e7] [--cases 4:16,16 3:16,16]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cpadgn.partition as partition_module  # noqa: E402
from cpadgn import polytope  # noqa: E402
from bench_partition import torch_default_net  # noqa: E402
from cpadgn.partition import compute_partition  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["4:16,16", "3:16,16"], help="S:hidden,sizes")
    ap.add_argument("--mc-samples", type=float, default=2e7)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    log_prior_masses = partition_module._log_prior_masses
    n_mc = int(args.mc_samples)
    print(f"{'case':>10} {'regions':>8} {'compared':>8} {'|z|<=3':>7} {'mean z':>7} {'mean z2':>7} "
          f"{'mass sum':>9} {'SE':>8} {'z sum':>6} {'ms/region':>9}")
    for case in args.cases:
        S, hidden = case.split(":")
        S, hidden = int(S), tuple(int(h) for h in hidden.split(","))
        net = torch_default_net(S, hidden, seed=args.seed)
        partition_module._log_prior_masses = lambda G, h, m: (np.zeros(G.shape[0]), np.zeros(G.shape[0]))
        try:
            part = compute_partition(net)
        finally:
            partition_module._log_prior_masses = log_prior_masses
        rng = np.random.default_rng(1000 + args.seed)
        counts = np.zeros(part.n_regions)
        for s0 in range(0, n_mc, 500_000):
            r = part.locate(net, rng.standard_normal((min(500_000, n_mc - s0), S)))
            counts += np.bincount(r[r >= 0], minlength=part.n_regions)
        routines = [("", log_prior_masses)]
        if S == 3:
            routines.append((" qmc", _qmc_masses))
        for label, routine in routines:
            lm, se = np.zeros(part.n_regions), np.zeros(part.n_regions)
            t0 = time.perf_counter()
            for s0 in range(0, part.n_regions, 4096):                  # as compute_partition
                idx = np.arange(s0, min(part.n_regions, s0 + 4096))
                lm[idx], se[idx] = routine(*part.facets(net, idx))
            t_mass = time.perf_counter() - t0
            mass, se_mass = np.exp(lm), np.exp(lm) * se
            big = mass * n_mc >= 100
            m, p = mass[big], counts[big] / n_mc
            z = (m - p) / np.sqrt(m * (1 - m) / n_mc + se_mass[big] ** 2)
            se_sum = np.sqrt(np.sum(se_mass ** 2))
            z_sum = (mass.sum() - 1) / se_sum if se_sum > 0 else np.nan
            print(f"{case + label:>10} {part.n_regions:>8} {big.sum():>8} {np.mean(np.abs(z) <= 3):>7.4f} "
                  f"{z.mean():>7.3f} {np.mean(z * z):>7.3f} {mass.sum():>9.5f} {se_sum:>8.1e} {z_sum:>6.2f} "
                  f"{1e3 * t_mass / part.n_regions:>9.3f}", flush=True)


def _qmc_masses(G, h, mask):
    """The QMC estimator on partition regions at the partition's 256 points, any S."""
    A, b, m, empty = polytope._normalise(G, h, mask)
    res = polytope._qmc(A, b, m, 256, 0, moments=False)
    return np.where(empty, -np.inf, res.log_mass), res.stderr


if __name__ == "__main__":
    main()
