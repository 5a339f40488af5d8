"""train_and_evaluate(config, job_dir): data, model, training, test metrics, plots and report."""

import dataclasses
import json
import os
import time

import keras
import tensorflow as tf
from absl import logging

from trainer import loop, report
from trainer.data import images, tabular, timeseries
from trainer.models import MODELS, OPTIMIZERS

# The data module that feeds each model.
DATA = {"dense": tabular, "gru": timeseries, "lstm": timeseries, "cnn": images}


def train_and_evaluate(config, job_dir):
  """Trains config.model into job_dir and returns the report (also written as report.json)."""
  started = time.time()
  keras.utils.set_random_seed(config.seed)
  prepared = DATA[config.model].prepare(config)
  os.makedirs(job_dir, exist_ok=True)

  strategy = tf.distribute.get_strategy()
  with strategy.scope():
    model = MODELS[config.model](prepared.input_shape, prepared.num_outputs, config.bidirectional)
    optimizer = OPTIMIZERS[config.model](config.learning_rate)
    optimizer.build(model.trainable_variables)
  logging.info("model %s: %d parameters; job folder %s", config.model, model.count_params(), job_dir)

  loss = loop.cross_entropy if prepared.kind == "classification" else loop.squared_error
  history = loop.fit(model, optimizer, loss, prepared.make_dataset, strategy,
                     config.batch_size, config.epochs, config.patience, log_dir=os.path.join(job_dir, "logs"))
  predictions = prepared.predict(model)
  evaluation = report.evaluate(prepared, predictions)
  save_model(model, prepared.preprocessing, os.path.join(job_dir, "model"))

  result = {
      "model": config.model,
      "config": dataclasses.asdict(config),
      "data": prepared.summary,
      "epochs_run": len(history["loss"]),
      "best_epoch": history["best_epoch"],
      **evaluation,
      "history": {"loss": history["loss"], "val_loss": history["val_loss"]},
      "weights": [list(w.shape) for w in model.get_weights()],
      "parameters": model.count_params(),
  }
  result["plots"] = report.write_plots(job_dir, prepared, history, predictions, config.model, evaluation)
  result["wall_time_s"] = round(time.time() - started, 1)
  report.write_report(job_dir, result)
  return result


def save_model(model, preprocessing, folder):
  """The model and, beside it, everything inference needs to feed it (see data.*.predict_*)."""
  os.makedirs(folder, exist_ok=True)
  model.save(os.path.join(folder, "model.keras"))
  with open(os.path.join(folder, "preprocessing.json"), "w") as f:
    json.dump(preprocessing, f, indent=2)
