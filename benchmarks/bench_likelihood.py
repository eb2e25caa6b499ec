"""Exact likelihood speed, and how long importance sampling needs for the same accuracy.

    python benchmarks/bench_likelihood.py [--rows 10000] [--is-rows 100] [--repeats 3]
                                          [--latent 2,3,4]

Generator: S = 2, hidden 64-64, leaky ReLU 0.1, D = 784, PyTorch's default init
(seed 0), noise std 0.05; N rows sampled from the model itself.
With --latent 3 / 4 also the S >= 3 cases, in the same run: S = 3, hidden 32-32,
D = 64, noise std 0.1, 1,000 rows, and S = 4, hidden 16-16, D = 64, noise std 0.1,
200 rows, both at rtol 1e-9 (the partitions are cached in --cache-dir), timed as
``score`` runs them (log p only) and with the posterior moments; their time per row
is reported as a ratio to the S = 2 case's, timed the same two ways.
With --model MODEL --data DATA also a saved (e.g. trained) generator on DATA's rows, the
same way and in the same run (a trained model's posteriors cover far fewer regions than
the random nets'), e.g. an EM model of the digits:

    cpadgn fit sample_data/digits_train.csv -o s3.h5 --latent-dim 3 --hidden 16,16
    python benchmarks/bench_likelihood.py --rows 3000 --is-rows 0 --repeats 1 \
        --model s3.h5 --data sample_data/digits_test.csv
Prints:
1. partition time and regions; total exact log-likelihood time for N rows;
2. the (row, region) product ((rows x (hidden + 2)) @ ((hidden + 2) x regions (S+1)))
   as a fraction of this machine's fp64 matrix-multiply rate, measured in the same run,
   and the whole step that all pairs go through (product and epilogue);
3. importance sampling with the prior as proposal and with a Gaussian proposal at
   the posterior mode (found by L-BFGS, covariance from the local Jacobian): the
   samples and time needed until every one of --is-rows rows is within 0.01 nats of
   the exact value, as a ratio to the exact time for the same rows.
"""
import argparse
import time

import numpy as np
import torch
from torch import nn

from cpadgn import likelihood
from cpadgn.model import CPAModel
from cpadgn.network import PiecewiseAffineNet

TOL = 0.01


def make_net(S=2, hidden=(64, 64), D=784, seed=0):
    torch.manual_seed(seed)
    sizes = [S, *hidden, D]
    lins = [nn.Linear(a, b).double() for a, b in zip(sizes[:-1], sizes[1:])]
    return PiecewiseAffineNet.from_arrays([l.weight.detach().numpy() for l in lins],
                                          [l.bias.detach().numpy() for l in lins], [0.1] * len(hidden))


def matmul_rate(n=3072, repeats=3):
    a, b = torch.randn(n, n, dtype=torch.float64), torch.randn(n, n, dtype=torch.float64)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def log_joint(net_t, x, z, sigma):
    """log N(x; g(z), sigma^2 I) + log N(z; 0, I) for z (M, S) (torch)."""
    r = net_t(z) - x
    D, S = x.shape[-1], z.shape[-1]
    return (-0.5 * (r * r).sum(-1) / sigma ** 2 - D * np.log(sigma) - 0.5 * D * np.log(2 * np.pi)
            - 0.5 * (z * z).sum(-1) - 0.5 * S * np.log(2 * np.pi))


def torch_net(net):
    layers = []
    for i, (W, b) in enumerate(zip(net.weights, net.biases)):
        lin = nn.Linear(W.shape[1], W.shape[0]).double()
        lin.weight.data, lin.bias.data = torch.tensor(W), torch.tensor(b)
        layers.append(lin)
        if i < len(net.slopes):
            layers.append(nn.LeakyReLU(float(net.slopes[i][0])))
    return nn.Sequential(*layers).requires_grad_(False)


def is_prior(net_t, x, sigma, M, gen):
    z = torch.randn(M, 2, dtype=torch.float64, generator=gen)
    lw = log_joint(net_t, x, z, sigma) + 0.5 * (z * z).sum(-1) + np.log(2 * np.pi)
    return (torch.logsumexp(lw, 0) - np.log(M)).item()


