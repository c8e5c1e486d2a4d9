"""Thread sizing: use the cores that are actually free, shared among a server's worker processes.

torch and faiss are imported where they are used, so that the CLI can import this module and
answer --help without them.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

THREADS_ENV = "MLFLOW_KNN_ANOMALY_THREADS"
SAMPLE_SECONDS = 0.2  # how long `free_cores` watches the CPUs
PROC_STAT = Path("/proc/stat")


def free_cores() -> int:
    """Cores not busy with other work right now (at least 1, at most those this process may use).

    Linux: the CPUs' idle share over `SAMPLE_SECONDS` (/proc/stat). The load average would not do:
    it is a minute's average, and it counts this process's own work, so a job that loads a model
    after a minute of computing (or starts right after another job) would see its own load and take
    one thread on a free machine. Elsewhere: the cores less the load average.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    idle = _idle_cpus(SAMPLE_SECONDS)
    free = cores - os.getloadavg()[0] if idle is None else idle
    return max(1, min(cores, round(free)))


def _idle_cpus(seconds: float) -> float | None:
    """How many CPUs sat idle, on average, over the next `seconds` (None without /proc/stat)."""
    try:
        before = PROC_STAT.read_text()
        time.sleep(seconds)
        return idle_cpus(before, PROC_STAT.read_text())
    except OSError:
        return None


def idle_cpus(before: str, after: str) -> float | None:
    """The CPUs idle on average between two readings of /proc/stat (None if they cannot tell)."""
    try:
        counts = [[int(v) for v in text.splitlines()[0].split()[1:9]] for text in (before, after)]
    except (ValueError, IndexError):
        return None
    delta = [b - a for a, b in zip(*counts)]  # user nice system idle iowait irq softirq steal
    cpus = len(re.findall(r"^cpu\d", after, flags=re.M))
    total = sum(delta)
    return None if total <= 0 or len(delta) < 5 else cpus * (delta[3] + delta[4]) / total


def configure_threads(threads: int | None = None, workers: int = 1) -> int:
    """Set torch's and faiss's thread counts: `threads`, else free cores shared among `workers`.

    Oversubscribed threads on a busy machine ran 3-10x slower than one thread here.
    MLFLOW_KNN_ANOMALY_THREADS, when set, wins over both.
    """
    import faiss
    import torch

    env = os.environ.get(THREADS_ENV)
    n = threads or (int(env) if env else max(1, free_cores() // max(1, workers)))
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    return n


@contextmanager
def threads_kept() -> Iterator[None]:
    """Restore torch's and faiss's thread counts on exit. MLflow validates a logged model's serving
    input by loading it, and the loader sizes threads for serving; a build that logs a model must not
    change how the rest of its process computes (features summed with another thread count differ
    in the last bits)."""
    import faiss
    import torch

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)


def resolve_device(device: str):
    """ "auto" -> CUDA when available, else CPU; "cuda" without a GPU is an error that says so."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA GPU here; use device='auto' or 'cpu'.")
    return torch.device(device)


def server_workers() -> int:
    """How many server processes share the machine with this one.

    `mlflow models serve -w N` (or its env var MLFLOW_MODELS_WORKERS) starts `uvicorn --workers N`;
    uvicorn then ignores WEB_CONCURRENCY, and its workers are children of the process whose
    command line holds N. So: `--workers N` on this process's or its parent's command line, else
    MLFLOW_MODELS_WORKERS (MLflow's container reads it too), else WEB_CONCURRENCY, else 1.
    """
    for pid in ("self", str(os.getppid())):
        found = _workers_flag(_cmdline(pid))
        if found:
            return found
    for name in ("MLFLOW_MODELS_WORKERS", "WEB_CONCURRENCY"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def _cmdline(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # not Linux, or the parent is gone
        return []


def _workers_flag(args: list[str]) -> int | None:
    for i, arg in enumerate(args):
        value = arg.partition("=")[2] if arg.startswith("--workers=") else None
        if arg == "--workers" and i + 1 < len(args):
            value = args[i + 1]
        if value is not None and re.fullmatch(r"\d+", value) and int(value) > 0:
            return int(value)
    return None
