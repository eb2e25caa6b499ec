"""The ``cpadgn`` command line: thin click commands over the cpadgn library."""
from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import signal
import sys
import threading
import time

EXIT_INTERRUPTED = 130   # Ctrl-C (128 + SIGINT)
EXIT_TERMINATED = 143    # SIGTERM (128 + 15): a scheduler stopping the task, `timeout`, `kill PID`
_sigint_seen = False     # a Ctrl-C came (``_on_sigint``)
_terminated = False      # ... or a SIGTERM (``_on_sigterm``), handled the same way
_in_command = False      # a command's own code runs (``user_errors``)
_program = False         # ``run``: the process ends with the command, its handlers kept to the end


def _on_sigint(signum, frame):
    """Ctrl-C.  Before a command's own code runs (Python importing the libraries, click
    parsing the options, ``user_errors`` importing torch) nothing is written and no
    worker started: exit at once with "Error: interrupted" (a KeyboardInterrupt there
    prints a traceback, click's blank line, or inside torch's import an abort).  Within a
    command, raise KeyboardInterrupt, so that the command removes its temporaries and
    stops its workers (``user_errors`` reports it).  It is also remembered: raised inside
    a callback of an extension (h5py writing a Dask result) it can be swallowed, and the
    command ran on; every progress update raises it again (``Progressbar``)."""
    global _sigint_seen
    _sigint_seen = True
    if not _in_command:
        try:
            sys.stdout.flush()          # after a command (``run``): what it printed is complete
        except (OSError, ValueError, RuntimeError):
            pass
        message, code = interruption()
        os.write(2, f"Error: {message}\n".encode())
        os._exit(code)
    raise KeyboardInterrupt


def _on_sigterm(signum, frame):
    """SIGTERM, what Airflow, Kubernetes, systemd or `timeout` send to stop a task: handled
    as Ctrl-C (temporaries removed, workers stopped), reported as "Error: terminated" with
    exit 143.  Python's default ended the process at once: exit -15, no message, and a
    --dask output's pre-allocated temporary left behind."""
    global _terminated
    _terminated = True
    _on_sigint(signum, frame)


def interruption() -> tuple[str, int]:
    """The message and exit code of a stop by Ctrl-C (130) or SIGTERM (143)."""
    return ("terminated", EXIT_TERMINATED) if _terminated else ("interrupted", EXIT_INTERRUPTED)


def _install_sigint_handler():
    """``_on_sigint`` for SIGINT (the main thread only can); returns the previous handler."""
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGINT, _on_sigint)
    return None


# restored at the end of this module; not installed where Ctrl-C is ignored: a local Dask
# worker, started ignoring it, imports this module as the parent's __main__, and a Ctrl-C
# meanwhile ended it ("Nanny failed to start": exit 70 instead of 130)
_sigint_before_import = None if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else _install_sigint_handler()

import click  # noqa: E402
from cli.lazy import np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,  # noqa: E402
                           TimeElapsedColumn)
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402

from cpadgn.errors import CpadgnError  # noqa: E402

console = Console(stderr=True)


class StdoutConsole(Console):
    """rich's Console on stdout, for results (tables).  A closed pipe (the program reading
    them has exited) is a BrokenPipeError that ``user_errors`` reports in one line; rich's
    own handling exited 1 without a word."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError(32, "broken pipe")


BROKEN_PIPE = ("could not print the results: stdout is a pipe whose reader has exited (broken pipe); "
               "files the command wrote are complete; keep the reader running or redirect stdout to a file")


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has exited (poll flags an error on it), so that a
    BrokenPipeError from elsewhere (a worker's connection) is not blamed on stdout; True
    where poll cannot tell (no select.poll)."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):
        return True


def _stdout_to_devnull() -> None:
    """After a broken pipe: later writes to stdout (the interpreter's flush at exit) go
    nowhere instead of failing again ("Exception ignored ... BrokenPipeError")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


EXIT_USER_ERROR = 1      # bad input, an output that cannot be written
EXIT_INTERNAL = 70       # a bug (EX_SOFTWARE)

EXIT_CODES_HELP = """\b
Exit codes:
  0    success
  1    user error, seen once files are read: bad data, a model that does not fit
       the data, an output that cannot be written
  2    usage error, seen from the command line alone: an unknown option, a missing
       argument or file, an option's value malformed or out of range, options
       that conflict or need each other
  70   internal error (a bug): rerun with --debug and please report it
  130  interrupted (Ctrl-C); no output and no temporary file is left behind
  143  terminated (SIGTERM, as a scheduler or `timeout` sends), as for Ctrl-C
Every error is one line on stderr starting with "Error:"."""


def fail(message: str, code: int):
    """Print one line "Error: message" on stderr and exit with ``code``.  Characters that
    are not printable (a NUL or an ANSI escape quoted from a user's file) are written as
    Python escapes, so that a message can neither hide text nor drive the terminal."""
    text = " ".join(str(message).splitlines())
    click.echo("Error: " + "".join(c if c.isprintable() else repr(c)[1:-1] for c in text), err=True)
    sys.exit(code)


def usage_error(message: str) -> click.UsageError:
    """The error of a command line wrong by itself, decidable before any file is read (an
    option's value malformed or out of range, options that conflict or need each other):
    raised in a command, it exits 2 with the one line of click's own usage errors, "Error:
    message; see 'cpadgn COMMAND --help'" (``Commands.main``).  What shows only once files
    are read (the data, the model, an output path) is a CpadgnError: exit 1."""
    return click.UsageError(message, click.get_current_context(silent=True))


@contextlib.contextmanager
def option_values():
    """Within it, a CpadgnError is a ``usage_error``: for the library's parsers of option
    values (--hidden, --activation, --baseline, --dask, an output's extension), which
    raise CpadgnError for Python callers and look at nothing but the value."""
    try:
        yield
    except CpadgnError as e:
        raise usage_error(str(e)) from None


def user_errors(fn):
    """Map every failure of a command to one line on stderr and its exit code (never a
    traceback): CpadgnError 1, Ctrl-C 130 (SIGTERM 143), a bug 70 (--debug shows its traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _in_command
        try:
            # A KeyboardInterrupt inside torch's import aborts the process (SIGABRT:
            # pybind11 cannot pass it through C++ code) and one inside numpy's leaves it
            # half-imported; every command needs both, so they are imported while Ctrl-C
            # still ends the process at once (``_on_sigint``)
            import numpy  # noqa: F401
            import torch  # noqa: F401
            _in_command = True
            return fn(*args, **kwargs)
        except CpadgnError as e:
            fail(str(e), EXIT_USER_ERROR)
        except KeyboardInterrupt:
            fail(*interruption())
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except MemoryError:
            fail(OUT_OF_MEMORY, EXIT_USER_ERROR)
        except Exception as e:  # a bug, not bad input: still one line, distinct exit code
            if isinstance(e, BrokenPipeError) and _stdout_reader_gone():
                _stdout_to_devnull()
                fail(BROKEN_PIPE, EXIT_USER_ERROR)
            if kwargs.get("debug") or "--debug" in sys.argv:
                raise
            if is_torch_out_of_memory(e):
                fail(OUT_OF_MEMORY, EXIT_USER_ERROR)
            from cpadgn.data import is_no_space
            if is_no_space(e):          # stdout redirected to a full disk: files' writes say so themselves
                _stdout_to_devnull()
                fail("could not write the results: no space left on device; free space or redirect stdout "
                     "elsewhere", EXIT_USER_ERROR)
            first = (str(e).strip().splitlines() or [""])[0]
            fail(f"internal error ({type(e).__name__}: {first}); rerun with --debug for the "
                 "traceback and please report it", EXIT_INTERNAL)
    return wrapper


OUT_OF_MEMORY = "out of memory; lower --memory-budget, use fewer rows or a generator with narrower layers"


def is_torch_out_of_memory(e: Exception) -> bool:
    """torch's failed allocations: torch.OutOfMemoryError (CUDA), and on the CPU a plain
    RuntimeError from its allocator (not a MemoryError)."""
    return type(e).__name__ == "OutOfMemoryError" or (
        isinstance(e, RuntimeError) and "can't allocate memory" in str(e))


def _remember_sigint():
    """Ctrl-C goes to ``_on_sigint`` (SIGTERM to ``_on_sigterm``), from the command line's
    start; a KeyboardInterrupt swallowed by an extension is not reported as "Exception
    ignored".  Returns a function that puts the handlers and the hook back as they were."""
    global _sigint_seen, _in_command, _terminated
    _sigint_seen = _in_command = _terminated = False

    def unraisable(info):           # such a swallowed Ctrl-C is reported as "Exception ignored"
        if not isinstance(info.exc_value, KeyboardInterrupt):
            sys.__unraisablehook__(info)

    hook, sigterm = sys.unraisablehook, signal.getsignal(signal.SIGTERM)
    sigint = _install_sigint_handler()
    if sigint is None:
        return lambda: None
    sys.unraisablehook = unraisable
    if sigterm is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)

    def restore():
        sys.unraisablehook = hook
        for signum, handler in ((signal.SIGINT, sigint), (signal.SIGTERM, sigterm)):
            if handler is not None:             # None: set outside Python, cannot be put back
                signal.signal(signum, handler)
    return restore


