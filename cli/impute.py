"""``cpadgn impute``: exact conditional imputation and exact multiple-imputation draws."""
from __future__ import annotations

import csv
import json
import time
from contextlib import ExitStack
from pathlib import Path

import click
from cli.lazy import np
from rich.table import Table
from rich.text import Text

from cli.main import (FiniteRange, Progressbar, StdoutConsole, cache_status, check_cache_path, check_dask_options,
                      check_output_suffixes, command_inputs, csv_column_names, dask_options, load_model, main,
                      model_options, on_command_line, print_summary, say_for, precision_options, rounding_errors,
                      usage_error, user_errors, warn_rounding)
from cpadgn.errors import CpadgnError


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.argument("data_path", metavar="DATA", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default=None,
              help="Output file: .csv, .npy or .h5 (not needed with --evaluate-mcar).")
@click.option("--draws", "n_draws", type=click.IntRange(min=1), default=None, metavar="K",
              help="Write K exact draws from p(x_missing | x_observed), observation noise included "
                   "(multiple imputation; README: pooling with Rubin's rules) instead of the conditional mean.")
@click.option("--std", "want_std", is_flag=True,
              help="Also write the exact conditional standard deviation of every entry (0 where "
                   "observed): OUT.std.csv / OUT.std.npy beside OUT, or dataset 'std' in an .h5 OUT "
                   "(at S >= 4 also dataset 'mean_stderr': the QMC standard error of the mean).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seed of the draws and of --evaluate-mcar's mask (the same seed and "
                   "--memory-budget, which sets the rows per batch, give the same draws).")
@click.option("--evaluate-mcar", "mcar", type=FiniteRange(0, 1, min_open=True, max_open=True), default=None,
              metavar="P",
              help="Hide a fraction P of the observed entries completely at random (seeded), "
                   "impute them and report the RMSE overall and per column (with --draws K also "
                   "the coverage of the draws' central 90% intervals, below 0.9 even for a perfect "
                   "model: about 0.9 (K-1)/(K+1), 0.81 at K = 20).  -o then writes the "
                   "imputation of the masked data.")
@click.option("--dataset", default=None, help="Dataset key inside an .h5 DATA file.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Draw image tiles of the first rows with missing entries: observed pixels, "
                   "missing mask, conditional mean, std and exact draws (.png/.pdf/.svg; needs "
                   "pip install 'cpadgn[plot]').")
@click.option("--image-shape", default=None, metavar="HxW",
              help="Shape of one row as an image for --plot [default: square].")
