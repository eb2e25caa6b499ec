"""One-class anomaly detection: cpadgn's exact likelihood against PyOD's VAE, PCA, KNN and IForest.

    python benchmarks/bench_anomaly.py [--seeds 5] [--datasets digits,breast_cancer]
                                       [--classes 0,1,...,9] [--latent-dim 2] [--hidden 16,16]
                                       [--em-iter 40] [--missing 0.2] [--anomaly-fraction 0.1]
                                       [--json FILE]

Tasks: scikit-learn's digits, one class as normal and the other nine as anomalies, for
each of the 10 classes; breast_cancer with benign as normal and malignant as anomalies.
Per task and seed s: the normal rows are split 60/40 (seeded) into training and test
rows; anomalies are drawn (seeded) from the other rows so that they make up
--anomaly-fraction of the test set.  Every detector is fitted on the normal training
rows only, standardised with their mean and std (a column constant in training keeps
scale 1), and scores the test rows:

    cpadgn    cpadgn.CPADGNDetector (PyOD conventions): a generator S -> hidden -> D
              fitted by exact EM (cpadgn.fit.fit_em, at most --em-iter iterations,
              leaky ReLU 0.1, isotropic noise), score -log p(x) exact
    VAE       pyod.models.vae.VAE, PyOD's defaults (30 epochs, encoder 128-64-32,
              latent 2, dropout 0.2) with preprocessing off (the data are standardised)
    PCA, KNN, IForest   pyod.models.{pca,knn,iforest} with their defaults

Metrics: ROC-AUC and average precision (anomaly = positive) on the test rows, mean and
sd over tasks x seeds (digits: 10 classes x seeds).  "spread": the largest absolute
difference between two identical calls of decision_function on the test rows,
relative to the sd of the scores (0 = deterministic).  "cpadgn 20% missing": the same
fitted cpadgn model on the test rows with --missing of their entries hidden at random
(seeded MCAR, cpadgn.impute.mcar_mask), scored by the exact marginal likelihood of the
observed entries; the PyOD detectors reject NaN.  PyOD and scikit-learn are
benchmark-only dependencies (pip install 'cpadgn[bench]').  Single-threaded (torch,
BLAS) so that timings are comparable.
"""
from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

DETECTORS = ["cpadgn", "VAE", "PCA", "KNN", "IForest"]


def tasks(names, classes):
    """(task name, X (N, D), is_normal (N,) bool) for every task."""
    from sklearn import datasets
    out = []
    if "digits" in names:
        X, y = datasets.load_digits(return_X_y=True)
        out += [(f"digits/{c}", X.astype(np.float64), y == c) for c in classes]
    if "breast_cancer" in names:
        d = datasets.load_breast_cancer()
        out.append(("breast_cancer", d.data.astype(np.float64), d.target == 1))   # 1 = benign
    return out


