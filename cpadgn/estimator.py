"""scikit-learn and PyOD style estimators around an EM-trained piecewise-affine generator.

``CPADGN`` is a scikit-learn outlier detector (OutlierMixin conventions, like
IsolationForest): ``score_samples`` is the exact log-likelihood (higher = more normal),
``decision_function = score_samples - offset_`` with ``offset_`` the ``contamination``
quantile of the training scores, ``predict`` gives +1 (inlier) / -1 (outlier).

``CPADGNDetector`` follows PyOD's conventions instead: ``decision_function`` is the
anomaly score -log p(x) (higher = more abnormal), with ``decision_scores_``,
``threshold_``, ``labels_`` (0/1), ``predict`` (0/1) and ``predict_proba``.  It does not
import PyOD.

Both fit the generator by exact EM (``cpadgn.fit.fit_em``) and score with the exact
likelihood: the same data give the same scores on every call, and NaN entries in the
data are missing values: ``fit`` runs EM on the observed entries (missing ones are
latent), and ``score_samples``, ``decision_function``, ``predict`` and ``transform``
use the exact marginal likelihood of the observed entries.  Both need scikit-learn
>= 1.6 (an optional dependency).
"""
from __future__ import annotations

import numpy as np

from .errors import CpadgnError
from .numerics import is_finite_number, is_integer

try:
    from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, OutlierMixin, TransformerMixin
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("cpadgn.CPADGN and cpadgn.CPADGNDetector need scikit-learn >= 1.6: "
                      "pip install scikit-learn") from e


class EstimatorInputError(CpadgnError, ValueError):
    """Bad data or parameters given to an estimator: a CpadgnError that is also the
    ValueError scikit-learn's conventions ask for."""


def _seed(random_state) -> int | None:
    """An int seed for numpy's default_rng / fit_em from a scikit-learn random_state."""
    if random_state is None:
        return None
    if is_integer(random_state) and random_state >= 0:       # numpy's seeds are non-negative
        return int(random_state)
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(np.iinfo(np.int32).max))
    raise EstimatorInputError(f"random_state must be None, a non-negative int or a numpy RandomState, "
                              f"got {random_state!r}; pass e.g. random_state=0")


def _plain(X):
    """A torch tensor or a numpy masked array as cpadgn's model methods read it
    (``data.numeric_array``: a tensor that requires grad detached, bfloat16 as float64,
    masked entries NaN), before scikit-learn's validation, which raises torch's
    RuntimeError or TypeError for the first two and reads the values under the mask;
    anything else as given (a DataFrame keeps its feature names)."""
    if type(X).__module__.split(".")[0] != "torch" and not isinstance(X, np.ma.MaskedArray):
        return X
    from .data import numeric_array
    try:
        return numeric_array(X)
    except CpadgnError as e:
        raise EstimatorInputError(str(e)) from None


_PARAMETERS = """
    Parameters
    ----------
    latent_dim : int, S (1 <= S < n_features; S <= 3 keeps every quantity deterministic,
        S >= 4 uses quasi-Monte Carlo region masses with a standard error).
    hidden : tuple of int, hidden layer widths of the generator S -> hidden -> D.
    slope : float, negative-side slope of the activations (0 ReLU, 0.1 leaky ReLU,
        -1 absolute value).
    max_iter : int, EM iterations at most.
    tol : float >= 0, EM stops when the relative gain of the mean log-likelihood is below it.
    noise : "iso" (sigma^2 I) or "diag" (one variance per feature).
    contamination : float in (0, 0.5], the expected fraction of outliers in the training
        data; sets the decision threshold.
    random_state : None, int >= 0 or RandomState: seeds the random units of EM's
        initialisation (the PPCA part is deterministic); None means seed 0.
    device : torch device for the batched linear algebra ("cpu", "cuda"; "auto": CUDA when
        available).

    Attributes
    ----------
    model_ : cpadgn.CPAModel, the fitted generator with its exact likelihood.
    n_features_in_ : int, the number of features D.
    n_iter_ : int, EM iterations run (the last one may have been rejected).
    fit_result_ : cpadgn.fit.FitResult, the EM history.
"""


class _CPABase(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """Fitting and exact scoring shared by ``CPADGN`` and ``CPADGNDetector``.  transform's
    columns are named like FactorAnalysis's (``get_feature_names_out``: cpadgn0, cpadgn1, ...),
    so ``set_output(transform="pandas")`` works (TransformerMixin here, where transform is
    defined: scikit-learn wraps only the transform of a TransformerMixin's own class)."""

    def __init__(self, latent_dim=2, hidden=(32, 32), slope=0.1, max_iter=100, tol=1e-5, noise="iso",
                 contamination=0.1, random_state=None, device="cpu"):
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.slope = slope
        self.max_iter = max_iter
        self.tol = tol
        self.noise = noise
        self.contamination = contamination
        self.random_state = random_state
        self.device = device

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True          # NaN entries are missing values, in fit and scoring
        return tags

    # ----------------------------------------------------------------- fitting
    def _check_params(self, n_features: int) -> tuple:
        """Refuse bad parameters in one line each; return the hidden widths and the torch device."""
        if not (isinstance(self.contamination, (float, int, np.floating)) and 0 < self.contamination <= 0.5):
            raise EstimatorInputError(f"contamination must be in (0, 0.5], got {self.contamination!r}; pass "
                                      "the expected fraction of outliers, e.g. contamination=0.1")
        S = self.latent_dim
        if not is_integer(S) or S < 1:
            raise EstimatorInputError(f"latent_dim must be a positive integer, got {S!r}; pass e.g. latent_dim=2")
        if S >= n_features:
            raise EstimatorInputError(f"latent_dim={S} needs data with more than {S} features, got "
                                      f"n_features = {n_features}; lower latent_dim")
        if not is_integer(self.max_iter) or self.max_iter < 0:
            raise EstimatorInputError(f"max_iter must be a non-negative integer, got {self.max_iter!r}; pass "
                                      "e.g. max_iter=100")
        if not (is_finite_number(self.tol) and self.tol >= 0):
            raise EstimatorInputError(f"tol must be a finite number >= 0, got {self.tol!r}; pass e.g. tol=1e-5")
        if self.noise not in ("iso", "diag"):
            raise EstimatorInputError(f"noise must be 'iso' or 'diag', got {self.noise!r}; pass noise='iso' or "
                                      "noise='diag'")
        if not is_finite_number(self.slope):
            raise EstimatorInputError(f"slope must be a finite number, got {self.slope!r}; pass e.g. slope=0.1 "
                                      "(0 for ReLU)")
        return self._hidden_widths(), self._check_device()

    def _check_device(self):
        from .model import check_device
        try:
            return check_device(self.device)
        except CpadgnError as e:
            raise EstimatorInputError(str(e)) from None

    def _hidden_widths(self) -> tuple:
        """hidden as a tuple of widths (``fit.parse_hidden``: a width of 8.5 is refused,
        not truncated; a string is read as by ``cpadgn fit``)."""
        from .fit import parse_hidden
        try:
            return parse_hidden(self.hidden)
        except CpadgnError:
            pass
        raise EstimatorInputError(f"hidden must be a tuple of positive integer layer widths, got {self.hidden!r}; "
                                  "pass e.g. hidden=(32, 32), or () for a linear generator")

    def _fit_model(self, X):
        """Validate X, fit the generator by EM, set model_ and friends; return X (N, D)."""
        from .fit import fit_em
        from .model import CPAModel
        X = validate_data(self, _plain(X), dtype=np.float64, ensure_min_samples=2, ensure_all_finite="allow-nan")
        hidden, device = self._check_params(X.shape[1])
        try:
            res = fit_em(X, int(self.latent_dim), hidden=hidden, slope=float(self.slope),
                         max_iter=int(self.max_iter), tol=float(self.tol), seed=_seed(self.random_state) or 0,
                         noise=self.noise, device=device)
        except CpadgnError as e:
            raise EstimatorInputError(str(e)) from None
        self.fit_result_ = res
        self.n_iter_ = len(res.history["train_loglik"]) - 1 + (res.stop_reason == "no_improvement")
        self.model_ = CPAModel(res.net, noise_std=res.noise_std, device=device)
        self._n_features_out = self.model_.latent_dim          # transform's columns
        return X

    # ----------------------------------------------------------------- scoring
    def _check_X(self, X):
        check_is_fitted(self, "model_")
        X = validate_data(self, _plain(X), dtype=np.float64, reset=False, ensure_all_finite="allow-nan")
        empty = np.flatnonzero(np.isnan(X).all(axis=1))
        if empty.size:                 # as in fit: a row with nothing observed has no score
            raise EstimatorInputError(f"row {empty[0] + 1} (X[{empty[0]}]) has no observed value (all NaN), so "
                                      "it has no likelihood to score; drop such rows")
        return X

    def score_samples(self, X):
        """Exact log p(x_o) per row (N,), in nats; NaN entries are missing."""
        X = self._check_X(X)
        return self.model_.log_prob(X)

    def score(self, X, y=None):
        """Mean exact log-likelihood per row (NaN entries missing)."""
        return float(np.mean(self.score_samples(X)))

    def transform(self, X):
        """The exact posterior mean E[z | x_o] per row, (N, S)."""
        X = self._check_X(X)
        return self.model_.posterior(X).z_mean

    def sample(self, n_samples=1, random_state=None):
        """n_samples rows drawn from the fitted model, (n_samples, D).  random_state
        defaults to the estimator's (same seed, same draws; None means seed 0, as in fit; a
        RandomState advances at each call, as in scikit-learn)."""
        check_is_fitted(self, "model_")
        if not is_integer(n_samples) or n_samples < 0:
            raise EstimatorInputError(f"n_samples must be a non-negative integer, got {n_samples!r}; pass e.g. "
                                      "n_samples=100")
        seed = _seed(self.random_state if random_state is None else random_state)
        return self.model_.sample(int(n_samples), seed=0 if seed is None else seed)


class CPADGN(OutlierMixin, _CPABase):
    __doc__ = """Exact-likelihood outlier detector: a piecewise-affine deep generative
    network fitted by EM, with scikit-learn's outlier-detector conventions.

    score_samples(X) is the exact log-likelihood log p(x) (NaN entries: the exact
    marginal of the observed ones), decision_function(X) = score_samples(X) - offset_
    (negative for outliers), predict(X) is +1 for inliers and -1 for outliers,
    transform(X) the exact posterior mean E[z | x], sample(n) draws from the model,
    score(X) the mean log-likelihood.  Standardise the features first (EM fits one
    isotropic noise by default).
    """ + _PARAMETERS + """    offset_ : float, the ``contamination`` quantile of the training
        log-likelihoods (like IsolationForest's offset_).

    Notes
    -----
    scikit-learn's ``check_estimator`` passes, including its checks with NaN entries.

    Examples
    --------
    >>> det = CPADGN(latent_dim=2, hidden=(16, 16), max_iter=30, random_state=0).fit(X_train)
    >>> det.predict(X_test)            # +1 inlier, -1 outlier
    >>> det.score_samples(X_test)      # exact log p(x), NaN entries allowed
    """

    def fit(self, X, y=None):
        """Fit by EM on the rows X (N, D) (NaN = missing); y is ignored."""
        X = self._fit_model(X)
        self.offset_ = float(np.percentile(self.model_.log_prob(X), 100.0 * self.contamination))
        return self

    def decision_function(self, X):
        """score_samples(X) - offset_, (N,): negative for outliers."""
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """+1 for inliers, -1 for outliers, (N,) int."""
        return np.where(self.decision_function(X) < 0, -1, 1)


class CPADGNDetector(_CPABase):
    __doc__ = """PyOD-style detector: the same exact-likelihood model with PyOD's
    conventions, so it drops into PyOD pipelines (without importing PyOD).

    decision_function(X) = -log p(x) (higher = more abnormal; NaN entries missing),
    decision_scores_ the training rows' scores, threshold_ their (1 - contamination)
    quantile, labels_ = (decision_scores_ > threshold_) as 0/1, predict(X) likewise,
    predict_proba(X) the outlier probability by min-max scaling of the training scores
    ('linear') or by the Gaussian error function ('unify'), as PyOD does.
    score_samples(X) and score(X) keep scikit-learn's sign: log p(x) and its mean (higher =
    more normal, so -decision_function(X); cross_val_score maximises the likelihood).
    """ + _PARAMETERS + """    decision_scores_ : (N,) anomaly scores of the training rows.
    threshold_ : float, the (1 - contamination) quantile of decision_scores_.
    labels_ : (N,) int, 0 inlier, 1 outlier.
    """

    def fit(self, X, y=None):
        """Fit by EM on the rows X (N, D) (NaN = missing); y is ignored (unsupervised)."""
        X = self._fit_model(X)
        self.decision_scores_ = -self.model_.log_prob(X)
        self.threshold_ = float(np.percentile(self.decision_scores_, 100.0 * (1 - self.contamination)))
        self.labels_ = (self.decision_scores_ > self.threshold_).astype(int)
        return self

    def decision_function(self, X):
        """Anomaly scores -log p(x_o), (N,): higher = more abnormal."""
        return -self.score_samples(X)

    def predict(self, X, return_confidence=False):
        """0 for inliers, 1 for outliers (score above threshold_), (N,) int."""
        if return_confidence:
            raise EstimatorInputError("return_confidence is not supported by CPADGNDetector; call it without "
                                      "return_confidence")
        return (self.decision_function(X) > self.threshold_).astype(int)

    def fit_predict(self, X, y=None):
        """fit(X) then labels_."""
        return self.fit(X).labels_

    def predict_proba(self, X, method="linear", return_confidence=False):
        """Outlier probability (N, 2): columns [P(inlier), P(outlier)].

        method 'linear': the anomaly score min-max scaled by the training scores and
        clipped to [0, 1]; 'unify': erf((score - mean) / (std sqrt 2)) of the training
        scores, clipped to [0, 1] (Kriegel et al. 2011), both as in PyOD.
        """
        from scipy.special import erf
        if return_confidence:
            raise EstimatorInputError("return_confidence is not supported by CPADGNDetector; call it without "
                                      "return_confidence")
        s = self.decision_function(X)
        train = self.decision_scores_
        if method == "linear":
            span = train.max() - train.min()
            p = (s - train.min()) / (span if span > 0 else 1.0)
        elif method == "unify":
            sd = train.std()
            p = erf((s - train.mean()) / ((sd if sd > 0 else 1.0) * np.sqrt(2)))
        else:
            raise EstimatorInputError(f"method must be 'linear' or 'unify', got {method!r}; pass method='linear' "
                                      "or method='unify'")
        p = np.clip(p, 0.0, 1.0)
        return np.column_stack([1.0 - p, p])
