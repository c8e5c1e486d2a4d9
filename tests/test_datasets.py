import hashlib

import pytest

from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_test, read_train


def _digest(root):
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.png")))).hexdigest()


def test_synthetic_is_deterministic_by_seed(tmp_path):
    a = make_synthetic(tmp_path / "a", seed=3, n_train=3, n_test_good=1, n_per_defect=1, size=64)
    b = make_synthetic(tmp_path / "b", seed=3, n_train=3, n_test_good=1, n_per_defect=1, size=64)
    c = make_synthetic(tmp_path / "c", seed=4, n_train=3, n_test_good=1, n_per_defect=1, size=64)
    assert _digest(a) == _digest(b) != _digest(c)


def test_mvtec_layout_is_read_with_masks(synthetic_root):
    assert len(read_train(synthetic_root)) == 60
    samples = read_test(synthetic_root)
    kinds = {s.defect_type for s in samples}
    assert kinds == {"good", "scratch", "spot", "contamination"}
    for sample in samples:
        mask = sample.mask(256, 256)
        assert mask.any() == sample.is_anomalous


def test_missing_or_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train/good"):
        read_train(tmp_path)
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        read_train(tmp_path)


def test_missing_mask_is_reported(tmp_path):
    root = make_synthetic(tmp_path, n_train=1, n_test_good=0, n_per_defect=1, size=32)
    next((root / "ground_truth" / "spot").iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match="no ground-truth mask"):
        read_test(root)
