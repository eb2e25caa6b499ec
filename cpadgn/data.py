"""Reading data sets and writing result files.

Input (``read_data``): a 2-D table of samples (rows) x features (columns) as float64,
NaN marking a missing value.

- ``.npy``  a 2-D numeric array (``np.load(allow_pickle=False)``), or a 1-D structured
  array with numeric fields (one column per field, the format ``write_table`` writes)
- ``.csv``  comma separated; the first row is a header when any of its cells is not a
  number (unless it also holds a decimal number or a '?': refused, see
  ``_refuse_mixed_header``), or when its cells are the column numbers 0..D-1 or 1..D
  written as integers (D >= 4; 0..D-1 for D = 2, 3 above a row written in decimals: the
  header ``DataFrame(array).to_csv`` writes; such a data row would be a strange sample,
  and read as data it would silently add one); empty cells and pandas' missing-value
  markers (nan, NA, N/A, null, None, #N/A, <NA>, ..., in any case) are missing values
- ``.h5`` / ``.hdf5``  the dataset named by ``dataset``; without it, the file's only
  2-D dataset (``dataset`` given for a .csv or .npy file is refused)

Infinite values are refused (they are never a valid observation; write NaN for a
missing one).

Output (``write_table``, ``write_array``): chosen by suffix.

- ``.csv``  a header row, then one line per row; integer and boolean columns as
  integers, floats in Python's repr (shortest text that reads back to the same
  float64, so the file round-trips exactly), NaN as ``nan``
- ``.npy``  ``write_table``: a 1-D structured array, one field per column, in
  column order (``arr["log_prob"]``); ``write_array``: the plain array
- ``.h5`` / ``.hdf5``  ``write_table``: one 1-D dataset per column and a root
  attribute ``columns`` with their order; ``write_array``: dataset ``data`` with an
  optional attribute ``columns``

Every output is written to a temporary file in the target directory and renamed
over the target (``os.replace``), so a reader never sees a half-written file and a
failure (a full disk, Ctrl-C) leaves no partial output; HDF5 files are built in memory
and written with plain file writes (``atomic_hdf5``).  ``check_output_path`` validates
an output path before any computation starts, including that it is not one of the
command's inputs (``check_not_an_input``).  A full disk is reported as one line
(``write_error``).
"""
from __future__ import annotations

import atexit
import csv
import errno
import glob
import io
import itertools
import math
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import CpadgnError

DATA_SUFFIXES = (".csv", ".npy", ".h5", ".hdf5")
OUTPUT_SUFFIXES = (".csv", ".npy", ".h5", ".hdf5")
# pandas.read_csv's default missing-value markers, compared in lower case
MISSING_TOKENS = frozenset({"", "nan", "-nan", "na", "n/a", "#n/a", "#n/a n/a", "#na", "<na>", "null", "none",
                            "1.#ind", "-1.#ind", "1.#qnan", "-1.#qnan"})


# ============================================================= atomic writing
STALE_TEMP_SECONDS = 6 * 3600   # a temporary older than this is stale whoever wrote it


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    On any exception (KeyboardInterrupt included) the temporary file is removed and
    ``path`` is left as it was.  The final file gets the usual permissions (0666 minus
    the umask).  The temporary is named ``.NAME.HOST.PID.XXXXXXXX.tmp``: temporaries
    that a killed writer left beside ``path`` are removed first (``remove_stale_temps``).
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    remove_stale_temps(path)
    _OWN_TEMPS.add((parent, _temp_prefix(path)))     # before the file exists: see _remove_own_temps
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=_temp_prefix(path), suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


_OWN_TEMPS: set = set()      # (directory, prefix) of every temporary this process made


@atexit.register
def _remove_own_temps():
    """At exit, remove this process's temporaries still there: a Ctrl-C that lands between
    creating one and the ``try`` that removes it (in mkstemp, or before an ExitStack holds
    the context) skips that removal."""
    for parent, prefix in _OWN_TEMPS:
        for tmp in parent.glob(glob.escape(prefix) + "*.tmp"):
            tmp.unlink(missing_ok=True)


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32] or "host"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_host()}.{os.getpid()}."


