"""Capacity probe for imputation on digits (30% MCAR, 5 seeds, bench_impute.py's split and
masks): a deterministic autoencoder (encoder 64-128-64-S, decoder S-h-h-64, leaky ReLU
0.1, 4,000 full-batch Adam steps) per (S, h); each test row is then imputed by the
decoder at its best latent point for the observed pixels (start: the best training code,
then 400 Adam steps).  A point estimate, not cpadgn's conditional mean: it shows what a
decoder of that size can reach, without the exact integrals' cost.

    python benchmarks/impute_capacity_probe.py
"""
import sys
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).parent))
from bench_impute import load, baselines
from cpadgn.impute import mcar_mask
torch.set_num_threads(1)
Xtr, Xte = load("digits")
Xt = torch.tensor(Xtr, dtype=torch.float32)
masks = [mcar_mask(Xte, 0.3, s) for s in range(5)]
knn = []
for s, h in enumerate(masks):
    Xm = Xte.copy(); Xm[h] = np.nan
    knn.append(np.sqrt(((baselines(Xtr, Xm, s)["knn"] - Xte)[h] ** 2).mean()))
print("knn", np.round(knn, 3), np.mean(knn).round(4))
for S, hh in [(2, 32), (3, 16), (3, 32), (3, 64), (4, 32), (4, 64)]:
    torch.manual_seed(0)
    act = lambda: torch.nn.LeakyReLU(0.1)
    enc = torch.nn.Sequential(torch.nn.Linear(64, 128), act(), torch.nn.Linear(128, 64), act(), torch.nn.Linear(64, S))
    dec = torch.nn.Sequential(torch.nn.Linear(S, hh), act(), torch.nn.Linear(hh, hh), act(), torch.nn.Linear(hh, 64))
    opt = torch.optim.Adam(list(enc.parameters()) + list(dec.parameters()), 3e-3)
    for it in range(4000):
        opt.zero_grad(); loss = ((dec(enc(Xt)) - Xt) ** 2).mean(); loss.backward(); opt.step()
    for p in dec.parameters(): p.requires_grad_(False)
    with torch.no_grad(): codes = enc(Xt); recon = dec(codes)
    out = []
    for s, h in enumerate(masks):
        obs = torch.tensor(~h); X = torch.tensor(Xte, dtype=torch.float32)
        err = (((recon[None] - X[:, None]) ** 2) * obs[:, None]).sum(-1)   # (360, 1437)
        z = codes[err.argmin(1)].clone().requires_grad_(True)
        o2 = torch.optim.Adam([z], 1e-2)
        for it in range(400):
            o2.zero_grad(); l = (((dec(z) - X) ** 2) * obs).sum(); l.backward(); o2.step()
        with torch.no_grad():
            out.append(((dec(z) - X)[~obs]).pow(2).mean().sqrt().item())
    print(f"S={S} h={hh}: train rmse {loss.item()**0.5:.3f}; imputation rmse by best latent {np.round(out,3)} mean {np.mean(out):.4f}", flush=True)
