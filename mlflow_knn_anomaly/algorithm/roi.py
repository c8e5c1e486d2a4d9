"""Inspection regions (ROI): a mask image, white for inspect and black for ignore.

Given at build time and saved inside the model, it is scaled to each input image (nearest
neighbour) and to its network input (`Geometry`), so that fixtures, labels and background never
count for the map score, the mask, the regions or the pixel metrics.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .images import Geometry

MAX_ASPECT_DIFFERENCE = 0.02  # relative: a ROI drawn for another framing would mask the wrong pixels


def read_roi(source: str | Path | bytes) -> np.ndarray:
    """(H, W) bool inspection region of a mask image file or its bytes: pixels above 127 are inspected.

    Raises:
        ValueError: not an image, or nothing to inspect (all black).
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as image:
            roi = np.asarray(image.convert("L")) > 127
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"roi {source if isinstance(source, (str, Path)) else 'bytes'} is not an image ({exc}); "
                         "give a mask image, white for inspect and black for ignore.") from None  # fmt: skip
    if not roi.any():
        raise ValueError("the roi is all black: nothing would be inspected. White marks what to inspect.")
    return roi


def check_roi(roi: np.ndarray, sizes: list[tuple[int, int]]) -> None:
    """The training images, (width, height) each, share one aspect ratio, and the ROI has it too
    (each within MAX_ASPECT_DIFFERENCE).

    Raises:
        ValueError: mixed aspect ratios, or a ROI of another aspect ratio, with the figures.
    """
    ratios = np.array([w / h for w, h in sizes])
    low, high = float(ratios.min()), float(ratios.max())
    if high / low - 1 > MAX_ASPECT_DIFFERENCE:
        raise ValueError(
            f"the training images have aspect ratios from {low:.3f} to {high:.3f} (width / height): one roi cannot "
            "fit them all. Crop them to one framing, or build without a roi."
        )
    images, mask = float(np.median(ratios)), roi.shape[1] / roi.shape[0]
    if abs(mask / images - 1) > MAX_ASPECT_DIFFERENCE:
        raise ValueError(
            f"the roi is {roi.shape[1]}x{roi.shape[0]} (aspect {mask:.3f}), the training images have aspect "
            f"{images:.3f}: draw the roi on an image of the same framing."
        )


def roi_at(roi: np.ndarray, height: int, width: int) -> np.ndarray:
    """The (height, width) bool ROI of an image of that size (nearest neighbour)."""
    if roi.shape == (height, width):
        return roi
    resized = Image.fromarray(roi.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    return np.asarray(resized) > 127


def roi_on_input(roi: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The ROI on the network input of an image with `geometry`: (H_in, W_in) bool, resized and
    cropped as the image was."""
    resized = roi_at(roi, geometry.input_height, geometry.input_width)
    if not geometry.crop:
        return resized
    left, top = geometry.offset
    return resized[top : top + geometry.crop, left : left + geometry.crop]


def encode_roi(roi: np.ndarray) -> bytes:
    """PNG bytes of a bool ROI (0/255), as saved inside a model."""
    buffer = io.BytesIO()
    Image.fromarray(roi.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()
