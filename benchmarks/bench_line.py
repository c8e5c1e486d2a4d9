"""One line model against one model per part type: correctness, memory, start-up, latency, updates.

    python benchmarks/bench_line.py --root ../shared/data --threads 2

Every subfolder of --root with a train/good is a category (the five shared sets). It builds the
line model through the `build_bank` job (a sqlite store in --workdir), then one single-category
model per folder with the same settings, and reports:
- correctness: per category, the largest difference of scores, maps and calibration between the
  line and the single model, in-process (every test image, segment="all") and through
  `mlflow models serve` (one request mixing every category, one unknown category, one bad image);
- memory and start-up: the line served by one `mlflow models serve`, against one server per
  category: RSS and PSS of every server process (PSS splits pages shared between processes),
  time from start to the first answer, and the line's RSS after requests touching 1, then all
  categories;
- latency: per-image p50 / p95 of requests of one image per category (mixed) to the line, against
  the same images sent one by one to their single servers, in alternating rounds; the noise is
  the p50 difference between the two halves of the single servers' own rounds;
- updates: `remove_category` then `add_category` of one category against the full build, and the
  sha256 of the untouched categories' files before and after.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import requests

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector, save_model
from mlflow_knn_anomaly.algorithm.artifacts import sha256
from mlflow_knn_anomaly.evaluation.datasets import find_categories, read_test, read_train
from mlflow_knn_anomaly.mlops import jobs, line_jobs
from mlflow_knn_anomaly.runtime import THREADS_ENV, configure_threads


def rss_pss_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MB of a process and all its descendants (/proc/<pid>/smaps_rollup)."""
    rss = pss = 0.0
    for p in [pid, *_descendants(pid)]:
        try:
            text = Path(f"/proc/{p}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = {line.split(":")[0]: line.split()[1] for line in text.splitlines()[1:]}
        rss += int(fields["Rss"]) / 1024
        pss += int(fields["Pss"]) / 1024
    return rss, pss


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found


class Server:
    """`mlflow models serve` of one model on a free port; `started` to the first answer."""

    def __init__(self, model: Path, port: int, threads: int, probe: dict) -> None:
        env = dict(os.environ, **{THREADS_ENV: str(threads)})
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        self.url = f"http://127.0.0.1:{port}/invocations"
        start = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        while True:
            try:
                if self.post(probe).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
            if self.process.poll() is not None or time.perf_counter() - start > 300:
                raise RuntimeError(f"the server of {model} did not answer")
        self.first_answer_s = time.perf_counter() - start

    def post(self, rows: dict, params: dict | None = None) -> requests.Response:
        payload = {"dataframe_split": {"columns": list(rows), "data": [list(r) for r in zip(*rows.values())]}}
        if params:
            payload["params"] = params
        return requests.post(self.url, json=payload, timeout=300)

    def memory(self) -> tuple[float, float]:
        return rss_pss_mb(self.process.pid)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(timeout=60)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def category_files(model: Path, category: str) -> dict[str, str]:
    folder = model / "data" / "line" / "categories" / category
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def local_model(uri: str) -> Path:
    return Path(mlflow.artifacts.download_artifacts(uri))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_line"))
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds (each: one image per category)")
    parser.add_argument("--update", default="mvtec_bottle", help="the category removed and added again")
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    mlflow.set_tracking_uri(f"sqlite:///{args.workdir / 'mlflow.db'}")
    folders, _ = find_categories(args.root)
    config = SpadeConfig()
    print(f"{len(folders)} categories {list(folders)}, {threads} threads, default settings\n")

    # ---- builds and updates (the jobs, as `mlflow run` runs them) ------------------------------
    start = time.perf_counter()
    jobs.build_bank(str(args.root), config, "line")
    full_s = time.perf_counter() - start
    start = time.perf_counter()
    line_jobs.remove_category("models:/line/1", args.update)
    remove_s = time.perf_counter() - start
    start = time.perf_counter()
    line_jobs.add_category("models:/line/2", str(folders[args.update]), args.update)
    add_s = time.perf_counter() - start
    models = {v: local_model(f"models:/line/{v}") for v in (1, 2, 3)}
    untouched = [c for c in folders if c != args.update]
    same = all(category_files(models[2], c) == category_files(models[3], c) for c in untouched)
    same_all = all(category_files(models[1], c) == category_files(models[3], c) for c in folders)
    print("| job | seconds |\n|---|---|")
    print(f"| build_bank, the whole line ({len(folders)} categories) | {full_s:.1f} |")
    print(f"| remove_category {args.update} | {remove_s:.1f} |")
    print(f"| add_category {args.update} | {add_s:.1f} ({add_s / full_s:.2f}x the full build) |")
    print(f"\nuntouched categories byte-identical after add_category (sha256 of every file): {same}")
    print(f"every category of version 3 byte-identical to version 1 (the re-added one rebuilt): {same_all}\n")

    # ---- correctness in-process ----------------------------------------------------------------
    line = jobs.load_model("models:/line/1")
    singles = {}
    print(
        "| category | test images | max abs score diff | max abs map diff | calibration equal |\n|---|---|---|---|---|"
    )
    for name, folder in folders.items():
        single = SpadeDetector(config).fit(read_train(folder))
        save_model(single, args.workdir / f"single-{name}", category=name)
        singles[name] = args.workdir / f"single-{name}"
        images = [s.path for s in read_test(folder)]
        a, b = line.detector(name).predict(images, segment="all"), single.predict(images, segment="all")
        map_diff = max(float(np.abs(x - y).max()) for x, y in zip(a.anomaly_maps, b.anomaly_maps))
        masks_equal = all((x == y).all() for x, y in zip(a.masks, b.masks))
        equal = line.detector(name).calibration == single.calibration
        print(f"| {name} | {len(images)} | {np.abs(a.scores - b.scores).max():.2e} | {map_diff:.2e} "
              f"| {equal} (masks equal: {masks_equal}) |")  # fmt: skip
    del line

    # ---- serving: start-up, memory, a mixed request --------------------------------------------
    examples = {name: read_test(folder) for name, folder in folders.items()}
    probe = {n: {"image": [b64(examples[n][0].path)], "category": [n]} for n in folders}
    port = 5600
    line_server = Server(models[1], port, threads, probe[next(iter(folders))])
    after_one = line_server.memory()
    line_server.post({"image": [b64(s[0].path) for s in examples.values()], "category": list(folders)})
    after_all = line_server.memory()
    single_servers = {n: Server(path, port + 1 + i, threads, probe[n]) for i, (n, path) in enumerate(singles.items())}
    single_mem = [s.memory() for s in single_servers.values()]
    print("\n| serving | processes | RSS MB | PSS MB | first answer s |\n|---|---|---|---|---|")
    print(f"| line model, after a request of 1 category | 1 server | {after_one[0]:.0f} | {after_one[1]:.0f} "
          f"| {line_server.first_answer_s:.1f} |")  # fmt: skip
    print(
        f"| line model, after requests of all {len(folders)} | 1 server | {after_all[0]:.0f} | {after_all[1]:.0f} | |"
    )
    print(f"| one model per category | {len(folders)} servers | {sum(m[0] for m in single_mem):.0f} "
          f"| {sum(m[1] for m in single_mem):.0f} | {sum(s.first_answer_s for s in single_servers.values()):.1f} "
          f"(sum; each {', '.join(f'{s.first_answer_s:.1f}' for s in single_servers.values())}) |")  # fmt: skip

    # one request: every category (an anomalous image each), an unknown category and a bad image
    picks = {n: next(s for s in e if s.is_anomalous) for n, e in examples.items()}
    rows = {"image": [b64(p.path) for p in picks.values()] + [b64(picks[next(iter(folders))].path), "bm90IGFuIGltYWdl"],
            "category": [*picks, "unknown_part", next(iter(folders))]}  # fmt: skip
    out = line_server.post(rows, {"segment": "all"}).json()["predictions"]
    worst = 0.0
    for row, (name, pick) in zip(out, picks.items()):
        ref = single_servers[name].post({"image": [b64(pick.path)]}, {"segment": "all"}).json()["predictions"][0]
        worst = max(worst, abs(row["score"] - ref["score"]))
        assert row["mask"] == ref["mask"], name
    print(f"\nmixed request over REST: max abs score diff to the single servers {worst:.2e}, masks identical; "
          f"unknown category -> {out[-2]['error']!r}; bad image -> {out[-1]['error']!r}")  # fmt: skip

    # ---- latency: alternating rounds, one image per category ------------------------------------
    line_ms, line_one_ms, single_ms = [], [], []
    orders = (("line", "one", "single"), ("single", "one", "line"), ("one", "line", "single"))
    for r in range(args.rounds):
        batch = {n: e[(r + 1) % len(e)].path for n, e in examples.items()}
        for who in orders[r % 3]:
            if who == "line":
                start = time.perf_counter()
                line_server.post({"image": [b64(p) for p in batch.values()], "category": list(batch)})
                line_ms.append(1000 * (time.perf_counter() - start) / len(batch))
                continue
            for n, p in batch.items():
                server = single_servers[n] if who == "single" else line_server
                start = time.perf_counter()
                server.post({"image": [b64(p)], "category": [n]})
                (single_ms if who == "single" else line_one_ms).append(1000 * (time.perf_counter() - start))
    line_ms, line_one_ms, single_ms = np.array(line_ms), np.array(line_one_ms), np.array(single_ms)
    half = len(single_ms) // 2
    noise = abs(np.median(single_ms[:half]) - np.median(single_ms[half:]))
    print("\n| per image (REST, decoding included) | p50 ms | p95 ms |\n|---|---|---|")
    for label, values in (
        (f"line model, mixed requests of {len(folders)} images", line_ms),
        ("line model, one image per request", line_one_ms),
        ("single models, one image per request", single_ms),
    ):
        print(f"| {label} | {np.median(values):.1f} | {np.percentile(values, 95):.1f} |")
    print(f"\nnoise (p50 of the single servers' first half of rounds against their second half): {noise:.1f} ms")
    for server in [line_server, *single_servers.values()]:
        server.stop()


if __name__ == "__main__":
    main()
