"""Load a trained generator from a file and reduce it to a ``PiecewiseAffineNet``.

Supported inputs, recognised by their content (magic bytes, archive members), not by
their suffix:

- a cpadgn HDF5 model file (see ``cpadgn.modelfile``)          -> "cpadgn-h5"
- a ``torch.export`` archive (``torch.export.save``, .pt2)      -> "torch-export"
- a TorchScript archive (``torch.jit.save``) of an nn.Sequential -> "torchscript"
- a pickled ``nn.Module`` (``torch.save(model)``), only with
  ``trust_pickle=True`` because unpickling can execute code     -> "pickle"

Every format is first turned into a flat list of operations -- affine maps and
one-breakpoint activations -- and ``ops_to_net`` turns that list into the canonical
net: consecutive affine maps are composed, consecutive activations are composed into
one, an activation applied directly to z gets an identity affine layer in front and a
final activation gets an identity output layer.

Models are read in inference mode: BatchNorm uses its running statistics and Dropout
is the identity.  A torch.export graph recorded in training mode is refused, since
the graph itself says otherwise.

Layers that are affine at inference on image-shaped activations (convolutions,
upsampling, average pooling, padding, permutes, concatenation) become dense affine maps
of the flattened activations, computed from the op's own forward pass on a basis.  A
value that is still needed after a hidden layer (a skip connection) is carried through
it by slope-1 units, which are never facets; max pooling (adaptive too) is a tree of
max(a, b) = b + relu(a - b), a clamp to [lo, hi] (Hardtanh, ReLU6, Hardsigmoid) is
lo + relu(u - lo) - relu(u - hi), and Softshrink relu(u - l) - relu(-u - l).  An exported
program with in-place operations (nn.ReLU(inplace=True), ``out += h``) is first made functional.

Adding a layer kind is local: a TorchScript / nn.Module layer needs an entry in
``MODULE_HANDLERS`` (class name -> function of the input value), an exported aten
operation an entry in ``EXPORT_HANDLERS`` (op name -> function of its arguments).
"""
from __future__ import annotations

import contextlib
import io
import logging
import operator
import pickle
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CpadgnError
from .network import PiecewiseAffineNet

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"

SOURCE_FORMATS = ("cpadgn-h5", "torch-export", "torchscript", "pickle", "module")


@dataclass
class Generator:
    """A generator read from a file, with its latent prior and observation noise.

    net:          the piecewise-affine network as stored (prior NOT folded in)
    prior_mean:   (S,) latent prior mean
    prior_cov:    (S, S) latent prior covariance
    noise_std:    observation noise standard deviation, scalar () or (D,), or None
                  when the file has none
    source_format: one of SOURCE_FORMATS
    extra:        everything else read from a cpadgn model file: {"attrs": dict,
                  "groups": {name: {key: array}}}; {} for torch files
    n_parameters: the trained parameters of a torch source (a convolution's kernels, not
                  its dense matrix); None for a cpadgn file, whose dense arrays are them
    """

    net: PiecewiseAffineNet
    prior_mean: np.ndarray
    prior_cov: np.ndarray
    noise_std: np.ndarray | None
    source_format: str
    extra: dict = field(default_factory=dict)
    n_parameters: int | None = None

    @property
    def latent_dim(self) -> int:
        """S, the generator's input width."""
        return self.net.latent_dim

    @property
    def output_dim(self) -> int:
        """D, the generator's output width."""
        return self.net.output_dim


# =========================================================================== entry
def load_generator(source, *, trust_pickle: bool = False, example_input=None) -> Generator:
    """Read a generator: a file of any supported format (detected from its content), or
    a live ``torch.nn.Module`` / ``torch.export.ExportedProgram``.

    example_input: for a module that is not an nn.Sequential of known layers, a batch
    of latent vectors (N, S) to record it with torch.export (default zeros(2, S), S the
    input width of its first Linear layer).
    """
    if not isinstance(source, (str, Path)):
        return _generator(_live_net(source, example_input), _live_format(source), torch_parameters(source))
    path = Path(source)
    if not path.exists():
        raise CpadgnError(f"generator file {path} does not exist; check the path")
    if path.is_dir():
        raise CpadgnError(f"{path} is a directory, not a generator file; pass the model file")
    if not path.is_file():   # a pipe (<(...), a FIFO: open() waits for a writer), a device
        raise CpadgnError(f"{path} is not a regular file (a pipe, a device or a socket); a model is "
                          "read from a file it can seek in: save it to a file first")
    fmt = detect_format(path)
    if fmt == "hdf5":
        from .modelfile import read_model
        return read_model(path)
    if fmt == "torch-export":
        net, source = _load_torch_export(path)
    elif fmt == "torchscript":
        net, source = _load_torchscript(path)
    elif fmt == "pickle":
        net, source = _load_pickle(path, trust_pickle)
    else:  # pragma: no cover - detect_format raises for anything else
        raise AssertionError(fmt)
    check_net(net, path)
    return _generator(net, fmt, torch_parameters(source))


def _generator(net: PiecewiseAffineNet, fmt: str, n_parameters: int) -> Generator:
    S = net.latent_dim
    return Generator(net=net, prior_mean=np.zeros(S), prior_cov=np.eye(S), noise_std=None,
                     source_format=fmt, extra={}, n_parameters=n_parameters)


def torch_parameters(source) -> int:
    """The trained parameters of a torch nn.Module or ExportedProgram (buffers, such as
    BatchNorm's running statistics, left out), each shared weight counted once."""
    torch = _torch()
    if isinstance(source, torch.export.ExportedProgram):
        names = source.graph_signature.parameters
        return int(sum(source.state_dict[n].numel() for n in names if n in source.state_dict))
    return int(sum(p.numel() for p in source.parameters()))


def _live_format(obj) -> str:
    return "torch-export" if type(obj).__name__ == "ExportedProgram" else \
        "torchscript" if type(obj).__module__.startswith("torch.jit") else "module"


def _live_net(obj, example_input) -> PiecewiseAffineNet:
    """The canonical net of an in-memory nn.Module or ExportedProgram."""
    torch = _torch()
    where = f"the {type(obj).__name__}"
    if isinstance(obj, torch.export.ExportedProgram):
        net = _ExportInterpreter(obj, where).run()
    elif isinstance(obj, torch.nn.Module):
        net = module_net(obj, where, example_input)
    elif isinstance(obj, dict) and _dict_contents(obj, torch)[0] != "dict":
        kind, key = _dict_contents(obj, torch)
        if kind == "module":
            raise CpadgnError(f"cannot load a dict (a checkpoint): pass the module it holds, "
                              f"checkpoint[{key!r}]")
        at = "" if key is None else f" under key {key!r}"
        raise CpadgnError(f"cannot load a state_dict{at} (weights without the architecture): build the "
                          "decoder, call decoder.load_state_dict(state_dict) and pass the decoder")
    else:
        raise CpadgnError(f"cannot load a {type(obj).__name__}: pass a file path, a torch "
                          "nn.Module or a torch.export ExportedProgram")
    check_net(net, where)
    return net


def detect_format(path) -> str:
    """'hdf5' | 'torch-export' | 'torchscript' | 'pickle' from the file's content."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            is_hdf5 = head == HDF5_SIGNATURE or (
                not head.startswith(ZIP_SIGNATURE) and _hdf5_with_userblock(f))
    except OSError as e:
        raise CpadgnError(f"cannot read {path}: {e.strerror or e}; check the path and its permissions") from None
    if is_hdf5:
        return "hdf5"
    if len(head) == 0:
        raise CpadgnError(f"generator file {path} is empty (0 bytes); re-save or re-download the model")
    if head.startswith(ZIP_SIGNATURE):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CpadgnError(f"{path} looks like a zip archive but cannot be read ({e}); "
                              "the file may be truncated") from None
        return _zip_kind(path, names)
    if len(head) >= 2 and head[:1] == b"\x80" and 2 <= head[1] <= 5:  # legacy torch.save / plain pickle
        return "pickle"
    hint = " (ONNX is not supported yet; export the model with torch.export.save)" \
        if path.suffix.lower() == ".onnx" else ""
    raise CpadgnError(
        f"{path} is not a recognised generator file{hint}; expected a cpadgn .h5 model, "
        "a torch.export archive (.pt2), a TorchScript archive or a pickled torch module")


def _hdf5_with_userblock(f) -> bool:
    """The HDF5 signature may also sit at 512, 1024, 2048, ... (a user block)."""
    offset = 512
    while True:
        f.seek(offset)
        chunk = f.read(8)
        if len(chunk) < 8:
            return False
        if chunk == HDF5_SIGNATURE:
            return True
        offset *= 2


def _zip_kind(path: Path, names: list[str]) -> str:
    base = {n.split("/", 1)[1] if "/" in n else n for n in names}
    if any(n in ("archive_format", "serialized_exported_program.json")
           or n.startswith("models/") for n in base):
        if any(n.startswith("data/aotinductor") for n in base):
            raise CpadgnError(f"{path} is an AOTInductor-compiled package; cpadgn needs the "
                              "uncompiled program: save it with torch.export.save")
        return "torch-export"
    if any(n.startswith("code/") for n in base) and "constants.pkl" in base:
        return "torchscript"
    if "data.pkl" in base:
        return "pickle"
    raise CpadgnError(f"{path} is a zip archive but not a PyTorch model archive "
                      "(no torch.export, TorchScript or torch.save members)")


def check_net(net: PiecewiseAffineNet, path) -> None:
    """Refuse a net without latent inputs or outputs, non-finite weights, biases or slopes,
    and any beyond MAX_MAGNITUDE."""
    from .numerics import MAX_MAGNITUDE
    for what, n in (("latent", net.latent_dim), ("output", net.output_dim)):
        if n < 1:
            raise CpadgnError(f"{path}: the generator's {what} dimension is 0 (first layer weight "
                              f"{net.weights[0].shape}, last {net.weights[-1].shape}); a generator maps "
                              "at least one latent variable to at least one output: re-save or re-export it")
    for kind, arrays in (("weight", net.weights), ("bias", net.biases), ("slope", net.slopes)):
        for l, a in enumerate(arrays):
            if not np.all(np.isfinite(a)):
                raise CpadgnError(f"{path}: layer {l} {kind} has non-finite values (NaN or inf); "
                                  "the model is broken, retrain or re-export it")
            if a.size and np.abs(a).max() > MAX_MAGNITUDE:
                raise CpadgnError(f"{path}: layer {l} {kind} reaches {np.abs(a).max():.3g}, beyond "
                                  f"{MAX_MAGNITUDE:g}, where float64 squares overflow; the model is broken "
                                  "or badly scaled, retrain it on standardised data")


# ============================================================= ops -> canonical net
@dataclass
class Affine:
    """x -> W x + b; W (out, in)."""
    W: np.ndarray
    b: np.ndarray
    where: str = ""


@dataclass
class Scale:
    """Elementwise x -> s * x + t (BatchNorm in eval mode); s, t (F,)."""
    s: np.ndarray
    t: np.ndarray
    where: str = ""


@dataclass
class Activation:
    """u -> u where u >= 0, slope * u where u < 0; slope scalar or (F,)."""
    slope: np.ndarray
    name: str
    where: str = ""


def _compose_slopes(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Slope of sigma_second(sigma_first(u)), again a one-breakpoint activation.

    For u < 0 the first gives first*u; if first < 0 that is positive and the second
    leaves it alone, otherwise it is <= 0 and the second multiplies it by its slope.
    """
    return np.where(first < 0, first, first * second)


