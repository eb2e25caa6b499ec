"""A Gaussian VAE whose decoder is a piecewise-affine generator (the EM baseline).

Encoder q(z|x) = N(m(x), diag(exp(logv(x)))) by an MLP; decoder x | z ~ N(g(z),
diag(sigma^2)) with g an MLP of Linear layers and leaky-ReLU-type activations and
sigma learned (isotropic or per dimension); prior N(0, I).  Trained by Adam on the
ELBO.  The decoder is returned as a ``PiecewiseAffineNet`` so the exact likelihood
engine can score it, and the encoder weights are kept for the exact ELBO gap.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .errors import CpadgnError
from .network import PiecewiseAffineNet
from .numerics import MIN_CHUNK_BUDGET

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


def _own_torch_rng(f):
    """f run on a fork of torch's global CPU random generator: its seeding of that
    generator leaves the caller's random stream as it was (a library must not reseed it);
    f must seed no other device's (``torch.manual_seed`` seeds every GPU's too)."""
    @functools.wraps(f)
    def wrapped(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return f(*args, **kwargs)
    return wrapped


@_own_torch_rng
def train_vae(X, *, latent_dim, hidden, slope=0.1, noise="diag", epochs=200, lr=1e-3,
              batch_size=128, seed=0, callback=None) -> VAEResult:
    """Fit a GaussianVAE to X (N, D) by Adam on the mean ELBO; deterministic given seed.

    callback(epoch, model, history) is called after every epoch (for progress and the
    exact validation likelihood); returning True stops training.
    """
    import time
    torch.random.default_generator.manual_seed(seed)     # the CPU's, where it trains: not the GPUs'
    rng = np.random.default_rng(seed)
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64))
    vae = GaussianVAE(Xt.shape[1], latent_dim, list(hidden), slope, noise).double()
    with torch.no_grad():  # start the noise below the data scale: a large start collapses q(z|x) onto the prior
        vae.log_noise.fill_(float(np.log(0.1 * Xt.std().item() + 1e-12)))
    opt = torch.optim.Adam(vae.parameters(), lr=lr)
    history = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = rng.permutation(Xt.shape[0])
        total = 0.0
        for start in range(0, len(perm), batch_size):
            xb = Xt[perm[start:start + batch_size]]
            loss = -vae.elbo(xb).mean()
            if not bool(torch.isfinite(loss)):
                raise CpadgnError(f"VAE training diverged in epoch {epoch + 1} (the ELBO is not finite); "
                                  f"lower --lr (now {lr:g})")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total -= loss.item() * xb.shape[0]
        if not _finite_state(vae):
            raise CpadgnError(f"VAE training diverged in epoch {epoch + 1} (its weights or noise std "
                              f"overflowed); lower --lr (now {lr:g})")
        history.append({"epoch": epoch + 1, "train_elbo": total / Xt.shape[0],
                        "seconds": time.perf_counter() - t0})
        if callback is not None and callback(epoch + 1, vae, history):
            break
    return VAEResult(vae, history)


def _finite_state(vae: GaussianVAE) -> bool:
    """Whether the weights are finite and the noise std within ``numerics.NOISE_RANGE``.
    An Adam step of size ~lr can overflow them after the ELBO it was taken from was
    finite (log sigma moved by 1e6 makes sigma inf), which the loss check cannot see."""
    from .numerics import NOISE_RANGE
    std = np.asarray(vae.noise_std(), dtype=np.float64)
    return (all(bool(torch.isfinite(p).all()) for p in vae.parameters())
            and bool(np.all((std >= NOISE_RANGE[0]) & (std <= NOISE_RANGE[1]))))


# ============================================================ the exact ELBO
@dataclass(frozen=True, eq=False)
class Encoder:
    """A VAE encoder q(z|x) = N(m(x), diag(exp(logv(x)))) as plain float64 arrays.

    h_0 = x,  u_l = W_l h_{l-1} + b_l,  h_l = leaky_relu(u_l; slope) (l < L),  u_L (2S):
    m = u_L[:S], logv = clip(u_L[S:], -20, 10)  (as ``GaussianVAE.encode``).
    weights[l]: (n_{l+1}, n_l), n_0 = D, n_L = 2S; biases[l]: (n_{l+1},).
    """

    weights: tuple
    biases: tuple
    slope: float

    @classmethod
    def from_arrays(cls, weights, biases, slope: float) -> "Encoder":
        as64 = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float64))
        weights, biases = tuple(map(as64, weights)), tuple(map(as64, biases))
        if not weights or len(weights) != len(biases):
            raise CpadgnError("the encoder needs one bias per weight matrix; pass as many biases as weights")
        for l, (W, b) in enumerate(zip(weights, biases)):
            if W.ndim != 2 or b.shape != (W.shape[0],) or (l and W.shape[1] != weights[l - 1].shape[0]):
                raise CpadgnError(f"the encoder's layer {l} has inconsistent shapes "
                                  f"(weight {W.shape}, bias {b.shape}); pass W (out, in) and b (out,) that "
                                  "chain")
        if weights[-1].shape[0] % 2:
            raise CpadgnError(f"the encoder must output 2S values (means, then log-variances), got "
                              f"{weights[-1].shape[0]}; give its last layer an even width")
        return cls(weights, biases, float(slope))

    @classmethod
    def from_group(cls, group: dict, slope: float) -> "Encoder":
        """From a model file's /encoder group {weight_i, bias_i}."""
        n = sum(1 for k in group if str(k).startswith("weight_"))
        try:
            return cls.from_arrays([group[f"weight_{i}"] for i in range(n)],
                                   [group[f"bias_{i}"] for i in range(n)], slope)
        except KeyError as e:
            raise CpadgnError(f"the model file's encoder group lacks {e.args[0]}; re-save the model "
                              "(cpadgn fit --method vae)") from None

    @property
    def input_dim(self) -> int:
        return self.weights[0].shape[1]

    @property
    def latent_dim(self) -> int:
        return self.weights[-1].shape[0] // 2

    def __call__(self, X):
        """X (N, D) -> mean (N, S), log variance (N, S)."""
        h = np.asarray(X, dtype=np.float64)
        for W, b in zip(self.weights[:-1], self.biases[:-1]):
            u = h @ W.T + b
            h = np.where(u >= 0, u, self.slope * u)
        out = h @ self.weights[-1].T + self.biases[-1]
        S = self.latent_dim
        return out[:, :S], np.clip(out[:, S:], -20.0, 10.0)


