import numpy as np
import pytest
import torch
from PIL import Image

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.algorithm import anomaly_map
from mlflow_knn_anomaly.algorithm.images import prepare
from mlflow_knn_anomaly.algorithm.spade import fuse_scores, split_holdout
from mlflow_knn_anomaly.evaluation import metrics
from mlflow_knn_anomaly.evaluation.datasets import read_test, read_train
from mlflow_knn_anomaly.evaluation.evaluate import evaluate


def test_synthetic_defects_land_on_the_map_maximum_and_normals_pass(fitted, synthetic_root):
    samples = read_test(synthetic_root)
    prediction = fitted.predict([s.path for s in samples], segment="all")
    hits = [
        s.mask(m.shape[1], m.shape[0])[np.unravel_index(np.argmax(m), m.shape)]
        for s, m in zip(samples, prediction.anomaly_maps)
        if s.is_anomalous
    ]
    normal_pass = [not flagged for s, flagged in zip(samples, prediction.is_anomalous) if not s.is_anomalous]
    assert np.mean(hits) >= 0.95
    assert np.mean(normal_pass) >= 0.95


def test_maps_and_masks_come_back_at_the_input_size(fitted):
    image = np.random.default_rng(0).integers(0, 255, (90, 170, 3), dtype=np.uint8)
    prediction = fitted.predict([image], segment="all")
    assert prediction.anomaly_maps[0].shape == (90, 170) and prediction.masks[0].shape == (90, 170)
    assert prediction.masks[0].dtype == bool


def test_gating_segments_only_images_past_the_stage1_gate(fitted, synthetic_root):
    paths = [s.path for s in read_test(synthetic_root)]
    auto = fitted.predict(paths)
    gate = fitted.calibration.gate_threshold  # the default score_mode is two_stage
    np.testing.assert_array_equal(auto.segmented, auto.knn_scores >= gate)
    assert all((m is None) == (not s) for m, s in zip(auto.anomaly_maps, auto.segmented))
    assert not fitted.predict(paths[:2], segment="none").segmented.any()
    np.testing.assert_allclose(auto.normalized_scores, auto.scores / fitted.calibration.image_threshold)


def test_threshold_overrides_change_the_verdict(fitted, synthetic_root):
    path = read_test(synthetic_root)[0].path
    low = fitted.predict([path], segment="all", image_threshold=1e-6, pixel_threshold=1e-6)
    assert low.is_anomalous[0] and low.masks[0].all()
    with pytest.raises(ValueError, match="positive"):
        fitted.predict([path], image_threshold=-2.0)
    with pytest.raises(ValueError, match="segment='some'"):
        fitted.predict([path], segment="some")


def test_save_load_round_trip_gives_identical_scores_and_masks(fitted, saved_detector, synthetic_root):
    paths = [s.path for s in read_test(synthetic_root)][::4]
    before = fitted.predict(paths, segment="all")
    loaded = SpadeDetector.load(saved_detector)
    after = loaded.predict(paths, segment="all")
    assert loaded.config == fitted.config and loaded.calibration == fitted.calibration
    np.testing.assert_array_equal(before.scores, after.scores)
    for a, b in zip(before.masks, after.masks):
        np.testing.assert_array_equal(a, b)


def test_too_few_normal_images_is_an_error_before_any_work():
    with pytest.raises(ValueError, match="too few"):
        split_holdout(list(range(8)), SpadeConfig(k_images=5))


