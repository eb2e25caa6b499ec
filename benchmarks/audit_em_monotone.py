"""Audit: does EM's exact training log-likelihood ever go down?

For every accepted iterate of ``fit.fit_em`` (captured by wrapping ``em.e_step``), the
mean training log-likelihood is recomputed independently of the fit's own E-step: a
fresh partition and ``likelihood.posterior`` at rtol 1e-12 (for S = 1 also by
quadrature, ``tests/test_em._loglik_1d_sharp``).  Between consecutive iterates the
recomputed value may fall only by

    rounding: mean_n(rounding_error(t-1) + rounding_error(t))   (numerics.rounding_error_estimate)
            + the oracle's own certified pruning bounds (mean error_bound, t-1 and t)
    pruning:  fit_em compares certified lower bounds at its rtol (1e-6), so the true
              value may fall by up to the mean error_bound of its E-step at t-1.

Prints one line per setting: iterations, the largest decrease of the recomputed trace
relative to the rounding bound (and to rounding + pruning), and the largest gap between
the recorded history and the recomputation (it must lie within [-rounding, fit's
error_bound + rounding]), and the model file written by ``fit.save_fit`` loaded back
scores the training rows as the fit reported.  Deterministic.  Run from the repository root:

    PYTHONPATH=. python benchmarks/audit_em_monotone.py [--quick] [NAME_SUBSTRING]
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from cpadgn import em, fit                                    # noqa: E402
from cpadgn.data import read_data                             # noqa: E402
from cpadgn.likelihood import posterior                       # noqa: E402
from cpadgn.model import load                                 # noqa: E402
from cpadgn.partition import compute_partition                # noqa: E402


def trace_fit(X, S, hidden, **kw):
    """fit_em with every accepted iterate's (net, noise std, mean error bound) captured."""
    seen, iterates = [], []
    orig = em.e_step

    def spy(net, part, noise_std, rows, **k):
        out = orig(net, part, noise_std, rows, **k)
        if k.get("moments", True):                 # training rows (validation: moments=False)
            seen.append((net, np.array(noise_std, dtype=float), float(out.error_bound.mean())))
        return out

    def callback(row):
        iterates.append(seen[-1])

    em.e_step = spy
    try:
        res = fit.fit_em(X, S, hidden, callback=callback, **kw)
    finally:
        em.e_step = orig
    return res, iterates


def oracle(net, noise_std, X):
    """Mean exact log p over rows, its rounding estimate and pruning bound (means)."""
    part = compute_partition(net, prior_masses=False)
    post = posterior(net, part, noise_std, X, rtol=1e-12, moments=False)
    assert np.all(post.stderr == 0), "S <= 3 must be exact"
    return (float(post.log_likelihood.mean()), float(post.rounding_error.mean()),
            float(post.error_bound.mean()))


def audit(name, X, S, hidden, quad=False, **kw):
    res, its = trace_fit(X, S, hidden, **kw)
    o = np.array([oracle(net, std, X) for net, std, _ in its])
    ll, rnd, pb = o[:, 0], o[:, 1], o[:, 2]
    fit_bound = np.array([e for *_, e in its])
    drop = -np.diff(ll)
    round_bound = rnd[1:] + rnd[:-1] + pb[1:] + pb[:-1]
    ratio_round = float(np.max(drop / round_bound, initial=-np.inf))
    ratio_all = float(np.max(drop / (round_bound + fit_bound[:-1]), initial=-np.inf))
    hist = res.history["train_loglik"]
    gap = ll - hist                                     # hist is a lower bound
    gap_ok = np.all(gap >= -(rnd + pb) * 2) and np.all(gap <= fit_bound + 2 * (rnd + pb) + 1e-15)
    line = (f"{name:34s} it={len(ll) - 1:3d} stop={res.stop_reason:14s} LL {ll[0]:11.4f} -> {ll[-1]:11.4f}"
            f"  max drop {np.max(drop, initial=0):9.2e}  drop/round {ratio_round:9.2e}"
            f"  drop/(round+prune) {ratio_all:9.2e}  hist-gap ok={gap_ok}"
            f" fallbacks={int(res.history['fallback'][1:].sum())}")
    with tempfile.TemporaryDirectory() as tmp:            # the model file, loaded back
        fit.save_fit(Path(tmp) / "m.h5", res)
        model = load(Path(tmp) / "m.h5", cache=False, device="cpu")
        saved = float(model.log_prob(X).mean())
    slack = 2 * (rnd[-1] + pb[-1])
    gap_ok = gap_ok and -slack <= saved - res.train_loglik <= fit_bound[-1] + slack
    line += f"  saved-vs-fit {saved - res.train_loglik:.1e} (bound {fit_bound[-1] + slack:.1e})"
    if quad:
        from test_em import _loglik_1d_sharp
        net, std, _ = its[-1]
        q = np.mean([_loglik_1d_sharp(net, x, std) for x in X[:40]])
        e = oracle(net, std, X[:40])[0]
        line += f"  quad-diff {abs(q - e):.1e}"
    print(line, flush=True)
    return ratio_round, ratio_all, gap_ok