def _forget_caught_interrupt():
    """CPython (3.11 and later) marks a KeyboardInterrupt that leaves code run by exec or
    eval of a string as unhandled, even when it is caught further up (a Ctrl-C during an
    import that generates code: numpy.f2py's, a dataclass's); under ``python -m`` the
    interpreter then ends by killing itself with SIGINT instead of the exit code
    (exit -2 after "Error: interrupted").  Each exec of a string clears that mark."""
    exec("", {})


class Commands(click.Group):
    """click's group with one-line errors outside the commands too: a usage error is one
    line (exit 2), Ctrl-C anywhere is exit 130."""

    def main(self, *args, standalone_mode=True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        restore = _remember_sigint()
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.Abort:                      # click's form of KeyboardInterrupt / EOF
            fail(*interruption())
        except click.UsageError as e:            # one line, not click's usage block
            where = f"; see '{e.ctx.command_path} --help'" if e.ctx is not None else ""
            fail(e.format_message().rstrip(".") + where, e.exit_code)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        finally:
            _forget_caught_interrupt()
            if not _program:        # an in-process caller (a notebook, CliRunner) gets its Ctrl-C back
                restore()
        sys.exit(rv if isinstance(rv, int) else 0)


def _clock(seconds: float) -> str:
    """h:mm:ss of a duration."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _time_left(elapsed, done, total) -> str:
    """"~0:01:10 left" at the mean rate since the start, or "" before the first step.  Rich's
    own estimate takes the rate over the last updates, and the work arrives in a few large
    chunks: after one chunk of rows it said a second was left of a minute."""
    if not total or not done or done >= total or elapsed is None:
        return ""
    return f"~{_clock(elapsed * (total - done) / done)} left"


class TimeLeftColumn(ProgressColumn):
    """``_time_left`` as a progress bar's column."""

    def render(self, task):
        return Text(_time_left(task.elapsed, task.completed, task.total), style="progress.remaining")


PLAIN_PROGRESS_SECONDS = 30.0    # off a terminal: one progress line this often


class Progressbar:
    """A rich progress bar usable as cpadgn's progress(done, total, message) callback.  Off a
    terminal (a scheduler's log, `2> log`), where a bar cannot redraw, one plain line on
    stderr every PLAIN_PROGRESS_SECONDS instead, e.g.
    "scoring rows: 2,000/10,000 (20%), 0:00:12 elapsed, ~0:00:48 left"."""

    def __init__(self, label: str, quiet: bool):
        self.label, self.quiet = label, quiet

    def __enter__(self):
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeLeftColumn(),
                            console=console,
                            transient=True, disable=self.quiet or not console.is_terminal)
        self.bar.__enter__()
        self.task = self.bar.add_task(self.label, total=None, note="")
        self.plain = not self.quiet and not console.is_terminal
        self.start = self.last_line = time.monotonic()
        return self

    def __call__(self, done, total=None, message=""):
        if _sigint_seen:            # a Ctrl-C that code in an extension (h5py) swallowed
            raise KeyboardInterrupt
        self.bar.update(self.task, completed=done, total=total, note=escape(str(message)))
        now = time.monotonic()
        if self.plain and now - self.last_line >= PLAIN_PROGRESS_SECONDS:
            self.last_line = now
            count = f"{done:,}" if total is None else f"{done:,}/{total:,} ({100 * done / max(total, 1):.0f}%)"
            parts = [count, f"{_clock(now - self.start)} elapsed", _time_left(now - self.start, done, total), message]
            console.print(Text(f"{self.label}: " + ", ".join(p for p in parts if p)), soft_wrap=True)

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)


class FiniteRange(click.FloatRange):
    """click's FloatRange that also refuses nan and inf: nan fails no comparison, so
    FloatRange lets it through (e.g. --contamination nan reached np.quantile)."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not np.isfinite(rv):
            self.fail(f"{rv} is not a finite number in the range {self._describe_range()}", param, ctx)
        return rv


class Bytes(click.ParamType):
    """A positive number of bytes: 2e9, or with a unit, 2GB, 500MB, 1.5GiB (k, M, G, T: powers
    of 1000; Ki, Mi, Gi, Ti: of 1024; the B optional, any case)."""
    name = "bytes"
    UNITS = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12,
             "ki": 2.0 ** 10, "mi": 2.0 ** 20, "gi": 2.0 ** 30, "ti": 2.0 ** 40}

    def convert(self, value, param, ctx):
        if isinstance(value, (int, float)):
            number = float(value)
        else:
            text = str(value).strip().lower()
            text = text[:-1] if text.endswith("b") else text
            unit = next((u for u in sorted(self.UNITS, key=len, reverse=True) if u and text.endswith(u)), "")
            try:
                number = float(text[:len(text) - len(unit)]) * self.UNITS[unit]
            except ValueError:
                self.fail(f"{value!r} is not a number of bytes; give e.g. 2e9, 2GB or 512MiB", param, ctx)
        if not (np.isfinite(number) and number > 0):
            self.fail(f"expected a positive number of bytes, got {value}", param, ctx)
        return number


def parse_noise(value):
    if value is None:
        return None
    if value.strip().lower() == "auto":
        return "auto"
    try:
        v = float(value)
    except ValueError:
        raise click.BadParameter("expected a positive number or 'auto'") from None
    if not np.isfinite(v) or v <= 0:
        raise click.BadParameter("expected a positive number or 'auto'")
    return v


def positive(unit: str):
    """A click callback that accepts a positive finite number of ``unit`` (or no value)."""
    def check(ctx, param, value):
        if value is not None and not (np.isfinite(value) and value > 0):
            raise click.BadParameter(f"expected a positive number of {unit}, got {value:g}")
        return value
    return check


def resolve_device(name: str):
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise CpadgnError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return name


def memory_budget_option(fn):
    """--memory-budget: the working memory of the partition's enumeration and of a batch of rows."""
    return click.option("--memory-budget", type=Bytes(), default=2e9, show_default=True, metavar="BYTES",
                        help="Working memory of the partition's enumeration and of one batch of rows, "
                             "e.g. 2e9, 2GB or 512MiB (smaller: smaller batches, the same results up to "
                             "rounding; see README, Precision).")(fn)


