"""Decoders as graphs (DESIGN section 9): convolutional, pooling and residual decoders
folded into the canonical piecewise-affine net, checked against torch's own forward pass
and against an independent likelihood oracle."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import cpadgn
from cpadgn import loading
from cpadgn.errors import CpadgnError
from cpadgn.loading import load_generator
from cpadgn.model import CPAModel
from cpadgn.partition import _pattern_keys, check_partition, compute_partition

from oracles import assert_matches_torch, torch_forward

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`isinstance.treespec:FutureWarning")]

S = 3

def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
            if isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) - 0.5)
    return model.double().eval()


def image(C, H, W, *mid):
    torch.manual_seed(C * 100 + H * 10 + W)
    return nn.Sequential(nn.Linear(S, C * H * W), nn.ReLU(), nn.Unflatten(1, (C, H, W)), *mid,
                         nn.Flatten())


SEQUENTIAL = {
    "conv2d": lambda: image(2, 4, 4, nn.Conv2d(2, 3, 3, padding=1), nn.LeakyReLU(0.1)),
    "conv2d-stride": lambda: image(2, 5, 5, nn.Conv2d(2, 2, 3, stride=2, padding=1, bias=False)),
    "conv-transpose2d": lambda: image(2, 3, 3, nn.ConvTranspose2d(2, 2, 4, 2, 1), nn.ReLU(),
                                      nn.ConvTranspose2d(2, 1, 3)),
    "upsample-nearest": lambda: image(2, 3, 3, nn.Upsample(scale_factor=2), nn.Conv2d(2, 1, 3)),
    "upsample-bilinear": lambda: image(1, 3, 4, nn.Upsample(scale_factor=2, mode="bilinear"),
                                       nn.ReLU()),
    "avgpool": lambda: image(2, 4, 4, nn.AvgPool2d(2), nn.ReLU()),
    "batchnorm2d-prelu": lambda: image(2, 3, 3, nn.BatchNorm2d(2), nn.PReLU(2)),
    "pad": lambda: image(2, 3, 3, nn.ZeroPad2d((1, 0, 2, 1)), nn.Conv2d(2, 1, 2), nn.ReLU()),
    "maxpool": lambda: image(2, 4, 4, nn.MaxPool2d(2)),
    "maxpool-padded": lambda: image(1, 5, 5, nn.MaxPool2d(3, stride=2, padding=1)),
    "maxpool-ceil": lambda: image(1, 5, 5, nn.MaxPool2d(2, ceil_mode=True)),
    "1d": lambda: nn.Sequential(nn.Linear(S, 12), nn.ReLU(), nn.Unflatten(1, (2, 6)),
                                nn.Conv1d(2, 2, 3, padding=1), nn.ReLU(),
                                nn.ConvTranspose1d(2, 1, 4, 2, 1), nn.MaxPool1d(2), nn.Flatten()),
}


class Permute(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(S, 12), nn.Linear(12, 4)

    def forward(self, z):
        h = torch.relu(self.a(z)).reshape(-1, 3, 4).permute(0, 2, 1).reshape(-1, 12)
        return self.b(h)


class Branches(nn.Module):
    """cat of two branches, and a residual block: the skip rides through slope-1 units."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(S, 5), nn.Linear(S, 4), nn.Linear(9, 9)
        self.out = nn.Linear(9, 3)

    def forward(self, z):
        h = torch.cat([torch.relu(self.a(z)), nn.functional.leaky_relu(self.b(z), 0.2)], dim=1)
        return self.out(h + torch.relu(self.c(h)))