def laplace_proposal(net_t, x, sigma, gen):
    """Posterior mode by L-BFGS from the best of 256 prior draws; covariance (I + J^T J / sigma^2)^-1."""
    z0 = torch.randn(256, 2, dtype=torch.float64, generator=gen)
    z = z0[log_joint(net_t, x, z0, sigma).argmax()].clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -log_joint(net_t, x, z[None], sigma)[0]
        loss.backward()
        return loss
    opt.step(closure)
    J = torch.autograd.functional.jacobian(lambda v: net_t(v[None])[0], z.detach())
    cov = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + J.T @ J / sigma ** 2)
    return z.detach(), 1.5 * cov   # slightly widened: heavier than the target near the mode


def is_laplace(net_t, x, sigma, M, gen, mode, cov):
    L = torch.linalg.cholesky(cov)
    e = torch.randn(M, 2, dtype=torch.float64, generator=gen)
    z = mode + e @ L.T
    log_q = -0.5 * (e * e).sum(-1) - torch.log(torch.diagonal(L)).sum() - np.log(2 * np.pi)
    lw = log_joint(net_t, x, z, sigma) - log_q
    return (torch.logsumexp(lw, 0) - np.log(M)).item()


def time_to_tolerance(estimate, exact, rows, max_samples, budget_s):
    """Smallest M = 2^k with every row's |estimate - exact| <= TOL; returns (M, seconds) or
    (None, seconds spent) when max_samples or the time budget runs out first."""
    M, spent = 256, 0.0
    while M <= max_samples and spent < budget_s:
        t0 = time.perf_counter()
        err = np.array([abs(estimate(i, M) - exact[i]) for i in rows])
        dt = time.perf_counter() - t0
        spent += dt
        if np.all(err <= TOL):
            return M, dt, float(err.max())
        M *= 4
    return None, spent, float(err.max())


HIGHER = {3: dict(hidden=(32, 32), rows=1000), 4: dict(hidden=(16, 16), rows=200)}


def higher_latent_case(S, cache_dir, per_row_s2, rows=None, D=64, sigma=0.1, rtol=1e-9):
    """One run of the S = 3 or S = 4 case, as ``score`` computes it (log p only) and with
    the posterior moments; prints absolute times and the ratios to S = 2's (per_row_s2:
    its seconds per row for (score, posterior))."""
    from pathlib import Path
    cfg = HIGHER[S]
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    net = make_net(S=S, hidden=cfg["hidden"], D=D)
    model = CPAModel(net, noise_std=sigma, device="cpu",
                     cache_path=Path(cache_dir) / f"S{S}_{'-'.join(map(str, cfg['hidden']))}.partition.h5")
    n = rows or cfg["rows"]
    X = model.sample(n, seed=1)
    t0 = time.perf_counter()
    part = model.partition()
    t_part = time.perf_counter() - t0
    tab = model._region_table()
    t0 = time.perf_counter()
    if S == 3:                  # built once per partition, on first use: not part of either time
        likelihood._facet_polygons(tab)
    t_tab = time.perf_counter() - t0
    print(f"S={S}, hidden {'-'.join(map(str, cfg['hidden']))}, D={D}, sigma={sigma}: {part.n_regions:,} "
          f"regions (partition {t_part:.1f} s, cached after the first run; facet polygons {t_tab:.1f} s); "
          f"{n:,} rows at rtol {rtol:g}:")
    for what, moments, s2 in (("score (log p)", False, per_row_s2[0]), ("posterior (+ moments)", True, per_row_s2[1])):
        t0 = time.perf_counter()
        post = likelihood.posterior(net, part, model.noise_std, X, tab=tab, rtol=rtol, moments=moments)
        t = time.perf_counter() - t0
        print(f"  {what}: {t:.2f} s ({1e3 * t / n:.2f} ms/row, {t / n / s2:.0f}x the S=2 time per row; "
              f"{cfg['rows'] * t / n:.0f} s for the target's {cfg['rows']:,} rows at this rate); "
              f"pairs integrated per row {post.pair_row.size / n:.0f}; max certified bound "
              f"{post.error_bound.max():.1e} nats; max stderr {post.stderr.max():.1e}")
    print(f"  pairs any pruning with a {rtol:g} bound needs, knowing every pair's value (the fewest whose "
          f"complement sums to <= {rtol:g} p): {fewest_pairs(post, rtol) / n:.0f} per row")


