"""Image to tensor, the way the model was trained to see it, and maps back to the image.

The preprocessing follows timm's eval transform (resize, crop, mean/std) but is written out here
so that the geometry is known exactly: every map can be put back onto the uploaded image, at its
own size and aspect ratio, with the parts the model never saw (cropped away) left at zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

from service.engine.models.spec import CropMode, Interpolation, PreprocessOverrides

#: Input channels a served model may take: RGB, or grey (timm's ``in_chans=1``).
SUPPORTED_CHANNELS: tuple[int, ...] = (3, 1)

_RESAMPLE: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything needed to turn an image into the model's input tensor.

    ``channels`` is 3 (RGB) or 1 (grey: colour images are converted to luminance); ``mean``
    and ``std`` hold one value per channel. Anything else raises ``ValueError``.
    """

    input_size: tuple[int, int]  # (height, width)
    interpolation: Interpolation
    crop_pct: float
    crop_mode: CropMode
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int = 3

    def __post_init__(self) -> None:
        if self.channels not in SUPPORTED_CHANNELS:
            raise ValueError(
                f"{self.channels} input channels are not supported; a model takes 3 (RGB) or 1"
                " (grey, in_chans: 1)."
            )
        for name, values in (("mean", self.mean), ("std", self.std)):
            if len(values) != self.channels:
                raise ValueError(
                    f"preprocessing {name} has {len(values)} values but the model takes"
                    f" {self.channels} input channel(s); give one value per channel."
                )

    def scale_needed(self, width: int, height: int) -> float:
        """The smallest scale at which an image of this size can be decoded and still only be
        shrunk (never enlarged) by the resize (at most 1)."""
        rw, rh, _, _ = _resize_plan(width, height, self)
        return min(1.0, max(rw / width, rh / height))

    @classmethod
    def from_timm(
        cls,
        data_config: dict[str, object],
        overrides: PreprocessOverrides | None = None,
        channels: int = 3,
    ) -> PreprocessConfig:
        """Build from ``timm.data.resolve_model_data_config`` output plus per-model overrides.

        timm's data config always gives RGB statistics; a grey model (``channels=1``) gets
        their average, unless the overrides give its single values.
        """
        size = data_config["input_size"]
        assert isinstance(size, tuple)
        interpolation = str(data_config.get("interpolation", "bicubic"))
        if interpolation not in _RESAMPLE:
            interpolation = "bicubic"
        crop_mode = str(data_config.get("crop_mode", "center"))
        if crop_mode not in ("center", "squash", "border"):
            crop_mode = "center"
        base = cls(
            input_size=(int(size[-2]), int(size[-1])),
            interpolation=interpolation,  # type: ignore[arg-type]
            crop_pct=float(data_config.get("crop_pct", 1.0)),  # type: ignore[arg-type]
            crop_mode=crop_mode,  # type: ignore[arg-type]
            mean=_per_channel(data_config["mean"], channels),
            std=_per_channel(data_config["std"], channels),
            channels=channels,
        )
        if overrides is None:
            return base
        return cls(
            input_size=overrides.input_size or base.input_size,
            interpolation=overrides.interpolation or base.interpolation,
            crop_pct=overrides.crop_pct or base.crop_pct,
            crop_mode=overrides.crop_mode or base.crop_mode,
            mean=overrides.mean or base.mean,
            std=overrides.std or base.std,
            channels=channels,
        )


def _per_channel(values: object, channels: int) -> tuple[float, ...]:
    """timm's per-channel statistics for ``channels`` channels: as given, or their average for
    one channel (what a grey image fed to RGB-trained filters summed into one sees)."""
    floats = tuple(float(v) for v in values)  # type: ignore[attr-defined]
    if channels == 1 and len(floats) > 1:
        return (sum(floats) / len(floats),)
    return floats


