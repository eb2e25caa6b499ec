"""Pictures (cpadgn.plot and the --plot options): rendered with Agg, read back pixel by
pixel and checked against numbers computed independently (a forward pass locating each
pixel's region, Bayes' rule for the posterior density, brute-force counts)."""
import io
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy.integrate import trapezoid
from scipy.stats import chi2, multivariate_normal

from cli.main import main
from cpadgn import plot
from cpadgn.anomaly import alpha_threshold
from cpadgn.errors import CpadgnError
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


MEAN3 = np.array([0.3, -0.2, 0.1])
COV3 = np.array([[1.3, 0.3, -0.2], [0.3, 0.9, 0.25], [-0.2, 0.25, 1.1]])


@pytest.fixture(scope="module")
def model3():
    net = random_net(3, (6, 6), 4, seed=1, scale=2.0)
    return CPAModel(net, prior_mean=MEAN3, prior_cov=COV3, noise_std=NOISE, device="cpu")


@pytest.fixture(scope="module")
def model4():
    return CPAModel(random_net(4, (6, 6), 5, seed=3, scale=2.0), noise_std=NOISE, device="cpu")


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
def located_pixels(fig, buf, ax, model, n=4000, margin=3, seed=0, lift=lambda u: u):
    """Random pixels of ax whose (2 margin + 1)^2 neighbourhood lies in one region (by
    a forward pass at lift(u), the latent point (k, S) of ax's points u (k, 2)): their
    centres in data coordinates (k, 2), region (k,) and RGB."""
    x0, y0, x1, y1 = ax.get_window_extent().extents
    rng = np.random.default_rng(seed)
    px = np.column_stack([rng.integers(int(x0) + 8, int(x1) - 8, n), rng.integers(int(y0) + 8, int(y1) - 8, n)])
    offs = np.array([(i, j) for i in (-margin, 0, margin) for j in (-margin, 0, margin)])
    pts = ax.transData.inverted().transform((px[:, None, :] + 0.5 + offs[None]).reshape(-1, 2))
    S = model.latent_dim
    w = np.linalg.solve(model.prior_chol, (lift(pts) - model.prior_mean).T).T
    reg = model.partition().locate(model.net, w).reshape(n, len(offs))
    # keep pixels away from the prior's contour ellipses too (Mahalanobis radius r_k)
    rho = np.sqrt((w.reshape(n, len(offs), S) ** 2).sum(-1))
    radii = np.sqrt(chi2.ppf(plot.PRIOR_CONTOUR_MASSES, S))
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


def test_every_panel_shares_one_colour_scale_that_holds_all_its_regions(model2, model3):
    """The zoomed panels reach regions the main view does not (a small window=, a zoom past the
    main window's edge, at S >= 3 each zoom's own slice): their log prior masses must lie inside
    the one colour scale, not clip silently to its ends."""
    for model, kw in [(model2, dict(window=((-0.05, 0.05), (-0.05, 0.05)))), (model3, {})]:
        X = draws(model, 4, seed=7)
        fig = plot.partition(model, X, rows=[0, 1, 2, 3], **kw)
        colls = [c for a in fig.axes for c in a.collections if hasattr(c, "cpadgn_regions")]
        assert len(colls) == 5
        masses = np.concatenate([model.partition().log_prior_mass[c.cpadgn_regions] for c in colls])
        norm = colls[0].norm
        assert all(c.norm is norm for c in colls)
        assert norm.vmin == masses.min() and norm.vmax == masses.max()


def test_the_legend_says_what_the_posterior_contour_lines_are(model2):
    """The p(z | x) contours are fractions of each panel's peak: the legend says which (it did
    not, so a reader could not tell a 5% line from a 95% one), for zoomed panels and for rows
    drawn in the main panel (on a given ax, or past the fourth)."""
    X = draws(model2, 5, seed=3)
    for fig in (plot.partition(model2, X, rows=[0, 1, 2, 3, 4]),
                plot.partition(model2, X, rows=[1], ax=plot.new_figure().add_subplot(1, 1, 1))):
        ax = fig.cpadgn_main_axes
        text = " ".join(t.get_text() for t in ax.get_legend().get_texts())
        assert "p(z | x) contours" in text and "5, 20, 40, 60, 80, 95% of its peak" in text
        for a in fig.axes:
            for c in a.collections:
                if hasattr(c, "cpadgn_density"):
                    top = c.cpadgn_density[2].max()
                    np.testing.assert_allclose(c.levels, top * np.array([0.05, 0.2, 0.4, 0.6, 0.8, 0.95]),
                                               rtol=1e-15)


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


