"""trainer.checkpoints on a local folder and on the real storage emulator."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from trainer import storage
from trainer.checkpoints import Checkpoints
from trainer.config import UserError
from trainer.models import MODELS, OPTIMIZERS
from trainer.storage import StorageError


@pytest.fixture
def root(storage_root):
  return storage_root + "/checkpoints"


def make(root, keep=3):
  """A GRU (it has dropout, whose random state must be saved too) with a built optimizer."""
  model = MODELS["gru"]((5, 1))
  optimizer = OPTIMIZERS["gru"](1e-3)
  optimizer.build(model.trainable_variables)
  return model, optimizer, Checkpoints(root, model, optimizer, keep=keep, info={"config": {"model": "gru"}})


def train_a_step(model, optimizer):
  x, y = tf.random.normal((4, 5, 1)), tf.random.normal((4,))
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean((model(x, training=True)[:, 0] - y) ** 2)
  optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))


def variables(model, optimizer):
  return [v.numpy() for v in model.variables + optimizer.variables]


def test_restore_brings_back_weights_optimizer_dropout_state_and_loop_state(root):
  model, optimizer, checkpoints = make(root)
  assert checkpoints.restore_latest() is None
  train_a_step(model, optimizer)
  best = [w * 2 for w in model.get_weights()]
  checkpoints.save(7, {"epoch": 1, "step": 2}, best)
  saved = variables(model, optimizer)
  assert any("seed_generator" in v.path for v in model.variables)  # dropout's state is among them

  model2, optimizer2, checkpoints2 = make(root)
  assert not all(np.array_equal(a, b) for a, b in zip(saved, variables(model2, optimizer2)))
  step, state, best_weights = checkpoints2.restore_latest()
  assert (step, state) == (7, {"config": {"model": "gru"}, "epoch": 1, "step": 2})
  for a, b in zip(saved, variables(model2, optimizer2)):
    np.testing.assert_array_equal(a, b)
  assert int(optimizer2.iterations) == 1
  for a, b in zip(best, best_weights):
    np.testing.assert_array_equal(a, b)


def test_keeps_the_newest_and_cleans_leftovers(root):
  model, optimizer, checkpoints = make(root, keep=2)
  checkpoints.save(1, {"n": 1}, None)
  # A folder without state.json, as a killed upload leaves it: not a checkpoint, and cleaned up.
  storage.write_text(storage.join(root, "ckpt-2", "ckpt.index"), "partial")
  assert checkpoints.complete() == [1]
  for step in (3, 4, 5):
    checkpoints.save(step, {"n": step}, None)
  assert checkpoints.complete() == [4, 5]
  assert storage.list_dir(root) == ["ckpt-4", "ckpt-5"]
  checkpoints.remove_all()
  assert storage.list_dir(root) == []


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(root, caplog):
  model, optimizer, checkpoints = make(root)
  checkpoints.save(1, {"n": 1}, None)
  first = model.get_weights()
  train_a_step(model, optimizer)
  checkpoints.save(2, {"n": 2}, None)
  data = storage.join(root, "ckpt-2", "ckpt.data-00000-of-00001")
  storage.write_bytes(data, storage.read_bytes(data)[:100])  # truncated

  model2, _, checkpoints2 = make(root)
  with caplog.at_level(logging.WARNING):
    step, state, _ = checkpoints2.restore_latest()
  assert (step, state["n"]) == (1, 1)
  assert any("ckpt-2 cannot be read" in r.getMessage() and "trying the one before it" in r.getMessage()
             for r in caplog.records)
  for a, b in zip(first, model2.get_weights()):
    np.testing.assert_array_equal(a, b)

  storage.write_text(storage.join(root, "ckpt-1", "state.json"), "{not json")
  with pytest.raises(UserError, match=r"none of the 2 checkpoints in .* can be read; use --restart"):
    make(root)[2].restore_latest()


def test_an_unreachable_bucket_is_an_error_not_a_fresh_start(gcs_emulator):
  root = gcs_emulator.new_bucket() + "/checkpoints"
  model, optimizer, checkpoints = make(root)
  checkpoints.save(1, {"n": 1}, None)
  gcs_emulator.stop()
  try:
    with pytest.raises(StorageError, match=root.split("/")[2]):
      make(root)[2].restore_latest()
    with pytest.raises(StorageError):
      checkpoints.save(2, {"n": 2}, None)
  finally:
    gcs_emulator.start()
  assert make(root)[2].restore_latest()[0] == 1


def test_non_chief_workers_write_nothing(tmp_path):
  model, optimizer, _ = make(str(tmp_path))
  Checkpoints(str(tmp_path / "c"), model, optimizer, publish=False).save(1, {}, None)
  assert not os.path.exists(tmp_path / "c")