@model_options
@precision_options
@dask_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def impute(model_path, data_path, out, n_draws, want_std, seed, mcar, dataset, plot_path, image_shape,
           noise_std, cache, max_regions, device, memory_budget, trust_pickle, quiet, debug, as_json,
           dask_address, chunk_rows, rtol, stderr_target):
    """Impute the missing entries (NaN) of DATA exactly under MODEL.

    By default each missing entry gets the exact conditional mean E[x_m | x_o] =
    sum_w r_w(x_o) (A_w,m E[z | x_o, z in w] + b_w,m) over the linear regions w.
    OUT has DATA's shape and column order (a CSV's header, or its lack of one, is kept); observed entries
    are copied bit for bit.  Rows with nothing missing pass through; rows with
    everything missing get the model's marginal mean.

    \b
    Output layouts:
      mean     .csv: header + N rows (no header if DATA has none)   .npy: (N, D)
               .h5: dataset 'data' (N, D)
      --draws  .csv: a 'draw' column (1..K) then the D columns, K*N rows, draw by draw
               .npy: (K, N, D)          .h5: dataset 'data' (K, N, D)
      --std    .csv/.npy: OUT.std.csv / OUT.std.npy (N, D)   .h5: dataset 'std' (N, D),
               and at S >= 4 'mean_stderr' (N, D), the mean's QMC standard error

    At S >= 4 the region integrals are randomised QMC: the summary gives the largest
    standard error of an imputed mean over that randomisation (max mean qmc stderr).

    --dask ADDRESS|local:N imputes the rows on a Dask cluster, chunk by chunk (README,
    Beyond one machine): the same files, datasets and summary fields; the same means and
    std up to rounding (at S >= 4 also the same QMC standard errors); --draws are seeded
    per chunk, so they are other exact draws than without --dask.

    \b
    Examples:
      cpadgn impute sample_data/digits_generator.h5 holes.csv -o filled.csv --std
      cpadgn impute gen.h5 holes.npy -o mi.h5 --draws 20 --seed 1
      cpadgn impute sample_data/digits_generator.h5 sample_data/digits_test.csv --evaluate-mcar 0.3
      cpadgn impute sample_data/digits_generator.h5 holes.csv -o filled.csv --plot draws.png --image-shape 8x8
    """
    from cpadgn.data import check_output_path, read_data
    from cpadgn.impute import imputation_errors, mcar_mask
    t0 = time.perf_counter()
    notices = not quiet                      # shown under --json too (on stderr)
    quiet = quiet or as_json
    # the command line's own errors (exit 2), before any file is looked at
    if out is None and mcar is None:
        raise usage_error("missing output file: pass -o OUT (.csv, .npy or .h5), or --evaluate-mcar P")
    if out is None and want_std:
        raise usage_error("--std writes a file beside OUT: pass -o OUT")
    if image_shape is not None and plot_path is None:
        raise usage_error("--image-shape is the shape of the --plot tiles; add --plot FILE.png")
    if on_command_line("seed") and n_draws is None and mcar is None and plot_path is None:
        raise usage_error("--seed seeds --draws, --evaluate-mcar and --plot, and none is given; "
                          "add one of them or drop --seed")
    if image_shape is not None:
        from cpadgn.plot import parse_image_shape
        try:
            image_shape = parse_image_shape(image_shape)
        except ValueError as e:
            raise usage_error(f"--image-shape: {e}") from None
    check_dask_options(dask_address, chunk_rows, **{
        "--evaluate-mcar": mcar is not None, "--plot": plot_path is not None, "--noise-std auto": noise_std == "auto"})
    check_output_suffixes(out, plot_path)

    std_path = None
    inputs = command_inputs(model_path, data_path, cache)
    check_cache_path(model_path, cache)
    if out is not None:
        out = check_output_path(out, inputs=inputs)
        if want_std and out.suffix.lower() in (".csv", ".npy"):
            std_path = check_output_path(std_sibling(out), inputs=inputs)
    if plot_path is not None:
        from cpadgn import plot
        plot.check_image_path(plot_path, inputs={**inputs, "the -o output": out,
                                                 "the --std output": std_path})
    if dask_address is not None:
        res, model = impute_on_dask(dask_address, model_path, data_path, dataset, chunk_rows, n_draws, seed,
                                    want_std, out, std_path, quiet=quiet, cache=cache, noise_std=noise_std,
                                    notices=notices,
                                    device=device, trust_pickle=trust_pickle, max_regions=max_regions,
                                    memory_budget=memory_budget, rtol=rtol, stderr_target=stderr_target)
        summary = imputation_summary(res, model, n_draws, time.perf_counter() - t0, out, want_std, std_path)
        summary["rows_unreliable_by_rounding"] = warn_rounding(res.rounding_error * (res.n_missing > 0), not notices)
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        else:
            print_summary("Imputation", summary)
        return
    X = read_data(data_path, dataset=dataset)
    columns, header = csv_header(data_path, X.shape[1])
    if n_draws is not None and out is not None and out.suffix.lower() == ".csv" and "draw" in columns:
        raise CpadgnError("DATA has a column named 'draw', which the CSV draws layout uses; "
                          "write the draws to .npy or .h5")
    if plot_path is not None:
        H, W = image_shape or plot.square_shape(X.shape[1])
        if H * W != X.shape[1]:
            raise CpadgnError(f"--image-shape {H}x{W} has {H * W} pixels but DATA has {X.shape[1]} "
                              f"columns; give H x W = {X.shape[1]}")
    hidden = None
    X_in = X
    if mcar is not None:
        hidden = mcar_mask(X, mcar, seed)
        X_in = X.copy()
        X_in[hidden] = np.nan
    complete = not np.isnan(X_in).any()
    if plot_path is not None and complete:
        raise CpadgnError("--plot draws rows with missing entries (NaN) and DATA has none; "
                          "mark some entries missing, or add --evaluate-mcar P")
    # --noise-std auto is fitted on the data as imputed (never on entries hidden by --evaluate-mcar)
    model = load_model(model_path, cache=cache, noise_std=noise_std, device=device,
                       trust_pickle=trust_pickle, max_regions=max_regions, quiet=quiet, data=X_in,
                       data_name=data_path, memory_budget=memory_budget, rtol=rtol, stderr_target=stderr_target,
                       notices=notices)
    model._check_data(X)              # X_in hides --evaluate-mcar's entries: an inf there too
    if complete and notices:          # a Note: line, as every notice (also under --json)
        click.echo("Note: DATA has no missing entries (NaN): OUT will be a copy of it (an empty cell, NA "
                   "or NaN marks a missing entry; --evaluate-mcar P hides some to test)", err=True)
    with Progressbar("imputing rows", quiet) as bar:
        try:
            res = model.imputation(X_in, draws=n_draws, seed=seed, std=want_std, progress=bar)
        except MemoryError:
            if n_draws is None:
                raise
            N, D = X_in.shape        # the draws are held here until written: K N D values
            raise CpadgnError(f"out of memory holding --draws {n_draws} for {N} rows of {D} columns "
                              f"({8.0 * n_draws * N * D:.3g} bytes); lower --draws, or use --dask with an "
                              ".h5 output, which writes the draws chunk by chunk") from None
    if out is not None:
        mean_stderr = res.mean_stderr if want_std and n_draws is None and model.latent_dim >= 4 else None
        write_imputation(out, res.mean if n_draws is None else res.draws, res.std, columns,
                         draws=n_draws is not None, std_path=std_path, mean_stderr=mean_stderr,
                         header=header)
    if plot_path is not None:
        plot.save(plot.imputation_figure(model, X_in, res, (H, W), seed=seed), plot_path)

    summary = imputation_summary(res, model, n_draws, time.perf_counter() - t0, out, want_std, std_path)
    # complete rows are returned as they are: only the rows with something missing are computed
    summary["rows_unreliable_by_rounding"] = warn_rounding(rounding_errors(model, X_in) * (res.n_missing > 0),
                                                           not notices)
    if mcar is not None:
        ev = imputation_errors(X, res.mean, hidden, res.draws)
        summary.update({"mcar_fraction": mcar, "hidden_entries": ev["hidden"], "rmse": ev["rmse"]})
        if "coverage" in ev:
            summary["coverage_90"] = ev["coverage"]
        per_col = [None if not np.isfinite(v) else float(v) for v in ev["rmse_per_column"]]
        if as_json:
            summary["rmse_per_column"] = dict(zip(distinct_names(columns), per_col))
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    print_summary("Imputation", summary)
    if mcar is not None:
        table = Table(title=f"RMSE per column ({mcar:g} of the observed entries hidden at random)")
        table.add_column("column")
        table.add_column("hidden", justify="right")
        table.add_column("RMSE", justify="right")
        for name, n, v in zip(distinct_names(columns), ev["hidden_per_column"], per_col):
            table.add_row(Text(name), str(int(n)), "-" if v is None else f"{v:.6g}")
        StdoutConsole().print(table)


