"""train_and_evaluate(config, job_dir): data, model, training with checkpoints, test metrics,
plots, export and report."""

import dataclasses
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import distribution, export, families, hptuning, loop, report, storage, transfer
from trainer.checkpoints import Checkpoints, data_change, data_fingerprint, with_extent
from trainer.config import UserError
from trainer.models import MODELS, OPTIMIZERS
from trainer.preemption import SERVING_BUSY, Restart, StopSignal, WorkerLost

# TensorFlow's own INFO lines (checkpoint sharding, SavedModel signatures, some through absl's
# logger, the job's own) would drown the job's.
tf.get_logger().setLevel("WARNING")
logging.get_absl_logger().addFilter(lambda record: record.levelno >= logging.converter.STANDARD_WARNING
                                    or f"{os.sep}tensorflow{os.sep}" not in record.pathname)

# What a collective operation raises when a peer worker is gone (GUIDE section 4: "Connection
# reset by peer" within seconds), rather than a hang.
_PEER_FAILURES = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.AbortedError,
                  tf.errors.CancelledError)

# The data module that feeds each model.
DATA = {name: families.data_module(name) for name in families.NAMES}


class WarmStartRace(Restart):
  """Workers warm-started from different versions: a retry starts them from the same one."""
  exit_code = SERVING_BUSY


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


def train_and_evaluate(config, job_dir, warm_start=None):
  """Trains config.model into job_dir (local or gs://) and returns the report (written as
  report.json by the chief; other workers of a cluster write only to a temporary folder).
  Resumes from the job's latest checkpoint unless config.restart. warm_start: an export version
  folder whose weights a fresh start begins from, when it is the same network (export.warm_start)."""
  started = time.time()
  # First: a multi-worker strategy must exist before other TensorFlow work, and a split CPU
  # before TensorFlow sets up its devices.
  strategy = distribution.make_strategy(config.strategy, config.cluster, config.cpu_devices)
  replicas = strategy.num_replicas_in_sync
  distributed = {"strategy": distribution.strategy_name(strategy), "num_workers": config.cluster.num_workers,
                 "num_replicas": replicas, "global_batch_size": config.batch_size,
                 "per_replica_batch_size": distribution.per_replica_batch_size(config.batch_size, replicas)}
  logging.info("strategy %(strategy)s: %(num_replicas)d replica(s) on %(num_workers)d worker(s), global batch "
               "%(global_batch_size)d (%(per_replica_batch_size)d per replica)", distributed)
  local_dir = distribution.writable_job_dir(job_dir, config.cluster)
  try:
    # After the strategy: MultiWorkerMirroredStrategy installs a SIGTERM handler of its own.
    with StopSignal() as stop:
      return _train_and_evaluate(config, Folders.of(config, job_dir, local_dir), strategy, distributed, stop,
                                 started, warm_start)
  except _PEER_FAILURES as e:
    if config.cluster.num_workers < 2:
      raise
    raise WorkerLost(e) from e
  finally:
    distribution.cleanup(local_dir, job_dir)


