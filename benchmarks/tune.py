"""`tune` on the five shared sets: default against tuned on the test split, the settings chosen,
the bootstrap win rate and the time; and the same with only a few validation defects (scarcity).

Each set is tuned by the job itself (`tune_job.tune`, its seeded 30 / 70 split, a sqlite store of
its own), so the figures are the version tags `tune.default.*` / `tune.tuned.*`. The tuning time
is set against one default build of the same set (the default candidate's own build). Scarcity:
the validation split keeps only N of its defects (drawn with a seed, the normal images all kept)
and the test split is the same 70 %; the data then goes in as `validation=FOLDER2`.

    python benchmarks/tune.py --root ../shared/data --threads 2 --out benchmarks/results/tune.md
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

from mlflow_knn_anomaly.evaluation import tuning
from mlflow_knn_anomaly.mlops import tune_job
from mlflow_knn_anomaly.runtime import configure_threads

SETS = ("mvtec_bottle", "magnetic_tile", "mpdd_metal_plate", "mvtec_transistor", "elpv")
SCARCE = ("mvtec_bottle", "mpdd_metal_plate")
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def run_tune(data: Path, store: Path, validation: Path | None = None) -> dict:
    uri = f"sqlite:///{store}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("tune")
    result = tune_job.tune(str(data), data.name, validation=None if validation is None else str(validation))
    client = MlflowClient()
    tags = client.get_model_version(data.name, result["version"]).tags
    runs = client.search_runs([mlflow.get_experiment_by_name("tune").experiment_id])
    default_build = next(r for r in runs if r.data.params.get("is_default") == "True").data.metrics["build_seconds"]
    return {**result, "tags": tags, "default_build_seconds": default_build}


def scarce_copy(root: Path, target: Path, n_defects: int, seed: int = 0) -> tuple[Path, Path]:
    """(data, validation): links to train/ and the 70 % test split, and to the validation split
    with only `n_defects` of its defects."""
    split = tuning.split_test(root, 0.3, seed=0)
    data, validation = target / root.name, target / "validation" / root.name
    (data / "train").mkdir(parents=True)
    (data / "train" / "good").symlink_to((root / "train" / "good").resolve(), target_is_directory=True)
    defects = [s for s in split.validation if s.is_anomalous]
    keep = {defects[i].path for i in np.random.default_rng(seed).choice(len(defects), n_defects, replace=False)}
    chosen = [s for s in split.validation if not s.is_anomalous or s.path in keep]
    for base, samples in ((data, split.test), (validation, chosen)):
        (base / "train" / "good").mkdir(parents=True, exist_ok=True)
        for s in samples:
            _link(s.path, base / "test" / s.defect_type / s.path.name)
            if s.mask_path is not None:
                _link(s.mask_path, base / "ground_truth" / s.defect_type / s.mask_path.name)
    return data, validation


def _link(source: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(source.resolve())


def row(name: str, label: str, out: dict) -> str:
    tags, cells = out["tags"], []
    for m in METRICS:
        d, t = tags.get(f"tune.default.{m}"), tags.get(f"tune.tuned.{m}")
        cells.append("–" if d is None else f"{float(d):.3f} → {float(t):.3f}")
    settings = json.loads(tags["tune.settings"])
    ratio = float(tags["tune.seconds"]) / out["default_build_seconds"]
    search = float(tags.get("tune.search_seconds", "nan"))
    return (
        f"| {name} | {label} | {tags['tune.validation.validation_defects']} / "
        f"{tags['tune.validation.validation_normal']} | " + " | ".join(cells) + f" | {settings['resize']}, pool "
        f"{settings['feature_pool']}, {settings['score_fusion']} | {tags['tune.win_rate']} | "
        f"{float(tags['tune.seconds']):.0f} s ({ratio:.1f}x a build; search {search:.0f} s, "
        f"{search / out['default_build_seconds']:.1f}x) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sets", nargs="+", default=list(SETS))
    parser.add_argument("--scarce", nargs="*", default=list(SCARCE))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    head = ("| set | validation | defects / normal in validation | image ROCAUC default → tuned | pixel ROCAUC | "
            "AUPRO | chosen (resize, pool, fusion) | win rate | tune time |")  # fmt: skip
    rows = [head, "|---|---|---|---|---|---|---|---|---|"]
    means, reasons = {m: ([], []) for m in METRICS}, []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            out = run_tune(args.root / name, Path(tmp) / f"{name}.db")
            rows.append(row(name, "30 %", out))
            reasons.append(f"- {name}: {out['tags']['tune.reason']}")
            print(rows[-1], reasons[-1], flush=True)
            for m in METRICS:
                if f"tune.default.{m}" in out["tags"]:
                    means[m][0].append(float(out["tags"][f"tune.default.{m}"]))
                    means[m][1].append(float(out["tags"][f"tune.tuned.{m}"]))
        for name in args.scarce:
            for n in (5, 10):
                data, validation = scarce_copy(args.root / name, Path(tmp) / f"{name}-{n}", n)
                out = run_tune(data, Path(tmp) / f"{name}-{n}.db", validation)
                rows.append(row(name, f"{n} defects", out))
                reasons.append(f"- {name}, {n} validation defects: {out['tags']['tune.reason']}")
                print(rows[-1], reasons[-1], flush=True)
    mean = " | ".join(f"{np.mean(d):.4f} → {np.mean(t):.4f} (n={len(d)})" for d, t in means.values())
    text = "# Tuning (`benchmarks/tune.py`)\n\n" + "\n".join(rows) + f"\n\nMeans over the sets: {mean}\n\n"
    text += "Why:\n\n" + "\n".join(reasons) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
