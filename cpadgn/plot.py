"""Pictures of a model and its results, as matplotlib Figures (needs ``cpadgn[plot]``).

Every function returns a ``matplotlib.figure.Figure`` built without pyplot (no global
state, no window: safe under the Agg backend and in scripts; a notebook shows it
inline).  ``save(fig, path)`` writes it atomically.

- ``partition(model, X, rows)``: S = 2, the linear regions as polygons over a window
  holding > 99% of the prior mass, shaded by their log prior mass, with the prior's
  50/90/99% contours; with rows, each row's exact posterior density p(z | x) (the
  mixture of Gaussians truncated to their regions) in a zoomed panel with its mean
  E[z | x].  S >= 3: the same picture on a 2-D slice of the latent space (``LatentSlice``:
  the plane through a point spanned by two latent axes).  S = 1: the prior density, the
  breakpoints and p(z | x) of the rows.
- ``scores_histogram``: the exact log p(x) of the rows, the anomaly threshold and the
  model's own distribution of log p.
- ``imputations``: observed pixels, missing mask, conditional mean, std and draws.

Latent coordinates are the user's (prior N(prior_mean, prior_cov)): the partition
and the posterior pairs of ``likelihood`` live in the folded coordinates
w = L^-1 (z - prior_mean), prior_cov = L L^T, and are mapped back here.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CpadgnError
from .picture_size import check_size

IMAGE_SUFFIXES = (".png", ".pdf", ".svg")
PRIOR_CONTOUR_MASSES = (0.5, 0.9, 0.99)
WINDOW_RADIUS = 3.3          # prior std per axis: the window holds the 99% contour (radius 3.03)
MAX_ZOOMS = 4                # rows that get their own zoomed posterior panel
POSTERIOR_CONTOUR_LEVELS = (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)   # p(z | x) contours, fractions of its peak
FAINT_SLICE = 1e-3           # S >= 3: no main-panel contours where p(z | x) on the slice stays below this
                             # fraction of its value at E[z | x]
_ZOOM_SIZES = {0: (600, 450), 1: (1000, 450), 2: (900, 600), 3: (1200, 600), 4: (1200, 600)}
ROW_COLOURS = ("#e6194b", "#f58231", "#f032e6", "#4363d8", "#42d4f4", "#3cb44b")


def require_matplotlib():
    """The matplotlib module, or a one-line CpadgnError saying how to install it.  Where its
    config folder cannot be made (a service account's HOME, missing or read-only), matplotlib
    uses a temporary one and logged two warnings about it on stderr, under --quiet too:
    its logger is held at ERROR while it is first imported."""
    import logging
    import sys
    log = logging.getLogger("matplotlib")
    level = log.level
    if "matplotlib" not in sys.modules:
        log.setLevel(logging.ERROR)
    try:
        import matplotlib
    except ImportError:
        raise CpadgnError("pictures need matplotlib, which is not installed; "
                          "pip install 'cpadgn[plot]' (or matplotlib)") from None
    finally:
        log.setLevel(level)
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
    """Write fig to path (format from the suffix: .png, .pdf, .svg) atomically; a one-line
    CpadgnError for another suffix, a missing or unwritable directory."""
    from .data import atomic_path, check_output_path, write_error
    path = check_output_path(path, suffixes=IMAGE_SUFFIXES)
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
def clip_polygons(vertices: np.ndarray, counts: np.ndarray, a: np.ndarray, b: np.ndarray):
    """Convex polygons cut by one half-plane each (Sutherland-Hodgman, batched).

    vertices (B, V, 2), the first counts (B,) of each row in use; half-planes a (B, 2) . z <= b (B,).
    Returns the clipped vertices (B, V', 2) and their counts (B,): each kept vertex, then the
    crossing point of each edge whose ends lie strictly on both sides."""
    B, V = vertices.shape[:2]
    if V == 0:
        return vertices, counts
    i = np.arange(V)
    j = np.where(i + 1 < counts[:, None], i + 1, 0)                          # next vertex (B, V)
    valid = i < counts[:, None]
    s = np.einsum("bvk,bk->bv", vertices, a) - b[:, None]
    sj = np.take_along_axis(s, j, 1)
    vj = np.take_along_axis(vertices, j[..., None], 1)
    cross = valid & (((s < 0) & (0 < sj)) | ((sj < 0) & (0 < s)))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(cross, s / (s - sj), 0.0)
    cand = np.stack([vertices, vertices + t[..., None] * (vj - vertices)], 2).reshape(B, 2 * V, 2)
    keep = np.stack([valid & (s <= 0), cross], 2).reshape(B, 2 * V)
    new_counts = keep.sum(1)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :max(int(new_counts.max(initial=0)), 1)]
    return np.take_along_axis(cand, order[..., None], 1), new_counts


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


def region_polygons(model, window, regions=None, plane=None, chunk: int = 4096):
    """The regions clipped to window = ((x0, x1), (y0, y1)) on a plane, in its coordinates.

    plane: a ``LatentSlice`` (default: the whole latent plane at S = 2).  Region {z : G z <= h}
    meets the plane z = z0 + E u in the convex polygon {u : (G E) u <= h - G z0}.
    Returns the indices (B,) of the regions that meet the window and their polygons
    (a list of (V, 2) vertex arrays in u)."""
    part = model.partition()
    plane = latent_slice(model) if plane is None else plane
    regions = np.arange(part.n_regions) if regions is None else np.asarray(regions)
    box = box_polygon(window)
    keep, polys = [], []
    for start in range(0, len(regions), chunk):
        idx = regions[start:start + chunk]
        G, h, mask = user_facets(model, idx)
        Gu, hu = G @ plane.basis, h - G @ plane.origin
        # a facet with every window corner outside it leaves nothing to clip
        live = ~((((Gu @ box.T) > hu[..., None]).all(-1) & mask).any(1))
        idx, Gu, hu, mask = idx[live], Gu[live], hu[live], mask[live]
        verts, counts = np.broadcast_to(box, (len(idx), 4, 2)), np.full(len(idx), 4)
        for f in range(Gu.shape[1]):
            on = mask[:, f] & (counts >= 3)
            if on.any():
                v, c = clip_polygons(verts[on], counts[on], Gu[on, f], hu[on, f])
                verts = _widen(verts, v.shape[1])
                verts[on, :v.shape[1]], counts[on] = v, c
        for i in np.flatnonzero(counts >= 3):
            poly = verts[i, :counts[i]]
            if _area(poly) > 0:
                keep.append(idx[i])
                polys.append(poly)
    return np.array(keep, dtype=np.int64), polys


def _widen(verts: np.ndarray, V: int) -> np.ndarray:
    """A writable copy of verts (B, V0, 2) with at least V vertex slots."""
    out = np.zeros((verts.shape[0], max(V, verts.shape[1]), 2))
    out[:, :verts.shape[1]] = verts
    return out


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


# ================================================================== slices
@dataclass(frozen=True)
class LatentSlice:
    """The plane z = origin + basis u of the user's latent space R^S, spanned by the
    coordinate axes ``axes`` = (i, j) (0-based; the pictures call them z{i+1}, z{j+1}):
    u = (z_i, z_j), and origin (S,) is 0 on those two axes and holds the fixed values of
    the other S - 2 coordinates.  At S = 2 the slice is the whole latent plane."""
    axes: tuple
    origin: np.ndarray

    @property
    def fixed(self) -> np.ndarray:
        """The indices (S - 2,) of the coordinates the slice holds fixed."""
        return np.setdiff1d(np.arange(self.origin.size), self.axes)

    @property
    def basis(self) -> np.ndarray:
        """E (S, 2): columns e_i, e_j."""
        return np.eye(self.origin.size)[:, list(self.axes)]

    def lift(self, u) -> np.ndarray:
        """Points u (P, 2) of the plane -> z (P, S)."""
        return self.origin + np.asarray(u, dtype=np.float64) @ self.basis.T

    def project(self, z) -> np.ndarray:
        """z (P, S) -> its coordinates (P, 2) on the two axes."""
        return np.asarray(z, dtype=np.float64)[:, list(self.axes)]

    def describe(self, z=None) -> str:
        """'z3 = 0.42' for the fixed coordinates of z (S,) (default: the origin); '' at S = 2."""
        z = self.origin if z is None else z
        return ", ".join(f"z{k + 1} = {z[k]:.3g}" for k in self.fixed)


def slice_axes_error(axes, S: int):
    """Why (0-based) axes cannot span a slice of R^S (a one-line message in the pictures'
    1-based names z1..zS), or None."""
    axes = list(axes)
    if S < 2:
        return f"S = {S} has a latent line, not a plane to slice; drop it"
    if len(axes) != 2:
        return f"give two latent axes, not {len(axes)}"
    names = ", ".join(f"z{a + 1}" for a in axes)
    if not all(0 <= a < S for a in axes):
        return f"{names}: this model's latent axes are z1..z{S}"
    if axes[0] == axes[1]:
        return f"{names}: give two different axes"
    return None


def slice_at_error(at, axes, S: int):
    """Why values ``at`` cannot fix the S - 2 coordinates off (0-based) axes, or None."""
    rest = ", ".join(f"z{k + 1}" for k in range(S) if k not in axes)
    n = len(at)
    if S <= 2:
        return f"S = {S} leaves no coordinate to fix; drop it"
    if n not in (1, S - 2):
        return f"the slice fixes {rest}: give one value for all or {S - 2}, not {n}"
    if not np.all(np.isfinite(at)):
        return f"the slice's values must be finite numbers, got {', '.join(map(str, at))}"
    return None


def latent_slice(model, axes=None, at=None, through=None) -> LatentSlice:
    """The slice of model's latent space spanned by axes (i, j) (0-based; default (0, 1)).

    The other coordinates are fixed at ``at`` (one value for all, or S - 2 values in axis
    order), else at those of the point ``through`` (S,) (e.g. a posterior mean), else at
    the prior mean.  CpadgnError (one line) on bad axes or values."""
    S = model.latent_dim
    axes = (0, 1) if axes is None else tuple(int(a) for a in axes)
    why = slice_axes_error(axes, S)
    if why:
        raise CpadgnError(f"slice axes: {why}")
    origin = np.array(model.prior_mean if through is None else through, dtype=np.float64)
    if at is not None:
        at = np.atleast_1d(np.asarray(at, dtype=np.float64))
        why = slice_at_error(at, axes, S)
        if why:
            raise CpadgnError(f"slice offset: {why}")
        origin[np.setdiff1d(np.arange(S), axes)] = at
    origin[list(axes)] = 0.0
    return LatentSlice(axes, origin)


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
def partition(model, X=None, rows=None, ax=None, window=None, *, size=None, grid: int = 241,
              slice_axes=None, slice_at=None):
    """The latent partition of model, and the exact posteriors of some rows of X.

    S = 2: the regions meeting ``window`` ((x0, x1), (y0, y1); default: prior mean +-
    3.3 prior std per axis, > 99% of the prior mass, widened to hold the rows'
    posterior means) drawn as polygons shaded by log prior mass, with the prior's
    50/90/99% contours.  With rows (indices into X): each row's E[z | x] is marked
    (a cross labelled with its row number), and unless ``ax`` is given the first 4 rows get a
    zoomed panel (its posterior mean +- 4 posterior std) with the exact p(z | x) as
    contour lines over the regions (``posterior_density`` on a grid x grid lattice).
    S >= 3: the same picture on a 2-D slice (``latent_slice``): the plane spanned by the
    latent axes ``slice_axes`` (0-based, default (0, 1)) with the other coordinates fixed
    at ``slice_at`` (one value or S - 2), by default at those of the first row's E[z | x]
    (without rows: the prior mean).  The regions are cut by the plane and shaded by the
    log prior mass of the whole S-dimensional region; the contours are the prior's
    50/90/99% ellipsoids cut by the plane; p(z | x) is the exact density at the plane's
    points; each zoomed panel is the slice through its own row's E[z | x] unless
    ``slice_at`` is given.  S = 1: the prior density, the breakpoints between regions and
    each row's p(z | x) with its mean marked on the axis.  size: (width, height) in pixels
    of a new figure, at least ``picture_size.MIN_PICTURE_SIZE``.
    """
    size = check_size(size)
    S = model.latent_dim
    if S == 1 and (slice_axes is not None or slice_at is not None):
        raise CpadgnError("slice axes: S = 1 has a latent line, not a plane to slice; drop the slice")
    picked = np.atleast_1d([] if rows is None else rows)
    if picked.size and (picked.dtype.kind not in "iu" or picked.ndim != 1):     # 1.7 was row 1, True row 1
        raise CpadgnError(f"rows must be row numbers (integers, counted from 0), got {rows!r}; pass e.g. "
                          "rows=[0, 5]")
    rows = [int(r) for r in picked]
    if rows and X is None:
        raise CpadgnError("rows were given but no data: pass X (or --data DATA)")
    if S >= 2:
        latent_slice(model, slice_axes, slice_at)                 # bad options fail before any work
    Xr = None
    if rows:
        X = model._check_data(X)
        bad = [r for r in rows if not 0 <= r < X.shape[0]]
        if bad:
            raise CpadgnError(f"row {bad[0]} is not in the data (rows 0..{X.shape[0] - 1}); "
                              "rows are counted from 0")
        Xr = X[rows]
    post = model.posterior(Xr) if rows else None
    if S == 1:
        return _partition_1d(model, rows, Xr, post, ax, window, size, grid)
    return _partition_2d(model, rows, Xr, post, ax, window, size, grid, slice_axes, slice_at)


def _figure_and_axes(ax, size, default):
    if ax is not None:
        return ax.figure, ax
    fig = new_figure(size or default)
    return fig, fig.add_subplot(1, 1, 1)


def _partition_2d(model, rows, Xr, post, ax, window, size, grid, slice_axes=None, slice_at=None):
    from matplotlib.collections import PolyCollection
    from matplotlib.patches import Rectangle
    part, S = model.partition(), model.latent_dim
    plane = latent_slice(model, slice_axes, slice_at, None if post is None else post.z_mean[0])
    if rows:
        _check_posterior_spread(rows, post, plane.axes)
    zooms = rows[:MAX_ZOOMS] if ax is None else []
    zoom_axes = []
    if ax is None:
        fig = new_figure(size or _ZOOM_SIZES[len(zooms)])
        ax, zoom_axes = _zoom_layout(fig, len(zooms))
    else:
        fig = ax.figure
    if window is None:
        full = prior_window(model, None if post is None else post.z_mean)
        window = tuple(full[a] for a in plane.axes)
    regions, polys = region_polygons(model, window, plane=plane)
    zoom_views = []              # (slice, window, regions, polygons) of each zoomed panel
    for i in range(len(zoom_axes)):
        own = latent_slice(model, plane.axes, slice_at, post.z_mean[i])
        zw = _posterior_window(post.z_mean[i], post.z_cov[i], plane.axes)
        zoom_views.append((own, zw) + region_polygons(model, zw, plane=own))
    # one colour scale over every panel's regions: a zoom reaches regions the main view does not
    # (its own slice at S >= 3, or past the main window's edge), which would otherwise clip silently
    cmap, norm = _mass_colours(part.log_prior_mass[np.concatenate([regions] + [v[2] for v in zoom_views])])
    coll = PolyCollection(polys, array=part.log_prior_mass[regions], cmap=cmap, norm=norm,
                          edgecolors=(1, 1, 1, 0.6), linewidths=0.25)
    coll.cpadgn_regions = regions
    coll.cpadgn_slice = plane
    ax.add_collection(coll)
    fig.colorbar(coll, ax=ax, label=_mass_label(part, S), shrink=0.8, fraction=0.05)
    _prior_contours(ax, model, plane)
    ax.set_xlim(*window[0])
    ax.set_ylim(*window[1])
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(f"z{plane.axes[0] + 1}")
    ax.set_ylabel(f"z{plane.axes[1] + 1}")
    if S == 2:
        ax.set_title(f"{part.n_regions:,} linear regions ({len(regions):,} in view)", fontsize=10)
    else:
        where = ("" if slice_at is not None else
                 f", through E[z | x] of row {rows[0]}" if rows else ", through the prior mean")
        ax.set_title(f"slice {plane.describe()}{where}: {len(regions):,} of the\n"
                     f"{part.n_regions:,} linear regions of the S = {S} latent space in view", fontsize=9)
    contoured, faint = [], []
    for i, r in enumerate(rows):
        colour = ROW_COLOURS[i % len(ROW_COLOURS)]
        off = plane.describe(post.z_mean[i])
        _mark_mean(ax, plane.project(post.z_mean[i:i + 1])[0], colour,
                   f"row {r}" + (f" (at {off})" if off else ""))
        if i >= len(zooms):
            zw = _posterior_window(post.z_mean[i], post.z_cov[i], plane.axes)
            # at S >= 3 the slice may pass far from the row's posterior: contours scaled to its
            # peak on the slice would draw a tail (1e-55 of the density at E[z | x]) as a posterior
            floor = 0.0 if S == 2 else FAINT_SLICE * posterior_density(model, Xr[i:i + 1],
                                                                       post.z_mean[i:i + 1])[0, 0]
            drawn = _posterior_contours(ax, model, Xr[i:i + 1], zw, grid, colour, plane, floor)
            (faint if drawn is None else contoured).append(r)
    if contoured:
        ax.plot([], [], color="0.3", lw=0.9, label=f"p(z | x) contours: {_levels_text()}")
    if faint:
        ax.plot([], [], " ", label=f"row{'s' * (len(faint) > 1)} {', '.join(map(str, faint))}: p(z | x) "
                f"on this slice < {FAINT_SLICE:g} of its value at E[z | x]; no contours")
    if rows:
        for i, (r, zax, (own, zw, zr, zp)) in enumerate(zip(zooms, zoom_axes, zoom_views)):
            colour = ROW_COLOURS[i % len(ROW_COLOURS)]
            zc = PolyCollection(zp, array=part.log_prior_mass[zr], cmap=cmap, norm=norm,
                                edgecolors="white", linewidths=0.6)
            zc.cpadgn_regions = zr
            zc.cpadgn_slice = own
            zax.add_collection(zc)
            _posterior_contours(zax, model, Xr[i:i + 1], zw, grid, "black", own)
            _mark_mean(zax, own.project(post.z_mean[i:i + 1])[0], colour, None)
            zax.set_xlim(*zw[0])
            zax.set_ylim(*zw[1])
            zax.set_aspect("equal", adjustable="box")
            zax.tick_params(labelsize=7)
            zax.set_xlabel(f"z{plane.axes[0] + 1}", fontsize=7, labelpad=1)
            zax.set_ylabel(f"z{plane.axes[1] + 1}", fontsize=7, labelpad=1)
            on = f"\non the slice {own.describe()}" if S > 2 else ""
            zax.set_title(f"row {r}: exact p(z | x){on}\n{_log_p_text(post.log_likelihood[i])}",
                          fontsize=8)
            (x0, x1), (y0, y1) = zw
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.0,
                                   label=f"zoomed windows (right), p(z | x) contours:\n{_levels_text()}"
                                   if i == 0 else None))
        # inside the axes: not a decoration for the layout to make room for (at the smallest
        # sizes a tall legend would collapse the axes)
        ax.legend(loc="upper right", fontsize=7, framealpha=0.8).set_in_layout(False)
    fig.cpadgn_main_axes = ax
    return fig


def _levels_text() -> str:
    """What the p(z | x) contour lines are, for a legend: '5, 20, ..., 95% of its peak'."""
    return ", ".join(f"{100 * v:g}" for v in POSTERIOR_CONTOUR_LEVELS) + "% of its peak"


def _log_p_text(log_p: float) -> str:
    """A row's log p(x) for a title; a row with nothing observed (NaN) has the prior as posterior."""
    return "nothing observed: p(z | x) is the prior" if np.isnan(log_p) else f"log p(x) = {log_p:.2f}"


def _mass_label(part, S: int) -> str:
    """The colorbar's label: at S >= 3 the shade is the mass of the whole region, not of its slice."""
    if S == 2:
        return "log prior mass of the region"
    how = "exact" if not np.any(part.log_prior_mass_stderr) else "QMC estimate"
    return f"log prior mass of the whole {S}-D region ({how})"


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


def _prior_contours(ax, model, plane):
    """The prior's 50/90/99% ellipsoids |w| = r (w = L^-1 (z - m), r^2 the chi^2_S quantile of
    the mass) cut by the plane z = z0 + E u: with w = w0 + M u, M = L^-1 E, the ellipse
    (u - u*)^T M^T M (u - u*) = r^2 - d^2, u* the plane's point nearest the prior mean in w,
    d = |w0 + M u*| (empty for r <= d).  At S = 2 (d = 0) these are the prior's own contours."""
    from scipy.stats import chi2
    t = np.linspace(0, 2 * np.pi, 361)
    circle = np.stack([np.cos(t), np.sin(t)])
    M = np.linalg.solve(model.prior_chol, plane.basis)
    w0 = np.linalg.solve(model.prior_chol, plane.origin - model.prior_mean)
    MtM = M.T @ M
    centre = -np.linalg.solve(MtM, M.T @ w0)
    with np.errstate(over="ignore"):     # a plane ~1e300 away (--slice-at 1e300): d^2 = inf, no ellipse
        d2 = float(np.sum((w0 + M @ centre) ** 2))
    C = np.linalg.cholesky(np.linalg.inv(MtM))
    what = "contours" if model.latent_dim == 2 else "ellipsoids cut by the slice"
    first = True
    for mass in PRIOR_CONTOUR_MASSES:
        r2 = float(chi2.ppf(mass, model.latent_dim))
        if r2 <= d2:
            continue
        e = centre[:, None] + C @ (np.sqrt(r2 - d2) * circle)
        ax.plot(e[0], e[1], color="black", lw=0.8, ls=(0, (4, 3)), alpha=0.8,
                label=f"prior 50/90/99% {what}" if first else None)
        first = False


def _mark_mean(ax, z, colour, label):
    ax.plot([z[0]], [z[1]], marker="X", ms=9, mec="black", mew=0.8, color=colour, ls="none",
            label=None if label is None else f"E[z | x], {label}", gid="posterior_mean")


def _posterior_window(mean, cov, axes=(0, 1), k: float = 4.0):
    """A square window around mean (S,) on two axes, +- k times their larger posterior std,
    and at least +- 1e-6 (1 + |mean|): a posterior narrower than that (a tiny noise std) is
    drawn as a dot in a window that float64 axes still resolve."""
    i, j = axes
    half = k * float(np.sqrt(max(cov[i, i], cov[j, j])))
    half = max(half, 1e-6 * (1.0 + max(abs(mean[i]), abs(mean[j]))))
    return ((mean[i] - half, mean[i] + half), (mean[j] - half, mean[j] + half))


def _check_posterior_spread(rows, post, axes) -> None:
    """A one-line CpadgnError for a row whose posterior variances on the drawn axes are all
    non-positive or not finite: rounding swamped the moments of a posterior far narrower
    than its mean (a tiny noise std), so its window cannot be sized."""
    for i, r in enumerate(rows):
        var = np.diagonal(post.z_cov[i])[list(axes)]
        if not (np.all(np.isfinite(var)) and var.max() > 0):
            raise CpadgnError(f"row {r}: its posterior variance on z{axes[0] + 1}, z{axes[1] + 1} came out "
                              f"{var.max():.3g}, not positive: at this noise std its posterior is too "
                              "narrow for float64 moments, so its p(z | x) cannot be drawn; drop "
                              f"--row {r}, or use a larger --noise-std")


def _posterior_contours(ax, model, x, window, grid, colour, plane, floor: float = 0.0):
    """Contour lines of the exact p(z | x) of one row x (1, D) over window on plane; None
    (nothing drawn) when its peak there is not above floor."""
    gx = np.linspace(*window[0], grid)
    gy = np.linspace(*window[1], grid)
    U = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
    dens = posterior_density(model, x, plane.lift(U))[0].reshape(grid, grid)
    top = float(dens.max())
    if top <= floor:
        return None
    levels = top * np.array(POSTERIOR_CONTOUR_LEVELS)
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
                            label=f"row {r}: {_log_p_text(post.log_likelihood[i])}")
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
                     flagged=None, ax=None, size=None, bins: int = 40):
    """Histogram of the rows' exact log p(x) (N,), the anomaly threshold (rows with
    log p(x) below it are flagged) and, when given, the model's own log p of its draws
    (M,) as a second, outlined histogram (both as densities, so they compare).

    A few far outliers would squash the bulk: rows more than 10 interquartile ranges
    below the lower quartile are counted in the legend instead of drawn.  Rows with
    nothing observed (log p NaN: no likelihood) are counted in the legend too (one NaN
    used to blank every bar).  flagged: the rows flagged, for the legend, where that is not
    the rows below the line (several missing patterns, each with its own threshold); default
    the rows below it.  size: as for ``partition``."""
    size = check_size(size)
    ll = np.asarray(log_likelihood, dtype=np.float64).reshape(-1)
    unobserved = int(np.sum(np.isnan(ll)))
    ll = ll[~np.isnan(ll)]
    ref = None if model_log_likelihood is None else np.asarray(model_log_likelihood, np.float64).reshape(-1)
    ref = None if ref is None or np.isnan(ref).all() else ref[~np.isnan(ref)]
    fig, ax = _figure_and_axes(ax, size, (600, 450))
    if unobserved:
        ax.plot([], [], " ", label=f"{unobserved} rows with nothing observed (no log p): not in the bars")
    both = ll if ref is None else np.concatenate([ll, ref])
    if both.size == 0:
        return _finish_scores_axes(fig, ax)
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
        flagged = int(np.sum(ll < threshold)) if flagged is None else int(flagged)
        ax.axvline(threshold, color="C3", lw=1.8, gid="threshold",
                   label=f"{threshold_label or 'threshold'}: {flagged} rows flagged")
    hidden = int(np.sum(ll < lo))
    if hidden:
        ax.plot([], [], " ", label=f"{hidden} rows below {lo:.4g}: off the axis, not in the bars")
    return _finish_scores_axes(fig, ax)


