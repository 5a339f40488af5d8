"""Images in one subfolder per class (`--data=DIR`, `--test_data=DIR`, local or gs://), checked
before training.

Every file is decoded once while the folder is scanned, in parallel, so a corrupt or truncated
file is reported (and left out) before the job starts instead of killing it in epoch 7. What
comes out is what every image source ends in: (uint8 image [H, W, 3] of any size, int32 label)
pairs and the sorted class names. Resizing, caching, augmentation and batching come later
(trainer/data/images.py).

A folder on gs:// is downloaded once into local scratch when its files fit the scratch disk
budget (many small files are read faster from disk); otherwise it is read file by file, through
trainer.storage, both for the check and while training, and nothing of it is written to disk.
"""

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
from typing import Dict, List

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import storage, transfer
from trainer.data import budget
from trainer.errors import StorageError, UserError

# The check hands decoded files' indices back to Python this many at a time: one at a time,
# Python's per-element cost would rival the decoding of small images.
_CHECK_BATCH = 256
# Files of a streamed gs:// folder read (and decoded) at once: a read mostly waits for a round trip
# (tens of ms on Cloud Storage), not for a core, so more than the cores keep the cores busy; no more
# than the storage client's connection pool holds (requests' 10), which would drop connections.
REMOTE_READS = 10


@dataclasses.dataclass
class FolderScan:
  """The readable images of a class folder, and what was left out."""
  paths: List[str]
  labels: List[int]
  # Sorted subfolder names; label i is class_names[i].
  class_names: List[str]
  # {"path": ..., "reason": ...} for every file that could not be decoded.
  skipped_files: List[Dict[str, str]]
  # Where the scan came from, so later errors can name the folder and the flag.
  directory: str = ""
  flag: str = "--data"

  @property
  def counts(self) -> Dict[str, int]:
    """Readable images per class."""
    per_label = np.bincount(np.asarray(self.labels, np.int64), minlength=len(self.class_names))
    return {name: int(n) for name, n in zip(self.class_names, per_label)}