def impute_on_dask(address, model_path, data_path, dataset, chunk_rows, n_draws, seed, want_std, out, std_path,
                   *, quiet, device, memory_budget, **load):
    """``cpadgn impute --dask``: DATA read in chunks by the workers, the partition computed or
    loaded here once and sent to every worker once, the imputation written to OUT (.npy
    and .h5 chunk by chunk as they complete; .csv at the end, in row order), with the
    files and datasets of the run without --dask (at S >= 4 with --std, the means' QMC
    standard error in an .h5 OUT); returns (per-row error_bound and n_missing, and
    mean_stderr_max, the largest QMC standard error of a mean (S >= 4), the rows'
    ``rounding_errors``, model)."""
    from types import SimpleNamespace

    from cpadgn import dask as cluster
    rows = cluster.open_rows(data_path, dataset)
    model = load_model(model_path, quiet=quiet, device=device, memory_budget=memory_budget,
                       check=lambda m: cluster.check_columns(m, rows, data_path), data_name=data_path,
                       first_rows=lambda: cluster.first_rows(rows), **load)
    X = cluster.read(rows, chunk_rows=chunk_rows, memory_budget=memory_budget)
    N, D = X.shape
    lead = np.empty((N, cluster.IMPUTE_LEAD))
    columns, _ = csv_header(data_path, D)
    carry_se = n_draws is None and model.latent_dim >= 4          # the means are QMC estimates
    write_se = carry_se and want_std and out.suffix.lower() in (".h5", ".hdf5")
    se_max = 0.0

    def split(block):
        """A block's (data, std or None, mean_stderr or None); keeps the largest stderr."""
        nonlocal se_max
        parts = cluster.split_imputation(block, draws=n_draws, std=want_std, mean_stderr=carry_se)
        parts = parts if isinstance(parts, tuple) else (parts,)
        sd, se = parts[1] if want_std else None, parts[-1] if carry_se else None
        if se is not None:
            se_max = max(se_max, float(se.max(initial=0.0)))
        return parts[0], sd, se

    with cluster.open_client(address, log=say_for(quiet)) as client, \
            Progressbar("imputing rows (Dask)", quiet) as bar:
        table = cluster.impute_table(model, X, draws=n_draws, seed=seed, std=want_std, mean_stderr=carry_se,
                                     client=client, device=device)
        rounding = rounding_errors(model, X)
        if out.suffix.lower() == ".csv":
            full = cluster.compute_rows(client, table, progress=bar)
            lead[:] = full[:, :cluster.IMPUTE_LEAD]
            data, sd, _ = split(full)
            write_imputation(out, data, sd, columns, draws=n_draws is not None, std_path=std_path)
        else:
            shape = (N, D) if n_draws is None else (n_draws, N, D)
            with cluster.imputation_writer(out, shape, columns, draws=n_draws is not None,
                                           std_path=std_path, std=want_std, mean_stderr=write_se) as write:
                def put(start, stop, block):
                    lead[start:stop] = block[:, :cluster.IMPUTE_LEAD]
                    write(start, stop, *split(block))
                cluster.compute_rows(client, table, progress=bar, put=put)
    return SimpleNamespace(error_bound=lead[:, 0], n_missing=lead[:, 1].astype(np.int64),
                           mean_stderr_max=se_max if carry_se else None, rounding_error=rounding), model