def _finish_scores_axes(fig, ax):
    ax.set_xlabel("exact log p(x) per row (nats; low = anomalous)")
    ax.set_ylabel("density")
    ax.set_title("Exact log-likelihood of the rows", fontsize=10)
    legend = ax.legend(loc="upper left", fontsize=8, framealpha=0.85)
    _clear_legend(fig, ax, legend)
    fig.cpadgn_main_axes = ax
    return fig


def _clear_legend(fig, ax, legend) -> None:
    """Raise ax's top until no bar or outline reaches under the legend (it hid the tallest
    bars on its left): the legend's share of the axes height, measured after the layout, is
    kept free above the tallest bar beneath it."""
    if not ax.patches:
        return
    if fig.get_layout_engine() is not None:
        fig.get_layout_engine().execute(fig)
    renderer = fig.canvas.get_renderer()
    box, frame = legend.get_window_extent(renderer), ax.get_window_extent(renderer)
    x0, x1 = ax.transData.inverted().transform([[box.x0, 0], [box.x1, 0]])[:, 0]
    under = [0.0]
    for patch in ax.patches:          # the bars (rectangles) and the model's step outline (a polygon)
        v = patch.get_patch_transform().transform(patch.get_path().vertices)       # data coordinates
        a, b = v[:-1], v[1:]
        over = (np.minimum(a[:, 0], b[:, 0]) < x1) & (np.maximum(a[:, 0], b[:, 0]) > x0)
        under.extend(np.maximum(a[over, 1], b[over, 1]).tolist())
    free = 1.0 - (frame.y1 - box.y0) / frame.height - 0.02       # axes fraction below the legend
    y0, y1 = ax.get_ylim()
    if free > 0.2 and max(under) > y0 + free * (y1 - y0):
        ax.set_ylim(y0, y0 + (max(under) - y0) / free)