def decode(contents):
  """Encoded JPEG, PNG, BMP or GIF bytes -> uint8 [H, W, 3]; grayscale and RGBA become RGB.

  A GIF gives its first frame (expand_animations=False), so every format has the same rank.
  The static shape is set because decode_image's is unknown, and Keras layers need the rank.
  """
  image = tf.io.decode_image(contents, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def scan(directory, flag="--data", disk_budget=None):
  """Lists DIR/<class>/... and decodes every file once; returns a FolderScan of the good ones.

  Class names are the sorted subfolder names. Files anywhere below a class folder count, as in
  keras.utils.image_dataset_from_directory. Hidden files and folders (".DS_Store",
  ".ipynb_checkpoints") are not data and are left out without a warning. A gs:// folder whose
  files fit disk_budget (bytes; None: the scratch folder's free space) is downloaded once into
  a local copy, and `paths` are local; a larger one is read file by file and `paths` are gs://.
  Skipped files are named by their gs:// path either way.
  """
  names = _streamed_files(directory, flag, disk_budget)
  if names is None:
    root = _local_folder(directory, flag)
    entries, folders = _local_layout(root, directory, flag)
  else:
    root = directory
    entries, folders = _remote_layout(directory, names)
  class_names = _class_folders(entries, folders, directory, flag)
  candidates, candidate_labels = [], []
  for label, name in enumerate(class_names):
    candidates += folders[name]
    candidate_labels += [label] * len(folders[name])
  failures = _undecodable(candidates)
  skipped = []
  for index in sorted(failures):
    shown = directory.rstrip("/") + candidates[index][len(root):] if root != directory else candidates[index]
    logging.warning("%s: skipped, not a readable image (%s)", shown, failures[index])
    skipped.append({"path": shown, "reason": failures[index]})
  keep = [i for i in range(len(candidates)) if i not in failures]
  result = FolderScan(paths=[candidates[i] for i in keep], labels=[candidate_labels[i] for i in keep],
                      class_names=class_names, skipped_files=skipped, directory=directory, flag=flag)
  _check_every_class_has_images(result)
  logging.info("%s=%s: %d images in %d classes (%d files skipped)", flag, directory, len(result.paths),
               len(class_names), len(skipped))
  return result


def disk_budget(config):
  """Bytes of scratch disk a gs:// folder's copy may take (trainer.data.budget: --disk_budget_mb,
  else the scratch folder's free space)."""
  return budget.disk_budget(config, tempfile.gettempdir())[0]


def check_same_classes(train_scan, test_scan):
  """Stops with one line when the test folder's classes are not the training folder's."""
  if train_scan.class_names == test_scan.class_names:
    return
  only_train = sorted(set(train_scan.class_names) - set(test_scan.class_names))
  only_test = sorted(set(test_scan.class_names) - set(train_scan.class_names))
  raise UserError(f"{test_scan.flag}={test_scan.directory} and {train_scan.flag}={train_scan.directory} "
                  f"have different class folders (only in {train_scan.flag}: {', '.join(only_train) or '-'}; "
                  f"only in {test_scan.flag}: {', '.join(only_test) or '-'}); give both folders the same classes")


def stratified_split(labels, fraction, seed):
  """(kept_indices, held_out_indices): round(fraction * count) of each class held out, at random.

  A class with two or more examples gives at least one to the held-out part and keeps at least
  one, so every class is both learned and measured; a class of one is kept. Halves round up.
  Both arrays are sorted; the same labels, fraction and seed always give the same split.
  """
  if not 0 <= fraction < 1:
    raise ValueError(f"fraction must be in [0, 1), got {fraction}")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  held_out = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = len(members)
    n = int(np.floor(fraction * count + 0.5))
    if fraction > 0 and count >= 2:
      n = max(n, 1)
    n = min(n, count - 1)
    held_out.append(rng.permutation(members)[:n])
  held_out = np.sort(np.concatenate(held_out)) if held_out else np.zeros(0, np.int64)
  kept = np.setdiff1d(np.arange(len(labels)), held_out)
  return kept.astype(np.int64), held_out.astype(np.int64)


def dataset(paths, labels, input_context=None):
  """tf.data of (uint8 image [H, W, 3], int32 label), files read and decoded in parallel.

  With an input_context each input pipeline (worker) reads its own share of the files.
  """
  files = tf.data.Dataset.from_tensor_slices((tf.constant(list(paths), tf.string),
                                              tf.constant(list(labels), tf.int32)))
  if input_context is not None and input_context.num_input_pipelines > 1:
    files = files.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  read, parallel = _reader(paths)
  return files.map(lambda path, label: (decode(read(path)), label), num_parallel_calls=parallel)


def _reader(paths):
  """(path tensor -> contents, how many at once) for local files, or a streamed folder's (scan)."""
  if any(storage.is_remote(p) for p in paths):
    return read_remote, REMOTE_READS
  return tf.io.read_file, tf.data.AUTOTUNE


def read_remote(path):
  """A gs:// file's contents as a string tensor, read through trainer.storage inside tf.data:
  tf.io.read_file's gs:// cannot be pointed at another endpoint (an emulator). A failure is the
  storage's one line (trainer.transfer.stream_failure finds it in what tf.data raises)."""
  contents = tf.numpy_function(_remote_bytes, [path], tf.string)
  contents.set_shape([])
  return contents


def _remote_bytes(path):
  path = path.decode()
  try:
    # An object array: numpy's bytes type would drop trailing NUL bytes (a BMP's padding).
    return np.array(storage.read_bytes(path), dtype=object)
  except FileNotFoundError:
    raise transfer.streaming_failed(transfer.vanished(path)) from None
  except StorageError as e:
    raise transfer.streaming_failed(e) from e


def _streamed_files(directory, flag, disk_budget):
  """The relative paths of a gs:// folder's files, in the order os.walk gives, when they are more
  than the scratch disk it may take (read file by file then); None to read it from a local folder
  or copy (a local folder, one that fits, or nothing there: the local path's errors say what)."""
  if not storage.is_remote(directory):
    return None
  sizes = storage.list_sizes(directory)
  total = sum(sizes.values())
  allowed = budget.disk_budget(None, tempfile.gettempdir())[0] if disk_budget is None else disk_budget
  if total <= allowed:
    return None
  logging.info("%s=%s: %s bytes of files, more than the %s bytes of scratch disk it may take: read file by file "
               "while training, not downloaded", flag, directory, f"{total:,}", f"{allowed:,}")
  # os.walk's order (a folder's files before its subfolders'), so a streamed scan lists what a
  # downloaded one lists, in the same order, and both split the same examples off.
  return sorted(sizes, key=lambda name: [(1, part) for part in name.split("/")[:-1]] + [(0, name.split("/")[-1])])


def _local_folder(directory, flag):
  try:
    return transfer.local_path(directory)
  except FileNotFoundError:
    raise UserError(f"{flag}={directory}: no such folder; give a folder with one subfolder of images per class")


def _local_layout(local, directory, flag):
  """(the visible entries of `local`, {subfolder: its files' paths}); `local` is the local copy of
  `directory`, which errors name."""
  if not os.path.isdir(local):
    raise UserError(f"{flag}={directory} is a file, not a folder; give a folder with one subfolder of images per class")
  entries = sorted(e for e in os.listdir(local) if not e.startswith("."))
  return entries, {e: _files_below(os.path.join(local, e)) for e in entries if os.path.isdir(os.path.join(local, e))}


def _remote_layout(directory, names):
  """_local_layout of a gs:// folder from its files' relative paths (sorted as os.walk lists them)."""
  visible = [n for n in names if not any(part.startswith(".") for part in n.split("/"))]
  folders = {}
  for name in visible:
    if "/" in name:
      folders.setdefault(name.split("/")[0], []).append(storage.join(directory, name))
  return sorted({n.split("/")[0] for n in visible}), folders


def _class_folders(entries, folders, directory, flag):
  """The class names: the subfolders among a folder's entries, checked."""
  classes = [e for e in entries if e in folders]
  loose = [e for e in entries if e not in folders]
  if not classes:
    raise UserError(f"{flag}={directory} has no class subfolders; put each class's images in "
                    f"{storage.join(directory, '<class name>')}/")
  if loose:
    logging.warning("%s=%s: %d files outside the class folders are ignored (%s)", flag, directory, len(loose),
                    ", ".join(loose[:3]) + (", ..." if len(loose) > 3 else ""))
  if len(classes) < 2:
    raise UserError(f"{flag}={directory} has one class folder ({classes[0]!r}); "
                    "a classifier needs at least two classes")
  return classes


def _files_below(folder):
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
  return found


def _undecodable(paths):
  """{index: reason} for the files that do not decode; the rest are decoded in parallel, once.

  Inside tf.data an error cannot be caught per file, so failing files are dropped there
  (ignore_errors) and only those few are decoded again, eagerly, to learn the reason.
  """
  if not paths:
    return {}
  with _decoders_quiet():
    return _failures(paths)


def _failures(paths):
  read, parallel = _reader(paths)

  def check(index, path):
    # The shape is returned so that the decode cannot be optimised away as unused.
    return index, tf.shape(decode(read(path)))

  decoded = set()
  checks = (tf.data.Dataset.from_tensor_slices((tf.range(len(paths)), tf.constant(paths, tf.string)))
            .map(check, num_parallel_calls=parallel, deterministic=False)
            .ignore_errors()
            .batch(_CHECK_BATCH))
  for indices, _ in checks.as_numpy_iterator():
    decoded.update(indices.tolist())
  failures = {}
  for index in range(len(paths)):
    if index not in decoded:
      reason = _decode_error(paths[index])
      if reason is not None:
        failures[index] = reason
  return failures


@contextlib.contextmanager
def _decoders_quiet():
  """Keeps the image libraries' own complaints off stderr while files are checked: libjpeg prints
  "Improper call to JPEG library in state 201" or "Input file read error" for a broken file,
  straight to file descriptor 2, beside the one warning per file that says the same. Lines in a
  log format (TensorFlow's C++ logging, absl's) are written to stderr afterwards, in order."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      lines = captured.read().decode(errors="replace").splitlines(keepends=True)
      kept = "".join(line for line in lines if _LOG_LINE.match(line))
      if kept:
        os.write(2, kept.encode())


# A log record, as TensorFlow's C++ logging and absl write them ("E1202 03:24:12.018828 ...") or
# Python's logging without a handler ("WARNING:absl:..."); a decoder's complaint is a bare line.
_LOG_LINE = re.compile(r"[IWEF]\d{4} |(DEBUG|INFO|WARNING|ERROR|CRITICAL):")


def _decode_error(path):
  """Why the file does not decode, in one short line; None if it does after all. A gs:// file that
  cannot be read raises StorageError: the storage's failure, not the file's."""
  try:
    decode(tf.constant(storage.read_bytes(path)) if storage.is_remote(path) else tf.io.read_file(path))
  except tf.errors.OpError as e:  # undecodable, unreadable, vanished: all mean "not usable"
    # TF wraps kernel messages as "{{function_node ...}} message [Op:DecodeImage] name: " (an
    # eager op's error names the op and its empty name after the message): keep the message.
    message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", e.message)
    message = re.sub(r"\s*\[Op:\w+\](\s*name:.*)?$", "", message.strip()).strip()
    return message.splitlines()[0] if message else type(e).__name__
  return None


def _check_every_class_has_images(result):
  counts = result.counts
  n = len(result.skipped_files)
  skipped = f" ({n} unreadable file{'' if n == 1 else 's'} skipped)" if n else ""
  if not result.paths:
    raise UserError(f"{result.flag}={result.directory}: no readable image in any class folder{skipped}; "
                    f"put JPEG, PNG, BMP or GIF files in {storage.join(result.directory, '<class name>')}/")
  empty = [repr(name) for name, count in counts.items() if count == 0]
  if empty:
    folders = f"class folder {empty[0]} has" if len(empty) == 1 else f"class folders {', '.join(empty)} have"
    raise UserError(f"{result.flag}={result.directory}: {folders} no readable images{skipped}; "
                    "add images or remove the folder")