def imputation_summary(res, model, n_draws, seconds, out, want_std, std_path) -> dict:
    """The summary of an imputation run from its result's per-row counts."""
    D = model.output_dim
    summary = {"rows": int(res.n_missing.size), "columns": int(D),
               "rows_with_missing": int((res.n_missing > 0).sum()), "missing_entries": int(res.n_missing.sum()),
               "rows_all_missing": int((res.n_missing == D).sum()), "draws": n_draws,
               "max_error_bound": float(res.error_bound.max(initial=0.0)),
               **_mean_stderr_summary(res, n_draws, model.latent_dim >= 4),
               "noise_std": np.asarray(model.noise_std).tolist(), "regions": model.partition().n_regions,
               **cache_status(model.partition_status), "seconds": seconds}
    if out is not None:
        summary["output"] = str(out)
        if want_std:
            summary["std_output"] = str(std_path) if std_path is not None else f"{out} (dataset 'std')"
    return summary


def _mean_stderr_summary(res, n_draws, qmc: bool) -> dict:
    """{"max_mean_qmc_stderr": ...} where the written means are QMC estimates (qmc: S >= 4;
    ``ImputeResult.mean_stderr``, or the running maximum ``mean_stderr_max`` of a --dask
    run; 0 where every one came out exact), else {} (S <= 3, or draws)."""
    top = getattr(res, "mean_stderr_max", None)
    if top is None:
        se = getattr(res, "mean_stderr", None)
        top = float(se.max()) if se is not None and se.size else 0.0
    if n_draws is not None or not (qmc or top > 0):
        return {}
    return {"max_mean_qmc_stderr": top}


