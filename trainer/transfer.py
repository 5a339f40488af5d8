"""Whole folders between a local disk and the storage (local or gs://): a folder published so that
a reader never sees part of it, a folder downloaded, log folders synced while a job runs, a
local copy of a remote file or folder for libraries that read only local paths, and files
streamed through a few local copies at a time (TFRecord shards larger than the scratch disk).
"""

import atexit
import errno
import os
import posixpath
import queue
import shutil
import tempfile
import threading

from trainer import storage
from trainer.errors import StorageError


def publish_dir(local_dir, dest, last=()):
  """Copies a complete local folder to dest so that a reader never sees part of it.

  Locally the copy is made in a hidden sibling folder, fsynced (every file and folder), renamed
  onto dest in one step, and the parent fsynced: once this returns, a power loss leaves the
  whole folder, so a caller may delete older copies then. On gs:// there is no rename: every
  file is uploaded and the files named in `last` (relative paths) go at the end in that order,
  so a reader that waits for them (a completion marker such as state.json) sees everything else
  already there. An existing dest is removed first (its `last` files first): callers publish
  fresh names, so it can only be the leftover of an interrupted publish.
  """
  files = storage.local_files(local_dir)
  missing = [name for name in last if name not in files]
  if missing:
    raise ValueError(f"publish_dir: {missing[0]} (in last) is not a file of {local_dir}")
  if storage.is_remote(dest):
    storage.remove(dest, first=tuple(reversed(last)))
    for name in [f for f in files if f not in last] + list(last):
      storage.upload_file(os.path.join(local_dir, name), storage.join(dest, name))
    return
  with storage.translated(dest, "write"):
    temp = storage.temp_sibling(dest)
    try:
      shutil.copytree(local_dir, temp)
      _fsync_tree(temp)
      storage.remove(dest, first=tuple(reversed(last)))
      os.rename(temp, dest)
    except BaseException:
      shutil.rmtree(temp, ignore_errors=True)
      raise
    _fsync(os.path.dirname(os.path.abspath(dest)))  # the rename itself


def download_dir(path, local_dir):
  """Copies a folder (local or gs://) into local_dir; FileNotFoundError when it is missing."""
  if not storage.is_remote(path):
    with storage.translated(path, "read"):
      shutil.copytree(path, local_dir, dirs_exist_ok=True)
    return
  from google.api_core import exceptions
  bucket, prefix = storage.bucket_and_key(storage.as_folder(path))
  with storage.translated(path, "read"):
    blobs = storage.gcs_bucket(bucket).list_blobs(prefix=prefix, **storage.bounded())
    names = [blob.name[len(prefix):] for blob in blobs]
  names = [n for n in names if n and not n.endswith("/")]  # folder markers hold nothing
  if not names:
    raise FileNotFoundError(errno.ENOENT, "no such folder", path)
  root = os.path.abspath(local_dir)
  os.makedirs(root, exist_ok=True)
  for name in names:
    target = os.path.normpath(os.path.join(root, *name.split("/")))
    if not target.startswith(root + os.sep):  # an object named "../x" must not land outside
      raise storage.StorageError(f"{storage.join(path, name)}: object name leaves the folder; refusing to download it")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with storage.translated(storage.join(path, name), "read"):
      try:
        storage.gcs_bucket(bucket).blob(prefix + name).download_to_filename(target, **storage.bounded())
      except exceptions.NotFound:
        # Listed a moment ago: removed since (a prune by another process, a lifecycle rule). What
        # was downloaded is a mix; a retry lists again and sees what is there now.
        raise storage.StorageError(f"{storage.join(path, name)} vanished while {path} was downloaded (removed "
                                   "by another process or a lifecycle rule?); run again to read what is there "
                                   "now") from None


# (local_dir, dest) -> {relative path: (size, mtime_ns)} as of the last sync_dir of that pair.
_synced = {}
_synced_lock = threading.Lock()


def sync_dir(local_dir, dest):
  """Copies the files of local_dir that are new or changed (size or mtime) since the last sync
  of the same pair; returns their relative paths. For logs written while a job runs (TensorBoard
  event files): not atomic, a reader may see a file of the last sync."""
  if not storage.is_remote(dest) and os.path.realpath(dest) == os.path.realpath(local_dir):
    return []
  key = (os.path.abspath(local_dir), dest)
  with _synced_lock:
    seen = _synced.setdefault(key, {})
    changed = []
    for name in storage.local_files(local_dir):
      source = os.path.join(local_dir, name)
      stat = os.stat(source)
      if seen.get(name) == (stat.st_size, stat.st_mtime_ns):
        continue
      storage.upload_file(source, storage.join(dest, *name.split("/")))
      seen[name] = (stat.st_size, stat.st_mtime_ns)
      changed.append(name)
  return changed


# Remote path -> its local copy under scratch_folder(), for this process.
_cache = {}
_cache_lock = threading.Lock()
_scratch = None


def local_path(path):
  """A local path holding the file or folder: the path itself, or a copy of a gs:// one
  downloaded once per process (the same remote path gives the same copy). FileNotFoundError
  when there is nothing at path, for both kinds alike."""
  if not storage.is_remote(path):
    if not os.path.lexists(path):
      raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    return path
  path = path.rstrip("/")
  with _cache_lock:
    if path in _cache:
      return _cache[path]
    target = os.path.join(tempfile.mkdtemp(dir=scratch_folder()), posixpath.basename(path) or "bucket")
    try:
      data = storage.read_bytes(path)
    except IsADirectoryError:
      download_dir(path, target)
    else:
      with open(target, "wb") as f:
        f.write(data)
    _cache[path] = target
    return target


# Streamed files on local disk at once, at most: the one being read and two downloaded ahead, so the
# reader does not wait for the next while the one after downloads.
STREAM_ON_DISK = 3


