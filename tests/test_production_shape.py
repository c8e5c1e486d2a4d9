"""Production-shaped: MLflow on PostgreSQL with its artifacts in an S3 emulator, Spark as a cluster.

The services are the ones `deploy/services.sh` starts for a team (PostgreSQL, moto_server's S3 API,
`mlflow server --artifacts-destination s3://...`) plus a Spark standalone master and two 1-core
workers, all on 127.0.0.1, so the executors are processes of their own that fetch the model
themselves. Everything goes through the public surface: `mlflow run`, the CLI, `mlflow models serve`.
Every process runs one torch thread: the same count everywhere keeps banks byte-identical, and
the two cores are shared by the executors.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from mlflow import MlflowClient

from mlflow_knn_anomaly.runtime import configure_threads

from .conftest import free_port, mlflow_store, shared_dataset, shared_subset

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "deploy" / "services.sh"
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
NAME = "bottle"
# v1 is modest and cheap; v2 is better on AUPRO (strides 4-16 and sigma 4 suit bottle's small defects)
V1 = {"resize": "128"}
V2 = {"resize": "128", "layers": "blocks.1,blocks.2,blocks.4", "sigma": "4"}
pytestmark = pytest.mark.slow


def _unavailable() -> str | None:
    """Why the services cannot start on this machine, or None."""
    bin_dir = Path(sys.executable).parent
    if not (PG_BIN / "initdb").exists():
        return f"PostgreSQL server binaries are absent from {PG_BIN} (set PG_BIN)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root without a 'postgres' system user to run PostgreSQL as"
    if shutil.which("java") is None:
        return "Spark needs Java (java not found on PATH)"
    for tool in ("moto_server", "mlflow"):
        if not (bin_dir / tool).exists():
            return f"{tool} is not installed in this environment: pip install -e '.[dev,spark]'"
    for module in ("pyspark", "psycopg", "boto3"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed: pip install -e '.[dev,spark]'"
    return None


@dataclass
class Team:
    """The running services and the environment every client process gets."""

    home: Path
    env: dict[str, str]

    @property
    def tracking_uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    @property
    def spark_master(self) -> str:
        return self.env["SPARK_MASTER_URL"]

    def services(self, *args: str) -> None:
        _check(subprocess.run([str(SERVICES), *args], env=self.env, capture_output=True, text=True, timeout=300))

    def client_env(self) -> dict[str, str]:
        """The variables of the recipe's client.env, as `. client.env` sets them."""
        done = subprocess.run(
            ["bash", "-c", f". {self.home / 'client.env'} && env -0"], env=self.env, capture_output=True, check=True
        )
        return dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)