def ops_to_net(ops: list, latent_dim: int | None = None) -> PiecewiseAffineNet:
    """Reduce a chain of Affine / Scale / Activation operations to the canonical net."""
    if latent_dim is None:
        latent_dim = _infer_input_width(ops)
    S = int(latent_dim)
    width = S
    W_pend, b_pend = np.eye(S), np.zeros(S)   # affine map since the last activation
    weights, biases, slopes = [], [], []
    last_was_activation = False
    for op in ops:
        if isinstance(op, Affine):
            W = np.asarray(op.W, dtype=np.float64)
            b = np.broadcast_to(np.asarray(op.b, dtype=np.float64), (W.shape[0],))
            if W.ndim != 2 or W.shape[1] != width:
                raise CpadgnError(f"{op.where or 'a linear layer'} expects {W.shape[1]} inputs "
                                  f"but receives {width}; fix the model's layer sizes so that they chain")
            W_pend, b_pend = W @ W_pend, W @ b_pend + b
            width, last_was_activation = W.shape[0], False
        elif isinstance(op, Scale):
            s = _broadcast_width(op.s, width, op.where)
            t = _broadcast_width(op.t, width, op.where)
            W_pend, b_pend = s[:, None] * W_pend, s * b_pend + t
            last_was_activation = False
        elif isinstance(op, Activation):
            slope = _broadcast_width(op.slope, width, op.where)
            if last_was_activation:
                slopes[-1] = _compose_slopes(slopes[-1], slope)
            else:
                # an activation applied to z itself gets the identity as its affine layer,
                # which keeps the canonical form (affine, act, ...)
                weights.append(W_pend)
                biases.append(b_pend)
                slopes.append(slope)
            W_pend, b_pend = np.eye(width), np.zeros(width)
            last_was_activation = True
        else:  # pragma: no cover - internal
            raise TypeError(f"unknown operation {op!r}")
    weights.append(W_pend)  # identity output layer after a final activation
    biases.append(b_pend)
    return PiecewiseAffineNet.from_arrays(weights, biases, [s + 0.0 for s in slopes])  # no -0.0


def _broadcast_width(a, width: int, where: str) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).reshape(-1) if np.ndim(a) else np.asarray(a, np.float64)
    if a.ndim == 0 or a.size == 1:
        return np.full(width, float(a.reshape(-1)[0]))
    if a.size != width:
        raise CpadgnError(f"{where or 'a layer'} has {a.size} channels but its input has {width} features; "
                          f"give it {width} channels (or one shared value)")
    return a.copy()


def _infer_input_width(ops: list) -> int:
    for op in ops:
        if isinstance(op, Affine):
            return int(np.asarray(op.W).shape[1])
        if isinstance(op, (Scale, Activation)):
            for a in (getattr(op, "s", None), getattr(op, "slope", None)):
                if a is not None and np.size(a) > 1:
                    return int(np.size(a))
    raise CpadgnError(NO_LATENT_WIDTH)


# ======================================================= symbolic activations
#: the most memory one layer's dense affine form may take (bytes, float64)
DENSE_LIMIT_BYTES = 2 * 1024 ** 3


class _Data:
    """A symbolic activation tensor: its flattened features are W @ h + b.

    h is the network's current state (the last hidden layer, or z before the first);
    W (F, n), b (F,); shape is the per-sample shape (without the batch axis), F its
    product.  scaled_from / scale record x = scale * scaled_from (for where-activations).
    """

    __slots__ = ("W", "b", "shape", "identity", "scaled_from", "scale")

    def __init__(self, W, b, shape=None, identity=False, scaled_from=None, scale=None):
        self.W, self.b, self.identity = W, b, identity
        self.shape = (W.shape[0],) if shape is None else tuple(int(s) for s in shape)
        self.scaled_from, self.scale = scaled_from, scale

    @property
    def width(self) -> int:
        return self.W.shape[0]

    def rows(self, idx, shape=None) -> "_Data":
        return _Data(self.W[idx], self.b[idx], shape if shape is not None else (len(idx),))

    def same_as(self, other) -> bool:
        return other is self or (isinstance(other, _Data) and np.array_equal(other.W, self.W)
                                 and np.array_equal(other.b, self.b))


def _equal_rows(A: np.ndarray):
    """Classes of equal rows of A (N, C), numbered by first occurrence: (class of every
    row (N,), the first row of every class (n,)).

    Rows are hashed (their bytes, -0.0 made 0.0) and every row compared in full with the
    first row of its hash; a collision only leaves rows apart."""
    A = np.ascontiguousarray(A, dtype=np.float64) + 0.0
    keys = np.fromiter((hash(row.tobytes()) for row in A), np.int64, count=A.shape[0])
    _, first, inv = np.unique(keys, return_index=True, return_inverse=True)
    rep = first[inv.ravel()]
    dup = np.flatnonzero(rep != np.arange(A.shape[0]))
    for i in range(0, dup.size, 4096):
        d = dup[i:i + 4096]
        differ = d[~(A[d] == A[rep[d]]).all(axis=1)]
        rep[differ] = differ
    heads = np.unique(rep)
    return np.searchsorted(heads, rep), heads


def _stack(values) -> _Data:
    return _Data(np.concatenate([v.W for v in values]), np.concatenate([v.b for v in values]))


class _Builder:
    """Collects the Affine / Activation operations of a forward pass on _Data values.

    ``fail(msg)`` raises the caller's error (it knows the file and the layer).
    """

    def __init__(self, latent_dim: int, fail: Callable):
        self.latent_dim, self.fail = int(latent_dim), fail
        self.ops: list = []
        self.state_width = self.latent_dim

    def input(self) -> _Data:
        S = self.latent_dim
        return _Data(np.eye(S), np.zeros(S), (S,), identity=True)

    def activate(self, d: _Data, slope, name: str, where: str, carry=()):
        """act(d) as a new hidden layer; the values in ``carry`` ride along through
        slope-1 units (act(u) = u: never a facet).  Returns (act(d), carried values).

        Rows with the same weights, bias and slope share one unit: copies of one value
        (nearest upsampling, a max-pooling tree's carried operands) must stay one unit,
        or differences of copies, identically 0, come out as rounding noise whose sign
        decides nothing but splits regions (see ``_max_pool``)."""
        slope = np.broadcast_to(np.asarray(slope, np.float64), (d.width,))
        blocks = [d, *carry]
        if d.identity and not carry:
            self.ops.append(Activation(slope.copy(), name, where))
            unit_of = np.arange(d.width)
        else:
            pre = _stack(blocks)
            slopes = np.concatenate([slope] + [np.ones(v.width) for v in carry])
            unit_of, units = _equal_rows(np.column_stack([pre.W, pre.b, slopes]))
            self.ops.append(Affine(pre.W[units], pre.b[units], where))
            self.ops.append(Activation(slopes[units], name, where))
        n = int(unit_of.max(initial=-1)) + 1
        self.state_width = n
        eye, out, off = np.eye(n), [], 0
        for v in blocks:
            rows = unit_of[off:off + v.width]
            out.append(_Data(eye[rows], np.zeros(v.width), v.shape,
                             identity=v.width == n and np.array_equal(rows, np.arange(n))))
            off += v.width
        return out[0], out[1:]

    def dense(self, fn: Callable, inputs: list, where: str) -> _Data:
        """The affine map fn (tensors of shape (B, *x.shape) -> (B, ...)) as a dense W, b.

        Evaluated in float64 on the zero input, the biases and the columns of every input
        map: fn(0) = c, fn(b) = b_out, W_out[:, j] = fn(W[:, j]) - c.
        """
        torch = _torch()
        n = self.state_width
        probe = fn([torch.zeros((1, *x.shape), dtype=torch.float64) for x in inputs])
        out_features = int(np.prod(probe.shape[1:]))
        need = (n + 2) * out_features * 8
        if need > DENSE_LIMIT_BYTES:
            self.fail(f"its dense affine form would be {out_features} x {n} float64 "
                      f"({_bytes(need)}), over the {_bytes(DENSE_LIMIT_BYTES)} limit for one "
                      "layer (loading.DENSE_LIMIT_BYTES); use a decoder with smaller layers")
        rows = [np.vstack([np.zeros(x.width), x.b, x.W.T]) for x in inputs]
        with torch.no_grad():
            out = fn([torch.from_numpy(r).reshape(n + 2, *x.shape) for r, x in zip(rows, inputs)])
        if out.shape[0] != n + 2 or tuple(out.shape[1:]) != tuple(probe.shape[1:]):
            self.fail("mixes the samples of a batch, which a generator of z must not do")
        out = out.reshape(n + 2, -1).double().numpy()
        W, b = np.ascontiguousarray((out[2:] - out[0]).T), out[1].copy()
        # An op that permutes the batch (flip or roll along it) keeps its shape: three random
        # states, each in its own place, must give what the dense map does (else O(1) apart).
        h = np.random.default_rng(0).standard_normal((3, n))
        with torch.no_grad():
            got = fn([torch.from_numpy(h @ x.W.T + x.b).reshape(3, *x.shape) for x in inputs])
        got = got.reshape(3, -1).double().numpy() if got.shape[0] == 3 else None
        scale = np.abs(h) @ np.abs(W).T + np.abs(b)
        if got is None or np.any(np.abs(got - (h @ W.T + b)) > 1e-6 * (scale + scale.max())):
            self.fail("mixes the samples of a batch, which a generator of z must not do")
        return _Data(W, b, tuple(probe.shape[1:]))

    def finish(self, out: _Data) -> PiecewiseAffineNet:
        if not out.identity or not self.ops:
            self.ops.append(Affine(out.W, out.b, "the output layer"))
        return ops_to_net(self.ops, self.latent_dim)


