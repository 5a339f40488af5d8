"""Images for the CNN classifier: a class-per-folder directory, TFRecord shards, a TFDS dataset
or the built-in shapes, all ending in batches of (pixels in [0, 1], label).

Decoded images are kept as --cache says (trainer/data/decoded.py): in memory or on local disk
(uint8, resized, filled by one decoding pass), or not at all (decoded from the source every
epoch); --cache=auto picks the first that fits (trainer/data/budget.py). An epoch's order is a
permutation of example indices drawn from (seed, epoch) and each batch is augmented with a seed
of (seed, epoch, batch number), so every policy gives the same batches and a resumed job sees
what it would have seen. Streams (TFRecords, TFDS) cannot be read by index: under `none` they
are read in their order through a bounded shuffle buffer seeded by (seed, epoch).
"""

import os

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import storage
from trainer.data import Prepared, augment, budget, builtin, image_folder, image_tfds, image_tfrecords
from trainer.data import decoded as store_lib
from trainer.errors import UserError

# Streams under --cache=none only (every other source is shuffled by index): mixes neighbouring
# examples; its memory (this many decoded images) stays the same however large the set is.
STREAM_BUFFER = 1_000


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


def _share(items, context):
  """This input pipeline's share of an array: Dataset.shard's rule (every n-th, from its id)."""
  if context is None or context.num_input_pipelines == 1:
    return items
  return items[context.input_pipeline_id::context.num_input_pipelines]


def _pipeline(context):
  return (1, 0) if context is None else (context.num_input_pipelines, context.input_pipeline_id)


class _Splits:
  """Where each split's examples come from: a function of the input context returning a
  dataset of (uint8 image, label), and how many examples there are."""

  def __init__(self, class_names, description, skipped_files=()):
    self.class_names, self.description, self.skipped_files = class_names, description, list(skipped_files)
    self.sources, self.counts = {}, {}
    # Sources addressable by index (folders, built-in): split -> function of the input context
    # returning (the share's labels, read), read(order) a dataset of that share's (uint8 image,
    # label) at those indices, in that order.
    self.indexed = {}
    # Examples of each split (all pipelines), known before anything is decoded: --cache=auto's estimate.
    self.sizes = {}


def _by_index(items, labels, context, read):
  items, labels = _share(items, context), _share(labels, context)
  return labels, lambda order: read(items[order], labels[order])


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
  read = lambda p, l: image_folder.dataset(list(p), list(l))
  for name, (p, l) in {"train": (paths[rest][train], labels[rest][train]),
                       "validation": (paths[rest][val], labels[rest][val]),
                       "test": (test_paths, test_labels)}.items():
    splits.sources[name] = lambda context, p=p, l=l: image_folder.dataset(list(p), list(l), context)
    splits.indexed[name] = lambda context, p=p, l=l: _by_index(p, l, context, read)
    splits.counts[name] = np.bincount(l, minlength=len(scan.class_names)).tolist()
    splits.sizes[name] = len(l)
  return splits


