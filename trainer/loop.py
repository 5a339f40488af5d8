"""The one training loop, for every distribution strategy, with checkpoints and preemption.

A custom loop (strategy.run over datasets from distribute_datasets_from_function) rather than
Keras `model.fit`, because Keras 3.15 `fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585) and the same loop must serve one device, many GPUs and many workers.

Split as Orbit splits a trainer from its controller: Steps holds the step functions, built once;
Loop runs one epoch, one validation and the end of an epoch, reads each step's result one step
late (OneStepLate) and saves when Checkpointing.due says; fit drives them over the epochs.
Where training stands is one trainer.state.TrainState, which the checkpoints save.
"""

import dataclasses
import functools
import math
import signal
import time
from typing import Callable, Optional

import keras
import tensorflow as tf
from absl import logging

from trainer.checkpoints import Checkpoints, NotFinite
from trainer.errors import Preempted, StorageError, UserError
from trainer.preemption import StopSignal
from trainer.state import TrainState


class Diverged(UserError):
  """The loss became NaN or infinite; no checkpoint was written after it happened."""

  @classmethod
  def at(cls, state, loss, step):
    kept = (f"checkpoint {state.checkpoint} is kept; resume from it with a lower --learning_rate"
            if state.checkpoint else "lower --learning_rate")
    return cls(f"training diverged: the loss is {loss} at step {step} (epoch {state.epoch + 1}); {kept}")


@dataclasses.dataclass
class Checkpointing:
  """When and where fit saves: `checkpoints` (trainer.checkpoints.Checkpoints, None: never) when
  `due` says; `stop` (trainer.preemption.StopSignal) asks for a save and an exit; `after_save()`
  runs after each save (the trainer syncs TensorBoard logs there); `background`: saves are written
  and published while training goes on (--async_checkpoints)."""
  checkpoints: Optional[Checkpoints] = None
  every_steps: int = 0
  stop: Optional[StopSignal] = None
  after_save: Optional[Callable[[], None]] = None
  background: bool = True

  def due(self, global_step, *, stopping=False, epoch_end=False, done=False):
    """The one rule for when to save: on a signal (then exit); every `every_steps` steps when asked
    (short epochs on a remote store), else at every epoch's end; and always at the end of training,
    so that a job restarted after training goes straight to evaluation."""
    if stopping or (epoch_end and (done or not self.every_steps)):
      return True
    return not epoch_end and bool(self.every_steps) and global_step % self.every_steps == 0


def squared_error(targets, outputs):
  """Per-example loss of a one-output regressor (in float32 under mixed precision too)."""
  return tf.square(tf.cast(outputs[:, 0], tf.float32) - targets)


def cross_entropy(labels, probabilities):
  """Per-example loss of a softmax classifier (in float32 under mixed precision too)."""
  return keras.losses.sparse_categorical_crossentropy(labels, tf.cast(probabilities, tf.float32))


def _summed(losses):
  # Sum and count rather than a mean, so the epoch's loss is exact whatever the batch sizes.
  return tf.stack([tf.reduce_sum(losses), tf.cast(tf.size(losses), tf.float32)])


def _if_any(batch, compute, otherwise):
  # A replica can get an empty batch: the last, partial global batch of an epoch may not reach
  # every replica (an odd number of per-replica batches over two, or a worker whose shard ran
  # out first). Keras' LSTM cell fails on one, and cuDNN kernels have; such a replica skips the
  # model and adds nothing (zero gradients, no loss, no examples) to the step's all-reduce.
  return tf.cond(tf.shape(batch)[0] > 0, compute, otherwise)


