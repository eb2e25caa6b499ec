"""Pictures of a model and its results, as matplotlib Figures (needs ``cpadgn[plot]``).

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no global
state, no window: safe under the Agg backend and in scripts; a notebook shows it
inline).  ``save(fig, path)`` writes it atomically.

- ``partition(model, X, rows)``: S = 2, the linear regions as polygons over a window
  holding > 99% of the prior mass, shaded by their log prior mass, with the prior's
  50/90/99% contours; with rows, each row's exact posterior density p(z | x) (the
  mixture of Gaussians truncated to their regions) in a zoomed panel with its mean
  E[z | x].  S = 1: the prior density, the breakpoints and p(z | x) of the rows.
- ``scores_histogram``: the exact log p(x) of the rows, the anomaly threshold and the
  model's own distribution of log p.
- ``imputations``: observed pixels, missing mask, conditional mean, std and draws.

Latent coordinates are the user's (prior N(prior_mean, prior_cov)): the partition
and the posterior pairs of ``likelihood`` live in the folded coordinates
w = L^-1 (z - prior_mean), prior_cov = L L^T, and are mapped back here.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import CpadgnError

IMAGE_SUFFIXES = (".png", ".pdf", ".svg")
PRIOR_CONTOUR_MASSES = (0.5, 0.9, 0.99)
WINDOW_RADIUS = 3.3          # prior std per axis: the window holds the 99% contour (radius 3.03)
MAX_ZOOMS = 4                # rows that get their own zoomed posterior panel
_ZOOM_SIZES = {0: (600, 450), 1: (1000, 450), 2: (900, 600), 3: (1200, 600), 4: (1200, 600)}
ROW_COLOURS = ("#e6194b", "#f58231", "#f032e6", "#4363d8", "#42d4f4", "#3cb44b")


def require_matplotlib():
    """The matplotlib module, or a one-line CpadgnError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise CpadgnError("pictures need matplotlib, which is not installed; "
                          "pip install 'cpadgn[plot]' (or matplotlib)") from None
    return matplotlib


def new_figure(size=(600, 450), dpi: int = 100):
    """An Agg-backed Figure of size (width, height) pixels at ``dpi``."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig, path) -> None:
    """Write fig to path (format from the suffix: .png, .pdf, .svg) atomically."""
    from .data import atomic_path, write_error
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=path.suffix.lower().lstrip("."), dpi=fig.dpi)
    except OSError as e:
        raise write_error(path, e) from None


def check_image_path(path, inputs: dict | None = None) -> Path:
    """Fail early (one-line CpadgnError) if a picture cannot be written to path: matplotlib
    missing, an extension other than .png/.pdf/.svg, or ``data.check_output_path``'s checks."""
    from .data import check_output_path
    require_matplotlib()
    return check_output_path(path, inputs=inputs, suffixes=IMAGE_SUFFIXES)


# ================================================================ geometry
def clip_polygon(vertices: np.ndarray, a: np.ndarray, b: float) -> np.ndarray:
    """The convex polygon vertices (V, 2) cut by the half-plane a . z <= b (Sutherland-Hodgman)."""
    if len(vertices) == 0:
        return vertices
    s = vertices @ a - b
    out = []
    for i in range(len(vertices)):
        j = (i + 1) % len(vertices)
        if s[i] <= 0:
            out.append(vertices[i])
        if (s[i] < 0 < s[j]) or (s[j] < 0 < s[i]):
            t = s[i] / (s[i] - s[j])
            out.append(vertices[i] + t * (vertices[j] - vertices[i]))
    return np.array(out).reshape(-1, 2)


def box_polygon(window) -> np.ndarray:
    """The corners (4, 2) of window = ((x0, x1), (y0, y1)), counter-clockwise."""
    (x0, x1), (y0, y1) = window
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def user_facets(model, regions: np.ndarray):
    """Facets of regions (B,) in the user's latent coordinates: G' z <= h' (B, F, S), (B, F),
    mask (B, F).  With w = L^-1 (z - m): G w <= h  <=>  (G L^-1) z <= h + G L^-1 m."""
    G, h, mask = model.partition().facets(model.net, regions)
    GL = np.linalg.solve(model.prior_chol.T, np.swapaxes(G, 1, 2)).swapaxes(1, 2)   # G L^-1
    return GL, h + GL @ model.prior_mean, mask


