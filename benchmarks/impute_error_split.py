"""Where cpadgn's imputation loses to k-NN on digits (30% MCAR): RMSE on the hidden entries
with |x| <= 5 (standardised; 99.8% of them) and |x| > 5 (pixels nearly constant in
training), and the share of rows where cpadgn's squared error is the larger.

    python benchmarks/impute_error_split.py MODEL.h5 0,1,2,3,4

MODEL: a model file from bench_impute.py's --model-dir (same split, masks and k-NN).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

import cpadgn
from cpadgn.impute import impute, mcar_mask

sys.path.insert(0, str(Path(__file__).parent))
from bench_impute import baselines, load  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="model file from bench_impute.py's --model-dir")
    ap.add_argument("seeds", help="comma-separated MCAR seeds, e.g. 0,1,2,3,4")
    args = ap.parse_args()
    Xtr, Xte = load("digits")
    model = cpadgn.load(args.model)
    part, tab = model.partition(), model._region_table()
    ns = np.broadcast_to(np.asarray(model.noise_std, float), (Xte.shape[1],))
    print("noise std per column: median %.3f, min %.3f, max %.3f" % (np.median(ns), ns.min(), ns.max()))
    r = lambda v, m: np.sqrt(((v - Xte)[m] ** 2).mean())
    for seed in [int(s) for s in args.seeds.split(",")]:
        h = mcar_mask(Xte, 0.3, seed)
        Xm = Xte.copy()
        Xm[h] = np.nan
        k = baselines(Xtr, Xm, seed)["knn"]
        c = impute(model.net, part, model.noise_std, Xm, tab=tab, device=model.device).mean
        big = h & (np.abs(Xte) > 5)
        bulk = h & ~big
        dk, dc = (((k - Xte) ** 2) * h).sum(1), (((c - Xte) ** 2) * h).sum(1)   # per row
        shows_big = h & (np.abs(np.where(h, 0, Xte)) > 5).any(1)[:, None]        # an observed |x| > 5
        print(f"seed {seed}: all knn {r(k, h):.3f} cpadgn {r(c, h):.3f} | bulk ({bulk.sum()}) knn {r(k, bulk):.3f} "
              f"cpadgn {r(c, bulk):.3f} | big ({big.sum()}) knn {r(k, big):.3f} cpadgn {r(c, big):.3f} | "
              f"rows cpadgn worse {(dc > dk).mean():.2f}; rows with an observed |x|>5: cpadgn "
              f"{r(c, shows_big):.3f} knn {r(k, shows_big):.3f}", flush=True)


if __name__ == "__main__":
    main()
