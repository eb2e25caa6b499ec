"""Model comparison on exact held-out log-likelihood.

Every model is scored row by row with its exact log p(x) on the same test rows, so
two models give paired samples l_a (N,), l_b (N,) and everything below is a
statistic of the per-row differences d = l_a - l_b (nats):

- mean per-row log-likelihood and its standard error  SE = sd / sqrt(N)
  (sd the sample standard deviation, ddof = 1), and the total sum(l);
- paired difference: mean(d), SE(d) = sd(d) / sqrt(N), the normal 95% interval
  mean(d) -/+ 1.959964 SE(d);
- Vuong's (1989) test for non-nested models:  z = sqrt(N) mean(d) / sd(d)
  (= mean(d) / SE(d)), two-sided p = 2 (1 - Phi(|z|)).  The model with the higher
  mean is preferred when p < 0.05, otherwise "no significant difference".  When
  sd(d) = 0 (e.g. a model against itself) z = 0 and p = 1: no NaN.  Vuong's test
  assumes the models are not nested and the rows are independent; on held-out data
  no complexity correction is applied (the held-out likelihood already pays for it);
- the numerical resolution of a pair: the mean over rows of both models' certified
  pruning bounds plus their float64 rounding estimates (``CPAModel.rounding_error``).
  A mean difference within it is no verdict, whatever z says: two parametrisations of
  one distribution (PPCA rotated by R, W R R^T = W W^T) differ by rounding only, ~1e-14
  nats a row, and that rounding is systematic enough for z = 15.5 (p = 2e-54) on 2,000
  rows;
- with training data: AIC = 2k - 2 LL_train and BIC = k log(n_train) - 2 LL_train,
  LL_train the exact training log-likelihood and k = ``CPAModel.n_parameters``
  (every weight and bias plus the noise parameters: a raw count, which
  over-counts the identifiable parameters of a network or of PPCA's rotation);
- for a model file with an encoder (a VAE): the exact ELBO per row, and the exact
  gap log p(x) - ELBO(x) = KL(q(z|x) || p(z|x)) >= 0 (see ``cpadgn.vae.exact_elbo``);
- a probabilistic-PCA baseline fitted on the training rows (``cpadgn.ppca``), scored
  by the same engine, so every comparison has the linear model as a reference.

``compare(models, X_test, X_train=None, baseline=None)`` returns a
``CompareResult``; ``to_dict()`` gives its JSON form.  Identical inputs give
identical results (no clocks or random numbers enter the numbers; wall times are
kept apart and left out of ``to_dict`` unless asked for).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .data import numeric_array
from .errors import CpadgnError

Z95 = 1.959963984540054          # the 97.5% point of N(0, 1)
LEVEL = 0.05
NO_DIFFERENCE = "no significant difference"


# ===================================================================== statistics
def sample_sd(v: np.ndarray) -> float:
    """Standard deviation (ddof = 1) of v (N,), N >= 2, computed on the deviations over their
    largest magnitude: log-likelihoods reach 1e200 in magnitude (numerics.MAX_WHITENED_SQ),
    whose squares overflow."""
    dev = v - v.mean()
    scale = float(np.abs(dev).max())
    return scale * float(np.std(dev / scale, ddof=1)) if scale > 0 else 0.0


def mean_and_se(values) -> tuple[float, float]:
    """Mean of values (N,) and its standard error sd / sqrt(N) (ddof = 1); N >= 2."""
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size < 2:
        raise CpadgnError(f"a standard error needs at least 2 rows, got shape {v.shape}; pass a 1-D array of 2 or "
                          "more values")
    return float(v.mean()), sample_sd(v) / math.sqrt(v.size)


def vuong_test(ll_a, ll_b) -> tuple[float, float]:
    """Vuong's z statistic and two-sided p-value from per-row log-likelihoods (N,), (N,).

    z = sqrt(N) mean(d) / sd(d), d = ll_a - ll_b, sd with ddof = 1; z > 0 favours a.
    sd(d) = 0 gives z = 0, p = 1.
    """
    d = np.asarray(ll_a, dtype=np.float64) - np.asarray(ll_b, dtype=np.float64)
    if d.ndim != 1 or d.size < 2:
        raise CpadgnError(f"Vuong's test needs at least 2 paired rows, got shape {d.shape}; pass two 1-D arrays "
                          "of per-row log-likelihoods of the same 2 or more rows")
    sd = sample_sd(d)
    if sd == 0.0:
        return 0.0, 1.0
    z = math.sqrt(d.size) * float(d.mean()) / sd
    return z, math.erfc(abs(z) / math.sqrt(2.0))    # 2 Phi(-|z|); no scipy at start-up


@dataclass
class PairStats:
    """Paired comparison of two models on the same N rows (all in nats per row)."""

    mean_difference: float        # mean(ll_a - ll_b)
    se: float                     # sd(d) / sqrt(N)
    ci_low: float                 # normal 95% interval of the mean difference
    ci_high: float
    vuong_z: float
    p_value: float


def paired_difference(ll_a, ll_b) -> PairStats:
    """Mean per-row difference ll_a - ll_b (N,) with SE, 95% interval and Vuong's test."""
    d = np.asarray(ll_a, dtype=np.float64) - np.asarray(ll_b, dtype=np.float64)
    mean, se = mean_and_se(d)
    z, p = vuong_test(ll_a, ll_b)
    return PairStats(mean, se, mean - Z95 * se, mean + Z95 * se, z, p)


