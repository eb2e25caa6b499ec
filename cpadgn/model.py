"""CPAModel: a piecewise-affine generator with a Gaussian prior and Gaussian noise.

    z ~ N(prior_mean, prior_cov),   x | z ~ N(g(z), diag(noise_std^2))

with exact log p(x), p(z | x) and its moments (see ``likelihood``).  The latent space
is partitioned once per generator and the partition is cached (see ``cache``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from . import likelihood
from .errors import CpadgnError
from .network import PiecewiseAffineNet, check_prior, fold_prior
from .numerics import NOISE_RANGE, check_noise_range, is_finite_number, rounding_error_estimate, seeded_rng
from .partition import Partition, compute_partition


@dataclass
class Posterior(likelihood.PosteriorResult):
    """``likelihood.PosteriorResult`` with z_mean and z_cov in the model's own latent
    coordinates (prior N(prior_mean, prior_cov))."""


def default_device() -> torch.device:
    """CUDA when torch sees a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device) -> torch.device:
    """device as a torch.device (None or "auto": CUDA when available), or a one-line
    CpadgnError for a name torch does not know, a device type other than cpu and cuda
    (the work is float64, which MPS lacks; meta, xla, ... compute nothing here), or a GPU
    that is not there (torch says so only at the first computation, as a RuntimeError or
    an AssertionError)."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CpadgnError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}; pass "
                          "e.g. device='cpu'") from None
    if dev.type not in ("cpu", "cuda"):
        raise CpadgnError(f"device must be 'cpu' or 'cuda' (cpadgn computes in float64 there), got {device!r}; "
                          "pass device='cpu'" + (" or device='cuda'" if torch.cuda.is_available() else ""))
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise CpadgnError(f"device={device!r} but torch sees {torch.cuda.device_count()} CUDA GPU(s) here; "
                          "pass device='cpu'" + (" or device='cuda'" if torch.cuda.is_available() else ""))
    return dev


class CPAModel:
    """Exact probabilistic model of a continuous piecewise-affine generator.

    Parameters
    ----------
    net : PiecewiseAffineNet, the generator g: R^S -> R^D.
    prior_mean : (S,), default 0.   prior_cov : (S, S), default I.
    noise_std : scalar or (D,) observation noise standard deviation (required to
        evaluate likelihoods; ``with_noise_std`` sets it later).
    device : torch device for the batched work (None or "auto": CUDA when available).
    cache_path : HDF5 file where the partition is stored and reused (None: no cache).
    memory_budget : bytes the batched work may hold at once.

    Attributes
    ----------
    generator : the PiecewiseAffineNet as given: x = generator.forward(z), z from the prior.
    net : the same with the prior folded into its first layer, fed z ~ N(0, I) (what the
        partition and the integrals use; ``net.forward(z)`` for prior draws z is wrong).
    prior_mean (S,), prior_cov (S, S) : the prior, fixed at construction (``net`` is built
        from them; for another prior build another CPAModel from ``generator``).
    noise_std, device, memory_budget : checked when set, and the region table rebuilt at the next use.
    rtol : pruning tolerance, each log p exact to log(1 + rtol) nats (default 1e-10).
    stderr_target : S >= 4, each row's QMC standard error of log p, nats (default 1e-4).
    """

    def __init__(self, net: PiecewiseAffineNet, *, prior_mean=None, prior_cov=None, noise_std=None,
                 device=None, cache_path=None, memory_budget: float = 2e9):
        if not isinstance(net, PiecewiseAffineNet):
            raise CpadgnError(f"CPAModel takes a cpadgn.PiecewiseAffineNet, got {type(net).__name__}; load a torch "
                              "module or a model file with cpadgn.load(module_or_path, noise_std=...)")
        self.generator = net
        self.prior_mean, self.prior_cov = check_prior("CPAModel", prior_mean, prior_cov, net.latent_dim, fix="pass")
        self.prior_chol = np.linalg.cholesky(self.prior_cov)
        self.net = fold_prior(net, self.prior_mean, self.prior_cov)
        self.noise_std = noise_std          # checked by the property
        self.device = device                # checked by the property
        self.cache_path = None if cache_path is None else Path(cache_path)
        self.memory_budget = memory_budget
        self.rtol = 1e-10                   # pruning: each log p exact to log(1 + rtol) nats (certified)
        self.stderr_target = 1e-4           # S >= 4: each row's QMC standard error of log p, nats
        self.partition_status = None
        self._partition: Partition | None = None
        self._table = None
        self.extra: dict = {}
        self.source_parameters: int | None = None    # a torch source's, set by ``load``

    def __repr__(self) -> str:
        s = self.noise_std
        noise = "None" if s is None else f"{float(s):.6g}" if s.ndim == 0 else \
            f"<{s.size} stds in [{s.min():.6g}, {s.max():.6g}]>"
        return (f"CPAModel(latent_dim={self.latent_dim}, hidden_sizes={self.generator.hidden_sizes}, "
                f"output_dim={self.output_dim}, noise_std={noise}, "
                f"cache_path={None if self.cache_path is None else str(self.cache_path)!r})")

    def __setstate__(self, state: dict) -> None:
        # pickles from before memory_budget, device and noise_std became properties hold them
        # under their own names
        if "memory_budget" in state:
            state["_memory_budget"] = float(state.pop("memory_budget"))
        for name in ("device", "noise_std"):
            if name in state:
                state["_" + name] = state.pop(name)
        self.__dict__.update(state)

    # ------------------------------------------------------------ properties
    @property
    def noise_std(self) -> np.ndarray | None:
        """The observation noise std: a 0-d array, (D,) one per column, or None (no
        likelihood until one is set).  Setting it checks it (finite, > 0, in the range
        float64 handles) and drops the region table built for the old one;
        ``with_noise_std`` gives a copy instead."""
        return self._noise_std

    @noise_std.setter
    def noise_std(self, value) -> None:
        self._noise_std = None if value is None else _check_noise(value, self.output_dim)
        self._table = None

    @property
    def device(self) -> torch.device:
        """The torch device of the batched work.  Set it to move the model ('cpu', 'cuda',
        'auto' or None: CUDA when available; checked by ``check_device``): the region
        table is rebuilt there at the next use."""
        return self._device

    @device.setter
    def device(self, value) -> None:
        self._device = check_device(value)
        self._table = None

    @property
    def memory_budget(self) -> float:
        """Bytes the batched work may use at once (it sets the rows and regions per batch).
        Setting it drops the region table, rebuilt within the new budget at the next use."""
        return self._memory_budget

    @memory_budget.setter
    def memory_budget(self, value) -> None:
        if not (is_finite_number(value) and value > 0):
            raise CpadgnError(f"memory_budget must be a positive number of bytes, got {value!r}; pass e.g. "
                              "memory_budget=2e9")
        self._memory_budget = float(value)
        self._table = None          # its streaming and chunks were sized by the old budget

    @property
    def latent_dim(self) -> int:
        """S, the width of z: ``posterior(X).z_mean`` is (N, S)."""
        return self.net.latent_dim

    @property
    def output_dim(self) -> int:
        """D, the width of x: X is (N, D)."""
        return self.net.output_dim

    @property
    def n_parameters(self) -> int:
        """Generator parameters plus the noise parameters: a torch source's trained
        parameters (``source_parameters``), else the dense weights and biases."""
        n_noise = 0 if self.noise_std is None else int(np.size(self.noise_std))
        return (self.source_parameters or self.net.n_parameters) + n_noise

    def with_noise_std(self, noise_std) -> "CPAModel":
        """A copy with another noise level, sharing the (noise-independent) partition."""
        other = object.__new__(CPAModel)
        other.__dict__.update(self.__dict__)
        other.noise_std = _check_noise(noise_std, self.output_dim)      # None refused here
        return other

    # ------------------------------------------------------------- partition
    def partition(self, *, max_regions=None, progress=None, log=None, notice=None) -> Partition:
        """The exact partition of the latent space, from the cache when it is valid (log,
        notice: ``cache.load_or_compute``'s messages)."""
        if self._partition is None:
            compute = lambda: compute_partition(self.net, max_regions=max_regions, progress=progress,
                                                memory_budget=self.memory_budget)
            if self.cache_path is None:
                part, self.partition_status = compute(), "computed"
            else:
                from .cache import load_or_compute
                part, self.partition_status = load_or_compute(self.net, self.cache_path, compute, log=log,
                                                              notice=notice)
            if max_regions is not None and part.n_regions > max_regions:     # a cached one too
                from .partition import _too_many
                _too_many(part.n_regions, max_regions)
            self._partition = part
        return self._partition

    # ------------------------------------------------------------ likelihood
    def no_noise_reason(self, name="the model") -> str:
        """Why the model has no noise std: its file's unusable one, else that it stores none."""
        return self.extra.get("noise_problem") or f"{name} stores no noise std"

    def _region_table(self):
        if self.noise_std is None:
            raise CpadgnError(f"{self.no_noise_reason()}; pass --noise-std X (or auto), or in Python "
                              "noise_std= to cpadgn.load, or fit it: model.with_noise_std(model.fit_noise_std(X))")
        if self._table is None:
            self._table = likelihood.RegionTable(self.net, self.partition(), self.noise_std, self.device,
                                                 self.memory_budget)
        return self._table

    def posterior(self, X, *, moments: bool = True, progress=None, pairs: bool = True) -> Posterior:
        """Exact log-likelihoods and posteriors of the rows of X (N, D); NaN = missing.
        pairs=False: no per-(row, region) fields (``likelihood.posterior``)."""
        X = self._check_data(X)
        res = likelihood.posterior(self.net, self.partition(), self.noise_std, X,
                                   tab=self._region_table(), device=self.device, rtol=self.rtol,
                                   memory_budget=self.memory_budget, moments=moments,
                                   progress=progress, stderr_target=self.stderr_target, pairs=pairs)
        L = self.prior_chol
        return Posterior(**{**res.__dict__,
                            "z_mean": self.prior_mean + res.z_mean @ L.T,
                            "z_cov": L @ res.z_cov @ L.T,
                            "pair_mean": self.prior_mean + res.pair_mean @ L.T,
                            "pair_cov": L @ res.pair_cov @ L.T})

    def rounding_error(self, X) -> np.ndarray:
        """(N,) estimate of how far float64 rounding may move log p of each row of X (N, D)
        (``Posterior.rounding_error`` without scoring; ``numerics.rounding_error_estimate``)."""
        X = self._check_data(X)
        return rounding_error_estimate(X, self.net.biases[-1], self.noise_std, self.net.weights[-1].shape[1],
                                       self.memory_budget)

    def log_prob(self, X) -> np.ndarray:
        """Exact log p(x_o) per row, (N,), in nats; NaN for a row with nothing observed."""
        return self.posterior(X, moments=False, pairs=False).log_likelihood

    score_samples = log_prob

    def fit_noise_std(self, X, *, bounds=None, progress=None) -> float:
        """Maximum-likelihood isotropic noise std on X by bounded 1-D search on log sigma.

        bounds: (low, high), 0 < low < high, the interval searched (default 1e-4 to 10 times
        the data's std); a result at one of its ends means the optimum lies beyond it.
        Every evaluation is an exact log-likelihood; the partition does not depend on
        the noise, so it is computed once.  ``progress(evaluations, None, message)`` is
        called after each evaluation (message: the sigma tried and its log-likelihood).
        """
        if bounds is not None:
            try:
                ok = len(bounds) == 2 and all(np.isfinite(b) and b > 0 for b in bounds) and bounds[0] < bounds[1]
            except TypeError:
                ok = False
            if not ok:
                raise CpadgnError(f"bounds must be two positive numbers (low, high) with low < high, got "
                                  f"{bounds!r}; pass e.g. bounds=(1e-3, 10.0), or leave it out")
        X = self._check_data(X)
        X = X[~np.isnan(X).all(axis=1)]             # rows with nothing observed carry no information
        if X.size == 0:
            raise CpadgnError("the data have no observed value, so the noise std cannot be fitted; "
                              "pass data with observed entries or a fixed --noise-std X")
        with np.errstate(over="ignore"):
            scale = float(np.nanstd(X)) or 1.0
        lo, hi = bounds if bounds is not None else (1e-4 * scale, 10.0 * scale)
        lo, hi = max(lo, NOISE_RANGE[0]), min(hi, NOISE_RANGE[1])
        if not lo < hi:
            raise CpadgnError(f"the data's spread (entries up to {float(np.nanmax(np.abs(X))):.3g}) puts "
                              "the noise std outside "
                              f"[{NOISE_RANGE[0]:g}, {NOISE_RANGE[1]:g}], where float64 computes "
                              "likelihoods reliably; rescale the data")
        evaluations = 0

        def neg(log_s):
            nonlocal evaluations
            ll = float(np.sum(self.with_noise_std(np.exp(log_s)).log_prob(X)))
            evaluations += 1
            if progress is not None:
                progress(evaluations, None, f"sigma {np.exp(log_s):.6g}: log p {ll:.6g}")
            return -ll
        res = minimize_scalar(neg, bounds=(np.log(lo), np.log(hi)), method="bounded",
                              options={"xatol": 1e-6})
        return float(np.exp(res.x))

    def sample(self, n: int, seed=None) -> np.ndarray:
        """n draws of x from the model, (n, D).  seed: anything ``np.random.default_rng`` takes."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
            raise CpadgnError(f"n must be a non-negative integer, got {n!r}; pass e.g. sample(100)")
        rng = seeded_rng(seed)
        z = rng.standard_normal((n, self.latent_dim))
        x = self.net.forward(z)
        if self.noise_std is not None:
            x = x + rng.standard_normal(x.shape) * self.noise_std
        return x

    def _check_data(self, X) -> np.ndarray:
        """X as float64 (N, D) (``data.check_rows``)."""
        from .data import check_rows
        return check_rows(X, self.output_dim).astype(np.float64, copy=False)

    def impute(self, X, draws=None, seed=None) -> np.ndarray:
        """Exact imputation of the missing entries (NaN) of X (N, D) given the observed ones.

        draws=None: the conditional mean E[x_m | x_o], (N, D); draws=K: K exact draws
        from p(x_m | x_o), (K, N, D) (multiple imputation; the same seed and
        memory_budget, which sets the rows per batch, give the same draws).
        Observed entries are copied bit for bit and X's float dtype is kept.  At S >= 4
        the mean is a QMC estimate: ``imputation(X).mean_stderr`` gives its standard error.
        """
        res = self.imputation(X, draws=draws, seed=seed)
        return res.mean if draws is None else res.draws

    def conditional(self, X, *, full_cov: bool = True):
        """Exact E[x | x_o] (N, D) and Cov[x | x_o] (N, D, D; None with full_cov=False),
        plus the conditional std (N, D): a named tuple (mean, cov, std).  Observed
        entries keep their value with zero variance."""
        from .impute import Conditional
        res = self.imputation(X, std=True, full_cov=full_cov)
        return Conditional(res.mean, res.cov, res.std)

    def imputation(self, X, *, draws=None, seed=None, std: bool = False, full_cov: bool = False,
                   progress=None):
        """Everything ``impute.impute`` gives for X (N, D) with this model's partition,
        device, memory budget, rtol and stderr target: an ``impute.ImputeResult``."""
        from .impute import impute
        return impute(self.net, self.partition(), self.noise_std, X, draws=draws, seed=seed, std=std,
                      full_cov=full_cov, tab=self._region_table(), device=self.device,
                      memory_budget=self.memory_budget, rtol=self.rtol, stderr_target=self.stderr_target,
                      progress=progress)


def _check_noise(noise_std, D: int) -> np.ndarray:
    """noise_std (a number, D of them, a torch tensor: ``data.numeric_array``) as float64,
    or a one-line CpadgnError."""
    from .data import numeric_array
    try:
        s = numeric_array(noise_std).astype(np.float64)
    except (CpadgnError, TypeError, ValueError):
        raise CpadgnError(f"noise std must be a positive number (or {D} of them), got {noise_std!r}; pass e.g. "
                          "noise_std=0.1, or fit it: model.with_noise_std(model.fit_noise_std(X))") from None
    if s.ndim > 1 or (s.ndim == 1 and s.shape[0] != D):
        raise CpadgnError(f"noise std must be a scalar or have {D} entries, got shape {s.shape}; pass one "
                          "std, or one per column")
    bad = np.flatnonzero(~(np.isfinite(s) & (s > 0)))
    if bad.size:                      # the value, not the argument's repr (several lines for a long array)
        got = repr(noise_std) if s.ndim == 0 else f"entry {bad[0]} is {s[bad[0]]:g}"
        raise CpadgnError(f"noise std must be finite and > 0, got {got}; pass positive stds")
    check_noise_range(s)
    return s


def load(path, noise_std=None, *, cache=None, trust_pickle: bool = False, device=None,
         example_input=None) -> CPAModel:
    """Load a generator (cpadgn .h5 model, torch.export .pt2, TorchScript, or a trusted
    pickle; or a live torch nn.Module / ExportedProgram) as a CPAModel.  The partition
    cache defaults to ``<path>.partition.h5`` for files (also ``cache=True``) and to none
    for live modules; ``cache=PATH`` puts it there, ``cache=False`` disables it.
    ``noise_std`` overrides the file's noise.
    ``example_input`` (N, S): how to record a module that is not an nn.Sequential."""
    from .cache import cache_path_for
    from .loading import load_generator
    is_file = isinstance(path, (str, Path))
    if cache is not None and not isinstance(cache, (bool, str, os.PathLike)):
        raise CpadgnError(f"cache must be a path, True, False or None, got {cache!r}; pass e.g. "
                          "cache='gen.partition.h5', or cache=False for none")
    if cache is True and not is_file:
        raise CpadgnError("cache=True needs a model file (the cache goes beside it); for a module "
                          "in memory pass cache=PATH")
    gen = load_generator(path, trust_pickle=trust_pickle, example_input=example_input)
    cache_path = None if cache is False or (cache is None and not is_file) else \
        (cache_path_for(path) if cache is None or cache is True else cache)
    model = CPAModel(gen.net, prior_mean=gen.prior_mean, prior_cov=gen.prior_cov,
                     noise_std=noise_std if noise_std is not None else gen.noise_std,
                     device=device, cache_path=cache_path)
    model.extra = gen.extra
    model.source_format = gen.source_format
    model.source_parameters = gen.n_parameters
    return model
