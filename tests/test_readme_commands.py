"""Every command of the code blocks of README.md and of the docs pages, run as written, in order,
on the shared data.

The README comes first, then the pages in the order of mkdocs.yml's `nav` (a page's snippet
includes, `--8<-- "path"`, in place). The blocks are read when the tests are collected, so this
file follows the pages and cannot drift from them. A placeholder for the user's data (`/data/...`,
`part.png`) is replaced with shared data (`DATA`, `FILES`; bottle and MPDD in part, `SUBSETS`); a
`/data/...` folder missing from `DATA` fails. The commands share one shell-like sandbox (a copy of
the project, one sqlite tracking store), as a user's session would; a command that cannot run here
is skipped with the reason, and one whose text already ran in the sandbox (a page repeating the
README) is skipped with the place where it ran.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import requests
import yaml
from mlflow import MlflowClient
from PIL import Image, ImageEnhance

from mlflow_knn_anomaly.mlops import registry
from mlflow_knn_anomaly.runtime import THREADS_ENV

from .conftest import free_port, mlflow_store, shared_dataset, shared_subset

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MKDOCS = ROOT / "mkdocs.yml"
SNIPPET = re.compile(r'^--8<-- "([^"]+)"[ \t]*$', flags=re.M)  # pymdownx.snippets, from the repository root
NEW_NORMAL = "new normal images"  # built by the sandbox: see `_new_normal_images`
PLANT = "a line root"  # built by the sandbox: see `_plant`
PLANT_IMAGES = "images of two part types"
LINE_TODAY = "a batch of today's images"  # built by the sandbox: see `_line_today`
FALSE_ALARMS = "the images operators confirmed normal"
CAPTURES = "a served model's captured requests"  # written by the server the README starts
CONFIRMED = "the ids of captured requests operators confirmed normal"  # written by a README command
DATA = {  # a page's folder -> shared data set (under ../shared/data)
    "/data/mvtec/bottle": "mvtec_bottle",
    "/data/tiles": "magnetic_tile",
    "/data/images": "mvtec_bottle/test/broken_large",
    "/data/mvtec/bottle-new": NEW_NORMAL,
    "/data/plant": PLANT,
    "/data/plant/transistor": PLANT,
    "/data/plant-images": PLANT_IMAGES,
    "/data/mpdd/metal_plate": "mpdd_metal_plate",
    "/data/line/today": LINE_TODAY,
    "/data/line/false_alarms.csv": FALSE_ALARMS,
    "/data/captures": CAPTURES,
    "/data/line/confirmed.txt": CONFIRMED,
}
PLANT_PARTS = {"bottle": "mvtec_bottle", "metal_plate": "mpdd_metal_plate", "transistor": "mvtec_transistor"}
# The shared sets these commands read in part, (training images, test images per type): they show
# what a command does (builds, evaluates, tunes, registers), while the accuracy of the whole sets is
# measured by the benchmarks and tests/test_spade.py. MPDD keeps enough defects and normal images
# for `tune`'s validation split to run its bootstrap (7 of each, min_images is 5).
SUBSETS = {"mvtec_bottle": (100, 10), "mpdd_metal_plate": (41, 24)}
FILES = {"part.png": "mvtec_bottle/test/broken_large/000.png"}
SERVE = re.compile(r"^(\w+=\S+ )*mlflow models serve\b")  # a server start, with its environment
DATA_FOLDER = re.compile(r"(?<![\w./-])/data/[\w./-]*\w")  # not ../shared/data/...
RUN_ALL = os.environ.get("MLFLOW_KNN_ANOMALY_README_ALL") == "1"
SKIPS = (  # (pattern of a command, why it does not run here)
    (r"^(python3 -m venv|\. \.venv/bin/activate|pip install)", "an install: these tests run in the environment "
     ".ci/run installs with the README's command"),
    (r"^pytest\b", "the test suite itself (.ci/run runs it): this file is part of it"),
    (r"^(\w+=\S+ )*python benchmarks/", "a benchmark of minutes on 2 cores; the results pages give its figures"),
    (r"^python -c .*'/tmp/bottle-model'", "a benchmark's set-up (the model the load tests serve, fitted into /tmp)"),
    (r"^(deploy/services\.sh|\. \S*client\.env)", "the team's services (PostgreSQL, an S3 emulator, the MLflow "
     "server, Spark): tests/test_production_shape.py starts them and runs the lifecycle against them"),
)  # fmt: skip
SLOW = (  # run only with MLFLOW_KNN_ANOMALY_README_ALL=1: beyond this file's budget of ~6 minutes
    (r"data=/data/tiles", "Magnetic Tile (700 + 640 images) with Lite2 takes minutes on 2 cores"),
)


@dataclass(frozen=True)
class Step:
    """One command of a ```bash block (one `&&` part of a line), or one ```python block, of a page."""

    line: int
    language: str
    text: str
    page: str = "README"  # the page's path without ".md", "/" as "-": README, mlflow, results-accuracy

    @property
    def id(self) -> str:
        words = self.text.split("\n")[0].replace(" --env-manager local", "").split()
        return f"{self.page}-L{self.line}-{'_'.join(words)}"[:90]

    @property
    def where(self) -> str:
        return f"{self.page} line {self.line}"


def readme_steps(text: str, page: str = "README", first_line: int = 1) -> list[Step]:
    """A page's commands in order: bash lines joined at `\\`, comments dropped, split at `&&`."""
    steps = []
    for block in re.finditer(r"^```(bash|python)\n(.*?)^```", text, flags=re.M | re.S):
        first = first_line + text.count("\n", 0, block.start(2))
        if block.group(1) == "python":
            steps.append(Step(first, "python", block.group(2), page))
            continue
        for offset, command in _bash_lines(block.group(2)):
            steps += [Step(first + offset, "bash", part, page) for part in _split_and(command)]
    return steps


