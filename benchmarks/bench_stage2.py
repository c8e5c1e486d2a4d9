"""Stage 2's cost with `exact_maps` on (every pixel searched) and off (the default, `refine.py`).

    python benchmarks/bench_stage2.py --root ../shared/data --threads 2 --out benchmarks/results/stage2.md

In one run, on this machine: the CPU (`lscpu`); per set with masks (bottle, MPDD metal_plate),
`segment="all"` against `"none"` through the pyfunc (one image per call, decoding and encoding
included, p50 over the test images, the calls interleaved per image; "0.4.0" is that release's
stage 2: every pixel searched in whole-gallery blocks), and the profile of a
segmented image by step; on all five sets, the share of each layer's cells that the refined search
searched exhaustively, on normal and on anomalous test images, whether it reported what the
exhaustive search reports (masks, map scores), and the image ROCAUC over every test image both ways.
Refined is `predict(return_maps=False)` (the pyfunc without `return_anomaly_map`); exact is
`exact_maps=True`.
"""

from __future__ import annotations

import argparse
import base64
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.algorithm import anomaly_map, refine
from mlflow_knn_anomaly.algorithm.backbone_specs import BACKBONES
from mlflow_knn_anomaly.algorithm.bank import Galleries
from mlflow_knn_anomaly.evaluation.datasets import read_test, read_train
from mlflow_knn_anomaly.mlops.pyfunc_model import encode_mask, save_model
from mlflow_knn_anomaly.runtime import THREADS_ENV, configure_threads

TIMED_SETS = ("mvtec_bottle", "mpdd_metal_plate")
ALL_SETS = ("mvtec_bottle", "magnetic_tile", "mpdd_metal_plate", "mvtec_transistor", "elpv")


def cpu() -> str:
    """Vendor, model and the vector extensions that decide low-precision paths."""
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    has = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in flags]
    vendor, model = fields.get("Vendor ID", "?").strip(), fields.get("Model name", "?").strip()
    return f"{vendor} {model}, {len(flags) and ', '.join(has)}"


def sample(items: list, n: int) -> list:
    return [items[i] for i in np.linspace(0, len(items) - 1, min(n, len(items))).round().astype(int)]


def both(detector: SpadeDetector) -> dict[str, SpadeDetector]:
    """The fitted detector with the refined and with the exhaustive stage 2 (same bank, calibration)."""
    exact = SpadeDetector(detector.config.replace(exact_maps=True), backbone=detector.backbone)
    exact.use_bank(detector.bank)
    exact.calibration, exact.holdout, exact.roi = detector.calibration, detector.holdout, detector.roi
    return {"refined": detector, "exact": exact}


@contextmanager
def whole_gallery_blocks(on: bool):
    """0.4.0's stage 2: every pixel searched (exact_maps) in whole-gallery blocks of 128 queries, on
    galleries gathered from the bank per image (no layer prepared whole)."""
    module = sys.modules["mlflow_knn_anomaly.algorithm.knn"]  # the ones the loaded pyfunc calls
    bank = sys.modules["mlflow_knn_anomaly.algorithm.bank"]
    real, share = module.block_shape, bank.WHOLE_SHARE
    if on:
        module.block_shape = lambda *args: (module.QUERY_ROWS, 0)
        bank.WHOLE_SHARE = 1 << 40
    try:
        yield
    finally:
        module.block_shape, bank.WHOLE_SHARE = real, share


def pyfunc_ratios(detectors: dict[str, SpadeDetector], paths: list[Path], tmp: Path) -> dict[str, float]:
    """p50 ms per call of segment="none" and of "all" with each stage 2, through the loaded pyfunc."""
    models = {}
    for name, detector in detectors.items():
        save_model(detector, tmp / name)
        models[name] = mlflow.pyfunc.load_model(str(tmp / name))
    calls = {
        "none": (models["refined"], "none", False),
        "all, 0.4.0": (models["exact"], "all", True),
        "all, exact": (models["exact"], "all", False),
        "all, refined": (models["refined"], "all", False),
    }
    ms = defaultdict(list)
    frames = [pd.DataFrame({"image": [base64.b64encode(p.read_bytes()).decode()]}) for p in paths]
    for model, segment, old in calls.values():
        with whole_gallery_blocks(old):
            model.predict(frames[0], params={"segment": segment})  # warm-up
    for frame in frames:
        for key, (model, segment, old) in calls.items():
            with whole_gallery_blocks(old):
                start = time.perf_counter()
                model.predict(frame, params={"segment": segment})
                ms[key].append(1000 * (time.perf_counter() - start))
    return {key: float(np.median(v)) for key, v in ms.items()}


