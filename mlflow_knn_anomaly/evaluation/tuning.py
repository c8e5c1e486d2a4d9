"""Choosing settings per part from the few real defects a team has, guarded against noise.

The test images of an MVTec-layout folder are split, per defect type and for `good`, into a
seeded validation share and a test share (`split_test`). Every candidate of `GRID` is scored on
the validation split only; one replaces the default only if it beats it there and the win is not
noise (`choose`): it must win on at least `required_win_rate` of `n_bootstrap` resamples of the
validation images, normal and anomalous images resampled apart (so that a resample always holds
both, and the few normal images count as much as the defects; `bootstrap` computes a resample's
figures). A win is a higher objective with no metric (image ROCAUC, and with masks pixel ROCAUC
and AUPRO) lower by more than MAX_DROP, on the split and in each resample. With fewer validation
defects or normal images than `min_images`, the default stays. No MLflow here: the `tune` job (`tune_job.py`) logs
each candidate as a child run and registers the choice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from ..algorithm.spade import SpadeDetector
from .bootstrap import ResampledFigures, stratified_counts
from .datasets import TestSample, read_mask, read_test
from .metrics import aupro, pixel_auroc, resize_map, resize_mask

# The settings the benchmarks show to matter (docs: results), and no more. `resize` 320 and
# `k_images`/`sigma` were left out: no shared set moved with them by more than the noise, and each
# would double the builds. Feature settings (resize, feature_pool) need a build each; score_fusion
# is read off the same maps.
GRID = {"resize": (256, 384), "feature_pool": (3, 1), "score_fusion": ("mean", "map")}
EVAL_SIZE = 256  # validation pixel metrics on maps and masks resized to this side (anomalib's protocol)
BOOTSTRAP_SIZE = 64  # and to this side for the resampled AUPRO
TIE = 1e-4  # validation objectives closer than this are a tie, which goes to the faster candidate
MAX_DROP = 0.005  # no metric may fall by more than this against the default, on the split or in a resample


@dataclass(frozen=True)
class Split:
    """The test images of a folder, split: `validation` chooses, `test` proves (never read before)."""

    validation: list[TestSample]
    test: list[TestSample]

    @property
    def digest(self) -> str:
        """sha256 of the validation images' paths: the same split, the same digest."""
        text = "".join(f"{s.defect_type}/{s.path.name};" for s in self.validation)
        return hashlib.sha256(text.encode()).hexdigest()

    def counts(self) -> dict[str, int]:
        anomalous = sum(s.is_anomalous for s in self.validation)
        return {"validation_normal": len(self.validation) - anomalous, "validation_defects": anomalous,
                "test_images": len(self.test)}  # fmt: skip


def split_test(root: str | Path, fraction: float = 0.3, seed: int = 0) -> Split:
    """A seeded `fraction` of each defect type and of `good` (at least one image of each type that
    has two or more) as validation; the rest as test. Only file names are listed."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_fraction={fraction} must be in (0, 1), e.g. 0.3.")
    rng = np.random.default_rng(seed)
    by_type: dict[str, list[TestSample]] = {}
    for sample in read_test(root):
        by_type.setdefault(sample.defect_type, []).append(sample)
    validation, test = [], []
    for kind in sorted(by_type):
        samples = by_type[kind]
        n = min(len(samples) - 1, max(1, round(fraction * len(samples)))) if len(samples) > 1 else 0
        chosen = set(rng.permutation(len(samples))[:n].tolist())
        validation += [s for i, s in enumerate(samples) if i in chosen]
        test += [s for i, s in enumerate(samples) if i not in chosen]
    return Split(validation, test)


def explicit_split(root: str | Path, validation_root: str | Path) -> Split:
    """`validation_root`/test as validation, all of `root`/test as test."""
    return Split(read_test(validation_root), read_test(root))


def candidates(base: dict | None = None, grid: dict[str, tuple] | None = None) -> list[dict]:
    """Every combination of `grid` (default `GRID`), the default settings `base` first (each
    setting's grid values with `base`'s value put first: the first candidate is the default)."""
    out = [{}]
    for name, values in (GRID if grid is None else grid).items():
        if base is not None and name in base:
            values = (base[name], *(v for v in values if v != base[name]))
        out = [{**c, name: v} for c in out for v in values]
    return out


def first_stage(base: dict) -> list[dict]:
    """The candidates at the team's own input size: every pooling and fusion, the default first."""
    return [c for c in candidates(base) if c["resize"] == base["resize"]]


