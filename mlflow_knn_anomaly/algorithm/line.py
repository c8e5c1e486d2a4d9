"""A line model: several part types ("categories") beside one shared backbone.

SPADE needs no training, so a part type is simply a bank of its own: stage 1 finds an image's
nearest normal images in its category's bank, and stage 2 searches only those. A `LineDetector`
wraps one `SpadeDetector` per category; they share the backbone (one copy of its weights on disk
and in memory), and each keeps its own bank, calibration, hold-out images and settings.

On disk: line.json (categories, the shared settings, sha256 of the weights and of each category's
config.json, which in turn holds its bank's hashes), weights.safetensors, and per category a
detector directory without weights under categories/<name>/. A loaded line opens a category (and
memory-maps its bank) on first use, so a server's memory grows with the categories it is asked for.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from tqdm.auto import tqdm

from ..config import SpadeConfig
from . import artifacts
from .backbones import Backbone, build_backbone
from .images import ImageLike
from .spade import SpadeDetector

LINE_FILE = "line.json"
CATEGORY_DIR = "categories"
LINE_FORMAT = 1
# Settings that change the backbone or its weights: one backbone serves every category.
SHARED_SETTINGS = ("backbone", "weights", "layers", "device")
_NOT_IN_NAME = re.compile(r"[/\\\x00]")  # a category is one folder of the saved line


def check_category_names(names: list[str]) -> None:
    """Category names are folder names (any a file system takes: the MLflow side maps them to metric
    keys), and no two differ only by case (a request's category must name one part type, unambiguously).

    Raises:
        ValueError: a bad name or a collision, with what to rename.
    """
    for name in names:
        if not isinstance(name, str) or not name.strip() or name in (".", "..") or _NOT_IN_NAME.search(name):
            raise ValueError(
                f"category name {name!r} is not allowed: a category is one folder's name (not empty, not '.' "
                "or '..', no '/', '\\' or NUL). Rename the folder."
            )
    folded: dict[str, str] = {}
    for name in names:
        other = folded.setdefault(name.casefold(), name)
        if other != name:
            raise ValueError(f"categories {other!r} and {name!r} differ only by case: rename one of them.")


def check_shared_settings(configs: Mapping[str, SpadeConfig]) -> None:
    """Every category uses one backbone: `SHARED_SETTINGS` must agree.

    Raises:
        ValueError: naming each setting that differs and the categories on each side.
    """
    problems = []
    for setting in SHARED_SETTINGS:
        values: dict[str, list[str]] = {}
        for name, config in configs.items():
            value = config.pyramid if setting == "layers" else getattr(config, setting)
            values.setdefault(str(value), []).append(name)
        if len(values) > 1:
            problems.append(f"{setting}: " + "; ".join(f"{v} for {sorted(n)}" for v, n in values.items()))
    if problems:
        raise ValueError(
            "a line model shares one backbone, but its categories differ in settings that change it ("
            + " | ".join(problems)
            + "). Give every category the same backbone, weights, layers and device, or build separate models."
        )


class LineDetector:
    """Per category a fitted `SpadeDetector`, all sharing one backbone.

    Args:
        detectors: {category: fitted detector}; they must agree on `SHARED_SETTINGS`.
        settings: the settings the line was built with before per-category overrides (what
            `add_category` starts from); None takes the first category's.
    """

    def __init__(self, detectors: Mapping[str, SpadeDetector], settings: SpadeConfig | None = None) -> None:
        if not detectors:
            raise ValueError("a line model needs at least one category.")
        check_category_names(list(detectors))
        check_shared_settings({name: d.config for name, d in detectors.items()})
        first = next(iter(detectors.values()))
        self.backbone: Backbone = first.backbone
        self.settings = settings or first.config
        self._open: dict[str, SpadeDetector] = dict(detectors)
        self._sources: dict[str, Path] = {}  # categories still as on disk: saved by copying, byte for byte
        self._configs = {name: d.config for name, d in detectors.items()}
        self._lock = threading.Lock()
        self.fit_seconds_: dict[str, float] = {}

    @classmethod
    def fit(
        cls,
        images: Mapping[str, list[ImageLike]],
        configs: Mapping[str, SpadeConfig],
        settings: SpadeConfig | None = None,
        progress: bool = False,
    ) -> LineDetector:
        """Fit one detector per category on its normal images, building the shared backbone once.

        Args:
            images: {category: normal images}. configs: {category: its settings}.
        """
        check_category_names(list(images))
        check_shared_settings(configs)
        backbone = None
        detectors, seconds = {}, {}
        for name in tqdm(list(images), desc="categories", unit="category", disable=None if progress else True):
            start = time.perf_counter()
            detector = SpadeDetector(configs[name], backbone=backbone)
            backbone = detector.backbone
            detectors[name] = detector.fit(images[name], progress=progress)
            seconds[name] = time.perf_counter() - start
        line = cls(detectors, settings)
        line.fit_seconds_ = seconds
        return line

    # ---- categories ---------------------------------------------------------------------------
    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(self._configs)

    @property
    def opened(self) -> tuple[str, ...]:
        """The categories whose detector (and bank) is open in memory."""
        return tuple(self._open)

    @property
    def unchanged(self) -> tuple[str, ...]:
        """The categories still as loaded from disk (saved by copying them byte for byte)."""
        return tuple(name for name in self._configs if name in self._sources)

    def config(self, category: str) -> SpadeConfig:
        return self._configs[self.check_category(category)]

    def check_category(self, category: object) -> str:
        """`category` itself if the line holds it.

        Raises:
            ValueError: an unknown or empty category, listing the known ones.
        """
        if isinstance(category, str) and category in self._configs:
            return category
        hint = ""
        if isinstance(category, str):
            close = [c for c in self._configs if c.casefold() == category.strip().casefold()]
            hint = f" (did you mean {close[0]!r}? names are exact)" if close else ""
        what = "no category" if category in (None, "") else f"unknown category {category!r}"
        raise ValueError(f"{what}{hint}; this line model holds {list(self._configs)}.")

    def detector(self, category: str) -> SpadeDetector:
        """The category's detector, opened (its bank memory-mapped, its hashes verified) on first use."""
        category = self.check_category(category)
        with self._lock:
            if category not in self._open:
                self._open[category] = SpadeDetector.load(self._sources[category], backbone=self.backbone)
            return self._open[category]

    def with_category(self, category: str, detector: SpadeDetector) -> LineDetector:
        """A new line with `category` added or replaced; the others stay as they are (on disk too)."""
        check_shared_settings({**self._configs, category: detector.config})
        line = self._copy()
        line._open[category] = detector
        line._sources.pop(category, None)
        line._configs[category] = detector.config
        check_category_names(list(line._configs))
        return line

    def without_category(self, category: str) -> LineDetector:
        """A new line without `category`.

        Raises:
            ValueError: it is unknown, or the line's only category.
        """
        category = self.check_category(category)
        if len(self._configs) == 1:
            raise ValueError(f"{category!r} is this line model's only category; a line keeps at least one.")
        line = self._copy()
        for table in (line._open, line._sources, line._configs):
            table.pop(category, None)
        return line

    def _copy(self) -> LineDetector:
        line = object.__new__(LineDetector)
        line.backbone, line.settings, line._lock = self.backbone, self.settings, threading.Lock()
        line.fit_seconds_ = {}
        line._open, line._sources, line._configs = dict(self._open), dict(self._sources), dict(self._configs)
        return line

    # ---- persistence --------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the line directory atomically; categories loaded and left alone are copied as they are."""
        path = Path(path)
        with artifacts.atomic_directory(path) as tmp:
            files = [artifacts.save_weights(self.backbone, tmp / artifacts.WEIGHTS_FILE)]
            for name in self.categories:
                target = tmp / CATEGORY_DIR / name
                if name in self._sources:
                    shutil.copytree(self._sources[name], target)
                    record = json.loads((target / artifacts.CONFIG_FILE).read_text())
                    artifacts.verify(target, record["sha256"])  # the copy is the bank that was calibrated
                else:
                    self._open[name].save(target, with_weights=False)
                files.append(target / artifacts.CONFIG_FILE)
            record = {"format_version": LINE_FORMAT, "categories": list(self.categories)}
            artifacts.write_record(tmp / LINE_FILE, {**record, "settings": self.settings.to_dict()}, files)
        return path

    @classmethod
    def load(cls, path: str | Path) -> LineDetector:
        """Open a line directory: the weights are verified and the backbone built now; each category
        is verified and opened on first use (`detector`)."""
        path = Path(path)
        record = read_record(path)
        artifacts.verify(path, {k: v for k, v in record["sha256"].items() if k == artifacts.WEIGHTS_FILE})
        configs = {}
        for name in record["categories"]:
            key = f"{CATEGORY_DIR}/{name}/{artifacts.CONFIG_FILE}"
            artifacts.verify(path, {key: record["sha256"][key]})
            configs[name] = artifacts.load_settings(path / CATEGORY_DIR / name)
        first = next(iter(configs.values()))
        line = object.__new__(cls)
        line.backbone = build_backbone(first.backbone, str(path / artifacts.WEIGHTS_FILE), first.pyramid)
        line.settings = SpadeConfig.from_dict(record["settings"])
        line._open, line._configs, line._lock, line.fit_seconds_ = {}, configs, threading.Lock(), {}
        line._sources = {name: path / CATEGORY_DIR / name for name in configs}
        return line


def is_line(path: str | Path) -> bool:
    """Whether `path` is a saved line model (else a single detector directory)."""
    return (Path(path) / LINE_FILE).is_file()


def read_record(path: Path) -> dict:
    """line.json of a line directory.

    Raises:
        FileNotFoundError: not a line model. ValueError: a format this version cannot read.
    """
    if not is_line(path):
        raise FileNotFoundError(f"{path} is not a saved line model: {LINE_FILE} is missing.")
    record = json.loads((path / LINE_FILE).read_text())
    if record.get("format_version") != LINE_FORMAT:
        raise ValueError(
            f"{path} is a line model of format {record.get('format_version')}; this version reads {LINE_FORMAT}."
        )
    return record