def split(X, normal, seed, anomaly_fraction):
    """Standardised training rows (normal only), test rows and test labels (1 = anomaly)."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(np.flatnonzero(normal))
    n_train = int(round(0.6 * idx.size))
    train, test = idx[:n_train], idx[n_train:]
    n_anom = max(1, int(round(anomaly_fraction * test.size / (1 - anomaly_fraction))))
    anom = rng.choice(np.flatnonzero(~normal), n_anom, replace=False)
    mu, sd = X[train].mean(0), X[train].std(0)
    sd = np.where(sd > 0, sd, 1.0)
    f = lambda A: (A - mu) / sd
    return f(X[train]), f(np.vstack([X[test], X[anom]])), np.r_[np.zeros(test.size), np.ones(n_anom)]


def make_detectors(args, seed):
    from pyod.models.iforest import IForest
    from pyod.models.knn import KNN
    from pyod.models.pca import PCA
    from pyod.models.vae import VAE

    from cpadgn import CPADGNDetector
    return {
        "cpadgn": CPADGNDetector(latent_dim=args.latent_dim, hidden=args.hidden, max_iter=args.em_iter,
                                 random_state=seed),
        "VAE": VAE(preprocessing=False, verbose=0, random_state=seed, device="cpu"),
        "PCA": PCA(random_state=seed),
        "KNN": KNN(),
        "IForest": IForest(random_state=seed),
    }


def run_task(name, X, normal, seed, args):
    from sklearn.metrics import average_precision_score, roc_auc_score

    from cpadgn.impute import mcar_mask
    Xtr, Xte, label = split(X, normal, seed, args.anomaly_fraction)
    row = {"task": name, "seed": seed, "train_rows": len(Xtr), "test_rows": len(Xte),
           "anomalies": int(label.sum())}
    for key, det in make_detectors(args, seed).items():
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            det.fit(Xtr)
            s1 = det.decision_function(Xte)
            s2 = det.decision_function(Xte)
        row[f"{key}_seconds"] = time.perf_counter() - t0
        row[f"{key}_auc"] = roc_auc_score(label, s1)
        row[f"{key}_ap"] = average_precision_score(label, s1)
        row[f"{key}_spread"] = float(np.max(np.abs(s1 - s2)) / max(np.std(s1), 1e-300))
        row[f"{key}_spread_abs"] = float(np.max(np.abs(s1 - s2)))
        if key == "cpadgn":
            Xm = Xte.copy()
            Xm[mcar_mask(Xte, args.missing, seed)] = np.nan
            sm = det.decision_function(Xm)
            row["cpadgn_missing_auc"] = roc_auc_score(label, sm)
            row["cpadgn_missing_ap"] = average_precision_score(label, sm)
            res = det.fit_result_
            row["cpadgn_em_iterations"] = det.n_iter_
            row["cpadgn_regions"] = res.n_regions
            row["cpadgn_stop"] = res.stop_reason
    return row


def summarise(rows, args):
    cols = DETECTORS + ["cpadgn_missing"]
    digits = [r for r in rows if r["task"].startswith("digits/")]
    n_classes = len({r["task"] for r in digits})
    groups = {f"digits ({n_classes} classes)": digits,
              "breast_cancer": [r for r in rows if r["task"] == "breast_cancer"]}
    groups = {k: v for k, v in groups.items() if v}
    if len(groups) > 1:
        groups["all tasks"] = rows
    sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    summary = {}
    print()
    print(f"Mean +- sd over tasks x seeds ({args.seeds} seed(s)); cpadgn_missing: cpadgn with "
          f"{args.missing:.0%} of the test entries missing (the PyOD detectors reject NaN)")
    for metric in ("auc", "ap"):
        print(f"\n{'ROC-AUC' if metric == 'auc' else 'average precision'}")
        head = f"{'':<22}" + "".join(f"{c:>17}" for c in cols)
        print(head)
        print("-" * len(head))
        for g, rs in groups.items():
            cells = []
            for c in cols:
                v = [r[f"{c}_{metric}"] for r in rs]
                summary.setdefault(g, {})[f"{c}_{metric}"] = [float(np.mean(v)), sd(v)]
                cells.append(f"{np.mean(v):.4f} +- {sd(v):.3f}")
            print(f"{g:<22}" + "".join(f"{c:>17}" for c in cells))
    print("\nScore spread over two identical decision_function calls: max |s1 - s2| / sd(s1) "
          "(max over runs), and mean fit + 2 x score time per run")
    for c in DETECTORS:
        spread = max(r[f"{c}_spread"] for r in rows)
        spread_abs = max(r[f"{c}_spread_abs"] for r in rows)
        secs = float(np.mean([r[f"{c}_seconds"] for r in rows]))
        summary.setdefault("spread", {})[c] = spread
        summary.setdefault("spread_abs", {})[c] = spread_abs
        summary.setdefault("seconds", {})[c] = secs
        print(f"  {c:<8} spread {spread:.3g} (absolute {spread_abs:.3g}),  {secs:6.2f} s per run")
    its = [r["cpadgn_em_iterations"] for r in rows]
    print(f"  cpadgn EM: {np.mean(its):.1f} iterations on average (max {args.em_iter}), "
          f"{np.mean([r['cpadgn_regions'] for r in rows]):.0f} regions on average")
    return summary


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="digits,breast_cancer")
    ap.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9", help="digits classes used as normal")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--latent-dim", type=int, default=2)
    ap.add_argument("--hidden", default="16,16")
    ap.add_argument("--em-iter", type=int, default=40)
    ap.add_argument("--missing", type=float, default=0.2)
    ap.add_argument("--anomaly-fraction", type=float, default=0.1)
    ap.add_argument("--json", default=None, help="Also write every run and the summary to this JSON file.")
    args = ap.parse_args()
    args.hidden = tuple(int(h) for h in args.hidden.split(","))
    import torch
    torch.set_num_threads(1)

    t_start = time.perf_counter()
    rows = []
    for name, X, normal in tasks(args.datasets.split(","), [int(c) for c in args.classes.split(",")]):
        for seed in range(args.seeds):
            row = run_task(name, X, normal, seed, args)
            rows.append(row)
            print(f"{name:<14} seed {seed}: " + "  ".join(
                f"{c} {row[f'{c}_auc']:.3f}/{row[f'{c}_ap']:.3f}" for c in DETECTORS + ["cpadgn_missing"])
                + f"  (AUC/AP; cpadgn EM {row['cpadgn_em_iterations']} it, {row['cpadgn_regions']} regions, "
                f"{row['cpadgn_seconds']:.1f} s)", flush=True)
    summary = summarise(rows, args)
    print(f"\nconfig: S = {args.latent_dim}, hidden {args.hidden}, EM max {args.em_iter} iterations, "
          f"anomalies {args.anomaly_fraction:.0%} of each test set; total {time.perf_counter() - t_start:.0f} s")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": {k: v for k, v in vars(args).items()},
                                               "summary": summary, "runs": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
