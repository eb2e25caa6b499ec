"""cpadgn's own HDF5 model file: a generator, its latent prior and its observation noise.

Schema (format_version 1)
-------------------------
::

    /                      root attributes
        format             "cpadgn-model"
        format_version     1
        latent_dim         S
        output_dim         D
        n_layers           L, the number of affine layers (L - 1 hidden layers)
        hidden_sizes       int64 (L - 1,), widths of the hidden layers
        attrs              JSON text: user metadata (options, provenance, ...), "{}" if none
    /generator             the network  h_0 = z,  u_l = W_l h_{l-1} + b_l,
                           h_l = act_l(u_l),  g(z) = u_L   (see cpadgn.network)
        weight_0 .. weight_{L-1}   float64 (n_{l+1}, n_l);  n_0 = S, n_L = D
        bias_0   .. bias_{L-1}     float64 (n_{l+1},)
        slope_0  .. slope_{L-2}    float64 (n_{l+1},), negative-side slope of each
                                   hidden unit: act(u) = u if u >= 0 else slope * u
                                   (ReLU 0, LeakyReLU a, PReLU per unit, abs -1)
        attribute activations      one name per hidden layer, for display only:
                                   "relu", "abs", "leaky_relu:0.1" or "prelu"
    /prior                 latent prior z ~ N(mean, cov)
        mean               float64 (S,)
        cov                float64 (S, S), symmetric positive definite
    /noise                 optional: observation noise x | z ~ N(g(z), diag(std^2))
        std                float64, scalar () for sigma^2 I or (D,) for a diagonal
    /<any other group>     extra arrays stored as given (e.g. /training/history,
                           /encoder/...); read back into Generator.extra["groups"]

All datasets are written without timestamps, so saving the same model twice gives
byte-identical files.  Files are written atomically (a temporary file in the same
directory, then a rename).  A reader of a newer format_version is refused with a
message to upgrade.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .data import atomic_hdf5, h5_lock_error, write_error
from .errors import CpadgnError
from .loading import HDF5_SIGNATURE, Generator, check_net
from .network import PiecewiseAffineNet, check_prior

FORMAT = "cpadgn-model"
FORMAT_VERSION = 1
RESERVED_GROUPS = ("generator", "prior", "noise")


def activation_name(slope: np.ndarray) -> str:
    """Display name of a hidden layer's activation from its negative-side slopes."""
    s = np.asarray(slope, dtype=np.float64)
    if s.size and np.all(s == s.flat[0]):
        a = float(s.flat[0])
        if a == 0.0:
            return "relu"
        if a == -1.0:
            return "abs"
        return f"leaky_relu:{a!r}"
    return "prelu"


# ===================================================================== writing
def save_model(path, net: PiecewiseAffineNet, *, prior_mean=None, prior_cov=None, noise_std=None,
               attrs: dict | None = None, groups: dict | None = None) -> None:
    """Write a cpadgn model file (schema in the module docstring), atomically.

    prior_mean / prior_cov default to N(0, I); noise_std None stores no /noise group.
    attrs: JSON-serialisable metadata (numpy scalars and arrays are converted).
    groups: {group: {name: array}} extra datasets; names may contain "/".
    """
    import h5py

    S, D = net.latent_dim, net.output_dim
    check_net(net, path)
    mean, cov = check_prior(path, prior_mean, prior_cov, S)
    std = None if noise_std is None else _check_noise(path, noise_std, D)
    attrs_json = json.dumps(attrs or {}, sort_keys=True, default=_jsonable)
    groups = dict(groups or {})
    for g in groups:
        if g.strip("/").split("/")[0] in RESERVED_GROUPS or not g.strip("/"):
            raise ValueError(f"extra group name {g!r} is reserved or empty; use another name (reserved: "
                             f"{', '.join(sorted(RESERVED_GROUPS))})")

    path = Path(path)
    try:
        with atomic_hdf5(path) as f:
            f.attrs["format"] = FORMAT
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["latent_dim"] = S
            f.attrs["output_dim"] = D
            f.attrs["n_layers"] = len(net.weights)
            f.attrs["hidden_sizes"] = np.asarray(net.hidden_sizes, dtype=np.int64)
            f.attrs["attrs"] = attrs_json
            g = f.create_group("generator")
            for l, (W, b) in enumerate(zip(net.weights, net.biases)):
                _dataset(g, f"weight_{l}", np.asarray(W, dtype=np.float64))
                _dataset(g, f"bias_{l}", np.asarray(b, dtype=np.float64))
            for l, a in enumerate(net.slopes):
                _dataset(g, f"slope_{l}", np.asarray(a, dtype=np.float64))
            g.attrs["activations"] = [activation_name(a) for a in net.slopes] \
                if net.slopes else np.zeros(0, dtype=h5py.string_dtype())
            p = f.create_group("prior")
            _dataset(p, "mean", mean)
            _dataset(p, "cov", cov)
            if std is not None:
                _dataset(f.create_group("noise"), "std", std)
            for gname in sorted(groups):
                grp = f.require_group(gname.strip("/"))
                for name in sorted(groups[gname]):
                    _dataset(grp, name.strip("/"), groups[gname][name])
    except OSError as e:
        raise write_error(path, e) from None