def _check(done: subprocess.CompletedProcess) -> str:
    print(f"{time.strftime('%H:%M:%S')} done: {' '.join(map(str, done.args[1:6]))}", flush=True)  # pytest -s: timings
    assert done.returncode == 0, f"{done.args[:6]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def team():
    """PostgreSQL, the S3 emulator, the MLflow server and a 2-worker Spark cluster; all stopped after."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    # Not pytest's tmp_path: its 0700 parents would keep the postgres user out.
    home = Path(tempfile.mkdtemp(prefix="mlflow-team-"))
    env = dict(os.environ, MLFLOW_TEAM_DIR=str(home), MLFLOW_KNN_ANOMALY_THREADS="1", MLFLOW_WORKERS="1")
    # Short-lived JVMs on 2 cores: the quick JIT tier and one GC thread cost less CPU than C2 and parallel GC.
    env["JDK_JAVA_OPTIONS"] = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update({k: str(free_port()) for k in ("PG_PORT", "S3_PORT", "MLFLOW_PORT", "SPARK_PORT")})
    team = Team(home, env)
    spark = None
    try:
        spark = subprocess.Popen(
            [str(SERVICES), "start", "spark"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        team.services("start")  # postgres, s3, mlflow, while the Spark cluster starts beside them
        out, err = spark.communicate(timeout=300)
        _check(subprocess.CompletedProcess(spark.args, spark.returncode, out, err))
        env.update(team.client_env())
        yield team
    finally:
        if spark is not None and spark.poll() is None:
            spark.kill()
            spark.wait()
        subprocess.run([str(SERVICES), "stop"], env=env, capture_output=True, timeout=300)
        shutil.rmtree(home, ignore_errors=True)


def _mlflow_run_args(entry_point: str, **params: str) -> list[str]:
    args = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "-e", entry_point]
    for key, value in params.items():
        args += ["-P", f"{key}={value}"]
    return args


def _mlflow_run(team: Team, entry_point: str, **params: str) -> str:
    args = _mlflow_run_args(entry_point, **params)
    return _check(subprocess.run(args, env=team.env, capture_output=True, text=True, timeout=600))


def _cli(team: Team, *args: str) -> dict:
    command = [sys.executable, "-m", "mlflow_knn_anomaly.cli", *args]
    out = _check(subprocess.run(command, env=team.env, capture_output=True, text=True, timeout=600))
    return json.loads(out.strip().splitlines()[-1])


def _registry_state(client, name: str) -> tuple:
    """Everything a restart could lose: versions with tags, aliases, runs with their data."""
    versions = {v.version: (v.status, v.run_id, dict(v.tags)) for v in client.search_model_versions(f"name='{name}'")}
    runs = {r.info.run_id: (r.info.status, r.data.params, r.data.metrics) for r in client.search_runs(["0"])}
    return versions, client.get_registered_model(name).aliases, runs


def _alias(client, alias: str) -> str:
    return client.get_model_version_by_alias(NAME, alias).version


@contextlib.contextmanager
def _served(team: Team, model_uri: str, log: Path):
    """`mlflow models serve` on a free 127.0.0.1 port; its whole process group is stopped after."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    with open(log, "w") as out:
        server = subprocess.Popen(
            [*command, "-h", "127.0.0.1", "-p", str(port)], env=team.env, stdout=out, stderr=out, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            assert server.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/ping", timeout=5).ok:
                    break
            time.sleep(0.2)
        else:
            raise AssertionError(f"mlflow models serve did not answer /ping: {log.read_text()[-3000:]}")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _in_process(team: Team, model_uri: str, paths: list[Path]) -> pd.DataFrame:
    """pyfunc predict in this process, the model fetched from the tracking server."""
    threads = torch.get_num_threads()
    try:
        with mlflow_store(team.tracking_uri):
            model = mlflow.pyfunc.load_model(model_uri)
        return model.predict(pd.DataFrame({"image": [p.read_bytes() for p in paths]}))
    finally:
        configure_threads(threads)


def _key(path: str) -> str:
    return "/".join(str(path).split("/")[-2:])


def _bucket_keys(team: Team) -> list[str]:
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{team.env['S3_PORT']}",
        aws_access_key_id="testing",  # the emulator's (services.sh's defaults)
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    return [o["Key"] for o in s3.list_objects_v2(Bucket="mlflow")["Contents"]]


def _check_serving(team: Team, model_uri: str, image: Path, expected: pd.Series, log: Path) -> None:
    """`mlflow models serve`, fetching the model from the server, answers as in-process predict."""
    payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image.read_bytes()).decode()]]}}
    with _served(team, model_uri, log) as url:
        row = requests.post(f"{url}/invocations", json=payload, timeout=120).json()["predictions"][0]
    assert row["score"] == pytest.approx(expected["score"], rel=1e-6)
    assert row["is_anomalous"] == expected["is_anomalous"] and row["error"] == ""
    assert row["mask"] == expected["mask"] != ""


def _check_spark_scoring(team: Team, model_uri: str, source: Path, expected: pd.DataFrame, out: Path) -> None:
    """`score` on the standalone cluster writes the in-process scores and masks."""
    args = ("--model-uri", model_uri, "--source", str(source), "--output", str(out), "--master", team.spark_master)
    assert _cli(team, "score", *args)["rows"] == len(expected)
    scored = pd.read_parquet(out).set_index("path").rename(index=_key).loc[expected.index]
    np.testing.assert_allclose(scored["score"].to_numpy(float), expected["score"].to_numpy(float), rtol=1e-6)
    masks = [base64.b64encode(m).decode() if m is not None else "" for m in scored["mask"]]
    assert masks == list(expected["mask"])


