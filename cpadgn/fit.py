"""Training a piecewise-affine generator: analytical EM (``fit_em``) and the VAE
baseline on the same decoder (``fit_vae``), both scored by the exact likelihood.

EM (the algorithm is in ``em``; this module runs it):

    net, var <- initialisation (PPCA embedded in the network, see ``em.init_ppca``; or a
                generator trained elsewhere, its prior folded in, see ``model_start``)
    repeat:
        E-step:  exact posterior of every training row on the current partition
        M-step:  closed-form layer updates with the regions held fixed, then the noise
        check:   new partition, exact log-likelihood; if it went down, halve the step
                 (old + eta (new - old), eta = 1/2, 1/4, ...; ``max_halvings`` times),
                 then fall back to the output layer and noise alone, a true EM step
                 (the partition does not move), which cannot lower it
    until the relative change of the mean training log-likelihood is below ``tol``,
    no step raises it, no step's log-likelihood is reliable under rounding (the noise
    shrank towards a var_floor near 0), the next M-step would exceed the memory budget,
    or ``max_iter`` iterations.

So the exact training log-likelihood never decreases.  Training rows may have missing
entries (NaN): the E-step is then the exact posterior given the observed entries, the
missing ones are latent variables like z (EM for missing data, ``em.region_stats``),
and the likelihood that never decreases is the exact log p(x_o) of the observed
entries.  Every run is deterministic given the data and the seed (the seed only drives
the initialisation's random units, and for the VAE the weights and minibatches).

The history (one entry per iteration, entry 0 the initialisation) holds the exact mean
train and validation log-likelihood per row, the noise std, the region count, the
accepted step size, and with ``timings`` the wall time; ``save_fit`` writes it to the
model file's /training group.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .data import numeric_array
from .errors import CpadgnError
from .network import PiecewiseAffineNet
from .numerics import (MAX_MAGNITUDE, NOISE_RANGE, ROUNDING_WARN_NATS, check_magnitude, check_spread,
                       is_finite_number, is_integer)

ACTIVATIONS = "leaky_relu:A (0 <= A <= 1e100, A != 1), relu, abs"


# ============================================================================ options
def parse_hidden(text) -> tuple:
    """'32,32' -> (32, 32); '' or 'none' -> () (a linear generator, i.e. PPCA)."""
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        s = str(text).strip().lower()
        if s in ("", "none", "0", "linear"):
            return ()
        parts = [p.strip() for p in s.replace(" ", "").split(",")]
    try:
        sizes = tuple(_layer_width(p) for p in parts)
    except (TypeError, ValueError):
        raise CpadgnError(f"the hidden layer widths must be positive integers, got {text!r}; give them like "
                          "--hidden 32,32 (hidden=(32, 32) in Python), or 'none' for a linear generator") from None
    if any(n < 1 for n in sizes):
        raise CpadgnError(f"the hidden layer widths must be positive integers, got {text!r}; give widths of 1 "
                          "or more like --hidden 32,32 (hidden=(32, 32) in Python), or 'none' for a linear "
                          "generator")
    return sizes


def _layer_width(value) -> int:
    """A layer width from '32' or a whole number (8.5 or True is a ValueError, not 8 or 1)."""
    if isinstance(value, str):
        return int(value)
    if isinstance(value, (bool, np.bool_)) or not float(value).is_integer():
        raise ValueError(value)
    return int(value)


def parse_activation(text) -> float:
    """'leaky_relu:0.1' -> 0.1, 'leaky_relu' -> 0.01, 'relu' -> 0, 'abs' -> -1."""
    s = str(text).strip().lower()
    if s == "relu":
        return 0.0
    if s == "abs":
        return -1.0
    if s == "leaky_relu":
        return 0.01
    if s.startswith("leaky_relu:"):
        try:
            a = float(s.split(":", 1)[1])
        except ValueError:
            a = np.nan
        if 0 <= a <= MAX_MAGNITUDE and a != 1.0:         # larger slopes overflow float64
            return a
    raise CpadgnError(f"unknown --activation {text!r}; use one of: {ACTIVATIONS}")


def check_training_data(X, latent_dim: int, what: str = "training data", *,
                        allow_missing: bool = True, validation: bool = False) -> np.ndarray:
    """X (N, D) as row-major float64, NaN = missing; CpadgnError for what EM cannot fit.
    validation: rows that are only scored (one row will do, a column may be unobserved).
    Row-major whatever the input's layout (a DataFrame's .values is column-major): BLAS
    sums in another order on another layout, and EM's steps amplify that, so the same
    numbers would give another fit than the command line's."""
    X = numeric_array(X).astype(np.float64, order="C", copy=False)
    if X.ndim != 2:
        raise CpadgnError(f"the {what} must be a 2-D table of rows, got shape {X.shape}; pass one row "
                          "per sample")
    N, D = X.shape
    miss = np.isnan(X)
    if miss.any() and not allow_missing:
        r, c = np.argwhere(miss)[0]
        raise CpadgnError(f"the {what} has missing values (first at row {r + 1}, column {c + 1}); "
                          "the VAE needs complete rows: use --method em, or drop the incomplete rows")
    if np.isinf(X).any():
        r, c = np.argwhere(np.isinf(X))[0]
        raise CpadgnError(f"the {what} has an inf at row {r + 1}, column {c + 1}; fit needs finite values "
                          "(NaN marks a missing entry)")
    check_magnitude(X, what)
    if D < 2:
        raise CpadgnError(f"the {what} has {D} column(s); fit needs at least 2 (the latent dimension "
                          "must be below the number of columns): pass data with more columns")
    if latent_dim < 1:
        raise CpadgnError(f"--latent-dim must be at least 1, got {latent_dim}; give e.g. --latent-dim 1")
    if latent_dim >= D:
        raise CpadgnError(f"--latent-dim must be between 1 and D - 1 = {D - 1} for data with {D} "
                          f"columns, got {latent_dim}; give a smaller --latent-dim")
    if N < 2 - validation:
        raise CpadgnError(f"the {what} needs at least {2 - validation} rows, got {N}; pass more rows")
    if miss.all(1).any():
        raise CpadgnError(f"row {np.flatnonzero(miss.all(1))[0] + 1} of the {what} has no observed value; "
                          "drop the rows with nothing observed")
    if not validation and (miss.sum(0) >= N - 1).any():
        c = np.flatnonzero(miss.sum(0) >= N - 1)[0]
        raise CpadgnError(f"column {c + 1} of the {what} has fewer than 2 observed values; drop it")
    if not validation:
        check_spread(X, what)
    return X