def remove_stale_temps(path) -> list:
    """Remove the temporaries of writers of ``path`` that are gone; returns the removed paths.

    A temporary (``.NAME.HOST.PID.XXXXXXXX.tmp`` or ``.check``) is stale when it was
    written on this host by a process that no longer exists, or when it is older than
    STALE_TEMP_SECONDS (a writer on another host, or a reused PID).  A writer that is
    alive on this host keeps its temporary.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(r"^\." + re.escape(path.name) + r"\.(?:([A-Za-z0-9-]+)\.(\d+)\.)?"
                         r"[A-Za-z0-9_]{8}\.(?:tmp|check)$")
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        m = pattern.match(name)
        if m is None:
            continue
        temp = parent / name
        try:
            old = now - temp.lstat().st_mtime > STALE_TEMP_SECONDS
            dead = m.group(1) == _host() and not _alive(int(m.group(2)))
            if (old or dead) and temp.is_file():
                temp.unlink()
                removed.append(temp)
        except OSError:
            continue
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_hdf5(path, trailer=None):
    """Yield a new in-memory ``h5py.File``; on success write its image to ``path`` atomically.

    HDF5 is written to memory and the finished image is written to disk with plain file
    writes, so a full disk is one OSError from ``write`` (never an HDF5 error inside a
    close or a finaliser, which is what crashed the process).  ``trailer(image) -> bytes``,
    if given, is written after the image (HDF5 ignores bytes past its end of file).
    """
    h5py = _h5py()
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        yield f
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as out:
            out.write(buffer.getbuffer())
            if trailer is not None:
                out.write(trailer(buffer.getbuffer()))


_NO_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_NO_SPACE_TEXT = re.compile(r"no space left|file too large|quota exceeded|errno = (28|27|122)\b|"
                            r"\d+ requested and \d+ written", re.IGNORECASE)


def is_no_space(e: BaseException) -> bool:
    """True for a write that failed because the disk (or the file size limit) is full.

    numpy's short-write message ("N requested and M written") counts: a short write to a
    regular file only happens when the device is full or a size limit is reached.
    """
    return (isinstance(e, OSError) and e.errno in _NO_SPACE_ERRNOS) or bool(_NO_SPACE_TEXT.search(str(e)))


def write_reason(e: BaseException) -> str:
    """Why a write failed, in words (a full disk says what to do)."""
    if is_no_space(e):
        return "no space left on device; free space or choose another path"
    return e.strerror if isinstance(e, OSError) and e.strerror else _short(e)


def write_error(path, e: BaseException) -> CpadgnError:
    """The one-line user error for a failed write of ``path``."""
    reason = write_reason(e)
    advice = "" if ";" in reason else "; check the directory's permissions and space, or choose another path"
    return CpadgnError(f"could not write {path}: {reason}{advice}")


def check_not_an_input(path, inputs: dict) -> None:
    """Fail (CpadgnError) if writing ``path`` would replace one of ``inputs`` ({role: path}): the
    command's inputs, or another of its outputs.

    The same file is recognised through symbolic links, hard links and relative paths
    (os.path.samefile when both exist, the resolved path otherwise, so a cache file that
    does not exist yet counts too).
    """
    path = Path(path)
    for role, other in inputs.items():
        if other is None or other is False:
            continue
        other = Path(other)
        same = os.path.realpath(path) == os.path.realpath(other)
        if not same and path.exists() and other.exists():
            try:
                same = os.path.samefile(path, other)
            except OSError:
                same = False
        if same:
            raise CpadgnError(f"cannot write {path}: it is {role} ({other}) of this command and "
                              "would be overwritten; choose another output path")


def check_output_path(path, *, ndim: int = 2, inputs: dict | None = None,
                      suffixes: tuple = OUTPUT_SUFFIXES) -> Path:
    """Fail early (CpadgnError) if ``path`` cannot receive a result file.

    Checks the suffix, that the directory exists and is writable (by creating and
    removing a temporary file there), that the path is not a directory, and that it is
    none of ``inputs`` ({role: path}, see ``check_not_an_input``).  ndim=3
    (multiple-imputation draws) also refuses .csv.  ``suffixes``: the accepted
    extensions (pictures pass ``plot.IMAGE_SUFFIXES``).  Returns the path.
    """
    path = Path(path)
    check_not_an_input(path, inputs or {})
    check_output_suffix(path, ndim=ndim, suffixes=suffixes)
    if path.is_dir():
        raise CpadgnError(f"cannot write {path}: it is a directory; give a file name")
    check_directory_writable(path)
    if path.exists() and not os.access(path, os.W_OK):
        raise CpadgnError(f"cannot write {path}: the existing file is read-only; choose another "
                          "output path or make it writable")
    return path


def check_output_suffix(path, *, ndim: int = 2, suffixes: tuple = OUTPUT_SUFFIXES) -> None:
    """Fail (CpadgnError) unless ``path``'s extension is one of ``suffixes`` (and not .csv
    for an output of ndim > 2): the part of ``check_output_path`` that looks at the name
    alone, no file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in suffixes:
        raise CpadgnError(f"cannot write {path}: unknown output extension "
                          f"'{path.suffix or '(none)'}'; use one of {', '.join(suffixes)}")
    if ndim > 2 and suffix == ".csv":
        raise CpadgnError(f"cannot write {path}: a CSV file holds a 2-D table, but this output "
                          f"is {ndim}-D; use .npy or .h5")


