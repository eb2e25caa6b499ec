"""Partition algorithms against independent oracles.

S = 1: a dense grid plus bisection (tests/oracles.py).  S >= 2: the subdivision and the
LP walk are two unrelated algorithms (combinatorial edge subdivision of the compactified
space vs. linear programs on one region at a time) and must agree exactly; prior samples
and forward passes check both against the network itself.
"""
import warnings

import numpy as np
import pytest

import cpadgn.partition as partition_module
from cpadgn.errors import CpadgnError
from cpadgn.network import PiecewiseAffineNet
from cpadgn.partition import (_region_constraints, check_partition, compute_partition)
from tests.oracles import line_breakpoints, random_net


def pattern_set(part):
    return set(map(bytes, np.packbits(part.patterns, axis=1)))


def facet_lists(part):
    return [tuple(part.facet_units[part.facet_ptr[i]:part.facet_ptr[i + 1]]) for i in range(part.n_regions)]


def modified(net, edit):
    Ws, bs = [w.copy() for w in net.weights], [b.copy() for b in net.biases]
    edit(Ws, bs)
    return PiecewiseAffineNet.from_arrays(Ws, bs, net.slopes)


def assert_same_partition(a, b):
    """Same regions (sets of patterns), and per region the same facets and boundedness."""
    assert pattern_set(a) == pattern_set(b)
    # both methods list regions in the canonical (pattern) order
    assert (a.patterns == b.patterns).all()
    assert facet_lists(a) == facet_lists(b)
    assert (a.bounded == b.bounded).all()


def assert_facets_tile(net, part, n=20_000, seed=2):
    """The facet rows alone carve out the regions (no facet is missing): every prior sample
    satisfies the facet inequalities of exactly one region, the one of its pattern."""
    z = np.random.default_rng(seed).standard_normal((n, net.latent_dim))
    G, h, mask = part.facets(net)
    slack = h[:, :, None] - np.matmul(G, z.T)                          # (R, F, n)
    inside = np.all((slack >= 0) | ~mask[:, :, None], axis=1)         # (R, n)
    assert (inside.sum(axis=0) == 1).all()
    assert (inside.argmax(axis=0) == part.locate(net, z)).all()


def assert_prior_samples_located(net, part, n=20_000, seed=0):
    """The oracle of prior samples: each lands in a region (locate), satisfies that
    region's facet inequalities, and the regions' sample frequencies are their prior
    masses within 5 binomial standard errors."""
    z = np.random.default_rng(seed).standard_normal((n, net.latent_dim))
    where = part.locate(net, z)
    assert (where >= 0).all()
    G, h, mask = part.facets(net, where)
    assert ((np.einsum("nfs,ns->nf", G, z) <= h) | ~mask).all()
    p = np.exp(part.log_prior_mass)
    freq = np.bincount(where, minlength=part.n_regions) / n
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n)).all()


def skip_masses(monkeypatch):
    """Skip the prior masses (NaN) where a test is about the topology only: for S >= 3 they
    are quasi-Monte Carlo integrals, the slow part; they depend on the facets alone."""
    monkeypatch.setattr(partition_module, "_log_prior_masses",
                        lambda G, h, mask: (np.full(G.shape[0], np.nan), np.zeros(G.shape[0])))


@pytest.fixture
def no_masses(monkeypatch):
    skip_masses(monkeypatch)


def assert_checks(net, part, n_samples=100_000):
    """Prior samples all located with their own pattern, interior points verified, no
    near-degenerate region, masses summing to 1 (1e-9 where exact; within the reported
    Monte Carlo error where S >= 3) unless they were skipped."""
    chk = check_partition(net, part, n_samples=n_samples, seed=1)
    assert chk["samples_located"] == 1.0
    assert chk["interior_ok"] == 1.0
    if not np.isnan(part.log_prior_mass).any():
        mass = np.exp(part.log_prior_mass)
        tol = 1e-9 + 6 * np.sqrt(np.sum((mass * part.log_prior_mass_stderr) ** 2))
        assert chk["mass_error"] < tol, (chk, tol)
    assert not part.degenerate.any()
    assert np.all(part.clearance > 1e-7)
    return chk


