"""Edges of 3-D polyhedra and the point-to-polyhedron distance, against least-distance
programming by NNLS (Lawson and Hanson), an independent algorithm."""
import numpy as np
import pytest
from oracles import ldp_distance

from cpadgn.edges import distance_to_polyhedron, polyhedron_edges


def distances(a, c, mask, v):
    return distance_to_polyhedron(a, c, mask, polyhedron_edges(a, c, mask), v)


def test_distance_matches_least_distance_programming():
    rng = np.random.default_rng(0)
    B, F = 400, 7
    a = rng.normal(size=(B, F, 3))
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    c = rng.uniform(0.2, 2.0, size=(B, F))
    mask = np.ones((B, F), bool)
    mask[:100, 4:] = False          # unbounded: cones and wedges
    mask[100:130, 2:] = False       # two planes
    mask[130:140, 1:] = False       # a half-space
    v = rng.normal(size=(B, 3)) * 4
    d = distances(a, c, mask, v)
    ref = np.array([ldp_distance(a[i, mask[i]], c[i, mask[i]], v[i]) for i in range(B)])
    assert (ref == 0).sum() > 20 and (ref > 0).sum() > 200          # both cases are exercised
    # the distances are O(10); NNLS and the edge formula each round to ~1e-14 of that
    np.testing.assert_allclose(d, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("v, expected", [
    ((3.0, 0.0, 0.0), 2.0),                       # nearest point on a face
    ((3.0, 3.0, 0.0), 2 * np.sqrt(2)),            # on an edge
    ((3.0, 3.0, 3.0), 2 * np.sqrt(3)),            # at a vertex
    ((0.5, -0.2, 0.1), 0.0),                      # inside
])
def test_distance_to_a_cube(v, expected):
    a = np.concatenate([np.eye(3), -np.eye(3)])[None]
    c = np.ones((1, 6))
    d = distances(a, c, np.ones((1, 6), bool), np.array([v], float))
    # offsets c - a.v and edge points p - v + t e round to eps (|v| + |c|) per entry, and
    # sqrt(q.q) adds a few eps d: well within 16 eps (|v| + |c| + d)
    eps = np.finfo(float).eps
    assert abs(d[0] - expected) <= 16 * eps * (np.linalg.norm(v) + 1.0 + expected), (d, expected)


def test_slab_has_no_edges_and_far_translates_stay_exact():
    a = np.array([[[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]]])
    c = np.array([[1.0, 1.0]])
    edges = polyhedron_edges(a, c, np.ones((1, 2), bool))
    assert not edges.real.any()
    d = distances(a, c, np.ones((1, 2), bool), np.array([[1e3, -2e3, 1e4]]))
    np.testing.assert_allclose(d, [1e4 - 1], rtol=1e-15)


def test_volume_matches_the_convex_hull_and_is_infinite_exactly_when_unbounded():
    from scipy.optimize import linprog
    from scipy.spatial import ConvexHull, HalfspaceIntersection
    rng = np.random.default_rng(1)
    B, F = 100, 9
    a = rng.normal(size=(B, F, 3))
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    centre = rng.normal(size=(B, 3)) * 3                               # the origin is mostly outside
    c = rng.uniform(0.2, 2.0, size=(B, F)) + np.einsum("bfs,bs->bf", a, centre)
    volume = polyhedron_edges(a, c, np.ones((B, F), bool)).volume

    def unbounded(ai):                  # a direction d != 0 with a d <= 0
        return any(linprog(-d, A_ub=ai, b_ub=np.zeros(F), bounds=[(-1, 1)] * 3).fun < -1e-9
                   for d in np.vstack([np.eye(3), -np.eye(3)]))
    unb = np.array([unbounded(a[i]) for i in range(B)])
    assert 5 <= unb.sum() <= 40
    np.testing.assert_array_equal(np.isinf(volume), unb)
    hull = np.array([ConvexHull(HalfspaceIntersection(np.hstack([a[i], -c[i][:, None]]), centre[i])
                                .intersections).volume for i in np.flatnonzero(~unb)])
    np.testing.assert_allclose(volume[~unb], hull, rtol=1e-10)       # ~1e-14 observed; vertices rounded


def test_no_volume_is_claimed_where_a_third_facet_runs_through_an_edge():
    # The cube [-1, 1]^3 has volume 8.  A ninth facet x + y <= 2 touches it along the edge
    # x = y = 1, which is then an edge of three facet pairs on one line: the edge sum
    # would count that line more than once, so no volume may be claimed (inf).
    cube = np.vstack([np.eye(3), -np.eye(3)])
    extra = np.array([[1.0, 1.0, 0.0]]) / np.sqrt(2.0)
    a = np.stack([np.vstack([cube, -extra]), np.vstack([cube, extra])])
    c = np.array([[1.0] * 6 + [5.0], [1.0] * 6 + [np.sqrt(2.0)]])
    volume = polyhedron_edges(a, c, np.ones((2, 7), bool)).volume
    assert volume[0] == pytest.approx(8.0, rel=1e-14)                  # a facet that never touches
    assert volume[1] == np.inf


def test_table_edges_and_facet_polygons_do_not_depend_on_groups_or_threads():
    """The S = 3 table's packed edges (``likelihood._packed_edges``) and facet polygons
    (``polyhedron.region_facet_polygons``) split independent per-region work into groups
    run on threads: tiny groups on 2 threads give the bits of one group per facet count on
    1 thread.  Facet counts 1 to 8, some rows with a dead facet before live ones."""
    import torch

    from cpadgn.likelihood import _packed_edges
    from cpadgn.polyhedron import region_facet_polygons
    rng = np.random.default_rng(3)
    B, F = 300, 8
    a = rng.normal(size=(B, F, 3))
    a /= np.linalg.norm(a, axis=-1, keepdims=True)
    c = rng.uniform(0.2, 2.0, size=(B, F))
    real = np.arange(F)[None, :] < rng.integers(1, F + 1, size=B)[:, None]
    real[::7, 0] &= ~real[::7, 1:].any(1)                       # not real-first: sorted inside
    a, c = np.where(real[..., None], a, 0.0), np.where(real, c, 0.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _packed_edges(a, c, real, group=10 ** 6), region_facet_polygons(a, c, real, group=10 ** 6)
        torch.set_num_threads(2)
        many = _packed_edges(a, c, real, group=6), region_facet_polygons(a, c, real, group=6)
    finally:
        torch.set_num_threads(threads)
    for x, y in zip([*one[0], *vars(one[1]).values()], [*many[0], *vars(many[1]).values()]):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    assert np.isfinite(one[0][2]).sum() > 50 and one[1].line_first.size > 0   # bounded regions, twin lines


def test_two_nearly_parallel_facets_give_a_finite_edge_and_the_right_distance_and_volume():
    """A cube whose face x <= 1 has a twin tilted by 3e-9 rad: |a_j x a_k| = 3e-9 passes
    the parallel test but 1 - (a_j . a_k)^2 rounds to 0, which divided by zero (a warning
    on stderr in `cpadgn fit -S 3`) and made the edge's point and the distance NaN.
    Oracle: NNLS least-distance programming."""
    import warnings
    th = 3e-9
    a = np.concatenate([np.eye(3), -np.eye(3), [[np.cos(th), np.sin(th), 0.0]]])[None]
    c = np.ones((1, 7))
    mask = np.ones((1, 7), bool)
    v = np.array([[5.0, 0.3, -0.2], [5.0, -3.0, 0.0], [0.2, 0.1, 0.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edges = polyhedron_edges(a, c, mask)
        d = distance_to_polyhedron(np.repeat(a, 3, 0), np.repeat(c, 3, 0), np.repeat(mask, 3, 0),
                                   polyhedron_edges(np.repeat(a, 3, 0), np.repeat(c, 3, 0),
                                                    np.repeat(mask, 3, 0)), v)
    assert np.isfinite(edges.p[edges.real]).all()
    ref = [ldp_distance(a[0], c[0], x) for x in v]
    # the tilt moves the boundary by at most th |y| <= 3e-9; NNLS rounds to ~1e-14
    np.testing.assert_allclose(d, ref, rtol=0, atol=1e-8)
    # the volume term of the edge where the two planes meet rounds by eps / 3e-9 relative,
    # beyond the margin the likelihood allows: no volume (an upper bound) is claimed
    assert edges.volume[0] == np.inf
