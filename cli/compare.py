"""``cpadgn compare``: model comparison on exact held-out log-likelihood."""
from __future__ import annotations

import csv
import inspect
import json
import math
import time
from pathlib import Path

import click
from cli.lazy import np
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from cli.main import (Progressbar, StdoutConsole, check_cache_path, check_dask_options, check_output_suffixes,
                      csv_column_names, dataset_keys, fit_noise_std, main, memory_budget_option, notice_for,
                      option_values, parse_noise, precision_options, resolve_device, rounding_errors, say_for,
                      scale_mismatch, set_precision, usage_error, user_errors, warn_rounding)
from cpadgn.errors import CpadgnError

REPORT_SUFFIXES = (".json", ".csv")


@main.command()
@click.argument("model_paths", metavar="MODEL [MODEL ...]", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.option("--data", "test_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Held-out test rows (.csv, .npy, .h5); NaN = missing.")
@click.option("--train", "train_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Training rows: adds AIC and BIC from the exact training log-likelihood, "
                   "and is what --baseline and --noise-std auto are fitted on.")
@click.option("--dataset", default=None, help="Dataset key inside the .h5 files among --data and --train (a .csv or .npy file beside them ignores it).")
@click.option("--baseline", default=None, metavar="ppca[:K]",
              help="Add probabilistic PCA fitted on --train in closed form (K defaults to the "
                   "first model's latent dimension), scored exactly.")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), default=None,
              help="Report file: .json (the same document as --json) or .csv (model rows, then "
                   "pair rows; the 'table' column says which).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Picture (.png, .pdf or .svg) of the per-row log-likelihood differences best - other "
                   "(needs matplotlib: pip install 'cpadgn[plot]').")
@click.option("--timings", is_flag=True,
              help="Put wall times in the report too (they vary between runs, so by default the "
                   "report leaves them out and identical inputs give identical files).")
@click.option("--noise-std", multiple=True, callback=lambda c, p, v: [parse_noise(x) for x in v],
              metavar="X|auto",
              help="Observation noise std (overrides the files): given once, for every model; "
                   "given once per model, in the order of the MODELs (e.g. --noise-std 0.3 "
                   "--noise-std auto).  'auto' fits that model's by maximum exact likelihood "
                   "on --train.  Not applied to the PPCA baseline, which fits its own.")
@click.option("--max-regions", type=click.IntRange(min=1), default=None,
              help="Stop with an error if a partition has more regions than this.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where the batched linear algebra runs.")
@memory_budget_option
@click.option("--trust-pickle", is_flag=True,
              help="Allow loading pickled torch modules (they can execute code).")