def scores_figure(log_likelihood, *, contamination=None, pvalues=None, alpha=None, observed=None, size=None):
    """``scores_histogram`` with the threshold of ``cpadgn score``: contamination c flags
    log p below -quantile(-log p, 1 - c); alpha flags p-values < alpha, i.e. log p below
    ``anomaly.alpha_threshold`` of the reference draws.  pvalues (``anomaly.PValues``)
    gives the model's own log p; with several missing patterns, those of the pattern
    most rows with an observed entry share (observed (N, D) bool)."""
    from .anomaly import alpha_threshold
    ll = np.asarray(log_likelihood, dtype=np.float64)
    threshold = label = ref = flagged = None
    if pvalues is not None and pvalues.reference_log_prob is not None:
        q = 0
        if len(pvalues.patterns) > 1 and observed is not None:
            _, which = np.unique(observed, axis=0, return_inverse=True)
            counts = np.bincount(which.reshape(-1), minlength=len(pvalues.patterns))
            counts[~pvalues.patterns.any(axis=1)] = 0         # nothing observed: no log p to compare
            q = int(counts.argmax())
        ref = pvalues.reference_log_prob[q]
    scored = ll[~np.isnan(ll)]              # rows with something observed, as score flags them
    if contamination is not None and scored.size:
        threshold = -float(np.quantile(-scored, 1 - contamination))
        label = f"contamination {contamination:g}"
    elif alpha is not None and ref is not None:
        threshold = alpha_threshold(ref, alpha)
        label = f"p-value < {alpha:g}"
        if len(pvalues.patterns) > 1:       # one threshold per pattern: count the flags as score does
            label += f" (line: rows with {int(pvalues.patterns[q].sum())} entries observed)"
            flagged = int(np.sum(pvalues.pvalue < alpha))
    return scores_histogram(ll, threshold, ref, threshold_label=label, flagged=flagged, size=size)


