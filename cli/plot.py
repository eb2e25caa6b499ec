"""``cpadgn plot``: pictures of a model's latent space (needs ``pip install 'cpadgn[plot]'``)."""
from __future__ import annotations

import click

from cli.main import command_inputs, load_model, main, model_options, user_errors
from cpadgn.errors import CpadgnError


@main.group()
def plot():
    """Pictures of a model (PNG, PDF or SVG; needs pip install 'cpadgn[plot]').

    \b
    Examples:
      cpadgn plot partition sample_data/digits_generator.h5 -o map.png
      cpadgn score gen.h5 data.csv -o s.csv --plot hist.png       (the scores' histogram)
      cpadgn impute gen.h5 holes.csv -o f.csv --plot draws.png    (imputation tiles)
    """


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
@click.option("--size", default=None, metavar="WxH", help="Picture size in pixels [default: by layout].")
@model_options
@user_errors
def partition(model_path, out, data_path, dataset, rows, size, noise_std, cache, max_regions, device,
              memory_budget, trust_pickle, quiet, debug):
    """Draw MODEL's latent partition (S = 1 or 2) and the exact posteriors of some rows.

    S = 2: the linear regions over a window holding > 99% of the prior mass, shaded by
    their log prior mass, with the prior's 50/90/99% contours; each --row gets its
    posterior mean marked and a zoomed panel with the exact density p(z | x) (the
    mixture of Gaussians truncated to their regions).  S = 1: the prior density, the
    breakpoints between regions and p(z | x) of each row.

    \b
    Examples:
      cpadgn plot partition sample_data/digits_generator.h5 -o map.png
      cpadgn plot partition sample_data/digits_generator.h5 -o map.png \\
          --data sample_data/digits_test.csv --row 0 --row 3
      cpadgn plot partition sample_data/wave_generator.h5 -o wave.png --data sample_data/wave.csv --row 5
    """
    from cpadgn import plot as pictures
    from cpadgn.data import read_data
    if rows and data_path is None:
        raise CpadgnError("--row picks rows of a data file: add --data DATA")
    try:
        size = None if size is None else pictures.parse_image_shape(size)
    except ValueError as e:
        raise CpadgnError(f"--size: {str(e).replace('HxW', 'WxH')}") from None
    pictures.check_image_path(out, inputs=command_inputs(model_path, data_path, cache))
    X = None if data_path is None else read_data(data_path, dataset=dataset)
    if X is not None:
        bad = [r for r in rows if r >= X.shape[0]]
        if bad:
            raise CpadgnError(f"--row {bad[0]} is past the end of DATA ({X.shape[0]} rows, counted from 0); "
                               f"pick rows 0 to {X.shape[0] - 1}")
    model = load_model(model_path, cache=cache, noise_std=noise_std, device=device, memory_budget=memory_budget,
                       trust_pickle=trust_pickle, max_regions=max_regions, quiet=quiet, data=X,
                       need_noise=bool(rows), check=pictures.check_drawable)
    pictures.save(pictures.partition(model, X, rows=list(rows), size=size), out)
    if not quiet:
        click.echo(f"wrote {out}", err=True)
