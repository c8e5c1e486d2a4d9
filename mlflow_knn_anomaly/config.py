"""SpadeConfig: the settings a user chooses, frozen and validated.

MLproject parameters, CLI options and these fields map one to one, and the config is saved as
JSON inside every model. What `fit` learns from the data (thresholds, score statistics, the
stage-1 gate) is not a setting: it lives in `calibration.Calibration`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .algorithm.backbone_specs import BACKBONES

SEGMENT_MODES = ("auto", "all", "none")
LAYER_COMBINES = ("mean", "geometric")
SCORE_MODES = ("knn", "two_stage")
IMAGE_INDEXES = ("flat", "hnsw", "ivf")
BANK_DTYPES = ("float16", "float32")
GLOBAL_FEATURES = ("last", "pyramid")
SCORE_FUSIONS = ("map", "max", "mean")
DEVICES = ("auto", "cpu", "cuda")
# A threshold given by the user instead of the calibrated one; MLproject spells "none given" so.
CALIBRATED = "calibrated"
SYNTHETIC = "synthetic"  # `data`: the embedded synthetic dataset
MAX_CATEGORY_DROP = 0.005  # promote: the most one category of a line may lose


@dataclass(frozen=True)
class SpadeConfig:
    """Every setting of a SPADE detector.

    Attributes:
        backbone: name of a registered backbone (see `backbone_specs.BACKBONES`).
        weights: "default" (the backbone's ImageNet weights), "random" (tests and timing only)
            or a path to a `.safetensors` / `.pth` state dict.
        layers: pyramid layer names for stage 2; empty means the backbone's default pyramid.
        resize: network input size: `resize` x `resize` pixels, or with `keep_aspect` about as
            many pixels in the image's own aspect ratio (sides multiples of 32).
        crop: centre crop after the resize, in pixels; 0 keeps the whole resized image.
        keep_aspect: keep each image's aspect ratio instead of squashing it into a square.
        k_images: K, the number of nearest normal images (stage-1 score and stage-2 gallery).
        stage1_feature: the global descriptor of stage 1: "last" (the paper's average-pooled
            last layer) or "pyramid" (that feature joined with the average-pooled stage-2 layers,
            each block scaled to unit mean norm).
        gallery_feature: the global descriptor ("last" or "pyramid", as above) by which the
            nearest normal images are chosen for stage 2's gallery; stage 1 still scores the image
            by `stage1_feature`. "pyramid" picks images alike in every layer the map compares.
        scale_gallery: a coarser layer's gallery takes the pixels of (stride / finest stride)^2
            times as many nearest images (capped at the bank), so every layer's gallery holds
            about as many features; a coarse layer has few features per image, so this is cheap.
        kappa: the number of nearest gallery features averaged per pixel.
        sigma: Gaussian smoothing of the anomaly map, in pixels of the network input; larger
            values suit large defects, smaller ones thin defects.
        normalize_layers: divide each layer's distance map by its calibrated mean before
            combining, so that with `layer_combine="mean"` each layer contributes on one scale.
        layer_combine: how the upsampled layer maps become one: "mean" (the paper's) or
            "geometric" (a pixel scores high only where every layer agrees, which damps a coarse
            layer's halo around a small defect; blind to each layer's scale).
        feature_pool: side of the neighbourhood averaged around each feature before the pixel
            kNN (PatchCore's locally aware features); 1 disables it.
        reduce_channels: project each layer with more channels than this onto this many with a
            fixed random projection (smaller bank, approximate distances); 0 keeps all channels.
        score_mode: "knn" (the paper's stage-1 image score) or "two_stage" (stage 1 is a
            recall-calibrated gate, the anomaly map scores the images past it: see score_fusion).
        score_fusion: two_stage: the image score of an image past the gate, from the z-scores of
            its two stages (held-out normal statistics): "mean" (their average: a global change
            such as a missing part is seen by stage 1, a small defect by the map), "max" (the more
            surprised stage) or "map" (the map's alone, for data where stage 1 misleads).
        map_weight: score_fusion="mean": the map's z-score counts `map_weight` times stage 1's in
            the average (1 gives their plain mean; 5, the default, leans on the map and keeps stage
            1's view of global changes).
        score_margin: pixels at the border of the network input that the map-based image score
            ignores (zero padding inflates every image's border features); masks still cover them.
        score_top: the map-based image score is the mean of the highest `score_top` share of the
            map's pixels inside the margin (0.005: the top half percent); 0 takes the maximum alone,
            which one noisy pixel can decide.
        exact_maps: search every pixel of every layer exhaustively, always. False (the default):
            when a prediction returns no anomaly maps (`predict(return_maps=False)`; the pyfunc
            without `return_anomaly_map`), stage 2 searches exhaustively only the cells that feed a
            pixel which could reach the pixel threshold or the map score's top share, judged on an
            upper bound (`refine.py`): masks, regions and scores are the same. A map is exact
            wherever one is returned.
        image_index: faiss index of stage 1: "flat" (exact), "hnsw" or "ivf".
        bank_dtype: storage dtype of the pixel features.
        holdout_fraction: share of the normal images held out of the bank to calibrate.
        threshold_sigmas: each threshold is mean + threshold_sigmas * std of the held-out normal
            images' scores (a control limit).
        gate_recall: two_stage: the share of synthetic anomalies (made from held-out normal
            images at fit time) that the stage-1 gate must pass to stage 2. 1.0 sends every image.
        image_threshold, pixel_threshold: the user's thresholds; None uses the calibrated ones.
        roi: a path to a mask image, white for inspect and black for ignore (fixtures, labels,
            background), read at build time and saved inside the model; "" inspects everything.
            Outside it, pixels never count for the map score, the mask, the regions or the pixel
            metrics. The training images must share its aspect ratio.
        min_region_area: defect regions (connected components of the mask) smaller than this are
            dropped from the regions and the mask alike: pixels of the input image when >= 1, a
            share of its area below 1 (0 keeps every speck). The default, 0.05 % of the image (33
            pixels of 256 x 256), is the largest that lost no region recall on the shared sets
            with masks, and halved the false regions on anomalous images (benchmarks/regions.py).
        batch_size: images decoded and sent to the backbone at once (on a CPU, an input larger than
            256 x 256 goes through it in smaller passes: `backbones.CPU_PASS_PIXELS`).
        device: where the backbone and the pixel kNN run: "auto" (a CUDA GPU when there is one),
            "cpu" or "cuda". The bank stays in host memory; only each query's gallery moves.
    """

    backbone: str = "efficientnet_lite0"
    weights: str = "default"
    layers: tuple[str, ...] = ()
    resize: int = 256
    crop: int = 0
    keep_aspect: bool = True
    k_images: int = 5
    stage1_feature: str = "last"
    gallery_feature: str = "pyramid"
    scale_gallery: bool = True
    kappa: int = 1
    sigma: float = 2.0
    normalize_layers: bool = False
    layer_combine: str = "geometric"
    feature_pool: int = 3
    reduce_channels: int = 0
    score_mode: str = "two_stage"
    score_fusion: str = "mean"
    map_weight: float = 5.0
    score_margin: int = 16
    score_top: float = 0.005
    exact_maps: bool = False
    image_index: str = "flat"
    bank_dtype: str = "float16"
    holdout_fraction: float = 0.1
    threshold_sigmas: float = 3.0
    gate_recall: float = 0.98
    image_threshold: float | None = None
    pixel_threshold: float | None = None
    roi: str = ""
    min_region_area: float = 0.0005
    batch_size: int = 4
    device: str = "auto"

    def __post_init__(self) -> None:
        layers = self.layers.split(",") if isinstance(self.layers, str) else self.layers
        object.__setattr__(self, "layers", tuple(x for x in layers if x))
        for name, rule in CONSTRAINTS.items():
            rule(name, getattr(self, name))
        for name in OVERRIDES:
            object.__setattr__(self, name, check_threshold(name, getattr(self, name)))
        valid_layers = [layer.name for layer in BACKBONES[self.backbone].layers]
        bad = [name for name in self.layers if name not in valid_layers]
        if bad:
            raise ValueError(f"layers {bad} are not pyramid layers of {self.backbone}; valid names: {valid_layers}.")
        if 2 * self.score_margin >= self.input_size:
            raise ValueError(f"score_margin={self.score_margin} leaves nothing of a {self.input_size}-px input.")
        if self.keep_aspect and self.crop:
            raise ValueError(f"crop={self.crop} needs a square input: set keep_aspect=false, or crop=0.")
        if self.crop > self.resize:
            raise ValueError(f"crop={self.crop} exceeds resize={self.resize}; use crop <= resize or 0.")
        if self.feature_pool % 2 == 0:
            raise ValueError(f"feature_pool={self.feature_pool} must be odd (1, 3, 5, ...).")

    @property
    def pyramid(self) -> tuple[str, ...]:
        """The stage-2 layer names in use (the backbone's default when `layers` is empty)."""
        return self.layers or BACKBONES[self.backbone].default_layers

    @property
    def global_features(self) -> tuple[str, ...]:
        """The global descriptors the bank's global features hold, in order: stage 1's, then the
        gallery's when it is another."""
        return tuple(dict.fromkeys((self.stage1_feature, self.gallery_feature)))

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
        return {**dataclasses.asdict(self), "layers": list(self.layers)}

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


def read_category_settings(path: str | Path) -> dict[str, dict[str, Any]]:
    """Per-category setting overrides from a JSON or YAML file: {category: {setting: value}}.

    Raises:
        FileNotFoundError: no such file. ValueError: not such a mapping, or an unknown setting.
    """
    import yaml  # MLflow's own dependency; YAML is a superset of JSON, so it reads both

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"category settings file {path.resolve()} does not exist.")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is neither JSON nor YAML: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f'{path} must map each category to its settings, e.g. {{"bottle": {{"resize": 320}}}}.')
    known = {f.name for f in dataclasses.fields(SpadeConfig)}
    for category, settings in data.items():
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"{path}: category {category!r} sets unknown settings {unknown}; valid: {sorted(known)}.")
    return {str(k): v for k, v in data.items()}


def parse_categories(text: str | None) -> list[str] | None:
    """`-P categories=a,b` as a list (None when empty: every category of the root)."""
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return list(dict.fromkeys(names)) or None


def with_settings(config: SpadeConfig, overrides: dict[str, Any]) -> SpadeConfig:
    """`config` with `overrides` applied and validated (a list or comma string for `layers`)."""
    return SpadeConfig.from_dict({**config.to_dict(), **overrides})


def check_segment(segment: object) -> None:
    """`segment` of a predict call: one of SEGMENT_MODES."""
    if segment not in SEGMENT_MODES:
        raise ValueError(f"segment={segment!r} is not one of {list(SEGMENT_MODES)}.")


def check_threshold(name: str, value: object) -> float | None:
    """A user's threshold: None (use the calibrated one) or a positive number.

    Raises:
        ValueError: anything else, with what to pass instead.
    """
    if value is None or value == CALIBRATED:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a positive number (or omitted for the calibrated one).")
    return float(value)


def _choice(choices: tuple[str, ...]):
    def check(name: str, value: object) -> None:
        if value not in choices:
            raise ValueError(f"{name}={value!r} is not one of {list(choices)}.")

    return check


def _integer(minimum: int):
    def check(name: str, value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name}={value!r} must be an integer >= {minimum}.")

    return check


def _number(low: float, high: float, low_open: bool = False):
    def check(name: str, value: object) -> None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (low < value if low_open else low <= value) or not value <= high:
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            raise ValueError(f"{name}={value!r} must be a number in {interval}.")

    return check


def _boolean(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false.")


def _text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{name}={value!r} must be a string (a path, or empty for none).")


def _string(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name}={value!r} must be a non-empty string.")


# Each setting's constraint, as data (scikit-learn's `_parameter_constraints`); cross-field rules
# stay in `SpadeConfig.__post_init__`.
CONSTRAINTS = {
    "backbone": _choice(tuple(BACKBONES)),
    "weights": _string,
    "resize": _integer(1),
    "crop": _integer(0),
    "keep_aspect": _boolean,
    "k_images": _integer(1),
    "stage1_feature": _choice(GLOBAL_FEATURES),
    "gallery_feature": _choice(GLOBAL_FEATURES),
    "scale_gallery": _boolean,
    "kappa": _integer(1),
    "sigma": _number(0.0, math.inf),
    "normalize_layers": _boolean,
    "exact_maps": _boolean,
    "layer_combine": _choice(LAYER_COMBINES),
    "feature_pool": _integer(1),
    "reduce_channels": _integer(0),
    "score_mode": _choice(SCORE_MODES),
    "score_fusion": _choice(SCORE_FUSIONS),
    "map_weight": _number(0.0, math.inf),
    "score_margin": _integer(0),
    "score_top": _number(0.0, 1.0),
    "image_index": _choice(IMAGE_INDEXES),
    "bank_dtype": _choice(BANK_DTYPES),
    "holdout_fraction": _number(0.0, 0.9, low_open=True),
    "threshold_sigmas": _number(-3.0, 10.0),
    "gate_recall": _number(0.0, 1.0, low_open=True),
    "roi": _text,
    "min_region_area": _number(0.0, math.inf),
    "batch_size": _integer(1),
    "device": _choice(DEVICES),
}
OVERRIDES = ("image_threshold", "pixel_threshold")


@dataclass(frozen=True)
class MonitorLimits:
    """When a monitored batch alerts (`drift.reasons`; the `monitor` job's options).

    Attributes:
        p_value: a drift test alerts below this p-value. Four tests run per batch, so a batch of
            unchanged normal images alerts with a probability of at most 4 times this.
        min_change: an image statistic's drift alerts only when the batch's median also differs
            from the bank's by at least this share: with hundreds of bank images the test finds
            differences too small to matter (bottle's normal test images are 1 % brighter than its
            bank). The stage-1 score's drift needs no such margin: its reference is the few held-out
            images, and a change of the scores is one the model feels.
        max_anomalous_share: the batch alerts when more than this share of its images is anomalous.
            0.1: of 10 images, two. Normal batches of the shared sets reached 0.1 and never more;
            0.2 missed half the batches of 3 real anomalies in 10 on Magnetic Tile and ELPV.
        min_images: fewer images than this run no drift test (their p-values cannot reach the limit).
    """

    p_value: float = 1e-3
    min_change: float = 0.1
    max_anomalous_share: float = 0.1
    min_images: int = 5

    def __post_init__(self) -> None:
        if not 0.0 < self.p_value < 1.0:
            raise ValueError(f"p_value={self.p_value} must be in (0, 1), e.g. 0.001.")
        if self.min_change < 0.0:
            raise ValueError(f"min_change={self.min_change} must be at least 0 (0.1: a change of 10 %).")
        if not 0.0 <= self.max_anomalous_share < 1.0:
            raise ValueError(f"max_anomalous_share={self.max_anomalous_share} must be in [0, 1), e.g. 0.1.")
        if self.min_images < 2:
            raise ValueError(f"min_images={self.min_images} must be at least 2.")


@dataclass(frozen=True)
class TuneSettings:
    """How `tune` splits, resamples and decides (`tuning`; the `tune` job's options).

    Attributes:
        validation_fraction: the seeded share of each defect type and of good that validates.
        seed: the split's seed, and the bootstrap's.
        n_bootstrap: resamples of the validation images.
        required_win_rate: the share of them a candidate must win to replace the default.
        min_images: fewer validation defects or normal images than this keep the default.
    """

    validation_fraction: float = 0.3
    seed: int = 0
    n_bootstrap: int = 200
    required_win_rate: float = 0.9
    min_images: int = 5

    def __post_init__(self) -> None:
        if not 0.0 < self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction={self.validation_fraction} must be in (0, 1), e.g. 0.3.")
        if self.n_bootstrap < 1:
            raise ValueError(f"n_bootstrap={self.n_bootstrap} must be at least 1, e.g. 200.")
        if not 0.0 < self.required_win_rate <= 1.0:
            raise ValueError(f"required_win_rate={self.required_win_rate} must be in (0, 1], e.g. 0.9.")
        if self.min_images < 1:
            raise ValueError(f"min_images={self.min_images} must be at least 1, e.g. 5.")