@dataclass(frozen=True)
class Geometry:
    """Where the model's input sits in the original image.

    A point at original pixel coordinate ``x`` (continuous, 0 at the left edge) lands at input
    coordinate ``x * scale_x - offset_x``; likewise for ``y``.
    """

    original_size: tuple[int, int]  # (height, width)
    input_size: tuple[int, int]  # (height, width)
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    def resized(self, width: int, height: int) -> Geometry:
        """The same mapping for the original image shown at (width, height) pixels."""
        old_h, old_w = self.original_size
        return Geometry(
            original_size=(height, width),
            input_size=self.input_size,
            scale_x=self.scale_x * old_w / width,
            scale_y=self.scale_y * old_h / height,
            offset_x=self.offset_x,
            offset_y=self.offset_y,
        )

    def input_box(self) -> tuple[float, float, float, float]:
        """The input's box in original pixel coordinates: (left, top, right, bottom), not
        clipped (in border mode it reaches past the image, over the padding). A map on the
        input, or on a feature grid, spans exactly this box."""
        left = self.offset_x / self.scale_x
        top = self.offset_y / self.scale_y
        right = (self.offset_x + self.input_size[1]) / self.scale_x
        bottom = (self.offset_y + self.input_size[0]) / self.scale_y
        return (left, top, right, bottom)

    def crop_box(self) -> tuple[float, float, float, float]:
        """The input's box in original pixel coordinates, clipped to the image."""
        h, w = self.original_size
        left, top, right, bottom = self.input_box()
        return (max(0.0, left), max(0.0, top), min(float(w), right), min(float(h), bottom))


