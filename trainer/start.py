"""Where a job starts, decided once and in this order:

  1. restart: --restart removes the job's checkpoints; the job then starts as a new one (3 or 4);
  2. resume: from the newest readable checkpoint of the same job (same flags, same data): its
     variables, TrainState and best weights, and what its first attempt started from;
  3. warm start: a new job offered an export version (a retrain is offered production's) begins
     from its weights when it is the same network;
  4. fresh: from the seed's random weights.

Every worker of a cluster must start from the same place: after 2 and after 3 they compare what
they found with one all-reduce, and stop when they disagree.
"""

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import export
from trainer.errors import ServingBusy, UserError
from trainer.fingerprints import data_change
from trainer.state import NOT_A_RETRAIN, TrainState, WarmStart


class WarmStartRace(ServingBusy):
  """Workers warm-started from different versions: a retry starts them from the same one."""


def begin(config, checkpoints, model, optimizer, strategy, offered=NOT_A_RETRAIN):
  """The TrainState training starts from, with the variables of model and optimizer set to match.
  offered: an export version folder to warm-start from, or a WarmStart saying why there is none.
  A job that cannot read its checkpoint folder stops here (trainer.storage.StorageError) rather
  than start again."""
  restored = None
  if config.restart:  # 1.
    if config.cluster.is_chief:
      logging.info("--restart: removing the checkpoints in %s", checkpoints.directory)
      checkpoints.remove_all()
  else:
    restored = checkpoints.restore_latest(accept=lambda state_json: _check_same_job(config, checkpoints, state_json))
    _check_same_step(strategy, config.cluster, restored.step if restored else 0)
    if restored is None:
      logging.info("no checkpoint in %s: training from the start", checkpoints.directory)
  if restored:  # 2.
    state = _resumed(config, restored, optimizer, strategy)
    # Checkpoints of earlier versions of this trainer hold no record when no version was offered.
    state.warm_start = state.warm_start or (
        offered if isinstance(offered, WarmStart) else WarmStart(reason="not recorded in the checkpoint"))
  elif isinstance(offered, WarmStart):  # 4.
    state = TrainState(warm_start=offered)
  else:  # 3., or 4. when the version is another network
    state = TrainState(warm_start=WarmStart.from_json(export.warm_start(model, offered, config.model)))
  _log_warm_start(state.warm_start)
  if not same_on_every_worker(strategy, config.cluster, state.warm_start.version if state.warm_start.used else 0):
    # Each worker looked up production by itself, and a retrain promoted a version in between.
    raise WarmStartRace("the workers started from different production versions (one was promoted while they "
                        "started); run the job again")
  return state


def _resumed(config, restored, optimizer, strategy):
  """The state of a restored checkpoint (checkpoints.Restored), whose variables are set already."""
  state = TrainState.from_saved(restored.state, restored.best_weights, restored.folder)
  replicas = strategy.num_replicas_in_sync
  if state.step and state.num_replicas != replicas:
    logging.warning("checkpoint written by %d replicas, resumed on %d in the middle of epoch %d: the rest of "
                    "that epoch skips as many examples but not the same ones", state.num_replicas, replicas,
                    state.epoch + 1)
  saved_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))  # a MirroredVariable under a strategy
  # A schedule (--lr_schedule, --warmup_steps) is made from this run's flags and is not settable: nothing to replace.
  scheduled = config.lr_schedule != "constant" or config.warmup_steps
  if not scheduled and saved_rate != np.float32(config.learning_rate):
    logging.info("learning rate %g from the checkpoint replaced by --learning_rate=%g", saved_rate,
                 config.learning_rate)
    optimizer.learning_rate = config.learning_rate
  logging.info("resuming from %s: %d epochs done, %d steps into epoch %d (global step %d)",
               restored.folder, state.epoch, state.step, state.epoch + 1, state.global_step)
  return state


def _log_warm_start(warm_start):
  if warm_start.used:
    logging.info("warm start: from the weights of version %s (%s)", warm_start.version, warm_start.source)
  elif warm_start.source is not None:
    logging.info("warm start: not from %s: %s; from random weights", warm_start.source, warm_start.reason)


def _check_same_job(config, checkpoints, state_json):
  """Refuses a checkpoint (its state.json, read before its variables, which would only fail to
  load as if corrupt) written with other flags or on other data: a file rewritten since (a
  nightly ETL between a preemption and the retry) would resume on other rows and statistics."""
  mismatch = config.resume_mismatch(state_json.get("config", {}), checkpoints.info.get("config"))
  if mismatch:
    name, before, now = mismatch
    raise UserError(f"{checkpoints.directory} holds checkpoints of another job: --{name} was {before!r}, now "
                    f"{now!r}; use another --job_dir, or --restart to discard them")
  change = data_change(state_json.get("data"), checkpoints.info["data"])  # checkpoints before fingerprints: none
  if change:
    raise UserError(f"{change}; use --restart to train from scratch on the new data, or another --job_dir")


def _check_same_step(strategy, cluster, step):
  """Workers that restored different checkpoints would all-reduce gradients of different weights
  without any error: compare before the first step."""
  if not same_on_every_worker(strategy, cluster, step):
    raise UserError(f"workers restored different checkpoints (this one step {step}): every worker must read the "
                    "same --job_dir or --checkpoint_dir, e.g. a gs:// folder, not a local disk of its own")


def same_on_every_worker(strategy, cluster, value):
  """Whether every replica of every worker holds this number: n * sum(v^2) == sum(v)^2 exactly
  when all n values are equal, so one all-reduce of (v, v^2) tells."""
  if cluster.num_workers < 2:
    return True
  total = tf.function(lambda: strategy.reduce(
      "SUM", strategy.run(lambda: tf.constant([float(value), float(value) ** 2], tf.float64)), axis=None))()
  sum_, sum_of_squares = total.numpy()
  return strategy.num_replicas_in_sync * sum_of_squares == sum_ ** 2
