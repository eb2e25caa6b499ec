"""What looser precision buys: time of log p against --rtol (S = 3, 4) or --stderr-target (S = 4).

    python benchmarks/bench_precision.py [--latent 3] [--rtols 1e-9,1e-6,1e-4,1e-2]
    python benchmarks/bench_precision.py --latent 4 --targets 1e-4,1e-3,1e-2 [--rows 20] [--rounds 2]

The S = 3 or S = 4 case of bench_likelihood.py (hidden 32-32 or 16-16, D = 64, noise std
0.1, rows sampled from the model; its partition cache in out/bench_likelihood is reused),
scored at each setting in turn, alternating over the rounds (the machine is shared:
compare within a round): either the pruning tolerance rtol (stderr target 1e-4), or,
with --targets, the S = 4 QMC stderr target (rtol 1e-9).  Prints per run the seconds,
their ratio to the first setting's in the same round, the (row, region) pairs integrated
per row, the largest certified pruning bound and standard error, and the largest
difference of log p from the first setting's run.
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
    ap.add_argument("--latent", type=int, choices=(3, 4), default=3)
    ap.add_argument("--rtols", default="1e-9,1e-6,1e-4,1e-2", help="comma-separated pruning tolerances")
    ap.add_argument("--targets", default=None, help="comma-separated S = 4 stderr targets, nats (instead of --rtols)")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cache-dir", default="out/bench_likelihood")
    args = ap.parse_args()
    if args.targets and args.latent != 4:
        ap.error("--targets is for --latent 4 (S <= 3 is exact)")
    knob = "stderr_target" if args.targets else "rtol"
    settings = [float(v) for v in (args.targets or args.rtols).split(",")]
    hidden = (32, 32) if args.latent == 3 else (16, 16)
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    net = make_net(S=args.latent, hidden=hidden, D=64)
    cache = Path(args.cache_dir) / f"S{args.latent}_{hidden[0]}-{hidden[1]}.partition.h5"
    model = CPAModel(net, noise_std=0.1, device="cpu", cache_path=cache)
    X = model.sample(args.rows, seed=1)
    part, tab = model.partition(), model._region_table()
    if args.latent == 3:
        likelihood._facet_polygons(tab)           # once per command: not what the settings change
    print(f"S={args.latent}, hidden {hidden[0]}-{hidden[1]}, D=64, noise std 0.1: {part.n_regions:,} regions; "
          f"{args.rows} rows; {knob} varies")
    reference = None
    for r in range(args.rounds):
        first = None
        for value in settings:
            kw = {"rtol": 1e-9, "stderr_target": 1e-4, knob: value}
            t0 = time.perf_counter()
            post = likelihood.posterior(net, part, model.noise_std, X, tab=tab, moments=False, **kw)
            t = time.perf_counter() - t0
            first = first or t
            reference = post.log_likelihood if reference is None else reference
            print(f"round {r + 1}, {knob} {value:g}: {t:.2f} s ({t / first:.2f}x), "
                  f"{post.pair_row.size / args.rows:,.0f} pairs per row, max bound {post.error_bound.max():.1e}, "
                  f"max stderr {post.stderr.max():.1e}, max |log p - first run's| "
                  f"{np.abs(post.log_likelihood - reference).max():.1e}", flush=True)


if __name__ == "__main__":
    main()
