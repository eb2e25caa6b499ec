"""A Gaussian VAE whose decoder is a piecewise-affine generator (the EM baseline).

Encoder q(z|x) = N(m(x), diag(exp(logv(x)))) by an MLP; decoder x | z ~ N(g(z),
diag(sigma^2)) with g an MLP of Linear layers and leaky-ReLU-type activations and
sigma learned (isotropic or per dimension); prior N(0, I).  Trained by Adam on the
ELBO.  The decoder is returned as a ``PiecewiseAffineNet`` so the exact likelihood
engine can score it, and the encoder weights are kept for the exact ELBO gap.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .network import PiecewiseAffineNet

LOG_2PI = float(np.log(2 * np.pi))


def _mlp(sizes, slope):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(slope) if slope >= 0 else _Abs())
    return nn.Sequential(*layers)


class _Abs(nn.Module):
    def forward(self, x):
        return torch.abs(x)


class GaussianVAE(nn.Module):
    """Encoder D -> hidden[::-1] -> 2S, decoder S -> hidden -> D, learned log noise std."""

    def __init__(self, data_dim, latent_dim, hidden, slope=0.1, noise="diag"):
        super().__init__()
        self.latent_dim, self.slope = latent_dim, slope
        self.encoder = _mlp([data_dim, *hidden[::-1], 2 * latent_dim], max(slope, 0.0) if slope >= 0 else 0.1)
        self.decoder = _mlp([latent_dim, *hidden, data_dim], slope)
        self.log_noise = nn.Parameter(torch.zeros(data_dim if noise == "diag" else 1))

    def encode(self, x):
        h = self.encoder(x)
        return h[:, :self.latent_dim], h[:, self.latent_dim:].clamp(-20, 10)

    def elbo(self, x, n_samples=1):
        """Per-row ELBO (N,) with the reparameterised estimate of E_q[log p(x|z)]."""
        m, logv = self.encode(x)
        kl = 0.5 * (m * m + logv.exp() - 1 - logv).sum(1)
        eps = torch.randn((n_samples,) + m.shape, dtype=x.dtype, device=x.device)
        z = m + (0.5 * logv).exp() * eps
        rec = self.decoder(z.reshape(-1, m.shape[1])).reshape(n_samples, *x.shape)
        var = torch.exp(2 * self.log_noise).expand(x.shape[1])
        ll = -0.5 * (((x - rec) ** 2) / var + torch.log(var) + LOG_2PI).sum(-1)
        return ll.mean(0) - kl

    def generator(self) -> PiecewiseAffineNet:
        linears = [m for m in self.decoder if isinstance(m, nn.Linear)]
        return PiecewiseAffineNet.from_arrays(
            [l.weight.detach().double().cpu().numpy() for l in linears],
            [l.bias.detach().double().cpu().numpy() for l in linears],
            [self.slope] * (len(linears) - 1))

    def noise_std(self) -> np.ndarray:
        s = torch.exp(self.log_noise).detach().double().cpu().numpy()
        return s[0] if s.size == 1 else s

    def encoder_arrays(self) -> dict:
        linears = [m for m in self.encoder if isinstance(m, nn.Linear)]
        out = {}
        for i, l in enumerate(linears):
            out[f"weight_{i}"] = l.weight.detach().double().cpu().numpy()
            out[f"bias_{i}"] = l.bias.detach().double().cpu().numpy()
        return out


@dataclass
class VAEResult:
    model: GaussianVAE
    history: list = field(default_factory=list)   # dicts: epoch, train_elbo, seconds


def train_vae(X, *, latent_dim, hidden, slope=0.1, noise="diag", epochs=200, lr=1e-3,
              batch_size=128, seed=0, callback=None) -> VAEResult:
    """Fit a GaussianVAE to X (N, D) by Adam on the mean ELBO; deterministic given seed.

    callback(epoch, model, history) is called after every epoch (for progress and the
    exact validation likelihood); returning True stops training.
    """
    import time
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64))
    vae = GaussianVAE(Xt.shape[1], latent_dim, list(hidden), slope, noise).double()
    with torch.no_grad():  # start the noise at the data scale
        vae.log_noise.fill_(float(np.log(Xt.std().item() + 1e-12)))
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    history = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = rng.permutation(Xt.shape[0])
        total = 0.0
        for start in range(0, len(perm), batch_size):
            xb = Xt[perm[start:start + batch_size]]
            loss = -vae.elbo(xb).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total -= loss.item() * xb.shape[0]
        history.append({"epoch": epoch + 1, "train_elbo": total / Xt.shape[0],
                        "seconds": time.perf_counter() - t0})
        if callback is not None and callback(epoch + 1, vae, history):
            break
    return VAEResult(vae, history)
