"""mlflow-knn-anomaly: SPADE two-stage kNN anomaly detection as an MLflow model."""

from .config import SpadeConfig
from .line import LineDetector
from .regions import Region, decode_regions
from .spade import Prediction, SpadeDetector
from .version import __version__

__all__ = ["LineDetector", "Prediction", "Region", "SpadeConfig", "SpadeDetector", "__version__", "decode_regions"]


def __getattr__(name: str):
    # The MLflow surface is imported lazily so that the algorithm never needs mlflow at import.
    if name in ("log_model", "save_model", "load_model", "decode_mask", "decode_anomaly_map"):
        from . import pyfunc_model

        return getattr(pyfunc_model, name)
    raise AttributeError(f"module 'mlflow_knn_anomaly' has no attribute {name!r}")