def check_arguments(*, latent_dim=None, slope=None, max_iter=None, tol=None, seed=None, device=None):
    """``fit_em`` / ``fit_vae``'s Python arguments refused as the command line's options are
    (a one-line CpadgnError, not a TypeError or numpy's error from deep inside); None is
    not checked.  Returns the torch device (``model.check_device``), or None."""
    if latent_dim is not None and not (is_integer(latent_dim) and latent_dim >= 1):
        raise CpadgnError(f"latent_dim must be a positive integer, got {latent_dim!r}; pass e.g. latent_dim=2")
    if slope is not None and not is_finite_number(slope):
        raise CpadgnError(f"slope must be a finite number, got {slope!r}; pass e.g. slope=0.1 (0 for ReLU, "
                          "-1 for abs)")
    if max_iter is not None and not (is_integer(max_iter) and max_iter >= 0):
        raise CpadgnError(f"max_iter must be a non-negative integer, got {max_iter!r}; pass e.g. max_iter=100")
    if tol is not None and not (is_finite_number(tol) and tol >= 0):
        raise CpadgnError(f"tol must be a finite number >= 0, got {tol!r}; pass e.g. tol=1e-5")
    if seed is not None and not (is_integer(seed) and seed >= 0):
        raise CpadgnError(f"seed must be a non-negative integer, got {seed!r}; pass e.g. seed=0")
    if device is None:
        return None
    from .model import check_device
    return check_device(device)


def split_validation(X, fraction: float, seed: int):
    """A seeded random split: (X_train, X_val) with round(fraction N) validation rows."""
    X = np.asarray(X)
    N = X.shape[0]
    n_val = int(round(fraction * N))
    if fraction <= 0 or n_val == 0:
        return X, None
    if N - n_val < 2:
        raise CpadgnError(f"--val-fraction {fraction} leaves {N - n_val} training rows; use a "
                          "smaller fraction or more data")
    perm = np.random.default_rng([seed, 0x5EED]).permutation(N)
    return X[np.sort(perm[n_val:])], X[np.sort(perm[:n_val])]


