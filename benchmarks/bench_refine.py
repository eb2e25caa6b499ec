"""A decoder trained elsewhere, refined by EM: exact held-out log-likelihood before and after.

    python benchmarks/bench_refine.py [--seeds 5] [--epochs 300] [--em-iter 2] [--json out.json]

Per seed:
  1. A Gaussian VAE in plain PyTorch (no cpadgn code): encoder 64 -> 64 -> 64 -> (mu, log var)
     in R^2, decoder 2 -> 64 -> 64 -> 64 with ReLU (S = 2, hidden 64-64), a learned
     isotropic noise std, Adam (lr 1e-3, batch 128) on the ELBO for ``--epochs`` epochs,
     float32, one thread, seeded.
  2. Its decoder saved with torch.export (.pt2) and read back by ``cpadgn.load``: the
     exact test log-likelihood with the VAE's own noise std ("VAE").
  3. ``cpadgn.fit.fit_em(X_train, None, init=model, max_iter=--em-iter)`` (the same as
     ``cpadgn fit digits_train.csv --init decoder.pt2 --val-fraction 0``): EM from the
     decoder's weights and the VAE's noise; the exact test log-likelihood after it.

Data: sample_data/digits_train.csv and digits_test.csv (scikit-learn's 8x8 digits,
pixels / 16, the seeded 1,497 / 300 split of sample_data/make_sample_data.py).  All
log-likelihoods are exact (``CPAModel.log_prob``, certified bound <= 1e-10 nats per row).
Prints one row per seed and the mean +- sd over seeds.
"""
import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
S, HIDDEN = 2, 64


class GaussianVAE(nn.Module):
    def __init__(self, D):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(D, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                                     nn.Linear(HIDDEN, 2 * S))
        self.decoder = nn.Sequential(nn.Linear(S, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                                     nn.Linear(HIDDEN, D))
        self.log_sigma = nn.Parameter(torch.zeros(()))

    def neg_elbo(self, x):
        """Mean negative ELBO per row (one reparameterised sample)."""
        mu, log_var = self.encoder(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * log_var).exp()
        r = (x - self.decoder(z)) / self.log_sigma.exp()
        D = x.shape[1]
        nll = 0.5 * (r ** 2).sum(1) + D * self.log_sigma + 0.5 * D * np.log(2 * np.pi)
        kl = 0.5 * (mu ** 2 + log_var.exp() - 1 - log_var).sum(1)
        return (nll + kl).mean()


def train_vae(X, seed, epochs, lr=1e-3, batch=128):
    torch.manual_seed(seed)
    vae = GaussianVAE(X.shape[1])
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    data = torch.as_tensor(X, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(data), generator=gen).split(batch):
            opt.zero_grad()
            loss = vae.neg_elbo(data[idx])
            loss.backward()
            opt.step()
    return vae.eval()


def run_seed(seed, X_train, X_test, epochs, em_iter, workdir):
    import cpadgn
    from cpadgn.fit import fit_em
    t0 = time.perf_counter()
    vae = train_vae(X_train, seed, epochs)
    t_vae = time.perf_counter() - t0
    path = Path(workdir) / f"decoder_{seed}.pt2"
    torch.export.save(torch.export.export(vae.decoder, (torch.zeros(2, S),)), path)
    sigma = float(vae.log_sigma.detach().exp())
    model = cpadgn.load(path, noise_std=sigma, cache=False, device="cpu")
    before = float(model.log_prob(X_test).mean())
    t0 = time.perf_counter()
    res = fit_em(X_train, None, max_iter=em_iter, init=model, tol=0.0, device="cpu")
    t_em = time.perf_counter() - t0
    refined = cpadgn.CPAModel(res.net, noise_std=res.noise_std, device="cpu")
    after = float(refined.log_prob(X_test).mean())
    h = res.history
    return {"seed": seed, "vae_seconds": t_vae, "vae_sigma": sigma, "test_before": before, "test_after": after,
            "train_before": float(h["train_loglik"][0]), "train_after": float(h["train_loglik"][-1]),
            "em_sigma": float(h["noise_std"][-1]), "em_iterations": int(h["iteration"][-1]),
            "em_seconds": t_em, "regions_before": int(h["n_regions"][0]), "regions_after": int(h["n_regions"][-1]),
            "train_monotone": bool(np.all(np.diff(h["train_loglik"]) >= 0))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--em-iter", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the per-seed results here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    read = lambda name: np.loadtxt(ROOT / "sample_data" / name, delimiter=",", skiprows=1)
    X_train, X_test = read("digits_train.csv"), read("digits_test.csv")
    rows = []
    hdr = (f"{'seed':>4} {'VAE':>8} {'EM':>8} {'gain':>7} {'sigma VAE/EM':>14} "
           f"{'regions':>13} {'VAE s':>6} {'EM s':>6}")
    print(f"digits, S = {S}, decoder {HIDDEN}-{HIDDEN} ReLU; exact mean test log-likelihood per row "
          f"(300 rows); VAE {args.epochs} epochs, then EM {args.em_iter} iterations\n{hdr}")
    with tempfile.TemporaryDirectory() as work:
        for seed in range(args.seeds):
            r = run_seed(seed, X_train, X_test, args.epochs, args.em_iter, work)
            rows.append(r)
            sig = f"{r['vae_sigma']:.3f}/{r['em_sigma']:.3f}"
            print(f"{seed:>4} {r['test_before']:8.2f} {r['test_after']:8.2f} "
                  f"{r['test_after'] - r['test_before']:7.2f} {sig:>14} "
                  f"{r['regions_before']:>6}->{r['regions_after']:<6} {r['vae_seconds']:6.1f} "
                  f"{r['em_seconds']:6.1f}", flush=True)
    col = lambda k: np.array([r[k] for r in rows])
    ms = lambda k: f"{col(k).mean():.2f} +- {col(k).std(ddof=1) if len(rows) > 1 else 0:.2f}"
    print(f"mean +- sd: VAE {ms('test_before')}, after EM {ms('test_after')}, train "
          f"{ms('train_before')} -> {ms('train_after')}; EM better on {int((col('test_after') > col('test_before')).sum())} "
          f"of {len(rows)} seeds; training log-likelihood monotone in every run: "
          f"{bool(col('train_monotone').all())}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