@precision_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bars or messages (the results are still printed).")
@click.option("--debug", is_flag=True, hidden=True)
@click.option("--dask", "dask_address", default=None, metavar="ADDRESS|local:N",
              help="Score the rows on a Dask cluster: a scheduler address (tcp://host:8786) or "
                   "local:N (N worker processes here); the data are read here and sent in row "
                   "chunks, each model once.  Needs pip install 'cpadgn[dask]'.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
@user_errors
def compare(model_paths, test_path, train_path, dataset, baseline, out, plot_path, timings, noise_std,
            max_regions, device, memory_budget, trust_pickle, rtol, stderr_target, quiet, debug, as_json,
            dask_address):
    """Compare MODELs by exact log-likelihood on held-out data.

    Per model: the mean exact log-likelihood per test row with its standard
    error, the total, the number of parameters k, the latent dimension S, the
    region count and the time; with --train, AIC = 2k - 2 LL and BIC = k log n -
    2 LL from the exact training log-likelihood; for a model file holding an
    encoder (a VAE), the exact mean ELBO and the exact gap log p(x) - ELBO(x) =
    KL(q(z|x) || p(z|x)).  For every pair: the mean per-row difference with its
    standard error and 95% interval, Vuong's z and p-value, and the model
    preferred at the 5% level (or "no significant difference").  Models are
    listed best first.  Each model's partition is cached beside it
    (MODEL.partition.h5).  With --dask the exact log-likelihoods are computed on a
    Dask cluster (the same up to rounding); ELBOs and the PPCA fit stay here.

    \b
    Examples:
      cpadgn compare sample_data/digits_generator.h5 --data sample_data/digits_test.csv \\
          --train sample_data/digits_train.csv --baseline ppca
      cpadgn compare em.h5 vae.h5 --data test.csv --train train.csv --baseline ppca:4 \\
          -o report.json --plot diffs.png
    """
    from cpadgn.comparison import check_dimensions, compare as run_compare, parse_baseline
    from cpadgn.data import check_not_an_input, read_data

    t0 = time.perf_counter()
    notice = notice_for(quiet)               # shown under --json too (on stderr), as the warnings
    warnings = not quiet
    quiet = quiet or as_json
    say = say_for(quiet)
    # the command line's own errors (exit 2), before any file is looked at
    with option_values():
        parse_baseline(baseline)
    if baseline is not None and train_path is None:
        raise usage_error("--baseline ppca is fitted on training data: pass --train TRAIN")
    noises = per_model_noise(noise_std, len(model_paths))
    check_dask_options(dask_address)
    if "auto" in noises and dask_address is not None:
        raise usage_error("--noise-std auto cannot be combined with --dask (it fits on every "
                          "training row in one process); run without --dask, or give --noise-std X")
    if "auto" in noises and train_path is None:
        raise usage_error("--noise-std auto fits the noise on training data: pass --train TRAIN "
                          "(fitting it on the test data would bias the comparison)")
    if out is not None and Path(out).suffix.lower() not in REPORT_SUFFIXES:
        raise usage_error(f"cannot write {out}: a comparison report is .json or .csv, "
                          f"not '{Path(out).suffix or '(none)'}'")
    check_output_suffixes(picture=plot_path)

    inputs = compare_inputs(model_paths, test_path, train_path)
    if out is not None:
        _check_report_path(out, inputs)
    if plot_path is not None:
        _check_plot(plot_path, inputs)
    if out is not None and plot_path is not None:
        check_not_an_input(plot_path, {"the -o report": out})
    for p in model_paths:
        check_cache_path(p, None)

    from cpadgn.model import load            # imports torch: after the quick checks
    test_key, train_key = dataset_keys(dataset, test_path, train_path)
    X_test = read_data(test_path, dataset=test_key)
    X_train = None if train_path is None else read_data(train_path, dataset=train_key)
    dev = resolve_device(device)
    models = [(str(p), load(p, noise_std=None if s == "auto" else s, trust_pickle=trust_pickle,
                            device=dev)) for p, s in zip(model_paths, noises)]
    check_dimensions({n: m.output_dim for n, m in models}, X_test, X_train,
                     names=(f"--data {test_path}", f"--train {train_path}"))
    for (name, m), noise in zip(models, noises):        # before any partition is computed
        if noise != "auto" and m.noise_std is None:
            raise CpadgnError(f"{m.no_noise_reason(name)}; pass --noise-std X, or --noise-std auto "
                              "with --train")
    for i, (name, m) in enumerate(models):
        m.memory_budget = memory_budget
        set_precision(m, rtol, stderr_target, say)
        with Progressbar(f"partition {i + 1}/{len(models)}", quiet) as bar:
            m.partition(max_regions=max_regions, progress=bar, log=say, notice=notice)
        if noises[i] == "auto":       # the partition does not depend on the noise: reused
            models[i] = (name, fit_noise_std(m, X_train, say, quiet, who=f"{name}: ", on=" on --train",
                                             label=f"noise std {i + 1}/{len(models)}"))
    for name, m in models:
        warning = scale_mismatch(m, X_test, name=f"--data {test_path}", names=csv_column_names(test_path, X_test.shape[1]))
        if warning and warnings:
            click.echo(f"Warning: {name}: {warning}", err=True)

    if dask_address is not None:
        from cpadgn import dask as cluster
        with cluster.open_client(dask_address, log=say_for(quiet)) as client, \
                Progressbar("scoring models (Dask)", quiet) as bar:
            posterior = cluster.scorer(client, device=device)
            result = run_compare(models, X_test, X_train, baseline, progress=bar, log=say,
                                 posterior=posterior)
    else:
        with Progressbar("scoring models", quiet) as bar:
            result = run_compare(models, X_test, X_train, baseline, progress=bar, log=say)
    for name, m in models:
        warn_rounding(rounding_errors(m, X_test), not warnings, name)
    report = result.to_dict(timings=timings)
    if out is not None:
        _write_report(out, report)
    if plot_path is not None:
        _plot(plot_path, result)
    if as_json:
        click.echo(_json_text(report), nl=False)
        return
    _print_tables(result)
    written = [str(p) for p in (out, plot_path) if p is not None]
    say(f"{len(result.models)} models, {result.n_test} test rows"
        + (f", {result.n_train} training rows" if result.n_train else "")
        + f"; {time.perf_counter() - t0:.2f} s" + (f"; wrote {', '.join(written)}" if written else ""))


def per_model_noise(values, n_models: int) -> list:
    """--noise-std given never, once (for all models) or once per model -> one per model
    (None: the file's own); a usage error otherwise."""
    values = list(values)
    if not values:
        return [None] * n_models
    if len(values) == 1:
        return values * n_models
    if len(values) != n_models:
        raise usage_error(f"--noise-std is given {len(values)} times for {n_models} models; give "
                          "it once (for all models) or once per model, in the order of the models")
    return values


# ===================================================================== output
def _json_text(report: dict) -> str:
    return json.dumps(report, indent=2, allow_nan=False) + "\n"


def compare_inputs(model_paths, test_path, train_path) -> dict:
    """The files compare reads, by role (each model and its partition cache), which no
    output may replace."""
    from cpadgn.cache import cache_path_for
    inputs = {"the --data file": test_path, "the --train file": train_path}
    for i, p in enumerate(model_paths):
        inputs[f"model {i + 1}"] = p
        inputs[f"the partition cache of model {i + 1}"] = cache_path_for(p)
    return inputs


def _check_report_path(out, inputs):
    """The report path can be written and is no input (its extension checked before)."""
    from cpadgn.data import check_output_path
    check_output_path(out, inputs=inputs, suffixes=REPORT_SUFFIXES)


def _check_plot(path, inputs):
    """matplotlib installed, a .png/.pdf/.svg path that can be written and is no input (one line)."""
    from cpadgn.plot import check_image_path
    check_image_path(path, inputs=inputs)


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _write_report(out, report: dict):
    """.json: the --json document.  .csv: one header (table, then the model fields, then
    the pair fields), model rows (table=model) then pair rows (table=pair)."""
    from cpadgn.data import atomic_path, write_error
    out = Path(out)
    try:
        with atomic_path(out) as tmp:
            if out.suffix.lower() == ".json":
                tmp.write_text(_json_text(report), encoding="utf-8")
                return
            cols = ["table"]
            for r in report["models"] + report["pairs"]:
                cols += [k for k in r if k not in cols]
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f, lineterminator="\n")
                w.writerow(cols)
                for table, rows in (("model", report["models"]), ("pair", report["pairs"])):
                    for r in rows:
                        w.writerow([table if c == "table" else _csv_cell(r.get(c)) for c in cols])
    except OSError as e:
        raise write_error(out, e) from None