def region_polygons(model, window, regions=None):
    """The regions (S = 2) clipped to window = ((x0, x1), (y0, y1)), user coordinates.

    Returns the indices (B,) of the regions that meet the window and their polygons
    (a list of (V, 2) vertex arrays)."""
    part = model.partition()
    regions = np.arange(part.n_regions) if regions is None else np.asarray(regions)
    G, h, mask = user_facets(model, regions)
    box = box_polygon(window)
    keep, polys = [], []
    for i, r in enumerate(regions):
        poly = box
        for a, b in zip(G[i][mask[i]], h[i][mask[i]]):
            poly = clip_polygon(poly, a, b)
            if len(poly) < 3:
                break
        if len(poly) >= 3 and _area(poly) > 0:
            keep.append(r)
            polys.append(poly)
    return np.array(keep, dtype=np.int64), polys


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(x @ np.roll(y, -1) - y @ np.roll(x, -1)))


def prior_window(model, points=None, radius: float = WINDOW_RADIUS):
    """((lo, hi) per latent axis): prior mean +- radius prior std, widened to hold points (N, S)."""
    sd = np.sqrt(np.diag(model.prior_cov))
    lo, hi = model.prior_mean - radius * sd, model.prior_mean + radius * sd
    if points is not None and len(points):
        pad = 0.05 * (hi - lo)
        lo, hi = np.minimum(lo, points.min(0) - pad), np.maximum(hi, points.max(0) + pad)
    return tuple(zip(lo.tolist(), hi.tolist()))


# ============================================================ posterior density
def posterior_density(model, X, z) -> np.ndarray:
    """Exact p(z | x_n) at points z (P, S) of the user's latent space for the rows of X (N, D).

    From the mixture of truncated Gaussians: on region w,
        p(z | x) = r_w(x) N(z; mu_w(x), Sigma_w) / Phi_w(x),
    r_w the responsibilities of ``model.posterior``, N(mu_w, Sigma_w) the untruncated
    Gaussians (``likelihood.pair_gaussians``), Phi_w their mass on w; pruned pairs
    (responsibility below the certified bound) count as 0.  Returns (N, P).
    """
    from .likelihood import pair_gaussians
    from .polytope import polytope_log_mass
    X = model._check_data(X)
    post = model.posterior(X, moments=False)
    part, L = model.partition(), model.prior_chol
    w = np.linalg.solve(L, (np.asarray(z, dtype=np.float64) - model.prior_mean).T).T   # folded
    where = part.locate(model.net, w)
    log_jac = float(np.log(np.diag(L)).sum())                                         # dz = |L| dw
    mu, Lam = pair_gaussians(model._region_table(), X, post.pair_row, post.pair_region)
    G, h, mask = part.facets(model.net, post.pair_region)
    C = np.linalg.inv(Lam).swapaxes(1, 2)                             # Sigma_w = C C^T, C = L^-T
    log_phi, _ = polytope_log_mass(G @ C, h - (G @ mu[:, :, None])[..., 0], mask)
    out = np.zeros((X.shape[0], w.shape[0]))
    for n in range(X.shape[0]):
        p = np.flatnonzero(post.pair_row == n)
        pair_of = np.full(part.n_regions, -1)
        pair_of[post.pair_region[p]] = p
        k = np.where(where >= 0, pair_of[np.maximum(where, 0)], -1)
        has = k >= 0
        kk = k[has]
        u = np.einsum("pst,ps->pt", Lam[kk], w[has] - mu[kk])      # L^T (w - mu)
        log_n = (-0.5 * model.latent_dim * np.log(2 * np.pi)
                 + np.log(np.diagonal(Lam[kk], axis1=1, axis2=2)).sum(1) - 0.5 * (u * u).sum(1))
        live = np.isfinite(log_phi[kk])            # a zero-mass (degenerate) region holds no density
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.exp(np.log(post.pair_responsibility[kk]) + log_n - log_phi[kk] - log_jac)
        out[n, has] = np.where(live, d, 0.0)
    return out


