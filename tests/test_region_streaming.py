"""Region maps streamed in chunks (DESIGN section 9): a transposed-convolution decoder
scored and imputed under a memory budget too small for its per-region maps gives the
results of an unlimited budget up to rounding, and its peak memory stays within budget.

The decoder: Linear(2, 2*4*4), ReLU, ConvTranspose2d(2, 2, 4, 2, 1), ReLU,
ConvTranspose2d(2, 1, 4, 2, 1) (160 hidden units, D = 256, ~9,000 regions at S = 2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cpadgn
from cpadgn.model import CPAModel
from cpadgn.modelfile import save_model

from oracles import kappa_rounding_tol, posterior_spread
from test_resources import CLI, peak_rss

SMALL = 4e7          # bytes: a quarter holds ~1,000 regions of maps (of ~9,000)


def conv_decoder():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2 * 4 * 4), nn.Unflatten(1, (2, 4, 4)), nn.ReLU(),
                         nn.ConvTranspose2d(2, 2, 4, 2, 1), nn.ReLU(),
                         nn.ConvTranspose2d(2, 1, 4, 2, 1), nn.Flatten()).double().eval()


@pytest.fixture(scope="module")
def conv(tmp_path_factory):
    """(model file, cache, net, noise std, rows: 12 complete, 8 with 30% missing) drawn
    from the model, the noise 0.2 times the RMS of its outputs."""
    tmp = tmp_path_factory.mktemp("conv")
    net = cpadgn.load(conv_decoder()).net
    sigma = 0.2 * float(np.sqrt(np.mean(net.forward(np.random.default_rng(0).standard_normal((2000, 2))) ** 2)))
    path = tmp / "conv.h5"
    save_model(path, net, noise_std=sigma)
    cache = tmp / "conv.h5.partition.h5"
    CPAModel(net, noise_std=sigma, device="cpu", cache_path=cache).partition()
    X = CPAModel(net, noise_std=sigma).sample(20, seed=1)
    rng = np.random.default_rng(2)
    X[12:][rng.random((8, X.shape[1])) < 0.3] = np.nan
    return path, cache, net, sigma, X


def models(conv):
    _, cache, net, sigma, _ = conv
    return [CPAModel(net, noise_std=sigma, device="cpu", cache_path=cache, memory_budget=b) for b in (2e9, SMALL)]


def test_streamed_region_maps_give_the_unstreamed_log_likelihood_and_posterior(conv):
    """Both runs compute each region's terms by the same formulas in other batch shapes:
    log p differs by rounding only, at most twice the per-row rounding bound plus both
    certified pruning bounds (``kappa_rounding_tol``); E[z|x] as in
    test_likelihood::test_results_do_not_depend_on_chunking."""
    X = conv[4]
    big, small = models(conv)
    assert not big._region_table().streamed and small._region_table().streamed
    a, b = big.posterior(X), small.posterior(X)
    tol = 2 * kappa_rounding_tol(big, X, a) + a.error_bound + b.error_bound
    assert np.all(np.isfinite(a.log_likelihood))
    assert np.all(np.abs(a.log_likelihood - b.log_likelihood) <= tol)
    spread = posterior_spread(a, len(X))
    assert np.all(np.abs(a.z_mean - b.z_mean).max(1) <= tol * (1 + 2 * spread))
    assert tol.max() < 1e-6 * np.abs(a.log_likelihood).max()          # the bound is not vacuous


def test_streamed_region_maps_give_the_unstreamed_imputation(conv):
    """E[x_d | x_o] = sum_w r_w (A_w,d m_w + b_w,d): a relative error e of the
    responsibilities (twice the error of log p, ``tol`` below) moves it by at most
    2 e max_w |g_w,d|, and an error e of the truncated means m_w (as for E[z|x]) by
    |A_w,d| e <= ||A_w|| e."""
    X = conv[4][12:]
    big, small = models(conv)
    a = big.posterior(X)
    tol = 2 * kappa_rounding_tol(big, X, a) + 2 * a.error_bound
    mean_big, mean_small = big.impute(X), small.impute(X)
    A, b = big.generator.region_maps(big.partition().patterns[a.pair_region])
    g = np.abs(np.einsum("pds,ps->pd", A, a.pair_mean) + b).max(1)
    scale = np.zeros(len(X))
    np.maximum.at(scale, a.pair_row, 2 * g + np.linalg.norm(A, ord=2, axis=(1, 2)))
    miss = np.isnan(X)
    assert miss.any(1).all()
    err = np.where(miss, np.abs(mean_big - mean_small), 0.0).max(1)
    assert np.all(err <= 2 * tol * (1 + scale))
    assert np.array_equal(mean_small[~miss], X[~miss])


def test_streamed_score_peak_memory_within_budget(conv, tmp_path):
    """Peak RSS of `cpadgn score` of 12 rows with region maps streamed stays within the
    memory budget above the fixed overhead, measured as the same command on one row
    (interpreter, torch, the partition, the per-region constants and facets); with an
    unlimited budget the region maps alone take more than that budget, so the
    measurement sees them."""
    path, X = conv[0], conv[4][:12]
    np.save(tmp_path / "one.npy", X[:1])
    np.save(tmp_path / "rows.npy", X)

    def score(data, budget):
        return peak_rss(CLI + ["score", str(path), str(tmp_path / data), "-o", str(tmp_path / f"{budget:g}.csv"),
                               "-q", "--memory-budget", str(budget)], OMP_NUM_THREADS="1")
    (code1, base, _), (code, peak, _), (code_all, peak_all, _) = \
        score("one.npy", SMALL), score("rows.npy", SMALL), score("rows.npy", 2e9)
    print(f"one row {base / 1e6:.0f} MB; 12 rows {peak / 1e6:.0f} MB at budget {SMALL / 1e6:.0f} MB, "
          f"{peak_all / 1e6:.0f} MB unlimited")
    assert code1 == 0 and code == 0 and code_all == 0
    assert peak <= base + SMALL
    assert peak_all > base + SMALL
