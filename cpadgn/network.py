"""The canonical piecewise-affine generator every supported model is reduced to.

    h_0 = z,   u_l = W_l h_{l-1} + b_l,   h_l = sigma_l(u_l)  (l < L),   g(z) = u_L

with the one-breakpoint activation sigma_l(u) = u where u >= 0 and alpha * u where
u < 0, alpha a per-unit negative-side slope (ReLU 0, LeakyReLU its slope, PReLU its
weights, absolute value -1).  The K hidden units are numbered layer by layer.  A sign
pattern q in {0,1}^K (1 where u_k >= 0) names a linear region; inside it every u_k and
g itself are affine in z.

A unit with slope 1 is linear (it carries a skip connection through a layer): it has
no breakpoint, so its pattern bit is always 1 and it never bounds a region.

The latent prior is always N(0, I) here: a general prior N(mu, L L^T) is folded into
the first layer (see ``fold_prior``).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .errors import CpadgnError


@dataclass(frozen=True, eq=False)
class PiecewiseAffineNet:
    """Affine layers W_l, b_l (float64) with per-unit negative slopes between them.

    weights[l]: (n_{l+1}, n_l); biases[l]: (n_{l+1},); slopes[l]: (n_{l+1},) for the
    L - 1 hidden layers.  n_0 = S (latent dim), n_L = D (output dim).
    """

    weights: tuple
    biases: tuple
    slopes: tuple

    def __post_init__(self):
        if len(self.weights) != len(self.biases) or len(self.slopes) != len(self.weights) - 1:
            raise ValueError(f"need one bias per layer and one slope vector per hidden layer, got "
                             f"{len(self.weights)} weights, {len(self.biases)} biases and {len(self.slopes)} slopes; "
                             "pass L weights, L biases and L - 1 slopes")
        for W, b in zip(self.weights, self.biases):
            if W.ndim != 2 or b.shape != (W.shape[0],):
                raise ValueError(f"weight/bias shapes do not match: {W.shape} and {b.shape}; pass W (out, in) "
                                 "and b (out,)")
        for W_next, W in zip(self.weights[1:], self.weights[:-1]):
            if W_next.shape[1] != W.shape[0]:
                raise ValueError(f"consecutive layer shapes do not match: {W.shape} then {W_next.shape}; pass "
                                 "weights whose input width is the previous layer's output width")

    def __repr__(self) -> str:
        """The architecture, not the weights (the dataclass's repr printed every weight)."""
        return (f"PiecewiseAffineNet(latent_dim={self.latent_dim}, hidden_sizes={self.hidden_sizes}, "
                f"output_dim={self.output_dim})")

    @classmethod
    def from_arrays(cls, weights, biases, slopes) -> "PiecewiseAffineNet":
        as64 = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float64))
        return cls(tuple(map(as64, weights)), tuple(map(as64, biases)),
                   tuple(np.ascontiguousarray(np.broadcast_to(as64(s), (W.shape[0],)))
                         for s, W in zip(slopes, weights)))

    # ------------------------------------------------------------------ shape
    @property
    def latent_dim(self) -> int:
        """S, the width of z (the input of the first layer)."""
        return self.weights[0].shape[1]

    @property
    def output_dim(self) -> int:
        """D, the width of x (the output of the last layer)."""
        return self.weights[-1].shape[0]

    @property
    def hidden_sizes(self) -> tuple:
        """The hidden layers' widths, () for a linear generator."""
        return tuple(W.shape[0] for W in self.weights[:-1])

    @property
    def n_units(self) -> int:
        """K, the number of hidden units (0 for a linear generator)."""
        return int(sum(self.hidden_sizes))

    @property
    def n_parameters(self) -> int:
        """Entries of the dense weights and biases."""
        return int(sum(W.size + b.size for W, b in zip(self.weights, self.biases)))

    @property
    def unit_layer(self) -> np.ndarray:
        """(K,) the hidden layer index of every unit."""
        return np.repeat(np.arange(len(self.hidden_sizes)), self.hidden_sizes)

    # --------------------------------------------------------------- forward
    def forward(self, z: np.ndarray) -> np.ndarray:
        """g(z): (N, S) -> (N, D)."""
        h = np.asarray(z, dtype=np.float64)
        for W, b, a in zip(self.weights[:-1], self.biases[:-1], self.slopes):
            u = h @ W.T + b
            h = np.where(u >= 0, u, a * u)
        return h @ self.weights[-1].T + self.biases[-1]

    def preactivations(self, z: np.ndarray, t: np.ndarray | None = None) -> np.ndarray:
        """All hidden pre-activations u: (N, S) -> (N, K).

        With t (N,), the homogenised network: every bias is multiplied by t, so that
        (z, t) with t > 0 gives t * u(z / t) and t = 0 the bias-free network (the
        behaviour at infinity in direction z).  The activations are positively
        homogeneous, which makes this exact.
        """
        h = np.asarray(z, dtype=np.float64)
        scale = 1.0 if t is None else np.asarray(t, dtype=np.float64)[:, None]
        out = []
        for W, b, a in zip(self.weights[:-1], self.biases[:-1], self.slopes):
            u = h @ W.T + scale * b
            out.append(u)
            h = np.where(u >= 0, u, a * u)
        return np.concatenate(out, axis=1) if out else np.zeros((h.shape[0], 0))

    def preactivation_scale(self, z: np.ndarray) -> np.ndarray:
        """The magnitudes every pre-activation is summed from: (N, S) -> (N, K), with
        m_0 = |z|, m_l = |W_l| m_(l-1) + |b_l| (times max(1, |slope|) through each
        activation).  |u| <= m, and a relative error delta in every weight, bias or
        input moves u by at most about L delta m; float64's forward pass errs by at
        most L gamma_n m, gamma_n = n eps / (1 - n eps), n the largest fan-in + 1
        (Higham, Accuracy and Stability, 3.5)."""
        m = np.abs(np.asarray(z, dtype=np.float64))
        out = []
        for W, b, a in zip(self.weights[:-1], self.biases[:-1], self.slopes):
            m = m @ np.abs(W).T + np.abs(b)
            out.append(m)
            m = m * np.maximum(1.0, np.abs(a))
        return np.concatenate(out, axis=1) if out else np.zeros((m.shape[0], 0))

    @property
    def linear_units(self) -> np.ndarray:
        """(K,) bool: units with slope 1, which have no breakpoint."""
        return np.concatenate([a == 1.0 for a in self.slopes]) if self.slopes else np.zeros(0, bool)

    def patterns(self, z: np.ndarray) -> np.ndarray:
        """Sign patterns (N, K) bool, True where the pre-activation is >= 0 (always True
        for slope-1 units)."""
        return (self.preactivations(z) >= 0) | self.linear_units

    # ------------------------------------------------------- region algebra
    def _slope_masks(self, patterns: np.ndarray):
        patterns = np.asarray(patterns, dtype=bool)
        splits = np.cumsum(self.hidden_sizes)[:-1]
        return [np.where(q, 1.0, a) for q, a in zip(np.split(patterns, splits, axis=1), self.slopes)]

    def hidden_affine(self, patterns: np.ndarray):
        """Affine maps of every hidden layer inside regions.

        patterns: (R, K) bool.  Returns a list over hidden layers l of (G_l, c_l) with
        G_l (R, n_l, S), c_l (R, n_l) such that u_l(z) = G_l z + c_l in each region,
        and the map (M, c) of the last hidden activation h_{L-1}(z) = M z + c,
        M (R, H, S), c (R, H) (for a linear generator H = S, M = I, c = 0).
        """
        R = np.asarray(patterns).shape[0]
        S = self.latent_dim
        M = np.broadcast_to(np.eye(S), (R, S, S))
        c = np.zeros((R, S))
        pre = []
        for W, b, slope in zip(self.weights[:-1], self.biases[:-1], self._slope_masks(patterns)):
            G = np.matmul(W, M)                                       # (R, n_l, S)
            cu = c @ W.T + b
            pre.append((G, cu))
            M, c = slope[:, :, None] * G, slope * cu
        return pre, (np.ascontiguousarray(M), c)

    def last_hidden_affine(self, patterns: np.ndarray):
        """(M, c) of ``hidden_affine``: M (R, H, S), c (R, H), with the layers before the
        last one evaluated once per distinct pattern of those layers (the regions of a
        convolutional decoder share them by the dozen): see ``prefix_maps``."""
        patterns = np.asarray(patterns, dtype=bool)
        if not self.hidden_sizes:
            return self.hidden_affine(patterns)[1]
        G, cu, inv = self.prefix_maps(patterns)
        slope = np.where(patterns[:, self.n_units - self.hidden_sizes[-1]:], 1.0, self.slopes[-1])
        M = G[inv]
        M *= slope[:, :, None]
        return M, slope * cu[inv]

    def prefix_maps(self, patterns: np.ndarray, max_prefixes: int | None = None):
        """The last hidden layer's pre-activation u = G z + c per distinct pattern of the
        layers before it: G (P, H, S), c (P, H) and each region's prefix index (R,).
        One matrix product per layer for all prefixes at once.  None if P > max_prefixes."""
        patterns = np.asarray(patterns, dtype=bool)
        n_last = self.hidden_sizes[-1]
        prefix = np.ascontiguousarray(np.packbits(patterns[:, :self.n_units - n_last], axis=1))
        if prefix.shape[1] == 0 or prefix.shape[0] == 0:
            first, inv = np.zeros(min(1, len(patterns)), np.int64), np.zeros(len(patterns), np.int64)
        else:
            keys = prefix.view(np.dtype((np.void, prefix.shape[1]))).ravel()
            _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
        if max_prefixes is not None and first.size > max_prefixes:
            return None
        q, P, S = patterns[first], first.size, self.latent_dim
        M = np.repeat(np.eye(S)[:, None, :], P, axis=1).reshape(S, P * S)        # layout (n, P S)
        c = np.zeros((S, P))
        off = 0
        for W, b, alpha in zip(self.weights[:-1], self.biases[:-1], self.slopes):
            n = W.shape[0]
            G, cu = W @ M, W @ c + b[:, None]
            if off + n == self.n_units:
                break
            slope = np.where(q[:, off:off + n].T, 1.0, alpha[:, None])            # (n, P)
            M, c = (G.reshape(n, P, S) * slope[:, :, None]).reshape(n, P * S), slope * cu
            off += n
        return np.ascontiguousarray(G.reshape(-1, P, S).transpose(1, 0, 2)), np.ascontiguousarray(cu.T), inv.ravel()

    def region_constraints(self, patterns: np.ndarray):
        """Half-space form of regions: {z : G z <= h}.

        patterns: (R, K) bool.  Returns G (R, K, S), h (R, K), each row oriented so the
        region lies on its <= side (unit k: -u_k <= 0 where q_k, u_k <= 0 otherwise).
        """
        pre, _ = self.hidden_affine(patterns)
        if not pre:
            R = np.asarray(patterns).shape[0]
            return np.zeros((R, 0, self.latent_dim)), np.zeros((R, 0))
        G = np.concatenate([g for g, _ in pre], axis=1)
        c = np.concatenate([cu for _, cu in pre], axis=1)
        sign = np.where(np.asarray(patterns, dtype=bool), -1.0, 1.0) * ~self.linear_units  # 0 <= 0
        return sign[:, :, None] * G, -sign * c

    def region_maps(self, patterns: np.ndarray):
        """g(z) = A z + b inside regions: A (R, D, S), b (R, D)."""
        _, (M, c) = self.hidden_affine(patterns)
        W, b = self.weights[-1], self.biases[-1]
        return np.matmul(W, M), c @ W.T + b

    # ------------------------------------------------------------- identity
    def fingerprint(self) -> str:
        """SHA-256 over the architecture, weights and slopes (float64, little endian)."""
        h = hashlib.sha256(b"cpadgn-net-v1")
        for arrays in (self.weights, self.biases, self.slopes):
            for a in arrays:
                a = np.ascontiguousarray(a, dtype="<f8")
                h.update(repr(a.shape).encode())
                h.update(a.tobytes())
        return h.hexdigest()