class Hooks:
    """Wall time per step of stage 2, by wrapping the functions that do each step."""

    def __init__(self, detector: SpadeDetector) -> None:
        self.ms: dict[str, float] = defaultdict(float)
        spec = BACKBONES[detector.config.backbone]
        self.layers = {
            detector.bank.features[name].shape[1]: f"{name} (stride {spec.layer(name).stride})"
            for name in detector.config.pyramid
        }
        self.saved: list[tuple[object, str, object]] = []

    def wrap(self, module, attribute: str, step) -> None:
        real = getattr(module, attribute)
        self.saved.append((module, attribute, real))

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = real(*args, **kwargs)
            self.ms[step(*args) if callable(step) else step] += 1000 * (time.perf_counter() - start)
            return out

        setattr(module, attribute, timed)

    def search_step(self, query: torch.Tensor, *rest) -> str:
        return f"exhaustive search {self.layers[query.shape[1]]}"

    def restore(self) -> None:
        for module, attribute, real in reversed(self.saved):
            setattr(module, attribute, real)


def profile(detector: SpadeDetector, paths: list[Path]) -> dict[str, float]:
    """ms per image of each stage-2 step of predict(segment="all"), and of stage 1 (segment="none")."""
    detector.predict(paths[:1], segment="all", return_maps=False)  # warm-up
    hooks, totals = Hooks(detector), defaultdict(float)
    hooks.wrap(anomaly_map, "pixel_knn", hooks.search_step)
    hooks.wrap(refine, "pixel_knn", hooks.search_step)
    hooks.wrap(refine, "window_bounds", "window bounds (all layers)")
    hooks.wrap(anomaly_map, "gaussian_filter", "smoothing")
    hooks.wrap(anomaly_map, "combine_layers", "combine_layers")
    hooks.wrap(Galleries, "__call__", "gallery assembly")
    hooks.wrap(refine, "combine_layers", "combine_layers")
    try:
        for path in paths:
            start = time.perf_counter()
            detector.predict([path], segment="none")
            middle = time.perf_counter()
            prediction = detector.predict([path], segment="all", return_maps=False)
            end = time.perf_counter()
            encode_mask(prediction.masks[0])
            totals["stage 1 (decode to search)"] += 1000 * (middle - start)
            totals["segmented predict"] += 1000 * (end - middle)
            totals["mask PNG encoding"] += 1000 * (time.perf_counter() - end)
    finally:
        hooks.restore()
    out = {key: value / len(paths) for key, value in {**hooks.ms, **totals}.items()}
    out["upsampling and combining"] = out.pop("combine_layers") - out.get("smoothing", 0.0)
    stage2 = out.pop("segmented predict") + out["mask PNG encoding"] - out["stage 1 (decode to search)"]
    named = sum(v for k, v in out.items() if k != "stage 1 (decode to search)")
    out["other (cells, map score, resize, mask, regions)"] = stage2 - named
    out["**stage 2**"] = stage2
    out["**segmented / stage 1**"] = (stage2 + out["stage 1 (decode to search)"]) / out["stage 1 (decode to search)"]
    return out


def shares(detectors: dict[str, SpadeDetector], tests: list) -> tuple[dict[bool, dict[str, float]], dict[str, float]]:
    """Mean share of each layer's cells searched exhaustively, for normal (False) and anomalous
    (True) images; and how far the refined answers are from the exhaustive ones."""
    refined, exact = detectors["refined"], detectors["exact"]
    threshold = refined.calibration.pixel_threshold
    seen: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    mask_pixels = differ = 0
    score_diff = 0.0
    for sample_ in tests:
        inputs, geometries = refined._prepare([sample_.path])
        pooled, features = refined.extract(inputs)
        _, nn_indices = refined.stage1(pooled)
        size = geometries[0].input_shape
        input_map, searched = refined.refined_stage2(features[0], nn_indices[0], size, threshold)
        exact_map = exact.stage2(features[0], nn_indices[0], size)
        seen[sample_.is_anomalous].append(searched)
        cfg = refined.config
        score_diff = max(
            score_diff,
            abs(
                anomaly_map.map_score(input_map, cfg.score_margin, cfg.score_top)
                - anomaly_map.map_score(exact_map, cfg.score_margin, cfg.score_top)
            ),
        )
        to_image = geometries[0].to_image
        a = to_image(torch.from_numpy(np.ascontiguousarray(input_map))) >= threshold
        b = to_image(torch.from_numpy(np.ascontiguousarray(exact_map))) >= threshold
        mask_pixels += int(b.sum())
        differ += int((a != b).sum())
    means = {k: {layer: float(np.mean([s[layer] for s in v])) for layer in v[0]} for k, v in seen.items() if v}
    return means, {"mask pixels": mask_pixels, "differing": differ, "max map-score difference": score_diff}


