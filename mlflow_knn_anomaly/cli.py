"""`mlflow-knn-anomaly` console script; the MLproject entry points call the same commands.

Options of build-bank and main map one to one onto SpadeConfig fields (and MLproject parameters).
torch, faiss and MLflow are imported when a command runs, so that --help and argument errors
answer at once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys

import click

from .config import (
    CALIBRATED,
    MAX_CATEGORY_DROP,
    OVERRIDES,
    SYNTHETIC,
    MonitorLimits,
    SpadeConfig,
    TuneSettings,
    parse_categories,
)
from .runtime import THREADS_ENV, configure_threads

_FIELDS = dataclasses.fields(SpadeConfig)
_DEFAULTS = SpadeConfig()


def _config_options(command):
    """Add one --option per SpadeConfig field (underscores become dashes)."""
    for field in reversed(_FIELDS):
        default = getattr(_DEFAULTS, field.name)
        if field.name == "layers":
            kind, default, help_text = str, "", "comma-separated layer names; empty = the backbone's pyramid"
        elif field.name in OVERRIDES:
            kind, default, help_text = (
                str,
                CALIBRATED,
                f"a positive number, or '{CALIBRATED}' (fitted on normal images)",
            )
        else:
            kind, help_text = type(default), None
        command = click.option(
            f"--{field.name.replace('_', '-')}",
            field.name,
            type=kind,
            is_flag=False,  # booleans take a value (true/false), as MLproject passes them
            default=default,
            show_default=True,
            help=help_text,
        )(command)
    return command


def _config(options: dict) -> SpadeConfig:
    values = {f.name: options.pop(f.name) for f in _FIELDS}
    for name in OVERRIDES:
        if values[name] != CALIBRATED:
            try:
                values[name] = float(values[name])
            except ValueError:
                raise ValueError(f"{name}={values[name]!r} must be a positive number or '{CALIBRATED}'.") from None
    return SpadeConfig(**values)


@click.group()
@click.option("--threads", type=int, default=None, help="torch/faiss threads (default: the free cores)")
def cli(threads: int | None) -> None:
    """SPADE kNN anomaly detection on MLflow: build banks, evaluate, promote, roll back."""
    if threads:  # through the environment, so that a model loaded through pyfunc (evaluate) keeps it too
        os.environ[THREADS_ENV] = str(threads)


def _runs(command):
    """A command's body: threads sized (torch and faiss imported) only once it runs."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        configure_threads()
        return command(*args, **kwargs)

    return run


DATA_HELP = "MVTec-layout folder, a folder of them (a line model: one category each), or 'synthetic'"


def _line_options(command):
    """--categories and --category-settings (a root of MVTec folders builds a line model)."""
    command = click.option(
        "--category-settings", default="", help="JSON/YAML file: {category: {setting: value}} overrides"
    )(command)
    return click.option("--categories", default="", help="comma-separated categories of a line root (default: all)")(
        command
    )


@cli.command("build-bank")
@click.option("--data", default=SYNTHETIC, show_default=True, help=DATA_HELP)
@click.option("--model-name", default="spade-anomaly", show_default=True)
@click.option("--skip-bad", is_flag=True, help="skip unreadable training images (logged) instead of failing")
@click.option("--spark-master", default=None, help="extract bank features on Spark (e.g. local[2])")
@_line_options
@_config_options
def build_bank_command(
    data: str, model_name: str, skip_bad: bool, spark_master: str | None, categories: str, category_settings: str,
    **options,
) -> None:  # fmt: skip
    """Fit on <data>/train/good (or each category of a root), log the model and register a new version."""
    config = _config(options)  # a bad option fails before torch and MLflow load
    configure_threads()
    from .mlops import jobs

    run_id, version = jobs.build_bank(
        data, config, model_name, skip_bad=skip_bad, spark_master=spark_master,
        categories=parse_categories(categories), category_settings=category_settings or None,
    )  # fmt: skip
    click.echo(json.dumps({"run_id": run_id, "model_name": model_name, "version": version}))


@cli.command("update-bank")
@click.option("--model-uri", required=True, help="the parent, e.g. models:/spade-anomaly@champion or models:/NAME/3")
@click.option("--data", default="", help="MVTec-layout folder whose train/good holds the new normal images")
@click.option("--images", default="", help="or a list of them (.txt, .csv or .parquet with a path column): "
              "false alarms operators confirmed as normal")  # fmt: skip
@click.option("--model-name", default=None, help="registered model of the new version (default: the parent's)")
@click.option("--skip-bad", is_flag=False, flag_value=True, type=bool, default=False, show_default=True,
              help="skip missing or unreadable images (logged) instead of failing (or: true/false)")  # fmt: skip
@click.option("--category", default="", help="a line model's category to add the images to")
@click.option("--ids", default="", help="with --images capture:LOCATION: the confirmed requests' ids (a .txt "
              "file, one a line, or separated by commas)")  # fmt: skip
