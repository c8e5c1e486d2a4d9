"""SPADE (Cohen & Hoshen 2020): two-stage kNN anomaly detection on a pretrained CNN.

Stage 1 scores an image by the mean distance of its global feature to its K nearest normal
images; a gate calibrated for recall (`calibration.py`) decides which images go on. Stage 2
segments those: each pixel scores the mean distance to its kappa nearest features among the
pixels of the nearest normal images (nearest by `gallery_feature`'s global descriptor), per
pyramid layer, and the layers become one smoothed anomaly map (`anomaly_map.py`), whose highest
pixels score the image; the defect regions are read off the finished map (`regions.py`).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from ..config import SpadeConfig, check_segment, check_threshold
from ..runtime import resolve_device
from . import anomaly_map, artifacts, refine
from .backbone_specs import BACKBONES
from .backbones import Backbone, FeaturePyramid, build_backbone
from .bank import FeatureBank, Galleries
from .calibration import Calibration, control_limit, recall_gate, score_stats, synthetic_anomalies
from .drift import NormalReference, image_statistics
from .images import ImageLike, image_size, load_image, prepare
from .knn import ImageIndex
from .regions import Region, find_regions
from .roi import check_roi, read_roi, roi_at, roi_on_input


@dataclass(frozen=True)
class Prediction:
    """Results for N images, in input order.

    Attributes:
        scores: (N,) image scores as reported (see `fuse_scores`).
        normalized_scores: (N,) scores / image threshold, so 1.0 is the threshold.
        is_anomalous: (N,) bool, normalized score >= 1.
        segmented: (N,) bool, whether stage 2 ran.
        candidates: (N,) bool, whether the stage-1 gate passed the image (what segment="auto" runs).
        knn_scores: (N,) stage-1 scores (the paper's image score).
        map_scores: (N,) the anomaly-map image score where segmented, NaN elsewhere.
        anomaly_maps: per image, an (H_i, W_i) float32 anomaly map at the image's own size, or None
            (not segmented, or `return_maps=False`).
        masks: per image, an (H_i, W_i) bool mask (map >= pixel threshold, regions smaller than
            `min_region_area` dropped), or None.
        regions: per image, its defect regions (`regions.Region`, highest peak first), or None.
        rois: per image, its (H_i, W_i) bool inspection region, or None without a `roi`.
    """

    scores: np.ndarray
    normalized_scores: np.ndarray
    is_anomalous: np.ndarray
    segmented: np.ndarray
    candidates: np.ndarray
    knn_scores: np.ndarray
    map_scores: np.ndarray
    anomaly_maps: list[np.ndarray | None]
    masks: list[np.ndarray | None]
    regions: list[list[Region] | None]
    rois: list[np.ndarray | None]


class SpadeDetector:
    """Fit on normal images, then score and segment new ones.

    `config` holds the settings and is never changed by `fit`; what `fit` learns is `bank`,
    `index` and `calibration`.
    """

    def __init__(self, config: SpadeConfig | None = None, backbone: Backbone | None = None) -> None:
        self.config = config or SpadeConfig()
        self.device = resolve_device(self.config.device)
        backbone = backbone or build_backbone(self.config.backbone, self.config.weights, self.config.pyramid)
        self.backbone = backbone.to(self.device)
        self.bank: FeatureBank | None = None
        self.galleries: Galleries | None = None  # stage 2's, assembled from the bank
        self.index: ImageIndex | None = None  # stage 1, over the bank's stage-1 descriptors
        self.gallery_index: ImageIndex | None = None  # the gallery's images, when another descriptor picks them
        self.calibration: Calibration | None = None
        self.holdout: list[Image.Image] | None = None  # kept for `update`; saved with the model
        self.roi: np.ndarray | None = None  # (H, W) bool inspection region (`config.roi`); saved with the model

    # ---- features ---------------------------------------------------------------------------
    def extract(self, inputs: list[torch.Tensor]) -> tuple[np.ndarray, list[dict[str, torch.Tensor]]]:
        """Global (N, D) float32 features and, per image, locally aggregated features {layer: (C, h, w)}.

        Args:
            inputs: N network inputs (3, H_i, W_i); consecutive ones of the same size share a forward pass.
        """
        pooled, features = [], []
        start = 0
        while start < len(inputs):
            end = start + 1
            while end < len(inputs) and inputs[end].shape == inputs[start].shape:
                end += 1
            pyramid = self.backbone.extract(torch.stack(inputs[start:end]).to(self.device))
            layers = {name: self._aggregate(name, fmap) for name, fmap in pyramid.features.items()}
            pooled.append(self._global_feature(pyramid).float().cpu().numpy())
            features += [{name: fmap[i] for name, fmap in layers.items()} for i in range(end - start)]
            start = end
        return np.concatenate(pooled), features

    def _global_feature(self, pyramid: FeaturePyramid) -> torch.Tensor:
        """Stage 1's descriptor (`stage1_feature`), followed by the one that picks stage 2's gallery
        (`gallery_feature`) when that is another: see `_split`."""
        return torch.cat([global_descriptor(kind, pyramid) for kind in self.config.global_features], dim=1)

    def _split(self, pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(stage-1 descriptors, gallery descriptors) of (N, D) global features; the same array twice
        when one descriptor serves both."""
        cfg = self.config
        if len(cfg.global_features) == 1:
            return pooled, pooled
        width = descriptor_width(cfg, cfg.stage1_feature)
        return pooled[:, :width], pooled[:, width:]

    def _aggregate(self, name: str, fmap: torch.Tensor) -> torch.Tensor:
        """Locally aware features (feature_pool x feature_pool mean), optionally projected."""
        p = self.config.feature_pool
        if p > 1:
            fmap = F.avg_pool2d(fmap, p, stride=1, padding=p // 2, count_include_pad=False)
        if 0 < self.config.reduce_channels < fmap.shape[1]:
            projection = random_projection(name, fmap.shape[1], self.config.reduce_channels).to(fmap.device)
            fmap = torch.einsum("nchw,cr->nrhw", fmap, projection)
        return fmap

    def _batches(self, items: list[ImageLike], desc: str | None):
        """(inputs, geometries) per batch; a progress bar named `desc` on a terminal."""
        cfg = self.config
        for start in tqdm(range(0, len(items), cfg.batch_size), desc=desc, unit="batch", disable=_bar_off(desc)):
            yield self._prepare(items[start : start + cfg.batch_size])

    # ---- fit ----------------------------------------------------------------------------------
    def fit(self, images: list[ImageLike], progress: bool = False) -> SpadeDetector:
        """Build the bank from normal images and calibrate on a held-out share (see `split_holdout`).

        Every fit recomputes the whole fitted state; the config is left as it is.
        """
        bank_items, holdout_items = split_holdout(list(images), self.config)
        self.roi = self._read_roi(images)  # a bad roi fails here, before any work
        bank = self.build_bank(bank_items, "bank features" if progress else None)
        return self.fit_bank(bank, holdout_items, progress=progress)

    def fit_bank(self, bank: FeatureBank, holdout: list[ImageLike], progress: bool = False) -> SpadeDetector:
        """Adopt a bank (built here, on Spark, or enlarged by `update`) and calibrate on `holdout`."""
        if self.roi is None and self.config.roi:
            self.roi = self._read_roi(holdout)
        self.use_bank(bank)
        self.holdout = [load_image(item) for item in holdout]  # decoded once: calibration uses them twice
        self.calibration = self._calibrate(self.holdout, progress)
        return self

    def use_bank(self, bank: FeatureBank) -> None:
        """Take `bank` and index its global descriptors (stage 1's and, if another, the gallery's)."""
        cfg = self.config
        width = sum(descriptor_width(cfg, kind) for kind in cfg.global_features)
        if bank.pooled.shape[1] != width:
            raise ValueError(
                f"the bank's global features have {bank.pooled.shape[1]} columns; stage1_feature="
                f"{cfg.stage1_feature} and gallery_feature={cfg.gallery_feature} need {width}: "
                "build the bank with the detector's own settings."
            )
        stage1, gallery = self._split(bank.pooled)
        self.bank = bank
        self.galleries = Galleries(bank, cfg.gallery_images(), self.device)
        self.index = ImageIndex(self.config.image_index).fit(stage1)
        self.gallery_index = None if gallery is stage1 else ImageIndex(self.config.image_index).fit(gallery)

    def update(self, images: list[ImageLike], progress: bool = False) -> SpadeDetector:
        """A new detector with the same settings and backbone: this bank enlarged with the normal
        `images` (an evenly spread `holdout_fraction` of them joins the hold-out instead), then
        recalibrated on the whole hold-out. This detector is left as it is.

        Raises:
            ValueError: the detector has no hold-out images (a model saved in format 2).
        """
        if self.holdout is None:
            raise ValueError("this model was saved without its held-out images (format 2); rebuild it with build_bank.")
        bank_items, holdout_items = split_holdout(list(images), self.config, minimum=0)
        added = self.build_bank(bank_items, "new bank features" if progress else None)
        updated = SpadeDetector(self.config, backbone=self.backbone)
        updated.roi = self.roi
        return updated.fit_bank(self.bank.concat(added), self.holdout + holdout_items, progress)

    def _read_roi(self, images: list[ImageLike]) -> np.ndarray | None:
        """`config.roi` read and checked against the images' aspect ratios (None without one)."""
        if not self.config.roi:
            return None
        roi = read_roi(self.config.roi)
        check_roi(roi, [image_size(item) for item in images])
        return roi

    def _input_roi(self, geometry) -> np.ndarray | None:
        return None if self.roi is None else roi_on_input(self.roi, geometry)

    def _prepare(self, items: list[ImageLike]) -> tuple[list[torch.Tensor], list]:
        """Network inputs and geometries (`images.prepare`); outside the inspection region the input
        is mid-gray, the same in every image, so that nothing there (a fixture, a label, a pasted
        defect) reaches stage 1 or stage 2."""
        cfg = self.config
        inputs, geometries = prepare(items, cfg.resize, cfg.crop, cfg.keep_aspect)
        if self.roi is not None:
            for x, geometry in zip(inputs, geometries):
                outside = torch.from_numpy(~self._input_roi(geometry))
                x[:, outside] = ROI_FILL
        return inputs, geometries

    def bank_features(self, items: list[ImageLike]) -> tuple[np.ndarray, list[dict[str, np.ndarray]], np.ndarray]:
        """Bank rows of one batch: global (n, D) float32, per image {layer: (h * w, C) rows} in bank
        dtype, and (n, 3) image statistics (`drift.image_statistics`)."""
        inputs, _ = self._prepare(items)
        pooled, features = self.extract(inputs)
        dtype = self.config.bank_dtype
        rows = [
            {
                name: np.ascontiguousarray(f.permute(1, 2, 0).reshape(-1, f.shape[0]).cpu().numpy(), dtype)
                for name, f in image.items()
            }
            for image in features
        ]
        return pooled, rows, image_statistics(inputs)

    def build_bank(self, items: list[ImageLike], desc: str | None = None) -> FeatureBank:
        """The feature bank of normal images `items`."""
        size = self.config.batch_size
        batches = [
            self.bank_features(items[i : i + size])
            for i in tqdm(range(0, len(items), size), desc=desc, unit="batch", disable=_bar_off(desc))
        ]
        return FeatureBank.from_images(
            np.concatenate([b[0] for b in batches]),
            [r for b in batches for r in b[1]],
            np.concatenate([b[2] for b in batches]),
        )

    def _calibrate(self, images: list[Image.Image], progress: bool) -> Calibration:
        """Thresholds and score statistics of the held-out normal images, and the recall gate."""
        cfg = self.config
        knn, distances, sizes, rois = [], [], [], []
        for inputs, geometries in self._batches(images, "calibration" if progress else None):
            pooled, features = self.extract(inputs)
            scores, nn_indices = self.stage1(pooled)
            knn.append(scores)
            distances += [self._layer_distances(features[i], nn_indices[i]) for i in range(len(scores))]
            sizes += [x.shape[1:] for x in inputs]
            rois += [self._input_roi(g) for g in geometries]
        layer_scales = tuple(float(torch.cat([d[name].flatten() for d in distances]).mean()) for name in distances[0])
        scales = layer_scales if cfg.normalize_layers else None
        input_maps = [
            anomaly_map.combine_layers(d, s, cfg.layer_combine, cfg.sigma, scales) for d, s in zip(distances, sizes)
        ]
        knn_scores = np.concatenate(knn)
        map_scores = np.array(
            [anomaly_map.map_score(m, cfg.score_margin, cfg.score_top, r) for m, r in zip(input_maps, rois)]
        )
        maxima = np.array([float(m.max() if r is None else m[r].max()) for m, r in zip(input_maps, rois)])
        synthetic = self.stage1_scores(self._synthetic(images), "synthetic anomalies" if progress else None)
        z, stats = cfg.threshold_sigmas, score_stats(knn_scores, map_scores)
        every = np.ones(len(knn_scores), dtype=bool)  # as if past the gate: each held-out image has its map
        image_scores = (
            knn_scores
            if cfg.score_mode == "knn"
            else fuse_scores(knn_scores, map_scores, every, stats, cfg.score_fusion, cfg.map_weight)
        )
        return Calibration(
            image_threshold=control_limit(image_scores, z),
            pixel_threshold=control_limit(maxima, z),
            layer_scales=layer_scales,
            holdout_scores=tuple(float(x) for x in knn_scores),
            **stats,
            **recall_gate(knn_scores, synthetic, cfg.gate_recall),
        )

    def _synthetic(self, images: list[Image.Image]) -> list[Image.Image]:
        """The gate's synthetic anomalies of held-out images; with an inspection region only those
        that change a pixel inside it (one outside is invisible, and would open the gate for nothing)."""
        made = synthetic_anomalies(images)
        if self.roi is None:
            return made
        sources = [image for image in images for _ in range(len(made) // len(images))]
        return [
            a for a, src in zip(made, sources)
            if (np.asarray(a) != np.asarray(src)).any(axis=2)[roi_at(self.roi, src.height, src.width)].any()
        ]  # fmt: skip

    # ---- the two stages -----------------------------------------------------------------------
    def stage1(self, pooled: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image scores (Q,): mean distance to the K nearest normal images; and the (Q, M) indices of
        the M >= K nearest by `gallery_feature`, nearest first, M being the most images any layer's
        gallery needs."""
        k = self.config.k_images
        wanted = min(self.bank.n_images, max(k, *self.config.gallery_images().values()))
        stage1, gallery = self._split(pooled)
        sq_dist, nn_indices = self.index.search(stage1, wanted if self.gallery_index is None else k)
        if self.gallery_index is not None:
            _, nn_indices = self.gallery_index.search(gallery, wanted)
        return np.sqrt(sq_dist[:, :k]).mean(axis=1), nn_indices

    def stage1_scores(self, images: list[ImageLike], desc: str | None = None) -> np.ndarray:
        """(N,) stage-1 scores of images (no stage 2)."""
        scores = [self.stage1(self.extract(inputs)[0])[0] for inputs, _ in self._batches(images, desc)]
        return np.concatenate(scores) if scores else np.zeros(0)

    def image_statistics(self, images: list[ImageLike]) -> np.ndarray:
        """(N, 3) image statistics of images' network inputs (`drift.image_statistics`)."""
        rows = [image_statistics(inputs) for inputs, _ in self._batches(images, None)]
        return np.concatenate(rows) if rows else np.zeros((0, 3))

    def normal_reference(self) -> NormalReference:
        """What monitoring compares production images with: the held-out images' stage-1 scores
        and the bank images' statistics. A model saved before the bank kept its statistics uses
        its held-out images' (a tenth as many), and one saved before it kept their scores
        recomputes them (the same numbers); one saved without held-out images (format 2) has none."""
        if self.holdout is None:  # format 2: nothing kept to compare with
            return NormalReference(np.zeros(0), None, "none")
        saved = self.calibration.holdout_scores
        scores = np.asarray(saved) if saved is not None else self.stage1_scores(self.holdout).astype(np.float64)
        if self.bank.statistics is not None:
            return NormalReference(scores, np.asarray(self.bank.statistics, np.float64), "bank")
        return NormalReference(scores, self.image_statistics(self.holdout), "holdout")

    def _layer_distances(self, features: dict[str, torch.Tensor], nn_indices: np.ndarray) -> dict[str, torch.Tensor]:
        """Per layer, (1, 1, h, w) pixel distances to the gallery of the first `gallery_images()[layer]`
        of the (M,) nearest bank images `nn_indices`."""
        return anomaly_map.layer_distances(features, self.galleries(nn_indices), self.config.kappa)

    def stage2(
        self,
        features: dict[str, torch.Tensor],
        nn_indices: np.ndarray,
        size: tuple[int, int],
        pixel_threshold: float | None = None,
        roi: np.ndarray | None = None,
    ) -> np.ndarray:
        """(H, W) anomaly map of one image on its network input of `size`, from its features {layer: (C, h, w)}.

        With `pixel_threshold` (the one in force) and `exact_maps` off, the exhaustive search runs only
        where the map can reach it or the map score's top share of the (H, W) bool `roi` (`refine.py`).
        """
        cfg = self.config
        if cfg.exact_maps or pixel_threshold is None:
            scales = self.calibration.layer_scales if cfg.normalize_layers else None
            distances = self._layer_distances(features, nn_indices)
            return anomaly_map.combine_layers(distances, size, cfg.layer_combine, cfg.sigma, scales)
        return self.refined_stage2(features, nn_indices, size, pixel_threshold, roi)[0]

    def refined_stage2(
        self,
        features: dict[str, torch.Tensor],
        nn_indices: np.ndarray,
        size: tuple[int, int],
        pixel_threshold: float,
        roi: np.ndarray | None = None,
    ) -> tuple[np.ndarray, dict[str, float]]:
        """`stage2` searched exhaustively only where it matters (`refine.refined_map`): the (H, W) map
        and, per layer, the share of its cells searched exhaustively."""
        cfg = self.config
        counts, galleries = cfg.gallery_images(), self.galleries(nn_indices)
        nearest = {name: nn_indices[: counts[name]] for name in features}
        windows = {name: _nearest_images(self.bank, name, galleries[name].features, nearest[name], cfg.k_images)
                   for name in features}  # fmt: skip
        return refine.refined_map(
            features,
            galleries,
            windows,
            cfg.kappa,
            size,
            {
                "combine": cfg.layer_combine,
                "sigma": cfg.sigma,
                "layer_scales": self.calibration.layer_scales if cfg.normalize_layers else None,
            },
            pixel_threshold,
            {"margin": cfg.score_margin, "top": cfg.score_top},
            roi,
        )

    # ---- predict ------------------------------------------------------------------------------
    def predict(
        self,
        images: list[ImageLike],
        segment: str = "auto",
        image_threshold: float | None = None,
        pixel_threshold: float | None = None,
        progress: bool = False,
        min_region_area: float | None = None,
        return_maps: bool = True,
    ) -> Prediction:
        """Score images and segment those that need it.

        Args:
            images: paths, encoded bytes, PIL images or uint8 arrays.
            segment: "auto" (stage 2 only for images past the stage-1 gate), "all" or "none".
            image_threshold: overrides the config's or the calibrated image threshold.
            pixel_threshold: overrides the config's or the calibrated pixel threshold.
            progress: a progress bar on a terminal.
            min_region_area: overrides the config's (see `SpadeConfig.min_region_area`).
            return_maps: return the anomaly maps. Without them (and with `exact_maps` off), stage 2
                searches exhaustively only where a mask, a region or a score depends on it
                (`refine.py`); with them, every pixel, so that a map is exact wherever it is returned.
        """
        if self.calibration is None:
            raise RuntimeError("the detector is not fitted: call fit(normal_images) or SpadeDetector.load(path).")
        check_segment(segment)
        image_t, pixel_t = self.thresholds(image_threshold, pixel_threshold)
        # two_stage: the recall-calibrated gate filters; knn: the image threshold itself gates.
        gate = self.calibration.gate_threshold if self.config.score_mode == "two_stage" else image_t
        refine_at = None if return_maps else pixel_t  # stage2 searches whole under exact_maps
        knn, map_scores, maps, rois = self._run_stages(list(images), segment, gate, refine_at, progress)
        candidates = knn >= gate
        cfg = self.config
        scores = self.image_scores(knn, map_scores, candidates)
        area = cfg.min_region_area if min_region_area is None else min_region_area
        found = [None if m is None else find_regions(m, pixel_t, area, r) for m, r in zip(maps, rois)]
        return Prediction(
            scores=scores,
            normalized_scores=scores / image_t,
            is_anomalous=scores / image_t >= 1.0,
            segmented=~np.isnan(map_scores),
            candidates=candidates,
            knn_scores=knn.astype(np.float64),
            map_scores=map_scores,
            anomaly_maps=maps if return_maps else [None] * len(maps),
            masks=[None if f is None else f[1] for f in found],
            regions=[None if f is None else f[0] for f in found],
            rois=rois,
        )

    def image_scores(
        self, knn: np.ndarray, map_scores: np.ndarray, candidates: np.ndarray, fusion: str | None = None
    ) -> np.ndarray:
        """(N,) image scores from the two stages' (N,) scores, as `predict` reports them: two_stage
        fuses them (`fusion`, default the config's `score_fusion`) where `candidates` passed the
        gate; knn reports stage 1."""
        cfg = self.config
        if cfg.score_mode != "two_stage":
            return knn.astype(np.float64)
        stats = self.calibration.to_dict()
        return fuse_scores(knn, map_scores, candidates, stats, fusion or cfg.score_fusion, cfg.map_weight)

    def _run_stages(
        self, images: list[ImageLike], segment: str, gate: float, refine_at: float | None, progress: bool
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray | None], list[np.ndarray | None]]:
        """Stage 1 for every image, stage 2 for those `segment` asks for: (N,) stage-1 scores, (N,)
        map scores (NaN where not segmented), the anomaly maps and the inspection regions at each
        image's own size. With `refine_at`, a pixel threshold, the maps are exact only where they
        can reach it or the map score's top share (`stage2`)."""
        cfg = self.config
        knn, map_scores, maps, rois = [], [], [], []
        for inputs, geometries in self._batches(images, "predict" if progress else None):
            pooled, features = self.extract(inputs)
            scores, nn_indices = self.stage1(pooled)
            for i, geometry in enumerate(geometries):
                knn.append(scores[i])
                rois.append(None if self.roi is None else roi_at(self.roi, geometry.height, geometry.width))
                if segment == "all" or (segment == "auto" and scores[i] >= gate):
                    input_roi = self._input_roi(geometry)
                    input_map = self.stage2(features[i], nn_indices[i], geometry.input_shape, refine_at, input_roi)
                    map_scores.append(anomaly_map.map_score(input_map, cfg.score_margin, cfg.score_top, input_roi))
                    maps.append(geometry.to_image(torch.from_numpy(np.ascontiguousarray(input_map))))
                else:
                    map_scores.append(np.nan)
                    maps.append(None)
        # Stage-1 scores stay float32 (faiss's precision), so that fusing them gives the same bits as
        # every earlier release did.
        return np.asarray(knn, dtype=np.float32), np.asarray(map_scores, dtype=np.float64), maps, rois

    def thresholds(
        self, image_threshold: float | None = None, pixel_threshold: float | None = None
    ) -> tuple[float, float]:
        """(image, pixel) thresholds in force: the arguments, else the config's, else the calibrated ones."""
        image_t = check_threshold("image_threshold", image_threshold)
        pixel_t = check_threshold("pixel_threshold", pixel_threshold)
        return (
            image_t or self.config.image_threshold or self.calibration.image_threshold,
            pixel_t or self.config.pixel_threshold or self.calibration.pixel_threshold,
        )

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path, with_weights: bool = True) -> Path:
        """Write config.json (settings, calibration, artifact hashes), weights.safetensors (unless
        `with_weights` is False: a line model's category) and bank/ atomically."""
        if self.calibration is None:
            raise RuntimeError("nothing to save: call fit(normal_images) first.")
        return artifacts.save_detector(
            Path(path), self.config, self.calibration, self.backbone, self.bank, self.holdout, with_weights, self.roi
        )

    @classmethod
    def load(cls, path: str | Path, mmap: bool = True, backbone: Backbone | None = None) -> SpadeDetector:
        """Load a saved detector, verifying every artifact's sha256; the bank is memory-mapped.

        Args:
            backbone: the backbone to share (a line model's); None builds it from the saved weights.
        """
        saved = artifacts.load_detector(Path(path), mmap=mmap)
        if backbone is None:
            if saved.weights is None:
                raise ValueError(f"{path} holds no backbone weights (a line model's category): load the line model.")
            backbone = build_backbone(saved.config.backbone, str(saved.weights), saved.config.pyramid)
        detector = cls(saved.config, backbone=backbone)
        detector.use_bank(saved.bank)
        detector.calibration = saved.calibration
        detector.holdout = saved.holdout
        detector.roi = saved.roi
        return detector


def _nearest_images(
    bank: FeatureBank, layer: str, gallery: torch.Tensor, nn_indices: np.ndarray, k: int
) -> tuple[torch.Tensor, np.ndarray]:
    """The rows of `gallery` (`bank.gallery(layer, nn_indices)`: images in index order) that belong
    to the first k of `nn_indices` (the nearest), and each of those images' row count."""
    rows = bank.image_rows(layer, nn_indices)
    if k >= len(nn_indices):
        return gallery, rows
    starts = np.concatenate([[0], np.cumsum(rows)])
    positions = np.sort(np.searchsorted(np.sort(nn_indices), nn_indices[:k]))
    index = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in positions])
    return gallery[torch.from_numpy(index)], rows[positions]


def fuse_scores(
    knn: np.ndarray,
    map_scores: np.ndarray,
    candidates: np.ndarray,
    stats: dict[str, float],
    fusion: str = "map",
    map_weight: float = 1.0,
) -> np.ndarray:
    """two_stage image scores, on the map's scale so that one threshold serves every image.

    A segmented candidate is scored by `fusion` of its two stages' z-scores (from the held-out
    normal `stats`: knn_mean, knn_std, map_mean, map_std): "map" its map score alone, "max"
    whichever stage is more surprised, "mean" their average with the map's counted `map_weight`
    times. Any other image keeps its stage-1 z-score.
    """
    z_knn = (knn - stats["knn_mean"]) / stats["knn_std"]
    if fusion == "map":
        fused = map_scores
    else:
        z_map = (map_scores - stats["map_mean"]) / stats["map_std"]
        z = np.maximum(z_map, z_knn) if fusion == "max" else (map_weight * z_map + z_knn) / (map_weight + 1)
        fused = stats["map_mean"] + stats["map_std"] * z
    on_map_scale = stats["map_mean"] + stats["map_std"] * z_knn
    return np.where(candidates & ~np.isnan(map_scores), fused, on_map_scale).astype(np.float64)


def global_descriptor(kind: str, pyramid: FeaturePyramid) -> torch.Tensor:
    """(N, D) float32 global descriptors of a batch: "last" is the pooled last layer (the paper's);
    "pyramid" joins it with the pooled stage-2 layers, each block L2-normalised so that no block
    dominates by its scale."""
    if kind == "last":
        return pyramid.pooled.float()
    blocks = [pyramid.pooled, *(fmap.mean(dim=(2, 3)) for fmap in pyramid.features.values())]
    return torch.cat([F.normalize(b.float(), dim=1) for b in blocks], dim=1) / len(blocks) ** 0.5


def descriptor_width(config: SpadeConfig, kind: str) -> int:
    """D of `global_descriptor(kind, ...)` for the backbone and pyramid of `config`."""
    spec = BACKBONES[config.backbone]
    return spec.pooled_dim + (sum(spec.layer(name).channels for name in config.pyramid) if kind == "pyramid" else 0)


def _bar_off(desc: str | None) -> bool | None:
    """tqdm's `disable`: off without a description; None turns it off where output is not a terminal."""
    return True if desc is None else None


MIN_HOLDOUT = 5
ROI_FILL = 0.5  # the network input outside the inspection region (inputs are in [0, 1])


@functools.lru_cache(maxsize=32)
def random_projection(layer: str, channels: int, reduced: int) -> torch.Tensor:
    """A fixed (channels, reduced) Gaussian projection, scaled by 1/sqrt(reduced) so that distances
    are preserved in expectation (Johnson-Lindenstrauss). Seeded by the layer name: the same in
    every process, so it is rebuilt at load instead of being stored."""
    seed = int.from_bytes(hashlib.sha256(f"{layer}:{channels}:{reduced}".encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(channels, reduced, generator=generator) / reduced**0.5


def split_holdout(
    items: list[ImageLike], config: SpadeConfig, minimum: int = MIN_HOLDOUT
) -> tuple[list[ImageLike], list[ImageLike]]:
    """Split normal images into (bank, holdout): an evenly spread `holdout_fraction` (at least
    `minimum`) is held out.

    Raises:
        ValueError: too few images for `k_images` plus the hold-out (a first fit only: `minimum` > 0).
    """
    n = len(items)
    n_hold = min(n, max(minimum, int(round(config.holdout_fraction * n))))
    if minimum and n - n_hold < config.k_images:
        raise ValueError(
            f"{n} normal images are too few: k_images={config.k_images} plus {n_hold} held out for "
            f"calibration need {config.k_images + n_hold}. Add normal images or lower k_images."
        )
    hold = set(np.linspace(0, n - 1, n_hold).round().astype(int).tolist()) if n_hold else set()
    return [x for j, x in enumerate(items) if j not in hold], [x for j, x in enumerate(items) if j in hold]