def test_two_stage_scores_candidates_by_both_stages_and_the_rest_by_stage1(fitted, synthetic_root):
    cal = fitted.calibration
    paths = [s.path for s in read_test(synthetic_root)]
    auto = fitted.predict(paths)
    every = fitted.predict(paths, segment="all")
    candidates = auto.knn_scores >= cal.gate_threshold
    np.testing.assert_array_equal(auto.segmented, candidates)
    np.testing.assert_allclose(auto.scores, every.scores)  # the score does not depend on segment
    maxima = np.array([m.max() for m in every.anomaly_maps])
    assert np.all(every.map_scores <= maxima + 1e-6)  # the margin only removes pixels
    # The default fusion: the mean of the two stages' z-scores with the map's counted 5 times, on the map's scale.
    assert (fitted.config.score_fusion, fitted.config.map_weight) == ("mean", 5.0)
    z_knn = (auto.knn_scores - cal.knn_mean) / cal.knn_std
    z_map = (every.map_scores - cal.map_mean) / cal.map_std
    fused = cal.map_mean + cal.map_std * (z_knn + 5 * z_map) / 6
    np.testing.assert_allclose(auto.scores[candidates], fused[candidates], rtol=1e-6)
    np.testing.assert_allclose(auto.scores[~candidates], (cal.map_mean + cal.map_std * z_knn)[~candidates], rtol=1e-6)


def test_the_map_score_is_the_mean_of_the_top_share_of_pixels_inside_the_margin():
    input_map = np.zeros((40, 40), np.float32)
    input_map[0, 0] = 100.0  # in the margin: ignored
    core = input_map[4:36, 4:36]  # a view: 32 x 32 = 1024 scored pixels
    for i, value in enumerate((9.0, 8.0, 7.0, 6.0, 5.0)):
        core[10 + i, 3 * i] = value
    assert anomaly_map.map_score(input_map, margin=4) == 9.0  # top=0: the maximum
    assert anomaly_map.map_score(input_map, margin=4, top=5 / 1024) == pytest.approx(7.0)
    assert anomaly_map.map_score(input_map, margin=4, top=10 / 1024) == pytest.approx(3.5)
    assert anomaly_map.map_score(input_map, margin=4, top=1e-9) == 9.0  # at least one pixel
    assert anomaly_map.map_score(input_map, margin=0, top=1 / 1600) == 100.0
    assert anomaly_map.map_score(input_map, margin=4, top=2.6 / 1024) == pytest.approx(8.0)  # 2.6 rounds to 3
    narrow = np.zeros((8, 40), np.float32)
    narrow[2, 20], narrow[3, 20] = 50.0, 4.0  # an 8-px side keeps its middle quarter: rows 3-4
    assert anomaly_map.map_score(narrow, margin=4) == 4.0
    assert SpadeConfig().score_top == 0.005


def test_fit_and_predict_score_maps_with_the_configured_top_share(synthetic_root, monkeypatch):
    tops = []
    real = anomaly_map.map_score
    monkeypatch.setattr(
        anomaly_map, "map_score", lambda m, margin, top, roi=None: tops.append(top) or real(m, margin, top, roi)
    )
    detector = SpadeDetector(SpadeConfig(score_top=0.02, k_images=3)).fit(read_train(synthetic_root)[:12])
    calibrated = len(tops)
    detector.predict([read_test(synthetic_root)[0].path], segment="all")
    assert calibrated > 0 and len(tops) == calibrated + 1
    assert set(tops) == {0.02}


def test_knn_mode_reports_the_papers_stage1_score(synthetic_root):
    detector = SpadeDetector(SpadeConfig(score_mode="knn")).fit(read_train(synthetic_root))
    auto = detector.predict([s.path for s in read_test(synthetic_root)])
    np.testing.assert_array_equal(auto.scores, auto.knn_scores)
    np.testing.assert_array_equal(auto.segmented, auto.knn_scores >= detector.calibration.image_threshold)


def test_bottle_meets_the_accuracy_floors(bottle):
    root, detector = bottle
    evaluation = evaluate(detector, root)
    figures = evaluation.metrics
    labels = np.array([s.is_anomalous for s in evaluation.samples])
    assert figures["knn_image_auroc"] == metrics.image_auroc(labels, evaluation.knn_scores) >= 0.99  # stage 1
    assert figures["image_auroc"] >= 0.99
    assert figures["pixel_auroc"] >= 0.975
    assert figures["aupro"] >= 0.93