def _bytes(n: int) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.2f} MiB"


def _channel(v: np.ndarray, shape) -> np.ndarray:
    """A per-channel vector (C,) repeated over the other axes of a (C, ...) sample."""
    return np.repeat(v, int(np.prod(shape[1:]))) if len(shape) > 1 else v


def _max_windows(shape, dims, kernel, stride, padding, dilation, ceil_mode, fail: Callable) -> tuple:
    """Flat input indices of every max-pooling window over the last dims (1 or 2) axes of
    activations of shape (C, *spatial) or spatial alone: (m, F_out) int64, and the output
    shape.  Padding positions (never the maximum) repeat a real element of the window;
    fail(message) refuses a window of padding only."""
    if len(shape) == dims:   # MaxPool1d on (N, L), MaxPool2d on (N, H, W): one channel each
        windows, out_shape = _max_windows((1, *shape), dims, kernel, stride, padding, dilation,
                                          ceil_mode, fail)
        return windows, out_shape[1:]
    torch = _torch()
    F = torch.nn.functional
    d = len(shape) - 1                                # pooled dims: 1 or 2
    as_tuple = lambda v: tuple(v) * (d if len(tuple(v)) == 1 else 1) if isinstance(v, (list, tuple)) \
        else (int(v),) * d
    k, p, dl = as_tuple(kernel), as_tuple(padding), as_tuple(dilation)
    s = as_tuple(stride) if (isinstance(stride, (list, tuple)) and len(stride)) or \
        isinstance(stride, int) else k
    pool = F.max_pool1d if d == 1 else F.max_pool2d
    out_shape = tuple(pool(torch.zeros(1, *shape), k, s, p, dl, ceil_mode).shape[1:])
    idx = torch.arange(1, int(np.prod(shape)) + 1, dtype=torch.float64).reshape(1, *shape)
    if d == 1:
        idx, k, s, p, dl = idx[:, :, None, :], (1, *k), (1, *s), (0, *p), (1, *dl)
    spatial_out = out_shape[1:] if d == 2 else (1, out_shape[1])
    extra = [max(0, (o - 1) * st + dd * (kk - 1) + 1 - (n + 2 * pp)) for o, st, dd, kk, n, pp in
             zip(spatial_out, s, dl, k, idx.shape[2:], p)]
    idx = F.pad(idx, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]))
    win = F.unfold(idx, k, dilation=dl, stride=s)                 # (1, C * m, L)
    m = k[0] * k[1]
    win = win.reshape(shape[0], m, -1).permute(1, 0, 2).reshape(m, -1).long().numpy() - 1
    first = win.max(axis=0)                                       # some real element
    if np.any(first < 0):
        fail("has a max-pooling window that holds only padding (torch gives -inf there); "
             "reduce its padding or dilation")
    return np.where(win < 0, first, win), out_shape


