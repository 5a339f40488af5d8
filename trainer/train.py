"""train_and_evaluate(config, job_dir): data, model, training, test metrics, plots and report."""

import dataclasses
import json
import os
import time

import keras
import numpy as np
from absl import logging

from trainer import distribution, loop, report
from trainer.data import images, tabular, timeseries
from trainer.models import MODELS, OPTIMIZERS

# The data module that feeds each model.
DATA = {"dense": tabular, "gru": timeseries, "lstm": timeseries, "cnn": images}


def train_and_evaluate(config, job_dir):
  """Trains config.model into job_dir and returns the report (written as report.json by the
  chief; other workers of a cluster write only to a temporary folder, removed at the end)."""
  started = time.time()
  # First: a multi-worker strategy must exist before other TensorFlow work, and a split CPU
  # before TensorFlow sets up its devices.
  strategy = distribution.make_strategy(config.strategy, config.cluster, config.cpu_devices)
  replicas = strategy.num_replicas_in_sync
  distributed = {"strategy": distribution.strategy_name(strategy), "num_workers": config.cluster.num_workers,
                 "num_replicas": replicas, "global_batch_size": config.batch_size,
                 "per_replica_batch_size": distribution.per_replica_batch_size(config.batch_size, replicas)}
  logging.info("strategy %(strategy)s: %(num_replicas)d replicas on %(num_workers)d workers, global batch "
               "%(global_batch_size)d (%(per_replica_batch_size)d per replica)", distributed)
  out_dir = distribution.writable_job_dir(job_dir, config.cluster)
  try:
    return _train_and_evaluate(config, out_dir, strategy, distributed, started)
  finally:
    distribution.cleanup(out_dir, job_dir)


def _train_and_evaluate(config, job_dir, strategy, distributed, started):
  keras.utils.set_random_seed(config.seed)
  prepared = DATA[config.model].prepare(config)
  os.makedirs(job_dir, exist_ok=True)

  policy = distribution.precision_policy(config.mixed_precision)
  keras.mixed_precision.set_global_policy(policy)
  try:
    with strategy.scope():
      model = MODELS[config.model](prepared.input_shape, prepared.num_outputs, config.bidirectional)
      optimizer = OPTIMIZERS[config.model](config.learning_rate)
      if policy == "mixed_float16":
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
      optimizer.build(model.trainable_variables)
  finally:
    keras.mixed_precision.set_global_policy("float32")  # the layers keep theirs; nothing else inherits it
  logging.info("model %s: %d parameters; job folder %s", config.model, model.count_params(), job_dir)

  loss = loop.cross_entropy if prepared.kind == "classification" else loop.squared_error
  history = loop.fit(model, optimizer, loss, prepared.make_dataset, strategy, config.batch_size, config.epochs,
                     config.patience, log_dir=os.path.join(job_dir, "logs"), jit_compile=config.jit_compile)
  # Every worker logs it: workers of one job that disagree have trained different weights.
  checksum = float(sum(np.abs(w).astype(np.float64).sum() for w in model.get_weights()))
  logging.info("final weights checksum %.10g", checksum)
  predictions = prepared.predict(model)
  evaluation = report.evaluate(prepared, predictions)
  save_model(model, prepared.preprocessing, os.path.join(job_dir, "model"))

  result = {
      "model": config.model,
      "config": dataclasses.asdict(config),
      **distributed,
      "precision": policy,
      "data": prepared.summary,
      "epochs_run": len(history["loss"]),
      "best_epoch": history["best_epoch"],
      **evaluation,
      "history": {"loss": history["loss"], "val_loss": history["val_loss"]},
      "weights": [list(w.shape) for w in model.get_weights()],
      "parameters": model.count_params(),
      "weights_checksum": checksum,
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
