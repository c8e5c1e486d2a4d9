"""The backbones this package knows: pyramid layers (name, channels, stride), pooled feature and
input normalisation. Plain data without torch, so that the config can validate names cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = TF_LITE_STD = (0.5, 0.5, 0.5)  # TF-ported Lite weights scale pixels to [-1, 1]


@dataclass(frozen=True)
class LayerSpec:
    name: str
    channels: int
    stride: int


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone offers: its pyramid, pooled feature, normalisation and weight source."""

    name: str
    library: str  # "timm" or "torchvision"
    arch: str
    layers: tuple[LayerSpec, ...]
    default_layers: tuple[str, ...]
    pooled_layer: str  # stage 1 uses the global average of this layer's output
    pooled_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def layer(self, name: str) -> LayerSpec:
        for spec in self.layers:
            if spec.name == name:
                return spec
        raise ValueError(f"{name!r} is not a layer of {self.name}; valid: {[s.name for s in self.layers]}")


def _lite(version: int, chs: tuple[int, ...]) -> BackboneSpec:
    names, strides = ("blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6"), (2, 4, 8, 16, 32)
    return BackboneSpec(
        name=f"efficientnet_lite{version}",
        library="timm",
        arch=f"tf_efficientnet_lite{version}",
        layers=tuple(LayerSpec(n, c, s) for n, c, s in zip(names, chs, strides)),
        # Strides 4-32: the stride-32 layer gives large, low-contrast defects their context
        # (measured on both shared datasets, docs/results/accuracy.md).
        default_layers=("blocks.1", "blocks.2", "blocks.4", "blocks.6"),
        pooled_layer="bn2",
        pooled_dim=1280,
        mean=TF_LITE_MEAN,
        std=TF_LITE_STD,
    )


def _resnet(name: str, chs: tuple[int, ...]) -> BackboneSpec:
    names = ("layer1", "layer2", "layer3", "layer4")
    return BackboneSpec(
        name=name,
        library="torchvision",
        arch=name,
        layers=tuple(LayerSpec(n, c, s) for n, c, s in zip(names, chs, (4, 8, 16, 32))),
        default_layers=("layer1", "layer2", "layer3"),  # SPADE's pyramid
        pooled_layer="layer4",
        pooled_dim=chs[-1],
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _lite(0, (16, 24, 40, 112, 320)),
        _lite(1, (16, 24, 40, 112, 320)),
        _lite(2, (16, 24, 48, 120, 352)),
        _resnet("resnet18", (64, 128, 256, 512)),
        _resnet("resnet50", (256, 512, 1024, 2048)),
        _resnet("wide_resnet50_2", (256, 512, 1024, 2048)),
    )
}