def image_check(detectors: dict[str, SpadeDetector], tests: list) -> dict[str, float]:
    """Every test image through predict(segment="auto") without maps, refined and exhaustive: the
    image ROCAUC of each and the largest score difference."""
    paths = [s.path for s in tests]
    labels = np.array([s.is_anomalous for s in tests])
    scores = {k: d.predict(paths, return_maps=False).scores for k, d in detectors.items()}
    return {
        "image ROCAUC refined": float(roc_auc_score(labels, scores["refined"])),
        "image ROCAUC exact": float(roc_auc_score(labels, scores["exact"])),
        "max score difference": float(np.max(np.abs(scores["refined"] - scores["exact"]))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--images", type=int, default=40, help="test images per set and measurement")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    os.environ[THREADS_ENV] = str(threads)  # the pyfunc's loader would size threads by the load average
    lines = [f"CPU: {cpu()}; {threads} threads; torch {torch.__version__}.", ""]
    timing, profiles, searched, checks = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ALL_SETS:
            root = args.root / name
            detectors = both(SpadeDetector(SpadeConfig()).fit(read_train(root)))
            tests = read_test(root)
            picked = sample([s for s in tests if not s.is_anomalous], args.images // 2) + sample(
                [s for s in tests if s.is_anomalous], args.images // 2
            )
            searched[name] = shares(detectors, picked)
            checks[name] = image_check(detectors, tests)
            print(name, checks[name], flush=True)
            print(name, searched[name], flush=True)
            if name in TIMED_SETS:
                paths = [s.path for s in sample(tests, args.images)]
                timing[name] = pyfunc_ratios(detectors, paths, Path(tmp) / name)
                with whole_gallery_blocks(True):
                    profiles[name] = {"0.4.0": profile(detectors["exact"], paths[: args.images // 2])}
                profiles[name].update(
                    {key: profile(detectors[key], paths[: args.images // 2]) for key in ("exact", "refined")}
                )
                print(name, timing[name], flush=True)
    lines += ['## segment="all" against "none" through the pyfunc (p50 ms per call)', ""]
    lines += ["| set | none | all, 0.4.0 | all, exact | all, refined | 0.4.0 / none | exact / none | refined / none |"]
    lines += ["|---|---|---|---|---|---|---|---|"]
    for name, t in timing.items():
        lines.append(
            f"| {name} | {t['none']:.1f} | {t['all, 0.4.0']:.1f} | {t['all, exact']:.1f} | {t['all, refined']:.1f} | "
            + " | ".join(f"{t[kind] / t['none']:.2f}x" for kind in ("all, 0.4.0", "all, exact", "all, refined"))
            + " |"
        )
    lines += ["", "## Profile of a segmented image (ms/image)", ""]
    keys = list(dict.fromkeys(k for p in profiles.values() for d in p.values() for k in d))
    kinds = ("0.4.0", "exact", "refined")
    header = " | ".join(f"{name} {kind}" for name in profiles for kind in kinds)
    lines += [f"| step | {header} |", "|---" * (1 + len(kinds) * len(profiles)) + "|"]
    for key in keys:
        cells = " | ".join(f"{profiles[n][k].get(key, 0.0):.1f}" for n in profiles for k in kinds)
        lines.append(f"| {key} | {cells} |")
    lines += ["", "## Share of cells searched exhaustively (refined), normal / anomalous test images", ""]
    layers = SpadeConfig().pyramid
    lines += ["| set | " + " | ".join(layers) + " | mask pixels differing | max map-score difference |"]
    lines += ["|---" * (len(layers) + 3) + "|"]
    for name, (means, check) in searched.items():
        cells = " | ".join(
            f"{means.get(False, {}).get(layer, float('nan')):.3f} / {means.get(True, {}).get(layer, float('nan')):.3f}"
            for layer in layers
        )
        lines.append(
            f"| {name} | {cells} | {check['differing']} of {check['mask pixels']} "
            f"| {check['max map-score difference']:.1e} |"
        )
    lines += ["", '## Image scores over every test image (segment="auto", no maps)', ""]
    lines += ["| set | image ROCAUC, exact | image ROCAUC, refined | largest score difference |", "|---|---|---|---|"]
    for name, c in checks.items():
        lines.append(
            f"| {name} | {c['image ROCAUC exact']:.4f} | {c['image ROCAUC refined']:.4f} "
            f"| {c['max score difference']:.1e} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