def _train_and_evaluate(config, folders, strategy, distributed, stop, started, warm_start):
  keras.utils.set_random_seed(config.seed)
  # Before the data is read: a file rewritten while prepare() reads it must not be recorded as the
  # data this job trained on (a resume would then accept the new file).
  fingerprint = data_fingerprint(config)
  prepared = DATA[config.model].prepare(config)
  os.makedirs(folders.local, exist_ok=True)
  is_chief = config.cluster.is_chief

  policy = distribution.precision_policy(config.mixed_precision)
  keras.mixed_precision.set_global_policy(policy)
  try:
    with strategy.scope():
      model = MODELS[config.model](prepared.input_shape, prepared.num_outputs, config.bidirectional)
      optimizer = OPTIMIZERS[config.model](config.learning_rate)
      if policy == "mixed_float16":
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
      # Built before any restore, or the optimizer's state would only be restored at the first step.
      optimizer.build(model.trainable_variables)
  finally:
    keras.mixed_precision.set_global_policy("float32")  # the layers keep theirs; nothing else inherits it
  logging.info("model %s: %d parameters; job folder %s", config.model, model.count_params(), folders.job)

  checkpoints = Checkpoints(folders.checkpoints, model, optimizer, config.keep_checkpoints, publish=is_chief,
                            info={"config": config.resume_identity(),
                                  "data": with_extent(fingerprint, prepared.summary)})
  state, best_weights, resumed_from, saved = _resume(config, checkpoints, model, optimizer, strategy)
  warm_started = _warm_start(config, strategy, model, saved, warm_start)
  checkpoints.info["warm_start"] = warm_started

  def sync_logs():
    if is_chief and folders.local_logs != folders.tensorboard:
      transfer.sync_dir(folders.local_logs, folders.tensorboard)

  loss = loop.cross_entropy if prepared.kind == "images" else loop.squared_error
  checkpointing = loop.Checkpointing(checkpoints, config.checkpoint_every_steps, stop, sync_logs,
                                     restored=resumed_from and resumed_from["checkpoint"])
  try:
    history = loop.fit(model, optimizer, loss, prepared.make_dataset, strategy, config.batch_size, config.epochs,
                       config.patience, log_dir=folders.local_logs, jit_compile=config.jit_compile,
                       checkpointing=checkpointing, state=state, best_weights=best_weights)
  except loop.Diverged as e:
    e.warm_start = warm_started  # for the retraining history: no report is written
    raise
  sync_logs()
  if is_chief:
    hptuning.report(history["val_loss"][history["best_epoch"] - 1], history["global_step"])
  # Every worker logs it: workers of one job that disagree have trained different weights.
  checksum = float(sum(np.abs(w).astype(np.float64).sum() for w in model.get_weights()))
  logging.info("final weights checksum %.10g", checksum)
  predictions = prepared.predict(model)
  evaluation = report.evaluate(prepared, predictions)

  result = {
      "model": config.model,
      "config": dataclasses.asdict(config),
      **distributed,
      "precision": policy,
      "data": prepared.summary,
      "resumed_from": resumed_from,
      "warm_start": warm_started,
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
  if is_chief:
    result["export"] = export.write_export(model, prepared, result, folders.export)
  result["wall_time_s"] = round(time.time() - started, 1)
  # The report last: whoever sees it can rely on everything it names being there.
  if folders.local != folders.job and is_chief:
    # The plots; the logs went to --tensorboard_dir already, the model to --export_dir.
    transfer.sync_dir(os.path.join(folders.local, "plots"), storage.join(folders.job, "plots"))
  report.write_report(folders.local if not is_chief else folders.job, result)
  return result


def _warm_start(config, strategy, model, saved, version_dir):
  """What the model starts from (export.warm_start's answer, or None): a resumed job, what its
  first attempt started from (the checkpoint's state.json); a fresh one, version_dir's weights
  when it is the same network."""
  if saved is not None:
    warm_started = saved.get("warm_start")
  else:
    warm_started = export.warm_start(model, version_dir, config.model) if version_dir else None
  if warm_started and warm_started["used"]:
    logging.info("warm start: from the weights of version %s (%s)", warm_started["version"], warm_started["from"])
  elif warm_started:
    logging.info("warm start: not from %s: %s; from random weights", warm_started["from"], warm_started["reason"])
  if not _same_on_every_worker(strategy, config.cluster,
                               warm_started["version"] if warm_started and warm_started["used"] else 0):
    # Each worker looked up production by itself, and a retrain promoted a version in between.
    raise WarmStartRace("the workers started from different production versions (one was promoted while they "
                        "started); run the job again")
  return warm_started


def _resume(config, checkpoints, model, optimizer, strategy):
  """(loop state, best weights, report's resumed_from, the checkpoint's state.json) from the job's
  latest checkpoint, or Nones for a fresh start. Every worker restores the same checkpoint; a job
  that cannot read its checkpoint folder stops here (trainer.storage.StorageError) rather than
  start again."""
  if config.restart:
    if config.cluster.is_chief:
      logging.info("--restart: removing the checkpoints in %s", checkpoints.directory)
      checkpoints.remove_all()
    return None, None, None, None
  restored = checkpoints.restore_latest(check=lambda saved: _check_same_job(config, checkpoints, saved))
  step = restored[0] if restored else 0
  _check_same_step(strategy, config.cluster, step)
  if restored is None:
    logging.info("no checkpoint in %s: training from the start", checkpoints.directory)
    return None, None, None, None
  _, saved, best_weights = restored
  folder = checkpoints.restored
  state = _loop_state(saved, folder)
  replicas = strategy.num_replicas_in_sync
  if state.step and state.num_replicas != replicas:
    logging.warning("checkpoint written by %d replicas, resumed on %d in the middle of epoch %d: the rest of "
                    "that epoch skips as many examples but not the same ones", state.num_replicas, replicas,
                    state.epoch + 1)
  saved_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))  # a MirroredVariable under a strategy
  if saved_rate != np.float32(config.learning_rate):
    logging.info("learning rate %g from the checkpoint replaced by --learning_rate=%g", saved_rate,
                 config.learning_rate)
    optimizer.learning_rate = config.learning_rate
  logging.info("resuming from %s: %d epochs done, %d steps into epoch %d (global step %d)",
               folder, state.epoch, state.step, state.epoch + 1, state.global_step)
  return state, best_weights, {"checkpoint": folder, "epoch": state.epoch, "step": state.step,
                               "global_step": state.global_step}, saved


