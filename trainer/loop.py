"""The one training loop, for every distribution strategy, with checkpoints and preemption.

A custom loop (strategy.run over datasets from distribute_datasets_from_function) rather than
Keras `model.fit`, because Keras 3.15 `fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585) and the same loop must serve one device, many GPUs and many workers.
"""

import dataclasses
import math
import signal
import time
from typing import List, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer.config import UserError
from trainer.preemption import Preempted


class Diverged(UserError):
  """The loss became NaN or infinite; no checkpoint was written after it happened."""


@dataclasses.dataclass
class State:
  """Where training stands; saved in every checkpoint, it is all a resumed job needs besides the
  variables to go on exactly where the last one stopped."""
  epoch: int = 0  # epochs completed
  step: int = 0  # training steps completed in the current epoch
  global_step: int = 0
  loss: List[float] = dataclasses.field(default_factory=list)  # per completed epoch
  val_loss: List[float] = dataclasses.field(default_factory=list)
  best_epoch: int = 0
  # Loss sum and example count of the current epoch's completed steps: a resumed epoch's loss is exact.
  partial: List[float] = dataclasses.field(default_factory=lambda: [0.0, 0.0])
  num_replicas: int = 1

  def done(self, epochs, patience):
    return self.epoch >= epochs or (self.best_epoch > 0 and self.epoch - self.best_epoch >= patience)


@dataclasses.dataclass
class Checkpointing:
  """When and where fit saves: `checkpoints` (trainer.checkpoints.Checkpoints) at every epoch's
  end, or every `every_steps` steps and at the end of training; `stop` (trainer.preemption.StopSignal) asks for a save and
  an exit; `after_save()` runs after each save (the trainer syncs TensorBoard logs there);
  `restored`: the checkpoint the job resumed from, the last good one until the next save."""
  checkpoints: object = None
  every_steps: int = 0
  stop: object = None
  after_save: object = None
  restored: Optional[str] = None


def squared_error(targets, outputs):
  """Per-example loss of a one-output regressor (in float32 under mixed precision too)."""
  return tf.square(tf.cast(outputs[:, 0], tf.float32) - targets)


def cross_entropy(labels, probabilities):
  """Per-example loss of a softmax classifier (in float32 under mixed precision too)."""
  return keras.losses.sparse_categorical_crossentropy(labels, tf.cast(probabilities, tf.float32))


