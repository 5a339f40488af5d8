"""The CNN's input pipeline from every kind of source, and one real training run."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from trainer import loop, steps, storage, train, transfer
from trainer.config import Config, UserError
from trainer.data import builtin, image_folder, image_tfrecords, images
from trainer.models import MODELS, OPTIMIZERS


def batches(dataset):
  xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
  return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("shape", [(10, 30, 3), (40, 40, 3), (7, 5, 3)])
def test_resize_is_the_same_eagerly_and_in_tf_data(shape):
  image = tf.constant(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
  eager = images.resize(image, 24)
  (in_data,) = list(tf.data.Dataset.from_tensors(image).map(lambda i: images.resize(i, 24)))
  assert eager.shape == (24, 24, 3) and eager.dtype == tf.uint8
  np.testing.assert_array_equal(eager.numpy(), in_data.numpy())


def test_resize_to_the_same_size_is_the_identity():
  image = tf.constant(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8))
  np.testing.assert_array_equal(images.resize(image, 24).numpy(), image.numpy())


def test_to_float_is_the_same_eagerly_and_in_tf_data():
  image = tf.constant(np.arange(0, 256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2))
  eager, _ = images.to_float(image, 0)
  (in_data, _), = list(tf.data.Dataset.from_tensors((image, 0)).map(images.to_float))
  np.testing.assert_array_equal(eager.numpy(), in_data.numpy())
  assert eager.dtype == tf.float32 and float(eager[0, 0, 0]) == 0 and float(eager[-1, -1, 0]) == 1


def test_builtin_shapes_give_float_batches_of_the_right_shape():
  prepared = images.prepare(Config(model="cnn", image_size=24))
  assert prepared.input_shape == (24, 24, 3) and prepared.num_outputs == 4
  x, y = next(iter(prepared.make_dataset("train", 8)))
  assert x.shape == (8, 24, 24, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
  assert 0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1
  counts = prepared.summary["counts"]
  assert sum(map(sum, counts.values())) == 600 and counts["test"] == [30, 30, 30, 30]


def test_without_augmentation_training_pixels_are_the_images():
  """Generated at the model's size, so resizing is the identity: pixels / 255, reordered."""
  prepared = images.prepare(Config(model="cnn", image_size=24, augment=False))
  x, y = batches(prepared.make_dataset("train", 50))
  source, labels, _ = builtin.shape_images(size=24, seed=0)
  assert np.abs(x * 255 - np.round(x * 255)).max() < 1e-3  # exact multiples of 1/255
  expected = {(int(l), i.tobytes()) for i, l in zip(source, labels)}
  got = {(int(l), np.round(i * 255).astype(np.uint8).tobytes()) for i, l in zip(x, y)}
  assert got <= expected and len(got) == len(x)


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_augmentation_is_fixed_by_seed_and_epoch():
  prepared = images.prepare(Config(model="cnn", image_size=24))
  first = batches(prepared.make_dataset("train", 50, epoch=0))
  again = batches(prepared.make_dataset("train", 50, epoch=0))
  np.testing.assert_array_equal(first[0], again[0])
  later = batches(prepared.make_dataset("train", 50, epoch=1))
  assert not np.array_equal(first[0], later[0])
  # Augmented, not the plain images: some pixels differ from every source image.
  plain = batches(images.prepare(Config(model="cnn", image_size=24, augment=False)).make_dataset("train", 50))
  assert not np.array_equal(np.sort(first[0].ravel()), np.sort(plain[0].ravel()))


def test_validation_and_test_are_never_augmented_or_shuffled():
  prepared = images.prepare(Config(model="cnn", image_size=24))
  for split in ("validation", "test"):
    np.testing.assert_array_equal(batches(prepared.make_dataset(split, 16))[0],
                                  batches(prepared.make_dataset(split, 16))[0])


def test_the_training_loop_gets_uint8_pixels_that_the_step_turns_into_the_same_floats():
  """With an input context (the loop's distributed input) batches stay uint8 up to the device: a
  quarter of float32's bytes over PCIe. The step's conversion gives the host's floats exactly."""
  prepared = images.prepare(Config(model="cnn", image_size=24))
  context = tf.distribute.InputContext()
  for split in ("train", "validation"):
    raw, labels = batches(prepared.make_dataset(split, 16, context))
    floats, float_labels = batches(prepared.make_dataset(split, 16))
    assert raw.dtype == np.uint8, split
    np.testing.assert_array_equal(steps.pixels(tf.constant(raw)).numpy(), floats)
    np.testing.assert_array_equal(labels, float_labels)


@pytest.mark.slow  # trains a small CNN twice
def test_a_cnn_trained_on_uint8_batches_learns_what_one_on_float_batches_learns():
  prepared = images.prepare(Config(model="cnn", image_size=24))
  # The same data with the host's floats: the pipeline as it was before the conversion moved to the device.
  on_host = lambda split, batch_size, input_context=None, epoch=0: prepared.make_dataset(split, batch_size, None, epoch)
  weights = []
  for make_dataset in (prepared.make_dataset, on_host):
    keras.utils.set_random_seed(0)
    model, optimizer = MODELS["cnn"](prepared.input_shape, prepared.num_outputs), OPTIMIZERS["cnn"](1e-3)
    optimizer.build(model.trainable_variables)
    history = loop.fit(model, optimizer, loop.cross_entropy, make_dataset, tf.distribute.get_strategy(), 32, 1, 1,
                       steps_per_loop=4)
    weights.append((history["loss"], history["val_loss"], [w.numpy() for w in model.weights]))
  assert weights[0][:2] == weights[1][:2]
  for a, b in zip(weights[0][2], weights[1][2]):
    np.testing.assert_array_equal(a, b)


