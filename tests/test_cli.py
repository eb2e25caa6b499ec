"""The command line: outputs, the partition cache, and one clear line for every bad input."""
import json
import re
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import main
from cpadgn.modelfile import save_model
from cpadgn.partition import compute_partition

from oracles import loglik_1d, random_net


def model_and_rows(net, model, data, n, header="a,b,c"):
    """net saved to model (noise std 0.3) and n rows (n, 3) drawn from it written to the
    CSV file data under header; returns the rows."""
    save_model(model, net, noise_std=0.3)
    rng = np.random.default_rng(0)
    X = net.forward(rng.standard_normal((n, 1))) + 0.3 * rng.standard_normal((n, 3))
    np.savetxt(data, X, delimiter=",", header=header, comments="")
    return X


@pytest.fixture()
def files(tmp_path):
    net = random_net(1, (6, 6), 3, seed=2, slope=0.1, scale=2.0)
    model, data = tmp_path / "gen.h5", tmp_path / "data.csv"
    X = model_and_rows(net, model, data, 20)
    return dict(dir=tmp_path, net=net, model=model, data=data, X=X)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(res, *fragments, code=1):
    """One line "Error: ..." holding fragments, exit code (1: seen once files are read; 2: a
    usage error, seen from the command line alone, which also names COMMAND --help)."""
    assert res.exit_code == code, (res.exit_code, res.output)
    err = res.stderr.strip()
    assert err.startswith("Error:") and "\n" not in err and "Traceback" not in res.output, err
    for f in fragments:
        assert f.lower() in err.lower(), err


def test_score_writes_exact_log_likelihoods_and_reuses_the_cache(files):
    out = files["dir"] / "scores.csv"
    res = run("score", files["model"], files["data"], "-o", out, "--contamination", "0.1")
    assert res.exit_code == 0, res.output
    assert "computed" in res.stderr.lower()
    table = np.genfromtxt(out, delimiter=",", names=True)
    for n in range(3):
        want, _, _ = loglik_1d(files["net"], files["X"][n], 0.3)
        assert abs(table["log_likelihood"][n] - want) < 1e-9
    np.testing.assert_array_equal(table["anomaly_score"], -table["log_likelihood"])
    assert table["is_anomaly"].sum() == 2 and set(table["n_observed"]) == {3}
    res = run("score", files["model"], files["data"], "-o", files["dir"] / "again.csv")
    assert res.exit_code == 0 and "loaded" in res.stderr.lower()


def test_score_and_impute_warn_of_data_on_another_scale(files):
    """Test rows left unstandardised (raw load_breast_cancer under a model of z-scores)
    scored -1e7 nats per row without a word.  score and impute warn, naming the column,
    when its median row is over 10 model stds from the model's mean; the model's own
    rows (median ~0.7 std) pass in silence, and the scores are written either way."""
    d, X = files["dir"], files["X"]
    for name, data, warned in (("own", X, False), ("raw", X * [1, 1, 200] + [0, 0, 5000], True)):
        path = d / f"{name}.npy"
        np.save(path, np.where(np.arange(3) == 0, np.nan, data) if name == "raw" else data)
        for args in (["score", files["model"], path, "-o", d / f"{name}.csv"],
                     ["impute", files["model"], path, "-o", d / f"{name}_f.csv"]):
            res = run(*args)
            assert res.exit_code == 0, res.output
            assert (f"Warning: column 3 of {path} is" in res.stderr) == warned, res.stderr
            assert "standardised the same way" in res.stderr or not warned
        res = run("score", files["model"], path, "-o", d / f"{name}.csv", "-q")
        assert "Warning" not in res.stderr
    named = d / "named.csv"                      # a CSV header names the column
    np.savetxt(named, X * [1, 1, 200] + [0, 0, 5000], delimiter=",", header="a,b,income", comments="")
    res = run("score", files["model"], named, "-o", d / "named_s.csv")
    assert res.exit_code == 0 and f"Warning: column 3 ('income') of {named} is" in res.stderr, res.stderr


@pytest.mark.parametrize("suffix", [".npy", ".h5"])
def test_score_output_formats(files, suffix):
    out = files["dir"] / f"scores{suffix}"
    assert run("score", files["model"], files["data"], "-o", out, "-q").exit_code == 0
    if suffix == ".npy":
        ll = np.load(out)["log_likelihood"]
    else:
        with h5py.File(out, "r") as f:
            ll = f["log_likelihood"][:]
    assert ll.shape == (20,) and np.all(np.isfinite(ll))


def test_pandas_csv_of_three_columns_keeps_its_rows_and_header(files):
    """pd.DataFrame(X).to_csv(index=False) heads 3 columns with 0,1,2: score and impute read
    20 rows (not 21, with the header as a row), and impute writes that header back above
    its 20 rows, observed entries bit for bit."""
    import pandas as pd
    from cpadgn.data import read_data
    X = files["X"].copy()
    X[4, 1] = np.nan
    data = files["dir"] / "pd.csv"
    pd.DataFrame(X).to_csv(data, index=False)
    assert run("score", files["model"], data, "-o", files["dir"] / "s.npy", "-q").exit_code == 0
    assert np.load(files["dir"] / "s.npy").shape == (20,)
    out = files["dir"] / "filled.csv"
    assert run("impute", files["model"], data, "-o", out, "-q").exit_code == 0
    assert out.read_text().splitlines()[0] == "0,1,2"
    Y, seen = read_data(out), ~np.isnan(X)
    assert Y.shape == (20, 3) and np.isfinite(Y[4, 1])
    np.testing.assert_array_equal(Y[seen].view(np.int64), X[seen].view(np.int64))


def test_impute_of_a_csv_without_a_header_writes_none(files):
    """A headerless CSV DATA (np.savetxt's) gets its imputed mean and std back without a
    header too, so np.loadtxt reads them as it read DATA; observed entries bit for bit."""
    X = files["X"].copy()
    X[4, 1] = np.nan
    data, out = files["dir"] / "holes.csv", files["dir"] / "filled.csv"
    np.savetxt(data, X, delimiter=",")
    assert run("impute", files["model"], data, "-o", out, "--std", "-q").exit_code == 0
    Y, sd = np.loadtxt(out, delimiter=","), np.loadtxt(files["dir"] / "filled.std.csv", delimiter=",")
    seen = ~np.isnan(X)
    assert Y.shape == sd.shape == X.shape and np.isfinite(Y[4, 1]) and sd[4, 1] > 0 and (sd[seen] == 0).all()
    np.testing.assert_array_equal(Y[seen], np.loadtxt(data, delimiter=",")[seen])



def test_impute_seed_help_says_the_draws_depend_on_the_memory_budget(tmp_path):
    """`impute --help` said "same seed, same draws", but the rows per batch (set by
    --memory-budget) enter the draws too, as the README says: 20 digits rows with their
    top half hidden, seed 1, give other (equally exact) draws at budgets 2e9 and 1e8, and
    the same draws at the same budget.  The help names --memory-budget."""
    import shutil
    from pathlib import Path
    samples = Path(__file__).resolve().parents[1] / "sample_data"
    shutil.copy(samples / "digits_generator.h5", tmp_path)
    X = np.loadtxt(samples / "digits_test.csv", delimiter=",", skiprows=1)[:20]
    X[:, :32] = np.nan
    np.save(tmp_path / "holes.npy", X)
    draws = []
    for i, budget in enumerate(["2e9", "2e9", "1e8"]):
        out = tmp_path / f"d{i}.npy"
        res = run("impute", tmp_path / "digits_generator.h5", tmp_path / "holes.npy", "-o", out, "--draws", "2",
                  "--seed", "1", "--memory-budget", budget, "-q")
        assert res.exit_code == 0, res.output
        draws.append(np.load(out))
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], draws[2])
    help_text = " ".join(run("impute", "--help").output.split())
    seed_help = help_text[help_text.index("--seed INTEGER RANGE"):help_text.index("--evaluate-mcar P")]
    assert "--memory-budget" in seed_help, seed_help