class ResDec(nn.Module):
    """Linear -> ReLU, two residual blocks, Linear (S = 2)."""

    def __init__(self, S=2, width=4, D=3):
        super().__init__()
        torch.manual_seed(11)
        self.inp = nn.Linear(S, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.out = nn.Linear(width, D)

    def forward(self, z):
        h = torch.relu(self.inp(z))
        for blk in self.blocks:
            h = h + torch.relu(blk(h))
        return self.out(h)


@pytest.fixture(scope="module")
def z():
    return np.random.default_rng(1).normal(size=(400, S)) * 3


@pytest.mark.parametrize("name", sorted(SEQUENTIAL))
def test_sequential_layers_match_torch_on_every_path(name, z):
    model = _randomise(SEQUENTIAL[name](), seed=len(name))
    ep = torch.export.export(model, (torch.zeros(2, S, dtype=torch.float64),))
    for source in (model, torch.jit.script(model), ep):      # layer table, TorchScript, graph
        net = load_generator(source).net
        assert_matches_torch(net, model, z, err_msg=str(type(source)))


@pytest.mark.parametrize("cls", [Permute, Branches])
def test_graph_modules_match_torch(cls, z):
    torch.manual_seed(5)
    model = cls().double().eval()
    net = load_generator(model).net          # not a Sequential: recorded with torch.export
    assert_matches_torch(net, model, z)


def test_skip_units_have_slope_one_and_are_never_facets():
    model = ResDec().double().eval()
    net = load_generator(model).net
    carried = net.linear_units
    assert carried.sum() == 2 * 4            # h carried through each residual block's layer
    part = CPAModel(net, noise_std=0.5, device="cpu").partition()
    assert not np.any(carried[part.facet_units])
    assert np.all(part.patterns[:, carried])
    zz = np.random.default_rng(2).normal(size=(5000, 2)) * 3
    assert np.all(part.locate(net, zz) >= 0)       # the regions tile the plane


def loglik_defensive_is(module, x, noise_std, n=400_000, seed=0):
    """Monte Carlo oracle from torch's own forward pass only: importance sampling from the
    defensive mixture 1/2 N(m, 2C) + 1/2 N(0, I) (m, C from a prior-weighted pilot), whose
    weights are at most 2 p(x|z), so their variance is finite.  Returns log p(x) and the
    standard error of the estimate (delta method)."""
    rng = np.random.default_rng(seed)
    D = x.size

    def log_lik(zz):
        r = torch_forward(module, zz) - x
        return -0.5 * (r * r).sum(1) / noise_std ** 2 - D * np.log(noise_std * np.sqrt(2 * np.pi))

    pilot = rng.normal(size=(n // 4, 2))
    w = np.exp(log_lik(pilot) - log_lik(pilot).max())
    m = w @ pilot / w.sum()
    C = 2 * np.cov(pilot.T, aweights=w) + 1e-3 * np.eye(2)
    L = np.linalg.cholesky(C)
    zz = np.where(rng.random(n)[:, None] < 0.5, m + rng.normal(size=(n, 2)) @ L.T,
                  rng.normal(size=(n, 2)))
    d = zz - m
    log_q_near = (-0.5 * np.einsum("ns,st,nt->n", d, np.linalg.inv(C), d)
                  - np.log(2 * np.pi) - 0.5 * np.log(np.linalg.det(C)))
    log_prior = -0.5 * (zz * zz).sum(1) - np.log(2 * np.pi)
    log_q = np.logaddexp(log_q_near, log_prior) - np.log(2)
    lw = log_lik(zz) + log_prior - log_q
    top = lw.max()
    w = np.exp(lw - top)
    return top + np.log(w.mean()), w.std() / np.sqrt(n) / w.mean()


def _conv_decoder():
    torch.manual_seed(4)
    m = nn.Sequential(nn.Linear(2, 2 * 2 * 2), nn.ReLU(), nn.Unflatten(1, (2, 2, 2)),
                      nn.ConvTranspose2d(2, 1, 2), nn.ReLU(), nn.Flatten())
    return m.double().eval()


def _upsample_maxpool():
    """Overlapping max pooling after nearest upsampling: every window holds copies."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Unflatten(1, (1, 2, 2)),
                      nn.Upsample(scale_factor=2), nn.MaxPool2d(3, stride=1, padding=1),
                      nn.Flatten(), nn.Linear(16, 3))
    return m.double().eval()


@pytest.mark.parametrize("make", [_conv_decoder, lambda: ResDec().double().eval(), _upsample_maxpool],
                         ids=["conv", "residual", "upsample-maxpool"])
def test_exact_loglik_against_monte_carlo(make):
    module = make()
    model = cpadgn.load(module, noise_std=0.3)
    rng = np.random.default_rng(0)
    X = torch_forward(module, rng.normal(size=(3, 2))) + 0.3 * rng.normal(size=(3, model.output_dim))
    X[2] += 1.0                                          # one row off the generator's range
    got = model.log_prob(X)
    for n, (x, lp) in enumerate(zip(X, got)):
        want, se = loglik_defensive_is(module, x, 0.3, seed=n)
        assert abs(lp - want) < 4 * se + 1e-9, (lp, want, se)


def test_partition_checks_of_max_pooling_over_copies():
    """Copies of one value in a pooling window are one unit (else their differences, 0 in
    z, are rounding noise that splits regions), and the check passes every region's
    interior point, zero-width ones included, yet still fails a wrong pattern."""
    module = _upsample_maxpool()
    net = cpadgn.load(module, noise_std=0.3).net
    assert_matches_torch(net, module, np.random.default_rng(3).normal(size=(400, 2)) * 3)
    part = compute_partition(net)
    check = check_partition(net, part, n_samples=20_000)
    # S = 2: exact masses, their sum errs by R eps at most
    assert check["mass_error"] <= part.n_regions * np.finfo(float).eps, check
    assert check["samples_located"] == 1.0 and check["interior_ok"] == 1.0, check
    r = int(np.argmax(part.clearance))                     # far from every hyperplane
    wrong = copy.deepcopy(part)
    wrong.patterns[r, part.facet_units[part.facet_ptr[r]]] ^= True
    assert check_partition(net, wrong, n_samples=1000)["interior_ok"] == (part.n_regions - 1) / part.n_regions


def test_lp_walk_lists_each_region_of_max_pooling_over_relus_once():
    """max(a, b) = b + relu(a - b): where a = b = 0 (both ReLUs off) relu(a - b) has an
    identically zero pre-activation, and either sign satisfies its constraint.  The LP
    walk listed such regions once per sign (prior masses summed to 1.76); it must count
    the unit as >= 0, as the subdivision does, and agree with it on log p."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Unflatten(1, (1, 2, 2)), nn.MaxPool2d(2),
                           nn.Flatten(), nn.Linear(1, 2)).double().eval()
    model = cpadgn.load(module, noise_std=0.3)
    sub, lp = compute_partition(model.net), compute_partition(model.net, method="lp-walk")
    # S = 2: exact masses, their sum errs by R eps at most
    assert abs(np.exp(lp.log_prior_mass).sum() - 1) <= lp.n_regions * np.finfo(float).eps
    # the subdivision also lists zero-width regions, which the walk's LPs cannot certify
    in_lp = np.isin(_pattern_keys(sub.patterns), _pattern_keys(lp.patterns))
    assert in_lp.sum() == lp.n_regions and sub.degenerate[~in_lp].all()
    X = torch_forward(module, np.random.default_rng(1).normal(size=(4, 2))) + 0.3
    want = cpadgn.likelihood.posterior(model.net, sub, model.noise_std, X, moments=False).log_likelihood
    got = cpadgn.likelihood.posterior(model.net, lp, model.noise_std, X, moments=False).log_likelihood
    # each sum leaves out at most rtol = 1e-10 of p(x) in pruned pairs
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-10 + 1e-13)


def test_clamps_saturating_both_inputs_of_a_max_count_as_ties():
    """Linear -> Hardtanh -> MaxPool1d: where the clamp saturates both inputs a, b of a max
    at one bound, its unit a - b (lo + relu(u - lo) - relu(u - hi) twice) is 0 up to
    rounding, of either sign.  locate took the forward pass's noisy sign (12% of prior
    samples in no region) and the LP walk normalised the noise into hyperplanes in random
    directions (prior masses summed to 2.03).  Both must count the unit as >= 0, as the
    subdivision's snapping does.  Oracles: each sample satisfies the facet constraints of
    the region it is located in, and the regions' masses are the sample frequencies."""
    g = torch.Generator().manual_seed(4)
    module = nn.Sequential(nn.Linear(2, 4), nn.Hardtanh(-0.5, 0.5), nn.MaxPool1d(2), nn.Linear(2, 3)).double()
    with torch.no_grad():
        for prm in module.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g, dtype=torch.float64))
    net = cpadgn.load(module.eval(), noise_std=0.3).net
    n = 20_000
    z = np.random.default_rng(0).standard_normal((n, 2))
    for method in ("auto", "lp-walk"):
        part = compute_partition(net, method=method)
        # S = 2: exact masses, their sum errs by R eps at most
        assert abs(np.exp(part.log_prior_mass).sum() - 1) <= part.n_regions * np.finfo(float).eps, method
        where = part.locate(net, z)
        assert (where >= 0).all(), (method, (where < 0).mean())
        G, h, mask = part.facets(net, where)
        excess = np.einsum("nfs,ns->nf", G, z) - h
        # float64 rows and products err by ~1e-15 of the magnitudes summed: 1e-12 is far above
        scale = np.einsum("nfs,ns->nf", np.abs(G), np.abs(z)) + np.abs(h)
        assert (excess[mask] <= 1e-12 * scale[mask]).all(), method
        freq = np.bincount(where, minlength=part.n_regions) / n
        p = np.exp(part.log_prior_mass)
        assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12).all(), method