def _check_spark_bank(team: Team, data: Path, local_uri: str) -> None:
    """`build-bank --spark-master` on the cluster registers a bank byte-identical to a local build's."""
    args = ("--data", str(data), "--model-name", f"{NAME}-spark", *(f"--{k}={v}" for k, v in V1.items()))
    version = _cli(team, "build-bank", *args, "--spark-master", team.spark_master)["version"]
    with mlflow_store(team.tracking_uri):
        local, remote = (
            json.loads(Path(mlflow.artifacts.download_artifacts(f"{uri}/data/detector/config.json")).read_text())
            for uri in (local_uri, f"models:/{NAME}-spark/{version}")
        )
    assert local["sha256"] == remote["sha256"]


def test_lifecycle_on_postgres_s3_and_a_spark_cluster(team, tmp_path):
    # A third of bottle: this checks the services' part, not accuracy (copies: the cluster reads them).
    bottle = shared_subset("mvtec_bottle", tmp_path / "bottle", train=70, per_type=8, copy=True)
    client = MlflowClient(team.tracking_uri)
    _mlflow_run(team, "build_bank", data=str(bottle), model_name=NAME, **V1)
    _mlflow_run(team, "evaluate", model_uri=f"models:/{NAME}/1", data=str(bottle))
    _mlflow_run(team, "promote", model_name=NAME, candidate="1")
    assert _alias(client, "champion") == "1"

    before = _registry_state(client, NAME)
    team.services("stop", "postgres")
    team.services("start", "postgres")
    assert _registry_state(client, NAME) == before

    _mlflow_run(team, "main", data=str(bottle), model_name=NAME, **V2)  # build, evaluate, promote in one run
    assert (_alias(client, "champion"), _alias(client, "previous")) == ("2", "1")
    _mlflow_run(team, "rollback", model_name=NAME)
    assert (_alias(client, "champion"), _alias(client, "previous")) == ("1", "2")
    # the model files are objects in the bucket, not files on this disk
    assert sum(k.endswith("data/detector/bank/pooled.npy") for k in _bucket_keys(team)) == 2

    champion = f"models:/{NAME}@champion"
    folder = bottle / "test" / "broken_large"  # 8 images, most past the gate: both stages run on the cluster
    samples = sorted(folder.glob("*.png"))
    expected = _in_process(team, champion, samples).set_index(pd.Index([_key(p) for p in samples]))
    one = folder / "000.png"
    _check_serving(team, champion, one, expected.loc[_key(one)], tmp_path / "serve.log")
    _check_spark_scoring(team, champion, folder, expected, tmp_path / "scores.parquet")
    _check_spark_bank(team, bottle, f"models:/{NAME}/1")


def test_an_s3_outage_mid_build_registers_nothing_and_says_what_failed(team):
    bottle = shared_dataset("mvtec_bottle")
    client = MlflowClient(team.tracking_uri)
    name = f"{NAME}-outage"
    # MLflow retries a failed request for about 4 minutes by default; one retry shows the same failure.
    env = dict(team.env, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    args = _mlflow_run_args("build_bank", data=str(bottle), model_name=name, **V1)
    build = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        runs = []
        for _ in range(600):  # the run exists (and the bank is being built) before anything is stored
            runs = client.search_runs(["0"], f"params.model_name = '{name}' and attributes.status = 'RUNNING'")
            if runs or build.poll() is not None:
                break
            time.sleep(0.2)
        assert runs, build.communicate()[1][-3000:]
        team.services("stop", "s3")
        _, err = build.communicate(timeout=300)
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)
            build.wait()
    assert build.returncode != 0
    assert "could not store the model's files in its artifact store" in err, err[-3000:]
    assert f"no version of '{name}' was registered" in err
    assert client.search_model_versions(f"name='{name}'") == []
    assert client.get_run(runs[0].info.run_id).info.status == "FAILED"