# ================================================================ partition
def check_drawable(model) -> None:
    """Refuse a model whose partition ``partition`` cannot draw (S > 2), before any work."""
    if model.latent_dim not in (1, 2):
        raise CpadgnError(f"the partition is drawn for S = 1 or 2 latent dimensions, and this model "
                          f"has S = {model.latent_dim}; for its rows' posterior means use the z_mean "
                          "columns of cpadgn score")


def partition(model, X=None, rows=None, ax=None, window=None, *, size=None, grid: int = 241):
    """The latent partition of model, and the exact posteriors of some rows of X.

    S = 2: the regions meeting ``window`` ((x0, x1), (y0, y1); default: prior mean +-
    3.3 prior std per axis, > 99% of the prior mass, widened to hold the rows'
    posterior means) drawn as polygons shaded by log prior mass, with the prior's
    50/90/99% contours.  With rows (indices into X): each row's E[z | x] is marked
    (a cross labelled with its row number), and unless ``ax`` is given the first 4 rows get a
    zoomed panel (its posterior mean +- 4 posterior std) with the exact p(z | x) as
    contour lines over the regions (``posterior_density`` on a grid x grid lattice).
    S = 1: the prior density, the breakpoints between regions and each row's p(z | x)
    with its mean marked on the axis.  size: (width, height) in pixels of a new figure.
    """
    check_drawable(model)
    rows = [] if rows is None else [int(r) for r in np.atleast_1d(rows)]
    if rows and X is None:
        raise CpadgnError("rows were given but no data: pass X (or --data DATA)")
    Xr = None
    if rows:
        X = model._check_data(X)
        bad = [r for r in rows if not 0 <= r < X.shape[0]]
        if bad:
            raise CpadgnError(f"row {bad[0]} is not in the data (rows 0..{X.shape[0] - 1}); "
                              "rows are counted from 0")
        Xr = X[rows]
    post = model.posterior(Xr) if rows else None
    draw = _partition_1d if model.latent_dim == 1 else _partition_2d
    return draw(model, rows, Xr, post, ax, window, size, grid)


def _figure_and_axes(ax, size, default):
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(size or default)
    return fig, fig.add_subplot(1, 1, 1)


def _partition_2d(model, rows, Xr, post, ax, window, size, grid):
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Rectangle
    part = model.partition()
    zooms = rows[:MAX_ZOOMS] if ax is None else []
    zoom_axes = []
    if ax is None:
        fig = new_figure(size or _ZOOM_SIZES[len(zooms)])
        ax, zoom_axes = _zoom_layout(fig, len(zooms))
    else:
        fig = ax.figure
    window = window or prior_window(model, None if post is None else post.z_mean)
    regions, polys = region_polygons(model, window)
    cmap, norm = _mass_colours(part.log_prior_mass[regions])
    coll = PolyCollection(polys, array=part.log_prior_mass[regions], cmap=cmap, norm=norm,
                          edgecolors=(1, 1, 1, 0.6), linewidths=0.25)
    coll.cpadgn_regions = regions
    ax.add_collection(coll)
    fig.colorbar(coll, ax=ax, label="log prior mass of the region", shrink=0.8, fraction=0.05)
    _prior_contours(ax, model)
    ax.set_xlim(*window[0])
    ax.set_ylim(*window[1])
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel("z1")
    ax.set_ylabel("z2")
    ax.set_title(f"{part.n_regions:,} linear regions ({len(regions):,} in view)", fontsize=10)
    for i, r in enumerate(rows):
        colour = ROW_COLOURS[i % len(ROW_COLOURS)]
        _mark_mean(ax, post.z_mean[i], colour, f"row {r}")
        if i >= len(zooms):
            zw = _posterior_window(post.z_mean[i], post.z_cov[i])
            _posterior_contours(ax, model, Xr[i:i + 1], zw, grid, colour)
    if rows:
        for i, (r, zax) in enumerate(zip(zooms, zoom_axes)):
            colour = ROW_COLOURS[i % len(ROW_COLOURS)]
            zw = _posterior_window(post.z_mean[i], post.z_cov[i])
            zr, zp = region_polygons(model, zw)
            zc = PolyCollection(zp, array=part.log_prior_mass[zr], cmap=cmap, norm=norm,
                                edgecolors="white", linewidths=0.6)
            zc.cpadgn_regions = zr
            zax.add_collection(zc)
            _posterior_contours(zax, model, Xr[i:i + 1], zw, grid, "black")
            _mark_mean(zax, post.z_mean[i], colour, None)
            zax.set_xlim(*zw[0])
            zax.set_ylim(*zw[1])
            zax.set_aspect("equal", adjustable="box")
            zax.tick_params(labelsize=7)
            zax.set_title(f"row {r}: exact p(z | x)\nlog p(x) = {post.log_likelihood[i]:.2f}",
                          fontsize=8)
            (x0, x1), (y0, y1) = zw
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.0,
                                   label="zoomed windows (right)" if i == 0 else None))
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    fig.cpadgn_main_axes = ax
    return fig