def _num(v, fmt=".1f"):
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _pvalue(p):
    return "< 1e-300" if p < 1e-300 else f"{p:.2g}"


def _table(title, columns, rows, note=None):
    """A compact rich table: numeric columns keep their full width (never truncated);
    the text columns (names, the verdict) wrap when the terminal is narrow.  The note goes
    below it as a line of its own (a rich caption would wrap at the table's width)."""
    from rich import box
    from rich.console import Group
    from rich.text import Text
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True, padding=0)
    for j, name in enumerate(columns):
        text = name in ("model", "A", "B")                   # may wrap
        left = text or name in ("kind", "better")
        width = max([len(name)] + [len(_plain(r[j])) for r in rows])
        t.add_column(name, justify="left" if left else "right", no_wrap=not text,
                     min_width=min(width, 8) if text else width, overflow="fold")
    for r in rows:
        t.add_row(*r)
    return Group(Text(""), Text(title, style="bold"), t, *([Text(note)] if note else []))


def _plain(cell: str) -> str:
    from rich.text import Text
    return Text.from_markup(cell).plain


def _decimals(se) -> int:
    """Decimals that show a standard error to two significant digits (0..6)."""
    if se is None or not se > 0 or not math.isfinite(se):
        return 4
    return int(min(6, max(0, 1 - math.floor(math.log10(se)))))


def _fix(v, d):
    return "-" if v is None else f"{v:.{d}f}"


def _print_tables(result):
    """The per-model table (best first), training fit, ELBO and pairwise tables, then the
    result's notes (a part of the result, as in the --json report: on stdout, also under
    --quiet)."""
    out = StdoutConsole()
    _print_model_tables(out, result)
    for note in result.notes:
        out.print(Text.assemble(("note:", "yellow"), f" {' '.join(note.split())}"), soft_wrap=True)