def preferred(name_a: str, name_b: str, stats: PairStats, level: float = LEVEL,
              resolution: float = 0.0) -> str:
    """The name of the model preferred at ``level``, or "no significant difference" (also
    when |mean difference| <= resolution, the nats per row that the numbers themselves
    are uncertain by)."""
    if stats.p_value < level and stats.vuong_z != 0.0 and abs(stats.mean_difference) > resolution:
        return name_a if stats.vuong_z > 0 else name_b
    return NO_DIFFERENCE


def information_criteria(train_log_likelihood: float, k: int, n: int) -> tuple[float, float]:
    """AIC = 2k - 2 LL and BIC = k log(n) - 2 LL from a total training log-likelihood."""
    return 2.0 * k - 2.0 * train_log_likelihood, k * math.log(n) - 2.0 * train_log_likelihood


# ===================================================================== results
@dataclass
class ModelRow:
    """One model's figures on the test rows (and the training rows, when given).

    Log-likelihoods are in nats.  ``max_error_bound`` is the largest certified bound
    on |error| of a row's log p from pruning; ``mean_log_likelihood_mc_se`` the Monte
    Carlo standard error of the mean from quasi-Monte Carlo region masses (0 for
    S <= 3, where they are exact).  ELBO fields are None for models without an encoder.
    """

    rank: int
    name: str
    kind: str                      # "generator", "vae" or "ppca"
    n_rows: int
    mean_log_likelihood: float
    mean_log_likelihood_se: float
    total_log_likelihood: float
    n_parameters: int
    latent_dim: int
    n_regions: int
    max_error_bound: float
    mean_log_likelihood_mc_se: float
    noise_std: float | list | None = None   # the one scored with (given, stored or fitted)
    n_train: int | None = None
    train_log_likelihood: float | None = None
    aic: float | None = None
    bic: float | None = None
    mean_elbo: float | None = None
    mean_elbo_se: float | None = None
    mean_gap: float | None = None
    mean_gap_se: float | None = None
    max_elbo_error_bound: float | None = None
    seconds: float = 0.0


@dataclass
class PairRow:
    """Model a against model b (a ranked above b): d = ll_a - ll_b per test row."""

    model_a: str
    model_b: str
    n_rows: int
    mean_difference: float
    se: float
    ci_low: float
    ci_high: float
    vuong_z: float
    p_value: float
    preferred: str
    numerical_resolution: float   # mean over rows of both models' error bound + rounding estimate


