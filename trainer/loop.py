"""The one training loop, for every distribution strategy, with checkpoints and preemption.

A custom loop (strategy.run over datasets from distribute_datasets_from_function) rather than
Keras `model.fit`, because Keras 3.15 `fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585) and the same loop must serve one device, many GPUs and many workers.

Split as Orbit splits a trainer from its controller: trainer.steps.Steps holds the step functions
(several steps per call), built once; Loop runs one epoch, one validation and the end of an epoch,
reads each call's result one call late (OneStepLate) and saves when Checkpointing.due says; fit
drives them over the epochs.
Where training stands is one trainer.state.TrainState, which the checkpoints save.
"""

import atexit
import dataclasses
import functools
import math
import queue
import signal
import threading
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer.checkpoints import Checkpoints, NotFinite
from trainer.errors import Preempted, StorageError, UserError
from trainer.preemption import StopSignal
from trainer.state import TrainState
from trainer.steps import OneStepLate, Steps, StepResult  # noqa: F401 -- StepResult: what on_step is given


class Diverged(UserError):
  """The loss became NaN or infinite; no checkpoint was written after it happened."""

  @classmethod
  def at(cls, state, loss, step, clip_norm=None):
    """clip_norm: the job's --clip_norm; without it, clipping gradients is suggested too (exploding
    gradients, of recurrent networks especially, are what it bounds)."""
    clip = "" if clip_norm else " or {} --clip_norm=1"
    kept = (f"checkpoint {state.checkpoint} is kept; resume from it with a lower --learning_rate{clip.format('with')}"
            if state.checkpoint else f"lower --learning_rate{clip.format('set')}")
    return cls(f"training diverged: the loss is {loss} at step {step} (epoch {state.epoch + 1}); {kept}")


