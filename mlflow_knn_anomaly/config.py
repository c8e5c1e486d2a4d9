"""SpadeConfig: the one frozen, validated source of truth for every setting.

MLproject parameters, CLI options and these fields map one to one, and the config is saved as
JSON inside every model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .backbones import BACKBONES

SEGMENT_MODES = ("auto", "all", "none")
LAYER_COMBINES = ("mean", "geometric")
SCORE_MODES = ("knn", "two_stage")
IMAGE_INDEXES = ("flat", "hnsw", "ivf")
BANK_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class SpadeConfig:
    """Every setting of a SPADE detector.

    Attributes:
        backbone: name of a registered backbone (see `backbones.BACKBONES`).
        weights: "default" (the backbone's ImageNet weights), "random" (tests and timing only)
            or a path to a `.safetensors` / `.pth` state dict.
        layers: pyramid layer names for stage 2; empty means the backbone's default pyramid.
        resize: network input size: `resize` x `resize` pixels, or with `keep_aspect` about as
            many pixels in the image's own aspect ratio (sides multiples of 32).
        crop: centre crop after the resize, in pixels; 0 keeps the whole resized image.
        keep_aspect: keep each image's aspect ratio instead of squashing it into a square.
        k_images: K, the number of nearest normal images (stage-1 score and stage-2 gallery).
        scale_gallery: a coarser layer's gallery takes the pixels of (stride / finest stride)^2
            times as many nearest images (capped at the bank), so every layer's gallery holds
            about as many features; a coarse layer has few features per image, so this stays cheap.
        kappa: the number of nearest gallery features averaged per pixel.
        sigma: Gaussian smoothing of the anomaly map, in pixels of the network input (the paper: 4;
            2 gave the higher AUPRO on both shared datasets with the geometric combine).
        normalize_layers: divide each layer's distance map by `layer_scales` before combining
            the layers, so that with `layer_combine="mean"` each contributes on one scale (else
            the layer with the largest distances dominates).
        layer_combine: how the upsampled layer maps become one: "mean" (the paper's) or
            "geometric" (their geometric mean: a pixel scores high only where every layer agrees,
            so a coarse layer's halo around a small defect is damped; it is also blind to each
            layer's distance scale, so no layer dominates and `normalize_layers` has no effect).
        feature_pool: side of the neighbourhood averaged around each feature before the pixel
            kNN (PatchCore's locally aware features); 1 disables it.
        reduce_channels: project each layer with more channels than this onto this many with a
            fixed random projection (smaller bank, approximate distances); 0 keeps all channels.
        score_mode: "knn" (the paper's stage-1 image score) or "two_stage" (stage 1 filters,
            the map's maximum scores the candidates).
        score_margin: pixels at the border of the network input that the map-based image score
            (two_stage) ignores; the mask and the pixel scores still cover them.
        image_index: faiss index of stage 1: "flat" (exact), "hnsw" or "ivf".
        bank_dtype: storage dtype of the pixel feature maps.
        holdout_fraction: share of the normal images held out of the bank to calibrate thresholds.
        threshold_sigmas: each threshold is mean + threshold_sigmas * std of the held-out normal
            images' scores (a 3-sigma control limit by default).
        candidate_sigmas: two_stage gate: mean + candidate_sigmas * std of held-out stage-1 scores.
        image_threshold: image-score threshold; None until calibrated (or set by the user).
        pixel_threshold: anomaly-map threshold of the mask; None until calibrated.
        candidate_threshold: stage-1 threshold that sends an image to stage 2 in two_stage mode.
        knn_mean, knn_std, map_mean, map_std: held-out normal statistics of the stage-1 score and
            of the map score, calibrated by fit; two_stage puts both on one scale with them.
        batch_size: images per backbone forward pass.
    """

    backbone: str = "efficientnet_lite0"
    weights: str = "default"
    layers: tuple[str, ...] = ()
    resize: int = 256
    crop: int = 0
    keep_aspect: bool = True
    k_images: int = 5
    scale_gallery: bool = True
    kappa: int = 1
    sigma: float = 2.0
    normalize_layers: bool = False
    layer_combine: str = "geometric"
    feature_pool: int = 3
    reduce_channels: int = 0
    score_mode: str = "two_stage"
    score_margin: int = 16
    image_index: str = "flat"
    bank_dtype: str = "float16"
    holdout_fraction: float = 0.1
    threshold_sigmas: float = 3.0
    candidate_sigmas: float = 0.0
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    candidate_threshold: float | None = None
    knn_mean: float | None = None
    knn_std: float | None = None
    map_mean: float | None = None
    map_std: float | None = None
    layer_scales: tuple[float, ...] = ()
    batch_size: int = 4

    def __post_init__(self) -> None:
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", tuple(x for x in self.layers.split(",") if x))
        else:
            object.__setattr__(self, "layers", tuple(self.layers))
        scales = self.layer_scales
        if isinstance(scales, str):
            try:
                scales = tuple(float(x) for x in scales.split(",") if x.strip())
            except ValueError as exc:
                raise ValueError(f"layer_scales={self.layer_scales!r} must be comma-separated numbers.") from exc
        object.__setattr__(self, "layer_scales", tuple(float(x) for x in scales))
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone={self.backbone!r} is unknown; choose one of {sorted(BACKBONES)}.")
        valid_layers = [layer.name for layer in BACKBONES[self.backbone].layers]
        bad = [name for name in self.layers if name not in valid_layers]
        if bad:
            raise ValueError(f"layers {bad} are not pyramid layers of {self.backbone}; valid names: {valid_layers}.")
        _check_choice("score_mode", self.score_mode, SCORE_MODES)
        _check_choice("layer_combine", self.layer_combine, LAYER_COMBINES)
        _check_choice("image_index", self.image_index, IMAGE_INDEXES)
        _check_choice("bank_dtype", self.bank_dtype, BANK_DTYPES)
        for name in ("resize", "k_images", "kappa", "feature_pool", "batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("crop", self.crop, minimum=0)
        _check_int("score_margin", self.score_margin, minimum=0)
        _check_int("reduce_channels", self.reduce_channels, minimum=0)
        if 2 * self.score_margin >= self.input_size:
            raise ValueError(f"score_margin={self.score_margin} leaves nothing of a {self.input_size}-px input.")
        for name in ("keep_aspect", "normalize_layers", "scale_gallery"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be true or false.")
        if self.layer_scales and (len(self.layer_scales) != len(self.pyramid) or min(self.layer_scales) <= 0):
            raise ValueError(
                f"layer_scales={list(self.layer_scales)} must hold one positive number per layer "
                f"of {list(self.pyramid)}, or be empty (calibrated by fit)."
            )
        if self.keep_aspect and self.crop:
            raise ValueError(f"crop={self.crop} needs a square input: set keep_aspect=false, or crop=0.")
        if self.crop > self.resize:
            raise ValueError(f"crop={self.crop} exceeds resize={self.resize}; use crop <= resize or 0.")
        if self.feature_pool % 2 == 0:
            raise ValueError(f"feature_pool={self.feature_pool} must be odd (1, 3, 5, ...).")
        if not isinstance(self.sigma, (int, float)) or self.sigma < 0:
            raise ValueError(f"sigma={self.sigma!r} must be a number >= 0 (0 disables smoothing).")
        if not 0.0 < self.holdout_fraction < 0.9:
            raise ValueError(f"holdout_fraction={self.holdout_fraction} must lie in (0, 0.9).")
        for name in ("threshold_sigmas", "candidate_sigmas"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not -3.0 <= value <= 10.0:
                raise ValueError(f"{name}={value!r} must be a number in [-3, 10].")
        for name in (
            "image_threshold",
            "pixel_threshold",
            "candidate_threshold",
            "knn_mean",
            "knn_std",
            "map_mean",
            "map_std",
        ):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive number or None (calibrate).")

    @property
    def pyramid(self) -> tuple[str, ...]:
        """The stage-2 layer names in use (the backbone's default when `layers` is empty)."""
        return self.layers or BACKBONES[self.backbone].default_layers

    def gallery_images(self) -> dict[str, int]:
        """Per stage-2 layer, how many nearest images give it its gallery (before capping at the bank)."""
        spec = BACKBONES[self.backbone]
        strides = {name: spec.layer(name).stride for name in self.pyramid}
        finest = min(strides.values())
        if not self.scale_gallery:
            return {name: self.k_images for name in strides}
        return {name: self.k_images * (stride // finest) ** 2 for name, stride in strides.items()}

    @property
    def input_size(self) -> int:
        """Side of the square network input in pixels."""
        return self.crop or self.resize

    def replace(self, **changes: Any) -> SpadeConfig:
        """A validated copy with `changes` applied."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        data = dataclasses.asdict(self)
        data["layers"] = list(self.layers)
        data["layer_scales"] = list(self.layer_scales)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpadeConfig:
        """Build from a dict, refusing unknown keys (a misspelt option must not pass silently)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SpadeConfig:
        return cls.from_dict(json.loads(text))


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}.")


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")