def check_prior(where, mean, cov, S, fix="save the model with"):
    """The latent prior N(mean (S,), cov (S, S)) as float64 arrays (None: 0 and I), or a
    one-line CpadgnError naming where it came from and saying to ``fix`` it.  mean and
    cov may be torch tensors (``data.numeric_array``: one that requires grad detached)."""
    from .data import numeric_array
    try:
        mean = np.zeros(S) if mean is None else numeric_array(mean).astype(np.float64)
        cov = np.eye(S) if cov is None else numeric_array(cov).astype(np.float64)
    except (CpadgnError, ValueError):
        raise CpadgnError(f"{where}: the latent prior is not numeric; {fix} a prior mean ({S},) and "
                          f"covariance ({S}, {S}) of numbers") from None
    if mean.shape != (S,):
        raise CpadgnError(f"{where}: prior mean has shape {mean.shape}; {fix} a prior mean of shape ({S},)")
    if cov.shape != (S, S):
        raise CpadgnError(f"{where}: prior covariance has shape {cov.shape}; {fix} an ({S}, {S}) prior covariance")
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))):
        raise CpadgnError(f"{where}: the latent prior has non-finite values; {fix} a finite prior mean and "
                          "covariance")
    if not np.allclose(cov, cov.T, rtol=0, atol=1e-12 * max(1.0, float(np.abs(cov).max(initial=0)))):
        raise CpadgnError(f"{where}: the prior covariance is not symmetric; {fix} a symmetric one, "
                          "e.g. (C + C.T) / 2")
    try:
        np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise CpadgnError(f"{where}: the prior covariance is not positive definite; {fix} a "
                          "positive-definite one") from None
    return mean, cov


def fold_prior(net: PiecewiseAffineNet, mean: np.ndarray, cov: np.ndarray) -> PiecewiseAffineNet:
    """Fold a latent prior N(mean, cov) into the first layer so the prior becomes N(0, I).

    z = mean + L e with L L^T = cov, so W_1 z + b_1 = (W_1 L) e + (W_1 mean + b_1).
    """
    L = np.linalg.cholesky(np.asarray(cov, dtype=np.float64))
    W1, b1 = net.weights[0], net.biases[0]
    return PiecewiseAffineNet.from_arrays((W1 @ L,) + net.weights[1:],
                                          (W1 @ mean + b1,) + net.biases[1:], net.slopes)
