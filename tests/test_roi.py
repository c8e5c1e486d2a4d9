"""Inspection regions: what lies outside never counts, what lies inside is found, bad ROIs are refused."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image, ImageDraw

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.algorithm.roi import check_roi, read_roi
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_test, read_train

SIZE = 128


def _disc_roi(path, size=SIZE, radius=0.42):
    """White disc (the synthetic part) on black (its background), as a PNG file."""
    image = Image.new("L", (size, size), 0)
    r = radius * size
    ImageDraw.Draw(image).ellipse((size / 2 - r, size / 2 - r, size / 2 + r, size / 2 + r), fill=255)
    image.save(path)
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    return make_synthetic(root, seed=3, n_train=20, n_test_good=4, n_per_defect=2, size=SIZE)


@pytest.fixture(scope="module")
def with_roi(parts, tmp_path_factory):
    roi = _disc_roi(tmp_path_factory.mktemp("roi") / "roi.png")
    return SpadeDetector(SpadeConfig(k_images=3, roi=str(roi))).fit(read_train(parts))


def _paste(path, box, colour=(255, 255, 255)):
    image = np.asarray(Image.open(path).convert("RGB")).copy()
    x0, y0, x1, y1 = box
    image[y0:y1, x0:x1] = colour
    return image


def test_a_defect_outside_the_roi_changes_nothing_and_one_inside_is_found(with_roi, parts):
    normal = [s.path for s in read_test(parts) if not s.is_anomalous][0]
    corner = _paste(normal, (2, 2, 22, 22))  # a bright square in the background corner
    centre = _paste(normal, (58, 58, 70, 70))  # the same inside the disc
    clean, outside, inside = (with_roi.predict([x], segment="all") for x in (normal, corner, centre))
    assert outside.scores[0] == clean.scores[0] and outside.knn_scores[0] == clean.knn_scores[0]
    np.testing.assert_array_equal(outside.anomaly_maps[0], clean.anomaly_maps[0])
    assert outside.regions[0] == clean.regions[0]
    assert inside.is_anomalous[0] and inside.regions[0]
    top = inside.regions[0][0]
    assert top.x <= 64 < top.x + top.width and top.y <= 64 < top.y + top.height
    roi = inside.rois[0]
    assert not (inside.masks[0] & ~roi).any()  # nothing flagged outside


def test_the_roi_travels_with_the_model_and_is_hash_checked(with_roi, parts, tmp_path):
    path = with_roi.save(tmp_path / "model")
    assert "roi.png" in json.loads((path / "config.json").read_text())["sha256"]
    loaded = SpadeDetector.load(path)
    images = [s.path for s in read_test(parts)][:4]
    np.testing.assert_array_equal(loaded.predict(images, "all").scores, with_roi.predict(images, "all").scores)
    copy = shutil.copytree(path, tmp_path / "tampered")
    Image.new("L", (SIZE, SIZE), 255).save(copy / "roi.png")
    with pytest.raises(ValueError, match="roi.png .* does not match its recorded sha256"):
        SpadeDetector.load(copy)


def test_bad_rois_are_refused_before_any_work(parts, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("L", (SIZE, SIZE), 0).save(tmp_path / "black.png")
    Image.new("L", (2 * SIZE, SIZE), 255).save(tmp_path / "wide.png")
    images = read_train(parts)
    for name, message in (("notes.png", "is not an image"), ("black.png", "all black"), ("wide.png", "aspect 2.000")):
        with pytest.raises(ValueError, match=message):
            SpadeDetector(SpadeConfig(k_images=3, roi=str(tmp_path / name))).fit(images)
    with pytest.raises(ValueError, match="aspect ratios from 1.000 to 1.500"):
        check_roi(read_roi(_disc_roi(tmp_path / "disc.png")), [(100, 100), (150, 100)])


def test_a_line_model_keeps_a_roi_per_category(parts, tmp_path):
    from mlflow_knn_anomaly import LineDetector

    roi = _disc_roi(tmp_path / "roi.png")
    configs = {"with-roi": SpadeConfig(k_images=3, roi=str(roi)), "plain": SpadeConfig(k_images=3)}
    images = read_train(parts)
    line = LineDetector.load(LineDetector.fit(dict.fromkeys(configs, images), configs).save(tmp_path / "line"))
    assert line.detector("with-roi").roi is not None and line.detector("plain").roi is None
    corner = _paste([s.path for s in read_test(parts) if not s.is_anomalous][0], (2, 2, 22, 22))
    assert line.detector("with-roi").predict([corner], "all").rois[0][:22, :22].sum() == 0
