"""cpadgn: exact likelihoods, posteriors and EM for piecewise-affine deep generative networks.

    >>> import cpadgn
    >>> model = cpadgn.load("sample_data/wave_generator.h5")
    >>> model.partition().n_regions
    >>> model.log_prob(X)          # exact log p(x), NaN = missing
    >>> model.posterior(X).z_mean  # exact E[z | x]
"""
from .compare import compare
from .errors import CpadgnError
from .model import CPAModel, load
from .network import PiecewiseAffineNet

__version__ = "0.1.0"
__all__ = ["CPAModel", "CpadgnError", "PiecewiseAffineNet", "compare", "load", "__version__"]
