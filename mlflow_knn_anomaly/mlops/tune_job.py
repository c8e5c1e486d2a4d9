"""The `tune` job: pick settings per part on a validation split of its real defects, prove them on
the test split, and register the result (`tuning` holds the split, the grid and the guard).

One parent run; every candidate is a nested child run with its settings as params and its
validation metrics, so the MLflow UI compares them. Candidates share a build when they differ
only in how scores are read off the maps. The parent registers the chosen model (fitted on the
whole train/good), evaluates it on the test split only (the `knn_anomaly` evaluator, as
`evaluate` does, so `promote` works on it), and tags the version `tune.*`. No test image is read
before that evaluation. A root of MVTec folders (a line model) is tuned category by category.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ..algorithm.backbones import Backbone, FeaturePyramid
from ..algorithm.line import LineDetector
from ..algorithm.spade import SpadeDetector
from ..config import SpadeConfig, TuneSettings
from ..evaluation import tuning
from ..evaluation.datasets import TestSample, find_categories, is_mvtec_folder, read_mask
from ..evaluation.evaluate import LabelledImage, evaluate_samples
from . import jobs, registry
from .names import prefixed

TEST_FIGURES = ("image_auroc", "pixel_auroc", "aupro")


def tune(
    data: str,
    model_name: str,
    config: SpadeConfig | None = None,
    settings: TuneSettings | None = None,
    validation: str | None = None,
    skip_bad: bool = False,
) -> dict:
    """Tune `config`'s settings of `tuning.GRID` on `data` and register the result as a version of `model_name`.

    Args:
        data: an MVTec-layout folder, or a root of them (a line model, tuned per category).
        config: the default settings (the first candidate); SpadeConfig() when None.
        settings: the split, the bootstrap and the guard (`TuneSettings()` when None).
        validation: an MVTec-layout folder whose test/ is the validation split instead (a line: a root).
        skip_bad: unreadable training images are logged and left out instead of failing the job.

    Returns:
        {"run_id", "version", "choices": {category: settings}, "test": {category: {"default", "tuned"}}}.
    """
    config, settings = config or SpadeConfig(), settings or TuneSettings()
    with tempfile.TemporaryDirectory() as tmp, jobs.run_of("tune") as run:
        root = jobs.resolve_data(data, Path(tmp))
        line = not is_mvtec_folder(root)
        folders = find_categories(root)[0] if line else {root.name: root}
        jobs.log_config(config)
        jobs.log_new_params({"data": data, "validation": validation or "", **dataclasses.asdict(settings)})
        start = time.perf_counter()
        outcomes = {}
        for name, folder in folders.items():
            explicit = None if not validation else (Path(validation) / name if line else Path(validation))
            split = tuning.explicit_split(folder, explicit) if explicit else tuning.split_test(
                folder, settings.validation_fraction, settings.seed
            )  # fmt: skip
            outcomes[name] = _tune_category(name if line else None, folder, split, config, settings, skip_bad)
        search = time.perf_counter() - start
        version = _register(outcomes, model_name, root.name if not line else None)
        splits = {n: o["split"] for n, o in outcomes.items()}
        test_root = _test_split_folder(Path(tmp) / "test-split", list(folders), splits, line)
        tuned = jobs.evaluate(f"models:/{model_name}/{version}", str(test_root))  # the first read of a test image
        _evaluate_champion(model_name, version, test_root)
        total = time.perf_counter() - start
        tags = {"tune.seconds": f"{total:.1f}", "tune.search_seconds": f"{search:.1f}"}
        result = {"run_id": run.info.run_id, "version": version, "choices": {}, "test": {}}
        for name, outcome in outcomes.items():
            prefix = prefixed(name, "") if line else ""
            tuned_figures = {m: tuned[prefix + m] for m in TEST_FIGURES if prefix + m in tuned}
            split = outcome["split"]
            default_figures = tuned_figures if outcome["is_default"] else _test_figures(outcome["default"], split)
            tags.update(_tags(prefix, split, outcome["choice"], default_figures, tuned_figures))
            result["choices"][name] = outcome["choice"].settings
            result["test"][name] = {"default": default_figures, "tuned": tuned_figures}
        client = MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(model_name, version, key, value)
        mlflow.set_tags(tags)
        # search: the builds, the validation passes and the bootstrap; the rest proves the choice on the test split
        mlflow.log_metrics({"tune_seconds": total, "search_seconds": search, "proof_seconds": total - search})
        return result


def _register(outcomes: dict, model_name: str, category: str | None) -> str:
    """Log and register the chosen model: one category's detector, or a line of every category's."""
    if category is not None:
        model = outcomes[category]["model"]
        return str(jobs.log_and_register(model, model_name, category=category).registered_model_version)
    from . import line_jobs

    line = LineDetector({name: outcome["model"] for name, outcome in outcomes.items()})
    return line_jobs.register_line(line, model_name, {line_jobs.CHANGE_TAG: "tuned"})


def _evaluate_champion(model_name: str, version: str, test_root: Path) -> None:
    """The current champion evaluated on the same test split, so that `promote` compares the two
    on the same data (its `eval.*` tags then describe this split)."""
    try:
        champion = MlflowClient().get_model_version_by_alias(model_name, registry.CHAMPION)
    except MlflowException:
        return  # no champion yet: the first promote needs none
    if champion.version != version:
        jobs.evaluate(f"models:/{model_name}/{champion.version}", str(test_root))


def _tags(prefix: str, split: tuning.Split, choice: tuning.Choice, default: dict, tuned: dict) -> dict[str, str]:
    """The version's `tune.*` tags of one category (`prefix` `<category>.` in a line)."""
    return {
        f"tune.{prefix}validation_digest": split.digest,
        f"tune.{prefix}settings": json.dumps(choice.settings, sort_keys=True),
        f"tune.{prefix}win_rate": "none" if choice.win_rate is None else f"{choice.win_rate:.3f}",
        f"tune.{prefix}reason": choice.reason[:5000],
        **{f"tune.{prefix}validation.{k}": str(v) for k, v in split.counts().items()},
        **{f"tune.{prefix}default.{m}": f"{v:.6f}" for m, v in default.items()},
        **{f"tune.{prefix}tuned.{m}": f"{v:.6f}" for m, v in tuned.items()},
    }


