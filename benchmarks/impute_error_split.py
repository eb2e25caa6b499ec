"""Where cpadgn's imputation loses to k-NN on digits (30% MCAR): RMSE on the hidden entries
with |x| <= 5 (standardised; 99.8% of them) and |x| > 5 (pixels nearly constant in
training), and the share of rows where cpadgn's squared error is the larger.

    python benchmarks/impute_error_split.py MODEL.h5 0,1,2,3,4

MODEL: a model file from bench_impute.py's --model-dir (same split, masks and k-NN).
"""
import sys
from pathlib import Path
import numpy as np, cpadgn
sys.path.insert(0, str(Path(__file__).parent))
from bench_impute import load, baselines
from cpadgn.impute import mcar_mask, impute
Xtr, Xte = load("digits")
model = cpadgn.load(sys.argv[1]); part, tab = model.partition(), model._region_table()
ns = np.broadcast_to(np.asarray(model.noise_std, float), (64,))
print("noise std per column: median %.3f, min %.3f, max %.3f" % (np.median(ns), ns.min(), ns.max()))
for seed in [int(s) for s in sys.argv[2].split(",")]:
    h = mcar_mask(Xte, 0.3, seed); Xm = Xte.copy(); Xm[h] = np.nan
    k = baselines(Xtr, Xm, seed)["knn"]
    c = impute(model.net, part, model.noise_std, Xm, tab=tab, device=model.device).mean
    big = h & (np.abs(Xte) > 5)
    bulk = h & ~big
    r = lambda v, m: np.sqrt(((v - Xte)[m] ** 2).mean())
    # rows where cpadgn loses most (squared error over the row's hidden entries)
    dk = (((k - Xte) ** 2) * h).sum(1); dc = (((c - Xte) ** 2) * h).sum(1)
    print(f"seed {seed}: all knn {r(k,h):.3f} cpadgn {r(c,h):.3f} | bulk ({bulk.sum()}) knn {r(k,bulk):.3f} cpadgn {r(c,bulk):.3f} "
          f"| big ({big.sum()}) knn {r(k,big):.3f} cpadgn {r(c,big):.3f} | rows cpadgn worse {(dc > dk).mean():.2f}; "
          f"rows with an observed |x|>5: cpadgn {r(c, h & (np.abs(np.where(h, 0, Xte)) > 5).any(1)[:, None]):.3f} knn {r(k, h & (np.abs(np.where(h, 0, Xte)) > 5).any(1)[:, None]):.3f}", flush=True)