def test_load_accepts_modules_and_exported_programs(z):
    module = _randomise(SEQUENTIAL["conv2d"](), 3)
    ep = torch.export.export(module, (torch.zeros(2, S, dtype=torch.float64),))
    for source, fmt in ((module, "module"), (ep, "torch-export")):
        model = cpadgn.load(source, noise_std=0.2)
        assert model.source_format == fmt
        assert_matches_torch(model.net, module, z)
    model = cpadgn.load(Permute().double().eval(), noise_std=0.2,
                        example_input=torch.zeros(3, S, dtype=torch.float64))
    assert model.latent_dim == S and model.output_dim == 4
    with pytest.raises(CpadgnError, match=r"Sigmoid\) is the output layer.*affine last layer.*score logit\(x\)"):
        cpadgn.load(nn.Sequential(nn.Linear(S, 4), nn.ReLU(), nn.Linear(4, 2), nn.Sigmoid()),
                    noise_std=0.1)
    with pytest.raises(CpadgnError, match="cannot load a dict"):
        cpadgn.load({"weight": 1}, noise_std=0.1)
    with pytest.raises(CpadgnError, match=r"cannot load a state_dict .*decoder.load_state_dict"):
        cpadgn.load(module.state_dict(), noise_std=0.1)
    with pytest.raises(CpadgnError, match=r"cannot load a state_dict under key 'sd' .*load_state_dict"):
        cpadgn.load({"sd": module.state_dict(), "epoch": 1}, noise_std=0.1)
    with pytest.raises(CpadgnError, match=r"a checkpoint\): pass the module it holds, checkpoint\['net'\]"):
        cpadgn.load({"net": module, "epoch": 1}, noise_std=0.1)


