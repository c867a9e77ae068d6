"""How far to trust a map: faithfulness scores that perturb the input by the map and watch the
model's probability of the explained class.

Every score uses ``p``, the target class's probability (softmax; for a multi-label model its
own sigmoid), ``M``, the map normalised to [0, 1] at the model's input size
(:attr:`CamMap.input_map`), and ``x``, the normalised model input:

- ``confidence_change`` = p(x * M) - p(x) (pytorch-grad-cam's ``CamMultImageConfidenceChange``
  with a softmax target): keeping only what the map shows should not lose the class;
- ``drop`` = max(0, p(x) - p(x * M)) / p(x): Grad-CAM++'s "average drop" term, per image
  (lower is better);
- ``increase`` = 1 if p(x * M) > p(x) else 0 (Grad-CAM++'s "increase in confidence");
- ``road``: ROAD combined (Rong et al. 2022, https://arxiv.org/abs/2202.00449): for each
  percentile q, the pixels at or above the map's q-th percentile are removed (most relevant
  first, MoRF) or those at or above the q-th percentile of 1 - M (least relevant first, LeRF),
  filled by noisy linear imputation (:mod:`service.engine.faithfulness.imputation`, noise
  0.01 in normalised units); the score is the mean over q of (p(LeRF) - p(MoRF)) / 2 (higher
  is better), as pytorch-grad-cam's ``ROADCombined``;
- ``deletion`` / ``insertion`` (RISE, Petsiuk et al. 2018, https://arxiv.org/abs/1806.07421):
  pixels are replaced, most relevant first (ties in raster order), by those of a blurred copy of
  the input (deletion), or the blurred copy gets the input's pixels back in that order
  (insertion); the score is the area under p as a function of the fraction of pixels changed,
  with ``curve_step`` of the pixels per step (deletion: lower is better; insertion: higher).

All perturbed inputs of a call go through the model in batches on its device, without
gradients. The ROAD noise of each map comes from a generator seeded by the map's layer and
class, so the same request gives the same scores, whatever else the batcher put beside it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from service.engine.cam.costs import Checkpoint, Cost, CostLimits, check_cost, no_checkpoint
from service.engine.cam.explain import CamMap, ImageRequest
from service.engine.faithfulness.imputation import impute_many
from service.engine.models.loaded import LoadedModel
from service.errors import InvalidParameterError

ScoreName = Literal["confidence_change", "drop", "increase", "road", "deletion", "insertion"]
SCORE_NAMES: Final[tuple[ScoreName, ...]] = get_args(ScoreName)
#: One line per score, for the API's and the commands' documentation.
SCORE_DESCRIPTIONS: Final[dict[ScoreName, str]] = {
    "confidence_change": "p(x*M) - p(x): the probability kept when only the map is shown",
    "drop": "max(0, p(x) - p(x*M)) / p(x): Grad-CAM++'s average-drop term (lower is better)",
    "increase": "1 if p(x*M) > p(x), else 0: Grad-CAM++'s increase in confidence",
    "road": "ROAD combined: mean over percentiles of (p(LeRF) - p(MoRF)) / 2 with noisy linear"
    " imputation (higher is better)",
    "deletion": "area under p as the most relevant pixels are replaced by a blurred copy"
    " (lower is better)",
    "insertion": "area under p as the most relevant pixels are restored on a blurred copy"
    " (higher is better)",
}
#: Scores for which a lower value means a more faithful map.
LOWER_IS_BETTER: Final[frozenset[str]] = frozenset({"drop", "deletion"})
#: Scores answered by the one forward pass of x * M.
_MULTIPLY: Final[frozenset[str]] = frozenset({"confidence_change", "drop", "increase"})
_CURVES: Final[frozenset[str]] = frozenset({"deletion", "insertion"})

DEFAULT_ROAD_PERCENTILES: Final = (20, 40, 60, 80)
DEFAULT_CURVE_STEP: Final = 0.05
#: Standard deviation of the noise added to imputed pixels (normalised units), as ROAD's code.
ROAD_NOISE: Final = 0.01
#: RISE's blur: an 11-tap Gaussian with sigma 5 (pixels), here separable, borders replicated.
BLUR_TAPS: Final = 11
BLUR_SIGMA: Final = 5.0


@dataclass(frozen=True)
class ScoreOptions:
    """Which scores to compute, and their parameters."""

    names: tuple[ScoreName, ...]
    road_percentiles: tuple[int, ...] = DEFAULT_ROAD_PERCENTILES
    curve_step: float = DEFAULT_CURVE_STEP
    road_noise: float = ROAD_NOISE
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [name for name in self.names if name not in SCORE_NAMES]
        if unknown:
            raise InvalidParameterError(
                f"Unknown score '{unknown[0]}'. Use one of: {', '.join(SCORE_NAMES)}.",
                code="unknown_score",
                allowed=SCORE_NAMES,
            )
        if not self.road_percentiles or not all(0 < q < 100 for q in self.road_percentiles):
            raise InvalidParameterError("ROAD percentiles must be between 1 and 99.")
        if not 0.0 < self.curve_step <= 1.0:
            raise InvalidParameterError("curve_step must be a fraction in (0, 1].")
        if self.road_noise < 0:
            raise InvalidParameterError("road_noise must not be negative.")

    @property
    def curve_steps(self) -> int:
        """Steps of the deletion and insertion curves (points: one more)."""
        return max(1, math.ceil(1.0 / self.curve_step - 1e-9))

    def passes_per_map(self) -> int:
        """Forward passes one map's scores cost (besides :meth:`passes_per_image`)."""
        names = set(self.names)
        passes = 1 if names & _MULTIPLY else 0
        if "road" in names:
            passes += 2 * len(self.road_percentiles)
        # The curves' end points are x (known) and the blurred copy (one pass per image).
        passes += (self.curve_steps - 1) * len(names & _CURVES)
        return passes

    def passes_per_image(self) -> int:
        """Forward passes shared by every map of an image: the blurred copy of the curves."""
        return 1 if set(self.names) & _CURVES else 0

    def solves_per_map(self) -> int:
        """ROAD's sparse solves for one map (one per removal mask), on the CPU whatever the
        model's device: what the forward-pass count does not see."""
        return 2 * len(self.road_percentiles) if "road" in self.names else 0

    def passes(self, maps: int, images: int) -> int:
        """Forward passes for ``maps`` maps over ``images`` images."""
        if not self.names:
            return 0
        return maps * self.passes_per_map() + images * self.passes_per_image()

    def cost(self, maps: int, images: int) -> Cost:
        """What these scores cost for ``maps`` maps over ``images`` images."""
        return Cost(
            forward_passes=self.passes(maps, images), cpu_solves=maps * self.solves_per_map()
        )


