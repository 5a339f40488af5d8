"""train_and_evaluate(config, job_dir): data, model, training with checkpoints, test metrics,
plots, export and report, in four steps: build, start (trainer.start), fit (trainer.loop), publish."""

import dataclasses
import functools
import os
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import (devices, distribution, export, families, hptuning, loop, report, start, steps, storage, summaries,
                     transfer)
from trainer.checkpoints import Checkpoints
from trainer.data import Prepared
from trainer.fingerprints import data_fingerprint, with_extent
from trainer.models import MODELS, OPTIMIZERS
from trainer.errors import WorkerLost
from trainer.preemption import StopSignal
from trainer.state import NOT_A_RETRAIN, WarmStart

# TensorFlow's own INFO lines (checkpoint sharding, SavedModel signatures, some through absl's
# logger, the job's own) would drown the job's.
tf.get_logger().setLevel("WARNING")
logging.get_absl_logger().addFilter(lambda record: record.levelno >= logging.converter.STANDARD_WARNING
                                    or f"{os.sep}tensorflow{os.sep}" not in record.pathname)

# What a collective operation raises when a peer worker is gone ("Connection reset by peer" within
# seconds), rather than a hang.
_PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                  tf.errors.CancelledError)

# The data module that feeds each model.
DATA = {name: families.data_module(name) for name in families.NAMES}


@dataclasses.dataclass
class Folders:
  """Where a job's outputs go (local or gs://) and the local folder this process writes first."""
  job: str
  checkpoints: str
  tensorboard: str
  export: str
  local: str

  @classmethod
  def of(cls, config, job_dir, local_dir):
    return cls(job=job_dir, local=local_dir,
               checkpoints=config.checkpoint_dir or storage.join(job_dir, "checkpoints"),
               tensorboard=config.tensorboard_dir or storage.join(job_dir, "logs"),
               export=config.export_dir or storage.join(job_dir, "export"))

  @property
  def local_logs(self):
    """TensorBoard writes through tf.io.gfile, which reaches no emulator: into a local folder,
    synced to a remote --tensorboard_dir (trainer.storage) after every checkpoint."""
    return self.tensorboard if self.local == self.job and not storage.is_remote(self.tensorboard) else \
        os.path.join(self.local, "logs")


@dataclasses.dataclass
class Job:
  """What _build makes of a config: where it writes, the data it prepared, model and optimizer
  (under the strategy, in the precision policy) and its checkpoints."""
  folders: Folders
  strategy: tf.distribute.Strategy
  prepared: Prepared
  model: keras.Model
  optimizer: keras.optimizers.Optimizer
  policy: str
  checkpoints: Checkpoints
  data_seconds: float = 0.0  # preparing the data


@dataclasses.dataclass
class Trained:
  """What run() leaves: the report (None when training diverged, which `diverged` says), the data
  it prepared (a retrain scores production on its test split) and what the weights started from."""
  report: Optional[dict]
  prepared: Prepared
  warm_start: WarmStart
  diverged: Optional[loop.Diverged] = None


def train_and_evaluate(config, job_dir, warm_start=NOT_A_RETRAIN):
  """Trains config.model into job_dir (local or gs://) and returns the report (written as
  report.json by the chief; other workers of a cluster write only to a temporary folder).
  Raises loop.Diverged when the loss became NaN or infinite. warm_start: see run."""
  trained = run(config, job_dir, warm_start)
  if trained.diverged:
    raise trained.diverged
  return trained.report


