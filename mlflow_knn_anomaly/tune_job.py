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

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

from . import jobs, tuning
from .config import SpadeConfig
from .datasets import TestSample, find_categories, is_mvtec_folder, read_mask
from .evaluation import LabelledImage, evaluate_samples
from .line import LineDetector
from .spade import SpadeDetector

_logger = logging.getLogger(__name__)
TEST_FIGURES = ("image_auroc", "pixel_auroc", "aupro")


def tune(
    data: str,
    model_name: str,
    config: SpadeConfig | None = None,
    validation_fraction: float = 0.3,
    validation: str | None = None,
    seed: int = 0,
    n_bootstrap: int = 200,
    required_win_rate: float = 0.9,
    min_images: int = 5,
) -> dict:
    """Tune `config`'s settings of `tuning.GRID` on `data` and register the result as a version of `model_name`.

    Args:
        data: an MVTec-layout folder, or a root of them (a line model, tuned per category).
        config: the default settings (the first candidate); SpadeConfig() when None.
        validation_fraction: the share of each defect type and of good that validates (`tuning.split_test`).
        validation: an MVTec-layout folder whose test/ is the validation split instead (a line: a root).
        seed: the split's seed, and the bootstrap's.
        n_bootstrap: resamples of the validation images (`tuning.win_rate`).
        required_win_rate: the share of them a candidate must win (`tuning.choose`).
        min_images: fewer validation defects or normal images keep the default.

    Returns:
        {"run_id", "version", "choices": {category: settings}, "test": {category: {"default", "tuned"}}}.
    """
    config = config or SpadeConfig()
    with tempfile.TemporaryDirectory() as tmp, jobs.run_of("tune") as run:
        root = jobs.resolve_data(data, Path(tmp))
        line = not is_mvtec_folder(root)
        folders = find_categories(root)[0] if line else {root.name: root}
        if not folders:
            raise ValueError(f"{root} is neither an MVTec-layout folder nor a root of them.")
        jobs.log_config(config)
        jobs.log_new_params({"data": data, "validation_fraction": validation_fraction, "validation": validation or "",
                             "seed": seed, "n_bootstrap": n_bootstrap, "required_win_rate": required_win_rate,
                             "min_images": min_images})  # fmt: skip
        start = time.perf_counter()
        outcomes = {}
        for name, folder in folders.items():
            explicit = None if not validation else (Path(validation) / name if line else Path(validation))
            split = (
                tuning.explicit_split(folder, explicit)
                if explicit
                else tuning.split_test(folder, validation_fraction, seed)
            )
            outcomes[name] = _tune_category(name if line else None, folder, split, config, n_bootstrap,
                                            required_win_rate, min_images, seed)  # fmt: skip
        mlflow.log_metric("tune_seconds", time.perf_counter() - start)
        model = LineDetector({n: o["model"] for n, o in outcomes.items()}) if line else outcomes[root.name]["model"]
        if line:
            from . import line_jobs

            version = line_jobs._register(model, model_name, {line_jobs.CHANGE_TAG: "tuned"})
        else:
            version = str(jobs.log_and_register(model, model_name, category=root.name).registered_model_version)
        splits = {n: o["split"] for n, o in outcomes.items()}
        test_root = _test_split_folder(Path(tmp) / "test-split", list(folders), splits, line)
        tuned = jobs.evaluate(f"models:/{model_name}/{version}", str(test_root))  # the first read of a test image
        result = {"run_id": run.info.run_id, "version": version, "choices": {}, "test": {}}
        client = MlflowClient()
        tags = {"tune.seconds": f"{time.perf_counter() - start:.1f}"}
        for name, outcome in outcomes.items():
            prefix = f"{name}." if line else ""
            split = outcome["split"]
            tuned_figures = {m: tuned[prefix + m] for m in TEST_FIGURES if prefix + m in tuned}
            default_figures = tuned_figures if outcome["is_default"] else _test_figures(outcome["default"], split)
            choice = outcome["choice"]
            tags.update({
                f"tune.{prefix}validation_digest": split.digest,
                f"tune.{prefix}settings": json.dumps(choice.settings, sort_keys=True),
                f"tune.{prefix}win_rate": "none" if choice.win_rate is None else f"{choice.win_rate:.3f}",
                f"tune.{prefix}reason": choice.reason[:5000],
                **{f"tune.{prefix}validation.{k}": str(v) for k, v in split.counts().items()},
                **{f"tune.{prefix}default.{m}": f"{v:.6f}" for m, v in default_figures.items()},
                **{f"tune.{prefix}tuned.{m}": f"{v:.6f}" for m, v in tuned_figures.items()},
            })  # fmt: skip
            result["choices"][name] = choice.settings
            result["test"][name] = {"default": default_figures, "tuned": tuned_figures}
        for key, value in tags.items():
            client.set_model_version_tag(model_name, version, key, value)
        mlflow.set_tags({k: v for k, v in tags.items() if len(v) <= 5000})
        return result


def _tune_category(category, folder, split, config, n_bootstrap, required_win_rate, min_images, seed) -> dict:
    """Score every candidate on the validation split (child runs) and choose; returns the chosen
    model fitted on the whole train/good, the default's, the split and the choice."""
    images = jobs.readable_train_images(folder, skip_bad=False, category=category)
    counts = split.counts()
    both = counts["validation_defects"] > 0 and counts["validation_normal"] > 0
    built: dict[tuple, tuple[SpadeDetector, tuning.Outputs | None, float]] = {}
    scored = []
    for settings in tuning.candidates({name: getattr(config, name) for name in tuning.GRID}):
        key = tuning.feature_key(settings)
        if key not in built:
            start = time.perf_counter()
            detector = SpadeDetector(config.replace(**settings)).fit(images)
            seconds = time.perf_counter() - start
            built[key] = (detector, tuning.validate(detector, split.validation) if both else None, seconds)
        detector, outputs, seconds = built[key]
        if outputs is None:  # no defect (or no normal image) to validate on: nothing to compare
            scored.append(tuning.Scored(settings, {}, np.zeros(0), None, seconds))
            continue
        scores = tuning.image_scores(detector, outputs, settings["score_fusion"])
        small = None if outputs.maps is None else tuning.small(outputs.maps)
        scored.append(tuning.Scored(settings, tuning.validation_figures(outputs, scores), scores, small, seconds))
    if counts["validation_defects"] >= min_images and counts["validation_normal"] >= min_images:
        outputs = built[tuning.feature_key(scored[0].settings)][1]
        masks = None if outputs.masks is None else tuning.small_masks(outputs.masks)
        for candidate in scored[1:]:
            candidate.win_rate = tuning.win_rate(outputs.labels, scored[0], candidate, masks, n_bootstrap, seed)
    choice = tuning.choose(scored, required_win_rate, counts, min_images)
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
