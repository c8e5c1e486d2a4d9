"""Line models through the MLflow lifecycle: build a root, evaluate per category, change one
category without touching the others, and refuse bad input before anything is registered."""

import json
import shutil
from pathlib import Path

import mlflow
import pytest

from mlflow_knn_anomaly import SpadeConfig
from mlflow_knn_anomaly.algorithm.artifacts import sha256
from mlflow_knn_anomaly.algorithm.line import LineDetector
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic
from mlflow_knn_anomaly.mlops import jobs, line_jobs

SMALL = SpadeConfig(k_images=3)


def _part(root: Path, seed: int, masks: bool = True) -> Path:
    return make_synthetic(root, seed=seed, n_train=14, n_test_good=3, n_per_defect=2, size=96, masks=masks)


@pytest.fixture(scope="module")
def line_root(tmp_path_factory) -> Path:
    """Two categories (one with image labels only), a stray file and a folder that is no category."""
    root = tmp_path_factory.mktemp("plant")
    _part(root / "disc", 1)
    _part(root / "plate", 2, masks=False)
    (root / "README.txt").write_text("not a category")
    (root / "notes").mkdir()
    return root


@pytest.fixture(scope="module")
def new_part(tmp_path_factory) -> Path:
    return _part(tmp_path_factory.mktemp("new") / "ring", 3)


def _versions(client) -> list:
    return [v for m in client.search_registered_models() for v in client.search_model_versions(f"name='{m.name}'")]


def _category_files(version_uri: str, category: str) -> dict[str, str]:
    local = Path(mlflow.artifacts.download_artifacts(version_uri)) / "data" / "line" / "categories" / category
    return {p.relative_to(local).as_posix(): sha256(p) for p in sorted(local.rglob("*")) if p.is_file()}


def test_a_root_builds_evaluates_and_changes_one_category_at_a_time(tracking, line_root, new_part):
    run_id, version = jobs.build_bank(str(line_root), SMALL, "line")
    tags = tracking.get_model_version("line", version).tags
    assert tags["line.categories"] == "disc,plate"
    run = tracking.get_run(run_id)
    assert run.data.metrics["disc.bank_images"] > 0 and "plate.calibration.image_threshold" in run.data.metrics
    assert sorted(d.dataset.name for d in run.inputs.dataset_inputs) == ["disc/train", "plate/train"]

    figures = jobs.evaluate("models:/line/1", str(line_root))
    assert {"disc.image_auroc", "disc.aupro", "plate.image_auroc", "mean.image_auroc", "mean.aupro"} <= set(figures)
    assert "plate.aupro" not in figures
    assert figures["mean.aupro.n_categories"] == 1 and figures["mean.image_auroc.n_categories"] == 2
    both = (figures["disc.image_auroc"] + figures["plate.image_auroc"]) / 2
    assert figures["mean.image_auroc"] == pytest.approx(both)
    tags = tracking.get_model_version("line", "1").tags
    assert float(tags["eval.mean.aupro"]) == pytest.approx(figures["mean.aupro"], abs=1e-6)

    _, v2 = line_jobs.add_category("models:/line/1", str(new_part), "ring")
    tags = tracking.get_model_version("line", v2).tags
    assert (tags["line.categories"], tags["parent.version"]) == ("disc,plate,ring", "1")
    assert tags["line.change"] == "added ring"
    for category in ("disc", "plate"):  # left alone: byte for byte
        assert _category_files("models:/line/1", category) == _category_files(f"models:/line/{v2}", category)

    _, v3 = jobs.update_bank(f"models:/line/{v2}", str(new_part), category="disc")
    tags = tracking.get_model_version("line", v3).tags
    assert tags["line.unchanged"] == "plate,ring" and tags["line.change"].startswith("update_bank disc: +")
    assert _category_files(f"models:/line/{v2}", "ring") == _category_files(f"models:/line/{v3}", "ring")
    assert _category_files(f"models:/line/{v2}", "disc") != _category_files(f"models:/line/{v3}", "disc")

    _, v4 = line_jobs.remove_category(f"models:/line/{v3}", "plate")
    line = jobs.load_model(f"models:/line/{v4}")
    assert isinstance(line, LineDetector) and line.categories == ("disc", "ring")