def test_rows_with_every_value_missing_score_nan_and_are_counted(files):
    X = files["X"].copy()
    X[4] = np.nan
    X[5, 1] = np.nan
    data = files["dir"] / "gaps.npy"
    np.save(data, X)
    out = files["dir"] / "s.csv"
    res = run("score", files["model"], data, "-o", out, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    t = np.genfromtxt(out, delimiter=",", names=True)
    assert np.isnan(t["log_likelihood"][4]) and t["n_observed"][4] == 0 and t["n_observed"][5] == 2
    assert summary["rows_with_nothing_observed"] == 1
    assert summary["mean_log_likelihood"] == np.delete(t["log_likelihood"], 4).mean()
    want, _, _ = loglik_1d(files["net"], X[5], 0.3)
    assert abs(t["log_likelihood"][5] - want) < 1e-9


def test_partition_json_summary(files):
    res = run("partition", files["model"], "--json")
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout)
    assert s["latent_dim"] == 1 and s["prior_mass_error"] < 1e-12 and s["samples_located"] == 1.0
    assert s["regions"] == s["bounded_regions"] + s["unbounded_regions"] and s["unbounded_regions"] == 2


def test_stale_cache_is_recomputed_and_replaced(files):
    cache = files["dir"] / "shared.partition.h5"
    assert run("partition", files["model"], "--cache", cache, "-q").exit_code == 0
    other = files["dir"] / "other.h5"
    save_model(other, random_net(1, (5, 5), 3, seed=9), noise_std=0.3)
    out = files["dir"] / "s.csv"
    res = run("score", other, files["data"], "-o", out, "--cache", cache)
    assert res.exit_code == 0 and "another generator's partition" in res.stderr
    res = run("score", other, files["data"], "-o", out, "--cache", cache)
    assert "loaded" in res.stderr.lower()


REPLACED = "replaced (another generator's partition)"


def test_a_cache_of_another_model_is_replaced_with_one_notice_even_under_json(files):
    cache = files["dir"] / "mine.h5"
    assert run("partition", files["model"], "--cache", cache, "-q").exit_code == 0
    other = files["dir"] / "other.h5"
    save_model(other, random_net(1, (5, 5), 3, seed=9), noise_std=0.3)
    res = run("score", other, files["data"], "-o", files["dir"] / "s.csv", "--cache", cache, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["cache_status"] == REPLACED
    note = res.stderr.strip()
    assert note.startswith("Note:") and "\n" not in note, note
    assert str(cache) in note and "another generator's partition" in note and "replacing" in note
    # --quiet silences the notice; the status still says it
    res = run("partition", files["model"], "--cache", cache, "--json", "-q")
    assert res.exit_code == 0 and res.stderr == ""
    assert json.loads(res.stdout)["cache_status"] == REPLACED
    res = run("partition", files["model"], "--cache", cache, "--json")
    assert json.loads(res.stdout)["cache_status"] == "loaded" and res.stderr == ""


def user_data_h5(files):
    path = files["dir"] / "mydata.h5"
    with h5py.File(path, "w") as f:
        f["X"] = files["X"]
    return path


@pytest.mark.parametrize("which", ["data .h5", "data .csv", "model"])
@pytest.mark.parametrize("command", ["score", "partition", "plot"])
def test_a_cache_path_holding_another_kind_of_file_is_refused_and_left_untouched(files, which, command):
    victim = {"data .h5": user_data_h5, "data .csv": lambda f: f["data"], "model": lambda f: f["model"]}[which](files)
    before = victim.read_bytes()
    out = files["dir"] / ("map.png" if command == "plot" else "s.csv")
    args = {"score": ["score", files["model"], files["data"], "-o", out],
            "partition": ["partition", files["model"], "--json"],
            "plot": ["plot", "partition", files["model"], "-o", out]}[command]
    res = run(*args, "--cache", victim)
    assert_one_line_error(res, f"--cache {victim} is not a cpadgn partition cache", "name another path")
    assert res.stdout == "" and victim.read_bytes() == before and not out.exists()
    assert sorted(p.name for p in files["dir"].iterdir()) == sorted(
        ["gen.h5", "data.csv"] + (["mydata.h5"] if which == "data .h5" else []))


def test_wrong_dimension(files):
    data = files["dir"] / "wide.npy"
    np.save(data, np.zeros((4, 5)))
    out = files["dir"] / "s.csv"
    assert_one_line_error(run("score", files["model"], data, "-o", out), "5 columns", "3")
    assert not out.exists()


def test_inf_values(files):
    X = files["X"].copy()
    X[2, 1] = np.inf
    data = files["dir"] / "inf.npy"
    np.save(data, X)
    out = files["dir"] / "s.csv"
    assert_one_line_error(run("score", files["model"], data, "-o", out), "row 3", "inf")
    assert not out.exists()


def test_empty_file(files):
    data = files["dir"] / "empty.csv"
    data.write_text("")
    assert_one_line_error(run("score", files["model"], data, "-o", files["dir"] / "s.csv"), "empty")


@pytest.mark.parametrize("swap, words", [
    ("model as data", ["is a cpadgn model file, not data", "model then data"]),
    ("cache as data", ["is a cpadgn partition cache, not data"]),
    ("torch model as data", ["unknown data extension '.pt2'", "looks like a saved torch model", "model then data"]),
    ("one row as a 1-D array", ["1-d array of shape (3,)", "x.reshape(1, -1) for one sample"])])
def test_a_file_that_is_not_data_says_what_it_is(files, swap, words):
    """A new user's trial: MODEL and DATA swapped gave 'several 2-D datasets; choose one with
    --dataset' (a model file) or a bare 'unknown data extension' (a torch archive), and a
    1-D .npy of one row was told to reshape(-1, 1).  Each now says what the file is."""
    d, model = files["dir"], files["model"]
    data = {"model as data": model, "cache as data": d / "gen.h5.partition.h5",
            "torch model as data": d / "m.pt2", "one row as a 1-D array": d / "row.npy"}[swap]
    if swap == "cache as data":
        assert run("partition", model, "-q").exit_code == 0
    (d / "m.pt2").write_bytes(b"PK\x03\x04 a zip archive, as torch.export.save writes")
    np.save(d / "row.npy", files["X"][0])
    assert_one_line_error(run("score", model, data, "-o", d / "s.csv"), *words)
    assert not (d / "s.csv").exists()


@pytest.mark.parametrize("case", ["empty data", "header only", "blank lines only", "empty model",
                                  "model without format_version",
                                  "--row past the end", "compare one observed row", "fit one row",
                                  "fit -o .csv", "fit -S D", "compare --baseline on one row"])
def test_errors_say_what_to_do(files, case):
    """Every refusal is one line 'Error: what is wrong; what to do'."""
    d, model, data = files["dir"], files["model"], files["data"]
    out = d / "out.csv"
    args = ["score", model, d / "in.csv", "-o", out]
    if case == "empty data":
        (d / "in.csv").write_text("")
    elif case == "header only":
        (d / "in.csv").write_text("a,b,c\n")
    elif case == "blank lines only":
        (d / "in.csv").write_text("\n \n")
    elif case == "empty model":
        (d / "m.pt2").write_bytes(b"")
        args = ["score", d / "m.pt2", data, "-o", out]
    elif case == "model without format_version":
        (d / "m.h5").write_bytes(model.read_bytes())
        with h5py.File(d / "m.h5", "a") as f:
            del f.attrs["format_version"]
        args = ["score", d / "m.h5", data, "-o", out]
    elif case == "--row past the end":
        args = ["plot", "partition", model, "-o", d / "p.png", "--data", data, "--row", 20]
    elif case == "compare one observed row":
        (d / "in.csv").write_text("1,2,3\n,,\n")
        args = ["compare", model, "--data", d / "in.csv"]
    elif case == "compare --baseline on one row":
        (d / "in.csv").write_text("1,2,3\n")
        args = ["compare", model, "--data", data, "--train", d / "in.csv", "--baseline", "ppca"]
    elif case.startswith("fit"):
        (d / "in.csv").write_text("1,2,3\n")
        args = {"fit one row": ["fit", d / "in.csv", "-o", d / "m.h5", "-S", 1],
                "fit -o .csv": ["fit", data, "-o", d / "m.csv", "-S", 1],
                "fit -S D": ["fit", data, "-o", d / "m.h5", "-S", 3]}[case]
    res = run(*args, "-q")
    assert_one_line_error(res, code=2 if case == "fit -o .csv" else 1)     # an option's value alone
    assert "; " in res.stderr, res.stderr


def test_unknown_extensions(files):
    data = files["dir"] / "data.xyz"
    data.write_text("1,2,3\n")
    assert_one_line_error(run("score", files["model"], data, "-o", files["dir"] / "s.csv"), ".xyz")
    # an output's extension is wrong on the command line alone: a usage error
    assert_one_line_error(run("score", files["model"], files["data"], "-o", files["dir"] / "s.txt"), ".txt",
                          "score --help", code=2)


def test_corrupt_and_foreign_model_files(files):
    corrupt = files["dir"] / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00garbage" * 10)
    assert_one_line_error(run("score", corrupt, files["data"], "-o", files["dir"] / "s.csv"))
    foreign = files["dir"] / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    assert_one_line_error(run("partition", foreign), "not a cpadgn model")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")   # TorchScript: what users have on disk
def test_non_piecewise_affine_layer_is_named(files):
    path = files["dir"] / "tanh.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))).save(str(path))
    assert_one_line_error(run("partition", path), "tanh", "piecewise affine")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")   # TorchScript: what users have on disk
def test_missing_noise_std(files):
    path = files["dir"] / "gen.pt"
    torch.jit.script(torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))).save(str(path))
    out = files["dir"] / "s.csv"
    assert_one_line_error(run("score", path, files["data"], "-o", out), "noise")
    assert not out.exists()
    assert run("score", path, files["data"], "-o", out, "--noise-std", "0.5", "-q").exit_code == 0


