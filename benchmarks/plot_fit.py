"""Learning curves of the EM-versus-VAE experiment (needs matplotlib: pip install 'cpadgn[plot]').

    python benchmarks/plot_fit.py RUNS.json [RUNS.json ...] -o fit_curves.png

RUNS.json are the files written by ``bench_fit.py --json``.  One panel per dataset:
EM's exact mean log-likelihood per row on the training and validation rows after each
iteration (one line per seed), and the VAE's exact test log-likelihood at the end of its
equal-time and longer runs (best learning rate, mean over seeds) as horizontal lines.
"""
import argparse
import json

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+")
    ap.add_argument("-o", "--output", default="fit_curves.png")
    args = ap.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("matplotlib is needed for the plot: pip install 'cpadgn[plot]'")
    runs = {}
    for path in args.runs:
        with open(path) as f:
            runs.update(json.load(f))
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 3.6), squeeze=False)
    for ax, (name, rs) in zip(axes[0], runs.items()):
        for i, r in enumerate(rs):
            em = r["em"]
            ax.plot(em["train_history"], color="C0", lw=1, alpha=0.7, label="EM train" if i == 0 else None)
            ax.plot(em["val_history"], color="C1", lw=1, alpha=0.7, label="EM validation" if i == 0 else None)
        ax.axhline(np.mean([r["em"]["test"] for r in rs]), color="C1", ls=":", label="EM test (mean)")
        lo = min(min(r["em"]["val_history"][1:] or r["em"]["val_history"]) for r in rs)
        hi = max(max(r["em"]["train_history"]) for r in rs)
        lo, hi = lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo)
        vae = [("vae_best", "--", "VAE test, same time"), ("vae_long", "-.", "VAE test, longer")]
        for k, (key, ls, label) in enumerate(vae):
            if not rs[0].get(key):
                continue
            v = np.mean([r[key]["test"] for r in rs])
            if v >= lo:
                ax.axhline(v, color="C3", ls=ls, label=label)
            else:                      # far below the EM curves: say so instead of squashing them
                ax.text(0.98, 0.04 + 0.07 * k, f"{label}: {v:.1f} (off scale)", transform=ax.transAxes,
                        ha="right", fontsize=7, color="C3")
        ax.set_ylim(lo, hi)
        ax.set_title(name)
        ax.set_xlabel("EM iteration")
        ax.set_ylabel("exact log-likelihood per row (nats)")
        ax.legend(fontsize=7, loc="center right")

    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
