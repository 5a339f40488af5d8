"""The one training loop, for every distribution strategy.

A custom loop (strategy.run over datasets from distribute_datasets_from_function) rather than
Keras `model.fit`, because Keras 3.15 `fit` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585) and the same loop must serve one device, many GPUs and many workers.
"""

import math
import time

import keras
import tensorflow as tf
from absl import logging

from trainer.config import UserError


def squared_error(targets, outputs):
  """Per-example loss of a one-output regressor (in float32 under mixed precision too)."""
  return tf.square(tf.cast(outputs[:, 0], tf.float32) - targets)


def cross_entropy(labels, probabilities):
  """Per-example loss of a softmax classifier (in float32 under mixed precision too)."""
  return keras.losses.sparse_categorical_crossentropy(labels, tf.cast(probabilities, tf.float32))


def fit(model, optimizer, loss_fn, make_dataset, strategy, global_batch_size, epochs, patience,
        log_dir=None, jit_compile=False):
  """Trains until `epochs` or until validation loss has not improved for `patience` epochs, then
  restores the best weights. Returns {"loss": [...], "val_loss": [...], "best_epoch": n}.
  jit_compile: XLA-compile each replica's step (the cross-replica part stays outside XLA)."""
  replicas = strategy.num_replicas_in_sync

  def distributed(split, epoch=0):
    return strategy.distribute_datasets_from_function(
        lambda context: make_dataset(split, context.get_per_replica_batch_size(global_batch_size), context, epoch))

  val_data = distributed("validation")

  def summed(losses):
    # Sum and count rather than a mean, so the epoch's loss is exact whatever the batch sizes.
    return tf.reduce_sum(losses), tf.cast(tf.size(losses), tf.float32)

  def gradients(inputs, targets):
    with tf.GradientTape() as tape:
      losses = loss_fn(targets, model(inputs, training=True))
      # scale_loss: the loss scale of a LossScaleOptimizer (float16), the loss itself otherwise.
      loss = optimizer.scale_loss(tf.nn.compute_average_loss(losses))
    return tape.gradient(loss, model.trainable_variables), summed(losses)

  if jit_compile:
    gradients = tf.function(gradients, jit_compile=True)

  @tf.function
  def train_step(inputs, targets):
    def step(inputs, targets):
      grads, sums = gradients(inputs, targets)
      optimizer.apply_gradients(zip(grads, model.trainable_variables))
      return sums
    return [strategy.reduce("SUM", v, axis=None) for v in strategy.run(step, (inputs, targets))]

  @tf.function
  def val_step(inputs, targets):
    step = lambda x, y: summed(loss_fn(y, model(x, training=False)))
    return [strategy.reduce("SUM", v, axis=None) for v in strategy.run(step, (inputs, targets))]

  def run_epoch(step_fn, data):
    # Summed as tensors and read once per epoch: a float() per step would make the host wait for
    # every step to finish before it could queue the next.
    total, count = tf.constant(0.0), tf.constant(0.0)
    for inputs, targets in data:
      loss_sum, n = step_fn(inputs, targets)
      total, count = total + loss_sum, count + n
    return float(total) / max(float(count), 1)

  writers = {}
  if log_dir:
    writers = {s: tf.summary.create_file_writer(f"{log_dir}/{s}") for s in ("train", "validation")}
  history = {"loss": [], "val_loss": []}
  best, best_epoch, best_weights = math.inf, 0, None
  for epoch in range(1, epochs + 1):
    start = time.time()
    # A dataset per epoch: its order depends only on the seed and the epoch, so a resumed job
    # continues with the order it would have had.
    loss, val_loss = run_epoch(train_step, distributed("train", epoch)), run_epoch(val_step, val_data)
    if not (math.isfinite(loss) and math.isfinite(val_loss)):
      raise UserError(f"training diverged: the loss is {loss} at epoch {epoch}; lower --learning_rate")
    history["loss"].append(loss)
    history["val_loss"].append(val_loss)
    for split, value in (("train", loss), ("validation", val_loss)):
      if split in writers:
        with writers[split].as_default():
          tf.summary.scalar("epoch_loss", value, step=epoch)
    improved = val_loss < best
    if improved:
      best, best_epoch, best_weights = val_loss, epoch, model.get_weights()
    logging.info("epoch %d/%d  loss %.4f  val_loss %.4f%s  (%.1f s, %d replica%s)", epoch, epochs, loss,
                 val_loss, "  *" if improved else "", time.time() - start, replicas, "s" if replicas > 1 else "")
    if epoch - best_epoch >= patience:
      logging.info("early stopping: val_loss has not improved for %d epochs; keeping epoch %d", patience, best_epoch)
      break
  for writer in writers.values():
    writer.flush()
  model.set_weights(best_weights)
  history["best_epoch"] = best_epoch
  return history