def check_directory_writable(path, name=None) -> None:
    """Fail (CpadgnError) unless the directory of ``path`` exists and a file can be created
    there (tried with a temporary file).  ``name``: how the messages call the path (default
    the path itself)."""
    path = Path(path)
    name = path if name is None else name
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise CpadgnError(f"cannot write {name}: directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise CpadgnError(f"cannot write {name}: {parent} is not a directory; choose a path inside a directory")
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=_temp_prefix(path), suffix=".check")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise CpadgnError(f"cannot write {name}: directory {parent} is not writable "
                          f"({e.strerror or e}); choose another directory") from None


# ================================================================== reading
def width_message(name: str, columns: int, D: int) -> str:
    """The one line for data of another width than the generator's output D."""
    return f"{name} has {columns} columns but the generator outputs {D}; pass data with {D} columns"


def numeric_array(X, wanted: str = "an (N, D) array") -> np.ndarray:
    """X given in Python (an array, a list of lists, a pandas DataFrame, a torch tensor) as
    a numpy array of any shape: a float dtype kept, other numbers as float64; None,
    pandas' pd.NA (nullable dtypes such as "Float64") and the masked entries of a numpy
    masked array read as NaN, a torch tensor that requires grad detached, one of a float
    type numpy lacks (bfloat16, float8) as float64 (exactly).  One-line CpadgnError for
    anything not numeric; wanted: what to pass instead."""
    module = type(X).__module__.split(".")[0]
    if module == "pandas":            # numpy cannot convert pd.NA, pandas' own missing marker
        X = X.to_numpy(na_value=np.nan)
    elif module == "torch":           # numpy refuses a tensor that requires grad, or lives on a GPU
        import torch
        X = X.detach().cpu()
        if X.is_floating_point() and X.dtype not in (torch.float16, torch.float32, torch.float64):
            X = X.double()
    elif isinstance(X, np.ma.MaskedArray):       # np.asarray would read the values under the mask
        X = np.ma.filled(X.astype(np.float64) if X.dtype.kind in "biu" else X, np.nan)
    try:
        X = np.asarray(X)
        if X.dtype.kind == "c":
            raise TypeError("complex numbers")
        return X if X.dtype.kind == "f" else X.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise CpadgnError(f"the data are not a numeric array ({e}); pass {wanted} of numbers, "
                          "NaN for missing") from None


def check_rows(X, D: int, name: str = "the data") -> np.ndarray:
    """Rows given in Python (an array, a list of lists, a DataFrame, a tensor) as an (N, D)
    array (``numeric_array``: a float dtype kept, None and pd.NA read as NaN); one-line
    CpadgnError for anything not numeric, another width, or an inf (NaN marks a missing value).
    name: the data in the width message (the command line names the file)."""
    fix = "pass df.iloc[[i]], a one-row frame" if type(X).__name__ == "Series" else "pass X.reshape(1, -1)"
    X = numeric_array(X, f"an (N, {D}) array")
    if X.ndim == 1 and X.shape[0] == D:
        raise CpadgnError(f"the data must be a 2-D array (N, {D}), got one row of shape {X.shape}; {fix}")
    if X.ndim != 2:
        raise CpadgnError(f"the data must be a 2-D array (N, {D}), got shape {X.shape}; pass one row "
                          "per sample")
    if X.shape[1] != D:
        raise CpadgnError(width_message(name, X.shape[1], D))
    if np.isinf(X).any():
        r, c = np.argwhere(np.isinf(X))[0]
        raise CpadgnError(f"row {r + 1}, column {c + 1} (X[{r}, {c}]) is inf; replace it with a finite value, "
                          "or NaN to mark it missing")
    return X


class GeneratorAsData(CpadgnError):
    """A generator file (a cpadgn model or a saved torch model) where data was expected."""


