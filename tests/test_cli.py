import dataclasses
from pathlib import Path

import yaml
from click.testing import CliRunner

from mlflow_knn_anomaly import SpadeConfig, cli

FIELDS = {f.name for f in dataclasses.fields(SpadeConfig)}
MLPROJECT = yaml.safe_load((Path(__file__).resolve().parents[1] / "MLproject").read_text())


def test_mlproject_parameters_and_cli_options_map_one_to_one_onto_the_config():
    for entry, command in (("build_bank", cli.build_bank_command), ("main", cli.main_command)):
        params = set(MLPROJECT["entry_points"][entry]["parameters"])
        options = {p.name for p in command.params}
        assert params >= FIELDS, FIELDS - params
        assert options >= FIELDS, FIELDS - options
        assert params - FIELDS <= options - FIELDS  # the non-config parameters exist as options too
        for name in FIELDS:
            assert f"--{name.replace('_', '-')} {{{name}}}" in MLPROJECT["entry_points"][entry]["command"]


def test_mlproject_defaults_equal_the_config_defaults():
    params = MLPROJECT["entry_points"]["build_bank"]["parameters"]
    defaults = SpadeConfig()
    for name in FIELDS:
        expected = getattr(defaults, name)
        if expected is None:
            assert params[name]["default"] == "calibrated"
        elif name == "layers":
            assert params[name]["default"] == ""
        else:
            assert params[name]["default"] == expected, name


def test_invalid_option_is_a_clear_error_before_any_work():
    result = CliRunner().invoke(cli.cli, ["build-bank", "--k-images", "0"])
    assert result.exit_code != 0
    assert "k_images=0 must be an integer >= 1" in str(result.exception)


def test_a_threshold_option_is_a_number_or_calibrated():
    assert cli._config({**_options(), "image_threshold": "2.5"}).image_threshold == 2.5
    assert cli._config(_options()).image_threshold is None
    result = CliRunner().invoke(cli.cli, ["build-bank", "--image-threshold", "high"])
    assert "image_threshold='high' must be a positive number or 'calibrated'" in str(result.exception)


def _options() -> dict:
    return {p.name: p.default for p in cli.build_bank_command.params if p.name in FIELDS}
