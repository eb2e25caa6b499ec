"""The partition cache: one HDF5 file per generator, reused while it still fits.

The partition (see ``cpadgn.partition``) is the costly object, so it is computed once
per generator and stored, by default beside the model as ``<model file>.partition.h5``
(e.g. ``gen.h5`` -> ``gen.h5.partition.h5``).  It is keyed by a fingerprint of the
network (architecture, weights, slopes; ``PiecewiseAffineNet.fingerprint``) and of the
cache format, so a cache whose fingerprint does not match is never used: it is
recomputed and replaced (status STALE_STATUS), and the caller is told why.  Pass the network the partition
was computed for (the one with the prior folded in, if that is what is enumerated).

The body carries a SHA-256 checksum (``body_sha256``), checked on every load: a cache
whose content was changed or damaged is recomputed and replaced, with a message.  The
whole file is sealed too: after the HDF5 image (HDF5 ignores bytes past its end) comes a
line, ``SEAL`` and the SHA-256 hex of the image (``file_seal``), checked before HDF5 reads
a byte, because HDF5 is not safe on damaged files: one flipped byte in the root
attributes could crash the process (a segfault in h5py), make the file look like no cache
at all, or change an attribute that no checksum covered.  A sealed cache is read from
memory, so HDF5's file locks (another process holding it open) do not matter; a file
without the seal (written by an older cpadgn, cut short, or opened with h5py in mode 'r+'
or 'a', which truncates the file to its HDF5 end) is read from disk as before, without
HDF5 file locking.  Only
a file that is a cpadgn partition cache is ever replaced (a truncated one too, recognised
by the format name in its first bytes): any other file at the cache path (a model, a data
file, a CSV, an unreadable file) is refused with a CpadgnError and left untouched.

Schema (cache_format_version 3)
-------------------------------
::

    /                        root attributes
        format               "cpadgn-partition"
        cache_format_version 3 (older caches are recomputed: 1 had no body_sha256; 2 was
                             written before the S = 3 enumeration's facet rank test
                             and may list rows that only touch a region as facets)
        fingerprint          SHA-256 hex of (net fingerprint + cache format version);
                             the cache key
        body_sha256          SHA-256 hex of the datasets below (``body_checksum``)
        net_fingerprint      PiecewiseAffineNet.fingerprint() of the generator
        partition_fingerprint  Partition.fingerprint as computed (usually the same)
        latent_dim           S
        n_units              K, hidden units
        n_regions            R
        method               enumeration algorithm (str)
        seconds              enumeration wall time (float)
        created_with         cpadgn version that wrote the file
        check_json           optional: the JSON of check_partition (written by `cpadgn partition`,
                             so a cached run does not repeat its 100,000-sample check)
    patterns                 uint8 (R, ceil(K/8)): sign patterns packed with
                             np.packbits(axis=1) (big bit order; bit set where the
                             pre-activation is >= 0); attribute n_units = K
    interior                 float64 (R, S), a point strictly inside each region
    facet_ptr                int64 (R + 1,), CSR offsets into facet_units
    facet_units              int64 (nnz,), the hidden unit of each facet
    bounded                  uint8 (R,), 1 for a bounded region
    log_prior_mass           float64 (R,), log P[z in region] under N(0, I)
    log_prior_mass_stderr    float64 (R,), its standard error (0 where exact)
    clearance                float64 (R,), interior point's distance to the nearest facet
    degenerate               uint8 (R,), 1 for a near-degenerate region

    (after the HDF5 image)   SEAL + 64 hex digits + newline: SHA-256 of the bytes before it,
                             but bytes 20-23 (``file_seal``)

Non-empty datasets are gzip-compressed (level 4, with the shuffle filter).  Writes
are atomic: the file is built in memory, written to a temporary file in the same
directory, then renamed with ``os.replace``, so a reader never sees a half-written
cache and a killed writer leaves at most a temporary that the next write removes.  A
cache path that is a symbolic link is written at the link's target (the link stays, also
one that points at no file yet).  If the cache cannot be written (a read-only or missing directory, a full disk) the
partition is still returned, with the status "not_written (reason)" and a warning.
"""
from __future__ import annotations