def std_sibling(out: Path) -> Path:
    """out.csv -> out.std.csv, out.npy -> out.std.npy."""
    return out.with_name(out.stem + ".std" + out.suffix)


def csv_header(path, D: int) -> tuple[list, bool]:
    """The column names of DATA (D columns): a CSV's header if it has one (as ``read_data``
    decides; a blank name x<j>), else x1..xD; and whether a CSV OUT gets a header row (not
    when DATA is a CSV without one: the imputed mean and std then keep DATA's own layout)."""
    names = csv_column_names(path, D)
    header = Path(path).suffix.lower() != ".csv" or names is not None
    return [n or f"x{j + 1}" for j, n in enumerate(names or [""] * D)], header


def distinct_names(names: list) -> list:
    """The column names with each name that occurs more than once followed by its 1-based
    column number ('ash (column 3)', 'ash (column 4)'), so a dict keyed by them keeps every
    column (a header naming two columns alike lost one from rmse_per_column in silence)."""
    from collections import Counter
    count = Counter(names)
    return [f"{n} (column {j + 1})" if count[n] > 1 else n for j, n in enumerate(names)]


def write_imputation(out: Path, data: np.ndarray, std, columns, *, draws: bool, std_path=None,
                     mean_stderr=None, header: bool = True) -> None:
    """Write the imputed data (N, D) or draws (K, N, D), and the std (N, D) when given;
    mean_stderr (N, D), when given, goes to an .h5 OUT only (dataset 'mean_stderr').
    header=False: the (N, D) CSV files without a header row (the draws' long CSV keeps
    its header, whose 'draw' column is not data).

    Every file goes to a temporary file beside its target and is renamed over it only
    when all of them are complete, so a failure leaves no partial output.
    """
    from cpadgn.data import atomic_hdf5, atomic_path, write_error
    suffix = out.suffix.lower()
    columns = [str(c) for c in columns]
    try:
        if suffix in (".h5", ".hdf5"):
            with atomic_hdf5(out) as f:
                f.create_dataset("data", data=data, track_times=False).attrs["columns"] = columns
                if std is not None:
                    f.create_dataset("std", data=std, track_times=False).attrs["columns"] = columns
                if mean_stderr is not None:
                    f.create_dataset("mean_stderr", data=mean_stderr, track_times=False).attrs["columns"] = columns
            return
        with ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(out))
            if std is not None:
                _write_plain(stack.enter_context(atomic_path(std_path)), suffix, std, header and columns)
            if draws and suffix == ".csv":
                K, N, D = data.shape
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    w = csv.writer(f, lineterminator="\n")
                    w.writerow(["draw", *columns])
                    for k in range(K):
                        w.writerows([str(k + 1), *map(_fmt, row)] for row in data[k])
            else:
                _write_plain(tmp, suffix, data, header and columns)
    except OSError as e:
        raise write_error(out, e) from None


def _fmt(v) -> str:
    """Shortest text that reads back to the same float (as ``cpadgn.data`` writes CSV)."""
    return repr(float(v))


def _write_plain(path: Path, suffix: str, a: np.ndarray, columns) -> None:
    """A 2-D array as CSV (the header columns, unless falsy, then the rows) or any array as
    .npy, to ``path`` as is."""
    if suffix == ".npy":
        with open(path, "wb") as f:
            np.save(f, a, allow_pickle=False)
        return
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        if columns:
            w.writerow(columns)
        w.writerows([_fmt(v) for v in row] for row in a)
