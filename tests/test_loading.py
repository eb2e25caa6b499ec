"""Loading generators: torch.export, TorchScript, pickle and cpadgn's HDF5 model file."""
import copy
import hashlib
import shutil

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from cpadgn.errors import CpadgnError
from cpadgn.loading import (Activation, Affine, Scale, detect_format, load_generator,
                            ops_to_net)
from cpadgn.modelfile import read_model, save_model
from cpadgn.network import PiecewiseAffineNet

from oracles import assert_matches_torch, forward_rounding_tol

# torch.jit.script / save are deprecated in torch 2.x but still what users have on disk.
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:`isinstance.treespec:FutureWarning")]

S = 3


class Abs(nn.Module):
    def forward(self, x):
        return torch.abs(x)


def _bn(width, seed):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm1d(width)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(width, generator=g))
        bn.running_var.copy_(torch.rand(width, generator=g) * 2 + 0.3)
        bn.weight.copy_(torch.randn(width, generator=g))
        bn.bias.copy_(torch.randn(width, generator=g))
    return bn


def _prelu(width, seed):
    p = nn.PReLU(width)
    with torch.no_grad():
        p.weight.copy_(torch.rand(width, generator=torch.Generator().manual_seed(seed)) - 0.5)
    return p


def make_model(abs_layer=False):
    torch.manual_seed(0)
    layers = [nn.Linear(S, 8), _bn(8, 1), nn.LeakyReLU(0.2), nn.Dropout(0.3),
              nn.Linear(8, 6), nn.Flatten(), _prelu(6, 2), nn.Identity(),
              nn.Linear(6, 5), nn.ReLU(), _bn(5, 3), nn.Linear(5, 4)]
    if abs_layer:
        layers[9] = Abs()
    return nn.Sequential(*layers).double().eval()


@pytest.fixture(scope="module")
def z():
    return np.random.default_rng(0).normal(size=(500, S)) * 2


def export(model, path, decompose=False):
    ep = torch.export.export(model, (torch.randn(4, S, dtype=torch.float64),))
    if decompose:
        ep = ep.run_decompositions()
    torch.export.save(ep, str(path))
    return path


# ------------------------------------------------------------------ torch.export
@pytest.mark.parametrize("decompose", [False, True])
def test_torch_export_matches_torch(tmp_path, z, decompose):
    model = make_model(abs_layer=True)
    path = export(model, tmp_path / "gen.pt2", decompose)
    g = load_generator(path)
    assert g.source_format == "torch-export"
    assert g.net.hidden_sizes == (8, 6, 5)
    assert_matches_torch(g.net, model, z)
    np.testing.assert_array_equal(g.net.slopes[0], 0.2)
    np.testing.assert_array_equal(g.net.slopes[2], -1.0)
    np.testing.assert_array_equal(g.prior_mean, np.zeros(S))
    np.testing.assert_array_equal(g.prior_cov, np.eye(S))
    assert g.noise_std is None and g.extra == {}


def test_torch_export_activation_first_last_and_doubled(tmp_path, z):
    torch.manual_seed(1)
    model = nn.Sequential(nn.ReLU(), nn.Linear(S, 5), nn.LeakyReLU(0.1), Abs(),
                          nn.Linear(5, 4), nn.LeakyReLU(0.3)).double().eval()
    g = load_generator(export(model, tmp_path / "g.pt2"))
    # ReLU on z -> identity layer in front; LeakyReLU then abs -> one layer; a final
    # activation -> identity output layer.
    assert g.net.hidden_sizes == (S, 5, 4)
    np.testing.assert_array_equal(g.net.weights[0], np.eye(S))
    np.testing.assert_array_equal(g.net.weights[-1], np.eye(4))
    np.testing.assert_array_equal(g.net.slopes[1], -0.1)   # abs(0.1 u) for u < 0
    assert_matches_torch(g.net, model, z)


def test_torch_export_dynamic_batch(tmp_path, z):
    model = make_model()
    ep = torch.export.export(model, (torch.randn(4, S, dtype=torch.float64),),
                             dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, str(tmp_path / "dyn.pt2"))
    g = load_generator(tmp_path / "dyn.pt2")
    assert_matches_torch(g.net, model, z)


class Affinish(nn.Module):
    """Hand-written forward: matmul, scaling, bias arithmetic and a masked ReLU."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.W1 = nn.Parameter(torch.randn(S, 6, generator=g, dtype=torch.float64))
        self.W2 = nn.Parameter(torch.randn(6, 2, generator=g, dtype=torch.float64))
        self.register_buffer("shift", torch.randn(6, generator=g, dtype=torch.float64))

    def forward(self, z):
        h = (z @ self.W1) * 0.5 - self.shift
        h = torch.where(h > 0, h, 0.25 * h)
        return -(h @ self.W2) / 3.0 + 1.0


def test_torch_export_hand_written_forward(tmp_path, z):
    model = Affinish().eval()
    g = load_generator(export(model, tmp_path / "h.pt2"))
    assert g.net.hidden_sizes == (6,)
    np.testing.assert_array_equal(g.net.slopes[0], 0.25)
    assert_matches_torch(g.net, model, z)


@pytest.mark.parametrize("layer,name", [(nn.Tanh(), "tanh"), (nn.Sigmoid(), "sigmoid"),
                                        (nn.GELU(), "gelu"), (nn.Softplus(), "softplus")])
def test_torch_export_refuses_non_cpa(tmp_path, layer, name):
    model = nn.Sequential(nn.Linear(S, 4), layer, nn.Linear(4, 2)).double().eval()
    with pytest.raises(CpadgnError, match=rf"layer 1 \(.*\).*aten\.{name} is not piecewise affine"):
        load_generator(export(model, tmp_path / "bad.pt2"))


def test_torch_export_refuses_training_mode(tmp_path):
    model = nn.Sequential(nn.Linear(S, 4), _bn(4, 0), nn.ReLU(), nn.Linear(4, 2)).double().train()
    with pytest.raises(CpadgnError, match=r"training mode; call model.eval\(\)"):
        load_generator(export(model, tmp_path / "train.pt2"))


class Clamps(nn.Module):
    """Two-breakpoint activations written as functions: hardtanh, relu6, clamp(lo, hi),
    clamp(min=c) and clamp(max=c) with c != 0."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.a, self.b = nn.Linear(S, 10), nn.Linear(10, 3)

    def forward(self, z):
        h = self.a(z)
        h = torch.cat([nn.functional.hardtanh(h[:, :2], -0.5, 2.0), nn.functional.relu6(3 * h[:, 2:4]),
                       h[:, 4:6].clamp(-1.0, 0.3), h[:, 6:8].clamp(min=0.4), h[:, 8:].clamp(max=-0.2)], 1)
        return self.b(h)


def test_hardtanh_relu6_and_clamps_on_every_path(tmp_path, z):
    """A clamp to [lo, hi] is lo + relu(u - lo) - relu(u - hi): one hidden layer of ReLU
    units, two per clamped feature (they were refused as 'not supported yet')."""
    torch.manual_seed(7)
    seq = nn.Sequential(nn.Linear(S, 6), nn.Hardtanh(-0.7, 1.2), nn.Linear(6, 5), nn.ReLU6(),
                        nn.Linear(5, 4)).double().eval()
    torch.jit.save(torch.jit.script(seq), str(tmp_path / "seq.ts"))
    torch.save(seq, str(tmp_path / "seq.pt"))
    for source in (seq, tmp_path / "seq.ts", export(seq, tmp_path / "seq.pt2")):
        net = load_generator(source).net
        assert net.hidden_sizes == (12, 10), source
        assert_matches_torch(net, seq, 3 * z, err_msg=str(source))
    assert_matches_torch(load_generator(tmp_path / "seq.pt", trust_pickle=True).net, seq, 3 * z)
    model = Clamps().double().eval()
    for source in (model, export(model, tmp_path / "clamps.pt2")):
        assert_matches_torch(load_generator(source).net, model, 3 * z)
    # the forward pass reaches every piece of every clamp
    u = torch_forward_pre(model, 3 * z)
    for lo, hi, cols in ((-0.5, 2.0, slice(0, 2)), (-1.0, 0.3, slice(4, 6))):
        assert (u[:, cols] < lo).any() and ((u[:, cols] > lo) & (u[:, cols] < hi)).any() and (u[:, cols] > hi).any()


class MaxMin(nn.Module):
    """Elementwise max / min written by hand: the LeakyReLU idiom max(u, 0.2 u), max with
    zeros_like (a ReLU), min and max of two activations, and of an activation and a constant."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(9)
        self.a, self.b, self.out = nn.Linear(S, 5), nn.Linear(S, 5), nn.Linear(5, 3)

    def forward(self, z):
        u, v = self.a(z), self.b(z)
        m = torch.minimum(u, v)
        h = torch.maximum(m, 0.2 * m)
        h = torch.max(h, torch.zeros_like(h)) + torch.min(v, torch.full_like(v, -0.1))
        return self.out(h - torch.maximum(torch.tensor(0.3, dtype=z.dtype), v) + u)


def test_elementwise_max_and_min(tmp_path, z):
    """max(x, y) = y + relu(x - y) (aten.maximum, aten.max.other were refused as 'not known
    to be piecewise affine'); max(u, c u) with 0 <= c <= 1 is one LeakyReLU layer."""
    model = MaxMin().double().eval()
    for source in (model, export(model, tmp_path / "maxmin.pt2")):
        assert_matches_torch(load_generator(source).net, model, 3 * z, err_msg=str(source))

    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(S, 4), nn.Linear(4, 2)

        def forward(self, z):
            u = self.a(z)
            return self.b(torch.maximum(u, 0.3 * u))

    model = Leaky().double().eval()
    net = load_generator(model).net
    assert net.hidden_sizes == (4,)
    np.testing.assert_array_equal(net.slopes[0], 0.3)
    assert_matches_torch(net, model, 3 * z)


def torch_forward_pre(model, z):
    with torch.no_grad():
        return model.a(torch.from_numpy(z)).numpy()


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(S, S), nn.Linear(S, 2)

    def forward(self, z):
        return self.b(torch.relu(self.a(z)) + z)


def test_torch_export_skip_connection_carried_by_slope_one_units(tmp_path, z):
    model = Residual().double().eval()
    g = load_generator(export(model, tmp_path / "res.pt2"))
    assert g.net.hidden_sizes == (2 * S,) and np.all(g.net.slopes[0][S:] == 1.0)
    assert_matches_torch(g.net, model, z)


class InPlace(nn.Module):
    """In-place idioms of residual decoders: nn.ReLU(inplace=True), out += h, h.mul_(c)."""

    def __init__(self, bn=False):
        super().__init__()
        torch.manual_seed(8)
        self.a, self.c, self.b = nn.Linear(S, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act, self.leaky = nn.ReLU(inplace=True), nn.LeakyReLU(0.2, inplace=True)
        self.bn = _bn(6, 4) if bn else nn.Identity()

    def forward(self, z):
        h = self.act(self.a(z))
        out = self.c(h)
        out += h
        out.mul_(0.5)
        return self.b(self.leaky(self.bn(out)))


def test_torch_export_in_place_operations(tmp_path, z):
    """torch.export keeps in-place ops (aten.relu_, aten.add_): they were refused as 'not
    known to be piecewise affine'; the program is now made functional first."""
    model = InPlace().double().eval()
    for source in (model, export(model, tmp_path / "inplace.pt2")):
        assert_matches_torch(load_generator(source).net, model, z, err_msg=str(source))
    model = InPlace(bn=True).double().train()    # batch norm's functional training form
    with pytest.raises(CpadgnError, match=r"layer bn \(BatchNorm1d\): batch norm was exported in "
                                          r"training mode; call model.eval\(\)"):
        load_generator(export(model, tmp_path / "train.pt2"))


@pytest.mark.parametrize("layer,match", [
    (nn.LayerNorm(4), r"layer 1 \(LayerNorm\): operation aten.layer_norm normalises each sample by "
                      r"its own mean or scale, which is not piecewise affine in z; remove it, or use BatchNorm"),
    (nn.ELU(), r"layer 1 \(ELU\): operation aten.elu is not piecewise affine; .*replace it with one of them")])
def test_torch_export_refusals_say_what_to_do(tmp_path, layer, match):
    model = nn.Sequential(nn.Linear(S, 4), layer, nn.Linear(4, 2)).double().eval()
    with pytest.raises(CpadgnError, match=match):
        load_generator(export(model, tmp_path / "bad.pt2"))


class Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(S, 6), nn.ReLU(), nn.Linear(6, 4))

    def forward(self, z, *, temperature=1.0):
        return self.net(z) * temperature


def test_torch_export_with_a_python_scalar_keyword(tmp_path, z):
    """torch.export bakes a Python scalar argument (forward(z, *, temperature=2.0)) into the
    graph and keeps an unused placeholder for it: it was refused as 'takes more than one
    input'; a second tensor input still is, with what to do."""
    model = Tempered().double().eval()
    ep = torch.export.export(model, (), {"z": torch.zeros(2, S, dtype=torch.float64), "temperature": 2.0})
    torch.export.save(ep, str(tmp_path / "t.pt2"))
    oracle = lambda x: model(x, temperature=2.0)
    for source in (ep, tmp_path / "t.pt2"):
        assert_matches_torch(load_generator(source).net, oracle, z, err_msg=str(source))
    ep = torch.export.export(model, (torch.zeros(2, S, dtype=torch.float64),),
                             {"temperature": torch.tensor(2.0, dtype=torch.float64)})
    with pytest.raises(CpadgnError, match=r"node 'temperature': the program takes more than one input; a "
                                          r"generator maps z alone: export a wrapper whose forward\(z\) calls"):
        load_generator(ep)


def _every_form(model, tmp_path):
    """model in memory, torch.export'ed (in eval), scripted and pickled."""
    torch.jit.script(model).save(str(tmp_path / "m.ts"))
    torch.save(model, tmp_path / "m.pkl")
    return [model, export(copy.deepcopy(model).eval(), tmp_path / "m.pt2"), tmp_path / "m.ts",
            tmp_path / "m.pkl"]


@pytest.mark.parametrize("layer", [nn.Hardsigmoid(), nn.Softshrink(0.7), nn.RReLU(0.1, 0.3),
                                   nn.Upsample(scale_factor=2, mode="bicubic")], ids=repr)
def test_more_piecewise_affine_layers_load_from_every_form(tmp_path, z, layer):
    """Hardsigmoid (clamp(u, -3, 3) / 6 + 1/2), Softshrink (relu(u - l) - relu(-u - l)),
    RReLU in eval (LeakyReLU of slope (lower + upper) / 2, also for a module left in train
    mode: eval is used) and bicubic upsampling (linear) are piecewise affine: they were
    refused, Hardsigmoid and RReLU as 'not piecewise affine', bicubic from .pt2 only."""
    torch.manual_seed(1)
    n = 4 if isinstance(layer, nn.Upsample) else 1
    model = nn.Sequential(nn.Linear(S, 16), nn.Unflatten(1, (1, 4, 4)), layer, nn.Flatten(),
                          nn.Linear(16 * n, 3)).double().train(isinstance(layer, nn.RReLU))
    for source in _every_form(model, tmp_path):
        assert_matches_torch(load_generator(source, trust_pickle=True).net, model.eval(), z,
                             err_msg=str(source))
        model.train(isinstance(layer, nn.RReLU))
    rrelu = nn.Sequential(nn.Linear(S, 4), nn.RReLU(), nn.Linear(4, 2)).double().train()
    with pytest.raises(CpadgnError, match=r"RReLU in training mode draws random slopes; call model.eval"):
        load_generator(export(rrelu, tmp_path / "train.pt2"))


def test_a_custom_module_named_like_a_supported_layer_is_recorded_not_refused(z):
    """A user's own Hardsigmoid (relu6(x + 3) / 6) was refused as 'not piecewise affine;
    cpadgn needs ... Hardsigmoid ...' (the name was still listed as not piecewise affine);
    as any custom module it is recorded by torch.export and loads."""
    class Hardsigmoid(nn.Module):
        def forward(self, x):
            return nn.functional.relu6(x + 3) / 6

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(S, 4), Hardsigmoid(), nn.Linear(4, 3)).double().eval()
    assert_matches_torch(load_generator(model).net, model, z)


@pytest.mark.parametrize("shape,layer", [
    ((1, 4, 4), nn.CircularPad2d(1)), ((4, 2, 2), nn.ChannelShuffle(2)), ((4, 4), nn.Fold((3, 3), (2, 2))),
    ((1, 4, 4), nn.Unfold(2)), ((1, 4, 4), nn.Threshold(0.3, 0.3))], ids=repr)
def test_affine_rearrangements_and_a_continuous_threshold_load_from_every_form(tmp_path, z, shape, layer):
    """CircularPad, ChannelShuffle, Fold and Unfold are linear, Threshold(t, t) is
    clamp(min=t): the modules were refused as 'not known to be piecewise affine' (and
    aten.channel_shuffle, col2im, im2col, threshold from .pt2)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(S, int(np.prod(shape))), nn.ReLU(), nn.Unflatten(1, shape), layer,
                          nn.Flatten()).double().eval()
    for source in _every_form(model, tmp_path):
        assert_matches_torch(load_generator(source, trust_pickle=True).net, model, z, err_msg=str(source))


@pytest.mark.parametrize("layer,shape", [
    (nn.AdaptiveMaxPool2d(3), (2, 5, 4)),          # overlapping windows of 2 and 3 rows
    (nn.AdaptiveMaxPool2d((2, None)), (1, 4, 4)),
    (nn.AdaptiveMaxPool1d(5), (1, 7)),
    (nn.AdaptiveMaxPool2d(1), (2, 3, 3)),
    (nn.AdaptiveMaxPool1d(3), (7,)), (nn.AdaptiveMaxPool2d((2, 3)), (5, 7)),
    (nn.MaxPool2d(2), (4, 6))], ids=repr)
def test_adaptive_max_pooling_loads_from_every_form(tmp_path, z, layer, shape):
    """Adaptive max pooling is a max over windows [floor(i n / o), ceil((i + 1) n / o)),
    piecewise affine like MaxPool: it was refused as 'not known to be piecewise affine'.
    Torch pools (N, L) and (N, H, W) per sample as one channel: the 1-D layers pooled the
    wrong axis and kept every element (7 outputs, not 3), the 2-D ones pooled columns only
    (.pt2 MaxPool2d: a RuntimeError from max_pool1d)."""
    torch.manual_seed(2)
    n = int(np.prod(shape))
    model = nn.Sequential(nn.Linear(S, n), nn.Unflatten(1, shape), layer, nn.Flatten()).double().eval()
    sources = [model, export(model, tmp_path / "m.pt2")]
    if None not in np.atleast_1d(getattr(layer, "output_size", 1)):   # TorchScript: no None size
        torch.jit.script(model).save(str(tmp_path / "m.ts"))
        sources.append(tmp_path / "m.ts")
    for source in sources:
        assert_matches_torch(load_generator(source).net, model, z, err_msg=str(source))


@pytest.mark.parametrize("layer", [nn.MaxPool1d(2, return_indices=True),
                                   nn.AdaptiveMaxPool1d(2, return_indices=True)], ids=repr)
def test_max_pooling_that_returns_its_indices_is_refused_with_what_to_do(layer):
    """Such a layer returns (values, indices): the adaptive one was refused without a remedy,
    MaxPool loaded as if it returned the values alone (torch's forward of the same
    Sequential returns a tuple, or fails at the next layer)."""
    model = nn.Sequential(nn.Linear(S, 8), nn.Unflatten(1, (1, 8)), layer).double().eval()
    with pytest.raises(CpadgnError, match=r"layer 2: returns its indices too \(return_indices=True\), and a "
                                          r"generator's layers return one tensor; construct it with "
                                          r"return_indices=False"):
        load_generator(model)


@pytest.mark.parametrize("layer,match", [
    (nn.GroupNorm(1, 2), r"\(GroupNorm\)(: operation aten.group_norm)? normalises each sample by its own "
                         r"mean or scale, which is not piecewise affine in z; remove it, or use BatchNorm"),
    (nn.InstanceNorm1d(2), r"\(InstanceNorm1d\)(: operation aten.instance_norm)? normalises each sample"),
    (nn.Hardshrink(), r"\(Hardshrink\)(: operation aten.hardshrink)? jumps at its threshold: cpadgn's "
                      r"networks are continuous piecewise affine; replace it with ReLU or Softshrink"),
    (nn.Threshold(0.1, 0.0), r"\(Threshold\)(: operation aten.threshold)? jumps at its threshold")])
def test_norms_and_jumps_are_refused_with_the_reason_from_every_form(tmp_path, layer, match):
    """Per-sample normalisations were 'not supported (not known to be piecewise affine)',
    Hardshrink 'not supported yet' (it never can be: it jumps)."""
    model = nn.Sequential(nn.Linear(S, 4), nn.Unflatten(1, (2, 2)), layer, nn.Flatten(),
                          nn.Linear(4, 2)).double().eval()
    for source in _every_form(model, tmp_path):
        with pytest.raises(CpadgnError, match=match):
            load_generator(source, trust_pickle=True)


# ------------------------------------------------------------------- TorchScript
def test_torchscript_matches_torch(tmp_path, z):
    model = make_model()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "gen.ts"))
    g = load_generator(tmp_path / "gen.ts")
    assert g.source_format == "torchscript"
    assert_matches_torch(g.net, model, z)


def test_torchscript_nested_sequential_and_final_activation(tmp_path, z):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Sequential(nn.Linear(S, 4), nn.ReLU()), nn.Dropout(),
                          nn.Linear(4, 2, bias=False), nn.LeakyReLU(0.5)).double().eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "n.pt"))
    g = load_generator(tmp_path / "n.pt")
    assert g.net.hidden_sizes == (4, 2)
    assert_matches_torch(g.net, model, z)


@pytest.mark.parametrize("layer,kind", [(nn.Tanh(), "Tanh"), (nn.Sigmoid(), "Sigmoid"),
                                        (nn.GELU(), "GELU")])
def test_torchscript_refuses_non_cpa_naming_the_layer(tmp_path, layer, kind):
    model = nn.Sequential(nn.Linear(S, 4), nn.ReLU(), nn.Linear(4, 4), layer, nn.Linear(4, 2))
    torch.jit.save(torch.jit.script(model), str(tmp_path / "bad.ts"))
    with pytest.raises(CpadgnError, match=rf"layer 3 \({kind}\) is not piecewise affine"):
        load_generator(tmp_path / "bad.ts")


def test_flatten_over_the_batch_axis_is_refused(tmp_path):
    """nn.Flatten(0) merges the batch into the features: read layer by layer it gave a net
    with the per-sample output (a silently different model); now refused on every path."""
    model = nn.Sequential(nn.Linear(S, 4), nn.ReLU(), nn.Flatten(0)).double().eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "f.ts"))
    for source in (model, tmp_path / "f.ts", export(model, tmp_path / "f.pt2")):
        with pytest.raises(CpadgnError, match=r"layer 2.*mixing the batch axis with the features"):
            load_generator(source)


def test_torchscript_refuses_non_sequential(tmp_path):
    torch.jit.save(torch.jit.script(Residual()), str(tmp_path / "res.ts"))
    with pytest.raises(CpadgnError, match="Residual module, not an nn.Sequential.*torch.export"):
        load_generator(tmp_path / "res.ts")


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 4), nn.Linear(4, 3)

    def forward(self, z):
        h = self.a(z)
        return self.b(torch.relu(h if z.sum() > 0 else -h))


def test_failed_export_of_a_module_is_one_message_without_torch_logs(capfd):
    """torch.export of data-dependent control flow fails after logging the traced graph on
    stderr (~20 lines before the one-line error of the command line); cpadgn silences it."""
    import cpadgn
    with pytest.raises(CpadgnError, match="DataDependent module, not an nn.Sequential of known layers, so "
                       "cpadgn records its operations with torch.export, which failed.*make its forward"):
        cpadgn.load(DataDependent(), noise_std=0.1)
    assert capfd.readouterr().err == ""


class OutputDefinedFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.out, self.inp = nn.Linear(4, 3), nn.Linear(2, 4)     # 'out' defined first

    def forward(self, z):
        return self.out(torch.relu(self.inp(z)))


def test_a_wrong_latent_width_guess_says_how_to_give_it(tmp_path):
    """The latent width is guessed from the first Linear a module defines, which need not
    be the first it applies: the export then failed and the message blamed the forward's
    traceability ('no Python branch on a tensor's value'); it now names the shape tried
    and example_input (a live module) or torch.export.save (a pickle file)."""
    model = OutputDefinedFirst()
    with pytest.raises(CpadgnError, match=r"which failed on z of shape \(2, 4\) \(4: the input width of the "
                                          r"first Linear it defines\) \(.*\); if its latent dimension S is not 4, "
                                          r"pass example_input=torch.zeros\(2, S\); else make its forward"):
        load_generator(model)
    torch.save(model, tmp_path / "m.pkl")
    with pytest.raises(CpadgnError, match=r"if its latent dimension S is not 4, save it with "
                                          r"torch.export.save \(.pt2\) on z of shape \(N, S\)"):
        load_generator(tmp_path / "m.pkl", trust_pickle=True)
    g = load_generator(model, example_input=torch.zeros(2, 2))
    z = np.random.default_rng(0).normal(size=(50, 2)) * 2
    assert_matches_torch(g.net, copy.deepcopy(model).double(), z)


def test_traced_torchscript_without_layer_settings(tmp_path, z):
    """torch.jit.trace keeps a layer's tensors but not its settings (BatchNorm's eps, the
    LeakyReLU slope): an AttributeError escaped as an internal error; now one line naming
    the layer and torch.jit.script / torch.export.  A traced stack of Linear and ReLU
    layers needs no settings and loads."""
    model = make_model()
    torch.jit.save(torch.jit.trace(model, torch.zeros(2, S, dtype=torch.float64)), str(tmp_path / "t.ts"))
    with pytest.raises(CpadgnError, match=r"layer 1 \(BatchNorm1d\) has lost its attribute 'eps' .*"
                                          r"torch.jit.trace.*torch.jit.script.*torch.export.save"):
        load_generator(tmp_path / "t.ts")
    torch.manual_seed(2)
    plain = nn.Sequential(nn.Linear(S, 5), nn.ReLU(), nn.Linear(5, 2)).double().eval()
    torch.jit.save(torch.jit.trace(plain, torch.zeros(2, S, dtype=torch.float64)), str(tmp_path / "p.ts"))
    assert_matches_torch(load_generator(tmp_path / "p.ts").net, plain, z)


# ------------------------------------------------------------------------ pickle
def test_pickle_needs_trust(tmp_path, z):
    model = make_model()
    torch.save(model, str(tmp_path / "gen.pt"))
    with pytest.raises(CpadgnError, match="pickled PyTorch module.*--trust-pickle"):
        load_generator(tmp_path / "gen.pt")
    g = load_generator(tmp_path / "gen.pt", trust_pickle=True)
    assert g.source_format == "pickle"
    assert_matches_torch(g.net, model, z)
    # the legacy (non-zip) torch.save format too
    torch.save(model, str(tmp_path / "old.pt"), _use_new_zipfile_serialization=False)
    with pytest.raises(CpadgnError, match="--trust-pickle"):
        load_generator(tmp_path / "old.pt")
    g = load_generator(tmp_path / "old.pt", trust_pickle=True)
    assert_matches_torch(g.net, model, z)


def test_plain_pickle_refusal_prints_no_torch_warning(tmp_path, z):
    """A module written by pickle.dump (not torch.save) made torch's weights-only loader warn
    about its pickle protocol on stderr before cpadgn's one-line refusal (the refusal is
    now the only message), and with --trust-pickle it was 'cannot be unpickled: Invalid
    magic number' (torch.load reads torch.save files only): it loads now."""
    import pickle
    import warnings
    model = make_model()
    with open(tmp_path / "gen.pkl", "wb") as f:
        pickle.dump(model, f, protocol=4)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(CpadgnError, match="pickled PyTorch module.*--trust-pickle"):
            load_generator(tmp_path / "gen.pkl")
        g = load_generator(tmp_path / "gen.pkl", trust_pickle=True)
    assert not seen, [str(w.message) for w in seen]
    assert_matches_torch(g.net, model, z)


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = make_model()

    def forward(self, z):
        return 2 * self.inner(z) - 1


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def test_pickle_custom_modules_are_traced(tmp_path, z):
    # a custom layer in a Sequential, and a non-Sequential model: traced with torch.export
    model = make_model(abs_layer=True)
    torch.save(model, str(tmp_path / "abs.pt"))
    g = load_generator(tmp_path / "abs.pt", trust_pickle=True)
    assert_matches_torch(g.net, model, z)
    model = Wrapped().double().eval()
    torch.save(model, str(tmp_path / "wrapped.pt"))
    g = load_generator(tmp_path / "wrapped.pt", trust_pickle=True)
    assert_matches_torch(g.net, model, z)
    torch.save(Affinish().eval(), str(tmp_path / "aff.pt"))   # no Linear: S unknown
    with pytest.raises(CpadgnError, match="Affinish module, not an nn.Sequential.*no Linear layer") as e:
        load_generator(tmp_path / "aff.pt", trust_pickle=True)
    assert "example_input" not in str(e.value)      # a file cannot take one; torch.export can
    with pytest.raises(CpadgnError, match=r"no Linear layer .*; pass example_input"):
        load_generator(Affinish().eval())
    torch.save(nn.Sequential(nn.Linear(S, 4), Swish(), nn.Linear(4, 2)), str(tmp_path / "sw.pt"))
    with pytest.raises(CpadgnError, match=r"aten\.sigmoid is not piecewise affine"):
        load_generator(tmp_path / "sw.pt", trust_pickle=True)


def test_modules_in_training_mode_are_read_in_eval_mode(tmp_path, z):
    """A module left in train() mode is read as in eval mode (BatchNorm's running statistics,
    Dropout the identity), through the layer table and through torch.export alike, and is
    left in training mode; only a program already exported in training mode is refused."""
    model = make_model()
    want = copy.deepcopy(model)                      # eval mode
    model.train()
    torch.save(model, str(tmp_path / "train.pt"))
    for source in (model, Wrapped().double().train()):
        oracle = want if source is model else copy.deepcopy(source).eval()
        assert_matches_torch(load_generator(source).net, oracle, z)
        assert source.training and all(m.training for m in source.modules())
    assert_matches_torch(load_generator(tmp_path / "train.pt", trust_pickle=True).net, want, z)


def test_spectral_and_weight_norm_read_as_eval_computes_them(tmp_path, z):
    """torch.nn.utils.spectral_norm sets .weight in a forward pre-hook, so after an optimiser
    step the attribute is stale: the layer table read it and the folded net was 4e-3 off
    torch's eval forward here, silently.  Hooked layers are recorded with torch.export now; a
    parametrized Linear (parametrizations.spectral_norm, weight_norm) was refused for want of
    a latent dimension ('no Linear layer')."""
    from torch.nn.utils import spectral_norm
    from torch.nn.utils.parametrizations import spectral_norm as param_sn, weight_norm
    def trained(*layers):
        model = nn.Sequential(*layers).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):                              # training steps leave .weight stale
            loss = model(torch.randn(16, S, dtype=torch.float64)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return model

    torch.manual_seed(0)
    hooked = trained(spectral_norm(nn.Linear(S, 8)), nn.LeakyReLU(0.2), spectral_norm(nn.Linear(8, 5)))
    param = trained(param_sn(nn.Linear(S, 8)), nn.ReLU(), weight_norm(nn.Linear(8, 5)))
    torch.save(hooked, str(tmp_path / "sn.pt"))         # torch cannot pickle parametrized modules
    for source, model in ((hooked, hooked), (tmp_path / "sn.pt", hooked), (param, param)):
        net = load_generator(source, trust_pickle=True).net
        assert model.training
        assert_matches_torch(net, model.eval(), z, err_msg=str(source))   # eval: no power step
        model.train()
    seen = []                                           # a hook that records: traced, harmless
    plain = make_model()
    plain[2].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    assert_matches_torch(load_generator(plain).net, make_model(), z)
    plain[2].register_forward_hook(lambda m, i, o: seen.append(o.numpy()))   # torch.export cannot
    with pytest.raises(CpadgnError, match=r"layer 2 \(LeakyReLU\) has forward hooks.*remove hooks that only record"):
        load_generator(plain)


def test_pickle_refuses_state_dicts(tmp_path):
    torch.save(make_model().state_dict(), str(tmp_path / "sd.pt"))
    with pytest.raises(CpadgnError, match=r"holds a state_dict \(weights.*load_state_dict"):
        load_generator(tmp_path / "sd.pt")


def test_pickled_checkpoints_are_told_apart(tmp_path):
    """A training checkpoint dict is told for what it holds: a module under a key (it was
    called a state_dict, weights without the architecture), or a state_dict under a key."""
    model = make_model()
    torch.save({"model": model, "epoch": 3}, str(tmp_path / "ckpt.pt"))
    for trust in (False, True):
        torch.save({"state_dict": model.state_dict(), "epoch": 3}, str(tmp_path / "sd.pt"))
        with pytest.raises(CpadgnError, match=r"holds a state_dict under key 'state_dict' \(weights"):
            load_generator(tmp_path / "sd.pt", trust_pickle=trust)
    with pytest.raises(CpadgnError, match=r"module under key 'model', not the module itself.*checkpoint\['model'\]"):
        load_generator(tmp_path / "ckpt.pt", trust_pickle=True)
    torch.save({"epoch": 3}, str(tmp_path / "other.pt"))
    with pytest.raises(CpadgnError, match=r"holds a dict, not a module"):
        load_generator(tmp_path / "other.pt")


# ---------------------------------------------------------------- format detection
def test_format_detected_from_content_not_suffix(tmp_path, z):
    model = make_model()
    export(model, tmp_path / "a.pt2")
    shutil.copy(tmp_path / "a.pt2", tmp_path / "a.h5")
    assert load_generator(tmp_path / "a.h5").source_format == "torch-export"
    net = load_generator(tmp_path / "a.pt2").net
    save_model(tmp_path / "m.h5", net, noise_std=0.3)
    shutil.copy(tmp_path / "m.h5", tmp_path / "m.pt")
    g = load_generator(tmp_path / "m.pt")
    assert g.source_format == "cpadgn-h5"
    assert_matches_torch(g.net, model, z)
    assert detect_format(tmp_path / "m.pt") == "hdf5"


@pytest.mark.parametrize("content,match", [
    (b"", "empty"), (b"hello world, not a model", "not a recognised generator file"),
    (b"PK\x03\x04garbage", "zip archive but cannot be read"),
    (b"\x89HDF\r\n\x1a\n" + b"\0" * 100, "corrupt or truncated HDF5")])
def test_bad_generator_files(tmp_path, content, match):
    p = tmp_path / "bad.pt"
    p.write_bytes(content)
    with pytest.raises(CpadgnError, match=match):
        load_generator(p)
    with pytest.raises(CpadgnError, match="does not exist"):
        load_generator(tmp_path / "missing.pt2")


# ----------------------------------------------------------------- ops -> net
def test_ops_to_net_composition_rules():
    rng = np.random.default_rng(0)
    W1, b1 = rng.normal(size=(4, 2)), rng.normal(size=4)
    W2, b2 = rng.normal(size=(3, 4)), rng.normal(size=3)
    s, t = rng.uniform(0.5, 2, size=4), rng.normal(size=4)
    net = ops_to_net([Affine(W1, b1), Scale(s, t), Activation(np.array(0.1), "leaky"),
                      Activation(np.array(0.0), "relu"), Affine(W2, b2)])
    assert net.hidden_sizes == (4,)
    np.testing.assert_allclose(net.weights[0], s[:, None] * W1)
    np.testing.assert_array_equal(net.slopes[0], 0.0)
    z = rng.normal(size=(50, 2))
    u = z @ (s[:, None] * W1).T + s * b1 + t
    want = np.maximum(u, 0) @ W2.T + b2
    np.testing.assert_allclose(net.forward(z), want, rtol=0, atol=forward_rounding_tol(net, z).max())
    # a purely affine stack is a linear generator
    lin = ops_to_net([Affine(W1, b1), Affine(W2, b2)])
    assert lin.n_units == 0
    np.testing.assert_allclose(lin.weights[0], W2 @ W1)
    with pytest.raises(CpadgnError, match="expects 3 inputs but receives 4"):
        ops_to_net([Affine(W1, b1), Affine(rng.normal(size=(2, 3)), np.zeros(2))])


# ------------------------------------------------------------------ model file
def _net(seed=0, sizes=(2, 5, 4, 3)):
    rng = np.random.default_rng(seed)
    Ws = [rng.normal(size=(o, i)) for i, o in zip(sizes[:-1], sizes[1:])]
    bs = [rng.normal(size=o) for o in sizes[1:]]
    slopes = [np.full(sizes[1], 0.1), rng.uniform(-1, 1, size=sizes[2])]
    return PiecewiseAffineNet.from_arrays(Ws, bs, slopes[: len(sizes) - 2])


def test_model_file_round_trip_and_deterministic(tmp_path):
    net = _net()
    mean, cov = np.array([0.5, -1.0]), np.array([[2.0, 0.3], [0.3, 1.0]])
    kw = dict(prior_mean=mean, prior_cov=cov, noise_std=np.array([0.1, 0.2, 0.3]),
              attrs={"epochs": np.int64(10), "options": {"lr": 0.1, "layers": [5, 4]}},
              groups={"training": {"history": np.linspace(-3, -1, 7)},
                      "encoder": {"layer0/weight": np.ones((4, 3)), "names": np.array(["a", "b"])}})
    save_model(tmp_path / "a.h5", net, **kw)
    save_model(tmp_path / "b.h5", net, **kw)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert digest(tmp_path / "a.h5") == digest(tmp_path / "b.h5")
    g = read_model(tmp_path / "a.h5")
    assert g.source_format == "cpadgn-h5" and g.net.fingerprint() == net.fingerprint()
    np.testing.assert_array_equal(g.prior_mean, mean)
    np.testing.assert_array_equal(g.prior_cov, cov)
    np.testing.assert_array_equal(g.noise_std, [0.1, 0.2, 0.3])
    assert g.extra["attrs"] == {"epochs": 10, "options": {"lr": 0.1, "layers": [5, 4]}}
    np.testing.assert_array_equal(g.extra["groups"]["training"]["history"], np.linspace(-3, -1, 7))
    np.testing.assert_array_equal(g.extra["groups"]["encoder"]["layer0/weight"], np.ones((4, 3)))
    assert list(g.extra["groups"]["encoder"]["names"]) == ["a", "b"]
    with h5py.File(tmp_path / "a.h5") as f:
        assert f.attrs["format"] == "cpadgn-model" and f.attrs["format_version"] == 1
        assert list(f["generator"].attrs["activations"]) == ["leaky_relu:0.1", "prelu"]
    # linear generator, scalar noise, default prior
    lin = PiecewiseAffineNet.from_arrays([np.ones((3, 2))], [np.zeros(3)], [])
    save_model(tmp_path / "lin.h5", lin, noise_std=0.5)
    g = read_model(tmp_path / "lin.h5")
    assert g.net.n_units == 0 and g.noise_std.shape == () and g.noise_std == 0.5
    np.testing.assert_array_equal(g.prior_cov, np.eye(2))


def _replace(f, name, fn):
    """Replace dataset ``name`` of the open file f by fn(its value)."""
    value = fn(f[name][()])
    del f[name]
    f[name] = value


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


@pytest.mark.parametrize("edit,match", [
    (lambda f: f.attrs.__delitem__("format"), "HDF5 file but not a cpadgn model .no 'format'"),
    (lambda f: f.attrs.__setitem__("format", "cpadgn-partition"), "partition cache, not a model"),
    (lambda f: f.attrs.__setitem__("format_version", 7), "newer cpadgn"),
    (lambda f: f["generator/weight_1"].__setitem__((0, 0), np.nan), "non-finite"),
    (lambda f: (f["generator"].__delitem__("bias_1"),
                f["generator"].create_dataset("bias_1", data=np.zeros(7))), "do not match"),
    (lambda f: f["generator"].__delitem__("slope_0"), "slope_0 is missing"),
    (lambda f: f["prior/cov"].__setitem__((), [[1.0, 2.0], [2.0, 1.0]]), "not positive definite"),
    (lambda f: f["prior/cov"].__setitem__((), [[1.0, 0.5], [0.0, 1.0]]), "not symmetric"),
    # save_model always writes the prior: a missing one was dropped, not N(0, I) (h68)
    (lambda f: f["prior"].__delitem__("mean"), "/prior/mean is missing"),
    (lambda f: f["prior"].__delitem__("cov"), "/prior/cov is missing"),
    (lambda f: f.__delitem__("prior"), "/prior/mean is missing"),
    # no latent input (S = 0) or no output: an internal IndexError in the enumeration (h68)
    (lambda f: (f["generator"].__delitem__("weight_0"), f["generator"].create_dataset("weight_0", data=np.zeros((5, 0))),
                f.attrs.__delitem__("latent_dim")), "latent dimension is 0"),
    (lambda f: (f["generator"].__delitem__("weight_2"), f["generator"].create_dataset("weight_2", data=np.zeros((0, 4))),
                f["generator"].__delitem__("bias_2"), f["generator"].create_dataset("bias_2", data=np.zeros(0)),
                f.attrs.__delitem__("output_dim")), "output dimension is 0"),
    # complex values lost their imaginary part with a ComplexWarning: a wrong model, exit 0 (h68)
    (lambda f: _replace(f, "generator/weight_1", lambda a: a + 1j * a), "/generator/weight_1 holds complex"),
    (lambda f: _replace(f, "prior/cov", lambda a: a + 0j), "/prior/cov holds complex"),
])
def test_model_file_validation(tmp_path, edit, match):
    p = tmp_path / "m.h5"
    save_model(p, _net(), noise_std=0.5)
    _edit(p, edit)
    with pytest.raises(CpadgnError, match=match):
        read_model(p)


def test_a_model_path_that_is_a_pipe_is_refused_not_waited_on(tmp_path):
    """A named pipe as MODEL (with no writer: open() blocked forever; <(cat gen.h5): 'not an
    HDF5 file' or 'may be truncated') is refused at once: a model is read from a file (h68)."""
    from test_cache import run_on_named_pipe
    out = run_on_named_pipe(
        "from cpadgn.errors import CpadgnError\n"
        "from cpadgn.loading import load_generator\n"
        "try:\n"
        "    load_generator(FIFO)\n"
        "except CpadgnError as e:\n"
        "    print(e)\n", tmp_path / "gen.h5")
    assert "not a regular file" in out and "save it to a file" in out


def test_model_file_foreign_and_corrupt(tmp_path):
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.zeros((3, 3))
    with pytest.raises(CpadgnError, match="HDF5 file but not a cpadgn model"):
        load_generator(tmp_path / "foreign.h5")
    save_model(tmp_path / "m.h5", _net())
    data = (tmp_path / "m.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(CpadgnError, match="m.h5|cut.h5"):
        read_model(tmp_path / "cut.h5")


def test_save_model_validates_and_is_atomic(tmp_path, monkeypatch):
    net = _net()
    with pytest.raises(CpadgnError, match="noise std"):
        save_model(tmp_path / "m.h5", net, noise_std=0.0)
    with pytest.raises(CpadgnError, match="prior covariance has shape"):
        save_model(tmp_path / "m.h5", net, prior_cov=np.eye(3))
    save_model(tmp_path / "m.h5", net, noise_std=0.5)
    before = (tmp_path / "m.h5").read_bytes()

    calls = {"n": 0}
    orig = h5py.Group.create_dataset

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return orig(self, *a, **k)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(CpadgnError, match="could not write.*no space left on device; free space"):
        save_model(tmp_path / "m.h5", _net(1), noise_std=0.5)
    assert (tmp_path / "m.h5").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5"]


def test_a_bad_stored_noise_std_is_replaced_by_one_given_at_load(tmp_path):
    """A file with noise std <= 0 says so and asks for a noise std; one given then works
    (through the library and the CLI's --noise-std alike)."""
    import cpadgn
    from click.testing import CliRunner

    from cli.main import main
    p = tmp_path / "m.h5"
    save_model(p, _net(), noise_std=0.5)
    _edit(p, lambda f: f["noise/std"].__setitem__((), -1.0))
    X = np.random.default_rng(0).normal(size=(5, _net().output_dim))
    with pytest.raises(CpadgnError, match="noise std must be finite and > 0.*pass --noise-std"):
        cpadgn.load(p, cache=False).log_prob(X)
    _edit(p, lambda f: _replace(f, "noise/std", lambda a: 0.5 + 0.5j))   # was cut to 0.5 (h68)
    with pytest.raises(CpadgnError, match="/noise/std holds complex numbers.*pass --noise-std"):
        cpadgn.load(p, cache=False).log_prob(X)
    good = cpadgn.load(p, noise_std=0.5, cache=False).log_prob(X)
    np.testing.assert_array_equal(good, cpadgn.CPAModel(_net(), noise_std=0.5, device="cpu").log_prob(X))
    np.savetxt(tmp_path / "x.csv", X, delimiter=",")
    res = CliRunner().invoke(main, ["score", str(p), str(tmp_path / "x.csv"), "-o", str(tmp_path / "s.csv"),
                                    "--noise-std", "0.5", "-q", "--cache", str(tmp_path / "c.h5")])
    assert res.exit_code == 0, res.output
    with pytest.raises(CpadgnError, match="noise std must be a positive number .*'abc'"):
        cpadgn.load(p, noise_std="abc", cache=False)


def test_cached_partition_run_reuses_the_stored_check(tmp_path, monkeypatch):
    """The 100,000-sample check runs once; later runs read it from the cache."""
    import json
    from click.testing import CliRunner
    import cpadgn.partition
    from cli.main import main
    shutil.copy("sample_data/wave_generator.h5", tmp_path / "g.h5")
    first = CliRunner().invoke(main, ["partition", str(tmp_path / "g.h5"), "--json"])
    assert first.exit_code == 0, first.output

    def no_check(*a, **k):
        raise AssertionError("check_partition ran again")

    monkeypatch.setattr(cpadgn.partition, "check_partition", no_check)
    second = CliRunner().invoke(main, ["partition", str(tmp_path / "g.h5"), "--json"])
    assert second.exit_code == 0, second.output
    a, b = json.loads(first.output), json.loads(second.output)
    for key in ("prior_mass_sum", "samples_located", "interior_points_ok", "regions"):
        assert a[key] == b[key]


def test_a_live_module_keeps_its_partition_in_the_cache_it_is_given(tmp_path):
    """README, Bring your own decoder: a module in memory has no cache unless given one;
    cache=PATH stores its partition and a second load reads it (a retrained decoder recomputes)."""
    import cpadgn
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    assert cpadgn.load(dec, noise_std=0.1).cache_path is None
    m = cpadgn.load(dec, noise_std=0.1, cache=tmp_path / "dec.partition.h5")
    m.partition()
    assert m.partition_status == "computed" and (tmp_path / "dec.partition.h5").exists()
    again = cpadgn.load(dec, noise_std=0.1, cache=tmp_path / "dec.partition.h5")
    again.partition()
    assert again.partition_status == "loaded"
    with torch.no_grad():
        dec[0].bias += 1.0
    retrained = cpadgn.load(dec, noise_std=0.1, cache=tmp_path / "dec.partition.h5")
    retrained.partition()
    assert retrained.partition_status.startswith("replaced")


def test_load_cache_true_means_the_default_cache_and_a_bad_cache_argument_says_so(tmp_path):
    """cache=True (the opposite of cache=False) is the default cache beside a file; it ended
    in a TypeError from pathlib at the first partition (h68).  A live module has no default
    cache, and a cache argument that is no path is refused at load with what to pass."""
    import cpadgn
    save_model(tmp_path / "g.h5", _net(), noise_std=0.5)
    m = cpadgn.load(tmp_path / "g.h5", cache=True)
    assert m.cache_path == tmp_path / "g.h5.partition.h5"
    m.partition()
    assert m.partition_status == "computed" and (tmp_path / "g.h5.partition.h5").exists()
    dec = nn.Sequential(nn.Linear(2, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with pytest.raises(CpadgnError, match="cache=True needs a model file.*cache=PATH"):
        cpadgn.load(dec, noise_std=0.1, cache=True)
    with pytest.raises(CpadgnError, match="cache must be a path, True, False or None"):
        cpadgn.load(tmp_path / "g.h5", cache=3)


class ConvDecoder(nn.Module):
    """S -> 2 x 3 x 3 -> a transposed convolution (its 2 x 2 x 2 x 2 kernel shared by every
    pixel) -> 2 x 6 x 6 -> flattened, with a residual block before it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc, self.res = nn.Linear(S, 18), nn.Linear(18, 18)
        self.up = nn.ConvTranspose2d(2, 2, 2, stride=2)

    def forward(self, z):
        h = torch.relu(self.fc(z))
        h = h + nn.functional.leaky_relu(self.res(h), 0.1)
        return self.up(h.reshape(-1, 2, 3, 3)).flatten(1)


def test_a_torch_decoder_counts_its_trained_parameters_not_its_dense_form(tmp_path, z):
    """k for AIC and BIC: a convolution's dense matrix (72 x 18 here) and a skip
    connection's pass-through units were counted as weights, 35,297 against 909 torch
    parameters on a new user's conv decoder.  Oracle: torch's own count of the module's
    parameters (BatchNorm's running statistics are buffers, not counted); a cpadgn file's
    dense arrays are its parameters."""
    import cpadgn
    conv, seq = ConvDecoder().double().eval(), make_model()
    torch.save(seq, str(tmp_path / "seq.pt"))
    torch.jit.save(torch.jit.script(seq), str(tmp_path / "seq.ts"))
    cases = [(conv, conv), (export(conv, tmp_path / "conv.pt2"), conv), (seq, seq),
             (tmp_path / "seq.ts", seq), (tmp_path / "seq.pt", seq)]
    for source, module in cases:
        model = cpadgn.load(source, noise_std=0.1, cache=False, trust_pickle=True)
        want = sum(p.numel() for p in module.parameters()) + 1         # + the noise std
        assert model.n_parameters == want, source
    assert_matches_torch(load_generator(conv).net, conv, z)
    assert load_generator(conv).net.n_parameters > 5 * sum(p.numel() for p in conv.parameters())
    net = load_generator(seq).net
    save_model(tmp_path / "dense.h5", net, noise_std=np.full(4, 0.1))
    assert cpadgn.load(tmp_path / "dense.h5", cache=False).n_parameters == net.n_parameters + 4


def test_reprs_show_the_architecture_not_the_weights():
    """In a notebook, a model showed <cpadgn.model.CPAModel object at 0x...> and its
    generator the dataclass repr of every weight (~12,000 characters for the digits model)."""
    from cpadgn.model import CPAModel
    W = (np.ones((5, 2)), np.ones((7, 5)))
    net = PiecewiseAffineNet.from_arrays(W, (np.zeros(5), np.zeros(7)), (0.1,))
    assert repr(net) == "PiecewiseAffineNet(latent_dim=2, hidden_sizes=(5,), output_dim=7)"
    model = CPAModel(net, noise_std=0.25, device="cpu")
    assert repr(model) == ("CPAModel(latent_dim=2, hidden_sizes=(5,), output_dim=7, noise_std=0.25, "
                           "cache_path=None)")
    diag = CPAModel(net, noise_std=np.linspace(0.1, 0.7, 7), device="cpu", cache_path="m.partition.h5")
    assert "noise_std=<7 stds in [0.1, 0.7]>, cache_path='m.partition.h5')" in repr(diag)
    assert "noise_std=None" in repr(CPAModel(net, device="cpu"))
