"""Pictures (cpadgn.plot and the --plot options): rendered with Agg, read back pixel by
pixel and checked against numbers computed independently (a forward pass locating each
pixel's region, Bayes' rule for the posterior density, brute-force counts)."""
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.integrate import trapezoid
from scipy.stats import multivariate_normal

from cli.main import main
from cpadgn import plot
from cpadgn.anomaly import alpha_threshold
from cpadgn.model import CPAModel
from cpadgn.modelfile import save_model

from oracles import random_net


MEAN = np.array([0.5, -0.3])
COV = np.array([[1.5, 0.4], [0.4, 0.8]])
NOISE = 0.3
RGB_TOL = 2.5 / 255          # 8-bit colour quantisation (1/255) plus rounding of blended edges


@pytest.fixture(scope="module")
def model2():
    net = random_net(2, (8, 8), 3, seed=4, scale=2.0)
    return CPAModel(net, prior_mean=MEAN, prior_cov=COV, noise_std=NOISE, device="cpu")


@pytest.fixture(scope="module")
def model1():
    return CPAModel(random_net(1, (6, 6), 3, seed=2, slope=0.1, scale=2.0), prior_mean=[0.3],
                    prior_cov=[[2.0]], noise_std=NOISE, device="cpu")


def draws(model, n, seed):
    rng = np.random.default_rng(seed)
    z = rng.multivariate_normal(model.prior_mean, model.prior_cov, n)
    return model.generator.forward(z) + NOISE * rng.standard_normal((n, model.output_dim))


def bayes_density(model, x, z):
    """p(z | x) = N(x; g(z), NOISE^2 I) N(z; m, C) / p(x) in the user's coordinates."""
    g = model.generator.forward(z)
    log_lik = -0.5 * (((x - g) / NOISE) ** 2).sum(1) - x.size * np.log(NOISE * np.sqrt(2 * np.pi))
    log_prior = multivariate_normal(model.prior_mean, model.prior_cov).logpdf(z)
    return np.exp(log_lik + log_prior - model.log_prob(x[None])[0])


def rendered(fig):
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3] / 255.0


def pixels_at(fig, buf, ax, pts):
    """RGB (n, 3) of the pixels under data points pts (n, 2) of ax."""
    d = ax.transData.transform(pts)
    col, row = np.floor(d[:, 0]).astype(int), buf.shape[0] - 1 - np.floor(d[:, 1]).astype(int)
    return buf[row, col]


def png_size(path):
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


# ------------------------------------------------------------------ the density
def test_posterior_density_is_bayes_rule(model2, model1):
    for model in (model2, model1):
        X = draws(model, 3, seed=1)
        post = model.posterior(X)
        for n in range(3):
            sd = np.sqrt(np.diag(post.z_cov[n]))
            rng = np.random.default_rng(n)
            z = post.z_mean[n] + 3 * sd * rng.uniform(-1, 1, (400, model.latent_dim))
            got = plot.posterior_density(model, X[n:n + 1], z)[0]
            want = bayes_density(model, X[n], z)
            # both sides are exp of sums of O(10) terms: 1e-9 relative, plus the certified
            # pruning (rtol 1e-10) of regions whose density is dropped
            np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * want.max())


# ---------------------------------------------------------------- S = 2 regions
def located_pixels(fig, buf, ax, model, n=4000, margin=3, seed=0):
    """Random pixels of ax whose (2 margin + 1)^2 neighbourhood lies in one region (by
    a forward pass): their centres in data coordinates (k, 2), region (k,) and RGB."""
    x0, y0, x1, y1 = ax.get_window_extent().extents
    rng = np.random.default_rng(seed)
    px = np.column_stack([rng.integers(int(x0) + 8, int(x1) - 8, n), rng.integers(int(y0) + 8, int(y1) - 8, n)])
    offs = np.array([(i, j) for i in (-margin, 0, margin) for j in (-margin, 0, margin)])
    pts = ax.transData.inverted().transform((px[:, None, :] + 0.5 + offs[None]).reshape(-1, 2))
    w = np.linalg.solve(model.prior_chol, (pts - model.prior_mean).T).T
    reg = model.partition().locate(model.net, w).reshape(n, len(offs))
    # keep pixels away from the prior's contour ellipses too (Mahalanobis radius r_k)
    rho = np.sqrt((w.reshape(n, len(offs), 2) ** 2).sum(-1))
    radii = np.sqrt(-2 * np.log1p(-np.array(plot.PRIOR_CONTOUR_MASSES)))
    near_contour = ((rho.min(1)[:, None] < radii + 0.05) & (rho.max(1)[:, None] > radii - 0.05)).any(1)
    one = (reg == reg[:, :1]).all(1) & (reg[:, 0] >= 0) & ~near_contour
    centres = ax.transData.inverted().transform(px[one] + 0.5)
    rows, cols = buf.shape[0] - 1 - px[one, 1], px[one, 0]
    return centres, reg[one, 0], buf[rows, cols]


