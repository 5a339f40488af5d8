"""Images as sharded TFRecord files: written once from a class folder, read in parallel by every worker.

Why: thousands of small image files are slow to list and open, above all on Cloud Storage; a
few large files read in parallel are fast, and give each worker whole files of its own. A shard
holds tf.train.Examples with the original encoded bytes (`image`, so nothing is re-encoded or
lost) and the class index (`label`); `metadata.json` beside the shards holds the class names
and counts. Write them with scripts/make_tfrecords.py. Shards on gs:// are streamed: a worker
downloads the files it reads a few at a time while it reads them (trainer.transfer.streamed).
"""

import concurrent.futures
import json
import os

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import storage, transfer
from trainer.data import image_folder
from trainer.errors import UserError

METADATA = "metadata.json"
SHARD_PATTERN = "images-*.tfrecord"
# Examples are spread over the shards in an order fixed by this seed, so every shard holds
# every class and rewriting the same folder gives the same files.
SHUFFLE_SEED = 0
# Without --shards or --shard_mb: about this many bytes of images per shard (TF's advice: 100 MB or
# more; a streaming worker holds three on its scratch disk, trainer.transfer.STREAM_ON_DISK).
TARGET_SHARD_BYTES = 100 * 2**20

_FEATURES = {"image": tf.io.FixedLenFeature([], tf.string), "label": tf.io.FixedLenFeature([], tf.int64)}


def shard_name(index, num_shards):
  return f"images-{index:05d}-of-{num_shards:05d}.tfrecord"


def write_shards(scan, out_dir, num_shards=None, shard_bytes=TARGET_SHARD_BYTES):
  """Writes the scan's images into num_shards TFRecord files (by default as many as give about
  shard_bytes of images each) and metadata.json; returns the metadata.

  Examples are shuffled with a fixed seed and spread evenly (image counts differ by at most one).
  metadata.json is written last: a folder without it is an unfinished write, and `read` refuses it.
  """
  if num_shards is None:
    total = sum(_sizes(scan))
    num_shards = max(1, min(len(scan.paths), round(total / shard_bytes)))
  if num_shards < 1:
    raise UserError(f"--shards={num_shards} must be at least 1")
  if num_shards > len(scan.paths):
    raise UserError(f"--shards={num_shards} is more than the {len(scan.paths)} readable images in "
                    f"{scan.directory}; use at most {len(scan.paths)}")
  os.makedirs(out_dir, exist_ok=True)
  existing = sorted(tf.io.gfile.glob(os.path.join(out_dir, SHARD_PATTERN))
                    + tf.io.gfile.glob(os.path.join(out_dir, METADATA)))
  if existing:
    # Old shards left beside new ones would be read as part of the data set.
    raise UserError(f"OUT_DIR={out_dir} already holds shards ({os.path.basename(existing[0])}); "
                    "give an empty folder or delete them first")
  shards, shard_sizes = _write(scan, out_dir, num_shards)
  metadata = {"class_names": list(scan.class_names), "counts": scan.counts, "num_examples": len(scan.paths),
              "shards": shards, "shard_sizes": shard_sizes,
              "shard_bytes": [os.path.getsize(os.path.join(out_dir, name)) for name in shards],
              "source": scan.directory, "skipped_files": scan.skipped_files}
  with tf.io.gfile.GFile(os.path.join(out_dir, METADATA), "w") as f:
    json.dump(metadata, f, indent=2)
  return metadata


def _write(scan, out_dir, num_shards):
  """Writes the shards; returns their names and image counts."""
  order = np.random.default_rng(SHUFFLE_SEED).permutation(len(scan.paths))
  shards, shard_sizes = [], []
  # A streamed gs:// folder (image_folder.scan) is read many files at once: each read is a round trip.
  remote = storage.is_remote(scan.paths[0])
  with concurrent.futures.ThreadPoolExecutor(image_folder.REMOTE_READS if remote else 1) as reads:
    for index, members in enumerate(np.array_split(order, num_shards)):
      name = shard_name(index, num_shards)
      with tf.io.TFRecordWriter(os.path.join(out_dir, name)) as writer:
        for example in reads.map(lambda i: _example(scan.paths[i], scan.labels[i]), members):
          writer.write(example)
      shards.append(name)
      shard_sizes.append(len(members))
      logging.info("wrote %s (%d images)", name, len(members))
  return shards, shard_sizes


