"""One file-system layer for local paths and gs://, so every caller treats both the same: files
and listings here; conditional writes in trainer.conditional, whole folders in trainer.transfer.

Why not tf.io.gfile: its gs:// endpoint is hard-coded, so tests cannot point it at an emulator,
and tf.train.latest_checkpoint turns a read error into None ("Checkpoint ignored": a warning in
get_checkpoint_state, tensorflow/python/checkpoint/checkpoint_management.py), which would
restart a job from scratch. Here a failure is one of two things: the file is not there
(FileNotFoundError, as for a local file) or the storage could not be used (StorageError: one line
naming the path and what to do). A dead endpoint fails within TRAINER_STORAGE_TIMEOUT seconds
(default 60) instead of retrying for minutes.
"""

import contextlib
import errno
import fnmatch
import functools
import glob as globbing
import hashlib
import os
import posixpath
import secrets
import shutil

from trainer.errors import StorageError, UserError  # noqa: F401 -- storage.StorageError is what callers catch

GS = "gs://"
_DEFAULT_TIMEOUT = 60
# The prefix of a hidden sibling that a write goes to before it is renamed into place (trainer.numbered
# tells such leftovers of a killed write from everything else).
TEMPORARY = ".tmp-"


def is_remote(path):
  return str(path).startswith(GS)


def join(base, *parts):
  if is_remote(base):
    return posixpath.join(base, *parts)
  return os.path.join(base, *parts)


def exists(path):
  """True for a file, or for a folder (on gs://: any object below the prefix)."""
  if not is_remote(path):
    return os.path.exists(path)
  bucket, key = bucket_and_key(path)
  with translated(path, "check"):
    if not key:
      return gcs_bucket(bucket).exists(**bounded())
    return gcs_bucket(bucket).blob(key).exists(**bounded()) or _has_children(path)


def is_dir(path):
  """True for a folder (on gs://: any object below the prefix, or a bucket that exists)."""
  if not is_remote(path):
    return os.path.isdir(path)
  bucket, key = bucket_and_key(path)
  if not key:
    return exists(path)
  return _has_children(path)


def read_bytes(path):
  """The file's contents; FileNotFoundError when it is missing, IsADirectoryError for a folder."""
  if not is_remote(path):
    with translated(path, "read"):
      with open(path, "rb") as f:
        return f.read()
  from google.api_core import exceptions
  bucket, key = bucket_and_key(path)
  with translated(path, "read"):
    try:
      return gcs_bucket(bucket).blob(key).download_as_bytes(**bounded())
    except exceptions.NotFound:
      pass
  # Missing object, missing bucket or a folder: the listing tells which (and raises for the bucket).
  if _has_children(path):
    raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
  raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


def read_text(path):
  return read_bytes(path).decode("utf-8")


