"""One table of model families, read by config (before TensorFlow), models and train."""

import subprocess
import sys

from trainer import config, families


def test_one_vocabulary_of_kinds_and_the_old_word_still_read():
  assert {family.kind for family in families.FAMILIES.values()} == {"table", "forecast", "images"}
  assert set(families.METRICS) >= {"table", "forecast", "images"}
  # Exports written before one word named each kind say "classification" for the cnn.
  assert families.kind("classification") == "images" and families.kind("forecast") == "forecast"
  assert families.METRICS["classification"] == families.METRICS["images"] == ("accuracy", False)
  assert config.Config(model="cnn").kind == "images" and config.Config(model="gru").is_forecast


def test_every_family_has_a_network_an_optimizer_and_a_data_module():
  from trainer import models  # imports Keras
  assert list(models.MODELS) == list(families.NAMES) == ["dense", "gru", "lstm", "cnn"]
  assert {name: optimizer.__name__ for name, optimizer in models.OPTIMIZERS.items()} == {
      "dense": "RMSprop", "gru": "Adam", "lstm": "Adam", "cnn": "Adam"}
  for name in families.NAMES:
    assert callable(families.data_module(name).prepare), name


def test_the_table_and_the_config_need_no_tensorflow():
  code = ("import sys; from trainer import config, families, cli, errors; config.Config(model='cnn'); "
          "assert not [m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')]")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