# ============================================================== imputations
def imputations(X_obs, mean, std, draws, image_shape, *, rows=None, max_rows: int = 4, max_draws: int = 4,
                size=None, cmap: str = "gray_r", row_labels=None):
    """Image tiles of the exact imputation of some rows: per row the observed pixels
    (missing ones in red), the missing mask, E[x | x_o], the conditional std and a few
    exact draws from p(x_m | x_o).

    X_obs (N, D) with NaN = missing; mean, std (N, D); draws (K, N, D) or None;
    image_shape (H, W) with H W = D; rows: which rows (default: the first max_rows
    rows with a missing entry).  Values share one grey scale (the range of the observed
    values and the means; draws beyond it saturate, and the title counts them); the std has its own.  size: as for
    ``partition``.  row_labels: the row numbers the tiles are labelled with (default rows;
    ``imputation_figure`` passes the rows' numbers in the whole data).
    """
    size = check_size(size)
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
            raise CpadgnError("no row has a missing entry, so there is nothing imputed to show; mark some "
                              "entries missing (NaN)")
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
        axes[i, 0].set_ylabel(f"row {n if row_labels is None else row_labels[i]}", fontsize=8)
    shown_draws = np.asarray(draws)[:K][:, rows] if K else np.empty(0)
    beyond = int(np.sum((shown_draws < vmin) | (shown_draws > vmax)))
    saturate = f"; {beyond} drawn pixels beyond it saturate" if beyond else ""
    fig.suptitle(f"Exact imputation: mean, std and draws (grey scale {vmin:.3g}..{vmax:.3g}{saturate};\n"
                 f"std scale 0..{smax:.3g}; red = missing)", fontsize=9)
    fig.cpadgn_rows = rows if row_labels is None else np.asarray(row_labels)
    return fig


