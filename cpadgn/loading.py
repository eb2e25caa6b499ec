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

Adding a layer kind is local: a TorchScript / nn.Module layer needs an entry in
``MODULE_HANDLERS`` (class name -> function returning operations), an exported aten
operation an entry in ``_ExportInterpreter.HANDLERS``.
"""
from __future__ import annotations

import operator
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import CpadgnError
from .network import PiecewiseAffineNet

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"

SOURCE_FORMATS = ("cpadgn-h5", "torch-export", "torchscript", "pickle")


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
    """

    net: PiecewiseAffineNet
    prior_mean: np.ndarray
    prior_cov: np.ndarray
    noise_std: np.ndarray | None
    source_format: str
    extra: dict = field(default_factory=dict)

    @property
    def latent_dim(self) -> int:
        return self.net.latent_dim

    @property
    def output_dim(self) -> int:
        return self.net.output_dim


# =========================================================================== entry
def load_generator(path, *, trust_pickle: bool = False) -> Generator:
    """Read a generator file of any supported format (detected from its content)."""
    path = Path(path)
    if not path.exists():
        raise CpadgnError(f"generator file {path} does not exist")
    if path.is_dir():
        raise CpadgnError(f"{path} is a directory, not a generator file")
    fmt = detect_format(path)
    if fmt == "hdf5":
        from .modelfile import read_model
        return read_model(path)
    if fmt == "torch-export":
        net = _load_torch_export(path)
    elif fmt == "torchscript":
        net = _load_torchscript(path)
    elif fmt == "pickle":
        net = _load_pickle(path, trust_pickle)
    else:  # pragma: no cover - detect_format raises for anything else
        raise AssertionError(fmt)
    check_net(net, path)
    S = net.latent_dim
    return Generator(net=net, prior_mean=np.zeros(S), prior_cov=np.eye(S), noise_std=None,
                     source_format=fmt, extra={})


