"""Differential fuzzer of the decoder loader: random small PyTorch decoders (S = 2, some
S = 3) drawn from the supported layers, each loaded through every path that applies (the
layer table of an nn.Sequential, TorchScript, torch.export, a live custom module) and
checked against torch itself:

  (a) the loaded net's forward equals the float64 torch module's at random and far-out z,
      within the rounding bound of tests/oracles.py::forward_rounding_tol;
  (b) the partition's prior masses sum to 1 (S = 2: within 4 R eps; S = 3: 1e-10) and every
      prior sample lands in a listed region;
  (c) exact log p(x) of two rows drawn from the model and one outlier against an oracle
      computed from torch's forward pass alone (S = 2: nested trapezoid grids over the
      posterior's box, error estimated by halving the step; S = 3: defensive importance
      sampling with its standard error);
  (d) decoders with a layer that is not piecewise affine, or an unsupported option, are
      refused with a one-line CpadgnError (or, if they load, must pass (a)).

Prints one line per failure and a summary with counts per layer kind / option.

    python benchmarks/fuzz_loader.py [--seed 0] [--count 100] [--minutes M] [--only N ...] [--verbose]
"""
from __future__ import annotations

import argparse
import collections
import copy
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import cpadgn  # noqa: E402
from cpadgn.errors import CpadgnError  # noqa: E402
from cpadgn.partition import check_partition, compute_partition  # noqa: E402
from oracles import forward_rounding_tol, loglik_2d  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(1)
MAX_UNITS = {2: 70, 3: 22}


# ============================================================ random architectures
class Shape:
    """Per-sample shape tracker: ('flat', F) | ('1d', C, L) | ('2d', C, H, W)."""


def _ch(shape):
    return shape[0] if len(shape) > 1 else None


def _act(rng, shape, tags):
    """A random supported activation for features of this shape."""
    kind = rng.choice(["ReLU", "LeakyReLU", "PReLU", "Hardtanh", "ReLU6", "ReLU-inplace"],
                      p=[0.3, 0.25, 0.2, 0.1, 0.05, 0.1])
    if kind == "LeakyReLU":
        slope = float(rng.choice([0.01, 0.2, -0.3, 1.5, 0.0]))
        tags.append(f"LeakyReLU({slope:g})")
        return nn.LeakyReLU(slope)
    if kind == "PReLU":
        per_channel = len(shape) > 1 and rng.random() < 0.6
        m = nn.PReLU(shape[0] if per_channel else 1)
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(rng.uniform(-0.6, 0.6, m.weight.shape)).float())
        tags.append("PReLU(per-channel)" if per_channel else "PReLU(1)")
        return m
    if kind == "Hardtanh":
        lo = float(rng.uniform(-1.5, 0.2))
        tags.append("Hardtanh")
        return nn.Hardtanh(lo, lo + float(rng.uniform(0.3, 2.0)))
    if kind == "ReLU-inplace":
        tags.append("ReLU(inplace)")
        return nn.ReLU(inplace=True)
    tags.append(kind)
    return getattr(nn, kind)()


def _bn(rng, C, dims):
    m = (nn.BatchNorm1d if dims <= 1 else nn.BatchNorm2d)(C, affine=bool(rng.random() < 0.8))
    with torch.no_grad():
        m.running_mean.copy_(torch.from_numpy(rng.normal(size=C)).float())
        m.running_var.copy_(torch.from_numpy(rng.uniform(0.3, 2.0, C)).float())
        if m.affine:
            m.weight.copy_(torch.from_numpy(rng.normal(size=C)).float())
            m.bias.copy_(torch.from_numpy(rng.normal(size=C)).float())
    m.eps = float(rng.choice([1e-5, 1e-3, 0.1]))
    return m


