"""ROAD's linear imputation against the reference (pytorch-grad-cam's NoisyLinearImputer, the
ROAD authors' code) with its noise off, and the equation every filled pixel must satisfy."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from pytorch_grad_cam.metrics.road import NoisyLinearImputer

from service.engine.faithfulness.imputation import NEIGHBOUR_WEIGHTS, impute, impute_many

#: The reference calls np.argwhere on a torch tensor, which NumPy 2 warns about.
REFERENCE_WARNING = "ignore:__array_wrap__ must accept context:DeprecationWarning"


def _case(seed: int, height: int = 30, width: int = 41) -> tuple[np.ndarray, np.ndarray]:
    """A random image (3, H, W) and a mask (H, W) keeping the pixels of a smooth blob's lower
    half plus scattered ones: holes of many shapes, touching the border."""
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((3, height, width)).astype(np.float32)
    rows, cols = np.mgrid[0:height, 0:width]
    blob = np.exp(-((rows - height * 0.3) ** 2 + (cols - width * 0.6) ** 2) / (2 * 8.0**2))
    keep = (blob < np.percentile(blob, 55)) | (rng.random((height, width)) < 0.05)
    return image, keep


@pytest.mark.filterwarnings(REFERENCE_WARNING)
@pytest.mark.parametrize("seed", [0, 1])
def test_imputation_matches_the_reference_imputer_without_noise(seed: int) -> None:
    image, keep = _case(seed)
    reference = NoisyLinearImputer(noise=0.0)(
        torch.from_numpy(image), torch.from_numpy(keep.astype(np.float32))
    ).numpy()
    ours = impute(image, keep)
    assert not np.allclose(reference[:, ~keep], image[:, ~keep], atol=0.1)  # it did fill in
    np.testing.assert_array_equal(ours[:, keep], image[:, keep])
    assert np.abs(ours - reference).max() <= 1e-6


def test_each_filled_pixel_is_the_weighted_mean_of_its_neighbours() -> None:
    image, keep = _case(2, height=17, width=13)
    filled = impute(image, keep)
    height, width = keep.shape
    for row, col in zip(*np.nonzero(~keep), strict=True):
        total, weights = np.zeros(3), 0.0
        for (d_row, d_col), weight in NEIGHBOUR_WEIGHTS:
            r, c = row + d_row, col + d_col
            if 0 <= r < height and 0 <= c < width:
                total += weight * filled[:, r, c]
                weights += weight
        np.testing.assert_allclose(filled[:, row, col], total / weights, atol=1e-10)


def test_without_a_known_pixel_everything_becomes_the_mean_and_with_all_known_nothing_changes() -> (
    None
):
    image, _ = _case(3, height=8, width=9)
    np.testing.assert_array_equal(impute(image, np.zeros((8, 9), dtype=bool)), 0.0)
    np.testing.assert_array_equal(impute(image, np.ones((8, 9), dtype=bool)), image)


def test_many_masks_solved_in_threads_give_each_mask_its_own_result() -> None:
    image, keep = _case(4)
    masks = [keep, ~keep, np.roll(keep, 5, axis=1)]
    for together, mask in zip(impute_many(image, masks), masks, strict=True):
        np.testing.assert_array_equal(together, impute(image, mask))


def test_the_server_does_not_load_scipy_until_a_road_score_is_computed() -> None:
    """Imported with the server, SciPy made explain over HTTP ~6 ms slower at c=1
    (bench/results/latency_cpu.md): it loads with the first imputation instead."""
    probe = (
        "import sys\n"
        "import service.api.app, service.runtime.runtime, service.engine.faithfulness.scores\n"
        "loaded = lambda: any(m == 'scipy' or m.startswith('scipy.') for m in sys.modules)\n"
        "before = loaded()\n"
        "import numpy as np\n"
        "from service.engine.faithfulness.imputation import impute\n"
        "impute(np.zeros((1, 4, 4)), np.eye(4, dtype=bool))\n"
        "print(before, loaded())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.split() == ["False", "True"]