def run(config, job_dir, warm_start=NOT_A_RETRAIN):
  """Builds, starts (trainer.start: resumes from the job's latest checkpoint unless
  config.restart), trains, then evaluates and publishes. warm_start: an export version folder
  whose weights a new job begins from when it is the same network, or a state.WarmStart saying
  why there is none. A divergence is returned (Trained.diverged), not raised."""
  started = time.time()
  devices.make_deterministic(config.deterministic)  # first: TensorFlow's docs ask for it before any op runs
  # First: a multi-worker strategy must exist before other TensorFlow work, and a split CPU
  # before TensorFlow sets up its devices.
  strategy = distribution.make_strategy(config.strategy, config.cluster, config.cpu_devices, config.communication)
  devices.describe()
  replicas = strategy.num_replicas_in_sync
  placement = {"strategy": distribution.strategy_name(strategy), "num_workers": config.cluster.num_workers,
               "num_replicas": replicas, "global_batch_size": config.batch_size,
               "per_replica_batch_size": distribution.per_replica_batch_size(config.batch_size, replicas)}
  logging.info("strategy %(strategy)s: %(num_replicas)d replica(s) on %(num_workers)d worker(s), global batch "
               "%(global_batch_size)d (%(per_replica_batch_size)d per replica)", placement)
  local_dir = distribution.writable_job_dir(job_dir, config.cluster)
  try:
    # After the strategy: MultiWorkerMirroredStrategy installs a SIGTERM handler of its own.
    with StopSignal(config.preemption_grace_seconds) as stop:
      job = _build(config, Folders.of(config, job_dir, local_dir), strategy)  # 1. build
      state = start.begin(config, job.checkpoints, job.model, job.optimizer, strategy, warm_start)  # 2. start
      # Where the wall time goes (the report's wall_time): start-up is everything before training but the data.
      timing = {"startup_s": time.time() - started - job.data_seconds, "data_s": job.data_seconds}
      try:
        history, watch = _fit(config, job, state, stop, timing)  # 3. fit
      except loop.Diverged as e:  # no report: a retrain records the rejection
        return Trained(None, job.prepared, state.warm_start, e)
      result = _publish(config, job, state, history, {**placement, "precision": job.policy}, started,  # 4. publish
                        watch, timing)
      return Trained(result, job.prepared, state.warm_start)
  except _PEER_FAILURES as e:
    if config.cluster.num_workers < 2:
      raise
    raise WorkerLost(e) from e
  except tf.errors.UnknownError as e:
    # A streamed shard that could not be downloaded (trainer.transfer.streamed): its one line, exit 170.
    raise transfer.stream_failure(e) or e
  finally:
    distribution.cleanup(local_dir, job_dir)


def _build(config, folders, strategy):
  """The data, model, optimizer and checkpoints of a job, from its seed."""
  keras.utils.set_random_seed(config.seed)
  # Before the data is read: a file rewritten while prepare() reads it must not be recorded as the
  # data this job trained on (a resume would then accept the new file).
  fingerprint = data_fingerprint(config)
  data_started = time.time()
  prepared = DATA[config.model].prepare(config)
  data_seconds = time.time() - data_started
  os.makedirs(folders.local, exist_ok=True)
  policy = distribution.precision_policy(config.mixed_precision)
  keras.mixed_precision.set_global_policy(policy)
  try:
    with strategy.scope():
      model = MODELS[config.model](prepared.input_shape, prepared.num_outputs, config.bidirectional)
      optimizer = OPTIMIZERS[config.model](_learning_rate(config, prepared))
      if policy == "mixed_float16":
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
      # Built before any restore, or the optimizer's state would only be restored at the first step.
      optimizer.build(model.trainable_variables)
  finally:
    keras.mixed_precision.set_global_policy("float32")  # the layers keep theirs; nothing else inherits it
  logging.info("model %s: %d parameters; job folder %s", config.model, model.count_params(), folders.job)
  # Images streamed under --cache=none come in another order than cached ones (trainer.data.images).
  order = {"cache": prepared.summary["stream_order"]} if "stream_order" in prepared.summary else {}
  identity = {"config": {**config.resume_identity(policy), **order},
              "data": with_extent(fingerprint, prepared.summary)}
  checkpoints = Checkpoints(folders.checkpoints, model, optimizer, config.keep_checkpoints,
                            publish=config.cluster.is_chief, info=identity)
  return Job(folders, strategy, prepared, model, optimizer, policy, checkpoints, data_seconds)


def _learning_rate(config, prepared):
  """--learning_rate, or its schedule (trainer.steps.learning_rate) over --epochs of this data: an
  epoch's steps from the data's summary (its training rows or images; no dataset is built), the
  same on every worker even where their shards differ by a batch."""
  if config.lr_schedule == "constant" and not config.warmup_steps:
    return config.learning_rate
  per_epoch = summaries.steps_per_epoch(prepared, config.batch_size)
  return steps.learning_rate(config.lr_schedule, config.learning_rate, config.warmup_steps, config.epochs * per_epoch)


