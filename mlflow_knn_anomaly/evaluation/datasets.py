"""Datasets in the MVTec AD layout: a reader, and a synthetic inspection set generator.

Layout: <root>/train/good/*.png, <root>/test/<type>/*.png ("good" = normal), and
<root>/ground_truth/<type>/<stem>_mask.png for every anomalous test image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NORMAL = "good"


@dataclass(frozen=True)
class TestSample:
    """One test image: its path, its defect type ("good" when normal) and its mask path or None."""

    path: Path
    defect_type: str
    mask_path: Path | None

    @property
    def is_anomalous(self) -> bool:
        return self.defect_type != NORMAL

    def mask(self, width: int, height: int) -> np.ndarray:
        """(height, width) bool ground truth; all False for normal images."""
        if self.mask_path is None:
            return np.zeros((height, width), dtype=bool)
        mask = read_mask(self.mask_path)
        if mask.shape != (height, width):
            raise ValueError(f"mask {self.mask_path} is {mask.shape[::-1]}, its image is {(width, height)}.")
        return mask


def read_mask(source: str | Path | bytes) -> np.ndarray:
    """(H, W) bool ground truth from a mask image file or its encoded bytes: pixels above 127 are defect."""
    with Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source) as mask:
        return np.asarray(mask.convert("L")) > 127


def list_images(folder: Path) -> list[Path]:
    """Image files of a folder, sorted by name so that disk order never changes a result."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


LIST_SUFFIXES = (".txt", ".csv", ".parquet")


def read_image_list(path: str | Path) -> list[tuple[Path, str | None]]:
    """(image path, category or None) per row of an image list: a .txt of one path per line, or a
    .csv / .parquet with a `path` column and optionally a `category` column. Relative paths are
    relative to the list's folder. Rows are returned as written; nothing is read from the images.

    Raises:
        FileNotFoundError: no such list. ValueError: another format, no `path` column, or no rows.
    """
    import pandas as pd  # only this reader needs it

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image list {path.resolve()} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = [line.strip() for line in path.read_text().splitlines()]
        frame = pd.DataFrame({"path": [line for line in lines if line and not line.startswith("#")]})
    elif suffix in (".csv", ".parquet"):
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
        if "path" not in frame.columns:
            raise ValueError(f"{path} has columns {list(frame.columns)}; an image list needs a 'path' column.")
    else:
        raise ValueError(f"{path} is a {suffix or 'suffix-less'} file; an image list is one of {LIST_SUFFIXES}.")
    if frame.empty:
        raise ValueError(f"{path} lists no images.")
    categories = frame["category"] if "category" in frame.columns else [None] * len(frame)
    return [
        ((Path(p) if Path(p).is_absolute() else path.parent / p), None if c is None or c != c else str(c))
        for p, c in zip(frame["path"].astype(str), categories)
    ]


