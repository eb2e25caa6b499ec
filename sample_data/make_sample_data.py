"""Rebuild everything in sample_data/ (deterministic; needs scikit-learn for digits).

    python sample_data/make_sample_data.py

- wave.csv: the 2-D "wave" toy of Balestriero et al. (NeurIPS 2020): t ~ N(0, 2^2),
  x = (t, cos(1.4 t)) + N(0, 0.1^2 I), standardised per column; 1,000 rows.
- digits_train.csv / digits_test.csv: scikit-learn's bundled 8x8 digits
  (sklearn.datasets.load_digits, a copy of the UCI "Optical Recognition of
  Handwritten Digits" test set, CC BY 4.0), pixels divided by 16; a seeded
  1,497 / 300 split.  digits_test_labels.csv holds the digit of each test row.
- wave_generator.h5: ``cpadgn fit`` by EM, S = 1, hidden 16-16, leaky ReLU 0.1, on
  wave.csv (at most 300 iterations; seed 0; 10% held out for validation).
- digits_generator.h5: ``cpadgn fit`` by EM, S = 2, hidden 32-32, on digits_train.csv
  (40 iterations).
- digits_vae.h5: ``cpadgn fit --method vae``, the same decoder trained as a VAE (300
  epochs); the file keeps its encoder, so ``cpadgn compare`` reports its exact ELBO gap.
Both models are cpadgn HDF5 model files (README, "Model file").
"""
from pathlib import Path

import numpy as np


HERE = Path(__file__).resolve().parent


def write_csv(path, X, header, fmt):
    np.savetxt(path, X, delimiter=",", header=",".join(header), comments="", fmt=fmt)


def make_wave(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    t = rng.normal(0.0, 2.0, n)
    X = np.column_stack([t, np.cos(1.4 * t)]) + rng.normal(0.0, 0.1, (n, 2))
    return (X - X.mean(0)) / X.std(0)


def make_digits(seed=0):
    from sklearn.datasets import load_digits
    d = load_digits()
    perm = np.random.default_rng(seed).permutation(len(d.target))
    X, y = d.data[perm] / 16.0, d.target[perm]
    return X[300:], X[:300], y[:300]


def fit(data, out, *args):
    """Train with the ``cpadgn fit`` command itself (deterministic: same seed, same file)."""
    from click.testing import CliRunner
    from cli.main import main as cpadgn
    res = CliRunner().invoke(cpadgn, ["fit", str(data), "-o", str(out), "--seed", "0", "--device", "cpu",
                                      "--quiet", *args], catch_exceptions=False)
    if res.exit_code:
        raise SystemExit(res.output)
    print(f"{out.name}: written")


def main():
    wave = make_wave()
    write_csv(HERE / "wave.csv", wave, ["x1", "x2"], "%.10f")
    train, test, labels = make_digits()
    cols = [f"pixel_{i}" for i in range(64)]
    write_csv(HERE / "digits_train.csv", train, cols, "%.4f")
    write_csv(HERE / "digits_test.csv", test, cols, "%.4f")
    np.savetxt(HERE / "digits_test_labels.csv", labels, fmt="%d", header="digit", comments="")
    fit(HERE / "wave.csv", HERE / "wave_generator.h5", "-S", "1", "--hidden", "16,16", "--max-iter", "300")
    fit(HERE / "digits_train.csv", HERE / "digits_generator.h5", "-S", "2", "--hidden", "32,32",
        "--max-iter", "40")
    fit(HERE / "digits_train.csv", HERE / "digits_vae.h5", "-S", "2", "--hidden", "32,32",
        "--method", "vae", "--max-iter", "300")


if __name__ == "__main__":
    main()
