"""--cache=memory, disk and none: the same training batches, in an order drawn from (seed, epoch),
and exact resume under each (trainer/data/images.py, trainer/data/decoded.py)."""

import os
import re
import signal
import tempfile

import numpy as np
import pytest
import tensorflow as tf
from processes import Job, run, stalled

from trainer import storage
from trainer.config import Config
from trainer.data import decoded, image_folder, image_tfrecords, images

POLICIES = ("memory", "disk", "none")


@pytest.fixture
def scratch(tmp_path, monkeypatch):
  """TMPDIR for this test: where a disk cache goes."""
  folder = tmp_path / "scratch"
  folder.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(folder))
  monkeypatch.setattr(decoded, "_scratch", None)
  return folder


def epochs(prepared, *numbers, split="train"):
  """[(uint8 images, labels)] of each epoch, as the training loop gets them (an input context)."""
  context = tf.distribute.InputContext()
  result = []
  for epoch in numbers:
    pairs = [(x.numpy(), y.numpy()) for x, y in prepared.make_dataset(split, 8, context, epoch)]
    result.append((np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs])))
  return result


def test_the_three_policies_give_identical_training_batches_for_a_folder(make_image_folder, scratch):
  folder = make_image_folder({"a": 14, "b": 10, "c": 8})
  got = {}
  cache_files = lambda: {f for folder in scratch.glob("trainer-cache-*") for f in os.listdir(folder)}
  for policy in POLICIES:
    before = cache_files()
    prepared = images.prepare(Config(model="cnn", data=folder, image_size=24, cache=policy))
    assert prepared.summary["cache"] == policy
    got[policy] = epochs(prepared, 0, 1) + epochs(prepared, 0, split="validation")
    # Only the disk cache writes to the scratch folder: one file per split (test, train, validation).
    assert len(cache_files() - before) == (3 if policy == "disk" else 0), policy
  for policy in ("disk", "none"):
    for (x, y), (x_memory, y_memory) in zip(got[policy], got["memory"]):
      np.testing.assert_array_equal(x, x_memory, err_msg=policy)
      np.testing.assert_array_equal(y, y_memory, err_msg=policy)
  (first, _), (second, _), _ = got["memory"]
  assert not np.array_equal(first, second)  # another epoch, another order and augmentation


def test_an_epoch_is_a_permutation_of_the_examples_drawn_from_seed_and_epoch(make_image_folder, scratch):
  """Without augmentation an epoch's pixels are the stored images at permutation(count, seed, epoch)."""
  folder = make_image_folder({"a": 9, "b": 9})
  config = Config(model="cnn", data=folder, image_size=24, cache="none", augment=False)
  (x, y), = epochs(images.prepare(config), 3)
  store = decoded.fill(images.resized(image_folder.dataset(*_train_files(config)), 24), 24, "memory")
  order = np.random.default_rng(config.seed * 100_003 + 3).permutation(len(store))
  np.testing.assert_array_equal(x, store.read(order))
  np.testing.assert_array_equal(y, store.labels[order])


def _train_files(config):
  """The training split's (paths, labels) as images.prepare splits a folder."""
  scan = image_folder.scan(config.data)
  labels = np.array(scan.labels, np.int32)
  rest, _ = image_folder.stratified_split(labels, config.test_split, config.seed)
  train, _ = image_folder.stratified_split(labels[rest], config.validation_split, config.seed + 1)
  return list(np.array(scan.paths)[rest][train]), list(labels[rest][train])
