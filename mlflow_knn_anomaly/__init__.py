"""mlflow-knn-anomaly: SPADE two-stage kNN anomaly detection as an MLflow model.

The public names are imported on first use (PEP 562), so that `import mlflow_knn_anomaly.cli` and
`mlflow-knn-anomaly --help` need neither torch nor MLflow.
"""

from importlib import import_module

from .version import __version__

_PUBLIC = {
    "SpadeConfig": "config",
    "LineDetector": "algorithm.line",
    "Region": "algorithm.regions",
    "decode_regions": "algorithm.regions",
    "Prediction": "algorithm.spade",
    "SpadeDetector": "algorithm.spade",
    # the MLflow surface: the algorithm never needs mlflow at import
    "log_model": "mlops.pyfunc_model",
    "save_model": "mlops.pyfunc_model",
    "load_model": "mlops.pyfunc_model",
    "decode_mask": "mlops.pyfunc_model",
    "decode_anomaly_map": "mlops.pyfunc_model",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'mlflow_knn_anomaly' has no attribute {name!r}")