# ------------------------------------------------------------- S >= 3: slices
def forward_regions(model, z):
    """Region index of each latent point z (P, S) (user coordinates) from the sign pattern
    of a plain forward pass through the net's weights (the prior folded into layer 1)."""
    h, signs = np.linalg.solve(model.prior_chol, (z - model.prior_mean).T).T, []
    for W, b, a in zip(model.net.weights[:-1], model.net.biases[:-1], model.net.slopes):
        pre = h @ W.T + b
        signs.append(pre >= 0)
        h = np.where(pre >= 0, pre, a * pre)
    index = {p.tobytes(): r for r, p in enumerate(model.partition().patterns)}
    return np.array([index.get(p.tobytes(), -1) for p in np.concatenate(signs, 1)])


def edge_margins(poly, u):
    """Signed distances (P, V) of points u (P, 2) inside each edge of the convex polygon
    poly (V, 2), any orientation: all >= 0 inside."""
    e = np.roll(poly, -1, 0) - poly
    n = np.column_stack([-e[:, 1], e[:, 0]]) / np.hypot(*e.T)[:, None]
    d = np.einsum("pvk,vk->pv", u[:, None, :] - poly[None], n)
    x, y = poly.T
    return d * np.sign(x @ np.roll(y, -1) - y @ np.roll(x, -1))


@pytest.mark.parametrize("S, axes, at", [(3, (0, 2), [0.4]), (3, (2, 1), [-1.1]), (4, (1, 3), [0.3, -0.5])])
def test_slice_polygons_tile_the_window_and_hold_their_regions_points(model3, model4, S, axes, at):
    model = model3 if S == 3 else model4
    window = ((-3.0, 3.5), (-2.5, 3.0))
    regions, polys = plot.region_polygons(model, window, plane=plot.latent_slice(model, axes, at))
    assert len(regions) >= 15 and len(set(regions)) == len(regions)
    # the polygons' areas add up to the window's (vertex coordinates carry ~1e-15 relative error)
    area = sum(0.5 * abs(p[:, 0] @ np.roll(p[:, 1], -1) - p[:, 1] @ np.roll(p[:, 0], -1)) for p in polys)
    assert abs(area - 6.5 * 5.5) < 1e-9 * 6.5 * 5.5
    # points of the plane z_axes = u, the other coordinates = at: each lies in its region's polygon
    rng = np.random.default_rng(S)
    u = np.column_stack([rng.uniform(*window[0], 4000), rng.uniform(*window[1], 4000)])
    z = np.empty((len(u), S))
    z[:, list(axes)] = u
    z[:, [k for k in range(S) if k not in axes]] = at
    reg = forward_regions(model, z)
    assert (reg >= 0).all() and set(reg) <= set(regions)
    where = {r: k for k, r in enumerate(regions)}
    for r in set(reg):
        inside = edge_margins(polys[where[r]], u[reg == r])
        assert (inside.min(1) > -1e-9).all()          # on its polygon, up to the vertices' rounding
    # ... and strictly inside no other polygon (with the areas: the polygons tile the window)
    for k, p in enumerate(polys):
        others = reg != regions[k]
        assert not (edge_margins(p, u[others]).min(1) > 1e-9).any()