def model_options(fn):
    """Options shared by every command that loads a generator."""
    for decorator in reversed([
        click.option("--noise-std", callback=lambda c, p, v: parse_noise(v), metavar="X|auto",
                     help="Observation noise std (overrides the model file); 'auto' fits it "
                          "by maximum exact likelihood on the data."),
        click.option("--cache", "cache", type=click.Path(dir_okay=False), default=None,
                     help="Partition cache file [default: MODEL.partition.h5].  A cache of another "
                          "generator there is recomputed and replaced (with a note on stderr); any "
                          "other file (data, a model) is refused and left untouched."),
        click.option("--max-regions", type=click.IntRange(min=1), default=None,
                     help="Stop with an error if the partition has more regions than this."),
        click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                     show_default=True, help="Where the batched linear algebra runs."),
        memory_budget_option,
        click.option("--trust-pickle", is_flag=True,
                     help="Allow loading a pickled torch module (it can execute code)."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bars or messages (the results are still printed)."),
        click.option("--debug", is_flag=True, hidden=True),
    ]):
        fn = decorator(fn)
    return fn


def precision_options(fn):
    """--rtol, the certified pruning tolerance (CPAModel.rtol), and --stderr-target, what the
    S >= 4 Monte Carlo likelihoods aim at (CPAModel.stderr_target)."""
    fn = click.option("--rtol", type=FiniteRange(min=0, min_open=True, max=1e-2), default=None, metavar="R",
                      help="Regions are skipped only while their certified bounds sum to at most R "
                           "p(x), so each log-likelihood is exact to log(1 + R) nats "
                           "(log_likelihood_error_bound: the bound reached) [default: 1e-10].  A looser R "
                           "is faster where posteriors spread over many regions (S = 3 random "
                           "32-32: 1e-4 takes about 0.65x the time of 1e-9, 1e-2 about 0.4x).")(fn)
    return click.option("--stderr-target", type=float, default=None, metavar="NATS", callback=positive("nats"),
                        help="S >= 4 only (S <= 3 is exact): the standard error of each row's "
                             "log-likelihood that the randomised QMC aims at [default: 1e-4]; "
                             "a 10x smaller target costs up to 10x more points, and 1e-3 takes about "
                             "half the time of 1e-4.")(fn)


def dask_options(fn):
    """--dask and --chunk-rows: run a command's rows on a Dask cluster (cpadgn.dask)."""
    fn = click.option("--chunk-rows", type=click.IntRange(min=1), default=None, metavar="N",
                      help="With --dask: rows per task [default: whole HDF5 chunks adding up to "
                           "about 2048 rows, else 2048].")(fn)
    return click.option("--dask", "dask_address", default=None, metavar="ADDRESS|local:N",
                        help="Work through the rows on a Dask cluster: a scheduler address "
                             "(tcp://host:8786) or local:N (N worker processes on this machine). "
                             "DATA must be .npy or .h5, readable by the workers at the same path; "
                             "needs pip install 'cpadgn[dask]'.")(fn)


def check_dask_options(address, chunk_rows=None, **options) -> None:
    """Usage errors (``usage_error``): --chunk-rows without --dask, a malformed --dask value,
    and options that need every row in one process ({--name: given}) with --dask."""
    if address is None:
        if chunk_rows is not None:
            raise usage_error("--chunk-rows sets the rows per Dask task; add --dask ADDRESS or local:N")
        return
    from cpadgn.dask import check_address
    with option_values():
        check_address(address)
    given = [name for name, on in options.items() if on]
    if given:
        raise usage_error(f"{', '.join(given)} cannot be combined with --dask (it needs all rows in "
                          "one process); run without --dask, or drop it")


def check_output_suffixes(out=None, picture=None) -> None:
    """Usage errors of output names with an extension that cannot be written: ``out`` (a
    table: .csv, .npy, .h5) and ``picture`` (.png, .pdf, .svg); None: not given."""
    from cpadgn.data import check_output_suffix
    from cpadgn.plot import IMAGE_SUFFIXES
    with option_values():
        if out is not None:
            check_output_suffix(out)
        if picture is not None:
            check_output_suffix(picture, suffixes=IMAGE_SUFFIXES)


def say_for(quiet: bool):
    """The progress messages on stderr (none when quiet): each one dim line, its text as it
    is (a path's brackets are not rich markup) and not wrapped (off a terminal rich wrapped
    them at 80 columns, a log's one message over several lines)."""
    def say(message):
        console.print(Text(" ".join(str(message).splitlines()), style="dim"), soft_wrap=True)
    return (lambda m: None) if quiet else say


def dataset_keys(dataset, *paths) -> list:
    """--dataset for each of paths (None: not given): the key inside the .h5 files among
    them, None for a .csv or .npy file beside one (with no .h5 file each gets it, and
    ``read_data`` refuses it)."""
    h5 = [p for p in paths if p is not None and str(p).lower().endswith((".h5", ".hdf5"))]
    return [dataset if p in h5 or not h5 else None for p in paths]


def command_inputs(model_path, data_path, cache) -> dict:
    """The files a model command reads, by role, which no output may replace."""
    from cpadgn.cache import cache_path_for
    return {"the DATA file": data_path, "the model file": model_path,
            "the partition cache": cache if cache else cache_path_for(model_path)}


def cache_status(status) -> dict:
    """JSON fields of a partition status: cache_status, and cache_not_written_reason when
    the cache could not be written ("not_written (reason)")."""
    status = str(status)
    if status.startswith("not_written"):
        return {"cache_status": "not_written",
                "cache_not_written_reason": status[len("not_written"):].strip(" ()")}
    return {"cache_status": status}


