"""mlflow-knn-anomaly: SPADE two-stage kNN anomaly detection as an MLflow model."""

from .config import SpadeConfig
from .spade import Prediction, SpadeDetector

__all__ = ["Prediction", "SpadeConfig", "SpadeDetector"]
__version__ = "0.1.0"