def test_region_shades_match_their_log_prior_mass(model2):
    fig = plot.partition(model2)
    buf = rendered(fig)
    ax = fig.cpadgn_main_axes
    assert buf.shape[:2] == (450, 600)
    coll = ax.collections[0]
    part = model2.partition()
    _, reg, rgb = located_pixels(fig, buf, ax, model2)
    assert len(set(reg)) >= 10
    # every region met by the window is drawn, and the colour scale spans their masses
    assert set(reg) <= set(coll.cpadgn_regions)
    drawn = part.log_prior_mass[coll.cpadgn_regions]
    assert coll.norm.vmin == drawn.min() and coll.norm.vmax == drawn.max()
    want = coll.cmap(coll.norm(part.log_prior_mass[reg]))[:, :3]
    assert np.abs(rgb - want).max() <= RGB_TOL
    # the interior point of each region well inside the window has its region's shade
    L = model2.prior_chol
    z = MEAN + part.interior @ L.T
    (a, b), (c, d) = ax.get_xlim(), ax.get_ylim()
    px_per_unit = ax.transData.transform([[1, 0]])[0, 0] - ax.transData.transform([[0, 0]])[0, 0]
    clear_px = part.clearance * np.linalg.svd(L, compute_uv=False).min() * px_per_unit
    rho = np.sqrt((part.interior ** 2).sum(1))
    radii = np.sqrt(-2 * np.log1p(-np.array(plot.PRIOR_CONTOUR_MASSES)))
    ok = ((z[:, 0] > a) & (z[:, 0] < b) & (z[:, 1] > c) & (z[:, 1] < d) & (clear_px > 3)
          & (np.abs(rho[:, None] - radii).min(1) * np.linalg.svd(L, compute_uv=False).min() * px_per_unit > 3))
    assert ok.sum() >= 5
    got = pixels_at(fig, buf, ax, z[ok])
    want = coll.cmap(coll.norm(part.log_prior_mass[ok]))[:, :3]
    assert np.abs(got - want).max() <= RGB_TOL


def test_pixels_on_both_sides_of_a_facet_differ(model2):
    fig = plot.partition(model2)
    buf = rendered(fig)
    ax = fig.cpadgn_main_axes
    part = model2.partition()
    centres, reg, rgb = located_pixels(fig, buf, ax, model2, n=6000, margin=2, seed=1)
    d = ax.transData.transform(centres)
    near = np.hypot(*(d[:, None, :] - d[None, :, :]).transpose(2, 0, 1)) < 8
    i, j = np.nonzero(near & (reg[:, None] != reg[None, :]))
    shade = ax.collections[0].cmap(ax.collections[0].norm(part.log_prior_mass))[:, :3]
    distinct = np.abs(shade[reg[i]] - shade[reg[j]]).max(1) > 5 * RGB_TOL
    assert distinct.sum() >= 10           # pairs of pixels within 8 px across a facet
    assert (np.abs(rgb[i[distinct]] - rgb[j[distinct]]).max(1) > 3 * RGB_TOL).all()


