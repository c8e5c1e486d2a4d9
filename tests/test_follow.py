"""A served model follows its registry alias (issue 38): a promotion reaches a running model without
a restart, every row names the version that answered it, and a version that cannot serve is
refused while the old one keeps answering."""

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient

from mlflow_knn_anomaly import SpadeConfig
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_test
from mlflow_knn_anomaly.mlops import jobs, line_jobs, monitoring
from mlflow_knn_anomaly.mlops.follow import FOLLOW_VARIABLE, SECONDS_VARIABLE, follow_seconds, parse_alias_uri
from mlflow_knn_anomaly.mlops.shadow import SHADOW_VARIABLE

from .conftest import free_port, wait_until_up

SMALL = SpadeConfig(k_images=3, batch_size=4)


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A registry of model `m` with two versions of different settings, `champion` on v1."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the store's artifacts (./mlruns) stay in the test's folder
    mlflow.set_tracking_uri(uri)
    data = make_synthetic(tmp_path / "data", seed=5, n_train=12, n_test_good=2, n_per_defect=1, size=96)
    jobs.build_bank(str(data), SMALL, "m")
    jobs.build_bank(str(data), SMALL.replace(k_images=2, sigma=2.0), "m")
    client = MlflowClient()
    client.set_registered_model_alias("m", "champion", "1")
    yield client, data
    mlflow.set_tracking_uri(None)


def _frame(data: Path) -> pd.DataFrame:
    return pd.DataFrame({"image": [s.path.read_bytes() for s in read_test(data)]})


def _following(monkeypatch, uri: str = "models:/m@champion"):
    monkeypatch.setenv(FOLLOW_VARIABLE, uri)
    monkeypatch.setenv(SECONDS_VARIABLE, "3600")  # the test calls check() itself
    model = mlflow.pyfunc.load_model(uri)
    python_model = model._model_impl  # MLflow's wrapper holds the flavor's model here
    return model, python_model.follower


def _tamper(client: MlflowClient, version: str) -> None:
    """Flip one byte of a bank file of `version` in the artifact store."""
    local = Path(client.get_model_version_download_uri("m", version).removeprefix("file://"))
    target = next(local.rglob("map_*.npy"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))


def test_the_alias_uri_and_interval_are_checked():
    assert parse_alias_uri("models:/bottle@champion") == ("bottle", "champion")
    for bad in ("models:/bottle/3", "runs:/abc/model", "models:/@champion", "bottle@champion"):
        with pytest.raises(ValueError, match="follow an alias, as models:/NAME@ALIAS"):
            parse_alias_uri(bad)
    for bad in ("0", "-5", "soon"):
        os.environ[SECONDS_VARIABLE] = bad
        try:
            with pytest.raises(ValueError, match="a number above 0"):
                follow_seconds()
        finally:
            del os.environ[SECONDS_VARIABLE]
    assert follow_seconds() == 30.0


def test_rows_name_the_model_id_when_not_following(store):
    client, data = store
    source = client.get_model_version("m", "1").source
    out = mlflow.pyfunc.load_model("models:/m/1").predict(_frame(data))
    assert set(out["model_version"]) == {source.removeprefix("models:/")}


