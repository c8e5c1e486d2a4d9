"""Request capture's cost and faults: the same model served with capture on and off, requests
interleaved between the two servers, then the capture location made unwritable mid-run.

    python benchmarks/bench_capture.py --requests 200 --out benchmarks/results/capture.md

Fits a model on `--data` (default: the synthetic set) into a temporary folder and serves it twice
on 127.0.0.1 (`MLFLOW_KNN_ANOMALY_THREADS` each, default 2): one with `MLFLOW_KNN_ANOMALY_CAPTURE`
set to a local folder, one without. One client sends `--requests` one-image requests to each,
alternating (so a slower moment of the machine hits both alike), and reports p50 / p95 latency of
each, the captured rows against the answered ones, then replaces the capture folder by a file and
sends `--requests` more to the capturing server: failed requests, and the rows the server counted
as lost (its log).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from mlflow_knn_anomaly import SpadeDetector, save_model
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_test, read_train
from mlflow_knn_anomaly.mlops.capture import read_capture


def serve(model: Path | str, port: int, env: dict, log: Path, cwd: Path | None = None) -> subprocess.Popen:
    """`mlflow models serve` of `model` on 127.0.0.1:`port`, its stderr in `log`, once it answers /ping."""
    args = [sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model), "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with log.open("w") as out:  # the child keeps its own descriptor
        server = subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200:
                return server
        except requests.ConnectionError:
            time.sleep(0.5)
    raise RuntimeError(f"server did not come up: {log.read_text()[-3000:]}")


def post(port: int, image: str) -> tuple[float, int]:
    body = {"dataframe_split": {"columns": ["image"], "data": [[image]]}}
    start = time.perf_counter()
    answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=120)
    return time.perf_counter() - start, answer.status_code


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(data: Path | None, n_requests: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        root = data or make_synthetic(folder / "data", seed=0, n_train=40, n_test_good=10, n_per_defect=4)
        model = folder / "model"
        save_model(SpadeDetector().fit(read_train(root)), model)
        images = [base64.b64encode(s.path.read_bytes()).decode() for s in read_test(root)]
        base = dict(os.environ, MLFLOW_KNN_ANOMALY_THREADS=str(threads))
        base["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base['PATH']}"
        location = folder / "captures"
        ports = {"off": free_port(), "on": free_port()}
        servers = {
            "off": serve(model, ports["off"], base, folder / "off.log"),
            "on": serve(model, ports["on"], dict(base, MLFLOW_KNN_ANOMALY_CAPTURE=str(location)), folder / "on.log"),
        }
        try:
            for i in range(10):  # warm-up: first predictions, the writer's first flush (pyarrow loads)
                for mode in ("off", "on"):
                    post(ports[mode], images[i % len(images)])
            time.sleep(3)
            latency = {"off": [], "on": []}
            statuses = []
            for i in range(n_requests):
                for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
                    seconds, status = post(ports[mode], images[i % len(images)])
                    latency[mode].append(seconds)
                    statuses.append(status)
            time.sleep(5)  # two flushes
            captured = len(read_capture(str(location)))
            shutil.rmtree(location)
            location.write_text("a file where the capture folder was")
            after = [post(ports["on"], images[i % len(images)])[1] for i in range(n_requests)]
            time.sleep(5)
        finally:
            for server in servers.values():
                server.terminate()
                server.wait(timeout=60)
        lost = [int(n) for n in re.findall(r"rows lost, (\d+) in all", (folder / "on.log").read_text())]
    return {
        "p50": {m: float(np.percentile(v, 50)) for m, v in latency.items()},
        "p95": {m: float(np.percentile(v, 95)) for m, v in latency.items()},
        "failed": sum(s != 200 for s in statuses),
        "answered_on": len(latency["on"]) + 10,
        "captured": captured,
        "failed_after": sum(s != 200 for s in after),
        "lost_after": max(lost, default=0),
        "sent_after": len(after),
    }


def report(figures: dict, args: argparse.Namespace) -> str:
    p50, p95 = figures["p50"], figures["p95"]
    return "\n".join([
        f"`python benchmarks/bench_capture.py --requests {args.requests} --threads {args.threads}` "
        f"({os.cpu_count()} CPUs; one client, requests alternating between the two servers after 10 each to warm up)",
        "",
        "| figure | capture off | capture on | on / off |",
        "|---|---|---|---|",
        f"| p50 latency (ms) | {1000 * p50['off']:.1f} | {1000 * p50['on']:.1f} | {p50['on'] / p50['off']:.3f} |",
        f"| p95 latency (ms) | {1000 * p95['off']:.1f} | {1000 * p95['on']:.1f} | {p95['on'] / p95['off']:.3f} |",
        "",
        "| figure | value |",
        "|---|---|",
        f"| failed requests, both servers | {figures['failed']} |",
        f"| rows answered with capture on / rows captured | {figures['answered_on']} / {figures['captured']} |",
        f"| capture folder replaced by a file: requests sent / failed | {figures['sent_after']} / "
        f"{figures['failed_after']} |",
        f"| rows the server counted as lost (its log) | {figures['lost_after']} |",
    ]) + "\n"  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    text = report(run(args.data, args.requests, args.threads), args)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
