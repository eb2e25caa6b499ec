"""The transposed-convolution decoder of DESIGN section 9 end to end through the CLI.

    python benchmarks/bench_conv.py [--out out/bench_conv] [--rows 1000] [--impute-rows 100]
                                    [--memory-budget 2e9] [--steps partition,score,impute]

Linear(2, 4*7*7), Unflatten, ReLU, ConvTranspose2d(4, 4, 4, 2, 1), ReLU,
ConvTranspose2d(4, 1, 4, 2, 1), Flatten: 980 hidden units, D = 784, S = 2.  Weights are
torch's default initialisation under torch.manual_seed(0), in float64; the module is
saved with torch.export (``decoder.pt2``).  The data are drawn from the model itself
(z ~ N(0, I), noise std 0.2 times the RMS of g's outputs over 10,000 prior draws, seed 1),
so the likelihood is that of a well-specified model.  Then, each as its own process,

    cpadgn partition decoder.pt2 --json                    (enumeration + 100,000-sample check)
    cpadgn score decoder.pt2 rows.npy -o scores.csv        (--rows complete rows)
    cpadgn impute decoder.pt2 rows_missing.npy -o imp.npy  (--impute-rows rows, 30% MCAR)

all with --memory-budget (default 2e9, the CLI's default), printing the wall time and
the peak RSS of each process (ru_maxrss of a wrapper's children).  The partition step
fills the cache (``decoder.pt2.partition.h5``) that the later steps read; delete it to
time the enumeration again.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
CLI = [sys.executable, "-c", "from cli.main import main; main()"]
PEAK = [sys.executable, "-c", "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print('PEAK', r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"]


def build_decoder():
    import torch
    from torch import nn
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 4 * 7 * 7), nn.Unflatten(1, (4, 7, 7)), nn.ReLU(),
                         nn.ConvTranspose2d(4, 4, 4, 2, 1), nn.ReLU(),
                         nn.ConvTranspose2d(4, 1, 4, 2, 1), nn.Flatten()).double().eval()


def prepare(out: Path, rows: int, impute_rows: int):
    """decoder.pt2, rows.npy (rows, 784) and rows_missing.npy; returns the noise std."""
    import torch
    dec = build_decoder()
    out.mkdir(parents=True, exist_ok=True)
    torch.export.save(torch.export.export(dec, (torch.zeros(2, 2, dtype=torch.float64),)), out / "decoder.pt2")
    with torch.no_grad():
        rms = float(dec(torch.randn(10_000, 2, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(2))).pow(2).mean().sqrt())
    sigma = 0.2 * rms
    rng = np.random.default_rng(1)
    with torch.no_grad():
        x = dec(torch.as_tensor(rng.standard_normal((rows, 2)))).numpy()
    x = x + sigma * rng.standard_normal(x.shape)
    np.save(out / "rows.npy", x)
    xm = x[:impute_rows].copy()
    xm[rng.random(xm.shape) < 0.3] = np.nan
    np.save(out / "rows_missing.npy", xm)
    return sigma


def run(step: str, argv: list[str]):
    t0 = time.perf_counter()
    res = subprocess.run(PEAK + CLI + argv, capture_output=True, text=True, env=ENV, cwd=ROOT)
    wall = time.perf_counter() - t0
    code, kb = res.stdout.split("PEAK")[-1].split()
    print(f"{step:10s} exit {code}  wall {wall:8.1f} s  peak RSS {int(kb) / 1024 ** 2:6.2f} GiB", flush=True)
    if int(code) != 0:
        print(res.stderr[-2000:], flush=True)
    return res.stdout.split("PEAK")[0], wall, 1024 * int(kb)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/bench_conv")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--impute-rows", type=int, default=100)
    ap.add_argument("--memory-budget", default="2e9")
    ap.add_argument("--steps", default="partition,score,impute")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    sigma = prepare(out, args.rows, args.impute_rows)
    print(f"noise std {sigma:.6g}; memory budget {args.memory_budget}", flush=True)
    common = ["--memory-budget", args.memory_budget, "--quiet"]
    model = str(out / "decoder.pt2")
    steps = args.steps.split(",")
    if "partition" in steps:
        text, _, _ = run("partition", ["partition", model, "--json", *common])
        s = json.loads(text)
        print(f"  regions {s['regions']:,}, enumeration {s['enumeration_seconds']:.1f} s, "
              f"samples located {s['samples_located']}, prior mass sum {s['prior_mass_sum']:.12f}", flush=True)
    if "score" in steps:
        text, _, _ = run("score", ["score", model, str(out / "rows.npy"), "-o", str(out / "scores.csv"),
                                   "--noise-std", repr(sigma), "--json", *common])
        s = json.loads(text)
        print("  " + ", ".join(f"{k} {v}" for k, v in s.items() if "likelihood" in k or "bound" in k), flush=True)
    if "impute" in steps:
        run("impute", ["impute", model, str(out / "rows_missing.npy"), "-o", str(out / "imputed.npy"),
                       "--noise-std", repr(sigma), *common])
        x, xi = np.load(out / "rows.npy")[:args.impute_rows], np.load(out / "imputed.npy")
        miss = np.isnan(np.load(out / "rows_missing.npy"))
        print(f"  RMSE over the {int(miss.sum()):,} hidden entries {np.sqrt(np.mean((xi - x)[miss] ** 2)):.4f} "
              f"(noise std {sigma:.4f})", flush=True)


if __name__ == "__main__":
    main()