def _adaptive_max_windows(shape, dims, output_size) -> tuple:
    """Windows of adaptive max pooling over the last dims (1 or 2) axes of activations of
    shape (C, L) or (C, H, W), or spatial alone, to output_size (an int, or one entry per
    pooled dim, None keeping that dim): torch's window i of n inputs to o outputs is
    [floor(i n / o), ceil((i + 1) n / o)).

    Returns (windows (m, F_out) flat input indices, each window padded with its first
    element (a copy, which _max_pool reduces to one value), out_shape (C, *out) or out)."""
    if len(shape) == dims:   # AdaptiveMaxPool1d on (N, L), 2d on (N, H, W): one channel each
        windows, out_shape = _adaptive_max_windows((1, *shape), dims, output_size)
        return windows, out_shape[1:]
    spatial = tuple(shape[1:])
    size = tuple(output_size) if isinstance(output_size, (list, tuple)) else (output_size,) * len(spatial)
    out = tuple(n if o is None else int(o) for n, o in zip(spatial, size))
    ranges = [[np.arange((i * n) // o, -((-(i + 1) * n) // o)) for i in range(o)]
              for n, o in zip(spatial, out)]
    flat = np.arange(int(np.prod(shape))).reshape(shape)
    cols = []
    for c in range(shape[0]):
        for cell in np.ndindex(*out):
            cols.append(flat[(c, *np.ix_(*(r[i] for r, i in zip(ranges, cell))))].ravel())
    m = max(len(w) for w in cols)
    windows = np.stack([np.concatenate([w, np.full(m - len(w), w[0])]) for w in cols], axis=1)
    return windows, (shape[0], *out)


def _max_pool(activate: Callable, d: _Data, windows: np.ndarray, out_shape) -> _Data:
    """max over the window elements as a tree of max(a, b) = b + relu(a - b).

    activate(pre, keep) -> (relu(pre), keep carried): one hidden layer per tree level.

    Every window is first reduced to its distinct elements (equal rows of d: the copies
    of nearest upsampling, padding), in one order for all windows, then padded with its
    last element: otherwise a subtree's max meets another copy of itself, and their
    difference, identically 0, is rounding noise whose sign splits regions."""
    row_class, first = _equal_rows(np.column_stack([d.W, d.b]))
    rep = np.sort(first[row_class[windows]], axis=0)               # (m, F_out) one row per class
    last = rep[-1]
    repeat = np.vstack([np.zeros((1, rep.shape[1]), bool), rep[1:] == rep[:-1]])
    rep = np.sort(np.where(repeat, d.width, rep), axis=0)          # distinct first, then d.width
    m = int((rep < d.width).sum(axis=0).max())
    windows = np.where(rep[:m] < d.width, rep[:m], last)
    elems = [d.rows(w) for w in windows]
    while len(elems) > 1:
        pairs, odd = len(elems) // 2, elems[2 * (len(elems) // 2):]
        a, b = elems[0:2 * pairs:2], elems[1:2 * pairs:2]
        diff = _stack([_Data(x.W - y.W, x.b - y.b) for x, y in zip(a, b)])
        act, kept = activate(diff, [_stack(b), *odd])
        F = a[0].width
        elems = [_Data(act.W[i * F:(i + 1) * F] + kept[0].W[i * F:(i + 1) * F],
                       act.b[i * F:(i + 1) * F] + kept[0].b[i * F:(i + 1) * F])
                 for i in range(pairs)] + kept[1:]
    return _Data(elems[0].W, elems[0].b, out_shape)


def _clamp(activate: Callable, d: _Data, lo, hi) -> _Data:
    """clamp(d, lo, hi) (lo or hi None: unbounded) as one layer of ReLU units:
    lo + relu(u - lo) - relu(u - hi), lo + relu(u - lo), or hi - relu(hi - u).

    activate(pre) -> relu(pre), one hidden layer.  Hardtanh and ReLU6 are this with
    (lo, hi) = (min_val, max_val) and (0, 6)."""
    parts = ([_Data(d.W, d.b - lo)] if lo is not None else []) + \
            ([_Data(-d.W, hi - d.b) if lo is None else _Data(d.W, d.b - hi)] if hi is not None else [])
    act = activate(_stack(parts))
    F = d.width
    if lo is None:                                   # hi - relu(hi - u)
        return _Data(-act.W, hi - act.b, d.shape)
    W, b = act.W[:F], act.b[:F] + lo
    if hi is not None:
        W, b = W - act.W[F:], b - act.b[F:]
    return _Data(W, b, d.shape)


def _hardsigmoid(activate: Callable, d: _Data) -> _Data:
    """hardsigmoid(u) = clamp(u / 6 + 1/2, 0, 1) = clamp(u, -3, 3) / 6 + 1/2: two ReLU units
    per feature (activate as in _clamp)."""
    c = _clamp(activate, d, -3.0, 3.0)
    return _Data(c.W / 6.0, c.b / 6.0 + 0.5, d.shape)


def _softshrink(activate: Callable, d: _Data, lambd) -> _Data:
    """softshrink(u) = relu(u - lambd) - relu(-u - lambd) (lambd >= 0): two ReLU units per
    feature (activate as in _clamp)."""
    act = activate(_stack([_Data(d.W, d.b - lambd), _Data(-d.W, -d.b - lambd)]))
    F = d.width
    return _Data(act.W[:F] - act.W[F:], act.b[:F] - act.b[F:], d.shape)


def _rrelu_slope(fail: Callable, lower, upper, training=False) -> float:
    """RReLU in eval is LeakyReLU with slope (lower + upper) / 2; in training its slopes are
    random."""
    if training:
        fail("RReLU in training mode draws random slopes; call model.eval() before exporting")
    return (float(lower) + float(upper)) / 2


def _clamp_bounds(fail: Callable, lo, hi) -> tuple:
    lo, hi = (None if v is None else float(v) for v in (lo, hi))
    if lo is None and hi is None:
        fail("a clamp without bounds")
    if lo is not None and hi is not None and not lo < hi:
        fail(f"clamps to [{lo:g}, {hi:g}], a constant; remove the layer or fix its bounds")
    return lo, hi


# ==================================================== nn.Module / TorchScript layers
def _np(t) -> np.ndarray:
    return t.detach().to("cpu").double().numpy().copy()


def _float64_copy(m):
    """A float64 copy of module m on the CPU, where its layers are read and probed (a
    module trained on a GPU would otherwise meet the CPU probes on another device)."""
    import copy
    torch = _torch()
    try:
        with _quiet():             # deepcopy reads .grad, which warns for non-leaf tensors
            return copy.deepcopy(m).to(device="cpu", dtype=torch.float64)
    except Exception:  # pragma: no cover - a module that cannot be copied: convert in place
        return m.to(device="cpu", dtype=torch.float64)


def _linear(b: _Builder, m, d: _Data, where):
    if len(d.shape) != 1:
        return _dense_layer(b, m, d, where)
    W = _np(m.weight)
    bias = _np(m.bias) if getattr(m, "bias", None) is not None else np.zeros(W.shape[0])
    if W.shape[1] != d.width:
        b.fail(f"{where} expects {W.shape[1]} inputs but receives {d.width}")
    return _Data(W @ d.W, W @ d.b + bias)


def _batchnorm(b: _Builder, m, d: _Data, where):
    if getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None:
        b.fail(f"{where} has no running statistics (track_running_stats=False), so it "
               "normalises with batch statistics and is not a fixed map of z")
    mean, var = _np(m.running_mean), _np(m.running_var)
    w = _np(m.weight) if getattr(m, "weight", None) is not None else np.ones_like(mean)
    bias = _np(m.bias) if getattr(m, "bias", None) is not None else np.zeros_like(mean)
    s = w / np.sqrt(var + float(m.eps))
    s, t = _channel(s, d.shape), _channel(bias - s * mean, d.shape)
    if s.size != d.width:
        b.fail(f"{where} has {mean.size} channels but its input has shape {d.shape}")
    return _Data(s[:, None] * d.W, s * d.b + t, d.shape)


def _identity(b, m, d, where):
    return d


def _reshape(b: _Builder, m, d: _Data, where):
    torch = _torch()
    with torch.no_grad():
        shape = tuple(m(torch.zeros(2, *d.shape)).shape)
    if not shape or shape[0] != 2 or int(np.prod(shape[1:])) != d.width:
        b.fail(f"reshapes the activations from {(2, *d.shape)} to {shape} on a batch of 2, mixing "
               "the batch axis with the features; a generator must keep the batch as the first axis")
    return _Data(d.W, d.b, shape[1:], identity=d.identity)


def _dense_layer(b: _Builder, m, d: _Data, where):
    m64 = _float64_copy(m)
    return b.dense(lambda xs: m64(xs[0]), [d], where)


def _no_indices(b: _Builder, m):
    """Refuse a max pooling layer that also returns its indices (a tuple, not a tensor)."""
    if getattr(m, "return_indices", False):
        b.fail("returns its indices too (return_indices=True), and a generator's layers return one "
               "tensor; construct it with return_indices=False")


def _maxpool_layer(b: _Builder, m, d: _Data, where, dims):
    _no_indices(b, m)
    windows, out_shape = _max_windows(d.shape, dims, m.kernel_size, m.stride, m.padding, m.dilation,
                                      bool(m.ceil_mode), b.fail)
    act = lambda pre, keep: b.activate(pre, 0.0, "relu", where, keep)
    return _max_pool(act, d, windows, out_shape)


def _adaptive_maxpool_layer(b: _Builder, m, d: _Data, where, dims):
    _no_indices(b, m)
    windows, out_shape = _adaptive_max_windows(d.shape, dims, m.output_size)
    return _max_pool(lambda pre, keep: b.activate(pre, 0.0, "relu", where, keep), d, windows, out_shape)


def _hardtanh_layer(b: _Builder, m, d: _Data, where):
    lo, hi = _clamp_bounds(b.fail, m.min_val, m.max_val)    # ReLU6: (0, 6)
    return _clamp(lambda pre: b.activate(pre, 0.0, "relu", where)[0], d, lo, hi)


def _hardsigmoid_layer(b: _Builder, m, d: _Data, where):
    return _hardsigmoid(lambda pre: b.activate(pre, 0.0, "relu", where)[0], d)


def _threshold_layer(b: _Builder, m, d: _Data, where):
    if float(m.value) != float(m.threshold):
        _refuse_layer("Threshold", where, custom=False)
    return _clamp(lambda pre: b.activate(pre, 0.0, "relu", where)[0], d, float(m.threshold), None)


def _softshrink_layer(b: _Builder, m, d: _Data, where):
    if not float(m.lambd) >= 0:
        b.fail(f"has lambd = {m.lambd}; softshrink needs lambd >= 0")
    return _softshrink(lambda pre: b.activate(pre, 0.0, "relu", where)[0], d, float(m.lambd))


def _act(slope_of, name):
    def handler(b: _Builder, m, d: _Data, where):
        slope = np.asarray(slope_of(m), dtype=np.float64)
        return b.activate(d, _channel(slope, d.shape) if slope.size > 1 else slope, name, where)[0]
    return handler


#: layer class name -> handler(builder, module, input value, where) -> output value
MODULE_HANDLERS: dict[str, Callable] = {
    "Linear": _linear, "BatchNorm1d": _batchnorm, "BatchNorm2d": _batchnorm,
    "ReLU": _act(lambda m: 0.0, "relu"),
    "LeakyReLU": _act(lambda m: float(m.negative_slope), "leaky_relu"),
    "PReLU": _act(lambda m: _np(m.weight), "prelu"),
    "Identity": _identity, "Dropout": _identity, "AlphaDropout": _identity,
    "Dropout1d": _identity, "Dropout2d": _identity,
    "Flatten": _reshape, "Unflatten": _reshape,
    "MaxPool1d": partial(_maxpool_layer, dims=1), "MaxPool2d": partial(_maxpool_layer, dims=2),
    "AdaptiveMaxPool1d": partial(_adaptive_maxpool_layer, dims=1),
    "AdaptiveMaxPool2d": partial(_adaptive_maxpool_layer, dims=2),
    "Hardtanh": _hardtanh_layer, "ReLU6": _hardtanh_layer, "Hardsigmoid": _hardsigmoid_layer,
    "Softshrink": _softshrink_layer, "Threshold": _threshold_layer,
    "RReLU": _act(lambda m: _rrelu_slope(None, m.lower, m.upper), "leaky_relu"),   # eval
    **{kind: _dense_layer for kind in (
        "Conv1d", "Conv2d", "ConvTranspose1d", "ConvTranspose2d", "Upsample",
        "UpsamplingNearest2d", "UpsamplingBilinear2d", "AvgPool1d", "AvgPool2d",
        "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "ZeroPad1d", "ZeroPad2d", "ConstantPad1d",
        "ConstantPad2d", "ReflectionPad1d", "ReflectionPad2d", "ReplicationPad1d",
        "ReplicationPad2d", "CircularPad1d", "CircularPad2d", "PixelShuffle", "PixelUnshuffle",
        "ChannelShuffle", "Fold", "Unfold")},
}

#: known layers that are not piecewise affine (for clearer messages)
NOT_PIECEWISE_AFFINE = {
    "Tanh", "Sigmoid", "GELU", "Softplus", "ELU", "SELU", "CELU", "SiLU", "Mish", "Softsign",
    "Hardswish", "LogSigmoid", "Tanhshrink", "Softmax", "LogSoftmax",
    "Softmin", "GLU", "Softmax2d",
}
#: piecewise affine but discontinuous: a jump at the threshold
DISCONTINUOUS = {"Hardshrink", "Threshold"}   # Threshold(t, t) is clamp(min=t): loaded
DISCONTINUOUS_WHY = ("jumps at its threshold: cpadgn's networks are continuous piecewise affine; "
                     "replace it with ReLU or Softshrink and retrain")
#: normalisations by each sample's own statistics (for clearer messages)
PER_SAMPLE_NORM = {"LayerNorm", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "LocalResponseNorm",
                   "RMSNorm"}
PER_SAMPLE_NORM_WHY = ("normalises each sample by its own mean or scale, which is not piecewise affine "
                       "in z; remove it, or use BatchNorm (fixed running statistics in eval), and retrain")
#: piecewise affine, but not supported yet
NOT_SUPPORTED_YET = {
    "Conv3d": "3-D convolutions are not supported yet",
    "MaxPool3d": "3-D max pooling is not supported yet",
}
NO_LATENT_WIDTH = ("cannot tell the latent dimension: the model has no Linear layer; start the "
                   "generator with a Linear layer, whose input width is the latent dimension, or, for a "
                   "convolutional generator fed z of shape (N, S, 1, 1), with nn.Unflatten(1, (S, 1, 1))")
USE_CPA = ("cpadgn needs ReLU, LeakyReLU, PReLU, Hardtanh, ReLU6, Hardsigmoid or abs activations between "
           "affine layers: replace it with one of them and retrain")
REPLACE_IT = "replace it with a supported layer (README, Bring your own decoder)"
SQUASHING_OUTPUT = ("a Gaussian noise model needs an affine last layer: export the decoder without "
                    "its final {kind} and score {inverse}(x) with it (x clipped away from the range's "
                    "ends; log p({inverse}(x)) differs from log p(x) by the log-Jacobian)")
_INVERSE = {"Sigmoid": "logit", "Tanh": "atanh"}
#: layers that pass every value through unchanged (eval mode): a squashing layer followed
#: only by these is still the output layer
_VALUE_PRESERVING = {"Identity", "Dropout", "AlphaDropout", "Dropout1d", "Dropout2d", "Flatten",
                     "Unflatten"}


class _NeedsTrace(CpadgnError):
    """A module whose forward cannot be read from its class (custom code).  The message is
    for a TorchScript module (refused); ``eager`` says why a live module is traced instead."""

    def __init__(self, message: str, eager: str = ""):
        super().__init__(message)
        self.eager = eager


def _refuse_layer(kind: str, where: str, custom: bool, last: bool = False):
    if kind in ("Sigmoid", "Tanh") and last:
        raise CpadgnError(f"{where} ({kind}) is the output layer; "
                          + SQUASHING_OUTPUT.format(kind=kind, inverse=_INVERSE[kind]))
    if kind in NOT_PIECEWISE_AFFINE:
        raise CpadgnError(f"{where} ({kind}) is not piecewise affine; " + USE_CPA)
    if kind in PER_SAMPLE_NORM:
        raise CpadgnError(f"{where} ({kind}) " + PER_SAMPLE_NORM_WHY)
    if kind in DISCONTINUOUS:
        raise CpadgnError(f"{where} ({kind}) " + DISCONTINUOUS_WHY)
    if kind in NOT_SUPPORTED_YET:
        raise CpadgnError(f"{where} ({kind}) is not supported yet: {NOT_SUPPORTED_YET[kind]}; replace it "
                          "with a supported layer (README, Bring your own decoder)")
    if custom:
        raise _NeedsTrace(f"{where} ({kind}) is a custom module whose forward cpadgn cannot read; "
                          "export the model with torch.export.save (.pt2), which records its "
                          "operations", eager=f"{where} ({kind}) is a custom module")
    raise CpadgnError(f"{where} ({kind}) is not supported (not known to be piecewise affine); replace it "
                      "with a supported layer (README, Bring your own decoder)")


def _first_linear_width(module):
    """The latent dimension S: the input width of the first Linear layer, or the size of a
    first layer nn.Unflatten(1, shape) (a convolutional generator fed (N, S, 1, 1) behind one)."""
    torch = _torch()
    first = next((m for m in module.modules() if not any(True for _ in m.children())), None)
    if first is not None and getattr(first, "original_name", type(first).__name__) == "Unflatten":
        size = getattr(first, "unflattened_size", None)
        if getattr(first, "dim", None) in (1, -1) and isinstance(size, (tuple, list)) \
                and all(isinstance(n, int) and n > 0 for n in size):
            return int(np.prod(size))
    for m in module.modules():
        w = getattr(m, "weight", None)
        kind = getattr(m, "original_name", type(m).__name__)
        if (kind == "Linear" or isinstance(m, torch.nn.Linear)) and isinstance(w, torch.Tensor) \
                and w.ndim == 2:     # isinstance: a parametrized Linear (spectral or weight norm)
            return int(w.shape[1])
    return None


def module_to_net(module, kind_of: Callable) -> PiecewiseAffineNet:
    """The canonical net of an nn.Sequential (or a single supported layer), recursively.

    kind_of(module) -> (class name, is_builtin_torch_nn).  The latent dimension is the
    input width of the first Linear layer, or the size of a first nn.Unflatten.
    """
    leaves = []

    def visit(m, name):
        kind, builtin = kind_of(m)
        if kind_of is _eager_kind and (m._forward_pre_hooks or m._forward_hooks):
            # torch.nn.utils.spectral_norm sets .weight in a pre-hook at each call: the
            # attribute holds the last training step's weight, not the one eval computes
            raise _NeedsTrace("", eager=f"{f'layer {name}' if name else 'the model'} ({kind}) has "
                              "forward hooks, which may change its computation (spectral_norm's set "
                              "its weight; remove hooks that only record values)")
        if builtin and kind == "Sequential":
            for child_name, child in m.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name)
            return
        if kind not in MODULE_HANDLERS or not builtin:
            if not name:
                raise _NeedsTrace(
                    f"the model is a {kind} module, not an nn.Sequential; cpadgn reads TorchScript "
                    "modules only as nn.Sequential stacks -- export it with "
                    "torch.export.save (.pt2) instead, which records its operations",
                    eager=f"the model is a {kind} module, not an nn.Sequential of known layers")
        leaves.append((m, kind, builtin, f"layer {name}" if name else "the model"))

    visit(module, "")
    for i, (m, kind, builtin, where) in enumerate(leaves):
        if kind not in MODULE_HANDLERS or not builtin:
            # the output layer: only layers that change no value follow (DCGAN's Tanh, Flatten)
            last = all(k in _VALUE_PRESERVING and b for _, k, b, _ in leaves[i + 1:])
            _refuse_layer(kind, where, custom=not builtin, last=last)
    S = _first_linear_width(module)
    if S is None:
        raise CpadgnError(NO_LATENT_WIDTH)

    current = ["the model"]

    def fail(msg):
        raise CpadgnError(msg if msg.startswith(current[0]) else f"{current[0]}: {msg}")

    builder = _Builder(S, fail)
    d = builder.input()
    for m, kind, _, where in leaves:
        current[0] = where
        try:
            d = MODULE_HANDLERS[kind](builder, m, d, where)
        except AttributeError as e:
            if kind_of is not _scripted_kind:
                raise
            attr = getattr(e, "name", None) or "a setting"
            raise CpadgnError(f"{where} ({kind}) has lost its attribute '{attr}' in this TorchScript "
                              "archive (torch.jit.trace keeps only tensors); save the model with "
                              "torch.jit.script, or better torch.export.save (.pt2)") from None
    return builder.finish(d)


def _scripted_kind(m):
    try:
        qualified = m._c._type().qualified_name()
    except Exception:  # pragma: no cover - very old TorchScript
        qualified = ""
    return m.original_name, qualified.startswith("__torch__.torch.nn.modules.")


def _eager_kind(m):
    cls = type(m)
    return cls.__name__, cls.__module__.startswith("torch.nn.modules")


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover
        raise CpadgnError("reading PyTorch files needs torch; pip install torch") from None
    return torch


def _load_torchscript(path: Path) -> tuple:
    torch = _torch()
    try:
        with _quiet():
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise CpadgnError(f"{path} is a TorchScript archive that cannot be loaded: "
                          f"{_first_line(e)}; re-save it with this torch version, or with "
                          "torch.export.save (.pt2)") from None
    return _with_path(path, lambda: module_to_net(module, _scripted_kind)), module


def _trusted_unpickle(torch, path: Path):
    """The object in a torch.save file, or else in a pickle.dump file (which torch.load
    refuses: 'Invalid magic number'); torch.load's error when neither reads it."""
    try:
        with _quiet():
            return torch.load(str(path), map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError):
        raise
    except Exception as e:
        torch_error = e
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh)
    except (AttributeError, ModuleNotFoundError):
        raise
    except Exception:
        raise torch_error from None


