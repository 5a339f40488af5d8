"""What a running job shows: TensorBoard summaries, progress lines, a profile, tuning reports.

Watch gives the loop its on_step and on_epoch (trainer.loop) and writes, on the chief alone, into the
job's TensorBoard folder (synced to gs:// as the logs are, trainer.train):
  train/, validation/  `epoch_loss` per epoch, as before (loss and val_loss overlaid, as Keras does)
  steps/               per progress interval (trainer.progress): `loss`, `learning_rate` (read from the
                       optimizer, so a schedule shows), `steps_per_second`, `examples_per_second`
  epochs/              per epoch: `epoch/loss`, `epoch/val_loss` and the validation metric in the data's
                       units: `epoch/val_rmse` and `epoch/val_mae` (regressors), `epoch/val_accuracy` (cnn)
  . (the folder)       at the end: the run's flags as an HParams session, `test/<metric>`,
                       `test/ratio_to_baseline`, and the report's plots as images `plots/<name>`
  plugins/profile/     --profile_steps: a profiler trace of those global steps
"""

import math
import os

import keras
import tensorflow as tf
from absl import logging
from tensorboard.plugins.hparams import api as hp

from trainer import hptuning, progress


def validation_metrics(kind, preprocessing, val_sums):
  """The epoch's validation metric in the data's units from Loop.validate's [loss sum, count, a sum
  per loop.VALIDATION_METRICS]. Tables: the target was standardised (trainer.data.tabular), so errors
  scale by its standard deviation. Forecasts: the validation batches carry each day's scale
  (trainer.data.timeseries), so the sums are in the prices' units already. Images: accuracy."""
  count = max(val_sums[1], 1)
  if kind == "images":
    return {"val_accuracy": val_sums[2] / count}
  squared, absolute = val_sums[2:4]
  scale = preprocessing["target_std"] if kind == "table" else 1.0
  return {"val_rmse": scale * math.sqrt(squared / count), "val_mae": scale * absolute / count}


def learning_rate(optimizer):
  # Keras evaluates a schedule at the optimizer's step count when asked; a LossScaleOptimizer forwards it. A
  # constant rate made under MirroredStrategy is a MirroredVariable, which float() refuses; NumPy reads it.
  return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


def hparams(config):
  """The run's flags as HParams values (strings, numbers, booleans; lists joined, unset left out)."""
  values = {}
  for name, value in vars(config).items():
    if isinstance(value, (list, tuple)):
      value = ",".join(map(str, value))
    if isinstance(value, (bool, int, float, str)):
      values[name] = value
  return values


def test_scalars(report):
  """{tag: value}: the test metric and its ratio to the naive baseline (below 1 is better for RMSE,
  above 1 for accuracy)."""
  test, baseline = report["test"], report["baseline"]
  name = "accuracy" if "accuracy" in test else "rmse"
  ratio = test[name] / baseline[name] if baseline[name] else float("nan")
  return {f"test/{name}": test[name], "test/ratio_to_baseline": ratio}


class Profiler:
  """A profiler trace of global steps [start, end] into log_dir (tf.profiler.experimental), on
  whole calls of `per_call` steps, from global step `step` on. When on_step sees step s, the call
  after s is already running and the next one queued covers steps s + per_call + 1 to
  s + 2 * per_call: the trace starts at the first s from which that call reaches `start` (before
  the first call when it does), unless that call begins after `end`, and stops once `end` is seen."""

  def __init__(self, log_dir, start, end, per_call=1, step=0):
    self.log_dir, self.start, self.end, self.per_call = log_dir, start, end, per_call
    self.active = self.done = False
    self(step - per_call)  # before the first call, as if the call before it had just been read

  def __call__(self, step):
    queued = step + self.per_call  # the next call queued runs steps queued + 1 ... queued + per_call
    if not (self.active or self.done) and queued + self.per_call >= self.start and queued < self.end:
      tf.profiler.experimental.start(self.log_dir)
      self.active = True
      logging.info("profiling from step %d to step %d into %s", queued + 1, self.end, self.log_dir)
    elif self.active and step >= self.end:
      self.close()

  def close(self):
    if self.active:
      tf.profiler.experimental.stop()
      self.active, self.done = False, True


