"""Model registry promotion with aliases: `champion`, `previous`, and evaluation tags.

A version is promoted only when it was evaluated on the same data (same digest) as the current
champion and beats it on the chosen metric by more than `min_delta`. A line model (several
categories) compares category by category (`_line_decision`): the mean over the categories both
were evaluated on, and no category may drop by more than `max_category_drop`; the tags say which.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from ..config import MAX_CATEGORY_DROP
from .names import DIGEST_TAG, EVAL_PREFIX, MEAN

CHAMPION, PREVIOUS = "champion", "previous"
# A line version's categories as key parts (`names.key_part`), comma-separated, set when it is registered.
CATEGORIES_TAG = "line.categories"


@dataclass(frozen=True)
class Decision:
    promoted: bool
    candidate: str
    champion_before: str | None
    reason: str


def resolve_version(client: MlflowClient, name: str, version_or_alias: str) -> ModelVersion:
    """A model version from its number or alias, with a clear error when neither exists."""
    try:
        if str(version_or_alias).isdigit():
            return client.get_model_version(name, str(version_or_alias))
        return client.get_model_version_by_alias(name, version_or_alias)
    except MlflowException as exc:
        raise ValueError(f"model {name!r} has no version or alias {version_or_alias!r}: {exc.message}") from exc


@dataclass(frozen=True)
class ModelRef:
    """What a model URI names: the MLflow 3 logged model (`m-...`) and its registered versions."""

    model_id: str | None
    versions: list[ModelVersion]


def model_ref(model_uri: str) -> ModelRef:
    """Resolve models:/NAME/VERSION, models:/NAME@ALIAS and models:/m-<id> (a logged model, what a
    registered version's `source` holds); any other URI (runs:/, a path) names no registered version."""
    if not model_uri.startswith("models:/"):
        return ModelRef(None, [])
    client = MlflowClient()
    body = model_uri[len("models:/") :]
    if "@" in body or "/" in body:
        name, _, ref = body.replace("@", "/").partition("/")
        versions = [resolve_version(client, name, ref)]
    else:
        versions = client.search_model_versions(f"source_path='{model_uri}'")
    sources = {v.source for v in versions if v.source.startswith("models:/m-")}
    model_id = body if not versions else (sources.pop()[len("models:/") :] if len(sources) == 1 else None)
    return ModelRef(model_id, list(versions))


def evaluation_of(version: ModelVersion, metric: str) -> tuple[float, str]:
    """(metric value, evaluation-data digest) recorded on a version by `evaluate`."""
    tags = version.tags or {}
    key = EVAL_PREFIX + metric
    if key not in tags or DIGEST_TAG not in tags:
        raise ValueError(
            f"version {version.version} of {version.name!r} has no evaluation ({key} tag missing); "
            "run the evaluate entry point on it first."
        )
    return float(tags[key]), tags[DIGEST_TAG]


def category_figures(version: ModelVersion, metric: str) -> dict[str, float]:
    """{category: metric} of a line version's evaluation tags (`eval.<category>.<metric>`)."""
    suffix = f".{metric}"
    return {
        key[len(EVAL_PREFIX) : -len(suffix)]: float(value)
        for key, value in (version.tags or {}).items()
        if key.startswith(EVAL_PREFIX) and key.endswith(suffix) and key.count(".") == 2
        and key != f"{EVAL_PREFIX}{MEAN}{suffix}" and metric != "data_digest"
    }  # fmt: skip


def promote(
    name: str,
    candidate: str,
    metric: str = "aupro",
    min_delta: float = 0.0,
    max_category_drop: float = MAX_CATEGORY_DROP,
) -> Decision:
    """Move `champion` to the candidate if it wins; keep the old champion as `previous`.

    The rule: candidate[metric] - champion[metric] > min_delta, both evaluated on the same data.
    Line models: see `_line_decision`. The decision is recorded as tags on the candidate version
    (per category for line models: `promotion.<category>.delta`, `promotion.gained`, `promotion.lost`).

    Raises:
        ValueError: the candidate has no evaluation, or was evaluated on other data than the champion.
    """
    client = MlflowClient()
    version = resolve_version(client, name, candidate)
    line = f"{EVAL_PREFIX}{MEAN}.{metric}" in (version.tags or {})
    value, digest = evaluation_of(version, f"{MEAN}.{metric}" if line else metric)
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        champion = None
    tags = {}
    if champion is not None and champion.version == version.version:
        decision = Decision(False, version.version, champion.version, "the candidate already is the champion")
    elif champion is None:
        decision = Decision(True, version.version, None, "no champion yet")
    elif line:
        decision, tags = _line_decision(version, champion, metric, min_delta, max_category_drop)
    else:
        best, best_digest = evaluation_of(champion, metric)
        if best_digest != digest:
            raise ValueError(
                f"version {version.version} was evaluated on other data (digest {digest[:12]}) than champion "
                f"version {champion.version} ({best_digest[:12]}); evaluate both on the same data first."
            )
        wins = value - best > min_delta
        verdict = "beats" if wins else "does not beat"
        reason = f"{metric} {value:.6f} {verdict} champion v{champion.version} {best:.6f} by more than {min_delta}"
        decision = Decision(wins, version.version, champion.version, reason)
    if decision.promoted:
        if champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, champion.version)
        client.set_registered_model_alias(name, CHAMPION, version.version)
    tags["promotion.decision"] = "promoted" if decision.promoted else "kept"
    tags["promotion.reason"] = decision.reason
    for tag, text in tags.items():
        client.set_model_version_tag(name, version.version, tag, text)
    return decision