def _check_same_job(config, checkpoints, saved):
  """Refuses a checkpoint (its state.json, read before its variables, which would only fail to
  load as if corrupt) written with other flags or on other data: a file rewritten since (a
  nightly ETL between a preemption and the retry) would resume on other rows and statistics."""
  mismatch = config.resume_mismatch(saved.get("config", {}))
  if mismatch:
    name, before, now = mismatch
    raise UserError(f"{checkpoints.directory} holds checkpoints of another job: --{name} was {before!r}, now "
                    f"{now!r}; use another --job_dir, or --restart to discard them")
  change = data_change(saved.get("data"), checkpoints.info["data"])  # checkpoints before fingerprints: none
  if change:
    raise UserError(f"{change}; use --restart to train from scratch on the new data, or another --job_dir")


def _loop_state(saved, folder):
  """loop.State from a checkpoint's state.json. One of an older layout lacks later fields: they
  take their defaults (partial: that epoch's loss counts the steps after the resume only)."""
  fields = [f.name for f in dataclasses.fields(loop.State)]
  essential = [name for name in ("epoch", "step", "global_step") if name not in saved]
  if essential:
    raise UserError(f"{folder}/state.json has no {', '.join(essential)}: a checkpoint layout this version cannot "
                    "resume; use --restart to train from scratch, or another --job_dir")
  missing = [name for name in fields if name not in saved]
  if missing:
    logging.warning("checkpoint %s is of an older layout without %s: taking their defaults", folder,
                    ", ".join(missing))
  return loop.State(**{name: saved[name] for name in fields if name in saved})


def _check_same_step(strategy, cluster, step):
  """Workers that restored different checkpoints would all-reduce gradients of different
  weights without any error (GUIDE section 4): compare before the first step."""
  if not _same_on_every_worker(strategy, cluster, step):
    raise UserError(f"workers restored different checkpoints (this one step {step}): every worker must read the "
                    "same --job_dir or --checkpoint_dir, e.g. a gs:// folder, not a local disk of its own")


def _same_on_every_worker(strategy, cluster, value):
  """Whether every replica of every worker holds this number: n * sum(v^2) == sum(v)^2 exactly
  when all n values are equal, so one all-reduce of (v, v^2) tells."""
  if cluster.num_workers < 2:
    return True
  total = tf.function(lambda: strategy.reduce(
      "SUM", strategy.run(lambda: tf.constant([float(value), float(value) ** 2], tf.float64)), axis=None))()
  sum_, sum_of_squares = total.numpy()
  return strategy.num_replicas_in_sync * sum_of_squares == sum_ ** 2
