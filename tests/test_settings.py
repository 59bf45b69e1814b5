"""One typed configuration: every option is a field of a settings model, the three command
lines are derived from the models, --config FILE (YAML or TOML) sits under the command
line, and a bad key or value fails before anything starts, naming the key."""
from __future__ import annotations

import json
import re

import pytest

from cluster.settings import ReplicaSettings
from jobs import batch, regression
from jobs.settings import BatchSettings, RegressionSettings
from memflow import cli
from memflow.settings import COMMAND_LINE, DEFAULT, FILE, SettingsError, flag


@pytest.mark.parametrize("model, parser", [
    (BatchSettings, BatchSettings.parser()),
    (RegressionSettings, RegressionSettings.parser()),
    (cli.RenderSettings, cli._parser()._subparsers._group_actions[0].choices["render"]),
])
def test_every_setting_is_a_flag_and_every_flag_a_setting(model, parser):
    flags = {opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    expected = {flag(name) for name in model.model_fields}
    bools = {f"--no-{name.replace('_', '-')}" for name, f in model.model_fields.items() if f.annotation is bool}
    assert flags == expected | bools | {"--help", "--config"}


def test_a_yaml_file_under_the_command_line_and_where_each_value_came_from(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("preset: tiny\nmax-replicas: 4\nmemory: nam+sma\nreplica_resources: {L40S: 1}\n"
                   "save-latents: true\n")
    resolved = batch.parse_args(["--config", str(job), "--memory", "off", "--crf", "0"])
    s = resolved.settings
    assert (s.max_replicas, s.memory, s.crf, s.save_latents, s.replica_resources) == (4, "off", 0, True, {"L40S": 1})
    assert resolved.sources["max_replicas"] == FILE and resolved.sources["memory"] == COMMAND_LINE
    assert resolved.sources["crf"] == COMMAND_LINE and resolved.sources["max_attempts"] == DEFAULT
    # the replicas get the engine's part, with the device and the endpoint resolved
    replica = batch.replica_config(s, use_gpu=False)
    assert isinstance(replica, ReplicaSettings) and (replica.memory, replica.crf, replica.device) == ("off", 0, "cpu")


def test_a_toml_file_works_the_same(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('memory = "off"\nmax_attempts = 5\nstall-timeout = 120\n')
    s = BatchSettings.from_command_line(["--config", str(job)]).settings
    assert (s.memory, s.max_attempts, s.stall_timeout) == ("off", 5, 120.0)


@pytest.mark.parametrize("text, message", [
    ("memroy: nam\n", "memroy: not an option of this command; did you mean 'memory'?"),
    ("max_replicas: four\n", "max_replicas (from the file): Input should be a valid integer, got str 'four'"),
    ("crf: true\n", "crf (from the file): Input should be a valid integer, got bool True"),
    ("crf: 60\n", "crf (from the file): Input should be less than or equal to 51"),
    ("memory: lots\n", "memory (from the file): Input should be 'off', 'nam' or 'nam+sma'"),
    ("replicas: 2\nmax_replicas: 3\n", "give either replicas or min_replicas/max_replicas"),
    ("- a list\n", "must be a mapping of option names to values"),
])
def test_a_bad_key_or_value_names_the_key_and_ends_with_exit_2(tmp_path, capsys, text, message):
    job = tmp_path / "job.yaml"
    job.write_text(text)
    with pytest.raises(SettingsError, match=re.escape(message)):
        batch.parse_args(["--config", str(job)])
    # before anything starts: no Ray, no output folder
    assert batch.main(["--config", str(job), "--output", str(tmp_path / "out")]) == batch.EXIT_FAILED
    assert message.split(";")[0] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_bad_value_on_the_command_line_is_named_as_its_flag():
    with pytest.raises(SettingsError, match="--max-attempts: Input should be greater than or equal to 1"):
        batch.parse_args(["--max-attempts", "0"])
    with pytest.raises(SystemExit):  # argparse's own: not a number at all
        batch.parse_args(["--max-attempts", "lots"])


def test_render_and_regression_take_config_files_too(tmp_path, capsys):
    job = tmp_path / "render.toml"
    job.write_text('memory = "off"\ncrf = 0\noutput = "x.mp4"\n')
    s = cli.parse(["render", "--config", str(job), "--prompt", "a fox"])
    assert (s.memory, s.crf, s.output, s.prompt) == ("off", 0, "x.mp4", ["a fox"])
    job.write_text('memory = "off"\nmoon = 1\n')
    assert cli.main(["render", "--config", str(job), "--prompt", "a fox", "-o", str(tmp_path / "x.mp4")]) == 2
    assert "moon: not an option of this command" in capsys.readouterr().err
    suite = tmp_path / "suite.json"
    suite.write_text(json.dumps({"memory": "nam+sma", "scripts": [{"seed": 1, "prompts": ["a fox"]}]}))
    regression_file = tmp_path / "regression.yaml"
    regression_file.write_text(f"suite: {suite}\nfidelity: paper\n")
    resolved, _, _ = regression.resolve(regression.parse_args(["--config", str(regression_file)]))
    assert (resolved.settings.memory, resolved.settings.fidelity) == ("nam+sma", "paper")
    assert resolved.sources["memory"] == "suite" and resolved.sources["fidelity"] == FILE
    resolved, _, _ = regression.resolve(regression.parse_args(["--config", str(regression_file), "--memory", "off"]))
    assert resolved.settings.memory == "off" and resolved.sources["memory"] == COMMAND_LINE
    regression_file.write_text("suites: x\n")
    assert regression.main(["--config", str(regression_file)]) == regression.EXIT_FAILED
    assert "suites: not an option of this command; did you mean 'suite'?" in capsys.readouterr().err
