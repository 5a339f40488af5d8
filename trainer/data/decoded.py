"""Decoded, resized images of one split (one input pipeline's share), read back by index.

`--cache=memory` keeps them as uint8 chunks in memory; `--cache=disk` as one file of fixed-size
records in a private scratch folder (TMPDIR, else /tmp: the pods' emptyDir), removed at exit.
Both are filled by one decoding pass and then read by any order of indices, so an epoch's order
is a permutation drawn from (seed, epoch) whichever of the two holds the images.

The disk store is read with os.preadv into the batch's own array rather than through np.memmap:
pages of a mapped file count in the process's resident memory (reading a 128 MiB file once in
batches through a memmap grew it by 135 MiB, through preadv by 0), so a disk cache read through
a memmap would grow the process as a memory one does; preadv goes through the kernel's page
cache, which the kernel reclaims, and releases the GIL while it reads.
"""

import contextlib
import os
import tempfile
import weakref

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import transfer
from trainer.errors import StorageError

# Images handed from tf.data to Python per call of the filling pass, and per chunk in memory:
# large enough that Python's per-batch cost is small, small enough to waste little at the end.
CHUNK = 256

class Store:
  """uint8 images [len, size, size, 3] and their int32 labels, read by index."""

  def __init__(self, size):
    self.size, self.labels = size, np.zeros(0, np.int32)

  def close(self):
    """Lets go of the images (a disk store removes its file)."""

  def __len__(self):
    return len(self.labels)

  def read(self, indices):
    """uint8 [len(indices), size, size, 3]: the images at these indices, in this order."""
    out = np.empty((len(indices), self.size, self.size, 3), np.uint8)
    for j, i in enumerate(np.asarray(indices)):
      self._read_one(int(i), out[j])
    return out

  def batches(self, order, batch_size):
    """tf.data of (uint8 images, int32 labels) batches of the examples at `order`, in that order."""
    def gather(indices):
      return self.read(indices), self.labels[indices]

    def pixels(indices):
      images, labels = tf.numpy_function(gather, [indices], (tf.uint8, tf.int32), stateful=False)
      images.set_shape([None, self.size, self.size, 3])
      labels.set_shape([None])
      return images, labels

    return (tf.data.Dataset.from_tensor_slices(np.asarray(order, np.int64))
            .batch(batch_size)
            .map(pixels, num_parallel_calls=tf.data.AUTOTUNE))


class InMemory(Store):
  """Chunks of CHUNK images, as the filling pass hands them over (no second copy to concatenate)."""

  def __init__(self, size):
    super().__init__(size)
    self.chunks = []

  def append(self, images):
    self.chunks.append(images)

  def _read_one(self, i, out):
    out[...] = self.chunks[i // CHUNK][i % CHUNK]


class OnDisk(Store):
  """One file of images back to back, image i at byte i * size * size * 3."""

  def __init__(self, size, folder):
    super().__init__(size)
    self.image_bytes = size * size * 3
    descriptor, self.path = tempfile.mkstemp(suffix=".uint8", dir=folder)
    self.file = os.fdopen(descriptor, "r+b")
    # A store let go of without close() (a prepared data set no longer used) removes its file too.
    self._removed = weakref.finalize(self, _remove, self.file, self.path)

  def append(self, images):
    self.file.write(np.ascontiguousarray(images).tobytes())

  def _read_one(self, i, out):
    if os.preadv(self.file.fileno(), [out], i * self.image_bytes) != self.image_bytes:
      raise OSError(f"{self.path}: image {i} is cut short (the scratch file was truncated)")

  def close(self):
    self._removed()


def _remove(file, path):
  file.close()
  with contextlib.suppress(FileNotFoundError):  # the whole scratch folder may be gone at exit
    os.unlink(path)


def fill(examples, size, policy):
  """A Store ("memory" or "disk") of (uint8 [size, size, 3], int32 label) examples, in their order."""
  store = InMemory(size) if policy == "memory" else OnDisk(size, transfer.scratch_folder())
  labels = []
  try:
    for images, batch_labels in examples.batch(CHUNK).as_numpy_iterator():
      store.append(images)
      labels.append(batch_labels)
    if isinstance(store, OnDisk):
      store.file.flush()
  except OSError as e:  # the scratch disk is full (another writer, a budget flag above the real space)
    store.close()
    raise StorageError(f"cannot write the disk cache of decoded images ({store.path}): {e.strerror or e}; give "
                       "the scratch folder (TMPDIR) more space, lower --disk_budget_mb, or use --cache=none") from None
  store.labels = np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32)
  if isinstance(store, OnDisk):
    logging.info("disk cache: %d decoded images in %s", len(store), store.path)
  return store