def test_posterior_panels_mark_the_mean_and_draw_the_exact_density(model2):
    X = draws(model2, 4, seed=3)
    fig = plot.partition(model2, X, rows=[1, 2])
    buf = rendered(fig)
    post = model2.posterior(X[[1, 2]])
    assert buf.shape[:2] == (600, 900)
    zooms = [a for a in fig.axes if a is not fig.cpadgn_main_axes and a.get_label() != "<colorbar>"]
    assert len(zooms) == 2
    for ax in [fig.cpadgn_main_axes, *zooms]:
        marks = [ln for ln in ax.lines if ln.get_gid() == "posterior_mean"]
        shown = np.array([[ln.get_xdata()[0], ln.get_ydata()[0]] for ln in marks])
        want = post.z_mean if ax is fig.cpadgn_main_axes else post.z_mean[[zooms.index(ax)]]
        np.testing.assert_array_equal(shown, want)
        # the pixel under E[z | x] has the marker's face colour
        for ln, z in zip(marks, want):
            from matplotlib.colors import to_rgb
            assert np.abs(pixels_at(fig, buf, ax, z[None])[0] - to_rgb(ln.get_markerfacecolor())).max() <= RGB_TOL
    for k, ax in enumerate(zooms):
        cs = [c for c in ax.collections if hasattr(c, "cpadgn_density")]
        gx, gy, dens = cs[0].cpadgn_density
        sub = np.s_[::20, ::20]
        Z = np.stack(np.meshgrid(gx, gy), -1)[sub].reshape(-1, 2)
        want = bayes_density(model2, X[[1, 2][k]], Z)
        np.testing.assert_allclose(dens[sub].ravel(), want, rtol=1e-7, atol=1e-9 * want.max())
        # E[z | x] from the drawn density by quadrature on its grid (trapezoid, 241^2 points
        # over +-4 std: error far below the 2% allowed here)
        w = trapezoid(trapezoid(dens, gx, axis=1), gy)
        m1 = trapezoid(trapezoid(dens * gx[None, :], gx, axis=1), gy) / w
        m2 = trapezoid(trapezoid(dens * gy[:, None], gx, axis=1), gy) / w
        sd = np.sqrt(np.diag(post.z_cov[k]))
        assert abs(w - 1) < 0.02
        assert np.all(np.abs(np.array([m1, m2]) - post.z_mean[k]) < 0.02 * sd)


def test_partition_on_a_given_axes_and_window(model2):
    fig0 = plot.new_figure((400, 400))
    ax = fig0.add_subplot(1, 1, 1)
    fig = plot.partition(model2, ax=ax, window=((-1, 1), (-2, 0)))
    assert fig is fig0 and ax.get_xlim() == (-1, 1) and ax.get_ylim() == (-2, 0)


# ----------------------------------------------------------------------- S = 1
def test_line_shows_prior_breakpoints_and_posteriors(model1):
    X = draws(model1, 3, seed=5)
    fig = plot.partition(model1, X, rows=[0, 2])
    top, bottom = fig.axes[0], fig.axes[1]
    part = model1.partition()
    # the breakpoints are where the forward pass changes region
    cuts = np.array([ln.get_xdata()[0] for ln in top.lines if ln.get_label() != "prior p(z)"
                     and len(ln.get_xdata()) == 2])
    s = np.sqrt(model1.prior_cov[0, 0])
    for c in cuts:
        w = (np.array([c - 1e-9, c + 1e-9]) - model1.prior_mean[0]) / s
        r = part.locate(model1.net, w[:, None])
        assert r[0] != r[1]
    lo, hi = top.get_xlim()
    z = np.linspace(lo, hi, 20001)
    changes = np.flatnonzero(np.diff(part.locate(model1.net, ((z - model1.prior_mean[0]) / s)[:, None])))
    assert len(cuts) == len(changes)
    prior = [ln for ln in top.lines if ln.get_label() == "prior p(z)"][0]
    np.testing.assert_allclose(prior.get_ydata(), multivariate_normal(model1.prior_mean, model1.prior_cov)
                               .pdf(prior.get_xdata()[:, None]), rtol=1e-12)
    post = model1.posterior(X[[0, 2]])
    curves = [ln for ln in bottom.lines if hasattr(ln, "cpadgn_density")]
    marks = [ln for ln in bottom.lines if ln.get_gid() == "posterior_mean"]
    np.testing.assert_array_equal([m.get_xdata()[0] for m in marks], post.z_mean[:, 0])
    for k, (ln, n) in enumerate(zip(curves, [0, 2])):
        zz, dens = ln.cpadgn_density
        want = bayes_density(model1, X[n], zz[:, None])
        np.testing.assert_allclose(dens, want, rtol=1e-7, atol=1e-9 * want.max())


