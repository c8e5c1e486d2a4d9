"""The `device` setting: CUDA when there is one, with the same results as the CPU."""

import numpy as np
import pytest
import torch

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.evaluation.datasets import read_test, read_train
from mlflow_knn_anomaly.runtime import resolve_device

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here: the CUDA path is not run")


def test_auto_picks_what_the_machine_has():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA GPU here; use device='auto' or 'cpu'"):
        SpadeDetector(SpadeConfig(device="cuda", weights="random"))


@needs_cuda
def test_cuda_scores_and_maps_match_the_cpu(synthetic_root, tmp_path):
    train, test = read_train(synthetic_root)[:20], [s.path for s in read_test(synthetic_root)][::5]
    cpu = SpadeDetector(SpadeConfig(device="cpu")).fit(train)
    cuda = SpadeDetector(SpadeConfig(device="cuda")).fit(train)
    a, b = cpu.predict(test, segment="all"), cuda.predict(test, segment="all")
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-3)
    for x, y in zip(a.anomaly_maps, b.anomaly_maps):
        np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-3)
    reloaded = SpadeDetector.load(cuda.save(tmp_path / "cuda"))  # saved from the GPU, loads anywhere
    np.testing.assert_allclose(reloaded.predict(test).scores, cuda.predict(test).scores, rtol=1e-5)
