"""Line models in the MLflow lifecycle: build one over a root of part types, and change one
category (add, update, remove) without rebuilding the others.

Each job is one MLflow run and registers one new version; a category left alone keeps its bank
and calibration byte for byte (`LineDetector.save` copies it and checks its sha256).
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from ..algorithm.line import LineDetector, check_category_names, check_shared_settings
from ..algorithm.spade import SpadeDetector, split_holdout
from ..config import SpadeConfig, read_category_settings, with_settings
from ..evaluation.datasets import find_categories, is_mvtec_folder
from . import jobs, registry
from .names import key_part, prefixed
from .pyfunc_model import load_model, model_category

_logger = logging.getLogger(__name__)
CATEGORIES_TAG = registry.CATEGORIES_TAG
CHANGE_TAG = "line.change"


def category_configs(
    found: dict[str, Path], config: SpadeConfig, categories: list[str] | None, settings_file: str | None
) -> dict[str, SpadeConfig]:
    """Each picked category's settings: `config`, with the file's overrides for that category.

    Raises:
        ValueError: a picked or overridden category is not in the root, a bad name, or categories
            that would need different backbones.
    """
    names = categories or list(found)
    overrides = read_category_settings(settings_file) if settings_file else {}
    for what, asked in (("categories", names), ("category_settings", list(overrides))):
        unknown = [name for name in asked if name not in found]
        if unknown:
            raise ValueError(f"{what} names {unknown}, which the data does not hold; it holds {list(found)}.")
    check_category_names(names)
    configs = {name: with_settings(config, overrides.get(name, {})) for name in names}
    check_shared_settings(configs)
    return configs


def build_line(
    root: Path, data: str, config: SpadeConfig, model_name: str, categories: list[str] | None,
    settings_file: str | None, skip_bad: bool = False,
) -> tuple[str, str]:  # fmt: skip
    """Fit one bank per category of `root` (its subfolders with a train/good), log them as one
    line model and register a new version of `model_name`.

    Returns:
        (run id, registered version).
    """
    found, ignored = find_categories(root)
    for line in ignored:
        _logger.info("line root %s: %s", root, line)
    configs = category_configs(found, config, categories, settings_file)
    with jobs.run_of("build_bank") as run:
        images = {name: jobs.readable_train_images(found[name], skip_bad, name) for name in configs}
        for name, paths in images.items():
            split_holdout(paths, configs[name])  # too few images fails here, before any work
        jobs.log_config(config)
        jobs.log_new_params(
            {"data": data, "categories": ",".join(configs), "n_train_images": sum(map(len, images.values()))}
        )
        _log_overrides(config, configs)
        for name, paths in images.items():
            mlflow.log_input(jobs.folder_dataset(found[name], paths, "train"), context="training")
        start = time.perf_counter()
        line = LineDetector.fit(images, configs, settings=config, progress=True)
        mlflow.log_metric("build_seconds", time.perf_counter() - start)
        for name in configs:
            jobs.log_fit(line.detector(name), len(images[name]), line.fit_seconds_[name], name)
        version = register_line(line, model_name, {CHANGE_TAG: f"built {len(configs)} categories"})
        return run.info.run_id, version


def update_category(
    model_uri: str,
    data: str | None,
    images: str | None,
    category: str,
    model_name: str,
    skip_bad: bool,
    ids: str | None = None,
) -> tuple[str, str]:
    """Add new normal images (`jobs.new_normal_images`) to one category of a line model."""
    line = _load_line(model_uri)
    category = line.check_category(category)
    with tempfile.TemporaryDirectory() as tmp, jobs.run_of("update_bank") as run:
        new = jobs.new_normal_images(data, images, skip_bad, category, Path(tmp), ids=ids)
        jobs.log_new_params({"parent_model_uri": model_uri, "category": category, **new.params})
        jobs.log_config(line.config(category))
        mlflow.log_input(new.dataset, context="training")
        start = time.perf_counter()
        updated = line.detector(category).update(new.paths, progress=True)
        jobs.log_fit(updated, len(new.paths), time.perf_counter() - start, category)
        change = f"update_bank {category}: +{len(new.paths)} normal images"
        tags = {CHANGE_TAG: change, **new.tags}
        version = register_line(line.with_category(category, updated), model_name, tags, model_uri)
        return run.info.run_id, version


def add_category(
    model_uri: str, data: str, category: str, settings_file: str | None = None,
    model_name: str | None = None, skip_bad: bool = False,
) -> tuple[str, str]:  # fmt: skip
    """Fit a new part type on <data>/train/good beside a model's categories (a single-category model
    becomes a line of two) and register the result; nothing else is rebuilt.

    Returns:
        (run id, registered version).
    """
    name = jobs.new_version_name(registry.model_ref(model_uri), model_uri, model_name)
    line = _load_line(model_uri)
    if category in line.categories:
        raise ValueError(
            f"category {category!r} already exists in {model_uri}: add images to it with update_bank "
            f"-P category={category}, or remove_category it first."
        )
    check_category_names([*line.categories, category])
    overrides = read_category_settings(settings_file).get(category, {}) if settings_file else {}
    config = with_settings(line.settings, overrides)
    check_shared_settings({**{c: line.config(c) for c in line.categories}, category: config})
    with tempfile.TemporaryDirectory() as tmp, jobs.run_of("add_category") as run:
        root = jobs.resolve_data(data, Path(tmp))
        if not is_mvtec_folder(root):
            raise FileNotFoundError(f"{root / 'train' / 'good'} does not exist; add_category takes one MVTec folder.")
        images = jobs.readable_train_images(root, skip_bad)
        split_holdout(images, config)
        jobs.log_config(config)
        jobs.log_new_params({"parent_model_uri": model_uri, "data": data, "category": category})
        mlflow.log_input(jobs.folder_dataset(root, images, "train"), context="training")
        start = time.perf_counter()
        detector = SpadeDetector(config, backbone=line.backbone).fit(images, progress=True)
        seconds = time.perf_counter() - start
        mlflow.log_metric("build_seconds", seconds)
        jobs.log_fit(detector, len(images), seconds, category)
        version = register_line(
            line.with_category(category, detector), name, {CHANGE_TAG: f"added {category}"}, model_uri
        )
        return run.info.run_id, version


def remove_category(model_uri: str, category: str, model_name: str | None = None) -> tuple[str, str]:
    """Register a version of a line model without `category`; the others are copied as they are."""
    name = jobs.new_version_name(registry.model_ref(model_uri), model_uri, model_name)
    line = _load_line(model_uri)
    smaller = line.without_category(category)
    with jobs.run_of("remove_category") as run:
        jobs.log_new_params({"parent_model_uri": model_uri, "category": category})
        version = register_line(smaller, name, {CHANGE_TAG: f"removed {category}"}, model_uri)
        return run.info.run_id, version


def _load_line(model_uri: str) -> LineDetector:
    """The model as a line: a single-category model becomes a line of its one (named) category."""
    model = load_model(model_uri)
    if isinstance(model, LineDetector):
        return model
    category = model_category(model_uri)
    if not category:
        raise ValueError(
            f"{model_uri} is a single-category model saved without a category name (before line models): "
            "rebuild it with build_bank to name it, or build a line model from a root of folders."
        )
    return LineDetector({category: model})


def register_line(line: LineDetector, model_name: str, tags: dict[str, str], parent_uri: str | None = None) -> str:
    """Log and register the line; tag the version with its categories, the change and its parent."""
    info = jobs.log_and_register(line, model_name)
    version = str(info.registered_model_version)
    tags = {CATEGORIES_TAG: ",".join(map(key_part, line.categories)), **tags}
    if parent_uri:
        tags["parent.model_uri"] = parent_uri
        parent = registry.model_ref(parent_uri)
        if parent.versions:
            tags["parent.version"] = parent.versions[0].version
        tags["line.unchanged"] = ",".join(map(key_part, line.unchanged))
    client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    return version


def _log_overrides(config: SpadeConfig, configs: dict[str, SpadeConfig]) -> None:
    """Each category's settings that differ from the line's, as params `<category>.<setting>`."""
    base = config.to_dict()
    params = {
        prefixed(name, key): value
        for name, c in configs.items()
        for key, value in c.to_dict().items()
        if base[key] != value
    }
    if params:
        mlflow.log_params(params)