def detect_format(path) -> str:
    """'hdf5' | 'torch-export' | 'torchscript' | 'pickle' from the file's content."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            is_hdf5 = head == HDF5_SIGNATURE or (
                not head.startswith(ZIP_SIGNATURE) and _hdf5_with_userblock(f))
    except OSError as e:
        raise CpadgnError(f"cannot read {path}: {e.strerror or e}") from None
    if is_hdf5:
        return "hdf5"
    if len(head) == 0:
        raise CpadgnError(f"generator file {path} is empty")
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
    """Refuse non-finite weights, biases or slopes."""
    for kind, arrays in (("weight", net.weights), ("bias", net.biases), ("slope", net.slopes)):
        for l, a in enumerate(arrays):
            if not np.all(np.isfinite(a)):
                raise CpadgnError(f"{path}: layer {l} {kind} has non-finite values (NaN or inf); "
                                  "the model is broken, retrain or re-export it")


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
    pending_is_identity = True
    weights, biases, slopes = [], [], []
    last_was_activation = False
    for op in ops:
        if isinstance(op, Affine):
            W = np.asarray(op.W, dtype=np.float64)
            b = np.broadcast_to(np.asarray(op.b, dtype=np.float64), (W.shape[0],))
            if W.ndim != 2 or W.shape[1] != width:
                raise CpadgnError(f"{op.where or 'a linear layer'} expects {W.shape[1]} inputs "
                                  f"but receives {width}")
            W_pend, b_pend = W @ W_pend, W @ b_pend + b
            width, pending_is_identity, last_was_activation = W.shape[0], False, False
        elif isinstance(op, Scale):
            s = _broadcast_width(op.s, width, op.where)
            t = _broadcast_width(op.t, width, op.where)
            W_pend, b_pend = s[:, None] * W_pend, s * b_pend + t
            pending_is_identity, last_was_activation = False, False
        elif isinstance(op, Activation):
            slope = _broadcast_width(op.slope, width, op.where)
            if last_was_activation:
                slopes[-1] = _compose_slopes(slopes[-1], slope)
            else:
                # pending_is_identity here means an activation applied to z itself: the
                # identity layer in front keeps the canonical form (affine, act, ...).
                weights.append(W_pend)
                biases.append(b_pend)
                slopes.append(slope)
            W_pend, b_pend = np.eye(width), np.zeros(width)
            pending_is_identity, last_was_activation = True, True
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
        raise CpadgnError(f"{where or 'a layer'} has {a.size} channels but its input has {width} features")
    return a.copy()


def _infer_input_width(ops: list) -> int:
    for op in ops:
        if isinstance(op, Affine):
            return int(np.asarray(op.W).shape[1])
        if isinstance(op, (Scale, Activation)):
            for a in (getattr(op, "s", None), getattr(op, "slope", None)):
                if a is not None and np.size(a) > 1:
                    return int(np.size(a))
    raise CpadgnError("cannot tell the latent dimension: the model has no Linear layer")


# ==================================================== nn.Module / TorchScript layers
def _np(t) -> np.ndarray:
    return t.detach().to("cpu").double().numpy().copy()


def _linear(m, where):
    W = _np(m.weight)
    b = _np(m.bias) if getattr(m, "bias", None) is not None else np.zeros(W.shape[0])
    return [Affine(W, b, where)]


def _batchnorm(m, where):
    if getattr(m, "running_mean", None) is None or getattr(m, "running_var", None) is None:
        raise CpadgnError(f"{where} has no running statistics (track_running_stats=False), so it "
                          "normalises with batch statistics and is not a fixed map of z")
    mean, var = _np(m.running_mean), _np(m.running_var)
    w = _np(m.weight) if getattr(m, "weight", None) is not None else np.ones_like(mean)
    b = _np(m.bias) if getattr(m, "bias", None) is not None else np.zeros_like(mean)
    s = w / np.sqrt(var + float(m.eps))
    return [Scale(s, b - s * mean, where)]


def _identity(m, where):
    return []


def _flatten(m, where):
    if int(getattr(m, "start_dim", 1)) != 1 or int(getattr(m, "end_dim", -1)) not in (-1, 1):
        raise CpadgnError(f"{where} flattens dimensions other than (N, F); only flat vector "
                          "generators are supported yet")
    return []


def _act(slope_of, name):
    def handler(m, where):
        return [Activation(np.asarray(slope_of(m), dtype=np.float64), name, where)]
    return handler


#: layer class name -> handler(module, where) returning a list of operations
MODULE_HANDLERS: dict[str, Callable] = {
    "Linear": _linear,
    "BatchNorm1d": _batchnorm,
    "ReLU": _act(lambda m: 0.0, "relu"),
    "LeakyReLU": _act(lambda m: float(m.negative_slope), "leaky_relu"),
    "PReLU": _act(lambda m: _np(m.weight), "prelu"),
    "Identity": _identity,
    "Dropout": _identity,        # inference mode
    "AlphaDropout": _identity,
    "Flatten": _flatten,
}

#: known layers that are not piecewise affine (for clearer messages)
NOT_PIECEWISE_AFFINE = {
    "Tanh", "Sigmoid", "GELU", "Softplus", "ELU", "SELU", "CELU", "SiLU", "Mish", "Softsign",
    "Hardsigmoid", "Hardswish", "LogSigmoid", "Tanhshrink", "Softmax", "LogSoftmax",
    "Softmin", "GLU", "Threshold", "RReLU",
}
#: piecewise affine, but not supported yet
NOT_SUPPORTED_YET = {
    "Hardtanh": "has two breakpoints", "ReLU6": "has two breakpoints",
    "Hardshrink": "has two breakpoints", "Softshrink": "has two breakpoints",
    "Conv1d": "convolutions are not supported yet", "Conv2d": "convolutions are not supported yet",
    "Conv3d": "convolutions are not supported yet",
    "ConvTranspose1d": "convolutions are not supported yet",
    "ConvTranspose2d": "convolutions are not supported yet",
    "Unflatten": "it reshapes to non-vector outputs", "MaxPool1d": "max pooling is not supported yet",
    "MaxPool2d": "max pooling is not supported yet",
}


class _NeedsTrace(CpadgnError):
    """A module whose forward cannot be read from its class (custom code)."""


def _refuse_layer(kind: str, where: str, custom: bool):
    if kind in NOT_PIECEWISE_AFFINE:
        raise CpadgnError(f"{where} ({kind}) is not piecewise affine; cpadgn needs ReLU, "
                          "LeakyReLU, PReLU or abs activations")
    if kind in NOT_SUPPORTED_YET:
        raise CpadgnError(f"{where} ({kind}) is not supported yet: {NOT_SUPPORTED_YET[kind]}")
    if custom:
        raise _NeedsTrace(f"{where} ({kind}) is a custom module whose forward cpadgn cannot read; "
                          "export the model with torch.export.save (.pt2), which records its "
                          "operations")
    raise CpadgnError(f"{where} ({kind}) is not supported (not known to be piecewise affine)")


def module_to_ops(module, kind_of: Callable) -> list:
    """Operations of an nn.Sequential (or a single supported layer), recursively.

    kind_of(module) -> (class name, is_builtin_torch_nn).
    """
    ops = []

    def visit(m, name):
        kind, builtin = kind_of(m)
        where = f"layer {name}" if name else "the model"
        if builtin and kind == "Sequential":
            for child_name, child in m.named_children():
                visit(child, f"{name}.{child_name}" if name else child_name)
            return
        handler = MODULE_HANDLERS.get(kind) if builtin else None
        if handler is None:
            if not name:
                raise _NeedsTrace(
                    f"the model is a {kind} module, not an nn.Sequential; cpadgn reads TorchScript and "
                    "pickled modules only as nn.Sequential stacks -- export it with "
                    "torch.export.save (.pt2) instead, which records its operations")
            _refuse_layer(kind, where, custom=not builtin)
        ops.extend(handler(m, where))

    visit(module, "")
    return ops


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


def _load_torchscript(path: Path) -> PiecewiseAffineNet:
    torch = _torch()
    try:
        with _quiet():
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:
        raise CpadgnError(f"{path} is a TorchScript archive that cannot be loaded: "
                          f"{_first_line(e)}") from None
    return _with_path(path, lambda: ops_to_net(module_to_ops(module, _scripted_kind)))


def _load_pickle(path: Path, trust_pickle: bool) -> PiecewiseAffineNet:
    torch = _torch()
    if not trust_pickle:
        try:
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
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as e:
            raise CpadgnError(f"{path} cannot be unpickled: {_first_line(e)}") from None
    if not isinstance(obj, torch.nn.Module):
        what = "a state_dict (weights without the architecture)" if isinstance(obj, dict) \
            else f"a {type(obj).__name__}, not a module"
        raise CpadgnError(f"{path} holds {what}; save the whole model instead, preferably "
                          "with torch.export.save (.pt2)")
    try:
        return _with_path(path, lambda: ops_to_net(module_to_ops(obj, _eager_kind)))
    except _NeedsTrace as e:
        # The code is trusted and loaded anyway: record its operations with torch.export.
        return _trace_module(obj, path, e)


def _trace_module(module, path, why: CpadgnError) -> PiecewiseAffineNet:
    """torch.export a live (trusted) module on a dummy batch and read its graph.

    The latent dimension is the input width of its first Linear (or BatchNorm1d) layer.
    Any failure is reported together with ``why`` (the reason the layer table failed).
    """
    torch = _torch()
    width = next((int(m.in_features) for m in module.modules() if isinstance(m, torch.nn.Linear)),
                 None)
    if width is None:
        raise CpadgnError(f"{why} (and it has no Linear layer to tell the latent dimension)")
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    module = module.eval()
    try:
        with _quiet():
            ep = torch.export.export(module, (torch.zeros(2, width, dtype=dtype),))
    except Exception as e:
        raise CpadgnError(f"{why} (tracing it with torch.export failed: {_first_line(e)})") from None
    return _ExportInterpreter(ep, path).run()


def _with_path(path, fn):
    """Run fn; prefix the file name to a CpadgnError it raises."""
    try:
        return fn()
    except CpadgnError as e:
        raise type(e)(f"{path}: {e}") from None


class _quiet:
    """Silence torch's deprecation chatter (torch.jit, pytree) while loading."""

    def __enter__(self):
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


