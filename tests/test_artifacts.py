"""A saved detector on disk: integrity, atomic writes, versions, and models of earlier formats."""

import json
import shutil

import numpy as np
import pytest

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.evaluation.datasets import read_test, read_train


def test_tampered_artifact_is_refused(saved_detector, tmp_path):
    copy = shutil.copytree(saved_detector, tmp_path / "copy")
    target = next((copy / "bank").glob("map_*.npy"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{target.name}.*sha256"):
        SpadeDetector.load(copy)


def test_save_refuses_to_overwrite(fitted, saved_detector):
    with pytest.raises(FileExistsError, match="already exists"):
        fitted.save(saved_detector)


def test_loading_warns_when_a_library_major_version_differs(saved_detector, tmp_path):
    copy = shutil.copytree(saved_detector, tmp_path / "old")
    record = json.loads((copy / "config.json").read_text())
    record["versions"]["torch"] = "1.13.1"
    (copy / "config.json").write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="torch 1.13.1"):
        SpadeDetector.load(copy)


def test_a_model_saved_before_the_new_map_settings_loads_with_the_settings_it_was_calibrated_with(
    synthetic_root, tmp_path
):
    # An older model: three layers saved as "the backbone's default", no layer_combine / scale_gallery /
    # gallery_feature (its bank holds the last layer's pooled feature only) / map_weight / score_top.
    older = SpadeConfig(
        layers="blocks.1,blocks.2,blocks.4",
        k_images=3,
        layer_combine="mean",
        scale_gallery=False,
        gallery_feature="last",
        map_weight=1.0,
        score_top=0.0,
    )
    path = SpadeDetector(older).fit(read_train(synthetic_root)[:12]).save(tmp_path / "older")
    record = json.loads((path / "config.json").read_text())
    record["config"]["layers"] = []
    for key in ("layer_combine", "scale_gallery", "gallery_feature", "map_weight", "score_top", "exact_maps"):
        del record["config"][key]
    (path / "config.json").write_text(json.dumps(record))
    loaded = SpadeDetector.load(path)
    config = loaded.config
    assert (config.layer_combine, config.scale_gallery, config.gallery_feature) == ("mean", False, "last")
    assert config.map_weight == 1.0  # the plain mean its thresholds were calibrated with
    assert config.score_top == 0.0  # and the map's maximum
    assert config.exact_maps  # and the maps it was measured with, searched whole
    assert config.pyramid == ("blocks.1", "blocks.2", "blocks.4")  # the bank's, not today's default
    assert loaded.predict([read_test(synthetic_root)[0].path], segment="all").segmented.all()
    defaults = SpadeConfig()
    assert (defaults.layer_combine, defaults.scale_gallery, defaults.gallery_feature) == ("geometric", True, "pyramid")


def test_a_model_of_the_previous_format_loads_and_predicts_the_same(fitted, saved_detector, synthetic_root, tmp_path):
    # Format 2 kept the fitted state among the settings, the gate as `candidate_threshold`.
    old = shutil.copytree(saved_detector, tmp_path / "format2")
    record = json.loads((old / "config.json").read_text())
    calibration = record.pop("calibration")
    record["config"].update(
        {
            **{k: calibration[k] for k in ("image_threshold", "pixel_threshold", "knn_mean", "knn_std")},
            **{k: calibration[k] for k in ("map_mean", "map_std", "layer_scales")},
            "candidate_threshold": calibration["gate_threshold"],
            "candidate_sigmas": 0.0,
        }
    )
    del record["config"]["gate_recall"], record["config"]["stage1_feature"]
    record["format_version"] = 2
    (old / "config.json").write_text(json.dumps(record))
    loaded = SpadeDetector.load(old)
    assert loaded.config == fitted.config.replace(gate_recall=SpadeConfig().gate_recall)
    paths = [s.path for s in read_test(synthetic_root)][::3]
    before, after = fitted.predict(paths), loaded.predict(paths)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(before.segmented, after.segmented)
