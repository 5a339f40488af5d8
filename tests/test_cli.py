"""The command line shared by trainer.task and trainer.retrain: flags defined from Config's fields,
the Config they make, and CSV mistakes reported before TensorFlow starts."""

import dataclasses
import re
import subprocess
import sys

import pandas as pd
import pytest
from absl import flags

from trainer import cli, config


def test_every_config_field_but_the_set_ones_is_a_flag_of_its_type():
  for field in dataclasses.fields(config.Config):
    if not field.metadata["flag"]:
      assert field.name not in flags.FLAGS, field.name
      continue
    flag = flags.FLAGS[field.name]
    assert field.metadata["help"] and flag.help.endswith(field.metadata["help"]), field.name
    assert flag.default == (list(field.default) if isinstance(field.default, tuple) else field.default), field.name
  assert flags.FLAGS["model"].parser.enum_values == ["dense", "gru", "lstm", "cnn"]
  assert flags.FLAGS["strategy"].parser.enum_values == list(config.STRATEGIES)
  assert isinstance(flags.FLAGS["feature_columns"].parser, flags.ListParser)
  assert flags.FLAGS["restart"].boolean and flags.FLAGS["augment"].boolean


def test_the_flags_make_the_config_and_a_blank_test_start_is_none(tmp_path, monkeypatch):
  monkeypatch.delenv("TF_CONFIG", raising=False)
  monkeypatch.delenv("JOB_COMPLETION_INDEX", raising=False)
  values = flags.FLAGS
  saved = values.flag_values_dict()
  try:
    values(["trainer", "--model=gru", "--feature_columns=Open,Volume", "--test_start=", "--window=9",
            f"--job_dir={tmp_path}", "--export_dir=gs://b/serving"], known_only=True)
    job_dir, made = cli.config_from_flags(epochs=2)
  finally:
    values.unparse_flags()
    for name, value in saved.items():
      values[name].value = value
  assert job_dir == str(tmp_path)
  assert made.model == "gru" and made.feature_columns == ("Open", "Volume") and made.test_start is None
  assert made.window == 9 and made.epochs == 2 and made.export_dir == "gs://b/serving"
  assert made.cluster.source == "none"


@pytest.fixture
def bad_csvs(tmp_path, prices_csv):
  frame = pd.read_csv(prices_csv(rows=200))  # business days from 2015-01-01
  frame.assign(Close=frame.Close.astype(str).where(frame.index != 50, "abc")).to_csv(tmp_path / "text.csv", index=False)
  frame.head(40).to_csv(tmp_path / "short.csv", index=False)
  return tmp_path


SERIES = ["--model=gru", "--date_column=Date", "--target_column=Close"]
RETRAIN = ["--serving_dir=serving"]


@pytest.mark.parametrize("command, expected", [
    (["trainer.task", "--data=prices.csv", "--model=dense", "--target_column=close"],
     "--target_column='close' is not a column of prices.csv"),
    (["trainer.task", "--data=text.csv", *SERIES], "column 'Close' of text.csv has 1 non-numeric values "
                                                   "(first at line 52: 'abc')"),
    (["trainer.task", "--data=short.csv", "--window=60", *SERIES], "short.csv: too short for --window=60"),
    (["trainer.task", "--data=prices.csv", "--test_start=2030-01-01", *SERIES],
     "--test_start=2030-01-01 is outside the data"),
    (["trainer.retrain", *RETRAIN, "--data=text.csv", *SERIES], "column 'Close' of text.csv has 1 non-numeric"),
    (["trainer.retrain", *RETRAIN, "--data=short.csv", "--eval_days=30", *SERIES], "too short for --window=60"),
])
def test_a_csv_mistake_is_reported_before_tensorflow_starts(bad_csvs, command, expected):
  """One line, exit 2, and TensorFlow never imported (python -X importtime lists every import)."""
  done = subprocess.run([sys.executable, "-X", "importtime", "-m", *command], cwd=bad_csvs, capture_output=True,
                        text=True, timeout=120)
  program = "retrain" if command[0] == "trainer.retrain" else "trainer"
  errors = [line for line in done.stderr.splitlines() if line.startswith(f"{program}: error: ")]
  assert done.returncode == 2 and len(errors) == 1, done.stderr[-3000:]
  assert expected in errors[0], errors[0]
  assert "Traceback" not in done.stderr
  imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
  assert "pandas" in imported  # the listing is there, so an absent name means not imported
  assert not [name for name in imported if re.match(r"(tensorflow|keras)(\.|$)", name)], "TensorFlow was imported"


def readme_flag_tables():
  """The flag names of the README's "Flags" section: its first table (trainer.task), then the
  rest (trainer.retrain's own)."""
  import pathlib
  text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
  section = text.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
  tables, current = [], None
  for line in section.splitlines():
    if line.startswith("| flag |"):
      current = set()
      tables.append(current)
    elif line.startswith("| `--") and current is not None:
      current.add(re.match(r"\| `--([a-z0-9_]+)`", line).group(1))
  return tables


def test_the_readme_lists_every_flag_and_only_those():
  import importlib
  tables = readme_flag_tables()
  assert len(tables) == 2
  owned = {}
  for module in ("trainer.task", "trainer.retrain"):
    importlib.import_module(module)
    owned[module] = {flag.name for flag in flags.FLAGS.get_key_flags_for_module(module)}
  assert tables[0] == owned["trainer.task"]
  assert tables[1] == owned["trainer.retrain"] - owned["trainer.task"]


def test_the_early_check_leaves_saying_what_is_done_to_prepare(tmp_path, prices_csv, caplog):
  """csv_file.check reads the file before prepare() reads it again: gaps and the date order are said
  once, by prepare, not twice."""
  from trainer.data import csv_file
  frame = pd.read_csv(prices_csv(rows=200))
  frame.loc[[20, 21], "Close"] = None
  frame.iloc[::-1].to_csv(tmp_path / "gaps.csv", index=False)
  with caplog.at_level("INFO"):
    csv_file.check(config.Config(model="gru", data=str(tmp_path / "gaps.csv"), target_column="Close",
                                 date_column="Date", window=8))
  assert not [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
