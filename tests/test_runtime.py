import os
import sys

import pytest

from mlflow_knn_anomaly import runtime

BEFORE = "cpu  100 0 50 1000 10 0 0 0 0 0\ncpu0 50 0 25 500 5 0 0 0 0 0\ncpu1 50 0 25 500 5 0 0 0 0 0\nintr 1\n"
AFTER = "cpu  250 0 50 1040 20 0 0 0 0 0\ncpu0 ...\ncpu1 ...\nintr 2\n"  # 150 busy, 50 idle + iowait


def test_idle_cpus_reads_the_idle_share_of_two_proc_stat_readings():
    assert runtime.idle_cpus(BEFORE, AFTER) == pytest.approx(2 * 50 / 200)
    assert runtime.idle_cpus(BEFORE, BEFORE) is None  # no time passed: nothing to tell
    assert runtime.idle_cpus("", AFTER) is None


def test_free_cores_counts_idle_cpus_not_the_load_average_of_this_process(monkeypatch):
    # A job that computed for a minute has a load average of its own cores: it must not size itself from it.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    monkeypatch.setattr(os, "getloadavg", lambda: (float(cores), float(cores), float(cores)))
    monkeypatch.setattr(runtime, "_idle_cpus", lambda seconds: float(cores) - 0.2)
    assert runtime.free_cores() == cores
    monkeypatch.setattr(runtime, "_idle_cpus", lambda seconds: None)  # no /proc/stat: the load average
    assert runtime.free_cores() == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/stat is Linux's")
def test_idle_cpus_samples_this_machine():
    idle = runtime._idle_cpus(0.05)
    assert idle is not None and 0.0 <= idle <= os.cpu_count()