def page_steps(path: Path) -> list[Step]:
    """`readme_steps` of a page, with the pages it includes (`--8<-- "path"`) in place."""
    text, steps, start = path.read_text(), [], 0
    for include in SNIPPET.finditer(text):
        steps += readme_steps(text[start : include.start()], _page_name(path), 1 + text.count("\n", 0, start))
        steps += page_steps(ROOT / include.group(1))
        start = include.end()
    return steps + readme_steps(text[start:], _page_name(path), 1 + text.count("\n", 0, start))


def page_text(path: Path) -> str:
    """A page's text with its includes in place."""
    return SNIPPET.sub(lambda include: page_text(ROOT / include.group(1)), path.read_text())


def _page_name(path: Path) -> str:
    relative = path.relative_to(ROOT)
    relative = relative.relative_to("docs") if relative.parts[0] == "docs" else relative
    return relative.with_suffix("").as_posix().replace("/", "-")


def docs_pages() -> list[Path]:
    """The docs pages in the order of mkdocs.yml's `nav`."""

    class Loader(yaml.SafeLoader):  # mkdocs.yml's own tags (`!relative`, ...) are not needed here
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)

    def pages(entries) -> list[str]:
        found = []
        for entry in entries:
            for value in entry.values() if isinstance(entry, dict) else [entry]:
                found += pages(value) if isinstance(value, list) else [value]
        return found

    nav = yaml.load(MKDOCS.read_text(), Loader=Loader)["nav"]
    return [ROOT / "docs" / page for page in pages(nav) if not re.match(r"\w+://", page)]


def _repeat_key(text: str) -> str:
    return " ".join(text.split())  # the same command, whatever the line breaks and indentation


def _bash_lines(block: str) -> list[tuple[int, str]]:
    lines, start, pending = [], 0, ""
    for i, line in enumerate(block.splitlines()):
        if not pending:
            start = i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append((start, _strip_comment(pending + line).strip()))
        pending = ""
    return [(i, line) for i, line in lines if line]


def _unquoted(command: str):
    """(index, character) of the characters of `command` outside quotes."""
    quote = None
    for i, char in enumerate(command):
        if quote:
            quote = None if char == quote and command[i - 1] != "\\" else quote
        elif char in "'\"":
            quote = char
        else:
            yield i, char


def _strip_comment(command: str) -> str:
    for i, char in _unquoted(command):
        if char == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command


def _split_and(command: str) -> list[str]:
    parts, start = [], 0
    for i, _ in _unquoted(command):
        if command.startswith(" && ", i):
            parts.append(command[start:i].strip())
            start = i + 4
    return [*parts, command[start:].strip()]


PAGES = [README, *docs_pages()]
STEPS = [step for page in PAGES for step in page_steps(page)]