@dataclass
class CompareResult:
    """Per-model rows (best first), pairwise rows (every pair, a ranked above b),
    notes, and the per-row arrays behind them (not part of ``to_dict``):
    ``log_likelihoods[name]`` (N,) and ``elbos[name]`` (N,)."""

    models: list
    pairs: list
    n_test: int
    n_train: int | None
    notes: list = field(default_factory=list)
    log_likelihoods: dict = field(default_factory=dict, repr=False)
    elbos: dict = field(default_factory=dict, repr=False)

    def to_dict(self, *, timings: bool = False) -> dict:
        """JSON-ready dict (NaN and inf become None).  Wall times only with timings=True,
        so that identical inputs give byte-identical reports."""
        def row(r):
            d = asdict(r)
            if not timings:
                d.pop("seconds", None)
            return {k: _clean(v) for k, v in d.items()}
        return {"n_test": self.n_test, "n_train": self.n_train,
                "models": [row(m) for m in self.models], "pairs": [row(p) for p in self.pairs],
                "notes": list(self.notes)}

    def model(self, name: str) -> ModelRow:
        """The row of the model called name (KeyError naming the others if none)."""
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(f"no model named {name!r}; use one of {[m.name for m in self.models]}")

    def pair(self, a: str, b: str) -> PairRow:
        """The row of a against b in either order (as stored: the better-ranked first)."""
        for p in self.pairs:
            if (p.model_a, p.model_b) in ((a, b), (b, a)):
                return p
        raise KeyError(f"no pair {a!r} / {b!r}; use two different names of {[m.name for m in self.models]}")


def _clean(v):
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


# ===================================================================== orchestration
def parse_baseline(spec) -> int | None | bool:
    """'ppca' -> None (K = the first model's latent dim), 'ppca:K' -> K; None -> False."""
    if spec is None or spec is False:
        return False
    s = str(spec).strip().lower()
    if s == "ppca":
        return None
    if s.startswith("ppca:"):
        try:
            K = int(s[5:])
        except ValueError:
            K = 0
        if K >= 1:
            return K
    raise CpadgnError(f"unknown baseline {spec!r}; use 'ppca' or 'ppca:K' with K a positive integer")


def _named_models(models) -> list:
    """[(name, CPAModel)] from a mapping, or a sequence of models / model paths."""
    from .model import CPAModel, load
    if isinstance(models, Mapping):
        items = [(str(k), v) for k, v in models.items()]
    elif isinstance(models, (CPAModel, str, Path)) or not isinstance(models, Iterable):
        items = [(None, models)]
    else:
        items = [tuple(m) if isinstance(m, tuple) else (None, m) for m in models]
    out, seen = [], {}
    for i, (name, m) in enumerate(items):
        if isinstance(m, (str, Path)):
            name = name or str(m)
            m = load(m)
        elif isinstance(getattr(m, "model_", None), CPAModel):      # a fitted CPADGN / CPADGNDetector
            m = m.model_
        elif any(c.__module__ == "cpadgn.estimator" for c in type(m).__mro__):    # (without importing sklearn)
            raise CpadgnError(f"model {i + 1} is a {type(m).__name__} that is not fitted yet; call its "
                              "fit(X_train) first")
        elif not isinstance(m, CPAModel):
            raise CpadgnError(f"model {i + 1} is a {type(m).__name__}, not a CPAModel or a model path; "
                              "pass CPAModel objects, fitted cpadgn estimators or model file paths")
        name = name or f"model_{i + 1}"
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:            # the same file twice: keep both, distinctly named
            name = f"{name}#{seen[name]}"
        out.append((name, m))
    if not out:
        raise CpadgnError("no models to compare; give at least one model")
    return out