@pytest.mark.parametrize("bad_std", [-1.0, 0.0, [0.3, 0.3]])
def test_unusable_noise_std_in_the_file_is_named(files, bad_std):
    """A model file whose noise std is unusable (negative, zero, wrong length) was refused as
    'stores no noise std', and compare said so only after computing the partitions of
    the models before it.  The refusal names the stored value now, before any partition."""
    model = files["dir"] / "bad_noise.h5"
    save_model(model, files["net"], noise_std=0.3)
    with h5py.File(model, "r+") as f:
        del f["noise/std"]
        f["noise/std"] = np.asarray(bad_std)
    want = "shape (2,)" if np.ndim(bad_std) else "finite and > 0"
    out = files["dir"] / "s.csv"
    assert_one_line_error(run("score", model, files["data"], "-o", out), want, "--noise-std x")
    assert not out.exists()
    res = run("compare", files["model"], model, "--data", files["data"])
    assert_one_line_error(res, want, "--noise-std x")
    assert not (files["dir"] / "gen.h5.partition.h5").exists()
    assert run("score", model, files["data"], "-o", out, "--noise-std", "0.5", "-q").exit_code == 0


@pytest.mark.parametrize("scales, want", [((1e200, 1, 1), "layer 0 weight reaches"),
                                           ((1, 1e90, 1e90), "overflow float64")])
def test_overflowing_weights_are_refused(files, scales, want):
    """Weights whose squares overflow float64 (1e200) made the partition's row norms inf (a
    RuntimeWarning on stderr) and the likelihood's Cholesky fail: an internal error (exit
    70).  They are refused when the file is read; weights that pass that check but whose
    products overflow M^T M / sigma^2 (1e90 in two layers) are refused where that is formed."""
    model = files["dir"] / "huge.h5"
    save_model(model, files["net"], noise_std=0.3)
    with h5py.File(model, "r+") as f:
        for l, scale in enumerate(scales):
            f[f"generator/weight_{l}"][...] *= scale
    out = files["dir"] / "s.csv"
    res = run("score", model, files["data"], "-o", out, "-q")
    assert_one_line_error(res, want, "retrain")
    assert not out.exists()


@pytest.mark.parametrize("case", ["fit 1e300", "compare --train 1e300", "fit constant", "fit 1e30 S=1",
                                  "fit 1e30 S=2"])
def test_training_data_ppca_cannot_fit_says_why(files, case):
    """fit and compare's PPCA baseline on degenerate training data: a 1e300 entry printed
    numpy's overflow warnings and then 'lies in a 1-dimensional subspace; use a smaller
    K', constant columns and a 1e30 outlier at S = 1 got that same advice (K is already
    1 and is not an option's name).  Each says what is wrong and what to do now."""
    d, model = files["dir"], files["model"]
    X = files["X"].copy()
    X[4, 1] = {"fit 1e300": 1e300, "compare --train 1e300": 1e300}.get(case, 1e30)
    if case == "fit constant":
        X[:] = 2.0
    train = d / "train.npy"
    np.save(train, X)
    S = "2" if case.endswith("S=2") else "1"
    if case.startswith("fit"):
        res = run("fit", train, "-o", d / "f.h5", "-S", S, "--hidden", 2, "--max-iter", 1, "--val-fraction", 0,
                  "-q")
    else:
        res = run("compare", model, "--data", files["data"], "--train", train, "--baseline", "ppca", "-q")
    want = {"fit 1e300": ["1e+300 at row 5, column 2", "rescale"],
            "compare --train 1e300": ["1e+300 at row 5, column 2", "rescale"],
            "fit constant": ["constant", "rows that vary"],
            "fit 1e30 S=1": ["at most 1 direction", "far larger"],
            "fit 1e30 S=2": ["at most 2 direction", "--latent-dim", "far larger"]}[case]
    assert_one_line_error(res, *want)
    if case == "fit 1e30 S=1":
        assert "smaller latent" not in res.stderr
    assert not (d / "f.h5").exists()