def check_cache_path(model_path, cache) -> None:
    """Refuse (one-line CpadgnError) a file at the partition cache path (``--cache``, else
    MODEL.partition.h5) that is not a cpadgn partition cache, before any work: such a
    file (the user's data, a model, a CSV) is never replaced.  A cache of another
    generator, or a damaged one, passes: it is recomputed and replaced, with a notice.
    A ``--cache`` that does not exist yet (or a symbolic link to no file) must be
    writable: it will be.  The default path beside the model may be read-only: the
    command then runs without a cache."""
    from pathlib import Path
    from cpadgn.cache import NotACacheError, cache_path_for, read_identity
    from cpadgn.data import check_directory_writable
    path = Path(cache) if cache else cache_path_for(model_path)
    if not path.exists():
        if cache:
            link = f" (a symbolic link to {os.readlink(path)})" if path.is_symlink() else ""
            check_directory_writable(os.path.realpath(path) if link else path, name=f"--cache {cache}{link}")
        return
    try:
        read_identity(path)
    except NotACacheError as e:
        why = str(e).replace(str(path), "it", 1)
        if cache:
            raise CpadgnError(f"--cache {cache} is not a cpadgn partition cache ({why}); it is left "
                              "untouched: name another path") from None
        raise CpadgnError(f"the partition cache path {path} (the default beside the model) holds a "
                          f"file that is not a cpadgn partition cache ({why}); it is left untouched: "
                          "move it away or pass --cache PATH") from None
    except CpadgnError:
        pass                    # a damaged cache: recomputed and replaced with a notice


def notice_for(quiet: bool):
    """The one-line notices that an output replaces something (a cache of another
    generator): on stderr unless --quiet, also under --json (whose stdout stays JSON)."""
    def notice(message: str):
        text = " ".join(message.split())
        click.echo(f"Note: {text[:1].lower()}{text[1:]}", err=True)
    return (lambda m: None) if quiet else notice