@_runs
def update_bank_command(
    model_uri: str, data: str, images: str, model_name: str | None, skip_bad: bool, category: str, ids: str
) -> None:
    """Add new normal images to a model's bank and register the result as a new version (recalibrated)."""
    from .mlops import jobs

    run_id, version = jobs.update_bank(
        model_uri, data or None, model_name, skip_bad=skip_bad, category=category or None, images=images or None,
        ids=ids or None,
    )  # fmt: skip
    click.echo(json.dumps({"run_id": run_id, "model_uri": model_uri, "version": version}))


@cli.command("monitor")
@click.option("--model-uri", default="models:/spade-anomaly@champion", show_default=True)
@click.option("--source", required=True, help="folder of recent images (a line: one subfolder per category), "
              "a .txt/.csv/.parquet list with a path (and category) column, or capture:LOCATION (a served "
              "model's captured requests)")  # fmt: skip
@click.option("--since", default="", help="with a capture: the requests from this time on (ISO 8601, UTC)")
@click.option("--p-value", type=float, default=MonitorLimits.p_value, show_default=True,
              help="a drift test (KS) alerts below this p-value")  # fmt: skip
@click.option("--min-change", type=float, default=MonitorLimits.min_change, show_default=True,
              help="an image statistic alerts only when its median also moved by this share")  # fmt: skip
@click.option("--max-anomalous-share", type=float, default=MonitorLimits.max_anomalous_share, show_default=True,
              help="alert when more than this share of the batch is anomalous")  # fmt: skip
@click.option("--min-images", type=int, default=MonitorLimits.min_images, show_default=True,
              help="smaller batches (per category) run no drift test")  # fmt: skip
@click.option("--experiment", default=None, help="experiment of the run (default: <model name>-monitoring)")
def monitor_command(
    model_uri: str, source: str, p_value: float, min_change: float, max_anomalous_share: float, min_images: int,
    experiment: str | None, since: str,
) -> None:  # fmt: skip
    """Score a batch of production images, log drift figures and an alert to <model name>-monitoring."""
    limits = MonitorLimits(p_value, min_change, max_anomalous_share, min_images)  # fails before torch loads
    configure_threads()
    from .mlops import monitoring

    result = monitoring.monitor(model_uri, source, limits, experiment, since or None)
    click.echo(json.dumps({k: v for k, v in result.items() if k != "figures"}))


@cli.command("add-category")
@click.option("--model-uri", required=True, help="the parent: a line model, or a single-category model")
@click.option("--data", required=True, help="MVTec-layout folder of the new part type")
@click.option("--category", required=True, help="the new category's name")
@click.option("--category-settings", default="", help="JSON/YAML file: {category: {setting: value}} overrides")
@click.option("--model-name", default=None, help="registered model of the new version (default: the parent's)")
@click.option("--skip-bad", is_flag=True, help="skip unreadable images (logged) instead of failing")
@_runs
def add_category_command(
    model_uri: str, data: str, category: str, category_settings: str, model_name: str | None, skip_bad: bool
) -> None:
    """Add a part type to a line model (one category's build) and register a new version."""
    from .mlops import line_jobs

    run_id, version = line_jobs.add_category(model_uri, data, category, category_settings or None, model_name, skip_bad)
    click.echo(json.dumps({"run_id": run_id, "model_uri": model_uri, "category": category, "version": version}))


@cli.command("remove-category")
@click.option("--model-uri", required=True, help="the parent line model")
@click.option("--category", required=True, help="the category to take out")
@click.option("--model-name", default=None, help="registered model of the new version (default: the parent's)")
@_runs
def remove_category_command(model_uri: str, category: str, model_name: str | None) -> None:
    """Take a part type out of a line model and register a new version."""
    from .mlops import line_jobs

    run_id, version = line_jobs.remove_category(model_uri, category, model_name)
    click.echo(json.dumps({"run_id": run_id, "model_uri": model_uri, "category": category, "version": version}))


@cli.command("score")
@click.option("--model-uri", default="models:/spade-anomaly@champion", show_default=True)
@click.option("--source", required=True, help="folder of images (recursive) or .parquet table: path[, image]")
@click.option("--output", required=True, help="Parquet output path (REST columns; mask as PNG bytes)")
@click.option("--master", default=None, help="Spark master (default local[*], or SPARK_REMOTE when set)")
@click.option("--category-column", default="", help="a line model: the .parquet column naming each image's category")
@click.option("--category-from-folder", is_flag=False, type=bool, default=False, show_default=True,
              help="a line model: each image's category is its parent folder's name")  # fmt: skip
@_runs
def score_command(
    model_uri: str, source: str, output: str, master: str | None, category_column: str, category_from_folder: bool
) -> None:
    """Batch-score a folder on Apache Spark with mlflow.pyfunc.spark_udf."""
    from .mlops import spark

    rows = spark.score(spark.session(master), model_uri, source, output, category_column or None, category_from_folder)
    click.echo(json.dumps({"rows": rows, "output": output}))


