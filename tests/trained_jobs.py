"""Tiny trained jobs for the export and predict tests, each trained once a session (training is
most of their time), on generated data written as a user's CSV files and image folders are."""

import dataclasses
import os
from typing import Any, Dict

import keras
import numpy as np
import tensorflow as tf

from trainer import train
from trainer.config import Config
from trainer.data import builtin

# Images are written larger than the model takes them, so that prediction has to resize as training did.
IMAGE_SIZE, WRITTEN_SIZE = 24, 30


@dataclasses.dataclass
class Job:
  config: Config
  model: keras.Model  # as trained: loaded from the export's model.keras
  prepared: Any  # the data module's prepare(config), as training had it
  result: Dict[str, Any]
  version_dir: str  # the job's export (<job_dir>/export/1), written by train_and_evaluate


_jobs = {}


def trained(name, tmp_path_factory):
  """The session's job of model `name` (dense, gru or cnn), trained on first use."""
  if name not in _jobs:
    _jobs[name] = _train(name, str(tmp_path_factory.mktemp(f"{name}-job")))
  return _jobs[name]


def _train(name, folder):
  if name == "dense":
    config = Config(model="dense", data=_write(builtin.regression_table(rows=200), folder, "table.csv"),
                    target_column="y", epochs=2)
  elif name == "gru":
    series = builtin.price_series(days=160)
    series["Volume"] = np.random.default_rng(0).integers(1_000, 5_000, len(series))
    config = Config(model="gru", data=_write(series, folder, "prices.csv"), target_column="Close",
                    date_column="Date", feature_columns=("Volume",), window=8, epochs=1, batch_size=64)
  else:
    config = Config(model="cnn", data=write_shapes(os.path.join(folder, "images"), per_class=6),
                    image_size=IMAGE_SIZE, epochs=1, batch_size=8)
  trained = train.run(config, os.path.join(folder, "job"))  # its prepared data: no second decoding
  assert trained.diverged is None, trained.diverged
  result = trained.report
  model = keras.models.load_model(os.path.join(result["export"], "model.keras"))
  return Job(config, model, trained.prepared, result, version_dir=result["export"])


def _write(frame, folder, name):
  path = os.path.join(folder, name)
  frame.to_csv(path, index=False)
  return path


def write_shapes(folder, per_class, seed=0):
  """The built-in shapes as PNG files in one subfolder per class; returns the folder."""
  pixels, labels, class_names = builtin.shape_images(per_class=per_class, size=WRITTEN_SIZE, seed=seed)
  for i, (image, label) in enumerate(zip(pixels, labels)):
    os.makedirs(os.path.join(folder, class_names[label]), exist_ok=True)
    with open(os.path.join(folder, class_names[label], f"{i}.png"), "wb") as f:
      f.write(tf.io.encode_png(image).numpy())
  return folder
