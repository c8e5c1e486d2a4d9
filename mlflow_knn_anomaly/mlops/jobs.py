"""The MLflow lifecycle: build a bank, update it, evaluate a model, and the whole `main` pipeline.

Each job is one MLflow run (nested when called inside another run, as `main` does).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.pandas_dataset import PandasDataset
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from ..algorithm.images import load_image
from ..algorithm.line import LineDetector
from ..algorithm.spade import SpadeDetector, split_holdout
from ..config import SYNTHETIC, SpadeConfig
from ..evaluation.datasets import (
    find_categories,
    is_mvtec_folder,
    make_synthetic,
    read_image_list,
    read_test,
    read_train,
)
from ..evaluation.evaluate import PIXEL_METRICS
from . import registry
from .capture import PREFIX, captured_list
from .evaluator import EVALUATOR_NAME, MODEL_TYPE, frame_from_folder
from .names import EVAL_PREFIX, MEAN, key_part, prefixed
from .pyfunc_model import load_model, log_model, model_categories, model_flavor

_logger = logging.getLogger(__name__)


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
    data: str,
    config: SpadeConfig,
    model_name: str,
    skip_bad: bool = False,
    spark_master: str | None = None,
    categories: list[str] | None = None,
    category_settings: str | None = None,
) -> tuple[str, str]:
    """Fit a detector on <data>/train/good, log it and register a new version of `model_name`.

    A `data` folder whose subfolders are MVTec-layout folders builds a line model instead, one
    category per subfolder (`categories` picks some; `category_settings`, a JSON/YAML file,
    overrides settings per category): see `line_jobs.build_line`.
    With `spark_master`, bank features are extracted by Spark tasks (bit-identical result).

    Returns:
        (run id, registered version).
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = resolve_data(data, Path(tmp))
        if not is_mvtec_folder(root):
            if spark_master:
                raise ValueError("--spark-master builds single-category models; build a line model without it.")
            from . import line_jobs

            return line_jobs.build_line(root, data, config, model_name, categories, category_settings, skip_bad)
        if categories or category_settings:
            from . import line_jobs

            config = line_jobs.category_configs({root.name: root}, config, categories, category_settings)[root.name]
        with run_of("build_bank") as run:
            images = readable_train_images(root, skip_bad)
            split_holdout(images, config)  # too few images fails here, before any work
            log_config(config)
            log_new_params({"data": data, "n_train_images": len(images)})
            mlflow.log_input(folder_dataset(root, images, "train"), context="training")
            start = time.perf_counter()
            if spark_master:
                from . import spark

                detector = spark.build_bank(spark.session(spark_master), images, config)
            else:
                detector = SpadeDetector(config).fit(images, progress=True)
            log_fit(detector, len(images), time.perf_counter() - start)
            info = log_and_register(detector, model_name, category=root.name)
            return run.info.run_id, str(info.registered_model_version)


def update_bank(
    model_uri: str,
    data: str | None = None,
    model_name: str | None = None,
    skip_bad: bool = False,
    category: str | None = None,
    images: str | None = None,
    ids: str | None = None,
) -> tuple[str, str]:
    """Add new normal images to a model's bank and register the result as a new version: same
    settings, enlarged bank, recalibrated. The version is tagged with its parent.

    The images are <data>/train/good, or with `images` a list of them (a .txt, .csv or .parquet
    with a `path` column: the false alarms operators confirmed as normal), or with
    `images=capture:LOCATION` the captured requests whose `ids` operators confirmed; the version's tags
    `feedback.*` count the list's images and give its digest. A line model needs `category`: only
    that category changes (a list's `category` column, if it has one, picks the rows).

    Returns:
        (run id, registered version).
    """
    if bool(data) == bool(images):
        raise ValueError(
            "pass the new normal images as data=FOLDER (its train/good) or as images=LIST (a .txt, .csv or "
            ".parquet of image paths, e.g. the false alarms operators confirmed): "
            + ("both were given." if data else "neither was given.")
        )
    parent = registry.model_ref(model_uri)
    name = new_version_name(parent, model_uri, model_name)
    flavor = model_flavor(model_uri)
    if "categories" in flavor:
        from . import line_jobs

        return line_jobs.update_category(model_uri, data, images, category or "", name, skip_bad, ids)
    saved_category = flavor.get("category")
    if category and category != saved_category:
        raise ValueError(f"{model_uri} holds the one category {saved_category!r}, not {category!r}.")
    with tempfile.TemporaryDirectory() as tmp, run_of("update_bank") as run:
        new = new_normal_images(data, images, skip_bad, saved_category, Path(tmp), line=False, ids=ids)
        detector = load_model(model_uri)
        log_new_params({"parent_model_uri": model_uri, **new.params})
        log_config(detector.config)
        mlflow.log_input(new.dataset, context="training")
        start = time.perf_counter()
        updated = detector.update(new.paths, progress=True)
        log_fit(updated, len(new.paths), time.perf_counter() - start)
        info = log_and_register(updated, name, category=saved_category)
        version = str(info.registered_model_version)
        client = MlflowClient()
        tags = {"parent.model_uri": model_uri, **new.tags}
        if parent.versions:
            tags["parent.version"] = parent.versions[0].version
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        return run.info.run_id, version