def read(location, input_context=None, flag="--data", order_seed=None, indexed=False):
  """(dataset of (uint8 image [H, W, 3], int32 label), metadata) from a shard folder or a glob.

  location: a folder written by write_shards, or a glob such as DIR/images-*.tfrecord (a subset
  of the shards). metadata is that folder's metadata.json plus "files": the shard paths read.
  With an input_context each input pipeline reads whole files of its own when there are at
  least as many files as pipelines, and every n-th record otherwise. Sharding is done here
  because tf.distribute's automatic sharding of a single file across workers hangs.

  Shards are read one after another, each from its first record to its last, in the order of
  their names or, with order_seed, in an order drawn from it (every worker must give the same
  seed). So the examples come in the same order wherever the shards are, however many cores
  there are. Shards on gs:// are streamed: downloaded a few ahead into scratch and each removed
  once read (trainer.transfer.streamed). indexed: elements are (index, image, label), index
  the example's place in the whole folder (the shards before its own, by name, then its place
  in its shard), the same in any order.
  """
  if storage.is_dir(location):
    folder, pattern = location, storage.join(location, SHARD_PATTERN)
  else:
    folder, pattern = os.path.dirname(location) or ".", location
  files = storage.glob(pattern)
  if not files:
    raise UserError(f"{flag}={location}: no TFRecord files match {pattern}; "
                    "write shards with scripts/make_tfrecords.py")
  metadata = _read_metadata(folder, location, flag)
  unknown = [os.path.basename(f) for f in files if os.path.basename(f) not in metadata["shards"]]
  if unknown:
    raise UserError(f"{flag}={location}: {unknown[0]} is not one of the shards listed in "
                    f"{storage.join(folder, METADATA)}; write all shards of a folder in one go")
  starts = dict(zip(metadata["shards"], np.cumsum([0] + metadata["shard_sizes"][:-1]).tolist()))
  order = np.arange(len(files))
  if order_seed is not None:
    order = np.random.default_rng(order_seed).permutation(len(files))
  mine, by_data = [files[i] for i in order], False
  if input_context is not None and input_context.num_input_pipelines > 1:
    if len(files) >= input_context.num_input_pipelines:
      # Dataset.shard's rule, applied to the list so that a worker downloads only its own files.
      mine = mine[input_context.input_pipeline_id::input_context.num_input_pipelines]
    else:
      by_data = True
  records = _records(mine, [starts[os.path.basename(f)] for f in mine])
  if by_data:
    # Too few files to give each worker its own: every worker reads them all and keeps its share.
    records = records.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  return records.map(_parse_indexed if indexed else _parse_record, num_parallel_calls=tf.data.AUTOTUNE), \
      dict(metadata, files=files)


def _records(files, starts):
  """(index, serialized example) of the files, one file after another (flat_map: the next file is
  asked for when the last is done, which is when a streamed copy is removed)."""
  shards = tf.data.Dataset.from_tensor_slices(tf.constant(starts, tf.int64))
  if any(storage.is_remote(f) for f in files):
    paths = tf.data.Dataset.from_generator(lambda: transfer.streamed(files),
                                           output_signature=tf.TensorSpec([], tf.string))
  else:
    paths = tf.data.Dataset.from_tensor_slices(tf.constant(files, tf.string))
  return tf.data.Dataset.zip(shards, paths).flat_map(
      lambda start, path: tf.data.TFRecordDataset(path).enumerate(start))


def _sizes(scan):
  """Bytes of each of the scan's files (a streamed gs:// folder's from one listing)."""
  if not scan.paths or not storage.is_remote(scan.paths[0]):
    return [os.path.getsize(p) for p in scan.paths]
  listed, prefix = storage.list_sizes(scan.directory), storage.as_folder(scan.directory)
  return [listed[p[len(prefix):]] for p in scan.paths]


def _example(path, label):
  try:
    contents = storage.read_bytes(path) if storage.is_remote(path) else _read_local(path)
  except FileNotFoundError:  # scanned a moment ago
    raise transfer.vanished(path) from None
  return tf.train.Example(features=tf.train.Features(feature={
      "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[contents])),
      "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
  })).SerializeToString()


def _read_local(path):
  with open(path, "rb") as f:
    return f.read()


def _parse_indexed(index, record):
  return (index, *_parse(record))


def _parse_record(_, record):
  return _parse(record)


def _parse(record):
  example = tf.io.parse_single_example(record, _FEATURES)
  return image_folder.decode(example["image"]), tf.cast(example["label"], tf.int32)


def _read_metadata(folder, location, flag):
  path = storage.join(folder, METADATA)
  try:
    return json.loads(storage.read_text(path))
  except FileNotFoundError:
    raise UserError(f"{flag}={location}: {path} is missing (an unfinished or foreign write); "
                    "write shards with scripts/make_tfrecords.py")
