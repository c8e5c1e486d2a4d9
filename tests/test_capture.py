"""Request capture (issue 38): every answered row is kept off the request path, a location that
fails loses captures but no answer, and `monitor` and `update_bank` read the capture back."""

import base64
import shutil
import time

import mlflow
import pandas as pd
import pytest
import requests

from mlflow_knn_anomaly import SpadeConfig
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_test
from mlflow_knn_anomaly.mlops import jobs, monitoring
from mlflow_knn_anomaly.mlops.capture import CAPTURE_VARIABLE, CaptureSettings, read_capture

SMALL = SpadeConfig(k_images=3, batch_size=4)


@pytest.fixture()
def registered(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    data = make_synthetic(tmp_path / "data", seed=5, n_train=12, n_test_good=4, n_per_defect=1, size=96)
    jobs.build_bank(str(data), SMALL, "m")
    yield data
    mlflow.set_tracking_uri(None)


def _requests(data) -> list[pd.DataFrame]:
    images = [s.path.read_bytes() for s in read_test(data)]
    return [pd.DataFrame({"image": images[:3] + [b"not an image"]}), pd.DataFrame({"image": images[3:]})]


def _capturing(monkeypatch, location):
    monkeypatch.setenv(CAPTURE_VARIABLE, str(location))
    model = mlflow.pyfunc.load_model("models:/m/1")
    return model, model._model_impl.capture


def test_settings_out_of_range_name_the_variable(monkeypatch):
    assert CaptureSettings.from_environ() is None
    monkeypatch.setenv(CAPTURE_VARIABLE, "/tmp/somewhere")
    for variable, bad in (("MLFLOW_KNN_ANOMALY_CAPTURE_RATE", "1.5"), ("MLFLOW_KNN_ANOMALY_CAPTURE_DAYS", "x")):
        monkeypatch.setenv(variable, bad)
        with pytest.raises(ValueError, match=variable):
            CaptureSettings.from_environ()
        monkeypatch.delenv(variable)
    assert CaptureSettings.from_environ().rate == 1.0


def test_every_answer_is_captured_with_its_image_version_and_row(registered, monkeypatch, tmp_path):
    model, writer = _capturing(monkeypatch, tmp_path / "captures")
    answers = [model.predict(frame) for frame in _requests(registered)]
    writer.close()
    captured = read_capture(str(tmp_path / "captures"))
    assert len(captured) == sum(len(a) for a in answers) == writer.captured_rows and writer.failed_rows == 0
    sent = pd.concat(_requests(registered), ignore_index=True)["image"]
    answered = pd.concat(answers, ignore_index=True)
    assert list(captured["image"]) == list(sent)
    assert list(captured["score"].fillna(-1)) == list(answered["score"].astype(float).fillna(-1))
    assert set(captured["model_version"]) == set(answered["model_version"]) and captured["id"].is_unique
    assert captured["error"].iloc[3] != "" and captured["time"].is_monotonic_increasing
    later = read_capture(str(tmp_path / "captures"), since=captured["time"].iloc[-1])
    assert len(later) >= len(answers[1]) and len(later) < len(captured)


def test_a_location_that_fails_loses_captures_not_answers(registered, monkeypatch, tmp_path, caplog):
    location = tmp_path / "captures"
    model, writer = _capturing(monkeypatch, location)
    shutil.rmtree(location)
    location.write_text("a file where the folder was: nothing can be written")
    answers = [model.predict(frame) for frame in _requests(registered)]
    writer.close()
    assert all(len(a) for a in answers) and writer.captured_rows == 0
    assert writer.failed_rows == sum(len(a) for a in answers) and "capture to" in caplog.text


def test_monitor_and_update_bank_read_a_capture(registered, monkeypatch, tmp_path):
    model, writer = _capturing(monkeypatch, tmp_path / "captures")
    for frame in _requests(registered):
        model.predict(frame)
    writer.close()
    found = monitoring.monitor("models:/m/1", f"capture:{tmp_path / 'captures'}")
    assert found["figures"]["n_images"] == 7  # the eight captured rows less the one that is no image
    captured = read_capture(str(tmp_path / "captures"))
    confirmed = tmp_path / "confirmed.txt"
    confirmed.write_text("\n".join(captured["id"].iloc[:2]))
    _, version = jobs.update_bank("models:/m/1", images=f"capture:{tmp_path / 'captures'}", ids=str(confirmed))
    before, after = jobs.load_model("models:/m/1"), jobs.load_model(f"models:/m/{version}")
    assert after.bank.n_images >= before.bank.n_images + 1  # a tenth of new images may join the held-out set
    with pytest.raises(ValueError, match="not in the capture"):
        jobs.update_bank("models:/m/1", images=f"capture:{tmp_path / 'captures'}", ids="nope")


def test_a_location_that_fills_up_keeps_what_it_already_holds(registered, monkeypatch, tmp_path):
    model, writer = _capturing(monkeypatch, tmp_path / "captures")
    first, second = _requests(registered)
    model.predict(first)
    writer._flush()  # the first request's rows are written

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer._repo, "log_artifact", full)
    assert len(model.predict(second)) == len(second)  # answered all the same
    writer.close()
    assert writer.failed_rows == len(second) and writer.captured_rows == len(first)
    assert len(read_capture(str(tmp_path / "captures"))) == len(first)


@pytest.mark.slow
def test_a_server_stopped_by_sigterm_writes_every_row_it_answered(fitted, tmp_path, monkeypatch):
    """uvicorn ends on SIGTERM without `atexit`: the rows of the last seconds are written all the same."""
    from mlflow_knn_anomaly import save_model

    from .conftest import served

    save_model(fitted, tmp_path / "model")
    monkeypatch.setenv(CAPTURE_VARIABLE, str(tmp_path / "captures"))
    part = make_synthetic(tmp_path / "d", seed=1, n_train=1, n_test_good=1, n_per_defect=0, size=64)
    image = base64.b64encode(read_test(part)[0].path.read_bytes()).decode()
    body = {"dataframe_split": {"columns": ["image"], "data": [[image]]}}
    with served(tmp_path / "model") as url:
        for _ in range(5):
            assert requests.post(f"{url}/invocations", json=body, timeout=60).status_code == 200
    deadline = time.monotonic() + 30  # the server's worker ends a moment after the mlflow process
    while time.monotonic() < deadline and _captured(tmp_path / "captures") < 5:
        time.sleep(0.2)
    assert _captured(tmp_path / "captures") == 5


def _captured(location) -> int:
    try:
        return len(read_capture(str(location)))
    except FileNotFoundError:
        return 0


def test_a_capture_goes_to_s3_through_mlflows_artifact_repository(monkeypatch):
    moto = pytest.importorskip("moto")
    import boto3

    from mlflow_knn_anomaly.mlops.capture import CaptureWriter

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with moto.mock_aws():
        boto3.client("s3").create_bucket(Bucket="line")
        writer = CaptureWriter(CaptureSettings("s3://line/captures"))
        writer.submit([b"png bytes", None], [{"score": 1.0, "error": ""}, {"score": None, "error": "bad"}])
        writer.close()
        captured = read_capture("s3://line/captures")
    assert writer.failed_rows == 0 and list(captured["image"]) == [b"png bytes", None]