import json

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from .data import atomic_hdf5, write_reason
from .errors import CpadgnError
from .network import PiecewiseAffineNet
from .partition import Partition

FORMAT = "cpadgn-partition"
CACHE_FORMAT_VERSION = 3
CACHE_SUFFIX = ".partition.h5"
STALE_STATUS = "replaced (another generator's partition)"
SEAL = b"\ncpadgn-partition-cache sha256 "     # then the file's SHA-256 hex and a newline
_SEAL_BYTES = len(SEAL) + 65
_OPEN_FLAGS = slice(20, 24)     # superblock (version 0) consistency flags, set while open to write

_FLOAT_FIELDS = ("log_prior_mass", "log_prior_mass_stderr", "clearance")
_BOOL_FIELDS = ("bounded", "degenerate")
BODY = ("patterns", "interior", "facet_ptr", "facet_units") + _BOOL_FIELDS + _FLOAT_FIELDS


def cache_path_for(model_path) -> Path:
    """Default cache file of a model: ``<model file name>.partition.h5`` beside it."""
    p = Path(model_path)
    return p.with_name(p.name + CACHE_SUFFIX)


def cache_key(net_fingerprint: str) -> str:
    """The cache fingerprint: SHA-256 over the net fingerprint and the cache format version."""
    h = hashlib.sha256()
    h.update(str(net_fingerprint).encode())
    h.update(f"|cpadgn-partition-cache-v{CACHE_FORMAT_VERSION}".encode())
    return h.hexdigest()


def _version() -> str:
    try:
        import cpadgn
        v = getattr(cpadgn, "__version__", None)
        if v:
            return str(v)
    except Exception:  # pragma: no cover
        pass
    try:
        from importlib.metadata import version
        return version("cpadgn")
    except Exception:  # pragma: no cover
        return "unknown"


# ====================================================================== writing
def body_arrays(part: Partition) -> dict:
    """The cache's datasets {name: array} exactly as stored (dtype and shape)."""
    body = {"patterns": np.packbits(np.asarray(part.patterns, dtype=bool), axis=1),
            "interior": np.asarray(part.interior, dtype=np.float64),
            "facet_ptr": np.asarray(part.facet_ptr, dtype=np.int64),
            "facet_units": np.asarray(part.facet_units, dtype=np.int64)}
    for name in _BOOL_FIELDS:
        body[name] = np.asarray(getattr(part, name), dtype=bool).astype(np.uint8)
    for name in _FLOAT_FIELDS:
        body[name] = np.asarray(getattr(part, name), dtype=np.float64)
    return body


def body_checksum(body: dict) -> str:
    """SHA-256 hex over every body dataset: its name, dtype, shape and bytes, in BODY order."""
    h = hashlib.sha256()
    for name in BODY:
        a = np.ascontiguousarray(body[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def file_seal(image) -> bytes:
    """The line written after a cache's HDF5 image: SEAL, the image's SHA-256 hex, a newline.

    The hash skips the superblock's consistency flags (bytes 20-23), which HDF5 sets while
    another process holds the file open for writing (h5py mode 'r+' or 'a'), content unchanged.
    """
    h = hashlib.sha256(image[:_OPEN_FLAGS.start])
    h.update(image[_OPEN_FLAGS.stop:])
    return SEAL + h.hexdigest().encode() + b"\n"


def save_partition(path, part: Partition, net_fingerprint: str) -> None:
    """Write a partition cache file atomically (schema in the module docstring), at the
    target of ``path`` if it is a symbolic link (renaming over the link would replace it)."""
    path = Path(os.path.realpath(path))
    R, K = part.patterns.shape
    S = part.interior.shape[1] if part.interior.ndim == 2 else 0
    body = body_arrays(part)
    with atomic_hdf5(path, trailer=file_seal) as f:
        f.attrs["format"] = FORMAT
        f.attrs["cache_format_version"] = CACHE_FORMAT_VERSION
        f.attrs["fingerprint"] = cache_key(net_fingerprint)
        f.attrs["body_sha256"] = body_checksum(body)
        f.attrs["net_fingerprint"] = str(net_fingerprint)
        f.attrs["partition_fingerprint"] = str(part.fingerprint)
        f.attrs["latent_dim"] = S
        f.attrs["n_units"] = K
        f.attrs["n_regions"] = R
        f.attrs["method"] = str(part.method)
        f.attrs["seconds"] = float(part.seconds)
        f.attrs["created_with"] = _version()
        if getattr(part, "check", None) is not None:    # check_partition's result (partition cmd)
            f.attrs["check_json"] = json.dumps(part.check)
        for name in BODY:
            ds = _write(f, name, body[name])
            if name == "patterns":
                ds.attrs["n_units"] = K


def _write(f, name, a):
    kw = dict(compression="gzip", compression_opts=4, shuffle=True) if a.size else {}
    return f.create_dataset(name, data=a, track_times=False, **kw)


# ====================================================================== reading
class NotACacheError(CpadgnError):
    """The file is not a cpadgn partition cache (not HDF5, or another format): never replaced."""


def read_partition(path) -> tuple[Partition, str]:
    """Read and validate a cache file: (Partition, cache fingerprint).

    NotACacheError if the file is not a cpadgn partition cache; CpadgnError if it is one
    but unusable (another format version, damaged, checksum mismatch).
    """
    path = Path(path)
    f = _open(path)
    try:
        with f:
            fingerprint, version = _read_header(path, f)
            if version != CACHE_FORMAT_VERSION:
                raise CpadgnError(f"{path} has cache format {version}, this cpadgn reads "
                                  f"{CACHE_FORMAT_VERSION}")
            return _read_body(path, f), fingerprint
    except CpadgnError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise CpadgnError(f"{path} is not a valid partition cache ({type(e).__name__}: "
                          f"{_short(e)})") from None


def read_fingerprint(path) -> str:
    """Only the cache fingerprint (cheap); NotACacheError if the file is not a cache."""
    return read_identity(path)[0]


def read_identity(path) -> tuple[str, int]:
    """(cache fingerprint, cache_format_version) from the header; NotACacheError if the
    file is not a cpadgn partition cache."""
    path = Path(path)
    f = _open(path)
    try:
        with f:
            return _read_header(path, f)
    except CpadgnError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise NotACacheError(f"{path} is not a readable partition cache ({_short(e)})") from None


def _open(path: Path):
    import h5py
    if path.is_dir():
        raise NotACacheError(f"{path} is a directory")
    if not path.is_file():     # a FIFO would block open() until a writer comes
        raise NotACacheError(f"{path} is not a regular file (a pipe, a device or a socket)")
    image = _sealed_image(path)
    try:
        return h5py.File(io.BytesIO(image), "r") if image is not None else h5py.File(path, "r", locking=False)
    except (OSError, ValueError) as e:
        if _damaged_cache(path):
            raise CpadgnError(f"{path} is a damaged partition cache (unreadable HDF5: "
                              f"{_short(e)})") from None
        if not _hdf5_signature(path):
            raise NotACacheError(f"{path} is not an HDF5 file") from None
        raise NotACacheError(f"{path} is not a readable HDF5 file ({_short(e)})") from None


def _sealed_image(path: Path) -> bytes | None:
    """The HDF5 image of a sealed cache file, checked against its seal (``file_seal``);
    None for a file without one (an older cache, or not a cache: read from disk as before).
    A seal that does not match is a damaged cache (CpadgnError): HDF5 never reads it."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            if size < _SEAL_BYTES:
                return None
            f.seek(size - _SEAL_BYTES)
            if f.read(len(SEAL)) != SEAL:
                return None
            f.seek(0)
            data = f.read()
    except OSError:
        return None
    image = data[:-_SEAL_BYTES]
    if data[-_SEAL_BYTES:] != file_seal(image):
        raise CpadgnError(f"{path} is a damaged partition cache (the file does not match its SHA-256 "
                          "seal: changed or damaged after it was written)")
    return image


def _hdf5_signature(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89HDF\r\n\x1a\n"
    except OSError:
        return False


def _damaged_cache(path: Path) -> bool:
    """Whether an HDF5 file that cannot be opened was a cpadgn partition cache (truncated,
    say): it starts with the HDF5 signature and its root attributes, stored near the start
    (offset ~1 KB), still hold the format name.  Such a file is replaced; any other is not."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return head.startswith(b"\x89HDF\r\n\x1a\n") and FORMAT.encode() in head


def _short(e) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _read_header(path, f) -> tuple[str, int]:
    fmt = _s(f.attrs.get("format", ""))
    if fmt != FORMAT:
        kind = f"format '{fmt}'" if fmt else "no cpadgn format attribute"
        raise NotACacheError(f"{path} is an HDF5 file of another kind: {kind}")
    if "fingerprint" not in f.attrs:
        raise CpadgnError(f"{path} has no fingerprint")
    return _s(f.attrs["fingerprint"]), int(f.attrs.get("cache_format_version", -1))


def _read_body(path, f) -> Partition:
    R, K, S = (int(f.attrs[k]) for k in ("n_regions", "n_units", "latent_dim"))
    raw = {name: np.asarray(f[name][()]) for name in BODY}
    if "body_sha256" not in f.attrs:
        raise CpadgnError(f"{path} has no body checksum")
    if body_checksum(raw) != _s(f.attrs["body_sha256"]):
        raise CpadgnError(f"{path}: the content does not match its checksum (the file was changed "
                          "or damaged)")

    def get(name, dtype, shape):
        a = raw[name].astype(dtype, copy=False)
        if a.shape != shape:
            raise CpadgnError(f"{path}: dataset {name} has shape {a.shape}, expected {shape}")
        return a

    packed = get("patterns", np.uint8, (R, (K + 7) // 8))
    patterns = np.unpackbits(packed, axis=1, count=K).astype(bool) if K else np.zeros((R, 0), bool)
    facet_ptr = get("facet_ptr", np.int64, (R + 1,))
    nnz = int(raw["facet_units"].shape[0]) if raw["facet_units"].ndim == 1 else -1
    facet_units = get("facet_units", np.int64, (max(nnz, 0),))
    if facet_ptr[0] != 0 or facet_ptr[-1] != nnz or np.any(np.diff(facet_ptr) < 0):
        raise CpadgnError(f"{path}: facet_ptr is not a valid CSR offset array")
    if nnz and (facet_units.min() < 0 or facet_units.max() >= K):
        raise CpadgnError(f"{path}: facet_units refers to units outside 0..{K - 1}")
    fields = {name: get(name, np.float64, (R,)) for name in _FLOAT_FIELDS}
    fields.update({name: get(name, np.uint8, (R,)).astype(bool) for name in _BOOL_FIELDS})
    part = Partition(
        patterns=patterns,
        interior=get("interior", np.float64, (R, S)),
        facet_ptr=facet_ptr,
        facet_units=facet_units,
        fingerprint=_s(f.attrs.get("partition_fingerprint", f.attrs.get("net_fingerprint", ""))),
        method=_s(f.attrs.get("method", "")),
        seconds=float(f.attrs.get("seconds", 0.0)),
        **fields,
    )
    if "check_json" in f.attrs:
        part.check = json.loads(_s(f.attrs["check_json"]))
    return part


# ================================================================= load or compute
def load_or_compute(net: PiecewiseAffineNet, cache_path, compute: Callable[[], Partition], *,
                    log: Callable[[str], None] | None = None,
                    notice: Callable[[str], None] | None = None) -> tuple[Partition, str]:
    """The partition of ``net`` from ``cache_path`` if it is valid, else ``compute()`` and store it.

    Returns (partition, status) with status "loaded", "computed", STALE_STATUS (the file
    held another generator's partition: replaced), "recomputed (other cache format N)",
    "recomputed (corrupt cache: ...)", or "not_written (reason)" when the partition
    was computed but the cache could not be written.  log(msg) receives one human
    sentence per event; notice(msg) (default: log) the one sentence saying that a cache
    holding another generator's partition, or a damaged one, is being replaced.  A
    failure to write the cache is a warning (through log, or warnings.warn without one),
    never an error.  A file at ``cache_path`` that is not a cpadgn partition cache is
    refused (NotACacheError) before any computation and left untouched.
    """
    say = log or (lambda msg: None)
    tell = notice or say
    cache_path = Path(cache_path)
    net_fp = net.fingerprint()
    key = cache_key(net_fp)
    status = "computed"
    if cache_path.exists():        # a symbolic link to no file yet is written at its target
        try:
            stored, version = read_identity(cache_path)
        except NotACacheError as e:
            reason = str(e).replace(str(cache_path), "").strip(" :") or "not a cache"
            raise NotACacheError(f"the partition cache path {cache_path} holds a file that is not a "
                                 f"cpadgn partition cache ({reason}); it is left untouched: choose "
                                 "another cache path (--cache) or move that file away") from None
        except CpadgnError as e:
            stored, version = None, CACHE_FORMAT_VERSION
            status = _corrupt(cache_path, e, tell)
        if stored is None:
            pass
        elif version != CACHE_FORMAT_VERSION:
            status = f"recomputed (other cache format {version})"
            say(f"The partition cache {cache_path} has cache format {version} (this cpadgn "
                f"writes {CACHE_FORMAT_VERSION}); recomputing and replacing it.")
        elif stored != key:       # the same format version, so another network fingerprint
            status = _stale(cache_path, tell)
        else:
            try:     # the file is opened anew: another process may have replaced it since
                part, stored = read_partition(cache_path)
                if part.patterns.shape[1] != net.n_units or part.interior.shape[1] != net.latent_dim:
                    raise CpadgnError(f"{cache_path}: shapes do not match the generator")
            except CpadgnError as e:
                status = _corrupt(cache_path, e, tell)
            else:
                if stored == key:
                    say(f"Loaded the partition ({part.n_regions} regions) from {cache_path}.")
                    return part, "loaded"
                status = _stale(cache_path, tell)
    part = compute()
    try:
        save_partition(cache_path, part, net_fp)
    except Exception as e:  # caching is an optimisation: never fail the computation
        why = write_reason(e)
        where = f"{cache_path} (a link to {os.readlink(cache_path)})" if cache_path.is_symlink() else cache_path
        msg = (f"Could not write the partition cache {where} ({why}); continuing without "
               "a cache (pass another cache path to keep the partition).")
        if log is None:
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        else:
            log(msg)
        return part, f"not_written ({why})"
    if status == "computed":
        say(f"Computed the partition ({part.n_regions} regions, {part.method}, "
            f"{part.seconds:.3g} s) and saved it to {cache_path}.")
    else:
        say(f"Saved the recomputed partition ({part.n_regions} regions) to {cache_path}.")
    return part, status


def _stale(cache_path, say) -> str:
    say(f"The partition cache {cache_path} holds another generator's partition (a "
        "different fingerprint: another model, or this one changed); recomputing and "
        "replacing it.")
    return STALE_STATUS


def _corrupt(cache_path, e, say) -> str:
    reason = str(e).replace(str(cache_path), "").strip(" :")
    damaged = "is a damaged partition cache ("           # ``_open``'s own words around the reason
    reason = reason[len(damaged):-1] if reason.startswith(damaged) and reason.endswith(")") else reason
    reason = reason or "unreadable"
    say(f"The partition cache {cache_path} is corrupt ({reason}); recomputing and replacing it.")
    return f"recomputed (corrupt cache: {reason})"