def _tune_category(
    category: str | None, folder: Path, split: tuning.Split, config: SpadeConfig, settings: TuneSettings,
    skip_bad: bool,
) -> dict:  # fmt: skip
    """Score every candidate on the validation split (child runs) and choose; returns the chosen
    model fitted on the whole train/good, the default's, the split and the choice."""
    images = jobs.readable_train_images(folder, skip_bad=skip_bad, category=category)
    min_images = settings.min_images
    shared = SharedFeatures(SpadeDetector(config).backbone)
    counts = split.counts()
    both = counts["validation_defects"] > 0 and counts["validation_normal"] > 0
    built: dict[tuple, tuple[SpadeDetector, tuning.Outputs | None, float]] = {}

    def score(candidate_settings: dict) -> tuning.Scored:
        key = tuning.feature_key(candidate_settings)
        if key not in built:
            shared.keep_only(candidate_settings["resize"])
            start = time.perf_counter()
            detector = SpadeDetector(config.replace(**candidate_settings), backbone=shared).fit(images)
            seconds = time.perf_counter() - start
            outputs = tuning.validate(detector, split.validation) if both else None
            built[key] = (detector, outputs, seconds)
        detector, outputs, seconds = built[key]
        if outputs is None:  # no defect (or no normal image) to validate on: nothing to compare
            return tuning.Scored(candidate_settings, {}, np.zeros(0), None, seconds)
        scores = tuning.image_scores(detector, outputs, candidate_settings["score_fusion"])
        figures = tuning.validation_figures(outputs, scores)
        return tuning.Scored(candidate_settings, figures, scores, outputs.small_maps, seconds)

    base = {name: getattr(config, name) for name in tuning.GRID}
    scored = [score(c) for c in tuning.first_stage(base)]
    scored += [score(c) for c in tuning.second_stage(base, scored)]
    if counts["validation_defects"] >= min_images and counts["validation_normal"] >= min_images:
        outputs = built[tuning.feature_key(scored[0].settings)][1]
        rates = tuning.win_rates(
            outputs.labels, scored[0], scored[1:], outputs.small_masks, settings.n_bootstrap, settings.seed
        )
        for candidate, rate in zip(scored[1:], rates):
            candidate.win_rate = rate
    choice = tuning.choose(scored, settings.required_win_rate, counts, min_images)
    shared.keep_only(None)
    for detector, _, _ in built.values():
        detector.backbone = shared.backbone  # the kept outputs go; the models keep the backbone
    for i, candidate in enumerate(scored):
        _log_candidate(category, i, candidate, choice)
    default_detector = built[tuning.feature_key(scored[0].settings)][0]
    chosen_detector = built[tuning.feature_key(choice.settings)][0]
    chosen_config = config.replace(**choice.settings)
    if chosen_detector.config != chosen_config:  # the score fusion differs: recalibrate the same bank
        refit = SpadeDetector(chosen_config, backbone=chosen_detector.backbone)
        refit.roi = chosen_detector.roi
        chosen_detector = refit.fit_bank(chosen_detector.bank, chosen_detector.holdout)
    return {"model": chosen_detector, "default": default_detector, "split": split, "choice": choice,
            "is_default": choice.settings == scored[0].settings}  # fmt: skip