def _layer_2d(rng, shape, tags):
    C, H, W = shape
    kind = rng.choice(["Conv2d", "ConvTranspose2d", "BatchNorm2d", "AvgPool2d", "MaxPool2d",
                       "Upsample", "act", "Pad", "Identity", "Dropout2d", "AdaptiveAvgPool2d",
                       "PixelShuffle"],
                      p=[0.17, 0.14, 0.07, 0.07, 0.17, 0.09, 0.12, 0.05, 0.02, 0.02, 0.03, 0.05])
    if kind == "Conv2d":
        k = int(rng.integers(1, 4))
        groups = int(rng.choice([g for g in (1, 2) if C % g == 0]))
        Cout = groups * int(rng.integers(1, 3))
        stride, dil = int(rng.choice([1, 1, 2])), int(rng.choice([1, 1, 2]))
        pad = int(rng.integers(0, k))
        mode = str(rng.choice(["zeros", "zeros", "reflect", "replicate", "circular"]))
        tags.append(f"Conv2d(k{k},s{stride},p{pad},d{dil},g{groups},{mode})")
        return nn.Conv2d(C, Cout, k, stride, pad, dil, groups, bias=bool(rng.random() < 0.8),
                         padding_mode=mode)
    if kind == "ConvTranspose2d":
        k = int(rng.integers(1, 4))
        groups = int(rng.choice([g for g in (1, 2) if C % g == 0]))
        Cout = groups * int(rng.integers(1, 3))
        stride, dil = int(rng.choice([1, 2])), int(rng.choice([1, 1, 2]))
        pad = int(rng.integers(0, k))
        opad = int(rng.integers(0, max(stride, dil)))
        tags.append(f"ConvTranspose2d(k{k},s{stride},p{pad},op{opad},d{dil},g{groups})")
        return nn.ConvTranspose2d(C, Cout, k, stride, pad, opad, groups, bool(rng.random() < 0.8), dil)
    if kind == "BatchNorm2d":
        tags.append("BatchNorm2d")
        return _bn(rng, C, 2)
    if kind == "AvgPool2d":
        k = int(rng.integers(1, 4))
        s = int(rng.integers(1, k + 1))
        p = int(rng.integers(0, k // 2 + 1))
        ceil, cip = bool(rng.random() < 0.4), bool(rng.random() < 0.5)
        div = int(rng.integers(1, 5)) if rng.random() < 0.2 else None
        tags.append(f"AvgPool2d(k{k},s{s},p{p},ceil{int(ceil)},cip{int(cip)},div{div})")
        return nn.AvgPool2d(k, s, p, ceil, cip, div)
    if kind == "MaxPool2d":
        k = int(rng.integers(2, 4))
        s = int(rng.integers(1, k + 1))
        p = int(rng.integers(0, k // 2 + 1))
        d = int(rng.choice([1, 1, 2]))
        ceil = bool(rng.random() < 0.4)
        tags.append(f"MaxPool2d(k{k},s{s},p{p},d{d},ceil{int(ceil)},{'overlap' if s < k else 'tile'})")
        return nn.MaxPool2d(k, s, p, d, ceil_mode=ceil)
    if kind == "Upsample":
        mode = str(rng.choice(["nearest", "nearest", "bilinear", "nearest-exact"]))
        sf = [2, (1, 2), (2, 1), 1.5][int(rng.integers(4))]
        ac = bool(rng.random() < 0.5) if mode == "bilinear" else None
        tags.append(f"Upsample({mode},{sf}{',ac' if ac else ''})")
        return nn.Upsample(scale_factor=sf, mode=mode, align_corners=ac)
    if kind == "act":
        return _act(rng, shape, tags)
    if kind == "Pad":
        pk = str(rng.choice(["ZeroPad2d", "ConstantPad2d", "ReflectionPad2d", "ReplicationPad2d"]))
        p = tuple(int(v) for v in rng.integers(0, 2, 4))
        tags.append(pk)
        return nn.ConstantPad2d(p, float(rng.normal())) if pk == "ConstantPad2d" else getattr(nn, pk)(p)
    if kind == "AdaptiveAvgPool2d":
        tags.append("AdaptiveAvgPool2d")
        return nn.AdaptiveAvgPool2d((max(1, H - 1), max(1, W // 2 + 1)))
    if kind == "PixelShuffle":
        if C % 4 == 0:
            tags.append("PixelShuffle")
            return nn.PixelShuffle(2)
        tags.append("PixelUnshuffle")
        return nn.PixelUnshuffle(2)
    tags.append(kind)
    return nn.Identity() if kind == "Identity" else nn.Dropout2d(0.3)


def _layer_1d(rng, shape, tags):
    C, L = shape
    kind = rng.choice(["Conv1d", "ConvTranspose1d", "BatchNorm1d", "AvgPool1d", "MaxPool1d",
                       "Upsample", "act", "Dropout"], p=[0.2, 0.15, 0.1, 0.1, 0.2, 0.08, 0.15, 0.02])
    if kind == "Conv1d":
        k = int(rng.integers(1, 4))
        stride, dil, pad = int(rng.choice([1, 2])), int(rng.choice([1, 2])), int(rng.integers(0, k))
        mode = str(rng.choice(["zeros", "reflect", "replicate", "circular"]))
        tags.append(f"Conv1d(k{k},s{stride},p{pad},d{dil},{mode})")
        return nn.Conv1d(C, int(rng.integers(1, 3)), k, stride, pad, dil, padding_mode=mode)
    if kind == "ConvTranspose1d":
        k, stride = int(rng.integers(1, 4)), int(rng.choice([1, 2]))
        pad, opad = int(rng.integers(0, k)), int(rng.integers(0, stride))
        tags.append(f"ConvTranspose1d(k{k},s{stride},p{pad},op{opad})")
        return nn.ConvTranspose1d(C, int(rng.integers(1, 3)), k, stride, pad, opad)
    if kind == "BatchNorm1d":
        tags.append("BatchNorm1d(C,L)")
        return _bn(rng, C, 1)
    if kind == "AvgPool1d":
        k = int(rng.integers(1, 4))
        s, p = int(rng.integers(1, k + 1)), int(rng.integers(0, k // 2 + 1))
        ceil, cip = bool(rng.random() < 0.4), bool(rng.random() < 0.5)
        tags.append(f"AvgPool1d(k{k},s{s},p{p},ceil{int(ceil)},cip{int(cip)})")
        return nn.AvgPool1d(k, s, p, ceil, cip)
    if kind == "MaxPool1d":
        k = int(rng.integers(2, 4))
        s, p, d = int(rng.integers(1, k + 1)), int(rng.integers(0, k // 2 + 1)), int(rng.choice([1, 2]))
        ceil = bool(rng.random() < 0.4)
        tags.append(f"MaxPool1d(k{k},s{s},p{p},d{d},ceil{int(ceil)})")
        return nn.MaxPool1d(k, s, p, d, ceil_mode=ceil)
    if kind == "Upsample":
        mode = str(rng.choice(["nearest", "linear"]))
        tags.append(f"Upsample1d({mode})")
        return nn.Upsample(scale_factor=2, mode=mode)
    if kind == "act":
        return _act(rng, shape, tags)
    tags.append("Dropout")
    return nn.Dropout(0.5)


def _layer_flat(rng, shape, tags):
    (F,) = shape
    kind = rng.choice(["Linear", "BatchNorm1d", "act", "Dropout", "Identity", "MaxPool1d-flat",
                       "AvgPool1d-flat"], p=[0.35, 0.12, 0.35, 0.04, 0.04, 0.05, 0.05])
    if kind == "Linear":
        tags.append("Linear")
        return nn.Linear(F, int(rng.integers(2, 9)), bias=bool(rng.random() < 0.85))
    if kind == "BatchNorm1d":
        tags.append("BatchNorm1d(F)")
        return _bn(rng, F, 1)
    if kind == "act":
        return _act(rng, shape, tags)
    if kind == "MaxPool1d-flat":       # torch reads (N, F) as one unbatched (C = N, L = F) signal
        tags.append("MaxPool1d(flat)")
        return nn.MaxPool1d(2, int(rng.integers(1, 3)))
    if kind == "AvgPool1d-flat":
        tags.append("AvgPool1d(flat)")
        return nn.AvgPool1d(2, int(rng.integers(1, 3)))
    tags.append(kind)
    return nn.Dropout(0.2) if kind == "Dropout" else nn.Identity()


def _out_shape(layers, S):
    """The per-sample output shape; raises where torch's output is not finite (a max-pooling
    window of padding only gives -inf for every input, which the loader rightly refuses)."""
    with torch.no_grad():
        out = nn.Sequential(*layers).eval()(torch.zeros(2, S))
    if not torch.isfinite(out).all():
        raise ValueError("torch's output is not finite")
    return tuple(out.shape[1:])


def _hidden_features(layers, S):
    """Features entering every activation (a rough count of hidden units)."""
    total, h = 0, torch.zeros(2, S)
    with torch.no_grad():
        for m in layers:
            h = m.eval()(h)
            if isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Hardtanh)):
                total += h[0].numel() * (2 if isinstance(m, nn.Hardtanh) else 1)
            if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
                total += 2 * h[0].numel() * int(np.prod(np.atleast_1d(m.kernel_size)))
    return total


def random_sequential(rng, S, tags):
    """An nn.Sequential: Linear(S, ...), act, a random track (flat, 1-d or 2-d), Flatten, Linear."""
    track = rng.choice(["flat", "1d", "2d"], p=[0.25, 0.25, 0.5])
    layers = []
    if rng.random() < 0.05:
        layers.append(_act(rng, (S,), tags))      # an activation on z itself
    if track == "flat":
        F = int(rng.integers(3, 9))
        layers += [nn.Linear(S, F), _act(rng, (F,), tags)]
        shape = (F,)
    elif track == "1d":
        C, L = int(rng.integers(1, 3)), int(rng.integers(3, 7))
        layers += [nn.Linear(S, C * L), _act(rng, (C * L,), tags), nn.Unflatten(1, (C, L))]
        shape = (C, L)
    else:
        C, H, W = int(rng.choice([1, 2, 4])), int(rng.integers(2, 4)), int(rng.integers(2, 4))
        if C == 4:
            H, W = 2, 2
        layers += [nn.Linear(S, C * H * W), _act(rng, (C * H * W,), tags), nn.Unflatten(1, (C, H, W))]
        shape = (C, H, W)
    pick = {1: _layer_flat, 2: _layer_1d, 3: _layer_2d}
    n_layers = int(rng.integers(1, 5))
    tries = 0
    while n_layers > 0 and tries < 40:
        tries += 1
        sub = []
        m = pick[len(shape)](rng, shape, sub)
        try:
            new = _out_shape(layers + [m], S)
        except Exception:
            continue
        if int(np.prod(new)) > 48 or min(new) < 1 or \
                _hidden_features(layers + [m], S) > MAX_UNITS[S]:
            continue
        layers.append(m)
        tags += sub
        shape = new
        n_layers -= 1
    if len(shape) > 1:
        layers.append(nn.Flatten())
    F = int(np.prod(shape))
    if rng.random() < 0.8 or F < 2:
        layers.append(nn.Linear(F, int(rng.integers(2, 7))))
    return nn.Sequential(*layers)


# ------------------------------------------------------------- custom graph modules
class Block(nn.Module):
    """One graph block on flat features of width F (recorded with torch.export)."""

    def __init__(self, kind, F, rng):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(F, F), nn.Linear(F, F)
        self.c = float(rng.uniform(0.1, 0.9))
        self.lo = float(rng.uniform(-1, 0))
        self.const = nn.Parameter(torch.from_numpy(rng.normal(size=F)).float(), requires_grad=False)

    def forward(self, h):
        k = self.kind
        if k == "residual":
            return h + torch.relu(self.a(h))
        if k == "residual-inplace":
            out = nn.functional.relu(self.a(h), inplace=True)
            out += h
            return out
        if k == "two-branch":
            return nn.functional.leaky_relu(self.a(h), 0.2) + self.b(h)
        if k == "maximum":
            return torch.maximum(self.a(h), self.b(h))
        if k == "minimum":
            return torch.minimum(self.a(h), self.b(h))
        if k == "max-other":
            return torch.max(self.a(h), self.const)
        if k == "min-other":
            return torch.min(self.a(h), self.const)
        if k == "clamp":
            return torch.clamp(self.a(h), self.lo, self.lo + 1.0)
        if k == "clamp-min":
            return torch.clamp(self.a(h), min=self.lo)
        if k == "clamp-max":
            return torch.clamp(self.a(h), max=-self.lo)
        if k == "abs":
            return torch.abs(self.a(h))
        if k == "where":
            u = self.a(h)
            return torch.where(u > 0, u, self.c * u)
        if k == "where-lt":
            u = self.a(h)
            return torch.where(u < 0, -self.c * u, u)
        if k == "leaky-max":
            u = self.a(h)
            return torch.maximum(u, self.c * u)
        if k == "leaky-min":
            u = self.a(h)
            return torch.minimum(u, self.c * u)
        if k == "cat":
            half = h.shape[1] // 2
            return self.b(torch.cat([torch.relu(self.a(h))[:, :half], h[:, half:]], dim=1))
        if k == "scale":
            return torch.relu(self.a(h) * 2.0 - 0.5) / 3.0
        if k == "neg-sub":
            return 1.0 - torch.relu(-self.a(h))
        raise AssertionError(k)


BLOCKS = ("residual", "residual-inplace", "two-branch", "maximum", "minimum", "max-other",
          "min-other", "clamp", "clamp-min", "clamp-max", "abs", "where", "where-lt", "leaky-max",
          "leaky-min", "cat", "scale", "neg-sub")


class ConvResidual(nn.Module):
    def __init__(self, C, rng):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.pool = bool(rng.random() < 0.5)

    def forward(self, x):
        out = x + torch.relu(self.conv(x))
        return nn.functional.max_pool2d(out, 2, 1, 0) if self.pool else out


class GraphDecoder(nn.Module):
    def __init__(self, S, rng, tags):
        super().__init__()
        F = int(rng.integers(3, 6))
        self.inp = nn.Linear(S, F)
        self.image = rng.random() < 0.25
        if self.image:
            self.C = 1
            self.inp = nn.Linear(S, 9)
            self.blocks = nn.ModuleList([ConvResidual(1, rng)])
            tags.append("conv-residual" + ("+maxpool" if self.blocks[0].pool else ""))
            F = 4 if self.blocks[0].pool else 9
        else:
            kinds = rng.choice(BLOCKS, size=int(rng.integers(1, 3 if S == 2 else 2)))
            self.blocks = nn.ModuleList(Block(str(k), F, rng) for k in kinds)
            tags += [f"block:{k}" for k in kinds]
        self.out = nn.Linear(F, int(rng.integers(2, 6)))

    def forward(self, z):
        h = torch.relu(self.inp(z))
        if self.image:
            h = h.reshape(-1, 1, 3, 3)
        for blk in self.blocks:
            h = blk(h)
        return self.out(h.flatten(1))


# ============================================================ not piecewise affine
BAD_LAYERS = {
    "Tanh": lambda s: nn.Tanh(), "Sigmoid": lambda s: nn.Sigmoid(), "GELU": lambda s: nn.GELU(),
    "ELU": lambda s: nn.ELU(), "SELU": lambda s: nn.SELU(), "CELU": lambda s: nn.CELU(),
    "SiLU": lambda s: nn.SiLU(), "Mish": lambda s: nn.Mish(), "Softplus": lambda s: nn.Softplus(),
    "Softsign": lambda s: nn.Softsign(), "Hardsigmoid": lambda s: nn.Hardsigmoid(),
    "Hardswish": lambda s: nn.Hardswish(), "LogSigmoid": lambda s: nn.LogSigmoid(),
    "Tanhshrink": lambda s: nn.Tanhshrink(), "Softmax": lambda s: nn.Softmax(dim=1),
    "LogSoftmax": lambda s: nn.LogSoftmax(dim=1), "Softmin": lambda s: nn.Softmin(dim=1),
    "Threshold": lambda s: nn.Threshold(0.1, 0.0), "RReLU": lambda s: nn.RReLU(),
    "Hardshrink": lambda s: nn.Hardshrink(), "Softshrink": lambda s: nn.Softshrink(),
    "LayerNorm": lambda s: nn.LayerNorm(s), "GroupNorm": lambda s: nn.GroupNorm(1, s[0]),
    "InstanceNorm": lambda s: (nn.InstanceNorm1d if len(s) == 2 else nn.InstanceNorm2d)(s[0]),
    "InstanceNorm-tracked": lambda s: (nn.InstanceNorm1d if len(s) == 2 else nn.InstanceNorm2d)(
        s[0], track_running_stats=True),
    "BatchNorm-untracked": lambda s: (nn.BatchNorm1d if len(s) <= 2 else nn.BatchNorm2d)(
        s[0], track_running_stats=False),
    "AdaptiveMaxPool": lambda s: (nn.AdaptiveMaxPool1d(2) if len(s) == 2 else nn.AdaptiveMaxPool2d(2)),
    "LPPool": lambda s: (nn.LPPool1d(2, 2) if len(s) == 2 else nn.LPPool2d(2, 2)),
    "LocalResponseNorm": lambda s: nn.LocalResponseNorm(2),
    "Upsample-bicubic": lambda s: nn.Upsample(scale_factor=2, mode="bicubic"),
    "FractionalMaxPool2d": lambda s: nn.FractionalMaxPool2d(2, output_size=2),
}


class BadFunctional(nn.Module):
    """Functional ops that are not piecewise affine (or not supported)."""

    def __init__(self, S, kind):
        super().__init__()
        self.kind, self.a, self.b = kind, nn.Linear(S, 6), nn.Linear(6, 3)

    def forward(self, z):
        u, k = self.a(z), self.kind
        if k == "square":
            h = u * u
        elif k == "sign":
            h = torch.sign(u) + u
        elif k == "max-reduce":
            h = u - u.max(dim=1, keepdim=True).values
        elif k == "normalize":
            h = nn.functional.normalize(u, dim=1)
        elif k == "sort":
            h = torch.sort(u, dim=1).values
        elif k == "floor":
            h = torch.floor(u)
        elif k == "where-threshold":
            h = torch.where(u > 0.5, u, 0.1 * u)
        elif k == "where-other":
            h = torch.where(u > 0, 0.5 * u, u)
        elif k == "batch-flip":
            h = torch.relu(u).flip(0)
        elif k == "batch-roll":
            h = torch.relu(u).roll(1, 0)
        elif k == "batch-mean":
            h = torch.relu(u) - torch.relu(u).mean(0, keepdim=True)
        elif k == "norm-div":
            h = u / (u.norm(dim=1, keepdim=True) + 1)
        elif k == "float16":
            h = torch.relu(u).half().double()
        elif k == "float16-as-identity":
            h = torch.relu(u)
        elif k == "topk":
            h = torch.relu(u).topk(6, dim=1).values
        elif k == "cummax":
            h = torch.cummax(u, dim=1).values
        elif k == "round":
            h = torch.round(u)
        else:
            raise AssertionError(k)
        return self.b(h)


BAD_FUNCTIONAL = ("square", "sign", "max-reduce", "normalize", "sort", "floor", "where-threshold",
                  "where-other", "batch-flip", "batch-roll", "batch-mean", "norm-div", "float16",
                  "topk", "cummax", "round")


# ============================================================ checks
def _rand_init(module, rng):
    """Biases N(0, 0.5^2) (torch's are too small to move the breakpoints far from the
    origin), deterministic in rng; BatchNorm and PReLU are set where they are made."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)) \
                    and m.bias is not None:
                m.bias.copy_(torch.from_numpy(rng.normal(0, 0.5, m.bias.shape)).to(m.bias.dtype))
    return module


def torch_fwd(module, z):
    with torch.no_grad():
        out = [module(torch.from_numpy(z[i:i + 20000])).numpy() for i in range(0, len(z), 20000)]
    return np.concatenate(out)


def forward_check(net, ref, rng, S):
    z = np.concatenate([rng.normal(size=(300, S)) * 3, rng.normal(size=(40, S)) * 1e3,
                        rng.normal(size=(20, S)) * 1e6])
    got, want = net.forward(z), torch_fwd(ref, z)
    if got.shape != want.shape:
        return f"output shape {got.shape} != torch's {want.shape}"
    if not np.isfinite(want).all() or not np.isfinite(got).all():
        i = np.flatnonzero(~np.isfinite(want).all(1) | ~np.isfinite(got).all(1))[0]
        return (f"torch gives {want[i].tolist()}, the loaded net {got[i].tolist()} at "
                f"|z| = {np.linalg.norm(z[i]):.3g}")
    tol = forward_rounding_tol(net, z)
    excess = np.abs(got - want) - tol
    if np.any(excess > 0):
        i = np.unravel_index(np.argmax(excess), excess.shape)
        return (f"forward differs from torch by {abs(got - want)[i]:.3g} (bound {tol[i]:.3g}) at "
                f"|z| = {np.linalg.norm(z[i[0]]):.3g}")
    return None


def _grid_loglik(logf, lo, hi, n):
    """Trapezoid rule of exp(logf) on an n x n grid over [lo, hi] (lo, hi (2,))."""
    t1, t2 = np.linspace(lo[0], hi[0], n), np.linspace(lo[1], hi[1], n)
    w1 = np.full(n, t1[1] - t1[0]); w1[[0, -1]] /= 2
    w2 = np.full(n, t2[1] - t2[0]); w2[[0, -1]] /= 2
    Z = np.stack(np.meshgrid(t1, t2, indexing="ij"), -1).reshape(-1, 2)
    lf = logf(Z) + np.log(np.outer(w1, w2).ravel())
    m = lf.max()
    return m + np.log(np.exp(lf - m).sum())


def oracle_s2(ref, X, sigma):
    """log p(x) for every row by trapezoid grids over the posterior's box (torch forward only),
    with the difference between steps h and h/2 as the error estimate."""
    D = X.shape[1]
    out = []

    def logf_of(x):
        def logf(Z):
            r = torch_fwd(ref, Z) - x
            return (-0.5 * (r * r).sum(1) / sigma ** 2 - D * np.log(sigma * np.sqrt(2 * np.pi))
                    - 0.5 * (Z * Z).sum(1) - np.log(2 * np.pi))
        return logf

    for x in X:
        logf = logf_of(x)
        lo, hi = np.array([-14.0, -14.0]), np.array([14.0, 14.0])
        for _ in range(3):                            # zoom on where exp(logf) is > e^-45 of its max
            t1, t2 = np.linspace(lo[0], hi[0], 161), np.linspace(lo[1], hi[1], 161)
            Z = np.stack(np.meshgrid(t1, t2, indexing="ij"), -1).reshape(-1, 2)
            lf = logf(Z)
            keep = Z[lf > lf.max() - 45]
            step = (hi - lo) / 160
            lo, hi = np.maximum(keep.min(0) - 3 * step, lo), np.minimum(keep.max(0) + 3 * step, hi)
        a, b = _grid_loglik(logf, lo, hi, 301), _grid_loglik(logf, lo, hi, 601)
        out.append((b, abs(b - a)))
    return out


def oracle_s3(ref, X, sigma, rng, means, covs, n=300_000):
    """Importance sampling from torch's forward pass with the defensive mixture
    1/3 N(0, I) + 1/3 N(m, 2C) (m, C from a prior-weighted pilot) + 1/3 t_4 at cpadgn's
    posterior mean and twice its covariance (any proposal gives an unbiased estimate; the
    last one finds an outlier's posterior that the prior pilot misses)."""
    from scipy.stats import multivariate_normal, multivariate_t
    D = X.shape[1]
    res = []
    for x, mu, cov in zip(X, means, covs):
        def log_lik(zz):
            r = torch_fwd(ref, zz) - x
            return -0.5 * (r * r).sum(1) / sigma ** 2 - D * np.log(sigma * np.sqrt(2 * np.pi))
        pilot = rng.normal(size=(n // 3, 3))
        ll = log_lik(pilot)
        w = np.exp(ll - ll.max())
        m = w @ pilot / w.sum()
        C = 2 * np.cov(pilot.T, aweights=w) + 1e-3 * np.eye(3)
        # a jitter at the covariance's scale: a far outlier's posterior can span 1e10 in one
        # direction and 0 in another, where rounding leaves eigenvalues of -eps * 1e10
        T = 2 * cov + (1e-6 + 1e-9 * abs(np.trace(cov))) * np.eye(3)
        parts = [multivariate_normal(np.zeros(3), np.eye(3)), multivariate_normal(m, C),
                 multivariate_t(mu, T, df=4)]
        which = rng.integers(0, 3, n)
        zz = np.concatenate([p.rvs(size=int((which == k).sum()), random_state=rng).reshape(-1, 3)
                             for k, p in enumerate(parts)])
        log_q = np.logaddexp.reduce([p.logpdf(zz) for p in parts], axis=0) - np.log(3)
        lw = log_lik(zz) + multivariate_normal(np.zeros(3), np.eye(3)).logpdf(zz) - log_q
        top = lw.max()
        w = np.exp(lw - top)
        res.append((top + np.log(w.mean()), w.std() / np.sqrt(n) / w.mean()))
    return res


def load_paths(module, S, is_sequential):
    """(path name, loader) for every way this module can be loaded."""
    ex = torch.zeros(2, S, dtype=next(module.parameters()).dtype)
    paths = [("module", lambda: cpadgn.load(module, noise_std=1.0))]
    if is_sequential:
        paths.append(("torchscript", lambda: cpadgn.load(torch.jit.script(module), noise_std=1.0)))
    paths.append(("export", lambda: cpadgn.load(torch.export.export(module.eval(), (ex,)), noise_std=1.0)))
    return paths


def check_decoder(module, S, rng, stats, label, is_sequential, float32=False):
    """Run (a)-(c) on one decoder; returns a list of failure strings."""
    fails = []
    ref = copy.deepcopy(module).double().eval()
    before = {k: (v.dtype, v.clone()) for k, v in module.state_dict().items()}
    training = module.training
    nets = {}
    for path, loader in load_paths(module, S, is_sequential):
        try:
            model = loader()
        except CpadgnError as e:
            msg = str(e)
            stats["refused-supported"] += 1
            fails.append(f"{path}: refused: {msg[:300]}")
            continue
        except Exception as e:
            fails.append(f"{path}: CRASH {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        nets[path] = model.net
        err = forward_check(model.net, ref, rng, S)
        if err:
            fails.append(f"{path}: (a) {err}")
    after = module.state_dict()
    if any(after[k].dtype != v[0] or not torch.equal(after[k], v[1]) for k, v in before.items()) or \
            module.training != training:
        fails.append("loading changed the user's module (dtype, values or training mode)")
    if not nets:
        return fails
    net = next(iter(nets.values()))
    stats["units"].append(net.n_units)
    if net.n_units > MAX_UNITS[S] * 3:
        stats["too-large"] += 1
        return fails
    try:
        part = compute_partition(net, max_regions=200_000)
    except CpadgnError as e:
        stats["too-large"] += 1
        return fails + [f"partition: {str(e)[:200]}"] if "more than" not in str(e) else fails
    stats["regions"].append(part.n_regions)
    chk = check_partition(net, part, n_samples=20_000, seed=int(rng.integers(1 << 30)))
    tol = 4 * part.n_regions * np.finfo(float).eps if S == 2 else 1e-10
    stats["mass_error_max"] = max(stats["mass_error_max"], chk["mass_error"])
    if chk["mass_error"] > tol:
        fails.append(f"(b) prior masses sum to 1 {chk['mass_sum'] - 1:+.3g} (R = {part.n_regions})")
    if chk["samples_located"] < 1.0:
        fails.append(f"(b) {1 - chk['samples_located']:.3g} of prior samples in no listed region")
    if chk["interior_ok"] < 1.0:
        fails.append(f"(b) {1 - chk['interior_ok']:.3g} of interior points off their pattern")
    # (c) log p against the oracle
    z = rng.normal(size=(2, S))
    g = torch_fwd(ref, rng.normal(size=(2000, S)))
    scale = float(np.sqrt(g.var(0).mean())) + 1e-3
    sigma = scale * float(rng.uniform(0.3, 1.0))
    X = torch_fwd(ref, z) + sigma * rng.normal(size=(2, g.shape[1]))
    X = np.vstack([X, g.mean(0) + 4 * scale * rng.choice([-1, 1], g.shape[1])])
    model = cpadgn.model.CPAModel(net, noise_std=sigma, device="cpu")
    model._partition = part
    lp = model.log_prob(X)
    if S == 2:
        ref_vals = oracle_s2(ref, X, sigma)
        for i, (want, err) in enumerate(ref_vals):
            stats["rows-checked"] += 1
            if abs(lp[i] - want) > 20 * err + 1e-6:
                # a grid can miss a narrow ridge of the posterior: the nested quadrature of
                # tests/oracles.py (on the loaded net, which (a) matched to torch) decides
                exact = loglik_2d(net, X[i], sigma)[0]
                if abs(lp[i] - exact) > 1e-6 * max(1.0, abs(exact)):
                    fails.append(f"(c) row {i}: log p {lp[i]:.10g}, grid {want:.10g} (+-{err:.2g}), "
                                 f"nested quadrature {exact:.10g}")
                else:
                    stats["grid-missed"] += 1
    else:
        post = model.posterior(X)
        for i, (want, se) in enumerate(oracle_s3(ref, X, sigma, rng, post.z_mean, post.z_cov)):
            if se > 0.02:
                stats["oracle-inconclusive"] += 1
                continue
            stats["rows-checked"] += 1
            if abs(lp[i] - want) > 5 * se + 1e-6:
                fails.append(f"(c) row {i}: log p {lp[i]:.8g}, importance sampling {want:.8g} (+-{se:.2g})")
    return fails


def check_refusal(module, S, rng, is_sequential):
    """A decoder with a bad layer: every path must refuse it with a one-line CpadgnError, or
    load it correctly (pass (a))."""
    fails, loaded = [], []
    ref = copy.deepcopy(module).double().eval()
    if getattr(ref, "kind", None) == "float16":
        ref.kind = "float16-as-identity"     # README: a cast to a float type loads as identity
    for path, loader in load_paths(module, S, is_sequential):
        try:
            model = loader()
        except CpadgnError as e:
            if "\n" in str(e) or not str(e).strip():
                fails.append(f"{path}: refusal message is not one line: {str(e)!r}")
            continue
        except Exception as e:
            if path == "torchscript" or path == "export":
                # torch itself could not script / export it: not cpadgn's business
                if "cpadgn" not in "".join(traceback.format_tb(e.__traceback__)):
                    continue
            fails.append(f"{path}: CRASH {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
            continue
        loaded.append(path)
        err = forward_check(model.net, ref, rng, S)
        if err:
            fails.append(f"{path}: LOADED SILENTLY WRONG: {err}")
    return fails, loaded


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=100, help="decoders to draw")
    ap.add_argument("--s3-fraction", type=float, default=0.15)
    ap.add_argument("--bad-fraction", type=float, default=0.2, help="share of decoders given a bad layer")
    ap.add_argument("--graph-fraction", type=float, default=0.25, help="share of custom (export) decoders")
    ap.add_argument("--minutes", type=float, default=None, help="stop drawing after this long")
    ap.add_argument("--only", type=int, nargs="*", help="run only these decoder numbers (to reproduce one)")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    stats = collections.Counter()
    stats["units"], stats["regions"], stats["mass_error_max"] = [], [], 0.0
    tag_counts, failures = collections.Counter(), []
    t0 = time.time()
    done = 0
    for i in args.only or range(args.count):
        if args.minutes is not None and time.time() - t0 > 60 * args.minutes:
            break
        done += 1
        rng = np.random.default_rng([args.seed, i])
        torch.manual_seed(int(rng.integers(1 << 31)))
        S = 3 if rng.random() < args.s3_fraction else 2
        tags = []
        bad = rng.random() < args.bad_fraction
        graph = not bad and rng.random() < args.graph_fraction
        try:
            if graph:
                module = GraphDecoder(S, rng, tags)
            else:
                module = random_sequential(rng, S, tags)
            _rand_init(module, rng)
            if not graph and rng.random() < 0.5:
                module = module.double()
                tags.append("float64")
            module.eval()
            if bad:
                if rng.random() < 0.35:
                    kind = str(rng.choice(BAD_FUNCTIONAL))
                    module, seq = BadFunctional(S, kind).eval(), False
                else:
                    kind = str(rng.choice(sorted(BAD_LAYERS)))
                    layers = list(module)
                    pos = int(rng.integers(1, len(layers)))
                    h = nn.Sequential(*layers[:pos]).eval()(torch.zeros(2, S, dtype=next(module.parameters()).dtype))
                    try:
                        bad_layer = BAD_LAYERS[kind](tuple(h.shape[1:])).to(h.dtype)
                        nn.Sequential(*layers[:pos], bad_layer, *layers[pos:]).eval()(torch.zeros(2, S, dtype=h.dtype))
                    except Exception:
                        continue
                    module, seq = nn.Sequential(*layers[:pos], bad_layer, *layers[pos:]).eval(), True
                tag_counts[f"bad:{kind}"] += 1
                tags.append(f"+bad:{kind}")
                fails, loaded = check_refusal(module, S, rng, seq)
                if loaded:
                    tag_counts[f"bad-loaded:{kind}:{'+'.join(loaded)}"] += 1
            else:
                for t in set(tags):
                    tag_counts[t.split("(")[0] if not args.verbose else t] += 1
                    tag_counts["opt:" + t] += 1
                tag_counts[f"S={S}"] += 1
                tag_counts["graph" if graph else "sequential"] += 1
                fails = check_decoder(module, S, rng, stats, " ".join(tags), not graph)
        except Exception as e:
            fails = [f"FUZZER ERROR {type(e).__name__}: {e}"]
            traceback.print_exc()
        if fails:
            failures.append((i, S, tags, fails))
            print(f"[{i}] S={S} {' '.join(tags)}", flush=True)
            for f in fails:
                print(f"    {f}", flush=True)
        elif args.verbose:
            print(f"[{i}] ok S={S} {' '.join(tags)}", flush=True)
    print(f"\n{done} decoders (seed {args.seed}) in {time.time() - t0:.0f} s; "
          f"{len(failures)} with findings")
    units, regions = stats.pop("units"), stats.pop("regions")
    if units:
        print(f"hidden units: median {int(np.median(units))}, max {max(units)}; regions: median "
              f"{int(np.median(regions)) if regions else 0}, max {max(regions, default=0)}")
    print(f"log p rows checked: {stats['rows-checked']} (the grid missed the posterior of {stats['grid-missed']}: "
          f"settled by nested quadrature), oracle inconclusive: {stats['oracle-inconclusive']}, "
          f"too large to partition: {stats['too-large']}, largest |mass sum - 1|: {stats['mass_error_max']:.3g}")
    print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(tag_counts.items()) if not k.startswith("opt:")))
    if args.verbose:
        print("options: " + ", ".join(f"{k[4:]} {v}" for k, v in sorted(tag_counts.items()) if k.startswith("opt:")))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