def test_messages_for_squashed_outputs_and_batch_reshapes(tmp_path):
    class Squash(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(S, 4)

        def forward(self, z):
            return torch.tanh(self.a(z)).reshape(-1, 2, 2).flatten(1)

    with pytest.raises(CpadgnError, match=r"output goes through aten\.tanh.*affine last layer.*score atanh\(x\)"):
        load_generator(Squash())

    class MeanAndLogVar(nn.Module):          # a VAE decoder's usual (mean, log-variance) pair
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(S, 4)

        def forward(self, z):
            h = self.a(z)
            return h, -h

    ep = torch.export.export(MeanAndLogVar().double(), (torch.zeros(2, S, dtype=torch.float64),))
    with pytest.raises(CpadgnError, match=r"returns 2 outputs; a generator returns one tensor \(export a wrapper"):
        cpadgn.load(ep, noise_std=0.1)

    class MeanAndLogVarDict(MeanAndLogVar):   # decoder(z)[0] is a KeyError on a dict
        def forward(self, z):
            h = self.a(z)
            return {"mean": h, "logvar": -h}

    with pytest.raises(CpadgnError, match=r"returns 2 outputs \(a dict with keys 'mean', 'logvar'\); a "
                                          r"generator returns one tensor .*e\.g\. decoder\(z\)\['mean'\]\)"):
        cpadgn.load(MeanAndLogVarDict(), noise_std=0.1)

    class BatchMix(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(S, 4)

        def forward(self, z):
            return self.a(z).reshape(1, -1)

    with pytest.raises(CpadgnError, match=r"mixing the batch axis with the features; a "
                                          r"generator must keep the batch as the first axis"):
        load_generator(BatchMix(), example_input=torch.zeros(2, S))


@pytest.mark.parametrize("kind", ["Tanh", "Sigmoid"])
def test_squashing_output_before_a_flatten_is_named_as_the_output(tmp_path, kind):
    """A DCGAN decoder ends ... ConvTranspose2d, Tanh, and the README's wrapper puts
    nn.Flatten() after it: the Tanh is still the output (a Flatten or a Dropout changes no
    value), so every form gives the output-layer reason (the nn.Sequential forms, and
    torch.export's with the Dropout, said 'not piecewise affine ... replace it and retrain')."""
    inverse = {"Tanh": "atanh", "Sigmoid": "logit"}[kind]
    inner = nn.Sequential(nn.Linear(S, 8), nn.ReLU(), nn.Unflatten(1, (2, 2, 2)),
                          nn.ConvTranspose2d(2, 1, 2, stride=2), getattr(nn, kind)())
    model = nn.Sequential(inner, nn.Dropout(0.1), nn.Flatten()).eval()
    torch.jit.script(model).save(tmp_path / "g.pt")
    torch.save(model, tmp_path / "g.pkl")
    for source in (model, tmp_path / "g.pt", tmp_path / "g.pkl"):
        with pytest.raises(CpadgnError, match=rf"layer 0\.4 \({kind}\) is the output layer; a Gaussian "
                                              rf"noise model needs an affine last layer.*score {inverse}\(x\)"):
            load_generator(source, trust_pickle=True)
    ep = torch.export.export(model, (torch.zeros(2, S),))
    with pytest.raises(CpadgnError, match=rf"layer 0\.4 \({kind}\): the output goes through "
                                          rf"aten\.{kind.lower()}; a Gaussian noise model.*score {inverse}\(x\)"):
        load_generator(ep)
    # a Tanh with an affine layer after it is not the output
    with pytest.raises(CpadgnError, match=r"layer 1 \(Tanh\) is not piecewise affine"):
        load_generator(nn.Sequential(nn.Linear(S, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4, 2)))


def test_dense_layer_over_the_memory_limit_is_refused(monkeypatch):
    model = _randomise(SEQUENTIAL["conv2d"](), 3)
    monkeypatch.setattr(loading, "DENSE_LIMIT_BYTES", 10_000)
    with pytest.raises(CpadgnError, match=r"layer 3: its dense affine form would be 48 x 32 float64 \(0\.01 MiB\)"):
        load_generator(model)


@pytest.mark.filterwarnings("ignore:BuiltinImporter.module_repr")   # __main__ under pytest-xdist
def test_dcgan_generator_fed_through_a_leading_unflatten(tmp_path):
    """A DCGAN-style generator takes z of shape (N, S, 1, 1).  Behind nn.Unflatten(1, (S, 1, 1))
    it loads from every form (the pickle and TorchScript were refused: 'no Linear layer'),
    matching torch's forward pass; bare, each form's message names that wrapper."""
    torch.manual_seed(7)
    conv = nn.Sequential(nn.ConvTranspose2d(S, 4, 3, 1, 0), nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
                         nn.ConvTranspose2d(4, 1, 4, 2, 1))            # (N, S, 1, 1) -> (N, 1, 6, 6)
    gen = _randomise(nn.Sequential(nn.Unflatten(1, (S, 1, 1)), conv, nn.Flatten()), seed=7)
    torch.save(gen, str(tmp_path / "gen.pt"))
    torch.jit.script(gen).save(str(tmp_path / "gen_script.pt"))
    z = np.random.default_rng(2).normal(size=(200, S)) * 3
    ep = torch.export.export(gen, (torch.zeros(2, S, dtype=torch.float64),))
    for source in (gen, tmp_path / "gen.pt", tmp_path / "gen_script.pt", ep):
        net = load_generator(source, trust_pickle=True).net
        assert (net.latent_dim, net.output_dim) == (S, 36)
        assert_matches_torch(net, gen, z, err_msg=str(source))
    bare = gen[1]
    with pytest.raises(CpadgnError, match=r"no Linear layer.*nn.Unflatten\(1, \(S, 1, 1\)\)"):
        load_generator(bare)
    with pytest.raises(CpadgnError, match=r"shape \(2, 3, 1, 1\).*export nn.Sequential\(nn.Unflatten"):
        cpadgn.load(bare, noise_std=0.1, example_input=torch.zeros(2, S, 1, 1, dtype=torch.float64))


def test_pickled_class_of_the_saving_script_says_so(tmp_path):
    """A class defined in the script that pickled the module is named '__main__.Name':
    unpickling looks it up in cpadgn's own __main__, so "make its module importable" does
    not apply; the message says where the class came from."""
    import pickle
    import sys
    main = sys.modules["__main__"]
    Scripted = type("H48Scripted", (torch.nn.Linear,), {"__module__": "__main__"})
    main.H48Scripted = Scripted
    try:
        torch.save(Scripted(S, 2), str(tmp_path / "scripted.pt"), pickle_module=pickle)
    finally:
        del main.H48Scripted
    with pytest.raises(CpadgnError, match="class defined in the script that saved it.*torch.export.save"):
        load_generator(tmp_path / "scripted.pt", trust_pickle=True)


def test_pickled_custom_class_that_cannot_be_imported(tmp_path):
    import pickle
    import sys
    import types
    mod = types.ModuleType("h6_gone")
    exec("import torch\nclass Gone(torch.nn.Linear):\n    pass\n", mod.__dict__)
    sys.modules["h6_gone"] = mod
    try:
        torch.save(mod.Gone(S, 2), str(tmp_path / "gone.pt"), pickle_module=pickle)
    finally:
        del sys.modules["h6_gone"]
    with pytest.raises(CpadgnError, match="custom class that cannot be imported here.*importable.*"
                                          "torch.export.save"):
        load_generator(tmp_path / "gone.pt", trust_pickle=True)


def test_bias_free_relu_cone_whose_vertex_is_the_posterior_mean():
    """Bias-free ReLUs cut the plane into cones from the origin; where all are off g is
    constant, so that region's posterior is the prior, centred on the cone's vertex.  The
    S = 2 polygon integral took its facets through the origin as passing beside it and
    gave that cone twice its mass (log p off by up to 0.4 nats)."""
    torch.manual_seed(3)
    module = nn.Sequential(nn.Linear(2, 3, bias=False), nn.ReLU(), nn.Linear(3, 4)).double().eval()
    model = cpadgn.load(module, noise_std=0.5)
    rng = np.random.default_rng(0)
    X = torch_forward(module, np.array([[0.0, 0.0], [1.0, -1.0]])) + 0.5 * rng.normal(size=(2, 4))
    for n, (x, lp) in enumerate(zip(X, model.log_prob(X))):     # 0.19 and 0.17 nats off before
        want, se = loglik_defensive_is(module, x, 0.5, n=100_000, seed=n)
        assert abs(lp - want) < 4 * se + 1e-9, (lp, want, se)


def test_activations_around_a_reshape_are_one_layer_and_flat_max_pooling_loads():
    """PReLU, Unflatten, ReLU: the reshape kept the features but lost their being the
    hidden layer itself, so the ReLU became a second layer whose hyperplanes coincide
    with the first's (zero-width regions, twice the units).  MaxPool1d on (N, F)
    features (torch pools each sample as one channel) crashed with torch's error."""
    torch.manual_seed(2)
    stacked = nn.Sequential(nn.Linear(2, 6), nn.PReLU(), nn.Unflatten(1, (2, 3)), nn.ReLU(), nn.Flatten(),
                            nn.Linear(6, 2))
    pooled = nn.Sequential(nn.Linear(2, 7), nn.ReLU(), nn.MaxPool1d(3, 2, 1, ceil_mode=True), nn.Linear(4, 2))
    z = np.random.default_rng(3).normal(size=(400, 2)) * 3
    for module, hidden in ((stacked, (6,)), (pooled, (7, 10, 8))):
        module = module.double().eval()
        ep = torch.export.export(module, (torch.zeros(2, 2, dtype=torch.float64),))
        for source in (module, torch.jit.script(module), ep):
            net = load_generator(source).net
            assert net.hidden_sizes == hidden, (type(source), net.hidden_sizes)
            assert_matches_torch(net, module, z)


class _BatchOp(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.a, self.b, self.how = nn.Linear(2, 4), nn.Linear(4, 3), how

    def forward(self, z):
        h = torch.relu(self.a(z))
        return self.b(h.flip(0) if self.how == "flip" else h.roll(1, 0))


def test_batch_permutations_and_padding_only_pooling_windows_are_refused():
    """flip / roll along the batch keep the batch's shape, so the shape check passed
    them and the loaded net silently differed from torch's; a max-pooling window of
    padding only is -inf in torch and was filled with a real element."""
    for how in ("flip", "roll"):
        with pytest.raises(CpadgnError, match=rf"node '{how}': mixes the samples of a batch"):
            load_generator(_BatchOp(how))
    module = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Unflatten(1, (3, 1)), nn.MaxPool1d(2, 2, 1, 2),
                           nn.Flatten(), nn.Linear(3, 2))
    assert not torch.isfinite(module(torch.zeros(1, 2))).all()
    ep = torch.export.export(module.eval(), (torch.zeros(2, 2),))
    for source in (module, ep):
        with pytest.raises(CpadgnError, match="max-pooling window that holds only padding"):
            load_generator(source)