def write_bytes(path, data):
  """Writes the whole file so that a reader sees the old contents or the new, never a part."""
  if is_remote(path):
    bucket, key = bucket_and_key(path)
    with translated(path, "write"):
      gcs_bucket(bucket).blob(key).upload_from_string(data, **bounded())
    return
  with translated(path, "write"):
    temp = temp_sibling(path)
    try:
      with open(temp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # so a crash cannot leave the new name pointing at empty blocks
      os.replace(temp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        os.remove(temp)
      raise


def write_text(path, text):
  write_bytes(path, text.encode("utf-8"))


def list_dir(path):
  """Sorted names of a folder's files and sub-folders; [] when there is no such folder."""
  if not is_remote(path):
    with translated(path, "list"):
      return sorted(os.listdir(path)) if os.path.isdir(path) else []
  bucket, prefix = bucket_and_key(as_folder(path))
  with translated(path, "list"):
    blobs = gcs_bucket(bucket).list_blobs(prefix=prefix, delimiter="/", **bounded())
    names = [blob.name[len(prefix):] for blob in blobs]
    names += [p[len(prefix):].rstrip("/") for p in blobs.prefixes]
  return sorted(n for n in set(names) if n)  # "" is a folder-marker object, not a child


def list_files(path):
  """Relative posix paths of every file below a folder, sorted; [] when there is no such folder.
  One listing on gs://, where a list_dir per sub-folder costs a request each."""
  if not is_remote(path):
    with translated(path, "list"):
      return sorted(local_files(path)) if os.path.isdir(path) else []
  bucket, prefix = bucket_and_key(as_folder(path))
  with translated(path, "list"):
    names = [blob.name[len(prefix):] for blob in gcs_bucket(bucket).list_blobs(prefix=prefix, **bounded())]
  return sorted(n for n in names if n and not n.endswith("/"))


def list_sizes(path):
  """{relative posix path: size in bytes} of every file below a folder, from one listing on
  gs://; {} when there is no such folder."""
  if not is_remote(path):
    with translated(path, "list"):
      return {name: os.path.getsize(os.path.join(path, *name.split("/"))) for name in list_files(path)}
  bucket, prefix = bucket_and_key(as_folder(path))
  with translated(path, "list"):
    return {blob.name[len(prefix):]: blob.size for blob in gcs_bucket(bucket).list_blobs(prefix=prefix, **bounded())
            if blob.name[len(prefix):] and not blob.name.endswith("/")}


def stat(path):
  """What identifies one version of a file: {"size", "modified" (UTC, ISO), "checksum"} and on
  gs:// "generation". The checksum is the object's crc32c on gs:// (kept by the storage) and a
  sha256 of the contents locally (which reads the whole file). FileNotFoundError when missing."""
  import datetime
  if not is_remote(path):
    with translated(path, "read"):
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
        info = os.fstat(f.fileno())
    modified = datetime.datetime.fromtimestamp(info.st_mtime, datetime.timezone.utc)
    return {"size": info.st_size, "modified": modified.isoformat(timespec="seconds"),
            "checksum": "sha256:" + digest.hexdigest()}
  bucket, key = bucket_and_key(path)
  with translated(path, "read"):
    blob = gcs_bucket(bucket).get_blob(key, **bounded())
  if blob is None:
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
  return {"size": blob.size, "modified": blob.updated.astimezone(datetime.timezone.utc).isoformat(timespec="seconds"),
          "checksum": f"crc32c:{blob.crc32c}", "generation": blob.generation}


def remove(path, first=()):
  """Removes a file or a folder with everything in it; a missing path is not an error. first:
  files of the folder (relative paths) removed before the rest, in that order: a completion
  marker, so that a removal killed half way never leaves a marker beside part of the data."""
  if not is_remote(path):
    with translated(path, "remove"):
      if os.path.isdir(path) and not os.path.islink(path):
        for name in first:
          with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, *name.split("/")))
        shutil.rmtree(path)
      elif os.path.lexists(path):
        os.remove(path)
    return
  from google.api_core import exceptions
  bucket, key = bucket_and_key(path)
  if not key:
    raise StorageError(f"{path}: refusing to remove a whole bucket; name a folder in it")
  with translated(path, "remove"):
    # A folder's objects, or else the object itself: no request for a name that is neither.
    names = [blob.name for blob in gcs_bucket(bucket).list_blobs(prefix=key + "/", **bounded())] or [key]
    markers = [f"{key}/{name}" for name in first if f"{key}/{name}" in names]
    for name in markers + [n for n in names if n not in markers]:
      with contextlib.suppress(exceptions.NotFound):
        gcs_bucket(bucket).blob(name).delete(**bounded())


def glob(pattern):
  """Sorted paths matching a glob; on gs:// only the last part may hold wildcards."""
  if not is_remote(pattern):
    return sorted(globbing.glob(pattern))
  folder, name = posixpath.split(pattern)
  return sorted(join(folder, n) for n in fnmatch.filter(list_dir(folder), name))


def timeout():
  """Seconds a gs:// operation may take, retries included (env TRAINER_STORAGE_TIMEOUT)."""
  value = os.environ.get("TRAINER_STORAGE_TIMEOUT", str(_DEFAULT_TIMEOUT))
  try:
    seconds = float(value)
  except ValueError:
    seconds = -1
  if not seconds > 0:  # also NaN
    # The environment's mistake, not the storage's: retrying (exit 170) would fail the same way.
    raise UserError(f"TRAINER_STORAGE_TIMEOUT={value!r} is not a positive number of seconds; set it to one "
                    f"(e.g. {_DEFAULT_TIMEOUT}, the default) or unset it")
  return seconds


# The gs:// plumbing below is shared with trainer.conditional and trainer.transfer.


def bounded():
  """Keyword arguments for every google-cloud-storage call: its default retry runs for minutes
  against a dead endpoint; bounding the whole retry and each request fails it in time."""
  from google.cloud.storage.retry import DEFAULT_RETRY
  seconds = timeout()
  return {"retry": DEFAULT_RETRY.with_timeout(seconds), "timeout": seconds}


def _client():
  return _client_for(os.environ.get("STORAGE_EMULATOR_HOST"))


@functools.lru_cache(maxsize=None)
def _client_for(emulator_host):
  """One client per endpoint: the emulator's (anonymous, a dummy project) or Google's, with the
  default credentials (Workload Identity on GKE, the service account on Vertex AI)."""
  from google.cloud import storage
  if emulator_host:
    from google.auth.credentials import AnonymousCredentials
    return storage.Client(project="emulator", credentials=AnonymousCredentials())
  return storage.Client()


