"""``cpadgn fit``: train a generator by exact, gradient-free EM (or the VAE baseline)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
from cli.lazy import np

from cli.main import (Bytes, FiniteRange, Progressbar, dataset_keys, main, on_command_line, option_values,
                      print_summary, resolve_device, usage_error, user_errors)
from cpadgn.errors import CpadgnError


@main.command()
@click.argument("data_path", metavar="DATA", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Model file to write (.h5): weights, prior, noise, options, training history.")
@click.option("--latent-dim", "-S", "latent_dim", type=click.IntRange(min=1), default=None,
              help="Latent dimension S (1 to 3 keeps the partition cheap); required unless --init MODEL.")
@click.option("--hidden", default="32,32", show_default=True,
              help="Hidden layer widths, comma-separated; 'none' for a linear generator (PPCA).")
@click.option("--activation", default="leaky_relu:0.1", show_default=True,
              help="leaky_relu:A, relu or abs.")
@click.option("--method", type=click.Choice(["em", "vae"]), default="em", show_default=True,
              help="em: exact, monotone, gradient-free EM; vae: Adam on the ELBO (baseline).")
@click.option("--max-iter", type=click.IntRange(min=0), default=None,
              help="EM iterations [default: 100] or VAE epochs [default: 300].")
@click.option("--tol", type=FiniteRange(min=0), default=1e-5, show_default=True,
              help="EM stops when the relative change of the mean training log-likelihood "
                   "is below this.")
@click.option("--val-fraction", type=FiniteRange(0, 1, max_open=True), default=None,
              help="Fraction of DATA held out (seeded) for the exact validation "
                   "log-likelihood [default: 0.1, 0 for none].")
@click.option("--val", "val_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Validation rows from a file instead of --val-fraction.")
@click.option("--dataset", default=None,
              help="Dataset key inside the .h5 files among DATA and --val (a .csv or .npy file beside them "
                   "ignores it).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Seeds the initialisation and the validation split (and the VAE).")
@click.option("--noise", type=click.Choice(["iso", "diag"]), default=None,
              help="Observation noise: sigma^2 I or diag(sigma_d^2) [default: iso; with --init MODEL "
                   "the kind of the model's noise].")
@click.option("--init", default="ppca", show_default=True, metavar="ppca|random|MODEL",
              help="EM start: the PPCA solution embedded in the network, seeded random weights, or a "
                   "generator file to refine (cpadgn .h5, torch.export .pt2, TorchScript, a pickle with "
                   "--trust-pickle): EM keeps its architecture and starts from its weights, prior and "
                   "noise (none stored: the maximum-likelihood noise std on the training rows).")
@click.option("--init-noise", type=FiniteRange(min=0, min_open=True), default=None,
              help="EM: initial noise std as a fraction of the start's own (PPCA's; the data's for "
                   "random; the model's for --init MODEL) [default: 0.1; 1 with --init MODEL].  1 "
                   "starts at the PPCA likelihood; a small value starts with sharp posteriors and "
                   "leaves the PPCA plateau faster.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow --init to load a pickled torch module (it can execute code).")
@click.option("--memory-budget", type=Bytes(), default=2e9, show_default=True, metavar="BYTES",
              help="Memory the batched work may hold at once (EM's E-step, at most 5e8 of it; the "
                   "exact likelihoods; the M-step); beyond it EM keeps each (row, region) pair's "
                   "posterior moments, 8 (3 + S + S^2) bytes a pair.  A generator whose M-step needs "
                   "more (wide hidden layers, e.g. folded convolutions) is refused before the step.")
@click.option("--sweeps", type=click.IntRange(min=1), default=1, show_default=True,
              help="EM: passes over the layers per M-step.")
@click.option("--rtol", type=FiniteRange(min=0, min_open=True, max=1e-2), default=1e-6,
              show_default=True,
              help="EM: E-step pruning tolerance; log-likelihoods are exact to log(1 + rtol) per row.")
@click.option("--var-floor", type=FiniteRange(min=0, max=1), default=1e-6, show_default=True,
              help="EM: lower bound on each noise variance, as a fraction of the training data's mean "
                   "column variance.  With --noise diag, raise it (e.g. 0.01) when some columns are "
                   "nearly constant: maximum likelihood shrinks their variance and held-out rows pay.")
@click.option("--lr", type=FiniteRange(min=0, min_open=True), default=1e-3, show_default=True,
              help="VAE: Adam learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
              help="VAE: minibatch size.")
@click.option("--eval-every", type=click.IntRange(min=1), default=10, show_default=True,
              help="VAE: epochs between exact validation log-likelihoods.")
@click.option("--max-regions", type=click.IntRange(min=1), default=None,
              help="EM: a start whose partition has more regions than this is refused, and a step "
                   "whose new partition has more is rejected (as one that lowers the likelihood), so "
                   "the model stays within it.  VAE: an error at the first exact evaluation with more.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True, help="Where the batched linear algebra runs.")
@click.option("--timings", is_flag=True,
              help="Store per-iteration wall times in the history (they vary between runs, so "
                   "by default they are left out and the same inputs give identical files).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or messages (the results are still printed).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--debug", is_flag=True, hidden=True)
@user_errors
def fit(data_path, out, latent_dim, hidden, activation, method, max_iter, tol, val_fraction, val_path,
        dataset, seed, noise, init, init_noise, trust_pickle, memory_budget, sweeps, rtol, var_floor, lr,
        batch_size, eval_every, max_regions, device, timings, quiet, as_json, debug):
    """Train a piecewise-affine generator on DATA and write a cpadgn model file.

    --method em (default) is the analytical EM of Balestriero et al. (2020): the
    E-step is the exact posterior of every row over the linear regions, the
    M-step solves each layer's least-squares normal equations in closed form with
    the regions held fixed, then the noise.  Every step is checked on the exact
    log-likelihood of the new partition: an over-relaxed step is tried first,
    then the plain one and halvings (eta = 1/2, 1/4, 1/8), then the output layer
    and noise alone (a true EM step: the partition does not move), so the
    training log-likelihood never decreases.  EM starts from the PPCA solution
    embedded in the network, with the noise at --init-noise times PPCA's.

    --init MODEL refines a generator trained elsewhere (e.g. a VAE's decoder
    exported with torch.export): EM keeps its architecture as cpadgn folds it
    (layer widths and activation slopes; a convolution or skip connection becomes
    a dense layer, whose weights EM then updates freely), starts from its
    weights, prior (folded into the first layer) and noise std (or, when the file
    has none, the maximum-likelihood std on the training rows), and writes a
    cpadgn model file.  --latent-dim, --hidden and --activation come from MODEL.

    --method vae trains the same decoder as a VAE (Adam on the ELBO, learned
    noise) and keeps its encoder, for comparison on exact held-out likelihood
    (cpadgn compare).

    The model file holds the weights, the prior N(0, I), the noise std, the
    options (JSON attrs) and the history in /training: per iteration the exact
    mean train and validation log-likelihood per row, the noise std and the
    region count.  Same data and seed give a byte-identical file.  Standardise the
    columns first if their scales differ.  Ctrl-C writes nothing (the iterations done
    are lost): train a long run in stages, --max-iter N, then --init the file written
    with the same --seed, --val-fraction, --var-floor and --rtol (not read from it).

    Missing values (NaN, or empty CSV cells) are fitted exactly by EM: the E-step is
    the exact posterior given each row's observed entries, the missing entries are
    latent variables, and the exact log-likelihood of the observed entries never
    decreases (the initialisation fills them with column means).  --method vae needs
    complete rows.

    \b
    Examples:
      cpadgn fit sample_data/wave.csv -o wave_em.h5 --latent-dim 1 --hidden 16,16
      cpadgn fit sample_data/digits_train.csv -o digits_em.h5 -S 2 --hidden 32,32 --max-iter 50
      cpadgn fit sample_data/digits_train.csv -o digits_vae.h5 -S 2 --method vae --lr 3e-4
      cpadgn fit sample_data/digits_train.csv -o refined.h5 --init decoder.pt2 --max-iter 10
      cpadgn compare digits_em.h5 digits_vae.h5 --data sample_data/digits_test.csv
    """
    from cpadgn.cache import cache_path_for
    from cpadgn.data import check_output_path
    from cpadgn.fit import (check_model_suffix, check_training_data, data_fingerprint, fit_em, fit_vae,
                            parse_activation, parse_hidden, save_fit, split_validation)
    from cpadgn.numerics import NOISE_RANGE
    t0 = time.perf_counter()
    init_model, init_path = init not in ("ppca", "random"), init
    check_init_options(init, method, latent_dim)
    with option_values():               # the command line's own errors (exit 2) before any file's
        out = check_model_suffix(out)
        hidden_sizes = parse_hidden(hidden)
        slope = parse_activation(activation)
    check_method_options(method, linear=not init_model and not hidden_sizes)
    if val_path is not None and val_fraction not in (None, 0):
        raise usage_error("give either --val or --val-fraction, not both")
    if init_noise is not None and init_noise > NOISE_RANGE[1]:      # as fit_em refuses it, after the data
        raise usage_error(f"--init-noise {init_noise:g} is above {NOISE_RANGE[1]:g}; it is a fraction of the "
                          "start's noise std: use e.g. 0.1 or 1")
    check_output_path(out, inputs={"the DATA file": data_path, "the --val file": val_path,
                                   "the --init model": init if init_model else None,
                                   "the partition cache of the --init model":
                                       cache_path_for(init) if init_model else None})
    # one line on stderr unless --quiet, also under --json (whose stdout stays JSON), as every command warns
    say = (lambda m: None) if quiet else (lambda m: click.echo(f"Warning: {' '.join(m.split())}", err=True))
    dev = resolve_device(device)
    data_key, val_key = dataset_keys(dataset, data_path, val_path)
    raw = read_rows(data_path, data_key, "DATA")
    if init_model:
        from cpadgn.fit import check_init_dimensions
        from cpadgn.model import load
        init = load(init, cache=False, trust_pickle=trust_pickle, device=dev)
        check_init_dimensions(init, raw.shape[1] if raw.ndim == 2 else raw.shape, latent_dim)
        latent_dim, hidden_sizes = init.latent_dim, init.net.hidden_sizes
    X = check_training_data(raw, latent_dim, f"data {data_path}", allow_missing=method == "em")
    if not 1 <= latent_dim <= 3:
        say(f"--latent-dim {latent_dim}: region counts grow like "
            f"(hidden units)^S and region masses need quasi-Monte Carlo for S >= 4; expect slow, "
            f"approximate iterations (1 to 3 is the practical range)")
    kind = noise or ("diag" if init_model and np.ndim(init.noise_std) == 1 else "iso")
    warning = scale_warning(X, data_path) if kind == "iso" else None
    if warning:
        say(warning)
    if val_path is not None:
        X_train = X
        X_val = read_rows(val_path, val_key, "--val")
        if X_val.ndim == 2 and X_val.shape[1] != X.shape[1]:
            raise CpadgnError(f"--val {val_path} has {X_val.shape[1]} columns but DATA has {X.shape[1]}; "
                              f"pass validation rows with {X.shape[1]} columns")
        X_val = check_training_data(X_val, latent_dim, f"data {val_path}", allow_missing=method == "em",
                                    validation=True)
    else:
        X_train, X_val = split_validation(X, 0.1 if val_fraction is None else val_fraction, seed)
    label = "EM" if method == "em" else "VAE"
    n_iter = max_iter if max_iter is not None else 100 if method == "em" else 300      # EM iterations, VAE epochs
    if method == "vae":
        warning = vae_steps_warning(X_train.shape[0], batch_size, n_iter)
        if warning:
            say(warning)
    with Progressbar(f"fit ({label})", quiet or as_json) as bar:
        if method == "em":

            def progress(row):
                v = row["val_loglik"]
                bar(row["iteration"], n_iter,
                    f"LL {row['train_loglik']:.4f}" + (f" val {v:.4f}" if np.isfinite(v) else "")
                    + f" | {row['n_regions']:,} regions")

            res = fit_em(X_train, latent_dim, hidden_sizes, slope, n_iter, tol, X_val, seed, noise,
                         progress, init=init, init_noise=init_noise, sweeps=sweeps, rtol=rtol,
                         device=dev, max_regions=max_regions, timings=timings, memory_budget=memory_budget,
                         var_floor=var_floor * max(float(np.nanvar(X_train, 0).mean()), 1e-300))
        else:
            last = {"val": np.nan}

            def progress(row):
                if np.isfinite(row["val_loglik"]):
                    last["val"] = row["val_loglik"]
                v = last["val"]
                bar(row["epoch"], n_iter, f"ELBO {row['train_elbo']:.4f}"
                    + (f" val LL {v:.4f}" if np.isfinite(v) else ""))

            res = fit_vae(X_train, latent_dim, hidden_sizes, slope, n_iter, X_val, seed, noise or "iso", progress,
                          lr=lr, batch_size=batch_size, eval_every=eval_every, device=dev,
                          max_regions=max_regions, timings=timings, memory_budget=memory_budget)
    if init_model or not hidden_sizes:          # a linear generator has no activation
        from cpadgn.modelfile import activation_name
        activation = ",".join(activation_name(a) for a in res.net.slopes) or "none"
    provenance = {"data": Path(data_path).name, "data_sha256": data_fingerprint(X_train),
                  "n_train": int(X_train.shape[0]), "n_val": 0 if X_val is None else int(X_val.shape[0]),
                  "activation": activation, "val_source": "file" if val_path is not None else "fraction"}
    if init_model:
        provenance["init_model"] = Path(init_path).name
    save_fit(out, res, attrs=provenance)
    h = res.history
    if res.stop_reason == "memory_budget":
        k = int(h["iteration"][-1])
        say(f"EM stopped after iteration {k}: the data now reach more regions and "
            f"the next M-step would exceed --memory-budget {memory_budget:g}; {out} holds iteration {k}; to go "
            f"on, fit again with --init {out}, another -o and a larger --memory-budget")
    summary = {"output": str(out), "method": method, "latent_dim": latent_dim,
               "hidden": list(hidden_sizes), "activation": activation, "noise": res.options["noise"],
               "train_rows": provenance["n_train"], "val_rows": provenance["n_val"],
               "iterations": int(h["iteration"][-1] if method == "em" else h["epoch"][-1]),
               "stop_reason": res.stop_reason,
               "train_log_likelihood": res.train_loglik, "val_log_likelihood": res.val_loglik,
               "regions": res.n_regions,
               "noise_std": float(res.noise_std) if np.ndim(res.noise_std) == 0 else np.asarray(res.noise_std).tolist(),
               "seconds": time.perf_counter() - t0}
    if method == "em":
        summary["init"] = init_path if init_model else init
        summary["initial_train_log_likelihood"] = float(h["train_loglik"][0])
        summary["initial_noise_std"] = float(h["noise_std"][0])
        summary["rejected_trials"] = int(h["rejected"][1:].sum())
        summary["fallback_steps"] = int(h["fallback"][1:].sum())
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        print_summary(f"cpadgn fit ({label})", summary)


def read_rows(path, dataset, what: str):
    """The rows of a data file (``data.read_data``).  A generator file given as DATA or
    --val is refused with fit's own hint: refining a model takes it as --init (the
    generic hint, 'the order is MODEL then DATA, e.g. cpadgn score ...', names another
    command)."""
    from cpadgn.data import GeneratorAsData, read_data
    try:
        return read_data(path, dataset=dataset)
    except GeneratorAsData:
        raise CpadgnError(f"{what} {path} is a generator file, not data; fit trains on rows of data: to refine "
                          f"this generator, pass it as --init {path} with the training rows as DATA") from None


def scale_warning(X, data_path) -> str | None:
    """The warning for columns on different scales, or None: one isotropic noise std fits the
    column whose std is over 10x the median column's and treats the others as noise (raw
    load_wine: proline's std is 390x the median; standardised data and the digits stay below 2)."""
    from cli.impute import csv_header
    std = np.nanstd(X, axis=0)
    j, median = int(np.argmax(std)), float(np.median(std))
    if not std[j] > 10 * median:
        return None
    name = csv_header(data_path, X.shape[1])[0][j]
    ratio = f"{std[j] / median:.0f}x" if median > 0 else "far above"
    return (f"column {j + 1} ({name}) has std {std[j]:.3g}, {ratio} the median column's ({median:.3g}): "
            "one isotropic noise std will fit it and treat the smaller columns as noise; standardise "
            "the columns first (z-scores), or use --noise diag")


