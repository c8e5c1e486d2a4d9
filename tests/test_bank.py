import numpy as np
import pytest
import torch

from mlflow_knn_anomaly.algorithm.bank import FeatureBank, Galleries
from mlflow_knn_anomaly.algorithm.knn import PixelGallery

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


def test_galleries_hold_the_rows_and_norms_of_the_nearest_images_however_assembled(tmp_path, monkeypatch):
    monkeypatch.setattr("mlflow_knn_anomaly.algorithm.bank.WHOLE_SHARE", 2)
    bank, _ = _bank()  # float16, memory-mapped as saved models are
    bank.save(tmp_path / "bank")
    bank = FeatureBank.load(tmp_path / "bank")
    # blocks.1 is gathered per call (1 of 4 images, under a half); blocks.2 is prepared whole and its rows taken
    # (2 of 4), or the whole of it returned (4 of 4)
    for counts in ({"blocks.1": 1, "blocks.2": 2}, {"blocks.1": 1, "blocks.2": 4}):
        galleries = Galleries(bank, counts, torch.device("cpu"))
        for _ in range(2):  # the second call reuses what the first prepared
            for nearest in (np.array([2, 0, 3, 1]), np.array([1, 3, 0, 2])):
                got = galleries(nearest)
                for layer, count in counts.items():
                    want = PixelGallery(bank.gallery(layer, nearest[:count]))
                    torch.testing.assert_close(got[layer].extended, want.extended, rtol=0, atol=0)
    assert set(galleries._whole) == {"blocks.2"}


def test_pickled_arrays_are_refused(tmp_path):
    _bank()[0].save(tmp_path / "bank")
    np.save(tmp_path / "bank" / "pooled.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickle"):
        FeatureBank.load(tmp_path / "bank", mmap=False)
