"""What one call of the training loop does on the devices: several training steps over the
distributed iterator (Steps), what such a call hands back to the host (StepResult, read one call
late by OneStepLate), and the learning rate as a function of the optimizer's step (learning_rate).

Several steps per call, as Orbit's `steps_per_loop` and Keras' `steps_per_execution`: one host
round trip (a tf.function call and a device-to-host read) per N steps instead of per step. A
small model on a GPU otherwise waits on Python, not on the GPU.
"""

import dataclasses
from typing import Optional

import keras
import tensorflow as tf

# Validation runs the whole split in one call: nothing is read or decided between its batches.
_EVERY_BATCH = 2 ** 31 - 1

# What a training call returns besides the running total: its loss sum and example count (what
# it added to the running total, over its steps and replicas), its stop flag (summed over
# replicas), its number of steps, and the 1-based index within the call of its first step whose
# loss was not finite (0: none).
LOSS, COUNT, STOP, STEPS, DIVERGED = range(5)


def _summed(losses):
  # Sum and count rather than a mean, so the epoch's loss is exact whatever the batch sizes.
  return tf.stack([tf.reduce_sum(losses), tf.cast(tf.size(losses), tf.float32)])


def _if_any(batch, compute, otherwise, replicas):
  # A replica can get an empty batch: the last, partial global batch of an epoch may not reach
  # every replica (an odd number of per-replica batches over two, or a worker whose shard ran
  # out first). Keras' LSTM cell fails on one, and cuDNN kernels have; such a replica skips the
  # model and adds nothing (zero gradients, no loss, no examples) to the step's all-reduce.
  # A lone replica never gets one (a batch it is handed has an example), and the check costs it
  # about a tenth of a small model's step (scripts/benchmark_loop.py at --steps_per_loop=100).
  if replicas == 1:
    return compute()
  return tf.cond(tf.shape(batch)[0] > 0, compute, otherwise)


def pixels(inputs):
  """uint8 images (trainer.data.images: the loop's input stays uint8 up to the device) -> float32
  in [0, 1], the model's input, computed where the replica runs; other inputs as they are."""
  return tf.image.convert_image_dtype(inputs, tf.float32) if getattr(inputs, "dtype", None) == tf.uint8 else inputs