@cli.command("evaluate")
@click.option("--model-uri", required=True, help="e.g. models:/spade-anomaly/1 or models:/spade-anomaly@champion")
@click.option("--data", default=SYNTHETIC, show_default=True, help="MVTec-layout folder or 'synthetic'")
@_runs
def evaluate_command(model_uri: str, data: str) -> None:
    """Evaluate on <data>/test: metrics, curves and overlays; tag the model version."""
    from .mlops import jobs

    click.echo(json.dumps(jobs.evaluate(model_uri, data), indent=2))


@cli.command("promote")
@click.option("--model-name", default="spade-anomaly", show_default=True)
@click.option("--candidate", required=True, help="version number or alias of the candidate")
@click.option("--metric", default="aupro", show_default=True, help="evaluation metric that decides")
@click.option("--min-delta", type=float, default=0.0, show_default=True, help="margin the candidate must win by")
@click.option("--max-category-drop", type=float, default=MAX_CATEGORY_DROP, show_default=True,
              help="line models: the most any one category may lose")  # fmt: skip
@_runs
def promote_command(model_name: str, candidate: str, metric: str, min_delta: float, max_category_drop: float) -> None:
    """Move @champion to the candidate if it beats the champion on the same data."""
    from .mlops import registry

    decision = registry.promote(model_name, candidate, metric, min_delta, max_category_drop)
    click.echo(json.dumps(dataclasses.asdict(decision)))


@cli.command("rollback")
@click.option("--model-name", default="spade-anomaly", show_default=True)
@_runs
def rollback_command(model_name: str) -> None:
    """Swap @champion and @previous."""
    from .mlops import registry

    click.echo(json.dumps(dataclasses.asdict(registry.rollback(model_name))))


@cli.command("tune")
@click.option("--data", required=True, help="MVTec-layout folder with real defects in test/ (a root: per category)")
@click.option("--model-name", default="spade-anomaly", show_default=True)
@click.option("--validation-fraction", type=float, default=TuneSettings.validation_fraction, show_default=True,
              help="seeded share of each defect type and of good that chooses; the rest proves")  # fmt: skip
@click.option("--validation", default="", help="or a folder whose test/ is the validation split (data's test/ proves)")
@click.option("--seed", type=int, default=TuneSettings.seed, show_default=True)
@click.option("--n-bootstrap", type=int, default=TuneSettings.n_bootstrap, show_default=True,
              help="resamples of the validation images")  # fmt: skip
@click.option("--required-win-rate", type=float, default=TuneSettings.required_win_rate, show_default=True,
              help="share of resamples a candidate must win to replace the default")  # fmt: skip
@click.option("--min-images", type=int, default=TuneSettings.min_images, show_default=True,
              help="fewer validation defects or normal images keep the default")  # fmt: skip
@click.option("--skip-bad", is_flag=True, help="skip unreadable training images (logged) instead of failing")
@_config_options
def tune_command(
    data: str, model_name: str, validation_fraction: float, validation: str, seed: int, n_bootstrap: int,
    required_win_rate: float, min_images: int, skip_bad: bool, **options,
) -> None:  # fmt: skip
    """Choose settings on a validation split of the real defects, register the choice, evaluate it on the rest."""
    config = _config(options)  # bad settings fail before torch and MLflow load
    settings = TuneSettings(validation_fraction, seed, n_bootstrap, required_win_rate, min_images)
    configure_threads()
    from .mlops import tune_job

    click.echo(json.dumps(tune_job.tune(data, model_name, config, settings, validation or None, skip_bad)))


@cli.command("main")
@click.option("--data", default=SYNTHETIC, show_default=True, help=DATA_HELP)
@click.option("--model-name", default="spade-anomaly", show_default=True)
@click.option("--metric", default="aupro", show_default=True)
@click.option("--min-delta", type=float, default=0.0, show_default=True)
@click.option("--max-category-drop", type=float, default=MAX_CATEGORY_DROP, show_default=True)
@click.option("--skip-bad", is_flag=True)
@_line_options
@_config_options
def main_command(
    data: str, model_name: str, metric: str, min_delta: float, max_category_drop: float, skip_bad: bool,
    categories: str, category_settings: str, **options,
) -> None:  # fmt: skip
    """The whole lifecycle: build bank -> evaluate -> register -> promote."""
    config = _config(options)
    configure_threads()
    from .mlops import jobs

    decision = jobs.lifecycle(
        data, config, model_name, metric, min_delta, skip_bad=skip_bad,
        categories=parse_categories(categories), category_settings=category_settings or None,
        max_category_drop=max_category_drop,
    )  # fmt: skip
    click.echo(json.dumps(dataclasses.asdict(decision)))


def _terminate(signum: int, _frame: object) -> None:
    # SIGTERM unwinds like Ctrl-C: runs end as FAILED, temporary directories are removed.
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cli(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("interrupted: nothing was registered", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:
        from mlflow.exceptions import MlflowException  # loaded by then: only a command raises one

        if not isinstance(exc, MlflowException):
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
