"""ROAD's noisy linear imputation (Rong et al. 2022, https://arxiv.org/abs/2202.00449).

Removed pixels are not blacked out (which a model can read as a signal of its own) but filled
in from their neighbours: each removed pixel becomes the weighted mean of its 8 neighbours (1/6
for the 4 sides, 1/12 for the 4 corners, renormalised at the image border), removed neighbours
included. That is one sparse linear system per mask, with one right-hand side per channel; the
ROAD score then adds Gaussian noise to the filled pixels
(:mod:`service.engine.faithfulness.scores`).

The system is the one pytorch-grad-cam's ``NoisyLinearImputer`` builds (the authors' code), set
up without Python loops and solved faster. Measured on 2 cores for a 224x224 mask removing 80%
of the pixels (40,142 unknowns): the reference takes 283 ms to set the system up (``lil_matrix``
element assignment) and 218 ms to solve it (SuperLU, COLAMD ordering); here the set-up takes
15 ms, and a nested-dissection ordering of the unknowns (separators of the pixel grid, which
minimum-degree orderings only approximate) with SuperLU's symmetric mode solves it in 90 ms.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import scipy.sparse as sp

#: (row offset, column offset) and weight of each neighbour, as in the ROAD paper's code.
NEIGHBOUR_WEIGHTS: Final = (
    ((1, 1), 1 / 12),
    ((0, 1), 1 / 6),
    ((-1, 1), 1 / 12),
    ((1, -1), 1 / 12),
    ((0, -1), 1 / 6),
    ((-1, -1), 1 / 12),
    ((1, 0), 1 / 6),
    ((-1, 0), 1 / 6),
)
#: Groups of unknowns at most this large end the nested dissection (measured: 16 to 64 solve
#: within 10% of each other; smaller groups cost more Python calls to order).
_LEAF: Final = 32
#: Threads that solve the systems of one call concurrently (SuperLU releases the GIL).
_SOLVER_THREADS: Final = max(1, min(4, os.cpu_count() or 1))


def impute(image: npt.NDArray[np.floating], known: npt.NDArray[np.bool_]) -> np.ndarray:
    """``image`` (C, H, W) with every pixel where ``known`` (H, W) is False replaced by the
    linear imputation of its neighbours, as float64 (no noise).

    With no known pixel at all the system has no solution to anchor it (its matrix is
    singular): every pixel becomes 0, the mean of normalised data.
    """
    channels, height, width = image.shape
    if known.shape != (height, width):
        raise ValueError(f"mask {known.shape} does not match image {image.shape}")
    flat = np.asarray(image, dtype=np.float64).reshape(channels, -1)
    known_flat = known.reshape(-1)
    missing = np.flatnonzero(~known_flat)
    result = flat.copy()
    if missing.size == 0:
        return result.reshape(image.shape)
    if missing.size == known_flat.size:
        return np.zeros_like(result).reshape(image.shape)
    # SciPy loads on the first ROAD score, not with the server: imported with it, explain over
    # HTTP at c=1 took 47.5-48.7 ms p50 instead of 41.4-42.1 (bench/latency_bench.py, two
    # interleaved runs each; OPENBLAS_NUM_THREADS=1 did not help, the cause is not known).
    from scipy.sparse.linalg import splu

    matrix, rhs = _system(flat, known_flat, missing, height, width)
    rows, cols = np.divmod(missing, width)
    order = _dissection_order(rows, cols)
    permuted = matrix[order][:, order].tocsc()
    factor = splu(
        permuted,
        permc_spec="NATURAL",
        diag_pivot_thresh=0.0,
        options={"SymmetricMode": True},
    )
    solution = np.empty((missing.size, channels))
    solution[order] = factor.solve(rhs[order])
    result[:, missing] = solution.T
    return result.reshape(image.shape)


def impute_many(
    image: npt.NDArray[np.floating], masks: list[npt.NDArray[np.bool_]]
) -> list[np.ndarray]:
    """:func:`impute` of one image under each of ``masks``, solved in parallel threads."""
    if len(masks) <= 1:
        return [impute(image, known) for known in masks]
    return list(_solver_pool().map(lambda known: impute(image, known), masks))


@lru_cache(maxsize=1)
def _solver_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_SOLVER_THREADS, thread_name_prefix="gradcam-road")


def _system(
    flat: np.ndarray, known: npt.NDArray[np.bool_], missing: np.ndarray, height: int, width: int
) -> tuple[sp.csr_matrix, np.ndarray]:
    """The (n, n) matrix and (n, C) right-hand side of the n missing pixels' equations:
    ``-d_i x_i + sum_j w_ij x_j = -sum_k w_ik v_k`` over missing neighbours ``j`` and known
    neighbours ``k``, ``d_i`` the weight of the neighbours inside the image."""
    count = missing.size
    unknown_index = np.full(known.size, -1, dtype=np.int64)
    unknown_index[missing] = np.arange(count)
    row0, col0 = np.divmod(missing, width)
    diagonal = np.ones(count)
    rhs = np.zeros((count, flat.shape[0]))
    rows, cols, values = [np.arange(count)], [np.arange(count)], [np.empty(0)]
    for (d_row, d_col), weight in NEIGHBOUR_WEIGHTS:
        row, col = row0 + d_row, col0 + d_col
        inside = (row >= 0) & (col >= 0) & (row < height) & (col < width)
        diagonal[~inside] -= weight
        equation = np.flatnonzero(inside)
        neighbour = (row * width + col)[inside]
        is_known = known[neighbour]
        rhs[equation[is_known]] -= weight * flat[:, neighbour[is_known]].T
        rows.append(equation[~is_known])
        cols.append(unknown_index[neighbour[~is_known]])
        values.append(np.full(int((~is_known).sum()), weight))
    values[0] = -diagonal
    import scipy.sparse as sp

    matrix = sp.csr_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
        shape=(count, count),
    )
    return matrix, rhs


def _dissection_order(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """An elimination order of pixels by nested dissection: split the pixels' bounding box
    across its longer side by one line of pixels (with 8 neighbours, one line already
    separates the two halves), order each half the same way, the separating line last."""
    parts: list[np.ndarray] = []

    def order(index: np.ndarray) -> None:
        if index.size <= _LEAF:
            parts.append(index)
            return
        r, c = rows[index], cols[index]
        r_low, r_high, c_low, c_high = int(r.min()), int(r.max()), int(c.min()), int(c.max())
        if r_high - r_low >= c_high - c_low:
            along, middle = r, (r_low + r_high) // 2
        else:
            along, middle = c, (c_low + c_high) // 2
        for half in (index[along < middle], index[along > middle]):
            if half.size:
                order(half)
        parts.append(index[along == middle])

    order(np.arange(rows.size))
    return np.concatenate(parts)
