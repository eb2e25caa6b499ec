"""``cpadgn plot``: pictures of a model's latent space (needs ``pip install 'cpadgn[plot]'``)."""
from __future__ import annotations

import click

from cli.main import (check_cache_path, check_output_suffixes, command_inputs, load_model, main, model_options,
                      usage_error, user_errors)
from cpadgn.errors import CpadgnError
from cpadgn.picture_size import MIN_PICTURE_SIZE, check_size


@main.group()
def plot():
    """Pictures of a model (PNG, PDF or SVG; needs pip install 'cpadgn[plot]').

    \b
    Examples:
      cpadgn plot partition sample_data/digits_generator.h5 -o map.png
      cpadgn score gen.h5 data.csv -o s.csv --plot hist.png       (the scores' histogram)
      cpadgn impute gen.h5 holes.csv -o f.csv --plot draws.png    (imputation tiles)
    """


def parse_size(ctx, param, value):
    """--size WxH -> (W, H) pixels, within MIN_PICTURE_SIZE and MAX_PICTURE_SIDE (``check_size``); a
    usage error otherwise."""
    if value is None:
        return None
    parts = value.lower().replace("*", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise click.BadParameter(f"expected WxH in pixels, e.g. 800x600, got {value!r}")
    try:
        return check_size([int(p) for p in parts], name="")
    except CpadgnError as e:
        raise click.BadParameter(str(e).strip()) from None


@plot.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Picture file: .png, .pdf or .svg.")
@click.option("--data", "data_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Data file whose rows --row picks.")
@click.option("--dataset", default=None, help="Dataset key inside an .h5 DATA file.")
@click.option("--row", "rows", type=click.IntRange(min=0), multiple=True, metavar="I",
              help="Draw the exact posterior p(z | x) of row I of DATA (0 = the first data row; "
                   "repeat for several).")
@click.option("--size", default=None, metavar="WxH", callback=parse_size,
              help=f"Picture size in pixels, at least {MIN_PICTURE_SIZE[0]}x{MIN_PICTURE_SIZE[1]} "
                   f"[default: by layout].")
@click.option("--slice-axes", default=None, metavar="I,J",
              help="S >= 3 (or S = 2, to swap): the two latent axes zI, zJ spanning the slice, "
                   "numbered from 1 like the pictures' z1..zS and score's z_mean_1..S [default: 1,2].")
@click.option("--slice-at", default=None, metavar="V[,V...]",
              help="S >= 3: the values of the other latent coordinates on the slice (one for all, or "
                   "S - 2 in axis order) [default: those of E[z | x] of the first --row, else the "
                   "prior mean].")
@model_options
@user_errors
def partition(model_path, out, data_path, dataset, rows, size, slice_axes, slice_at, noise_std, cache,
              max_regions, device, memory_budget, trust_pickle, quiet, debug):
    """Draw MODEL's latent partition and the exact posteriors of some rows.

    S = 2: the linear regions over a window holding > 99% of the prior mass, shaded by
    their log prior mass, with the prior's 50/90/99% contours; each --row gets its
    posterior mean marked and a zoomed panel with the exact density p(z | x) (the
    mixture of Gaussians truncated to their regions).  S >= 3: the same picture on a
    2-D slice, the plane spanned by two latent axes (--slice-axes) with the other
    coordinates fixed (--slice-at; by default through E[z | x] of the first --row, so
    its posterior is seen where it is, else through the prior mean): the regions cut by
    the plane, shaded by the prior mass of the whole S-D region, the prior's ellipsoids
    cut by the plane, and p(z | x) on the plane; each zoomed panel is the slice through
    its own row's E[z | x] unless --slice-at is given.  S = 1: the prior density, the
    breakpoints between regions and p(z | x) of each row.

    \b
    Examples:
      cpadgn plot partition sample_data/digits_generator.h5 -o map.png
      cpadgn plot partition sample_data/digits_generator.h5 -o map.png \\
          --data sample_data/digits_test.csv --row 0 --row 3
      cpadgn plot partition sample_data/wave_generator.h5 -o wave.png --data sample_data/wave.csv --row 5
      cpadgn fit sample_data/digits_train.csv -o s3.h5 --latent-dim 3 --hidden 8,8 --max-iter 2
      cpadgn plot partition s3.h5 -o slice.png --data sample_data/digits_test.csv --row 0 --row 3
      cpadgn plot partition s3.h5 -o slice13.png --slice-axes 1,3 --slice-at 0.5
    """
    from cpadgn import plot as pictures
    from cpadgn.data import read_data
    if rows and data_path is None:
        raise usage_error("--row picks rows of a data file: add --data DATA")
    if noise_std is not None and not rows:
        raise usage_error("--noise-std sets the noise of the posteriors p(z | x) drawn for --row, "
                          "and there is no --row (the partition itself does not depend on it): add --data "
                          "DATA --row I, or drop --noise-std")
    if data_path is not None and not rows:
        raise usage_error("--data is read for --row, and there is no --row: add --row I, or drop --data")
    if dataset is not None and data_path is None:
        raise usage_error(f"--dataset {dataset} is the key inside the --data .h5 file, and there is no "
                          "--data: add --data DATA, or drop --dataset")
    axes = None if slice_axes is None else parse_slice_axes(slice_axes)
    at = None if slice_at is None else parse_slice_at(slice_at)
    check_output_suffixes(picture=out)
    pictures.check_image_path(out, inputs=command_inputs(model_path, data_path, cache))
    check_cache_path(model_path, cache)
    X = None if data_path is None else read_data(data_path, dataset=dataset)
    if X is not None:
        bad = [r for r in rows if r >= X.shape[0]]
        if bad:
            raise CpadgnError(f"--row {bad[0]} is past the end of DATA ({X.shape[0]} rows, counted from 0); "
                               f"pick rows 0 to {X.shape[0] - 1}")

    def check_slice(model):
        """Refuse bad slice options before the partition is computed (minutes at S = 3)."""
        S = model.latent_dim
        why = axes is not None and pictures.slice_axes_error(axes, S)
        if why:
            raise CpadgnError(f"--slice-axes {slice_axes}: {why}")
        why = at is not None and pictures.slice_at_error(at, (0, 1) if axes is None else axes, S)
        if why:
            raise CpadgnError(f"--slice-at {slice_at}: {why}")
    model = load_model(model_path, cache=cache, noise_std=noise_std, device=device, memory_budget=memory_budget,
                       trust_pickle=trust_pickle, max_regions=max_regions, quiet=quiet, data=X,
                       data_name=data_path, need_noise=bool(rows), check=check_slice)
    fig = pictures.partition(model, X, rows=list(rows), size=size, slice_axes=axes, slice_at=at)
    pictures.save(fig, out)
    if not quiet:
        click.echo(f"wrote {out}", err=True)


def parse_slice_axes(text: str):
    """'1,3' or 'z1,z3' -> (0, 2), the 0-based axes; a usage error unless two different axes
    numbered from 1 (their range is checked against the model later)."""
    parts = [p.strip().lower().removeprefix("z") for p in text.split(",")]
    if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
        raise usage_error(f"--slice-axes {text}: give two latent axes numbered from 1, e.g. 1,3")
    if int(parts[0]) == int(parts[1]):
        raise usage_error(f"--slice-axes {text}: give two different axes, e.g. 1,3")
    return tuple(int(p) - 1 for p in parts)


def parse_slice_at(text: str):
    """'0.5' or '0.5,-1' -> array of finite floats; a usage error otherwise (their number is
    checked against the model later)."""
    import numpy as np
    try:
        at = np.array([float(p) for p in text.split(",")], dtype=np.float64)
    except ValueError:
        at = np.array([np.nan])
    if not np.all(np.isfinite(at)):
        raise usage_error(f"--slice-at {text}: give finite numbers separated by commas, e.g. 0.5 or 0.5,-1")
    return at