def most_maps(model: LoadedModel, request: ImageRequest) -> int:
    """The most maps ``request`` can produce for one image: its layers times the most targets
    it can select."""
    return request.most_targets(model.num_classes) * len(model.layer_names(request.layers))


def check_score_cost(
    model: LoadedModel,
    requests: Sequence[ImageRequest],
    options: ScoreOptions,
    limit: int,
    max_road_solves: int | None = None,
) -> None:
    """Refuse, before any work, scores that would need more than ``limit`` forward passes, or
    more than ``max_road_solves`` of ROAD's sparse solves (CPU work that a fast device does not
    shorten: a request cheap in passes on a GPU can still hold its worker for minutes)."""
    maps = sum(most_maps(model, request) for request in requests)
    cost = options.cost(maps, len(requests))
    advice = (
        "Ask for fewer scores, images, targets or layers, fewer ROAD percentiles, or a larger"
        " curve_step."
    )
    check_cost(
        cost,
        CostLimits(max_forward_passes=limit),
        subject=f"The scores asked for ({', '.join(options.names)})",
        breakdown=f" ({maps} maps: {options.passes_per_map()} each, plus"
        f" {options.passes_per_image()} per image)",
        code="scores_too_costly",
        advice=advice,
    )
    check_cost(
        cost,
        CostLimits(max_cpu_solves=max_road_solves),
        subject="The ROAD score",
        breakdown=f" ({maps} maps: {options.solves_per_map()} each, two per percentile)",
        code="scores_too_costly",
        advice=advice,
    )


