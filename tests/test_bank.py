import numpy as np
import pytest
import torch

from mlflow_knn_anomaly.bank import FeatureBank

ROWS = (30, 12, 30, 20)  # images of different sizes: 5x6, 3x4, 5x6, 4x5 on blocks.1


def _bank(dtype=np.float16) -> FeatureBank:
    rng = np.random.default_rng(0)
    images = [
        {"blocks.1": rng.normal(size=(n, 3)).astype(dtype), "blocks.2": rng.normal(size=(n // 4, 2)).astype(dtype)}
        for n in ROWS
    ]
    return FeatureBank.from_images(rng.normal(size=(4, 8)).astype(np.float32), images), images


def test_round_trip_is_exact_and_memory_mapped(tmp_path):
    bank, _ = _bank()
    bank.save(tmp_path / "bank")
    loaded = FeatureBank.load(tmp_path / "bank")
    assert isinstance(loaded.features["blocks.1"], np.memmap)
    np.testing.assert_array_equal(loaded.pooled, bank.pooled)
    for layer in bank.features:
        np.testing.assert_array_equal(loaded.features[layer], bank.features[layer])
        np.testing.assert_array_equal(loaded.offsets[layer], bank.offsets[layer])
    assert loaded.nbytes == bank.nbytes and loaded.n_images == 4


def test_gallery_is_the_rows_of_the_chosen_images_of_any_size():
    bank, images = _bank(np.float32)
    assert bank.offsets["blocks.1"].tolist() == [0, 30, 42, 72, 92]
    gallery = bank.gallery("blocks.1", np.array([3, 1]))
    assert gallery.shape == (12 + 20, 3) and gallery.dtype == torch.float32
    np.testing.assert_array_equal(gallery.numpy(), np.concatenate([images[1]["blocks.1"], images[3]["blocks.1"]]))


def test_pickled_arrays_are_refused(tmp_path):
    _bank()[0].save(tmp_path / "bank")
    np.save(tmp_path / "bank" / "pooled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        FeatureBank.load(tmp_path / "bank", mmap=False)
