"""The MLflow lifecycle: build a bank, evaluate a model, and the whole `main` pipeline.

Each job is one MLflow run (nested when called inside another run, as `main` does).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient

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
        raise FileNotFoundError(f"data folder {path} does not exist; pass an MVTec-layout folder or '{SYNTHETIC}'.")
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
        images = read_train(resolve_data(data, Path(tmp)))
        bad = find_bad_images(images)
        if bad:
            listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
            if not skip_bad:
                raise ValueError(f"{len(bad)} unreadable training images:\n{listing}\nFix them or pass --skip-bad.")
            mlflow.log_text(listing, "skipped_images.txt")
            images = [p for p in images if p not in {b for b, _ in bad}]
        split_holdout(images, config)  # too few images fails here, before any work
        _log_new_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in config.to_dict().items()})
        _log_new_params({"data": data, "n_train_images": len(images)})
        start = time.perf_counter()
        if spark_master:
            from . import spark

            detector = spark.build_bank(spark.session(spark_master), images, config)
        else:
            detector = SpadeDetector(config).fit(images, progress=True)
        seconds = time.perf_counter() - start
        mlflow.log_metrics(
            {
                "bank_images": detector.bank.n_images,
                "bank_bytes": detector.bank.nbytes,
                "bank_bytes_per_image": detector.bank.nbytes / detector.bank.n_images,
                "build_seconds": seconds,
                "build_images_per_s": len(images) / seconds,
                **detector.calibration.metrics(),
            }
        )
        info = log_model(detector, name="model", registered_model_name=model_name)
        return run.info.run_id, str(info.registered_model_version)


def data_digest(root: Path) -> str:
    """sha256 over the test set's relative paths and bytes (images and masks): same data, same digest."""
    digest = hashlib.sha256()
    for sample in read_test(root):
        for path in (sample.path, sample.mask_path):
            if path is not None:
                digest.update(path.relative_to(root).as_posix().encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def evaluate(model_uri: str, data: str) -> dict[str, float]:
    """Evaluate a model on <data>/test; log metrics and plots; tag the registered version."""
    with tempfile.TemporaryDirectory() as tmp, _run("evaluate"):
        root = resolve_data(data, Path(tmp))
        detector = load_model(model_uri)
        result = evaluate_detector(detector, root, progress=True)
        digest = data_digest(root)
        _log_new_params({"model_uri": model_uri, "data": data, "data_digest": digest})
        mlflow.log_metrics(result.metrics)
        for kind, figures in result.per_type.items():
            mlflow.log_metrics({f"{kind}.{key}": value for key, value in figures.items()})
        mlflow.log_figure(roc_figure(result), "plots/image_roc.png")
        if result.has_masks:
            mlflow.log_figure(pro_curve_figure(result), "plots/pro_curve.png")
        else:
            mlflow.set_tag("pixel_metrics", "absent: image-level labels only (the data has no ground_truth/ folder)")
        pixel_t = result.metrics.get("pixel_f1_threshold", detector.thresholds()[1])
        mlflow.log_figure(overlay_grid(result, pixel_t), "plots/overlays.png")
        _tag_version(model_uri, result.metrics, digest)
        return result.metrics


HEADLINE = ("image_auroc", "pixel_auroc", "aupro", "image_f1_threshold", "pixel_f1_threshold")


def _tag_version(model_uri: str, figures: dict[str, float], digest: str) -> None:
    if not model_uri.startswith("models:/"):
        return  # only registered versions carry evaluation tags
    name, _, ref = model_uri[len("models:/") :].replace("@", "/").partition("/")
    client = MlflowClient()
    version = registry.resolve_version(client, name, ref).version
    for key in (k for k in HEADLINE if k in figures):
        client.set_model_version_tag(name, version, registry.EVAL_PREFIX + key, f"{figures[key]:.6f}")
    client.set_model_version_tag(name, version, registry.DIGEST_TAG, digest)
    client.set_model_version_tag(name, version, "eval.run_id", mlflow.active_run().info.run_id)


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
