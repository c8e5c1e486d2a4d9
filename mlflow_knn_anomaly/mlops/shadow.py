"""A challenger in the shadow: a served model scores a sample of live requests with another version,
off the request path, and logs how the two compare, so `promote` can be decided on live traffic.

Set `MLFLOW_KNN_ANOMALY_SHADOW` to the challenger's alias URI (`models:/bottle@challenger`) and
`MLFLOW_KNN_ANOMALY_SHADOW_RATE` to the share of rows it scores (default 0.1). A request only
queues its sampled rows (dropped, and counted, when the queue is full); a thread of its own loads
the challenger (following its alias like `follow.Follower`), scores the rows and, every
`LOG_ROWS` rows, logs to the experiment `<name>-shadow` (one run per server process, a step per
log): `shadow.rows`, `shadow.decision_disagreement` (the share of rows whose `is_anomalous`
differs), `shadow.score_spearman` (rank correlation of the normalized scores),
`shadow.champion_anomalous_share`, `shadow.challenger_anomalous_share` and `shadow.dropped_rows`;
the run's tags name both versions.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading

import numpy as np
from mlflow import MlflowClient
from scipy.stats import spearmanr

from ..algorithm.images import load_image
from ..algorithm.line import LineDetector
from .follow import Follower, Served, follow_seconds, parse_alias_uri

_logger = logging.getLogger(__name__)
SHADOW_VARIABLE = "MLFLOW_KNN_ANOMALY_SHADOW"
RATE_VARIABLE = "MLFLOW_KNN_ANOMALY_SHADOW_RATE"
LOG_ROWS = 20
QUEUE_ROWS = 256


def shadow_rate() -> float:
    """The share of rows the challenger scores, from `MLFLOW_KNN_ANOMALY_SHADOW_RATE` (default 0.1)."""
    text = os.environ.get(RATE_VARIABLE, "")
    try:
        rate = float(text) if text else 0.1
    except ValueError:
        rate = -1.0
    if not 0 < rate <= 1:
        raise ValueError(f"{RATE_VARIABLE}={text!r}: give the share of rows to score, in (0, 1].")
    return rate


class Shadow:
    """Scores sampled rows with the challenger and logs the comparison (see the module docstring).

    Args:
        uri: the challenger's alias URI. rate: the share of rows it scores.
        load: loads a version (`pyfunc_model.load_served`). log_rows: rows per logged step.
    """

    def __init__(self, uri: str, rate: float, load, log_rows: int = LOG_ROWS) -> None:
        self.name, self.alias = parse_alias_uri(uri)
        self.uri, self.rate, self.log_rows = uri, rate, log_rows
        self.dropped_rows = self.scored_rows = 0
        self.follower: Follower | None = None
        self._load = load
        self._queue: queue.Queue[tuple] = queue.Queue(maxsize=QUEUE_ROWS)
        self._pairs: list[tuple[bool, bool, float, float]] = []
        self._run_id: str | None = None
        self._champion = ""  # the version the rows name
        self._step = 0
        self._thread = threading.Thread(target=self._loop, name="mlflow-knn-anomaly-shadow", daemon=True)
        self._thread.start()

    def submit(self, images: list[bytes | None], rows: list[dict]) -> None:
        """Queue a sample of a request's answered rows; never raises, never waits."""
        for image, row in zip(images, rows):
            if image is None or row.get("error") or random.random() >= self.rate:
                continue
            self._champion = row.get("model_version", "")
            try:
                self._queue.put_nowait((image, row))
            except queue.Full:
                self.dropped_rows += 1

    def close(self) -> None:
        """Score and log what is queued, then stop (a test, a server's exit)."""
        self._queue.put(None)
        self._thread.join(timeout=120)

    def _loop(self) -> None:
        try:
            version = MlflowClient().get_model_version_by_alias(self.name, self.alias)
            model, category = self._load(f"models:/{self.name}/{version.version}")
            model_id = version.source.removeprefix("models:/")
            self.follower = Follower(self.uri, Served(model, "", category), model_id, self._load, follow_seconds())
            self.follower.start()
        except Exception as exc:  # noqa: BLE001 (no challenger: the champion serves on, the log says why)
            _logger.warning("mlflow-knn-anomaly: no shadow scoring, %s cannot be loaded (%s)", self.uri, exc)
            return
        while (item := self._queue.get()) is not None:
            try:
                self._score(*item)
            except Exception as exc:  # noqa: BLE001
                _logger.warning("mlflow-knn-anomaly: shadow scoring failed (%s)", exc)
        self._log()

    def _score(self, image: bytes, row: dict) -> None:
        served = self.follower.served
        model = served.model
        if isinstance(model, LineDetector):
            model = model.detector(row["category"])
        prediction = model.predict([load_image(image)], segment="none")
        self._pairs.append((bool(row["is_anomalous"]), bool(prediction.is_anomalous[0]),
                            float(row["normalized_score"]), float(prediction.normalized_scores[0])))  # fmt: skip
        self.scored_rows += 1
        if len(self._pairs) >= self.log_rows:
            self._log()

    def _log(self) -> None:
        """One step of figures over the rows scored since the last one."""
        if not self._pairs:
            return
        champion, challenger, mine, theirs = (np.array(column) for column in zip(*self._pairs))
        self._pairs = []
        rho = spearmanr(mine, theirs).statistic if len(mine) > 1 and np.ptp(mine) and np.ptp(theirs) else np.nan
        figures = {
            "shadow.rows": float(len(mine)),
            "shadow.decision_disagreement": float(np.mean(champion != challenger)),
            "shadow.score_spearman": float(rho),
            "shadow.champion_anomalous_share": float(np.mean(champion)),
            "shadow.challenger_anomalous_share": float(np.mean(challenger)),
            "shadow.dropped_rows": float(self.dropped_rows),
        }
        try:
            client = MlflowClient()
            if self._run_id is None:
                found = client.get_experiment_by_name(f"{self.name}-shadow")
                experiment = found.experiment_id if found else client.create_experiment(f"{self.name}-shadow")
                tags = {"shadow.challenger": self.follower.served.version, "shadow.champion": self._champion}
                self._run_id = client.create_run(experiment, run_name="shadow", tags=tags).info.run_id
            for key, value in figures.items():
                client.log_metric(self._run_id, key, value, step=self._step)
            self._step += 1
        except Exception as exc:  # noqa: BLE001 (a tracking server that is down loses figures, not answers)
            _logger.warning("mlflow-knn-anomaly: shadow figures not logged (%s)", exc)
