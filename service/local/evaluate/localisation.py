"""Whether a map points at the object: the pointing game (Zhang et al. 2016) and the energy in
box (Score-CAM's energy-based pointing game), on the image's pixels."""

from __future__ import annotations

import math

import numpy as np

#: The two measures' names, in results, in the report and for ``--rank-by``.
POINTING = "pointing_game"
ENERGY = "energy_in_box"


def peak(heat: np.ndarray) -> tuple[int, int] | None:
    """The map's peak as (row, column): its first maximum, in raster order; None for a map
    with nothing positive (Grad-CAM found no evidence for the class), which has no peak."""
    if not heat.size or float(heat.max()) <= 0:
        return None
    row, col = np.unravel_index(int(np.argmax(heat)), heat.shape)
    return int(row), int(col)


def pointing_hit(heat: np.ndarray, region: np.ndarray, tolerance: float = 0.0) -> bool:
    """Whether the map's :func:`peak` lies on ``region``, or within ``tolerance`` pixels of it
    (in rows and columns).

    A map without a peak is a miss, not a hit wherever an object covers pixel (0, 0), where
    argmax would point."""
    top = peak(heat)
    if top is None:
        return False
    row, col = top
    reach = math.floor(tolerance)
    window = region[
        max(0, row - reach) : row + reach + 1,
        max(0, col - reach) : col + reach + 1,
    ]
    return bool(window.any())


def energy_inside(heat: np.ndarray, region: np.ndarray) -> float:
    """The share of the map's sum that lies on ``region`` (0 for an empty map)."""
    total = float(heat.sum(dtype=np.float64))
    if total <= 0:
        return 0.0
    return float(heat[region].sum(dtype=np.float64)) / total