def _parse_slope(name) -> float | None:
    name = str(name)
    if name == "relu":
        return 0.0
    if name == "abs":
        return -1.0
    if name.startswith("leaky_relu:"):
        try:
            return float(name.split(":", 1)[1])
        except ValueError:
            return None
    return None


def encoder_slope(extra: dict, generator: PiecewiseAffineNet | None = None) -> float:
    """The encoder's leaky-ReLU slope of a model file: attrs["encoder_slope"] when stored,
    else derived from the decoder's activation as ``GaussianVAE`` does (its slope when
    >= 0, else 0.1); the decoder's activation comes from attrs["activations"] or the
    generator's slopes."""
    attrs = (extra or {}).get("attrs", {}) or {}
    if "encoder_slope" in attrs:
        return float(attrs["encoder_slope"])
    a = None
    acts = attrs.get("activations")
    if isinstance(acts, (list, tuple)) and acts:
        a = _parse_slope(acts[0])
    if a is None and generator is not None and generator.slopes:
        s = np.asarray(generator.slopes[0])
        if s.size and np.all(s == s.flat[0]):
            a = float(s.flat[0])
    if a is None:
        a = 0.1
    return a if a >= 0 else 0.1


def model_encoder(model) -> Encoder | None:
    """The encoder stored in a CPAModel's file (group "encoder"), or None."""
    group = (getattr(model, "extra", None) or {}).get("groups", {}).get("encoder")
    if not group:
        return None
    enc = Encoder.from_group(group, encoder_slope(model.extra, model.generator))
    if enc.input_dim != model.output_dim or enc.latent_dim != model.latent_dim:
        raise CpadgnError(f"the model file's encoder maps {enc.input_dim} -> {enc.latent_dim} "
                          f"latent dims but the generator is {model.latent_dim} -> "
                          f"{model.output_dim}; the file is inconsistent")
    return enc


@dataclass
class ELBOResult:
    """Exact ELBO terms per row (N,), nats.

    elbo = expected_log_lik - kl;  expected_log_lik = E_q[log p(x | z)] (exact up to
    ``error_bound``); kl = KL(q(z|x) || prior) in closed form.
    error_bound: certified bound from skipped far regions: the true ELBO lies in
        [elbo - error_bound, elbo].
    stderr: Monte Carlo standard error from quasi-Monte Carlo region masses (S >= 4;
        0 when exact; moment errors not included).
    mass: the q-mass of the regions evaluated (1 - skipped mass, up to rounding).
    """

    elbo: np.ndarray
    expected_log_lik: np.ndarray
    kl: np.ndarray
    error_bound: np.ndarray
    stderr: np.ndarray
    mass: np.ndarray


def lipschitz_bound(net: PiecewiseAffineNet, noise_std) -> float:
    """An upper bound on the Lipschitz constant of z -> diag(1/sigma) g(z) (spectral norms)."""
    D = net.output_dim
    sig = np.broadcast_to(np.asarray(noise_std, dtype=np.float64), (D,))
    L = float(np.linalg.norm(net.weights[-1] / sig[:, None], 2))
    for W, a in zip(net.weights[:-1], net.slopes):
        L *= float(np.linalg.norm(W, 2)) * max(1.0, float(np.abs(a).max(initial=0.0)))
    return L