class Steps:
  """The step functions, traced once: `train(iterator, total, stop_flag)` runs up to
  `steps_per_loop` training steps on the distributed iterator and returns (the epoch's running
  [loss sum, example count] with theirs added, the call's vector: LOSS, COUNT, STOP, STEPS,
  DIVERGED); `validate(iterator)` returns [loss sum, example count, one sum per metric] over the
  whole iterator (metrics: functions of (targets, outputs) giving per-example values to sum
  besides the loss, e.g. absolute errors). A validation batch's optional third element scales a
  regressor's targets and outputs per example into the data's units before the metrics see them.

  A call ends early when the iterator is exhausted on every worker (get_next_as_optional agrees
  across workers and hands an empty batch to a replica whose data ran out first, see _if_any): a
  call of fewer than steps_per_loop steps is an epoch's last. The running total is added to step
  by step on the device, in the order the host added it when each call was one step: an epoch's
  loss is the same whatever steps_per_loop is. The stop flag rides in every step's all-reduce:
  every worker reads the same value after the same call.

  The batch dimension stays unknown in the traced steps: traced with a static 0 for an empty
  batch, the LSTM fails before _if_any can skip it; and the epoch's last, smaller batch then
  needs no second trace.
  jit_compile: XLA-compile each replica's gradient (the cross-replica part stays outside XLA).
  clip_norm: clip the all-reduced gradient to this global norm (None or 0: no clipping).
  A LossScaleOptimizer (float16) skips a step on every replica when any replica's gradient overflowed.
  """

  def __init__(self, model, optimizer, loss_fn, strategy, steps_per_loop=1, jit_compile=False, clip_norm=None,
               metrics=()):
    self.model, self.optimizer, self.loss_fn, self.strategy = model, optimizer, loss_fn, strategy
    self.metrics = tuple(metrics)
    self.steps_per_loop, self.clip_norm = steps_per_loop, clip_norm or None
    self._loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    self._gradients = tf.function(self._gradients, jit_compile=True) if jit_compile else self._gradients
    self._train_function, self._validate_function = tf.function(self._train), tf.function(self._validate)
    self._traced = {}

  def train(self, iterator, total, stop_flag):
    return self._call(self._train_function, iterator, total, stop_flag)

  def validate(self, iterator):
    return self._call(self._validate_function, iterator)

  def _call(self, function, *args):
    # Each epoch's iterator has the same spec: the function is traced once and its concrete function
    # called directly, which spares the lookup of the trace by its arguments' types at every call
    # (about a third of the host's time per call when a call is one step of a small model).
    if function not in self._traced:
      self._traced[function] = function.get_concrete_function(*args)
    return self._traced[function](*args)

  def _gradients(self, inputs, targets):
    with tf.GradientTape() as tape:
      losses = self.loss_fn(targets, self.model(inputs, training=True))
      # scale_loss: the loss scale of a LossScaleOptimizer (float16), the loss itself otherwise.
      loss = self.optimizer.scale_loss(tf.nn.compute_average_loss(losses))
    return tape.gradient(loss, self.model.trainable_variables), _summed(losses)

  def _nothing_learnt(self):
    return [tf.zeros_like(v) for v in self.model.trainable_variables], tf.zeros([2])

  def _clipped(self, grads):
    # Keras' global_clipnorm would clip each replica's share of the gradient, before the optimizer
    # sums the shares across replicas (BaseOptimizer.apply clips, then TFOptimizer's
    # _backend_update_step all-reduces): two replicas of 32 would then step otherwise than one of
    # 64. So the whole gradient is summed here, clipped, and handed to the optimizer in equal
    # shares that its all-reduce sums back (exactly, for a power-of-two number of replicas).
    context = tf.distribute.get_replica_context()
    grads = context.all_reduce("SUM", grads)
    # Under a LossScaleOptimizer the gradients are scaled, so the threshold is too.
    grads, _ = tf.clip_by_global_norm(grads, self.optimizer.scale_loss(tf.constant(self.clip_norm, tf.float32)))
    return [g / context.num_replicas_in_sync for g in grads]

  def _agreed(self, grads):
    # Keras 3's LossScaleOptimizer decides whether to take a step from each replica's own gradient,
    # before the all-reduce, and follows replica 0's answer (LossScaleOptimizer._tf_apply in
    # github.com/keras-team/keras keras/src/optimizers/loss_scale_optimizer.py, 3.15; the all-reduce,
    # TFOptimizer._backend_update_step, runs inside the step it takes): another replica's overflow
    # was summed into the weights, and under MultiWorkerMirroredStrategy a worker that skipped left
    # the others in the all-reduce. So the replicas count their non-finite gradients in one scalar
    # all-reduce (ReduceOp has no MIN), and every replica hands the optimizer a gradient that is not
    # finite when any is: all skip together and halve the scale alike. Summing the gradients first,
    # as _clipped does (they then agree), would all-reduce them twice a step.
    finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads])
    overflows = tf.distribute.get_replica_context().all_reduce("SUM", 1.0 - tf.cast(finite, tf.float32))
    return tf.cond(overflows > 0, lambda: [tf.fill(tf.shape(g), tf.constant(float("nan"), g.dtype)) for g in grads],
                   lambda: grads)

  def _train_step(self, inputs, targets, stop_flag):
    grads, sums = _if_any(inputs, lambda: self._gradients(inputs, targets), self._nothing_learnt,
                          self.strategy.num_replicas_in_sync)
    if self.clip_norm:
      grads = self._clipped(grads)
    elif self._loss_scaled and self.strategy.num_replicas_in_sync > 1:
      grads = self._agreed(grads)
    self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
    return tf.concat([sums, [stop_flag]], 0)

  def _train(self, iterator, total, stop_flag):
    # Per step only what must be: a small model's step is a few hundred microseconds on the host,
    # and each op of this bookkeeping costs a few.
    before, step, steps, finite = total, tf.zeros([3]), tf.constant(0.0), tf.constant(0.0)
    for _ in tf.range(self.steps_per_loop):
      batch = iterator.get_next_as_optional()
      if not batch.has_value():
        break
      inputs, targets = batch.get_value()
      step = self.strategy.reduce("SUM", self.strategy.run(lambda x, y, flag: self._train_step(pixels(x), y, flag),
                                                           (inputs, targets, stop_flag)), axis=None)
      total += step[:2]
      steps += 1
      # A running loss that is NaN or infinite stays so: the steps it was finite after come before the first bad one.
      finite += tf.cast(tf.math.is_finite(total[0]), tf.float32)
    # The stop flag is the same in every step of a call (and the last step's is all-reduced).
    return total, tf.concat([total - before, [step[2], steps, tf.where(finite < steps, finite + 1, 0.0)]], 0)

  def _validation_step(self, x, y, units=None):
    def sums():
      outputs = self.model(x, training=False)
      loss = _summed(self.loss_fn(y, outputs))
      targets = y
      if units is not None:
        # The error of a regressor in the data's units: both sides scaled alike.
        outputs, targets = tf.cast(outputs, tf.float32) * units[:, None], y * units
      return tf.concat([loss, [tf.reduce_sum(metric(targets, outputs)) for metric in self.metrics]], 0)
    return _if_any(x, sums, lambda: tf.zeros([2 + len(self.metrics)]), self.strategy.num_replicas_in_sync)

  def _validate(self, iterator):
    total = tf.zeros([2 + len(self.metrics)])
    for _ in tf.range(_EVERY_BATCH):
      batch = iterator.get_next_as_optional()
      if not batch.has_value():
        break
      total += self.strategy.reduce("SUM", self.strategy.run(lambda x, *rest: self._validation_step(pixels(x), *rest),
                                                             batch.get_value()), axis=None)
    return total