def _resize_plan(width: int, height: int, cfg: PreprocessConfig) -> tuple[int, int, int, int]:
    """Return (resized_w, resized_h, left, top) of the crop window in the resized image.

    Mirrors timm's ``transforms_imagenet_eval``: center mode resizes the shorter side to
    ``size / crop_pct`` (both sides for non-square inputs) then center-crops; squash resizes both
    sides; border fits the whole image inside and pads (negative offsets).
    """
    out_h, out_w = cfg.input_size
    if cfg.crop_mode == "border":
        scale = min(out_w / width, out_h / height)
        rw, rh = max(1, round(width * scale)), max(1, round(height * scale))
        return rw, rh, -((out_w - rw) // 2), -((out_h - rh) // 2)
    scale_h = math.floor(out_h / cfg.crop_pct)
    scale_w = math.floor(out_w / cfg.crop_pct)
    if cfg.crop_mode == "center" and out_h == out_w:
        short, long_ = (width, height) if width <= height else (height, width)
        new_long = int(scale_h * long_ / short)
        rw, rh = (scale_h, new_long) if width <= height else (new_long, scale_h)
    else:
        rw, rh = scale_w, scale_h
    left = round((rw - out_w) / 2.0)
    top = round((rh - out_h) / 2.0)
    return rw, rh, left, top


def preprocess(
    image: Image.Image, cfg: PreprocessConfig, size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, Geometry]:
    """Turn a PIL image into a normalised (C, H, W) float32 tensor and its geometry.

    C is ``cfg.channels``: 3 (RGB), or 1, where colour images become their luminance
    (ITU-R 601-2, Pillow's ``"L"``) and grey images stay as they are. ``size`` (width, height):
    when ``image`` is a reduced copy of an upload of that size, the geometry is the upload's.
    """
    mode = "RGB" if cfg.channels == 3 else "L"
    if image.mode != mode:
        image = image.convert(mode)
    width, height = image.size
    out_h, out_w = cfg.input_size
    rw, rh, left, top = _resize_plan(width, height, cfg)
    resized = image.resize((rw, rh), _RESAMPLE[cfg.interpolation])
    if left >= 0 and top >= 0:
        window = resized.crop((left, top, left + out_w, top + out_h))
    else:
        fill = tuple(round(255 * m) for m in cfg.mean)
        window = Image.new(mode, (out_w, out_h), fill if mode == "RGB" else fill[0])
        window.paste(resized, (-left, -top))
    array = np.asarray(window, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    tensor = torch.from_numpy(((array - mean) / std).transpose(2, 0, 1).copy())
    geometry = Geometry(
        original_size=(height, width),
        input_size=(out_h, out_w),
        scale_x=rw / width,
        scale_y=rh / height,
        offset_x=float(left),
        offset_y=float(top),
    )
    if size is not None and size != (width, height):
        geometry = geometry.resized(*size)
    return tensor, geometry


def map_to_original(
    grid_map: np.ndarray, geometry: Geometry, *, normalize: bool = True
) -> np.ndarray:
    """Resample a map covering the model input onto the original image's pixel grid.

    Bilinear, with pixel-centre sampling (``align_corners=False``) and edge values held out to
    the input's border, as ``torch.nn.functional.grid_sample`` would. Pixels the model never saw
    (cropped away, or padding in border mode) get 0. The result is min-max normalised to [0, 1],
    as the reference library normalises its resized maps; ``normalize=False`` keeps the values
    of a map already in [0, 1] (the threshold floor must stay visible, not be subtracted away).

    The mapping is axis-aligned, so it is done as two 1-D interpolations (each output pixel mixes
    two source columns, then two source rows) in NumPy, without torch: this runs in the CPU
    pool, and torch's OpenMP threads there would compete with the model's.
    """
    height, width = geometry.original_size
    in_h, in_w = geometry.input_size
    source = np.asarray(grid_map, dtype=np.float32)
    xs = (np.arange(width, dtype=np.float32) + 0.5) * np.float32(geometry.scale_x)
    xs -= np.float32(geometry.offset_x)
    ys = (np.arange(height, dtype=np.float32) + 0.5) * np.float32(geometry.scale_y)
    ys -= np.float32(geometry.offset_y)
    # Only the seen columns and rows are interpolated: those whose centre lies in the input's
    # box, decided in float64 as the overlays' hatching decides it (overlays.seen_range; the
    # page's render.js too), so that a map's zeros are exactly the hatched pixels.
    left, top, right, bottom = geometry.input_box()
    c0, c1 = _first_centre_at(left, width), _first_centre_at(right, width)
    r0, r1 = _first_centre_at(top, height), _first_centre_at(bottom, height)
    out = np.zeros((height, width), dtype=np.float32)
    if c0 < c1 and r0 < r1:
        x0, x1, wx = _bilinear_taps(
            xs[c0:c1] * np.float32(source.shape[1] / in_w) - 0.5, source.shape[1]
        )
        y0, y1, wy = _bilinear_taps(
            ys[r0:r1] * np.float32(source.shape[0] / in_h) - 0.5, source.shape[0]
        )
        rows = source.take(y0, axis=0) * (1 - wy)[:, None] + source.take(y1, axis=0) * wy[:, None]
        seen = rows.take(x0, axis=1) * (1 - wx)  # take(): faster than fancy indexing
        seen += rows.take(x1, axis=1) * wx
        out[r0:r1, c0:c1] = seen
    if normalize:
        out -= out.min()
        out /= out.max() + np.float32(1e-7)
    return out


def _first_centre_at(edge: float, size: int) -> int:
    """The first of ``size`` pixels whose centre (``i + 0.5``) is at or past ``edge``."""
    return min(size, max(0, math.ceil(edge - 0.5)))


def _bilinear_taps(
    coords: npt.NDArray[np.float32], size: int
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp], npt.NDArray[np.float32]]:
    """Source indices on either side of each coordinate and the weight of the second, with
    coordinates held to [0, size - 1] (grid_sample's border padding)."""
    clamped = np.clip(coords, 0, size - 1)
    low = np.floor(clamped).astype(np.intp)
    high = np.minimum(low + 1, size - 1)
    return low, high, (clamped - low).astype(np.float32)