def _dataset(group, name, value):
    import h5py
    a = np.asarray(value)
    if a.dtype.kind in "UO":
        a = a.astype(str).astype(object)
        return group.create_dataset(name, data=a, dtype=h5py.string_dtype(), track_times=False)
    if a.dtype.kind not in "biufS":
        raise ValueError(f"cannot store {name} of dtype {a.dtype}; pass numbers or strings")
    return group.create_dataset(name, data=a, track_times=False)


def _jsonable(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"attribute value {o!r} is not JSON-serialisable; pass numbers, strings, lists "
                    "or dicts of them")


def _real(path, name, value) -> np.ndarray:
    """A stored array as float64; complex values (which float64 would silently cut to their
    real part) are refused with one line."""
    a = np.asarray(value)
    if a.dtype.kind == "c":
        raise CpadgnError(f"{path}: /{name} holds complex numbers; a cpadgn model is real-valued: "
                          "re-save the model with cpadgn")
    return np.asarray(a, dtype=np.float64)


def _check_noise(path, std, D):
    std = _real(path, "noise/std", std)
    if std.shape == (1,):
        std = std.reshape(())
    if std.shape not in ((), (D,)):
        raise CpadgnError(f"{path}: noise std has shape {std.shape}; expected a scalar or ({D},)")
    if not np.all(np.isfinite(std)) or np.any(std <= 0):
        raise CpadgnError(f"{path}: noise std must be finite and > 0 (got min {float(np.min(std))!r}); "
                          "save the model with positive noise stds")
    return std