def test_three_latent_dims_are_refused():
    model = CPAModel(random_net(3, (4,), 2, seed=0), noise_std=0.1, device="cpu")
    with pytest.raises(Exception, match="S = 1 or 2"):
        plot.partition(model)


# ---------------------------------------------------------------- histogram
def test_alpha_threshold_flags_exactly_the_small_pvalues():
    rng = np.random.default_rng(0)
    for M in (1, 7, 100, 999):
        ref = np.sort(np.round(rng.normal(size=M), 1))          # ties on purpose
        ll = np.concatenate([np.round(rng.normal(size=300), 1), ref])
        k = (ref[None, :] <= ll[:, None]).sum(1)
        for alpha in (0.001, 0.01, 0.05, 0.1, 0.5, 0.99):
            t = alpha_threshold(ref, alpha)
            np.testing.assert_array_equal(ll < t, (1 + k) / (M + 1) < alpha)


def test_scores_histogram_counts_and_threshold():
    rng = np.random.default_rng(1)
    ll = np.concatenate([rng.normal(30, 5, 500), [-1e4]])        # one far outlier
    ref = rng.normal(32, 4, 800)
    fig = plot.scores_histogram(ll, threshold=20.0, model_log_likelihood=ref, threshold_label="t")
    ax = fig.cpadgn_main_axes
    bars = ax.patches[:40]
    area = sum(b.get_width() * b.get_height() for b in bars)
    # density=True spreads all drawn rows: the outlier is outside the range, so 500/501 of 1
    assert abs(area - 1.0) < 1e-12
    line = [ln for ln in ax.lines if ln.get_gid() == "threshold"][0]
    assert line.get_xdata()[0] == 20.0
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert f"t: {int((ll < 20).sum())} rows flagged" in labels
    assert any("1 rows below" in s for s in labels)
    fig.canvas.draw()
    assert np.asarray(fig.canvas.buffer_rgba()).shape[:2] == (450, 600)


# ------------------------------------------------------------------ imputations
def test_imputation_tiles_show_the_numbers():
    rng = np.random.default_rng(2)
    N, H, W, K = 5, 3, 4, 3
    X = rng.uniform(0, 1, (N, H * W))
    X[1:4, :5] = np.nan
    mean, std, dr = rng.uniform(0, 1, X.shape), rng.uniform(0, 0.2, X.shape), rng.uniform(0, 1, (K, N, H * W))
    fig = plot.imputations(X, mean, std, dr, (H, W))
    np.testing.assert_array_equal(fig.cpadgn_rows, [1, 2, 3])
    buf = rendered(fig)
    axes = np.array(fig.axes).reshape(3, 4 + K)
    for i, n in enumerate([1, 2, 3]):
        want = [X[n], np.isnan(X[n]), mean[n], std[n], *dr[:, n]]
        for j, a in enumerate(axes[i]):
            img = a.images[0]
            np.testing.assert_array_equal(np.ma.filled(img.get_array(), np.nan), np.reshape(want[j], (H, W)))
            # the centre of pixel (r, c) of the tile has the colour of its value
            rgba = img.to_rgba(img.get_array())
            for r, c in [(0, 0), (2, 3), (1, 2)]:
                got = pixels_at(fig, buf, a, np.array([[c, r]], float))[0]
                assert np.abs(got - rgba[r, c, :3]).max() <= RGB_TOL
        # missing pixels of the observed tile are red
        assert np.abs(pixels_at(fig, buf, axes[i, 0], np.array([[0.0, 0.0]]))[0]
                      - np.array([0xe6, 0x19, 0x4b]) / 255).max() <= RGB_TOL
    with pytest.raises(Exception, match="15 pixels but the rows have 12 values"):
        plot.imputations(X, mean, std, dr, (H, W + 1))