def _line_decision(
    version: ModelVersion, champion: ModelVersion, metric: str, min_delta: float, max_category_drop: float
) -> tuple[Decision, dict[str, str]]:
    """A line candidate against the champion, category by category.

    Compared on the categories both were evaluated on, each on the same data (its own digest):
    the candidate must beat the champion's mean over them by more than `min_delta`, and no one of
    them may lose more than `max_category_drop`. A candidate that changes which part types the line
    covers (add_category, remove_category) wins on coverage instead of on the mean: it is promoted
    when no shared category loses more than `max_category_drop`.

    Raises:
        ValueError: the champion is no evaluated line, they share no category, or a shared category
            was evaluated on other data.
    """
    mine, theirs = category_figures(version, metric), category_figures(champion, metric)
    if not theirs:
        raise ValueError(
            f"champion v{champion.version} has no per-category evaluation ({EVAL_PREFIX}<category>.{metric}): "
            "a line candidate is compared with a line champion; evaluate the champion on the same root first."
        )
    common = [c for c in mine if c in theirs]
    if not common:
        raise ValueError(f"v{version.version} and champion v{champion.version} share no evaluated category.")
    for c in common:
        key = f"{EVAL_PREFIX}{c}.data_digest"
        if version.tags.get(key) != champion.tags.get(key):
            raise ValueError(
                f"category {c!r} of v{version.version} was evaluated on other data than champion "
                f"v{champion.version}'s; evaluate both on the same data first."
            )
    deltas = {c: mine[c] - theirs[c] for c in common}
    lost = {c: d for c, d in deltas.items() if d < -max_category_drop}
    # Coverage from the versions' categories: one without `metric` (image labels only) still counts.
    covers, covered = _categories(version, mine), _categories(champion, theirs)
    added, removed = sorted(covers - covered), sorted(covered - covers)
    value, best = sum(mine[c] for c in common) / len(common), sum(theirs[c] for c in common) / len(common)
    coverage = bool(added or removed)
    wins = not lost and (coverage or value - best > min_delta)
    reason = (
        f"mean {metric} over the {len(common)} shared categories {value:.6f} against champion v{champion.version} "
        f"{best:.6f} (min_delta {min_delta})"
    )
    if coverage:
        reason += f"; covers other part types (added {added}, removed {removed}): promoted unless a shared one loses"
    if lost:
        drops = ", ".join(f"{c} {d:+.6f}" for c, d in lost.items())
        reason += f"; refused: {metric} drops by more than max_category_drop={max_category_drop} on {drops}"
    tags = {f"promotion.{c}.delta": f"{d:+.6f}" for c, d in deltas.items()}
    tags["promotion.gained"] = ",".join(c for c, d in deltas.items() if d > 0)
    tags["promotion.lost"] = ",".join(lost)
    tags["promotion.added"], tags["promotion.removed"] = ",".join(added), ",".join(removed)
    return Decision(wins, version.version, champion.version, reason), tags


def _categories(version: ModelVersion, figures: dict[str, float]) -> set[str]:
    """The part types a line version covers: its `line.categories` tag, else those it was evaluated on."""
    tag = (version.tags or {}).get(CATEGORIES_TAG)
    return set(tag.split(",")) if tag else set(figures)


def rollback(name: str) -> Decision:
    """Swap `champion` and `previous`: the previous champion serves again."""
    client = MlflowClient()
    try:
        previous = client.get_model_version_by_alias(name, PREVIOUS)
    except MlflowException as exc:
        raise ValueError(f"model {name!r} has no '{PREVIOUS}' alias to roll back to.") from exc
    champion = client.get_model_version_by_alias(name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, previous.version)
    client.set_registered_model_alias(name, PREVIOUS, champion.version)
    reason = f"rolled back from v{champion.version} to v{previous.version}"
    client.set_model_version_tag(name, previous.version, "promotion.decision", "rollback")
    client.set_model_version_tag(name, previous.version, "promotion.reason", reason)
    return Decision(True, previous.version, champion.version, reason)
