"""The `monitor` job: score a batch of recent production images, compare it with the model's normal
images (`drift`), and log one MLflow run per batch in the experiment `<model name>-monitoring`.

Successive runs of a model form its time series (the `step` of every metric counts the batches
monitored before), which the MLflow UI charts. A batch that crosses a limit is tagged
`monitor.alert=true`, `monitor.reason` says which figure crossed it, and `monitor.next_step`
gives the command that folds the batch's confirmed-normal images into the model (`update_bank`).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient

from ..algorithm.drift import drift_figures, reasons
from ..algorithm.images import load_image
from ..algorithm.line import LineDetector
from ..algorithm.spade import SpadeDetector
from ..config import MonitorLimits
from ..evaluation.datasets import IMAGE_SUFFIXES, LIST_SUFFIXES, read_image_list
from . import registry
from .capture import PREFIX, export_images, read_capture
from .follow import REFUSED_TAG
from .names import prefixed
from .pyfunc_model import load_model

BATCH_FILE = "batch.csv"
STEP_TAG = "monitor.step"


def read_batch(source: str, line: LineDetector | None) -> pd.DataFrame:
    """The batch as rows (path, category): a folder of images (searched recursively) or an image
    list (`datasets.read_image_list`). For a line model each image's category is its list's
    `category` column, or in a folder the first folder under it (`<source>/<category>/...`)."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        parts = [p.relative_to(path).parts for p in files]
        rows = [(p, part[0] if line is not None and len(part) > 1 else None) for p, part in zip(files, parts)]
    elif path.suffix.lower() in LIST_SUFFIXES:
        rows = read_image_list(path)
    else:
        raise FileNotFoundError(
            f"source {path.resolve()} is neither a folder of images nor an image list {LIST_SUFFIXES}."
        )
    if not rows:
        raise ValueError(f"{source} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    frame = pd.DataFrame(rows, columns=["path", "category"])
    if line is None:
        return frame.assign(category="")
    missing = frame["category"].isna()
    if missing.any():
        raise ValueError(f"{source}: a line model needs each image's category: put the images in "
                         f"<source>/<category>/, or list them with a 'category' column; {int(missing.sum())} "
                         "images have none.")  # fmt: skip
    unknown = sorted(set(frame["category"]) - set(line.categories))
    if unknown:
        raise ValueError(f"{source} names category {unknown[0]!r}; the line model holds {list(line.categories)}.")
    return frame


def batch_figures(
    detector: SpadeDetector, images: list, limits: MonitorLimits
) -> tuple[dict[str, float], list[str], dict]:
    """The figures of one category's batch, why it alerts (empty: it does not), and per-image results."""
    start = time.perf_counter()
    prediction = detector.predict(images, segment="auto", return_maps=False)
    statistics = detector.image_statistics(images)
    reference = detector.normal_reference()
    normalized = prediction.normalized_scores
    figures = {
        "n_images": float(len(images)),
        "anomalous_share": float(np.mean(prediction.is_anomalous)),
        "segmented_share": float(np.mean(prediction.segmented)),
        **{f"normalized_score_p{q}": float(np.percentile(normalized, q)) for q in (50, 95, 99)},
        **drift_figures(reference, prediction.knn_scores, statistics),
        "seconds_per_image": (time.perf_counter() - start) / len(images),
    }
    results = {
        "score": prediction.scores,
        "normalized_score": normalized,
        "is_anomalous": prediction.is_anomalous,
    }
    return figures, reasons(figures, len(images), limits), {"results": results, "reference": reference.statistics_of}


def monitor(
    model_uri: str,
    source: str,
    limits: MonitorLimits | None = None,
    experiment: str | None = None,
    since: str | None = None,
) -> dict:
    """Score `source` with the model and log the monitoring run; returns its figures and verdict.

    Args:
        model_uri: e.g. models:/NAME@champion.
        source: a folder of images, a .txt / .csv / .parquet image list (`read_batch`), or
            `capture:LOCATION`, the requests a served model captured (`capture`).
        limits: when the batch alerts (`config.MonitorLimits`, its defaults when None).
        experiment: the experiment to log to (default `<registered name>-monitoring`).
        since: with a capture, only the requests from this time on (ISO 8601, UTC).
    """
    if not source.startswith(PREFIX):
        return _monitor(model_uri, source, source, limits, experiment)
    with tempfile.TemporaryDirectory() as tmp:
        listing = export_images(read_capture(source[len(PREFIX) :], since), Path(tmp))
        return _monitor(model_uri, str(listing), f"{source} since {since}" if since else source, limits, experiment)


def _monitor(model_uri: str, batch: str, source: str, limits: MonitorLimits | None, experiment: str | None) -> dict:
    """`monitor` of the images `batch` names (`source` is what the run logs as its source)."""
    limits = limits or MonitorLimits()
    ref = registry.model_ref(model_uri)
    if experiment is None:
        if not ref.versions:
            raise ValueError(f"{model_uri} is not a registered model version: pass --experiment for its runs.")
        experiment = f"{ref.versions[0].name}-monitoring"
    model = load_model(model_uri)
    line = model if isinstance(model, LineDetector) else None
    frame = read_batch(batch, line)
    unreadable, groups = [], {}
    for path, category in zip(frame["path"], frame["category"]):
        try:
            image = load_image(Path(path))
        except (OSError, ValueError, TypeError) as exc:
            unreadable.append(f"{path}: {exc}")
            continue
        groups.setdefault(category, ([], []))
        groups[category][0].append(str(Path(path).resolve()))
        groups[category][1].append(image)
    if not groups:
        raise ValueError(f"no image of {source} could be read:\n" + "\n".join(unreadable))
    figures, why, rows, reference = {}, [], [], set()
    for category, (paths, images) in sorted(groups.items()):
        detector = line.detector(category) if line else model
        found, category_why, extra = batch_figures(detector, images, limits)
        figures.update({prefixed(category if line else None, key): value for key, value in found.items()})
        why += [f"[{category}] {reason}" if line else reason for reason in category_why]
        rows.append(pd.DataFrame({"path": paths, "category": category, **extra["results"]}))
        reference.add(extra["reference"])
    batch = pd.concat(rows, ignore_index=True)
    refused = [v.version for v in _versions_of(ref) if REFUSED_TAG in (v.tags or {})]
    figures["refused_versions"] = float(len(refused))  # versions a following server would not serve
    if ref.versions and ref.versions[0].version in refused:  # the alias names one no server will serve
        why.append(f"following servers refused v{ref.versions[0].version}: {ref.versions[0].tags[REFUSED_TAG]}")
    return _log_run(model_uri, ref, experiment, source, figures, why, batch, unreadable, limits, reference)


def _versions_of(ref: registry.ModelRef) -> list:
    """Every version of the registered model `ref` names (none for a URI that names no version)."""
    if not ref.versions:
        return []
    return MlflowClient().search_model_versions(f"name='{ref.versions[0].name}'")


REFERENCE_NOTES = {
    "holdout": "saved before 0.4.0: no bank image statistics; compared with the held-out images' (a tenth as "
    "many). Rebuild the model for the full reference.",
    "none": "saved without held-out images (format 2): no drift test ran, only the shares and percentiles. "
    "Rebuild the model to monitor drift.",
}
TAG_LIMIT = 5000  # MLflow's longest tag value; longer texts go to an artifact too


def _log_run(model_uri, ref, experiment, source, figures, why, batch, unreadable, limits, reference) -> dict:
    """One run in `experiment`, whatever run launched the job (`mlflow run` starts one elsewhere:
    it is tagged with this run's id)."""
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    last = client.search_runs([experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    step = int(last[0].data.tags.get(STEP_TAG, -1)) + 1 if last else 0  # the batches of this model before
    alert = bool(why)
    reason = "; ".join(why) if why else "no limit crossed"
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)  # `mlflow run`'s run: else start_run would resume it
    try:
        with mlflow.start_run(
            experiment_id=experiment_id, run_name="monitor", nested=mlflow.active_run() is not None
        ) as run:
            limit_params = {f"limit.{k}": v for k, v in vars(limits).items()}
            mlflow.log_params({"model_uri": model_uri, "source": source, **limit_params})
            mlflow.log_metrics({f"monitor.{key}": value for key, value in figures.items()}, step=step)
            tags = {
                "monitor.model_uri": model_uri,
                STEP_TAG: str(step),
                "monitor.alert": "true" if alert else "false",
                "monitor.reason": reason,
                "monitor.reference": ",".join(sorted(reference)),
                "monitor.unreadable_images": str(len(unreadable)),
            }
            notes = [REFERENCE_NOTES[r] for r in sorted(reference) if r in REFERENCE_NOTES]
            if notes:
                tags["monitor.note"] = " ".join(notes)
            if ref.versions:
                tags["monitor.model_version"] = str(ref.versions[0].version)
            if alert:
                tags["monitor.next_step"] = next_step(model_uri, run.info.run_id, batch, why)
            mlflow.set_tags({k: v if len(v) <= TAG_LIMIT else v[: TAG_LIMIT - 30] + " ... (see monitor.txt)"
                             for k, v in tags.items()})  # fmt: skip
            mlflow.log_text("\n".join(f"{k}: {v}" for k, v in tags.items()), "monitor.txt")
            with tempfile.TemporaryDirectory() as tmp:
                batch.to_csv(Path(tmp) / BATCH_FILE, index=False)
                mlflow.log_artifact(str(Path(tmp) / BATCH_FILE))
            if unreadable:
                mlflow.log_text("\n".join(unreadable), "unreadable_images.txt")
            run_id = run.info.run_id
    finally:
        if launcher:
            os.environ["MLFLOW_RUN_ID"] = launcher
    if launcher:
        for key, value in {"monitor.run_id": run_id, "monitor.alert": tags["monitor.alert"]}.items():
            client.set_tag(launcher, key, value)
    return {"run_id": run_id, "experiment": experiment, "step": step, "alert": alert, "reason": reason,
            "figures": figures}  # fmt: skip


def next_step(model_uri: str, run_id: str, batch: pd.DataFrame, why: list[str]) -> str:
    """What to do when the batch alerts. A drift: review the batch's images, keep in its list those
    confirmed normal, and fold them in with `update_bank` (per category for a line model). Too many
    anomalous images alone: inspect the line; nothing is to be folded in."""
    if all(reason.split("] ")[-1].startswith("anomalous_share") for reason in why):
        return (
            f"more images than expected are anomalous, with no drift of normal: inspect the line and the images "
            f"of {BATCH_FILE} (this run's artifact); if some are false alarms, fold those in as for a drift."
        )
    command = f"mlflow run . --env-manager local -e update_bank -P model_uri={model_uri} -P images=review/{BATCH_FILE}"
    categories = sorted(c for c in set(batch["category"]) if c)
    steps = [command] if not categories else [f"{command} -P category={c}" for c in categories]
    return (
        f"normal has moved. 1. mlflow artifacts download -r {run_id} -a {BATCH_FILE} -d review  2. in "
        f"review/{BATCH_FILE}, delete the rows of real defects  3. " + " ; ".join(steps) + "  4. evaluate the new "
        "version and promote it. A statistic's drift clears once the bank holds enough of the new normal: fold in "
        "batches comparable to the bank, or rebuild the model on the new normal images."
    )
