"""Scoring, imputation and comparison on a Dask cluster (dask.distributed).

Rows are independent: log p(x_n), E[z | x_n] and E[x_m | x_o] of one row need only
that row and the partition.  So the rows are cut into chunks (a dask.array with one
block per chunk, all columns in one block), the model with its partition is computed
or loaded once on the client and sent to every worker once (``client.scatter(...,
broadcast=True)``: the tasks carry a reference to it, never a copy; ``local_cluster``
says why without the Active Memory Manager), and each task
scores one chunk with the model's ``memory_budget`` (``likelihood.posterior`` batches
the chunk within it).  Every worker builds the per-region table once, on its first
task, and keeps it.

Python API (``X`` an (N, D) dask.array, chunked along rows only; NaN = missing)::

    import cpadgn, cpadgn.dask, dask.array as da
    from distributed import Client
    client = Client("tcp://scheduler:8786")          # or Client(LocalCluster(...))
    model = cpadgn.load("gen.h5")                    # partition: cache or computed here
    X = cpadgn.dask.read("data.h5", chunk_rows=4096)  # or da.from_array / da.from_zarr
    ll = cpadgn.dask.log_prob(model, X).compute()     # (N,)
    filled = cpadgn.dask.impute(model, X)             # (N, D) dask.array, E[x_m | x_o]
    filled, se = cpadgn.dask.impute(model, X, mean_stderr=True)   # S >= 4: its QMC stderr

``read`` reads .npy files by memory map and HDF5 datasets by row slices (whole HDF5
chunks by default) on the workers themselves, so the workers must see DATA at the same
path (a shared file system); CSV is refused (convert it once to .npy or .h5).
Results equal the single-process run up to rounding: the row chunks are other batch
sizes, which changes the order of floating-point sums (README, Precision); at S >= 4
too, as a pair's QMC points do not depend on its chunk, and their standard errors come
back with the results (``stderr`` of the posterior table; ``impute(..., mean_stderr=True)``).

Exact draws (``draws=K``) use one random stream per chunk, seeded by (seed, first row
of the chunk): reproducible for the same seed and chunking, exact draws either way, but
not the draws of a single-process run (whose one stream runs over all rows).
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .errors import CpadgnError

LOCAL_PREFIX = "local:"
DEFAULT_CHUNK_ROWS = 2048       # rows per task when DATA has no HDF5 chunking to follow
IMPUTE_LEAD = 2                 # impute_table's leading columns: error_bound, n_missing
CHUNK_DATA_SHARE = 8            # a chunk's rows take at most 1/8 of the memory budget
WORKER_PROBE = "__import__('importlib').import_module('cpadgn.dask') and __import__('cpadgn').__version__"


def _distributed():
    try:
        import distributed
    except ImportError:
        raise CpadgnError("--dask needs dask.distributed, which is not installed; "
                          "pip install 'cpadgn[dask]'") from None
    return distributed


# ==================================================================== the cluster
@contextlib.contextmanager
def open_client(address: str, *, log=None):
    """A connected ``distributed.Client`` whose workers all run this cpadgn version.

    address: a scheduler address (tcp://host:8786) or ``local:N`` (a LocalCluster of N
    worker processes, one thread each, on the loopback interface).  The dashboard link
    goes to ``log``.  The client (and a local cluster) is closed on exit.
    """
    distributed = _distributed()
    quiet_logs()
    with contextlib.ExitStack() as stack:
        if address.startswith(LOCAL_PREFIX):
            n = _local_workers(address)
            if log is not None:
                log(f"Dask: starting {n} local worker process(es)")
            cluster = stack.enter_context(local_cluster(n))
            client = stack.enter_context(distributed.Client(cluster))
        else:
            try:
                client = stack.enter_context(distributed.Client(address, timeout="20s"))
            except (OSError, TimeoutError, ValueError) as e:
                raise CpadgnError(f"cannot connect to the Dask scheduler at {address} "
                                  f"({_first_line(e)}); check the address, or use --dask local:N "
                                  "for a cluster on this machine") from None
            try:
                client.wait_for_workers(1, timeout=60)
            except TimeoutError:
                raise CpadgnError(f"the Dask scheduler at {address} has no workers; start some "
                                  f"(dask worker {address})") from None
        check_workers(client)
        if log is not None:
            link = client.dashboard_link if _has_dashboard(client) else "none"
            log(f"Dask: {len(client.scheduler_info()['workers'])} workers, dashboard {link}")
        yield client


def check_address(address: str) -> str:
    """Refuse a malformed --dask value before any work (a scheduler is only reached later)."""
    if address.startswith(LOCAL_PREFIX):
        _local_workers(address)
    elif not address.strip():
        raise CpadgnError("--dask needs a scheduler address (tcp://host:8786) or local:N")
    return address


def local_cluster(n: int, dashboard_address: str | None = ":0"):
    """``local:N``'s LocalCluster: n worker processes, one thread each, on the loopback
    interface, that ignore Ctrl-C, and no Active Memory Manager on the scheduler: its
    ReduceReplicas policy drops the copies that ``ship`` broadcast whenever no task waits
    for them (between the scatter and the tasks, between two computations), and a worker
    that runs a task later receives and unpickles the model again (dask/dask#11148)."""
    import dask
    distributed = _distributed()
    with _workers_ignore_ctrl_c() as pressed, \
            dask.config.set({"distributed.scheduler.active-memory-manager.start": False}):
        cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, host="127.0.0.1",
                                           dashboard_address=dashboard_address, silence_logs=logging.CRITICAL)
    if pressed():
        cluster.close()
        raise KeyboardInterrupt
    return cluster