def check_dimensions(dims: dict, X_test=None, X_train=None, names=("the test data", "the training data")) -> int:
    """Refuse (CpadgnError) models of different data dimensions {name: D}, or data whose
    columns differ from D, or fewer than 2 test rows, or no training row.  names: the
    test and training data in the messages.  Returns D."""
    if len(set(dims.values())) > 1:
        listed = ", ".join(f"{n}: D={d}" for n, d in dims.items())
        raise CpadgnError(f"the models have different data dimensions ({listed}); only models of "
                          "the same data can be compared")
    D = next(iter(dims.values()))
    for what, X in zip(names, (X_test, X_train)):
        if X is None:
            continue
        X = np.asarray(X)
        if X.ndim != 2:
            raise CpadgnError(f"{what} must be a 2-D table, got shape {X.shape}; pass an (N, {D}) "
                              "array, one row per sample")
        if X.shape[1] != D:
            raise CpadgnError(f"{what} has {X.shape[1]} columns but the models output "
                              f"D={D}; pass data with {D} columns")
        if np.isinf(X).any():
            raise CpadgnError(f"{what} has infinite values; replace them (NaN marks missing)")
    if X_test is not None and np.asarray(X_test).shape[0] < 2:
        raise CpadgnError(f"the test data has {np.asarray(X_test).shape[0]} row(s) with an observed "
                          "entry; standard errors need at least 2: pass more test rows")
    if X_train is not None and np.asarray(X_train).shape[0] == 0:
        raise CpadgnError("the training data has no row with an observed entry, so there is no "
                          "training log-likelihood (AIC, BIC) to compute: pass training rows with "
                          "observed values, or drop --train")
    return D


def compare(models, X_test, X_train=None, baseline=None, *, progress=None, log=None,
            posterior=None) -> CompareResult:
    """Compare models by exact held-out log-likelihood.

    models: a mapping {name: CPAModel or path}, or a sequence of CPAModels, model paths
        or (name, model) pairs (named by path, else model_1, model_2, ...; a repeated
        name gets "#2", "#3"); all with the same output dim D and a noise std.  A fitted
        CPADGN or CPADGNDetector stands for its model_.
    X_test: (N, D) test rows, N >= 2; NaN = missing (scored by the exact marginal of the
        observed entries; the ELBO is then not computed); rows with nothing observed are
        left out, with a note.
    X_train: optional (n, D) training rows: AIC and BIC from the exact training
        log-likelihood, and the data the PPCA baseline is fitted on.
    baseline: None, "ppca" (K = the first model's latent dim) or "ppca:K".
    progress: optional callable(done, total, message) over models;  log: callable(str).
    posterior: optional callable(model, X) -> an object with log_likelihood, error_bound
        and stderr (N,) that scores the rows elsewhere (``cpadgn.dask.scorer``: on a
        Dask cluster); default ``model.posterior(X, moments=False, pairs=False)``.

    Returns a CompareResult, models sorted by mean test log-likelihood (best first; ties
    by name), pairs for every pair with the better-ranked model as a.
    """
    X_test = numeric_array(X_test).astype(np.float64, copy=False)
    X_train = None if X_train is None else numeric_array(X_train).astype(np.float64, copy=False)
    named = _named_models(models)
    notes, kinds = [], {}
    X_test = _drop_unobserved(X_test, "test", notes)
    X_train = None if X_train is None else _drop_unobserved(X_train, "training", notes)
    check_dimensions({name: m.output_dim for name, m in named}, X_test, X_train)
    K = parse_baseline(baseline)
    if K is not False:
        from .ppca import fit_ppca
        if X_train is None:
            raise CpadgnError("the PPCA baseline is fitted on training data: pass X_train (--train)")
        K = named[0][1].latent_dim if K is None else K
        ppca = fit_ppca(X_train, K, device=named[0][1].device)
        name = f"ppca:{K}"
        while name in {n for n, _ in named}:
            name += "'"
        named.append((name, ppca))
        kinds[name] = "ppca"
    has_nan = bool(np.isnan(X_test).any())
    if has_nan:
        notes.append("the test data has missing values: rows are scored by the exact marginal "
                     "likelihood of their observed entries; ELBOs are not computed")

    rows, lls, elbos, errors = [], {}, {}, {}
    for i, (name, m) in enumerate(named):
        if progress is not None:
            progress(i, len(named), name)
        t0 = time.perf_counter()
        row, ll, elbo, errors[name] = _score_model(name, m, kinds.get(name, "generator"), X_test, X_train,
                                                   has_nan, notes, posterior)
        row.seconds = time.perf_counter() - t0
        rows.append(row)
        lls[name] = ll
        if elbo is not None:
            elbos[name] = elbo
        if log is not None:
            log(f"{name}: mean log p {row.mean_log_likelihood:.6g} ({row.seconds:.2f} s)")
    if progress is not None:
        progress(len(named), len(named), "")

    rows.sort(key=lambda r: (-r.mean_log_likelihood, r.name))
    for rank, r in enumerate(rows, 1):
        r.rank = rank
    pairs = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            st = paired_difference(lls[a.name], lls[b.name])
            resolution = float(np.mean(errors[a.name] + errors[b.name]))
            verdict = preferred(a.name, b.name, st, resolution=resolution)
            pairs.append(PairRow(a.name, b.name, X_test.shape[0], st.mean_difference, st.se,
                                 st.ci_low, st.ci_high, st.vuong_z, st.p_value, verdict, resolution))
            if verdict != preferred(a.name, b.name, st):                   # the resolution alone decided
                notes.append(f"{a.name} and {b.name}: their mean difference ({st.mean_difference:.2g} nats) is "
                             f"within the numerical resolution of the two log-likelihoods ({resolution:.2g} "
                             "nats per row: pruning bounds plus rounding), so it is rounding, not a "
                             "difference: no verdict, whatever z and p say")
    return CompareResult(models=rows, pairs=pairs, n_test=int(X_test.shape[0]),
                         n_train=None if X_train is None else int(X_train.shape[0]),
                         notes=notes, log_likelihoods=lls, elbos=elbos)


