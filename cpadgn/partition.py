"""The partition of the latent space R^S into the linear regions of a generator.

A region is the convex polyhedron {z : G z <= h} of one sign pattern (see
``PiecewiseAffineNet.region_constraints``); only its facets (non-redundant rows) are
kept.  The regions tile R^S, unbounded ones included.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .network import PiecewiseAffineNet


@dataclass
class Partition:
    """All linear regions of one generator (R regions, K hidden units, S latent dims).

    patterns:        (R, K) bool, True where the unit's pre-activation is >= 0
    interior:        (R, S) a point strictly inside each region
    facet_ptr:       (R + 1,) int64 CSR offsets into facet_units
    facet_units:     (nnz,) int64, the unit k of every facet of every region
    bounded:         (R,) bool
    log_prior_mass:  (R,) log P[z in region] under N(0, I)
    log_prior_mass_stderr: (R,) its standard error (0 where computed exactly)
    clearance:       (R,) distance from the interior point to the nearest facet, a
                     lower bound on the region's inradius
    degenerate:      (R,) bool, near-degenerate regions (clearance < 1e-7): kept, flagged
    fingerprint:     the generator's fingerprint (PiecewiseAffineNet.fingerprint)
    method:          the enumeration algorithm used
    seconds:         wall time of the enumeration
    """

    patterns: np.ndarray
    interior: np.ndarray
    facet_ptr: np.ndarray
    facet_units: np.ndarray
    bounded: np.ndarray
    log_prior_mass: np.ndarray
    log_prior_mass_stderr: np.ndarray
    clearance: np.ndarray
    degenerate: np.ndarray
    fingerprint: str
    method: str
    seconds: float

    @property
    def n_regions(self) -> int:
        return int(self.patterns.shape[0])

    @property
    def n_facets(self) -> np.ndarray:
        """(R,) number of facets per region."""
        return np.diff(self.facet_ptr)

    def facets(self, net: PiecewiseAffineNet, regions: np.ndarray | None = None):
        """Padded facet constraints of some regions: {z : G z <= h}.

        regions: (B,) indices (default all).  Returns G (B, F, S), h (B, F) and
        mask (B, F) bool (False on padding rows, which are 0 <= 1), F the largest
        facet count among them.
        """
        idx = np.arange(self.n_regions) if regions is None else np.asarray(regions)
        G_all, h_all = net.region_constraints(self.patterns[idx])
        counts = self.n_facets[idx]
        F = int(counts.max(initial=0))
        B, S = idx.size, net.latent_dim
        G = np.zeros((B, F, S))
        h = np.ones((B, F))
        mask = np.arange(F)[None, :] < counts[:, None]
        rows = np.repeat(np.arange(B), counts)
        units = np.concatenate([self.facet_units[self.facet_ptr[i]:self.facet_ptr[i + 1]] for i in idx]) \
            if B else np.zeros(0, dtype=np.int64)
        G[mask] = G_all[rows, units]
        h[mask] = h_all[rows, units]
        return G, h, mask

    def locate(self, net: PiecewiseAffineNet, z: np.ndarray) -> np.ndarray:
        """Region index of each point (N, S) -> (N,) int64, -1 where the pattern is unknown."""
        keys = _pattern_keys(self.patterns)
        order = np.argsort(keys)
        q = _pattern_keys(net.patterns(z))
        pos = np.clip(np.searchsorted(keys[order], q), 0, max(len(keys) - 1, 0))
        found = (keys[order][pos] == q) if len(keys) else np.zeros(len(q), bool)
        return np.where(found, order[pos], -1)


def _pattern_keys(patterns: np.ndarray) -> np.ndarray:
    """Sign patterns (N, K) bool -> (N,) hashable byte strings."""
    packed = np.packbits(np.asarray(patterns, dtype=bool), axis=1)
    return np.array([row.tobytes() for row in packed], dtype=object) if packed.shape[1] \
        else np.array([b""] * packed.shape[0], dtype=object)
