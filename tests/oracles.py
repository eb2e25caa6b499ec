"""Independent oracles for the exact likelihood: quadrature written from scratch here,
sharing no code with cpadgn beyond the network's forward pass."""
import numpy as np
from scipy import integrate

from cpadgn.network import PiecewiseAffineNet

GL_X, GL_W = np.polynomial.legendre.leggauss(60)


def random_net(S, hidden, D, seed, slope=0.1, scale=1.0):
    rng = np.random.default_rng(seed)
    sizes = [S, *hidden, D]
    Ws = [scale * rng.normal(size=(o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])]
    bs = [scale * rng.normal(size=o) * 0.5 for o in sizes[1:]]
    return PiecewiseAffineNet.from_arrays(Ws, bs, [slope] * len(hidden))


def line_breakpoints(f_pre, lo, hi, n=20001):
    """Points in [lo, hi] where a pre-activation of a 1-D piecewise-affine map changes
    sign: a dense grid, then vectorised bisection on each unit's own pre-activation."""
    t = np.linspace(lo, hi, n)
    s = f_pre(t) >= 0
    i, k = np.nonzero(s[1:] != s[:-1])
    a, b = t[i], t[i + 1]
    sa = s[i, k]
    for _ in range(60):
        m = 0.5 * (a + b)
        same = (f_pre(m)[np.arange(m.size), k] >= 0) == sa
        a, b = np.where(same, m, a), np.where(same, b, m)
    return np.unique(0.5 * (a + b))


def _log_joint(net, x, var, z):
    """log N(x_o; g(z), var) + log N(z; 0, I) for z (n, S), NaN in x = missing."""
    obs = ~np.isnan(x)
    r = net.forward(z)[:, obs] - x[obs]
    S = z.shape[1]
    return (-0.5 * (r * r / var[obs]).sum(1) - 0.5 * obs.sum() * np.log(2 * np.pi)
            - 0.5 * np.log(var[obs]).sum() - 0.5 * (z * z).sum(1) - 0.5 * S * np.log(2 * np.pi))


def _piecewise_gl(logf, breaks, lo, hi):
    """log int_lo^hi exp(logf) over the pieces between breaks, 60-point GL per piece
    (each piece is a Gaussian in t, so GL on it converges spectrally); also returns
    int t exp(logf) and int t^2 exp(logf) relative to the same scale."""
    edges = np.concatenate([[lo], breaks[(breaks > lo) & (breaks < hi)], [hi]])
    a, b = edges[:-1, None], edges[1:, None]
    t = (0.5 * (b - a) * GL_X + 0.5 * (a + b)).ravel()
    logw = np.log((0.5 * (b - a) * GL_W).ravel())
    lf = logf(t) + logw
    m = lf.max()
    w = np.exp(lf - m)
    return m + np.log(w.sum()), (w * t).sum() / w.sum(), (w * t * t).sum() / w.sum()


def loglik_1d(net, x, noise_std, lo=-40.0, hi=40.0):
    """Exact-by-quadrature log p(x), E[z|x], E[z^2|x] for S = 1."""
    var = np.broadcast_to(np.asarray(noise_std, float) ** 2, (net.output_dim,))
    breaks = line_breakpoints(lambda t: net.preactivations(t[:, None]), lo, hi)
    # Refine: the Gaussian factor is narrow when the noise is small, so split at a fine grid too.
    grid = np.linspace(lo, hi, 4001)
    lz, m1, m2 = _piecewise_gl(lambda t: _log_joint(net, x, var, t[:, None]), np.union1d(breaks, grid), lo, hi)
    return lz, m1, m2


def loglik_2d(net, x, noise_std, lo=-12.0, hi=12.0):
    """log p(x) and E[z|x] for S = 2 by nested quadrature: exact piecewise GL along z2
    (breakpoints of the 1-D restriction) and adaptive vector quadrature over z1."""
    var = np.broadcast_to(np.asarray(noise_std, float) ** 2, (net.output_dim,))

    def inner(z1):
        line = lambda t: np.column_stack([np.full_like(t, z1), t])
        br = line_breakpoints(lambda t: net.preactivations(line(t)), lo, hi, n=1201)
        return _piecewise_gl(lambda t: _log_joint(net, x, var, line(t)),
                             np.union1d(br, np.linspace(lo, hi, 49)), lo, hi)

    shift = max(inner(z)[0] for z in np.linspace(lo, hi, 97))

    def outer(z1):
        lz, m1, _ = inner(z1)
        f = np.exp(lz - shift)
        return np.array([f, z1 * f, m1 * f])

    I, _ = integrate.quad_vec(outer, lo, hi, epsabs=0, epsrel=1e-11, limit=2000)
    return shift + np.log(I[0]), I[1:] / I[0]


def loglik_importance(net, x, noise_std, n=400_000, seed=0):
    """Prior importance sampling: log p(x) estimate and its standard error (delta method)."""
    rng = np.random.default_rng(seed)
    var = np.broadcast_to(np.asarray(noise_std, float) ** 2, (net.output_dim,))
    z = rng.standard_normal((n, net.latent_dim))
    lw = _log_joint(net, x, var, z) + 0.5 * (z * z).sum(1) + 0.5 * net.latent_dim * np.log(2 * np.pi)
    m = lw.max()
    w = np.exp(lw - m)
    est = m + np.log(w.mean())
    se = w.std(ddof=1) / np.sqrt(n) / w.mean()
    return est, se


def random_linear_model(rng, S, D, sigma_max):
    """A random linear generator x = A z + b + noise with a non-standard Gaussian prior,
    whose marginal and conditionals are closed-form Gaussians.  Returns the CPAModel and
    A (D, S), b (D,), prior mean (S,), prior cov (S, S), noise std (D,)."""
    from cpadgn.model import CPAModel
    A, b = rng.normal(size=(D, S)), rng.normal(size=D)
    mu = rng.normal(size=S)
    Lz = np.tril(rng.normal(size=(S, S))) + 2 * np.eye(S)
    cov_z = Lz @ Lz.T
    sigma = rng.uniform(0.2, sigma_max, size=D)
    model = CPAModel(PiecewiseAffineNet.from_arrays([A], [b], []), prior_mean=mu, prior_cov=cov_z,
                     noise_std=sigma, device="cpu")
    return model, A, b, mu, cov_z, sigma