def _fit(config, job, state, stop, timing):
  """Trains from state (loop.fit), checkpointing as the flags say, watched (trainer.summaries);
  returns fit's history and the Watch. Adds training_s and validation_s to timing."""
  sync_logs = functools.partial(_sync_logs, config, job.folders)
  loss = loop.cross_entropy if job.prepared.kind == "images" else loop.squared_error
  checkpointing = loop.Checkpointing(job.checkpoints, config.checkpoint_every_steps, stop, sync_logs,
                                     config.async_checkpoints)
  prepared = job.prepared
  watch = summaries.Watch(config, job.folders.local_logs, job.optimizer, prepared.kind, prepared.preprocessing,
                          state.global_step,
                          summaries.steps_per_epoch(prepared, config.batch_size, config.cluster.num_workers))
  jit_compile = devices.jit_compile(job.model, config.jit_compile)
  try:
    history = loop.fit(job.model, job.optimizer, loss, prepared.make_dataset, job.strategy, config.batch_size,
                       config.epochs, config.patience, log_dir=job.folders.local_logs,
                       jit_compile=jit_compile, checkpointing=checkpointing, state=state,
                       on_step=watch.on_step, on_epoch=watch.on_epoch, steps_per_loop=config.steps_per_loop,
                       clip_norm=config.clip_norm)
  finally:
    watch.close()
  sync_logs()
  timing.update(training_s=watch.training_seconds, validation_s=watch.validation_seconds)
  return history, watch


def _sync_logs(config, folders):
  if config.cluster.is_chief and folders.local_logs != folders.tensorboard:
    transfer.sync_dir(folders.local_logs, folders.tensorboard)


def _publish(config, job, state, history, placement, started, watch, timing):
  """Evaluates the trained model on the test split; writes plots, the export (the chief), the
  TensorBoard summaries of the run and the report, last; returns the report."""
  model, folders, prepared, is_chief = job.model, job.folders, job.prepared, config.cluster.is_chief
  if is_chief:
    hptuning.report(history["val_loss"][history["best_epoch"] - 1], history["global_step"])
  # Every worker logs it: workers of one job that disagree have trained different weights.
  checksum = float(sum(np.abs(w).astype(np.float64).sum() for w in model.get_weights()))
  logging.info("final weights checksum %.10g", checksum)
  evaluation_started = time.time()
  predictions = prepared.predict(model)
  evaluation = report.evaluate(prepared, predictions)
  result = {
      "model": config.model,
      "config": dataclasses.asdict(config),
      **placement,
      "data": prepared.summary,
      "trained_on": job.checkpoints.info["data"],  # what a retrain compares to skip a night without new data
      "resumed_from": state.resumed_from,
      "warm_start": state.warm_start.to_json(),
      "epochs_run": len(history["loss"]),
      "best_epoch": history["best_epoch"],
      **evaluation,
      "history": {"loss": history["loss"], "val_loss": history["val_loss"]},
      "weights": [list(w.shape) for w in model.get_weights()],
      "parameters": model.count_params(),
      "weights_checksum": checksum,
      "checkpoints": folders.checkpoints,
  }
  result["plots"] = report.write_plots(folders.local, prepared, history, predictions, config.model, evaluation)
  export_started = time.time()
  timing["evaluation_s"] = export_started - evaluation_started
  if is_chief:
    result["export"] = export.write_export(model, prepared, result, folders.export)
  timing["export_s"] = time.time() - export_started
  result["throughput"] = watch.throughput()
  wall_time_s = time.time() - started
  # The rest: checkpoints at epoch ends, TensorBoard syncs, the report itself.
  timing["other_s"] = wall_time_s - sum(timing.values())
  result["wall_time"] = {name: round(seconds, 2) for name, seconds in timing.items()}
  result["wall_time_s"] = round(wall_time_s, 1)
  watch.publish(config, result, os.path.join(folders.local, "plots"), history["global_step"])
  _sync_logs(config, folders)
  # The report last: whoever sees it can rely on everything it names being there.
  if folders.local != folders.job and is_chief:
    # The plots; the logs went to --tensorboard_dir already, the model to --export_dir.
    transfer.sync_dir(os.path.join(folders.local, "plots"), storage.join(folders.job, "plots"))
  report.write_report(folders.local if not is_chief else folders.job, result)
  return result
