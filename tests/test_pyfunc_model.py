import base64
import io
import shutil
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException
from PIL import Image

from mlflow_knn_anomaly import decode_anomaly_map, decode_mask, load_model
from mlflow_knn_anomaly.evaluation.datasets import read_test

from .conftest import encode_image


@pytest.fixture(scope="module")
def pyfunc(model_dir):
    return mlflow.pyfunc.load_model(str(model_dir))


def test_model_directory_has_flavor_code_signature_and_no_pickle(model_dir):
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    assert "mlflow_knn_anomaly" in mlmodel["flavors"]
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow_knn_anomaly.mlops.pyfunc_model"
    assert (model_dir / "code" / "mlflow_knn_anomaly" / "algorithm" / "spade.py").is_file()
    assert (model_dir / "data" / "detector" / "weights.safetensors").is_file()
    assert {"segment", "image_threshold", "pixel_threshold", "return_anomaly_map"} <= {
        p["name"] for p in yaml.safe_load(mlmodel["signature"]["params"])
    }
    assert not list(model_dir.rglob("*.pkl"))


def test_pyfunc_predict_equals_the_detector(pyfunc, fitted, synthetic_root):
    paths = [s.path for s in read_test(synthetic_root)][::3]
    out = pyfunc.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}), params={"segment": "all"})
    expected = fitted.predict(paths, segment="all")
    np.testing.assert_allclose(out["score"].to_numpy(float), expected.scores, rtol=1e-5)
    np.testing.assert_allclose(out["normalized_score"].to_numpy(float), expected.normalized_scores, rtol=1e-5)
    for text, mask in zip(out["mask"], expected.masks):
        np.testing.assert_array_equal(decode_mask(text), mask)
    assert (out["error"] == "").all()


def test_a_model_saved_before_the_layer_folders_loads_through_its_old_loader_module(model_dir, fitted, tmp_path):
    # 0.5.0 and earlier named `mlflow_knn_anomaly.pyfunc_model`; with the package already imported
    # (as in any process that loaded MLflow's evaluator plugins), that name is looked up in today's code
    old = tmp_path / "old-model"
    shutil.copytree(model_dir, old)
    mlmodel = yaml.safe_load((old / "MLmodel").read_text())
    mlmodel["flavors"]["python_function"]["loader_module"] = "mlflow_knn_anomaly.pyfunc_model"
    (old / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    image = fitted.holdout[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    out = mlflow.pyfunc.load_model(str(old)).predict(pd.DataFrame({"image": [buffer.getvalue()]}))
    assert out["error"][0] == "" and out["score"][0] == pytest.approx(fitted.predict([image]).scores[0], rel=1e-5)


def test_bad_rows_get_errors_and_good_rows_still_come_back_in_order(pyfunc, synthetic_root):
    good = read_test(synthetic_root)[0].path.read_bytes()
    png = encode_image(Image.new("RGB", (64, 64), (120, 130, 140)))
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64)).save(jpeg, format="JPEG")
    rows = [good, b"", b"hello, I am a text file", png[: len(png) // 2], jpeg.getvalue()[:100], good]
    out = pyfunc.predict(pd.DataFrame({"image": rows}))
    assert len(out) == 6
    assert list(out["error"] == "") == [True, False, False, False, False, True]
    assert out["score"].isna().tolist() == [False, True, True, True, True, False]
    assert out["score"][0] == out["score"][5]


def test_segment_none_returns_no_mask_and_maps_only_when_asked(pyfunc, fitted, synthetic_root):
    path = [s for s in read_test(synthetic_root) if s.is_anomalous][0].path
    frame = pd.DataFrame({"image": [path.read_bytes()]})
    none = pyfunc.predict(frame, params={"segment": "none"})
    assert none["mask"][0] == "" and not none["segmented"][0] and "anomaly_map" not in none
    with_map = pyfunc.predict(frame, params={"segment": "all", "return_anomaly_map": True})
    decoded = decode_anomaly_map(with_map["anomaly_map"][0])
    expected = fitted.predict([path], segment="all").anomaly_maps[0]
    assert decoded.shape == expected.shape
    np.testing.assert_allclose(decoded, expected, rtol=1e-3, atol=1e-3 * float(expected.max()))


def test_threshold_params_override(pyfunc, synthetic_root):
    frame = pd.DataFrame({"image": [read_test(synthetic_root)[0].path.read_bytes()]})
    out = pyfunc.predict(frame, params={"image_threshold": 1e-6})
    assert out["is_anomalous"][0] and out["segmented"][0] and out["normalized_score"][0] > 1


@pytest.mark.parametrize(
    ("frame", "params", "message"),
    [
        (pd.DataFrame({"picture": [b"x"]}), None, "column 'image'"),
        (pd.DataFrame({"image": [b"x"]}), {"segment": "sometimes"}, "segment='sometimes'"),
        (pd.DataFrame({"image": [b"x"]}), {"colour": 1}, "unknown params"),
    ],
)
def test_unreadable_requests_say_what_was_expected(model_dir, frame, params, message):
    from mlflow_knn_anomaly.mlops.pyfunc_model import _load_pyfunc

    raw = _load_pyfunc(str(model_dir / "data" / "detector"))
    with pytest.raises(MlflowException, match=message):
        raw.predict(frame, params)


def test_base64_strings_are_accepted_like_bytes(pyfunc, synthetic_root):
    data = read_test(synthetic_root)[0].path.read_bytes()
    a = pyfunc.predict(pd.DataFrame({"image": [data]}))
    b = pyfunc.predict(pd.DataFrame({"image": [base64.b64encode(data).decode()]}))
    assert a["score"][0] == b["score"][0]


def test_load_model_returns_the_native_detector(model_dir, fitted):
    detector = load_model(str(model_dir))
    assert detector.config == fitted.config


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal: there tqdm (disable=None) draws its bars."""

    def isatty(self) -> bool:
        return True


def test_the_pyfunc_path_never_draws_a_progress_bar_even_on_a_terminal(model_dir, fitted, synthetic_root, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    paths = [s.path for s in read_test(synthetic_root)][:6]
    model = mlflow.pyfunc.load_model(str(model_dir))
    model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}), params={"segment": "all"})
    assert "batch" not in terminal.getvalue()  # the unit of every bar of this package
    fitted.predict(paths, segment="none", progress=True)  # where a bar is asked for, this terminal shows it
    assert "predict: 100%" in terminal.getvalue()


def test_regions_come_back_as_json_and_min_region_area_is_a_request_param(pyfunc, fitted, synthetic_root):
    from mlflow_knn_anomaly import decode_regions

    path = [s for s in read_test(synthetic_root) if s.is_anomalous][0].path
    frame = pd.DataFrame({"image": [path.read_bytes()]})
    out = pyfunc.predict(frame, params={"segment": "all"})
    expected = fitted.predict([path], segment="all")
    from mlflow_knn_anomaly.algorithm.regions import encode_regions

    assert out["regions"][0] == encode_regions(expected.regions[0]) and decode_regions(out["regions"][0])
    big = pyfunc.predict(frame, params={"segment": "all", "min_region_area": 0.5})  # half the image: none
    assert big["regions"][0] == "[]" and not decode_mask(big["mask"][0]).any()
    assert pyfunc.predict(frame, params={"segment": "none"})["regions"][0] == ""
    with pytest.raises(MlflowException, match="min_region_area must be"):
        pyfunc.predict(frame, params={"min_region_area": -3.0})
