"""The loader module that models saved before 0.6.0 name in their MLmodel
(`loader_module: mlflow_knn_anomaly.pyfunc_model`): they load with today's code, which reads every
earlier model format. The flavor itself is `mlops.pyfunc_model`."""

from .mlops.pyfunc_model import _load_pyfunc  # noqa: F401
