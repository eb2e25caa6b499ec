"""Rebuild everything in sample_data/ (deterministic; needs scikit-learn for digits).

    python sample_data/make_sample_data.py

- wave.csv: the 2-D "wave" toy of Balestriero et al. (NeurIPS 2020): t ~ N(0, 2^2),
  x = (t, cos(1.4 t)) + N(0, 0.1^2 I), standardised per column; 1,000 rows.
- digits_train.csv / digits_test.csv: scikit-learn's bundled 8x8 digits
  (sklearn.datasets.load_digits, a copy of the UCI "Optical Recognition of
  Handwritten Digits" test set, CC BY 4.0), pixels divided by 16; a seeded
  1,497 / 300 split.  digits_test_labels.csv holds the digit of each test row.
- wave_generator.h5: a VAE decoder, S = 1, hidden 16-16, leaky ReLU 0.1, on wave.csv.
- digits_generator.h5: a VAE decoder, S = 2, hidden 32-32, leaky ReLU 0.1, on
  digits_train.csv.
Both models are cpadgn HDF5 model files (README, "Model file").
"""
from pathlib import Path

import numpy as np

from cpadgn.modelfile import save_model
from cpadgn.vae import train_vae

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


def fit_generator(X, path, *, latent_dim, hidden, epochs, seed=0):
    res = train_vae(X, latent_dim=latent_dim, hidden=hidden, slope=0.1, noise="iso",
                    epochs=epochs, lr=1e-3, seed=seed)
    vae = res.model
    save_model(path, vae.generator(), noise_std=vae.noise_std(),
               attrs={"trained_by": "sample_data/make_sample_data.py (VAE, Adam on the ELBO)",
                      "activations": ["leaky_relu:0.1"] * len(hidden), "epochs": epochs, "seed": seed},
               groups={"encoder": vae.encoder_arrays()})
    print(f"{path.name}: final train ELBO {res.history[-1]['train_elbo']:.3f}, "
          f"noise std {np.ravel(vae.noise_std())[0]:.4f}")


def main():
    wave = make_wave()
    write_csv(HERE / "wave.csv", wave, ["x1", "x2"], "%.10f")
    train, test, labels = make_digits()
    cols = [f"pixel_{i}" for i in range(64)]
    write_csv(HERE / "digits_train.csv", train, cols, "%.4f")
    write_csv(HERE / "digits_test.csv", test, cols, "%.4f")
    np.savetxt(HERE / "digits_test_labels.csv", labels, fmt="%d", header="digit", comments="")
    fit_generator(wave, HERE / "wave_generator.h5", latent_dim=1, hidden=(16, 16), epochs=300)
    fit_generator(train, HERE / "digits_generator.h5", latent_dim=2, hidden=(32, 32), epochs=300)


if __name__ == "__main__":
    main()