# A process in this one's process group that reports a Ctrl-C at the terminal (SIGINT to
# the group) by writing to its stdout, and ends when its stdin closes.
_CTRL_C_WATCHER = ("import os, signal, sys\n"
                   "signal.signal(signal.SIGINT, lambda *a: os.write(1, b'i'))\n"
                   "sys.stdin.buffer.read()")


@contextlib.contextmanager
def _workers_ignore_ctrl_c():
    """Start local worker processes with SIGINT ignored (inherited), so that Ctrl-C reaches
    only this process, which cancels the work and closes the cluster in order (a worker
    interrupted by itself prints tracebacks while the cluster shuts down).  Yields a
    callable, true after the block when a Ctrl-C was pressed meanwhile: this process
    ignores it then too, so a watcher process, started before, records it (a SIGINT sent
    to this process alone in that time, not from the terminal, is lost)."""
    import signal
    import subprocess
    import sys
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    watcher = subprocess.Popen([sys.executable, "-S", "-E", "-c", _CTRL_C_WATCHER], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    pressed = []
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)
        try:
            out, _ = watcher.communicate(timeout=10)      # closes its stdin: it ends
        except subprocess.TimeoutExpired:
            watcher.kill()
            out, _ = watcher.communicate()
        if b"i" in out or watcher.returncode != 0:     # or killed by a Ctrl-C before its handler was set
            pressed.append(True)


def _local_workers(address: str) -> int:
    text = address[len(LOCAL_PREFIX):]
    if not text.isdigit() or int(text) < 1:
        raise CpadgnError(f"--dask {address}: expected local:N with N a positive number of worker "
                          "processes (e.g. local:4), or a scheduler address (tcp://host:8786)")
    return int(text)


def _has_dashboard(client) -> bool:
    try:
        return "dashboard" in client.scheduler_info().get("services", {})
    except Exception:
        return False


