"""Thread sizing: use the cores that are actually free, not every core the machine has."""

from __future__ import annotations

import os

import torch


def free_cores() -> int:
    """Cores not busy with other work right now (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, round(cores - os.getloadavg()[0])))


def configure_threads(threads: int | None = None, workers: int = 1) -> int:
    """Set torch's and faiss's thread counts: `threads`, else free cores shared among `workers`.

    Oversubscribed threads on a busy machine ran 3-10x slower than one thread here.
    """
    import faiss

    env = os.environ.get("MLFLOW_KNN_ANOMALY_THREADS")
    n = threads or (int(env) if env else max(1, free_cores() // max(1, workers)))
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    return n
