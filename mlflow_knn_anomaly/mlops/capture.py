"""Request capture: what a served model answered, kept for monitoring and feedback.

Set `MLFLOW_KNN_ANOMALY_CAPTURE` in the server's environment to a local folder or to any artifact
location MLflow can write (`s3://bucket/prefix`, ...). Each answered row (the image bytes, the
output row with its `model_version`, the time, the category, an id) is queued by the request and
written by a background thread, so a request never waits on the location: every
`FLUSH_SECONDS` the queued rows go out as one Parquet file, `day=YYYY-MM-DD/<first time>-<uuid>.parquet`.
A location that fails, or a full queue, loses those rows, never an answer: they are counted
(`CaptureWriter.failed_rows`) and logged. Settings, from the environment:

- `MLFLOW_KNN_ANOMALY_CAPTURE_RATE`: the share of rows captured (default 1);
- `MLFLOW_KNN_ANOMALY_CAPTURE_MAX_MB`: stop capturing once this process wrote this much (default 1024);
- `MLFLOW_KNN_ANOMALY_CAPTURE_DAYS`: day folders older than this are deleted (default 30).

`read_capture` reads a capture back (a time window of it); `export_images` writes its images as
files with a list, which `monitor` and `update_bank` take (`source=capture:LOCATION`).
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import os
import queue
import random
import signal
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

_logger = logging.getLogger(__name__)
CAPTURE_VARIABLE = "MLFLOW_KNN_ANOMALY_CAPTURE"
PREFIX = "capture:"  # a job's source that names a capture location
FLUSH_SECONDS = 2.0
QUEUE_ROWS = 4096


@dataclass(frozen=True)
class CaptureSettings:
    """Where and how much to capture (see the module docstring)."""

    location: str
    rate: float = 1.0
    max_bytes: int = 1024 * 2**20
    days: float = 30.0

    @classmethod
    def from_environ(cls) -> CaptureSettings | None:
        """The settings of the environment; None when capture is off.

        Raises:
            ValueError: a setting out of range, naming the variable and what to give.
        """
        location = os.environ.get(CAPTURE_VARIABLE, "")
        if not location:
            return None
        values = {}
        for field, variable, default, low, high in (
            ("rate", "MLFLOW_KNN_ANOMALY_CAPTURE_RATE", 1.0, 0.0, 1.0),
            ("max_bytes", "MLFLOW_KNN_ANOMALY_CAPTURE_MAX_MB", 1024.0, 0.0, float("inf")),
            ("days", "MLFLOW_KNN_ANOMALY_CAPTURE_DAYS", 30.0, 0.0, float("inf")),
        ):
            text = os.environ.get(variable, "")
            try:
                value = float(text) if text else default
            except ValueError:
                value = -1.0
            if not low < value <= high:
                raise ValueError(f"{variable}={text!r}: give a number in ({low:g}, {high:g}].")
            values[field] = value
        return cls(location, values["rate"], int(values["max_bytes"] * 2**20), values["days"])


def _close_on_sigterm(writer: CaptureWriter) -> None:
    """Write what is queued when SIGTERM stops the process, then let the signal do what it did.

    Uvicorn (MLflow's scoring server) shuts down on SIGTERM and then raises it again with the
    handler it found at start, which ends the process without `atexit`: this handler, installed
    when the model loads, before uvicorn starts, is the one it finds.
    """
    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set a handler
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame) -> None:
        writer.close()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.raise_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, handler)


def _repository(location: str):
    """MLflow's artifact repository of a location (a plain path is a local folder)."""
    if "://" not in location:
        Path(location).mkdir(parents=True, exist_ok=True)
        location = Path(location).resolve().as_uri()
    return get_artifact_repository(location)


class CaptureWriter:
    """Queues captured rows on the request path and writes them from a thread of its own."""

    def __init__(self, settings: CaptureSettings, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.settings = settings
        self.captured_rows = self.failed_rows = self.written_bytes = 0
        self._queue: queue.Queue[dict] = queue.Queue(maxsize=QUEUE_ROWS)
        self._flush_seconds = flush_seconds
        self._repo = _repository(settings.location)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-knn-anomaly-capture", daemon=True)
        self._thread.start()
        atexit.register(self.close)  # a process that exits writes what it queued
        _close_on_sigterm(self)

    def submit(self, images: list[bytes | None], rows: list[dict]) -> None:
        """Queue a request's rows (a sampled share); never raises, never waits."""
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        for image, row in zip(images, rows):
            if random.random() >= self.settings.rate:
                continue
            if self.written_bytes >= self.settings.max_bytes:
                self.failed_rows += 1
                continue
            try:
                self._queue.put_nowait({"id": uuid.uuid4().hex, "time": now, "image": image, **row})
            except queue.Full:
                self.failed_rows += 1

    def close(self) -> None:
        """Write what is queued and stop (a server's exit, a test); a second call does nothing."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        self._expire()
        while not self._stop.wait(self._flush_seconds):
            self._flush()
        self._flush()

    def _flush(self) -> None:
        rows = []
        while True:
            try:
                rows.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not rows:
            return
        try:
            self._write(pd.DataFrame(rows))
            self.captured_rows += len(rows)
        except Exception as exc:  # noqa: BLE001 (an unwritable location loses captures, never answers)
            self.failed_rows += len(rows)
            _logger.warning("mlflow-knn-anomaly: capture to %s failed (%s): %d rows lost, %d in all",
                            self.settings.location, exc, len(rows), self.failed_rows)  # fmt: skip

    def _write(self, frame: pd.DataFrame) -> None:
        first = frame["time"].iloc[0]
        name = f"{first.replace(':', '').replace('+', 'Z')}-{uuid.uuid4().hex[:8]}.parquet"
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            frame.to_parquet(path, index=False)
            self.written_bytes += path.stat().st_size
            self._repo.log_artifact(str(path), artifact_path=f"day={first[:10]}")

    def _expire(self) -> None:
        """Delete day folders older than the retention."""
        oldest = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=self.settings.days)).date().isoformat()
        try:
            for entry in self._repo.list_artifacts():
                if entry.is_dir and entry.path.startswith("day=") and entry.path[4:] < oldest:
                    self._repo.delete_artifacts(entry.path)
        except Exception as exc:  # noqa: BLE001
            _logger.warning("mlflow-knn-anomaly: capture retention at %s failed (%s)", self.settings.location, exc)


def read_capture(location: str, since: str | None = None, until: str | None = None) -> pd.DataFrame:
    """The captured rows of a location, those with `since <= time < until` (ISO 8601, UTC when no
    zone is given), oldest first.

    Raises:
        FileNotFoundError: the location holds no capture.
    """
    repo = _repository(location)
    days = sorted(e.path for e in repo.list_artifacts() if e.is_dir and e.path.startswith("day="))
    low, high = _instant(since), _instant(until)
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for day in days:
            if (low and day[4:] < low[:10]) or (high and day[4:] > high[:10]):
                continue
            for entry in repo.list_artifacts(day):
                if entry.path.endswith(".parquet"):
                    frames.append(pd.read_parquet(repo.download_artifacts(entry.path, dst_path=tmp)))
    if not frames:
        raise FileNotFoundError(f"{location} holds no captured request (day=YYYY-MM-DD/*.parquet) in that window.")
    frame = pd.concat(frames, ignore_index=True)
    keep = pd.Series(True, index=frame.index)
    if low:
        keep &= frame["time"] >= low
    if high:
        keep &= frame["time"] < high
    return frame[keep].sort_values("time", kind="stable").reset_index(drop=True)


def _instant(text: str | None) -> str | None:
    """An ISO 8601 time as the capture writes it (UTC, `+00:00`); None for no bound."""
    if not text:
        return None
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValueError(f"{text!r} is not an ISO 8601 time; give e.g. 2026-12-07T08:00 (UTC).") from exc
    moment = moment.replace(tzinfo=dt.timezone.utc) if moment.tzinfo is None else moment.astimezone(dt.timezone.utc)
    return moment.isoformat()


def captured_list(source: str, ids: str | None, folder: Path) -> Path:
    """The image list (`export_images`) of the captured requests `ids` names: a .txt file of ids,
    one a line, or ids separated by commas, of the capture `source` (`capture:LOCATION`).

    Raises:
        ValueError: no ids, or ids the capture does not hold.
    """
    text = Path(ids).read_text() if ids and Path(ids).is_file() else (ids or "")
    wanted = [i.strip() for i in text.replace(",", "\n").splitlines() if i.strip()]
    if not wanted:
        raise ValueError(f"images={source} takes the ids of the captured requests operators confirmed: pass ids= "
                         "(a .txt file of ids, one a line, or ids separated by commas).")  # fmt: skip
    return export_images(read_capture(source.removeprefix(PREFIX)), folder, wanted)


def export_images(frame: pd.DataFrame, folder: Path, ids: list[str] | None = None) -> Path:
    """Write captured images (those of `ids`, in that order, if given) as files, and a list of
    them (`images.csv`: path, category, id) that `monitor` and `update_bank` read.

    Raises:
        ValueError: an id that is not in the capture (they are all named).
    """
    if ids is not None:
        missing = sorted(set(ids) - set(frame["id"]))
        if missing:
            raise ValueError(f"{len(missing)} id(s) are not in the capture: {missing[:10]}")
        frame = frame.set_index("id").loc[ids].reset_index()
    frame = frame[frame["image"].notna()]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for row in frame.itertuples():
        path = folder / f"{row.id}.img"
        path.write_bytes(row.image)
        paths.append(str(path))
    listing = folder / "images.csv"
    categories = frame["category"].fillna("") if "category" in frame else ""
    pd.DataFrame({"path": paths, "category": categories, "id": frame["id"]}).to_csv(listing, index=False)
    return listing