@dataclass(frozen=True)
class NewImages:
    """New normal images for `update_bank`, checked readable.

    Attributes:
        paths: the images. dataset: their MLflow dataset (a training input of the run).
        params: the run's params that name them. tags: the new version's tags (`feedback.*`).
    """

    paths: list[Path]
    dataset: MetaDataset
    params: dict
    tags: dict[str, str]


def new_normal_images(
    data: str | None,
    images: str | None,
    skip_bad: bool,
    category: str | None,
    workdir: Path,
    line: bool = True,
    ids: str | None = None,
) -> NewImages:
    """The images of `data`'s train/good, or of the list `images` (rows of another `category`
    left out when the list has that column), or of the captured requests `ids` of `images=capture:...`.
    Missing or unreadable images fail the job, or with `skip_bad` are logged (under `category`/ in a
    `line`) and left out (call inside the run)."""
    logged_as = category if line else None
    if images and images.startswith(PREFIX):
        images = str(captured_list(images, ids, workdir / "captured"))
    if data:
        root = resolve_data(data, workdir)
        paths = readable_train_images(root, skip_bad, logged_as)
        return NewImages(paths, folder_dataset(root, paths, "train"), {"data": data, "n_new_images": len(paths)}, {})
    listed = read_image_list(images)
    if category and any(c is not None for _, c in listed):
        kept = [p for p, c in listed if c == category]
        _logger.info("update_bank: %d of %d listed images are of category %s", len(kept), len(listed), category)
        if not kept:
            raise ValueError(f"{images} lists no image of category {category!r}; its categories: "
                             f"{sorted({c for _, c in listed if c})}.")  # fmt: skip
    else:
        kept = [p for p, _ in listed]
    bad = [(p, "missing") for p in kept if not p.is_file()]
    bad += find_bad_images([p for p in kept if p.is_file()])
    paths = drop_bad(kept, bad, skip_bad, logged_as, what="listed")
    digest = list_digest(paths)
    dataset = MetaDataset(source=_folder_source(Path(images)), name=f"{Path(images).stem}/feedback", digest=digest[:32])
    tags = {"feedback.images": str(len(paths)), "feedback.digest": digest, "feedback.list": str(Path(images).resolve())}
    return NewImages(paths, dataset, {"images": images, "n_new_images": len(paths)}, tags)


def list_digest(paths: list[Path]) -> str:
    """sha256 over each listed image's file name and bytes, in list order."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def new_version_name(parent: registry.ModelRef, model_uri: str, model_name: str | None) -> str:
    """The registered model a child of `model_uri` joins: `model_name`, else the parent's."""
    name = model_name or (parent.versions[0].name if parent.versions else None)
    if name is None:
        raise ValueError(f"{model_uri} is not a registered model version: pass --model-name for the new version.")
    return name


def log_and_register(detector: SpadeDetector | LineDetector, model_name: str, category: str | None = None):
    """Log the model and register it; a failed upload says where it failed and that nothing was registered.

    MLflow registers a version only once every file is stored, but its own error names only the
    HTTP request that failed (after about 4 minutes of retries by default); a team needs to know
    which service to look at.
    """
    try:
        extra = {} if category is None else {"category": category}
        return log_model(detector, name="model", registered_model_name=model_name, **extra)
    except MlflowException as exc:
        where = (
            "the tracking server could not store the model's files in its artifact store (see the server's "
            "log: is the object store up, are its endpoint, bucket and credentials right?)"
            if "mlflow-artifacts" in exc.message
            else "storing the model failed"
        )
        raise RuntimeError(f"{where}; no version of {model_name!r} was registered. Cause: {exc.message}") from exc


