"""What a caller sees of its maps: upsampled maps, overlays and the panel, drawn in the CPU pool."""

from __future__ import annotations

import numpy as np
from PIL import Image

from service.engine.cam.explain import CamMap, PostProcess
from service.engine.imaging.images import DecodedImage
from service.engine.models.loaded import LoadedModel
from service.engine.models.preprocess import Geometry, map_to_original
from service.engine.pictures.overlays import MEDIA_TYPES, encode_image, overlay, render_panel
from service.engine.pictures.secondary_capture import (
    DICOM_MEDIA_TYPE,
    CaptureContent,
    secondary_capture,
)
from service.runtime.jobs import OutputOptions, RenderedMap

#: Overlays are drawn on the upload scaled to at most this many pixels on a side.
OVERLAY_MAX_SIDE = 1024


#: An overlay may be drawn on a photo decoded up to 5% smaller than its display size: a
#: 4032x3024 JPEG then decodes at 1/4 (1008x756), not 1/2, and is shown at that size.
OVERLAY_DECODE_FRACTION = 0.95


def overlay_size(decoded: DecodedImage, image: Image.Image) -> tuple[int, int]:
    """(width, height) of the overlay of ``decoded``, whose pixels are ``image``: at most
    ``OVERLAY_MAX_SIDE`` on a side, or ``image``'s own size if that is at most 5% smaller."""
    width, height = fit_within(decoded.width, decoded.height, OVERLAY_MAX_SIDE)
    if OVERLAY_DECODE_FRACTION * width <= image.width <= width:
        return image.size
    return width, height


def fit_within(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, so the longer side is at most ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def render_maps(
    model: LoadedModel,
    decoded: DecodedImage,
    maps: list[CamMap],
    geometry: Geometry,  # in the upload's pixel coordinates
    options: OutputOptions,
    post: PostProcess,
    max_upsampled_side: int,
) -> list[RenderedMap]:
    """The renderings ``options`` ask for, for each map of one image (drawn on the image as
    displayed: a DICOM frame windowed). ``upsampled=original`` maps are resampled to fit
    ``max_upsampled_side`` (their scale says by how much)."""
    image = decoded.image  # possibly decoded reduced: sizes come from the upload's own
    shown: np.ndarray | None = None
    shown_geometry = geometry
    if options.overlay != "none":
        width, height = overlay_size(decoded, image)
        small = image if (width, height) == image.size else image.resize((width, height))
        shown = np.asarray(small)
        shown_geometry = geometry.resized(width, height)
    seen = shown_geometry.input_box()  # outside it, the picture is drawn as not seen
    map_width, map_height = fit_within(decoded.width, decoded.height, max_upsampled_side)
    map_geometry = geometry.resized(map_width, map_height)
    normalize = post.renormalizes
    rendered: list[RenderedMap] = []
    for cam in maps:
        out = RenderedMap(cam=cam)
        if options.upsampled == "input":
            out.upsampled = cam.input_map
        elif options.upsampled == "original":
            out.upsampled = map_to_original(cam.grid_normalized, map_geometry, normalize=normalize)
            out.upsampled_scale = map_width / decoded.width
        if shown is not None:
            heat = map_to_original(cam.grid_normalized, shown_geometry, normalize=normalize)
            if options.overlay == "panel":
                label = model.labels[cam.target]
                title = f"{label} ({cam.probability:.1%}) | {cam.layer} | {cam.method}"
                picture = render_panel(
                    shown,
                    heat,
                    colormap=options.colormap,
                    alpha=options.alpha,
                    title=title,
                    seen=seen,
                )
                fmt = "png"
            else:
                picture = overlay(
                    shown, heat, colormap=options.colormap, alpha=options.alpha, seen=seen
                )
                fmt = options.overlay
            if fmt == "dicom":
                out.overlay = _secondary_capture(model, decoded, cam, picture)
                out.overlay_media_type = DICOM_MEDIA_TYPE
            else:
                out.overlay = encode_image(picture, fmt)
                out.overlay_media_type = MEDIA_TYPES[fmt]
            out.overlay_size = (int(picture.shape[1]), int(picture.shape[0]))
        rendered.append(out)
    return rendered


def _secondary_capture(
    model: LoadedModel, decoded: DecodedImage, cam: CamMap, picture: np.ndarray
) -> bytes:
    if decoded.dicom is None:  # checked before the work was queued
        raise ValueError("a Secondary Capture needs a DICOM source")
    content = CaptureContent(
        model=model.name,
        layer=cam.layer,
        method=cam.method,
        target=model.labels[cam.target],
        probability=cam.probability,
    )
    return secondary_capture(picture, decoded.dicom, content)
