"""SPADE (Cohen & Hoshen 2020): two-stage kNN anomaly detection on a pretrained CNN.

Stage 1 scores an image by the mean distance of its pooled feature to its K nearest normal
images. Stage 2, run only where needed, segments it: each pixel scores the mean distance to its
kappa nearest features in the gallery, the pixel features of those K images, per pyramid layer
(a coarser layer takes more of the nearest images, `scale_gallery`); the layer maps are upsampled,
combined (geometric mean by default, the paper's average as an option) and Gaussian-smoothed.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from tqdm.auto import tqdm

from . import artifacts
from .backbones import Backbone, build_backbone
from .bank import FeatureBank
from .config import SEGMENT_MODES, SpadeConfig
from .images import Geometry, ImageLike, prepare
from .knn import ImageIndex, pixel_knn


@dataclass(frozen=True)
class Prediction:
    """Results for N images, in input order.

    Attributes:
        scores: (N,) image scores (stage 1, or the map maximum for two_stage candidates).
        normalized_scores: (N,) scores / image threshold, so 1.0 is the threshold.
        is_anomalous: (N,) bool, normalized score >= 1.
        segmented: (N,) bool, whether stage 2 ran.
        candidates: (N,) bool, whether stage 1 passed the image to stage 2 (what segment="auto" does).
        knn_scores: (N,) stage-1 scores (the paper's image score).
        maps: per image, an (H_i, W_i) float32 anomaly map at the image's own size, or None.
        masks: per image, an (H_i, W_i) bool mask (map >= pixel threshold), or None.
    """

    scores: np.ndarray
    normalized_scores: np.ndarray
    is_anomalous: np.ndarray
    segmented: np.ndarray
    candidates: np.ndarray
    knn_scores: np.ndarray
    maps: list[np.ndarray | None]
    masks: list[np.ndarray | None]


class SpadeDetector:
    """Fit on normal images, then score and segment new ones."""

    def __init__(self, config: SpadeConfig | None = None, backbone: Backbone | None = None) -> None:
        self.config = config or SpadeConfig()
        self.backbone = backbone or build_backbone(self.config.backbone, self.config.weights, self.config.pyramid)
        self.bank: FeatureBank | None = None
        self.index: ImageIndex | None = None

    # ---- features ---------------------------------------------------------------------------
    def extract(self, inputs: list[torch.Tensor]) -> tuple[np.ndarray, list[dict[str, torch.Tensor]]]:
        """Pooled (N, D) float32 features and, per image, locally aggregated maps {layer: (C, h, w)}.

        Args:
            inputs: N network inputs (3, H_i, W_i); consecutive ones of the same size share a forward pass.
        """
        pooled, maps = [], []
        start = 0
        while start < len(inputs):
            end = start + 1
            while end < len(inputs) and inputs[end].shape == inputs[start].shape:
                end += 1
            pyramid = self.backbone.extract(torch.stack(inputs[start:end]))
            layers = {name: self._aggregate(name, fmap) for name, fmap in pyramid.maps.items()}
            pooled.append(pyramid.pooled.float().numpy())
            maps += [{name: fmap[i] for name, fmap in layers.items()} for i in range(end - start)]
            start = end
        return np.concatenate(pooled), maps

    def _aggregate(self, name: str, fmap: torch.Tensor) -> torch.Tensor:
        """Locally aware features (feature_pool x feature_pool mean), optionally projected."""
        p = self.config.feature_pool
        if p > 1:
            fmap = F.avg_pool2d(fmap, p, stride=1, padding=p // 2, count_include_pad=False)
        if 0 < self.config.reduce_channels < fmap.shape[1]:
            projection = random_projection(name, fmap.shape[1], self.config.reduce_channels)
            fmap = torch.einsum("nchw,cr->nrhw", fmap, projection)
        return fmap

    def _prepare(self, items: list[ImageLike]) -> tuple[list[torch.Tensor], list[Geometry]]:
        cfg = self.config
        return prepare(items, cfg.resize, cfg.crop, cfg.keep_aspect)

    def _batches(self, items: list[ImageLike], desc: str | None):
        size = self.config.batch_size
        for start in tqdm(range(0, len(items), size), desc=desc, unit="batch", disable=desc is None):
            inputs, geometries = self._prepare(items[start : start + size])
            yield start, inputs, geometries

    # ---- fit ----------------------------------------------------------------------------------
    def fit(self, images: list[ImageLike], progress: bool = False) -> SpadeDetector:
        """Build the bank from normal images and calibrate the thresholds on a held-out share.

        Every n-th image (a deterministic, evenly spread `holdout_fraction`, at least
        MIN_HOLDOUT) is held out of the bank; each threshold is the mean + `threshold_sigmas`
        standard deviations of the held-out scores (see `_calibrate`).
        """
        bank_items, holdout_items = split_holdout(list(images), self.config)
        return self.fit_bank(self._build_bank(bank_items, "bank features" if progress else None), holdout_items)

    def fit_bank(self, bank: FeatureBank, holdout: list[ImageLike]) -> SpadeDetector:
        """Adopt a bank built elsewhere (e.g. on Spark) and calibrate on the held-out images."""
        self.bank = bank
        self.index = ImageIndex(self.config.image_index).fit(bank.pooled)
        self.config = self.config.replace(**self._calibrate(holdout))
        return self

    def bank_features(self, items: list[ImageLike]) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
        """Bank rows of one batch: pooled (n, D) float32 and, per image, {layer: (h * w, C) rows} in bank dtype."""
        pooled, fmaps = self.extract(self._prepare(items)[0])
        rows = [
            {
                name: np.ascontiguousarray(
                    fmap.permute(1, 2, 0).reshape(-1, fmap.shape[0]).numpy(), self.config.bank_dtype
                )
                for name, fmap in image.items()
            }
            for image in fmaps
        ]
        return pooled, rows

    def _build_bank(self, items: list[ImageLike], desc: str | None) -> FeatureBank:
        size = self.config.batch_size
        batches = [
            self.bank_features(items[i : i + size])
            for i in tqdm(range(0, len(items), size), desc=desc, unit="batch", disable=desc is None)
        ]
        return FeatureBank.from_images(np.concatenate([b[0] for b in batches]), [r for b in batches for r in b[1]])

    def _calibrate(self, holdout: list[ImageLike]) -> dict[str, float]:
        knn_scores, distances, sizes = [], [], []
        for _, inputs, _ in self._batches(holdout, None):
            pooled, fmaps = self.extract(inputs)
            scores, nn_indices = self._stage1(pooled)
            knn_scores.append(scores)
            distances += [self._layer_distances(fmaps[i], nn_indices[i]) for i in range(len(scores))]
            sizes += [x.shape[1:] for x in inputs]
        layer_scales = self.config.layer_scales or tuple(
            float(torch.cat([d[name].flatten() for d in distances]).mean()) for name in distances[0]
        )
        input_maps = [self._combine(d, size, layer_scales) for d, size in zip(distances, sizes)]
        map_maxima = [float(m.max()) for m in input_maps]
        map_scores = [self._map_score(m) for m in input_maps]
        knn, maxima, map_score = np.concatenate(knn_scores), np.asarray(map_maxima), np.asarray(map_scores)
        # Control limits (mean + z std) are stable with the few images a hold-out has, where a
        # high quantile would just be the maximum of a handful of scores.
        z = self.config.threshold_sigmas
        stats = {
            "knn_mean": float(knn.mean()),
            "knn_std": max(float(knn.std(ddof=1)), 1e-12),  # identical hold-out images have std 0
            "map_mean": float(map_score.mean()),
            "map_std": max(float(map_score.std(ddof=1)), 1e-12),
        }
        calibrated = {
            **stats,
            "image_threshold": (
                stats["knn_mean"] + z * stats["knn_std"]
                if self.config.score_mode == "knn"
                else stats["map_mean"] + z * stats["map_std"]
            ),
            "pixel_threshold": float(maxima.mean() + z * maxima.std(ddof=1)),
            "candidate_threshold": stats["knn_mean"] + self.config.candidate_sigmas * stats["knn_std"],
        }
        # A value the user set in the config wins over the calibrated one.
        calibrated = {
            k: v if getattr(self.config, k) is None else getattr(self.config, k) for k, v in calibrated.items()
        }
        return {**calibrated, "layer_scales": layer_scales}

    # ---- the two stages -----------------------------------------------------------------------
    def _stage1(self, pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (Q,): mean distance to the K nearest normal images; and the (Q, M) indices of
        the M >= K nearest, nearest first, M being the most images any layer's gallery needs."""
        k = self.config.k_images
        wanted = min(self.bank.n_images, max(k, *self.config.gallery_images().values()))
        sq_dist, nn_indices = self.index.search(pooled, wanted)
        return np.sqrt(sq_dist[:, :k]).mean(axis=1), nn_indices

    def _layer_distances(self, fmaps: dict[str, torch.Tensor], nn_indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Per layer, the (1, 1, h, w) mean distance of each pixel to its kappa nearest gallery features.

        Args:
            fmaps: the query's maps {layer: (C, h, w)}.
            nn_indices: (M,) its nearest bank images, nearest first; each layer's gallery is the
                pixels of the first `gallery_images()[layer]` of them.
        """
        distances = {}
        gallery_images = self.config.gallery_images()
        for name, fmap in fmaps.items():
            c, h, w = fmap.shape
            query = fmap.float().permute(1, 2, 0).reshape(-1, c)
            gallery = self.bank.gallery(name, nn_indices[: gallery_images[name]])
            distances[name] = pixel_knn(query, gallery, self.config.kappa).view(1, 1, h, w)
        return distances

    def _combine(
        self, distances: dict[str, torch.Tensor], size: tuple[int, int], layer_scales: tuple[float, ...]
    ) -> np.ndarray:
        """Upsample the layer maps to the network input `size` (H, W), combine them (`layer_combine`:
        geometric or arithmetic mean; each divided by its layer scale with `normalize_layers`), smooth."""
        scales = layer_scales if self.config.normalize_layers else (1.0,) * len(distances)
        layer_maps = [
            F.interpolate(dist / scale, size=tuple(size), mode="bilinear", align_corners=False)
            for dist, scale in zip(distances.values(), scales, strict=True)
        ]
        stacked = torch.cat(layer_maps)[:, 0]
        if self.config.layer_combine == "geometric":
            score_map = stacked.clamp_min(1e-12).log().mean(dim=0).exp().numpy()
        else:
            score_map = stacked.mean(dim=0).numpy()
        return gaussian_filter(score_map, self.config.sigma) if self.config.sigma > 0 else score_map

    def _stage2(self, fmaps: dict[str, torch.Tensor], nn_indices: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """Anomaly map of one image on its network input of `size` (H, W), from its maps {layer: (C, h, w)}."""
        return self._combine(self._layer_distances(fmaps, nn_indices), size, self.config.layer_scales)

    def _map_score(self, input_map: np.ndarray) -> float:
        """Image score from a map of the network input: its maximum, ignoring `score_margin` pixels at
        the border, where zero padding inflates the features of every image (normal ones too). The
        margin shrinks on a narrow input so that a quarter of each side is always scored."""
        h, w = input_map.shape
        my, mx = (min(self.config.score_margin, side * 3 // 8) for side in (h, w))
        return float(input_map[my : h - my, mx : w - mx].max())

    # ---- predict ------------------------------------------------------------------------------
    def predict(
        self,
        images: list[ImageLike],
        segment: str = "auto",
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
    ) -> Prediction:
        """Score images and segment those that need it.

        Args:
            images: paths, encoded bytes, PIL images or uint8 arrays.
            segment: "auto" (stage 2 only for images past the stage-1 gate), "all" or "none".
            image_threshold, pixel_threshold: override the calibrated thresholds.
        """
        if self.bank is None or self.index is None:
            raise RuntimeError("the detector has no bank: call fit(normal_images) or SpadeDetector.load(path).")
        if segment not in SEGMENT_MODES:
            raise ValueError(f"segment={segment!r} is not one of {list(SEGMENT_MODES)}.")
        cfg = self.config
        image_t = _threshold("image_threshold", image_threshold, cfg.image_threshold)
        pixel_t = _threshold("pixel_threshold", pixel_threshold, cfg.pixel_threshold)
        # In two_stage mode stage 1 is a recall-oriented filter; in knn mode the image threshold gates.
        gate = cfg.candidate_threshold if cfg.score_mode == "two_stage" else image_t
        scores, knn_all, segmented, candidates, maps, masks = [], [], [], [], [], []
        for _, inputs, geometries in self._batches(list(images), None):
            pooled, fmaps = self.extract(inputs)
            knn, nn_indices = self._stage1(pooled)
            for i, geometry in enumerate(geometries):
                candidate = bool(knn[i] >= gate)
                run = segment == "all" or (segment == "auto" and candidate)
                score = float(knn[i])
                full_map = mask = None
                if run:
                    input_map = self._stage2(fmaps[i], nn_indices[i], geometry.input_shape)
                    full_map = geometry.to_image(torch.from_numpy(np.ascontiguousarray(input_map)))
                    mask = full_map >= pixel_t
                if cfg.score_mode == "two_stage":
                    # Candidates are scored by their map; the others by their stage-1 score put on
                    # the map's scale through z-scores of held-out normal images (same sigmas).
                    z_knn = (knn[i] - cfg.knn_mean) / cfg.knn_std
                    score = self._map_score(input_map) if run and candidate else cfg.map_mean + cfg.map_std * z_knn
                scores.append(score)
                knn_all.append(float(knn[i]))
                segmented.append(run)
                candidates.append(candidate)
                maps.append(full_map)
                masks.append(mask)
        scores_arr = np.asarray(scores, dtype=np.float64)
        normalized = scores_arr / image_t
        return Prediction(
            scores=scores_arr,
            normalized_scores=normalized,
            is_anomalous=normalized >= 1.0,
            segmented=np.asarray(segmented, dtype=bool),
            candidates=np.asarray(candidates, dtype=bool),
            knn_scores=np.asarray(knn_all, dtype=np.float64),
            maps=maps,
            masks=masks,
        )

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write config.json (with artifact hashes), weights.safetensors and bank/ atomically."""
        if self.bank is None:
            raise RuntimeError("nothing to save: call fit(normal_images) first.")
        return artifacts.save_detector(Path(path), self.config, self.backbone, self.bank)

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True) -> SpadeDetector:
        """Load a saved detector, verifying every artifact's sha256; the bank is memory-mapped."""
        config, weights, bank = artifacts.load_detector(Path(path), mmap=mmap)
        detector = cls(config, backbone=build_backbone(config.backbone, str(weights), config.pyramid))
        detector.bank = bank
        detector.index = ImageIndex(config.image_index).fit(bank.pooled)
        return detector


MIN_HOLDOUT = 5


@functools.lru_cache(maxsize=32)
def random_projection(layer: str, channels: int, reduced: int) -> torch.Tensor:
    """A fixed (channels, reduced) Gaussian projection, scaled by 1/sqrt(reduced) so that distances
    are preserved in expectation (Johnson-Lindenstrauss). Seeded by the layer name: the same in
    every process, so it is rebuilt at load instead of being stored."""
    seed = int.from_bytes(hashlib.sha256(f"{layer}:{channels}:{reduced}".encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(channels, reduced, generator=generator) / reduced**0.5


def split_holdout(items: list[ImageLike], config: SpadeConfig) -> tuple[list[ImageLike], list[ImageLike]]:
    """Split normal images into (bank, holdout): an evenly spread `holdout_fraction` is held out.

    Raises:
        ValueError: too few images for `k_images` plus the hold-out.
    """
    n = len(items)
    n_hold = max(MIN_HOLDOUT, int(round(config.holdout_fraction * n)))
    if n - n_hold < config.k_images:
        raise ValueError(
            f"{n} normal images are too few: k_images={config.k_images} plus {n_hold} held out for "
            f"calibration need {config.k_images + n_hold}. Add normal images or lower k_images."
        )
    hold = set(np.linspace(0, n - 1, n_hold).round().astype(int).tolist())
    return [x for j, x in enumerate(items) if j not in hold], [x for j, x in enumerate(items) if j in hold]


def _threshold(name: str, override: float | None, calibrated: float | None) -> float:
    value = calibrated if override is None else override
    if value is None:
        raise RuntimeError(f"{name} is not set: fit() calibrates it, or pass {name}=<float>.")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name}={value!r} must be a positive number.")
    return float(value)