def readable_train_images(root: Path, skip_bad: bool, category: str | None = None) -> list[Path]:
    """<root>/train/good, checked readable (see `drop_bad`)."""
    images = read_train(root)
    return drop_bad(images, find_bad_images(images), skip_bad, category, what="training")


def drop_bad(
    images: list[Path], bad: list[tuple[Path, str]], skip_bad: bool, category: str | None, what: str
) -> list[Path]:
    """`images` without the `bad` ones: with bad images the job fails, or with `skip_bad` they are
    logged (in skipped_images.txt, or <category>/skipped_images.txt) and left out."""
    if not bad:
        return images
    listing = "\n".join(f"  {path}: {reason}" for path, reason in bad)
    if not skip_bad:
        raise ValueError(f"{len(bad)} unreadable {what} images:\n{listing}\nFix them or pass --skip-bad.")
    mlflow.log_text(listing, f"{key_part(category)}/skipped_images.txt" if category else "skipped_images.txt")
    dropped = {b for b, _ in bad}
    kept = [p for p in images if p not in dropped]
    if not kept:
        raise ValueError(f"every one of the {len(images)} {what} images is missing or unreadable:\n{listing}")
    return kept


def log_fit(detector: SpadeDetector, n_images: int, seconds: float, category: str | None = None) -> None:
    """The bank's size, the build's speed and the calibration as metrics (`<category>.` prefixed)."""
    bank = detector.bank
    figures = {
        "bank_images": bank.n_images,
        "bank_bytes": bank.nbytes,
        "bank_bytes_per_image": bank.nbytes / bank.n_images,
        "build_seconds": seconds,
        "build_images_per_s": n_images / seconds,
        **detector.calibration.metrics(),
    }
    mlflow.log_metrics({prefixed(category, key): float(value) for key, value in figures.items()})


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


def line_digest(digests: dict[str, str]) -> str:
    """The content digest of a line's test sets from {category: its test-set digest}."""
    text = "".join(f"{name}:{digest};" for name, digest in digests.items())
    return hashlib.sha256(text.encode()).hexdigest()


def evaluation_folders(model_uri: str, root: Path) -> dict[str, Path] | None:
    """A line model's test folders {category: folder} in `root` (a root of categories, or one MVTec
    folder named after a category); None for a single-category model, which takes one folder.

    Raises:
        ValueError: the data holds none of the line's categories, or a root for a single model.
    """
    categories = model_categories(model_uri)
    if categories is None:
        if not is_mvtec_folder(root):
            raise ValueError(f"{model_uri} is a single-category model: evaluate it on one MVTec-layout folder.")
        return None
    found = {root.name: root} if is_mvtec_folder(root) else find_categories(root)[0]
    folders = {name: found[name] for name in categories if name in found}
    if not folders:
        raise ValueError(f"{root} holds none of the line model's categories {categories}; it holds {list(found)}.")
    for name in sorted(set(found) - set(categories)):
        _logger.info("evaluate: %s is not a category of %s, ignored", name, model_uri)
    return folders


def folder_dataset(root: Path, paths: list[Path], split: str) -> MetaDataset:
    """An MLflow dataset for a folder's images: its source is the folder, its digest our content
    digest (its first 32 hex digits: MLflow's digest column is short; the version tag keeps all 64)."""
    digest = content_digest(root, paths)[:32]
    return MetaDataset(source=_folder_source(root), name=f"{root.name}/{split}", digest=digest)


def evaluation_dataset(root: Path, digest: str, folders: dict[str, Path] | None = None) -> PandasDataset:
    """The test set as the evaluator's DataFrame (`frame_from_folder`), an MLflow dataset named and
    sourced like `folder_dataset`, with the test set's content digest. With a line's `folders`, the
    frame holds every category's test set and a `category` column."""
    if folders is None:
        frame = frame_from_folder(root)
    else:
        frame = pd.concat(
            [frame_from_folder(path).assign(category=name) for name, path in folders.items()], ignore_index=True
        )
    return mlflow.data.from_pandas(frame, source=_folder_source(root), name=f"{root.name}/test", digest=digest[:32])


