import numpy as np
import pytest
import torch

from mlflow_knn_anomaly.algorithm import knn
from mlflow_knn_anomaly.algorithm.knn import ImageIndex, pixel_knn


@pytest.mark.parametrize("kappa", [1, 3])
def test_pixel_knn_equals_brute_force_with_a_remainder_chunk(monkeypatch, kappa):
    gen = torch.Generator().manual_seed(0)
    query, gallery = torch.randn(103, 16, generator=gen), torch.randn(250, 16, generator=gen)
    monkeypatch.setattr(knn, "QUERY_ROWS", 10)  # 103 queries leave a block of 3
    expected = torch.cdist(query.double(), gallery.double()).topk(kappa, largest=False).values.mean(1)
    torch.testing.assert_close(pixel_knn(query, gallery, kappa).double(), expected, rtol=1e-4, atol=1e-4)


def test_pixel_knn_zero_distance_to_itself():
    features = torch.randn(50, 8)
    assert float(pixel_knn(features, features, 1).max()) < 1e-2


@pytest.mark.parametrize("block", knn.BLOCKS)
def test_a_pixel_distance_does_not_depend_on_the_pixels_searched_with_it(block):
    # refine.py searches subsets of a layer's cells; its mask must be the exhaustive search's, bit for bit.
    gen = torch.Generator().manual_seed(0)
    fmap, gallery = torch.rand(24, 48, 48, generator=gen), torch.rand(6000, 24, generator=gen)
    pixels = fmap.permute(1, 2, 0).reshape(-1, 24)  # a layer's layout: not row-major
    whole = pixel_knn(pixels, gallery, 1, block)
    for n in (1, 2, 3, 5, 7, 11, 129, 513):
        cells = torch.randperm(len(pixels), generator=gen)[:n]
        assert torch.equal(pixel_knn(pixels[cells], gallery, 1, block), whole[cells]), n


def test_flat_index_returns_squared_distances_of_the_exact_neighbours():
    rng = np.random.default_rng(0)
    bank, query = rng.normal(size=(100, 12)).astype(np.float32), rng.normal(size=(5, 12)).astype(np.float32)
    sq_dist, nn_indices = ImageIndex("flat").fit(bank).search(query, 4)
    brute = ((query[:, None] - bank[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(nn_indices, np.argsort(brute, axis=1)[:, :4])
    np.testing.assert_allclose(sq_dist, np.sort(brute, axis=1)[:, :4], rtol=1e-4)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_find_most_true_neighbours(kind):
    rng = np.random.default_rng(1)
    bank, query = rng.normal(size=(2000, 32)).astype(np.float32), rng.normal(size=(20, 32)).astype(np.float32)
    _, exact = ImageIndex("flat").fit(bank).search(query, 5)
    _, approx = ImageIndex(kind).fit(bank).search(query, 5)
    recall = np.mean([len(set(a) & set(e)) / 5 for a, e in zip(approx, exact)])
    assert recall >= 0.8


def test_k_larger_than_the_bank_is_refused():
    with pytest.raises(ValueError, match="exceeds the 3 images"):
        ImageIndex().fit(np.zeros((3, 4), np.float32)).search(np.zeros((1, 4), np.float32), 5)