@dataclasses.dataclass(frozen=True)
class StepResult:
  """One training call's all-reduced result, read on the host: loss_sum and count are summed
  over its `steps` steps; `step` is the global step after it. A call of 0 steps found the
  epoch's data exhausted."""
  step: int  # global step after the call
  loss_sum: float
  count: float
  stop: bool  # whether any worker was signalled
  steps: int = 1
  diverged_at: Optional[int] = None  # the global step of the call's first non-finite loss

  @classmethod
  def read(cls, sums, before):
    """The result of a call's vector (Steps.train) that started after global step `before`."""
    values = sums.numpy()
    steps, diverged = int(values[STEPS]), int(values[DIVERGED])
    return cls(before + steps, float(values[LOSS]), float(values[COUNT]), bool(values[STOP] > 0), steps,
               before + diverged if diverged else None)


class OneStepLate:
  """Hands back each call's result once the next call is queued: reading the current one would
  make the host wait for every call before it queues the next. All workers read the same values,
  so all stop after the same call. global_step: the step after the last call read."""

  def __init__(self, global_step=0):
    self.global_step = global_step
    self._pending = None

  def swap(self, sums):
    """Keeps the call just queued; returns the result of the one before it (None after the first)."""
    previous, self._pending = self._pending, sums
    if previous is None:
      return None
    result = StepResult.read(previous, self.global_step)
    self.global_step = result.step
    return result

  def drain(self):
    """The last call's result (None when there was none)."""
    return self.swap(None)


def learning_rate(schedule, rate, warmup_steps=0, total_steps=0):
  """The optimizer's learning rate: `rate` itself (constant, no warmup), or a schedule of the
  optimizer's step count: a linear warmup from 0 over `warmup_steps`, then `rate` (constant) or
  a cosine decay from `rate` to 0 at `total_steps`. A function of the step the checkpoint
  restores, so a resumed job follows the same curve."""
  if schedule == "constant" and not warmup_steps:
    return rate
  return keras.optimizers.schedules.CosineDecay(
      0.0, max(total_steps - warmup_steps, 1), alpha=1.0 if schedule == "constant" else 0.0, warmup_target=rate,
      warmup_steps=warmup_steps)