def test_standard_errors_of_log_likelihoods_near_1e160(files):
    """A row 1e80 away from the model has log p ~ -1e161, inside the accepted range
    (numerics.MAX_WHITENED_SQ) but with a square beyond float64: score wrote its output
    and then stopped with an internal error (OverflowError in the summary), compare gave
    the standard error as null.  Both now equal the exact-arithmetic (statistics.stdev)
    standard error, and LoglikStats merges chunks (as --dask adds them) to the same."""
    import statistics
    from cli.main import LoglikStats
    X = files["X"].copy()
    X[3, 2] = 1e80
    data, out = files["dir"] / "far.npy", files["dir"] / "s.csv"
    np.save(data, X)
    res = run("score", files["model"], data, "-o", out, "-q", "--json")
    assert res.exit_code == 0, res.output
    ll = np.genfromtxt(out, delimiter=",", names=True)["log_likelihood"]
    assert ll.min() < -1e160 and np.isfinite(ll).all()
    want = statistics.stdev(ll.tolist()) / np.sqrt(ll.size)         # exact rational arithmetic
    got = json.loads(res.stdout)["mean_log_likelihood_stderr"]
    assert abs(got - want) <= 1e-12 * want, (got, want)
    res = run("compare", files["model"], "--data", data, "-q", "--json")
    assert res.exit_code == 0, res.output
    assert abs(json.loads(res.stdout)["models"][0]["mean_log_likelihood_se"] - want) <= 1e-12 * want
    stats = LoglikStats(3)
    for part in (slice(0, 2), slice(2, 3), slice(3, 20)):
        n = ll[part].size
        stats.add(SimpleNamespace(log_likelihood=ll[part], n_observed=np.full(n, 3), n_pairs=np.ones(n, int),
                                  error_bound=np.zeros(n), stderr=np.zeros(n)))
    assert abs(stats.summary()["mean_log_likelihood_stderr"] - want) <= 1e-12 * want


def test_overflowing_slopes_are_refused(files):
    """fit --activation leaky_relu:1e308 printed numpy's overflow warnings before its error,
    and a model file with such a slope reached the likelihood: both are refused up front."""
    d = files["dir"]
    res = run("fit", files["data"], "-o", d / "f.h5", "-S", 1, "--hidden", 2, "--max-iter", 1,
              "--activation", "leaky_relu:1e308", "-q")
    assert_one_line_error(res, "--activation", "A <= 1e100", code=2)
    model = d / "steep.h5"
    save_model(model, files["net"], noise_std=0.3)
    with h5py.File(model, "r+") as f:
        f["generator/slope_0"][...] = 1e200
    assert_one_line_error(run("score", model, files["data"], "-o", d / "s.csv", "-q"), "layer 0 slope reaches")
    assert not (d / "f.h5").exists() and not (d / "s.csv").exists()


def test_unwritable_output(files):
    out = files["dir"] / "no_such_dir" / "s.csv"
    assert_one_line_error(run("score", files["model"], files["data"], "-o", out))
    assert not out.parent.exists()


def test_max_regions(files):
    assert_one_line_error(run("partition", files["model"], "--max-regions", "3"), "regions")


@pytest.mark.parametrize("where", ["missing directory", "file as directory", "broken link"])
@pytest.mark.parametrize("command", ["score", "partition"])
def test_a_cache_path_that_cannot_be_written_is_refused_before_any_work(files, where, command):
    """A --cache that does not exist yet will be written: a missing directory is refused
    up front (not a warning after the work).  A link to no file is written at its target,
    so a target in a missing directory is refused the same way (was: 'not an HDF5 file')."""
    blocker = files["dir"] / "a_file"
    blocker.write_text("x")
    cache, expect = {"missing directory": (files["dir"] / "nodir" / "c.h5", "directory"),
                     "file as directory": (blocker / "c.h5", f"{blocker} is not a directory"),
                     "broken link": (files["dir"] / "link.h5", "a symbolic link to")}[where]
    if where == "broken link":
        cache.symlink_to(files["dir"] / "nodir" / "target.h5")
        expect += f" {files['dir'] / 'nodir' / 'target.h5'}): directory {files['dir'] / 'nodir'} does not exist"
    out = files["dir"] / "s.csv"
    args = ["score", files["model"], files["data"], "-o", out] if command == "score" else ["partition", files["model"]]
    assert_one_line_error(run(*args, "--cache", cache), f"cannot write --cache {cache}", expect)
    assert not out.exists() and not (files["dir"] / "nodir").exists()


def test_a_cache_path_that_links_to_no_file_yet_is_written_at_the_target(files):
    target = files["dir"] / "shared" / "gen.cache"
    target.parent.mkdir()
    link = files["dir"] / "link.h5"
    link.symlink_to(target)
    res = run("partition", files["model"], "--json", "--cache", link)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["cache_status"] == "computed"
    assert link.is_symlink() and target.is_file()
    res = run("partition", files["model"], "--json", "--cache", link)
    assert json.loads(res.stdout)["cache_status"] == "loaded" and link.is_symlink()


def test_exit_codes_usage_2_bug_70(files, monkeypatch):
    res = run("score", files["model"], files["data"], "-o", files["dir"] / "s.csv", "--bogus")
    assert res.exit_code == 2 and res.stderr.strip().count("\n") == 0
    assert res.stderr.startswith("Error: No such option") and "--help" in res.stderr

    import cpadgn.data

    def broken(*a, **k):
        raise KeyError("injected")
    monkeypatch.setattr(cpadgn.data, "read_data", broken)
    res = run("score", files["model"], files["data"], "-o", files["dir"] / "s.csv")
    assert res.exit_code == 70 and res.stderr.strip().count("\n") == 0, res.output
    assert res.stderr.startswith("Error: internal error (KeyError: 'injected'); rerun with --debug")
    with pytest.raises(KeyError):       # --debug shows the traceback instead
        CliRunner().invoke(main, ["score", str(files["model"]), str(files["data"]), "-o",
                                  str(files["dir"] / "s.csv"), "--debug"], catch_exceptions=False)


def test_out_of_memory_is_a_user_error(files, monkeypatch):
    """fit --hidden 100000000 ran out of memory drawing the weights ('lower --memory-budget',
    which EM's budget check would have said before any allocation: it does now), and torch's
    failed CPU allocation (a RuntimeError, e.g. the VAE at that width) was an internal
    error (exit 70); it is the out-of-memory line now (exit 1)."""
    d = files["dir"]
    res = run("fit", files["data"], "-o", d / "f.h5", "-S", 1, "--hidden", 100000000, "--max-iter", 1, "-q")
    assert_one_line_error(res, "memory budget", "--memory-budget", "narrower")
    import cpadgn.data

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                           "allocate memory: you tried to allocate 25600000000 bytes.")
    monkeypatch.setattr(cpadgn.data, "read_data", no_memory)
    res = run("score", files["model"], files["data"], "-o", d / "s.csv")
    assert_one_line_error(res, "out of memory", "--memory-budget")
    assert not (d / "f.h5").exists() and not (d / "s.csv").exists()


def test_too_many_draws_names_draws(files):
    """impute --draws 1e13 ran out of memory with 'lower --memory-budget or use fewer rows'
    (the budget does not hold the draws); the refusal names --draws.  K N D = 6e14 values
    are beyond any address space, so the allocation fails at once."""
    out = files["dir"] / "i.csv"
    res = run("impute", files["model"], files["data"], "-o", out, "--draws", 10 ** 13, "-q")
    assert_one_line_error(res, "lower --draws")
    assert not out.exists()


@pytest.mark.parametrize("command", ["score", "impute", "fit"])
def test_negative_seed_is_a_usage_error(files, command):
    """numpy's generators take seeds >= 0: a negative --seed is a bad option value (exit 2,
    one line naming --seed), not an internal error (it was exit 70)."""
    d, model, data = files["dir"], files["model"], files["data"]
    args = {"score": ["score", model, data, "-o", d / "s.csv", "--pvalues", "--samples", 10],
            "impute": ["impute", model, data, "-o", d / "s.csv", "--draws", 2],
            "fit": ["fit", data, "-o", d / "s.h5", "-S", 1, "--hidden", 2, "--max-iter", 1]}[command]
    res = run(*args, "--seed", -1, "-q")
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("Error:") and "\n" not in err and "--seed" in err, err
    assert not (d / "s.csv").exists() and not (d / "s.h5").exists()