def quiet_logs() -> None:
    """Keep distributed's own log lines (a worker restarting, a closed connection) off
    the terminal: cpadgn reports what matters in one line.  asyncio's too: a Ctrl-C while
    ``ship`` broadcasts the model closes the local workers under the scheduler's replicate,
    whose KeyError asyncio logged as a 15-line "Task exception was never retrieved" traceback."""
    for name in ("distributed", "distributed.nanny", "distributed.worker", "distributed.scheduler",
                 "distributed.core", "distributed.comm", "distributed.client", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def check_workers(client) -> None:
    """Fail in one line when a worker cannot import cpadgn or has another version."""
    from . import __version__
    replies = client.run(eval, WORKER_PROBE, on_error="return")
    problem = worker_problem(replies, __version__)
    if problem is not None:
        raise CpadgnError(problem)


def worker_problem(replies: dict, version: str) -> str | None:
    """The one-line complaint about workers' probe replies {address: version or exception}
    (None when every worker has cpadgn ``version``)."""
    bad = {a: r for a, r in replies.items() if r != version}
    if not bad:
        return None if replies else "the Dask cluster has no workers; start some"
    address, reply = next(iter(bad.items()))
    more = f" (and {len(bad) - 1} more of {len(replies)} workers)" if len(bad) > 1 else ""
    if isinstance(reply, BaseException):
        return (f"Dask worker {address} cannot import cpadgn ({type(reply).__name__}: "
                f"{_first_line(reply)}){more}; install cpadgn[dask] {version} on every worker")
    return (f"Dask worker {address} has cpadgn {reply} but this client has {version}{more}; "
            f"install cpadgn {version} on every worker")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


# ================================================================= the model, once
def shippable(model, device: str = "auto"):
    """A copy of ``model`` to send to the workers: its partition loaded (computed or read
    from the cache here, once), no cache file (workers never touch it), no region table
    (each worker builds its own on its first task), nothing from the model file's extras.
    ``device``: 'auto', 'cpu' or 'cuda', resolved on each worker."""
    model.partition()
    if model.noise_std is None:
        raise CpadgnError("the model has no noise std: pass --noise-std X or noise_std= to cpadgn.load")
    copy = object.__new__(type(model))
    copy.__dict__.update(model.__dict__)
    copy.cache_path, copy._table, copy.extra = None, None, {}
    copy.device_request = device
    return copy


def ship(client, model, device: str = "auto"):
    """Send the model and its partition to every worker once; returns the Future that the
    tasks carry instead of the model."""
    return client.scatter(shippable(model, device), broadcast=True, hash=False)


def broadcast_bytes(model) -> int:
    """Size of what ``ship`` sends to each worker (the pickled model and partition)."""
    return len(pickle.dumps(shippable(model), protocol=pickle.HIGHEST_PROTOCOL))


def _ready(model):
    """On a worker: the scattered model with its device chosen (once per worker)."""
    if model._table is None:
        import torch
        want = getattr(model, "device_request", "auto")
        if want == "cuda" and not torch.cuda.is_available():
            raise CpadgnError("--device cuda was asked for but a Dask worker has no CUDA GPU; "
                              "use --device cpu or auto")
        use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
        model.device = torch.device("cuda" if use_cuda else "cpu")
    return model


# ===================================================================== the data
@dataclass(frozen=True)
class RowSource:
    """A 2-D table on disk read by row slices: ``source[a:b]`` is rows a..b-1 as float64
    (N, D) (NaN = missing; an infinite value is refused with its row and column).
    Picklable (a path, not an open file), so dask sends it to the workers, which read
    their own rows: a .npy file by memory map, an HDF5 dataset by its slices."""

    path: str
    kind: str                 # "npy" or "h5"
    dataset: str | None
    shape: tuple
    chunk_rows: int | None    # the HDF5 dataset's row chunking, if any

    ndim = 2
    dtype = np.dtype(np.float64)   # what a slice returns, whatever the file stores

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        start = rows.start or 0
        a = self._read(rows)
        from .data import _numeric
        X = _numeric(Path(self.path), np.asarray(a), "the array")[:, cols]
        inf = np.isinf(X)
        if inf.any():
            r, c = np.argwhere(inf)[0]
            raise CpadgnError(f"{self.path}: row {start + r + 1}, column {c + 1} is {X[r, c]}; "
                              "replace it with a finite value, or NaN for a missing value")
        return X

    def _read(self, rows):
        try:
            if self.kind == "npy":
                return np.load(self.path, mmap_mode="r", allow_pickle=False)[rows]
            import h5py
            with h5py.File(self.path, "r") as f:
                return f[self.dataset][rows]
        except OSError as e:
            import socket
            raise CpadgnError(f"a Dask worker on {socket.gethostname()} cannot read {self.path} "
                              f"({_first_line(e)}); the workers read DATA themselves: put it on a file "
                              "system they all see, at the same path") from None


def open_rows(path, dataset: str | None = None) -> RowSource:
    """Check a DATA file for chunked reading (.npy or an HDF5 dataset; CSV refused) and
    describe it; nothing but its header is read."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        raise CpadgnError(f"--dask reads DATA in chunks from .npy or .h5 files, not CSV; convert "
                          f"{path} once, e.g. python -c \"import numpy, cpadgn.data as d; "
                          f"numpy.save('{path.with_suffix('.npy').name}', d.read_data('{path}'))\"")
    if not path.is_file():
        raise CpadgnError(f"data file {path} does not exist; check the path")
    if dataset is not None and suffix not in (".h5", ".hdf5"):
        raise CpadgnError(f"--dataset {dataset} names a dataset inside an .h5 file, but {path} is a "
                          f"{suffix} file; drop --dataset")
    if suffix == ".npy":
        src = _npy_source(path)
    elif suffix in (".h5", ".hdf5"):
        src = _h5_source(path, dataset)
    else:
        from .data import model_file_hint
        raise CpadgnError(f"cannot read {path} in chunks: unknown data extension "
                          f"'{path.suffix or '(none)'}'; use .npy or .h5{model_file_hint(path)}")
    from .data import check_table_shape
    check_table_shape(path, src.shape)
    return src


def _npy_source(path: Path) -> RowSource:
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CpadgnError(f"{path} is not a .npy array that can be memory-mapped ({_first_line(e)}); "
                          "save a numeric array with np.save") from None
    if not isinstance(a, np.ndarray):
        raise CpadgnError(f"{path} is not a single .npy array; save one array with np.save")
    shape = a.shape
    if a.dtype.names:           # a table cpadgn wrote: one row per record, a column per field
        if a.ndim != 1:
            raise CpadgnError(f"{path}: a structured array of shape {a.shape}; expected 1-D")
        shape = (a.shape[0], len(a.dtype.names))
    elif a.dtype.kind not in "biuf":
        raise CpadgnError(f"{path}: the array holds {a.dtype} values; expected numbers")
    return RowSource(str(path), "npy", None, tuple(shape), None)


def _h5_source(path: Path, dataset: str | None) -> RowSource:
    import h5py
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        from .data import h5_lock_error
        raise h5_lock_error(path, e) or CpadgnError(f"{path} is not a readable HDF5 file ({_first_line(e)}); "
                                                    "re-create it, or convert DATA to .npy") from None
    with f:
        from .data import refuse_cpadgn_file
        refuse_cpadgn_file(path, f)
        found = []
        f.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
        if dataset is None:
            two_d = [n for n in found if f[n].ndim == 2 and f[n].dtype.kind in "biuf"]
            if len(two_d) != 1:
                why = "has no 2-D numeric dataset" if not two_d else "has several 2-D datasets"
                raise CpadgnError(f"{path} {why}; choose one with --dataset KEY "
                                  f"(datasets: {', '.join(found) or 'none'})")
            dataset = two_d[0]
        obj = f.get(dataset.lstrip("/"))
        if not isinstance(obj, h5py.Dataset):
            raise CpadgnError(f"{path} has no dataset '{dataset}'; give one of its datasets with --dataset "
                              f"KEY (datasets: {', '.join(found) or 'none'})")
        if obj.dtype.kind not in "biuf":
            raise CpadgnError(f"{path}: dataset '{dataset}' holds {obj.dtype} values; expected numbers")
        chunk = obj.chunks[0] if obj.chunks else None
        return RowSource(str(path), "h5", obj.name, tuple(obj.shape), chunk)


def chunk_rows_for(src: RowSource, memory_budget: float = 2e9, requested: int | None = None) -> int:
    """Rows per task: ``requested``, else whole HDF5 chunks adding up to about
    DEFAULT_CHUNK_ROWS, else DEFAULT_CHUNK_ROWS; never more than a 1/CHUNK_DATA_SHARE
    share of the memory budget for the chunk's float64 rows."""
    if requested is not None:
        if requested < 1:
            raise CpadgnError(f"--chunk-rows must be a positive number of rows, got {requested}; give 1 or "
                              "more, or leave it out for the default")
        return int(requested)
    D = src.shape[1]
    cap = max(1, int(memory_budget / CHUNK_DATA_SHARE // (8 * D)))
    rows = DEFAULT_CHUNK_ROWS
    if src.chunk_rows:
        rows = src.chunk_rows * max(1, round(DEFAULT_CHUNK_ROWS / src.chunk_rows))
        if rows > cap and src.chunk_rows <= cap:
            rows = src.chunk_rows * (cap // src.chunk_rows)
    return int(min(rows, cap, src.shape[0]))


def read(path, dataset: str | None = None, *, chunk_rows: int | None = None, memory_budget: float = 2e9):
    """DATA (.npy or .h5, or a RowSource) as a lazy (N, D) float64 dask.array, one block
    per ``chunk_rows`` rows (default ``chunk_rows_for``); the workers read their blocks
    themselves."""
    import dask.array as da
    src = path if isinstance(path, RowSource) else open_rows(path, dataset)
    rows = chunk_rows_for(src, memory_budget, chunk_rows)
    return da.from_array(src, chunks=(rows, src.shape[1]), asarray=False, fancy=False,
                         name=f"cpadgn-rows-{_token(src)}", meta=np.empty((0, 0)))


def _token(src: RowSource) -> str:
    from dask.base import tokenize
    st = os.stat(src.path)
    return tokenize(src.path, src.dataset, st.st_size, st.st_mtime_ns)


def as_rows(X, chunk_rows: int = DEFAULT_CHUNK_ROWS):
    """An in-memory (N, D) array (or a dask.array) as a dask.array chunked by rows only."""
    import dask.array as da
    if isinstance(X, da.Array):
        if X.ndim != 2:
            raise CpadgnError(f"the data must be a 2-D dask.array (N, D), got shape {X.shape}; pass one row "
                              "per sample (X.reshape(1, -1) for one row)")
        return X.rechunk({1: -1}).astype(np.float64)
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise CpadgnError(f"the data must be a 2-D array (N, D), got shape {X.shape}; pass one row per "
                          "sample (X.reshape(1, -1) for one row)")
    return da.from_array(X, chunks=(max(1, min(chunk_rows, X.shape[0])), X.shape[1]))


# ================================================================== the block tasks
def posterior_columns(S: int) -> list:
    """The columns of ``posterior_table`` (one row per data row)."""
    return (["log_likelihood", "error_bound", "stderr", "n_observed", "top_region",
             "top_responsibility", "n_pairs"] + [f"z_mean_{j + 1}" for j in range(S)])


def _posterior_block(X, model, moments: bool):
    model = _ready(model)
    post = model.posterior(X, moments=moments, pairs=False)
    cols = [post.log_likelihood, post.error_bound, post.stderr, post.n_observed, post.top_region,
            post.top_responsibility, post.n_pairs]
    return np.column_stack(cols + [post.z_mean[:, j] for j in range(post.z_mean.shape[1])]).astype(np.float64)


def _impute_block(X, model, draws, seed, std, mean_stderr, block_info=None):
    """[error_bound, n_missing | mean (D) | std (D) | mean_stderr (D)] (std and
    mean_stderr where asked for) or [error_bound, n_missing | draws (K*D), draw by draw |
    std (D) where asked for] per row."""
    model = _ready(model)
    first_row = block_info[0]["array-location"][0][0] if block_info else 0
    res = model.imputation(X, draws=draws, seed=np.random.default_rng([int(seed), int(first_row)]), std=std)
    if draws is not None:
        parts = [res.draws.transpose(1, 0, 2).reshape(X.shape[0], -1)] + ([res.std] if std else [])
    else:
        parts = [res.mean] + ([res.std] if std else []) + ([res.mean_stderr] if mean_stderr else [])
    return np.column_stack([res.error_bound, res.n_missing] + parts).astype(np.float64)


def first_rows(src: RowSource, n: int = 2_000) -> np.ndarray:
    """The first min(n, N) rows of DATA, read here (the client): (n, D) float64, NaN = missing.
    For checks of DATA as a whole (its scale) that a prefix answers."""
    return src[:min(n, src.shape[0])]


def check_columns(model, X, name: str = "the data") -> None:
    """A one-line CpadgnError when X (N, D') has another width than the model's output D
    (a model Future, which has no output_dim here, refuses it when its chunks are computed)."""
    if hasattr(model, "output_dim") and X.shape[1] != model.output_dim:
        from .data import width_message
        raise CpadgnError(width_message(name, X.shape[1], model.output_dim))


def _shipped(model, client, device):
    """A Future of the model on every worker: ``model`` itself if it is one already."""
    distributed = _distributed()
    if isinstance(model, distributed.Future):
        return model
    client = client or distributed.get_client()
    return ship(client, model, device)


def posterior_table(model, X, *, client=None, moments: bool = True, device: str = "auto",
                    latent_dim: int | None = None):
    """(N, len(posterior_columns(S))) dask.array of per-row posterior summaries.

    model: a CPAModel (shipped to every worker now) or the Future ``ship`` returned.
    With moments=False the z_mean columns are not computed (left at 0)."""
    X = as_rows(X)
    check_columns(model, X)
    fut = _shipped(model, client, device)
    S = latent_dim if latent_dim is not None else _latent_dim(model)
    width = len(posterior_columns(S))
    return X.map_blocks(_posterior_block, fut, moments, chunks=(X.chunks[0], (width,)),
                        dtype=np.float64, meta=np.empty((0, 0)))


def _latent_dim(model):
    if hasattr(model, "latent_dim"):
        return model.latent_dim
    return model.result().latent_dim                 # a Future: small fetch of the model


def log_prob(model, X, *, client=None, device: str = "auto"):
    """Exact log p(x_o) per row as an (N,) dask.array (NaN for a row with nothing observed)."""
    table = posterior_table(model, X, client=client, moments=False, device=device)
    return table[:, 0]


def impute(model, X, *, draws: int | None = None, seed: int = 0, std: bool = False, mean_stderr: bool = False,
           client=None, device: str = "auto"):
    """Exact imputation of the NaN entries of X as dask.arrays, like ``CPAModel.impute``:
    the conditional mean (N, D), or K exact draws (K, N, D) with ``draws=K``.  With
    std=True and/or mean_stderr=True a tuple instead: the mean (or the draws), then the conditional std
    (N, D), then the means' QMC standard error (N, D; ``impute.ImputeResult.mean_stderr``:
    over the randomisation of the S >= 4 region integrals, 0 on observed entries and where
    the integrals are exact, S <= 3).  Observed entries are kept bit for bit."""
    table = impute_table(model, X, draws=draws, seed=seed, std=std, mean_stderr=mean_stderr, client=client,
                         device=device)
    return split_imputation(table, draws=draws, std=std, mean_stderr=mean_stderr)


def split_imputation(table, *, draws=None, std=False, mean_stderr=False):
    """The parts of an ``impute_table`` (dask or numpy): the mean (N, D), the tuple of
    the mean, std and mean_stderr (N, D) asked for, or the draws (K, N, D) (with std=True
    the tuple of the draws and the std (N, D))."""
    blocks = _impute_blocks(draws, std, mean_stderr)
    N, D = table.shape[0], (table.shape[1] - IMPUTE_LEAD) // blocks
    body = table[:, IMPUTE_LEAD:]
    if draws is not None:
        sample = body[:, :draws * D].reshape((N, draws, D)).transpose(1, 0, 2)
        return (sample, body[:, draws * D:]) if std else sample
    if blocks == 1:
        return body
    return tuple(body[:, k * D:(k + 1) * D] for k in range(blocks))


def _impute_blocks(draws, std, mean_stderr) -> int:
    """How many (N, D) blocks follow the lead columns of an impute table: the K draws or
    the mean, plus the std and the mean_stderr where asked for."""
    return (draws if draws is not None else 1) + bool(std) + bool(mean_stderr)


def impute_table(model, X, *, draws=None, seed=0, std=False, mean_stderr=False, client=None, device="auto"):
    """(N, 2 + W) dask.array: the certified error bound and the number of missing entries,
    then the mean (and std, and mean_stderr) or the draws (and std) (W = D to 3 D, or K D
    to (K + 1) D) per row;
    see ``impute``."""
    from .impute import check_draws
    check_draws(draws)
    if draws is not None and mean_stderr:
        raise CpadgnError("mean_stderr is the standard error of the imputed mean, and draws= imputes no "
                          "mean; pass one of draws= and mean_stderr=True")
    X = as_rows(X)
    check_columns(model, X)
    fut = _shipped(model, client, device)
    D = X.shape[1]
    width = IMPUTE_LEAD + D * _impute_blocks(draws, std, mean_stderr)
    return X.map_blocks(_impute_block, fut, draws, seed, std, mean_stderr, chunks=(X.chunks[0], (width,)),
                        dtype=np.float64, meta=np.empty((0, 0)))


# ============================================================ computing with progress
def compute_rows(client, table, progress=None, put=None) -> np.ndarray | None:
    """Compute a row-chunked 2-D dask.array, handing each chunk over as its future
    completes (``progress(done_rows, total_rows)`` after each): by default into one numpy
    array, returned in row order; with ``put(start, stop, block)`` to that callable
    (e.g. a file writer) and None returned.  A worker that dies is replaced and its
    chunks recomputed by Dask.  On any exception (Ctrl-C included) the outstanding
    futures are cancelled."""
    distributed = _distributed()
    blocks = table.to_delayed()
    if blocks.shape[1] != 1:
        table = table.rechunk({1: -1})
        blocks = table.to_delayed()
    starts = np.concatenate([[0], np.cumsum(table.chunks[0])]).astype(int)
    futures = client.compute(list(blocks[:, 0]))
    where = {f.key: i for i, f in enumerate(futures)}
    out = None
    if put is None:
        out = np.empty(table.shape, dtype=table.dtype)
        put = lambda start, stop, block: out.__setitem__(slice(start, stop), block)
    done = 0
    try:
        for fut in distributed.as_completed(futures):
            i = where[fut.key]
            put(starts[i], starts[i + 1], fut.result())
            done += starts[i + 1] - starts[i]
            if progress is not None:
                progress(int(done), int(table.shape[0]))
            fut.release()
    except BaseException:
        client.cancel(futures)
        raise
    return out


def score(client, model, X, *, moments: bool = True, device: str = "auto", progress=None):
    """Posterior summaries of every row of X (a dask.array, a RowSource's ``read`` or an
    in-memory array) computed on the cluster: a namespace with the fields of
    ``posterior_columns`` as numpy arrays (z_mean (N, S)), in row order."""
    table = compute_rows(client, posterior_table(model, X, client=client, moments=moments,
                                                 device=device), progress)
    return posterior_fields(table, model.latent_dim)


def posterior_fields(table: np.ndarray, S: int):
    """Rows of a ``posterior_table`` (n, 7 + S) as a namespace with the fields of
    ``posterior_columns`` (n,) (n_observed, top_region and n_pairs as int64) and z_mean (n, S)."""
    ints = {"n_observed", "top_region", "n_pairs"}
    cols = {name: (table[:, j].astype(np.int64) if name in ints else table[:, j])
            for j, name in enumerate(posterior_columns(S)[:7])}
    return SimpleNamespace(**cols, z_mean=table[:, 7:7 + S])


def scorer(client, *, device: str = "auto", chunk_rows: int = DEFAULT_CHUNK_ROWS, progress=None):
    """A ``posterior(model, X)`` callable for ``cpadgn.compare``: each model is
    shipped to the workers once (on its first use) and X (in memory) is scored in row
    chunks on the cluster; returns log_likelihood, error_bound and stderr (N,)."""
    shipped = {}

    def posterior(model, X):
        if id(model) not in shipped:      # the model is kept too, so its id stays its own
            shipped[id(model)] = (model, ship(client, model, device))
        table = posterior_table(shipped[id(model)][1], as_rows(X, chunk_rows), client=client,
                                moments=False, latent_dim=model.latent_dim)
        table = compute_rows(client, table, progress)
        return SimpleNamespace(log_likelihood=table[:, 0], error_bound=table[:, 1], stderr=table[:, 2])

    return posterior


# ============================================================== streamed output
@contextlib.contextmanager
def _streamed(out, open_arrays):
    """Yield (arrays, writing) for writing ``out`` chunk by chunk: ``open_arrays(stack,
    atomic_path)`` opens the arrays on temporaries that are renamed over their targets
    when the block ends cleanly (and removed on any exception, Ctrl-C included);
    ``writing`` is a context manager that reports an OSError in one line, and HDF5's
    RuntimeError for a full disk (from creating the file, before any data is written)."""
    from .data import atomic_path, is_no_space, write_error

    @contextlib.contextmanager
    def writing():
        try:
            yield
        except OSError as e:
            raise write_error(out, e) from None
        except RuntimeError as e:
            if not is_no_space(e):
                raise
            raise write_error(out, e) from None

    with contextlib.ExitStack() as stack:
        with writing():
            arrays = open_arrays(stack, atomic_path)
        yield arrays, writing
        with writing():
            for a in arrays:
                if isinstance(a, np.memmap):
                    a.flush()


@contextlib.contextmanager
def imputation_writer(out, shape: tuple, columns, *, draws: bool, std_path=None, std: bool = False,
                      mean_stderr: bool = False):
    """Write an imputation to .npy or .h5 chunk by chunk, in row order whatever the order
    the chunks come in, so that the client never holds it whole.  Yields
    ``put(start, stop, values, std_values, stderr_values)`` for rows start..stop-1 (values
    (n, D), or (K, n, D) for draws).  The files are those ``cpadgn impute`` writes without
    --dask (.npy: the array, and OUT.std.npy; .h5: dataset 'data', 'std', and with
    mean_stderr=True 'mean_stderr' (.h5 only), with attribute 'columns'), written to
    temporaries renamed over the targets only when complete."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".npy", ".h5", ".hdf5"):
        raise CpadgnError(f"cannot stream {out}: use .npy or .h5")
    if mean_stderr and suffix == ".npy":
        raise CpadgnError(f"cannot stream the means' standard error to {out}: use .h5")
    opener = lambda stack, atomic_path: _open_imputation(stack, atomic_path, out, suffix, shape, columns,
                                                         draws, std_path, std, mean_stderr)
    with _streamed(out, opener) as ((data, sd, se), writing):
        def put(start, stop, values, std_values=None, stderr_values=None):
            with writing():
                if draws:
                    data[:, start:stop] = values
                else:
                    data[start:stop] = values
                if sd is not None:
                    sd[start:stop] = std_values
                if se is not None:
                    se[start:stop] = stderr_values

        yield put


def _open_imputation(stack, atomic_path, out, suffix, shape, columns, draws, std_path, std, mean_stderr):
    """The output arrays of ``imputation_writer`` (memory maps or HDF5 datasets) on
    temporaries that ``stack`` renames over their targets when it closes cleanly, their
    disk space reserved before any row is computed."""
    tmp = stack.enter_context(atomic_path(out))
    if suffix == ".npy":
        data = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float64, shape=shape)
        reserve_disk(tmp)
        sd = None
        if std:
            std_tmp = stack.enter_context(atomic_path(std_path))
            sd = np.lib.format.open_memmap(std_tmp, mode="w+", dtype=np.float64, shape=shape[-2:])
            reserve_disk(std_tmp)
        return data, sd, None
    rows = max(1, min(shape[-2], int(4e6 // (8 * shape[-1]))))            # ~4 MB HDF5 chunks
    chunks = (1, rows, shape[-1]) if draws else (rows, shape[-1])
    names = [str(c) for c in columns]

    def create(f):
        early_dataset(f, "data", shape, "f8", chunks).attrs["columns"] = names
        if std:
            early_dataset(f, "std", shape[-2:], "f8", chunks[-2:]).attrs["columns"] = names
        if mean_stderr:
            early_dataset(f, "mean_stderr", shape[-2:], "f8", chunks[-2:]).attrs["columns"] = names
    f = reserved_hdf5(stack, tmp, create)
    return f["data"], f["std"] if std else None, f["mean_stderr"] if mean_stderr else None


HDF5_CHUNK_BYTES = 2 ** 19     # 512 KB chunks: under h5py's 1 MB chunk cache per dataset
HDF5_SLACK_BYTES = 2 ** 20     # room for what HDF5 writes at the end (attributes, deletions)


def reserve_disk(path, extra: int = 0) -> None:
    """Give the file at ``path`` real disk blocks for its length plus ``extra`` bytes, so
    that a full disk fails here, before any work, and never in a later write: a memory
    map would die of SIGBUS, and HDF5 does not recover from a failed write (its clean-up
    crashed the process).  Without posix_fallocate (macOS, Windows) every block is
    rewritten (holes read as zeros)."""
    size = os.path.getsize(path) + extra
    with open(path, "r+b") as f:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(f.fileno(), 0, size)
            return
        block = 2 ** 20
        for offset in range(0, size, block):
            f.seek(offset)
            data = f.read(block).ljust(min(block, size - offset), b"\0")
            f.seek(offset)
            f.write(data)


def early_dataset(f, name: str, shape: tuple, dtype, chunks: tuple):
    """A chunked dataset of ``f`` whose file space is allocated when it is created (not
    when a chunk is first written) and never filled."""
    import h5py
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, track_times=False, dcpl=dcpl)


def reserved_hdf5(stack, path, create):
    """An h5py.File open on ``path`` for writing (closed by ``stack``) once ``create(f)``
    has made its datasets there with ``early_dataset`` and ``reserve_disk`` has reserved
    the blocks of the whole file: the data written later cannot meet a full disk."""
    import h5py
    with h5py.File(path, "w") as f:
        create(f)
    reserve_disk(path, HDF5_SLACK_BYTES)
    return stack.enter_context(h5py.File(path, "r+"))


class StreamedTable:
    """The named 1-D columns of a table being written to an .h5 file (see ``table_writer``)."""

    def __init__(self, f, dtypes: dict, writing=contextlib.nullcontext):
        self.file, self.dtypes, self.written, self.writing = f, dict(dtypes), set(), writing

    @staticmethod
    def create(f, n_rows: int, dtypes: dict) -> None:
        """The (n_rows,) datasets of the columns {name: dtype}, their space allocated."""
        for name, dtype in dtypes.items():
            rows = max(1, min(n_rows, HDF5_CHUNK_BYTES // np.dtype(dtype).itemsize))
            early_dataset(f, name, (n_rows,), dtype, (rows,))

    def put(self, start: int, stop: int, columns: dict) -> None:
        """Rows start..stop-1 of some of the columns ({name: (stop - start,) values})."""
        with self.writing():
            for name, values in columns.items():
                self.file[name][start:stop] = values
                self.written.add(name)

    def column(self, name: str) -> np.ndarray:
        """One whole column, read back from the file (N,)."""
        with self.writing():
            return self.file[name][()]

    def finish(self) -> None:
        """Drop the columns never written (their reserved space stays in the file, unused)
        and record the column order."""
        with self.writing():
            for name in self.dtypes:
                if name not in self.written:
                    del self.file[name]
            self.file.attrs["columns"] = [n for n in self.dtypes if n in self.written]


@contextlib.contextmanager
def table_writer(out, n_rows: int, dtypes: dict):
    """Write a table of named 1-D columns to .h5 chunk by chunk, in row order whatever the
    order the chunks come in, so that the client never holds it whole: the file
    ``data.write_table`` writes (one dataset per column, here chunked, and the root
    attribute 'columns' with their order), on a temporary renamed over ``out`` only when
    complete.  dtypes: {name: dtype} in column order; a column never ``put`` is left out.
    Yields a ``StreamedTable`` (its put and column report a write error in one line)."""
    out = Path(out)
    if out.suffix.lower() not in (".h5", ".hdf5"):
        raise CpadgnError(f"cannot stream {out}: use .h5")

    def opener(stack, atomic_path):
        tmp = stack.enter_context(atomic_path(out))
        return (StreamedTable(reserved_hdf5(stack, tmp, lambda f: StreamedTable.create(f, n_rows, dtypes)),
                              dtypes),)

    with _streamed(out, opener) as ((table,), writing):
        table.writing = writing
        yield table
        table.finish()