def _zoom_layout(fig, n: int):
    """The main axes and n <= 4 zoom axes: main on the left, zooms on the right."""
    if n == 0:
        return fig.add_subplot(1, 1, 1), []
    if n == 1:
        spec = fig.add_gridspec(1, 2)
        return fig.add_subplot(spec[0, 0]), [fig.add_subplot(spec[0, 1])]
    cols = 1 if n == 2 else 2
    spec = fig.add_gridspec(2, 2 + cols)
    main = fig.add_subplot(spec[:, :2])
    return main, [fig.add_subplot(spec[i // cols, 2 + i % cols]) for i in range(n)]


def _mass_colours(log_mass: np.ndarray):
    """Colormap and normalisation of the regions' log prior masses."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    lo, hi = float(np.min(log_mass)), float(np.max(log_mass))
    return colormaps["viridis"], Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1.0)


def _prior_contours(ax, model):
    """The prior's 50/90/99% ellipses {m + L r (cos t, sin t)}, r^2 = -2 log(1 - mass)."""
    t = np.linspace(0, 2 * np.pi, 361)
    circle = np.stack([np.cos(t), np.sin(t)])
    for k, mass in enumerate(PRIOR_CONTOUR_MASSES):
        r = np.sqrt(-2 * np.log1p(-mass))
        e = model.prior_mean[:, None] + model.prior_chol @ (r * circle)
        ax.plot(e[0], e[1], color="black", lw=0.8, ls=(0, (4, 3)), alpha=0.8,
                label="prior 50/90/99% contours" if k == 0 else None)


def _mark_mean(ax, z, colour, label):
    ax.plot([z[0]], [z[1]], marker="X", ms=9, mec="black", mew=0.8, color=colour, ls="none",
            label=None if label is None else f"E[z | x], {label}", gid="posterior_mean")


def _posterior_window(mean, cov, k: float = 4.0):
    """A square window around mean, +- k times the larger posterior std."""
    half = k * float(np.sqrt(np.max(np.diag(cov))))
    return ((mean[0] - half, mean[0] + half), (mean[1] - half, mean[1] + half))


def _posterior_contours(ax, model, x, window, grid, colour):
    """Contour lines of the exact p(z | x) of one row x (1, D) over window."""
    gx = np.linspace(*window[0], grid)
    gy = np.linspace(*window[1], grid)
    Z = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
    dens = posterior_density(model, x, Z)[0].reshape(grid, grid)
    top = float(dens.max())
    if top <= 0:
        return None
    levels = top * np.array([0.05, 0.2, 0.4, 0.6, 0.8, 0.95])
    cs = ax.contour(gx, gy, dens, levels=levels, colors=colour, linewidths=0.9)
    cs.cpadgn_density = (gx, gy, dens)
    return cs


# ----------------------------------------------------------------------- S = 1
def _partition_1d(model, rows, Xr, post, ax, window, size, grid):
    from matplotlib.collections import PolyCollection
    from scipy.stats import norm as normal
    part = model.partition()
    if ax is None:
        fig = new_figure(size or (600, 450))
        if rows:
            top, ax = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1.6))
        else:
            top = ax = fig.add_subplot(1, 1, 1)
    else:
        fig, top = ax.figure, ax
    m, s = float(model.prior_mean[0]), float(model.prior_chol[0, 0])
    (lo, hi), = window or prior_window(model, None if post is None else post.z_mean)
    G, h, mask = user_facets(model, np.arange(part.n_regions))
    ends = np.where(mask, h / np.where(mask, G[..., 0], 1.0), np.nan)     # each facet's breakpoint
    left = np.nanmax(np.where(G[..., 0] < 0, ends, -np.inf), axis=1)
    right = np.nanmin(np.where(G[..., 0] > 0, ends, np.inf), axis=1)
    left, right = np.maximum(left, lo), np.minimum(right, hi)
    regions = np.flatnonzero(right > left)
    cuts = np.unique(np.concatenate([left[regions], right[regions]]))
    cuts = cuts[(cuts > lo) & (cuts < hi)]
    z = np.unique(np.concatenate([np.linspace(lo, hi, 20 * grid + 1), cuts]))
    prior = normal.pdf(z, m, s)
    cmap, norm = _mass_colours(part.log_prior_mass[regions])
    y1 = 1.05 * float(prior.max())
    bands = PolyCollection([[(left[r], 0), (right[r], 0), (right[r], y1), (left[r], y1)] for r in regions],
                           array=part.log_prior_mass[regions], cmap=cmap, norm=norm, alpha=0.35,
                           edgecolors="none", zorder=0)
    bands.cpadgn_regions = regions
    top.add_collection(bands)
    fig.colorbar(bands, ax=top, label="log prior mass", shrink=0.9)
    for k, c in enumerate(cuts):
        top.axvline(c, color="0.4", lw=0.5, zorder=1, label="breakpoints between regions" if k == 0 else None)
    top.plot(z, prior, color="black", lw=1.5, label="prior p(z)")
    top.set_ylim(0, y1)
    top.set_xlim(lo, hi)
    top.set_ylabel("density")
    top.set_title(f"{part.n_regions} linear regions of the latent line ({len(cuts)} breakpoints in view)",
                  fontsize=10)
    top.legend(loc="upper right", fontsize=7, framealpha=0.8)
    if rows:
        dens = posterior_density(model, Xr, z[:, None])
        if ax is not top:
            for c in cuts:
                ax.axvline(c, color="0.8", lw=0.5, zorder=0)
        for i, r in enumerate(rows):
            colour = ROW_COLOURS[i % len(ROW_COLOURS)]
            line, = ax.plot(z, dens[i], color=colour, lw=1.3,
                            label=f"row {r}: log p(x) = {post.log_likelihood[i]:.2f}")
            line.cpadgn_density = (z, dens[i])
            ax.plot([post.z_mean[i, 0]], [0.0], marker="^", ms=10, color=colour, mec="black", mew=0.6,
                    ls="none", clip_on=False, zorder=5, gid="posterior_mean")
        ax.set_ylim(bottom=0)
        ax.set_xlim(lo, hi)
        ax.set_ylabel("p(z | x)")
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8, title="exact posterior", title_fontsize=7)
    ax.set_xlabel("z  (triangles: posterior means E[z | x])" if rows else "z")
    fig.cpadgn_main_axes = top
    return fig


