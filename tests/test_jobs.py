"""Building under bad data and faults: clear errors, nothing registered, nothing half-written."""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_train
from mlflow_knn_anomaly.mlops import jobs, registry

SMALL = SpadeConfig(k_images=3, batch_size=4)


@pytest.fixture()
def tracking(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture()
def small_data(tmp_path):
    return make_synthetic(tmp_path / "data", seed=5, n_train=12, n_test_good=2, n_per_defect=1, size=96)


def _versions(uri: str) -> list:
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return [v for m in client.search_registered_models() for v in client.search_model_versions(f"name='{m.name}'")]


def test_bad_training_images_are_all_named_and_nothing_is_registered(tracking, small_data):
    good = read_train(small_data)
    good[0].write_bytes(b"")
    good[1].write_bytes(good[1].read_bytes()[:100])
    (small_data / "train" / "good" / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="3 unreadable training images") as info:
        jobs.build_bank(str(small_data), SMALL, "m")
    for path in (good[0], good[1], small_data / "train" / "good" / "notes.png"):
        assert str(path) in str(info.value)
    assert _versions(tracking) == []
    runs = mlflow.search_runs(search_all_experiments=True)
    assert list(runs["status"]) == ["FAILED"]


def test_skip_bad_logs_the_skipped_list_and_builds(tracking, small_data):
    read_train(small_data)[0].write_bytes(b"")
    run_id, version = jobs.build_bank(str(small_data), SMALL, "m", skip_bad=True)
    assert version == "1"
    skipped = mlflow.artifacts.load_text(f"runs:/{run_id}/skipped_images.txt")
    assert "000.png" in skipped


@pytest.mark.parametrize(
    ("prepare", "error", "message"),
    [
        (lambda root: shutil.rmtree(root / "train"), FileNotFoundError, "does not exist"),
        (lambda root: [p.unlink() for p in read_train(root)], ValueError, "holds no images"),
        (lambda root: [p.unlink() for p in read_train(root)[:6]], ValueError, "too few"),
    ],
    ids=["missing", "empty", "too-few"],
)
def test_unusable_folders_fail_before_any_work(tracking, small_data, prepare, error, message):
    prepare(small_data)
    with pytest.raises(error, match=message):
        jobs.build_bank(str(small_data), SMALL, "m")
    assert _versions(tracking) == []


def test_mixed_sizes_and_colour_modes_build(tmp_path):
    rng = np.random.default_rng(0)
    images = []
    for i, (mode, size) in enumerate([("RGB", (80, 60)), ("L", (64, 64)), ("RGBA", (100, 70)), ("P", (50, 90))] * 3):
        image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
        image.save(tmp_path / f"{i:02d}.png")
        images.append(tmp_path / f"{i:02d}.png")
    detector = SpadeDetector(SMALL).fit(images)
    assert detector.bank.n_images == 12 - 5


def _bank_hashes(path: Path) -> dict:
    record = json.loads((path / "config.json").read_text())
    return record["sha256"]


def test_same_data_gives_bit_identical_banks_across_processes_and_disk_order(tmp_path, small_data):
    # A copy written in reverse order: the directory listing order differs, the sorted order not.
    copy = tmp_path / "reversed" / "train" / "good"
    copy.mkdir(parents=True)
    for path in reversed(read_train(small_data)):
        shutil.copy(path, copy / path.name)
    script = textwrap.dedent(
        """
        import sys
        from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
        from mlflow_knn_anomaly.evaluation.datasets import read_train
        SpadeDetector(SpadeConfig(k_images=3)).fit(read_train(sys.argv[1])).save(sys.argv[2])
        """
    )
    outputs = []
    for i, root in enumerate([small_data, tmp_path / "reversed", small_data]):
        out = tmp_path / f"model{i}"
        subprocess.run([sys.executable, "-c", script, str(root), str(out)], check=True, timeout=300)
        outputs.append(_bank_hashes(out))
    assert outputs[0] == outputs[1] == outputs[2]


KILLER = textwrap.dedent(
    """
    # Fault injection by monkeypatch: the second feature batch of the build raises or signals.
    import os, signal, sys, time
    from mlflow_knn_anomaly import cli
    from mlflow_knn_anomaly.algorithm import spade

    fault = sys.argv[1]
    original = spade.SpadeDetector.extract
    calls = {"n": 0}

    def extract(self, inputs):
        calls["n"] += 1
        if calls["n"] == 2:
            if fault == "exception":
                raise RuntimeError("injected fault")
            os.kill(os.getpid(), getattr(signal, fault))
            time.sleep(30)  # the signal lands here, not in some destructor that would swallow it
        return original(self, inputs)

    spade.SpadeDetector.extract = extract
    sys.argv = ["mlflow-knn-anomaly", "build-bank", "--data", sys.argv[2], "--model-name", "m",
                "--k-images", "3", "--batch-size", "4"]
    cli.main()
    """
)


@pytest.mark.parametrize("fault", ["exception", "SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_build_registers_nothing_and_a_rerun_succeeds(tracking, small_data, tmp_path, fault):
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking)
    # A shell's background job inherits SIGINT ignored; give the build the default disposition.
    done = subprocess.run(
        [sys.executable, "-c", KILLER, fault, str(small_data)],
        env=env,
        timeout=300,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert done.returncode != 0
    assert _versions(tracking) == []
    runs = mlflow.search_runs(search_all_experiments=True)
    expected = {"RUNNING"} if fault == "SIGKILL" else {"FAILED", "KILLED"}  # SIGKILL cannot be caught
    assert set(runs["status"]) <= expected
    assert not list(tmp_path.rglob(".detector.*"))  # no temporary model directory left behind
    run_id, version = jobs.build_bank(str(small_data), SpadeConfig(k_images=3, batch_size=4), "m")
    assert version == "1"


def test_image_level_labels_only_evaluate_and_promote_on_image_auroc(tracking, tmp_path):
    # Many users have image labels but no masks: no ground_truth/ folder at all.
    data = make_synthetic(tmp_path / "labels", seed=2, n_train=14, n_test_good=3, n_per_defect=2, size=96, masks=False)
    decision = jobs.lifecycle(str(data), SMALL, "labels", metric="aupro", min_delta=0.0)
    assert decision.promoted
    client = MlflowClient()
    tags = client.get_model_version("labels", "1").tags
    assert "eval.image_auroc" in tags and "eval.aupro" not in tags
    run = client.get_run(tags["eval.run_id"])
    assert "image_auroc" in run.data.metrics and "pixel_auroc" not in run.data.metrics
    assert run.data.tags["pixel_metrics"].startswith("absent: image-level labels only")
    with pytest.raises(ValueError, match="has no evaluation"):  # an explicit pixel metric cannot decide
        registry.promote("labels", "1", metric="aupro")