def read_data(path, *, dataset: str | None = None) -> np.ndarray:
    """Read a data table as float64 (N, D); NaN marks missing values."""
    path = Path(path)
    if not path.exists():
        raise CpadgnError(f"data file {path} does not exist; check the path")
    if path.is_dir():
        raise CpadgnError(f"{path} is a directory, not a data file; pass a .csv, .npy or .h5 file")
    suffix = path.suffix.lower()
    if suffix not in DATA_SUFFIXES:
        hint = model_file_hint(path)
        raise (GeneratorAsData if hint else CpadgnError)(
            f"cannot read {path}: unknown data extension '{path.suffix or '(none)'}'; "
            f"supported: {', '.join(DATA_SUFFIXES)}{hint}")
    if dataset is not None and suffix not in (".h5", ".hdf5"):
        raise CpadgnError(f"--dataset {dataset} names a dataset inside an .h5 file, but {path} is a "
                          f"{suffix} file; drop --dataset")
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CpadgnError(f"cannot read {path}: {e.strerror or e}; check the path and its permissions") from None
    if size == 0:
        raise CpadgnError(f"data file {path} is empty (0 bytes); pass a file with one row per sample")
    if suffix == ".npy":
        X, lines = _read_npy(path), None
    elif suffix == ".csv":
        X, lines = _read_csv(path)
    else:
        X, lines = _read_h5(path, dataset), None
    return _check_table(path, X, lines)