class Steps:
  """The step functions, traced once: `train(inputs, targets, stop_flag)` updates the model and
  returns the step's all-reduced [loss sum, example count, stop flag]; `validate(inputs, targets)`
  returns [loss sum, example count]. Every change to what one call does (a learning-rate
  schedule, several steps per call) belongs here.

  specs: the distributed dataset's element_spec. The batch dimension stays unknown in the traced
  steps: traced with a static 0 for an empty batch, the LSTM fails before _if_any can skip it;
  and the epoch's last, smaller batch then needs no second trace.
  jit_compile: XLA-compile each replica's step (the cross-replica part stays outside XLA).
  """

  def __init__(self, model, optimizer, loss_fn, strategy, specs, jit_compile=False):
    self.model, self.optimizer, self.loss_fn, self.strategy = model, optimizer, loss_fn, strategy
    self._gradients = tf.function(self._gradients, jit_compile=True) if jit_compile else self._gradients
    self.train = tf.function(self._train, input_signature=[*specs, tf.TensorSpec([], tf.float32)])
    self.validate = tf.function(self._validate, input_signature=list(specs))

  def _gradients(self, inputs, targets):
    with tf.GradientTape() as tape:
      losses = self.loss_fn(targets, self.model(inputs, training=True))
      # scale_loss: the loss scale of a LossScaleOptimizer (float16), the loss itself otherwise.
      loss = self.optimizer.scale_loss(tf.nn.compute_average_loss(losses))
    return tape.gradient(loss, self.model.trainable_variables), _summed(losses)

  def _nothing_learnt(self):
    return [tf.zeros_like(v) for v in self.model.trainable_variables], tf.zeros([2])

  def _train(self, inputs, targets, stop_flag):
    def step(inputs, targets):
      grads, sums = _if_any(inputs, lambda: self._gradients(inputs, targets), self._nothing_learnt)
      self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
      # The stop flag rides in the loss's all-reduce: every worker sees any worker's signal at the same step.
      return tf.concat([sums, [stop_flag]], 0)
    return self.strategy.reduce("SUM", self.strategy.run(step, (inputs, targets)), axis=None)

  def _validate(self, inputs, targets):
    def step(x, y):
      return _if_any(x, lambda: _summed(self.loss_fn(y, self.model(x, training=False))), lambda: tf.zeros([2]))
    return self.strategy.reduce("SUM", self.strategy.run(step, (inputs, targets)), axis=None)


@dataclasses.dataclass(frozen=True)
class StepResult:
  """One training step's all-reduced result, read on the host."""
  step: int  # global step
  loss_sum: float
  count: float
  stop: bool  # whether any worker was signalled

  @classmethod
  def read(cls, sums, step):
    loss_sum, count, flag = sums.numpy()
    return cls(step, float(loss_sum), float(count), bool(flag > 0))


class OneStepLate:
  """Hands back each step's result once the next step is queued: reading the current one would
  make the host wait for every step before it queues the next. All workers read the same values,
  so all stop after the same step."""

  def __init__(self):
    self._pending = None

  def swap(self, sums, step):
    """Keeps step `step`'s result; returns the one before it (None after the first step)."""
    previous, self._pending = self._pending, (sums, step)
    return previous and StepResult.read(*previous)

  def drain(self):
    """The last step's result (None when there was no step)."""
    previous, self._pending = self._pending, None
    return previous and StepResult.read(*previous)


