"""A saved detector on disk: config.json (settings, calibration, sha256 of every artifact, library
versions), weights.safetensors, bank/*.npy, holdout/*.png (the held-out normal images, which
`update_bank` recalibrates on) and, when built with one, roi.png (the inspection region). Written
to a temporary directory, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors.torch import save_file

from ..config import SpadeConfig
from ..version import DISTRIBUTION, __version__, serving_versions
from .backbones import BACKBONES, Backbone
from .bank import FeatureBank
from .calibration import Calibration
from .roi import encode_roi, read_roi

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"
BANK_DIR = "bank"
HOLDOUT_DIR = "holdout"
ROI_FILE = "roi.png"
# 2: ragged bank rows (aspect-kept inputs); 3: calibration apart from the settings; 4: what monitoring
# needs (bank/statistics.npy, calibration.holdout_scores), so that an older version refuses it clearly;
# 5: the `exact_maps` setting (an older version would refuse it as an unknown key).
FORMAT_VERSION = 5
READABLE_FORMATS = (2, 3, 4, 5)
# Settings added since format 2 first shipped, with the value that reproduces a model saved before
# them (its thresholds were calibrated that way); a newer default must not change an old model.
ADDED_SETTINGS = {
    "layer_combine": "mean",
    "scale_gallery": False,
    "stage1_feature": "last",
    "gallery_feature": "last",
    "score_fusion": "map",
    "map_weight": 1.0,
    "score_top": 0.0,
    "min_region_area": 0.0,
    "roi": "",
    "exact_maps": True,
}
# Format 2 kept the fitted state among the settings; `candidate_threshold` is now the gate.
FORMAT2_FITTED = {
    "image_threshold": "image_threshold",
    "pixel_threshold": "pixel_threshold",
    "candidate_threshold": "gate_threshold",
    "knn_mean": "knn_mean",
    "knn_std": "knn_std",
    "map_mean": "map_mean",
    "map_std": "map_std",
    "layer_scales": "layer_scales",
}
FORMAT2_DROPPED = ("candidate_sigmas",)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def installed_version(name: str) -> str:
    """The running version of a package ("absent" when not installed; this package's own code may
    travel inside a model without being installed)."""
    if name == DISTRIBUTION:
        return __version__
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


@dataclass(frozen=True)
class SavedDetector:
    """What a detector directory holds (weights as the path of their file)."""

    config: SpadeConfig
    calibration: Calibration
    weights: Path | None  # None: a line model's category, whose backbone weights are the line's
    bank: FeatureBank
    holdout: list[Image.Image] | None  # None in format 2
    roi: np.ndarray | None = None  # (H, W) bool inspection region, when built with one


def save_detector(
    path: Path,
    config: SpadeConfig,
    calibration: Calibration,
    backbone: Backbone,
    bank: FeatureBank,
    holdout: list[Image.Image],
    with_weights: bool = True,
    roi: np.ndarray | None = None,
) -> Path:
    """Write a detector directory atomically; refuse to overwrite an existing path.

    Without `with_weights` the backbone's weights are left out (a line model keeps one copy for
    all its categories)."""
    with atomic_directory(path) as tmp:
        weights = [save_weights(backbone, tmp / WEIGHTS_FILE)] if with_weights else []
        (tmp / HOLDOUT_DIR).mkdir()
        for i, image in enumerate(holdout):
            image.save(tmp / HOLDOUT_DIR / f"{i:05d}.png")  # lossless: update_bank recalibrates on them
        holdout_files = sorted((tmp / HOLDOUT_DIR).iterdir())
        if roi is not None:
            (tmp / ROI_FILE).write_bytes(encode_roi(roi))
            holdout_files.append(tmp / ROI_FILE)
        files = [*weights, *bank.save(tmp / BANK_DIR), *holdout_files]
        record = {
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "calibration": calibration.to_dict(),
            "bank": {"n_images": bank.n_images, "nbytes": bank.nbytes},
        }
        write_record(tmp / CONFIG_FILE, record, files)
    return path


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """A temporary directory beside `path`, renamed to `path` when the block succeeds and removed
    when it fails, so that nothing is ever half-written; an existing `path` is refused."""
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose a new path or remove it first.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_record(target: Path, record: dict, files: list[Path]) -> None:
    """`record` as JSON at `target`, with the sha256 of `files` (relative to target's folder) and
    the library versions."""
    root = target.parent
    hashes = {f.relative_to(root).as_posix(): sha256(f) for f in files}
    full = {**record, "sha256": hashes, "versions": {DISTRIBUTION: __version__, **serving_versions()}}
    target.write_text(json.dumps(full, indent=2, sort_keys=True))


def save_weights(backbone: Backbone, path: Path) -> Path:
    """The backbone's state dict as safetensors."""
    save_file({k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}, path)
    return path


def load_detector(path: Path, mmap: bool = True) -> SavedDetector:
    """Read and verify a detector directory (this format or the previous one); the bank is
    memory-mapped with `mmap`.

    Raises:
        FileNotFoundError: not a saved detector. ValueError: an artifact's hash differs.
    """
    config_file = path / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a saved detector: {CONFIG_FILE} is missing.")
    record = json.loads(config_file.read_text())
    verify(path, record["sha256"])
    if record.get("format_version") not in READABLE_FORMATS:
        raise ValueError(
            f"{path} was saved in format {record.get('format_version')}, this version reads formats "
            f"{list(READABLE_FORMATS)}; rebuild the bank with this version (build-bank)."
        )
    _warn_on_version_mismatch(record.get("versions", {}))
    bank = FeatureBank.load(path / BANK_DIR, mmap=mmap)
    config, calibration = _settings_and_calibration(record, list(bank.features))
    holdout = None
    if (path / HOLDOUT_DIR).is_dir():
        holdout = [_read_png(f) for f in sorted((path / HOLDOUT_DIR).glob("*.png"))]
    weights = path / WEIGHTS_FILE if (path / WEIGHTS_FILE).is_file() else None
    roi = read_roi(path / ROI_FILE) if (path / ROI_FILE).is_file() else None
    return SavedDetector(config, calibration, weights, bank, holdout, roi)


def load_settings(path: Path) -> SpadeConfig:
    """The settings of a saved detector (this format), without opening its bank."""
    record = json.loads((path / CONFIG_FILE).read_text())
    return SpadeConfig.from_dict({**ADDED_SETTINGS, **record["config"]})


def verify(path: Path, hashes: dict[str, str]) -> None:
    """Every file of `hashes` (relative to `path`) exists and has its recorded sha256.

    Raises:
        ValueError: a file is missing or differs, with what to do.
    """
    for name, expected in hashes.items():
        file = path / name
        if not file.is_file():
            raise ValueError(f"artifact {name} is missing from {path}; the model is incomplete.")
        if sha256(file) != expected:
            raise ValueError(
                f"artifact {name} in {path} does not match its recorded sha256: the file was "
                "modified or corrupted. Re-download or rebuild the model."
            )


def _settings_and_calibration(record: dict, bank_layers: list[str]) -> tuple[SpadeConfig, Calibration]:
    """The config and calibration of a saved record, an older format's moved to today's fields so
    that the model predicts exactly as it did."""
    settings = {**ADDED_SETTINGS, **record["config"]}
    if "calibration" in record:
        calibration = Calibration.from_dict(record["calibration"])
    else:
        calibration = Calibration.from_dict({new: settings.pop(old, ()) for old, new in FORMAT2_FITTED.items()})
        for key in FORMAT2_DROPPED:
            settings.pop(key, None)
    spec = BACKBONES.get(settings.get("backbone"))
    if not settings.get("layers") and spec is not None and tuple(bank_layers) != spec.default_layers:
        settings["layers"] = bank_layers  # saved as "the backbone's default" before that changed
    return SpadeConfig.from_dict(settings), calibration


def _read_png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def _warn_on_version_mismatch(saved: dict[str, str]) -> None:
    for name, version in saved.items():
        now = installed_version(name)
        if version.split(".")[0] != now.split(".")[0]:
            warnings.warn(
                f"model saved with {name} {version}, running {now}: a major version differs, results may change.",
                stacklevel=3,
            )
