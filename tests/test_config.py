import pytest

from mlflow_knn_anomaly import SpadeConfig


def test_defaults_round_trip_through_json():
    config = SpadeConfig(layers="blocks.1,blocks.2", image_threshold=2.5)
    again = SpadeConfig.from_json(config.to_json())
    assert again == config
    assert again.layers == ("blocks.1", "blocks.2")


def test_empty_layers_mean_the_backbone_pyramid():
    assert SpadeConfig().pyramid == ("blocks.1", "blocks.2", "blocks.4", "blocks.6")
    assert SpadeConfig(backbone="wide_resnet50_2").pyramid == ("layer1", "layer2", "layer3")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"backbone": "vgg"}, "backbone='vgg' is unknown"),
        ({"layers": ("blocks.9",)}, "valid names"),
        ({"k_images": 0}, "k_images=0"),
        ({"crop": 300, "keep_aspect": False}, "exceeds resize"),
        ({"crop": 224}, "needs a square input"),
        ({"keep_aspect": "yes"}, "keep_aspect='yes' must be true or false"),
        ({"feature_pool": 2}, "must be odd"),
        ({"score_mode": "max"}, "score_mode='max'"),
        ({"image_index": "lsh"}, "image_index='lsh'"),
        ({"image_threshold": -1.0}, "image_threshold=-1.0"),
        ({"holdout_fraction": 0.0}, "holdout_fraction"),
        ({"kappa": True}, "kappa=True"),
    ],
)
def test_invalid_values_say_what_is_expected(changes, message):
    with pytest.raises(ValueError, match=message):
        SpadeConfig(**changes)


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="unknown config keys"):
        SpadeConfig.from_dict({"k_image": 5})


def test_frozen():
    with pytest.raises(AttributeError):
        SpadeConfig().k_images = 3
