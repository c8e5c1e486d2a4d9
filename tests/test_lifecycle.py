"""End to end: `mlflow run` entry points and a real `mlflow server` over HTTP."""

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from mlflow_knn_anomaly import decode_mask, log_model
from mlflow_knn_anomaly.evaluation.datasets import read_test

from .conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_KNN_ANOMALY_THREADS="2")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` of this environment
    return env


def _mlflow_run(tracking_uri: str, *params: str) -> None:
    args = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local"]
    for param in params:
        args += ["-P", param]
    done = subprocess.run(args, env=_env(tracking_uri), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_mlflow_run_registers_and_promotes_only_better_versions(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    def champion() -> str:
        return str(client.get_model_version_by_alias("spade-anomaly", "champion").version)

    _mlflow_run(uri)  # the default config on the embedded synthetic set
    assert champion() == "1"
    _mlflow_run(uri, "weights=random")  # deliberately worse: registered, evaluated, not promoted
    assert champion() == "1"
    tags = client.get_model_version("spade-anomaly", "2").tags
    assert tags["promotion.decision"] == "kept"
    assert float(tags["eval.aupro"]) < float(client.get_model_version("spade-anomaly", "1").tags["eval.aupro"])
    # (a better version replacing the champion through `mlflow run`: tests/test_production_shape.py)
    artifacts = {a.path for a in client.list_artifacts(tags["eval.run_id"], "plots")}
    assert {"plots/image_roc.png", "plots/pro_curve.png", "plots/overlays.png"} <= artifacts


def test_real_tracking_server_round_trip(tmp_path, fitted, synthetic_root):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        uri = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if MlflowClient(uri).search_experiments() is not None:
                    break
            except Exception:
                time.sleep(0.5)
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run():
            info = log_model(fitted, name="model", registered_model_name="served")
        MlflowClient().set_registered_model_alias("served", "champion", info.registered_model_version)
        model = mlflow.pyfunc.load_model("models:/served@champion")
        paths = [s.path for s in read_test(synthetic_root)][::5]
        out = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}), params={"segment": "all"})
        expected = fitted.predict(paths, segment="all")
        np.testing.assert_allclose(out["score"].to_numpy(float), expected.scores, rtol=1e-5)
        for text, mask in zip(out["mask"], expected.masks):
            np.testing.assert_array_equal(decode_mask(text), mask)
    finally:
        mlflow.set_tracking_uri(None)
        server.terminate()
        server.wait(timeout=30)