def _load_pickle(path: Path, trust_pickle: bool) -> tuple:
    torch = _torch()
    if not trust_pickle:
        try:
            with _quiet():       # torch warns about a plain pickle's protocol before refusing it
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise CpadgnError(
                f"{path} is a pickled PyTorch module; loading it can execute arbitrary code. "
                "Pass --trust-pickle (trust_pickle=True) only if you trust the file, or "
                "re-save the model with torch.export.save") from None
        except Exception as e:
            raise CpadgnError(f"{path} cannot be read as a torch.save file "
                              f"({_first_line(e)}); it may be corrupt") from None
    else:
        try:
            obj = _trusted_unpickle(torch, path)
        except (AttributeError, ModuleNotFoundError) as e:
            # pickle names a class defined in a script by the module __main__, which here is cpadgn
            if isinstance(e, AttributeError) and repr(sys.modules.get("__main__")) in str(e):
                raise CpadgnError(
                    f"{path} pickles a class defined in the script that saved it (its __main__), which "
                    f"cannot be imported here ({_first_line(e)}); save the model with torch.export.save "
                    "(.pt2), which needs no code, or move the class into a module and save it again") from None
            raise CpadgnError(
                f"{path} pickles a custom class that cannot be imported here ({_first_line(e)}); "
                "make the module defining it importable (e.g. on PYTHONPATH), or save the "
                "model with torch.export.save (.pt2), which needs no code") from None
        except Exception as e:
            raise CpadgnError(f"{path} cannot be unpickled: {_first_line(e)}; re-save the model, preferably "
                              "with torch.export.save (.pt2)") from None
    if not isinstance(obj, torch.nn.Module):
        kind, key = _dict_contents(obj, torch) if isinstance(obj, dict) else (None, None)
        if kind == "module":
            raise CpadgnError(
                f"{path} holds a dict (a checkpoint) with the module under key {key!r}, not the module "
                f"itself; save that module alone, preferably with torch.export.save (.pt2), or pass "
                f"checkpoint[{key!r}] to cpadgn.load in Python")
        if kind == "state_dict":
            at = "" if key is None else f" under key {key!r}"
            raise CpadgnError(
                f"{path} holds a state_dict{at} (weights without the architecture); build the decoder "
                "in Python, call decoder.load_state_dict(...), then pass it to cpadgn.load or save it "
                "with torch.export.save (.pt2)")
        what = "a dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise CpadgnError(f"{path} holds {what}, not a module; save the whole model instead, "
                          "preferably with torch.export.save (.pt2)")
    return module_net(obj, path), obj


def _dict_contents(obj: dict, torch) -> tuple:
    """What a dict given in place of a generator holds: ("module", key) for a checkpoint with
    an nn.Module among its values, ("state_dict", None) for a dict of tensors, ("state_dict",
    key) for a checkpoint with one under key, else ("dict", None)."""
    def weights(d):
        return isinstance(d, dict) and bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())
    for key, value in obj.items():
        if isinstance(value, torch.nn.Module):
            return "module", key
    if weights(obj):
        return "state_dict", None
    for key, value in obj.items():
        if weights(value):
            return "state_dict", key
    return "dict", None


def module_net(module, where, example_input=None) -> PiecewiseAffineNet:
    """The canonical net of a live nn.Module: read layer by layer when it is an
    nn.Sequential of known layers, else recorded with torch.export."""
    torch = _torch()
    kind_of = _scripted_kind if isinstance(module, torch.jit.ScriptModule) else _eager_kind
    if example_input is None:
        try:
            return _with_path(where, lambda: module_to_net(module, kind_of))
        except _NeedsTrace as e:
            if kind_of is _scripted_kind:
                raise CpadgnError(f"{where}: {e}") from None
            why = CpadgnError(f"{where}: {e.eager}, so cpadgn records its operations with torch.export")
    else:
        why = CpadgnError(f"{where}: its operations recorded with torch.export on the example input")
    return _trace_module(module, where, why, example_input)


