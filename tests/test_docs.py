"""The docs site builds with `mkdocs build --strict`, and a broken link fails that build."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What the build reads besides docs/: the config, and the files the pages include (snippets).
SITE_SOURCES = ("mkdocs.yml", "docs", "CHANGELOG.md", "benchmarks/studies")


def _mkdocs_build(root: Path, site: Path) -> subprocess.CompletedProcess:
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as exc:  # CI installs the `docs` extra with `dev`: a missing one is an error
        pytest.fail(f"mkdocs is not installed ({exc}): pip install -e '.[docs]' (the dev extra includes it)")
    # mkdocstrings reads this checkout's package, not another installed copy of it
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env["NO_MKDOCS_2_WARNING"] = "1"  # Material's banner about its successor, printed on every build
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _copy_sources(target: Path) -> Path:
    for name in SITE_SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def test_the_site_builds_strictly(tmp_path):
    done = _mkdocs_build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "api" / "algorithm" / "index.html").is_file()  # the API reference is there
    assert "SpadeDetector" in (tmp_path / "site" / "api" / "algorithm" / "index.html").read_text()


def test_a_broken_link_fails_the_strict_build(tmp_path):
    root = _copy_sources(tmp_path / "repo")
    page = root / "docs" / "concepts.md"
    page.write_text(page.read_text() + "\nSee [a page that does not exist](no-such-page.md).\n")
    done = _mkdocs_build(root, tmp_path / "site")
    assert done.returncode != 0, "mkdocs build --strict passed with a broken link"
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1 and "no-such-page.md" in warnings[0], done.stderr[-4000:]  # that link, nothing else
