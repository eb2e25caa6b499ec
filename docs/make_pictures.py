"""Rebuild the README's pictures from the sample data (needs pip install 'cpadgn[plot]').

    python docs/make_pictures.py

Runs the cpadgn commands printed below (scores and imputations go to a temporary
folder), then stores each PNG with a 256-colour palette (Pillow, a matplotlib
dependency) so the repository stays small.
"""
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SAMPLE = "sample_data"


def cpadgn(*args):
    print("cpadgn " + " ".join(shlex.quote(str(a)) for a in args))
    subprocess.run([sys.executable, "-m", "cli.main", *map(str, args), "--quiet", "--device", "cpu"],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL)


def palette(path):
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        X = np.loadtxt(ROOT / SAMPLE / "digits_test.csv", delimiter=",", skiprows=1)[:4]
        X[:, :32] = np.nan                                   # hide the top half of each digit
        np.savetxt(tmp / "holes.csv", X, delimiter=",")
        cpadgn("plot", "partition", f"{SAMPLE}/digits_generator.h5", "-o", "docs/partition_digits.png",
               "--data", f"{SAMPLE}/digits_test.csv", "--row", 0, "--row", 3, "--size", "750x500")
        cpadgn("plot", "partition", f"{SAMPLE}/wave_generator.h5", "-o", "docs/partition_wave.png",
               "--data", f"{SAMPLE}/wave.csv", "--row", 11, "--row", 112, "--row", 202)
        cpadgn("fit", f"{SAMPLE}/digits_train.csv", "-o", tmp / "s3.h5", "--latent-dim", 3, "--hidden", "8,8",
               "--max-iter", 2)
        cpadgn("plot", "partition", tmp / "s3.h5", "-o", "docs/slice_digits.png",
               "--data", f"{SAMPLE}/digits_test.csv", "--row", 0, "--row", 3)
        cpadgn("score", f"{SAMPLE}/digits_generator.h5", f"{SAMPLE}/digits_test.csv", "-o", tmp / "scores.csv",
               "--alpha", 0.01, "--plot", "docs/scores.png")
        cpadgn("impute", f"{SAMPLE}/digits_generator.h5", tmp / "holes.csv", "-o", tmp / "draws.npy",
               "--draws", 4, "--plot", "docs/imputations.png", "--image-shape", "8x8")
    for name in ("partition_digits", "partition_wave", "slice_digits", "scores", "imputations"):
        palette(DOCS / f"{name}.png")
        print(f"docs/{name}.png: {(DOCS / f'{name}.png').stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