def fit(model, optimizer, loss_fn, make_dataset, strategy, global_batch_size, epochs, patience,
        log_dir=None, jit_compile=False, checkpointing=None, state=None, best_weights=None):
  """Trains until `epochs` or until validation loss has not improved for `patience` epochs, then
  restores the best weights. Returns {"loss": [...], "val_loss": [...], "best_epoch": n, "global_step": n}.

  jit_compile: XLA-compile each replica's step (the cross-replica part stays outside XLA).
  state, best_weights: where a restored checkpoint left off (None: from the start).
  Raises Diverged on a NaN or infinite loss and trainer.preemption.Preempted after saving on a
  signal.
  """
  checkpointing = checkpointing or Checkpointing()
  state = state or State()
  replicas = strategy.num_replicas_in_sync
  state.num_replicas = replicas

  def distributed(split, epoch=0, skip=0):
    # skip: batches each replica already trained on in this epoch, before a restart.
    return strategy.distribute_datasets_from_function(
        lambda context: make_dataset(split, context.get_per_replica_batch_size(global_batch_size), context,
                                     epoch).skip(skip))

  val_data = distributed("validation")

  def summed(losses):
    # Sum and count rather than a mean, so the epoch's loss is exact whatever the batch sizes.
    return tf.stack([tf.reduce_sum(losses), tf.cast(tf.size(losses), tf.float32)])

  def gradients(inputs, targets):
    with tf.GradientTape() as tape:
      losses = loss_fn(targets, model(inputs, training=True))
      # scale_loss: the loss scale of a LossScaleOptimizer (float16), the loss itself otherwise.
      loss = optimizer.scale_loss(tf.nn.compute_average_loss(losses))
    return tape.gradient(loss, model.trainable_variables), summed(losses)

  if jit_compile:
    gradients = tf.function(gradients, jit_compile=True)

  def nothing_learnt(inputs, targets):
    del inputs, targets
    return [tf.zeros_like(v) for v in model.trainable_variables], tf.zeros([2])

  def if_any(batch, compute, otherwise):
    # A replica can get an empty batch: the last, partial global batch of an epoch may not reach
    # every replica (an odd number of per-replica batches over two, or a worker whose shard ran
    # out first). Keras' LSTM cell fails on one, and cuDNN kernels have; such a replica skips the
    # model and adds nothing (zero gradients, no loss, no examples) to the step's all-reduce.
    return tf.cond(tf.shape(batch)[0] > 0, compute, otherwise)

  # The batch dimension stays unknown in the traced steps (the distributed dataset's element_spec):
  # traced with a static 0 for an empty batch, the LSTM fails before the cond above can skip it;
  # and the epoch's last, smaller batch then needs no second trace.
  specs = val_data.element_spec

  @tf.function(input_signature=[*specs, tf.TensorSpec([], tf.float32)])
  def train_step(inputs, targets, stop_flag):
    def step(inputs, targets):
      grads, sums = if_any(inputs, lambda: gradients(inputs, targets), lambda: nothing_learnt(inputs, targets))
      optimizer.apply_gradients(zip(grads, model.trainable_variables))
      # The stop flag rides in the loss's all-reduce: every worker sees any worker's signal at the same step.
      return tf.concat([sums, [stop_flag]], 0)
    return strategy.reduce("SUM", strategy.run(step, (inputs, targets)), axis=None)

  @tf.function(input_signature=list(specs))
  def val_step(inputs, targets):
    step = lambda x, y: if_any(x, lambda: summed(loss_fn(y, model(x, training=False))), lambda: tf.zeros([2]))
    return strategy.reduce("SUM", strategy.run(step, (inputs, targets)), axis=None)

  stop = checkpointing.stop
  saved = {"checkpoint": checkpointing.restored}

  def check(sums, step):
    """Reads global step `step`'s [loss sum, count, stop flag]; raises Diverged on a NaN or
    infinite loss. Returns whether any worker was signalled."""
    loss_sum, _, flag = sums.numpy()
    if not math.isfinite(loss_sum):
      diverged(loss_sum, step)
    return flag > 0

  def diverged(loss, step):
    kept = (f"checkpoint {saved['checkpoint']} is kept; resume from it with a lower --learning_rate"
            if saved["checkpoint"] else "lower --learning_rate")
    raise Diverged(f"training diverged: the loss is {loss} at step {step} (epoch {state.epoch + 1}); "
                   f"{kept}")

  def save():
    if checkpointing.checkpoints is None:
      return
    if not all(np.isfinite(w).all() for w in model.get_weights()):
      diverged("finite but the weights are not", state.global_step)
    started = time.time()
    checkpointing.checkpoints.save(state.global_step, dataclasses.asdict(state), best_weights)
    saved["checkpoint"] = checkpointing.checkpoints.path(state.global_step)
    logging.info("checkpoint %s saved (epoch %d, step %d; %.2f s)", saved["checkpoint"], state.epoch + (state.step > 0),
                 state.step, time.time() - started)
    if checkpointing.after_save:
      checkpointing.after_save()

  def preempted():
    return Preempted(stop.signum or signal.SIGTERM, state.global_step, saved["checkpoint"])

  def train_epoch():
    """Trains the rest of epoch state.epoch + 1; returns (its mean loss, whether to stop)."""
    total = tf.constant(state.partial, tf.float32)
    pending, stopping = None, False
    no_signal = tf.constant(0.0)
    for inputs, targets in distributed("train", state.epoch + 1, state.step):
      sums = train_step(inputs, targets, stop.flag() if stop else no_signal)
      state.step, state.global_step = state.step + 1, state.global_step + 1
      total += sums[:2]
      # The previous step's result, read while this one runs: reading the current one would make
      # the host wait for every step before it queues the next. All workers read the same values,
      # so all stop after the same step.
      stopping = pending is not None and check(pending, state.global_step - 1)
      pending = sums
      every = checkpointing.every_steps
      if stopping or (every and state.global_step % every == 0):
        check(sums, state.global_step)
        state.partial = [float(v) for v in total.numpy()]
        save()
        if stopping:
          raise preempted()
    stopping = pending is not None and check(pending, state.global_step)
    loss_sum, count = total.numpy()
    return loss_sum / max(count, 1), stopping

  def validate():
    total = tf.constant([0.0, 0.0])
    for inputs, targets in val_data:
      total += val_step(inputs, targets)
    return float(total[0]) / max(float(total[1]), 1)

  writers = {}
  if log_dir:
    writers = {s: tf.summary.create_file_writer(f"{log_dir}/{s}") for s in ("train", "validation")}
  while not state.done(epochs, patience):
    start = time.time()
    # A dataset per epoch: its order depends only on the seed and the epoch, so a resumed job
    # continues with the order it would have had.
    loss, stopping = train_epoch()
    val_loss = validate()
    if not (math.isfinite(loss) and math.isfinite(val_loss)):
      diverged(loss if not math.isfinite(loss) else f"{val_loss} on validation", state.global_step)
    state.epoch, state.step, state.partial = state.epoch + 1, 0, [0.0, 0.0]
    state.loss.append(float(loss))
    state.val_loss.append(val_loss)
    for split, value in (("train", loss), ("validation", val_loss)):
      if split in writers:
        with writers[split].as_default():
          tf.summary.scalar("epoch_loss", value, step=state.epoch)
          writers[split].flush()
    improved = state.best_epoch == 0 or val_loss < state.val_loss[state.best_epoch - 1]
    if improved:
      state.best_epoch, best_weights = state.epoch, model.get_weights()
    logging.info("epoch %d/%d  loss %.4f  val_loss %.4f%s  (%.1f s, %d replica%s)", state.epoch, epochs, loss,
                 val_loss, "  *" if improved else "", time.time() - start, replicas, "s" if replicas > 1 else "")
    # Every N steps instead of every epoch when asked (short epochs on a remote store), but always
    # at the end, so that a job restarted after training goes straight to evaluation.
    if not checkpointing.every_steps or stopping or state.done(epochs, patience):
      save()
    if stopping:
      raise preempted()
    if state.done(epochs, patience) and state.epoch < epochs:
      logging.info("early stopping: val_loss has not improved for %d epochs; keeping epoch %d", patience,
                   state.best_epoch)
  if best_weights is not None:
    model.set_weights(best_weights)
  return {"loss": state.loss, "val_loss": state.val_loss, "best_epoch": state.best_epoch,
          "global_step": state.global_step}