def test_folder_split_is_stratified_and_disjoint(make_image_folder):
  prepared = images.prepare(Config(model="cnn", data=make_image_folder({"a": 20, "b": 10}), image_size=24))
  counts = prepared.summary["counts"]
  assert counts["test"] == [4, 2]
  assert [sum(c) for c in zip(*counts.values())] == [20, 10]
  assert prepared.preprocessing["class_names"] == ["a", "b"]


def test_separate_test_folder(make_image_folder):
  test = make_image_folder({"red": 3, "green": 3, "blue": 3}, name="test")
  config = Config(model="cnn", data=make_image_folder(name="train"), test_data=test, image_size=24)
  prepared = images.prepare(config)
  assert prepared.summary["counts"]["test"] == [3, 3, 3] and len(prepared.test_targets) == 9


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_tfrecord_shards_as_data(make_image_folder, tmp_path):
  image_tfrecords.write_shards(image_folder.scan(make_image_folder()), str(tmp_path / "shards"), 3)
  prepared = images.prepare(Config(model="cnn", data=str(tmp_path / "shards"), image_size=24))
  assert prepared.preprocessing["class_names"] == ["blue", "green", "red"]
  train_y = batches(prepared.make_dataset("train", 64))[1]
  val_y = batches(prepared.make_dataset("validation", 64))[1]
  assert len(train_y) + len(val_y) + len(prepared.test_targets) == 36


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_folders_and_shards_on_gcs_give_what_the_local_copies_give(make_image_folder, tmp_path, gcs_bucket):
  folder = make_image_folder({"a": 8, "b": 6})
  shards = str(tmp_path / "shards")
  image_tfrecords.write_shards(image_folder.scan(folder), shards, 2)
  for local, remote in [(folder, storage.join(gcs_bucket, "images")), (shards, storage.join(gcs_bucket, "shards"))]:
    transfer.publish_dir(local, remote)
    expected, got = (images.prepare(Config(model="cnn", data=data, image_size=24)) for data in (local, remote))
    assert got.summary["counts"] == expected.summary["counts"]
    np.testing.assert_array_equal(got.test_targets, expected.test_targets)
    np.testing.assert_array_equal(batches(got.make_dataset("validation", 64))[0],
                                  batches(expected.make_dataset("validation", 64))[0])


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_tfds_by_name_through_mock_data():
  with tfds.testing.mock_data(num_examples=40):
    prepared = images.prepare(Config(model="cnn", data="tfds:mnist", image_size=28))
    assert prepared.num_outputs == 10 and prepared.input_shape == (28, 28, 3)
    x, _ = next(iter(prepared.make_dataset("train", 4)))
    assert x.shape == (4, 28, 28, 3)


@pytest.mark.slow  # trains a CNN
def test_cnn_trains_on_a_messy_folder_and_reports(make_image_folder, tmp_path):
  root = make_image_folder()  # odd sizes already: 20x20, 21x20, 22x20
  rng = np.random.default_rng(1)
  grey = tf.constant(rng.integers(0, 256, (31, 17, 1), dtype=np.uint8))
  rgba = tf.constant(rng.integers(0, 256, (12, 40, 4), dtype=np.uint8))
  with open(os.path.join(root, "blue", "grey.png"), "wb") as f:
    f.write(tf.io.encode_png(grey).numpy())
  with open(os.path.join(root, "blue", "rgba.png"), "wb") as f:
    f.write(tf.io.encode_png(rgba).numpy())
  jpeg = tf.io.encode_jpeg(tf.constant(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))).numpy()
  with open(os.path.join(root, "red", "truncated.jpg"), "wb") as f:
    f.write(jpeg[:len(jpeg) // 2])
  with open(os.path.join(root, "green", "notes.txt"), "w") as f:
    f.write("not an image")
  result = train.train_and_evaluate(Config(model="cnn", data=root, image_size=24, epochs=2, batch_size=8),
                                    str(tmp_path / "job"))
  assert set(result["test"]) == {"accuracy", "per_class"} and "accuracy" in result["baseline"]
  assert result["class_names"] == ["blue", "green", "red"]
  assert sorted(os.path.basename(f["path"]) for f in result["skipped_files"]) == ["notes.txt", "truncated.jpg"]
  # 14 blue images (the grey and RGBA ones included), 12 of the others; 20% of each held out.
  assert result["data"]["counts"]["test"] == [3, 2, 2]
  assert np.array(result["confusion_matrix"]).sum() == result["data"]["test_images"] == 7
  assert sorted(result["plots"]) == ["augmentation_preview.png", "class_distribution.png", "confusion_matrix.png",
                                     "history.png", "test_predictions.png"]
  saved = json.loads((tmp_path / "job" / "export" / "1" / "trainer_export.json").read_text())["preprocessing"]
  assert saved["class_names"] == ["blue", "green", "red"] and saved["image_size"] == 24


def test_image_size_too_small():
  with pytest.raises(UserError, match="--image_size must be at least 22"):
    Config(model="cnn", image_size=16)


def test_another_exports_preprocessing_decodes_at_its_own_size(make_image_folder):
  folder = make_image_folder()
  mine, theirs = (images.prepare(Config(model="cnn", data=folder, image_size=size)) for size in (24, 30))
  model = MODELS["cnn"]((30, 30, 3), 3)
  # A model of 30x30 inputs scored on the 24x24 split: its test images decoded at 30x30.
  np.testing.assert_array_equal(mine.predict(model, theirs.preprocessing), theirs.predict(model))
  with pytest.raises(UserError, match=r"the model's classes \(blue, green\) are not those of"):
    mine.predict(model, {**theirs.preprocessing, "class_names": ["blue", "green"]})
