"""A small linear regression as a Prepared.make_dataset: y = x . [0, 1, 2, 3, 4] / 5 over 5 features."""

import numpy as np
import tensorflow as tf


def make(rows=256, shuffle=False):
  """make_dataset(split, batch_size, input_context=None, epoch=0) of `rows` rows per split (other
  rows for validation), sharded per input pipeline; shuffle: in an order that changes with the epoch."""
  def make_dataset(split, batch_size, input_context=None, epoch=0):
    rng = np.random.default_rng(0 if split == "train" else 1)
    x = rng.standard_normal((rows, 5)).astype(np.float32)
    y = (x @ np.arange(5, dtype=np.float32)) / 5
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if input_context is not None:
      dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return (dataset.shuffle(rows, seed=epoch) if shuffle else dataset).batch(batch_size)
  return make_dataset
