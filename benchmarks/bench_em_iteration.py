"""Seconds per EM iteration on scikit-learn digits (default S = 2, hidden 32-32), single-threaded.

    python benchmarks/bench_em_iteration.py [--iters 8] [--threads 1] [--latent 3 --hidden 16,16]

Same data preparation as bench_fit.py (52 standardised pixels, 1,257 training and 180
validation rows).  Prints the wall time of every iteration (E-step on the current
partition, M-step, the new partition and its exact scoring, validation scoring
included) and their median.
"""
import argparse

import numpy as np
import torch

from bench_fit import load
from cpadgn.fit import fit_em


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--latent", type=int, default=2)
    ap.add_argument("--hidden", default="32,32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tr, va, _ = load("digits")
    hidden = tuple(int(h) for h in args.hidden.split(","))
    res = fit_em(tr, args.latent, hidden, 0.1, max_iter=args.iters, tol=0.0, X_val=va, seed=0, noise="iso",
                 timings=True)
    per = np.diff(res.history["seconds"])
    print("seconds per iteration:", " ".join(f"{t:.2f}" for t in per))
    print(f"median {np.median(per):.2f} s, regions {res.n_regions}, train LL {res.train_loglik:.3f}")


if __name__ == "__main__":
    main()
