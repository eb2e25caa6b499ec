"""Polytope Gaussian integrals against closed forms and Monte Carlo."""
import numpy as np
from scipy.stats import norm

from cpadgn.polytope import polytope_moments


def moments(A, b):
    A, b = np.asarray(A, float)[None], np.asarray(b, float)[None]
    return polytope_moments(A, b, np.ones(b.shape, bool))


def test_half_plane_and_quadrant_closed_forms():
    r = moments([[1.0, 0.0]], [0.7])
    assert abs(r.log_mass[0] - norm.logcdf(0.7)) < 1e-14
    assert abs(r.mean[0, 0] + norm.pdf(0.7) / norm.cdf(0.7)) < 1e-13
    r = moments([[1.0, 0.0], [0.0, 1.0]], [1.0, -0.5])
    assert abs(r.log_mass[0] - np.log(norm.cdf(1) * norm.cdf(-0.5))) < 1e-13


def test_origin_on_a_vertex_or_an_edge():
    assert abs(moments([[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0]).log_mass[0] - np.log(0.25)) < 1e-13
    assert abs(moments([[1.0, 0.0]], [0.0]).log_mass[0] - np.log(0.5)) < 1e-13
    th = np.array([0.3, 2.2, 4.0])
    A = np.stack([np.cos(th), np.sin(th)], -1)            # three lines through the origin
    cells = [moments(A * s[:, None], np.zeros(3)).log_mass[0]
             for s in np.array(np.meshgrid(*[[1, -1]] * 3)).reshape(3, -1).T]
    assert abs(sum(np.exp(c) for c in cells if np.isfinite(c)) - 1) < 1e-12


def test_far_box_in_log_space():
    r = moments([[1, 0], [-1, 0], [0, 1], [0, -1]], [21.0, -20.0, 1.0, 1.0])
    want = np.log(norm.sf(20) - norm.sf(21)) + np.log(norm.cdf(1) - norm.cdf(-1))
    assert abs(r.log_mass[0] - want) < 1e-9
    r = moments([[-1.0]], [-30.0])
    assert abs(r.log_mass[0] - norm.logsf(30)) < 1e-9 and abs(r.mean[0, 0] - 30.0332596) < 1e-6


def test_random_triangle_against_monte_carlo():
    rng = np.random.default_rng(0)
    th = rng.uniform(0, 2 * np.pi, 3)
    A, b = np.stack([np.cos(th), np.sin(th)], -1), np.array([0.3, 0.5, 0.2])
    r = moments(A, b)
    z = rng.standard_normal((1_000_000, 2))
    inside = (z @ A.T <= b).all(1)
    p = inside.mean()
    assert abs(np.exp(r.log_mass[0]) - p) < 4 * np.sqrt(p * (1 - p) / z.shape[0])
    se_mean = z[inside].std(0) / np.sqrt(inside.sum())
    assert np.all(np.abs(r.mean[0] - z[inside].mean(0)) < 4 * se_mean)


def test_three_dimensional_box_is_exact_and_random_polytope_within_error():
    A = np.array([[1.0, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1]])
    r = moments(A, [1, -0.5, 2, 1, 0.3])
    want = np.log((norm.cdf(1) - norm.cdf(.5)) * (norm.cdf(2) - norm.cdf(-1)) * norm.cdf(.3))
    assert abs(r.log_mass[0] - want) < 1e-12
    rng = np.random.default_rng(1)
    A, b = rng.normal(size=(6, 3)), rng.uniform(0.2, 1, 6)
    r = moments(A, b)
    z = rng.standard_normal((1_000_000, 3))
    p = (z @ A.T <= b).all(1).mean()
    se = np.hypot(np.sqrt(p * (1 - p) / z.shape[0]) / p, r.stderr[0])
    assert abs(r.log_mass[0] - np.log(p)) < 4 * se