def read_train(root: str | Path) -> list[Path]:
    """The normal reference images, <root>/train/good, sorted.

    Raises:
        FileNotFoundError: the folder does not exist. ValueError: it holds no images.
    """
    folder = Path(root) / "train" / NORMAL
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist; expected an MVTec-layout folder <root>/train/good/*.png.")
    images = list_images(folder)
    if not images:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); add the normal reference images.")
    return images


def is_mvtec_folder(root: str | Path) -> bool:
    """Whether `root` is itself one MVTec-layout folder (it has train/good)."""
    return (Path(root) / "train" / NORMAL).is_dir()


def find_categories(root: str | Path) -> tuple[dict[str, Path], list[str]]:
    """The categories of a line root: each subfolder with a train/good, named after the folder.

    Returns:
        ({category: folder}, sorted by name; [why each other entry of `root` was ignored]).

    Raises:
        FileNotFoundError: `root` is not a folder, or holds no category.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist; pass an MVTec-layout folder, or a folder of them.")
    found, ignored = {}, []
    for entry in sorted(root.iterdir()):
        if is_mvtec_folder(entry):
            found[entry.name] = entry
        else:
            ignored.append(f"{entry.name}: {'a file' if entry.is_file() else 'no train/good'}, ignored")
    if not found:
        raise FileNotFoundError(
            f"{root / 'train' / NORMAL} does not exist, and no subfolder of {root} has a train/{NORMAL}: {root} holds "
            "no category. Pass an MVTec-layout folder, or a folder of them (one per part type)."
        )
    return found, ignored


def has_masks(root: str | Path) -> bool:
    """Whether a test set has pixel masks (<root>/ground_truth); without, it has image labels only."""
    return (Path(root) / "ground_truth").is_dir()


def read_test(root: str | Path) -> list[TestSample]:
    """Every test image with its defect type and ground-truth mask, sorted by type then name.

    Without a <root>/ground_truth folder the set has image-level labels only: every mask path is None.
    """
    root = Path(root)
    test = root / "test"
    if not test.is_dir():
        raise FileNotFoundError(f"{test} does not exist; expected <root>/test/<type>/*.png.")
    masks = has_masks(root)
    samples = []
    for type_dir in sorted(p for p in test.iterdir() if p.is_dir()):
        for path in list_images(type_dir):
            mask = None
            if masks and type_dir.name != NORMAL:
                mask = root / "ground_truth" / type_dir.name / f"{path.stem}_mask.png"
                if not mask.is_file():
                    raise FileNotFoundError(
                        f"{path} has no ground-truth mask at {mask}; add it, or remove {root / 'ground_truth'} "
                        "to evaluate with image-level labels only."
                    )
            samples.append(TestSample(path, type_dir.name, mask))
    if not samples:
        raise ValueError(f"{test} holds no test images.")
    return samples


# ---- synthetic inspection data ----------------------------------------------------------------
DEFECT_TYPES = ("scratch", "spot", "contamination")


def make_synthetic(
    root: str | Path,
    seed: int = 0,
    n_train: int = 60,
    n_test_good: int = 20,
    n_per_defect: int = 10,
    size: int = 256,
    masks: bool = True,
) -> Path:
    """Write a synthetic inspection dataset in the MVTec layout; the same seed gives the same files.

    Each image is a machined disc with a ring texture on a brushed background, with small random
    shifts, lighting changes and sensor noise. Anomalous images carry one pasted defect: a dark
    scratch, a bright or dark spot, or a coloured contamination blob; their masks mark it (without
    `masks`, the set has image-level labels only, like many a user's).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    jobs = [("train", NORMAL, i) for i in range(n_train)] + [("test", NORMAL, i) for i in range(n_test_good)]
    jobs += [("test", kind, i) for kind in DEFECT_TYPES for i in range(n_per_defect)]
    for split, kind, i in jobs:
        image = normal_part(rng, size)
        folder = root / split / kind
        folder.mkdir(parents=True, exist_ok=True)
        if kind != NORMAL:
            image, mask = _paste_defect(rng, image, kind)
        if kind != NORMAL and masks:
            gt = root / "ground_truth" / kind
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(gt / f"{i:03d}_mask.png", compress_level=1)
        Image.fromarray(image).save(folder / f"{i:03d}.png", compress_level=1)  # zlib 6 took 6x longer
    return root


def normal_part(rng: np.random.Generator, size: int) -> np.ndarray:
    """A (size, size, 3) uint8 image of a normal synthetic part."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.uniform(-4, 4, 2)
    r = np.hypot(xx - cx, yy - cy)
    brushed = 0.55 + 0.05 * np.sin(xx * 0.9 + rng.uniform(0, 6.3)) + 0.03 * np.sin(yy * 0.23)
    rings = 0.72 + 0.06 * np.sin(r * 0.8 + rng.uniform(0, 6.3)) - 0.12 * (r / (0.38 * size)) ** 2
    disc = r < 0.38 * size
    gray = np.where(disc, rings, brushed) * rng.uniform(0.93, 1.07)
    gray = gray + rng.normal(0, 0.015, gray.shape)
    tint = np.array([0.95, 1.0, 1.05], dtype=np.float32)
    return (np.clip(gray[..., None] * tint, 0, 1) * 255).astype(np.uint8)


def _paste_defect(rng: np.random.Generator, image: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    cx, cy = rng.uniform(0.25 * size, 0.75 * size, 2)
    if kind == "scratch":
        angle, length = rng.uniform(0, np.pi), rng.uniform(0.15, 0.3) * size
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=int(rng.integers(3, 6)))
        colour = np.array([20, 20, 25])
    elif kind == "spot":
        rx, ry = rng.uniform(0.03, 0.06, 2) * size
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
        colour = np.array([250, 250, 240]) if rng.random() < 0.5 else np.array([30, 25, 20])
    else:
        for _ in range(5):
            ox, oy = rng.normal(0, 0.03 * size, 2)
            rad = rng.uniform(0.02, 0.045) * size
            draw.ellipse([cx + ox - rad, cy + oy - rad, cx + ox + rad, cy + oy + rad], fill=255)
        colour = rng.choice([[170, 90, 30], [40, 140, 60], [150, 40, 150]])
    mask = np.asarray(layer) > 127
    alpha = np.asarray(layer.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32)[..., None] / 255
    blended = image * (1 - alpha) + colour * alpha
    return np.clip(blended, 0, 255).astype(np.uint8), mask
