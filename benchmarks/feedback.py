"""Do confirmed false alarms folded into the bank help, and what do they cost in recall?

Per set: the default model's false alarms (normal test images it calls anomalous, at its
calibrated threshold) are split in half with a seed. One half is folded in as `update_bank
-P images=...` does (`SpadeDetector.update`, the same call); the other half is never seen. On the
test set without the folded half, before and after: the false-alarm rate of the unseen half and
of all normal images, the recall of the anomalous images (share called anomalous), image ROCAUC
and, with masks, AUPRO.

    python benchmarks/feedback.py --root ../shared/data --threads 2 --out benchmarks/results/feedback.md
    python benchmarks/feedback.py --sets elpv mvtec_bottle --brighten 1.3 --out benchmarks/results/feedback_lamp.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from monitor import model  # benchmarks/monitor.py: the same cached default models
from PIL import ImageEnhance

from mlflow_knn_anomaly import SpadeDetector
from mlflow_knn_anomaly.algorithm.images import load_image
from mlflow_knn_anomaly.evaluation.evaluate import LabelledImage, evaluate_samples, read_samples
from mlflow_knn_anomaly.evaluation.metrics import aupro, image_auroc
from mlflow_knn_anomaly.runtime import configure_threads

SETS = ("magnetic_tile", "mvtec_transistor", "mpdd_metal_plate", "elpv")


def figures(detector: SpadeDetector, result, keep: list[int], unseen: set[int]) -> dict[str, float]:
    """The figures of `result` (an evaluation of every test image) on the images `keep`."""
    samples = [result.samples[i] for i in keep]
    scores = result.scores[keep]
    flagged = scores >= detector.thresholds()[0]
    normal = np.array([not s.is_anomalous for s in samples])
    out = {
        "unseen_false_alarm_rate": float(np.mean([flagged[j] for j in unseen])),
        "false_alarm_rate": float(flagged[normal].mean()),
        "recall": float(flagged[~normal].mean()),
        "image_auroc": image_auroc(~normal, scores),
    }
    if result.gt_masks is not None:
        out["aupro"] = aupro([result.gt_masks[i] for i in keep], [result.anomaly_maps[i] for i in keep])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/monitor_models"), help="built models, reused")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--brighten", type=float, default=1.0,
                        help="every test image this much brighter first (1.3: a lamp change)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    rows = ["| set | false alarms (folded / unseen) | model | unseen false-alarm rate | false-alarm rate | "
            "recall | image ROCAUC | AUPRO |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in args.sets:
        detector = model(args.root, name, args.cache)
        samples = read_samples(args.root / name)
        if args.brighten != 1.0:
            samples = [
                LabelledImage(
                    ImageEnhance.Brightness(load_image(s.image)).enhance(args.brighten), s.defect_type, s.mask
                )
                for s in samples
            ]
        before = evaluate_samples(detector, samples, per_type_pixels=False)
        threshold = detector.thresholds()[0]
        alarms = [i for i, s in enumerate(samples) if not s.is_anomalous and before.scores[i] >= threshold]
        order = np.random.default_rng(0).permutation(len(alarms))
        folded = set(alarms[j] for j in order[: len(alarms) // 2])
        if not folded:
            rows.append(f"| {name} | {len(alarms)} | – | too few false alarms to fold in half of them |||||")
            continue
        keep = [i for i in range(len(samples)) if i not in folded]
        unseen = {j for j, i in enumerate(keep) if i in set(alarms)}
        updated = detector.update([samples[i].image for i in sorted(folded)])
        after = evaluate_samples(updated, [samples[i] for i in keep], per_type_pixels=False)
        results = (("default", figures(detector, before, keep, unseen)),
                   ("+ feedback", figures(updated, after, list(range(len(keep))), unseen)))  # fmt: skip
        for label, f in results:
            rows.append(
                f"| {name} | {len(folded)} / {len(unseen)} | {label} | {f['unseen_false_alarm_rate']:.3f} | "
                f"{f['false_alarm_rate']:.3f} | {f['recall']:.3f} | {f['image_auroc']:.4f} | "
                + (f"{f['aupro']:.4f}" if "aupro" in f else "–")
                + " |"
            )
            print(rows[-1], flush=True)
    shift = "" if args.brighten == 1.0 else f", every test image {args.brighten}x brighter"
    text = f"# Operator feedback (`benchmarks/feedback.py`{shift})\n\n" + "\n".join(rows) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