@pytest.mark.parametrize("command", ["score", "impute"])
def test_seed_without_anything_random_is_refused(files, command):
    """score's --seed seeds only the p-value draws, impute's only --draws, --evaluate-mcar
    and --plot: given without them it changed nothing, silently.  One line now, nothing
    written; with them it is accepted."""
    d, model, data = files["dir"], files["model"], files["data"]
    out = d / "s.csv"
    res = run(command, model, data, "-o", out, "--seed", 3, "-q")
    assert_one_line_error(res, "drop --seed", code=2)
    assert not out.exists()
    res = run(command, model, data, "-o", out, "--seed", 3, "-q",
              *(["--pvalues", "--samples", 10] if command == "score" else ["--draws", 2]))
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("option, value", [
    *((o, "nan") for o in ("--contamination", "--tol", "--val-fraction", "--init-noise", "--rtol",
                           "--var-floor", "--lr")),
    *((o, "inf") for o in ("--tol", "--init-noise", "--lr"))])      # the ranges without a maximum
def test_nan_and_inf_option_values_are_usage_errors(files, option, value):
    """click's FloatRange lets nan through (it fails no comparison), and inf where the range
    has no maximum: --contamination nan was an internal error (exit 70, np.quantile), fit's
    --tol nan silently never stopped, --val-fraction / --init-noise / --rtol / --var-floor
    nan and --init-noise inf were internal errors.  Each is a bad option value now (exit 2,
    one line naming the option), before any work."""
    d, model, data = files["dir"], files["model"], files["data"]
    args = (["score", model, data, "-o", d / "s.csv"] if option == "--contamination" else
            ["fit", data, "-o", d / "s.h5", "-S", 1, "--hidden", 2, "--max-iter", 1]
            + (["--method", "vae"] if option == "--lr" else []))
    res = run(*args, option, value, "-q")
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("Error:") and "\n" not in err and option in err and "finite" in err, err
    assert not (d / "s.csv").exists() and not (d / "s.h5").exists()


@pytest.mark.parametrize("value", ["1e300", "1e101"])
def test_init_noise_beyond_the_float64_range_is_refused(files, value):
    """--init-noise 1e300 overflowed squaring it in init_ppca (OverflowError, exit 70); a
    value above numerics.NOISE_RANGE is refused with one line naming the option."""
    d = files["dir"]
    res = run("fit", files["data"], "-o", d / "f.h5", "-S", 1, "--hidden", 2, "--max-iter", 1,
              "--init-noise", value, "-q")
    assert_one_line_error(res, "--init-noise", "e.g. 0.1", code=2)
    assert not (d / "f.h5").exists()