def _trace_module(module, path, why: CpadgnError, example_input=None) -> PiecewiseAffineNet:
    """torch.export a live module on a dummy batch (or example_input) and read its graph.

    Without example_input the latent dimension is the input width of its first Linear.
    Any failure is reported together with ``why`` (the reason the layer table failed).
    """
    torch = _torch()
    on_shape = hint = ""
    if example_input is None:
        width = _first_linear_width(module)
        if width is None:     # a file cannot take example_input: torch.export records the shape
            hint = "" if isinstance(path, Path) else "; pass example_input, a batch of latent vectors"
            raise CpadgnError(f"{why} (and it has no Linear layer to tell the latent dimension{hint})")
        param = next(module.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        example_input = torch.zeros(2, width, dtype=dtype)
        # the first Linear defined need not be the first applied (self.out before self.inp)
        on_shape = f" on z of shape (2, {width}) ({width}: the input width of the first Linear it defines)"
        hint = (f"if its latent dimension S is not {width}, "
                + ("save it with torch.export.save (.pt2) on z of shape (N, S)" if isinstance(path, Path)
                   else "pass example_input=torch.zeros(2, S)") + "; else ")
    was_training = module.training
    module.eval()
    try:
        # a failed export prints its partial graph on stderr before raising
        with _quiet(), contextlib.redirect_stderr(io.StringIO()):
            ep = torch.export.export(module, (torch.as_tensor(example_input),))
    except Exception as e:
        raise CpadgnError(f"{why}, which failed{on_shape} ({_first_line(e)}); {hint}make its forward "
                          "traceable by torch.export (e.g. no Python branch on a tensor's value) and "
                          "save it with torch.export.save (.pt2)") from None
    finally:
        module.train(was_training)
    return _ExportInterpreter(ep, path).run()


def _with_path(path, fn):
    """Run fn; prefix the file name to a CpadgnError it raises."""
    try:
        return fn()
    except CpadgnError as e:
        prefixed = type(e)(f"{path}: {e}")
        prefixed.__dict__.update(e.__dict__)
        raise prefixed from None


class _quiet:
    """Silence torch's deprecation chatter (torch.jit, pytree) while loading, and its log
    records (a failed torch.export logs warnings and tracebacks before raising the error
    that cpadgn turns into its one line)."""

    def __enter__(self):
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        self._log_disable = logging.root.manager.disable
        logging.disable(logging.CRITICAL)
        return self

    def __exit__(self, *exc):
        logging.disable(self._log_disable)
        return self._ctx.__exit__(*exc)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


# ================================================================ torch.export
class _Pred:
    """The boolean data > 0 (positive=True) or data < 0 (positive=False)."""

    def __init__(self, data, positive):
        self.data, self.positive = data, positive


class _Tuple:
    def __init__(self, items):
        self.items = items


class _Opaque:
    """A value cpadgn does not model (e.g. batch-norm's saved statistics, a dropout mask)."""

    def __init__(self, why):
        self.why = why


def _training_refused(it, what):
    it.fail(f"{what} was exported in training mode; call model.eval() before torch.export.export")


# ----------------------------------------------------------- aten op handlers
# Each handler(it, *args, **kwargs) receives the op's arguments (symbolic _Data values
# or constants) and returns its value; ``it`` is the running _ExportInterpreter.
def _h_identity(it, x, *args, **kw):
    return x


def _h_to(it, x, *args, **kw):
    torch = _torch()
    dtype = kw.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
    if dtype is not None and not dtype.is_floating_point:
        it.fail(f"converts the activations to {dtype}, which is not affine")
    return x


def _h_reshape(it, x, *args, **kw):
    """view / reshape / flatten / unflatten / squeeze / ...: the flat features stay put."""
    d = it.data(x)
    src, dst = _meta_shape(it.node.args[0]), _meta_shape(it.node)
    if src is None or dst is None:
        it.fail("reshapes the activations to an unknown shape")
    if not dst or str(dst[0]) != str(src[0]) or not all(isinstance(s, int) for s in dst[1:]):
        it.fail(f"reshapes the activations from {tuple(src)} to {tuple(dst)}, mixing the batch "
                "axis with the features; a generator must keep the batch as the first axis")
    if int(np.prod(dst[1:])) != d.width:
        it.fail(f"reshapes {d.width} features to {tuple(dst)}")
    return _Data(d.W, d.b, dst[1:], identity=d.identity)


def _h_linear(it, x, weight, bias=None):
    d = it.data(x)
    if len(d.shape) != 1:
        return _h_dense(it, x, weight, bias)
    W = it.const(weight, "weight")
    if W.ndim != 2 or W.shape[1] != d.width:
        it.fail(f"a linear map of shape {W.shape} applied to {d.width} features")
    b = np.zeros(W.shape[0]) if bias is None else it.vec(bias, _Data(W, W[:, 0]), "bias")
    return _Data(W @ d.W, W @ d.b + b)


def _h_mm(it, x, weight_t):
    d = it.data(x)
    Wt = it.const(weight_t, "weight")
    if len(d.shape) != 1 or Wt.ndim != 2 or Wt.shape[0] != d.width:
        it.fail(f"a matrix product with a {Wt.shape} matrix applied to features of shape {d.shape}")
    return _Data(Wt.T @ d.W, Wt.T @ d.b)


def _h_addmm(it, bias, x, weight_t, *, beta=1, alpha=1):
    out = _h_mm(it, x, weight_t)
    return _Data(float(alpha) * out.W,
                 float(alpha) * out.b + float(beta) * it.vec(bias, out, "bias"))


def _bn(it, x, weight, bias, mean, var, eps):
    d = it.data(x)
    if mean is None or var is None:
        it.fail("batch norm without running statistics (track_running_stats=False) "
                "normalises with batch statistics, so it is not a fixed map of z")
    C = d.shape[0]
    mean, var = it.const(mean).reshape(-1), it.const(var).reshape(-1)
    w = np.ones(C) if weight is None else it.const(weight).reshape(-1)
    b = np.zeros(C) if bias is None else it.const(bias).reshape(-1)
    if mean.size != C:
        it.fail(f"batch norm with {mean.size} channels applied to features of shape {d.shape}")
    s = w / np.sqrt(var + float(eps))
    s, t = _channel(s, d.shape), _channel(b - s * mean, d.shape)
    return _Data(s[:, None] * d.W, s * d.b + t, d.shape)


def _h_batch_norm(it, x, weight, bias, mean, var, training, momentum, eps, *rest):
    if training and mean is not None:
        _training_refused(it, "batch norm")
    return _bn(it, x, weight, bias, mean, var, eps)


def _h_bn_no_training(it, x, weight, bias, mean, var, momentum, eps):
    return _Tuple([_bn(it, x, weight, bias, mean, var, eps),
                   _Opaque("batch-norm statistics"), _Opaque("batch-norm statistics")])


def _h_native_bn(it, x, weight, bias, mean, var, training, momentum, eps):
    return _Tuple([_h_batch_norm(it, x, weight, bias, mean, var, training, momentum, eps),
                   _Opaque("batch-norm statistics"), _Opaque("batch-norm statistics")])


def _h_bn_functional(it, x, weight, bias, mean, var, training, momentum, eps):
    """The functional form that an in-place rewrite gives batch norm (out, 4 statistics)."""
    return _Tuple([_h_batch_norm(it, x, weight, bias, mean, var, training, momentum, eps),
                   *[_Opaque("batch-norm statistics")] * 4])


def _h_dropout(it, x, p=0.5, train=False):
    if train:
        _training_refused(it, "dropout")
    return it.data(x)


def _h_native_dropout(it, x, p, train):
    return _Tuple([_h_dropout(it, x, p, train), _Opaque("a dropout mask")])


def _activation(slope_of, name):
    def handler(it, x, *args):
        d = it.data(x)
        return it.activate(d, slope_of(it, d, *args), name)
    return handler


def _prelu_slope(it, d, weight):
    w = it.const(weight, "PReLU weight").reshape(-1)
    return w if w.size == 1 else _channel(w, d.shape)


def _h_clamp(it, x, min=None, max=None):
    """clamp / clamp_min / clamp_max / hardtanh / relu6 with constant bounds."""
    if any(isinstance(v, (_Data, _Opaque)) for v in (min, max)):
        it.fail("clamps to bounds that depend on z; only constant bounds are supported")
    lo, hi = _clamp_bounds(it.fail, *(None if v is None else it.const(v, "bound") for v in (min, max)))
    if lo == 0.0 and hi is None:
        return it.activate(it.data(x), 0.0, "relu")
    return _clamp(lambda pre: it.activate(pre, 0.0, "relu"), it.data(x), lo, hi)


def _h_clamp_min(it, x, min_value):
    return _h_clamp(it, x, min=min_value)


def _h_clamp_max(it, x, max_value):
    return _h_clamp(it, x, max=max_value)


def _h_softshrink(it, x, lambd=0.5):
    lambd = float(it.const(lambd, "lambd"))
    if not lambd >= 0:
        it.fail(f"softshrink with lambd = {lambd}; it needs lambd >= 0")
    return _softshrink(lambda pre: it.activate(pre, 0.0, "relu"), it.data(x), lambd)


def _h_threshold(it, x, threshold, value):
    """threshold(x, t, v) = x if x > t else v: continuous only when v = t (clamp(min=t))."""
    t, v = (float(it.const(a, "threshold")) for a in (threshold, value))
    if v != t:
        it.fail("operation aten.threshold " + DISCONTINUOUS_WHY)
    return _h_clamp(it, x, min=t)


def _h_hardtanh(it, x, min_val=-1.0, max_val=1.0):
    return _h_clamp(it, x, min=min_val, max=max_val)


def _h_maximum(it, x, y, sign=1.0):
    """max(x, y) = y + relu(x - y), or with sign -1 min(x, y) = -max(-x, -y); x, y
    activations of one shape, or one of them a constant.  max(u, c u) with a constant
    0 <= c <= 1 is a LeakyReLU (no units carried)."""
    if not isinstance(x, _Data):
        x, y = y, x
    neg = lambda d: _Data(sign * d.W, sign * d.b, d.shape, scaled_from=d.scaled_from, scale=d.scale)
    a = neg(it.data(x))
    if not isinstance(y, _Data):
        c = sign * it.vec(y, a, "bound")
        act = it.activate(_Data(a.W, a.b - c, a.shape), 0.0, "relu")
        return neg(_Data(act.W, act.b + c, a.shape))
    b = neg(y)
    if b.width != a.width:
        it.fail(f"takes the elementwise max/min of activations of shapes {a.shape} and {b.shape}; "
                "give both the same shape")
    for u, v in ((x, y), (y, x)):
        if sign > 0 and v.scaled_from is not None and u.same_as(v.scaled_from) \
                and np.all((v.scale >= 0) & (v.scale <= 1)):
            return it.activate(u, v.scale, "leaky_relu")
    act, (kept,) = it.activate(_Data(a.W - b.W, a.b - b.b, a.shape), 0.0, "relu", keep=[b])
    return neg(_Data(act.W + kept.W, act.b + kept.b, a.shape))


def _h_max_other(sign):
    def handler(it, x, *args, **kwargs):
        """torch.max(x, y) / torch.min(x, y) (overload 'other'); not a reduction."""
        if getattr(it.node.target, "_overloadname", "") != "other" or len(args) != 1:
            it.fail("a max/min reduction over the features is not supported yet; " + REPLACE_IT)
        return _h_maximum(it, x, args[0], sign)
    return handler


def _h_constant_like(value):
    def handler(it, x, *args, **kwargs):
        """zeros_like(x) and friends: a constant of x's per-sample shape."""
        torch = _torch()
        fill = args[0] if value is None else value
        return torch.full((1, *it.data(x).shape), float(fill), dtype=torch.float64)
    return handler


def _compare(positive):
    def handler(it, x, other):
        d = it.data(x)
        if np.any(it.const(other, "threshold") != 0):
            it.fail("a comparison against a non-zero threshold is not supported")
        return _Pred(d, positive)
    return handler


def _h_where(it, cond, a, b):
    """where(u > 0, u, c * u) and friends: a one-breakpoint activation."""
    if not isinstance(cond, _Pred):
        it.fail("a data-dependent selection (where) other than an activation")
    pos, neg = (a, b) if cond.positive else (b, a)
    d = cond.data
    if not (isinstance(pos, _Data) and d.same_as(pos)):
        it.fail("a data-dependent selection (where) other than an activation")
    if isinstance(neg, _Data) and neg.scaled_from is not None and d.same_as(neg.scaled_from):
        slope = neg.scale
    elif not isinstance(neg, _Data) and np.all(it.const(neg) == 0):
        slope = 0.0
    else:
        it.fail("a data-dependent selection (where) other than an activation")
    return it.activate(d, slope, "prelu")


def _add(it, x, y, alpha):
    """x + alpha * y; two branches of the network simply add their affine maps."""
    if isinstance(x, _Data) and isinstance(y, _Data):
        if x.width != y.width:
            return _h_dense_fn(it, lambda a, b: a + alpha * b, [x, y])
        return _Data(x.W + alpha * y.W, x.b + alpha * y.b, x.shape)
    if isinstance(x, _Data):
        return _Data(x.W, x.b + alpha * it.vec(y, x, "added constant"), x.shape)
    if isinstance(y, _Data):   # c + alpha * y
        return _Data(alpha * y.W, alpha * y.b + it.vec(x, y, "added constant"), y.shape)
    it.fail("an addition without the activations")  # pragma: no cover - folded


def _h_add(it, x, y, *, alpha=1):
    return _add(it, x, y, float(alpha))


def _h_sub(it, x, y, *, alpha=1):
    return _add(it, x, y, -float(alpha))


def _h_rsub(it, x, y, *, alpha=1):   # y - alpha * x
    return _add(it, _h_mul(it, x, -float(alpha)), y, 1.0)


def _scaled(d: _Data, s: np.ndarray) -> _Data:
    return _Data(s[:, None] * d.W, s * d.b, d.shape, scaled_from=d, scale=s)


def _h_mul(it, x, y):
    if isinstance(x, _Data) and isinstance(y, _Data):
        it.fail("multiplies activations together, which is not piecewise affine")
    d, c = (x, y) if isinstance(x, _Data) else (y, x)
    d = it.data(d)
    return _scaled(d, it.vec(c, d, "factor"))


def _h_div(it, x, y, **kw):
    if kw.get("rounding_mode") is not None:
        it.fail("a rounding division is not affine")
    if not isinstance(x, _Data) or isinstance(y, _Data):
        it.fail("divides by the activations, which is not piecewise affine")
    return _scaled(x, 1.0 / it.vec(y, x, "divisor"))


def _h_neg(it, x):
    d = it.data(x)
    return _scaled(d, -np.ones(d.width))


def _h_getitem(it, x, i):
    if isinstance(x, _Tuple):
        return x.items[i]
    it.fail("indexes into the activations; only whole-tensor layers are supported")


def _h_dense_fn(it, fn, inputs):
    return it.builder.dense(lambda xs: fn(*xs), inputs, it.where())


def _h_dense(it, *args, **kwargs):
    """Any op affine in its activation arguments (convolutions, upsampling, average
    pooling, padding, permute, cat, ...): its dense map from its own forward pass."""
    torch = _torch()
    target, symbolic = it.node.target, []

    def mark(v):
        if isinstance(v, _Data):
            symbolic.append(v)
            return ("__sym__", len(symbolic) - 1)
        if isinstance(v, _Opaque):
            it.fail(f"uses {v.why}, which cpadgn does not model")
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.double()
        if isinstance(v, (list, tuple)):
            return type(v)(mark(a) for a in v)
        return v

    margs, mkw = mark(list(args)), {k: mark(v) for k, v in kwargs.items()}

    def fill(v, xs):
        if isinstance(v, tuple) and len(v) == 2 and v[0] == "__sym__":
            return xs[v[1]]
        if isinstance(v, (list, tuple)):
            return type(v)(fill(a, xs) for a in v)
        return v

    def fn(xs):
        return target(*fill(margs, xs), **{k: fill(v, xs) for k, v in mkw.items()})

    out = it.builder.dense(fn, symbolic, it.where())
    dst = _meta_shape(it.node)
    if dst is not None and all(isinstance(s, int) for s in dst[1:]) and tuple(dst[1:]) != out.shape:
        it.fail(f"gives per-sample shape {out.shape} on the batch but {tuple(dst[1:])} in the "
                "export; it mixes the samples of a batch")
    return out


def _h_max_pool(it, x, kernel, stride=(), padding=0, dilation=1, ceil_mode=False, *, dims):
    d = it.data(x)
    windows, out_shape = _max_windows(d.shape, dims, kernel, stride, padding, dilation, bool(ceil_mode),
                                      it.fail)
    return _max_pool(lambda pre, keep: it.activate(pre, 0.0, "relu", keep), d, windows, out_shape)


def _h_max_pool_indices(it, *args, dims):
    return _Tuple([_h_max_pool(it, *args, dims=dims), _Opaque("max-pool indices")])


def _h_adaptive_max_pool(it, x, output_size, *, dims):
    d = it.data(x)
    windows, out_shape = _adaptive_max_windows(d.shape, dims, output_size)
    out = _max_pool(lambda pre, keep: it.activate(pre, 0.0, "relu", keep), d, windows, out_shape)
    return _Tuple([out, _Opaque("max-pool indices")])


_RESHAPES = ("view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze",
             "expand", "view_copy", "_reshape_alias")
_AFFINE_OPS = ("convolution", "_convolution", "conv1d", "conv2d", "conv_transpose1d",
               "conv_transpose2d", "upsample_nearest1d", "upsample_nearest2d",
               "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "upsample_bilinear2d",
               "_upsample_bilinear2d_aa", "upsample_linear1d", "upsample_bicubic2d",
               "_upsample_bicubic2d_aa", "avg_pool1d", "avg_pool2d",
               "adaptive_avg_pool1d", "adaptive_avg_pool2d", "_adaptive_avg_pool2d",
               "constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d",
               "replication_pad1d", "replication_pad2d", "permute", "transpose", "cat", "stack",
               "slice", "narrow", "select", "pixel_shuffle", "pixel_unshuffle", "mean", "sum",
               "repeat", "flip", "roll", "channel_shuffle", "native_channel_shuffle", "im2col",
               "col2im")

#: aten op name -> handler(interpreter, *args, **kwargs)
EXPORT_HANDLERS: dict[str, Callable] = {
    "linear": _h_linear, "mm": _h_mm, "matmul": _h_mm, "addmm": _h_addmm,
    "batch_norm": _h_batch_norm, "_native_batch_norm_legit_no_training": _h_bn_no_training,
    "native_batch_norm": _h_native_bn, "_native_batch_norm_legit_functional": _h_bn_functional,
    "dropout": _h_dropout, "feature_dropout": _h_dropout, "alpha_dropout": _h_dropout,
    "native_dropout": _h_native_dropout,
    "relu": _activation(lambda it, d: 0.0, "relu"),
    "leaky_relu": _activation(lambda it, d, slope=0.01: float(slope), "leaky_relu"),
    "prelu": _activation(_prelu_slope, "prelu"), "_prelu_kernel": _activation(_prelu_slope, "prelu"),
    "abs": _activation(lambda it, d: -1.0, "abs"),
    "clamp_min": _h_clamp_min, "clamp_max": _h_clamp_max, "clamp": _h_clamp,
    "hardtanh": _h_hardtanh, "relu6": lambda it, x: _h_clamp(it, x, 0.0, 6.0),
    "hardsigmoid": lambda it, x: _hardsigmoid(lambda pre: it.activate(pre, 0.0, "relu"), it.data(x)),
    "softshrink": _h_softshrink, "threshold": _h_threshold,
    "rrelu": lambda it, x, lower=1 / 8, upper=1 / 3, training=False, generator=None: it.activate(
        it.data(x), _rrelu_slope(it.fail, lower, upper, training), "leaky_relu"),
    "gt": _compare(True), "ge": _compare(True), "lt": _compare(False), "le": _compare(False),
    "where": _h_where, "maximum": _h_maximum, "minimum": lambda it, x, y: _h_maximum(it, x, y, -1.0),
    "max": _h_max_other(1.0), "min": _h_max_other(-1.0),
    "zeros_like": _h_constant_like(0.0), "ones_like": _h_constant_like(1.0),
    "full_like": _h_constant_like(None),
    "add": _h_add, "sub": _h_sub, "rsub": _h_rsub, "mul": _h_mul, "div": _h_div, "neg": _h_neg,
    "clone": _h_identity, "alias": _h_identity, "detach": _h_identity,
    "contiguous": _h_identity, "lift_fresh_copy": _h_identity,
    "_to_copy": _h_to, "to": _h_to, "getitem": _h_getitem,
    **{f"{op}{n}d{tail}": partial(h, dims=n) for n in (1, 2) for op, tail, h in (
        ("max_pool", "", _h_max_pool), ("max_pool", "_with_indices", _h_max_pool_indices),
        ("adaptive_max_pool", "", _h_adaptive_max_pool))},
    **{name: _h_reshape for name in _RESHAPES},
    **{name: _h_dense for name in _AFFINE_OPS},
}
NOT_CPA = {"tanh", "sigmoid", "gelu", "softplus", "elu", "selu", "celu", "silu", "mish",
           "exp", "log", "pow", "sqrt", "rsqrt", "sin", "cos", "softmax", "_softmax",
           "log_softmax", "_log_softmax", "hardswish", "log_sigmoid_forward",
           "erf", "logit", "reciprocal"}
PER_SAMPLE_NORM_OPS = {"layer_norm", "native_layer_norm", "group_norm", "native_group_norm",
                       "instance_norm", "rms_norm", "_fused_rms_norm"}
NOT_YET = {"conv3d": "3-D convolutions are not supported yet",
           "max_pool3d": "3-D max pooling is not supported yet"}
SKIP = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
        "_assert_async", "sym_constrain_range"}


