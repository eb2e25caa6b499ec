"""A starting generator for EM on digits: a deterministic autoencoder's decoder.

    python benchmarks/autoencoder_start.py --latent-dim 3 --hidden 32,32 -o out/ae_S3_32-32.h5
    python benchmarks/bench_impute.py --datasets digits --fractions 0.3 --latent-dim 3 --hidden 32,32 \\
        --noise diag --var-floor 0.01 --em-iter 1 --init out/ae_S3_32-32.h5

Same split and standardisation as bench_impute.py (its ``load``).  Encoder 64-128-64-S,
decoder S-hidden-64, leaky ReLU 0.1, full-batch Adam (lr 3e-3) on the squared
reconstruction error, torch seed 0, one thread.  The cpadgn model file holds the decoder,
the prior N(mean, cov) of the training codes (``fit_em`` folds it into the first layer)
and per-column noise std = the training residuals' std, floored at 0.1 (the same floor as
bench_impute's --var-floor 0.01 on standardised columns).  EM from PPCA reaches a 16-16
decoder's capacity after ~30 iterations; at 32-32 and S = 3 each iteration costs minutes,
so this start saves most of them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--latent-dim", type=int, default=3)
    ap.add_argument("--hidden", default="32,32")
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    import torch
    from cpadgn.modelfile import save_model
    from cpadgn.network import PiecewiseAffineNet
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_impute import load

    torch.set_num_threads(1)
    Xtr, _ = load("digits")
    X = torch.tensor(Xtr, dtype=torch.float32)
    S, hidden = args.latent_dim, [int(h) for h in args.hidden.split(",")]
    torch.manual_seed(0)

    def mlp(widths):
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.LeakyReLU(0.1)]
        return torch.nn.Sequential(*layers[:-1])

    enc, dec = mlp([X.shape[1], 128, 64, S]), mlp([S, *hidden, X.shape[1]])
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], 3e-3)
    for _ in range(args.steps):
        opt.zero_grad()
        loss = ((dec(enc(X)) - X) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        codes = enc(X).double().numpy()
        residual = (dec(enc(X)) - X).double().numpy()
    linears = [m for m in dec if isinstance(m, torch.nn.Linear)]
    net = PiecewiseAffineNet.from_arrays([m.weight.detach().double().numpy() for m in linears],
                                         [m.bias.detach().double().numpy() for m in linears],
                                         [0.1] * len(hidden))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_model(args.out, net, prior_mean=codes.mean(0), prior_cov=np.cov(codes.T),
               noise_std=np.maximum(residual.std(0), 0.1),
               attrs={"trained_by": f"benchmarks/autoencoder_start.py: autoencoder S = {S}, hidden {args.hidden}, "
                                    f"{args.steps} Adam steps, train RMSE {loss.item() ** 0.5:.3f}"})
    print(f"{args.out}: decoder S = {S}, hidden {args.hidden}; training reconstruction RMSE {loss.item() ** 0.5:.4f}")


if __name__ == "__main__":
    main()
