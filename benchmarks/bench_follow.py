"""Promotions under load: a server that follows `@champion` while `promote` and `rollback` move it.

    python benchmarks/bench_follow.py --moves 10 --interval 5 --out benchmarks/results/follow.md

Builds a line model of two synthetic part types in a store of its own (sqlite, in a temporary
folder), registers a second version (other settings), evaluates both, and starts
`mlflow models serve -m models:/line@champion` on 127.0.0.1 with MLFLOW_KNN_ANOMALY_FOLLOW set.
`--clients` threads send requests for the whole run, each of two good images (two categories) and
one bad row. `promote` moves `@champion` to v2, then `rollback` moves it back and forth: `--moves`
moves in all, one each `--gap` seconds. Then a third version, tampered in the store, takes the
alias. Reports failed requests, the versions the rows named, each move's delay (the move to the
first answer from the new version: at most the interval plus one load), the tampered version's
refusal, and the server's RSS (before the first move, and its peak during the swaps).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_capture import free_port, serve  # noqa: E402
from load_test import memory_mb  # noqa: E402

from mlflow_knn_anomaly import SpadeConfig  # noqa: E402
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_test  # noqa: E402
from mlflow_knn_anomaly.mlops import jobs, registry  # noqa: E402

CATEGORIES = ("disc", "ring")


@dataclass
class Traffic:
    """What the clients saw: (time, HTTP status, the versions its rows named) per request."""

    answers: list[tuple[float, int, frozenset[str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    def add(self, status: int, versions: frozenset[str]) -> None:
        with self.lock:
            self.answers.append((time.monotonic(), status, versions))


def build_store(folder: Path, size: int) -> tuple[str, Path]:
    """A store with line v1 and v2 (other settings), both evaluated; returns (tracking URI, data root)."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    root = folder / "plant"
    for seed, name in enumerate(CATEGORIES):
        make_synthetic(root / name, seed=seed, n_train=30, n_test_good=4, n_per_defect=2, size=size)
    jobs.build_bank(str(root), SpadeConfig(), "line")
    jobs.build_bank(str(root), SpadeConfig(sigma=2.0), "line")
    for version in ("1", "2"):
        jobs.evaluate(f"models:/line/{version}", str(root))
    MlflowClient().set_registered_model_alias("line", registry.CHAMPION, "1")
    return uri, root


def request_body(root: Path) -> dict:
    images = [base64.b64encode(read_test(root / c)[0].path.read_bytes()).decode() for c in CATEGORIES]
    rows = [[images[0], CATEGORIES[0]], [images[1], CATEGORIES[1]], ["bm90IGFuIGltYWdl", CATEGORIES[0]]]
    return {"dataframe_split": {"columns": ["image", "category"], "data": rows}}


def client_loop(url: str, body: dict, traffic: Traffic) -> None:
    while not traffic.stop.is_set():
        try:
            answer = requests.post(f"{url}/invocations", json=body, timeout=120)
            rows = answer.json().get("predictions", []) if answer.status_code == 200 else []
            traffic.add(answer.status_code, frozenset(r["model_version"] for r in rows))
        except requests.RequestException:
            traffic.add(0, frozenset())


def start_server(folder: Path, port: int, interval: float) -> subprocess.Popen:
    env = dict(os.environ, MLFLOW_KNN_ANOMALY_FOLLOW="models:/line@champion")
    env["MLFLOW_KNN_ANOMALY_FOLLOW_SECONDS"] = str(interval)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return serve("models:/line@champion", port, env, folder / "log", cwd=folder)


def first_answer_from(traffic: Traffic, version: str, since: float, limit: float) -> float | None:
    """Seconds from `since` to the first answer whose rows all name `version` (None within `limit`)."""
    deadline = since + limit
    while time.monotonic() < deadline:
        with traffic.lock:
            hits = [t for t, status, names in traffic.answers if t > since and names == {version}]
        if hits:
            return min(hits) - since
        time.sleep(0.05)
    return None


def move_alias(moves: int, gap: float, interval: float, traffic: Traffic) -> list[tuple[str, str, float | None]]:
    """promote v2, then rollbacks: (what, the version the alias names, the delay to its first answer)."""
    done = []
    for move in range(moves):
        start = time.monotonic()
        decision = (registry.promote("line", "2", "image_auroc", min_delta=-1.0) if move == 0
                    else registry.rollback("line"))  # fmt: skip
        target = f"line/{decision.candidate}"
        delay = first_answer_from(traffic, target, start, limit=interval + 120)
        done.append(("promote" if move == 0 else "rollback", target, delay))
        time.sleep(max(0.0, gap - (time.monotonic() - start)))
    return done