def expected_sq_error(net: PiecewiseAffineNet, part, noise_std, X, m, C, *,
                      log_mass_floor: float = -60.0, memory_budget: float = 4e8,
                      progress=None):
    """E_q ||x - g(z)||^2_P exactly, for q = N(m, C C^T), by a sum over regions.

    net: generator with prior N(0, I) (folded); part: its partition; noise_std scalar
    or (D,), P = diag(sigma^-2).  X (N, D) complete rows; m (N, S); C (N, S, S) with
    z = m + C u, u ~ N(0, I).  On region w, g(z) = A_w z + b_w and

        E_q[f 1_w] = q(w) [ ||x - A_w mu_w - b_w||^2_P + tr(A_w^T P A_w Sigma_w) ],

    mu_w, Sigma_w the moments of q truncated to w (``polytope.polytope_moments`` in the
    whitened u coordinates, where G z <= h reads (G C) u <= h - G m).  A (row, region)
    pair is skipped when a single facet already bounds q(w) below exp(log_mass_floor);
    the skipped part is bounded by Cauchy-Schwarz, sqrt(sum skipped bounds) *
    sqrt(E_q f^2), with f <= 2 ||x - g(m)||^2_P + 2 Lip^2 ||z - m||^2.

    Returns value (N,), error_bound (N,) (value <= truth <= value + bound),
    stderr (N,) (QMC masses, S >= 4) and mass (N,) (q-mass of the evaluated regions).
    """
    from scipy.special import log_ndtr, logsumexp

    from .polytope import polytope_moments

    X, m, C = (np.asarray(a, dtype=np.float64) for a in (X, m, C))
    N, D = X.shape
    S = net.latent_dim
    var = np.broadcast_to(np.asarray(noise_std, dtype=np.float64) ** 2, (D,))
    _, (M, c) = net.hidden_affine(part.patterns)
    U, b0 = net.weights[-1], net.biases[-1]
    if U.shape[1] >= D:               # work in data space when the last layer is wide
        M, c, U = np.einsum("dh,rhs->rds", U, M), c @ U.T, np.eye(D)
    Q = U.T @ (U / var[:, None])
    MtQM = (np.swapaxes(M, 1, 2) @ Q) @ M                               # (R, S, S)
    Ms = [np.ascontiguousarray(M[:, :, s_]) for s_ in range(S)]       # (R, H) each
    G, h, fmask = part.facets(net)    # (R, F, S), (R, F), (R, F)
    R, F = fmask.shape
    value, mass, var_mc = np.zeros(N), np.zeros(N), np.zeros(N)
    log_skipped = np.full(N, -np.inf)

    # half of the budget for a chunk of rows' (row, region, facet) arrays, GC, bb and the
    # temporaries of the facet bounds (2 S + 6 of them at once), half for a chunk of pairs
    per_row = 8.0 * R * max(F, 1) * (2 * S + 6)
    chunk = int(max(1, min(N, memory_budget / 2 // per_row)))
    pair_chunk = int(max(1, memory_budget / 2 // (8.0 * (max(F, 1) * (S + 2) + 4 * D + 4 * S * S))))
    for start in range(0, N, chunk):
        rows_c = np.arange(start, min(N, start + chunk))
        Cn, mn = C[rows_c], m[rows_c]
        # GC = G C_n (n, R, F, S) and bb = h - G m_n (n, R, F), as S^2 broadcasts (S is small)
        GC = np.zeros((rows_c.size, R, F, S))
        bb = np.broadcast_to(h, (rows_c.size, R, F)).copy()
        for s_ in range(S):
            Gs = G[None, :, :, s_]
            bb -= Gs * mn[:, None, None, s_]
            for t_ in range(S):
                GC[..., t_] += Gs * Cn[:, None, None, s_, t_]
        nrm = np.linalg.norm(GC, axis=3)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = np.where(fmask[None] & (nrm > 0), bb / nrm, np.inf)
        log_ub = log_ndtr(t).min(axis=2, initial=0.0) if F else np.zeros((rows_c.size, R))
        del nrm, t                                           # not held through the pairs
        keep = log_ub >= log_mass_floor
        log_skipped[rows_c] = logsumexp(np.where(keep, -np.inf, log_ub), axis=1)
        lr, rg = np.nonzero(keep)
        for p0 in range(0, lr.size, pair_chunk):
            pl, pr = lr[p0:p0 + pair_chunk], rg[p0:p0 + pair_chunk]
            n_abs = rows_c[pl]
            A, b, mk = GC[pl, pr], bb[pl, pr], fmask[pr]
            log_q = np.zeros(pl.size)
            mean_u = np.zeros((pl.size, S))
            cov_u = np.broadcast_to(np.eye(S), (pl.size, S, S)).copy()
            se = np.zeros(pl.size)
            has = mk.any(axis=1)
            if has.any():
                res = polytope_moments(A[has], b[has], mk[has])
                log_q[has], mean_u[has], cov_u[has], se[has] = res.log_mass, res.mean, res.cov, res.stderr
            Cp = Cn[pl]
            mu_z = mn[pl] + np.einsum("pst,pt->ps", Cp, mean_u)
            Sig = Cp @ cov_u @ np.swapaxes(Cp, 1, 2)
            y = c[pr]
            for s_ in range(S):
                y = y + Ms[s_][pr] * mu_z[:, s_, None]
            r = X[n_abs] - (y @ U.T + b0)
            quad = (r * r / var).sum(1) + np.einsum("pst,pst->p", MtQM[pr], Sig)
            w = np.exp(log_q)
            value += np.bincount(n_abs, weights=w * quad, minlength=N)
            mass += np.bincount(n_abs, weights=w, minlength=N)
            var_mc += np.bincount(n_abs, weights=(w * quad * se) ** 2, minlength=N)
        if progress is not None:
            progress(int(rows_c[-1]) + 1, N)

    bound = np.zeros(N)
    far = np.isfinite(log_skipped)
    if far.any():
        Lip2 = lipschitz_bound(net, np.sqrt(var)) ** 2
        a = (((X[far] - net.forward(m[far])) ** 2) / var).sum(1)
        Sq = C[far] @ np.swapaxes(C[far], 1, 2)
        t1 = np.einsum("nii->n", Sq)
        t2 = (Sq * Sq).sum((1, 2))
        Ef2 = 4 * a * a + 8 * a * Lip2 * t1 + 4 * Lip2 ** 2 * (t1 * t1 + 2 * t2)
        bound[far] = np.exp(0.5 * log_skipped[far]) * np.sqrt(Ef2)
    return value, bound, np.sqrt(var_mc), mass


def exact_elbo(model, X, encoder: Encoder | None = None, *, log_mass_floor: float = -60.0,
               progress=None) -> ELBOResult:
    """The exact ELBO of a CPAModel's rows X (N, D) under a Gaussian encoder q(z|x).

        ELBO(x) = E_q[log p(x | z)] - KL(q(z|x) || p(z))
                = -1/2 [D log 2pi + sum log sigma^2 + E_q ||x - g(z)||^2_P] - KL,

    with E_q ||x - g(z)||^2_P exact as a sum over the linear regions of g (see
    ``expected_sq_error``), so log p(x) - ELBO(x) = KL(q(z|x) || p(z|x)) >= 0 is exact.
    encoder: default ``model_encoder(model)`` (the model file's /encoder group).
    Rows must be complete (the ELBO of a partly observed row is not defined here).
    """
    enc = encoder if encoder is not None else model_encoder(model)
    if enc is None:
        raise CpadgnError("the model has no encoder (the model file has no /encoder group), so it has no "
                          "ELBO; fit one with cpadgn fit --method vae, or pass encoder=")
    if model.noise_std is None:
        raise CpadgnError("the model has no noise std: pass noise_std= to cpadgn.load")
    X = model._check_data(X)
    if np.isnan(X).any():
        raise CpadgnError("the exact ELBO needs complete rows; the data has missing values (NaN): drop or "
                          "impute the incomplete rows")
    mq, logv = enc(X)
    N, S = mq.shape
    # q in the folded coordinates e = Lz^-1 (z - prior_mean), where the prior is N(0, I)
    from scipy.linalg import solve_triangular
    Linv = solve_triangular(model.prior_chol, np.eye(S), lower=True)
    m = (mq - model.prior_mean) @ Linv.T
    C = Linv[None] * np.exp(0.5 * logv)[:, None, :]                      # Linv diag(sqrt v)
    quad, bound, se, mass = expected_sq_error(model.net, model.partition(), model.noise_std, X, m, C,
                                              log_mass_floor=log_mass_floor, progress=progress,
                                              memory_budget=max(model.memory_budget, MIN_CHUNK_BUDGET))
    D = model.output_dim
    var = np.broadcast_to(np.asarray(model.noise_std, dtype=np.float64) ** 2, (D,))
    ell = -0.5 * (D * LOG_2PI + np.log(var).sum() + quad)
    logdet_C = np.log(np.abs(np.diagonal(C, axis1=1, axis2=2))).sum(1)
    kl = 0.5 * ((C * C).sum((1, 2)) + (m * m).sum(1) - S) - logdet_C
    return ELBOResult(elbo=ell - kl, expected_log_lik=ell, kl=kl, error_bound=0.5 * bound,
                      stderr=0.5 * se, mass=mass)