def saved_model_case(model_path, data_path, per_row_s2):
    """A saved generator on the rows of data_path, timed as ``higher_latent_case`` times
    its case (the model's own noise std and rtol; partition and region table built first)."""
    import cpadgn
    from cpadgn.data import read_data
    model = cpadgn.load(model_path)
    X = read_data(data_path)
    t0 = time.perf_counter()
    part = model.partition()
    tab = model._region_table()
    if model.latent_dim == 3:
        likelihood._facet_polygons(tab)
    t_setup = time.perf_counter() - t0
    n = X.shape[0]
    print(f"{model_path} (S={model.latent_dim}, {part.n_regions:,} regions, noise std "
          f"{np.asarray(model.noise_std).ravel()[0]:.4g}; partition and tables {t_setup:.1f} s) on {n:,} rows "
          f"of {data_path}:")
    for what, moments, s2 in (("score (log p)", False, per_row_s2[0]), ("posterior (+ moments)", True, per_row_s2[1])):
        t0 = time.perf_counter()
        post = model.posterior(X, moments=moments)
        t = time.perf_counter() - t0
        print(f"  {what}: {t:.2f} s ({1e3 * t / n:.2f} ms/row, {t / n / s2:.0f}x the S=2 time per row); "
              f"pairs integrated per row {post.pair_row.size / n:.0f}; max certified bound "
              f"{post.error_bound.max():.1e} nats; max stderr {post.stderr.max():.1e}")


