"""Ctrl-C through the real command line: every command (partition, score, impute,
compare, fit, plot partition) at S = 2 and S = 3, interrupted with SIGINT after each
--waits seconds, in its own folder.  Per run: the exit code (130 wanted; or death by the
signal itself where it came in the interpreter's last teardown, after the command
finished and wrote its outputs, when Python has handed SIGINT back: a shell shows 130
too), the seconds
from the signal to the exit (<= 2 wanted), stderr (its last line "Error: interrupted", no error or
traceback before it: earlier lines are progress notes printed before the signal) and
whether any file in the folder was added or changed (none wanted, but for a partition
cache that loads whole: the command finished it before the signal, on a fast machine).
tests/test_resources.py and tests/test_faults.py cover score only.

    python benchmarks/check_interrupts.py [--waits 1.5,3] [--only score_s2,fit_s3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from cpadgn.cache import read_partition  # noqa: E402
from cpadgn.errors import CpadgnError  # noqa: E402
from cpadgn.model import load  # noqa: E402
from cpadgn.modelfile import save_model  # noqa: E402
from test_resources import random_net  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def make_inputs(d: Path):
    """S = 2: the bundled digits generator (cached) and a 64-64 net (uncached, for a
    partition that runs several seconds); S = 3: a 16-16 net; 400 rows each, every other
    one with 30% of its entries missing."""
    shutil.copy(ROOT / "sample_data" / "digits_generator.h5", d / "s2.h5")
    save_model(d / "big2.h5", random_net(2, (64, 64), 64), noise_std=0.1)
    save_model(d / "s3.h5", random_net(3, (16, 16), 64), noise_std=0.1)
    rng = np.random.default_rng(5)
    for name in ("s2", "s3"):
        model = load(d / f"{name}.h5")
        model.partition()                                     # cached beside it
        X = model.sample(400, seed=2)
        holes = rng.random(X.shape) < 0.3
        holes[::2] = False
        np.save(d / f"{name}_c400.npy", X)
        np.save(d / f"{name}_m400.npy", np.where(holes, np.nan, X))


def whole_cache(path: Path) -> bool:
    """Whether path is a partition cache that loads (checksum and all)."""
    try:
        read_partition(path)
        return True
    except (CpadgnError, OSError):
        return False


def snapshot(d: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}


def interrupt(src: Path, name: str, argv: list, files: list, cached: bool, wait: float) -> bool:
    work = src / "runs" / f"{name}_{wait}"
    work.mkdir(parents=True)
    for f in files:
        shutil.copy(src / f, work / f)
        if cached and (src / f"{f}.partition.h5").exists():
            shutil.copy(src / f"{f}.partition.h5", work / f"{f}.partition.h5")
    before = snapshot(work)
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *argv], cwd=work, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(wait)
    if proc.poll() is not None:
        print(f"{name:14s} wait {wait}: ended before the signal (exit {proc.returncode}); lower --waits")
        return False
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    changed = sorted({k for k, _ in set(snapshot(work).items()) ^ set(before.items())})
    # the interrupt's own output is the last line; lines before it are the command's progress
    # notes from before the signal (e.g. "Loaded the partition ... from ...")
    lines = err.splitlines()
    earlier_fault = any(line.startswith(("Error", "Traceback", "Fatal", "terminate")) or "Exception" in line
                        for line in lines[:-1])
    in_teardown = proc.returncode == -signal.SIGINT and not any("Traceback" in line for line in lines)
    stopped = proc.returncode == 130 and lines[-1:] == ["Error: interrupted"] and not out \
        and all(name.endswith(".partition.h5") and whole_cache(work / name) for name in changed)
    ok = (stopped or in_teardown) and not earlier_fault and seconds <= 2.0
    print(f"{name:14s} wait {wait}: exit {proc.returncode}, {seconds:.2f} s, stderr {err.splitlines()[-2:]!r}, "
          f"files changed {changed}  {'PASS' if ok else 'FAIL'}", flush=True)
    if not ok and len(err.splitlines()) > 2:      # the whole of a longer stderr (a traceback, a fatal error)
        print("".join(f"    | {line}\n" for line in err.splitlines()), end="", flush=True)
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--waits", default="1.5,3", help="seconds before the signal, comma-separated")
    ap.add_argument("--only", default=None, help="comma-separated case names")
    args = ap.parse_args()
    s2, s3 = ["s2.h5", "s2_c400.npy", "s2_m400.npy"], ["s3.h5", "s3_c400.npy", "s3_m400.npy"]
    cases = {    # name: (argv, files, copy the partition cache)
        "partition_s2": (["partition", "big2.h5"], ["big2.h5"], False),
        "partition_s3": (["partition", "s3.h5"], ["s3.h5"], False),
        "score_s2": (["score", "s2.h5", "s2_m400.npy", "-o", "s.csv", "--pvalues", "--samples", "200000"], s2, True),
        "score_s3": (["score", "s3.h5", "s3_m400.npy", "-o", "s.h5", "--pvalues", "--samples", "200000"], s3, True),
        "impute_s2": (["impute", "s2.h5", "s2_m400.npy", "-o", "f.csv", "--std", "--draws", "200"], s2, True),
        "impute_s3": (["impute", "s3.h5", "s3_m400.npy", "-o", "f.h5", "--std", "--draws", "200"], s3, True),
        "compare_s2": (["compare", "s2.h5", "--data", "s2_c400.npy", "--train", "s2_c400.npy", "--baseline",
                        "ppca", "-o", "r.json"], s2, False),
        "compare_s3": (["compare", "s3.h5", "--data", "s3_c400.npy", "--train", "s3_c400.npy", "--baseline",
                        "ppca", "-o", "r.json"], s3, False),
        "fit_s2": (["fit", "s2_c400.npy", "-o", "m.h5", "-S", "2", "--hidden", "16,16", "--max-iter", "100",
                    "--tol", "0"], s2, False),
        "fit_s3": (["fit", "s3_c400.npy", "-o", "m.h5", "-S", "3", "--hidden", "16,16", "--max-iter", "100",
                    "--tol", "0"], s3, False),
        "plot_s2": (["plot", "partition", "big2.h5", "-o", "p.png", "--data", "s2_c400.npy", "--row", "0"],
                    ["big2.h5", "s2_c400.npy"], False),
        "plot_s3": (["plot", "partition", "s3.h5", "-o", "p.png", "--data", "s3_c400.npy", "--row", "0", "--row",
                     "1"], s3, False),
    }
    names = args.only.split(",") if args.only else list(cases)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        make_inputs(src)
        results = [interrupt(src, n, *cases[n], float(w)) for n in names for w in args.waits.split(",")]
    print(f"{sum(results)} of {len(results)} passed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
