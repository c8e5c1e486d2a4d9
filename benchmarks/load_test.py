"""Load test of `mlflow models serve` on loopback: concurrent clients for a bounded time.

    python benchmarks/load_test.py --model-uri models:/spade-anomaly@champion --workers 1 --clients 4 --seconds 60

Starts the server itself (127.0.0.1 only), sends real images (base64, one per request) from
`--data` (default: the synthetic set) with `--segment`, and reports requests/s, latency
p50/p95/p99, errors, the server's memory (RSS and PSS summed over its processes; PSS counts
shared, memory-mapped bank pages once) after a warm-up under the same load and at the end, and
how each worker sized its threads (the model's own log line: MLFLOW_KNN_ANOMALY_THREADS unset,
the free cores are shared among the workers).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_test


def _tree(pid: int) -> list[int]:
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) in MB summed over the process tree."""
    rss = pss = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            continue
    return rss / 1024, pss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-uri", required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--segment", default="auto", choices=["auto", "all", "none"])
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of the same load before measuring")
    parser.add_argument("--data", type=Path, default=None)
    args = parser.parse_args()

    root = args.data or make_synthetic(Path("/tmp/mka-synthetic"), seed=0)
    images = [base64.b64encode(s.path.read_bytes()).decode() for s in read_test(root)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"
    with tempfile.TemporaryFile() as log:  # the server's output, for its thread-sizing lines
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", args.model_uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port), "--workers", str(args.workers)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if requests.get(f"{url}/ping", timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    time.sleep(0.5)

            def run_clients(seconds: float) -> tuple[list[float], int]:
                latencies: list[float] = []
                errors = [0]
                lock = threading.Lock()
                deadline = time.perf_counter() + seconds

                def client(offset: int) -> None:
                    session = requests.Session()
                    i = offset
                    while time.perf_counter() < deadline:
                        payload = {
                            "dataframe_split": {"columns": ["image"], "data": [[images[i % len(images)]]]},
                            "params": {"segment": args.segment},
                        }
                        t = time.perf_counter()
                        try:
                            response = session.post(f"{url}/invocations", json=payload, timeout=120)
                            ok = response.status_code == 200 and response.json()["predictions"][0]["error"] == ""
                        except requests.RequestException:
                            ok = False
                        with lock:
                            latencies.append(time.perf_counter() - t)
                            errors[0] += 0 if ok else 1
                        i += args.clients

                threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                return latencies, errors[0]

            # Warm up with the same load: lazy initialisation and the allocator's per-thread pools
            # settle here, so that the measured growth is what a long-running server would show.
            run_clients(args.warmup)
            rss0, pss0 = memory_mb(server.pid)
            start = time.perf_counter()
            latencies, errors = run_clients(args.seconds)
            elapsed = time.perf_counter() - start
            rss1, pss1 = memory_mb(server.pid)
            p50, p95, p99 = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
            print(
                f"workers={args.workers} clients={args.clients} segment={args.segment} seconds={elapsed:.0f} "
                f"requests={len(latencies)} req/s={len(latencies) / elapsed:.2f} p50={p50:.0f}ms p95={p95:.0f}ms "
                f"p99={p99:.0f}ms errors={errors} rss_mb={rss0:.0f}->{rss1:.0f} ({100 * (rss1 / rss0 - 1):+.1f}%) "
                f"pss_mb={pss0:.0f}->{pss1:.0f}"
            )
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.seek(0)
            for line in re.findall(r"mlflow-knn-anomaly: .*", log.read().decode(errors="replace")):
                print(line)


if __name__ == "__main__":
    main()
