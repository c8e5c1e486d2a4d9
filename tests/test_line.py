"""Line models: several categories beside one backbone, equal to a single model per category."""

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector, decode_mask, save_model
from mlflow_knn_anomaly.algorithm.artifacts import sha256
from mlflow_knn_anomaly.algorithm.line import LineDetector, check_category_names, check_shared_settings
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_test, read_train

SMALL = SpadeConfig(k_images=3)
# Two part types that differ in a per-category setting (sigma), as a line's categories may.
CONFIGS = {"disc-a": SMALL, "disc_b": SMALL.replace(sigma=4.0)}


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("line")
    return {
        name: make_synthetic(tmp / name, seed=seed, n_train=16, n_test_good=3, n_per_defect=2, size=96)
        for seed, name in enumerate(CONFIGS)
    }


@pytest.fixture(scope="module")
def line(roots) -> LineDetector:
    return LineDetector.fit({name: read_train(root) for name, root in roots.items()}, CONFIGS)


@pytest.fixture(scope="module")
def saved_line(line, tmp_path_factory) -> Path:
    return line.save(tmp_path_factory.mktemp("saved") / "line")


def test_every_category_predicts_exactly_as_a_single_model_of_its_folder(line, saved_line, roots):
    reloaded = LineDetector.load(saved_line)
    for name, root in roots.items():
        single = SpadeDetector(CONFIGS[name]).fit(read_train(root))
        images = [s.path for s in read_test(root)]
        expected = single.predict(images, segment="all")
        for got in (line.detector(name).predict(images, segment="all"), reloaded.detector(name).predict(images, "all")):
            np.testing.assert_allclose(got.scores, expected.scores, atol=1e-6)
            for a, b in zip(got.anomaly_maps, expected.anomaly_maps):
                np.testing.assert_allclose(a, b, atol=1e-6)
        assert reloaded.detector(name).calibration == single.calibration


def test_one_copy_of_the_weights_and_categories_open_on_first_use(saved_line):
    assert len(list(saved_line.rglob("weights.safetensors"))) == 1
    line = LineDetector.load(saved_line)
    assert line.opened == ()
    line.detector("disc_b")
    assert line.opened == ("disc_b",)
    assert line.detector("disc_b").backbone is line.detector("disc-a").backbone is line.backbone


def test_a_resave_copies_untouched_categories_byte_for_byte(saved_line, roots, tmp_path):
    line = LineDetector.load(saved_line)
    updated = line.with_category("disc_b", line.detector("disc_b").update(read_train(roots["disc_b"])[:4]))
    assert updated.unchanged == ("disc-a",)
    copy = updated.save(tmp_path / "copy")
    for path in sorted((saved_line / "categories" / "disc-a").rglob("*")):
        if path.is_file():
            assert sha256(path) == sha256(copy / path.relative_to(saved_line)), path
    changed = copy / "categories" / "disc_b" / "config.json"
    assert sha256(changed) != sha256(saved_line / "categories" / "disc_b" / "config.json")


def test_a_tampered_category_fails_when_it_is_opened(saved_line, tmp_path):
    import shutil

    copy = tmp_path / "line"
    shutil.copytree(saved_line, copy)
    bank = next((copy / "categories" / "disc_b" / "bank").glob("*.npy"))
    bank.write_bytes(bank.read_bytes()[:-8] + b"\0" * 8)
    line = LineDetector.load(copy)
    line.detector("disc-a")  # the others still open
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        line.detector("disc_b")


def test_unknown_categories_list_the_known_ones_and_near_misses_are_named(line):
    with pytest.raises(ValueError, match=r"unknown category 'Disc_B' \(did you mean 'disc_b'.*\['disc-a', 'disc_b'\]"):
        line.check_category("Disc_B")
    with pytest.raises(ValueError, match="no category; this line model holds"):
        line.check_category("")
    with pytest.raises(ValueError, match="only category"):
        LineDetector({"a": line.detector("disc-a")}).without_category("a")


