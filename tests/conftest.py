from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
import pytest
import requests
from mlflow import MlflowClient
from PIL import Image

from mlflow_knn_anomaly import SpadeDetector
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_train

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MLFLOW_URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def _mlflow_uri_variables_restored() -> Iterator[None]:
    """Every test leaves MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI as it found them: `mlflow.set_*_uri`
    export them for subprocesses and `set_*_uri(None)` does not clear them, so a store one test set
    would otherwise be the next test's (MLflow's in-process settings are left to the fixtures)."""
    saved = {name: os.environ.get(name) for name in MLFLOW_URI_VARIABLES}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextmanager
def mlflow_store(uri: str) -> Iterator[None]:
    """This process's MLflow tracking and registry store is `uri` inside the block."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


@pytest.fixture()
def tracking(tmp_path, monkeypatch) -> Iterator[MlflowClient]:
    """A tracking and registry store of the test's own (sqlite in tmp_path), and a client of it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield MlflowClient()
    mlflow.set_tracking_uri(None)


def shared_dataset(name: str) -> Path:
    """Path of a shared real dataset, or skip: the data's licence keeps it out of the repository."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent: real-data tests need ../shared/data beside the clone (CI has it).")
    return path


def shared_subset(name: str, target: Path, train: int, per_type: int, copy: bool = False) -> Path:
    """An MVTec-layout folder of the first `train` training images of a shared set and the first
    `per_type` test images of each of its types, with their masks: links, or copies with `copy`
    (Spark lists a symbolic link as a file of its own size). For the tests that check what a
    command or a lifecycle does, not its accuracy: they run in a fraction of the whole set's time."""
    source = shared_dataset(name)
    picked = [
        path
        for split, count in (("train", train), ("test", per_type))
        for folder in sorted(p for p in (source / split).iterdir() if p.is_dir())
        for path in sorted(folder.iterdir())[:count]
    ]
    masks = [source / "ground_truth" / p.parent.name / f"{p.stem}_mask.png" for p in picked if p.parts[-3] == "test"]
    for path in picked + [m for m in masks if m.is_file()]:
        placed = target / path.relative_to(source)
        placed.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, placed) if copy else placed.symlink_to(path)
    return target


def assert_masks_agree(got: np.ndarray, want: np.ndarray, anomaly_map: np.ndarray, threshold: float) -> int:
    """Masks from another process (a server, Spark's workers) against in-process ones: equal except
    where the in-process map is within float rounding of the threshold, since features summed with
    another thread count or batch differ in the last bits. Returns how many pixels were that close."""
    near = np.abs(anomaly_map - threshold) <= 1e-4 * threshold
    np.testing.assert_array_equal(got[~near], want[~near])
    return int(near.sum())


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"), seed=0)


@pytest.fixture(scope="session")
def fitted(synthetic_root: Path) -> SpadeDetector:
    """A detector with the default (real ImageNet) backbone fitted on the synthetic set."""
    return SpadeDetector().fit(read_train(synthetic_root))


@pytest.fixture(scope="session")
def saved_detector(fitted: SpadeDetector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fitted.save(tmp_path_factory.mktemp("saved") / "detector")


@pytest.fixture(scope="session")
def model_dir(fitted: SpadeDetector, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fitted` saved as an MLflow model directory."""
    from mlflow_knn_anomaly import save_model

    path = tmp_path_factory.mktemp("pyfunc") / "model"
    save_model(fitted, path)
    return path


@pytest.fixture(scope="session")
def bottle() -> tuple[Path, SpadeDetector]:
    """The shared MVTec AD bottle folder and a default detector fitted on it (skips without data)."""
    root = shared_dataset("mvtec_bottle")
    return root, SpadeDetector().fit(read_train(root))


@contextmanager
def served(model: Path, threads: int = 1) -> Iterator[str]:
    """`mlflow models serve` of a model directory on a free port of 127.0.0.1: its base URL."""
    port = free_port()
    env = dict(os.environ, MLFLOW_KNN_ANOMALY_THREADS=str(threads))
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_up(url: str, seconds: float = 120) -> None:
    """Until the server at `url` answers /ping (fails the test after `seconds`)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/ping", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            time.sleep(0.5)
    pytest.fail(f"mlflow models serve did not come up in {seconds:.0f} s")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a test server."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encode_image(image: Image.Image, fmt: str = "PNG") -> bytes:
    """The encoded file bytes of an image, as a client sends them."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()
