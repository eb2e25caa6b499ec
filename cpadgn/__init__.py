"""cpadgn: exact likelihoods, posteriors and EM for piecewise-affine deep generative networks.

    >>> import cpadgn
    >>> model = cpadgn.load("sample_data/wave_generator.h5")
    >>> model.partition().n_regions
    >>> model.log_prob(X)          # exact log p(x), NaN = missing
    >>> model.posterior(X).z_mean  # exact E[z | x]
    >>> cpadgn.CPADGN(latent_dim=2).fit(X_train).predict(X_test)   # scikit-learn outlier detector
"""
from .errors import CpadgnError

__version__ = "0.1.0"
__all__ = ["CPADGN", "CPADGNDetector", "CPAModel", "CpadgnError", "PiecewiseAffineNet", "compare", "load",
           "__version__"]


def __getattr__(name):
    """Everything loads on first use, so that ``import cpadgn`` (and ``cpadgn --help``) imports
    neither numpy nor torch: the model imports torch (the command line refuses bad input
    before that import); the estimators import scikit-learn (optional)."""
    if name == "PiecewiseAffineNet":
        from .network import PiecewiseAffineNet
        return PiecewiseAffineNet
    if name == "compare":
        from .comparison import compare
        return compare
    if name in ("CPAModel", "load"):
        from . import model
        return getattr(model, name)
    if name in ("CPADGN", "CPADGNDetector"):
        from . import estimator
        return getattr(estimator, name)
    raise AttributeError(f"module 'cpadgn' has no attribute {name!r}")


def __dir__():
    """The loaded-on-first-use names too, so that tab completion offers them."""
    return sorted(set(globals()) | set(__all__))