@pytest.mark.parametrize(
    ("names", "message"),
    [(["bottle", "Bottle"], "differ only by case"), (["a/b"], "not allowed"), ([".."], "not allowed"),
     ([" "], "not allowed"), (["a\x00"], "not allowed")],
)  # fmt: skip
def test_bad_category_names_are_refused(names, message):
    with pytest.raises(ValueError, match=message):
        check_category_names(names)


def test_categories_with_different_backbones_are_refused_naming_them():
    configs = {"a": SMALL, "b": SMALL.replace(weights="random"), "c": SMALL.replace(layers="blocks.2")}
    with pytest.raises(ValueError, match=r"weights: default for \['a', 'c'\]; random for \['b'\].*layers:"):
        check_shared_settings(configs)


# ---- the pyfunc model ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(line, tmp_path_factory):
    path = tmp_path_factory.mktemp("pyfunc") / "model"
    save_model(line, path)
    return mlflow.pyfunc.load_model(str(path))


def test_a_mixed_request_is_grouped_by_category_and_comes_back_in_order(served, line, roots):
    a = [s.path.read_bytes() for s in read_test(roots["disc-a"])][:3]
    b = [s.path.read_bytes() for s in read_test(roots["disc_b"])][-2:]
    frame = pd.DataFrame(
        {
            "image": [a[0], b[0], a[1], b"not an image", b[1], a[2], a[0]],
            "category": ["disc-a", "disc_b", "disc-a", "disc-a", "disc_b", "nope", None],
        }
    )
    out = served.predict(frame, params={"segment": "all"})
    assert list(out["category"]) == ["disc-a", "disc_b", "disc-a", "disc-a", "disc_b", "nope", ""]
    assert list(out["error"] == "") == [True, True, True, False, True, False, False]
    assert "cannot decode" in out["error"][3]
    assert "unknown category 'nope'" in out["error"][5] and "['disc-a', 'disc_b']" in out["error"][5]
    assert "no category" in out["error"][6]
    for rows, name, images in (([0, 2], "disc-a", a[:2]), ([1, 4], "disc_b", b)):
        expected = line.detector(name).predict(images, segment="all")
        np.testing.assert_allclose(out["score"][rows].to_numpy(float), expected.scores, atol=1e-6)
        for text, mask in zip(out["mask"][rows], expected.masks):
            np.testing.assert_array_equal(decode_mask(text), mask)


def test_a_line_model_without_a_category_column_is_a_bad_request(served, roots):
    image = read_test(roots["disc-a"])[0].path.read_bytes()
    with pytest.raises(MlflowException, match=r"line model of 2 part types.*'category'.*\['disc-a', 'disc_b'\]"):
        served.predict(pd.DataFrame({"image": [image]}))
    with pytest.raises(MlflowException, match="category"):
        served.predict(pd.DataFrame({"image": [image], "category": [3]}))


def test_a_single_model_needs_no_category_and_refuses_another(fitted, tmp_path, synthetic_root):
    save_model(fitted, tmp_path / "model", category="synthetic")
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    image = read_test(synthetic_root)[0].path.read_bytes()
    plain = model.predict(pd.DataFrame({"image": [image]}))
    out = model.predict(pd.DataFrame({"image": [image] * 3, "category": ["synthetic", "", "bottle"]}))
    assert plain["error"][0] == "" and list(out["error"] == "") == [True, True, False]
    # one batch of two images against one of one: equal to float32 rounding
    assert out["score"][0] == pytest.approx(plain["score"][0], rel=1e-6)
    assert out["score"][1] == pytest.approx(plain["score"][0], rel=1e-6)
    assert "unknown category 'bottle'" in out["error"][2] and "'synthetic'" in out["error"][2]


def test_logging_a_model_leaves_the_process_thread_count_alone(line, tmp_path, monkeypatch):
    """MLflow loads a logged model to validate its serving input; the loader's thread sizing must not
    leak into the build that logs it (features summed with another thread count differ in the last
    bits, so a category fitted after a log would not equal its single-category model)."""
    import torch

    from mlflow_knn_anomaly import log_model

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_KNN_ANOMALY_THREADS", "1")  # what the loader then sets
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with mlflow.start_run():
            log_model(line, name="model")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        mlflow.set_tracking_uri(None)