class Loop:
  """The parts of training one epoch after another; fit drives them.

  on_step(state, result): called with every step's StepResult, one step late (the last at the
  end of the epoch), after its loss was found finite."""

  def __init__(self, model, optimizer, loss_fn, make_dataset, strategy, global_batch_size, log_dir=None,
               jit_compile=False, checkpointing=None, on_step=None):
    self.model, self.strategy, self.make_dataset = model, strategy, make_dataset
    self.global_batch_size = global_batch_size
    self.checkpointing = checkpointing or Checkpointing()
    self.on_step = on_step
    self._saving = None  # the save under way (trainer.checkpoints.Saving)
    self.val_data = self.distributed("validation")
    self.steps = Steps(model, optimizer, loss_fn, strategy, self.val_data.element_spec, jit_compile)
    self.writers = {split: tf.summary.create_file_writer(f"{log_dir}/{split}")
                    for split in ("train", "validation")} if log_dir else {}

  @property
  def replicas(self):
    return self.strategy.num_replicas_in_sync

  def distributed(self, split, epoch=0, skip=0):
    """A dataset per epoch: its order depends only on the seed and the epoch, so a resumed job
    continues with the order it would have had. skip: batches each replica already trained on in
    this epoch, before a restart."""
    return self.strategy.distribute_datasets_from_function(
        lambda context: self.make_dataset(split, context.get_per_replica_batch_size(self.global_batch_size),
                                          context, epoch).skip(skip))

  def train_epoch(self, state):
    """Trains the rest of epoch state.epoch + 1, saving within it when Checkpointing.due says;
    returns (its mean loss, whether a worker was signalled at its last step). Raises Preempted
    after saving on a signal read within the epoch."""
    stop = self.checkpointing.stop
    no_signal = tf.constant(0.0)
    total = tf.constant(state.partial, tf.float32)
    late = OneStepLate()
    for inputs, targets in self.distributed("train", state.epoch + 1, state.step):
      sums = self.steps.train(inputs, targets, stop.flag() if stop else no_signal)
      state.step, state.global_step = state.step + 1, state.global_step + 1
      total += sums[:2]
      previous = late.swap(sums, state.global_step)
      if previous:
        self._take(state, previous)
      stopping = bool(previous and previous.stop)
      if self.checkpointing.due(state.global_step, stopping=stopping):
        self._check_finite(state, StepResult.read(sums, state.global_step))  # never save a diverged step
        state.partial = [float(v) for v in total.numpy()]
        self.save(state)
        if stopping:
          raise self.preempted(state)
    last = late.drain()
    if last:
      self._take(state, last)
    loss_sum, count = total.numpy()
    return loss_sum / max(count, 1), bool(last and last.stop)

  def _take(self, state, result):
    self._check_finite(state, result)
    if self.on_step:
      self.on_step(state, result)

  def _check_finite(self, state, result):
    if not math.isfinite(result.loss_sum):
      self.settle(state, quietly=True)  # the message names the newest complete checkpoint
      raise Diverged.at(state, result.loss_sum, result.step)

  def validate(self):
    """The mean loss over every validation example."""
    total = tf.constant([0.0, 0.0])
    for inputs, targets in self.val_data:
      total += self.steps.validate(inputs, targets)
    return float(total[0]) / max(float(total[1]), 1)

  def end_epoch(self, state, loss, val_loss, seconds, epochs):
    """Records a trained and validated epoch: its losses (TensorBoard too), the best weights so
    far, the epoch's log line. Raises Diverged on a NaN or infinite loss."""
    if not (math.isfinite(loss) and math.isfinite(val_loss)):
      raise Diverged.at(state, loss if not math.isfinite(loss) else f"{val_loss} on validation", state.global_step)
    improved = state.end_epoch(loss, val_loss)
    if improved:
      state.best_weights = self.model.get_weights()
    for split, value in (("train", loss), ("validation", val_loss)):
      if split in self.writers:
        with self.writers[split].as_default():
          tf.summary.scalar("epoch_loss", value, step=state.epoch)
          self.writers[split].flush()
    logging.info("epoch %d/%d  loss %.4f  val_loss %.4f%s  (%.1f s, %d replica%s)", state.epoch, epochs, loss,
                 val_loss, "  *" if improved else "", seconds, self.replicas, "s" if self.replicas > 1 else "")

  def save(self, state):
    """Saves a checkpoint of step state.global_step (nothing without checkpoints), in the background
    when Checkpointing.background says; once done (settle) it becomes state.checkpoint, the one a
    divergence or a signal names. One save at a time: this waits for the one before."""
    checkpoints = self.checkpointing.checkpoints
    if checkpoints is None:
      return
    self.settle(state)
    where = (state.global_step, state.epoch + (state.step > 0), state.step)
    try:
      self._saving = checkpoints.save(state.global_step, state.to_json(), state.best_weights,
                                      self.checkpointing.background, functools.partial(_saved, checkpoints, *where))
    except NotFinite:
      raise Diverged.at(state, "finite but the weights are not", state.global_step) from None
    if not self.checkpointing.background:
      self.settle(state)
    if self.checkpointing.after_save:
      self.checkpointing.after_save()

  def train_and_settle(self, state):
    """train_epoch, then the end of the save under way (it has had the epoch to finish): the boundary
    where a failed background save stops the job. An error in the epoch waits for it too."""
    try:
      result = self.train_epoch(state)
    except Exception:
      self.settle(state, quietly=True)
      raise
    self.settle(state)
    return result

  def settle(self, state, quietly=False):
    """Waits for the save under way, if any; once it is done it is state.checkpoint. A failed one
    raises StorageError (exit 170), naming the checkpoint before it, which is intact; quietly (the
    job already stops for another reason): logs it instead."""
    saving, self._saving = self._saving, None
    if saving is None:
      return
    try:
      saving.wait()
    except StorageError as e:
      kept = f"checkpoint {state.checkpoint} is intact" if state.checkpoint else "no checkpoint was saved before it"
      if not quietly:
        raise StorageError(f"{e}; {kept}: run the same command again to resume from it") from e
      logging.warning("%s; %s", e, kept)
      return
    state.checkpoint = saving.path

  def preempted(self, state):
    self.settle(state)  # the signal's checkpoint, done
    stop = self.checkpointing.stop
    return Preempted(stop.signum or signal.SIGTERM, state.global_step, state.checkpoint)