def test_random_projection_is_fixed_and_roughly_preserves_distances():
    from mlflow_knn_anomaly.algorithm.spade import random_projection

    a = random_projection("blocks.4", 112, 64)
    assert torch.equal(a, random_projection.__wrapped__("blocks.4", 112, 64))  # rebuilt, not cached
    assert not torch.equal(a, random_projection.__wrapped__("blocks.2", 112, 64))
    x = torch.randn(200, 112, generator=torch.Generator().manual_seed(0))
    ratio = torch.pdist(x @ a) / torch.pdist(x)
    assert 0.85 < float(ratio.mean()) < 1.15


def test_concurrent_predicts_equal_sequential_ones(fitted, synthetic_root):
    from concurrent.futures import ThreadPoolExecutor

    paths = [s.path for s in read_test(synthetic_root)][::2]
    sequential = [fitted.predict([p], segment="all").scores[0] for p in paths]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda p: fitted.predict([p], segment="all").scores[0], paths))
    np.testing.assert_array_equal(concurrent, sequential)


def test_a_bank_of_mixed_aspect_ratios_fits_predicts_and_reloads_exactly(synthetic_root, tmp_path):
    # Three shapes in one bank: square, landscape and portrait crops of the synthetic images.
    boxes = [(0, 0, 256, 256), (0, 48, 256, 208), (48, 0, 208, 256)]
    paths = read_train(synthetic_root)[:18]
    images = [np.asarray(Image.open(p).convert("RGB").crop(boxes[j % 3])) for j, p in enumerate(paths)]
    config = SpadeConfig(k_images=3, normalize_layers=True)
    detector = SpadeDetector(config).fit(images[:15])
    offsets = detector.bank.offsets["blocks.1"]
    # stride-4 rows: 256 x 256 -> 64 x 64; 256 x 160 -> 320 x 192 input -> 80 x 48 (and transposed)
    assert set(np.diff(offsets).tolist()) == {64 * 64, 80 * 48}
    before = detector.predict(images[15:], segment="all")
    assert [m.shape for m in before.anomaly_maps] == [i.shape[:2] for i in images[15:]]
    after = SpadeDetector.load(detector.save(tmp_path / "mixed")).predict(images[15:], segment="all")
    np.testing.assert_array_equal(before.scores, after.scores)
    for a, b in zip(before.anomaly_maps, after.anomaly_maps):
        np.testing.assert_array_equal(a, b)


def test_normalized_layers_put_every_layer_on_the_held_out_scale(fitted, synthetic_root):
    assert len(fitted.calibration.layer_scales) == len(fitted.config.pyramid)  # calibrated even when unused
    arithmetic = SpadeDetector(fitted.config.replace(layer_combine="mean"), backbone=fitted.backbone)
    normalized = SpadeDetector(arithmetic.config.replace(normalize_layers=True), backbone=fitted.backbone)
    for detector in (arithmetic, normalized):
        detector.use_bank(fitted.bank)
        detector.calibration = fitted.calibration
    path = read_test(synthetic_root)[0].path  # a normal image
    raw_map = arithmetic.predict([path], segment="all").anomaly_maps[0]
    scaled_map = normalized.predict([path], segment="all").anomaly_maps[0]
    # Held-out normal pixels average 1 per layer; a normal test image lands near that scale.
    assert raw_map.mean() > 3 * scaled_map.mean() and 0.5 < scaled_map.mean() < 2.5