def test_memory_budget_reaches_the_partition_of_every_model_command(tmp_path):
    """--memory-budget is shared by partition, score and impute and bounds the enumeration
    too: a budget below what the S = 2 subdivision needs stops it with one line, before
    anything is written; a sufficient one gives the same partition."""
    model = tmp_path / "gen.h5"
    save_model(model, random_net(2, (8, 8), 3, seed=4, slope=0.1), noise_std=0.3)
    X = np.random.default_rng(1).normal(size=(4, 3))
    X[0, 1] = np.nan
    np.savetxt(tmp_path / "x.csv", X, delimiter=",")
    for argv in (["partition", model], ["score", model, tmp_path / "x.csv", "-o", tmp_path / "s.csv"],
                 ["impute", model, tmp_path / "x.csv", "-o", tmp_path / "i.csv"]):
        assert_one_line_error(run(*argv, "--memory-budget", "1e3"), "--memory-budget")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["gen.h5", "x.csv"]
    res = run("partition", model, "--memory-budget", "1e8", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["regions"] == compute_partition(random_net(2, (8, 8), 3, seed=4,
                                                                               slope=0.1)).n_regions


def test_every_help_text_has_examples():
    from cli.main import main as group
    paths = [[]] + [[c] for c in group.commands] + [["plot", c] for c in group.commands["plot"].commands]
    for args in paths:
        res = CliRunner().invoke(main, args + ["--help"])
        assert res.exit_code == 0 and "Examples:" in res.output, (args, res.output)


def test_help_and_import_cpadgn_load_no_numerics():
    """Start-up: `cpadgn --help`, `cpadgn COMMAND --help` and `import cpadgn` import neither
    numpy nor torch nor scipy (numpy alone was half of --help's CPU time); the package's
    names still resolve on first use (`cpadgn.compare` the function, its module being
    cpadgn.comparison); an HDF5 model never reaches torch.export's tracing machinery
    (torch._dynamo)."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from cli.main import main\n"
        "for args in [[]] + [[c] for c in main.commands]:\n"
        "    assert CliRunner().invoke(main, args + ['--help']).exit_code == 0, args\n"
        "import cpadgn\n"
        "print(sorted(m for m in ('numpy', 'torch', 'scipy') if m in sys.modules))\n"
        "from cpadgn.comparison import mean_and_se\n"
        "print(cpadgn.compare.__module__ == 'cpadgn.comparison', cpadgn.PiecewiseAffineNet.__name__, cpadgn.load.__name__)\n"
        "cpadgn.load('sample_data/wave_generator.h5', cache=False)\n"
        "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:3] == ["[]", "True PiecewiseAffineNet load", "False"]


@pytest.fixture(scope="module")
def s4_files(tmp_path_factory):
    """A small S = 4 model (QMC likelihoods) and three rows drawn from it, one with a missing entry."""
    from cpadgn.model import CPAModel
    tmp = tmp_path_factory.mktemp("s4")
    net = random_net(4, (6, 6), 6, seed=7, slope=0.2)
    save_model(tmp / "gen.h5", net, noise_std=0.3)
    X = CPAModel(net, noise_std=0.3, device="cpu").sample(3, seed=4)
    X[1, 2] = np.nan
    np.savetxt(tmp / "x.csv", X, delimiter=",")
    return tmp


def test_stderr_target_sets_the_s4_standard_error(s4_files, monkeypatch):
    """A loose --stderr-target 0.05 spends no second-stage points: some row keeps the first
    stage's standard error, far above what the default 1e-4 allows, and none exceeds 0.05.
    The summary counts the rows above the target (the count checked at a target of 1e-3
    on the same standard errors)."""
    import cli.main as cli_main
    targets = []
    stats_class = cli_main.LoglikStats
    monkeypatch.setattr(cli_main, "LoglikStats", lambda dim, target, qmc: targets.append(target) or stats_class(dim, target, qmc))
    out = s4_files / "scores.csv"
    res = run("score", s4_files / "gen.h5", s4_files / "x.csv", "-o", out, "--stderr-target", "0.05", "--json")
    assert res.exit_code == 0, res.output
    se = np.genfromtxt(out, delimiter=",", names=True)["log_likelihood_stderr"]
    assert np.all(se <= 0.05) and se.max() > 1e-3, se
    summary = json.loads(res.stdout)
    assert summary["max_qmc_stderr"] == se.max()                      # the CSV keeps 17 digits
    assert summary["rows_above_stderr_target"] == 0 and targets == [0.05]
    assert "above --stderr-target" not in res.stderr
    out.unlink()
    post = SimpleNamespace(n_observed=np.full(se.size, 6), n_pairs=np.ones(se.size, int), log_likelihood=np.zeros(se.size),
                           error_bound=np.zeros(se.size), stderr=se)
    assert stats_class(6, 1e-3).add(post).summary()["rows_above_stderr_target"] == (se > 1e-3).sum() >= 1


def test_s4_outputs_keep_their_stderr_fields_when_every_row_is_exact(tmp_path):
    """At S >= 4 the README and --help promise score's log_likelihood_stderr column (0
    where exact) and max_qmc_stderr, and impute's max_mean_qmc_stderr; they were dropped
    when every row came out exact (a linear generator: one region, all of R^4), so the
    outputs' fields depended on the data.  Oracle for the values: the linear Gaussian
    model is exact, so every standard error is 0."""
    from cpadgn.model import CPAModel
    net = random_net(4, (), 6, seed=1)
    save_model(tmp_path / "lin.h5", net, noise_std=0.5)
    X = CPAModel(net, noise_std=0.5, device="cpu").sample(3, seed=2)
    X[0, :2] = np.nan
    np.savetxt(tmp_path / "x.csv", X, delimiter=",")
    res = run("score", tmp_path / "lin.h5", tmp_path / "x.csv", "-o", tmp_path / "s.csv", "-q", "--json")
    assert res.exit_code == 0, res.output
    assert not np.genfromtxt(tmp_path / "s.csv", delimiter=",", names=True)["log_likelihood_stderr"].any()
    summary = json.loads(res.stdout)
    assert summary["max_qmc_stderr"] == 0 and summary["rows_above_stderr_target"] == 0
    res = run("impute", tmp_path / "lin.h5", tmp_path / "x.csv", "-o", tmp_path / "f.csv", "-q", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["max_mean_qmc_stderr"] == 0


def test_impute_reports_the_s4_mean_stderr(s4_files):
    """At S = 4 ``cpadgn impute`` shows the largest QMC standard error of the imputed means
    in its summary and, with --std, writes them to an .h5 OUT as dataset 'mean_stderr':
    the library's ``ImputeResult.mean_stderr`` (same model, data and target), 0 on
    observed entries; a CSV OUT keeps its layout (no such column or file)."""
    from cpadgn.data import read_data
    from cpadgn.model import load
    out = s4_files / "filled.h5"
    res = run("impute", s4_files / "gen.h5", s4_files / "x.csv", "-o", out, "--std", "--stderr-target", "0.02",
              "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    model = load(s4_files / "gen.h5", cache=False, device="cpu")
    model.stderr_target = 0.02
    X = read_data(s4_files / "x.csv")
    want = model.imputation(X, std=True).mean_stderr
    assert want.max() > 0 and np.all(want[~np.isnan(X)] == 0)
    assert json.loads(res.stdout)["max_mean_qmc_stderr"] == want.max()
    with h5py.File(out) as f:
        assert sorted(f) == ["data", "mean_stderr", "std"]
        np.testing.assert_array_equal(f["mean_stderr"][()], want)
    out.unlink()
    res = run("impute", s4_files / "gen.h5", s4_files / "x.csv", "-o", out, "--stderr-target", "0.02",
              "--json", "--device", "cpu")      # README, Data and outputs: only with --std
    assert res.exit_code == 0 and json.loads(res.stdout)["max_mean_qmc_stderr"] == want.max(), res.output
    with h5py.File(out) as f:
        assert sorted(f) == ["data"]
    out.unlink()
    csv_out = s4_files / "filled.csv"
    res = run("impute", s4_files / "gen.h5", s4_files / "x.csv", "-o", csv_out, "--std", "-q", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert read_data(csv_out).shape == X.shape and read_data(s4_files / "filled.std.csv").shape == X.shape
    csv_out.unlink()
    (s4_files / "filled.std.csv").unlink()


@pytest.mark.parametrize("command", ["score", "impute", "compare"])
def test_stderr_target_and_rtol_reach_every_likelihood_of_the_command(s4_files, monkeypatch, command):
    import cpadgn.likelihood
    seen, real = [], cpadgn.likelihood.posterior

    def spy(*args, rtol, stderr_target, **kw):
        seen.append((rtol, stderr_target))
        return real(*args, rtol=rtol, stderr_target=stderr_target, **kw)
    monkeypatch.setattr(cpadgn.likelihood, "posterior", spy)
    model, data, out = s4_files / "gen.h5", s4_files / "x.csv", s4_files / f"{command}.csv"
    argv = {"score": ["score", model, data, "-o", out], "impute": ["impute", model, data, "-o", out],
            "compare": ["compare", model, "--data", data]}[command]
    res = run(*argv, "--stderr-target", "0.02", "--rtol", "1e-3", "-q")
    assert res.exit_code == 0, res.output
    assert seen and set(seen) == {(1e-3, 0.02)}, seen
    out.unlink(missing_ok=True)


def test_a_looser_rtol_stays_within_its_certified_bound(files):
    """score --rtol 1e-2 prunes regions the default keeps: each row's log-likelihood then
    differs from the quadrature oracle (itself good to ~1e-12 here, as the default run's
    test shows) by no more than its reported log_likelihood_error_bound, which is at most
    log(1 + rtol); and the pruning did happen (errors far above the default's 1e-10)."""
    out = files["dir"] / "loose.csv"
    res = run("score", files["model"], files["data"], "-o", out, "--rtol", "1e-2", "-q")
    assert res.exit_code == 0, res.output
    table = np.genfromtxt(out, delimiter=",", names=True)
    want = np.array([loglik_1d(files["net"], x, 0.3)[0] for x in files["X"]])
    err, bound = np.abs(table["log_likelihood"] - want), table["log_likelihood_error_bound"]
    assert (err <= bound + 1e-9).all(), (err, bound)
    assert (bound <= np.log1p(1e-2)).all() and err.max() > 1e-6, (err, bound)


@pytest.mark.parametrize("rtol", [0, -1e-3, 1.0, 2.0, float("nan"), "1e-3", None])
def test_the_library_refuses_an_unusable_rtol(files, rtol):
    from cpadgn.errors import CpadgnError
    from cpadgn.model import CPAModel
    model = CPAModel(files["net"], noise_std=0.3)
    model.rtol = rtol
    with pytest.raises(CpadgnError, match=r"rtol must be a number in \(0, 1\)"):
        model.log_prob(files["X"])
    model.rtol = np.float32(1e-3)           # numpy's scalars are numbers too
    assert np.isfinite(model.log_prob(files["X"])).all()


@pytest.mark.parametrize("value", ["0", "-1e-3", "inf", "nan"])
def test_stderr_target_must_be_a_positive_number(files, value):
    res = run("score", files["model"], files["data"], "-o", files["dir"] / "s.csv", "--stderr-target", value)
    assert res.exit_code == 2 and "positive number of nats" in res.output, res.output
    assert not (files["dir"] / "s.csv").exists()


@pytest.mark.parametrize("data_cols, S, words, code", [
    (1, "1", ["1 column", "at least 2", "more columns"], 1),     # was "between 1 and D - 1 = 0 ... smaller"
    (2, "0", ["--latent-dim", "x>=1"], 2),        # was "... give a smaller --latent-dim"; a bad value: usage
    (2, "2", ["between 1 and D - 1 = 1", "smaller --latent-dim"], 1)])
def test_fit_latent_dim_refusals_say_what_to_do(tmp_path, data_cols, S, words, code):
    """A latent dimension fit cannot use is refused in one line whose advice fits the case:
    one-column data has no valid --latent-dim (asking for a smaller one was wrong), and
    --latent-dim 0 needs a larger one (click's range, exit 2: wrong whatever the data)."""
    data = tmp_path / "d.csv"
    np.savetxt(data, np.random.default_rng(0).standard_normal((20, data_cols)), delimiter=",")
    r = run("fit", str(data), "-o", str(tmp_path / "m.h5"), "-S", S, "--hidden", "4", "--max-iter", "1")
    assert_one_line_error(r, *words, code=code)
    assert not (tmp_path / "m.h5").exists()


def test_fit_scores_a_one_row_val_file_and_names_a_column_mismatch(files):
    """--val is only scored, so one row will do (it was refused: 'needs at least 2 rows');
    the reported val log-likelihood is that row's log p under the saved model (rescored
    from the file; both are exact to log(1 + rtol) = 1e-6 nats).  A --val file with other
    columns is refused naming both counts (it was 'fit needs at least 2 columns')."""
    import cpadgn
    d = files["dir"]
    one, narrow = d / "one.csv", d / "narrow.csv"
    np.savetxt(one, files["X"][:1], delimiter=",")
    np.savetxt(narrow, files["X"][:5, :1], delimiter=",")
    out = d / "m.h5"
    r = run("fit", files["data"], "-o", out, "-S", "1", "--hidden", "4", "--max-iter", "1", "--val", one, "--json")
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)["val_log_likelihood"]
    assert abs(rep - float(cpadgn.load(out, cache=False).log_prob(files["X"][:1])[0])) <= 2e-6 * (1 + abs(rep))
    r = run("fit", files["data"], "-o", d / "m2.h5", "-S", "1", "--hidden", "4", "--max-iter", "1", "--val", narrow)
    assert_one_line_error(r, "has 1 columns but DATA has 3", "with 3 columns")
    assert not (d / "m2.h5").exists()