# ================================================================== scores
def scores_histogram(log_likelihood, threshold=None, model_log_likelihood=None, *, threshold_label=None,
                     ax=None, size=None, bins: int = 40):
    """Histogram of the rows' exact log p(x) (N,), the anomaly threshold (rows with
    log p(x) below it are flagged) and, when given, the model's own log p of its draws
    (M,) as a second, outlined histogram (both as densities, so they compare).

    A few far outliers would squash the bulk: rows more than 10 interquartile ranges
    below the lower quartile are counted in the legend instead of drawn."""
    ll = np.asarray(log_likelihood, dtype=np.float64).reshape(-1)
    ref = None if model_log_likelihood is None else np.asarray(model_log_likelihood, np.float64).reshape(-1)
    fig, ax = _figure_and_axes(ax, size, (600, 450))
    both = ll if ref is None else np.concatenate([ll, ref])
    q1, q3 = np.quantile(both, [0.25, 0.75])
    lo = max(float(both.min()), q1 - 10 * max(q3 - q1, 1e-12))
    if threshold is not None:
        lo = min(lo, float(threshold))
    hi = float(both.max())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    ax.hist(ll, bins=edges, density=True, color="C0", alpha=0.75, label=f"data rows ({ll.size})")
    if ref is not None:
        ax.hist(ref, bins=edges, density=True, histtype="step", color="black", lw=1.4,
                label=f"rows drawn from the model ({ref.size})")
    if threshold is not None:
        flagged = int(np.sum(ll < threshold))
        ax.axvline(threshold, color="C3", lw=1.8, gid="threshold",
                   label=f"{threshold_label or 'threshold'}: {flagged} rows flagged")
    hidden = int(np.sum(ll < lo))
    if hidden:
        ax.plot([], [], " ", label=f"{hidden} rows below {lo:.4g} not drawn")
    ax.set_xlabel("exact log p(x) per row (nats; low = anomalous)")
    ax.set_ylabel("density")
    ax.set_title("Exact log-likelihood of the rows", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.85)
    fig.cpadgn_main_axes = ax
    return fig


