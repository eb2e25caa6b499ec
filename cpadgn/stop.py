"""Prompt Ctrl-C with worker threads.

Python delivers KeyboardInterrupt to the main thread only.  Work handed to threads by
``map_in_threads`` carries a stop flag; when the consumer stops early (Ctrl-C or an
error), the flag is set, queued work is cancelled, nothing waits for the running work,
and that work ends at its next ``stop_check()`` (long loops call it between small
pieces).  Nested calls share the outer call's flag.
"""
from __future__ import annotations

import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

_flag: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("cpadgn_stop", default=None)


def stop_check() -> None:
    """Raise KeyboardInterrupt in a worker whose call has been stopped."""
    flag = _flag.get()
    if flag is not None and flag.is_set():
        raise KeyboardInterrupt


def map_in_threads(fn, jobs, workers: int):
    """fn(*job) for every job on ``workers`` threads; yields the results in order.

    If the consumer stops before the end (KeyboardInterrupt while waiting, an error in
    a job, or closing the generator) the remaining jobs are cancelled and the running
    ones told to stop; the caller gets the exception at once.
    """
    flag = _flag.get() or threading.Event()
    ctx = contextvars.copy_context()
    ctx.run(_flag.set, flag)
    pool = ThreadPoolExecutor(max(1, workers))
    futures = [pool.submit(ctx.copy().run, fn, *job) for job in jobs]
    finished = False
    try:
        for future in futures:
            yield future.result()
        finished = True
    finally:
        if not finished:
            flag.set()
        pool.shutdown(wait=finished, cancel_futures=True)
