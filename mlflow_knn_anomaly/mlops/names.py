"""The names this package gives MLflow, and the one rule that turns a user's name into a key part.

A defect type or a category is a folder name: the user's, not ours. It reaches metric, param and
tag keys (`<defect type>.image_auroc`, `<category>.build_seconds`, `eval.<category>.aupro`), where
MLflow accepts only letters, digits, `_ - . : /` and space, and where `.` is this package's
separator. `key_part` maps a name to a key part:

- a name of 1-100 ASCII letters, digits, `_` and `-` that is not reserved (`mean`) is its own key
  part, so `broken_large.image_auroc` reads as before;
- any other name keeps those characters, each other one becomes `_` (cut at 100), and `-` and the
  first 8 hex digits of the sha256 of the name's UTF-8 bytes follow:
  `chip_around_edge_and_corner+small_cracks` -> `chip_around_edge_and_corner_small_cracks-be43a11e`,
  `mean` -> `mean-82523fae`, `défaut` -> `d_faut-a45c42bd`.

A key part never contains `.`, and distinct names get distinct key parts (the suffix is a hash of
the whole name; only a name typed to equal another's rewritten form, hash included, could meet it).
The original names are kept beside the keys: runs that log such keys log `names.json` ({kind: {key part: name}}).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

MEAN = "mean"  # a line's own figures: mean.<metric> over its categories
RESERVED = (MEAN,)
EVAL_PREFIX = "eval."  # a version's evaluation tags: eval.<metric>, eval.<category>.<metric>
DIGEST_TAG = "eval.data_digest"
NAMES_ARTIFACT = "names.json"
MAX_PART = 100
MAX_KEY = 250  # MLflow's limit on a metric, param or tag key
_PLAIN = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_PART}}}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_KEY = re.compile(r"[A-Za-z0-9_\-.:/ ]+")  # a subset of what MLflow accepts in every version


def key_part(name: str) -> str:
    """The key part of a user's name (a defect type, a category): see the module docstring."""
    if _PLAIN.fullmatch(name) and name not in RESERVED:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return f"{_UNSAFE.sub('_', name)[:MAX_PART]}-{digest}"


def prefixed(name: str | None, key: str) -> str:
    """`<key part of name>.<key>`, or `key` alone when there is no name."""
    return key if name is None else f"{key_part(name)}.{key}"


def names_table(names: Iterable[str]) -> dict[str, str]:
    """{key part: name} for the names (in their order)."""
    return {key_part(name): name for name in names}


def check_keys(keys: Iterable[str], what: str) -> None:
    """Fail now, before any long computation, on a key MLflow would refuse when it is logged.

    Raises:
        ValueError: naming each bad key and what to change.
    """
    bad = [key for key in keys if len(key) > MAX_KEY or not _KEY.fullmatch(key)]
    if bad:
        raise ValueError(
            f"{what}: MLflow cannot log the key(s) {bad[:5]}{' ...' if len(bad) > 5 else ''} (letters, digits, "
            f"'_-.:/' and space, at most {MAX_KEY} characters). Rename the folders or settings they come from."
        )
