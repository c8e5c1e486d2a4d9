"""Tuning's parts: the seeded split, the grid, the bootstrap guard and the rule that chooses."""

import numpy as np
import pytest

from mlflow_knn_anomaly.evaluation import tuning
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic


@pytest.fixture(scope="module")
def part(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("tune") / "disc", seed=1, n_train=4, n_test_good=10,
                          n_per_defect=5, size=32)  # fmt: skip


def test_the_split_is_seeded_and_stratified_and_keeps_the_rest_for_test(part):
    split = tuning.split_test(part, 0.3, seed=0)
    assert split.counts() == {"validation_normal": 3, "validation_defects": 6, "test_images": 16}
    kinds = [s.defect_type for s in split.validation]
    assert {k: kinds.count(k) for k in set(kinds)} == {"good": 3, "scratch": 2, "spot": 2, "contamination": 2}
    assert not {s.path for s in split.validation} & {s.path for s in split.test}
    assert tuning.split_test(part, 0.3, seed=0).digest == split.digest
    assert tuning.split_test(part, 0.3, seed=1).digest != split.digest
    with pytest.raises(ValueError, match="validation_fraction=1.0 must be in"):
        tuning.split_test(part, 1.0)


def test_the_grid_starts_with_the_defaults_and_shares_builds():
    grid = tuning.candidates()
    assert grid[0] == {"resize": 256, "feature_pool": 3, "score_fusion": "mean"} and len(grid) == 8
    assert len({tuning.feature_key(c) for c in grid}) == 4
    mine = tuning.candidates({"resize": 320, "feature_pool": 3, "score_fusion": "map"})  # a team's own defaults
    assert mine[0] == {"resize": 320, "feature_pool": 3, "score_fusion": "map"} and len(mine) == 12


def _scored(settings, auroc, scores=None):
    return tuning.Scored(settings, {"image_auroc": auroc}, scores)


def test_the_bootstrap_counts_ties_as_losses_and_a_clear_win_as_a_win():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(20, bool), np.ones(20, bool)]
    noise = rng.normal(size=40)
    default = _scored({}, 0.5, noise)
    tie, clear = _scored({}, 0.5, noise.copy()), _scored({}, 1.0, labels + 0.1 * noise)
    assert tuning.win_rates(labels, default, [tie, clear], None) == [0.0, 1.0]


def test_the_default_stays_without_evidence_or_without_a_sure_win():
    default, better = _scored({"resize": 256}, 0.90), _scored({"resize": 384}, 0.95)
    thin = {"validation_defects": 4, "validation_normal": 30}
    choice = tuning.choose([default, better], 0.9, thin, min_images=5)
    assert choice.settings == {"resize": 256} and "4 defects" in choice.reason and choice.win_rate is None
    enough = {"validation_defects": 10, "validation_normal": 10}
    better.win_rate = 0.85
    choice = tuning.choose([default, better], 0.9, enough, 5)
    assert choice.settings == {"resize": 256} and "85%" in choice.reason
    better.win_rate = 0.95
    assert tuning.choose([default, better], 0.9, enough, 5).settings == {"resize": 384}


def test_ties_go_to_the_faster_candidate():
    default = _scored({"resize": 256, "feature_pool": 3}, 0.90)
    fast, slow = _scored({"resize": 256, "feature_pool": 1}, 0.95), _scored({"resize": 384, "feature_pool": 3}, 0.95)
    fast.win_rate = slow.win_rate = 1.0
    counts = {"validation_defects": 10, "validation_normal": 10}
    assert tuning.choose([default, fast, slow], 0.9, counts, 5).settings == fast.settings


def test_the_objective_weighs_aupro_and_image_auroc_alike_with_masks():
    assert tuning.objective({"image_auroc": 0.9, "aupro": 0.7}) == pytest.approx(0.8)
    assert tuning.objective({"image_auroc": 0.9}) == 0.9


def test_a_candidate_that_loses_a_metric_does_not_win():
    default = {"image_auroc": 0.97, "pixel_auroc": 0.86, "aupro": 0.80}
    better_objective = {"image_auroc": 0.962, "pixel_auroc": 0.85, "aupro": 0.82}  # Magnetic Tile's case
    assert tuning.objective(better_objective) > tuning.objective(default)
    assert not tuning.beats(better_objective, default)
    assert tuning.beats({"image_auroc": 0.968, "pixel_auroc": 0.858, "aupro": 0.82}, default)
    scored = [tuning.Scored({"resize": 256}, default, None), tuning.Scored({"resize": 384}, better_objective, None)]
    scored[1].win_rate = 1.0
    choice = tuning.choose(scored, 0.9, {"validation_defects": 10, "validation_normal": 10}, 5)
    assert choice.settings == {"resize": 256}
    assert "image_auroc, pixel_auroc" in choice.reason


def test_the_larger_input_is_tried_with_the_pooling_the_default_size_preferred():
    base = {"resize": 256, "feature_pool": 3, "score_fusion": "mean"}
    first = tuning.first_stage(base)
    assert [c["resize"] for c in first] == [256] * 4 and first[0] == base
    figures = {"image_auroc": 0.9, "aupro": 0.8}
    scored = [tuning.Scored(c, dict(figures), None) for c in first]
    assert {c["feature_pool"] for c in tuning.second_stage(base, scored)} == {3}  # nothing beat the default
    pool1 = next(s for s in scored if s.settings["feature_pool"] == 1)
    pool1.figures = {"image_auroc": 0.92, "aupro": 0.81}
    second = tuning.second_stage(base, scored)
    assert {(c["resize"], c["feature_pool"]) for c in second} == {(384, 1)} and len(second) == 2
