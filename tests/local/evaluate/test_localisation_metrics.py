"""The pointing game and the energy in box on maps made by hand."""

from __future__ import annotations

import numpy as np

from service.local.evaluate import localisation


def test_an_empty_map_has_no_peak_so_it_misses_even_an_object_at_the_corner() -> None:
    region = np.zeros((8, 8), dtype=bool)
    region[:4, :4] = True  # the object covers pixel (0, 0), where argmax of zeros points
    empty = np.zeros((8, 8), dtype=np.float32)
    assert not localisation.pointing_hit(empty, region)
    assert not localisation.pointing_hit(empty, region, tolerance=3)
    assert localisation.energy_inside(empty, region) == 0.0
    peaked = empty.copy()
    peaked[1, 2] = 0.5
    assert localisation.pointing_hit(peaked, region)