def model_file_hint(path) -> str:
    """'; it looks like a saved torch model: ...' for a DATA path holding a zip archive or
    a pickle (what torch.export, torch.jit and torch.save write), else ''."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return ""
    if head == b"PK\x03\x04" or head[:1] == b"\x80":
        return "; it looks like a saved torch model: the order is MODEL then DATA"
    return ""


def refuse_cpadgn_file(path, f) -> None:
    """A cpadgn model file or partition cache (the open h5py File f) given as DATA: say so."""
    fmt = f.attrs.get("format")
    fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
    if fmt == "cpadgn-model":
        raise GeneratorAsData(f"{path} is a cpadgn model file, not data; the order is MODEL then DATA, e.g. "
                          f"cpadgn score {path} DATA.csv -o OUT")
    if fmt == "cpadgn-partition":
        raise CpadgnError(f"{path} is a cpadgn partition cache, not data; pass a .csv, .npy or .h5 data file")


def check_table_shape(path, shape: tuple) -> None:
    """Refuse a data array of ``shape`` that is not a non-empty 2-D table (also for the
    chunked readers of cpadgn.dask, which never hold the whole array)."""
    if len(shape) != 2:
        hint = " (x.reshape(1, -1) for one sample, x.reshape(-1, 1) for one feature)" if len(shape) == 1 else \
            " (flatten each sample to one row)" if len(shape) > 2 else ""
        raise CpadgnError(f"{path} holds a {len(shape)}-D array of shape {tuple(shape)}; expected a 2-D "
                          f"table, rows = samples and columns = features{hint}")
    if shape[0] == 0:
        raise CpadgnError(f"{path} has no data rows; pass a file with one row per sample")
    if shape[1] == 0:
        raise CpadgnError(f"{path} has no columns; pass a file with one column per feature")


def _check_table(path: Path, X: np.ndarray, lines=None) -> np.ndarray:
    check_table_shape(path, X.shape)
    inf = np.isinf(X)
    if inf.any():
        r, c = np.argwhere(inf)[0]
        where = f"row {r + 1}" + (f" (line {lines[r]})" if lines is not None else "")
        more = f" ({int(inf.sum())} infinite values in all)" if inf.sum() > 1 else ""
        raise CpadgnError(f"{path}: {where}, column {c + 1} is {X[r, c]}{more}; replace it with a "
                          "finite value, or NaN for a missing value")
    return np.ascontiguousarray(X, dtype=np.float64)


def _numeric(path: Path, a: np.ndarray, what: str) -> np.ndarray:
    """A numeric (or numeric structured) array as float64."""
    if a.dtype.names:
        bad = [n for n in a.dtype.names if a.dtype[n].kind not in "biuf" or a.dtype[n].shape]
        if bad:
            raise CpadgnError(f"{path}: {what} has non-numeric fields {bad}; keep numeric "
                              "columns only")
        if a.ndim != 1:
            raise CpadgnError(f"{path}: {what} is a structured array of shape {a.shape}; "
                              "expected 1-D (one record per row)")
        return np.stack([a[n].astype(np.float64) for n in a.dtype.names], axis=1) \
            if a.dtype.names else np.zeros((a.shape[0], 0))
    if a.dtype.kind not in "biuf":
        kind = {"c": "complex", "U": "text", "S": "bytes", "O": "object", "M": "datetime",
                "m": "timedelta"}.get(a.dtype.kind, str(a.dtype))
        raise CpadgnError(f"{path}: {what} holds {kind} values; expected numbers: save the table as a "
                          "numeric (float) array")
    return a.astype(np.float64, copy=False)            # a float64 array as loaded: no second copy of the data


def _read_npy(path: Path) -> np.ndarray:
    try:
        a = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise CpadgnError(f"{path} holds Python objects (pickled data), which cpadgn does not "
                              "load; save a numeric array with np.save") from None
        raise CpadgnError(f"{path} is not a valid .npy file ({e}); save the array with np.save") from None
    except (OSError, EOFError) as e:
        raise CpadgnError(f"{path} is not a valid .npy file ({e}); save the array with np.save") from None
    if not isinstance(a, np.ndarray):
        a.close()
        raise CpadgnError(f"{path} is an .npz archive, not a single .npy array; "
                          "save one array with np.save")
    return _numeric(path, a, "the array")


def is_header(cells: list, next_cells: list | None = None) -> bool:
    """Whether a CSV's first row (its cells, str) is a header: a cell that is not a
    number, or the column numbers '0', '1', .., 'D-1' or '1', .., 'D' written as integers
    (after an empty first cell, pandas' name for its index column) when D >= 4; for D = 2
    and 3 the numbers 0..D-1 when the next row (``next_cells``) writes a number with a
    decimal point or an exponent (pandas writes floats so, 0.5 or 1.0: an integer row
    0,1 above such a row is its header)."""
    try:
        [_cell(c) for c in cells]
    except ValueError:
        return True
    text = [c.strip() for c in cells]
    if len(text) >= 3 and not text[0]:          # pandas' index column: an empty name first
        text = text[1:]
    if not (len(text) >= 2 and text[0] in ("0", "1")
            and text == [str(int(text[0]) + i) for i in range(len(text))]):
        return False
    above_decimals = any(_DECIMAL.match(c.strip()) for c in next_cells or ())
    return len(text) >= 4 or (text[0] == "0" and above_decimals)


_DECIMAL = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")


def _refuse_mixed_header(path: Path, line: int, cells: list) -> None:
    """A first row taken for a header (a cell is not a number) that also holds a number
    written with a decimal point or exponent, or a cell without letters ('?', '-', '1_0'), is
    a data row with a bad missing-value marker as likely as a header: refused, never
    dropped in silence."""
    numbers, text = [], []
    for j, c in enumerate(cells):
        try:
            _cell(c)
            numbers.append(c.strip())
        except ValueError:
            text.append((j, c.strip()))
    bare = [(j, c) for j, c in text if not any(ch.isalpha() for ch in c)]
    if [c for c in numbers if c] and (bare or any(_DECIMAL.match(c) for c in numbers)):
        j, c = (bare or text)[0]
        hint = _separator_hint(c)
        if hint:
            raise CpadgnError(f"{path}: line {line}, column {j + 1} is '{c}', not a number{hint}")
        raise CpadgnError(f"{path}: line {line} mixes numbers and text ('{c}' in column {j + 1}), so it "
                          "is neither a clear header nor a data row; if it is data, write each missing "
                          "value as an empty cell or NA; if it is a header, give every column a name")


def _cell(text: str):
    """float or None (missing); raises ValueError for anything else (also '1_0', which
    Python's float reads as 10: a CSV number has no underscores)."""
    t = text.strip()
    if t.lower() in MISSING_TOKENS:
        return math.nan
    if "_" in t:
        raise ValueError(t)
    return float(t)


def _csv_rows(f, underscored: set | None = None):
    """(line number, cells) of each CSV row of the open file f, skipping blank lines (whitespace
    only).  A quoted empty cell ("", what pandas writes for a missing value in a one-column
    file) or a line of bare commas (an all-NaN row) is a row, not a blank line.  The line
    numbers of rows whose text holds '_' go into ``underscored`` when given (one scan of
    the line: float() would read '1_0' as 10, so those rows are parsed cell by cell)."""
    last = [""]

    def lines():
        for line in f:
            last[0] = line
            yield line
    reader = csv.reader(lines())
    for row in reader:
        if last[0].strip():
            if underscored is not None and "_" in last[0]:
                underscored.add(reader.line_num)
            yield reader.line_num, row


def _read_csv(path: Path):
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            underscored = set()
            rows = list(_csv_rows(f, underscored))
    except UnicodeDecodeError:
        raise CpadgnError(f"{path} is not a UTF-8 text file; is it really a CSV? If so, save it as "
                          "UTF-8 comma-separated values") from None
    except csv.Error as e:
        raise CpadgnError(f"{path} is not a valid CSV file ({e}); save it as comma-separated values") from None
    except OSError as e:
        raise CpadgnError(f"cannot read {path}: {e.strerror or e}; check the path and its permissions") from None
    if not rows:
        raise CpadgnError(f"{path} has no data rows; pass a file with one row per sample")
    header = None
    first = rows[0][1]
    if len(first) == 1:
        sep = next((c for c in (";", "\t", "|") if c in first[0]), None)
        if sep is not None:
            name = {";": "semicolons", "\t": "tabs", "|": "vertical bars"}[sep]
            raise CpadgnError(f"{path}: line {rows[0][0]} is separated by {name}; cpadgn reads "
                              "comma-separated values (convert the file, e.g. save it as CSV "
                              "with ',' as the separator)")
    if is_header(first, rows[1][1] if len(rows) > 1 else None):
        _refuse_mixed_header(path, rows[0][0], first)
        header, rows = first, rows[1:]
    if not rows:
        raise CpadgnError(f"{path} has a header but no data rows; add one row per sample below it")
    if header is not None and len(header) > 1 and (not header[0].strip() or _UNNAMED.match(header[0].strip())):
        _refuse_pandas_index(path, rows, header[0].strip())
    if header is not None and len(header) > 1 and not header[-1].strip() \
            and all(len(r) == len(header) and not r[-1].strip() for _, r in rows):
        raise CpadgnError(f"{path}: every line ends with a comma, which adds an empty column with no "
                          "name; remove the trailing commas")
    width = len(header) if header is not None else len(rows[0][1])
    ref = "the header has" if header is not None else f"line {rows[0][0]} has"
    out = np.empty((len(rows), width))
    for i, (line, row) in enumerate(rows):
        if len(row) != width:
            raise CpadgnError(f"{path}: line {line} has {len(row)} values but {ref} {width}; "
                              "every row needs the same number of comma-separated values")
        try:
            if line in underscored:
                raise ValueError
            out[i] = [float(c) for c in row]
        except ValueError:
            if header is not None and [c.strip() for c in row] == [c.strip() for c in header]:
                raise CpadgnError(f"{path}: line {line} repeats the header (files joined together?); remove "
                                  "that line") from None
            for j, c in enumerate(row):
                try:
                    out[i, j] = _cell(c)
                except ValueError:
                    name = f" ('{header[j].strip()}')" if header is not None and header[j].strip() else ""
                    number = _separator_hint(c)
                    if number:
                        raise CpadgnError(f"{path}: line {line}, column {j + 1}{name} is '{c.strip()}', "
                                          f"not a number{number}") from None
                    if _text_column(rows, j) and not (";" in c or "\t" in c):
                        raise CpadgnError(f"{path}: column {j + 1}{name} holds text in every row ('{c.strip()}' "
                                          f"on line {line}), not numbers: cpadgn reads numeric features only; "
                                          "drop that column (a label or name?) from DATA") from None
                    hint = "; cpadgn reads comma-separated values" if (";" in c or "\t" in c) else \
                        "; leave the cell empty or write NA for a missing value"
                    raise CpadgnError(f"{path}: line {line}, column {j + 1}{name} is '{c.strip()}', "
                                      f"not a number{hint}") from None
    return out, [n for n, _ in rows]


_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d*)?$")
_DECIMAL_COMMA = re.compile(r"^[+-]?\d*,\d+$")


def _separator_hint(text: str) -> str:
    """The advice for a quoted number written with thousands separators ('1,065.00') or a
    decimal comma ('0,5'), which a spreadsheet's export writes and float() refuses; '' for
    anything else.  (It was called a bad missing-value marker, or in a column of them a
    label column to drop.)"""
    t = text.strip()
    if _THOUSANDS.match(t):
        return f"; write numbers without thousands separators ('{t.replace(',', '')}')"
    if _DECIMAL_COMMA.match(t):
        return f"; write numbers with a decimal point ('{t.replace(',', '.')}')"
    return ""


def _text_column(rows: list, j: int) -> bool:
    """Whether column j of the CSV rows [(line, cells)] is text in every row that has it
    (missing-value markers aside), two rows at least: a label or name column rather than
    a stray bad cell."""
    cells = [r[j] for _, r in rows if len(r) > j and r[j].strip().lower() not in MISSING_TOKENS]
    for c in cells:
        try:
            _cell(c)
            return False
        except ValueError:
            pass
    return len(cells) >= 2


def csv_header_cells(path) -> list | None:
    """The header cells (str) of a CSV file as ``read_data`` decides them, or None (no header,
    or a file it cannot read)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [cells for _, cells in itertools.islice(_csv_rows(f), 2)]
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    return rows[0] if rows and is_header(rows[0], rows[1] if len(rows) > 1 else None) else None


# pandas' name for a column without one, as read_csv names the index a to_csv wrote
_UNNAMED = re.compile(r"^Unnamed: \d+$")


def _refuse_pandas_index(path: Path, rows: list, name: str = "") -> None:
    """A first column unnamed in the header that holds distinct whole numbers >= 0 is the
    index pandas' DataFrame.to_csv writes by default, not a feature: 0, 1, 2, .. for a whole
    frame, other numbers in another order for a train/test split or a shuffled frame (whose
    index, read as a feature, trained a model on row numbers).  Refused, never read as one.
    Named 'Unnamed: 0' (pandas' name for it once read_csv has read such a file and to_csv
    written it again with index=False) it is the same index: refused alike."""
    try:
        first = [float(r[0]) for _, r in rows]
    except ValueError:
        return
    unnamed = "has no name in the header" if not name else \
        f"is named '{name}', pandas' name for a column that had none,"
    if first == list(range(len(rows))):
        raise CpadgnError(f"{path}: the first column {unnamed} and counts the rows "
                          "0, 1, 2, ..: it is a pandas index, not a feature; write the file with "
                          "DataFrame.to_csv(path, index=False), or drop that column")
    if all(v >= 0 and v.is_integer() for v in first) and len(set(first)) == len(first):
        shown = ", ".join(f"{v:.0f}" for v in first[:3])
        raise CpadgnError(f"{path}: the first column {unnamed} and holds distinct whole "
                          f"numbers ({shown}, ..): it looks like a pandas index (of a split or shuffled "
                          "frame), not a feature; write the file with DataFrame.to_csv(path, index=False), "
                          f"or drop that column (if it is a feature, give it {'another' if name else 'a'} name "
                          "in the header)")


def _h5py():
    import h5py
    return h5py


def h5_lock_error(path, e: BaseException) -> CpadgnError | None:
    """The one line for an HDF5 file that h5py could not open because of HDF5's file lock
    (another process has it open for writing, or the file system refuses locks), which
    HDF5 reports like a damaged file; None for any other error."""
    text = str(e)
    if "unable to lock file" not in text:
        return None
    if re.search(r"errno = (11|35)\b", text):          # EAGAIN / EWOULDBLOCK: a writer holds it
        return CpadgnError(f"{path} is open for writing in another process (HDF5 file lock); "
                           "wait for it or close it there, then rerun")
    return CpadgnError(f"{path} could not be locked for reading ({_short(e)}); on a file system "
                       "without file locks set HDF5_USE_FILE_LOCKING=FALSE")


def _read_h5(path: Path, dataset: str | None) -> np.ndarray:
    h5py = _h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise h5_lock_error(path, e) or CpadgnError(f"{path} is not a readable HDF5 file (corrupt, truncated or not HDF5: "
                          f"{_short(e)}); re-create it, or pass a .csv or .npy file") from None
    with f:
        refuse_cpadgn_file(path, f)
        found = []
        f.visititems(lambda name, obj: found.append((name, obj.shape, obj.dtype))
                     if isinstance(obj, h5py.Dataset) else None)
        listing = ", ".join(f"{n} {tuple(s)}" for n, s, _ in found) or "none"
        if dataset is None:
            two_d = [n for n, s, d in found if len(s) == 2 and (d.kind in "biuf")]
            if len(two_d) != 1:
                why = "has no 2-D numeric dataset" if not two_d else "has several 2-D datasets"
                raise CpadgnError(f"{path} {why}; choose one with --dataset KEY (datasets: {listing})")
            dataset = two_d[0]
        obj = f.get(dataset.lstrip("/"))
        if not isinstance(obj, h5py.Dataset):
            raise CpadgnError(f"{path} has no dataset '{dataset}'; give one of its datasets with --dataset "
                              f"KEY (datasets: {listing})")
        try:
            a = obj[()]
        except OSError as e:
            raise CpadgnError(f"{path}: dataset '{dataset}' cannot be read (corrupt file? "
                              f"{_short(e)}); re-create the file") from None
    return _numeric(path, np.asarray(a), f"dataset '{dataset}'")


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0] if s else type(e).__name__


# ================================================================== writing
def write_table(path, columns: dict) -> None:
    """Write named 1-D columns of equal length (N,) to .csv / .npy / .h5 (atomically)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise CpadgnError(f"cannot write {path}: unknown output extension '{path.suffix}'; "
                          f"use one of {', '.join(OUTPUT_SUFFIXES)}")
    cols = {str(k): _column(v) for k, v in columns.items()}
    lengths = {k: v.shape[0] for k, v in cols.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns have different lengths: {lengths}; pass columns of one length N")
    for k in cols:
        if not k or "/" in k:
            raise ValueError(f"invalid column name {k!r}; use a non-empty name without '/'")
    n = next(iter(lengths.values()), 0)
    try:
        if suffix in (".h5", ".hdf5"):
            with atomic_hdf5(path) as f:
                _h5_columns(f, cols)
            return
        with atomic_path(path) as tmp:
            if suffix == ".csv":
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    w = csv.writer(f, lineterminator="\n")
                    w.writerow(list(cols))
                    fmts = [_formatter(v) for v in cols.values()]
                    vals = list(cols.values())
                    for i in range(n):
                        w.writerow([fmt(v[i]) for fmt, v in zip(fmts, vals)])
            else:
                rec = np.empty(n, dtype=[(k, _npy_dtype(v)) for k, v in cols.items()])
                for k, v in cols.items():
                    rec[k] = v
                with open(tmp, "wb") as f:
                    np.save(f, rec, allow_pickle=False)
    except OSError as e:
        raise write_error(path, e) from None


def _h5_columns(f, cols: dict) -> None:
    h5py = _h5py()
    for k, v in cols.items():
        if v.dtype.kind in "USO":
            f.create_dataset(k, data=v.astype(str).astype(object), dtype=h5py.string_dtype(),
                             track_times=False)
        else:
            f.create_dataset(k, data=v, track_times=False)
    f.attrs["columns"] = list(cols)


def write_array(path, array, *, columns=None) -> None:
    """Write a 2-D (N, D) or 3-D (M, N, D) float array to .csv (2-D only) / .npy / .h5.

    .csv: a header (``columns`` or x1..xD) and N rows; .npy: the array as is; .h5:
    dataset ``data`` (attribute ``columns`` when given).  Atomic like write_table.
    """
    path = Path(path)
    a = np.asarray(array)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise CpadgnError(f"cannot write {path}: unknown output extension '{path.suffix}'; "
                          f"use one of {', '.join(OUTPUT_SUFFIXES)}")
    if a.ndim not in (2, 3):
        raise ValueError(f"write_array needs a 2-D or 3-D array, got shape {a.shape}; pass rows (N, D) "
                         "or draws (K, N, D)")
    if columns is not None:
        columns = [str(c) for c in columns]
        if len(columns) != a.shape[-1]:
            raise ValueError(f"{len(columns)} column names for {a.shape[-1]} columns; pass one name per column")
    if suffix == ".csv" and a.ndim != 2:
        raise CpadgnError(f"cannot write {path}: a CSV file holds a 2-D table, but this output "
                          f"has shape {a.shape}; use .npy or .h5")
    try:
        if suffix in (".h5", ".hdf5"):
            with atomic_hdf5(path) as f:
                ds = f.create_dataset("data", data=a, track_times=False)
                if columns is not None:
                    ds.attrs["columns"] = columns
            return
        with atomic_path(path) as tmp:
            if suffix == ".csv":
                names = columns or [f"x{j + 1}" for j in range(a.shape[1])]
                fmt = _formatter(a)
                with open(tmp, "w", newline="", encoding="utf-8") as f:
                    w = csv.writer(f, lineterminator="\n")
                    w.writerow(names)
                    for row in a:
                        w.writerow([fmt(v) for v in row])
            else:
                with open(tmp, "wb") as f:
                    np.save(f, a, allow_pickle=False)
    except OSError as e:
        raise write_error(path, e) from None


def _column(v) -> np.ndarray:
    a = np.asarray(v)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise ValueError(f"table columns must be 1-D, got shape {a.shape}; pass one (N,) array per column")
    return a


def _npy_dtype(v: np.ndarray):
    if v.dtype.kind == "O":
        return np.asarray(v.astype(str)).dtype
    return v.dtype


def _formatter(v: np.ndarray):
    kind = v.dtype.kind
    if kind == "b":
        return lambda x: str(int(x))
    if kind in "iu":
        return lambda x: str(int(x))
    if kind == "f":
        return lambda x: repr(float(x))
    return str
