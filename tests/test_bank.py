import numpy as np
import pytest
import torch

from mlflow_knn_anomaly.bank import FeatureBank


def _bank(dtype=np.float16) -> FeatureBank:
    rng = np.random.default_rng(0)
    return FeatureBank(
        pooled=rng.normal(size=(4, 8)).astype(np.float32),
        maps={
            "blocks.1": rng.normal(size=(4, 3, 5, 6)).astype(dtype),
            "blocks.2": rng.normal(size=(4, 2, 3, 3)).astype(dtype),
        },
    )


def test_round_trip_is_exact_and_memory_mapped(tmp_path):
    bank = _bank()
    bank.save(tmp_path / "bank")
    loaded = FeatureBank.load(tmp_path / "bank")
    assert isinstance(loaded.maps["blocks.1"], np.memmap)
    np.testing.assert_array_equal(loaded.pooled, bank.pooled)
    for layer in bank.maps:
        np.testing.assert_array_equal(loaded.maps[layer], bank.maps[layer])
    assert loaded.nbytes == bank.nbytes and loaded.n_images == 4


def test_gallery_is_pixels_by_channels_of_the_chosen_images():
    bank = _bank(np.float32)
    gallery = bank.gallery("blocks.1", np.array([2, 0]))
    assert gallery.shape == (2 * 5 * 6, 3) and gallery.dtype == torch.float32
    np.testing.assert_array_equal(gallery[:30].numpy(), bank.maps["blocks.1"][0].transpose(1, 2, 0).reshape(-1, 3))


def test_pickled_arrays_are_refused(tmp_path):
    _bank().save(tmp_path / "bank")
    np.save(tmp_path / "bank" / "pooled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        FeatureBank.load(tmp_path / "bank", mmap=False)