def scores_figure(log_likelihood, *, contamination=None, pvalues=None, alpha=None, observed=None, size=None):
    """``scores_histogram`` with the threshold of ``cpadgn score``: contamination c flags
    log p below -quantile(-log p, 1 - c); alpha flags p-values < alpha, i.e. log p below
    ``anomaly.alpha_threshold`` of the reference draws.  pvalues (``anomaly.PValues``)
    gives the model's own log p; with several missing patterns, those of the pattern
    most rows share (observed (N, D) bool)."""
    from .anomaly import alpha_threshold
    ll = np.asarray(log_likelihood, dtype=np.float64)
    threshold = label = ref = None
    if pvalues is not None and pvalues.reference_log_prob is not None:
        q = 0
        if len(pvalues.patterns) > 1 and observed is not None:
            _, which = np.unique(observed, axis=0, return_inverse=True)
            q = int(np.bincount(which.reshape(-1)).argmax())
        ref = pvalues.reference_log_prob[q]
    if contamination is not None:
        threshold = -float(np.quantile(-ll, 1 - contamination))
        label = f"contamination {contamination:g}"
    elif alpha is not None and ref is not None:
        threshold = alpha_threshold(ref, alpha)
        label = f"p-value < {alpha:g}"
    return scores_histogram(ll, threshold, ref, threshold_label=label, size=size)