# ===================================================================== reading
def read_model(path) -> Generator:
    """Read and validate a cpadgn model file; CpadgnError (one line) on any problem."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise CpadgnError(f"model file {path} does not exist; check the path")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        locked = h5_lock_error(path, e)
        if locked is not None:
            raise locked from None
        with open(path, "rb") as fh:
            is_h5 = fh.read(8) == HDF5_SIGNATURE
        what = "a corrupt or truncated HDF5 file" if is_h5 else "not an HDF5 file"
        raise CpadgnError(f"{path} is {what} ({str(e).splitlines()[0] if str(e) else e}); "
                          "re-save or re-download the model") from None
    try:
        with f:
            return _read(path, f)
    except CpadgnError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise CpadgnError(f"{path} is not a valid cpadgn model ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); re-save it with "
                          "cpadgn") from None


def _attr_str(v):
    return v.decode() if isinstance(v, bytes) else str(v)


def _read(path: Path, f) -> Generator:
    import h5py

    if "format" not in f.attrs:
        raise CpadgnError(f"{path} is an HDF5 file but not a cpadgn model (no 'format' attribute); "
                          "pass a model saved by cpadgn, or a torch.export / TorchScript file")
    fmt = _attr_str(f.attrs["format"])
    if fmt == "cpadgn-partition":
        raise CpadgnError(f"{path} is a cpadgn partition cache, not a model; pass the model file "
                          "it was computed for")
    if fmt != FORMAT:
        raise CpadgnError(f"{path} has format '{fmt}', not '{FORMAT}'; it is not a cpadgn model: pass a "
                          "model saved by cpadgn")
    version = int(f.attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise CpadgnError(f"{path} was written by a newer cpadgn (model format {version}, this "
                          f"version reads up to {FORMAT_VERSION}); upgrade cpadgn")
    if version < 1:
        raise CpadgnError(f"{path} has an invalid format_version {version}; re-save the model with cpadgn")
    if "generator" not in f:
        raise CpadgnError(f"{path} is not a valid cpadgn model: the /generator group is missing; re-save "
                          "the model with cpadgn")
    g = f["generator"]
    L = int(f.attrs.get("n_layers", 0))
    if L < 1:
        L = sum(1 for k in g if k.startswith("weight_"))
    weights, biases, slopes = [], [], []
    for l in range(L):
        for name, out in ((f"weight_{l}", weights), (f"bias_{l}", biases)):
            if name not in g:
                raise CpadgnError(f"{path} is not a valid cpadgn model: /generator/{name} is missing; "
                                  "re-save the model with cpadgn")
            out.append(_real(path, f"generator/{name}", g[name][()]))
    for l in range(L - 1):
        name = f"slope_{l}"
        if name not in g:
            raise CpadgnError(f"{path} is not a valid cpadgn model: /generator/{name} is missing; "
                              "re-save the model with cpadgn")
        slopes.append(_real(path, f"generator/{name}", g[name][()]))
    for l, (W, b) in enumerate(zip(weights, biases)):
        if W.ndim != 2 or b.shape != (W.shape[0],):
            raise CpadgnError(f"{path}: layer {l} has weight shape {W.shape} and bias shape "
                              f"{b.shape}, which do not match; re-save the model with cpadgn")
        if l and W.shape[1] != weights[l - 1].shape[0]:
            raise CpadgnError(f"{path}: layer {l} takes {W.shape[1]} inputs but layer {l - 1} "
                              f"has {weights[l - 1].shape[0]} outputs; re-save the model with cpadgn")
    for l, a in enumerate(slopes):
        if a.shape not in ((), (weights[l].shape[0],)):
            raise CpadgnError(f"{path}: slope_{l} has shape {a.shape}, expected "
                              f"({weights[l].shape[0]},); re-save the model with cpadgn")
    net = PiecewiseAffineNet.from_arrays(weights, biases, slopes)
    check_net(net, path)
    S, D = net.latent_dim, net.output_dim
    for key, val in (("latent_dim", S), ("output_dim", D)):
        if key in f.attrs and int(f.attrs[key]) != val:
            raise CpadgnError(f"{path}: attribute {key}={int(f.attrs[key])} but the weights "
                              f"give {val}; the file is inconsistent")

    for name in ("prior/mean", "prior/cov"):   # always written by save_model: never default it
        if name not in f:
            raise CpadgnError(f"{path} is not a valid cpadgn model: /{name} is missing; re-save the "
                              "model with cpadgn")
    mean, cov = check_prior(path, _real(path, "prior/mean", f["prior/mean"][()]),
                            _real(path, "prior/cov", f["prior/cov"][()]), S)
    noise = f.get("noise")
    std, noise_problem = None, None
    if noise is not None and "std" in noise:
        try:
            std = _check_noise(path, noise["std"][()], D)
        except CpadgnError as e:       # unusable, but a noise std given at load time replaces it
            noise_problem = str(e)

    try:
        attrs = json.loads(_attr_str(f.attrs.get("attrs", "{}")))
    except json.JSONDecodeError:
        raise CpadgnError(f"{path}: the 'attrs' attribute is not valid JSON; the file is "
                          "corrupt") from None
    groups = {}
    for name, obj in f.items():
        if name in RESERVED_GROUPS or not isinstance(obj, h5py.Group):
            continue
        items = {}

        def collect(key, o, items=items):
            if isinstance(o, h5py.Dataset):
                v = o[()]
                if o.dtype.kind == "O" or h5py.check_string_dtype(o.dtype) is not None:
                    v = np.asarray(o.asstr()[()], dtype=object)
                    v = v.astype(str) if v.ndim else str(v[()])
                items[key] = v
        obj.visititems(collect)
        groups[name] = items
    extra = {"attrs": attrs, "groups": groups}
    if noise_problem is not None:
        extra["noise_problem"] = noise_problem
    return Generator(net=net, prior_mean=mean, prior_cov=cov, noise_std=std,
                     source_format="cpadgn-h5", extra=extra)
