"""mlflow-knn-anomaly: SPADE two-stage kNN anomaly detection as an MLflow model."""

from .config import SpadeConfig
from .spade import Prediction, SpadeDetector
from .version import __version__

__all__ = ["Prediction", "SpadeConfig", "SpadeDetector", "__version__"]


def __getattr__(name: str):
    # The MLflow surface is imported lazily so that the algorithm never needs mlflow at import.
    if name in ("log_model", "save_model", "load_model", "decode_mask", "decode_anomaly_map"):
        from . import pyfunc_model

        return getattr(pyfunc_model, name)
    raise AttributeError(f"module 'mlflow_knn_anomaly' has no attribute {name!r}")