def test_time_left_is_the_mean_rate_since_the_start():
    """The progress bars' time left: elapsed (total - done) / done, blank before the first
    step, with no total and once finished (rich's own estimate, from the last updates, said
    a second was left of a minute after the first of two large chunks)."""
    from cli.main import TimeLeftColumn
    task = lambda done, total, elapsed, finished=False: SimpleNamespace(
        completed=done, total=total, elapsed=elapsed, finished=finished)
    column = TimeLeftColumn()
    assert column.render(task(30, 60, 15.0)).plain == "~0:00:15 left"
    assert column.render(task(1, 3601, 1.0)).plain == "~1:00:00 left"
    for t in (task(0, 60, 15.0), task(30, None, 15.0), task(60, 60, 30.0, True), task(5, 60, None)):
        assert column.render(t).plain == ""


def test_in_process_callers_get_their_signal_handlers_back(files):
    """main() run in-process (a notebook, CliRunner) left cpadgn's SIGINT and SIGTERM
    handlers installed: the caller's next Ctrl-C, outside any command, ended its whole
    process with os._exit(130) instead of raising KeyboardInterrupt."""
    import signal
    import sys
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook)
    for args in (["partition", files["model"]], ["score", files["model"], files["data"], "-o", "/nonexistent/s.csv"]):
        run(*args)
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), sys.unraisablehook) == before


def test_progress_off_a_terminal_is_plain_lines(files, monkeypatch):
    """Off a terminal (a scheduler's log) the bar cannot redraw and rich showed nothing: a
    long run was silent.  There one plain line on stderr every PLAIN_PROGRESS_SECONDS says
    what is done of how much; none under -q, and the results are the same."""
    import cli.main as cm
    monkeypatch.setattr(cm, "PLAIN_PROGRESS_SECONDS", 0.0)
    out, quiet = files["dir"] / "s.csv", files["dir"] / "q.csv"
    res = run("score", files["model"], files["data"], "-o", out, "--memory-budget", "1")
    assert res.exit_code == 0, res.output
    lines = re.findall(r"^scoring rows: (\d+)/20 \((\d+)%\), 0:00:\d\d elapsed", res.stderr, re.M)
    done = [int(n) for n, _ in lines]
    assert len(lines) >= 2 and done == sorted(done) and done[-1] == 20, res.stderr
    assert all(int(pct) == round(100 * n / 20) for n, pct in ((int(a), b) for a, b in lines))
    res = run("score", files["model"], files["data"], "-o", quiet, "--memory-budget", "1", "-q")
    assert res.exit_code == 0 and res.stderr == "", res.stderr
    assert out.read_text() == quiet.read_text()