class Sandbox:
    """A user's session: a copy of the project as the working directory, one tracking store, the
    shared data in place of the README's placeholders, and a server while one is up."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.data = shared_dataset("mvtec_bottle").parent
        self.cwd = _copy_project(tmp / "project")
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment = self.client.create_experiment("readme", artifact_location=str(tmp / "artifacts"))
        self.env = {k: v for k, v in os.environ.items() if k != THREADS_ENV}  # the product's own sizing
        self.env.update(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_ID=experiment)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        self.subsets = {  # copies: Spark reads them too
            name: shared_subset(name, tmp / "subsets" / name, *size, copy=True) for name, size in SUBSETS.items()
        }
        self.new_normal = _new_normal_images(self.data / "mvtec_bottle", tmp / "bottle-new")
        self.plant, self.plant_images = _plant(tmp / "plant"), _plant_images(self.data, tmp / "plant-images")
        self.line_today, self.false_alarms = _line_today(self.data / "mvtec_bottle", tmp / "line")
        self.port = free_port()
        self.server: subprocess.Popen | None = None
        self.server_step: Step | None = None
        self.server_log = tmp / "server.log"
        self.ran: dict[str, Step] = {}  # command text -> the step where it ran in this sandbox

    def localize(self, text: str) -> str:
        """The command with shared data for the README's placeholders."""

        def folder(match: re.Match) -> str:
            name = match.group(0)
            assert name in DATA, f"README uses {name}: map it to a shared data set in DATA"
            built = {NEW_NORMAL: self.new_normal, PLANT: self.plant, PLANT_IMAGES: self.plant_images,
                     LINE_TODAY: self.line_today, FALSE_ALARMS: self.false_alarms, CAPTURES: self.tmp / "captures",
                     CONFIRMED: self.line_today.parent / "confirmed.txt"}  # fmt: skip
            if DATA[name] == PLANT:
                return str(self.plant / name.removeprefix("/data/plant").lstrip("/"))
            built.update(self.subsets)
            return str(built[DATA[name]] if DATA[name] in built else self.data / DATA[name])

        text = DATA_FOLDER.sub(folder, text)
        for placeholder, shared in FILES.items():
            text = text.replace(placeholder, str(self.data / shared))
        if "m-<id>" in text:  # the newest version's logged model
            latest = max(self.client.search_model_versions("name='bottle'"), key=lambda v: int(v.version))
            text = text.replace("m-<id>", latest.source.removeprefix("models:/"))
        return text.replace("5001", str(self.port))

    def run(self, step: Step) -> subprocess.CompletedProcess:
        keeps_server = "5001" in step.text or step.text.startswith("printf")  # a printf writes a request file
        if self.server is not None and (SERVE.match(step.text) or not keeps_server):
            self.stop_server()  # a new server start takes the port
        command = self.localize(step.text)
        if step.language == "python":
            script = self.tmp / f"{step.page}_{step.line}.py"
            script.write_text(command)
            args = [sys.executable, str(script)]
        else:
            args = ["bash", "-c", command]
        if SERVE.match(command):
            done = self.start_server(args)
            self.server_step = step
        else:
            done = subprocess.run(args, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        self.ran.setdefault(_repeat_key(step.text), step)
        return done

    def repeat_of(self, step: Step) -> Step | None:
        """The step where this command already ran in the sandbox, if its effect still holds: a
        server start repeats only while the server it started is up (otherwise it starts again)."""
        earlier = self.ran.get(_repeat_key(step.text))
        if earlier is not None and SERVE.match(step.text):
            up = self.server is not None and self.server.poll() is None and self.server_step is not None
            return earlier if up and _repeat_key(self.server_step.text) == _repeat_key(step.text) else None
        return earlier

    def start_server(self, args: list[str]) -> subprocess.CompletedProcess:
        with self.server_log.open("w") as log:
            self.server = subprocess.Popen(args, cwd=self.cwd, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and self.server.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{self.port}/ping", timeout=1).status_code == 200:
                    return subprocess.CompletedProcess(args, 0, "", self.server_log.read_text())
            except requests.ConnectionError:
                time.sleep(1)
        pytest.fail(f"the server did not come up:\n{self.server_log.read_text()[-4000:]}")

    def stop_server(self) -> None:
        """Stop the server and wait until its port is free: its workers outlive the `mlflow` process
        for a moment (they finish their requests and write what they captured), and a server
        started next would find the port taken."""
        if self.server is not None:
            self.server.send_signal(signal.SIGTERM)
            self.server.wait(timeout=60)
            self.server, self.server_step = None, None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", self.port)) != 0:
                        return
                time.sleep(0.2)
            pytest.fail(f"the server's port {self.port} was still taken 60 s after it was stopped")

    def champion(self, name: str = "bottle") -> str:
        return self.alias("champion", name)

    def alias(self, alias: str, name: str = "bottle") -> str:
        return str(self.client.get_model_version_by_alias(name, alias).version)

    def aliases(self) -> dict[str, str]:
        """{"bottle": its champion, "bottle.previous": ...} of the models registered so far."""
        found = {}
        for model in self.client.search_registered_models():
            for alias, version in (model.aliases or {}).items():
                found[model.name if alias == "champion" else f"{model.name}.{alias}"] = str(version)
        return found

    def newest(self, name: str):
        return max(self.client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))


def _copy_project(target: Path) -> Path:
    """What a clone holds (tracked and new, unignored files): outputs land here, not in the repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def _new_normal_images(bottle: Path, root: Path, count: int = 20) -> Path:
    """An MVTec-layout folder of new normal images for update_bank: the shared sets hold no second
    batch of bottles, so it links the last `count` of bottle's training images."""
    good = root / "train" / "good"
    good.mkdir(parents=True)
    for path in sorted((bottle / "train" / "good").glob("*.png"))[-count:]:
        (good / path.name).symlink_to(path)
    return root


def _line_today(bottle: Path, root: Path, count: int = 10) -> tuple[Path, Path]:
    """Today's images after a lamp was changed (bottle's normal test images 30 % brighter), and
    the list of those the operators confirmed normal (the first half)."""
    today = root / "today"
    today.mkdir(parents=True)
    for path in sorted((bottle / "test" / "good").glob("*.png"))[:count]:
        ImageEnhance.Brightness(Image.open(path).convert("RGB")).enhance(1.3).save(today / path.name)
    listing = root / "false_alarms.csv"
    pd.DataFrame({"path": [str(p) for p in sorted(today.iterdir())[: count // 2]]}).to_csv(listing, index=False)
    return today, listing


def _plant(root: Path, train: int = 40, per_type: int = 4) -> Path:
    """A line root: one folder per part type (`PLANT_PARTS`), each a subset of a shared set, since
    these commands show a line's lifecycle (the accuracy of the whole sets is the benchmarks')."""
    for name, shared in PLANT_PARTS.items():
        shared_subset(shared, root / name, train, per_type)
    return root


def _plant_images(data: Path, root: Path, count: int = 3) -> Path:
    """A folder of production images, a subfolder per part type (copies: Spark reads real files)."""
    for name in ("bottle", "metal_plate"):
        (root / name).mkdir(parents=True)
        for path in sorted((data / PLANT_PARTS[name] / "test" / "good").glob("*.png"))[:count]:
            shutil.copy(path, root / name / path.name)
    return root


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    box = Sandbox(tmp_path_factory.mktemp("readme"))
    try:
        yield box
    finally:
        box.stop_server()


def _check(sandbox: Sandbox, step: Step, done: subprocess.CompletedProcess, before: dict[str, str]) -> None:
    """What the README says the command does, beyond its exit status."""
    text = step.text
    name = "line" if re.search(r"models:/line\b|model_name=line\b", text) else "bottle"
    if "-e promote" in text:
        decision = json.loads(done.stdout.strip().splitlines()[-1])
        candidate = re.search(r"candidate=(\d+)", text).group(1)
        assert (sandbox.champion(name) == candidate) == decision["promoted"], decision
        assert decision["promoted"] or decision["reason"]
    elif "-e rollback" in text:
        assert sandbox.champion() == before["bottle.previous"] and sandbox.alias("previous") == before["bottle"]
    elif "-e update_bank" in text:
        tags = sandbox.newest(name).tags
        assert tags["parent.version"] == sandbox.champion(name)
        assert "-P images=" not in text or tags["feedback.images"] == "5"
    elif "-e tune" in text:
        version = sandbox.newest("plate")
        assert {"tune.settings", "tune.win_rate", "tune.default.aupro", "tune.tuned.aupro", "eval.aupro"} <= set(
            version.tags
        )
        assert version.tags["tune.tuned.aupro"] == version.tags["eval.aupro"]
    elif "-e monitor" in text:
        (run,) = sandbox.client.search_runs(
            [sandbox.client.get_experiment_by_name(f"{name}-monitoring").experiment_id], max_results=1
        )
        assert run.data.tags["monitor.alert"] == "true" and "brightness drift" in run.data.tags["monitor.reason"]
        assert "-e update_bank" in run.data.tags["monitor.next_step"]
    elif "-e add_category" in text or "-e remove_category" in text:
        tags = sandbox.newest("line").tags
        assert tags["line.change"].startswith(("added", "removed")) and tags["line.unchanged"]
    elif "-e evaluate" in text:
        uri = re.search(r"model_uri=(\S+)", sandbox.localize(text)).group(1)
        with mlflow_store(sandbox.env["MLFLOW_TRACKING_URI"]):
            versions = registry.model_ref(uri).versions
        tags = [sandbox.client.get_model_version(v.name, v.version).tags for v in versions]
        assert tags and all(("eval.mean.aupro" if name == "line" else "eval.aupro") in t for t in tags)
    elif text.startswith("mlflow models serve"):
        assert f"{2 if ' -w 2' in text else 1} worker process(es)" in done.stderr
    elif text.startswith("curl") and "@request.json" in text:
        rows = json.loads(done.stdout)["predictions"]
        assert rows[0]["error"] == "" and rows[0]["category"] == "bottle"
        assert "unknown category 'gear'" in rows[1]["error"]
    elif text.startswith("curl"):
        row = json.loads(done.stdout)["predictions"][0]
        assert row["error"] == "" and row["mask"]
    elif "line-scores.parquet" in text:
        scores = pd.read_parquet(sandbox.cwd / "line-scores.parquet")
        assert sorted(set(scores["category"])) == ["bottle", "metal_plate"] and (scores["error"] == "").all()
    elif "score" in text.split()[:3] or "-e score" in text:
        scores = pd.read_parquet(sandbox.cwd / "scores.parquet")
        assert len(scores) == 20 and (scores["error"] == "").all()
    elif step.language == "python" and "5001" in text:
        assert (sandbox.cwd / "overlay.png").is_file()


def _skip_reason(step: Step) -> str | None:
    if step.language == "python" and "5001" not in step.text:
        return "a Python API example, not a command: tests/test_spade.py and tests/test_evaluator.py run its calls"
    for pattern, reason in SKIPS + (() if RUN_ALL else SLOW):
        if re.search(pattern, step.text):
            return reason + ("" if (pattern, reason) in SKIPS else " (MLFLOW_KNN_ANOMALY_README_ALL=1 runs it)")
    return None


@pytest.mark.parametrize("step", STEPS, ids=[s.id for s in STEPS])
def test_readme_command_runs_as_written(sandbox, step):
    reason = _skip_reason(step)
    if reason:
        pytest.skip(reason)
    earlier = sandbox.repeat_of(step)
    if earlier is not None:
        pytest.skip(f"the same command ran at {earlier.where} in this sandbox")
    before = sandbox.aliases()
    _check(sandbox, step, sandbox.run(step), before)


def test_the_readme_has_commands_for_every_entry_point():
    """The README and the docs pages together run every entry point and name every URI form."""
    commands = " ".join(s.text for s in STEPS)
    for entry_point in ("build_bank", "update_bank", "evaluate", "promote", "rollback", "score", "add_category",
                        "remove_category", "monitor", "tune"):  # fmt: skip
        assert f"-e {entry_point}" in commands, entry_point
    assert "model_uri=models:/bottle/2" in commands
    text = " ".join(page_text(page) for page in PAGES)  # the other forms, tests/test_registry.py resolves each
    for uri in ("models:/bottle@champion", "models:/m-<id>"):
        assert f"`{uri}`" in text, uri
    assert re.search(r"mlflow models serve .* -w 2", commands)


def test_every_readme_data_folder_maps_to_a_shared_data_set():
    used = set(DATA_FOLDER.findall(" ".join(page_text(page) for page in PAGES)))
    assert used <= set(DATA), used - set(DATA)
