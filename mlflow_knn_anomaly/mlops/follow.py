"""A served model that follows a registry alias: promotions reach a running server.

Set `MLFLOW_KNN_ANOMALY_FOLLOW` to an alias URI (`models:/bottle@champion`) in the server's
environment; every `MLFLOW_KNN_ANOMALY_FOLLOW_SECONDS` (default 30) a background thread asks the
registry (the tracking and registry URIs come from the environment, as for any MLflow client)
which version the alias names. A new version is loaded beside the one serving, verified (the sha256
of every artifact, as at any load) and swapped in between requests: a request reads the serving
version once, so one version answers it whole. A version that cannot be loaded or verified, is of
another flavor, or drops a category that requests have used, is refused: the old version keeps
serving and a WARNING log line says why. So does a check that cannot reach the registry.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field

from mlflow import MlflowClient

from ..algorithm.line import LineDetector
from ..algorithm.spade import SpadeDetector

_logger = logging.getLogger(__name__)
FOLLOW_VARIABLE = "MLFLOW_KNN_ANOMALY_FOLLOW"
SECONDS_VARIABLE = "MLFLOW_KNN_ANOMALY_FOLLOW_SECONDS"
DEFAULT_SECONDS = 30.0
REFUSED_TAG = "serving.refused"  # on a version a following server refused: why


@dataclass(frozen=True)
class Served:
    """The model answering requests, and the version its rows name (`bottle/3`, or a model id)."""

    model: SpadeDetector | LineDetector
    version: str
    category: str | None = None


@dataclass
class FollowStatus:
    """What the follower did: checks made, swaps, refusals, and the last problem (for logs and tests)."""

    checks: int = 0
    swaps: int = 0
    refused: int = 0
    failed_checks: int = 0
    last_problem: str = ""
    refused_versions: set[str] = field(default_factory=set)


def parse_alias_uri(uri: str) -> tuple[str, str]:
    """(registered name, alias) of `models:/NAME@ALIAS`.

    Raises:
        ValueError: any other form, with the form to use.
    """
    body = uri[len("models:/") :] if uri.startswith("models:/") else ""
    name, at, alias = body.partition("@")
    if not (name and at and alias) or "/" in alias:
        raise ValueError(
            f"{FOLLOW_VARIABLE}={uri!r}: follow an alias, as models:/NAME@ALIAS (e.g. models:/bottle@champion)."
        )
    return name, alias


def follow_seconds() -> float:
    """The check interval from `MLFLOW_KNN_ANOMALY_FOLLOW_SECONDS` (default 30)."""
    text = os.environ.get(SECONDS_VARIABLE, "")
    try:
        seconds = float(text) if text else DEFAULT_SECONDS
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{SECONDS_VARIABLE}={text!r}: give the check interval in seconds, a number above 0.")
    return seconds


class Follower:
    """Keeps `served` on the version an alias names (see the module docstring).

    Args:
        uri: `models:/NAME@ALIAS`.
        served: what the server loaded at start.
        model_id: the loaded model's MLflow model id (to name its version without a reload).
        load: loads a version's native model from its URI into a folder (`pyfunc_model.load_served`).
        seconds: the check interval.
    """

    def __init__(self, uri: str, served: Served, model_id: str | None, load, seconds: float) -> None:
        self.name, self.alias = parse_alias_uri(uri)
        self.served = served
        self.status = FollowStatus()
        self.used_categories: set[str] = set()
        self._model_id, self._load, self.seconds = model_id, load, seconds
        self._version_number: str | None = None
        self._folders: list[str] = []  # the downloads of the serving version and the one before it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-knn-anomaly-follow", daemon=True)

    def start(self) -> Follower:
        """Check once now (so the first answer names its version), then every `seconds` in a thread."""
        self.check()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.seconds):
            self.check()

    def check(self) -> None:
        """One check of the alias; never raises (a server keeps serving whatever happens here)."""
        self.status.checks += 1
        try:
            version = MlflowClient().get_model_version_by_alias(self.name, self.alias)
        except Exception as exc:  # noqa: BLE001 (no such alias, a registry that is down: the thread must live on)
            self.status.failed_checks += 1
            self._warn(f"cannot read models:/{self.name}@{self.alias} ({exc}); still serving {self.served.version}")
            return
        if version.version == self._version_number or version.version in self.status.refused_versions:
            return
        if self._version_number is None and version.source == f"models:/{self._model_id}":
            self._version_number = version.version  # the version the server started on: name it, no reload
            self.served = Served(self.served.model, f"{self.name}/{version.version}", self.served.category)
            return
        self._swap_to(version.version)

    def _swap_to(self, number: str) -> None:
        """Load, verify and check version `number`, then swap it in; refuse it on any problem."""
        uri = f"models:/{self.name}/{number}"
        start = time.perf_counter()
        folder = tempfile.mkdtemp(prefix=f"mlflow-knn-anomaly-v{number}-")  # a registered name may hold any character
        try:
            model, category = self._load(uri, folder)
            self._check_compatible(model)
        except Exception as exc:  # noqa: BLE001 (whatever stops a version from serving refuses it)
            shutil.rmtree(folder, ignore_errors=True)
            self.status.refused += 1
            self.status.refused_versions.add(number)
            self._warn(f"refused {uri} ({exc}); still serving {self.served.version}")
            self._record_refusal(number, str(exc))
            return
        self.served = Served(model, f"{self.name}/{number}", category)  # one assignment: atomic for requests
        self._version_number = number
        self.status.swaps += 1
        self._folders.append(folder)
        while len(self._folders) > 2:  # a request still on the previous version keeps its files
            shutil.rmtree(self._folders.pop(0), ignore_errors=True)
        seconds = time.perf_counter() - start
        _logger.info("mlflow-knn-anomaly: now serving %s (loaded and verified in %.1f s)", uri, seconds)

    def _record_refusal(self, number: str, why: str) -> None:
        """Tag the refused version (`serving.refused`), so `monitor` reports it; best effort."""
        try:
            MlflowClient().set_model_version_tag(self.name, number, REFUSED_TAG, why[:5000])
        except Exception as exc:  # noqa: BLE001 (the registry may be what failed)
            _logger.warning("mlflow-knn-anomaly: could not tag the refused version %s (%s)", number, exc)

    def _check_compatible(self, model: SpadeDetector | LineDetector) -> None:
        """A line version must keep every category requests have used; a line stays a line."""
        line = isinstance(self.served.model, LineDetector)
        if line != isinstance(model, LineDetector):
            kind = "a line model" if line else "a single-category model"
            raise ValueError(f"it is not {kind}, as the serving version is: requests would break")
        if line:
            dropped = sorted(self.used_categories - set(model.categories))
            if dropped:
                raise ValueError(f"it drops the categories {dropped} that requests use")
            for category in model.categories:  # a line opens categories on first use: verify each now
                model.detector(category)

    def _warn(self, message: str) -> None:
        self.status.last_problem = message
        _logger.warning("mlflow-knn-anomaly: %s", message)