def test_impute_of_complete_rows_is_a_note_also_under_json(files):
    """Imputing DATA without missing entries printed an unprefixed dim line, the only
    stderr line under --json that was neither a Warning: nor a Note: (README: --json)."""
    res = run("impute", files["model"], files["data"], "-o", files["dir"] / "f.csv", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["missing_entries"] == 0, res.output
    assert res.stderr.startswith("Note: DATA has no missing entries") and len(res.stderr.splitlines()) == 1
    res = run("impute", files["model"], files["data"], "-o", files["dir"] / "g.csv", "-q")
    assert res.exit_code == 0 and res.stderr == "", res.stderr


def test_partition_help_says_its_noise_std_is_ignored():
    """partition --help said of --noise-std "'auto' fits it by maximum exact likelihood on
    the data", a command that reads no data and ignores the noise."""
    res = run("partition", "--help")
    text = " ".join(res.output.split())
    entry = text[text.index("--noise-std"):text.index("--cache")]
    assert "ignored" in entry and "fits it" not in entry, entry


@pytest.mark.parametrize("command", ["score", "impute"])
def test_json_turns_progress_off_and_keeps_notes(files, monkeypatch, command):
    """README (options shared by the commands): --json turns off the progress lines and
    messages, not the notes and warnings, which stay on stderr (here: a cache of another
    generator replaced); stdout is the JSON document alone."""
    import cli.main as cm
    monkeypatch.setattr(cm, "PLAIN_PROGRESS_SECONDS", 0.0)
    other = files["dir"] / "other.h5"
    model_and_rows(random_net(1, (4,), 3, seed=5), other, files["dir"] / "other.csv", 5)
    assert run("partition", other, "--cache", files["dir"] / "c.h5", "-q").exit_code == 0
    X = files["X"].copy()
    X[::2, 1] = np.nan                                   # something to impute
    np.savetxt(files["dir"] / "holes.csv", X, delimiter=",")
    res = run(command, files["model"], files["dir"] / "holes.csv", "-o", files["dir"] / "o.csv",
              "--memory-budget", "1", "--cache", files["dir"] / "c.h5", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"] == 20
    assert res.stderr.startswith("Note: the partition cache") and len(res.stderr.splitlines()) == 1, res.stderr


@pytest.mark.parametrize("text, want", [("2e9", 2e9), ("2GB", 2e9), ("2 gb", 2e9), ("512MiB", 512 * 2.0 ** 20),
                                        ("1.5GiB", 1.5 * 2.0 ** 30), ("3k", 3e3), ("64", 64.0)])
def test_memory_budget_takes_units(text, want):
    """--memory-budget 2GB was "'2GB' is not a valid float" (a new user's trial)."""
    from cli.main import Bytes
    assert Bytes().convert(text, None, None) == want


@pytest.mark.parametrize("text", ["abc", "0", "-1", "nan", "inf", "2XB"])
def test_memory_budget_refuses_what_is_not_a_number_of_bytes(files, text):
    res = run("partition", files["model"], "--memory-budget", text)
    assert res.exit_code == 2 and "--memory-budget" in res.stderr and "bytes" in res.stderr, res.output


def test_noise_std_auto_in_any_case(files):
    res = run("score", files["model"], files["data"], "-o", files["dir"] / "s.csv", "--noise-std", "Auto", "-q")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("command", ["score", "impute", "plot"])
def test_data_of_another_width_is_refused_by_its_file_name_before_the_partition(files, command):
    """'the data has 2 columns' did not say which file; the refusal names it and comes
    before the partition is computed (no cache written)."""
    narrow = files["dir"] / "narrow.csv"
    np.savetxt(narrow, files["X"][:5, :2], delimiter=",")
    out = files["dir"] / ("out.png" if command == "plot" else "out.csv")
    args = ["plot", "partition", files["model"], "--data", narrow, "--row", 0] if command == "plot" else [command, files["model"], narrow]
    r = run(*args, "-o", out)
    assert_one_line_error(r, f"{narrow} has 2 columns but the generator outputs 3", "pass data with 3 columns")
    assert not out.exists() and not list(files["dir"].glob("*.partition.h5"))


def test_rows_above_the_stderr_target_get_a_note(s4_files, monkeypatch):
    """Rows above --stderr-target were only counted in the summary; they now get one Note
    line.  The engine aims at 0.05 and the summary judges by 1e-3, which the first stage's
    standard errors exceed (see the test above)."""
    import cli.main as cli_main
    stats_class = cli_main.LoglikStats
    monkeypatch.setattr(cli_main, "LoglikStats", lambda dim, target, qmc: stats_class(dim, 1e-3, qmc))
    out = s4_files / "noted.csv"
    res = run("score", s4_files / "gen.h5", s4_files / "x.csv", "-o", out, "--stderr-target", "0.05", "--json")
    assert res.exit_code == 0, res.output
    se = np.genfromtxt(out, delimiter=",", names=True)["log_likelihood_stderr"]
    note = [line for line in res.stderr.splitlines() if "above --stderr-target" in line]
    assert note == [f"Note: {(se > 1e-3).sum()} of 3 row(s) ended with a QMC standard error above --stderr-target "
                    f"0.001 (largest {se.max():.2g} nats): the target is aimed at, not guaranteed; each row's "
                    "log_likelihood_stderr is in OUT (README: Limits)"]
    assert json.loads(res.stdout)["rows_above_stderr_target"] == (se > 1e-3).sum() >= 1
    assert "above --stderr-target" not in run("score", s4_files / "gen.h5", s4_files / "x.csv", "-o",
                                               s4_files / "quiet.csv", "--stderr-target", "0.05", "-q").stderr


def test_fit_of_a_linear_generator_reports_no_activation(files):
    """--hidden none fits a linear generator (PPCA by EM); its summary and file said
    'activation leaky_relu:0.1', the unused default."""
    out = files["dir"] / "lin.h5"
    r = run("fit", files["data"], "-o", out, "-S", "1", "--hidden", "none", "--max-iter", "1", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["activation"] == "none" and json.loads(r.stdout)["hidden"] == []
    with h5py.File(out, "r") as f:
        assert json.loads(f.attrs["attrs"])["activation"] == "none"


def test_raw_digits_pixels_under_the_sample_model_of_pixels_over_16_are_warned_about():
    """The digits test rows as load_digits gives them (0..16) under the sample model
    trained on pixels / 16 scored ~-7e4 nats per row without a warning (their median row
    lies 13.9 model stds away, below the first limit of 50); the rows as the model was
    trained on them (0.37) stay silent."""
    import cpadgn
    from cli.main import scale_mismatch
    from cpadgn.data import read_data
    from pathlib import Path
    samples = Path(__file__).resolve().parents[1] / "sample_data"
    model = cpadgn.load(samples / "digits_generator.h5", cache=False)
    X = read_data(samples / "digits_test.csv")
    assert scale_mismatch(model, X) is None
    assert "model stds from the model's mean" in scale_mismatch(model, 16 * X)
    # the figures README (Data and outputs) quotes; raw load_digits: 12.9, not the 13.9 it said
    assert "is 13.9 model stds" in scale_mismatch(model, 16 * X)
    digits = pytest.importorskip("sklearn.datasets").load_digits().data.astype(float)
    assert "is 12.9 model stds" in scale_mismatch(model, digits)
    vae = cpadgn.load(samples / "digits_vae.h5", cache=False)
    assert "is 88.5 model stds" in scale_mismatch(vae, digits)


def test_paths_and_column_names_with_brackets_are_printed_as_they_are(tmp_path):
    """Paths and CSV column names went through rich markup: 'runs[bold]/gen[red].h5' was
    shown as 'runs/gen.h5', and a folder 'q[/x]' ended score, impute, fit, compare and
    partition with exit 70 (MarkupError) after their output was written.  Every message
    is also one line on stderr (a long path was wrapped at 80 columns off a terminal), and
    a long output path is folded in the summary table, not cut to 'test_pat…'."""
    net = random_net(1, (4,), 3, seed=2, slope=0.1)
    d = tmp_path / "q[" / ("x]  two spaces" + "_long" * 12)
    d.mkdir(parents=True)
    model, data = d / "gen[red].h5", d / "data[bold].csv"
    model_and_rows(net, model, data, 12, header="a[m],b[/b],c")
    cases = [["partition", model],
             ["score", model, data, "-o", d / "s[i].csv"],
             ["impute", model, data, "-o", d / "i.csv", "--evaluate-mcar", "0.3", "--seed", "1"],
             ["compare", model, model, "--data", data, "--train", data, "--baseline", "ppca:1"],
             ["fit", data, "-o", d / "f[i].h5", "-S", "1", "--hidden", "3", "--max-iter", "1"]]
    for args in cases:
        res = run(*args)
        assert res.exit_code == 0, (args[0], res.output)
        out = "".join(c for c in res.stdout if c not in "│ \n")      # a long cell folds over lines
        if args[0] == "partition":
            assert "computed the partition" in res.stderr.lower() and f"{model}.partition.h5" in res.stderr
            assert all(len(line) > 60 for line in res.stderr.strip().splitlines()), res.stderr   # unwrapped
        if args[0] == "score":
            assert f"output{d}/s[i].csv".replace(" ", "") in out, res.stdout
        if args[0] == "impute":
            assert "a[m]" in out and "b[/b]" in out, res.stdout
        if args[0] == "compare":
            assert "gen[red]" in out, res.stdout


def test_contamination_flags_all_copies_of_a_row_or_none(tmp_path):
    """The least likely digits test row repeated 20 times among the 300 (seeded places):
    its copies got 2 log p values ~1e-13 nats apart (BLAS's blocking depends on a row's
    place in its batch), and --contamination 0.05, whose threshold falls on them, flagged 1
    of the 20.  Equal rows are now scored once: every copy has the same score, explanation
    and flag."""
    import shutil
    from pathlib import Path
    import cpadgn
    samples = Path(__file__).resolve().parents[1] / "sample_data"
    shutil.copy(samples / "digits_generator.h5", tmp_path)
    X = np.loadtxt(samples / "digits_test.csv", delimiter=",", skiprows=1)
    i = int(np.argmin(cpadgn.load(samples / "digits_generator.h5", cache=False).log_prob(X)))
    Y = np.insert(X, np.sort(np.random.default_rng(2).choice(301, 19, replace=True)), X[i], axis=0)
    np.save(tmp_path / "data.npy", Y)
    out = tmp_path / "s.csv"
    res = run("score", tmp_path / "digits_generator.h5", tmp_path / "data.npy", "-o", out, "--contamination", "0.05",
              "--explain", "2", "-q")
    assert res.exit_code == 0, res.output
    table = np.genfromtxt(out, delimiter=",", names=True)
    copies = table[np.all(Y == X[i], axis=1)]
    assert copies.size == 20
    for name in table.dtype.names:
        np.testing.assert_array_equal(copies[name], copies[name][0], err_msg=name)
