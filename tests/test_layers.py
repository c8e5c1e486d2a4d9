"""The package's folders are its layers: the algorithm and the evaluation layers never load MLflow."""

import subprocess
import sys

CHECK = """
import importlib, pkgutil, sys
import mlflow_knn_anomaly.algorithm as algorithm, mlflow_knn_anomaly.evaluation as evaluation
names = [m.name for p in (algorithm, evaluation) for m in pkgutil.iter_modules(p.__path__, p.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(len(names), sorted(n for n in ("mlflow", "click", "pyspark") if n in sys.modules))
"""


def test_the_algorithm_and_evaluation_layers_import_neither_mlflow_nor_click():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True)
    count, loaded = out.stdout.split(" ", 1)
    assert int(count) >= 20 and loaded.strip() == "[]", out.stdout