def score_maps(
    model: LoadedModel,
    inputs: torch.Tensor,
    maps: Sequence[Sequence[CamMap]],
    options: ScoreOptions,
    *,
    batch_size: int = 32,
    checkpoint: Checkpoint = no_checkpoint,
) -> int:
    """Compute ``options``' scores of every map (``maps[i]`` explains ``inputs[i]``) into
    :attr:`CamMap.scores`; return the forward passes run (:meth:`ScoreOptions.passes`).
    Perturbed inputs go through the model in batches of ``batch_size``; ``checkpoint`` is
    called before each batch and before each map's ROAD solves (it may stop the work with
    :class:`~service.engine.cam.costs.WorkAbandoned`)."""
    if len(maps) != inputs.shape[0]:
        raise ValueError(f"{inputs.shape[0]} images but {len(maps)} lists of maps")
    if not options.names:
        return 0
    names: set[str] = set(options.names)
    inputs = inputs.to(model.device).float()
    prober = _Prober(model, batch_size, checkpoint)
    finishers: list[Callable[[], None]] = []
    blurred = _blur(inputs) if names & _CURVES else None
    for i, image_maps in enumerate(maps):
        if not image_maps:
            continue
        x = inputs[i]
        blurred_p = None
        if blurred is not None:
            targets = tuple(dict.fromkeys(cam.target for cam in image_maps))
            values = prober.add(blurred[i : i + 1], targets)
            blurred_p = dict(zip(targets, range(len(targets)), strict=True)), values
        image_np = x.cpu().numpy() if "road" in names else None
        for cam in image_maps:
            mask = torch.from_numpy(cam.input_map).to(model.device)
            if names & _MULTIPLY:
                finishers.append(_multiply(prober, cam, x, mask, names))
            if image_np is not None:
                finishers.append(_road(prober, cam, image_np, options, checkpoint))
            if blurred is not None and blurred_p is not None:
                column, values = blurred_p
                finishers.append(
                    _curves(prober, cam, x, blurred[i], mask, options, values, column[cam.target])
                )
    prober.finish()
    for finish in finishers:
        finish()
    return prober.passes


# ----------------------------------------------------------------------------- the scores


def _multiply(
    prober: _Prober, cam: CamMap, x: torch.Tensor, mask: torch.Tensor, names: set[str]
) -> Callable[[], None]:
    values = prober.add((x * mask)[None], (cam.target,))

    def finish() -> None:
        before, after = cam.probability, float(values[0, 0])
        if "confidence_change" in names:
            cam.scores["confidence_change"] = after - before
        if "drop" in names:
            cam.scores["drop"] = max(0.0, before - after) / before if before > 0 else 0.0
        if "increase" in names:
            cam.scores["increase"] = 1.0 if after > before else 0.0

    return finish


def road_masks(input_map: np.ndarray, percentiles: Sequence[int]) -> list[np.ndarray]:
    """ROAD's kept pixels, (MoRF, LeRF) for each percentile: MoRF keeps the map's values under
    its percentile, LeRF those of ``1 - map`` under its percentile (pytorch-grad-cam's
    ``RemoveMostRelevantFirst`` and ``RemoveLeastRelevantFirst``, to the same float32 ties)."""
    relevance = np.asarray(input_map, dtype=np.float32)
    inverse = np.float32(1.0) - relevance
    masks = []
    for q in percentiles:
        masks.append(relevance < np.percentile(relevance, q))
        masks.append(inverse < np.percentile(inverse, q))
    return masks


def road_noise_seed(seed: int, cam: CamMap) -> int:
    """The seed of one map's ROAD noise, from the call's seed, the map's layer and its class:
    a request's scores do not depend on which other images share its engine call (Python's
    ``hash`` of a string changes between processes; CRC-32 does not)."""
    return zlib.crc32(f"{seed}:{cam.layer}:{cam.target}".encode())


def _road(
    prober: _Prober,
    cam: CamMap,
    image: np.ndarray,
    options: ScoreOptions,
    checkpoint: Checkpoint,
) -> Callable[[], None]:
    masks = road_masks(cam.input_map, options.road_percentiles)
    checkpoint(Cost(cpu_solves=len(masks)))
    generator = torch.Generator().manual_seed(road_noise_seed(options.seed, cam))
    perturbed = []
    for known, filled in zip(masks, impute_many(image, masks), strict=True):
        tensor = torch.from_numpy(filled).float()
        missing = torch.from_numpy(~known)
        noise = torch.randn(
            (tensor.shape[0], int(missing.sum())), generator=generator, dtype=torch.float32
        )
        tensor[:, missing] += options.road_noise * noise
        perturbed.append(tensor)
    values = prober.add(torch.stack(perturbed), (cam.target,))

    def finish() -> None:
        probabilities = values[:, 0]
        morf, lerf = probabilities[0::2], probabilities[1::2]
        cam.scores["road"] = float(np.mean(lerf - morf) / 2)

    return finish


