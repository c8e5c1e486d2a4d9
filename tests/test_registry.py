import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_knn_anomaly.mlops import registry


@pytest.fixture()
def client(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    client.create_registered_model("m")
    yield client
    mlflow.set_tracking_uri(None)


def _version(client, tmp_path, aupro=None, digest="A"):
    version = str(client.create_model_version("m", source=str(tmp_path)).version)
    if aupro is not None:
        client.set_model_version_tag("m", version, "eval.aupro", str(aupro))
        client.set_model_version_tag("m", version, registry.DIGEST_TAG, digest)
    return version


def _alias(client, alias):
    return str(client.get_model_version_by_alias("m", alias).version)


def test_promotion_rule_aliases_and_rollback(client, tmp_path):
    v1 = _version(client, tmp_path, 0.90)
    assert registry.promote("m", v1).promoted and _alias(client, "champion") == v1
    v2 = _version(client, tmp_path, 0.85)
    decision = registry.promote("m", v2)
    assert not decision.promoted and _alias(client, "champion") == v1
    assert client.get_model_version("m", v2).tags["promotion.decision"] == "kept"
    v3 = _version(client, tmp_path, 0.95)
    assert not registry.promote("m", v3, min_delta=0.1).promoted
    assert registry.promote("m", v3, min_delta=0.01).promoted
    assert (_alias(client, "champion"), _alias(client, "previous")) == (v3, v1)
    registry.rollback("m")
    assert (_alias(client, "champion"), _alias(client, "previous")) == (v1, v3)


def test_refuses_unevaluated_or_differently_evaluated_versions(client, tmp_path):
    registry.promote("m", _version(client, tmp_path, 0.9, digest="A"))
    with pytest.raises(ValueError, match="has no evaluation"):
        registry.promote("m", _version(client, tmp_path))
    with pytest.raises(ValueError, match="evaluated on other data"):
        registry.promote("m", _version(client, tmp_path, 0.99, digest="B"))
    with pytest.raises(ValueError, match="no version or alias 'nope'"):
        registry.promote("m", "nope")


def test_rollback_without_previous_is_a_clear_error(client, tmp_path):
    registry.promote("m", _version(client, tmp_path, 0.9))
    with pytest.raises(ValueError, match="no 'previous' alias"):
        registry.rollback("m")


def test_model_ref_resolves_a_version_an_alias_and_a_logged_model_to_the_same_version(client):
    logged = mlflow.initialize_logged_model(name="detector")
    client.create_model_version("m", source=f"models:/{logged.model_id}", model_id=logged.model_id)
    client.set_registered_model_alias("m", "champion", "1")
    for uri in ("models:/m/1", "models:/m@champion", f"models:/{logged.model_id}"):
        ref = registry.model_ref(uri)
        assert (ref.model_id, [str(v.version) for v in ref.versions]) == (logged.model_id, ["1"]), uri
    assert registry.model_ref("runs:/abc/model").versions == []


def _line_version(client, tmp_path, figures: dict[str, float], digest="A"):
    """A line version evaluated with `figures` {category: aupro} (their mean as eval.mean.aupro)."""
    version = str(client.create_model_version("m", source=str(tmp_path)).version)
    for category, value in figures.items():
        client.set_model_version_tag("m", version, f"eval.{category}.aupro", str(value))
        client.set_model_version_tag("m", version, f"eval.{category}.data_digest", digest + category)
    client.set_model_version_tag("m", version, "eval.mean.aupro", str(sum(figures.values()) / len(figures)))
    client.set_model_version_tag("m", version, registry.DIGEST_TAG, digest)
    return version


def test_a_line_candidate_that_drops_one_category_is_refused_and_the_tags_say_which(client, tmp_path):
    v1 = _line_version(client, tmp_path, {"bottle": 0.90, "tile": 0.80, "plate": 0.70})
    registry.promote("m", v1)
    v2 = _line_version(client, tmp_path, {"bottle": 0.99, "tile": 0.797, "plate": 0.687})  # mean +0.025
    decision = registry.promote("m", v2, max_category_drop=0.005)
    assert not decision.promoted and _alias(client, "champion") == v1
    assert "refused" in decision.reason and "plate -0.013000" in decision.reason
    tags = client.get_model_version("m", v2).tags
    assert tags["promotion.lost"] == "plate" and tags["promotion.gained"] == "bottle"
    assert (tags["promotion.bottle.delta"], tags["promotion.plate.delta"]) == ("+0.090000", "-0.013000")
    assert tags["promotion.tile.delta"] == "-0.003000"  # within the limit
    assert registry.promote("m", v2, max_category_drop=0.02).promoted
    assert _alias(client, "champion") == v2


def test_a_line_candidate_is_compared_on_the_mean_over_categories(client, tmp_path):
    v1 = _line_version(client, tmp_path, {"bottle": 0.90, "tile": 0.80})
    registry.promote("m", v1)
    v2 = _line_version(client, tmp_path, {"bottle": 0.902, "tile": 0.798})  # mean equal: no win
    assert not registry.promote("m", v2).promoted
    v3 = _line_version(client, tmp_path, {"bottle": 0.91, "tile": 0.797})
    assert registry.promote("m", v3).promoted


def test_a_line_that_adds_a_part_type_is_promoted_unless_a_shared_one_loses(client, tmp_path):
    v1 = _line_version(client, tmp_path, {"bottle": 0.90, "tile": 0.80})
    registry.promote("m", v1)
    v2 = _line_version(client, tmp_path, {"bottle": 0.90, "tile": 0.80, "plate": 0.5})  # add_category: ties
    decision = registry.promote("m", v2)
    assert decision.promoted and "added ['plate']" in decision.reason
    assert client.get_model_version("m", v2).tags["promotion.added"] == "plate"
    v3 = _line_version(client, tmp_path, {"bottle": 0.80, "tile": 0.80, "plate": 0.5, "ring": 0.9})
    assert not registry.promote("m", v3).promoted  # bottle lost 0.1


def test_line_categories_evaluated_on_other_data_are_not_compared(client, tmp_path):
    registry.promote("m", _line_version(client, tmp_path, {"bottle": 0.90}))
    v2 = _line_version(client, tmp_path, {"bottle": 0.95}, digest="B")
    with pytest.raises(ValueError, match="category 'bottle' of v2 was evaluated on other data"):
        registry.promote("m", v2)


def test_an_added_part_type_with_image_labels_only_counts_as_coverage(client, tmp_path):
    v1 = _line_version(client, tmp_path, {"bottle": 0.90})
    client.set_model_version_tag("m", v1, registry.CATEGORIES_TAG, "bottle")
    registry.promote("m", v1)
    v2 = _line_version(client, tmp_path, {"bottle": 0.90})  # transistor: no aupro, image labels only
    client.set_model_version_tag("m", v2, registry.CATEGORIES_TAG, "bottle,transistor")
    decision = registry.promote("m", v2)
    assert decision.promoted and "added ['transistor']" in decision.reason
