"""Apache Spark on a real local[2] session: batch scoring and distributed bank building."""

import base64
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector, decode_mask, save_model
from mlflow_knn_anomaly.evaluation.datasets import read_test, read_train

from .conftest import assert_masks_agree

pyspark = pytest.importorskip("pyspark", reason="pyspark is not installed: pip install '.[spark]'")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spark():
    if shutil.which("java") is None:
        pytest.skip("Spark needs Java (java not found on PATH)")
    from mlflow_knn_anomaly.mlops.spark import session

    spark = session("local[2]")
    yield spark
    spark.stop()


def _hashes(path):
    return json.loads((path / "config.json").read_text())["sha256"]


def test_spark_built_bank_is_byte_identical_to_a_local_build(spark, synthetic_root, tmp_path):
    from mlflow_knn_anomaly.mlops.spark import build_bank

    images = read_train(synthetic_root)
    remote = build_bank(spark, images, SpadeConfig()).save(tmp_path / "spark")
    local = SpadeDetector(SpadeConfig()).fit(images).save(tmp_path / "local")
    assert _hashes(remote) == _hashes(local)


def test_spark_scoring_of_bottle_equals_in_process_predict(spark, bottle, tmp_path):
    from mlflow_knn_anomaly.mlops.spark import score

    root, detector = bottle
    save_model(detector, tmp_path / "model")
    source = tmp_path / "images"
    samples = read_test(root)[::6]  # every defect type and good ones; the whole set is the README test's
    for sample in samples:
        (source / sample.defect_type).mkdir(parents=True, exist_ok=True)
        shutil.copy(sample.path, source / sample.defect_type / sample.path.name)
    (source / "broken.png").write_bytes(b"not a png")
    rows = score(spark, str(tmp_path / "model"), str(source), str(tmp_path / "out.parquet"))
    out = pd.read_parquet(tmp_path / "out.parquet").sort_values("path").reset_index(drop=True)
    assert rows == len(samples) + 1
    broken = out[out["path"].str.endswith("broken.png")]
    assert len(broken) == 1 and broken["error"].iloc[0] and pd.isna(broken["score"].iloc[0])
    good = out.drop(broken.index).reset_index(drop=True)
    names = [f"{s.defect_type}/{s.path.name}" for s in samples]
    order = np.argsort(names)
    expected = detector.predict([samples[i].path for i in order], return_maps=True)
    threshold = detector.thresholds()[1]
    assert list(good["path"].str.split("/").str[-2:].str.join("/")) == [names[i] for i in order]
    np.testing.assert_allclose(good["score"].to_numpy(float), expected.scores, rtol=1e-5)
    from mlflow_knn_anomaly.algorithm.regions import decode_regions, encode_regions

    for i, (text, mask_png) in enumerate(zip(good["regions"], good["mask"])):
        if not expected.segmented[i]:
            assert pd.isna(text) and mask_png is None
            continue
        # Spark's workers sum features with their own thread count: the masks agree but for pixels
        # within float rounding of the threshold, which can move a region's area (never its count)
        got_mask = decode_mask(base64.b64encode(mask_png).decode())
        near = assert_masks_agree(got_mask, expected.masks[i], expected.anomaly_maps[i], threshold)
        got, want = decode_regions(text), decode_regions(encode_regions(expected.regions[i]))
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert abs(a.area - b.area) <= near and max(abs(a.x - b.x), abs(a.y - b.y)) <= (1 if near else 0)
        np.testing.assert_allclose([r.peak for r in got], [r.peak for r in want], atol=2e-4)


def test_a_parquet_table_of_image_bytes_scores_like_the_folder(spark, saved_detector, synthetic_root, tmp_path):
    from mlflow_knn_anomaly.mlops.spark import score

    model = tmp_path / "model"
    save_model(SpadeDetector.load(saved_detector), model)
    samples = read_test(synthetic_root)[:6]
    table = pd.DataFrame({"path": [str(s.path) for s in samples], "image": [s.path.read_bytes() for s in samples]})
    table.to_parquet(tmp_path / "table.parquet")
    score(spark, str(model), str(tmp_path / "table.parquet"), str(tmp_path / "out.parquet"))
    out = pd.read_parquet(tmp_path / "out.parquet").sort_values("path")
    assert "model_version" in out.columns  # every output column of the pyfunc, through Spark
    expected = SpadeDetector.load(saved_detector).predict([s.path for s in sorted(samples, key=lambda s: str(s.path))])
    np.testing.assert_allclose(out["score"].to_numpy(float), expected.scores, rtol=1e-5)
