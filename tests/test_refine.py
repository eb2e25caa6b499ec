"""EM started from a generator trained elsewhere (``cpadgn fit --init MODEL``,
``fit_em(init=model)``): its first log-likelihood is the init model's exact one (against
quadrature written from scratch, with the model's own prior, and against ``cpadgn score``),
EM never lowers it, and what cannot be refined is refused in one line."""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import main
from cpadgn.modelfile import save_model
from oracles import GL_W, GL_X, line_breakpoints

WAVE = np.loadtxt("sample_data/wave.csv", delimiter=",", skiprows=1)[:150]


def quadrature_loglik_1d(forward, preact, X, noise_std, prior_mean=0.0, prior_std=1.0, width=15.0):
    """Mean over the rows X (N, D) of log p(x) = log int N(x; g(z), sigma^2 I) N(z; m, s^2) dz
    for S = 1: 60-point Gauss-Legendre on every piece between the breakpoints of g and a
    grid of spacing s / 60 over m +- 15 s (the prior mass outside is below 1e-50); no
    cpadgn code except ``forward`` (t (n,) -> (n, D)) and the pre-activations ``preact``."""
    lo, hi = prior_mean - width * prior_std, prior_mean + width * prior_std
    edges = np.union1d(line_breakpoints(preact, lo, hi), np.linspace(lo, hi, 1801))
    a, b = edges[:-1, None], edges[1:, None]
    t = (0.5 * (b - a) * GL_X + 0.5 * (a + b)).ravel()
    log_w = np.log((0.5 * (b - a) * GL_W).ravel()) - 0.5 * ((t - prior_mean) / prior_std) ** 2 \
        - 0.5 * np.log(2 * np.pi * prior_std ** 2)
    G = forward(t)                                                       # (n, D)
    var = float(noise_std) ** 2
    sq = (X * X).sum(1)[:, None] - 2 * X @ G.T + (G * G).sum(1)[None]    # (N, n)
    lf = log_w[None] - 0.5 * sq / var - 0.5 * X.shape[1] * np.log(2 * np.pi * var)
    m = lf.max(1, keepdims=True)
    return float(np.mean(m[:, 0] + np.log(np.exp(lf - m).sum(1))))


def run(args):
    res = CliRunner().invoke(main, args)
    return res.exit_code, res.output, res.stderr if hasattr(res, "stderr") else res.output


def fit_json(args):
    code, out, _ = run(["fit", *args, "--json", "-q"])
    assert code == 0, out
    return json.loads(out)


def cpadgn_attrs(path):
    import h5py
    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["attrs"])


def history(path):
    import h5py
    with h5py.File(path, "r") as f:
        return {k: f["training"][k][()] for k in f["training"]}


def test_init_from_model_file_starts_at_its_exact_likelihood_and_climbs(tmp_path):
    """A cpadgn model file with a non-standard prior N(0.5, 1.5^2): EM's first training
    log-likelihood is the model's exact mean log p(x) (quadrature over z under that prior;
    and `cpadgn score`), EM never lowers it, and the written model keeps the architecture."""
    import cpadgn
    base = cpadgn.load("sample_data/wave_generator.h5", cache=False)
    net, sigma = base.generator, float(base.noise_std)
    init = tmp_path / "init.h5"
    save_model(init, net, prior_mean=[0.5], prior_cov=[[1.5 ** 2]], noise_std=sigma)
    np.savetxt(tmp_path / "x.csv", WAVE, delimiter=",", header="a,b", comments="")
    out = tmp_path / "refined.h5"
    s = fit_json([str(tmp_path / "x.csv"), "-o", str(out), "--init", str(init), "--max-iter", "2",
                  "--val-fraction", "0"])
    h = history(out)
    # the oracle: quadrature of the unfolded net under the stored prior
    forward = lambda t: net.forward(t[:, None])
    preact = lambda t: net.preactivations(t[:, None])
    quad = quadrature_loglik_1d(forward, preact, WAVE, sigma, 0.5, 1.5)
    # EM's value is a certified lower bound, at most error_bound (<= log(1 + rtol)) below
    # the exact value; the quadrature is accurate to ~1e-9 (tests/test_likelihood.py)
    assert s["initial_train_log_likelihood"] == h["train_loglik"][0]
    assert -1e-8 <= quad - h["train_loglik"][0] <= h["error_bound"][0] + 1e-8
    assert s["initial_noise_std"] == sigma
    code, msg, _ = run(["score", str(init), str(tmp_path / "x.csv"), "-o", str(tmp_path / "s.csv"), "-q",
                        "--cache", str(tmp_path / "c.h5")])
    assert code == 0, msg
    scored = np.genfromtxt(tmp_path / "s.csv", delimiter=",", names=True)["log_likelihood"].mean()
    assert abs(scored - h["train_loglik"][0]) <= h["error_bound"][0] + 1e-8
    assert np.all(np.diff(h["train_loglik"]) >= 0) and h["train_loglik"][-1] > h["train_loglik"][0]
    refined = cpadgn.load(out, cache=False)
    assert refined.generator.hidden_sizes == net.hidden_sizes
    assert all(np.array_equal(a, b) for a, b in zip(refined.generator.slopes, net.slopes))
    assert abs(refined.log_prob(WAVE).mean() - h["train_loglik"][-1]) <= h["error_bound"][-1] + 1e-8


def _decoder():
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 6),
                               torch.nn.LeakyReLU(0.2), torch.nn.Linear(6, 2)).double().eval()


def test_init_from_exported_torch_module_fits_the_noise_and_climbs(tmp_path):
    """A torch.export file has no noise: EM starts at the maximum-likelihood noise std of
    the unchanged decoder, and at the decoder's exact log-likelihood there (quadrature over
    torch's own forward pass)."""
    dec = _decoder()
    path = tmp_path / "dec.pt2"
    torch.export.save(torch.export.export(dec, (torch.zeros(2, 1, dtype=torch.float64),)), path)
    np.savetxt(tmp_path / "x.csv", WAVE, delimiter=",", header="a,b", comments="")
    out = tmp_path / "refined.h5"
    s = fit_json([str(tmp_path / "x.csv"), "-o", str(out), "--init", str(path), "--max-iter", "2",
                  "--val-fraction", "0"])
    h = history(out)
    sigma = s["initial_noise_std"]

    def forward(t):
        with torch.no_grad():
            return dec(torch.from_numpy(t[:, None])).numpy()

    def preact(t):
        with torch.no_grad():
            u1 = dec[0](torch.from_numpy(t[:, None]))
            return torch.cat([u1, dec[2](dec[1](u1))], 1).numpy()

    quad = lambda sd: quadrature_loglik_1d(forward, preact, WAVE, sd)
    at = quad(sigma)
    assert -1e-8 <= at - h["train_loglik"][0] <= h["error_bound"][0] + 1e-8
    assert at > max(quad(sigma * 1.02), quad(sigma / 1.02))         # sigma maximises the likelihood
    assert np.all(np.diff(h["train_loglik"]) >= 0) and h["train_loglik"][-1] > h["train_loglik"][0]


def test_fit_em_accepts_an_in_memory_module():
    from cpadgn.fit import fit_em
    res = fit_em(WAVE, None, max_iter=1, init=_decoder())
    assert res.options["init"] == "model" and res.options["init_noise_source"] == "fitted"
    assert res.net.hidden_sizes == (8, 6) and res.history["train_loglik"][1] >= res.history["train_loglik"][0]


def _one_line_error(tmp_path, args, match):
    out = tmp_path / "o.h5"
    res = CliRunner().invoke(main, ["fit", *args, "-o", str(out)])
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and match in lines[0], res.output
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_init_refuses_mismatched_dimensions(tmp_path):
    _one_line_error(tmp_path, ["sample_data/digits_test.csv", "--init", "sample_data/wave_generator.h5"],
                    "outputs 2 columns but the training data has 64")
    _one_line_error(tmp_path, ["sample_data/wave.csv", "--init", "sample_data/wave_generator.h5", "-S", "2"],
                    "does not match the --init model's latent dimension 1")