def gcs_bucket(name):
  return _client().bucket(name)


def bucket_and_key(path):
  bucket, _, key = path[len(GS):].partition("/")
  if not bucket:
    raise StorageError(f"{path}: no bucket name; write gs://BUCKET/PATH")
  return bucket, key


def as_folder(path):
  return path if path.endswith("/") else path + "/"


def _has_children(path):
  bucket, prefix = bucket_and_key(as_folder(path))
  with translated(path, "list"):
    return any(True for _ in gcs_bucket(bucket).list_blobs(prefix=prefix, max_results=1, **bounded()))


def temp_sibling(path):
  """A fresh hidden name beside path (its folder created), for a write renamed onto path.
  Not mkstemp/mkdtemp: what they make is private (0600/0700); the umask should decide."""
  folder, name = os.path.split(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, f"{TEMPORARY}{name}-{secrets.token_hex(4)}")


def upload_file(source, dest):
  """Copies the local file source to dest (local or gs://), as one upload on gs://."""
  if not is_remote(dest):
    with translated(dest, "write"):
      os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
      shutil.copy2(source, dest)
    return
  bucket, key = bucket_and_key(dest)
  with translated(dest, "write"):
    gcs_bucket(bucket).blob(key).upload_from_filename(source, **bounded())


def local_files(folder):
  """Relative posix paths of every file below folder, sorted."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(errno.ENOENT, "no such folder", folder)
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    relative = os.path.relpath(root, folder)
    found += [f if relative == "." else posixpath.join(*relative.split(os.sep), f) for f in sorted(files)]
  return found


@contextlib.contextmanager
def translated(path, action):
  """Turns what google-cloud-storage, requests, google-auth and the OS raise into StorageError;
  FileNotFoundError and IsADirectoryError pass, as they say what the caller can act on."""
  try:
    yield
  except (FileNotFoundError, IsADirectoryError, StorageError):
    raise
  except Exception as e:  # noqa: BLE001 - narrowed just below, by module, to keep imports lazy
    message = _message(e, path, action)
    if message is None:
      raise
    raise StorageError(message) from e


def _message(error, path, action):
  """One line for an error from a storage library or the OS; None for anything else (a bug)."""
  module = type(error).__module__ or ""
  if isinstance(error, OSError) and not module.startswith(("requests", "urllib3", "google")):
    return f"cannot {action} {path}: {error.strerror or error}"
  if not module.startswith(("google", "requests", "urllib3")):
    return None
  from google.api_core import exceptions
  from google.auth import exceptions as auth_exceptions
  if isinstance(error, auth_exceptions.DefaultCredentialsError):
    return (f"cannot {action} {path}: no Google Cloud credentials found (use Workload Identity or a "
            "service account on the node, or set STORAGE_EMULATOR_HOST for an emulator)")
  if isinstance(error, exceptions.NotFound):
    return f"{path}: bucket not found; create it or fix the bucket name"
  if isinstance(error, (exceptions.Forbidden, exceptions.Unauthorized)):
    return (f"cannot {action} {path}: permission denied ({_first_line(error)}); give the job's service "
            "account access to the bucket")
  return f"cannot {action} {path}: {root_cause(error)} (is the bucket reachable and are credentials set?)"


def root_cause(error):
  """The innermost reason (e.g. "Connection refused") of an error wrapped by retries and HTTP."""
  seen, reason = set(), _first_line(error)
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.strerror:
      return error.strerror
    nested = [a for a in getattr(error, "args", ()) if isinstance(a, BaseException)]
    # google.api_core's `cause`, urllib3's `reason`, then Python's own chain.
    error = (getattr(error, "cause", None) or getattr(error, "reason", None) or error.__cause__
             or (nested[0] if nested else None) or error.__context__)
    if error is not None and str(error).strip():
      reason = _first_line(error)
  return reason


def _first_line(error):
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def copy_file(source, dest):
  """Copies one file within the storage: a server-side copy on gs:// (nothing goes through this
  host), a plain copy locally. FileNotFoundError when source is missing."""
  if not is_remote(source):
    with translated(dest, "write"):
      os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
      shutil.copy2(source, dest)
    return
  from google.api_core import exceptions
  (bucket, key), (dest_bucket, dest_key) = bucket_and_key(source), bucket_and_key(dest)
  with translated(dest, "write"):
    try:
      gcs_bucket(bucket).copy_blob(gcs_bucket(bucket).blob(key), gcs_bucket(dest_bucket), dest_key, **bounded())
    except exceptions.NotFound:
      raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), source) from None