@dataclasses.dataclass
class Checkpointing:
  """When and where fit saves: `checkpoints` (trainer.checkpoints.Checkpoints, None: never) when
  `due` says; `stop` (trainer.preemption.StopSignal) asks for a save and an exit; `after_save()`
  runs after each save is done, on the thread that saved (the trainer copies TensorBoard logs to
  gs:// there; a StorageError is logged, not raised); `background`: saves are written
  and published while training goes on (--async_checkpoints)."""
  checkpoints: Optional[Checkpoints] = None
  every_steps: int = 0
  stop: Optional[StopSignal] = None
  after_save: Optional[Callable[[], None]] = None
  background: bool = True

  def due(self, global_step, *, steps=1, stopping=False, epoch_end=False, done=False):
    """The one rule for when to save, at the end of a call of `steps` steps that ended at
    `global_step`: on a signal (then exit); when the call reached or passed a multiple of
    `every_steps` (short epochs on a remote store), else at every epoch's end; and always at the
    end of training, so that a job restarted after training goes straight to evaluation."""
    if stopping or (epoch_end and (done or not self.every_steps)):
      return True
    return (not epoch_end and bool(self.every_steps)
            and (global_step - steps) // self.every_steps < global_step // self.every_steps)


def squared_error(targets, outputs):
  """Per-example loss of a one-output regressor (in float32 under mixed precision too)."""
  return tf.square(tf.cast(outputs[:, 0], tf.float32) - targets)


def cross_entropy(labels, probabilities):
  """Per-example loss of a softmax classifier (in float32 under mixed precision too)."""
  return keras.losses.sparse_categorical_crossentropy(labels, tf.cast(probabilities, tf.float32))


def absolute_error(targets, outputs):
  """Per-example absolute error of a one-output regressor: the validation's MAE."""
  return tf.abs(tf.cast(outputs[:, 0], tf.float32) - targets)


def hits(labels, probabilities):
  """1 where a classifier's most probable class is the label: the validation's accuracy."""
  return tf.cast(tf.equal(tf.argmax(probabilities, axis=-1), tf.cast(labels, tf.int64)), tf.float32)


# What validation sums besides the loss, per loss: squared and absolute errors (in the data's units
# where the validation batches say them: trainer.steps), or the hits of accuracy.
VALIDATION_METRICS = {squared_error: (squared_error, absolute_error), cross_entropy: (hits,)}


class Discard:
  """Destroys the dataset iterators it is handed on a daemon thread of its own, each once the next
  arrives: by then whoever handed it over holds it no more, so the last reference is surely the
  thread's. Destroying a tf.data iterator waits for its autotuning thread to stop (0 to 0.4 s
  here, about every other epoch, with the GIL released): on the training thread that was a
  quarter of a small model's epoch at --steps_per_loop=100 (scripts/benchmark_loop.py).

  At exit (close) the thread destroys what it holds and ends, and the exit waits for it: a thread
  still inside TensorFlow's C++ when the interpreter finalises is killed there ("terminate
  called ... FATAL: exception not rethrown"), an abort that a cluster retries."""

  _END = object()

  def __init__(self):
    self._queue, self._thread, self._lock = queue.SimpleQueue(), None, threading.Lock()

  def __call__(self, iterator):
    with self._lock:
      # Not alive in a forked child: the thread was its parent's.
      if self._thread is None or not self._thread.is_alive():
        self._thread = threading.Thread(target=self._run, name="finished iterators", daemon=True)
        self._thread.start()
        atexit.register(self.close)
    self._queue.put(iterator)

  def _run(self):
    held = None
    while held is not self._END:
      held = self._queue.get()  # the one held before is destroyed here

  def close(self, timeout=60):
    with self._lock:
      thread, self._thread = self._thread, None
    if thread is not None and thread.is_alive():
      self._queue.put(self._END)
      thread.join(timeout)
      if thread.is_alive():
        logging.warning("a finished dataset iterator was still being destroyed after %d s at exit", timeout)


discard = Discard()


class Loop:
  """The parts of training one epoch after another; fit drives them.

  on_step(state, result): called with every training call's StepResult (trainer.steps), one call
  late (the last at the end of the epoch), after its loss was found finite; state.global_step is
  then result.step. on_epoch(state, loss, val_sums, train_seconds, validation_seconds): called at
  the end of every epoch, after end_epoch recorded it; val_sums is validate's [loss sum, example
  count, a sum per VALIDATION_METRICS]. steps_per_loop, jit_compile, clip_norm: trainer.steps.Steps'."""

  def __init__(self, model, optimizer, loss_fn, make_dataset, strategy, global_batch_size, log_dir=None,
               jit_compile=False, checkpointing=None, on_step=None, steps_per_loop=1, clip_norm=None,
               on_epoch=None):
    self.model, self.strategy, self.make_dataset = model, strategy, make_dataset
    self.global_batch_size = global_batch_size
    self.checkpointing = checkpointing or Checkpointing()
    self.on_step, self.on_epoch = on_step, on_epoch
    self.val_sums = np.zeros(2)
    self._saving = None  # the save under way (trainer.checkpoints.Saving)
    self.val_data = self.distributed("validation")
    self.steps = Steps(model, optimizer, loss_fn, strategy, steps_per_loop, jit_compile, clip_norm,
                       VALIDATION_METRICS.get(loss_fn, ()))
    self._flags = (tf.constant(0.0), tf.constant(1.0))  # made once: an eager op per call costs as much as a step
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
    returns (its mean loss, whether a worker was signalled in its last call). Raises Preempted
    after saving on a signal read within the epoch.

    One call (Steps.train) runs steps_per_loop steps; its result is read one call late, so the
    host queues the next call first. Only where a save may be due (a signal read, or a multiple of
    every_steps within reach of the call just queued) is that call read too: a checkpoint holds
    the state after it, never after a NaN."""
    stop, per_call = self.checkpointing.stop, self.steps.steps_per_loop
    total = tf.constant(state.partial, tf.float32)
    late = OneStepLate(state.global_step)
    iterator = iter(self.distributed("train", state.epoch + 1, state.step))
    stopping = last = False
    while not last:
      total, sums = self.steps.train(iterator, total, self._flags[bool(stop and stop.signum is not None)])
      previous = late.swap(sums)
      if previous:  # None after the epoch's first call, and after a call read at once
        self._take(state, previous)
        stopping, last = previous.stop, previous.steps < per_call
      if not last and (stopping or self.checkpointing.due(late.global_step + per_call, steps=per_call)):
        current = late.drain()
        self._take(state, current)  # never save a diverged step
        last = current.steps < per_call
        if self.checkpointing.due(state.global_step, steps=current.steps, stopping=stopping):
          state.partial = [float(v) for v in total.numpy()]
          self.save(state)
          if stopping:
            raise self.preempted(state)
    final = late.drain()  # an empty call when the one before was the epoch's last
    discard(iterator)
    if final:
      self._take(state, final)
    loss_sum, count = total.numpy()
    return loss_sum / max(count, 1), stopping or bool(final and final.stop)

  def _take(self, state, result):
    """Advances state by a call's result, after checking its loss, and hands it to on_step."""
    state.step, state.global_step = state.step + result.steps, result.step
    if not math.isfinite(result.loss_sum):
      self.settle(state, quietly=True)  # the message names the newest complete checkpoint
      raise Diverged.at(state, result.loss_sum, result.diverged_at or result.step, self.steps.clip_norm)
    if self.on_step and result.steps:
      self.on_step(state, result)

  def validate(self):
    """The mean loss over every validation example; its sums stay in self.val_sums for on_epoch."""
    iterator = iter(self.val_data)
    self.val_sums = self.steps.validate(iterator).numpy().astype(np.float64)
    discard(iterator)
    return float(self.val_sums[0] / max(self.val_sums[1], 1))

  def end_epoch(self, state, loss, val_loss, seconds, epochs, validation_seconds=0.0):
    """Records a trained and validated epoch: its losses (TensorBoard too), the best weights so
    far, the epoch's log line. Raises Diverged on a NaN or infinite loss."""
    if not (math.isfinite(loss) and math.isfinite(val_loss)):
      raise Diverged.at(state, loss if not math.isfinite(loss) else f"{val_loss} on validation", state.global_step,
                       self.steps.clip_norm)
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
    if self.on_epoch:
      self.on_epoch(state, loss, self.val_sums, seconds - validation_seconds, validation_seconds)

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
                                      self.checkpointing.background,
                                      functools.partial(_saved, checkpoints, *where, self.checkpointing.after_save,
                                                        self.checkpointing.stop))
    except NotFinite:
      raise Diverged.at(state, "finite but the weights are not", state.global_step, self.steps.clip_norm) from None
    if self.checkpointing.stop:
      self.checkpointing.stop.saving = self._saving
    if not self.checkpointing.background:
      self.settle(state)

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


