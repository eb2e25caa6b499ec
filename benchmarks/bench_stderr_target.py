"""What a looser --stderr-target buys at S = 4: time of log p against the QMC target.

    python benchmarks/bench_stderr_target.py [--rows 20] [--targets 1e-4,1e-3,1e-2] [--rounds 2]

The S = 4 case of bench_likelihood.py (hidden 16-16, D = 64, noise std 0.1, rows sampled
from the model, rtol 1e-9; its partition cache in out/bench_likelihood is reused), scored
at each target in turn, the targets alternating over the rounds (the machine is shared:
compare within a round).  Prints per run the seconds, their ratio to the first target's
in the same round, the largest standard error reached, and the largest difference of
log p from the first target's run.
"""
import argparse
import time
from pathlib import Path

import numpy as np

from bench_likelihood import make_net
from cpadgn import likelihood
from cpadgn.model import CPAModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--targets", default="1e-4,1e-3,1e-2", help="comma-separated stderr targets, nats")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache-dir", default="out/bench_likelihood")
    args = ap.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    net = make_net(S=4, hidden=(16, 16), D=64)
    model = CPAModel(net, noise_std=0.1, device="cpu", cache_path=Path(args.cache_dir) / "S4_16-16.partition.h5")
    X = model.sample(args.rows, seed=1)
    part, tab = model.partition(), model._region_table()
    print(f"S=4, hidden 16-16, D=64, noise std 0.1: {part.n_regions:,} regions; {args.rows} rows, rtol 1e-9")
    reference = None
    for r in range(args.rounds):
        first = None
        for target in targets:
            t0 = time.perf_counter()
            post = likelihood.posterior(net, part, model.noise_std, X, tab=tab, rtol=1e-9, moments=False,
                                        stderr_target=target)
            t = time.perf_counter() - t0
            first = first or t
            reference = post.log_likelihood if reference is None else reference
            print(f"round {r + 1}, target {target:g}: {t:.2f} s ({t / first:.2f}x), max stderr "
                  f"{post.stderr.max():.2e}, max |log p - first run's| "
                  f"{np.abs(post.log_likelihood - reference).max():.2e}", flush=True)


if __name__ == "__main__":
    main()