class _ExportInterpreter:
    """Walk the graph of an ExportedProgram symbolically; each aten op is one handler
    in EXPORT_HANDLERS.  A value still needed after a hidden layer (a skip connection)
    is carried through that layer by slope-1 units."""

    def __init__(self, ep, path):
        self.ep, self.path = ep, path
        self.builder = None
        self.node = None
        self.values: dict = {}
        self.last_use: dict = {}
        self.pos = 0

    # ------------------------------------------------------------- helpers
    def where(self) -> str:
        node = self.node
        stack = node.meta.get("nn_module_stack") if node is not None else None
        if stack:
            mod_path, cls = list(stack.values())[-1]
            if mod_path:
                return f"layer {mod_path} ({cls.rsplit('.', 1)[-1]})"
        return f"node '{node.name}'" if node is not None else "the program"

    def fail(self, msg):
        raise CpadgnError(f"{self.path}: {self.where()}: {msg}")

    def const(self, v, what="value") -> np.ndarray:
        torch = _torch()
        if isinstance(v, torch.Tensor):
            return v.detach().to("cpu").double().numpy()
        if isinstance(v, (int, float, bool)):
            return np.asarray(float(v))
        self.fail(f"expected a constant {what}, got {type(v).__name__}")

    def vec(self, v, d: _Data, what) -> np.ndarray:
        """A constant broadcast to the per-sample shape of d, flattened: (F,)."""
        a = self.const(v, what)
        if a.ndim > len(d.shape):
            if any(s != 1 for s in a.shape[:a.ndim - len(d.shape)]):
                self.fail(f"the {what} has shape {a.shape}, which varies along the batch; "
                          "only per-feature constants are supported")
            a = a.reshape(a.shape[a.ndim - len(d.shape):])
        try:
            return np.broadcast_to(a, d.shape).reshape(-1).copy()
        except ValueError:
            self.fail(f"the {what} has shape {a.shape} for features of shape {d.shape}")

    def data(self, v) -> _Data:
        if isinstance(v, _Opaque):
            self.fail(f"uses {v.why}, which cpadgn does not model")
        if not isinstance(v, _Data):
            self.fail("expected the network's activations here")
        return v

    def activate(self, d: _Data, slope, name, keep=()):
        """A hidden layer act(d); every value used later rides along (slope 1)."""
        live = [n for n, v in self.values.items()
                if isinstance(v, _Data) and self.last_use.get(n, -1) > self.pos]
        act, carried = self.builder.activate(d, slope, name, self.where(),
                                             [*keep, *(self.values[n] for n in live)])
        for n, v in zip(live, carried[len(keep):]):
            self.values[n] = v
        return (act, carried[:len(keep)]) if keep else act

    # ------------------------------------------------------------------ run
    def run(self) -> PiecewiseAffineNet:
        torch = _torch()
        self.ep = _functional(self.ep, self.path)
        ep, sig = self.ep, self.ep.graph_signature
        from torch.export.graph_signature import InputKind
        nodes = list(ep.graph.nodes)
        order = {n: i for i, n in enumerate(nodes)}
        self.last_use = {n: max((order[u] for u in n.users), default=-1) for n in nodes}
        values, user_inputs = self.values, []
        specs = {spec.arg.name: spec for spec in sig.input_specs if hasattr(spec.arg, "name")}
        for self.pos, node in enumerate(nodes):
            self.node = node
            if node.op == "placeholder":
                spec = specs.get(node.name)
                if (spec is None or spec.kind == InputKind.USER_INPUT) and not node.users and \
                        not isinstance(node.meta.get("val"), torch.Tensor):
                    # a Python scalar (forward(z, *, temperature=2.0)): export bakes its value in
                    values[node] = _Opaque(f"the constant input {node.name}")
                elif spec is None or spec.kind == InputKind.USER_INPUT:
                    user_inputs.append(node)
                    values[node] = self._input(node, len(user_inputs))
                elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                    values[node] = self._param(spec.target)
                else:
                    values[node] = _Opaque(f"an input of kind {spec.kind.name}")
            elif node.op == "get_attr":
                v = getattr(ep.graph_module, node.target, None)
                values[node] = v if isinstance(v, torch.Tensor) else _Opaque(f"attribute {node.target}")
            elif node.op == "call_function":
                values[node] = self._call(node, values)
            elif node.op == "output":
                return self._output(node, values)
            else:  # pragma: no cover - not produced by torch.export
                self.fail(f"unexpected graph node kind {node.op}")
        self.fail("the program has no output")  # pragma: no cover

    def _input(self, node, count):
        if count > 1:
            self.fail("the program takes more than one input; a generator maps z alone: export a "
                      "wrapper whose forward(z) calls the decoder with its other inputs fixed")
        shape = _meta_shape(node)
        if shape is None or len(shape) not in (1, 2) or not isinstance(shape[-1], int):
            fed = "" if shape is None or len(shape) < 3 else (
                "; for a generator fed z of shape (N, S, 1, 1), export nn.Sequential(nn.Unflatten(1, "
                "(S, 1, 1)), generator) on z of shape (N, S)")
            self.fail(f"the input has shape {tuple(shape) if shape is not None else '?'}; a "
                      f"generator must take latent vectors of shape (N, S){fed}")
        self.builder = _Builder(int(shape[-1]), self.fail)
        return self.builder.input()

    def _param(self, target):
        ep = self.ep
        if target in ep.state_dict:
            return ep.state_dict[target]
        if target in ep.constants:
            return ep.constants[target]
        self.fail(f"parameter {target} is missing from the archive")

    def _call(self, node, values):
        torch = _torch()
        target = node.target
        args = torch.fx.node.map_arg(node.args, lambda n: values[n])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: values[n])
        flat = list(args) + list(kwargs.values())
        flat = [y for x in flat for y in (x if isinstance(x, (list, tuple)) else [x])]
        symbolic = any(isinstance(x, (_Data, _Pred, _Tuple)) for x in flat)
        name = _op_name(target)
        if name in SKIP:
            return None
        if name in ("sym_size", "sym_numel", "sym_stride", "sym_storage_offset"):
            return _Opaque("the batch size")
        if not symbolic and any(isinstance(x, _Opaque) for x in flat):
            if name in ("view", "reshape", "_unsafe_view", "expand"):   # a constant sized by the batch
                self.fail("builds a constant the size of the batch, which is not supported")
            return _Opaque(f"the result of {_full_op_name(target)}")
        if not symbolic:
            return self._fold(node, target, args, kwargs, name)
        handler = EXPORT_HANDLERS.get(name)
        if handler is not None:
            try:
                return handler(self, *args, **kwargs)
            except TypeError as e:
                self.fail(f"operation aten.{name} called with unexpected arguments ({e})")
        if name in NOT_CPA or name.rstrip("_") in NOT_CPA:
            if name.rstrip("_") in ("sigmoid", "tanh") and self._feeds_output(node):
                kind = name.rstrip("_").capitalize()
                self.fail(f"the output goes through aten.{name}; "
                          + SQUASHING_OUTPUT.format(kind=kind, inverse=_INVERSE[kind]))
            self.fail(f"operation aten.{name} is not piecewise affine; " + USE_CPA)
        if name in PER_SAMPLE_NORM_OPS:
            self.fail(f"operation aten.{name} " + PER_SAMPLE_NORM_WHY)
        if name == "hardshrink":
            self.fail(f"operation aten.{name} " + DISCONTINUOUS_WHY)
        if name in NOT_YET:
            self.fail(f"operation aten.{name} is not supported yet ({NOT_YET[name]}); " + REPLACE_IT)
        self.fail(f"operation {_full_op_name(target)} is not supported "
                  "(not known to be piecewise affine); " + REPLACE_IT)

    @staticmethod
    def _feeds_output(node) -> bool:
        """node reaches the graph output through reshapes and value-preserving ops only
        (dropout: eval; casts)."""
        users = list(node.users)
        while len(users) == 1 and users[0].op == "call_function" and \
                _op_name(users[0].target) in (*_RESHAPES, "clone", "contiguous", "alias", "detach",
                                              "_to_copy", "to", "dropout", "feature_dropout",
                                              "alpha_dropout"):
            users = list(users[0].users)
        return len(users) == 1 and users[0].op == "output"

    def _fold(self, node, target, args, kwargs, name):
        """Evaluate an operation on constants only (weight transposes, reshapes, ...)."""
        torch = _torch()
        if target is operator.getitem:
            return target(*args)
        if not isinstance(target, torch._ops.OpOverload):
            self.fail(f"operation {_full_op_name(target)} is not supported")
        if torch.Tag.nondeterministic_seeded in target.tags:
            self.fail(f"operation aten.{name} is random; a generator must be a deterministic "
                      "function of z")
        try:
            with torch.no_grad():
                return target(*args, **kwargs)
        except Exception as e:
            self.fail(f"cannot evaluate aten.{name} on the stored constants ({_first_line(e)})")

    def _output(self, node, values):
        names = list(self.ep.graph_signature.user_outputs)
        outs = node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]]
        chosen = [o for o in outs if getattr(o, "name", None) in names] if names else list(outs)
        if len(chosen) != 1:
            spec = getattr(getattr(self.ep, "call_spec", None), "out_spec", None)
            keys = getattr(spec, "context", None) if getattr(spec, "type", None) is dict else None
            pick = f"decoder(z)[{keys[0]!r}]" if keys else "decoder(z)[0]"
            what = f" (a dict with keys {', '.join(map(repr, keys))})" if keys else ""
            self.fail(f"the program returns {len(chosen)} outputs{what}; a generator returns one tensor "
                      f"(export a wrapper whose forward returns the mean alone, e.g. {pick})")
        v = values[chosen[0]]
        if not isinstance(v, _Data):
            self.fail("the output does not depend on the input z")
        self.node = None
        return self.builder.finish(v)