def _folder_source(root: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": it is a local folder
        return resolve_dataset_source(str(root.resolve()))


def evaluate(model_uri: str, data: str) -> dict[str, float]:
    """Evaluate a model on <data>/test with the `knn_anomaly` MLflow evaluator (metrics linked to
    the model and the test data, plots); tag the registered version(s) the URI names. A line
    model is evaluated per category (`<category>.<metric>`, and `mean.<metric>` over categories)."""
    with tempfile.TemporaryDirectory() as tmp, run_of("evaluate"):
        root = resolve_data(data, Path(tmp))
        target = registry.model_ref(model_uri)
        folders = evaluation_folders(model_uri, root)
        digests = {name: data_digest(path) for name, path in (folders or {}).items()}  # read each file once
        digest = data_digest(root) if folders is None else line_digest(digests)
        log_new_params({"model_uri": model_uri, "data": data, "data_digest": digest})
        dataset = evaluation_dataset(root, digest, folders)
        mlflow.log_input(dataset, context="evaluation")  # MLflow's evaluate logs it again, without the context
        result = mlflow.models.evaluate(
            model_uri,
            dataset,
            model_type=MODEL_TYPE,
            evaluators=[EVALUATOR_NAME],
            model_id=target.model_id,
        )
        prefixes = [""] if folders is None else [prefixed(name, "") for name in folders] + [f"{MEAN}."]
        for version in target.versions:
            _tag_version(version, result.metrics, digest, prefixes)
            for name, category_digest in digests.items():  # line promotion compares category by category
                key = EVAL_PREFIX + prefixed(name, "data_digest")
                MlflowClient().set_model_version_tag(version.name, version.version, key, category_digest)
        return result.metrics


HEADLINE = ("image_auroc", "pixel_auroc", "aupro", "image_f1_threshold", "pixel_f1_threshold")


def _tag_version(version: ModelVersion, figures: dict[str, float], digest: str, prefixes: list[str]) -> None:
    client = MlflowClient()
    for key in (p + k for p in prefixes for k in HEADLINE if p + k in figures):
        client.set_model_version_tag(version.name, version.version, registry.EVAL_PREFIX + key, f"{figures[key]:.6f}")
    client.set_model_version_tag(version.name, version.version, registry.DIGEST_TAG, digest)
    client.set_model_version_tag(version.name, version.version, "eval.run_id", mlflow.active_run().info.run_id)


def lifecycle(
    data: str,
    config: SpadeConfig,
    model_name: str,
    metric: str,
    min_delta: float,
    skip_bad: bool = False,
    categories: list[str] | None = None,
    category_settings: str | None = None,
    max_category_drop: float = registry.MAX_CATEGORY_DROP,
) -> registry.Decision:
    """build bank -> evaluate -> register -> promote, as nested runs of one parent run (a root of
    categories builds, evaluates and promotes a line model)."""
    with run_of("main"):
        _, version = build_bank(
            data, config, model_name, skip_bad=skip_bad, categories=categories, category_settings=category_settings
        )
        figures = evaluate(f"models:/{model_name}/{version}", data)
        line = any(key.startswith(f"{MEAN}.") for key in figures)
        if (f"{MEAN}.{metric}" if line else metric) not in figures and metric in PIXEL_METRICS:
            metric = "image_auroc"  # image-level labels only: no pixel metric to decide on
        decision = registry.promote(model_name, version, metric, min_delta, max_category_drop)
        mlflow.set_tags({"promotion.decision": "promoted" if decision.promoted else "kept", "version": version})
        return decision


def log_config(config: SpadeConfig) -> None:
    log_new_params({k: json.dumps(v) if isinstance(v, list) else v for k, v in config.to_dict().items()})


def log_new_params(params: dict) -> None:
    """Log params the run does not have yet. `mlflow run` logs its MLproject parameters on the same
    run before the job starts, spelt as given on the command line ('' for an empty list, 'true' for
    True); MLflow refuses to log a param again with another spelling, so those keep theirs."""
    run = mlflow.active_run()
    logged = MlflowClient().get_run(run.info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})


def run_of(name: str):
    """A run of its own, nested under the active run if there is one (main's children)."""
    return mlflow.start_run(run_name=name, nested=mlflow.active_run() is not None)