def imputation_figure(model, X, result=None, image_shape=None, *, n_draws: int = 4, seed=0,
                      max_rows: int = 4, size=None):
    """``imputations`` of the first max_rows rows of X (N, D) with a missing entry, from
    ``result`` (an ``impute.ImputeResult`` of all of X) where it has the std and draws,
    computed exactly for those rows otherwise (n_draws draws, seeded)."""
    check_size(size)                    # before the imputation's work
    X = np.asarray(X, dtype=np.float64)
    image_shape = image_shape or square_shape(X.shape[1])
    rows = np.flatnonzero(np.isnan(X).any(1))[:max_rows]
    if rows.size == 0:
        raise CpadgnError("no row of the data has a missing entry (NaN), so there is no imputation to draw; "
                          "mark some entries missing")
    have = result is not None and result.std is not None and result.draws is not None
    if have:
        mean, std, draws = result.mean[rows], result.std[rows], result.draws[:, rows]
    else:
        res = model.imputation(X[rows], std=True, seed=seed,
                               draws=n_draws if result is None or result.draws is None else None)
        mean, std = res.mean, res.std
        draws = res.draws if res.draws is not None else result.draws[:, rows]
    return imputations(X[rows], mean, std, draws, image_shape, size=size, row_labels=rows)


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