def _functional(ep, path):
    """ep with its in-place operations (nn.ReLU(inplace=True), ``out += x``, ``h.mul_(2)``)
    rewritten as out-of-place ones: torch.export keeps them, and their results alias
    their inputs, which the symbolic walk does not model."""
    torch = _torch()
    if not any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
               and n.target._schema.is_mutable for n in ep.graph.nodes):
        return ep
    try:
        with _quiet():
            return ep.run_decompositions({})
    except Exception as e:
        raise CpadgnError(f"{path}: torch cannot rewrite the program's in-place operations "
                          f"({_first_line(e)}); use out-of-place ones (nn.ReLU(), x = x + y) "
                          "and export it again") from None


def _meta_shape(node):
    val = getattr(node, "meta", {}).get("val") if node is not None else None
    shape = getattr(val, "shape", None)
    if shape is None:
        return None
    out = []
    for s in shape:
        try:
            out.append(int(s))
        except Exception:  # symbolic batch size
            out.append(str(s))
    return out


def _op_name(target) -> str:
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "_opname", None)
    if name is None:
        name = getattr(target, "__name__", str(target)).split(".")[0]
    return name


def _full_op_name(target) -> str:
    try:
        return str(target.name()).replace("::", ".")
    except Exception:
        return getattr(target, "__name__", str(target))


def _load_torch_export(path: Path) -> tuple:
    torch = _torch()
    try:
        with _quiet():
            ep = torch.export.load(str(path))
    except Exception as e:
        raise CpadgnError(f"{path} is a torch.export archive that cannot be loaded: "
                          f"{_first_line(e)}; re-export it with torch.export.save under this torch "
                          "version") from None
    return _ExportInterpreter(ep, path).run(), ep
