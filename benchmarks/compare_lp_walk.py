"""Differential check of the two partition enumerations at S >= 2 (S = 1: intervals
against the walk): for random decoders, the regions each lists that are not
near-degenerate and whose interior point the other locates nowhere, the prior-mass sums (1 at S <= 3, exact),
and log p of six rows (three near the model, two from z ~ 6 N(0, I), one outlier) with
either partition.

Decoders: --kind fuzz (the generator of benchmarks/fuzz_loader.py), torch (Linear with
ReLU / LeakyReLU / Hardtanh / ReLU6, max pooling, zero biases, duplicated units) or
mlp (PiecewiseAffineNet with ReLU / leaky / abs units, zero biases, duplicated or
coincident units, unused latent coordinates, rounded weights).  One line per finding.

    python benchmarks/compare_lp_walk.py [--kind torch] [--seed 0] [--count 100] [--only N ...]
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import cpadgn  # noqa: E402
from cpadgn.model import CPAModel  # noqa: E402
from cpadgn.network import PiecewiseAffineNet  # noqa: E402
from cpadgn.partition import compute_partition  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(1)


def random_mlp(rng) -> PiecewiseAffineNet:
    S = int(rng.choice([1, 2, 2, 2, 3]))
    Ws, bs, slopes, prev = [], [], [], S
    for n in [int(rng.integers(2, 7)) for _ in range(int(rng.integers(1, 4)))]:
        W, b = rng.normal(size=(n, prev)), rng.normal(size=n) * (rng.random() > 0.3)
        if rng.random() < 0.3 and n > 1:                    # a duplicated or opposite unit
            W[-1] = W[0] * rng.choice([1, 2, -1])
            b[-1] = b[0] * W[-1, 0] / W[0, 0]
        if rng.random() < 0.2 and prev > 1:
            W[:, -1] = 0                                     # an input no unit reads
        if rng.random() < 0.2:
            W, b = np.round(W), np.round(b)
        Ws.append(W)
        bs.append(b)
        slopes.append(rng.choice([0.0, 0.0, 0.1, -1.0, 0.5, -0.3], size=n))
        prev = n
    Ws.append(rng.normal(size=(int(rng.integers(2, 5)), prev)))
    bs.append(rng.normal(size=Ws[-1].shape[0]))
    return PiecewiseAffineNet.from_arrays(Ws, bs, slopes)


def random_torch_mlp(rng) -> nn.Module:
    torch.manual_seed(int(rng.integers(1 << 30)))
    S = int(rng.choice([1, 2, 2, 3]))
    acts = [lambda: nn.ReLU(), lambda: nn.LeakyReLU(0.2), lambda: nn.Hardtanh(-0.5, 0.5), lambda: nn.ReLU6(),
            lambda: nn.Hardtanh(), lambda: nn.LeakyReLU(-0.5)]
    layers, prev = [], S
    for _ in range(int(rng.integers(1, 3))):
        n = int(rng.integers(2, 6))
        lin = nn.Linear(prev, n, bias=bool(rng.random() < 0.7))
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(rng.normal(size=(n, prev))))
            if lin.bias is not None:
                lin.bias.copy_(torch.from_numpy(rng.normal(size=n) * 2))
            if rng.random() < 0.3 and n > 1:
                lin.weight[-1] = lin.weight[0]
                if lin.bias is not None:
                    lin.bias[-1] = lin.bias[0]
        layers += [lin, acts[int(rng.integers(len(acts)))]()]
        if rng.random() < 0.3 and n >= 2:
            stride = int(rng.integers(1, 3))
            layers.append(nn.MaxPool1d(2, stride))
            n = (n - 2) // stride + 1
        prev = n
    layers.append(nn.Linear(prev, int(rng.integers(2, 5))))
    return nn.Sequential(*layers).double().eval()


def fuzz_decoder(rng) -> nn.Module:
    import fuzz_loader as F
    torch.manual_seed(int(rng.integers(1 << 31)))
    S = 3 if rng.random() < 0.15 else 2
    module = F.GraphDecoder(S, rng, []) if rng.random() < 0.25 else F.random_sequential(rng, S, [])
    return F._rand_init(module, rng).double().eval()


def compare(net, rng, max_regions=400):
    """Findings (a string) or "ok"; None where the partition is too large for the walk."""
    try:
        sub = compute_partition(net, max_regions=max_regions)
    except cpadgn.CpadgnError:
        return None
    walk = compute_partition(net, method="lp-walk", max_regions=5 * max_regions)
    out = []
    # a region is in the other partition where its interior point is (S = 1: the intervals
    # store the forward pass's pattern, the walk the subdivision's: they differ on ties)
    missing = [int((b.locate(net, a.interior[~a.degenerate]) < 0).sum()) for a, b in ((sub, walk), (walk, sub))]
    if any(missing):
        out.append(f"regions {sub.n_regions} vs {walk.n_regions}: not near-degenerate and missing from the "
                   f"other {missing[0]} (default's) and {missing[1]} (walk's)")
    sums = [np.exp(p.log_prior_mass).sum() - 1 for p in (sub, walk)]
    if max(map(abs, sums)) > 1e-9:
        out.append(f"mass sums - 1: {sums[0]:+.3g} (default) {sums[1]:+.3g} (walk)")
    S = net.latent_dim
    z = np.concatenate([rng.normal(size=(3, S)), 6 * rng.normal(size=(2, S))])
    g = net.forward(rng.normal(size=(500, S)))
    scale = float(np.sqrt(g.var(0).mean())) + 1e-3
    X = net.forward(z) + 0.3 * scale * rng.normal(size=(len(z), net.output_dim))
    X = np.vstack([X, g.mean(0) + 5 * scale * rng.choice([-1, 1], net.output_dim)])
    lps = []
    for part in (sub, walk):
        model = CPAModel(net, noise_std=0.3 * scale, device="cpu")
        model._partition = part
        lps.append(model.log_prob(X))
    d = np.abs(lps[0] - lps[1])
    if d.max() > 1e-8 * max(1.0, np.abs(lps[0]).max()):
        out.append(f"log p differs by up to {d.max():.3g} (rows {np.flatnonzero(d > 1e-8).tolist()})")
    return "; ".join(out) or "ok"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["fuzz", "torch", "mlp"], default="torch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--only", type=int, nargs="*")
    args = ap.parse_args(argv)
    counts = {"ok": 0, "findings": 0, "skipped": 0}
    for i in args.only or range(args.count):
        rng = np.random.default_rng([args.seed, i])
        try:
            net = random_mlp(rng) if args.kind == "mlp" else \
                cpadgn.load(random_torch_mlp(rng) if args.kind == "torch" else fuzz_decoder(rng), noise_std=1.0).net
        except Exception:                 # a draw the loader refuses or torch cannot build
            counts["skipped"] += 1
            continue
        res = None if net.n_units > 60 else compare(net, rng)
        if res is None:
            counts["skipped"] += 1
        elif res == "ok":
            counts["ok"] += 1
        else:
            counts["findings"] += 1
            print(f"[{args.kind} {args.seed} {i}] S={net.latent_dim} K={net.n_units}: {res}", flush=True)
    print(f"{args.kind} seed {args.seed}: {counts}")
    return 1 if counts["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
