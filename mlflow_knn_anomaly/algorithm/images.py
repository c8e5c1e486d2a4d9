"""Image decoding and the geometry between an input image and the network input.

Every decoded image becomes 8-bit RGB the same way, whatever its mode. `Geometry` records how an
image was resized and cropped so that maps computed on the network input can be put back at the
image's own width and height; outside the crop they are 0.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

ImageLike = str | Path | bytes | bytearray | Image.Image | np.ndarray

MAX_INPUT_PIXELS = 64_000_000  # larger images are refused before decoding (decompression bombs)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: alpha is dropped, 16/32-bit gray is rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")  # resolves palette transparency the same way for all
    return image.convert("RGB")


def load_image(item: ImageLike) -> Image.Image:
    """Decode a path, encoded bytes, PIL image or uint8 array into an RGB PIL image.

    Raises:
        ValueError: the input cannot be decoded, is empty, or exceeds MAX_INPUT_PIXELS.
        TypeError: the input is of an unsupported type.
    """
    if isinstance(item, Image.Image):
        image = item
    elif isinstance(item, np.ndarray):
        image = _from_array(item)
    elif isinstance(item, (bytes, bytearray, str, Path)):
        if isinstance(item, (bytes, bytearray)) and len(item) == 0:
            raise ValueError("empty image bytes; send the encoded PNG/JPEG/BMP/TIFF file content.")
        source = io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item
        try:
            with Image.open(source) as opened:
                if opened.width * opened.height > MAX_INPUT_PIXELS:
                    raise ValueError(
                        f"image of {opened.width}x{opened.height} pixels exceeds the cap of "
                        f"{MAX_INPUT_PIXELS} pixels; downscale it before sending."
                    )
                opened.load()
                image = opened.copy()
        except Image.DecompressionBombError as exc:
            raise ValueError(f"image exceeds the cap of {MAX_INPUT_PIXELS} pixels ({exc}); downscale it.") from exc
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            name = f"file {item}" if isinstance(item, (str, Path)) else "bytes"
            detail = "unknown image format" if isinstance(exc, UnidentifiedImageError) else str(exc)
            raise ValueError(
                f"cannot decode image {name}: {detail}. Expected a complete PNG, JPEG, BMP or TIFF."
            ) from exc
    else:
        raise TypeError(
            f"unsupported image type {type(item).__name__}; pass a path, encoded bytes, "
            "a PIL image or a uint8 array (H, W) or (H, W, 3)."
        )
    return to_rgb(image)


def image_size(item: ImageLike) -> tuple[int, int]:
    """(width, height) of an image, read from its header when it is a file or bytes."""
    if isinstance(item, Image.Image):
        return item.size
    if isinstance(item, np.ndarray):
        return item.shape[1], item.shape[0]
    try:
        with Image.open(io.BytesIO(item) if isinstance(item, (bytes, bytearray)) else item) as opened:
            return opened.size
    except (UnidentifiedImageError, OSError) as exc:
        name = item if isinstance(item, (str, Path)) else "bytes"
        raise ValueError(f"cannot read the size of image {name}: {exc}") from None


def _from_array(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"array images must be uint8 of shape (H, W), (H, W, 3) or (H, W, 4); got {array.dtype} {array.shape}."
        )
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1 else array)


# Sides of an aspect-kept network input are multiples of the deepest stride, so that every
# pyramid level tiles the input exactly.
SIDE_MULTIPLE = 32


def network_size(width: int, height: int, resize: int, keep_aspect: bool) -> tuple[int, int]:
    """(width, height) of the network input of a `width` x `height` image.

    Squashed: `resize` x `resize`. Aspect kept: about `resize`**2 pixels (the same cost as the
    square) in the image's aspect ratio, each side a multiple of SIDE_MULTIPLE.
    """
    if not keep_aspect:
        return resize, resize
    ratio = width / height
    return tuple(max(SIDE_MULTIPLE, round(resize * r**0.5 / SIDE_MULTIPLE) * SIDE_MULTIPLE) for r in (ratio, 1 / ratio))


@dataclass(frozen=True)
class Geometry:
    """How an image of `width` x `height` maps onto the network input.

    The image is resized to `input_width` x `input_height` (see `network_size`), then
    centre-cropped to `crop` x `crop` (0 = no crop).
    """

    width: int
    height: int
    input_width: int
    input_height: int
    crop: int = 0

    @property
    def offset(self) -> tuple[int, int]:
        """(left, top) of the crop inside the resized image (torchvision's CenterCrop rule)."""
        if not self.crop:
            return 0, 0
        return int(round((self.input_width - self.crop) / 2.0)), int(round((self.input_height - self.crop) / 2.0))

    @property
    def input_shape(self) -> tuple[int, int]:
        """(height, width) of the network input."""
        return (self.crop, self.crop) if self.crop else (self.input_height, self.input_width)

    def to_input(self, image: Image.Image) -> torch.Tensor:
        """(3, H, W) float tensor in [0, 1] of the network input."""
        resized = image.resize((self.input_width, self.input_height), Image.BILINEAR)
        if self.crop:
            left, top = self.offset
            resized = resized.crop((left, top, left + self.crop, top + self.crop))
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div_(255.0)

    def to_image(self, input_map: torch.Tensor) -> np.ndarray:
        """Put a map of the network input, `input_shape`, back at the image's own (height, width).

        Pixels outside the crop, which the network never saw, are 0.
        """
        canvas = input_map
        if self.crop:
            left, top = self.offset
            canvas = input_map.new_zeros((self.input_height, self.input_width))
            canvas[top : top + self.crop, left : left + self.crop] = input_map
        out = F.interpolate(canvas[None, None], size=(self.height, self.width), mode="bilinear", align_corners=False)
        return out[0, 0].numpy()


def prepare(
    items: list[ImageLike], resize: int, crop: int = 0, keep_aspect: bool = False
) -> tuple[list[torch.Tensor], list[Geometry]]:
    """Decode and resize a batch.

    Returns:
        Per image, its (3, H_i, W_i) network input in [0, 1] and its Geometry (all inputs have
        the same size unless `keep_aspect`).
    """
    tensors, geometries = [], []
    for item in items:
        image = load_image(item)
        geometry = Geometry(
            image.width, image.height, *network_size(image.width, image.height, resize, keep_aspect), crop
        )
        tensors.append(geometry.to_input(image))
        geometries.append(geometry)
    return tensors, geometries