def curve_counts(pixels: int, steps: int) -> np.ndarray:
    """Pixels changed at each point of a deletion or insertion curve: 0 to ``pixels`` in
    ``steps`` nearly equal steps."""
    return np.rint(np.arange(steps + 1) * pixels / steps).astype(np.int64)


def _curves(
    prober: _Prober,
    cam: CamMap,
    x: torch.Tensor,
    blurred: torch.Tensor,
    mask: torch.Tensor,
    options: ScoreOptions,
    blurred_values: np.ndarray,
    column: int,
) -> Callable[[], None]:
    pixels = mask.numel()
    counts = curve_counts(pixels, options.curve_steps)
    order = torch.argsort(mask.flatten(), descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(pixels, device=order.device)
    inner = torch.from_numpy(counts[1:-1]).to(mask.device)
    changed = (rank.view(1, *mask.shape) < inner.view(-1, 1, 1))[:, None]  # (steps - 1, 1, H, W)
    curves: dict[str, np.ndarray] = {}
    if "deletion" in options.names:
        curves["deletion"] = prober.add(torch.where(changed, blurred, x), (cam.target,))
    if "insertion" in options.names:
        curves["insertion"] = prober.add(torch.where(changed, x, blurred), (cam.target,))
    fractions = counts / pixels

    def finish() -> None:
        original, blurred_p = cam.probability, float(blurred_values[0, column])
        ends = {"deletion": (original, blurred_p), "insertion": (blurred_p, original)}
        for name, values in curves.items():
            start, end = ends[name]
            curve = np.concatenate([[start], values[:, 0], [end]])
            cam.scores[name] = _area(fractions, curve)

    return finish


def _area(x: np.ndarray, y: np.ndarray) -> float:
    """The trapezoidal area under ``y(x)``."""
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


def _blur(inputs: torch.Tensor) -> torch.Tensor:
    """RISE's substrate: each channel blurred by an 11-tap Gaussian of sigma 5, separably."""
    taps = torch.arange(BLUR_TAPS, dtype=torch.float32, device=inputs.device) - BLUR_TAPS // 2
    kernel = torch.exp(-(taps**2) / (2 * BLUR_SIGMA**2))
    kernel = kernel / kernel.sum()
    channels = inputs.shape[1]
    half = BLUR_TAPS // 2
    out = F.pad(inputs, (half, half, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    out = F.pad(out, (0, 0, half, half), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


# ----------------------------------------------------------------------------- batching


class _Prober:
    """Runs perturbed inputs through the model in batches, without gradients, and records the
    probabilities of the classes each input asks for.

    :meth:`add` returns an array that is filled once the inputs have run (at the latest in
    :meth:`finish`); inputs wait at most until a batch is full, so at most one batch and the
    latest addition are held at a time.
    """

    def __init__(
        self, model: LoadedModel, batch_size: int, checkpoint: Checkpoint = no_checkpoint
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self._model = model
        self._checkpoint = checkpoint
        self._batch_size = batch_size
        self._rows: list[tuple[torch.Tensor, tuple[int, ...], np.ndarray, int]] = []
        self.passes = 0

    def add(self, inputs: torch.Tensor, targets: tuple[int, ...]) -> np.ndarray:
        """Queue ``inputs`` (n, C, H, W); the result (n, len(targets)) holds each input's
        probability of each of ``targets``."""
        out = np.full((inputs.shape[0], len(targets)), np.nan)
        inputs = inputs.to(self._model.device)  # ROAD's imputed inputs are made on the CPU
        self._rows.extend((inputs[j], targets, out, j) for j in range(inputs.shape[0]))
        while len(self._rows) >= self._batch_size:
            self._run(self._batch_size)
        return out

    def finish(self) -> None:
        """Run every input still waiting."""
        while self._rows:
            self._run(self._batch_size)

    def _run(self, size: int) -> None:
        rows, self._rows = self._rows[:size], self._rows[size:]
        self._checkpoint(Cost(forward_passes=len(rows)))
        batch = torch.stack([row[0] for row in rows])
        with torch.inference_mode(), self._model.autocast():
            logits = self._model.module(batch)
        probabilities = self._model.probabilities(logits).cpu().numpy()
        self.passes += len(rows)
        for k, (_, targets, out, j) in enumerate(rows):
            out[j] = probabilities[k, list(targets)]