def main(quick=False, only=""):
    rng = np.random.default_rng(0)
    wave = read_data(ROOT / "sample_data" / "wave.csv")
    digits = read_data(ROOT / "sample_data" / "digits_train.csv")
    it = dict(max_iter=6 if quick else 15, tol=0.0)
    Z = rng.normal(size=(300, 2))
    blob2 = np.column_stack([Z, np.abs(Z[:, :1]) - Z[:, 1:] ** 2, np.maximum(Z[:, :1], 0)]) \
        + 0.1 * rng.normal(size=(300, 4))
    Z3 = rng.normal(size=(120, 3))
    blob3 = np.column_stack([Z3, np.maximum(Z3, 0).sum(1), np.abs(Z3[:, 0] - Z3[:, 1])]) \
        + 0.1 * rng.normal(size=(120, 5))
    miss = blob2.copy()
    miss[rng.random(miss.shape) < 0.25] = np.nan
    miss = miss[~np.isnan(miss).all(1)]
    wmiss = wave[:300].copy()
    wmiss[np.arange(0, 300, 4), rng.integers(0, 2, 75)] = np.nan
    cases = [
        ("wave S1 8-8 iso", wave, 1, (8, 8), dict(quad=True)),
        ("wave S1 16-16 diag", wave, 1, (16, 16), dict(noise="diag")),
        ("wave S1 8-8 relu", wave, 1, (8, 8), dict(slope=0.0)),
        ("wave S1 8-8 abs", wave, 1, (8, 8), dict(slope=-1.0)),
        ("wave S1 8-8 random init", wave, 1, (8, 8), dict(init="random", quad=True)),
        ("wave S1 8-8 init-noise 1", wave, 1, (8, 8), dict(init_noise=1.0)),
        ("wave S1 8-8 var floor 0.05", wave, 1, (8, 8), dict(var_floor=0.05)),
        ("wave S1 8-8 sweeps 2 no overrelax", wave, 1, (8, 8), dict(sweeps=2, overrelax=False)),
        ("wave 25% missing S1 8-8 diag", wmiss, 1, (8, 8), dict(noise="diag")),
        ("wave x1e3 + 1e6 S1 8-8", wave * 1e3 + 1e6, 1, (8, 8), {}),
        ("blob D4 S2 8-8 iso", blob2, 2, (8, 8), {}),
        ("blob D4 S2 16-16 diag", blob2, 2, (16, 16), dict(noise="diag")),
        ("blob D4 25% missing S2 8-8", miss, 2, (8, 8), {}),
        ("blob D4 const col S2 diag floor", np.column_stack([blob2, np.full(300, 3.0)]), 2, (8, 8),
         dict(noise="diag")),
        ("blob D4 dup rows S2 8-8", np.repeat(blob2[:20], 10, axis=0), 2, (8, 8), {}),
        ("blob D5 S3 8-8", blob3, 3, (8, 8), {}),
        ("blob D5 S3 8-8 diag", blob3, 3, (8, 8), dict(noise="diag")),
        ("digits[:150] S2 8-8", digits[:150], 2, (8, 8), {}),
        ("tiny N=2 D=4 S1 8-8 random init", blob2[:2], 1, (8, 8), dict(init="random")),
        ("tiny N=3 D=6 S1 8-8", np.column_stack([blob2[:3], blob2[3:6, :2]]), 1, (8, 8), {}),
        ("tiny N=4 D=6 S2 8-8 diag", np.column_stack([blob2[:4], blob2[4:8, :2]]), 2, (8, 8),
         dict(noise="diag")),
        ("tiny N=5 D=4 S3 8-8", blob2[:5], 3, (8, 8), dict(noise="diag")),
        ("linear S2 D4", blob2, 2, (), {}),
        ("wave x1e6 S1 8-8 diag", wave * 1e6, 1, (8, 8), dict(noise="diag")),
        ("blob D5 S3 16-16", blob3, 3, (16, 16), {}),
        ("digits[:150] S2 16-16 diag floor", digits[:150], 2, (16, 16), dict(noise="diag", var_floor=0.01)),
        ("tiny N=3 D=4 S1 4-4 var floor 0", np.array([[-0.73, -0.54, -0.32, 0.41], [1.04, -0.13, 1.37, -0.67],
                                                      [0.35, 0.9, 0.09, -0.74]]), 1, (4, 4),
         dict(var_floor=0.0, init="random", quad=True)),
        ("wave refine wave_generator.h5", wave, None, (), dict(init=str(ROOT / "sample_data" / "wave_generator.h5"))),
    ]
    if quick:
        cases = cases[:3] + cases[10:11] + cases[15:16]
    cases = [c for c in cases if only in c[0]]
    worst_round, worst_all, all_ok = -np.inf, -np.inf, True
    for name, X, S, hidden, kw in cases:
        kw = dict(kw)
        quad = kw.pop("quad", False)
        r1, r2, ok = audit(name, X, S, hidden, quad=quad, seed=0, **it, **kw)
        worst_round, worst_all, all_ok = max(worst_round, r1), max(worst_all, r2), all_ok and ok
    print(f"largest decrease / rounding bound: {worst_round:.3g}; / (rounding + fit's pruning bound): "
          f"{worst_all:.3g}; history and saved model within their bounds everywhere: {all_ok}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--quick"]
    main(quick="--quick" in sys.argv, only=args[0] if args else "")