def tampered_version(root: Path, traffic: Traffic, interval: float) -> tuple[str, str]:
    """Register v3, flip a byte of its bank in the store, point the alias at it; (version, what served)."""
    _, version = jobs.build_bank(str(root), SpadeConfig(sigma=3.0), "line")
    local = Path(MlflowClient().get_model_version_download_uri("line", version).removeprefix("file://"))
    target = next(local.rglob("map_*.npy"))
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    MlflowClient().set_registered_model_alias("line", registry.CHAMPION, version)
    time.sleep(3 * interval)
    with traffic.lock:
        last = traffic.answers[-1][2]
    return version, ",".join(sorted(last))


def watch_memory(pid: int, traffic: Traffic, peaks: list[float]) -> None:
    while not traffic.stop.is_set():
        peaks.append(memory_mb(pid)[0])
        time.sleep(0.2)


def run(moves: int, interval: float, gap: float, clients: int, size: int) -> dict:
    """The whole scenario; returns its figures (the store is this call's: the tracking URI is reset after)."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        return _scenario(moves, interval, gap, clients, size)
    finally:
        mlflow.set_tracking_uri(saved)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _scenario(moves: int, interval: float, gap: float, clients: int, size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _, root = build_store(folder, size)
        port = free_port()
        server = start_server(folder, port, interval)
        traffic, rss = Traffic(), []
        threads = [threading.Thread(target=client_loop, args=(f"http://127.0.0.1:{port}", request_body(root),
                                                              traffic)) for _ in range(clients)]  # fmt: skip
        try:
            for thread in threads:
                thread.start()
            time.sleep(3)
            baseline = memory_mb(server.pid)[0]
            watcher = threading.Thread(target=watch_memory, args=(server.pid, traffic, rss))
            watcher.start()
            moved = move_alias(moves, gap, interval, traffic)
            tampered, serving_after = tampered_version(root, traffic, interval)
        finally:
            traffic.stop.set()
            for thread in threads:
                thread.join()
            server.terminate()
            server.wait(timeout=60)
        log = (folder / "log").read_text()
    statuses = [status for _, status, _ in traffic.answers]
    return {
        "requests": len(statuses),
        "failed": sum(status != 200 for status in statuses),
        "versions": sorted({v for _, _, names in traffic.answers for v in names}),
        "mixed_answers": sum(len(names) > 1 for _, _, names in traffic.answers),
        "moves": moved,
        "tampered": tampered,
        "serving_after_tamper": serving_after,
        "refusal_logged": f"refused models:/line/{tampered}" in log,
        "load_seconds": [float(s) for s in re.findall(r"loaded and verified in ([\d.]+) s", log)],
        "rss_baseline_mb": baseline,
        "rss_peak_mb": max(rss, default=baseline),
    }


def report(figures: dict, args: argparse.Namespace) -> str:
    delays = [d for _, _, d in figures["moves"] if d is not None]
    lines = [
        f"`python benchmarks/bench_follow.py --moves {args.moves} --interval {args.interval} --gap {args.gap} "
        f"--clients {args.clients}` ({os.cpu_count()} CPUs)",
        "",
        "| figure | value |",
        "|---|---|",
        f"| requests (3 rows each: 2 categories, 1 bad row) | {figures['requests']} |",
        f"| failed requests | {figures['failed']} |",
        f"| versions the rows named | {', '.join(figures['versions'])} |",
        f"| requests answered by more than one version | {figures['mixed_answers']} |",
        f"| moves served (of {len(figures['moves'])}) | {len(delays)} |",
        f"| delay from a move to its first answer, max / mean (s) | {max(delays):.1f} / "
        f"{sum(delays) / len(delays):.1f} (interval {args.interval} s) |",
        f"| a version's download, load and check in the server, max (s) | "
        f"{max(figures['load_seconds'], default=0):.1f} |",
        f"| tampered v{figures['tampered']}: refused in the log / serving after it | "
        f"{figures['refusal_logged']} / {figures['serving_after_tamper']} |",
        f"| server RSS before the moves / peak during them (MB) | {figures['rss_baseline_mb']:.0f} / "
        f"{figures['rss_peak_mb']:.0f} ({figures['rss_peak_mb'] / figures['rss_baseline_mb']:.2f}x) |",
        "",
        "| move | alias names | delay to its first answer (s) |",
        "|---|---|---|",
        *(f"| {what} | {target} | {'-' if d is None else f'{d:.1f}'} |" for what, target, d in figures["moves"]),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--moves", type=int, default=10)
    parser.add_argument("--interval", type=float, default=5.0, help="MLFLOW_KNN_ANOMALY_FOLLOW_SECONDS")
    parser.add_argument("--gap", type=float, default=15.0, help="seconds between two moves")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--size", type=int, default=256, help="the synthetic images' side")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = report(run(args.moves, args.interval, args.gap, args.clients, args.size), args)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
