"""The feature bank: features of the normal images, stored as .npy files plus a JSON manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class FeatureBank:
    """Features of N normal images.

    Attributes:
        pooled: (N, D) float32 pooled features (stage 1).
        maps: {layer: (N, C, H, W)} pixel features (stage 2), float16 or float32; may be
            memory-mapped read-only arrays.
    """

    pooled: np.ndarray
    maps: dict[str, np.ndarray]

    @property
    def n_images(self) -> int:
        return int(self.pooled.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.pooled.nbytes + sum(m.nbytes for m in self.maps.values()))

    def gallery(self, layer: str, nn_indices: np.ndarray) -> torch.Tensor:
        """(K * H * W, C) float32 pixel features of the images `nn_indices` (K,) on `layer`."""
        maps = torch.from_numpy(np.ascontiguousarray(self.maps[layer][np.sort(nn_indices)]))
        return maps.float().permute(0, 2, 3, 1).reshape(-1, maps.shape[1])

    def save(self, directory: Path) -> list[Path]:
        """Write one .npy per array plus the manifest into `directory`; returns the files written."""
        directory.mkdir(parents=True, exist_ok=True)
        files = {"pooled": "pooled.npy", **{layer: f"map_{layer}.npy" for layer in self.maps}}
        np.save(directory / files["pooled"], np.ascontiguousarray(self.pooled), allow_pickle=False)
        for layer, array in self.maps.items():
            np.save(directory / files[layer], np.ascontiguousarray(array), allow_pickle=False)
        manifest = {
            "n_images": self.n_images,
            "pooled": files["pooled"],
            "maps": {layer: files[layer] for layer in self.maps},
            "shapes": {key: list(self._array(key).shape) for key in files},
            "dtypes": {key: str(self._array(key).dtype) for key in files},
        }
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        return [directory / MANIFEST, *(directory / name for name in files.values())]

    def _array(self, key: str) -> np.ndarray:
        return self.pooled if key == "pooled" else self.maps[key]

    @classmethod
    def load(cls, directory: Path, mmap: bool = True) -> FeatureBank:
        """Read a saved bank; with `mmap` the arrays are memory-mapped read-only (shared by workers)."""
        manifest = json.loads((directory / MANIFEST).read_text())
        mode = "r" if mmap else None

        def read(name: str) -> np.ndarray:
            return np.load(directory / name, mmap_mode=mode, allow_pickle=False)

        pooled = read(manifest["pooled"])
        maps = {layer: read(name) for layer, name in manifest["maps"].items()}
        for key, shape in manifest["shapes"].items():
            actual = pooled.shape if key == "pooled" else maps[key].shape
            if list(actual) != shape:
                raise ValueError(f"bank array {key} has shape {actual}, manifest says {shape}; rebuild the bank.")
        return cls(pooled=pooled, maps=maps)