def test_coarse_layers_search_the_pixels_of_more_nearest_images(fitted, synthetic_root):
    assert fitted.config.gallery_images() == {"blocks.1": 5, "blocks.2": 20, "blocks.4": 80, "blocks.6": 320}
    assert set(fitted.config.replace(scale_gallery=False).gallery_images().values()) == {5}
    path = read_test(synthetic_root)[0].path
    pooled, fmaps = fitted.extract(prepare([path], 256, 0, True)[0])
    _, nn_indices = fitted.stage1(pooled)
    bank = fitted.bank
    assert nn_indices.shape == (1, bank.n_images)  # 320 wanted, capped at the bank
    counts = fitted.config.gallery_images()
    galleries = {name: bank.gallery(name, nn_indices[0, : counts[name]]) for name in fmaps[0]}
    distances = anomaly_map.layer_distances(fmaps[0], galleries, kappa=1)
    for name, images in (("blocks.1", nn_indices[0, :5]), ("blocks.2", nn_indices[0, :20])):
        c = fmaps[0][name].shape[0]
        query = fmaps[0][name].float().permute(1, 2, 0).reshape(-1, c)
        brute = torch.cdist(query, bank.gallery(name, images)).min(dim=1).values
        torch.testing.assert_close(distances[name].flatten(), brute, rtol=1e-3, atol=1e-3)
    c = fmaps[0]["blocks.4"].shape[0]
    query = fmaps[0]["blocks.4"].float().permute(1, 2, 0).reshape(-1, c)
    whole_bank = torch.from_numpy(np.asarray(bank.features["blocks.4"])).float()
    brute = torch.cdist(query, whole_bank).min(dim=1).values
    torch.testing.assert_close(distances["blocks.4"].flatten(), brute, rtol=1e-3, atol=1e-3)


