"""Do confirmed false alarms folded into the bank help, and what do they cost in recall?

Per set: the default model's false alarms (normal test images it calls anomalous, at its
calibrated threshold) are split in half with a seed. One half is folded in as `update_bank
-P images=...` does (`SpadeDetector.update`, the same call); the other half is never seen. On the
test set without the folded half, before and after: the false-alarm rate of the unseen half and
of all normal images, the recall of the anomalous images (share called anomalous), image ROCAUC
and, with masks, AUPRO.

    python benchmarks/feedback.py --root ../shared/data --threads 2 --out benchmarks/results/feedback.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.datasets import read_train
from mlflow_knn_anomaly.evaluation import evaluate_samples, read_samples
from mlflow_knn_anomaly.runtime import configure_threads

SETS = ("magnetic_tile", "elpv", "mvtec_transistor", "mpdd_metal_plate")


def model(root: Path, name: str, cache: Path) -> SpadeDetector:
    path = cache / name
    if path.exists():
        return SpadeDetector.load(path)
    detector = SpadeDetector(SpadeConfig()).fit(read_train(root / name))
    detector.save(path)
    return detector


def figures(detector: SpadeDetector, samples: list, unseen: set[int]) -> dict[str, float]:
    result = evaluate_samples(detector, samples, per_type_pixels=False)
    flagged = result.scores >= detector.thresholds()[0]
    normal = np.array([not s.is_anomalous for s in samples])
    out = {
        "unseen_false_alarm_rate": float(np.mean([flagged[i] for i in unseen])),
        "false_alarm_rate": float(flagged[normal].mean()),
        "recall": float(flagged[~normal].mean()),
        "image_auroc": result.metrics["image_auroc"],
    }
    if "aupro" in result.metrics:
        out["aupro"] = result.metrics["aupro"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/monitor_models"), help="built models, reused")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    rows = ["| set | false alarms (folded / unseen) | model | unseen false-alarm rate | false-alarm rate | "
            "recall | image ROCAUC | AUPRO |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in args.sets:
        detector = model(args.root, name, args.cache)
        samples = read_samples(args.root / name)
        scores = evaluate_samples(detector, samples, per_type_pixels=False).scores
        alarms = [i for i, s in enumerate(samples) if not s.is_anomalous and scores[i] >= detector.thresholds()[0]]
        order = np.random.default_rng(0).permutation(len(alarms))
        folded = sorted(alarms[j] for j in order[: len(alarms) // 2])
        if not folded:
            rows.append(f"| {name} | {len(alarms)} | – | the default model has too few false alarms to fold in |||||")
            continue
        kept_index = [i for i in range(len(samples)) if i not in set(folded)]
        kept = [samples[i] for i in kept_index]
        unseen = {j for j, i in enumerate(kept_index) if i in set(alarms)}
        updated = detector.update([samples[i].image for i in folded])
        for label, d in (("default", detector), ("+ feedback", updated)):
            f = figures(d, kept, unseen)
            rows.append(
                f"| {name} | {len(folded)} / {len(unseen)} | {label} | {f['unseen_false_alarm_rate']:.3f} | "
                f"{f['false_alarm_rate']:.3f} | {f['recall']:.3f} | {f['image_auroc']:.3f} | "
                + (f"{f['aupro']:.3f}" if "aupro" in f else "–")
                + " |"
            )
            print(rows[-1], flush=True)
    text = "# Operator feedback (`benchmarks/feedback.py`)\n\n" + "\n".join(rows) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
