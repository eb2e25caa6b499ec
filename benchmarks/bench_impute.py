"""Exact imputation (cpadgn) against mean, k-NN and iterative imputation under MCAR.

    python benchmarks/bench_impute.py [--datasets digits,breast_cancer] [--fractions 0.1,0.3,0.5]
                                      [--seeds 5] [--draws 100] [--em-iter 60] [--trainer em|vae] [--noise diag|iso]
                                      [--var-floor F] [--train-missing P] [--init MODEL]
                                      [--model-dir out/bench_impute] [--device cpu] [--json FILE]

Per data set (scikit-learn's bundled digits and breast_cancer): one 80/20 train/test
split (random_state 0), standardised with the training mean and std (a column constant
in training keeps scale 1).  One cpadgn model per data set is trained on the training
split, S = 2, hidden 32,32 (--latent-dim, --hidden), leaky ReLU 0.1, isotropic (default) or per-column
(--noise diag) noise: by exact EM
(``cpadgn.fit.fit_em``, at most --em-iter iterations) or, with --trainer vae or if EM
fails, by ``cpadgn.vae.train_vae`` (300 epochs); the model file is kept in --model-dir
and reused on the next run.  Then for every MCAR fraction and seed 0..seeds-1, that
fraction of the test entries is hidden (``cpadgn.impute.mcar_mask``) and imputed by

    mean        SimpleImputer (training column means)
    knn         KNNImputer(n_neighbors=5), training rows as donors
    iterative   IterativeImputer(max_iter=10, BayesianRidge), fitted on the training rows
    cpadgn      the exact conditional mean E[x_m | x_o]

RMSE over the hidden entries in standardised units (mean and std over seeds).  For
cpadgn also the coverage of its central 90% predictive intervals, from --draws exact
draws from p(x_m | x_o): "cov90" is the fraction of hidden true values whose
conditional CDF (Rao-Blackwellised over the latent draws, ``impute.conditional_cdf``)
lies in [0.05, 0.95]; the log also gives the coverage of the draws' own empirical 5-95%
quantiles, which under-covers by construction with K draws (about 0.88 at K = 100 for
a perfect model).  And wall time per 1,000 test rows for the conditional mean
(posterior + moments) and for mean + draws.  The variation over seeds is the mask only (one split,
one model).  scikit-learn is a benchmark-only dependency (pip install 'cpadgn[bench]').

--init MODEL starts EM from a given generator (``fit_em``'s init: its weights, prior and
noise) instead of PPCA, e.g. an autoencoder's decoder; --latent-dim and --hidden then only
name the model file.

--train-missing P hides a fraction P of the training entries too (MCAR, seed 12345)
before anything is fitted: cpadgn's EM then fits the incomplete rows exactly (missing
entries are latent), and the baselines are fitted on the same incomplete rows.
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np


def load(name):
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    X = {"digits": datasets.load_digits, "breast_cancer": datasets.load_breast_cancer}[name]().data
    Xtr, Xte = train_test_split(X.astype(np.float64), test_size=0.2, random_state=0)
    mu, sd = Xtr.mean(0), Xtr.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    return (Xtr - mu) / sd, (Xte - mu) / sd


def get_model(name, Xtr, args):
    """Train (or reload) the cpadgn model; returns (CPAModel, how it was trained)."""
    import cpadgn
    from cpadgn.fit import fit_em, save_fit
    suffix = "" if (args.latent_dim, args.hidden) == (2, "32,32") else f"_S{args.latent_dim}_{args.hidden.replace(',', '-')}"
    suffix += "" if args.var_floor is None else f"_floor{args.var_floor:g}"
    suffix += f"_trainmiss{args.train_missing:g}" if args.train_missing else ""
    suffix += f"_init-{Path(args.init).stem}" if args.init else ""
    path = Path(args.model_dir) / f"{name}_{args.trainer}_{args.noise}{suffix}.h5"
    if path.exists():
        model = cpadgn.load(path, device=args.device)
        a = model.extra.get("attrs", {})
        if a.get("method") == "em":
            hist = model.extra.get("groups", {}).get("training", {}).get("train_loglik", [0])
            how = f"cpadgn.fit.fit_em ({len(hist) - 1} iterations, {a.get('stop_reason')})"
        else:
            how = a.get("trained_by", args.trainer)
        return model, how + f", reloaded from {path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    how = None
    hidden = tuple(int(h) for h in args.hidden.split(","))
    if args.trainer == "em":
        try:
            var_floor = None if args.var_floor is None else args.var_floor * float(np.nanvar(Xtr, 0).mean())
            init = "ppca" if args.init is None else args.init
            res = fit_em(Xtr, None if args.init else args.latent_dim, hidden=hidden, slope=0.1, max_iter=args.em_iter,
                         seed=0, noise=args.noise, device=args.device, var_floor=var_floor, init=init,
                         callback=lambda row: print(f"  EM {name} iteration {row['iteration']}: "
                                                    f"train loglik {row['train_loglik']:.4f}, "
                                                    f"{row['n_regions']} regions", flush=True))
            save_fit(path, res)
            how = f"cpadgn.fit.fit_em ({len(res.history['train_loglik']) - 1} iterations, {res.stop_reason})"
        except Exception as e:  # fall back to the VAE, and say so
            print(f"  EM failed ({type(e).__name__}: {e}); training the VAE instead", flush=True)
    if how is None:
        from cpadgn.modelfile import save_model
        from cpadgn.vae import train_vae
        vae = train_vae(Xtr, latent_dim=args.latent_dim, hidden=hidden, slope=0.1, noise=args.noise, epochs=300, seed=0).model
        save_model(path, vae.generator(), noise_std=np.asarray(vae.noise_std(), dtype=np.float64),
                   attrs={"trained_by": "cpadgn.vae.train_vae (300 epochs)"})
        how = "cpadgn.vae.train_vae (300 epochs)"
    print(f"  {name}: model trained in {time.perf_counter() - t0:.0f} s by {how}", flush=True)
    model = cpadgn.load(path, device=args.device)
    return model, how


def baselines(Xtr, Xm, seed):
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer, KNNImputer, SimpleImputer
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["mean"] = SimpleImputer().fit(Xtr).transform(Xm)
        out["knn"] = KNNImputer(n_neighbors=5).fit(Xtr).transform(Xm)
        out["iterative"] = IterativeImputer(max_iter=10, random_state=seed).fit(Xtr).transform(Xm)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", default="digits,breast_cancer")
    ap.add_argument("--fractions", default="0.1,0.3,0.5")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--em-iter", type=int, default=60)
    ap.add_argument("--latent-dim", type=int, default=2, help="S of the cpadgn model")
    ap.add_argument("--hidden", default="32,32", help="hidden widths of the cpadgn model")
    ap.add_argument("--trainer", choices=["em", "vae"], default="em")
    ap.add_argument("--noise", choices=["iso", "diag"], default="iso")
    ap.add_argument("--var-floor", type=float, default=None,
                    help="EM noise-variance floor as a fraction of the mean training variance "
                         "(default: fit_em's, 1e-6)")
    ap.add_argument("--train-missing", type=float, default=0.0,
                    help="Hide this fraction of the training entries (MCAR) before fitting every method.")
    ap.add_argument("--init", default=None,
                    help="Start EM from this generator (any file cpadgn.load reads; its latent dimension, "
                         "widths and prior replace --latent-dim and --hidden) instead of PPCA.")
    ap.add_argument("--model-dir", default="out/bench_impute")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="Also write all results to this JSON file.")
    args = ap.parse_args()
    from cpadgn.impute import conditional_cdf, imputation_errors, impute, mcar_mask

    fractions = [float(f) for f in args.fractions.split(",")]
    results, models = [], {}
    for name in args.datasets.split(","):
        Xtr, Xte = load(name)
        if args.train_missing:
            Xtr = np.where(mcar_mask(Xtr, args.train_missing, 12345), np.nan, Xtr)
        model, how = get_model(name, Xtr, args)
        part, tab = model.partition(), model._region_table()
        models[name] = {"trained_by": how, "regions": part.n_regions,
                        "noise_std": float(np.mean(model.noise_std)),
                        "test_loglik": float(model.log_prob(Xte).mean()),
                        "train_rows": len(Xtr), "test_rows": len(Xte), "columns": Xte.shape[1],
                        "train_missing": args.train_missing}
        print(f"{name}: {len(Xtr)} train / {len(Xte)} test rows, D = {Xte.shape[1]}; model: {how}; "
              f"{part.n_regions} regions; noise std {models[name]['noise_std']:.4g}; "
              f"exact test log-lik {models[name]['test_loglik']:.3f} per row", flush=True)
        for frac in fractions:
            for seed in range(args.seeds):
                hidden = mcar_mask(Xte, frac, seed)
                Xm = Xte.copy()
                Xm[hidden] = np.nan
                row = {"dataset": name, "fraction": frac, "seed": seed}
                t0 = time.perf_counter()
                base = baselines(Xtr, Xm, seed)
                row["baseline_seconds"] = time.perf_counter() - t0
                for k, v in base.items():
                    row[f"rmse_{k}"] = imputation_errors(Xte, v, hidden)["rmse"]
                t0 = time.perf_counter()
                res = impute(model.net, part, model.noise_std, Xm, draws=args.draws, seed=seed, tab=tab,
                             device=model.device)
                row["seconds_per_1000_rows_mean_and_draws"] = (time.perf_counter() - t0) / len(Xm) * 1000
                if seed == 0:
                    t0 = time.perf_counter()
                    impute(model.net, part, model.noise_std, Xm, tab=tab, device=model.device)
                    row["seconds_per_1000_rows_mean"] = (time.perf_counter() - t0) / len(Xm) * 1000
                cdf = conditional_cdf(model.net, model.noise_std, res.z_draws, Xte)
                ev = imputation_errors(Xte, res.mean, hidden, res.draws, level=0.9, cdf=cdf)
                row["rmse_cpadgn"], row["coverage90_cpadgn"] = ev["rmse"], ev["coverage_cdf"]
                row["coverage90_cpadgn_empirical_quantiles"] = ev["coverage"]
                results.append(row)
                print(f"  {name} {frac:.0%} seed {seed}: " + ", ".join(
                    f"{k[5:]} {row[k]:.4f}" for k in row if k.startswith("rmse_")) +
                    f"; cpadgn 90% coverage {row['coverage90_cpadgn']:.3f} (empirical quantiles of the "
                    f"draws: {row['coverage90_cpadgn_empirical_quantiles']:.3f}); "
                    f"{row['seconds_per_1000_rows_mean_and_draws']:.1f} s/1000 rows (mean + "
                    f"{args.draws} draws)", flush=True)
    print_table(results, models, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"models": models, "runs": results, "draws": args.draws},
                                              indent=2))


def print_table(results, models, args):
    methods = ["mean", "knn", "iterative", "cpadgn"]
    print()
    print(f"RMSE on the hidden test entries (standardised units), mean +- sd over {args.seeds} MCAR seeds; "
          f"cpadgn coverage of 90% intervals from {args.draws} exact draws; time per 1,000 rows")
    head = f"{'dataset':<14}{'MCAR':>6}" + "".join(f"{m:>18}" for m in methods) + \
        f"{'cov90':>14}{'s/1k mean':>11}{'s/1k +draws':>13}  best"
    print(head)
    print("-" * len(head))
    for name in dict.fromkeys(r["dataset"] for r in results):
        for frac in dict.fromkeys(r["fraction"] for r in results):
            rs = [r for r in results if r["dataset"] == name and r["fraction"] == frac]
            if not rs:
                continue
            cells, means = [], {}
            for m in methods:
                v = np.array([r[f"rmse_{m}"] for r in rs])
                means[m] = v.mean()
                cells.append(f"{v.mean():>10.4f} +- {v.std(ddof=1) if len(v) > 1 else 0:.4f}")
            cov = np.array([r["coverage90_cpadgn"] for r in rs])
            tm = [r["seconds_per_1000_rows_mean"] for r in rs if "seconds_per_1000_rows_mean" in r]
            td = np.mean([r["seconds_per_1000_rows_mean_and_draws"] for r in rs])
            print(f"{name:<14}{frac:>6.0%}" + "".join(f"{c:>18}" for c in cells) +
                  f"{cov.mean():>8.3f}+-{cov.std(ddof=1) if len(cov) > 1 else 0:.3f}"
                  f"{np.mean(tm) if tm else float('nan'):>11.1f}{td:>13.1f}  {min(means, key=means.get)}")
    for name, info in models.items():
        print(f"{name}: {info['trained_by']}; {info['regions']} regions; noise std {info['noise_std']:.4g}; "
              f"exact test log-likelihood {info['test_loglik']:.3f} per row")


if __name__ == "__main__":
    main()