def second_stage(base: dict, first: list[Scored]) -> list[dict]:
    """The other input sizes, with the pooling that did best at the team's size (the best of those
    that `beat` the default on the validation split; else the default's), so that each size costs
    one build instead of one per pooling."""
    default = first[0]
    better = [s for s in first[1:] if s.figures and beats(s.figures, default.figures)]
    pool = max(better, key=lambda s: objective(s.figures)).settings["feature_pool"] if better else base["feature_pool"]
    return [c for c in candidates(base) if c["resize"] != base["resize"] and c["feature_pool"] == pool]


def feature_key(settings: dict) -> tuple:
    """The settings that need a build of their own (the others are read off the same maps)."""
    return tuple(settings[k] for k in ("resize", "feature_pool") if k in settings)


def objective(figures: dict[str, float]) -> float:
    """What tuning maximises: the mean of AUPRO and image ROCAUC with masks, image ROCAUC without."""
    if "aupro" in figures:
        return 0.5 * (figures["aupro"] + figures["image_auroc"])
    return figures["image_auroc"]


@dataclass(frozen=True)
class Outputs:
    """What a candidate's build gives on the validation split, whatever its score fusion.

    Attributes:
        labels: (N,) anomalous or not. knn_scores, map_scores: (N,) of stage 1 and of the map.
        maps, masks: (EVAL_SIZE, EVAL_SIZE) per image, None without ground-truth masks.
        pixel_figures: pixel_auroc and aupro of the maps at EVAL_SIZE (empty without masks).
        small_maps, small_masks: the same at BOOTSTRAP_SIZE, for the resampled figures.
    The maps are the same for every fusion, so all of it is computed once per build.
    """

    labels: np.ndarray
    knn_scores: np.ndarray
    map_scores: np.ndarray
    maps: list[np.ndarray] | None
    masks: list[np.ndarray] | None
    pixel_figures: dict[str, float] = field(default_factory=dict)
    small_maps: list[np.ndarray] | None = None
    small_masks: list[np.ndarray] | None = None


def validate(detector: SpadeDetector, samples: list[TestSample]) -> Outputs:
    """Segment every validation image (segment="all") and keep what the candidates need. Without
    masks no map is kept, so stage 2 searches only where the scores depend on it (exact scores)."""
    with_masks = any(s.mask_path is not None for s in samples)
    prediction = detector.predict([s.path for s in samples], segment="all", return_maps=with_masks)
    labels = np.array([s.is_anomalous for s in samples])
    if not with_masks:
        return Outputs(labels, prediction.knn_scores, prediction.map_scores, None, None)
    masks = [
        resize_mask(read_mask(s.mask_path) if s.mask_path else np.zeros(m.shape, bool), EVAL_SIZE)
        for s, m in zip(samples, prediction.anomaly_maps)
    ]
    maps = [resize_map(m, EVAL_SIZE) for m in prediction.anomaly_maps]
    pixel = {"pixel_auroc": pixel_auroc(masks, maps), "aupro": aupro(masks, maps)}
    small_maps = [resize_map(m, BOOTSTRAP_SIZE) for m in maps]
    small_masks = [resize_mask(m, BOOTSTRAP_SIZE) for m in masks]
    return Outputs(labels, prediction.knn_scores, prediction.map_scores, maps, masks, pixel, small_maps, small_masks)


def image_scores(detector: SpadeDetector, outputs: Outputs, fusion: str) -> np.ndarray:
    """(N,) image scores as `detector` reports them, with `fusion` as its score fusion."""
    candidates = outputs.knn_scores >= detector.calibration.gate_threshold
    return detector.image_scores(outputs.knn_scores, outputs.map_scores, candidates, fusion)