class Watch:
  """The loop's on_step and on_epoch for one job: progress lines and summaries on the chief, per-epoch
  tuning reports in a Vertex AI trial, and the throughput the report gives (every worker measures).

  steps_per_epoch: from the data's size when known, else None (learnt from the first epoch)."""

  def __init__(self, config, log_dir, optimizer, kind, preprocessing, global_step=0, steps_per_epoch=None):
    chief = config.cluster.is_chief
    self.log_dir, self.optimizer, self.kind, self.preprocessing = log_dir, optimizer, kind, preprocessing
    self.writers = {name: tf.summary.create_file_writer(os.path.join(log_dir, name))
                    for name in ("steps", "epochs")} if chief and log_dir else {}
    self.progress = progress.Progress(config.epochs, global_step, config.log_every_steps, steps_per_epoch,
                                      log=chief, on_interval=self.interval if self.writers else None)
    self.profiler = (Profiler(log_dir, *config.profile_range, config.steps_per_loop, global_step)
                     if chief and log_dir and config.profile_range else None)
    self.trial = chief and hptuning.in_trial()
    self.training_seconds = self.validation_seconds = 0.0

  def on_step(self, state, result):
    self.progress(state, result)
    if self.profiler:
      self.profiler(result.step)

  def interval(self, measured):
    with self.writers["steps"].as_default(step=measured.global_step):
      for tag, value in (("loss", measured.interval_loss), ("learning_rate", learning_rate(self.optimizer)),
                         ("steps_per_second", measured.steps_per_second),
                         ("examples_per_second", measured.examples_per_second)):
        tf.summary.scalar(tag, value)

  def on_epoch(self, state, loss, val_sums, train_seconds, validation_seconds):
    self.training_seconds += train_seconds
    self.validation_seconds += validation_seconds
    self.progress.end_epoch(state, validation_seconds)
    val_loss = state.val_loss[-1]
    if self.writers:
      with self.writers["epochs"].as_default(step=state.epoch):
        metrics = validation_metrics(self.kind, self.preprocessing, val_sums)
        for tag, value in {"loss": loss, "val_loss": val_loss, **metrics}.items():
          tf.summary.scalar(f"epoch/{tag}", value)
      for writer in self.writers.values():
        writer.flush()
    if self.trial:
      hptuning.report(val_loss, state.global_step)

  def throughput(self):
    """Steps and examples a second of this process's training (validation left out)."""
    seconds = max(self.training_seconds, 1e-9)
    return {"steps_per_second": round(self.progress.steps / seconds, 3),
            "examples_per_second": round(self.progress.examples / seconds, 1)}

  def close(self):
    if self.profiler:
      self.profiler.close()
    for writer in self.writers.values():
      writer.close()

  def publish(self, config, report, plots_dir, global_step):
    """The run's HParams session, test metrics and plots, into the folder itself (chief only)."""
    if not self.writers:
      return
    writer = tf.summary.create_file_writer(self.log_dir)
    with writer.as_default(step=global_step):
      hp.hparams(hparams(config), trial_id=os.environ.get("CLOUD_ML_TRIAL_ID"))
      for tag, value in test_scalars(report).items():
        tf.summary.scalar(tag, value)
      for name in report["plots"]:
        image = tf.image.decode_png(tf.io.read_file(os.path.join(plots_dir, name)), channels=3)
        tf.summary.image(f"plots/{os.path.splitext(name)[0]}", image[None])
    writer.close()


def steps_per_epoch(prepared, global_batch_size, num_workers=1):
  """Global steps in a training epoch, from the data's size (its summary: the training rows,
  forecast windows or images); None for several workers, whose shards may differ in batches:
  the first epoch says."""
  summary = prepared.summary
  rows = sum(summary["counts"]["train"]) if prepared.kind == "images" else summary["split"]["train"]["rows"]
  return -(-rows // global_batch_size) if num_workers == 1 else None
