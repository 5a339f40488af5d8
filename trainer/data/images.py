"""Images for the CNN classifier: a class-per-folder directory, TFRecord shards, a TFDS dataset
or the built-in shapes, all ending in batches of (pixels in [0, 1], label).

Every source is decoded and resized once and cached in memory (as uint8, a quarter of the
floats' size); each epoch then only shuffles and augments, in parallel, in an order and with
random transforms fixed by (seed, epoch), so a resumed job sees what it would have seen.
"""

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import storage
from trainer.data import Prepared, augment, builtin, image_folder, image_tfds, image_tfrecords
from trainer.errors import UserError

# Enough to mix classes well; a whole-epoch buffer would hold a second copy of the images.
_SHUFFLE_BUFFER = 10_000


def resize(image, size):
  """A uint8 image of any size -> uint8 [size, size, 3], as the tutorial's target_size did;
  antialiased, so large photos shrink without aliasing."""
  image = tf.image.resize(image, (size, size), antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def to_float(image, label):
  """uint8 pixels -> float32 in [0, 1], what the model takes (the tutorial's rescale=1/255)."""
  return tf.image.convert_image_dtype(image, tf.float32), label


def _every_kth(examples, k, keep_remainder):
  """Splits a stream that has no file list: example i is held out when i % k == 0."""
  held = lambda i, _: tf.equal(i % k, 0) if not keep_remainder else tf.not_equal(i % k, 0)
  return examples.enumerate().filter(held).map(lambda _, example: example)


class _Splits:
  """Where each split's examples come from: a function of the input context returning a
  dataset of (uint8 image, label), and how many examples there are."""

  def __init__(self, class_names, description, skipped_files=()):
    self.class_names, self.description, self.skipped_files = class_names, description, list(skipped_files)
    self.sources, self.counts = {}, {}


def _from_folder(config):
  disk = image_folder.disk_budget(config)  # a gs:// folder over it is read file by file, not downloaded
  scan = image_folder.scan(config.data, flag="--data", disk_budget=disk)
  splits = _Splits(scan.class_names, config.data, scan.skipped_files)
  paths, labels = np.array(scan.paths), np.array(scan.labels, np.int32)
  if config.test_data:
    test = image_folder.scan(config.test_data, flag="--test_data", disk_budget=disk)
    image_folder.check_same_classes(scan, test)
    splits.skipped_files += test.skipped_files
    test_paths, test_labels = np.array(test.paths), np.array(test.labels, np.int32)
    rest = np.arange(len(labels))
  else:
    rest, held = image_folder.stratified_split(labels, config.test_split, config.seed)
    test_paths, test_labels = paths[held], labels[held]
  train, val = image_folder.stratified_split(labels[rest], config.validation_split, config.seed + 1)
  for name, (p, l) in {"train": (paths[rest][train], labels[rest][train]),
                       "validation": (paths[rest][val], labels[rest][val]),
                       "test": (test_paths, test_labels)}.items():
    splits.sources[name] = lambda context, p=p, l=l: image_folder.dataset(list(p), list(l), context)
    splits.counts[name] = np.bincount(l, minlength=len(scan.class_names)).tolist()
  return splits


def _from_stream(config, train_source, test_source, class_names, description):
  """Sources read as streams (TFRecords, TFDS): validation (and test, when there is no test
  source) are every 5th example of the training stream, fixed, not random."""
  splits = _Splits(class_names, description)
  k = max(2, round(1 / config.validation_split))
  if test_source is None:
    k_test = max(2, round(1 / config.test_split))
    test_source = lambda context: _every_kth(train_source(context), k_test, keep_remainder=False)
    base = lambda context: _every_kth(train_source(context), k_test, keep_remainder=True)
  else:
    base = train_source
  splits.sources = {"train": lambda context: _every_kth(base(context), k, keep_remainder=True),
                    "validation": lambda context: _every_kth(base(context), k, keep_remainder=False),
                    "test": test_source}
  return splits


def _from_tfrecords(config):
  _, metadata = image_tfrecords.read(config.data, flag="--data")
  test = None
  if config.test_data:
    _, test_metadata = image_tfrecords.read(config.test_data, flag="--test_data")
    if test_metadata["class_names"] != metadata["class_names"]:
      raise UserError(f"--test_data={config.test_data} has classes {test_metadata['class_names']}, "
                      f"--data={config.data} has {metadata['class_names']}; give both the same classes")
    test = lambda context: image_tfrecords.read(config.test_data, context, flag="--test_data")[0]
  return _from_stream(config, lambda context: image_tfrecords.read(config.data, context)[0], test,
                      metadata["class_names"], config.data)


def _from_tfds(config):
  name = config.data[len("tfds:"):]
  datasets, class_names = image_tfds.load(name, config.tfds_data_dir, config.tfds_download)
  shard = lambda dataset, context: (dataset if context is None else
                                    dataset.shard(context.num_input_pipelines, context.input_pipeline_id))
  test = datasets.get("test")
  return _from_stream(config, lambda context: shard(datasets["train"], context),
                      None if test is None else lambda context: shard(test, context),
                      class_names, config.data)


def _from_builtin(config):
  images, labels, class_names = builtin.shape_images(size=config.image_size, seed=0)
  splits = _Splits(class_names, "built-in shapes")
  rest, test = image_folder.stratified_split(labels, config.test_split, config.seed)
  train, val = image_folder.stratified_split(labels[rest], config.validation_split, config.seed + 1)
  for name, rows in {"train": rest[train], "validation": rest[val], "test": test}.items():
    def source(context, rows=rows):
      dataset = tf.data.Dataset.from_tensor_slices((images[rows], labels[rows]))
      return dataset if context is None else dataset.shard(context.num_input_pipelines, context.input_pipeline_id)
    splits.sources[name] = source
    splits.counts[name] = np.bincount(labels[rows], minlength=len(class_names)).tolist()
  return splits


def _splits(config):
  if config.data is None:
    return _from_builtin(config)
  if config.data.startswith("tfds:"):
    return _from_tfds(config)
  if storage.is_dir(config.data) and not storage.glob(storage.join(config.data, "*.tfrecord")):
    return _from_folder(config)
  return _from_tfrecords(config)


def decoded(examples, size):
  """(uint8 image of any size, label) -> (uint8 [size, size, 3], int32 label), decoded and
  resized once: the cache fills during the first pass and every later pass reads it."""
  return (examples
          .map(lambda image, label: (resize(image, size), tf.cast(label, tf.int32)),
               num_parallel_calls=tf.data.AUTOTUNE)
          .cache())


def training_batches(examples, batch_size, epoch_seed, augmented=True, floats=True, **augment_options):
  """One epoch of training batches of float pixels (floats=False: uint8) from decoded examples:
  shuffled, and each batch augmented with one stateless seed per (epoch_seed, batch number), so an
  epoch is the same whenever it is replayed. augment_options go to augment.random_transforms."""
  def pixels(index, batch):
    images, labels = batch
    if augmented:
      # Still uint8: a quarter of the bytes to move as float32. Augmentation stays here, on the
      # host's tf.data threads, where it overlaps the step: on a CPU the step would wait for it.
      images = augment.random_transforms(images, tf.stack([tf.constant(epoch_seed, tf.int64), index]),
                                         **augment_options)
    return to_float(images, labels) if floats else (images, labels)

  options = tf.data.Options()
  # Each batch's transforms run whole on the tf.data thread that maps it instead of being split
  # into the pool where the training step's convolutions run (~2% faster training on 2 cores).
  options.threading.max_intra_op_parallelism = 1
  return (examples
          .shuffle(_SHUFFLE_BUFFER, seed=epoch_seed)
          .batch(batch_size)
          .enumerate()
          .map(pixels, num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE)
          .with_options(options))


def prepare(config):
  splits = _splits(config)
  size, seed = config.image_size, config.seed
  cached = {}

  def examples(split, input_context=None):
    # Decoded once per split and input pipeline; every epoch reuses the cache.
    key = (split, 0 if input_context is None else input_context.input_pipeline_id)
    if key not in cached:
      cached[key] = decoded(splits.sources[split](input_context), size)
    return cached[key]

  def make_dataset(split, batch_size, input_context=None, epoch=0):
    # The training loop's input (it gives an input_context) stays uint8 up to the device, where
    # the step converts it (trainer.steps.pixels): a quarter of the bytes over PCIe.
    floats = input_context is None
    if split == "train":
      return training_batches(examples(split, input_context), batch_size, seed * 100_003 + epoch, config.augment,
                              floats)
    batches = examples(split, input_context)
    return ((batches.map(to_float, num_parallel_calls=tf.data.AUTOTUNE) if floats else batches)
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE))

  batches = [labels.numpy() for _, labels in make_dataset("test", 256)]
  if not batches:
    raise UserError(f"{splits.description}: the test split is empty; give more images or --test_data")
  test_labels = np.concatenate(batches)
  n = len(splits.class_names)
  splits.counts["test"] = np.bincount(test_labels, minlength=n).tolist()
  for split in ("train", "validation"):
    if split not in splits.counts:
      # Streams (TFRecords, TFDS) say their class counts only when read: this first pass fills
      # the cache that the first epoch would have filled.
      labels = examples(split).map(lambda image, label: label).batch(4096)
      splits.counts[split] = np.bincount(np.concatenate([b.numpy() for b in labels]), minlength=n).tolist()
  majority = int(np.argmax(splits.counts["train"]))
  logging.info("%s: %d classes (%s); test images: %d", splits.description, len(splits.class_names),
               ", ".join(splits.class_names), len(test_labels))

  def predict(model, export_preprocessing=None):
    """Classes of the test images; for another export, decoded at its own image size, and that
    export's classes must be these (class indices would mean other classes otherwise)."""
    images = make_dataset("test", 256)
    if export_preprocessing is not None:
      if export_preprocessing["class_names"] != splits.class_names:
        classes = ", ".join(export_preprocessing["class_names"])
        raise UserError(f"the model's classes ({classes}) are not those of "
                        f"{splits.description} ({', '.join(splits.class_names)}); it cannot be scored on them")
      if export_preprocessing["image_size"] != size:
        images = (decoded(splits.sources["test"](None), export_preprocessing["image_size"])
                  .map(to_float, num_parallel_calls=tf.data.AUTOTUNE)
                  .batch(256))
    return np.concatenate([np.argmax(model(x, training=False).numpy(), axis=1) for x, _ in images])

  return Prepared(
      make_dataset=make_dataset,
      input_shape=(size, size, 3),
      preprocessing={"kind": "images", "image_size": size, "class_names": splits.class_names,
                     "pixels": "RGB scaled to [0, 1], resized with antialiasing"},
      predict=predict,
      test_targets=test_labels,
      baseline_name=f"majority class ({splits.class_names[majority]})",
      baseline_predictions=np.full(len(test_labels), majority),
      test_index=list(range(len(test_labels))),
      summary={"path": splits.description, "classes": splits.class_names, "image_size": size,
               "augment": config.augment, "counts": splits.counts, "test_images": int(len(test_labels)),
               "skipped_files": splits.skipped_files},
      kind="images",
      num_outputs=len(splits.class_names))