def test_a_promotion_reaches_the_loaded_model_and_bad_versions_are_refused(store, monkeypatch, caplog):
    client, data = store
    model, follower = _following(monkeypatch)
    first = model.predict(_frame(data))
    assert set(first["model_version"]) == {"m/1"}

    client.set_registered_model_alias("m", "champion", "2")
    follower.check()
    second = model.predict(_frame(data))
    assert set(second["model_version"]) == {"m/2"} and follower.status.swaps == 1
    assert not np.allclose(first["score"], second["score"])  # another version answers, not a relabel

    jobs.build_bank(str(data), SMALL, "m")  # v3, tampered in the store after registration
    _tamper(client, "3")
    client.set_registered_model_alias("m", "champion", "3")
    follower.check()
    follower.check()  # a refused version is not tried again at every check
    assert follower.status.refused == 1 and "refused models:/m/3" in caplog.text and "sha256" in caplog.text
    assert set(model.predict(_frame(data))["model_version"]) == {"m/2"}

    class Other(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    with mlflow.start_run():
        mlflow.pyfunc.log_model(name="other", python_model=Other(), registered_model_name="m")  # v4
    client.set_registered_model_alias("m", "champion", "4")
    follower.check()
    assert follower.status.refused == 2 and "is not a mlflow_knn_anomaly model" in follower.status.last_problem

    client.delete_registered_model_alias("m", "champion")
    follower.check()
    assert follower.status.failed_checks == 1 and "still serving m/2" in follower.status.last_problem
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # a registry that is down
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    follower.check()
    assert follower.status.failed_checks == 2
    assert set(model.predict(_frame(data))["model_version"]) == {"m/2"}


def test_a_line_version_that_drops_a_used_category_is_refused(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(uri)
    try:
        for seed, name in enumerate(("disc", "plate")):
            make_synthetic(tmp_path / "plant" / name, seed=seed, n_train=12, n_test_good=1, n_per_defect=1, size=96)
        jobs.build_bank(str(tmp_path / "plant"), SMALL, "line")
        line_jobs.remove_category("models:/line/1", "disc")  # v2
        MlflowClient().set_registered_model_alias("line", "champion", "1")
        model, follower = _following(monkeypatch, "models:/line@champion")
        image = read_test(tmp_path / "plant" / "disc")[0].path.read_bytes()
        out = model.predict(pd.DataFrame({"image": [image], "category": ["disc"]}))
        assert list(out["model_version"]) == ["line/1"] and out["error"][0] == ""
        MlflowClient().set_registered_model_alias("line", "champion", "2")
        follower.check()
        assert follower.status.refused == 1 and "drops the categories ['disc']" in follower.status.last_problem
        assert list(model.predict(pd.DataFrame({"image": [image], "category": ["disc"]}))["model_version"]) == [
            "line/1"
        ]
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_a_running_server_serves_the_promoted_version_within_the_interval(store, tmp_path):
    client, data = store
    port = free_port()
    env = dict(os.environ, **{FOLLOW_VARIABLE: "models:/m@champion", SECONDS_VARIABLE: "2"})
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/m@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    image = base64.b64encode(read_test(data)[0].path.read_bytes()).decode()
    body = {"dataframe_split": {"columns": ["image"], "data": [[image]]}}
    try:
        wait_until_up(url)

        def version() -> str:
            answer = requests.post(f"{url}/invocations", json=body, timeout=60)
            assert answer.status_code == 200, answer.text
            return answer.json()["predictions"][0]["model_version"]

        assert version() == "m/1"
        client.set_registered_model_alias("m", "champion", "2")
        moved = time.monotonic()
        while version() != "m/2":
            assert time.monotonic() - moved < 60, "the promotion did not reach the server in 60 s"
            time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.slow
def test_promotions_under_load_fail_no_request_and_a_tampered_version_is_refused():
    """benchmarks/bench_follow.py, lean: 4 clients, promote then rollback, a tampered third version."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_follow

    figures = bench_follow.run(moves=2, interval=2.0, gap=5.0, clients=4, size=96)
    assert figures["requests"] > 20 and figures["failed"] == 0 and figures["mixed_answers"] == 0
    assert figures["versions"] == ["line/1", "line/2"]
    assert [target for _, target, _ in figures["moves"]] == ["line/2", "line/1"]
    assert all(delay is not None for _, _, delay in figures["moves"])  # each move reached the clients
    assert figures["refusal_logged"] and figures["serving_after_tamper"] == "line/1"


def test_a_refused_version_is_tagged_and_the_next_monitor_run_reports_it(store, monkeypatch, tmp_path):
    client, data = store
    model, follower = _following(monkeypatch)
    jobs.build_bank(str(data), SMALL, "m")  # v3, tampered
    _tamper(client, "3")
    client.set_registered_model_alias("m", "champion", "3")
    follower.check()
    assert "sha256" in client.get_model_version("m", "3").tags["serving.refused"]
    found = monitoring.monitor("models:/m/2", str(data / "test" / "good"), experiment="m-monitoring")
    assert found["figures"]["refused_versions"] == 1.0 and not found["alert"]  # v2 itself serves


def test_a_challenger_in_the_shadow_logs_how_it_compares(store, monkeypatch):
    client, data = store
    client.set_registered_model_alias("m", "challenger", "2")
    monkeypatch.setenv(SHADOW_VARIABLE, "models:/m@challenger")
    monkeypatch.setenv("MLFLOW_KNN_ANOMALY_SHADOW_RATE", "1")
    model = mlflow.pyfunc.load_model("models:/m@champion")
    frame = pd.concat([_frame(data), pd.DataFrame({"image": [b"not an image"]})], ignore_index=True)
    answered = model.predict(frame)
    shadow = model._model_impl.shadow
    shadow.close()
    assert shadow.scored_rows == len(frame) - 1  # the bad row is not compared
    (run,) = client.search_runs([client.get_experiment_by_name("m-shadow").experiment_id])
    assert run.data.tags["shadow.challenger"] == "m/2"
    assert run.data.tags["shadow.champion"] == answered["model_version"][0]
    metrics = run.data.metrics
    assert metrics["shadow.rows"] == len(frame) - 1 and 0.0 <= metrics["shadow.decision_disagreement"] <= 1.0
    assert -1.0 <= metrics["shadow.score_spearman"] <= 1.0