def test_stage1_scores_by_the_last_layer_and_the_pyramid_descriptor_picks_the_gallery(fitted, synthetic_root):
    config = fitted.config
    assert (config.stage1_feature, config.gallery_feature) == ("last", "pyramid")  # the defaults
    paths = [s.path for s in read_test(synthetic_root)[:6]]
    pooled, _ = fitted.extract(prepare(paths, 256, 0, True)[0])
    scores, nn_indices = fitted.stage1(pooled)
    last, pyramid = fitted._split(pooled)
    bank_last, bank_pyramid = fitted._split(fitted.bank.pooled)
    assert last.shape[1] == bank_last.shape[1] == 1280  # Lite0's pooled head
    to_last = np.sqrt(((last[:, None] - bank_last[None]) ** 2).sum(-1))
    np.testing.assert_allclose(scores, np.sort(to_last, axis=1)[:, : config.k_images].mean(1), rtol=1e-4)
    to_pyramid = ((pyramid[:, None] - bank_pyramid[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(nn_indices, np.argsort(to_pyramid, axis=1, kind="stable")[:, : nn_indices.shape[1]])
    assert not np.array_equal(nn_indices[:, :5], np.argsort(to_last, axis=1)[:, :5])  # another choice than stage 1's
    with pytest.raises(ValueError, match="build the bank with the detector's own settings"):
        SpadeDetector(config.replace(gallery_feature="last"), backbone=fitted.backbone).use_bank(fitted.bank)


def test_geometric_layer_combine_is_blind_to_layer_scales():
    distances = {"blocks.1": torch.full((1, 1, 4, 4), 2.0), "blocks.2": torch.full((1, 1, 2, 2), 8.0)}
    distances["blocks.1"][0, 0, 0, 0] = 32.0
    plain = anomaly_map.combine_layers(distances, (4, 4), "geometric", sigma=0.0)
    assert plain[3, 3] == pytest.approx(4.0) and plain[0, 0] == pytest.approx(16.0)  # sqrt(2 * 8), sqrt(32 * 8)
    scaled = anomaly_map.combine_layers(distances, (4, 4), "geometric", sigma=0.0, layer_scales=(2.0, 8.0))
    np.testing.assert_allclose(scaled, plain / 4, rtol=1e-6)
    mean = anomaly_map.combine_layers(distances, (4, 4), "mean", sigma=0.0)
    assert mean[3, 3] == pytest.approx(5.0) and mean[0, 0] == pytest.approx(20.0)
    with pytest.raises(ValueError, match="layer_combine='max' is not one of"):
        SpadeConfig(layer_combine="max")


def test_refitting_recomputes_every_calibrated_value(synthetic_root):
    images = read_train(synthetic_root)
    first, second = images[:20], images[20:45]
    refitted = SpadeDetector().fit(first).fit(second)
    fresh = SpadeDetector(backbone=refitted.backbone).fit(second)
    assert refitted.calibration == fresh.calibration
    assert refitted.config == SpadeConfig()  # fit never writes into the settings


def test_score_fusion_combines_the_two_stages_z_scores():
    stats = {"knn_mean": 1.0, "knn_std": 0.5, "map_mean": 10.0, "map_std": 2.0}
    knn = np.array([3.0, 3.0, 1.0])  # stage-1 z = 4, 4, 0
    maps = np.array([12.0, np.nan, 16.0])  # map z = 1, -, 3
    past_gate = np.array([True, True, False])
    # Past the gate and segmented: the fusion; otherwise the stage-1 z-score on the map's scale.
    np.testing.assert_allclose(fuse_scores(knn, maps, past_gate, stats, "map"), [12.0, 18.0, 10.0])
    np.testing.assert_allclose(fuse_scores(knn, maps, past_gate, stats, "max"), [18.0, 18.0, 10.0])
    np.testing.assert_allclose(fuse_scores(knn, maps, past_gate, stats, "mean"), [15.0, 18.0, 10.0])
    # map_weight=2 counts the map's z-score twice: (2 * 1 + 4) / 3 = 2.
    np.testing.assert_allclose(fuse_scores(knn, maps, past_gate, stats, "mean", 2.0), [14.0, 18.0, 10.0])


def test_regions_are_read_off_the_map_and_the_top_one_holds_the_pasted_defect(fitted, synthetic_root):
    samples = [s for s in read_test(synthetic_root) if s.is_anomalous]
    prediction = fitted.predict([s.path for s in samples], segment="all", min_region_area=0)
    pixel_t = fitted.thresholds()[1]
    hits = []
    for sample, amap, mask, regions in zip(samples, prediction.anomaly_maps, prediction.masks, prediction.regions):
        np.testing.assert_array_equal(mask, amap >= pixel_t)  # min_region_area 0: every flagged pixel
        assert sum(r.area for r in regions) == mask.sum()
        assert [r.peak for r in regions] == sorted((r.peak for r in regions), reverse=True)
        if regions:
            top = regions[0]
            y, x = np.unravel_index(np.argmax(amap), amap.shape)
            assert top.x <= x < top.x + top.width and top.y <= y < top.y + top.height
            assert top.peak == pytest.approx(float(amap.max()) / pixel_t, rel=1e-6)
            box = np.zeros_like(mask)
            box[top.y : top.y + top.height, top.x : top.x + top.width] = True
            hits.append((sample.mask(*amap.shape[::-1]) & box).any())
    assert np.mean(hits) >= 0.9


def test_min_region_area_drops_specks_from_regions_and_mask_alike(fitted, synthetic_root):
    path = [s for s in read_test(synthetic_root) if s.is_anomalous][0].path
    low_t = 0.8 * fitted.thresholds()[1]  # many small regions
    every = fitted.predict([path], segment="all", pixel_threshold=low_t)
    areas = sorted(r.area for r in every.regions[0])
    cut = areas[len(areas) // 2] + 1 if len(areas) > 1 else areas[0] + 1
    kept = fitted.predict([path], segment="all", pixel_threshold=low_t, min_region_area=cut)
    assert all(r.area >= cut for r in kept.regions[0]) and len(kept.regions[0]) < len(every.regions[0])
    assert kept.masks[0].sum() == sum(r.area for r in kept.regions[0])
    assert not (kept.masks[0] & ~every.masks[0]).any()
    with pytest.raises(ValueError, match="min_region_area must be"):
        fitted.predict([path], segment="all", min_region_area=-1)