def _saved(checkpoints, global_step, epoch, step, seconds):
  """Logs a finished save (on the thread that wrote it)."""
  where = (epoch, step, seconds)
  if checkpoints.publish:
    logging.info("checkpoint %s saved (epoch %d, step %d; %.2f s)", checkpoints.path(global_step), *where)
  else:
    # Every worker writes its part of a collective save; the chief's copy alone is published.
    logging.info("checkpoint of step %d written for the collective save and discarded: the chief publishes %s "
                 "(epoch %d, step %d; %.2f s)", global_step, checkpoints.path(global_step), *where)


def fit(model, optimizer, loss_fn, make_dataset, strategy, global_batch_size, epochs, patience,
        log_dir=None, jit_compile=False, checkpointing=None, state=None, on_step=None):
  """Trains until `epochs` or until validation loss has not improved for `patience` epochs, then
  restores the best weights. Returns {"loss": [...], "val_loss": [...], "best_epoch": n, "global_step": n}.

  state: a TrainState, where a restored checkpoint left off (None: from the start); fit advances it.
  Raises Diverged on a NaN or infinite loss and trainer.errors.Preempted after saving on a
  signal. The other arguments: Loop's.
  """
  loop = Loop(model, optimizer, loss_fn, make_dataset, strategy, global_batch_size, log_dir, jit_compile,
              checkpointing, on_step)
  state = state or TrainState()
  state.num_replicas = loop.replicas
  while not state.done(epochs, patience):
    started = time.time()
    loss, stopping = loop.train_and_settle(state)
    loop.end_epoch(state, loss, loop.validate(), time.time() - started, epochs)
    done = state.done(epochs, patience)
    if loop.checkpointing.due(state.global_step, stopping=stopping, epoch_end=True, done=done):
      loop.save(state)
    if stopping:
      raise loop.preempted(state)
    if done and state.epoch < epochs:
      logging.info("early stopping: val_loss has not improved for %d epochs; keeping epoch %d", patience,
                   state.best_epoch)
  loop.settle(state)  # the last save, before evaluation and export
  if state.best_weights is not None:
    model.set_weights(state.best_weights)
  return state.history()
