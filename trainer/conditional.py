"""Conditional writes of one small file, for a lock that two processes may race for (the serving
folder's lease) and a file that writers must not overwrite blindly (the retraining history).

On gs:// Cloud Storage's generation preconditions decide on the server; locally an flock on a
sibling `<path>.lock` (created once, never removed) serialises the check and the write. The token
of a version is its generation on gs:// and its bytes locally. Also the storage's own clock
(read_stamped, store_time), for a lease whose expiry must not depend on which host judges it.
"""

import contextlib
import errno
import os

from trainer import storage


def create_exclusive(path, data):
  """Writes data to path only if there is no file there; True if this call created it. The
  file appears whole. Give data unique to the caller (a lease holds a random token): a retried
  request of ours that already created it is recognised by its contents."""
  if not storage.is_remote(path):
    with _locked(path):
      if os.path.lexists(path):
        return False
      storage.write_bytes(path, data)
    return True
  return _upload_if_generation(path, data, 0)


def read_with_token(path):
  """(contents, token) of one version of a file, for replace_if_unchanged and
  remove_if_unchanged; FileNotFoundError when it is missing."""
  data, token, _ = read_stamped(path)
  return data, token


def replace_if_unchanged(path, data, token):
  """Writes data to path only if it still holds the version read_with_token gave token for;
  True if it did, False if the file has changed or gone since (nothing is written then)."""
  if not storage.is_remote(path):
    with _locked(path):
      if not os.path.lexists(path) or storage.read_bytes(path) != token:
        return False
      storage.write_bytes(path, data)
    return True
  return _upload_if_generation(path, data, token)


def remove_if_unchanged(path, token):
  """Removes path only if it still holds the version of token; True if this call removed it."""
  if not storage.is_remote(path):
    with _locked(path):
      if not os.path.lexists(path) or storage.read_bytes(path) != token:
        return False
      with storage.translated(path, "remove"):
        os.remove(path)
    return True
  from google.api_core import exceptions
  bucket, key = storage.bucket_and_key(path)
  with storage.translated(path, "remove"):
    try:
      storage.gcs_bucket(bucket).blob(key).delete(if_generation_match=token, **storage.bounded())
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      return False
  return True


def _upload_if_generation(path, data, generation):
  """Uploads data only if the object's generation is `generation` (0: there is none)."""
  from google.api_core import exceptions
  bucket, key = storage.bucket_and_key(path)
  with storage.translated(path, "write"):
    try:
      storage.gcs_bucket(bucket).blob(key).upload_from_string(data, if_generation_match=generation, **storage.bounded())
      return True
    except exceptions.PreconditionFailed:
      pass
  # A retry of our own request that had already succeeded fails its precondition too.
  try:
    return storage.read_bytes(path) == data
  except FileNotFoundError:
    return False


@contextlib.contextmanager
def _locked(path):
  """An exclusive flock on `<path>.lock` (a file: directories cannot be locked over NFS)."""
  import fcntl
  with storage.translated(path, "lock"):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
  try:
    with storage.translated(path, "lock"):
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


# The storage's own clock, for a lease whose expiry must not depend on which host judges it: a
# file's modification time is set by the storage (the file server, Cloud Storage), not the writer.


def read_stamped(path):
  """(contents, token, modification time in epoch seconds by the storage's clock) of one version of
  a file, as read_with_token's; FileNotFoundError when it is missing."""
  if not storage.is_remote(path):
    for _ in range(5):
      with storage.translated(path, "read"):
        before = os.stat(path).st_mtime_ns
        data = storage.read_bytes(path)
        if os.stat(path).st_mtime_ns == before:  # not replaced while it was read
          return data, data, before / 1e9
    raise storage.StorageError(f"{path}: changed during each of 5 reads; is something rewriting it in a loop?")
  from google.api_core import exceptions
  bucket, key = storage.bucket_and_key(path)
  for _ in range(5):
    with storage.translated(path, "read"):
      blob = storage.gcs_bucket(bucket).get_blob(key, **storage.bounded())
      if blob is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
      generation, updated = blob.generation, blob.updated  # before the download resets them
      if not generation or updated is None:
        raise storage.StorageError(f"{path}: the storage did not say the object's generation and time; cannot judge it")
      try:
        data = blob.download_as_bytes(if_generation_match=generation, **storage.bounded())
        return data, generation, updated.timestamp()
      except (exceptions.PreconditionFailed, exceptions.NotFound):
        continue
  raise storage.StorageError(f"{path}: changed during each of 5 reads; is something rewriting it in a loop?")


def store_time(probe):
  """The storage's current time (epoch seconds): the modification time of probe, written now.
  Locally probe is touched and left (give a file that stays anyway, such as a lock); on gs:// it
  is uploaded empty and removed."""
  if not storage.is_remote(probe):
    with storage.translated(probe, "write"):
      os.makedirs(os.path.dirname(os.path.abspath(probe)), exist_ok=True)
      os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o666))
      os.utime(probe)  # the file server's now, also over NFS
      return os.stat(probe).st_mtime_ns / 1e9
  from google.api_core import exceptions
  bucket, key = storage.bucket_and_key(probe)
  with storage.translated(probe, "write"):
    blob = storage.gcs_bucket(bucket).blob(key)
    blob.upload_from_string(b"", **storage.bounded())
    updated = blob.updated
    with contextlib.suppress(exceptions.NotFound):
      blob.delete(**storage.bounded())
  if updated is None:
    raise storage.StorageError(f"{probe}: the storage did not say when the object was written; cannot read its clock")
  return updated.timestamp()

