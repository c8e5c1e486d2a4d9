"""The feature bank: features of the normal images, stored as .npy files plus a JSON manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .knn import PixelGallery

MANIFEST = "manifest.json"
# A layer whose galleries hold at least 1 / WHOLE_SHARE of the bank's images is prepared once, whole
# (float32, norms included): gathering its rows then costs one copy instead of four passes (read,
# convert, copy, norms), and a gallery of every image none; memory stays within WHOLE_SHARE galleries.
WHOLE_SHARE = 4


@dataclass(frozen=True)
class FeatureBank:
    """Features of N normal images.

    Images may have different sizes (aspect ratio kept), so each layer's pixel features are
    stored as rows: image i owns rows `offsets[layer][i]:offsets[layer][i + 1]`.

    Attributes:
        pooled: (N, D) float32 pooled features (stage 1).
        features: {layer: (P, C)} pixel features of all images, row-major (y, x) per image, float16
            or float32; may be memory-mapped read-only arrays.
        offsets: {layer: (N + 1,) int64} first row of each image, and the total row count.
        statistics: (N, S) float32 image statistics of each image (`drift.STATISTICS`), what
            monitoring compares production images with; None in banks saved before it.
    """

    pooled: np.ndarray
    features: dict[str, np.ndarray]
    offsets: dict[str, np.ndarray]
    statistics: np.ndarray | None = None

    @classmethod
    def from_images(
        cls, pooled: np.ndarray, images: list[dict[str, np.ndarray]], statistics: np.ndarray | None = None
    ) -> FeatureBank:
        """Assemble a bank from pooled (N, D) features, per image {layer: (h_i * w_i, C) rows}, and
        (N, S) image statistics."""
        layers = list(images[0]) if images else []
        return cls(
            statistics=None if statistics is None else np.asarray(statistics, dtype=np.float32),
            pooled=np.ascontiguousarray(pooled, dtype=np.float32),
            features={layer: np.concatenate([rows[layer] for rows in images]) for layer in layers},
            offsets={
                layer: np.concatenate([[0], np.cumsum([len(rows[layer]) for rows in images])]).astype(np.int64)
                for layer in layers
            },
        )

    def concat(self, other: FeatureBank) -> FeatureBank:
        """This bank followed by `other`'s images (same layers and dtypes), in memory."""
        if list(other.features) != list(self.features):
            raise ValueError(f"banks of layers {list(self.features)} and {list(other.features)} cannot be joined.")
        return FeatureBank(
            pooled=np.concatenate([self.pooled, other.pooled]),
            features={k: np.concatenate([v, other.features[k].astype(v.dtype)]) for k, v in self.features.items()},
            offsets={k: np.concatenate([v, other.offsets[k][1:] + v[-1]]) for k, v in self.offsets.items()},
            statistics=(
                None
                if self.statistics is None or other.statistics is None
                else np.concatenate([self.statistics, other.statistics])
            ),
        )

    @property
    def n_images(self) -> int:
        return int(self.pooled.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.pooled.nbytes + sum(m.nbytes + self.offsets[k].nbytes for k, m in self.features.items()))

    def gallery(self, layer: str, nn_indices: np.ndarray) -> torch.Tensor:
        """(sum of h_i * w_i, C) float32 pixel features of the images `nn_indices` (K,) on `layer`."""
        starts = self.offsets[layer]
        rows = [self.features[layer][starts[i] : starts[i + 1]] for i in np.sort(nn_indices)]
        return torch.from_numpy(np.concatenate(rows)).float()

    def image_rows(self, layer: str, nn_indices: np.ndarray) -> np.ndarray:
        """(K,) rows of each image of `gallery(layer, nn_indices)`, in its order."""
        return np.diff(self.offsets[layer])[np.sort(nn_indices)]

    def save(self, directory: Path) -> list[Path]:
        """Write one .npy per array plus the manifest into `directory`; returns the files written."""
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {"pooled": self.pooled}
        for layer in self.features:
            arrays[f"map_{layer}"] = self.features[layer]
            arrays[f"offsets_{layer}"] = self.offsets[layer]
        if self.statistics is not None:
            arrays["statistics"] = self.statistics
        for key, array in arrays.items():
            np.save(directory / f"{key}.npy", np.ascontiguousarray(array), allow_pickle=False)
        manifest = {
            "n_images": self.n_images,
            "layers": list(self.features),
            "shapes": {key: list(array.shape) for key, array in arrays.items()},
            "dtypes": {key: str(array.dtype) for key, array in arrays.items()},
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return [directory / MANIFEST, *(directory / f"{key}.npy" for key in arrays)]

    @classmethod
    def load(cls, directory: Path, mmap: bool = True) -> FeatureBank:
        """Read a saved bank; with `mmap` the arrays are memory-mapped read-only (shared by workers)."""
        manifest = json.loads((directory / MANIFEST).read_text())
        if "layers" not in manifest:
            raise ValueError(f"{directory} holds a bank of an older format; rebuild it with build-bank.")
        arrays = {}
        for key, shape in manifest["shapes"].items():
            arrays[key] = np.load(directory / f"{key}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
            if list(arrays[key].shape) != shape:
                raise ValueError(
                    f"bank array {key} has shape {arrays[key].shape}, manifest says {shape}; rebuild the bank."
                )
        layers = manifest["layers"]
        return cls(
            pooled=arrays["pooled"],
            features={layer: arrays[f"map_{layer}"] for layer in layers},
            offsets={layer: np.asarray(arrays[f"offsets_{layer}"]) for layer in layers},
            statistics=np.asarray(arrays["statistics"]) if "statistics" in arrays else None,
        )


class Galleries:
    """Stage 2's galleries (`PixelGallery`) of a bank, assembled per image on `device`.

    Args:
        bank: the feature bank.
        counts: {layer: nearest images whose pixels form that layer's gallery} (`gallery_images`).
        device: where the search runs.
    """

    def __init__(self, bank: FeatureBank, counts: dict[str, int], device: torch.device) -> None:
        self.bank, self.counts, self.device = bank, counts, device
        self._whole: dict[str, PixelGallery] = {}

    def __call__(self, nn_indices: np.ndarray) -> dict[str, PixelGallery]:
        """{layer: gallery of the first `counts[layer]` of the (K,) nearest images `nn_indices`};
        rows in bank order, as `FeatureBank.gallery`."""
        out = {}
        for layer, count in self.counts.items():
            images = np.sort(nn_indices[:count])
            if count * WHOLE_SHARE < self.bank.n_images:
                out[layer] = PixelGallery(self.bank.gallery(layer, images).to(self.device))
                continue
            if layer not in self._whole:
                features = np.array(self.bank.features[layer], dtype=np.float32)  # a writable copy
                self._whole[layer] = PixelGallery(torch.from_numpy(features).to(self.device))
            whole, starts = self._whole[layer], self.bank.offsets[layer]
            if len(images) == self.bank.n_images:
                out[layer] = whole
            else:
                rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in images])
                out[layer] = whole.rows(torch.from_numpy(rows))
        return out