def test_main_on_a_root_builds_evaluates_registers_and_promotes(tracking, line_root):
    decision = jobs.lifecycle(str(line_root), SMALL, "line", "aupro", 0.0, categories=["disc"])
    assert decision.promoted
    tags = tracking.get_model_version("line", "1").tags
    assert tags["line.categories"] == "disc" and "eval.disc.aupro" in tags


def test_category_settings_override_one_category(tracking, line_root, tmp_path):
    settings = tmp_path / "settings.yaml"
    settings.write_text("plate:\n  sigma: 4.0\n  k_images: 2\n")
    run_id, version = jobs.build_bank(str(line_root), SMALL, "line", category_settings=str(settings))
    line = jobs.load_model(f"models:/line/{version}")
    assert (line.config("plate").sigma, line.config("plate").k_images) == (4.0, 2)
    assert line.config("disc") == SMALL
    assert tracking.get_run(run_id).data.params["plate.sigma"] == "4.0"


def _bad_root(tmp_path: Path, line_root: Path, kind: str) -> tuple[str, dict]:
    """(data folder, build_bank keyword arguments) of one kind of bad input."""
    root = tmp_path / "root"
    if kind == "no category":
        root.mkdir()
        (root / "empty").mkdir()
    elif kind == "case":
        shutil.copytree(line_root / "disc", root / "Disc")
        shutil.copytree(line_root / "disc", root / "disc")
    else:
        shutil.copytree(line_root, root)
    if kind == "backbones":
        (tmp_path / "s.json").write_text(json.dumps({"plate": {"weights": "random"}}))
        return str(root), {"category_settings": str(tmp_path / "s.json")}
    if kind == "unknown setting":
        (tmp_path / "s.json").write_text(json.dumps({"plate": {"sigmaa": 3}}))
        return str(root), {"category_settings": str(tmp_path / "s.json")}
    if kind == "unknown category":
        return str(root), {"categories": ["disc", "bottle"]}
    return str(root), {}


@pytest.mark.parametrize(
    ("kind", "error", "message"),
    [
        ("no category", FileNotFoundError, "holds no category"),
        ("case", ValueError, "differ only by case: rename one"),
        ("backbones", ValueError, r"weights: default for \['disc'\]; random for \['plate'\]"),
        ("unknown setting", ValueError, r"unknown settings \['sigmaa'\]"),
        ("unknown category", ValueError, r"names \['bottle'\], which the data does not hold; it holds \['disc', "),
    ],
)  # fmt: skip
def test_bad_roots_fail_before_any_work_and_register_nothing(tracking, tmp_path, line_root, kind, error, message):
    data, options = _bad_root(tmp_path, line_root, kind)
    with pytest.raises(error, match=message):
        jobs.build_bank(data, SMALL, "line", **options)
    assert _versions(tracking) == []


def test_changes_to_a_line_that_cannot_be_made_register_nothing(tracking, line_root, new_part):
    jobs.build_bank(str(line_root), SMALL, "line", categories=["disc"])
    with pytest.raises(ValueError, match="category 'disc' already exists.*update_bank -P category=disc"):
        line_jobs.add_category("models:/line/1", str(new_part), "disc")
    with pytest.raises(ValueError, match="differ only by case"):
        line_jobs.add_category("models:/line/1", str(new_part), "DISC")
    with pytest.raises(ValueError, match=r"no category; this line model holds \['disc'\]"):
        jobs.update_bank("models:/line/1", str(new_part))
    with pytest.raises(ValueError, match="only category"):
        line_jobs.remove_category("models:/line/1", "disc")
    assert [str(v.version) for v in _versions(tracking)] == ["1"]


def test_a_single_category_model_grows_into_a_line(tracking, line_root, new_part):
    jobs.build_bank(str(line_root / "disc"), SMALL, "parts")
    _, version = line_jobs.add_category("models:/parts/1", str(new_part), "ring")
    assert jobs.load_model(f"models:/parts/{version}").categories == ("disc", "ring")