def rounding_errors(model, X) -> np.ndarray:
    """``CPAModel.rounding_error`` of the rows X (N, D): a numpy array, or a dask array
    (computed block by block on the current cluster, in blocks of up to 1e8 bytes whatever
    --chunk-rows says: the estimate is O(D) a row, so tiny blocks cost only scheduling;
    only the (N,) result comes back)."""
    if isinstance(X, np.ndarray):
        return model.rounding_error(X)
    from functools import partial

    from cpadgn.numerics import rounding_error_estimate
    estimate = partial(rounding_error_estimate, offset=model.net.biases[-1], noise_std=model.noise_std,
                       width=model.net.weights[-1].shape[1])
    rows = max(X.chunks[0][0], int(1e8 // (8 * X.shape[1])))
    return X.rechunk({0: rows}).map_blocks(estimate, drop_axis=1, dtype=np.float64).compute()


def note_stderr_target(stats, quiet: bool) -> None:
    """One line when rows of a QMC likelihood (S >= 4; stats a ``LoglikStats``) ended above
    --stderr-target: the summary's count alone went unnoticed, for a target out of reach."""
    if stats.above_target:
        notice_for(quiet)(f"{stats.above_target} of {stats.rows} row(s) ended with a QMC standard error above "
                          f"--stderr-target {stats.stderr_target:g} (largest {stats.max_stderr:.2g} nats): the "
                          "target is aimed at, not guaranteed; each row's log_likelihood_stderr is in OUT "
                          "(README: Limits)")


def warn_rounding(err: np.ndarray, quiet: bool, name: str = "") -> int:
    """The number of rows whose log p rounding may move by more than ROUNDING_WARN_NATS
    (err (N,) from ``rounding_errors``), with a one-line warning on stderr about them
    unless --quiet (also under --json, whose stdout stays JSON)."""
    from cpadgn.numerics import ROUNDING_WARN_NATS
    bad = int((err > ROUNDING_WARN_NATS).sum())
    if bad and not quiet:
        click.echo(f"Warning: {bad} row(s) lie so far from {name or 'the model'} in noise units that "
                   f"rounding may move their log p by up to ~{err.max():.1g} nats; their values are "
                   "unreliable (README: Precision). Use a larger --noise-std.", err=True)
    return bad


def load_model(model_path, *, cache, noise_std, device, trust_pickle, max_regions, quiet, data=None,
               data_name="DATA", need_noise=True, memory_budget=2e9, rtol=None, stderr_target=None, check=None,
               notices=None, first_rows=None):
    """Load a generator, check it against the data (data_name: its file, for the messages;
    and by ``check(model)``, which raises
    CpadgnError), get its partition (cache or compute), settle the noise std.  Bad input
    fails here, before any long computation (the commands call ``check_cache_path``
    earlier still, before they read DATA).  notices: print the notice that a cache of
    another generator is replaced (default: not quiet; pass ``not --quiet`` under --json).
    first_rows: where data is None (--dask, DATA stays on disk), a callable returning rows
    of DATA for the check of its scale (``scale_mismatch``)."""
    from cpadgn.data import check_rows
    from cpadgn.model import load
    say = say_for(quiet)
    model = load(model_path, noise_std=None if noise_std == "auto" else noise_std, cache=cache,
                 trust_pickle=trust_pickle, device=resolve_device(device))
    model.memory_budget = memory_budget
    set_precision(model, rtol, stderr_target, say)
    if data is not None:
        check_rows(data, model.output_dim, name=data_name)
    if check is not None:
        check(model)
    if noise_std == "auto" and data is None:
        raise CpadgnError("--noise-std auto fits the noise std by maximum likelihood on data rows, and none "
                          "are given: add --data DATA, or give the noise std as --noise-std X")
    if need_noise and noise_std is None and model.noise_std is None:
        raise CpadgnError(f"{model.no_noise_reason(model_path)}; pass --noise-std X, or --noise-std auto "
                          "to fit it by maximum likelihood on the data")
    with Progressbar("partition", quiet) as bar:
        model.partition(max_regions=max_regions, progress=bar, log=say,
                        notice=notice_for(quiet if notices is None else not notices))
    if noise_std == "auto":
        model = fit_noise_std(model, data, say, quiet)
    rows = data if data is not None or first_rows is None else first_rows()
    warning = None if rows is None or model.noise_std is None else \
        scale_mismatch(model, rows, name=data_name, names=csv_column_names(data_name, model.output_dim))
    if warning and (not quiet if notices is None else notices):
        click.echo(f"Warning: {warning}", err=True)
    return model


def csv_column_names(path, D: int) -> list | None:
    """DATA's column names, stripped (a blank one ''), when it is a CSV file with a header
    of D cells, else None."""
    from cpadgn.data import csv_header_cells
    names = csv_header_cells(path) if str(path).lower().endswith(".csv") else None
    return [c.strip() for c in names] if names and len(names) == D else None


def scale_mismatch(model, X, limit: float = 10.0, *, name: str = "DATA", names=None) -> str | None:
    """The warning for DATA on another scale than the model's, or None: per column, the
    median over the rows of |x_d - m_d| / s_d (m_d, s_d the model's marginal mean and std,
    from 2,000 seeded draws); the largest, when above limit.  Test rows left unstandardised
    scored far below the model without a word: raw load_breast_cancer under a model of
    z-scores (2,100 stds, -1e7 nats per row), raw load_digits pixels (0..16) under the
    sample digits generator of pixels / 16 (12.9; its test rows times 16: 13.9).  Rows of the model's own scale have
    medians of a few stds, anomalies included: the digits test rows 0.37 (EM) and 1.9
    (VAE), the wave rows 0.94, malignant rows under a benign-only model 2.8.  name: DATA's
    file; names: its column names (``csv_column_names``), for the message.  The medians go in
    blocks of columns whose copies (3 at once) fit ``model.memory_budget``."""
    import warnings
    from cpadgn.numerics import MIN_CHUNK_BUDGET
    X = np.asarray(X, dtype=np.float64)
    X = X[::max(1, X.shape[0] // 10000)]                         # 10,000 rows at most: a median
    step = max(1, int(max(model.memory_budget, MIN_CHUNK_BUDGET) // (3 * 8 * max(X.shape[0], 1))))
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)          # all-NaN columns, overflowing models
        draws = model.sample(2000, seed=0)
        mean, std = draws.mean(0), draws.std(0)
        median = np.concatenate([np.nanmedian(np.abs(X[:, c:c + step] - mean[c:c + step]) / std[c:c + step], axis=0)
                                 for c in range(0, X.shape[1], step)])
    median = np.where(np.isfinite(median), median, 0.0)
    j = int(np.argmax(median))
    if not median[j] > limit:
        return None
    label = f" ('{names[j]}')" if names and names[j] else ""
    return (f"column {j + 1}{label} of {name} is {median[j]:.3g} model stds from the model's mean in its median row "
            f"({float(np.nanmedian(X[:, j])):.4g} against {mean[j]:.4g} +- {std[j]:.3g}): are these rows on the "
            "training data's scale (standardised the same way)?")


def fit_noise_std(model, X, say, quiet: bool, *, who: str = "", on: str = "", label: str = "noise std"):
    """--noise-std auto: the model with its maximum-likelihood noise std on X, saying what it
    does and showing its steps on a progress bar (who: 'NAME: ' before the messages; on:
    ' on --train' after 'fitted')."""
    say(f"{who}fitting the noise std{on} by maximum exact likelihood ({X.shape[0]} rows, a pass over "
        "them per step, usually 12-25 steps)")
    with Progressbar(label, quiet) as bar:
        sigma = model.fit_noise_std(X, progress=bar)
    say(f"{who}noise std fitted{on} by maximum exact likelihood: {sigma:.6g}")
    return model.with_noise_std(sigma)


def set_precision(model, rtol, stderr_target, say) -> None:
    """--rtol and --stderr-target onto the model (None: keep its default); a note where the
    target has no effect."""
    if rtol is not None:
        model.rtol = rtol
    if stderr_target is None:
        return
    model.stderr_target = stderr_target
    if model.latent_dim <= 3:
        say(f"--stderr-target has no effect at S = {model.latent_dim}: the likelihood is exact")


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EXIT_CODES_HELP)
@click.version_option(package_name="cpadgn")
def main():
    """cpadgn: exact statistics with piecewise-affine deep generative networks.

    A ReLU-type generator with a Gaussian latent prior and Gaussian noise has an
    exact likelihood p(x) and posterior p(z|x); cpadgn computes them from the
    partition of the latent space into linear regions, cached beside the model.

    \b
    Examples:
      cpadgn fit sample_data/digits_train.csv -o gen.h5 --latent-dim 2 --hidden 16,16
      cpadgn score gen.h5 sample_data/digits_test.csv -o scores.csv
      cpadgn impute gen.h5 holes.csv -o filled.csv --std
      cpadgn COMMAND --help      (every option of COMMAND, with examples)
    """


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def partition(model_path, noise_std, cache, max_regions, device, memory_budget, trust_pickle, quiet, debug,
              as_json):
    """Compute (or load) and describe the partition of MODEL's latent space.

    --noise-std is accepted, as by the other commands, and ignored: the partition
    does not depend on the noise.

    \b
    Examples:
      cpadgn partition sample_data/wave_generator.h5
      cpadgn partition gen.pt2 --max-regions 100000 --json
    """
    from cpadgn.partition import check_partition
    t0 = time.perf_counter()
    check_cache_path(model_path, cache)
    model = load_model(model_path, cache=cache, noise_std=None, device=device, need_noise=False,
                       memory_budget=memory_budget, notices=not quiet,
                       trust_pickle=trust_pickle, max_regions=max_regions, quiet=quiet or as_json)
    part = model.partition()
    check = getattr(part, "check", None)     # stored in the cache by an earlier run
    if check is None:
        check = part.check = check_partition(model.net, part)
        written = model.partition_status in ("computed", "loaded") or \
            model.partition_status.startswith(("recomputed", "replaced"))
        if model.cache_path is not None and written:
            from cpadgn.cache import save_partition
            try:
                save_partition(model.cache_path, part, model.net.fingerprint())
            except Exception:  # the cache is an optimisation; it was written once already
                pass
    nf = part.n_facets
    # the masses are independent estimates (exact for S <= 3): the sum's standard error
    # adds in quadrature; the check passes within 4 standard errors (plus rounding)
    mass_se = float(np.sqrt(np.sum((np.exp(part.log_prior_mass) * part.log_prior_mass_stderr) ** 2)))
    mass_ok = check["mass_error"] <= 4 * mass_se + 1e-9
    summary = {
        "model": str(model_path), "latent_dim": model.latent_dim, "output_dim": model.output_dim,
        "hidden_units": list(model.net.hidden_sizes), "regions": part.n_regions,
        "bounded_regions": int(part.bounded.sum()), "unbounded_regions": int((~part.bounded).sum()),
        "degenerate_regions": int(part.degenerate.sum()),
        "facets_min": int(nf.min()), "facets_mean": float(nf.mean()), "facets_max": int(nf.max()),
        "prior_mass_sum": check["mass_sum"], "prior_mass_error": check["mass_error"],
        "prior_mass_sum_stderr": mass_se, "prior_mass_check_ok": bool(mass_ok),
        "samples_located": check["samples_located"], "interior_points_ok": check["interior_ok"],
        "method": part.method, "enumeration_seconds": part.seconds,
        "seconds": time.perf_counter() - t0, "cache": str(model.cache_path),
        **cache_status(model.partition_status),
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=Text(f"Partition of {model_path}"), show_header=False)
    rows = [("latent dim S", summary["latent_dim"]), ("output dim D", summary["output_dim"]),
            ("hidden units", " + ".join(map(str, summary["hidden_units"])) or "none (linear)"),
            ("regions", f"{part.n_regions:,} ({summary['bounded_regions']:,} bounded, "
                        f"{summary['unbounded_regions']:,} unbounded)"),
            ("near-degenerate regions", summary["degenerate_regions"]),
            ("facets per region", f"min {summary['facets_min']}, mean {summary['facets_mean']:.2f}, "
                                  f"max {summary['facets_max']}"),
            ("prior mass sum", f"{summary['prior_mass_sum']:.15f} (|error| {summary['prior_mass_error']:.1e}, "
                               + (f"standard error {mass_se:.1e}, " if mass_se > 0 else "exact, ")
                               + ("ok" if mass_ok else "FAILED: more than 4 standard errors from 1") + ")"),
            ("prior samples located", f"{100 * summary['samples_located']:.3f}%"),
            ("interior points verified", f"{100 * summary['interior_points_ok']:.3f}%"),
            ("method", f"{part.method} ({part.seconds:.3f} s)"),
            ("cache", f"{summary['cache']} ({model.partition_status})")]
    for k, v in rows:
        table.add_row(k, Text(str(v), overflow="fold"))
    StdoutConsole().print(table)


# partition reads no data and ignores the noise (the shared help said 'auto' fits it on the data)
next(p for p in partition.params if p.name == "noise_std").help = (
    "Accepted, as by the other commands, and ignored: the partition does not depend on the noise.")


@main.command()
@click.argument("model_path", metavar="MODEL", type=click.Path(exists=True, dir_okay=False))
@click.argument("data_path", metavar="DATA", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False),
              help="Output file: .csv, .npy or .h5.")
@click.option("--dataset", default=None, help="Dataset key inside an .h5 DATA file.")
@click.option("--contamination", type=FiniteRange(0, 0.5, min_open=True), default=None,
              help="Expected fraction of anomalies: adds is_anomaly (score above that quantile).")
@click.option("--pvalues", is_flag=True,
              help="Add model-based p-values P(log p(X) <= log p(x)), X drawn from the model, "
                   "with their Monte Carlo 95% interval.")
@click.option("--samples", type=click.IntRange(min=1), default=None, metavar="M",
              help="Rows drawn from the model for --pvalues  [default: 2000].")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of those draws.")
@click.option("--alpha", type=FiniteRange(0, 1, min_open=True, max_open=True), default=None, metavar="A",
              help="Flag rows with p-value below A as is_anomaly (implies --pvalues; "
                   "an alternative to --contamination).")
@click.option("--explain", type=click.IntRange(min=1), default=None, metavar="K",
              help="Add the K features with the largest exact expected squared residual "
                   "E[(x_d - g_d(z))^2 | x] / sigma_d^2 per row.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Draw the histogram of log p(x) with the threshold and, with --pvalues, the "
                   "model's own log p (.png/.pdf/.svg; needs pip install 'cpadgn[plot]').")
@model_options
@precision_options
@dask_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def score(model_path, data_path, out, dataset, contamination, pvalues, samples, seed, alpha, explain,
          memory_budget, plot_path, noise_std, cache, max_regions, device, trust_pickle, quiet, debug, as_json,
          dask_address, chunk_rows, rtol, stderr_target):
    """Anomaly scores of DATA from MODEL's exact log-likelihood.

    One output row per data row: log_likelihood (nats), anomaly_score
    (= -log_likelihood), n_observed, z_mean_1..S (E[z|x]), top_region,
    top_region_responsibility, log_likelihood_error_bound (certified bound from
    pruning), log_likelihood_stderr (S >= 4 only), and is_anomaly with
    --contamination or --alpha.  NaN entries are missing: the row is scored by the
    exact marginal likelihood of its observed entries.

    --dask ADDRESS|local:N scores the rows on a Dask cluster, chunk by chunk (README,
    Beyond one machine); the output is the same up to rounding.  An .h5 OUT is written
    chunk by chunk as the chunks complete (chunked datasets); .csv and .npy are held
    here until the end (8 (S + 7) bytes per row).  --contamination then reads
    log_likelihood back (8 bytes per row) for its quantile.

    --pvalues adds pvalue = (1 + k) / (M + 1), k the number of M rows drawn from
    the model (scored on the same observed entries) that are at most as likely,
    and pvalue_lower, pvalue_upper (Clopper-Pearson 95% interval of the true
    p-value).  --explain K adds, for k = 1..K, explain_k (1-based column number
    of the k-th least explained feature; 0 when fewer than k entries are
    observed), explain_k_name (its name, when DATA is a CSV file with a header;
    empty for 0) and explain_k_residual (E[(x_d - g_d(z))^2 | x] / sigma_d^2,
    about 1 for a feature the model explains; NaN for 0).  Missing features are
    never named.

    \b
    Examples:
      cpadgn score sample_data/digits_generator.h5 sample_data/digits_test.csv -o scores.csv
      cpadgn score gen.pt2 data.npy -o scores.h5 --noise-std auto --contamination 0.05
      cpadgn score sample_data/digits_generator.h5 sample_data/digits_test.csv -o s.csv \\
          --alpha 0.01 --samples 5000 --explain 3
    """
    from cpadgn.data import check_output_path, read_data, write_table
    t0 = time.perf_counter()
    pvalues = pvalues or alpha is not None
    check_score_options(contamination, pvalues, samples, alpha, explain, seed_given=on_command_line("seed"))
    check_dask_options(dask_address, chunk_rows, **{
        "--pvalues/--alpha": pvalues, "--explain": explain is not None, "--plot": plot_path is not None,
        "--noise-std auto": noise_std == "auto"})
    check_output_suffixes(out, plot_path)
    samples = PVALUE_SAMPLES if samples is None else samples
    check_output_path(out, inputs=command_inputs(model_path, data_path, cache))
    check_cache_path(model_path, cache)
    if dask_address is not None:
        stats, flags, model, rounding = score_on_dask(
            dask_address, model_path, data_path, dataset, chunk_rows, out, contamination, quiet=quiet or as_json,
            cache=cache, notices=not quiet, noise_std=noise_std, device=device, trust_pickle=trust_pickle,
            max_regions=max_regions, memory_budget=memory_budget, rtol=rtol, stderr_target=stderr_target)
        summary = score_summary(stats, model, time.perf_counter() - t0, out, anomalies=flags)
        note_stderr_target(stats, quiet)
        summary["rows_unreliable_by_rounding"] = warn_rounding(rounding, quiet)
        if as_json:
            click.echo(json.dumps(summary, indent=2))
        else:
            print_summary("Scores", summary)
        return
    if plot_path is not None:
        from cpadgn.plot import check_image_path
        check_image_path(plot_path, inputs={**command_inputs(model_path, data_path, cache), "the -o output": out})
    X = read_data(data_path, dataset=dataset)
    if explain is not None and explain > X.shape[1]:
        raise CpadgnError(f"--explain {explain} asks for more features than DATA has ({X.shape[1]}); "
                          f"use --explain {X.shape[1]} or less")
    model = load_model(model_path, cache=cache, noise_std=noise_std, device=device,
                       trust_pickle=trust_pickle, max_regions=max_regions, quiet=quiet or as_json, data=X,
                       data_name=data_path, memory_budget=memory_budget, rtol=rtol, stderr_target=stderr_target, notices=not quiet)
    with Progressbar("scoring rows", quiet or as_json) as bar:
        post = model.posterior(X, progress=bar, pairs=explain is not None)     # only --explain uses them
    pv = residuals = None
    if pvalues:
        from cpadgn.anomaly import pvalues as model_pvalues
        with Progressbar(f"p-values ({samples} model draws per missing pattern)", quiet or as_json) as bar:
            pv = model_pvalues(model, post.log_likelihood, samples, seed, observed=~np.isnan(X),
                               progress=bar)
    if explain is not None:
        from cpadgn.anomaly import expected_squared_residuals
        residuals = expected_squared_residuals(model, X, post)
    names = csv_column_names(data_path, X.shape[1]) if explain is not None else None
    columns = scores_table(post, contamination, pv=pv, alpha=alpha, residuals=residuals, explain=explain,
                           names=names)
    write_table(out, columns)
    if plot_path is not None:
        from cpadgn import plot
        plot.save(plot.scores_figure(post.log_likelihood, contamination=contamination, pvalues=pv,
                                     alpha=alpha, observed=~np.isnan(X)), plot_path)
    flags = None
    if contamination is not None:
        flags = AnomalyFlags(contamination_threshold(post.log_likelihood, contamination),
                             int(columns["is_anomaly"].sum()))
    elif alpha is not None:
        flags = AnomalyFlags(None, int(columns["is_anomaly"].sum()))
    stats = LoglikStats(model.output_dim, model.stderr_target, model.latent_dim >= 4).add(post)
    summary = score_summary(stats, model, time.perf_counter() - t0, out,
                            pv=pv, alpha=alpha, anomalies=flags)
    note_stderr_target(stats, quiet)
    summary["rows_unreliable_by_rounding"] = warn_rounding(rounding_errors(model, X), quiet)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        print_summary("Scores", summary)


PVALUE_SAMPLES = 2000          # default --samples


def score_on_dask(address, model_path, data_path, dataset, chunk_rows, out, contamination, *, quiet, device,
                  memory_budget, **load):
    """``cpadgn score --dask``: DATA read in chunks by the workers, the partition computed or
    loaded here once and sent to every worker once.  An .h5 OUT is written chunk by chunk
    as the chunks complete (the client holds no column until --contamination reads back
    log_likelihood, 8 bytes per row); .csv and .npy are built here and written at the end.
    Returns (LoglikStats, AnomalyFlags or None, model, the rows' ``rounding_errors``)."""
    from cpadgn import dask as cluster
    from cpadgn.data import write_table
    rows = cluster.open_rows(data_path, dataset)
    model = load_model(model_path, quiet=quiet, device=device, memory_budget=memory_budget,
                       check=lambda m: cluster.check_columns(m, rows, data_path), data_name=data_path,
                       first_rows=lambda: cluster.first_rows(rows), **load)
    X = cluster.read(rows, chunk_rows=chunk_rows, memory_budget=memory_budget)
    S, stats = model.latent_dim, LoglikStats(model.output_dim, model.stderr_target, model.latent_dim >= 4)
    block_post = lambda block: cluster.posterior_fields(block, S)
    with cluster.open_client(address, log=say_for(quiet)) as client, \
            Progressbar("scoring rows (Dask)", quiet) as bar:
        table = cluster.posterior_table(model, X, client=client, device=device)
        rounding = rounding_errors(model, X)
        if out.lower().endswith((".h5", ".hdf5")):
            with cluster.table_writer(out, X.shape[0], score_dtypes(S, contamination)) as written:
                def put(start, stop, block):
                    post = block_post(block)
                    stats.add(post)
                    written.put(start, stop, scores_table(post, None))
                cluster.compute_rows(client, table, progress=bar, put=put)
                flags = None
                if contamination is not None:      # a quantile of all scores: log p read back
                    ll = written.column("log_likelihood")
                    flagged = is_anomaly(ll, contamination)
                    written.put(0, len(ll), {"is_anomaly": flagged})
                    flags = AnomalyFlags(contamination_threshold(ll, contamination), int(flagged.sum()))
            return stats, flags, model, rounding
        post = block_post(cluster.compute_rows(client, table, progress=bar))
    columns = scores_table(post, contamination)
    write_table(out, columns)
    flags = None
    if contamination is not None:
        flags = AnomalyFlags(contamination_threshold(post.log_likelihood, contamination),
                             int(columns["is_anomaly"].sum()))
    return stats.add(post), flags, model, rounding


def score_dtypes(S: int, contamination) -> dict:
    """{column: dtype} of ``scores_table`` in its order, with its optional columns where
    they can occur (log_likelihood_stderr at S >= 4, where likelihoods are QMC estimates;
    is_anomaly with --contamination)."""
    f, i = np.float64, np.int64
    return {"log_likelihood": f, "anomaly_score": f, "n_observed": i,
            **{f"z_mean_{j + 1}": f for j in range(S)}, "top_region": i, "top_region_responsibility": f,
            "log_likelihood_error_bound": f, **({"log_likelihood_stderr": f} if S >= 4 else {}),
            **({"is_anomaly": np.bool_} if contamination is not None else {})}


def on_command_line(name: str) -> bool:
    """Whether the current command's option ``name`` was given on the command line."""
    return click.get_current_context().get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE


def check_score_options(contamination, pvalues, samples, alpha, explain, seed_given=False):
    """Usage errors (``usage_error``) of inconsistent ``cpadgn score`` options, before any work."""
    if alpha is not None and contamination is not None:
        raise usage_error("--alpha and --contamination both set is_anomaly; give only one of them")
    if samples is not None and not pvalues:
        raise usage_error("--samples is the number of model draws for p-values; add --pvalues or --alpha")
    if seed_given and not pvalues:
        raise usage_error("--seed seeds the model draws for p-values; add --pvalues or --alpha, or drop --seed")
    m = PVALUE_SAMPLES if samples is None else samples
    if alpha is not None and alpha * (m + 1) <= 1:
        raise usage_error(f"with --samples {m} the smallest p-value is 1/{m + 1} >= --alpha {alpha:g}, so "
                          f"no row could be flagged; use --samples {int(np.ceil(10 / alpha))} or more")


def scores_table(post, contamination, *, pv=None, alpha=None, residuals=None, explain=None, names=None):
    """The output columns of ``cpadgn score`` (names: DATA's column names, a CSV header, for
    --explain's explain_k_name columns)."""
    ll = post.log_likelihood
    cols = {"log_likelihood": ll, "anomaly_score": -ll, "n_observed": post.n_observed}
    for j in range(post.z_mean.shape[1]):
        cols[f"z_mean_{j + 1}"] = post.z_mean[:, j]
    cols["top_region"] = post.top_region
    cols["top_region_responsibility"] = post.top_responsibility
    cols["log_likelihood_error_bound"] = post.error_bound
    if post.z_mean.shape[1] >= 4:      # QMC estimates: the column even where every row is exact
        cols["log_likelihood_stderr"] = post.stderr
    if pv is not None:
        cols["pvalue"], cols["pvalue_lower"], cols["pvalue_upper"] = pv.pvalue, pv.lower, pv.upper
    if contamination is not None:
        cols["is_anomaly"] = is_anomaly(ll, contamination)
    if alpha is not None:
        cols["is_anomaly"] = pv.pvalue < alpha
    if explain is not None:
        from cpadgn.anomaly import top_features
        index, value = top_features(residuals, explain)
        for k in range(explain):
            cols[f"explain_{k + 1}"] = index[:, k] + 1           # 1-based column, 0 = none
            if names is not None:
                cols[f"explain_{k + 1}_name"] = np.where(index[:, k] >= 0, np.asarray(names, dtype=str)[index[:, k]], "")
            cols[f"explain_{k + 1}_residual"] = value[:, k]
    return cols


def contamination_threshold(ll, contamination):
    """The --contamination threshold on anomaly_score = -log p: its (1 - contamination)
    quantile over the rows with something observed (log p not NaN); None if there is none."""
    scored = -ll[~np.isnan(ll)]
    return float(np.quantile(scored, 1 - contamination)) if scored.size else None


def is_anomaly(ll, contamination):
    """(N,) bool: anomaly_score above the --contamination threshold."""
    threshold = contamination_threshold(ll, contamination)
    return np.zeros(ll.shape, bool) if threshold is None else -ll > threshold


class AnomalyFlags:
    """The summary's threshold (None with --alpha) and number of rows flagged."""

    def __init__(self, threshold, count: int):
        self.threshold, self.count = threshold, count


class LoglikStats:
    """The summary statistics of scored rows, added chunk by chunk so that no column need
    be held: counts, extremes, and the mean and sum of squared deviations of log p over
    the rows with something observed, merged by Chan et al.'s pairwise update (one chunk
    gives exactly its mean and squared deviations).  qmc (S >= 4): the summary reports
    max_qmc_stderr and rows_above_stderr_target even where every row came out exact."""

    def __init__(self, output_dim: int, stderr_target: float = float("inf"), qmc: bool = False):
        self.output_dim, self.stderr_target, self.qmc = output_dim, stderr_target, qmc
        self.rows = self.nothing = self.missing = self.n = self.above_target = 0
        self.pairs, self.max_pairs = 0, 0
        self.mean = 0.0
        self.scale, self.ssq = 0.0, 0.0      # the squared deviations' sum is scale^2 ssq
        self.min, self.max, self.max_error_bound = np.inf, -np.inf, -np.inf
        self.max_stderr = 0.0

    def add(self, post):
        """Add the rows of a posterior (fields log_likelihood, n_observed, error_bound, stderr,
        n_pairs (n,))."""
        seen = post.n_observed > 0
        ll = post.log_likelihood[seen]
        self.pairs += int(post.n_pairs[seen].sum())
        self.max_pairs = max(self.max_pairs, int(post.n_pairs.max(initial=0)))
        self.rows += post.n_observed.size
        self.nothing += int((~seen).sum())
        self.missing += int((post.n_observed < self.output_dim).sum())
        if post.error_bound.size:
            self.max_error_bound = max(self.max_error_bound, float(post.error_bound.max()))
            self.max_stderr = max(self.max_stderr, float(post.stderr.max()))
            self.above_target += int((post.stderr > self.stderr_target).sum())
        if ll.size:
            mean = float(ll.mean())
            n = self.n + ll.size
            delta = mean - self.mean
            self.add_squares(np.append(ll - mean, delta * np.sqrt(self.n * ll.size / n)))
            self.mean += delta * (ll.size / n)
            self.n = n
            self.min, self.max = min(self.min, float(ll.min())), max(self.max, float(ll.max()))
        return self

    def add_squares(self, values):
        """Add the squares of values (k,) to scale^2 ssq without overflow (log p reaches 1e200
        in magnitude): LAPACK dnrm2's scaled update."""
        top = float(np.abs(values).max(initial=0.0))
        if top == 0.0:
            return
        big = max(self.scale, top)
        self.ssq = self.ssq * (self.scale / big) ** 2 + float(np.sum((values / big) ** 2))
        self.scale = big

    def summary(self) -> dict:
        n = self.n
        return {"rows": self.rows, "rows_with_nothing_observed": self.nothing,
                "mean_log_likelihood": self.mean if n else None,
                "mean_log_likelihood_stderr": self.scale * float(np.sqrt(self.ssq / (n - 1) / n)) if n > 1 else None,
                "min_log_likelihood": self.min if n else None, "max_log_likelihood": self.max if n else None,
                "max_error_bound": self.max_error_bound,
                **({"max_qmc_stderr": self.max_stderr, "rows_above_stderr_target": self.above_target}
                   if self.qmc or self.max_stderr > 0 else {}),
                "rows_with_missing": self.missing,
                "regions_per_row": self.pairs / n if n else None, "max_regions_per_row": self.max_pairs}


def score_summary(stats, model, seconds, out, *, pv=None, alpha=None, anomalies=None):
    """The summary of ``cpadgn score`` from the LoglikStats of its rows."""
    s = {**stats.summary(), "noise_std": np.asarray(model.noise_std).tolist(),
         "regions": model.partition().n_regions, **cache_status(model.partition_status),
         "seconds": seconds, "output": str(out)}
    if pv is not None:
        s["pvalue_samples"] = pv.n_samples
        s["pvalue_missing_patterns"] = pv.n_patterns
        s["min_pvalue"] = float(np.nanmin(pv.pvalue)) if stats.n else None
    if anomalies is not None and alpha is None:
        s["threshold"] = anomalies.threshold
    if alpha is not None:
        s["alpha"] = alpha
    if anomalies is not None:
        s["anomalies"] = anomalies.count
    return s


# table labels that the JSON key alone would let be misread
SUMMARY_LABELS = {"mean_log_likelihood_stderr": "mean log likelihood: SE over rows"}


def print_summary(title, summary):
    table = Table(title=title, show_header=False)
    for k, v in summary.items():
        if isinstance(v, float):
            v = f"{v:.6g}"
        elif isinstance(v, list):
            v = ", ".join(f"{x:.4g}" for x in v[:5]) + (" ..." if len(v) > 5 else "")
        elif v is None:                 # JSON's null (e.g. impute's draws without --draws)
            v = "-"
        table.add_row(SUMMARY_LABELS.get(k, k.replace("_", " ")), Text(str(v), overflow="fold"))
    StdoutConsole().print(table)



# Commands defined in their own modules register themselves on ``main``.
from cli import compare as _compare  # noqa: E402,F401
from cli import fit as _fit  # noqa: E402,F401
from cli import impute as _impute  # noqa: E402,F401
from cli import plot as _plot  # noqa: E402,F401

if _sigint_before_import is not None:   # importing cli.main leaves SIGINT as it was
    signal.signal(signal.SIGINT, _sigint_before_import)



def run():
    """The ``cpadgn`` program and ``python -m cli.main``: ``main``, then the process ends.
    A Ctrl-C once the command is done (while it returns, or while the interpreter exits)
    ends the process as one before the command does: exit 130, "Error: interrupted", and
    what the command wrote is complete; not a traceback or exit -2.  In-process callers of
    ``main`` (click's CliRunner) keep their own Ctrl-C."""
    global _in_command, _program
    _program = True
    try:                # a path that stdout's encoding (ascii, latin-1) cannot hold is escaped, not an error
        sys.stdout.reconfigure(errors="backslashreplace")
    except (AttributeError, ValueError, OSError):
        pass
    try:
        main()
    except KeyboardInterrupt:
        fail(*interruption())
    finally:
        _in_command = False


if __name__ == "__main__":
    # ``python -m cli.main``: run the group of the imported module ``cli.main``, on which
    # the commands above registered (this copy, ``__main__``, only holds the first two)
    from cli.main import run as _run
    _run()