def _saved(checkpoints, global_step, epoch, step, after_save, stop, seconds):
  """Logs a finished save (and, once, one that took longer than the preemption grace: stop, a
  StopSignal), then runs after_save, on the thread that wrote it: a copy of the logs to gs:// (a
  request per changed file) stays off the training thread, as the save does. A failed copy stops
  nothing: the next one copies what it missed."""
  where = (epoch, step, seconds)
  if checkpoints.publish:
    logging.info("checkpoint %s saved (epoch %d, step %d; %.2f s)", checkpoints.path(global_step), *where)
  else:
    # Every worker writes its part of a collective save; the chief's copy alone is published.
    logging.info("checkpoint of step %d written for the collective save and discarded: the chief publishes %s "
                 "(epoch %d, step %d; %.2f s)", global_step, checkpoints.path(global_step), *where)
  if stop:
    stop.slow_save(checkpoints.path(global_step), seconds)
  if after_save:
    try:
      after_save()
    except StorageError as e:
      logging.warning("TensorBoard logs not copied after checkpoint ckpt-%d: %s; tried again after the next save "
                      "and at the end", global_step, e)


def fit(model, optimizer, loss_fn, make_dataset, strategy, global_batch_size, epochs, patience,
        log_dir=None, jit_compile=False, checkpointing=None, state=None, on_step=None, steps_per_loop=1,
        clip_norm=None, on_epoch=None):
  """Trains until `epochs` or until validation loss has not improved for `patience` epochs, then
  restores the best weights. Returns {"loss": [...], "val_loss": [...], "best_epoch": n, "global_step": n}.

  state: a TrainState, where a restored checkpoint left off (None: from the start); fit advances it.
  Raises Diverged on a NaN or infinite loss and trainer.errors.Preempted after saving on a
  signal. The other arguments: Loop's.
  """
  loop = Loop(model, optimizer, loss_fn, make_dataset, strategy, global_batch_size, log_dir, jit_compile,
              checkpointing, on_step, steps_per_loop, clip_norm, on_epoch)
  state = state or TrainState()
  state.num_replicas = loop.replicas
  while not state.done(epochs, patience):
    started = time.time()
    loss, stopping = loop.train_and_settle(state)
    trained = time.time()
    val_loss = loop.validate()
    loop.end_epoch(state, loss, val_loss, time.time() - started, epochs, validation_seconds=time.time() - trained)
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