# ---------------------------------------------------------------------------- S = 1
@pytest.mark.parametrize("slope", [0.1, 0.0, -1.0])
def test_intervals_match_grid_oracle(slope):
    net = random_net(1, (12, 12, 12), 3, seed=4, slope=slope)
    part = compute_partition(net)
    assert part.method == "intervals"
    G, h, mask = part.facets(net)
    ends = np.unique((h[mask] / G[mask][:, 0]))
    lim = max(50.0, 2 * np.abs(ends).max())
    oracle = line_breakpoints(lambda t: net.preactivations(t[:, None]), -lim, lim, n=100_001)
    assert part.n_regions == oracle.size + 1
    np.testing.assert_allclose(ends, oracle, rtol=0, atol=1e-9)
    assert abs(np.exp(part.log_prior_mass).sum() - 1) < 1e-12
    chk = check_partition(net, part, n_samples=100_000)
    assert chk["samples_located"] == 1.0 and chk["interior_ok"] == 1.0
    assert part.bounded.sum() == part.n_regions - 2          # the two end intervals
    # the interval endpoints are exactly the facets: two per bounded interval
    assert (part.n_facets == np.where(part.bounded, 2, 1)).all()


def test_intervals_design_figure():
    """The design's S = 1 figure, (1, 64, 64, 64): every breakpoint found by the interval
    algorithm (its speed is in benchmarks/bench_partition.py, not asserted here)."""
    net = random_net(1, (64, 64, 64), 2, seed=0, slope=0.1)
    part = compute_partition(net)
    assert part.method == "intervals"
    G, h, mask = part.facets(net)
    ends = np.unique(h[mask] / G[mask][:, 0])
    lim = max(50.0, 2 * np.abs(ends).max())
    oracle = line_breakpoints(lambda t: net.preactivations(t[:, None]), -lim, lim, n=100_001)
    assert part.n_regions == oracle.size + 1
    np.testing.assert_allclose(ends, oracle, rtol=0, atol=1e-9)
    assert abs(np.exp(part.log_prior_mass).sum() - 1) < 1e-12


