"""The README's Python examples run as printed ("Bring your own decoder" and "Python
API", their first code blocks), on small stand-ins for the names they leave to the
reader (a decoder, X, gen.pt2, vae.h5), and give what their comments say."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

import cpadgn
from cpadgn.data import read_data

from oracles import kappa_rounding_tol

ROOT = Path(__file__).resolve().parents[1]


def first_python_block(heading: str) -> str:
    """The first ```python block after the README line ``heading``."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n" + heading + "\n")
    return re.compile(r"```python\n(.*?)```", re.S).search(text, start).group(1)


def small_decoder(D: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 12), nn.ReLU(), nn.Linear(12, 12), nn.LeakyReLU(0.1),
                         nn.Linear(12, D)).eval()


class Reshaping(nn.Module):
    """Not an nn.Sequential: loaded through torch.export with example_input."""

    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, z):
        return self.decoder(z.reshape(-1, 1, 2).flatten(1))


def test_bring_your_own_decoder_example():
    decoder = small_decoder(5)
    X = np.random.default_rng(0).normal(size=(6, 5))
    ns = {"decoder": decoder, "S": 2, "custom": Reshaping(decoder), "X": X}
    exec(first_python_block("## Bring your own decoder"), ns)
    model = ns["model"]                                       # the example's last one: `custom`
    a = model.posterior(X)
    b = cpadgn.load(decoder, noise_std=0.1).posterior(X)      # read layer by layer, not exported
    assert a.log_likelihood.shape == (6,) and np.all(np.isfinite(a.log_likelihood))
    # the same function loaded two ways: equal up to rounding and the two pruning bounds
    tol = 2 * kappa_rounding_tol(model, X, a) + a.error_bound + b.error_bound
    assert np.all(np.abs(a.log_likelihood - b.log_likelihood) <= tol)


def test_python_api_example(tmp_path, monkeypatch):
    (tmp_path / "sample_data").mkdir()
    shutil.copy(ROOT / "sample_data" / "digits_generator.h5", tmp_path / "sample_data")
    shutil.copy(ROOT / "sample_data" / "digits_vae.h5", tmp_path / "vae.h5")
    torch.export.save(torch.export.export(small_decoder(64), (torch.zeros(2, 2),)), tmp_path / "gen.pt2")
    test = read_data(ROOT / "sample_data" / "digits_test.csv")
    X = test[:12].copy()
    X[:4, :20] = np.nan
    X[4] = np.nan                                                  # nothing observed
    ns = {"X": X, "X_test": test[20:50], "X_train": read_data(ROOT / "sample_data" / "digits_train.csv")[:150]}
    monkeypatch.chdir(tmp_path)
    exec(first_python_block("## Python API"), ns)
    N, D = X.shape
    assert (tmp_path / "gen.pt2.partition.h5").exists()            # "cached in gen.pt2.partition.h5"
    ll, post, filled = ns["ll"], ns["post"], ns["filled"]
    assert ll.shape == (N,) and np.isnan(ll[4]) and np.all(np.isfinite(np.delete(ll, 4)))
    assert post.z_mean.shape == (N, 2) and post.z_cov.shape == (N, 2, 2)
    observed = ~np.isnan(X)
    assert filled.shape == (N, D) and np.array_equal(filled[observed], X[observed])
    assert np.all(np.isfinite(filled))
    assert ns["res"].pair("em", "vae").preferred in ("em", "vae", "no significant difference")
    report = json.loads(json.dumps(ns["res"].to_dict()))           # JSON-ready
    assert {m["name"] for m in report["models"]} == {"em", "vae", "ppca:2"}


def test_alpha_figures_quoted_for_the_bundled_digits():
    """The README's `--alpha` paragraph: `--alpha 0.01 --samples 5000` (seed 0) flags 70
    of the 300 test digits; rows drawn from the model average log p 30.3 nats, its
    training rows 30.1, the test rows 25.0 (the figures as printed, to their last digit)."""
    from cpadgn.anomaly import pvalues
    text = " ".join((ROOT / "README.md").read_text().split())
    assert ("`--alpha 0.01 --samples 5000` flags 70 of the 300 test rows" in text
            and "average log p 30.3 nats and its training rows 30.1, the held-out digits 25.0" in text)
    model = cpadgn.load(ROOT / "sample_data" / "digits_generator.h5", cache=False)
    test = read_data(ROOT / "sample_data" / "digits_test.csv")
    ll = model.log_prob(test)
    pv = pvalues(model, ll, n_samples=5000, seed=0)
    assert len(ll) == 300 and int((pv.pvalue < 0.01).sum()) == 70
    assert f"{pv.reference_log_prob.mean():.1f}" == "30.3" and f"{ll.mean():.1f}" == "25.0"
    train = model.log_prob(read_data(ROOT / "sample_data" / "digits_train.csv"))
    assert f"{train.mean():.1f}" == "30.1"


def test_public_api_has_docstrings():
    """help() on what the README names documents it: every public class, function, method
    and property of the modules the Python API sections import has a docstring
    (CPAModel.latent_dim, PiecewiseAffineNet.output_dim, default_device, ... had none)."""
    import importlib
    import inspect
    missing = []
    for name in ("cpadgn.model", "cpadgn.network", "cpadgn.fit", "cpadgn.anomaly", "cpadgn.estimator",
                 "cpadgn.comparison", "cpadgn.impute", "cpadgn.dask", "cpadgn.plot", "cpadgn.loading",
                 "cpadgn.modelfile"):
        mod = importlib.import_module(name)
        for attr, obj in vars(mod).items():
            if attr.startswith("_") or getattr(obj, "__module__", None) != name:
                continue
            if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if not inspect.getdoc(obj):
                missing.append(f"{name}.{attr}")
            if inspect.isclass(obj):
                missing += [f"{name}.{attr}.{a}" for a, v in vars(obj).items() if not a.startswith("_")
                            and (inspect.isfunction(v) or isinstance(v, property)) and not (v.__doc__ or "").strip()]
    assert missing == []


def test_rubins_rules_example_pools_the_csv_draws(tmp_path, monkeypatch):
    """The README's pooling example (impute --draws K to CSV, then Rubin's rules) runs on the
    CSV layout as written and gives Rubin's pooled mean, total variance and t interval, here
    recomputed from the same draws taken from Python; its row id is DATA's row."""
    from click.testing import CliRunner
    from scipy import stats

    from cli.main import main
    from cpadgn.model import CPAModel
    from cpadgn.modelfile import save_model
    from oracles import random_net

    net = random_net(2, (6, 6), 4, seed=2, slope=0.1, scale=1.5)
    save_model(tmp_path / "gen.h5", net, noise_std=0.3)
    model = CPAModel(net, noise_std=0.3, device="cpu")
    X = model.sample(30, seed=1)
    X[np.random.default_rng(0).random(X.shape) < 0.4] = np.nan
    np.savetxt(tmp_path / "holes.csv", X, delimiter=",")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["impute", "gen.h5", "holes.csv", "-o", "mi.csv", "--draws", "20", "-q"])
    assert r.exit_code == 0, r.output
    ns = {}
    exec(first_python_block("#### Multiple imputation: pooling with Rubin's rules"), ns)
    K, N = 20, len(X)
    assert np.array_equal(ns["mi"][".id"], np.tile(np.arange(N), K))
    d = model.impute(X, draws=K, seed=0)[:, :, 0]         # the CLI's default --seed 0
    q, u = d.mean(1), d.var(1, ddof=1) / N
    b = q.var(ddof=1)
    t = u.mean() + (1 + 1 / K) * b
    nu = (K - 1) * (1 + u.mean() / ((1 + 1 / K) * b)) ** 2
    half = stats.t.ppf(0.975, nu) * np.sqrt(t)
    np.testing.assert_allclose([ns["qbar"], ns["t"], ns["df"]], [q.mean(), t, nu], rtol=1e-10)
    np.testing.assert_allclose(ns["ci"], [q.mean() - half, q.mean() + half], rtol=1e-10)
