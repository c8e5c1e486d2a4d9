"""The fitted state: control limits, synthetic anomalies and the recall gate."""

import numpy as np
import pytest
from PIL import Image

from mlflow_knn_anomaly.algorithm.calibration import Calibration, control_limit, recall_gate, synthetic_anomalies
from mlflow_knn_anomaly.evaluation.datasets import normal_part


def _parts(n: int, size: int = 96) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(normal_part(rng, size)) for _ in range(n)]


def test_synthetic_anomalies_are_deterministic_local_changes():
    images = _parts(3)
    first, again = synthetic_anomalies(images), synthetic_anomalies(images)
    assert len(first) == 9  # cut-paste, blob, scratch per image
    for made, same, source in zip(first, again, [image for image in images for _ in range(3)]):
        assert np.array_equal(np.asarray(made), np.asarray(same))
        changed = np.any(np.asarray(made) != np.asarray(source), axis=2)
        assert 0 < changed.mean() < 0.05  # small defects: what stage 1 barely sees


@pytest.mark.parametrize("recall", [0.5, 0.9, 0.98])
def test_the_gate_passes_at_least_gate_recall_of_the_synthetic_anomalies(recall):
    rng = np.random.default_rng(1)
    normal, synthetic = rng.normal(1.0, 0.1, 30), rng.normal(1.3, 0.2, 90)
    gate = recall_gate(normal, synthetic, recall)
    assert np.mean(synthetic >= gate["gate_threshold"]) >= recall
    assert gate["gate_normal_share"] == np.mean(normal >= gate["gate_threshold"])
    assert 0.5 < gate["gate_synthetic_auroc"] <= 1.0


def test_a_gate_that_stage1_cannot_inform_opens_and_recall_one_sends_everything():
    rng = np.random.default_rng(2)
    same = rng.normal(1.0, 0.1, 300)
    blind = recall_gate(same[:100], same[100:], 0.98)
    assert blind["gate_normal_share"] > 0.9 and abs(blind["gate_synthetic_auroc"] - 0.5) < 0.1
    assert recall_gate(same[:100], same[100:], 1.0)["gate_normal_share"] == 1.0


def test_control_limit_and_the_record_round_trip():
    assert control_limit(np.array([1.0, 2.0, 3.0]), 3.0) == pytest.approx(2.0 + 3.0)
    record = Calibration(5.0, 6.0, 1.0, 1.0, 0.2, 4.0, 0.5, (1.0, 2.0), 0.8, 0.9)
    assert Calibration.from_dict(record.to_dict()) == record
    assert record.metrics()["calibration.gate_normal_share"] == 0.8
