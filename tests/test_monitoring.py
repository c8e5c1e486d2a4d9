"""The `monitor` job and operator feedback through MLflow: one run per batch in the model's
monitoring experiment, a quiet batch and an alerting one with the way back, per-category figures
of a line model, and confirmed false alarms folded in with `update_bank -P images=...`."""

import os
import re
import shutil
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from mlflow_knn_anomaly import SpadeConfig
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_image_list, read_test
from mlflow_knn_anomaly.mlops import jobs, monitoring

SMALL = SpadeConfig(k_images=3)


@pytest.fixture(scope="module")
def part(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("part") / "disc", seed=3, n_train=30, n_test_good=8, size=96)


def _batch(part, folder, change=None):
    folder.mkdir(parents=True)
    for sample in read_test(part):
        if not sample.is_anomalous:
            image = Image.open(sample.path).convert("RGB")
            (change(image) if change else image).save(folder / sample.path.name)
    return folder


def test_monitor_logs_a_quiet_batch_then_an_alert_with_the_way_back(tracking, part, tmp_path, monkeypatch):
    _, version = jobs.build_bank(str(part), SMALL, "disc")
    uri = f"models:/disc/{version}"
    quiet = monitoring.monitor(uri, str(_batch(part, tmp_path / "monday")))
    assert quiet["experiment"] == "disc-monitoring" and quiet["step"] == 0
    assert not quiet["alert"] and quiet["reason"] == "no limit crossed"
    run = tracking.get_run(quiet["run_id"])
    assert tracking.get_experiment(run.info.experiment_id).name == "disc-monitoring"
    for key in (
        "anomalous_share",
        "segmented_share",
        "normalized_score_p50",
        "normalized_score_p95",
        "normalized_score_p99",
        "score_ks",
        "score_p",
        "brightness_p",
        "contrast_p",
        "sharpness_p",
    ):
        assert f"monitor.{key}" in run.data.metrics, key  # fmt: skip
    assert run.data.tags["monitor.alert"] == "false" and run.data.tags["monitor.reference"] == "bank"
    assert "monitor.next_step" not in run.data.tags

    # The lamp dims; `mlflow run` launched this one (its run is elsewhere, and learns where this went).
    launcher = tracking.create_run(tracking.get_experiment_by_name("Default").experiment_id)
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher.info.run_id)
    dark = _batch(part, tmp_path / "tuesday", lambda im: ImageEnhance.Brightness(im).enhance(0.6))
    alert = monitoring.monitor(uri, str(dark))
    assert alert["alert"] and alert["step"] == 1
    assert re.search(r"brightness drift: KS 1.00, p=\S+ < 0.001, median -4\d%", alert["reason"])
    tags = tracking.get_run(alert["run_id"]).data.tags
    assert tags["monitor.alert"] == "true" and tags["monitor.step"] == "1"
    assert f"mlflow artifacts download -r {alert['run_id']} -a batch.csv -d review" in tags["monitor.next_step"]
    assert f"-e update_bank -P model_uri={uri} -P images=review/batch.csv" in tags["monitor.next_step"]
    assert os.environ["MLFLOW_RUN_ID"] == launcher.info.run_id  # put back for whatever runs next
    assert tracking.get_run(launcher.info.run_id).data.tags["monitor.run_id"] == alert["run_id"]
    history = tracking.get_metric_history(alert["run_id"], "monitor.brightness_p")
    assert [m.step for m in history] == [1]
    batch = mlflow.artifacts.download_artifacts(run_id=alert["run_id"], artifact_path=monitoring.BATCH_FILE)
    listed = read_image_list(batch)
    assert sorted(p.name for p, _ in listed) == sorted(p.name for p in dark.iterdir())
    assert all(p.is_file() for p, _ in listed)


def test_confirmed_false_alarms_fold_into_a_new_version(tracking, part, tmp_path):
    _, version = jobs.build_bank(str(part), SMALL, "disc")
    normal = [s.path for s in read_test(part) if not s.is_anomalous][:3]
    listing = tmp_path / "false_alarms.csv"
    pd.DataFrame({"path": [*map(str, normal), str(tmp_path / "gone.png")]}).to_csv(listing, index=False)
    with pytest.raises(ValueError, match="1 unreadable listed images") as info:
        jobs.update_bank("models:/disc/1", images=str(listing))
    assert "gone.png: missing" in str(info.value)
    assert len(tracking.search_model_versions("name='disc'")) == 1  # nothing registered
    run_id, version = jobs.update_bank("models:/disc/1", images=str(listing), skip_bad=True)
    tags = tracking.get_model_version("disc", version).tags
    assert tags["feedback.images"] == "3" and tags["feedback.digest"] == jobs.list_digest(normal)
    assert tags["parent.version"] == "1"
    run = tracking.get_run(run_id)
    assert run.data.params["n_new_images"] == "3"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "false_alarms/feedback" and dataset.tags[0].value == "training"
    assert "gone.png: missing" in mlflow.artifacts.load_text(f"runs:/{run_id}/skipped_images.txt")
    model = jobs.load_model(f"models:/disc/{version}")
    assert model.bank.n_images == jobs.load_model("models:/disc/1").bank.n_images + 3
    with pytest.raises(ValueError, match="both were given"):
        jobs.update_bank("models:/disc/1", data=str(part), images=str(listing))


def test_a_line_is_monitored_per_category(tracking, part, tmp_path):
    root = tmp_path / "plant"
    shutil.copytree(part, root / "disc")
    make_synthetic(root / "plate", seed=4, n_train=30, n_test_good=6, size=96)
    jobs.build_bank(str(root), SMALL, "plant")
    source = tmp_path / "today"
    _batch(part, source / "disc")
    _batch(root / "plate", source / "plate", lambda im: ImageEnhance.Brightness(im).enhance(1.5))
    result = monitoring.monitor("models:/plant/1", str(source))
    figures = result["figures"]
    assert figures["disc.n_images"] == 8 and figures["plate.n_images"] == 6
    assert result["alert"] and "[plate] brightness drift: KS 1.00" in result["reason"]
    assert "[disc]" not in result["reason"]
    assert result["reason"].count("-P category=") == 0  # the reason names the figure; next_step the command
    tags = tracking.get_run(result["run_id"]).data.tags
    assert "-P category=disc" in tags["monitor.next_step"] and "-P category=plate" in tags["monitor.next_step"]
    (source / "ring").mkdir()
    shutil.copy(next((source / "disc").iterdir()), source / "ring" / "x.png")
    with pytest.raises(ValueError, match="names category 'ring'; the line model holds"):
        monitoring.monitor("models:/plant/1", str(source))


@pytest.mark.parametrize(
    "args, message",
    [(["monitor", "--source", "x", "--p-value", "2"], "p_value=2.0 must be in (0, 1)"),
     (["update-bank", "--model-uri", "models:/m/1"], "neither was given")],
)  # fmt: skip
def test_cli_refuses_bad_monitoring_input_with_what_to_do(args, message):
    out = subprocess.run([sys.executable, "-m", "mlflow_knn_anomaly.cli", *args], capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr
