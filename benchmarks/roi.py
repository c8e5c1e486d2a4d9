"""Inspection regions (ROI) on real images: a defect outside changes nothing, one inside is found,
and what a ROI of the part costs or gains.

    python benchmarks/roi.py --threads 2

MVTec bottle, with a ROI of the bottle's disc (a centred disc of 0.47 of the side): the default
detector without and with the ROI (accuracy: image ROCAUC, pixel ROCAUC and AUPRO, the pixel
figures inside the ROI for the ROI model), then into every normal test image a bright 20 x 20
square pasted outside the ROI (a corner) and the same inside it (on the disc's rim): the share of
images whose score and regions are unchanged, and the share where the pasted square is found (the
image flagged and a region over the square). Magnetic Tile is tried too: its tiles have mixed
aspect ratios, which a ROI of one framing cannot fit, so the build refuses it (printed).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.algorithm.roi import roi_at
from mlflow_knn_anomaly.evaluation import metrics
from mlflow_knn_anomaly.evaluation.datasets import read_test, read_train
from mlflow_knn_anomaly.evaluation.evaluate import evaluate_samples, read_samples
from mlflow_knn_anomaly.runtime import configure_threads

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SQUARE = 20


def disc_roi(path: Path, size: int, radius: float = 0.47) -> Path:
    image = Image.new("L", (size, size), 0)
    r = radius * size
    ImageDraw.Draw(image).ellipse((size / 2 - r, size / 2 - r, size / 2 + r, size / 2 + r), fill=255)
    image.save(path)
    return path


def pasted(path: Path, x: int, y: int, value: int) -> np.ndarray:
    image = np.asarray(Image.open(path).convert("RGB")).copy()
    image[y : y + SQUARE, x : x + SQUARE] = value
    return image


def found(prediction, j: int, x: int, y: int) -> bool:
    """The image is flagged and one of its regions overlaps the pasted square."""
    boxes = prediction.regions[j] or []
    hit = any(r.x < x + SQUARE and x < r.x + r.width and r.y < y + SQUARE and y < r.y + r.height for r in boxes)
    return bool(prediction.is_anomalous[j]) and hit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    print(f"{configure_threads(args.threads)} threads\n")
    bottle = SHARED / "mvtec_bottle"
    normals = [s.path for s in read_test(bottle) if not s.is_anomalous]
    size = Image.open(normals[0]).width
    with tempfile.TemporaryDirectory() as tmp:
        roi = disc_roi(Path(tmp) / "disc.png", size)
        models = {
            "no roi": SpadeDetector().fit(read_train(bottle)),
            "bottle disc roi": SpadeDetector(SpadeConfig(roi=str(roi))).fit(read_train(bottle)),
        }
    samples = read_samples(bottle)
    print("| MVTec bottle | pixels scored | image ROCAUC | pixel ROCAUC | AUPRO | normal images to stage 2 |")
    print("|---|---|---|---|---|---|")
    results = {name: evaluate_samples(detector, samples) for name, detector in models.items()}
    for name, result in results.items():
        m = result.metrics
        pixels = "every pixel" if name == "no roi" else "inside the disc"
        print(f"| {name} | {pixels} | {m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | {m['aupro']:.4f} "
              f"| {m['stage2_share_normal']:.2f} |")  # fmt: skip
    plain, disc = results["no roi"], models["bottle disc roi"].roi
    valid = [roi_at(disc, *m.shape) for m in plain.anomaly_maps]
    gt = [g & v for g, v in zip(plain.gt_masks, valid)]
    auroc = metrics.pixel_auroc([g[v] for g, v in zip(gt, valid)], [m[v] for m, v in zip(plain.anomaly_maps, valid)])
    aupro = metrics.pro_curve(gt, plain.anomaly_maps, valid=valid).aupro
    print(f"| no roi | inside the disc (like for like) | {plain.metrics['image_auroc']:.4f} | {auroc:.4f} "
          f"| {aupro:.4f} | {plain.metrics['stage2_share_normal']:.2f} |")  # fmt: skip
    # Outside: a black square in the white background's corner (a bright one would not show there);
    # inside: a white square on the dark bottle, near the top of its rim.
    corner, rim = (18, 18), (size // 2 - SQUARE // 2, int(size * 0.08))
    print(f"\n| pasted {SQUARE}x{SQUARE} square, {len(normals)} normal test images | model | unchanged score "
          "and regions | found (flagged, a region over it) |\n|---|---|---|---|")  # fmt: skip
    for name, detector in models.items():
        clean = detector.predict(normals, segment="all")
        for where, (x, y), value in (("outside the roi (black, corner)", corner, 0),
                                     ("inside the roi (white, disc rim)", rim, 255)):  # fmt: skip
            changed = detector.predict([pasted(p, x, y, value) for p in normals], segment="all")
            same = [
                changed.scores[j] == clean.scores[j] and changed.regions[j] == clean.regions[j]
                for j in range(len(normals))
            ]
            hits = [found(changed, j, x, y) for j in range(len(normals))]
            print(f"| {where} | {name} | {np.mean(same):.0%} | {np.mean(hits):.0%} |")
    tiles = SHARED / "magnetic_tile"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            SpadeDetector(SpadeConfig(roi=str(disc_roi(Path(tmp) / "r.png", 256)))).fit(read_train(tiles))
        except ValueError as exc:
            print(f"\nMagnetic Tile with a roi: refused at build: {exc}")


if __name__ == "__main__":
    main()