# ----------------------------------------------------------------------- CLI
def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory, model2):
    d = tmp_path_factory.mktemp("plots")
    net = random_net(2, (8, 8), 4, seed=4, scale=2.0)
    save_model(d / "gen.h5", net, prior_mean=MEAN, prior_cov=COV, noise_std=NOISE)
    model = CPAModel(net, prior_mean=MEAN, prior_cov=COV, noise_std=NOISE, device="cpu")
    X = draws(model, 30, seed=7)
    np.savetxt(d / "data.csv", X, delimiter=",")
    X[::3, 1:3] = np.nan
    np.savetxt(d / "holes.csv", X, delimiter=",")
    save_model(d / "gen3.h5", random_net(3, (4,), 4, seed=0), noise_std=0.1)
    return d


def test_cli_pictures(files):
    d = files
    r = run("plot", "partition", d / "gen.h5", "-o", d / "map.png", "--data", d / "data.csv", "--row", 0,
            "--row", 5, "--size", "700x500", "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert png_size(d / "map.png") == (700, 500)
    r = run("score", d / "gen.h5", d / "data.csv", "-o", d / "s.csv", "--alpha", "0.1", "--samples", 200,
            "--plot", d / "hist.png", "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert png_size(d / "hist.png") == (600, 450)
    r = run("impute", d / "gen.h5", d / "holes.csv", "-o", d / "f.csv", "--plot", d / "draws.png",
            "--image-shape", "2x2", "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert png_size(d / "draws.png") == (110 * 8 + 40, 120 * 4 + 50)
    assert not list(d.glob("*.tmp"))


def test_cli_refuses_s3_before_computing_its_partition(files):
    """An S = 3 model cannot be drawn: the refusal comes before the partition (which can take
    minutes at S = 3), so no cache is written and nothing is printed but the one line."""
    r = run("plot", "partition", files / "gen3.h5", "-o", files / "m3.png", "--device", "cpu")
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines() == [r.stderr.strip()] and "S = 3; " in r.stderr, r.output
    assert not (files / "gen3.h5.partition.h5").exists() and not (files / "m3.png").exists()


@pytest.mark.parametrize("args, message", [
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/map.jpg"], "use one of .png, .pdf, .svg"),
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/map.png", "--row", "1"], "add --data"),
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/map.png", "--data", "{d}/data.csv", "--row", "30"],
     "past the end"),
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/data.csv"], "use one of .png"),
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/gen.png", "--size", "7x"], "--size"),
    (["plot", "partition", "{d}/gen3.h5", "-o", "{d}/m3.png"], "S = 1 or 2"),
    (["impute", "{d}/gen.h5", "{d}/holes.csv", "-o", "{d}/f2.csv", "--plot", "{d}/i.png", "--image-shape",
      "3x3"], "9 pixels"),
    (["impute", "{d}/gen.h5", "{d}/data.csv", "-o", "{d}/f2.csv", "--plot", "{d}/i.png"], "has none"),
    (["impute", "{d}/gen.h5", "{d}/holes.csv", "-o", "{d}/f2.csv", "--image-shape", "2x2"], "add --plot"),
    (["score", "{d}/gen.h5", "{d}/data.csv", "-o", "{d}/s2.csv", "--plot", "{d}/data.csv"], "destroyed"),
])
def test_cli_refusals_are_one_line(files, args, message):
    r = run(*[a.format(d=files) for a in args], "-q", "--device", "cpu")
    assert r.exit_code == 1, r.output
    err = r.stderr.strip()
    assert err.startswith("Error:") and "\n" not in err and message in err, err
    assert not (files / "i.png").exists() and not (files / "f2.csv").exists()


def test_missing_matplotlib_is_one_clear_line(files):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["matplotlib"] = None
        from click.testing import CliRunner
        from cli.main import main
        from cpadgn import plot
        try:
            plot.scores_histogram([1.0, 2.0])
        except Exception as e:
            print("API:", type(e).__name__, e)
        r = CliRunner().invoke(main, ["plot", "partition", r"{files / 'gen.h5'}", "-o", r"{files / 'x.png'}"])
        print("CLI:", r.exit_code, r.stderr.strip())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == ("API: CpadgnError pictures need matplotlib, which is not installed; "
                        "pip install 'cpadgn[plot]' (or matplotlib)"), out
    assert lines[1] == ("CLI: 1 Error: pictures need matplotlib, which is not installed; "
                        "pip install 'cpadgn[plot]' (or matplotlib)"), out
    assert not (files / "x.png").exists()