def validation_figures(outputs: Outputs, scores: np.ndarray) -> dict[str, float]:
    """image_auroc and, with masks, pixel_auroc and aupro at EVAL_SIZE."""
    return {"image_auroc": float(roc_auc_score(outputs.labels, scores)), **outputs.pixel_figures}


@dataclass
class Scored:
    """A candidate on the validation split: its figures, image scores (N,) and, with masks, its
    maps at BOOTSTRAP_SIZE for the resampled AUPRO; `win_rate` once the bootstrap ran."""

    settings: dict
    figures: dict[str, float]
    scores: np.ndarray
    small_maps: list[np.ndarray] | None = None
    seconds: float = 0.0
    win_rate: float | None = field(default=None)


def win_rates(
    labels: np.ndarray,
    default: Scored,
    candidates: list[Scored],
    masks: list[np.ndarray] | None,
    n_bootstrap: int = 200,
    seed: int = 0,
) -> list[float]:
    """Per candidate, the share of `n_bootstrap` stratified resamples of the validation images on
    which it wins (`beats`) against `default`: a higher objective, and no metric lower by more than
    MAX_DROP. Every candidate meets the same resamples."""
    resamples = stratified_counts(labels, n_bootstrap, seed)
    reference = _resampled(labels, default, masks)
    theirs = [reference.figures(c) for c in resamples]
    rates = []
    for candidate in candidates:
        ours = _resampled(labels, candidate, masks)
        rates.append(sum(beats(ours.figures(c), t) for c, t in zip(resamples, theirs)) / n_bootstrap)
    return rates


def _resampled(labels: np.ndarray, scored: Scored, masks: list[np.ndarray] | None) -> ResampledFigures:
    return ResampledFigures(labels, scored.scores, None if masks is None else scored.small_maps, masks)


def beats(candidate: dict[str, float], default: dict[str, float]) -> bool:
    """A higher objective, with no metric of `default` lower in `candidate` by more than MAX_DROP."""
    kept = all(candidate[name] >= value - MAX_DROP for name, value in default.items())
    return kept and objective(candidate) > objective(default)


@dataclass(frozen=True)
class Choice:
    """The settings chosen, why, and the win rate that decided (None when no candidate was tested)."""

    settings: dict
    reason: str
    win_rate: float | None


def choose(scored: list[Scored], required_win_rate: float, counts: dict[str, int], min_images: int) -> Choice:
    """The default (`scored[0]`) unless a candidate beats it on the validation split (`beats`: a
    higher objective, no metric lower by more than MAX_DROP) and on at least `required_win_rate` of
    the bootstrap resamples (`Scored.win_rate`, the same rule per resample); among those, the best,
    ties (within TIE) going to the faster (the smaller resize, then the grid's order)."""
    default = scored[0]
    if counts["validation_defects"] < min_images or counts["validation_normal"] < min_images:
        return Choice(default.settings, f"kept the default: the validation split holds {counts['validation_defects']} "
                      f"defects and {counts['validation_normal']} normal images, fewer than min_images={min_images} "
                      "of either is too little evidence to change a setting", None)  # fmt: skip
    base = objective(default.figures)
    winners = [s for s in scored[1:] if beats(s.figures, default.figures) and (s.win_rate or 0.0) >= required_win_rate]
    if not winners:
        best = max(scored[1:], key=lambda s: objective(s.figures))
        dropped = [k for k, v in default.figures.items() if best.figures.get(k, v) < v - MAX_DROP]
        reason = f"kept the default: the best candidate {best.settings} wins on {best.win_rate:.0%} of the resamples"
        if dropped:
            reason += f" and loses more than {MAX_DROP} of {', '.join(dropped)} on the validation split"
        return Choice(default.settings, f"{reason}; {required_win_rate:.0%} are required", best.win_rate)
    top = max(objective(s.figures) for s in winners)
    tied = [s for s in winners if objective(s.figures) >= top - TIE]
    pick = min(tied, key=lambda s: s.settings.get("resize", 0))  # the faster; then the grid's order
    gain = objective(pick.figures) - base
    return Choice(pick.settings, f"{pick.settings} beats the default by {gain:+.4f} on validation and wins on "
                  f"{pick.win_rate:.0%} of the resamples", pick.win_rate)  # fmt: skip