def vae_steps_warning(n_rows: int, batch_size: int, epochs: int, min_steps: int = 1000) -> str | None:
    """The warning for a VAE given under min_steps Adam steps, or None: an epoch is
    ceil(n_rows / batch_size) steps, so a small table gets few (126 wine rows at the default
    batch of 128: 300 steps in 300 epochs, exact log-likelihood -212 per row; -33 with
    --batch-size 16, 2,400 steps), and compare then measures the training budget, not the VAE."""
    per_epoch = -(-n_rows // batch_size)
    if per_epoch * epochs >= min_steps:
        return None
    return (f"--method vae: {n_rows} training rows at --batch-size {batch_size} make {per_epoch} Adam "
            f"step(s) per epoch, {per_epoch * epochs} in {epochs} epochs, likely far from converged; lower "
            f"--batch-size or raise --max-iter for {min_steps:,} steps or more")


EM_ONLY = ("init", "tol", "init_noise", "sweeps", "rtol", "var_floor")
VAE_ONLY = ("lr", "batch_size", "eval_every")


def check_method_options(method, linear: bool) -> None:
    """Usage errors for options the run would ignore: EM's with --method vae, the VAE's
    with --method em, --activation for a linear generator (--hidden none)."""
    other, label = (VAE_ONLY, "vae") if method == "em" else (EM_ONLY, "em")
    for name in other:
        if on_command_line(name):
            flag = "--" + name.replace("_", "-")
            raise usage_error(f"{flag} is an option of --method {label} and --method {method} ignores it; "
                              f"drop it or use --method {label}")
    if linear and on_command_line("activation"):
        raise usage_error("--activation does not apply to a linear generator (--hidden none); drop it")


def check_init_options(init, method, latent_dim) -> None:
    """Usage errors of --init: a MODEL must exist, is EM's start (not the VAE's), and
    brings its own --hidden and --activation; without one, --latent-dim is required and
    --trust-pickle (which only lets --init load a pickled module) has nothing to load."""
    ctx = click.get_current_context()
    if init in ("ppca", "random"):
        if latent_dim is None:
            raise usage_error("Missing option '--latent-dim' / '-S' (or give --init MODEL)")
        if on_command_line("trust_pickle"):
            raise usage_error("--trust-pickle lets --init MODEL load a pickled torch module, and there is "
                              "no --init MODEL; drop --trust-pickle or give --init MODEL")
        return
    if not Path(init).is_file():
        raise click.BadParameter(f"{init!r} is neither ppca, random nor an existing model file",
                                 ctx, param_hint="'--init'")
    if method != "em":
        raise usage_error("--init MODEL is a start for EM; --method vae trains from scratch")
    for name in ("hidden", "activation"):
        if on_command_line(name):
            raise usage_error(f"--{name} comes from the --init model; drop it")