def _from_stream(config, train_source, test_source, class_names, description, size, test_size):
  """Sources read as streams (TFRecords, TFDS): validation (and test, when there is no test
  source) are every 5th example of the training stream, fixed, not random. size, test_size:
  the sources' examples (test_size None without a test source)."""
  splits = _Splits(class_names, description)
  k = max(2, round(1 / config.validation_split))
  if test_source is None:
    k_test = max(2, round(1 / config.test_split))
    test_source = lambda context: _every_kth(train_source(context), k_test, keep_remainder=False)
    base = lambda context: _every_kth(train_source(context), k_test, keep_remainder=True)
    test_size = -(-size // k_test)  # i % k == 0 for ceil(n / k) of n examples
    size -= test_size
  else:
    base = train_source
  splits.sources = {"train": lambda context: _every_kth(base(context), k, keep_remainder=True),
                    "validation": lambda context: _every_kth(base(context), k, keep_remainder=False),
                    "test": test_source}
  splits.sizes = {"train": size - -(-size // k), "validation": -(-size // k), "test": test_size}
  return splits


def _tfrecords_size(metadata):
  """Examples in the shards read (metadata["files"]), from metadata.json's shard sizes."""
  sizes = dict(zip(metadata["shards"], metadata.get("shard_sizes", [])))
  if len(sizes) != len(metadata["shards"]):  # an older metadata.json: its total
    return metadata["num_examples"]
  return sum(sizes[os.path.basename(f)] for f in metadata["files"])


def _from_tfrecords(config):
  _, metadata = image_tfrecords.read(config.data, flag="--data")
  test, test_size = None, None
  if config.test_data:
    _, test_metadata = image_tfrecords.read(config.test_data, flag="--test_data")
    if test_metadata["class_names"] != metadata["class_names"]:
      raise UserError(f"--test_data={config.test_data} has classes {test_metadata['class_names']}, "
                      f"--data={config.data} has {metadata['class_names']}; give both the same classes")
    test = lambda context: image_tfrecords.read(config.test_data, context, flag="--test_data")[0]
    test_size = _tfrecords_size(test_metadata)
  return _from_stream(config, lambda context: image_tfrecords.read(config.data, context)[0], test,
                      metadata["class_names"], config.data, _tfrecords_size(metadata), test_size)


def _cardinality(dataset):
  """A TFDS split's examples: TFDS gives its datasets their cardinality; counted if it did not."""
  n = int(dataset.cardinality())
  return n if n >= 0 else int(dataset.reduce(0, lambda count, _: count + 1))


def _from_tfds(config):
  name = config.data[len("tfds:"):]
  datasets, class_names = image_tfds.load(name, config.tfds_data_dir, config.tfds_download)
  shard = lambda dataset, context: (dataset if context is None else
                                    dataset.shard(context.num_input_pipelines, context.input_pipeline_id))
  test = datasets.get("test")
  return _from_stream(config, lambda context: shard(datasets["train"], context),
                      None if test is None else lambda context: shard(test, context),
                      class_names, config.data, _cardinality(datasets["train"]),
                      None if test is None else _cardinality(test))


def _from_builtin(config):
  images, labels, class_names = builtin.shape_images(size=config.image_size, seed=0)
  splits = _Splits(class_names, "built-in shapes")
  rest, test = image_folder.stratified_split(labels, config.test_split, config.seed)
  train, val = image_folder.stratified_split(labels[rest], config.validation_split, config.seed + 1)
  read = lambda rows, l: tf.data.Dataset.from_tensor_slices((images[rows], l))
  for name, rows in {"train": rest[train], "validation": rest[val], "test": test}.items():
    def source(context, rows=rows):
      dataset = tf.data.Dataset.from_tensor_slices((images[rows], labels[rows]))
      return dataset if context is None else dataset.shard(context.num_input_pipelines, context.input_pipeline_id)
    splits.sources[name] = source
    splits.indexed[name] = lambda context, rows=rows: _by_index(rows, labels[rows], context, read)
    splits.counts[name] = np.bincount(labels[rows], minlength=len(class_names)).tolist()
    splits.sizes[name] = len(rows)
  return splits


def _splits(config):
  if config.data is None:
    return _from_builtin(config)
  if config.data.startswith("tfds:"):
    return _from_tfds(config)
  if storage.is_dir(config.data) and not storage.glob(storage.join(config.data, "*.tfrecord")):
    return _from_folder(config)
  return _from_tfrecords(config)


def _policy(config, splits):
  """memory, disk or none (trainer.data.budget decides, from this process's decoded bytes: its
  share of training and validation, and the whole test split, which every worker scores)."""
  workers = config.cluster.num_workers
  images = -(-(splits.sizes["train"] + splits.sizes["validation"]) // workers) + splits.sizes["test"]
  size = config.image_size
  return budget.choose_cache(config, images * size * size * 3,
                             f"{images:,} images of {size}x{size} px from {splits.description}")


def resized(examples, size):
  """(uint8 image of any size, label) -> (uint8 [size, size, 3], int32 label), in order."""
  return examples.map(lambda image, label: (resize(image, size), tf.cast(label, tf.int32)),
                      num_parallel_calls=tf.data.AUTOTUNE)


def permutation(count, epoch_seed):
  """The order of an epoch's examples by index, the same for every policy."""
  return np.random.default_rng(epoch_seed).permutation(count)


def augmented_batches(batches, epoch_seed, augmented=True, floats=True, **augment_options):
  """Batches of (uint8 images, labels) -> training batches of float pixels (floats=False: uint8),
  each augmented with one stateless seed per (epoch_seed, batch number), so an epoch is the same
  whenever it is replayed. augment_options go to augment.random_transforms."""
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
  return (batches
          .enumerate()
          .map(pixels, num_parallel_calls=tf.data.AUTOTUNE)
          .prefetch(tf.data.AUTOTUNE)
          .with_options(options))


def streamed_batches(examples, batch_size, epoch_seed):
  """A stream's examples in batches, shuffled through a buffer of STREAM_BUFFER seeded by epoch_seed."""
  return examples.shuffle(STREAM_BUFFER, seed=epoch_seed).batch(batch_size)


def prepare(config):
  splits = _splits(config)
  size, seed = config.image_size, config.seed
  policy = _policy(config, splits)
  stores = {}

  def store(split, input_context):
    # Filled once per split and input pipeline (that pipeline's share); every epoch reads it.
    key = (split, _pipeline(input_context))
    if key not in stores:
      for other in [k for k in stores if k[0] == split]:
        # Only the share this pipeline trains on is kept (streams count the whole split first); a
        # dataset still reading another keeps it until it is gone (a disk store's file with it).
        del stores[other]
      stores[key] = store_lib.fill(resized(splits.sources[split](input_context), size), size, policy)
    return stores[key]

  def train_batches(input_context, batch_size, epoch_seed):
    if policy != "none":
      examples = store("train", input_context)
      return examples.batches(permutation(len(examples), epoch_seed), batch_size)
    if "train" in splits.indexed:
      labels, read = splits.indexed["train"](input_context)
      return resized(read(permutation(len(labels), epoch_seed)), size).batch(batch_size)
    return streamed_batches(resized(splits.sources["train"](input_context), size), batch_size, epoch_seed)

  def make_dataset(split, batch_size, input_context=None, epoch=0):
    # The training loop's input (it gives an input_context) stays uint8 up to the device, where
    # the step converts it (trainer.steps.pixels): a quarter of the bytes over PCIe.
    floats = input_context is None
    if split == "train":
      epoch_seed = seed * 100_003 + epoch
      return augmented_batches(train_batches(input_context, batch_size, epoch_seed), epoch_seed, config.augment,
                               floats)
    if policy != "none":
      examples = store(split, input_context)
      batches = examples.batches(np.arange(len(examples)), batch_size)
    else:
      batches = resized(splits.sources[split](input_context), size).batch(batch_size)
    return (batches.map(to_float, num_parallel_calls=tf.data.AUTOTUNE) if floats else batches).prefetch(
        tf.data.AUTOTUNE)

  def labels(split):
    if policy != "none":
      return store(split, None).labels
    if split in splits.indexed:
      return splits.indexed[split](None)[0]
    # A stream under --cache=none says its labels only when read: one pass.
    batches = splits.sources[split](None).map(lambda image, label: label).batch(4096)
    return np.concatenate([np.zeros(0, np.int32)] + list(batches.as_numpy_iterator()))

  test_labels = labels("test")
  if not len(test_labels):
    raise UserError(f"{splits.description}: the test split is empty; give more images or --test_data")
  n = len(splits.class_names)
  splits.counts["test"] = np.bincount(test_labels, minlength=n).tolist()
  for split in ("train", "validation"):
    if split not in splits.counts:
      # Streams (TFRecords, TFDS) say their class counts only when read: in memory or on disk this
      # first pass fills the store that the first epoch would have filled.
      splits.counts[split] = np.bincount(labels(split), minlength=n).tolist()
  majority = int(np.argmax(splits.counts["train"]))
  # A stream's epochs are ordered by index once cached, by the stream and its buffer under none: a
  # checkpoint is bound to the one it was written under (trainer.train), which a resume must keep.
  order = {} if "train" in splits.indexed else {
      "stream_order": "none: streamed, shuffled in a buffer" if policy == "none" else "memory or disk: by index"}
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
        images = (resized(splits.sources["test"](None), export_preprocessing["image_size"])
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
               "skipped_files": splits.skipped_files, "cache": policy, **order},
      kind="images",
      num_outputs=len(splits.class_names))