# ============================================================== imputations
def imputations(X_obs, mean, std, draws, image_shape, *, rows=None, max_rows: int = 4, max_draws: int = 4,
                size=None, cmap: str = "gray_r"):
    """Image tiles of the exact imputation of some rows: per row the observed pixels
    (missing ones in red), the missing mask, E[x | x_o], the conditional std and a few
    exact draws from p(x_m | x_o).

    X_obs (N, D) with NaN = missing; mean, std (N, D); draws (K, N, D) or None;
    image_shape (H, W) with H W = D; rows: which rows (default: the first max_rows
    rows with a missing entry).  Values share one grey scale (the range of the observed
    values and the means; draws beyond it saturate); the std has its own.
    """
    X_obs, mean, std = (np.asarray(a, dtype=np.float64) for a in (X_obs, mean, std))
    H, W = (int(v) for v in image_shape)
    N, D = X_obs.shape
    if H * W != D:
        raise CpadgnError(f"image shape {H}x{W} has {H * W} pixels but the rows have {D} values; "
                          f"give H x W = {D}")
    miss = np.isnan(X_obs)
    if rows is None:
        rows = np.flatnonzero(miss.any(1))[:max_rows]
        if rows.size == 0:
            raise CpadgnError("no row has a missing entry, so there is nothing imputed to show")
    rows = np.asarray(rows, dtype=np.int64)
    K = 0 if draws is None else min(int(np.shape(draws)[0]), max_draws)
    titles = ["observed", "missing", "E[x | x_obs]", "std"] + [f"draw {k + 1}" for k in range(K)]
    ncol = len(titles)
    fig = new_figure(size or (110 * ncol + 40, 120 * rows.size + 50))
    axes = np.asarray(fig.subplots(rows.size, ncol, squeeze=False))
    from matplotlib import colormaps
    grey = colormaps[cmap].with_extremes(bad="#e6194b")
    shown = np.concatenate([X_obs[rows][~miss[rows]], mean[rows].ravel()])   # draws beyond saturate
    vmin, vmax = float(np.nanmin(shown)), float(np.nanmax(shown))
    smax = float(np.max(std[rows])) or 1.0
    for i, n in enumerate(rows):
        tiles = [(X_obs[n], dict(cmap=grey, vmin=vmin, vmax=vmax)),
                 (miss[n].astype(float), dict(cmap="gray_r", vmin=0, vmax=1)),
                 (mean[n], dict(cmap=grey, vmin=vmin, vmax=vmax)),
                 (std[n], dict(cmap="magma", vmin=0, vmax=smax))]
        tiles += [(np.asarray(draws)[k, n], dict(cmap=grey, vmin=vmin, vmax=vmax)) for k in range(K)]
        for j, (values, style) in enumerate(tiles):
            a = axes[i, j]
            a.imshow(np.ma.masked_invalid(values.reshape(H, W)), interpolation="nearest", **style)
            a.set_xticks([])
            a.set_yticks([])
            if i == 0:
                a.set_title(titles[j], fontsize=8)
        axes[i, 0].set_ylabel(f"row {n}", fontsize=8)
    fig.suptitle(f"Exact imputation: mean, std and draws (std scale 0..{smax:.3g}; red = missing)",
                 fontsize=9)
    fig.cpadgn_rows = rows
    return fig


def imputation_figure(model, X, result=None, image_shape=None, *, n_draws: int = 4, seed=0,
                      max_rows: int = 4, size=None):
    """``imputations`` of the first max_rows rows of X (N, D) with a missing entry, from
    ``result`` (an ``impute.ImputeResult`` of all of X) where it has the std and draws,
    computed exactly for those rows otherwise (n_draws draws, seeded)."""
    X = np.asarray(X, dtype=np.float64)
    image_shape = image_shape or square_shape(X.shape[1])
    rows = np.flatnonzero(np.isnan(X).any(1))[:max_rows]
    if rows.size == 0:
        raise CpadgnError("no row of the data has a missing entry (NaN), so there is no imputation to draw")
    have = result is not None and result.std is not None and result.draws is not None
    if have:
        mean, std, draws = result.mean[rows], result.std[rows], result.draws[:, rows]
    else:
        res = model.imputation(X[rows], std=True, seed=seed,
                               draws=n_draws if result is None or result.draws is None else None)
        mean, std = res.mean, res.std
        draws = res.draws if res.draws is not None else result.draws[:, rows]
    return imputations(X[rows], mean, std, draws, image_shape, size=size)


def square_shape(D: int):
    """(H, W) = (sqrt D, sqrt D) when D is a square number; CpadgnError otherwise."""
    side = int(round(np.sqrt(D)))
    if side * side != D:
        raise CpadgnError(f"the rows have {D} values, not a square number: give the image shape "
                          f"as --image-shape HxW (image_shape=(H, W)) with H x W = {D}")
    return side, side


def parse_image_shape(text: str):
    """'HxW' -> (H, W), two positive integers; ValueError otherwise."""
    parts = str(text).lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"expected HxW with two positive integers, e.g. 8x8, got {text!r}")
    return int(parts[0]), int(parts[1])