def test_intervals_without_breakpoints_are_one_region_without_warnings():
    """An S = 1 net whose hidden units never switch (zero input weights) has one region,
    the whole line (prior mass 1); computing it raised 'invalid value encountered in add'
    from -inf + inf for the midpoint of the unbounded interval."""
    net = PiecewiseAffineNet.from_arrays([np.zeros((2, 1)), np.ones((3, 2))], [np.ones(2), np.zeros(3)], [0.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        part = compute_partition(net)
    assert part.n_regions == 1 and abs(np.exp(part.log_prior_mass).sum() - 1) < 1e-15



def test_intervals_store_a_unit_zero_up_to_rounding_as_nonnegative():
    """max(t_0, t_1) of two clamps (relu(v + 1) - relu(v - 1), as the loader writes
    Hardtanh) = t_1 + relu(t_0 - t_1): where both saturate (z > 0.93), t_0 - t_1 is 0 in
    exact arithmetic, and the intervals' own propagation left -1e-16 there, stored as < 0,
    while the forward pass (and locate, the subdivision, the walk) count it >= 0: 6.6% of
    the prior samples were located nowhere.  Oracle: each sample satisfies the facet
    constraints of its region, and the masses are the sample frequencies."""
    w, c = np.array([[1.65], [0.92]]), np.array([3.2, 0.14])            # v = w z + c
    net = PiecewiseAffineNet.from_arrays(
        [np.vstack([w, w]), np.array([[1.0, -1.0, -1.0, 1.0], [0.0, 1.0, 0.0, -1.0]]), np.array([[1.0, 2.0]])],
        [np.concatenate([c + 1, c - 1]), np.array([0.0, -1.0]), np.zeros(1)], [np.zeros(4), np.array([0.0, 1.0])])
    part = compute_partition(net)
    assert part.method == "intervals"
    assert_prior_samples_located(net, part)

# ---------------------------------------------------------------------------- S >= 2
CASES = [(2, (8, 8), 0.1, 0), (2, (8, 8), 0.0, 1), (2, (8, 8), -1.0, 2), (2, (5, 5, 5), 0.0, 3),
         (3, (5, 5), 0.1, 0), (3, (5, 5), 0.0, 1), (3, (5, 5), -1.0, 2)]


@pytest.mark.parametrize("S,hidden,slope,seed", CASES)
def test_subdivision_equals_lp_walk(S, hidden, slope, seed, monkeypatch):
    net = random_net(S, hidden, 3, seed=seed, slope=slope)
    if S >= 3:
        skip_masses(monkeypatch)
    sub = compute_partition(net)
    assert sub.method == "subdivision"
    skip_masses(monkeypatch)          # same facets, same masses
    lp = compute_partition(net, method="lp-walk")
    assert_same_partition(sub, lp)
    assert_facets_tile(net, sub)
    assert_checks(net, sub)
    assert_checks(net, lp, n_samples=10_000)
    # unbounded regions exist and both methods count them alike; every far-away
    # point (any direction) falls in an unbounded region
    assert 0 < (~sub.bounded).sum() < sub.n_regions
    rng = np.random.default_rng(0)
    d = rng.standard_normal((20_000, S))
    far = sub.locate(net, 1e6 * d / np.linalg.norm(d, axis=1, keepdims=True))
    assert (far >= 0).all() and not sub.bounded[far].any()


@pytest.mark.parametrize("S,hidden,slope", [(2, (8, 8), 0.1), (3, (5, 5), 0.0)])
def test_subdivision_independent_of_box(S, hidden, slope, monkeypatch):
    net = random_net(S, hidden, 2, seed=7, slope=slope)
    if S >= 3:
        skip_masses(monkeypatch)
    parts = [compute_partition(net, box_half_width=R) for R in (0.25, 4.0, 300.0)]
    for p in parts[1:]:
        assert_same_partition(parts[0], p)
        np.testing.assert_allclose(p.log_prior_mass, parts[0].log_prior_mass, rtol=0, atol=1e-9)


@pytest.mark.parametrize("S,hidden,slope,budget", [(2, (16, 16), 0.1, 3e5), (3, (5, 5), 0.0, 3e5)])
def test_subdivision_over_budget_runs_in_tiles_and_equals_lp_walk(S, hidden, slope, budget, monkeypatch):
    """A budget too small for the whole prism makes the subdivision run face tile by face
    tile (counted here) and merge by pattern: the same regions, facets and boundedness
    as the LP walk, which never tiles."""
    net = random_net(S, hidden, 3, seed=4, slope=slope)
    skip_masses(monkeypatch)
    runs = []
    subdivide = partition_module._subdivision
    monkeypatch.setattr(partition_module, "_subdivision", lambda *a, **k: (runs.append(1), subdivide(*a, **k))[1])
    tiled = compute_partition(net, memory_budget=budget)
    assert len(runs) > 2 * S + 2          # the whole prism refused, then tiles (some refused again)
    assert_same_partition(tiled, compute_partition(net, method="lp-walk"))
    assert_facets_tile(net, tiled)


def test_region_constraints_fast_path():
    """The network's product of layer maps and the partition's layer-by-layer one agree to
    rounding.  Each layer's G_l = W_l D_(l-1) G_(l-1) and c_l = W_l D_(l-1) c_(l-1) + b_l
    (D a diagonal of slopes) is a dot product of length n <= fan-in + 1, exact up to
    gamma_n times the same recursion over absolute values (Higham, 3.5); an error from
    an earlier layer is carried through |W|, so layer l errs by at most l gamma_n times
    those magnitudes, in each of the two evaluations."""
    net = random_net(3, (7, 5, 4), 2, seed=3, slope=-1.0)
    P = np.random.default_rng(0).random((40, net.n_units)) < 0.5
    G1, h1 = net.region_constraints(P)
    G2, h2 = _region_constraints(net, P)
    eps = np.finfo(np.float64).eps
    n = max(W.shape[1] for W in net.weights) + 1
    gamma = n * eps / (1 - n * eps)
    S = net.latent_dim
    G_abs, c_abs, G_tol, c_tol = np.eye(S), np.zeros(S), [], []
    for l, (W, b, slope) in enumerate(zip(net.weights[:-1], net.biases[:-1], net.slopes), start=1):
        G_abs, c_abs = np.abs(W) @ G_abs, np.abs(W) @ c_abs + np.abs(b)
        G_tol.append(2 * l * gamma * G_abs)
        c_tol.append(2 * l * gamma * c_abs)
        growth = np.maximum(1.0, np.abs(np.asarray(slope, dtype=np.float64))).reshape(-1, 1)
        G_abs, c_abs = growth * G_abs, growth[:, 0] * c_abs
    assert np.all(np.abs(G2 - G1) <= np.concatenate(G_tol))
    assert np.all(np.abs(h2 - h1) <= np.concatenate(c_tol))


def test_prior_masses_sum_to_one_s3():
    net = random_net(3, (5, 5), 2, seed=11, slope=0.1)
    part = compute_partition(net)
    assert_checks(net, part)
    assert (part.log_prior_mass_stderr >= 0).all() and not np.isnan(part.log_prior_mass).any()


def test_prior_masses_exact_s3():
    """S = 3 prior masses are exact (the radial face formula, cpadgn.polyhedron): finite for
    every region (this net has a sliver of clearance 1e-6), no standard error, summing to 1
    within 1e-9 (6,707 regions, each to ~1e-12 relative), and the 20 largest within 4 SE of
    the fractions of 4e5 prior samples."""
    net = random_net(3, (16, 16), 4, seed=4, slope=0.1)
    part = compute_partition(net)
    assert np.all(np.isfinite(part.log_prior_mass)) and np.all(part.log_prior_mass_stderr == 0)
    mass = np.exp(part.log_prior_mass)
    assert abs(mass.sum() - 1) < 1e-9
    n = 400_000
    counts = np.bincount(part.locate(net, np.random.default_rng(0).standard_normal((n, 3))), minlength=part.n_regions)
    top = np.argsort(mass)[-20:]
    se = np.sqrt(mass[top] * (1 - mass[top]) / n)
    assert np.all(np.abs(counts[top] / n - mass[top]) < 4 * se)


def test_four_dimensional_latent(no_masses):
    net = random_net(4, (3, 3), 2, seed=0, slope=0.1)
    sub = compute_partition(net)
    lp = compute_partition(net, method="lp-walk")
    assert_same_partition(sub, lp)
    chk = check_partition(net, sub, n_samples=50_000)
    assert chk["samples_located"] == 1.0 and chk["interior_ok"] == 1.0


# ---------------------------------------------------------------------------- special nets
@pytest.mark.parametrize("S", [1, 2, 3])
def test_linear_generator(S):
    net = PiecewiseAffineNet.from_arrays([np.ones((4, S))], [np.zeros(4)], [])
    for method in ("auto", "lp-walk"):
        part = compute_partition(net, method=method)
        assert part.n_regions == 1 and part.patterns.shape == (1, 0)
        assert part.n_facets.tolist() == [0] and not part.bounded[0]
        assert part.log_prior_mass.tolist() == [0.0]
        assert check_partition(net, part, n_samples=1000)["samples_located"] == 1.0


def _dead_and_duplicates(Ws, bs):
    Ws[0][2], bs[0][2] = 0.0, -0.5                      # dead unit (constant negative)
    Ws[0][3], bs[0][3] = Ws[0][1], bs[0][1]             # exact duplicate
    Ws[0][4], bs[0][4] = 2 * Ws[0][0], 2 * bs[0][0]     # positive multiple
    Ws[1][0], bs[1][0] = 0.0, 0.0                       # dead unit, u = 0 everywhere
    Ws[1][5], bs[1][5] = -Ws[1][1], -bs[1][1]           # negated duplicate (opposite sign)


@pytest.mark.parametrize("S,slope", [(1, 0.1), (2, 0.1), (2, 0.0), (2, -1.0), (3, 0.1), (3, 0.0)])
def test_dead_and_duplicate_units(S, slope, monkeypatch):
    net = modified(random_net(S, (6, 6), 2, seed=5, slope=slope), _dead_and_duplicates)
    if S >= 3:
        skip_masses(monkeypatch)
    part = compute_partition(net)
    assert_checks(net, part)
    assert_facets_tile(net, part)
    q = part.patterns
    assert not q[:, 2].any() and q[:, 6].all()
    assert (q[:, 3] == q[:, 1]).all() and (q[:, 4] == q[:, 0]).all() and (q[:, 11] != q[:, 7]).all()
    if S >= 2:
        assert_same_partition(part, compute_partition(net, method="lp-walk"))


def test_concurrent_hyperplanes_never_crash_nor_lose_regions():
    """Bias-free first layer: all its lines meet at 0 (not in general position).  Extra
    zero-volume patterns of the symbolic perturbation may appear: flagged, never dropped,
    and no real region is lost."""
    net = modified(random_net(2, (6, 6), 2, seed=5, slope=0.1), lambda W, b: b[0].__setitem__(slice(None), 0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # no pairing anomaly
        part = compute_partition(net)
    lp = compute_partition(net, method="lp-walk")
    assert pattern_set(lp) <= pattern_set(part)
    extra = ~np.isin(np.arange(part.n_regions), part.locate(net, lp.interior))
    assert part.degenerate[extra].all()
    chk = check_partition(net, part, n_samples=100_000)
    assert chk["samples_located"] == 1.0


def test_lp_walk_keeps_a_facet_that_two_units_share():
    """v = 3 leaky(u0) has u0's line, up to rounding.  The LP walk's facet LPs tested each
    of the two rows against the other, found each redundant and lost the facet: it listed
    4 regions, two of them too large, and missed two patterns of prior samples.  Oracle:
    the prior samples' patterns (forward pass) and their frequencies."""
    net = PiecewiseAffineNet.from_arrays(
        [np.array([[0.7, 0.2], [0.0, -1.0]]), np.array([[3.0, 0.0], [0.5, 1.0]]), np.array([[1.0, -1.0]])],
        [np.array([-0.1, 0.5]), np.array([0.0, 0.2]), np.zeros(1)], [np.array([0.1, 0.0]), np.array([0.0, 0.3])])
    lp = compute_partition(net, method="lp-walk")
    n = 20_000
    q = net.patterns(np.random.default_rng(0).standard_normal((n, 2)))
    keys, counts = np.unique(np.packbits(q, axis=1), axis=0, return_counts=True)
    listed = {bytes(k): i for i, k in enumerate(np.packbits(lp.patterns, axis=1))}
    assert all(bytes(k) in listed for k in keys)
    freq = np.zeros(lp.n_regions)
    freq[[listed[bytes(k)] for k in keys]] = counts / n
    p = np.exp(lp.log_prior_mass)
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12).all()


@pytest.mark.parametrize("method", ["auto", "lp-walk"])
def test_locate_where_a_flipped_duplicate_is_identically_zero(method):
    """0.7 h and -1.3 h, h = relu(z_1 + z_2 / 2): where h = 0 both are 0, so both >= 0,
    yet the enumerations store the copy's column flipped from its original's (half of
    the prior samples were located nowhere).  Oracle: each sample satisfies the facet
    constraints of its region, and the masses are the sample frequencies."""
    net = PiecewiseAffineNet.from_arrays([np.array([[1.0, 0.5]]), np.array([[0.7], [-1.3]]), np.array([[1.0, 2.0]])],
                                         [np.zeros(1), np.zeros(2), np.zeros(1)], [np.zeros(1), np.zeros(2)])
    part = compute_partition(net, method=method)
    assert_prior_samples_located(net, part)


@pytest.mark.parametrize("S,method", [(1, "auto"), (2, "subdivision"), (3, "subdivision"), (2, "lp-walk")])
def test_max_regions(S, method, no_masses):
    net = random_net(S, (10, 10) if S == 1 or method == "subdivision" and S == 2 else (4, 4), 2, seed=0, slope=0.1)
    n = compute_partition(net, method=method).n_regions
    with pytest.raises(CpadgnError, match="max-regions"):
        compute_partition(net, method=method, max_regions=n // 3)
    assert compute_partition(net, method=method, max_regions=n).n_regions == n


def test_progress_callback():
    calls = []
    net = random_net(2, (8, 8), 2, seed=0)
    compute_partition(net, progress=lambda d, t, m: calls.append((d, t, m)))
    assert calls and all(isinstance(d, int) and isinstance(m, str) for d, _, m in calls)


def test_bad_arguments():
    net = random_net(2, (4,), 2, seed=0)
    with pytest.raises(ValueError):
        compute_partition(net, method="grid")
    with pytest.raises(ValueError):
        compute_partition(net, method="intervals")


@pytest.mark.parametrize("change", ["weight_0", "bias_0", "prior_mean", "prior_cov"])
def test_models_differing_only_in_layer_0_or_the_prior_never_share_a_cache(tmp_path, change):
    """The second model finds the first one's cache at its path: it must recompute (its
    partition differs), and its log-likelihoods must equal those computed without a cache."""
    from cpadgn.model import CPAModel
    net = random_net(1, (6, 6), 3, seed=4, slope=0.1, scale=2.0)
    W, b = list(net.weights), list(net.biases)
    prior = {}
    if change == "weight_0":
        W[0] = W[0] * 1.5
    elif change == "bias_0":
        b[0] = b[0] + 0.5
    elif change == "prior_mean":
        prior = dict(prior_mean=np.array([0.7]))
    else:
        prior = dict(prior_cov=np.array([[2.0]]))
    other = PiecewiseAffineNet.from_arrays(W, b, net.slopes)
    cache = tmp_path / "shared.partition.h5"
    first = CPAModel(net, noise_std=0.3, device="cpu", cache_path=cache)
    first.partition()
    assert first.partition_status == "computed"
    second = CPAModel(other, noise_std=0.3, device="cpu", cache_path=cache, **prior)
    X = second.sample(30, seed=1)
    got = second.log_prob(X)
    assert second.partition_status == "replaced (another generator's partition)"
    fresh = CPAModel(other, noise_std=0.3, device="cpu", **prior)
    np.testing.assert_array_equal(second.partition().patterns, fresh.partition().patterns)
    np.testing.assert_array_equal(got, fresh.log_prob(X))          # the same computation


def test_partition_without_prior_masses_gives_the_same_likelihood():
    """EM's transient partitions skip the prior masses; nothing else may change."""
    from cpadgn import likelihood
    net = random_net(2, (6, 6), 3, seed=3)
    full, bare = compute_partition(net), compute_partition(net, prior_masses=False)
    assert np.all(np.isnan(bare.log_prior_mass)) and np.all(np.isfinite(full.log_prior_mass))
    np.testing.assert_array_equal(bare.patterns, full.patterns)
    X = np.random.default_rng(0).normal(size=(5, 3))
    a, b = (likelihood.posterior(net, p, np.array([0.3]), X) for p in (full, bare))
    np.testing.assert_array_equal(a.log_likelihood, b.log_likelihood)


def test_subdivision_ignores_a_unit_that_is_zero_up_to_rounding_everywhere():
    """u = x_0 + x_1 - x_2 with x = (a z, b z, (a + b) z) linear units is rounding noise of
    either sign over all of R^3 (as max(a, b) where a clamp saturates a and b).  Its
    snapping tolerance was relative to its own largest value, noise itself, so the noise
    split it into random regions, each listed with the whole space's mass (masses summed
    to 2).  Oracle: the prior samples' frequencies, and each sample satisfies the facet
    constraints of its region."""
    a, b = np.array([0.3, -0.7, 0.1]), np.array([0.45, 0.2, -0.9])
    net = PiecewiseAffineNet.from_arrays(
        [np.array([a, b, a + b]), np.array([[1.0, 1.0, -1.0], [0.5, -1.0, 0.3]]), np.array([[1.0, 2.0]])],
        [np.zeros(3), np.zeros(2), np.zeros(1)], [np.ones(3), np.zeros(2)])
    n = 20_000
    z = np.random.default_rng(0).standard_normal((n, 3))
    u = net.preactivations(z)[:, 3]
    assert (u < 0).any() and (u > 0).any() and np.abs(u).max() < 1e-15       # the premise: noise of either sign
    part = compute_partition(net)
    p = np.exp(part.log_prior_mass)
    assert abs(p.sum() - 1) < 1e-9
    assert_prior_samples_located(net, part)


def test_recentring_ignores_rows_that_are_zero_up_to_rounding(monkeypatch):
    """Hidden layers of a loaded Linear(2, 10), ReLU, MaxPool1d twice, BatchNorm1d, ReLU6
    decoder (benchmarks/fuzz_loader.py --seed 3 --only 109).  The re-centring of thin
    regions took the unsnapped constraints: rows that are rounding noise (max of two
    saturated clamps) normalised to |h| ~ 1e17, on which HiGHS's simplex gives up and its
    interior-point fallback ran for hours.  Every LP here is cut off after 5 s; the masses
    and the located prior samples are the oracle."""
    import scipy.optimize
    linprog, timed_out = scipy.optimize.linprog, []

    def limited(*args, **kw):
        res = linprog(*args, **{**kw, "options": {"time_limit": 5.0}})
        timed_out.append(res.status == 1)
        return res

    monkeypatch.setattr(scipy.optimize, "linprog", limited)
    W0 = np.array([[0.2333730012178421, 0.3397381603717804], [-0.5132455229759216, -0.5102043747901917],
                   [-0.2559177577495575, 0.5482668280601501], [-0.3316279947757721, 0.3943087160587311],
                   [-0.5426067113876343, 0.43031105399131775], [-0.14529502391815186, -0.1673312485218048],
                   [-0.06949762254953384, 0.6017730236053467], [-0.5756803154945374, 0.5799974203109741],
                   [-0.2055356800556183, 0.22498704493045807], [0.634732723236084, -0.4044147729873657]])
    b0 = np.array([-0.18422946333885193, -0.2134704887866974, 0.1703239381313324, 0.32680872082710266,
                   -0.8360255360603333, -0.21735744178295135, -0.02234717085957527, 0.9642195701599121,
                   0.04200293496251106, 0.749025821685791])
    W1 = np.zeros((7, 10))                      # max pooling: a - b, then b carried on slope-1 units
    W1[[1, 1, 2, 2, 3, 4, 5, 6], [1, 3, 6, 8, 1, 3, 6, 8]] = [1, -1, 1, -1, 1, 1, 1, 1]
    W2 = np.array([[1, -1, 0, 1, -1, 0, 0], [-1, 1, 0, 0, 0, 0, 0], [1, 0, -1, 0, 0, 1, -1],
                   [-1, 0, 1, 0, 0, 0, 0], [0, 1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0, 0],
                   [0, 0, 1, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0, 1]], float)
    D = np.diag([0.6977954992366646, 0.6977954992366646, 1.5740231154007824, 1.5740231154007824])
    c = np.repeat([0.1928364249983652, -0.2990393619314846], 2)        # BatchNorm, then ReLU6
    net = PiecewiseAffineNet.from_arrays(
        [W0, W1, W2, np.tile(np.hstack([D, D]), (2, 1)), np.ones((1, 8))],
        [b0, np.zeros(7), np.zeros(8), np.concatenate([c, c - 6]), np.zeros(1)],
        [np.zeros(10), np.r_[np.zeros(3), np.ones(4)], np.r_[np.zeros(4), np.ones(4)], np.zeros(8)])
    part = compute_partition(net)
    assert timed_out and not any(timed_out)
    chk = check_partition(net, part, n_samples=20_000)
    assert chk["mass_error"] < 4 * part.n_regions * np.finfo(float).eps and chk["samples_located"] == 1.0

def test_subdivision_lists_no_row_that_only_touches_its_region_along_an_edge():
    """Zero biases and rank-2 first layer (S = 3): every hyperplane contains the line
    z = t (a x b).  The subdivision listed as facets the units zero at some vertex of the
    region, e.g. u0, u1 of the wedge between u5 = 0 and u6 = 0, which touch it only
    along that line (masses summed to 0.974; compare_lp_walk's mlp 0, 56, 76, 95, torch 89:
    0.29-0.81).  Oracles: every listed facet of a region of positive volume meets the
    region in an (S - 1)-dimensional piece (an LP: the largest ball of the hyperplane
    inside the other rows, within a box), the masses sum to 1, and are the frequencies
    of prior samples, each of which satisfies its region's facet constraints."""
    from scipy.optimize import linprog
    a, b = np.array([0.3, -0.7, 0.1]), np.array([0.45, 0.2, -0.9])
    net = PiecewiseAffineNet.from_arrays(
        [np.array([a, b]), np.array([[0.1, 0.0], [0.2, 0.0], [0.0, 1.0]]), np.array([[1.0, 1.0, -1.0], [0.3, -0.5, 1.0]]),
         np.array([[1.0, 2.0]])], [np.zeros(2), np.zeros(3), np.zeros(2), np.zeros(1)], [np.zeros(2), np.ones(3), np.zeros(2)])
    part = compute_partition(net)
    G, h, mask = part.facets(net)
    for r in np.flatnonzero(~part.degenerate):
        for f in np.flatnonzero(mask[r]):
            others = np.delete(np.flatnonzero(mask[r]), np.flatnonzero(mask[r]) == f)
            A = np.vstack([G[r, others], np.eye(3), -np.eye(3)])
            rhs = np.concatenate([h[r, others], np.full(6, 10.0)])
            # max s: z on row f's hyperplane, every other row at least s |row| inside
            res = linprog(np.r_[np.zeros(3), -1.0], A_ub=np.c_[A, np.linalg.norm(A, axis=1)], b_ub=rhs,
                          A_eq=np.r_[G[r, f], 0.0][None], b_eq=[h[r, f]], bounds=[(None, None)] * 3 + [(None, 1.0)])
            assert res.status == 0 and -res.fun > 1e-6, (r, part.facet_units[part.facet_ptr[r] + f])
    p = np.exp(part.log_prior_mass)
    assert abs(p.sum() - 1) < 1e-9
    assert_prior_samples_located(net, part)


def test_a_linear_program_past_its_time_limit_is_an_error(monkeypatch):
    """HiGHS's interior point once ran for hours on a badly scaled LP, deaf to Ctrl-C (see
    the test above): every LP now has LP_SECONDS, and one that runs out is a one-line
    error, not a region silently dropped as infeasible."""
    G = np.random.default_rng(0).normal(size=(40, 3))
    G /= np.linalg.norm(G, axis=1, keepdims=True)
    centre, radius = partition_module._chebyshev(G, np.ones(40))
    tol = 1e-7                                   # HiGHS's feasibility tolerance
    assert abs(radius - 1.0) <= tol and (G @ centre + radius <= 1.0 + tol).all()   # the unit ball at 0 fits
    monkeypatch.setattr(partition_module, "LP_SECONDS", 1e-9)
    with pytest.raises(CpadgnError, match="ran past its 1e-09 s limit"):
        partition_module._chebyshev(G, np.ones(40))
