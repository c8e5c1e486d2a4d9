"""The MLflow lifecycle: build a bank, update it, evaluate a model, and the whole `main` pipeline.

Each job is one MLflow run (nested when called inside another run, as `main` does).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import warnings
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from . import registry
from .config import SpadeConfig
from .datasets import make_synthetic, read_test, read_train
from .evaluation import PIXEL_METRICS
from .evaluation import evaluate as evaluate_detector
from .images import load_image
from .plots import overlay_grid, pro_curve_figure, roc_figure
from .pyfunc_model import load_model, log_model
from .spade import SpadeDetector, split_holdout

SYNTHETIC = "synthetic"


def resolve_data(data: str, workdir: Path) -> Path:
    """The dataset folder: `data` itself, or the embedded synthetic set generated into `workdir`."""
    if data == SYNTHETIC:
        return make_synthetic(workdir / "synthetic", seed=0)
    path = Path(data)
    if not path.is_dir():
        raise FileNotFoundError(
            f"data folder {path.resolve()} does not exist; pass an MVTec-layout folder or '{SYNTHETIC}' "
            "(`mlflow run` runs in the project folder: give it an absolute path)."
        )
    return path


def find_bad_images(paths: list[Path]) -> list[tuple[Path, str]]:
    """Every image that cannot be decoded, with the reason."""
    bad = []
    for path in paths:
        try:
            load_image(path)
        except (ValueError, TypeError) as exc:
            bad.append((path, str(exc)))
    return bad


def build_bank(
    data: str, config: SpadeConfig, model_name: str, skip_bad: bool = False, spark_master: str | None = None
) -> tuple[str, str]:
    """Fit a detector on <data>/train/good, log it and register a new version of `model_name`.

    With `spark_master`, bank features are extracted by Spark tasks (bit-identical result).

    Returns:
        (run id, registered version).
    """
    with tempfile.TemporaryDirectory() as tmp, _run("build_bank") as run:
        root = resolve_data(data, Path(tmp))
        images = _readable_train_images(root, skip_bad)
        split_holdout(images, config)  # too few images fails here, before any work
        _log_new_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in config.to_dict().items()})
        _log_new_params({"data": data, "n_train_images": len(images)})
        mlflow.log_input(folder_dataset(root, images, "train"), context="training")
        start = time.perf_counter()
        if spark_master:
            from . import spark

            detector = spark.build_bank(spark.session(spark_master), images, config)
        else:
            detector = SpadeDetector(config).fit(images, progress=True)
        _log_fit(detector, len(images), time.perf_counter() - start)
        info = _log_and_register(detector, model_name)
        return run.info.run_id, str(info.registered_model_version)


def update_bank(model_uri: str, data: str, model_name: str | None = None, skip_bad: bool = False) -> tuple[str, str]:
    """Add <data>/train/good (new normal images) to a model's bank and register the result as a new
    version: same settings, enlarged bank, recalibrated. The version is tagged with its parent.

    Returns:
        (run id, registered version).
    """
    parent = registry.model_ref(model_uri)
    name = model_name or (parent.versions[0].name if parent.versions else None)
    if name is None:
        raise ValueError(f"{model_uri} is not a registered model version: pass --model-name for the new version.")
    with tempfile.TemporaryDirectory() as tmp, _run("update_bank") as run:
        root = resolve_data(data, Path(tmp))
        images = _readable_train_images(root, skip_bad)
        detector = load_model(model_uri)
        _log_new_params({"parent_model_uri": model_uri, "data": data, "n_new_images": len(images)})
        _log_new_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in detector.config.to_dict().items()})
        mlflow.log_input(folder_dataset(root, images, "train"), context="training")
        start = time.perf_counter()
        updated = detector.update(images, progress=True)
        _log_fit(updated, len(images), time.perf_counter() - start)
        info = _log_and_register(updated, name)
        version = str(info.registered_model_version)
        client = MlflowClient()
        client.set_model_version_tag(name, version, "parent.model_uri", model_uri)
        if parent.versions:
            client.set_model_version_tag(name, version, "parent.version", parent.versions[0].version)
        return run.info.run_id, version


def _log_and_register(detector: SpadeDetector, model_name: str):
    """Log the model and register it; a failed upload says where it failed and that nothing was registered.

    MLflow registers a version only once every file is stored, but its own error names only the
    HTTP request that failed (after about 4 minutes of retries by default); a team needs to know
    which service to look at.
    """
    try:
        return log_model(detector, name="model", registered_model_name=model_name)
    except MlflowException as exc:
        where = (
            "the tracking server could not store the model's files in its artifact store (see the server's "
            "log: is the object store up, are its endpoint, bucket and credentials right?)"
            if "mlflow-artifacts" in exc.message
            else "storing the model failed"
        )
        raise RuntimeError(f"{where}; no version of {model_name!r} was registered. Cause: {exc.message}") from exc


def _readable_train_images(root: Path, skip_bad: bool) -> list[Path]:
    """<root>/train/good; unreadable images fail the job, or with `skip_bad` are logged and left out."""
    images = read_train(root)
    bad = find_bad_images(images)
    if bad:
        listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
        if not skip_bad:
            raise ValueError(f"{len(bad)} unreadable training images:\n{listing}\nFix them or pass --skip-bad.")
        mlflow.log_text(listing, "skipped_images.txt")
        images = [p for p in images if p not in {b for b, _ in bad}]
    return images


def _log_fit(detector: SpadeDetector, n_images: int, seconds: float) -> None:
    bank = detector.bank
    mlflow.log_metrics(
        {
            "bank_images": bank.n_images,
            "bank_bytes": bank.nbytes,
            "bank_bytes_per_image": bank.nbytes / bank.n_images,
            "build_seconds": seconds,
            "build_images_per_s": n_images / seconds,
            **detector.calibration.metrics(),
        }
    )


def content_digest(root: Path, paths: list[Path]) -> str:
    """sha256 over the files' paths relative to `root` and their bytes: same data, same digest."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def data_digest(root: Path) -> str:
    """The content digest of a test set (images and masks)."""
    return content_digest(root, [p for s in read_test(root) for p in (s.path, s.mask_path) if p is not None])


