"""The `evaluate` job end to end through every model URI form the docs name (issue 35): a registered
version, an alias, the logged model a version's `source` holds (`models:/m-<id>`), a run's model
and a local folder. `mlflow run . -e evaluate` on a logged-model URI runs as a user types it."""

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_knn_anomaly import SpadeConfig
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic
from mlflow_knn_anomaly.mlops import jobs
from mlflow_knn_anomaly.mlops.pyfunc_model import model_flavor

from .test_lifecycle import ROOT, _env

SMALL = SpadeConfig(k_images=3, batch_size=4)
FORMS = ("version", "alias", "logged-model", "run", "local")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A registered version of `m` (alias `champion`), its data and store, and its URI in each form."""
    tmp = tmp_path_factory.mktemp("uris")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    try:
        data = make_synthetic(tmp / "data", seed=5, n_train=12, n_test_good=2, n_per_defect=1, size=96)
        run_id, version = jobs.build_bank(str(data), SMALL, "m")
        client = MlflowClient()
        client.set_registered_model_alias("m", "champion", version)
        source = client.get_model_version("m", version).source
        local = mlflow.artifacts.download_artifacts(source, dst_path=str(tmp / "local"))
    finally:
        mlflow.set_tracking_uri(None)
    uris = {
        "version": f"models:/m/{version}",
        "alias": "models:/m@champion",
        "logged-model": source,
        "run": f"runs:/{run_id}/model",
        "local": local,
    }
    return uri, data, uris


@pytest.mark.parametrize("form", FORMS)
def test_evaluate_job_takes_every_uri_form(built, form, monkeypatch):
    uri, data, uris = built
    assert uris["logged-model"].startswith("models:/m-")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    try:
        assert model_flavor(uris[form])["category"] == "data"
        figures = jobs.evaluate(uris[form], str(data))
    finally:
        mlflow.set_tracking_uri(None)
    assert 0.0 <= figures["image_auroc"] <= 1.0


@pytest.mark.slow
def test_mlflow_run_evaluate_on_a_logged_model_uri(built):
    uri, data, uris = built
    args = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "-e", "evaluate",
            "-P", f"model_uri={uris['logged-model']}", "-P", f"data={data}"]  # fmt: skip
    done = subprocess.run(args, env=_env(uri), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    tags = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version("m", "1").tags
    assert "eval.image_auroc" in tags  # the version behind the logged model is tagged


def test_a_uri_that_names_nothing_says_what_to_check(built, monkeypatch):
    uri, _, _ = built
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(ValueError, match="Check the model name, version or alias"):
            model_flavor("models:/m/99")
    finally:
        mlflow.set_tracking_uri(None)
    with pytest.raises(ValueError, match="cannot load"):
        model_flavor(str(Path("/nonexistent") / "model"))