def fewest_pairs(post, rtol):
    """Over all rows, the fewest integrated pairs whose left-out responsibilities sum to
    at most rtol: a lower bound on the pairs a certified pruning must integrate."""
    total = 0
    for i in range(post.log_likelihood.size):
        r = np.sort(post.pair_responsibility[post.pair_row == i])
        total += r.size - np.searchsorted(np.cumsum(r), rtol, side="right")
    return total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--is-rows", type=int, default=100, help="0 skips importance sampling")
    ap.add_argument("--repeats", type=int, default=3, help="exact runs; the median is reported")
    ap.add_argument("--sigma", type=float, default=0.05)
    ap.add_argument("--latent", default="2", help="comma-separated cases: 2, 3, 4")
    ap.add_argument("--cache-dir", default="out/bench_likelihood")
    ap.add_argument("--higher-rows", type=int, default=None,
                    help="rows for the S >= 3 cases (default: 1,000 at S = 3, 200 at S = 4)")
    ap.add_argument("--model", default=None, help="also time this saved generator (with --data)")
    ap.add_argument("--data", default=None, help="the rows --model is timed on (.csv, .npy or .h5)")
    args = ap.parse_args()
    if (args.model is None) != (args.data is None):
        ap.error("--model and --data go together")
    cases = [int(c) for c in args.latent.split(",")]
    if 2 not in cases:
        cases.insert(0, 2)
    torch.set_num_threads(torch.get_num_threads())
    net = make_net()
    model = CPAModel(net, noise_std=args.sigma, device="cpu")
    X = model.sample(args.rows, seed=1)

    t0 = time.perf_counter()
    part = model.partition()
    t_part = time.perf_counter() - t0
    times = []
    for _ in range(args.repeats):              # the machine is shared: report the median
        t0 = time.perf_counter()
        post = model.posterior(X)
        times.append(time.perf_counter() - t0)
    t_exact = float(np.median(times))
    t_score = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        model.score_samples(X)
        t_score.append(time.perf_counter() - t0)
    t_score = float(np.median(t_score))

    tab = model._region_table()
    H, R, S = tab.stacked.shape[0], tab.n_regions, net.latent_dim
    # The product as the code runs it: [xhat, 1, x'Px] (n, H) @ stacked (H, R (S + 1)),
    # here into a buffer already touched (a fresh one also pays its page faults, which the
    # whole-step time below includes).
    xaug = torch.randn(min(args.rows, 2000), H, dtype=torch.float64)
    buf = torch.empty(xaug.shape[0], tab.stacked.shape[1], dtype=torch.float64)
    torch.matmul(xaug, tab.stacked, out=buf)
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        torch.matmul(xaug, tab.stacked, out=buf)
    dom_rate = 2 * xaug.shape[0] * H * R * (S + 1) * reps / (time.perf_counter() - t0)
    peak = matmul_rate()
    t0 = time.perf_counter()
    likelihood._log_kappa_complete(tab, torch.as_tensor(X[:2000]))
    t_kappa = (time.perf_counter() - t0) * args.rows / min(args.rows, 2000)

    print(f"generator S=2, hidden 64-64, D=784, sigma={args.sigma}; {args.rows:,} rows")
    print(f"partition: {R:,} regions in {t_part:.2f} s ({part.method})")
    print(f"exact log-likelihood + posterior, {args.rows:,} rows: {t_exact:.2f} s median of "
          f"{len(times)} ({', '.join(f'{t:.2f}' for t in times)}) "
          f"({1e3 * t_exact / args.rows:.3f} ms/row); max certified error bound "
          f"{post.error_bound.max():.1e} nats; pairs evaluated per row "
          f"{post.pair_row.size / args.rows:.1f}")
    print(f"exact log-likelihood only (score), {args.rows:,} rows: {t_score:.2f} s median of {args.repeats} "
          f"({1e3 * t_score / args.rows:.3f} ms/row)")
    print(f"all (row, region) terms (log kappa and whitened means, product + epilogue + fresh "
          f"memory): est. {t_kappa:.2f} s for {args.rows:,} rows; the product runs at "
          f"{dom_rate / 1e9:.1f} GFLOP/s = {100 * dom_rate / peak:.0f}% of this machine's fp64 "
          f"matmul rate ({peak / 1e9:.1f} GFLOP/s, 3072^3 measured in this run)")

    per_row_s2 = (t_score / args.rows, t_exact / args.rows)
    for S in cases:
        if S > 2:
            higher_latent_case(S, args.cache_dir, per_row_s2, rows=args.higher_rows)
    if args.model is not None:
        saved_model_case(args.model, args.data, per_row_s2)
    if args.is_rows == 0:
        return
    rows = np.arange(args.is_rows)
    exact = post.log_likelihood
    per_row_exact = t_exact / args.rows * len(rows)
    net_t = torch_net(net)
    Xt = torch.as_tensor(X)
    gen = torch.Generator().manual_seed(0)
    res_p = time_to_tolerance(lambda i, M: is_prior(net_t, Xt[i], args.sigma, M, gen),
                              exact, rows, 2 ** 22, 120)
    t0 = time.perf_counter()
    props = [laplace_proposal(net_t, Xt[i], args.sigma, gen) for i in rows]
    t_modes = time.perf_counter() - t0
    res_l = time_to_tolerance(lambda i, M: is_laplace(net_t, Xt[i], args.sigma, M, gen, *props[i]),
                              exact, rows, 2 ** 22, 120)
    print(f"importance sampling on {len(rows)} rows, target |error| <= {TOL} nats on every row "
          f"(exact on the same rows: {per_row_exact:.3f} s):")
    for name, (M, secs, err), extra in (("prior proposal", res_p, 0.0),
                                       ("Gaussian at the posterior mode", res_l, t_modes)):
        total = secs + extra
        if M is None:
            print(f"  {name}: not reached (max error {err:.3g} nats after {total:.1f} s); "
                  f"ratio > {total / per_row_exact:.0f}x")
        else:
            print(f"  {name}: {M:,} samples/row, {total:.2f} s (max error {err:.4f}); "
                  f"ratio {total / per_row_exact:.0f}x the exact time")


if __name__ == "__main__":
    main()
