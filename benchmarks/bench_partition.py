"""Partition benchmark: edge subdivision (exact over all of R^S) vs the LP walk.

Random generators with PyTorch's default nn.Linear initialisation, LeakyReLU(0.1)
between the layers and D = 10 outputs (seeded).  For each net:

* subdivision: compute_partition(net) without the prior masses (enumeration, facets,
  interior-point checks, clearances); the prior masses are timed apart with the routine
  compute_partition uses, on the same facets: on all regions where they are exact
  (S <= 2), on a random sample of --mass-sample regions otherwise (extrapolated, marked
  ~; --full-masses computes them all);
* lp-walk: the reference BFS on the same net, in the same run, stopped after
  --lp-limit regions or --lp-seconds (its regions/s is then over the regions it found);
* ratio: subdivision enumeration regions/s over LP-walk regions/s (both wall clock; the
  enumeration's CPU seconds are shown too, for shared machines);
* checks: prior mass sum error (where all masses were computed), fraction of 100k prior
  samples located, whether the LP walk's regions are all in the subdivision's list.

    python benchmarks/bench_partition.py [--lp-limit 2000] [--lp-seconds 30] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cpadgn.partition as partition_module  # noqa: E402
from cpadgn.network import PiecewiseAffineNet  # noqa: E402
from cpadgn.partition import _lp_walk, check_partition, compute_partition  # noqa: E402

CASES = [(2, (64, 64)), (2, (128, 128)), (3, (32, 32))]


def torch_default_net(S, hidden, D=10, seed=0, slope=0.1) -> PiecewiseAffineNet:
    torch.manual_seed(seed)
    sizes = [S, *hidden, D]
    layers = [torch.nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:])]
    return PiecewiseAffineNet.from_arrays([l.weight.detach().double().numpy() for l in layers],
                                          [l.bias.detach().double().numpy() for l in layers],
                                          [slope] * len(hidden))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lp-limit", type=int, default=2000, help="stop the LP walk after this many regions")
    ap.add_argument("--lp-seconds", type=float, default=30.0, help="stop the LP walk after this long")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mass-sample", type=int, default=2000, help="regions whose S >= 3 masses are timed")
    ap.add_argument("--full-masses", action="store_true", help="compute every prior mass, any S")
    args = ap.parse_args(argv)
    log_prior_masses = partition_module._log_prior_masses

    rows = []
    for S, hidden in CASES:
        net = torch_default_net(S, hidden, seed=args.seed)
        # enumeration only: the prior masses are timed apart below
        partition_module._log_prior_masses = lambda G, h, m: (np.full(G.shape[0], np.nan), np.zeros(G.shape[0]))
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            part = compute_partition(net)
            t_enum, c_enum = time.perf_counter() - t0, time.process_time() - c0
        finally:
            partition_module._log_prior_masses = log_prior_masses
        full = S <= 2 or args.full_masses
        idx = np.arange(part.n_regions) if full else \
            np.sort(np.random.default_rng(0).choice(part.n_regions, min(args.mass_sample, part.n_regions), False))
        G, h, mask = part.facets(net, idx)
        t0 = time.perf_counter()
        lm, se = log_prior_masses(G, h, mask)
        t_mass = (time.perf_counter() - t0) * part.n_regions / idx.size
        if full:
            part.log_prior_mass, part.log_prior_mass_stderr = lm, se
        chk = check_partition(net, part, n_samples=100_000)
        lp = _lp_walk(net, limit=args.lp_limit, time_limit=args.lp_seconds)
        n_lp = lp["patterns"].shape[0]
        lp_rate = n_lp / lp["seconds"]
        lp_in_sub = bool((part.locate(net, lp["interior"]) >= 0).all())
        sub_rate = part.n_regions / t_enum
        rows.append((f"{S}-" + "-".join(map(str, hidden)), part.n_regions, int((~part.bounded).sum()),
                     int(part.degenerate.sum()), t_enum, c_enum, sub_rate, ("" if full else "~") + f"{t_mass:.2f}",
                     n_lp, lp["seconds"], lp_rate, sub_rate / lp_rate,
                     f"{chk['mass_error']:.1e}" if full else "n/a", chk["samples_located"], str(lp_in_sub)))
    head = ("net", "regions", "unbounded", "degenerate", "enum s", "(cpu s)", "enum reg/s", "mass s",
            "lp regions", "lp s", "lp reg/s", "ratio", "|mass-1|", "located", "lp in sub")
    fmt = "{:<10}{:>9}{:>10}{:>11}{:>8.2f}{:>8.2f}{:>11.0f}{:>9}{:>11}{:>7.1f}{:>9.0f}{:>7.1f}{:>10}{:>9.4f}{:>10}"
    print("{:<10}{:>9}{:>10}{:>11}{:>8}{:>8}{:>11}{:>9}{:>11}{:>7}{:>9}{:>7}{:>10}{:>9}{:>10}".format(*head))
    for r in rows:
        print(fmt.format(*r))
    return rows


if __name__ == "__main__":
    main()
