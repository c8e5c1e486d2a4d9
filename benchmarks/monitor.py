"""Does `monitor` stay quiet on normal batches and alert on real shifts? (issue: drift monitoring)

For each shared set: the default model on train/good; 20 batches of 10 normal test images, each
drawn with its own seed (bottle has 20 normal test images, so its batches overlap); the same
batches changed as a camera or a line changes them; batches sent under the wrong category (the
images of another set: a line model's category detector is the single model, exactly); and
batches of 7 normal and 3 real anomalies. Each batch goes through `monitoring.batch_figures` and
`drift.reasons`, what the `monitor` job logs. Also the cost: monitoring time per image against
plain scoring (`predict`, segment="auto"), in the same run.

    python benchmarks/monitor.py --root ../shared/data --threads 2 --out benchmarks/results/monitor.md \
        --figures benchmarks/results/monitor.json
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.algorithm.drift import reasons
from mlflow_knn_anomaly.algorithm.images import load_image
from mlflow_knn_anomaly.config import MonitorLimits as Limits
from mlflow_knn_anomaly.evaluation.datasets import read_test, read_train
from mlflow_knn_anomaly.mlops.monitoring import batch_figures
from mlflow_knn_anomaly.runtime import configure_threads

SETS = ("mvtec_bottle", "magnetic_tile", "elpv")
WRONG = {"mvtec_bottle": "magnetic_tile", "magnetic_tile": "elpv", "elpv": "mvtec_bottle"}
N_BATCHES, BATCH = 20, 10


def jpeg(image: Image.Image, quality: int = 30) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


CHANGES = {
    "brightness -30 %": lambda im: ImageEnhance.Brightness(im).enhance(0.7),
    "brightness +30 %": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
    "blur 2 px": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "rotation 10°": lambda im: im.rotate(10, resample=Image.BILINEAR),  # corners black, as PIL fills them
    "JPEG q30": jpeg,
}


def model(root: Path, name: str, cache: Path) -> SpadeDetector:
    path = cache / name
    if path.exists():
        return SpadeDetector.load(path)
    detector = SpadeDetector(SpadeConfig()).fit(read_train(root / name))
    detector.save(path)
    return detector


def batches(paths: list[Path], seed0: int) -> list[list[Path]]:
    return [
        [paths[i] for i in np.random.default_rng(seed0 + b).choice(len(paths), BATCH, replace=False)]
        for b in range(N_BATCHES)
    ]


def measure(root: Path, cache: Path) -> dict:
    """Every batch's figures, and the cost of monitoring against plain scoring."""
    dump, cost = [], {}
    for name in SETS:
        detector = model(root, name, cache)
        samples = read_test(root / name)
        normal = [s.path for s in samples if not s.is_anomalous]
        anomalous = [s.path for s in samples if s.is_anomalous]
        wrong = [s.path for s in read_test(root / WRONG[name]) if not s.is_anomalous]
        normal_batches = batches(normal, 0)
        cases = {"normal": [[load_image(p) for p in b] for b in normal_batches]}
        for change, apply in CHANGES.items():
            cases[change] = [[apply(im) for im in b] for b in cases["normal"]]
        cases[f"wrong category ({WRONG[name]} images)"] = [[load_image(p) for p in b] for b in batches(wrong, 100)]
        rng = np.random.default_rng(7)
        cases["surge: 3 anomalies in 10"] = [
            [load_image(p) for p in b[:7]] + [load_image(anomalous[i]) for i in rng.choice(len(anomalous), 3, False)]
            for b in normal_batches
        ]
        predict_s = monitor_s = 0.0
        for case, images_of in cases.items():
            for b, images in enumerate(images_of):
                start = time.perf_counter()
                figures, _, _ = batch_figures(detector, images, Limits())
                dump.append({"set": name, "case": case, "batch": b, "n": len(images), "figures": figures})
                if case == "normal":  # interleaved, so that the machine's noise hits both alike
                    monitor_s += time.perf_counter() - start
                    start = time.perf_counter()
                    detector.predict(images, segment="auto")
                    predict_s += time.perf_counter() - start
            print(name, case, flush=True)
        n = N_BATCHES * BATCH
        cost[name] = {"predict_s_per_image": predict_s / n, "monitor_s_per_image": monitor_s / n}
    return {"batches": dump, "cost": cost}


KEYS = ("score", "brightness", "contrast", "sharpness")


def report(measured: dict, limits: Limits) -> str:
    """The tables of benchmarks/README.md, with `limits` applied to the measured figures."""
    rows = {}
    for item in measured["batches"]:
        rows.setdefault((item["set"], item["case"]), []).append(item)
    summary = ["| set | case | batches alerting | by share | by score | by brightness | by contrast | by sharpness |"
               " median score p |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    columns = " | ".join(f"{k} p (change)" for k in KEYS)
    per_batch = [
        f"| set | case | batch | alert | anomalous share | {columns} |",
        "|---|---|---|---|---|" + "---|" * len(KEYS),
    ]
    for (name, case), items in rows.items():
        why = [reasons(i["figures"], i["n"], limits) for i in items]
        by = {k: sum(any(r.startswith(k) for r in w) for w in why) for k in ("anomalous", "stage-1", *KEYS[1:])}
        summary.append(
            f"| {name} | {case} | {sum(map(bool, why))} / {len(items)} | "
            + " | ".join(str(v) for v in by.values())
            + f" | {np.median([i['figures']['score_p'] for i in items]):.1e} |"
        )
        for i, w in zip(items, why):
            f = i["figures"]
            per_batch.append(
                f"| {name} | {case} | {i['batch']} | {'yes' if w else 'no'} | {f['anomalous_share']:.1f} | "
                + " | ".join(f"{f[k + '_p']:.1e} ({f[k + '_change']:+.0%})" for k in KEYS)
                + " |"
            )
    cost = ["| set | predict s/image | monitor s/image | ratio |", "|---|---|---|---|"]
    for name, c in measured["cost"].items():
        ratio = c["monitor_s_per_image"] / c["predict_s_per_image"]
        cost.append(f"| {name} | {c['predict_s_per_image']:.3f} | {c['monitor_s_per_image']:.3f} | {ratio:.2f} |")
    head = f"# Monitoring (`benchmarks/monitor.py`)\n\n{limits}; batches of {BATCH}, {N_BATCHES} per case.\n"
    return "\n".join([head, *summary, "", "Cost, normal batches:", "", *cost, "", "Per batch:", "", *per_batch]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/monitor_models"), help="built models, reused")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--figures", type=Path, default=None, help="every batch's figures as JSON")
    parser.add_argument("--from-figures", action="store_true", help="report --figures again (no scoring)")
    args = parser.parse_args()
    configure_threads(args.threads)
    if args.from_figures:
        measured = json.loads(args.figures.read_text())
    else:
        measured = measure(args.root, args.cache)
        if args.figures:
            args.figures.write_text(json.dumps(measured))
    text = report(measured, Limits())
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