def streamed(paths, on_disk=STREAM_ON_DISK):
  """Local copies of `paths`, one after another, for a reader that is done with a file when it asks
  for the next (tf.data's flat_map over TFRecord files). Local paths are yielded as they are; for
  gs:// ones a background thread downloads ahead into a private scratch folder, at most `on_disk`
  files there at once, and each is removed when the next is asked for or the generator is closed.
  Raises StorageError naming the file that could not be downloaded."""
  if not any(storage.is_remote(p) for p in paths):
    yield from paths
    return
  downloads = _Downloads(list(paths), tempfile.mkdtemp(prefix="stream-", dir=scratch_folder()), on_disk)
  try:
    for index in range(len(paths)):
      downloads.release_previous()  # asked for the next: the reader is done with the previous one
      yield downloads.get(index)
  finally:
    downloads.close()


# The StorageErrors of streamed reads, by message: tf.data hands a generator's or a numpy_function's
# exception on as an UnknownError whose message holds "StorageError: <message>" and a traceback.
_stream_failures = {}


def streaming_failed(error):
  """Records a StorageError raised inside tf.data (a streamed download or read) and returns it, so that
  stream_failure finds it in the error tf.data makes of it."""
  _stream_failures[str(error)] = error
  return error


def stream_failure(error):
  """The StorageError that a streamed download or read raised inside tf.data, from the
  tf.errors.OpError that tf.data made of it; None for any other error."""
  text = getattr(error, "message", str(error))
  for message, failure in list(_stream_failures.items()):
    if f"StorageError: {message}" in text:
      return failure
  return None


class _Downloads:
  """A thread that downloads `paths` in order into `folder`, keeping at most `on_disk` there."""

  def __init__(self, paths, folder, on_disk):
    self.paths, self.folder, self.on_disk = paths, folder, max(1, on_disk)
    self.results = queue.Queue()  # a local path or a StorageError per file, in order (or the bug that ended it)
    self.changed = threading.Condition()
    self.present, self.stopped, self.previous = 0, False, None
    self.thread = threading.Thread(target=self._run, name="trainer-stream", daemon=True)
    self.thread.start()

  def get(self, index):
    """The local copy of paths[index]; waits for it, and fails with the download's StorageError, or
    when the thread has ended without it (a bug: never a hang)."""
    while True:
      try:
        result = self.results.get(timeout=storage.timeout())
        break
      except queue.Empty:
        # A download in progress is bounded by the storage client's own timeouts (storage.bounded);
        # a large file on a slow link may take longer than one of them, so wait on while it runs.
        if not self.thread.is_alive() and self.results.empty():
          raise StorageError(f"cannot read {self.paths[index]}: its download stopped without a result") from None
    if isinstance(result, StorageError):
      raise streaming_failed(result)
    if isinstance(result, Exception):
      raise result
    self.previous = result
    return result

  def release_previous(self):
    if self.previous is not None:
      os.remove(self.previous)
      self.previous = None
      with self.changed:
        self.present -= 1
        self.changed.notify_all()

  def close(self):
    with self.changed:
      self.stopped = True
      self.changed.notify_all()
    self.thread.join(timeout=storage.timeout())
    shutil.rmtree(self.folder, ignore_errors=True)

  def _run(self):
    try:
      self._download_all()
    except Exception as e:  # a bug, not the storage: the reader raises it rather than wait for a result
      self.results.put(e)

  def _download_all(self):
    for index, path in enumerate(self.paths):
      with self.changed:
        if self.present >= self.on_disk and not self.stopped:
          _waiting_for_room(self.folder)
        # No deadline: the reader frees room at its own pace (a shard may take minutes to train on),
        # and close() ends the wait.
        self.changed.wait_for(lambda: self.stopped or self.present < self.on_disk)
        if self.stopped:
          return
        self.present += 1
      target = os.path.join(self.folder, f"{index:06d}-{posixpath.basename(path)}")
      try:
        _download(path, target)
      except StorageError as e:
        self.results.put(e)
        return
      _downloaded(self.folder)
      self.results.put(target)


def _download(path, target):
  from google.api_core import exceptions
  bucket, key = storage.bucket_and_key(path)
  with storage.translated(path, "read"):
    try:
      storage.gcs_bucket(bucket).blob(key).download_to_filename(target, **storage.bounded())
    except exceptions.NotFound:
      raise vanished(path) from None
    except FileNotFoundError as e:  # the scratch folder removed under the download: not the file's absence
      raise StorageError(f"cannot write the local copy of {path}: {e.strerror}") from e


def vanished(path):
  """The error for a file listed before it was read and gone when it was."""
  return StorageError(f"{path} vanished while it was read (removed by another process or a lifecycle rule?); "
                      "run again to read what is there now")


def _downloaded(folder):
  """Called after each streamed download, with its scratch folder (a named point for tests)."""


def _waiting_for_room(folder):
  """Called when a streamed download waits for the reader to free room (a named point for tests)."""


def _fsync_tree(folder):
  """fsyncs every file and folder below folder (itself included), deepest first."""
  for root, _, files in os.walk(folder, topdown=False):
    for name in files:
      _fsync(os.path.join(root, name))
    _fsync(root)


def _fsync(path):
  """Flushes a file's data, or a folder's entries, to the disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def scratch_folder():
  """This process's private scratch folder under TMPDIR (else /tmp; the pods' emptyDir), made on first use and
  removed when the process exits: downloaded and streamed gs:// files, the disk cache of decoded images."""
  global _scratch
  if _scratch is None:
    _scratch = tempfile.mkdtemp(prefix="trainer-scratch-", dir=tempfile.gettempdir())
    atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
  return _scratch