@pytest.mark.parametrize("args, code, match", [
    # the model disagrees with the data or with an option: a user error (exit 1)
    (["sample_data/digits_test.csv", "--init", "sample_data/wave_generator.h5"], 1, "outputs 2 columns"),
    (["sample_data/wave.csv", "--init", "sample_data/wave_generator.h5", "-S", "2"], 1, "latent dimension 1"),
    (["sample_data/wave.csv", "--init", "sample_data/digits_test.csv"], 1, "not a recognised generator"),
    # the command line is wrong whatever the files hold: a usage error (exit 2), as fit's other option checks
    (["sample_data/wave.csv", "--init", "sample_data/wave_generator.h5", "--hidden", "4"], 2,
     "--hidden comes from the --init model"),
    (["sample_data/wave.csv", "--init", "sample_data/wave_generator.h5", "--activation", "relu"], 2,
     "--activation comes from the --init model"),
    (["sample_data/wave.csv", "--init", "sample_data/wave_generator.h5", "--method", "vae"], 2, "start for EM"),
    (["sample_data/wave.csv", "--init", "no_such_model.h5"], 2, "neither ppca, random nor an existing"),
    # a latent dimension below 1 is a bad value whatever the model: it was exit 1, 'does not match the --init
    # model's latent dimension 1' (and without --init exit 1 too), unlike every other bad number of fit
    (["sample_data/wave.csv", "--init", "sample_data/wave_generator.h5", "-S", "0"], 2, "x>=1"),
    (["sample_data/wave.csv", "-S", "0"], 2, "x>=1"),
    # --trust-pickle only lets --init load a pickled module: without --init MODEL it was accepted and unused
    (["sample_data/wave.csv", "-S", "1", "--trust-pickle"], 2, "no --init MODEL"),
    (["sample_data/wave.csv", "-S", "1", "--init", "random", "--trust-pickle"], 2, "drop --trust-pickle"),
    # fit's other command-line errors take the same way (they were exit 1): a value that cannot be
    # parsed, an output name that cannot hold a model, options that exclude each other
    (["sample_data/wave.csv", "-S", "1", "--hidden", "-3"], 2, "positive integers"),
    (["sample_data/wave.csv", "-S", "1", "--activation", "foo"], 2, "unknown --activation"),
    (["sample_data/wave.csv", "--init", "sample_data/wave_generator.h5", "--init-noise", "1e200"], 2,
     "--init-noise 1e+200 is above"),
    (["sample_data/wave.csv", "-S", "1", "--val", "sample_data/wave.csv", "--val-fraction", "0.2"], 2,
     "give either --val or --val-fraction"),
])
def test_init_mismatches_exit_1_for_the_files_and_2_for_the_command_line(tmp_path, args, code, match):
    """Every way an --init request can be refused, in one line before any work: exit 1 when
    the model does not fit the data or an option (only the files tell), exit 2 when the
    command line alone is wrong (README: 1 user error, 2 usage error)."""
    out = tmp_path / "o.h5"
    res = CliRunner().invoke(main, ["fit", *args, "-o", str(out), "--max-iter", "1", "-q"])
    assert res.exit_code == code, res.output
    err = res.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err and match in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_generator_given_as_data_is_pointed_to_init(tmp_path):
    """`cpadgn fit model.h5 ...` (or a .pt2, or one as --val): the refusal names --init,
    fit's way to refine a generator; it said 'the order is MODEL then DATA, e.g. cpadgn
    score model.h5 DATA.csv -o OUT', another command's order."""
    _one_line_error(tmp_path, ["sample_data/wave_generator.h5", "-S", "1"],
                    "DATA sample_data/wave_generator.h5 is a generator file, not data; fit trains on rows of "
                    "data: to refine this generator, pass it as --init sample_data/wave_generator.h5")
    path = tmp_path / "dec.pt2"
    torch.export.save(torch.export.export(_decoder(), (torch.zeros(2, 1, dtype=torch.float64),)), path)
    _one_line_error(tmp_path, [str(path), "-S", "1"], f"pass it as --init {path}")
    _one_line_error(tmp_path, ["sample_data/wave.csv", "-S", "1", "--val", "sample_data/wave_generator.h5"],
                    "--val sample_data/wave_generator.h5 is a generator file, not data")