def data_fingerprint(X) -> str:
    """SHA-256 of the rows (float64, C order, little endian) and their shape."""
    a = np.ascontiguousarray(np.asarray(X, dtype="<f8"))
    h = hashlib.sha256(repr(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


# ============================================================================ results
@dataclass
class FitResult:
    """A trained generator and its training record.

    net: the generator (prior N(0, I)); noise_std: () for isotropic or (D,);
    history: {name: (T,) array}, entry 0 the initialisation (EM) or per epoch (VAE);
    method: "em" or "vae"; stop_reason: "tol", "max_iter", "no_improvement",
    "rounding" (every further step was unreliable by rounding, see ``fit_em``),
    "memory_budget" (the next M-step would exceed it, see ``fit_em``), "callback" or
    "epochs"; train_loglik / val_loglik: final exact mean log-likelihood per row (val
    None without validation rows); encoder: the VAE's encoder arrays.
    """

    net: PiecewiseAffineNet
    noise_std: np.ndarray
    history: dict
    method: str
    stop_reason: str
    train_loglik: float
    val_loglik: float | None
    n_regions: int
    encoder: dict | None = None
    encoder_slope: float | None = None
    options: dict = field(default_factory=dict)


def _history_arrays(rows: list) -> dict:
    keys = list(rows[0]) if rows else []
    out = {}
    for k in keys:
        v = np.asarray([r.get(k, np.nan) for r in rows])
        out[k] = v.astype(np.int64) if v.dtype.kind in "bi" else v.astype(np.float64)
    return out


def _noise_out(var: np.ndarray, noise: str) -> np.ndarray:
    return np.asarray(np.sqrt(var[0])) if noise == "iso" else np.sqrt(var)


E_STEP_BUDGET = 5e8     # bytes of an EM E-step's batches (less under a smaller memory_budget)


def evaluate(net, part, noise_std, X, *, device="cpu", moments=False, memory_budget=2e9):
    """Exact posterior (``likelihood.posterior``) of the rows X under (net, noise)."""
    from .likelihood import posterior
    return posterior(net, part, noise_std, X, device=device, moments=moments, memory_budget=memory_budget)


def _partition(net, max_regions):
    from .partition import compute_partition
    return compute_partition(net, max_regions=max_regions, prior_masses=False)


def _uniform_slope(net: PiecewiseAffineNet):
    """The activations' common negative-side slope, or None when they differ (PReLU,
    slope-1 units carrying a skip connection)."""
    flat = np.concatenate([np.ravel(a) for a in net.slopes]) if net.slopes else np.zeros(0)
    return float(flat[0]) if flat.size and np.all(flat == flat[0]) else None


# ============================================================================ EM start from a model
@dataclass
class ModelStart:
    """EM's start from a given generator (``model_start``).

    net: the generator with its prior folded into the first layer (prior N(0, I), the
    same distribution of x); var (D,): the initial noise variance; noise: "iso" or
    "diag"; noise_source: "model" (its own noise std), "fitted" (maximum exact
    likelihood on the training rows: the model had none) or "given"; part: the
    partition of net when it was already computed (else None).
    """

    net: PiecewiseAffineNet
    var: np.ndarray
    noise: str
    noise_source: str
    part: object = None


def check_init_dimensions(model, n_columns, latent_dim=None) -> None:
    """CpadgnError unless the init ``model`` outputs ``n_columns`` and has latent
    dimension ``latent_dim`` (None: any)."""
    S, D = model.latent_dim, model.output_dim
    if n_columns != D:
        raise CpadgnError(f"the --init model outputs {D} columns but the training data has {n_columns}; "
                          f"give data with {D} columns or another --init model")
    if latent_dim is not None and int(latent_dim) != S:
        raise CpadgnError(f"--latent-dim {latent_dim} does not match the --init model's latent dimension "
                          f"{S}; drop --latent-dim (it comes from the model) or use another --init")
    if S >= D:
        raise CpadgnError(f"the --init model's latent dimension ({S}) is not below its output dimension "
                          f"({D}); EM fits generators with S < D")


def model_start(model, X, *, latent_dim=None, noise=None, noise_std=None, init_noise: float = 1.0,
                max_regions=None) -> ModelStart:
    """Start EM from a loaded generator ``model`` (a ``model.CPAModel``; anything
    ``cpadgn.load`` takes: a model file, torch.export / TorchScript file, nn.Module).

    Keeps its architecture: every folded layer (``network.PiecewiseAffineNet``; a
    convolution or skip connection is a dense layer there) with its per-unit slopes.
    The prior N(mu, Sigma) is folded into the first layer, which leaves p(x) unchanged.
    Noise: ``noise_std`` when given, else the model's own, else the maximum-likelihood
    isotropic std on the rows X (N, D) by exact likelihood (``CPAModel.fit_noise_std``);
    times ``init_noise``.  noise None: "diag" when that std varies across columns, else
    "iso".  X may have NaN (missing) entries.  CpadgnError when the latent or data
    dimensions do not match.
    """
    from .model import CPAModel, load
    if not isinstance(model, CPAModel):
        model = load(model, cache=False)
    S, D = model.latent_dim, model.output_dim
    X = numeric_array(X).astype(np.float64, copy=False)
    check_init_dimensions(model, X.shape[1] if X.ndim == 2 else X.shape, latent_dim)
    X = check_training_data(X, S)
    part = None
    if noise_std is not None:
        std, source = np.asarray(noise_std, dtype=np.float64), "given"
    elif model.noise_std is not None:
        std, source = np.asarray(model.noise_std, dtype=np.float64), "model"
    else:
        part = model.partition(max_regions=max_regions)
        std, source = np.asarray(model.fit_noise_std(X)), "fitted"
    var = np.broadcast_to(std ** 2, (D,)).astype(np.float64) * float(init_noise) ** 2
    if noise is None:
        noise = "iso" if np.all(var == var[0]) else "diag"
    return ModelStart(model.net, var, noise, source, part)


def check_m_step_memory(net: PiecewiseAffineNet, n_regions: int, budget: float | None) -> None:
    """Refuse a generator whose M-step would not fit in ``budget`` bytes.

    With the regions held fixed, the M-step keeps for each of the ``n_regions`` regions
    that carry posterior mass an n x n normal matrix (and an n x (S + 2) right-hand
    side) for every hidden layer of width n, and one (m + 1) x (m + 1) input moment
    matrix for the layer being solved (m its input width): dense in the widths, so a
    folded convolutional layer of a few thousand units is beyond it.
    """
    check_m_step_widths(net.latent_dim, net.hidden_sizes, n_regions, budget)


def check_m_step_widths(S: int, hidden, n_regions: int, budget: float | None) -> None:
    """``check_m_step_memory`` from the latent dimension and hidden widths; with
    n_regions = 1 also before the generator exists (its weights alone can exceed memory)."""
    if budget is None or not hidden:
        return
    widths = [S, *hidden]
    per_region = sum(n * n + n * (S + 2) for n in hidden) + max((m + 1) ** 2 for m in widths)
    need = 8.0 * n_regions * per_region
    if need > budget:
        raise CpadgnError(f"EM cannot update this generator within the memory budget ({budget:.3g} bytes): "
                          f"its M-step holds a dense n x n matrix per hidden layer (widths "
                          f"{','.join(map(str, hidden))}) for each of the {n_regions:,} region(s) "
                          f"the data reach, about {need:.3g} bytes; raise --memory-budget, or use "
                          "narrower hidden layers")


# ============================================================================ EM
def fit_em(X, latent_dim: int | None, hidden=(32, 32), slope: float = 0.1, max_iter: int = 100,
           tol: float = 1e-5, X_val=None, seed: int = 0, noise: str | None = None, callback=None, *,
           init="ppca", init_noise: float | None = None, sweeps: int = 1, max_halvings: int = 3,
           damping: float = 1e-3, overrelax: bool = True, rtol: float = 1e-6, device="cpu", max_regions=None,
           var_floor: float | None = None, dense_max: int = 1500, timings: bool = False,
           memory_budget: float | None = 2e9) -> FitResult:
    """Fit a generator S -> hidden -> D to the rows X (N, D) (NaN = missing) by exact,
    monotone EM.

    latent_dim S; hidden: widths; slope: the activations' negative-side slope (0 ReLU,
    -1 abs); noise: "iso" (sigma^2 I) or "diag" (None: "iso", or with an init model
    the kind of its noise); X_val (M, D) optional validation rows
    (scored each iteration, never fitted); init: "ppca" (``em.init_ppca``), "random"
    (``em.init_random``), a tuple (net, var (D,)), or a generator to refine: a
    ``CPAModel`` or anything ``cpadgn.load`` reads (a model file, a torch.export or
    TorchScript file, an nn.Module), see ``model_start``: EM keeps its folded
    architecture (hidden, slope and latent_dim, which may be None, come from it) and
    starts from its weights, prior and noise (the maximum-likelihood noise on X when it
    has none); init_noise: the initial noise std as
    a fraction of the initialisation's own (PPCA's maximum-likelihood std, the data
    std for "random", the model's for a model; default 0.1, and 1 for a model): 1 starts
    EM exactly at the PPCA likelihood, where the posteriors
    are broad and EM crawls along a plateau; the default 0.1 starts with sharp
    posteriors (lower initial likelihood, cheaper E-steps) and leaves it in a few
    iterations; memory_budget: bytes the M-step may hold (``check_m_step_memory``;
    None: no limit) and the E-step's batches (at most ``E_STEP_BUDGET``); sweeps:
    bottom-up passes over the layers per M-step; var_floor: lower bound on the noise variance (default 1e-6 times
    the mean column variance); dense_max: largest layer (n_{l+1} (n_l + 1) unknowns)
    solved densely, CG above; rtol: pruning tolerance of the E-step (``em.e_step``): the
    log-likelihoods are exact to log(1 + rtol) per row, a certified bound kept in the
    history.

    Step control (each candidate is scored by the exact log-likelihood on its own new
    partition, and accepted only if that did not go down):
      * the hidden layers' normal equations get a Levenberg-Marquardt term
        ``damping`` * diag (a trust region for the fixed-region surrogate): divided by 3
        after a full step, multiplied by 10 after a damped one;
      * with ``overrelax``, the step old + eta (new - old) is first tried at an
        over-relaxed eta > 1 (adaptive over-relaxed EM, Salakhutdinov and Roweis 2003;
        eta grows by 1.5 after each success, up to 8, and drops to 1 after a failure),
        then at eta = 1, 1/2, ... (``max_halvings`` halvings);
      * then the output layer and noise alone (the partition does not move: a true EM
        step that cannot lower the likelihood).
    A candidate on which float64 rounding may move some row's log-likelihood by more than
    ``numerics.ROUNDING_WARN_NATS`` (``rounding_error_estimate``; as the noise shrinks
    towards a var_floor near 0) is rejected too: its value, and so the comparison, is
    unreliable.  When that leaves no step, EM stops with stop_reason "rounding".

    A generator whose M-step needs more than memory_budget is refused before the first
    step; when the data reach more regions later, EM stops with stop_reason
    "memory_budget" and returns the last iterate (continue with a larger budget and it
    as init).

    callback(row: dict) after every iteration (progress); returning True stops.
    Returns a FitResult.
    """
    from . import em
    t0 = time.perf_counter()
    device = check_arguments(latent_dim=latent_dim, max_iter=max_iter, tol=tol, seed=seed, device=device)
    start = None
    if isinstance(init, str) and init not in ("ppca", "random") and not Path(init).exists():
        raise CpadgnError(f"init={init!r} is neither 'ppca', 'random' nor an existing generator file; pass "
                          "init='ppca', 'random', (net, var), a generator file, a CPAModel or an nn.Module")
    if not isinstance(init, (str, tuple)) or (isinstance(init, str) and init not in ("ppca", "random")):
        init_noise = 1.0 if init_noise is None else init_noise
        start = model_start(init, X, latent_dim=latent_dim, noise=noise, init_noise=init_noise,
                            max_regions=max_regions)
        latent_dim, noise = start.net.latent_dim, start.noise
        hidden, slope = start.net.hidden_sizes, _uniform_slope(start.net)
    if latent_dim is None:
        raise CpadgnError("give the latent dimension (--latent-dim S), or a generator to start from (--init MODEL)")
    noise = "iso" if noise is None else noise
    init_noise = 0.1 if init_noise is None else init_noise
    if init_noise > NOISE_RANGE[1]:      # its square overflowed in init_ppca (small ones meet var_floor)
        raise CpadgnError(f"--init-noise {init_noise:g} is above {NOISE_RANGE[1]:g}; it is a fraction of "
                          "the start's noise std: use e.g. 0.1 or 1")
    if start is None:
        hidden = parse_hidden(hidden)
        check_arguments(slope=slope)
    X = check_training_data(X, latent_dim)
    if X_val is not None:
        X_val = numeric_array(X_val).astype(np.float64, copy=False)
        if X_val.size == 0:
            X_val = None
        else:
            check_training_data(X_val, latent_dim, "validation data", validation=True)
            if X_val.shape[1] != X.shape[1]:
                raise CpadgnError(f"the validation data has {X_val.shape[1]} columns but the training "
                                  f"data {X.shape[1]}; pass validation data with {X.shape[1]} columns")
    if noise not in ("iso", "diag"):
        raise CpadgnError(f"--noise must be 'iso' or 'diag', got {noise!r}; give --noise iso or --noise diag")
    check_m_step_widths(latent_dim, hidden, 1, memory_budget)      # before any weight is drawn
    D = X.shape[1]
    if var_floor is None:
        var_floor = 1e-6 * max(float(np.nanvar(X, 0).mean()), 1e-300)
    # The initialisations see the column means in place of missing entries; EM then
    # treats every missing entry as a latent variable (``em.region_stats``).
    X_init = np.where(np.isnan(X), np.nanmean(X, 0), X)

    part = None
    if start is not None:
        net, var, part = start.net, start.var.copy(), start.part
    elif isinstance(init, tuple):
        net, var = init
        var = np.broadcast_to(np.asarray(var, dtype=np.float64), (D,)).copy()
    elif init == "ppca":
        net, var = em.init_ppca(X_init, latent_dim, hidden, slope, seed, noise_scale=init_noise)
    elif init == "random":
        net, var = em.init_random(X_init, latent_dim, hidden, slope, seed)
        var = var * init_noise ** 2
    else:
        raise ValueError(f"unknown init {init!r}: use 'ppca', 'random' or (net, var)")
    if noise == "iso":
        var = np.full(D, float(var.mean()))
    var = np.maximum(var, var_floor)

    e_budget = E_STEP_BUDGET if memory_budget is None else min(E_STEP_BUDGET, memory_budget)

    def score(net_, part_, var_, rows, moments):
        return em.e_step(net_, part_, _noise_out(var_, noise), rows, rtol=rtol, moments=moments,
                         device=device, memory_budget=e_budget)

    unreliable = [False]             # a candidate of this iteration was rejected for rounding

    def reliable(post_):
        """Whether rounding leaves every row's log-likelihood within ROUNDING_WARN_NATS: as
        the noise shrinks (var_floor near 0) it can swamp the value, and the comparison."""
        if post_.rounding_error.max(initial=0.0) <= ROUNDING_WARN_NATS:
            return True
        unreliable[0] = True
        return False

    def candidate(net_, var_):
        """(partition, E-step, mean log-likelihood) of a candidate, None if over max_regions
        or if rounding makes its log-likelihood unreliable."""
        try:
            part_ = _partition(net_, max_regions)
        except CpadgnError:
            return None
        post_ = score(net_, part_, var_, X, True)
        return (part_, post_, float(post_.log_likelihood.mean())) if reliable(post_) else None

    if part is None:
        part = _partition(net, max_regions)
    post = score(net, part, var, X, True)
    ll = float(post.log_likelihood.mean())
    val = float(score(net, part, var, X_val, False).log_likelihood.mean()) if X_val is not None else np.nan
    rows = []
    lam, eta_or = float(damping), 1.0

    def record(it, step, trials, fallback, gain, post_):
        row = {"iteration": it, "train_loglik": ll, "val_loglik": val,
               "noise_std": float(np.sqrt(var.mean())), "n_regions": part.n_regions,
               "step": step, "rejected": trials, "fallback": int(fallback), "damping": lam,
               "q_gain": gain, "error_bound": float(post_.error_bound.max(initial=0.0))}
        if timings:
            row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        return callback is not None and bool(callback(dict(row)))

    stop = "max_iter"
    if record(0, np.nan, 0, False, np.nan, post):
        stop = "callback"
    else:
        for it in range(1, max_iter + 1):
            stats = em.stats_from_posterior(post, X, net=net, patterns=part.patterns, var=var)
            try:
                check_m_step_memory(net, stats.regions.size, memory_budget)
            except CpadgnError:
                if it == 1:          # nothing trained yet: refuse the generator
                    raise
                stop = "memory_budget"   # the data now reach more regions: keep the iterations done
                break
            patterns = part.patterns[stats.regions]
            new_net, new_var, info = em.m_step(net, patterns, stats, var, noise=noise, sweeps=sweeps,
                                               damping=lam, dense_max=dense_max, var_floor=var_floor)
            etas = ([eta_or] if overrelax and eta_or > 1 else []) + [0.5 ** h for h in range(max_halvings + 1)]
            accepted, trials, unreliable[0] = None, 0, False
            for eta in etas:
                cand, cvar = (new_net, new_var) if eta == 1 else em.interpolate(net, new_net, var, new_var, eta)
                cvar = np.maximum(cvar, var_floor)
                got = candidate(cand, cvar)
                if got is not None and got[2] >= ll:
                    accepted = (cand, cvar, *got, eta, False, info.q_after - info.q_before)
                    break
                trials += 1
            if accepted is None:
                # the output layer and the noise alone: the partition does not move, so
                # this is an exact EM step and cannot lower the likelihood
                cand, cvar, oinfo = em.m_step(net, patterns, stats, var, noise=noise, output_only=True,
                                              var_floor=var_floor)
                cpart = replace(part, fingerprint=cand.fingerprint())
                cpost = score(cand, cpart, cvar, X, True)
                cll = float(cpost.log_likelihood.mean())
                if cll >= ll and reliable(cpost):
                    accepted = (cand, cvar, cpart, cpost, cll, 0.0, True, oinfo.q_after - oinfo.q_before)
            if accepted is None:
                stop = "rounding" if unreliable[0] else "no_improvement"
                break
            net, var, part, post, new_ll, step, fallback, gain = accepted
            # step control for the next iteration
            if step > 1:
                eta_or = min(1.5 * eta_or, 8.0)
            elif overrelax and step == 1:
                eta_or = 1.5 if eta_or <= 1 else 1.0
            else:
                eta_or = 1.0
            lam = max(lam / 3, 1e-9) if step >= 1 else min(lam * 10, 1e6)
            rel = (new_ll - ll) / max(abs(ll), 1.0)
            ll = new_ll
            if X_val is not None:
                val = float(score(net, part, var, X_val, False).log_likelihood.mean())
            if record(it, step, trials, fallback, gain, post):
                stop = "callback"
                break
            if rel < tol and (step >= 1 or fallback):      # a damped step's small gain is no sign
                stop = "tol"
                break
    return FitResult(net=net, noise_std=_noise_out(var, noise), history=_history_arrays(rows),
                     method="em", stop_reason=stop, train_loglik=ll,
                     val_loglik=None if X_val is None else val, n_regions=part.n_regions,
                     options={"latent_dim": int(latent_dim), "hidden": [int(h) for h in hidden],
                              "slope": None if slope is None else float(slope),
                              "max_iter": int(max_iter), "tol": float(tol), "seed": int(seed),
                              "noise": noise, "init": init if isinstance(init, str) and start is None
                              else ("model" if start is not None else "given"),
                              "init_noise": float(init_noise),
                              **({"init_noise_source": start.noise_source} if start is not None else {}),
                              "sweeps": int(sweeps), "max_halvings": int(max_halvings),
                              "damping": float(damping), "overrelax": bool(overrelax), "rtol": float(rtol),
                              "var_floor": float(var_floor), "dense_max": int(dense_max)})


# ============================================================================ VAE
def fit_vae(X, latent_dim: int, hidden=(32, 32), slope: float = 0.1, max_iter: int = 200,
            X_val=None, seed: int = 0, noise: str = "iso", callback=None, *, lr: float = 1e-3,
            batch_size: int = 128, eval_every: int = 10, device="cpu", max_regions=None,
            timings: bool = False, score_train: bool = True, memory_budget: float = 2e9) -> FitResult:
    """The VAE baseline: ``vae.train_vae`` (Adam on the ELBO, same decoder architecture
    as EM) for ``max_iter`` epochs; every ``eval_every`` epochs and at the end the
    decoder's exact mean validation log-likelihood (and region count) is recorded.
    callback(row: dict) after every epoch; returning True stops.  score_train: also
    compute the final exact training log-likelihood (else ``train_loglik`` is NaN);
    memory_budget: bytes the exact likelihoods' batches may hold.
    """
    from .vae import train_vae
    t0 = time.perf_counter()
    device = check_arguments(latent_dim=latent_dim, slope=slope, max_iter=max_iter, seed=seed, device=device)
    hidden = parse_hidden(hidden)
    if max_iter < 1:
        raise CpadgnError("the VAE needs at least one epoch: --max-iter 1 or more")
    X = check_training_data(X, latent_dim, allow_missing=False)
    if X_val is not None and np.asarray(X_val).size:
        X_val = check_training_data(X_val, latent_dim, "validation data", allow_missing=False, validation=True)
    else:
        X_val = None
    if noise not in ("iso", "diag"):
        raise CpadgnError(f"--noise must be 'iso' or 'diag', got {noise!r}; give --noise iso or --noise diag")
    rows = []
    state = {"stop": "epochs"}

    def exact(vae, rows_):
        net = vae.generator()
        part = _partition(net, max_regions)
        post = evaluate(net, part, vae.noise_std(), rows_, device=device, memory_budget=memory_budget)
        return float(post.log_likelihood.mean()), part.n_regions

    def cb(epoch, vae, hist):
        row = {"epoch": epoch, "train_elbo": float(hist[-1]["train_elbo"]), "val_loglik": np.nan,
               "n_regions": -1, "noise_std": float(np.sqrt(np.mean(np.asarray(vae.noise_std()) ** 2)))}
        if X_val is not None and (epoch % max(1, eval_every) == 0 or epoch == max_iter):
            row["val_loglik"], row["n_regions"] = exact(vae, X_val)
        if timings:
            row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if callback is not None and callback(dict(row)):
            state["stop"] = "callback"
            return True
        return False

    res = train_vae(X, latent_dim=latent_dim, hidden=hidden, slope=slope, noise=noise,
                    epochs=max_iter, lr=lr, batch_size=batch_size, seed=seed, callback=cb)
    vae = res.model
    net = vae.generator()
    part = _partition(net, max_regions)
    std = np.asarray(vae.noise_std(), dtype=np.float64)
    mean_ll = lambda rows_: float(evaluate(net, part, std, rows_, device=device,
                                           memory_budget=memory_budget).log_likelihood.mean())
    train_ll = mean_ll(X) if score_train else float("nan")
    val_ll = None
    if X_val is not None:
        val_ll = rows[-1]["val_loglik"] if rows and np.isfinite(rows[-1]["val_loglik"]) \
            else mean_ll(X_val)
    enc_slope = slope if slope >= 0 else 0.1            # as GaussianVAE builds its encoder
    return FitResult(net=net, noise_std=std, history=_history_arrays(rows), method="vae",
                     stop_reason=state["stop"], train_loglik=train_ll, val_loglik=val_ll,
                     n_regions=part.n_regions, encoder=vae.encoder_arrays(), encoder_slope=float(enc_slope),
                     options={"latent_dim": int(latent_dim), "hidden": list(hidden), "slope": float(slope),
                              "max_iter": int(max_iter), "seed": int(seed), "noise": noise, "lr": float(lr),
                              "batch_size": int(batch_size), "eval_every": int(eval_every)})


# ============================================================================ saving
def check_model_suffix(path) -> Path:
    """path as a Path, or a one-line CpadgnError unless it ends in .h5 or .hdf5 (so that a
    data file named by mistake, data.csv, is not replaced by a model file)."""
    path = Path(path)
    if path.suffix.lower() not in (".h5", ".hdf5"):
        raise CpadgnError(f"cannot write {path}: a model file must end in .h5 or .hdf5; name it e.g. "
                          f"{path.with_suffix('.h5').name}")
    return path


def save_fit(path, result: FitResult, *, attrs: dict | None = None) -> None:
    """Write a FitResult as a cpadgn model file (path: .h5 or .hdf5, ``check_model_suffix``):
    weights, prior N(0, I), noise, the options and summary as JSON attrs, the history as
    datasets of /training, and for a VAE its encoder (/encoder).  Deterministic: no
    timestamps."""
    from . import __version__
    path = check_model_suffix(path)
    from .modelfile import save_model
    meta = {"trained_by": f"cpadgn fit --method {result.method}", "cpadgn_version": __version__,
            "method": result.method, "fit_options": result.options, "stop_reason": result.stop_reason,
            "final_train_loglik": result.train_loglik, "final_val_loglik": result.val_loglik,
            "n_regions": result.n_regions}
    if result.encoder_slope is not None:
        meta["encoder_slope"] = result.encoder_slope
    meta.update(attrs or {})
    groups = {"training": dict(result.history)}
    if result.encoder is not None:
        groups["encoder"] = dict(result.encoder)
    save_model(path, result.net, noise_std=result.noise_std, attrs=meta, groups=groups)
