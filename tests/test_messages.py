"""Bad input to the Python API is refused with one line that says what is wrong and
what to do (README, Python API: "Errors are CpadgnError with one line that says what
to do"; the command line's cases are tests/test_faults.py).  Each case is a call a
user can make with a wrong argument; the message must be one line, name the problem
and then, after "; ", the remedy."""
import numpy as np
import pytest

from cpadgn.errors import CpadgnError

from oracles import random_net


def _net():
    return random_net(2, (4,), 3, seed=1)


def _model():
    from cpadgn.model import CPAModel
    return CPAModel(_net(), noise_std=0.3, device="cpu")


def _save(tmp_path, **kw):
    from cpadgn.modelfile import save_model
    save_model(tmp_path / "m.h5", _net(), noise_std=0.3, **kw)


def _fit_estimator(scale=1.0, **kw):
    from cpadgn.estimator import CPADGN
    CPADGN(**kw).fit(scale * np.random.default_rng(0).normal(size=(20, 3)))


def _fit_em(**kw):
    from cpadgn.fit import fit_em
    args = {"latent_dim": 1, "hidden": (4,), "max_iter": 1, **kw}
    fit_em(np.random.default_rng(0).normal(size=(20, 3)), args.pop("latent_dim"), **args)


CASES = [
    # (id, call(tmp_path), exception, what is wrong, what to do)
    ("mean_and_se one row", lambda t: __import__("cpadgn.comparison").comparison.mean_and_se([1.0]),
     CpadgnError, "needs at least 2 rows", "pass a 1-D array of 2 or more values"),
    ("vuong one row", lambda t: __import__("cpadgn.comparison").comparison.vuong_test([1.0], [2.0]),
     CpadgnError, "needs at least 2 paired rows", "pass two 1-D arrays"),
    ("write_table lengths", lambda t: __import__("cpadgn.data").data.write_table(t / "x.csv", {"a": [1, 2], "b": [1]}),
     ValueError, "columns have different lengths", "pass columns of one length N"),
    ("write_table name", lambda t: __import__("cpadgn.data").data.write_table(t / "x.csv", {"a/b": [1]}),
     ValueError, "invalid column name", "use a non-empty name without '/'"),
    ("write_array 1-D", lambda t: __import__("cpadgn.data").data.write_array(t / "x.npy", np.zeros(3)),
     ValueError, "needs a 2-D or 3-D array", "pass rows (N, D) or draws (K, N, D)"),
    ("net shapes", lambda t: __import__("cpadgn.network").network.PiecewiseAffineNet.from_arrays(
        [np.ones((4, 2)), np.ones((3, 5))], [np.ones(4), np.ones(3)], [0.1]),
     ValueError, "consecutive layer shapes do not match", "pass weights whose input width"),
    ("intervals at S = 2", lambda t: __import__("cpadgn.partition").partition.compute_partition(_net(), method="intervals"),
     ValueError, "needs a 1-dimensional latent space, got S = 2", "use method='auto' or 'subdivision'"),
    ("max_regions 0", lambda t: __import__("cpadgn.partition").partition.compute_partition(_net(), max_regions=0),
     ValueError, "max_regions must be positive, got 0", "pass 1 or more, or None"),
    ("ppca one row", lambda t: __import__("cpadgn.ppca").ppca.ppca_parameters(np.ones((1, 3)), 1),
     CpadgnError, "needs at least 2 training rows, got 1", "pass more rows with --train"),
    ("mcar fraction", lambda t: __import__("cpadgn.impute").impute.mcar_mask(np.ones((2, 3)), 1.5),
     CpadgnError, "must be in (0, 1), got 1.5", "pass a fraction such as 0.2"),
    ("impute draws 0", lambda t: _model().imputation(np.full((1, 3), np.nan), draws=0),
     CpadgnError, "draws must be a positive integer, got 0", "pass draws=1 or more"),
    # draws=True was read as 1 draw; a 1-D row was 'the data has shape (3,) columns but the
    # generator outputs 3' in imputation but 'pass X.reshape(1, -1)' in log_prob
    ("impute draws True", lambda t: _model().imputation(np.full((1, 3), np.nan), draws=True),
     CpadgnError, "draws must be a positive integer, got True", "pass draws=1 or more"),
    ("impute one 1-D row", lambda t: _model().impute(np.array([1.0, np.nan, 0.0])),
     CpadgnError, "must be a 2-D array (N, 3), got one row of shape (3,)", "pass X.reshape(1, -1)"),
    ("impute strings", lambda t: _model().impute([["a", "b", "c"]]),
     CpadgnError, "the data are not a numeric array", "pass an (N, 3) array of numbers"),
    ("impute complex", lambda t: _model().impute(np.ones((1, 3), complex)),
     CpadgnError, "the data are not a numeric array (complex numbers)", "pass an (N, 3) array of numbers"),
    # sample(-1), sample(2.5), sample(True) were numpy's 'negative dimensions are not allowed',
    # TypeErrors, or (True) one draw
    ("sample -1", lambda t: _model().sample(-1),
     CpadgnError, "n must be a non-negative integer, got -1", "pass e.g. sample(100)"),
    ("sample 2.5", lambda t: _model().sample(2.5),
     CpadgnError, "n must be a non-negative integer, got 2.5", "pass e.g. sample(100)"),
    ("sample True", lambda t: _model().sample(True),
     CpadgnError, "n must be a non-negative integer, got True", "pass e.g. sample(100)"),
    # random_state=-1 was numpy's 'expected non-negative integer' from inside EM
    ("estimator random_state -1", lambda t: _fit_estimator(random_state=-1),
     ValueError, "random_state must be None, a non-negative int or a numpy RandomState, got -1",
     "pass e.g. random_state=0"),
    # data of spread 1e-120 were fitted to a noise std of 5e-121 that no command can use
    # (a saved model then refused by score); at 1e-200 the variances underflowed and the
    # refusal said 'every column of the training data is constant'
    ("estimator tiny spread", lambda t: _fit_estimator(latent_dim=1, hidden=(4,), max_iter=1, scale=1e-120),
     ValueError, "the training data vary too little for float64: the columns' rms std is", "rescale"),
    ("ppca tiny spread", lambda t: __import__("cpadgn.ppca").ppca.ppca_parameters(
        1e-200 * np.random.default_rng(0).normal(size=(20, 3)), 1),
     CpadgnError, "vary too little for float64", "rescale (standardise) the columns"),
    # a bad device was torch's RuntimeError, a missing GPU an AssertionError at the first
    # computation ('Torch not compiled with CUDA enabled'), not at load
    ("load device tpu", lambda t: __import__("cpadgn.model").model.CPAModel(_net(), device="tpu"),
     CpadgnError, "device must be a torch device such as 'cpu' or 'cuda', got 'tpu'", "pass e.g. device='cpu'"),
    ("load device cuda:99", lambda t: __import__("cpadgn.model").model.CPAModel(_net(), device="cuda:99"),
     CpadgnError, "device='cuda:99' but torch sees", "pass device='cpu'"),
    # a device type torch knows but cpadgn cannot compute on was accepted, and failed at the
    # first log_prob: 'PyTorch is not linked with support for mps devices' (a RuntimeError;
    # MPS has no float64 anyway), 'Tensor.item() cannot be called on meta tensors'
    ("load device mps", lambda t: __import__("cpadgn.model").model.CPAModel(_net(), device="mps"),
     CpadgnError, "device must be 'cpu' or 'cuda' (cpadgn computes in float64 there), got 'mps'", "pass device='cpu'"),
    # setting the attribute skipped the check, and an existing region table stayed on the
    # old device: the next log_prob was torch's AssertionError or RuntimeError
    ("set model.device mps", lambda t: setattr(_model(), "device", "mps"),
     CpadgnError, "device must be 'cpu' or 'cuda'", "pass device='cpu'"),
    ("set model.noise_std -1", lambda t: setattr(_model(), "noise_std", -1),
     CpadgnError, "noise std must be finite and > 0, got -1", "pass positive stds"),
    # the message held the argument's repr: several lines for a masked array or a long one
    ("noise std masked entry", lambda t: __import__("cpadgn.model").model.CPAModel(
        _net(), noise_std=np.ma.masked_array([0.1, 0.2, 0.3], [0, 1, 0])),
     CpadgnError, "noise std must be finite and > 0, got entry 1 is nan", "pass positive stds"),
    ("with_noise_std None", lambda t: _model().with_noise_std(None),
     CpadgnError, "noise std must be finite and > 0, got None", "pass positive stds"),
    ("load device meta", lambda t: __import__("cpadgn.model").model.CPAModel(_net(), device="meta"),
     CpadgnError, "device must be 'cpu' or 'cuda'", "pass device='cpu'"),
    ("estimator device mps", lambda t: _fit_estimator(latent_dim=1, hidden=(4,), max_iter=1, device="mps"),
     ValueError, "device must be 'cpu' or 'cuda'", "pass device='cpu'"),
    # rows=[1.7] drew row 1, rows=True row 1
    ("plot rows 1.7", lambda t: __import__("cpadgn.plot").plot.partition(_model(), np.zeros((3, 3)), rows=[1.7]),
     CpadgnError, "rows must be row numbers (integers, counted from 0), got [1.7]", "pass e.g. rows=[0, 5]"),
    ("plot rows True", lambda t: __import__("cpadgn.plot").plot.partition(_model(), np.zeros((3, 3)), rows=True),
     CpadgnError, "rows must be row numbers (integers, counted from 0), got True", "pass e.g. rows=[0, 5]"),
    ("noise std auto", lambda t: __import__("cpadgn.model").model.CPAModel(_net(), noise_std="auto"),
     CpadgnError, "noise std must be a positive number (or 3 of them), got 'auto'", "model.fit_noise_std(X)"),
    ("noise std length", lambda t: __import__("cpadgn.model").model.CPAModel(_net(), noise_std=[0.1, 0.2]),
     CpadgnError, "must be a scalar or have 3 entries", "pass one std, or one per column"),
    # were ValueErrors, where the README promises CpadgnError for every bad input
    ("load cache 3", lambda t: __import__("cpadgn.model").model.load(__import__("torch").nn.Linear(2, 3),
                                                                     noise_std=0.1, cache=3),
     CpadgnError, "cache must be a path, True, False or None, got 3", "cache=False for none"),
    ("load module cache True", lambda t: __import__("cpadgn.model").model.load(__import__("torch").nn.Linear(2, 3),
                                                                               noise_std=0.1, cache=True),
     CpadgnError, "cache=True needs a model file", "pass cache=PATH"),
    ("CPAModel of a torch module", lambda t: __import__("cpadgn.model").model.CPAModel(__import__("torch").nn.Linear(2, 3)),
     CpadgnError, "CPAModel takes a cpadgn.PiecewiseAffineNet, got Linear", "cpadgn.load(module_or_path, noise_std=...)"),
    ("CPAModel prior not positive definite",
     lambda t: __import__("cpadgn.model").model.CPAModel(_net(), prior_cov=[[1.0, 2.0], [2.0, 1.0]], noise_std=0.3),
     CpadgnError, "CPAModel: the prior covariance is not positive definite", "pass a positive-definite one"),
    ("CPAModel prior not numeric", lambda t: __import__("cpadgn.model").model.CPAModel(_net(), prior_mean="a"),
     CpadgnError, "CPAModel: the latent prior is not numeric", "pass a prior mean (2,) and covariance (2, 2)"),
    ("CPAModel prior mean shape", lambda t: __import__("cpadgn.model").model.CPAModel(_net(), prior_mean=[0.0]),
     CpadgnError, "CPAModel: prior mean has shape (1,)", "pass a prior mean of shape (2,)"),
    ("prior not symmetric", lambda t: _save(t, prior_cov=[[1.0, 0.5], [0.0, 1.0]]),
     CpadgnError, "the prior covariance is not symmetric", "save the model with a symmetric one"),
    ("reserved group", lambda t: _save(t, groups={"generator": {"x": np.ones(2)}}),
     ValueError, "is reserved or empty", "use another name"),
    ("pvalues n_samples 0", lambda t: __import__("cpadgn.anomaly").anomaly.pvalues(_model(), np.zeros(2), n_samples=0),
     CpadgnError, "n_samples must be a positive integer, got 0", "pass e.g. n_samples=1000"),
    # a pandas row (df.iloc[0], a Series) was told to use X.reshape(1, -1), which a Series lacks
    ("log_prob of a Series", lambda t: _model().log_prob(__import__("pandas").DataFrame(np.zeros((2, 3))).iloc[0]),
     CpadgnError, "got one row of shape (3,)", "pass df.iloc[[i]], a one-row frame"),
    # a string budget was "'>' not supported between instances of 'float' and 'str'" from inside
    ("memory_budget string", lambda t: setattr(_model(), "memory_budget", "2e9"),
     CpadgnError, "memory_budget must be a positive number of bytes, got '2e9'", "pass e.g. memory_budget=2e9"),
    ("memory_budget 0", lambda t: __import__("cpadgn.model").model.CPAModel(_net(), memory_budget=0),
     CpadgnError, "memory_budget must be a positive number of bytes, got 0", "pass e.g. memory_budget=2e9"),
    # "row 2" alone is ambiguous in Python, where that row is X[1]
    ("log_prob inf", lambda t: _model().log_prob(np.array([[0.0, 1.0, 2.0], [0.0, np.inf, 1.0]])),
     CpadgnError, "row 2, column 2 (X[1, 1]) is inf", "replace it with a finite value"),
    ("estimator row of NaN", lambda t: __import__("cpadgn.estimator").estimator.CPADGN(
        latent_dim=1, hidden=(), max_iter=1).fit(np.random.default_rng(0).normal(size=(20, 3))).score_samples(
        np.array([[0.0, 1.0, 2.0], [np.nan] * 3])),
     ValueError, "row 2 (X[1]) has no observed value (all NaN)", "drop such rows"),
    # reversed bounds were blamed on the data ("the data's spread ... rescale the data"); a
    # negative low end was silently raised to 1e-100
    ("fit_noise_std reversed bounds", lambda t: _model().fit_noise_std(np.zeros((2, 3)), bounds=(0.5, 0.1)),
     CpadgnError, "bounds must be two positive numbers (low, high) with low < high, got (0.5, 0.1)",
     "pass e.g. bounds=(1e-3, 10.0)"),
    ("fit_noise_std negative bound", lambda t: _model().fit_noise_std(np.zeros((2, 3)), bounds=(-1, 0.1)),
     CpadgnError, "bounds must be two positive numbers", "or leave it out"),
    # the remedy named only --noise-std X (or auto), which is not a Python argument
    ("model without noise std", lambda t: __import__("cpadgn.model").model.CPAModel(_net()).log_prob(np.zeros((1, 3))),
     CpadgnError, "the model stores no noise std", "model.with_noise_std(model.fit_noise_std(X))"),
    ("hidden width 0", lambda t: __import__("cpadgn.fit").fit.parse_hidden("32,0"),
     CpadgnError, "hidden layer widths must be positive integers", "give widths of 1 or more like --hidden 32,32"),
    ("estimator contamination", lambda t: _fit_estimator(contamination=0.9),
     ValueError, "contamination must be in (0, 0.5], got 0.9", "e.g. contamination=0.1"),
    # fit_em / fit_vae from Python: a float latent_dim was used (1.5), hidden=(8.5,) became 8,
    # max_iter=-1 and tol=-1 were run, and the rest failed deep inside: '<' not supported
    # between 'str' and 'int', 'int' object is not iterable, numpy's 'expected non-negative
    # integer', 'could not convert string to float', torch's 'Torch not compiled with CUDA
    # enabled' (an AssertionError), and init='pca' was 'generator file pca does not exist'
    ("fit_em latent_dim 1.5", lambda t: _fit_em(latent_dim=1.5),
     CpadgnError, "latent_dim must be a positive integer, got 1.5", "pass e.g. latent_dim=2"),
    ("fit_em latent_dim str", lambda t: _fit_em(latent_dim="1"),
     CpadgnError, "latent_dim must be a positive integer, got '1'", "pass e.g. latent_dim=2"),
    ("fit_em hidden 8.5", lambda t: _fit_em(hidden=(8.5,)),
     CpadgnError, "hidden layer widths must be positive integers, got (8.5,)", "hidden=(32, 32) in Python"),
    ("fit_em max_iter -1", lambda t: _fit_em(max_iter=-1),
     CpadgnError, "max_iter must be a non-negative integer, got -1", "pass e.g. max_iter=100"),
    ("fit_em max_iter 1.5", lambda t: _fit_em(max_iter=1.5),
     CpadgnError, "max_iter must be a non-negative integer, got 1.5", "pass e.g. max_iter=100"),
    ("fit_em tol -1", lambda t: _fit_em(tol=-1),
     CpadgnError, "tol must be a finite number >= 0, got -1", "pass e.g. tol=1e-5"),
    ("fit_em tol True", lambda t: _fit_em(tol=True),          # was read as 1
     CpadgnError, "tol must be a finite number >= 0, got True", "pass e.g. tol=1e-5"),
    ("fit_em seed -1", lambda t: _fit_em(seed=-1),
     CpadgnError, "seed must be a non-negative integer, got -1", "pass e.g. seed=0"),
    ("fit_em slope str", lambda t: _fit_em(slope="relu"),
     CpadgnError, "slope must be a finite number, got 'relu'", "pass e.g. slope=0.1"),
    ("fit_em device mps", lambda t: _fit_em(device="mps"),
     CpadgnError, "device must be 'cpu' or 'cuda'", "pass device='cpu'"),
    ("fit_em init pca", lambda t: _fit_em(init="pca"),
     CpadgnError, "init='pca' is neither 'ppca', 'random' nor an existing generator file", "pass init='ppca'"),
    ("fit_vae seed -1", lambda t: __import__("cpadgn.fit").fit.fit_vae(np.zeros((4, 3)), 1, (4,), seed=-1),
     CpadgnError, "seed must be a non-negative integer, got -1", "pass e.g. seed=0"),
    # was 'is a CPADGN, not a CPAModel or a model path; pass ... fitted cpadgn estimators'
    ("compare unfitted estimator", lambda t: __import__("cpadgn.comparison").comparison.compare(
        {"det": __import__("cpadgn.estimator").estimator.CPADGN()}, np.zeros((3, 3))),
     CpadgnError, "model 1 is a CPADGN that is not fitted yet", "call its fit(X_train) first"),
    # a user's subclass was 'is a MyDetector, not a CPAModel or a model path'
    ("compare unfitted subclass", lambda t: __import__("cpadgn.comparison").comparison.compare(
        [type("MyDetector", (__import__("cpadgn.estimator").estimator.CPADGNDetector,), {})()], np.zeros((3, 3))),
     CpadgnError, "model 1 is a MyDetector that is not fitted yet", "call its fit(X_train) first"),
    ("dask chunk rows 0", lambda t: __import__("cpadgn.dask").dask.chunk_rows_for(None, requested=0),
     CpadgnError, "--chunk-rows must be a positive number of rows, got 0", "give 1 or more"),
]


@pytest.mark.parametrize("call,error,wrong,remedy", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_says_what_is_wrong_and_what_to_do(tmp_path, call, error, wrong, remedy):
    with pytest.raises(error) as info:
        call(tmp_path)
    message = str(info.value.args[0])
    assert "\n" not in message
    head, sep, tail = message.partition("; ")
    assert sep and wrong in head and remedy in tail, message
    assert list(tmp_path.iterdir()) == []                    # nothing written on the way
