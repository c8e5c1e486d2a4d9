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
        ({"backbone": "vgg"}, "backbone='vgg' is not one of"),
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
        ({"gate_recall": 0.0}, r"gate_recall=0.0 must be a number in \(0.0, 1.0\]"),
        ({"stage1_feature": "gem"}, "stage1_feature='gem' is not one of"),
        ({"pixel_threshold": float("nan")}, "pixel_threshold=nan must be a positive number"),
    ],
)
def test_invalid_values_say_what_is_expected(changes, message):
    with pytest.raises(ValueError, match=message):
        SpadeConfig(**changes)


def test_the_config_holds_settings_only():
    # What fit learns lives in the calibration, never in the settings (scikit-learn's rule).
    fields = set(SpadeConfig().to_dict())
    assert not fields & {"candidate_threshold", "knn_mean", "knn_std", "map_mean", "map_std", "layer_scales"}
    assert SpadeConfig(image_threshold="calibrated").image_threshold is None


def test_unknown_keys_are_refused():
    with pytest.raises(ValueError, match="unknown config keys"):
        SpadeConfig.from_dict({"k_image": 5})


def test_frozen():
    with pytest.raises(AttributeError):
        SpadeConfig().k_images = 3