def _drop_unobserved(X, what: str, notes: list) -> np.ndarray:
    """X (N, D) without its rows that have nothing observed (their log p is undefined,
    NaN), with a note saying how many were left out."""
    if X.ndim != 2:
        return X                      # check_dimensions says what is wrong
    empty = np.isnan(X).all(axis=1)
    if empty.any():
        notes.append(f"{int(empty.sum())} {what} row(s) have nothing observed (all NaN): left out "
                     "of every figure")
    return X[~empty]


def _score_model(name, m, kind, X_test, X_train, has_nan, notes, posterior=None):
    from .vae import exact_elbo, model_encoder
    if m.noise_std is None:
        raise CpadgnError(f"{name} has no noise std; pass --noise-std X (or auto with --train)")
    posterior = posterior or (lambda model, X: model.posterior(X, moments=False, pairs=False))
    post = posterior(m, X_test)
    ll = post.log_likelihood
    numerical_error = post.error_bound + m.rounding_error(X_test)           # (N,) nats
    mean, se = mean_and_se(ll)
    n = ll.size
    row = ModelRow(rank=0, name=name, kind=kind, n_rows=n, mean_log_likelihood=mean,
                   mean_log_likelihood_se=se, total_log_likelihood=float(ll.sum()),
                   n_parameters=int(m.n_parameters), latent_dim=int(m.latent_dim),
                   n_regions=int(m.partition().n_regions),
                   max_error_bound=float(post.error_bound.max()),
                   mean_log_likelihood_mc_se=float(np.sqrt((post.stderr ** 2).sum()) / n),
                   noise_std=np.asarray(m.noise_std, dtype=np.float64).tolist())
    if X_train is not None:
        ll_train = float(posterior(m, X_train).log_likelihood.sum())
        row.n_train = int(X_train.shape[0])
        row.train_log_likelihood = ll_train
        row.aic, row.bic = information_criteria(ll_train, row.n_parameters, row.n_train)
    elbo = None
    enc = model_encoder(m)
    if enc is not None:
        row.kind = "vae"
        if not has_nan:
            res = exact_elbo(m, X_test, encoder=enc)
            elbo = res.elbo
            row.mean_elbo, row.mean_elbo_se = mean_and_se(elbo)
            row.mean_gap, row.mean_gap_se = mean_and_se(ll - elbo)
            row.max_elbo_error_bound = float(res.error_bound.max())
            if np.any(res.stderr > 0):
                notes.append(f"{name}: S = {m.latent_dim} >= 4, so the ELBO's region masses are "
                             f"quasi-Monte Carlo (largest per-row standard error "
                             f"{float(res.stderr.max()):.2e})")
    return row, ll, elbo, numerical_error