def _print_model_tables(out, result):
    short = {m.name: escape(s) for m, s in zip(result.models, _short_names([m.name for m in result.models]))}
    rows = []
    for m in result.models:
        d = _decimals(m.mean_log_likelihood_se)
        rows.append([short[m.name], m.kind, _fix(m.mean_log_likelihood, d),
                     _fix(m.mean_log_likelihood_se, d), f"{m.total_log_likelihood:.1f}",
                     f"{m.n_parameters:,}", str(m.latent_dim), f"{m.n_regions:,}", f"{m.seconds:.2f}"])
    out.print(_table(f"Exact held-out log-likelihood per row (nats), {result.n_test} test rows, "
                     "best first",
                     ["model", "kind", "mean log p", "SE", "total", "k", "S", "regions", "sec"], rows))
    if result.n_train is not None:
        rows = [[short[m.name], _num(m.train_log_likelihood), _num(m.aic), _num(m.bic)]
                for m in result.models]
        out.print(_table(f"Training fit ({result.n_train} rows): AIC = 2k - 2 LL, BIC = k log n - 2 LL",
                         ["model", "train LL", "AIC", "BIC"], rows))
    rows = []
    for m in result.models:
        if m.mean_elbo is not None:
            d1, d2 = _decimals(m.mean_elbo_se), _decimals(m.mean_gap_se)
            rows.append([short[m.name], _fix(m.mean_elbo, d1), _fix(m.mean_elbo_se, d1),
                         _fix(m.mean_gap, d2), _fix(m.mean_gap_se, d2),
                         f"{m.max_elbo_error_bound:.1e}"])
    if rows:
        out.print(_table("Exact ELBO and gap = log p - ELBO = KL(q(z|x) || p(z|x)) per row (nats)",
                         ["model", "mean ELBO", "SE", "mean gap", "SE", "bound"], rows))
    if not result.pairs:
        return
    rows = []
    for r in result.pairs:
        d = _decimals(r.se)
        pref = ("[bold]A[/bold]" if r.preferred == r.model_a else "[bold]B[/bold]" if r.preferred == r.model_b
                else "[dim]n.s.[/dim]")
        rows.append([short[r.model_a], short[r.model_b], _fix(r.mean_difference, d), _fix(r.se, d),
                     f"[{_fix(r.ci_low, d)}, {_fix(r.ci_high, d)}]", f"{r.vuong_z:.2f}",
                     _pvalue(r.p_value), pref])
    rows = [[c.replace("[", "\\[") if j == 4 else c for j, c in enumerate(r)] for r in rows]
    out.print(_table("Pairwise: d = log p_A(x) - log p_B(x) per test row; Vuong's test, 5% level",
                     ["A", "B", "mean d", "SE", "95% interval", "z", "p", "better"], rows,
                     note="better: preferred at the 5% level (n.s.: no significant difference)"))


def _short_names(names):
    """File names without their directories, and without their suffix where every model
    file has the same one, when that keeps them distinct (baselines such as ppca:2 keep
    their names)."""
    short = [Path(n).name for n in names]
    if len(set(short)) < len(short):
        return list(names)
    files = [n for n in short if ":" not in n]
    suffixes = {Path(n).suffix for n in files}
    if len(suffixes) == 1 and "" not in suffixes:
        bare = [n if ":" in n else Path(n).stem for n in short]
        if len(set(bare)) == len(bare):
            return bare
    return short


def _plot(path, result):
    """Box plots of d_n = log p_best(x_n) - log p_other(x_n), one per other model, with the
    mean and its 95% interval; a single model gets the histogram of its log p(x_n)."""
    from cpadgn.plot import new_figure, save

    names = [m.name for m in result.models]
    label = dict(zip(names, _short_names(names)))
    best, others = names[0], names[1:]
    fig = new_figure((960, round(120 * (1.6 + 0.7 * max(len(others), 1)))), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    if others:
        diffs = [result.log_likelihoods[best] - result.log_likelihoods[o] for o in others]
        # matplotlib 3.10 renamed vert=False to orientation="horizontal"
        horizontal = ({"orientation": "horizontal"} if "orientation" in inspect.signature(ax.boxplot).parameters
                      else {"vert": False})
        ax.boxplot(diffs, showfliers=True, flierprops={"markersize": 2}, **horizontal)
        for i, o in enumerate(others, 1):
            pr = result.pair(best, o)
            ax.errorbar([pr.mean_difference], [i], xerr=[[pr.mean_difference - pr.ci_low],
                                                          [pr.ci_high - pr.mean_difference]],
                        fmt="o", color="C3", capsize=4, label="mean, 95% interval" if i == 1 else None)
        ax.axvline(0.0, color="k", lw=0.8, ls="--")
        if max(float(np.abs(d).max()) for d in diffs) > 100:
            ax.set_xscale("symlog", linthresh=1.0)
        ax.set_yticks(range(1, len(others) + 1), [f"{label[best]} − {label[o]}" for o in others])
        ax.set_xlabel(f"log p(x) of {label[best]} minus the other's, per test row (nats; > 0 favours "
                      f"{label[best]})")
        ax.legend(loc="best", fontsize=8)
    else:
        ax.hist(result.log_likelihoods[best], bins=40)
        ax.set_xlabel(f"log p(x) per test row (nats), {label[best]}")
        ax.set_ylabel("test rows")
    against = " against the others" if others else ""
    ax.set_title(f"Exact held-out log-likelihood: {label[best]}{against} ({result.n_test} rows)", fontsize=10)
    save(fig, path)