def folder_dataset(root: Path, paths: list[Path], split: str, digest: str | None = None) -> MetaDataset:
    """An MLflow dataset for a folder's images: its source is the folder, its digest our content
    digest (its first 32 hex digits: MLflow's digest column is short; the version tag keeps all 64)."""
    digest = digest or content_digest(root, paths)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": it is a local folder
        source = resolve_dataset_source(str(root.resolve()))
    return MetaDataset(source=source, name=f"{root.name}/{split}", digest=digest[:32])


def evaluate(model_uri: str, data: str) -> dict[str, float]:
    """Evaluate a model on <data>/test; log metrics (linked to the model and the test data) and
    plots; tag the registered version(s) the URI names."""
    with tempfile.TemporaryDirectory() as tmp, _run("evaluate"):
        root = resolve_data(data, Path(tmp))
        detector = load_model(model_uri)
        result = evaluate_detector(detector, root, progress=True)
        digest = data_digest(root)
        target = registry.model_ref(model_uri)
        _log_new_params({"model_uri": model_uri, "data": data, "data_digest": digest})
        dataset = folder_dataset(root, [s.path for s in result.samples], "test", digest)
        mlflow.log_input(dataset, context="evaluation")
        mlflow.log_metrics(result.metrics, model_id=target.model_id, dataset=dataset)
        for kind, figures in result.per_type.items():
            mlflow.log_metrics({f"{kind}.{key}": value for key, value in figures.items()}, model_id=target.model_id)
        mlflow.log_figure(roc_figure(result), "plots/image_roc.png")
        if result.has_masks:
            mlflow.log_figure(pro_curve_figure(result), "plots/pro_curve.png")
        else:
            mlflow.set_tag("pixel_metrics", "absent: image-level labels only (the data has no ground_truth/ folder)")
        pixel_t = result.metrics.get("pixel_f1_threshold", detector.thresholds()[1])
        mlflow.log_figure(overlay_grid(result, pixel_t), "plots/overlays.png")
        for version in target.versions:
            _tag_version(version, result.metrics, digest)
        return result.metrics


HEADLINE = ("image_auroc", "pixel_auroc", "aupro", "image_f1_threshold", "pixel_f1_threshold")


def _tag_version(version: ModelVersion, figures: dict[str, float], digest: str) -> None:
    client = MlflowClient()
    for key in (k for k in HEADLINE if k in figures):
        client.set_model_version_tag(version.name, version.version, registry.EVAL_PREFIX + key, f"{figures[key]:.6f}")
    client.set_model_version_tag(version.name, version.version, registry.DIGEST_TAG, digest)
    client.set_model_version_tag(version.name, version.version, "eval.run_id", mlflow.active_run().info.run_id)


def lifecycle(
    data: str, config: SpadeConfig, model_name: str, metric: str, min_delta: float, skip_bad: bool = False
) -> registry.Decision:
    """build bank -> evaluate -> register -> promote, as nested runs of one parent run."""
    with _run("main"):
        _, version = build_bank(data, config, model_name, skip_bad=skip_bad)
        figures = evaluate(f"models:/{model_name}/{version}", data)
        if metric not in figures and metric in PIXEL_METRICS:
            metric = "image_auroc"  # image-level labels only: no pixel metric to decide on
        decision = registry.promote(model_name, version, metric=metric, min_delta=min_delta)
        mlflow.set_tags({"promotion.decision": "promoted" if decision.promoted else "kept", "version": version})
        return decision


def _log_new_params(params: dict) -> None:
    """Log params the run does not have yet. `mlflow run` logs its MLproject parameters on the same
    run before the job starts, spelt as given on the command line ('' for an empty list, 'true' for
    True); MLflow refuses to log a param again with another spelling, so those keep theirs."""
    run = mlflow.active_run()
    logged = MlflowClient().get_run(run.info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})


def _run(name: str):
    """A run of its own, nested under the active run if there is one (main's children)."""
    return mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None)