# ================================================================ torch.export
class _Data:
    """A symbolic tensor of the forward pass: features = W @ h_base + b.

    base counts the activations applied so far (h_0 = z); W (F, n_base), b (F,).
    """

    __slots__ = ("base", "W", "b", "identity", "scaled_from", "scale")

    def __init__(self, base, W, b, identity=False, scaled_from=None, scale=None):
        self.base, self.W, self.b, self.identity = base, W, b, identity
        self.scaled_from, self.scale = scaled_from, scale

    @property
    def width(self) -> int:
        return self.W.shape[0]

    def same_as(self, other) -> bool:
        return other is self or (isinstance(other, _Data) and other.base == self.base
                                 and np.array_equal(other.W, self.W) and np.array_equal(other.b, self.b))


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


class _ExportInterpreter:
    """Walk the graph of an ExportedProgram symbolically and collect operations."""

    def __init__(self, ep, path):
        self.ep, self.path = ep, path
        self.ops: list = []
        self.base = 0
        self.latent_dim = None
        self.node = None

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

    def vec(self, v, width, what) -> np.ndarray:
        """A constant broadcast along the feature axis: (), (F,), (1, F), (1, 1) ... -> (F,)."""
        a = self.const(v, what)
        if a.ndim and any(d != 1 for d in a.shape[:-1]):
            self.fail(f"the {what} has shape {a.shape}, which varies along the batch; "
                      "only per-feature constants are supported")
        a = a.reshape(-1) if a.ndim else a
        if a.ndim == 0 or a.size == 1:
            return np.full(width, float(a.reshape(-1)[0]))
        if a.size != width:
            self.fail(f"the {what} has {a.size} entries for {width} features")
        return a

    def data(self, v) -> _Data:
        if isinstance(v, _Opaque):
            self.fail(f"uses {v.why}, which cpadgn does not model")
        if not isinstance(v, _Data):
            self.fail("expected the network's activations here")
        return v

    def affine(self, d: _Data, W=None, b=None, s=None, scaled=False) -> _Data:
        """New data value: (W or diag(s)) @ d + b, on the same base."""
        if W is not None:
            W_new, b_new = W @ d.W, W @ d.b
        elif s is not None:
            W_new, b_new = s[:, None] * d.W, s * d.b
        else:
            W_new, b_new = d.W, d.b
        if b is not None:
            b_new = b_new + b
        return _Data(d.base, W_new, b_new, identity=False,
                     scaled_from=d if scaled else None, scale=s if scaled else None)

    def activate(self, d: _Data, slope, name) -> _Data:
        if d.base != self.base:
            self.fail("the network branches (a skip or residual connection); only chains "
                      "of layers are supported")
        if not d.identity:
            self.ops.append(Affine(d.W, d.b, self.where()))
        self.ops.append(Activation(np.broadcast_to(np.asarray(slope, np.float64), (d.width,)).copy(),
                                   name, self.where()))
        self.base += 1
        return _Data(self.base, np.eye(d.width), np.zeros(d.width), identity=True)

    # ---------------------------------------------------------- op handlers
    def op_identity(self, x, *args, **kw):
        return x

    def op_to(self, x, *args, **kw):
        torch = _torch()
        dtype = kw.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
        if dtype is not None and not dtype.is_floating_point:
            self.fail(f"converts the activations to {dtype}, which is not affine")
        return x

    def op_shape(self, x, *args, **kw):
        node = self.node
        d = self.data(x)
        src, dst = _meta_shape(node.args[0]), _meta_shape(node)
        if src is not None and dst is not None and [str(s) for s in src] != [str(s) for s in dst]:
            self.fail(f"reshapes the activations from {tuple(src)} to {tuple(dst)}; cpadgn "
                      "supports generators on flat (N, F) vectors only, yet")
        return d

    def op_linear(self, x, weight, bias=None):
        d = self.data(x)
        W = self.const(weight, "weight")
        if W.ndim != 2 or W.shape[1] != d.width:
            self.fail(f"a linear map of shape {W.shape} applied to {d.width} features")
        return self.affine(d, W=W, b=None if bias is None else self.vec(bias, W.shape[0], "bias"))

    def op_mm(self, x, weight_t):
        d = self.data(x)
        Wt = self.const(weight_t, "weight")
        if Wt.ndim != 2 or Wt.shape[0] != d.width:
            self.fail(f"a matrix product with a {Wt.shape} matrix applied to {d.width} features")
        return self.affine(d, W=Wt.T)

    def op_addmm(self, bias, x, weight_t, *, beta=1, alpha=1):
        out = self.op_mm(x, weight_t)
        W = float(alpha) * out.W
        b = float(alpha) * out.b + float(beta) * self.vec(bias, out.width, "bias")
        return _Data(out.base, W, b)

    def op_batch_norm(self, x, weight, bias, mean, var, training, momentum, eps, *rest):
        if mean is None or var is None:
            self.fail("batch norm without running statistics (track_running_stats=False) "
                      "normalises with batch statistics, so it is not a fixed map of z")
        if training:
            self.fail("batch norm was exported in training mode; call model.eval() before "
                      "torch.export.export")
        return self._bn(x, weight, bias, mean, var, eps)

    def op_bn_no_training(self, x, weight, bias, mean, var, momentum, eps):
        return _Tuple([self._bn(x, weight, bias, mean, var, eps),
                       _Opaque("batch-norm statistics"), _Opaque("batch-norm statistics")])

    def op_native_bn(self, x, weight, bias, mean, var, training, momentum, eps):
        if mean is None or var is None:
            return self.op_batch_norm(x, weight, bias, mean, var, training, momentum, eps)
        if training:
            self.fail("batch norm was exported in training mode; call model.eval() before "
                      "torch.export.export")
        return _Tuple([self._bn(x, weight, bias, mean, var, eps),
                       _Opaque("batch-norm statistics"), _Opaque("batch-norm statistics")])

    def _bn(self, x, weight, bias, mean, var, eps):
        d = self.data(x)
        if mean is None or var is None:
            self.fail("batch norm without running statistics normalises with batch statistics")
        mean, var = self.vec(mean, d.width, "running mean"), self.vec(var, d.width, "running var")
        w = np.ones(d.width) if weight is None else self.vec(weight, d.width, "weight")
        b = np.zeros(d.width) if bias is None else self.vec(bias, d.width, "bias")
        s = w / np.sqrt(var + float(eps))
        return self.affine(d, s=s, b=b - s * mean)

    def op_dropout(self, x, p=0.5, train=False):
        if train:
            self.fail("dropout was exported in training mode; call model.eval() before "
                      "torch.export.export")
        return self.data(x)

    def op_native_dropout(self, x, p, train):
        if train:
            self.fail("dropout was exported in training mode; call model.eval() before "
                      "torch.export.export")
        return _Tuple([self.data(x), _Opaque("a dropout mask")])

    def op_relu(self, x):
        return self.activate(self.data(x), 0.0, "relu")

    def op_leaky_relu(self, x, negative_slope=0.01):
        return self.activate(self.data(x), float(negative_slope), "leaky_relu")

    def op_prelu(self, x, weight):
        d = self.data(x)
        return self.activate(d, self.vec(weight, d.width, "PReLU weight"), "prelu")

    def op_abs(self, x):
        return self.activate(self.data(x), -1.0, "abs")

    def op_clamp_min(self, x, min_value):
        if float(min_value) != 0.0:
            self.fail(f"clamp_min({min_value}) is only supported at 0 (a ReLU)")
        return self.op_relu(x)

    def op_clamp(self, x, min=None, max=None):
        if max is not None or min is None or float(min) != 0.0:
            self.fail("clamp with an upper bound has two breakpoints, not supported yet")
        return self.op_relu(x)

    def op_gt(self, x, other):
        return self._compare(x, other, positive=True)

    def op_lt(self, x, other):
        return self._compare(x, other, positive=False)

    def _compare(self, x, other, positive):
        d = self.data(x)
        if np.any(self.const(other, "threshold") != 0):
            self.fail("a comparison against a non-zero threshold is not supported")
        return _Pred(d, positive)

    def op_where(self, cond, a, b):
        """where(u > 0, u, c * u) and friends: a one-breakpoint activation."""
        if not isinstance(cond, _Pred):
            self.fail("a data-dependent selection (where) other than an activation")
        pos, neg = (a, b) if cond.positive else (b, a)
        d = cond.data
        if not (isinstance(pos, _Data) and d.same_as(pos)):
            self.fail("a data-dependent selection (where) other than an activation")
        if isinstance(neg, _Data) and neg.scaled_from is not None and d.same_as(neg.scaled_from):
            slope = neg.scale
        elif not isinstance(neg, _Data) and np.all(self.const(neg) == 0):
            slope = 0.0
        else:
            self.fail("a data-dependent selection (where) other than an activation")
        return self.activate(d, slope, "prelu")

    def op_add(self, x, y, *, alpha=1):
        return self._add(x, y, float(alpha))

    def op_sub(self, x, y, *, alpha=1):
        return self._add(x, y, -float(alpha))

    def op_rsub(self, x, y, *, alpha=1):   # y - alpha * x
        return self._add(self.op_mul(x, -float(alpha)), y, 1.0)

    def _add(self, x, y, alpha):
        if isinstance(x, _Data) and isinstance(y, _Data):
            if x.base != y.base:
                self.fail("adds activations of different layers (a skip or residual connection); "
                          "only chains of layers are supported")
            return _Data(x.base, x.W + alpha * y.W, x.b + alpha * y.b)
        if isinstance(x, _Data):
            return self.affine(x, b=alpha * self.vec(y, x.width, "added constant"))
        if isinstance(y, _Data):   # c + alpha * y
            return self.affine(y, s=np.full(y.width, alpha), b=self.vec(x, y.width, "added constant"))
        self.fail("an addition without the activations")  # pragma: no cover - folded

    def op_mul(self, x, y):
        if isinstance(x, _Data) and isinstance(y, _Data):
            self.fail("multiplies activations together, which is not piecewise affine")
        d, c = (x, y) if isinstance(x, _Data) else (y, x)
        d = self.data(d)
        return self.affine(d, s=self.vec(c, d.width, "factor"), scaled=True)

    def op_div(self, x, y, **kw):
        if kw.get("rounding_mode") is not None:
            self.fail("a rounding division is not affine")
        if not isinstance(x, _Data) or isinstance(y, _Data):
            self.fail("divides by the activations, which is not piecewise affine")
        return self.affine(x, s=1.0 / self.vec(y, x.width, "divisor"), scaled=True)

    def op_neg(self, x):
        d = self.data(x)
        return self.affine(d, s=-np.ones(d.width), scaled=True)

    def op_getitem(self, x, i):
        if isinstance(x, _Tuple):
            return x.items[i]
        self.fail("indexes into the activations; only whole-vector layers are supported")

    HANDLERS = {
        "linear": "op_linear", "mm": "op_mm", "matmul": "op_mm", "addmm": "op_addmm",
        "batch_norm": "op_batch_norm",
        "_native_batch_norm_legit_no_training": "op_bn_no_training",
        "native_batch_norm": "op_native_bn",
        "dropout": "op_dropout", "feature_dropout": "op_dropout", "alpha_dropout": "op_dropout",
        "native_dropout": "op_native_dropout",
        "relu": "op_relu", "leaky_relu": "op_leaky_relu", "prelu": "op_prelu",
        "_prelu_kernel": "op_prelu", "abs": "op_abs", "clamp_min": "op_clamp_min",
        "clamp": "op_clamp",
        "gt": "op_gt", "ge": "op_gt", "lt": "op_lt", "le": "op_lt", "where": "op_where",
        "add": "op_add", "sub": "op_sub", "rsub": "op_rsub", "mul": "op_mul", "div": "op_div",
        "neg": "op_neg",
        "clone": "op_identity", "alias": "op_identity", "detach": "op_identity",
        "contiguous": "op_identity", "lift_fresh_copy": "op_identity",
        "_to_copy": "op_to", "to": "op_to",
        "view": "op_shape", "reshape": "op_shape", "_unsafe_view": "op_shape",
        "flatten": "op_shape", "unflatten": "op_shape", "squeeze": "op_shape",
        "unsqueeze": "op_shape", "expand": "op_shape",
    }
    NOT_CPA = {"tanh", "sigmoid", "gelu", "softplus", "elu", "selu", "celu", "silu", "mish",
               "exp", "log", "pow", "sqrt", "rsqrt", "sin", "cos", "softmax", "_softmax",
               "log_softmax", "_log_softmax", "hardsigmoid", "hardswish", "log_sigmoid_forward",
               "erf", "logit", "tanh_", "sigmoid_", "reciprocal"}
    NOT_YET = {"hardtanh": "has two breakpoints", "relu6": "has two breakpoints",
               "convolution": "convolutions are not supported yet",
               "conv1d": "convolutions are not supported yet",
               "conv2d": "convolutions are not supported yet",
               "conv_transpose1d": "convolutions are not supported yet",
               "conv_transpose2d": "convolutions are not supported yet",
               "max_pool2d": "max pooling is not supported yet",
               "max_pool2d_with_indices": "max pooling is not supported yet",
               "max_pool1d": "max pooling is not supported yet",
               "cat": "concatenation is not supported yet"}
    SKIP = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
            "_assert_async", "sym_constrain_range"}

    # ------------------------------------------------------------------ run
    def run(self) -> PiecewiseAffineNet:
        torch = _torch()
        ep, sig = self.ep, self.ep.graph_signature
        from torch.export.graph_signature import InputKind
        values = {}
        user_inputs = []
        specs = {spec.arg.name: spec for spec in sig.input_specs if hasattr(spec.arg, "name")}
        for node in ep.graph.nodes:
            self.node = node
            if node.op == "placeholder":
                spec = specs.get(node.name)
                if spec is None or spec.kind == InputKind.USER_INPUT:
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
            self.fail("the program takes more than one input; a generator maps z alone")
        shape = _meta_shape(node)
        if shape is None or len(shape) not in (1, 2) or not isinstance(shape[-1], int):
            self.fail(f"the input has shape {tuple(shape) if shape is not None else '?'}; a "
                      "generator must take latent vectors of shape (N, S)")
        S = int(shape[-1])
        self.latent_dim = S
        return _Data(0, np.eye(S), np.zeros(S), identity=True)

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
        if name in self.SKIP:
            return None
        if name in ("sym_size", "sym_numel", "sym_stride", "sym_storage_offset"):
            return _Opaque("the batch size")
        if not symbolic and any(isinstance(x, _Opaque) for x in flat):
            if name in ("view", "reshape", "_unsafe_view", "expand"):   # a constant sized by the batch
                self.fail("builds a constant the size of the batch, which is not supported")
            return _Opaque(f"the result of {_full_op_name(target)}")
        if not symbolic:
            return self._fold(node, target, args, kwargs, name)
        if target is operator.getitem:
            return self.op_getitem(*args)
        if name in self.HANDLERS:
            try:
                return getattr(self, self.HANDLERS[name])(*args, **kwargs)
            except TypeError as e:
                self.fail(f"operation aten.{name} called with unexpected arguments ({e})")
        if name in self.NOT_CPA or name.rstrip("_") in self.NOT_CPA:
            self.fail(f"operation aten.{name} is not piecewise affine; cpadgn needs ReLU, "
                      "LeakyReLU, PReLU or abs activations between affine layers")
        if name in self.NOT_YET:
            self.fail(f"operation aten.{name} is not supported yet ({self.NOT_YET[name]})")
        self.fail(f"operation {_full_op_name(target)} is not supported "
                  "(not known to be piecewise affine)")

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
            self.fail(f"the program returns {len(chosen)} outputs; a generator returns one tensor")
        v = values[chosen[0]]
        if not isinstance(v, _Data):
            self.fail("the output does not depend on the input z")
        if v.base != self.base:
            self.fail("the network branches (a skip or residual connection); only chains of "
                      "layers are supported")
        if not v.identity or not self.ops:
            self.ops.append(Affine(v.W, v.b, "the output layer"))
        self.node = None
        return ops_to_net(self.ops, self.latent_dim)


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


def _load_torch_export(path: Path) -> PiecewiseAffineNet:
    torch = _torch()
    try:
        with _quiet():
            ep = torch.export.load(str(path))
    except Exception as e:
        raise CpadgnError(f"{path} is a torch.export archive that cannot be loaded: "
                          f"{_first_line(e)}") from None
    return _ExportInterpreter(ep, path).run()