class SharedFeatures:
    """A backbone that keeps its outputs per input batch, so that candidates of one input size
    (they differ only after the backbone: `feature_pool`, the score fusion) put each image through
    it once; `keep_only(resize)` drops the outputs of other sizes. Everything else is the backbone's."""

    def __init__(self, backbone: Backbone) -> None:
        self.backbone = backbone
        self._kept: dict[bytes, FeaturePyramid] = {}
        self._resize: int | None = None

    def keep_only(self, resize: int | None) -> None:
        if resize != self._resize:
            self._kept, self._resize = {}, resize

    def extract(self, images: torch.Tensor) -> FeaturePyramid:
        key = hashlib.blake2b(images.detach().cpu().numpy().tobytes(), digest_size=16).digest()
        key += str(tuple(images.shape)).encode()
        if key not in self._kept:
            self._kept[key] = self.backbone.extract(images)
        return self._kept[key]

    def to(self, device) -> SharedFeatures:
        self.backbone.to(device)
        return self

    def __getattr__(self, name: str):
        return getattr(self.backbone, name)


def _log_candidate(category: str | None, index: int, candidate: tuning.Scored, choice: tuning.Choice) -> None:
    name = f"{category + ' ' if category else ''}candidate {index}"
    with mlflow.start_run(run_name=name, nested=True):
        mlflow.log_params({**candidate.settings, "category": category or "", "is_default": index == 0})
        figures = {f"val.{k}": v for k, v in candidate.figures.items()}
        if candidate.figures:
            figures["val.objective"] = tuning.objective(candidate.figures)
        if candidate.win_rate is not None:
            figures["bootstrap_win_rate"] = candidate.win_rate
        figures["build_seconds"] = candidate.seconds
        mlflow.log_metrics(figures)
        mlflow.set_tag("tune.chosen", str(candidate.settings == choice.settings).lower())


def _labelled(sample: TestSample) -> LabelledImage:
    return LabelledImage(
        sample.path, sample.defect_type, None if sample.mask_path is None else read_mask(sample.mask_path)
    )


def _test_figures(detector: SpadeDetector, split: tuning.Split) -> dict[str, float]:
    evaluation = evaluate_samples(detector, [_labelled(s) for s in split.test], per_type_pixels=False)
    return {m: float(evaluation.metrics[m]) for m in TEST_FIGURES if m in evaluation.metrics}


def _test_split_folder(target: Path, names: list[str], splits: dict[str, tuning.Split], line: bool) -> Path:
    """An MVTec-layout folder (a root for a line) of links to the test split's images and masks."""
    for name in names:
        base = target / name
        (base / "train" / "good").mkdir(parents=True)  # empty: it only marks an MVTec-layout folder
        for sample in splits[name].test:
            _link(sample.path, base / "test" / sample.defect_type / sample.path.name)
            if sample.mask_path is not None:
                _link(sample.mask_path, base / "ground_truth" / sample.defect_type / sample.mask_path.name)
        if any(s.mask_path is not None for s in splits[name].test):
            (base / "ground_truth").mkdir(exist_ok=True)
    return target if line else target / names[0]


def _link(source: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(source.resolve(), link)
