"""A line model served by `mlflow models serve` and scored on Spark: one endpoint, many part types."""

import base64
import shutil

import numpy as np
import pandas as pd
import pytest
import requests

from mlflow_knn_anomaly import SpadeConfig, save_model
from mlflow_knn_anomaly.algorithm.line import LineDetector
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_test, read_train

from .conftest import served

pytestmark = pytest.mark.slow
NAMES = ("disc", "plate")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plant")
    return {
        name: make_synthetic(tmp / name, seed=seed, n_train=16, n_test_good=3, n_per_defect=2, size=96)
        for seed, name in enumerate(NAMES)
    }


@pytest.fixture(scope="module")
def line(roots):
    return LineDetector.fit({n: read_train(r) for n, r in roots.items()}, dict.fromkeys(roots, SpadeConfig(k_images=3)))


@pytest.fixture(scope="module")
def model(line, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "line"
    save_model(line, path)
    return path


@pytest.fixture(scope="module")
def server(model):
    with served(model) as url:
        yield url


def _post(url: str, columns: list[str], rows: list[list]) -> requests.Response:
    payload = {"dataframe_split": {"columns": columns, "data": rows}, "params": {"segment": "all"}}
    return requests.post(f"{url}/invocations", json=payload, timeout=120)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_one_request_mixes_categories_and_bad_rows_come_back_as_row_errors(server, line, roots):
    disc = [s.path for s in read_test(roots["disc"])][:2]
    plate = [s.path for s in read_test(roots["plate"])][-2:]
    rows = [
        [_b64(disc[0].read_bytes()), "disc"],
        [_b64(plate[0].read_bytes()), "plate"],
        [_b64(b"not an image"), "plate"],
        [_b64(disc[1].read_bytes()), "bottle"],
        [_b64(plate[1].read_bytes()), "plate"],
        [_b64(disc[1].read_bytes()), "disc"],
    ]
    response = _post(server, ["image", "category"], rows)
    assert response.status_code == 200, response.text
    out = response.json()["predictions"]
    assert [r["category"] for r in out] == ["disc", "plate", "plate", "bottle", "plate", "disc"]
    assert [r["error"] == "" for r in out] == [True, True, False, False, True, True]
    assert "unknown category 'bottle'" in out[3]["error"] and "['disc', 'plate']" in out[3]["error"]
    for name, indices, paths in (("disc", [0, 5], disc), ("plate", [1, 4], plate)):
        expected = line.detector(name).predict(paths, segment="all").scores
        # the server sums convolutions with its own thread count: equal to float32 rounding
        np.testing.assert_allclose([out[i]["score"] for i in indices], expected, rtol=1e-5)


def test_a_request_without_the_category_column_is_a_400_listing_the_categories(server, roots):
    image = _b64(read_test(roots["disc"])[0].path.read_bytes())
    response = _post(server, ["image"], [[image]])
    assert response.status_code == 400
    assert "line model of 2 part types" in response.text and "['disc', 'plate']" in response.text


def test_spark_scores_a_line_with_the_category_of_each_folder(model, line, roots, tmp_path):
    if shutil.which("java") is None:
        pytest.skip("Spark needs Java (java not found on PATH)")
    pytest.importorskip("pyspark", reason="pyspark is not installed: pip install '.[spark]'")
    from mlflow_knn_anomaly.mlops.spark import score, session

    source = tmp_path / "images"
    for name, root in roots.items():
        (source / name).mkdir(parents=True)
        for sample in read_test(root)[:3]:
            shutil.copy(sample.path, source / name / f"{sample.defect_type}-{sample.path.name}")
    (source / "bottle").mkdir()
    shutil.copy(read_test(roots["disc"])[0].path, source / "bottle" / "x.png")
    paths = sorted(source.rglob("*.png"))
    table = pd.DataFrame({"path": [str(p) for p in paths], "part": [p.parent.name for p in paths]})
    table.to_parquet(tmp_path / "table.parquet")
    spark = session("local[2]")
    try:
        rows = score(spark, str(model), str(source), str(tmp_path / "out.parquet"), category_from_folder=True)
        score(spark, str(model), str(tmp_path / "table.parquet"), str(tmp_path / "by_column.parquet"), "part")
    finally:
        spark.stop()
    by_column = pd.read_parquet(tmp_path / "by_column.parquet").sort_values("path").reset_index(drop=True)
    out = pd.read_parquet(tmp_path / "out.parquet").sort_values("path").reset_index(drop=True)
    assert rows == 7 and list(out["category"]) == ["bottle"] + ["disc"] * 3 + ["plate"] * 3
    assert "unknown category 'bottle'" in out["error"][0] and (out["error"][1:] == "").all()
    assert list(by_column["category"]) == list(out["category"])  # the table's column names the same parts
    # two Spark jobs batch the images their own way: equal to float32 rounding
    np.testing.assert_allclose(
        by_column["score"].to_numpy(float), out["score"].to_numpy(float), rtol=1e-5, equal_nan=True
    )
    for name in NAMES:
        part = out[out["category"] == name]
        expected = line.detector(name).predict([source / name / p.split("/")[-1] for p in part["path"]]).scores
        # Spark's workers sum convolutions with their own thread count: equal to float32 rounding
        np.testing.assert_allclose(part["score"].to_numpy(float), expected, rtol=1e-5)