def test_init_refuses_a_generator_em_cannot_hold(tmp_path):
    """A folded convolutional decoder is refined as dense layers; one whose M-step exceeds
    --memory-budget is refused in one line, before any step."""
    torch.manual_seed(0)
    dec = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Unflatten(1, (2, 2, 2)),
                              torch.nn.ConvTranspose2d(2, 1, 2), torch.nn.ReLU(), torch.nn.Flatten()).double()
    path = tmp_path / "conv.pt2"
    torch.export.save(torch.export.export(dec.eval(), (torch.zeros(2, 2, dtype=torch.float64),)), path)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        X = dec(torch.from_numpy(rng.standard_normal((60, 2)))).numpy() + 0.3 * rng.standard_normal((60, 9))
    np.savetxt(tmp_path / "x.csv", X, delimiter=",")
    _one_line_error(tmp_path, [str(tmp_path / "x.csv"), "--init", str(path), "--memory-budget", "1e4"],
                    "EM cannot update this generator within the memory budget")
    s = fit_json([str(tmp_path / "x.csv"), "-o", str(tmp_path / "r.h5"), "--init", str(path), "--max-iter", "1",
                  "--val-fraction", "0"])
    h = history(tmp_path / "r.h5")
    assert s["hidden"] == [8, 9] and np.all(np.diff(h["train_loglik"]) >= 0)


def test_a_fit_continues_in_stages_from_its_own_file(tmp_path):
    """Ctrl-C writes nothing, so the help and README tell a user to train a long run in
    stages (--max-iter N, then --init the file written); the second stage's EM starts at
    the first stage's final exact training log-likelihood (the same default validation
    split of the same DATA and seed; both are certified to log(1 + rtol) = 1e-6 nats)."""
    code, text, _ = run(["fit", "--help"])
    assert code == 0 and "Ctrl-C writes nothing" in " ".join(text.split())
    np.savetxt(tmp_path / "x.csv", WAVE, delimiter=",", header="a,b", comments="")
    one = fit_json([str(tmp_path / "x.csv"), "-o", str(tmp_path / "s1.h5"), "-S", "1", "--hidden", "6,6",
                    "--max-iter", "2"])
    two = fit_json([str(tmp_path / "x.csv"), "-o", str(tmp_path / "s2.h5"), "--init", str(tmp_path / "s1.h5"),
                    "--max-iter", "2"])
    assert two["train_rows"] == one["train_rows"] and two["initial_noise_std"] == one["noise_std"]
    assert abs(two["initial_train_log_likelihood"] - one["train_log_likelihood"]) <= 2e-6
    assert two["train_log_likelihood"] >= two["initial_train_log_likelihood"]
    # the fit options are not read from the --init file: the help says to repeat them
    assert "same --seed, --val-fraction, --var-floor and --rtol" in " ".join(text.split())
    fit_json([str(tmp_path / "x.csv"), "-o", str(tmp_path / "d1.h5"), "-S", "1", "--hidden", "6,6",
              "--max-iter", "1", "--noise", "diag", "--var-floor", "0.01"])
    fit_json([str(tmp_path / "x.csv"), "-o", str(tmp_path / "d2.h5"), "--init", str(tmp_path / "d1.h5"),
              "--max-iter", "1"])
    floors = [cpadgn_attrs(tmp_path / f)["fit_options"]["var_floor"] for f in ("d1.h5", "d2.h5")]
    assert floors[1] == pytest.approx(1e-4 * floors[0], rel=1e-12)
