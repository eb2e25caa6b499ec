"""Scoring on a Dask cluster against one process, and what a larger cluster would give.

    python benchmarks/bench_dask.py [--rows 3000] [--chunk-rows 250] [--repeats 2]

Model: the bundled digits generator (S = 2, D = 64; its partition from the cache or
computed once); rows: sample_data/digits_test.csv tiled to --rows, saved as .npy
and read by the workers by memory map.  Prints:
1. one process (``CPAModel.posterior``, torch's default threads): rows/s;
2. LocalCluster with 1 and 2 worker processes (1 thread each, warmed up: the model
   shipped, torch imported, the region table built): rows/s and the ratio to 1.;
3. the per-chunk cost (seconds per task of --chunk-rows rows, on one worker), the
   scheduling overhead per task (tasks of 1 row), the broadcast size of the model
   and partition, and the time to ship it;
   CPU time per row (one process; the workers, summed) tells the cost of the cluster
   apart from a shared machine's load;
4. an estimate (a model, not a measurement) of rows/s at 10 and 100 workers:
   W workers each scoring at 1 / (one worker's CPU time per row), plus the measured overhead per task
   spread over the workers, plus shipping the model once (a tree broadcast grows
   like log W; the one-to-all scatter here is counted as W sends, an upper bound).
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cpadgn  # noqa: E402
import cpadgn.dask as cd  # noqa: E402
from cpadgn.data import read_data  # noqa: E402


def timed(fn, repeats):
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def on_cluster(model, path, n_workers, chunk_rows, repeats):
    """rows/s on n_workers processes (warm), seconds per task of chunk_rows rows, seconds
    per 1-row task, seconds to ship the model."""
    from distributed import Client, LocalCluster
    cd.quiet_logs()
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        t = time.perf_counter()
        fut = cd.ship(client, model)
        client.run(lambda: __import__("torch").get_num_threads())   # torch imported on every worker
        ship_s = time.perf_counter() - t
        X = cd.read(path, chunk_rows=chunk_rows)
        n = X.shape[0]
        warm = cd.read(path, chunk_rows=10)[: 40 * n_workers]     # a few tasks on every worker
        cd.compute_rows(client, cd.posterior_table(fut, warm, latent_dim=model.latent_dim))
        run = lambda: cd.compute_rows(client, cd.posterior_table(fut, X, latent_dim=model.latent_dim))
        cpu0 = sum(client.run(time.process_time).values())
        seconds = timed(run, repeats)
        cpu = (sum(client.run(time.process_time).values()) - cpu0) / repeats
        one = cd.read(path, chunk_rows=1)[:200]
        tiny = lambda: cd.compute_rows(client, cd.posterior_table(fut, one, latent_dim=model.latent_dim))
        per_tiny = timed(tiny, repeats) / 200 * n_workers
    return n / seconds, seconds / X.numblocks[0] * n_workers, per_tiny, ship_s, cpu / n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=3000)
    ap.add_argument("--chunk-rows", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    model = cpadgn.load(ROOT / "sample_data" / "digits_generator.h5", device="cpu")
    model.partition()
    base = read_data(ROOT / "sample_data" / "digits_test.csv")
    X = np.tile(base, (int(np.ceil(args.rows / len(base))), 1))[: args.rows]
    X = X + 1e-6 * np.random.default_rng(0).standard_normal(X.shape)    # distinct: equal rows are scored once
    print(f"model: S = {model.latent_dim}, hidden {'-'.join(map(str, model.net.hidden_sizes))}, "
          f"D = {model.output_dim}, {model.partition().n_regions:,} regions; "
          f"{len(X):,} rows, {args.chunk_rows} rows per task; {os.cpu_count()} CPU cores")
    model.posterior(X[:50])                      # the region table built, torch warm
    cpu0 = time.process_time()
    one_s = timed(lambda: model.posterior(X), args.repeats)
    one_cpu = (time.process_time() - cpu0) / args.repeats / len(X)
    one = len(X) / one_s
    print(f"one process:        {one:9.1f} rows/s  ({one_s:.2f} s; {1e3 * one_cpu:.2f} CPU ms per row)")
    size = cd.broadcast_bytes(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.npy"
        np.save(path, X)
        rates = {}
        for w in (1, 2):
            rate, per_chunk, per_task, ship_s, cpu = on_cluster(model, path, w, args.chunk_rows, args.repeats)
            rates[w] = (rate, per_chunk, per_task, ship_s, cpu)
            print(f"Dask, {w} worker{'s' if w > 1 else ' '}:    {rate:9.1f} rows/s  (ratio to one process "
                  f"{rate / one:.2f}; {1e3 * cpu:.2f} CPU ms per row on the workers; {per_chunk:.3f} s per "
                  f"{args.chunk_rows}-row task; {1e3 * per_task:.1f} ms per 1-row task; model shipped in "
                  f"{ship_s:.2f} s)")
    _, per_chunk, per_task, ship_s, cpu = rates[1]
    rate1 = 1 / cpu                                 # rows/s of one worker on a core of its own
    print(f"broadcast: {size / 1e6:.2f} MB of model and partition per worker (pickled), sent once")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"estimate (not measured), 10^8 rows, each worker a core of its own at {rate1:.0f} rows/s "
          f"(1 / its CPU time per row), {args.chunk_rows}-row tasks:")
    for w in (10, 100):
        n = 1e8
        tasks = n / args.chunk_rows
        compute = n / (w * rate1)
        overhead = tasks * per_task / w
        ship = w * size / 1e8                       # 100 MB/s out of the client, one copy each
        total = compute + overhead + ship
        print(f"  {w:3d} workers: {n / total:9.0f} rows/s, 10^8 rows in {total / 3600:.2f} h "
              f"(compute {compute:.0f} s, task overhead {overhead:.0f} s, shipping {ship:.1f} s)")


if __name__ == "__main__":
    main()