def test_slice_picture_shades_its_regions_by_their_3d_mass(model3):
    fig = plot.partition(model3, slice_axes=(2, 0), slice_at=0.3)
    buf = rendered(fig)
    ax = fig.cpadgn_main_axes
    part = model3.partition()
    coll = ax.collections[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z3", "z1") and "z2 = 0.3" in ax.get_title()
    lift = lambda u: np.column_stack([u[:, 1], np.full(len(u), 0.3), u[:, 0]])
    # every pixel away from an edge has the colour of its 3-D region's log prior mass
    _, reg, rgb = located_pixels(fig, buf, ax, model3, lift=lift)
    assert len(set(reg)) >= 8 and set(reg) <= set(coll.cpadgn_regions)
    want = coll.cmap(coll.norm(part.log_prior_mass[reg]))[:, :3]
    assert np.abs(rgb - want).max() <= RGB_TOL
    label = [a for a in fig.axes if a.get_label() == "<colorbar>"][0].get_ylabel()
    assert "whole 3-D region (exact)" in label
    # the prior's 50/90/99% ellipsoids cut by the plane: Mahalanobis radius^2 = chi^2_3 quantile
    rings = [ln for ln in ax.lines if ln.get_gid() != "posterior_mean"]
    assert len(rings) == 3
    icov = np.linalg.inv(COV3)
    for ln, mass in zip(rings, plot.PRIOR_CONTOUR_MASSES):
        d = lift(np.column_stack([ln.get_xdata(), ln.get_ydata()])) - MEAN3
        # |d|^2 ~ 10 computed from the ellipse's parametrisation: ~1e-14 relative rounding
        np.testing.assert_allclose(np.einsum("pi,ij,pj->p", d, icov, d), chi2.ppf(mass, 3), rtol=1e-10)


def test_slice_picture_through_the_rows_posterior_means(model3):
    X = draws(model3, 3, seed=11)
    fig = plot.partition(model3, X, rows=[2, 0])
    ax = fig.cpadgn_main_axes
    post = model3.posterior(X[[2, 0]])
    # default slice: axes z1, z2 through E[z | x] of the first row given
    assert ax.collections[0].cpadgn_slice.axes == (0, 1)
    assert ax.collections[0].cpadgn_slice.origin[2] == post.z_mean[0, 2]
    assert "S = 3" in ax.get_title() and "row 2" in ax.get_title()
    marks = [ln for ln in ax.lines if ln.get_gid() == "posterior_mean"]
    np.testing.assert_array_equal([[m.get_xdata()[0], m.get_ydata()[0]] for m in marks], post.z_mean[:, :2])
    # each zoomed panel: the slice through its own row's E[z | x], the exact p(z | x) on it
    zooms = [a for a in fig.axes if a is not ax and a.get_label() != "<colorbar>"]
    assert len(zooms) == 2
    for k, (zax, n) in enumerate(zip(zooms, [2, 0])):
        assert zax.collections[0].cpadgn_slice.origin[2] == post.z_mean[k, 2]
        gx, gy, dens = [c for c in zax.collections if hasattr(c, "cpadgn_density")][0].cpadgn_density
        sub = np.s_[::24, ::24]
        U = np.stack(np.meshgrid(gx, gy), -1)[sub].reshape(-1, 2)
        want = bayes_density(model3, X[n], np.column_stack([U, np.full(len(U), post.z_mean[k, 2])]))
        np.testing.assert_allclose(dens[sub].ravel(), want, rtol=1e-7, atol=1e-9 * want.max())


def test_main_panel_draws_no_contours_for_a_posterior_the_slice_misses(model3):
    """A fifth row's p(z | x) is drawn in the main panel, contoured at fractions of its peak on
    the slice: on a slice far from its posterior that peak is a far tail (1e-55 of the density
    at E[z | x] on an S = 3 digits model), which was drawn as if it were the posterior."""
    X = draws(model3, 5, seed=11)
    post = model3.posterior(X)
    sd = np.sqrt(post.z_cov[4, 2, 2])
    at_mean = bayes_density(model3, X[4], post.z_mean[4:5])[0]
    for shift, drawn in [(0.0, True), (6.0, False)]:
        at = post.z_mean[4, 2] + shift * sd
        fig = plot.partition(model3, X, rows=[0, 1, 2, 3, 4], slice_at=at)
        ax = fig.cpadgn_main_axes
        contours = [c for c in ax.collections if hasattr(c, "cpadgn_density")]
        legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
        # the oracle: Bayes' rule on the drawn window's grid against its value at E[z | x]
        zw = plot._posterior_window(post.z_mean[4], post.z_cov[4], (0, 1))
        g = np.stack(np.meshgrid(np.linspace(*zw[0], 61), np.linspace(*zw[1], 61)), -1).reshape(-1, 2)
        top = bayes_density(model3, X[4], np.column_stack([g, np.full(len(g), at)])).max()
        assert (top > 1e-3 * at_mean) == drawn               # plot.FAINT_SLICE
        assert len(contours) == drawn
        assert ("row 4: p(z | x) on this slice < 0.001 of its value at E[z | x]; no contours" in legend) != drawn


def test_zoomed_panels_name_their_axes(model2, model3):
    """The zoomed panels had tick labels but no axis names: which of z1..zS is across?"""
    for model, axes in [(model2, None), (model2, (1, 0)), (model3, (2, 0))]:
        X = draws(model, 2, seed=2)
        fig = plot.partition(model, X, rows=[0, 1], slice_axes=axes)
        zooms = [a for a in fig.axes if a is not fig.cpadgn_main_axes and a.get_label() != "<colorbar>"]
        i, j = (0, 1) if axes is None else axes
        assert [(a.get_xlabel(), a.get_ylabel()) for a in zooms] == [(f"z{i + 1}", f"z{j + 1}")] * 2


def test_slice_options_are_checked(model3, model1, model2):
    for kw, message in [(dict(slice_axes=(0, 0)), "two different axes"),
                        (dict(slice_axes=(0, 3)), "z1, z4: this model's latent axes are z1..z3"),
                        (dict(slice_axes=(0, 1, 2)), "two latent axes, not 3"),
                        (dict(slice_at=[1.0, 2.0]), "fixes z3: give one value for all or 1, not 2"),
                        (dict(slice_at=[np.nan]), "finite")]:
        with pytest.raises(Exception, match=message):
            plot.partition(model3, **kw)
    with pytest.raises(Exception, match="S = 2 leaves no coordinate to fix"):
        plot.partition(model2, slice_at=0.5)
    with pytest.raises(Exception, match="S = 1 has a latent line"):
        plot.partition(model1, slice_axes=(0, 1))


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


def test_alpha_threshold_agrees_with_the_flags_when_alpha_times_m_plus_1_is_whole():
    """alpha (M + 1) a whole number, e.g. --alpha 0.07 --samples 99: the row whose p-value
    is exactly alpha (7/100) is not flagged by score (pvalue < alpha), but alpha_threshold took
    ceil(0.07 * 100 - 1) = ceil(6.000000000000001) = 7 ranks, so the histogram's line and its
    "rows flagged" counted one rank more.  Oracle: exact rationals, alpha as the decimal typed."""
    from fractions import Fraction
    for M in (19, 99, 199, 999):
        ref = np.arange(M, dtype=np.float64)                           # sorted, distinct
        ll = np.concatenate([ref - 0.5, ref, [M - 0.5]])               # between and on the draws
        k = (ref[None, :] <= ll[:, None]).sum(1)
        for i in range(1, 100):
            alpha = float(f"0.{i:02d}")
            if alpha * (M + 1) <= 1:
                continue                                               # refused by score
            exact = np.array([Fraction(int(kk) + 1, M + 1) < Fraction(f"0.{i:02d}") for kk in k])
            np.testing.assert_array_equal((1 + k) / (M + 1) < alpha, exact)     # score's flags
            np.testing.assert_array_equal(ll < alpha_threshold(ref, alpha), exact, err_msg=f"M={M} alpha={alpha}")


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
    # "not drawn" beside "rows drawn from the model" read as "not sampled"
    assert any(s.startswith("1 rows below") and s.endswith(": off the axis, not in the bars") for s in labels)
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


def test_imputation_title_gives_the_grey_scale_and_counts_the_draws_beyond_it():
    """Draws outside the observed values' and means' range saturate: the title says how many
    (they were clipped with nothing in the picture saying so)."""
    rng = np.random.default_rng(3)
    N, D, K = 6, 9, 4
    X = rng.uniform(0, 1, (N, D))
    X[[0, 2, 3, 5], :4] = np.nan
    mean = rng.uniform(0.1, 0.9, X.shape)
    dr = rng.normal(0.5, 0.4, (K + 2, N, D))         # 2 draws past max_draws: not shown, not counted
    fig = plot.imputations(X, mean, np.full(X.shape, 0.1), dr, (3, 3))
    rows = [0, 2, 3, 5]
    lo = min(np.nanmin(X[rows]), mean[rows].min())
    hi = max(np.nanmax(X[rows]), mean[rows].max())
    shown = dr[:K][:, rows]
    beyond = int(((shown < lo) | (shown > hi)).sum())
    assert beyond > 0
    title = fig._suptitle.get_text()
    assert f"grey scale {lo:.3g}..{hi:.3g}; {beyond} drawn pixels beyond it saturate" in title
    clean = plot.imputations(X, mean, np.full(X.shape, 0.1), np.clip(dr, lo, hi), (3, 3))
    assert "saturate" not in clean._suptitle.get_text()


def test_imputation_figure_labels_tiles_by_their_rows_in_the_data(model1):
    """impute --plot labelled its tiles 'row 0..3', the positions among the rows with a
    missing entry: for missing rows 0, 2, 3 and 5 of the data the tiles said 0, 1, 2, 3."""
    X = draws(model1, 6, seed=1)
    X[[0, 2, 3, 5], 0] = np.nan
    fig = plot.imputation_figure(model1, X, image_shape=(1, 3), n_draws=1)
    np.testing.assert_array_equal(fig.cpadgn_rows, [0, 2, 3, 5])
    labels = [a.get_ylabel() for a in np.array(fig.axes).reshape(4, -1)[:, 0]]
    assert labels == ["row 0", "row 2", "row 3", "row 5"]


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
    r = run("plot", "partition", d / "gen3.h5", "-o", d / "slice.png", "--slice-axes", "z1,z3", "--slice-at",
            "0.5", "-q", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert png_size(d / "slice.png") == (600, 450)
    assert not list(d.glob("*.tmp"))


def test_cli_refuses_bad_slice_options_before_computing_the_partition(files, tmp_path):
    """Slice options the model cannot take are refused before its partition (which can take
    minutes at S = 3), so no cache is written and nothing is printed but the one line."""
    shutil.copy(files / "gen3.h5", tmp_path / "gen3.h5")
    for option in (["--slice-axes", "1,4"], ["--slice-at", "1,2"]):
        r = run("plot", "partition", tmp_path / "gen3.h5", "-o", tmp_path / "m3.png", "--device", "cpu", *option)
        assert r.exit_code == 1, r.output
        assert r.output.strip().splitlines() == [r.stderr.strip()] and option[0] in r.stderr, r.output
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gen3.h5"]


def test_cli_slice_axes_of_an_s1_model_says_what_to_do(tmp_path):
    """--slice-axes of an S = 1 model was refused with only "S = 1 has a latent line, not a
    plane to slice"; the one line now says to drop it, as --slice-at's does."""
    save_model(tmp_path / "gen1.h5", random_net(1, (4,), 3, seed=1), noise_std=0.3)
    r = run("plot", "partition", tmp_path / "gen1.h5", "-o", tmp_path / "m.png", "--slice-axes", "1,2", "-q")
    assert r.exit_code == 1, r.output
    err = r.stderr.strip()
    assert err.startswith("Error: --slice-axes 1,2: S = 1 has a latent line") and "\n" not in err, err
    assert err.endswith("drop it"), err
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize("model, rows", [("gen1.h5", 2), ("gen.h5", 0), ("gen.h5", 5), ("gen3.h5", 1),
                                         ("gen3.h5", 5)])
def test_cli_pictures_at_the_smallest_size_lay_out_without_a_warning(files, tmp_path, model, rows):
    """Each layout (S = 1, 2, 3; none to the most zoomed rows) at MIN_PICTURE_SIZE, warnings
    as errors: matplotlib's 'constrained_layout not applied' (what 1x1 to about 370x176 gave)
    would end the command with exit 70."""
    from cpadgn.picture_size import MIN_PICTURE_SIZE
    if model == "gen1.h5":
        save_model(tmp_path / model, random_net(1, (6,), 4, seed=1), noise_std=0.3)
    path = tmp_path / model if model == "gen1.h5" else files / model
    w, h = MIN_PICTURE_SIZE
    picked = [a for r in range(rows) for a in ("--row", r)] + (["--data", files / "data.csv"] if rows else [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = run("plot", "partition", path, "-o", tmp_path / "small.png", "--size", f"{w}x{h}",
                *picked, "-q", "--device", "cpu", "--cache", tmp_path / "c.h5")
    assert r.exit_code == 0 and r.output == "", r.output
    assert png_size(tmp_path / "small.png") == (w, h)


@pytest.mark.parametrize("size, message", [
    ("1x1", "1x1 is too small to lay the picture out: at least 400x200 pixels"),
    ("10x10", "at least 400x200 pixels"), ("399x900", "at least 400x200"), ("900x199", "at least 400x200"),
    ("7x", "expected WxH in pixels"), ("-5x300", "expected WxH"),
    ("100000x100000", "at most 16384 pixels a side"),   # was 'out of memory; lower --memory-budget'
])
def test_cli_size_out_of_range_is_a_one_line_usage_error_before_any_work(files, tmp_path, size, message):
    shutil.copy(files / "gen.h5", tmp_path / "gen.h5")
    r = run("plot", "partition", tmp_path / "gen.h5", "-o", tmp_path / "map.png", "--size", size)
    assert r.exit_code == 2, r.output
    err = r.stderr.strip()
    assert err.startswith("Error: Invalid value for '--size'") and "\n" not in err and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.h5"]      # no picture, no cache


@pytest.mark.parametrize("size, message", [
    ((1, 1), "size 1x1 is too small to lay the picture out: at least 400x200 pixels"),
    ((399, 900), "at least 400x200"), ((100000, 600), "at most 16384 pixels a side"),
    ((800.5, 600), "whole pixels"), (("800", "600"), "whole pixels"), (800, "whole pixels"),
])
def test_library_pictures_refuse_the_sizes_the_command_line_refuses(model2, size, message):
    """size=(1, 1) from Python drew a collapsed picture with matplotlib's 'constrained_layout
    not applied' warnings; --size refused it.  One check (picture_size.check_size) for both,
    in every public function taking size, before any work (the model's posterior here)."""
    X = np.full((2, 3), np.nan)
    X[:, 0] = 1.0
    calls = [lambda: plot.partition(model2, X, rows=[0], size=size),
             lambda: plot.scores_histogram([-1.0, -2.0], size=size),
             lambda: plot.scores_figure([-1.0, -2.0], contamination=0.1, size=size),
             lambda: plot.imputations(X, X, X, None, (1, 3), size=size),
             lambda: plot.imputation_figure(None, X, size=size)]
    for call in calls:
        with pytest.raises(CpadgnError, match=message):
            call()


@pytest.mark.parametrize("name, message", [
    ("pic", "unknown output extension '(none)'; use one of .png, .pdf, .svg"),   # was matplotlib's ValueError
    ("pic.jpg", "unknown output extension '.jpg'"), ("pic.eps", "unknown output extension '.eps'"),
    ("no/such/dir/pic.png", "does not exist; create it first"),
])
def test_save_refuses_what_the_command_line_refuses_in_one_line(tmp_path, name, message):
    fig = plot.scores_histogram(np.arange(10.0))
    with pytest.raises(CpadgnError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        plot.save(fig, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    plot.save(fig, tmp_path / "pic.PNG")
    assert png_size(tmp_path / "pic.PNG") == (600, 450)


def test_library_pictures_at_the_smallest_size_lay_out_without_a_warning():
    """The histogram and the most crowded imputation tiles (4 rows, 4 draws) at MIN_PICTURE_SIZE."""
    from cpadgn.picture_size import MIN_PICTURE_SIZE
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4, 64))
    X[:, :10] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for fig in (plot.scores_histogram(rng.standard_normal(50), -1.0, rng.standard_normal(50),
                                          threshold_label="t", size=MIN_PICTURE_SIZE),
                    plot.imputations(X, np.nan_to_num(X), np.ones_like(X), rng.standard_normal((4, 4, 64)),
                                     (8, 8), size=MIN_PICTURE_SIZE)):
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png")
            assert struct.unpack(">II", buffer.getvalue()[16:24]) == MIN_PICTURE_SIZE


# exit 2: wrong on the command line alone (usage errors); exit 1: seen once the files are read
@pytest.mark.parametrize("args, message, code", [
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/map.jpg"], "use one of .png, .pdf, .svg", 2),
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/map.png", "--row", "1"], "add --data", 2),
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/i.png", "--dataset", "X"], "there is no --data", 2),
    # --data without --row was read and silently left out of the picture
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/i.png", "--data", "{d}/data.csv"], "add --row I, or drop --data", 2),
    # --noise-std without --row was accepted and unused (auto even fitted it on --data, for nothing)
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/i.png", "--noise-std", "0.3"], "there is no --row", 2),
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/i.png", "--noise-std", "auto", "--data", "{d}/data.csv"],
     "add --data DATA --row I, or drop --noise-std", 2),
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/map.png", "--data", "{d}/data.csv", "--row", "30"],
     "past the end", 1),
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/data.csv"], "use one of .png", 2),
    (["plot", "partition", "{d}/gen3.h5", "-o", "{d}/i.png", "--slice-axes", "2,2"], "two different axes", 2),
    (["plot", "partition", "{d}/gen3.h5", "-o", "{d}/i.png", "--slice-axes", "0,1"], "numbered from 1", 2),
    (["plot", "partition", "{d}/gen3.h5", "-o", "{d}/i.png", "--slice-axes", "1,4"], "latent axes are z1..z3", 1),
    (["plot", "partition", "{d}/gen3.h5", "-o", "{d}/i.png", "--slice-axes", "1"], "numbered from 1", 2),
    (["plot", "partition", "{d}/gen3.h5", "-o", "{d}/i.png", "--slice-at", "1,2"], "--slice-at 1,2: the slice", 1),
    (["plot", "partition", "{d}/gen3.h5", "-o", "{d}/i.png", "--slice-at", "x"], "give finite numbers", 2),
    (["plot", "partition", "{d}/gen3.h5", "-o", "{d}/i.png", "--slice-at", "inf"], "finite", 2),
    (["plot", "partition", "{d}/gen.h5", "-o", "{d}/i.png", "--slice-at", "0"], "no coordinate to fix", 1),
    (["impute", "{d}/gen.h5", "{d}/holes.csv", "-o", "{d}/f2.csv", "--plot", "{d}/i.png", "--image-shape",
      "3x3"], "9 pixels", 1),
    (["impute", "{d}/gen.h5", "{d}/data.csv", "-o", "{d}/f2.csv", "--plot", "{d}/i.png"], "has none", 1),
    (["impute", "{d}/gen.h5", "{d}/holes.csv", "-o", "{d}/f2.csv", "--image-shape", "2x2"], "add --plot", 2),
    (["impute", "{d}/gen.h5", "{d}/holes.csv", "-o", "{d}/f2.csv", "--plot", "{d}/i.png", "--image-shape",
      "2by2"], "expected HxW", 2),
    (["score", "{d}/gen.h5", "{d}/data.csv", "-o", "{d}/s2.csv", "--plot", "{d}/data.csv"], "use one of .png", 2),
    # a picture path that is DATA under another name: seen on the file system
    (["score", "{d}/gen.h5", "{d}/data.csv", "-o", "{d}/s2.csv", "--plot", "{d}/data-link.png"], "overwritten", 1),
])
def test_cli_refusals_are_one_line(files, args, message, code):
    link = files / "data-link.png"
    if not link.is_symlink():
        link.symlink_to(files / "data.csv")
    r = run(*[a.format(d=files) for a in args], "-q", "--device", "cpu")
    assert r.exit_code == code, r.output
    err = r.stderr.strip()
    assert err.startswith("Error:") and "\n" not in err and message in err, err
    assert ("--help" in err) == (code == 2), err            # a usage error points at COMMAND --help
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


def test_posterior_window_of_a_posterior_narrower_than_rounding_is_still_a_window():
    """A zero variance (the moments of a posterior ~1e-9 wide at |mean| ~ 1) gave identical
    axis limits: matplotlib warned and widened them by itself; a negative one gave NaN limits
    (exit 70).  The window keeps +-1e-6 (1 + |mean|); a non-positive variance is refused."""
    from types import SimpleNamespace
    mean = np.array([0.7, -1.2])
    (x0, x1), (y0, y1) = plot._posterior_window(mean, np.zeros((2, 2)))
    # the widths carry the rounding of mean +- half: eps |mean| against 4.4e-6
    assert x0 < mean[0] < x1 and y0 < mean[1] < y1
    assert x1 - x0 == pytest.approx(2e-6 * 2.2, rel=1e-8) and y1 - y0 == pytest.approx(2e-6 * 2.2, rel=1e-8)
    (x0, x1), _ = plot._posterior_window(mean, np.diag([0.25, 1e-30]))
    assert (x0, x1) == (mean[0] - 2.0, mean[0] + 2.0)        # 4 posterior std (0.5) of the wider axis
    post = SimpleNamespace(z_cov=np.array([np.diag([1e-3, 2e-3]), [[-6e-12, 5e-12], [5e-12, -5e-12]]]))
    with pytest.raises(CpadgnError, match=r"row 9: .*-5e-12, not positive.*drop --row 9"):
        plot._check_posterior_spread([4, 9], post, (0, 1))
    plot._check_posterior_spread([4], post, (0, 1))


@pytest.mark.parametrize("noise", ["1e-6", "1e-9"])
def test_cli_rows_at_a_tiny_noise_std_draw_or_are_refused_in_one_line(tmp_path, noise):
    """digits rows 0-3 at noise std 1e-6 / 1e-9: their posteriors are 1e-7 to 1e-10 wide and
    the rounding of their moments can make a variance zero or negative (exit 70 'Axis limits
    cannot be NaN', or matplotlib's 'identical low and high xlims' warnings, before)."""
    sample = Path(__file__).resolve().parents[1] / "sample_data"
    out = tmp_path / "tiny.png"
    rows = [a for r in range(4) for a in ("--row", r)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # a warning ends the command with exit 70
        r = run("plot", "partition", sample / "digits_generator.h5", "-o", out, "--data",
                sample / "digits_test.csv", *rows, "--noise-std", noise, "-q", "--device", "cpu",
                "--cache", tmp_path / "c.h5")
    assert r.exit_code in (0, 1), r.output
    if r.exit_code == 1:
        err = r.stderr.strip()
        assert err.startswith("Error: row ") and "\n" not in err and "not positive" in err, err
        assert not out.exists()
    else:
        assert png_size(out) == (1200, 600) and r.output == ""


def test_scores_histogram_draws_the_rows_beside_one_with_nothing_observed():
    """A row with nothing observed has log p NaN: it is counted in the legend, and the other
    rows' bars are np.histogram's densities (one NaN used to blank every bar)."""
    ll = np.array([np.nan, -3.0, -2.0, -2.5, -2.25])
    fig = plot.scores_histogram(ll, threshold=-2.6)
    ax = fig.cpadgn_main_axes
    bars = [p for p in ax.patches if p.get_height() > 0]
    heights = np.array([p.get_height() for p in bars])
    edges = np.linspace(-3.0, -2.0, 41)
    want, _ = np.histogram(ll[1:], bins=edges, density=True)
    np.testing.assert_allclose(np.sort(heights), np.sort(want[want > 0]), rtol=1e-12)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "1 rows with nothing observed (no log p): not in the bars" in labels
    assert any("1 rows flagged" in t for t in labels)


@pytest.mark.parametrize("size", [None, (400, 200), (1600, 500)])
def test_scores_legend_hides_no_bar(size):
    """The legend (upper left) hid the tallest bars on its left (score --plot of the digits
    rows: a bar at log p = -38 under 'rows drawn from the model'); the y axis now leaves it
    room.  Checked on the rendered figure: no bar or outline reaches into the legend's box."""
    rng = np.random.default_rng(5)
    ll = np.concatenate([np.full(30, -40.0), rng.normal(0, 10, 40)])
    ref = rng.normal(20, 5, 2000)
    fig = plot.scores_histogram(ll, threshold=-20.0, model_log_likelihood=ref, size=size)
    fig.canvas.draw()
    ax = fig.cpadgn_main_axes
    box = ax.get_legend().get_window_extent()
    for patch in ax.patches:
        v = patch.get_transform().transform(patch.get_path().vertices)          # display pixels
        a, b = v[:-1], v[1:]
        over = (np.minimum(a[:, 0], b[:, 0]) < box.x1) & (np.maximum(a[:, 0], b[:, 0]) > box.x0)
        assert np.all(np.maximum(a[over, 1], b[over, 1]) < box.y0 + 0.5)


def test_scores_figure_compares_with_the_pattern_of_rows_with_something_observed():
    """With --alpha, the model's own log p is drawn for the missing pattern most rows share;
    the pattern of rows with nothing observed (the most common one here) has no log p:
    its all-NaN reference gave matplotlib 'All-NaN slice' warnings and no threshold."""
    from types import SimpleNamespace
    observed = np.array([[False, False], [False, False], [True, False]])
    pv = SimpleNamespace(patterns=np.array([[False, False], [True, False]]),
                         reference_log_prob=np.array([[np.nan] * 4, [-4.0, -3.0, -2.0, -1.0]]),
                         pvalue=np.array([np.nan, np.nan, 0.6]))
    ll = np.array([np.nan, np.nan, -2.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fig = plot.scores_figure(ll, pvalues=pv, alpha=0.5, observed=observed)
        fig.savefig(io.BytesIO(), format="png")
    ax = fig.cpadgn_main_axes
    threshold = [line for line in ax.lines if line.get_gid() == "threshold"]
    assert len(threshold) == 1 and threshold[0].get_xdata()[0] == alpha_threshold(pv.reference_log_prob[1], 0.5)
    fig = plot.scores_figure(ll, contamination=0.5)
    assert [line.get_xdata()[0] for line in fig.cpadgn_main_axes.lines if line.get_gid() == "threshold"] == [-2.5]


def test_scores_figure_counts_the_rows_score_flags_when_patterns_differ(files, tmp_path, monkeypatch):
    """With several missing patterns each has its own alpha threshold; the line is that of the
    most common one, and rows of another pattern (log p over fewer entries) fell on either
    side of it: the legend said 15 rows flagged where score flagged 13 (s2 digits model, 6 of
    20 rows with half their pixels missing).  It now counts score's flags."""
    import csv
    figures = []
    real = plot.scores_figure
    monkeypatch.setattr(plot, "scores_figure", lambda *a, **kw: figures.append(real(*a, **kw)) or figures[-1])
    for alpha in ("0.2", "0.5", "0.8"):
        r = run("score", files / "gen.h5", files / "holes.csv", "-o", tmp_path / "s.csv", "--alpha", alpha,
                "--plot", tmp_path / "s.png", "-q", "--device", "cpu", "--cache", tmp_path / "c.h5")
        assert r.exit_code == 0, r.output
        flagged = sum(row["is_anomaly"] in ("1", "True", "true") for row in csv.DictReader(open(tmp_path / "s.csv")))
        texts = [t.get_text() for t in figures[-1].cpadgn_main_axes.get_legend().get_texts()]
        assert [t for t in texts if t.startswith(f"p-value < {alpha}")] == [
            f"p-value < {alpha} (line: rows with 4 entries observed): {flagged} rows flagged"]


def test_a_slice_far_outside_the_prior_draws_no_ellipse_and_no_warning(files):
    """--slice-at 1e300 at S = 3: the plane is ~1e300 prior std from the mean, so it misses
    the 50/90/99% ellipsoids (radii < 3.4); d^2 overflowed with a RuntimeWarning."""
    from cpadgn.model import load
    model = load(files / "gen3.h5", cache=False, device="cpu")
    dashed = lambda fig: [line for line in fig.cpadgn_main_axes.lines if line.get_linestyle() != "None"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        far = plot.partition(model, slice_at=np.array([1e300]))
        near = plot.partition(model, slice_at=np.array([0.5]))
    assert dashed(far) == [] and len(dashed(near)) == 3


def test_a_row_with_nothing_observed_is_titled_by_its_prior_posterior(files):
    """Its log p(x) is NaN (no likelihood): the zoomed panel said 'log p(x) = nan'."""
    from cpadgn.model import load
    model = load(files / "gen.h5", cache=False, device="cpu")
    X = np.loadtxt(files / "data.csv", delimiter=",")[:2]
    X[0] = np.nan
    fig = plot.partition(model, X, rows=[0, 1], grid=31)
    titles = [a.get_title() for a in fig.axes]
    assert any(t.startswith("row 0:") and t.endswith("nothing observed: p(z | x) is the prior") for t in titles)
    assert any(t.startswith("row 1:") and "log p(x) = " in t for t in titles) and "nan" not in " ".join(titles)


def test_a_home_matplotlib_cannot_write_leaves_stderr_empty(tmp_path):
    """A service account's HOME that is missing, read-only or not a folder: matplotlib
    falls back to a temporary config folder and logged two lines about it on stderr
    ('mkdir -p failed ...', 'Matplotlib created a temporary cache directory ...'), under
    --quiet too, in a pipeline's log of a run that worked.  The picture is written as usual."""
    import os
    root = Path(__file__).resolve().parents[1]
    home = tmp_path / "home"
    home.write_text("")                      # not a folder: mkdir fails for root as for a user
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(root))
    code = ("from cpadgn import plot\n"
            "fig = plot.new_figure((400, 300))\n"
            "fig.add_subplot(1, 1, 1).plot([0, 1], [0, 1])\n"
            f"plot.save(fig, {str(tmp_path / 'p.png')!r})\n")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stderr == "", res.stderr
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
