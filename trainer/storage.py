"""One file-system layer for local paths and gs://, so every caller treats both the same.

Why not tf.io.gfile: its gs:// endpoint is hard-coded, so tests cannot point it at an emulator,
and tf.train.latest_checkpoint swallows its network errors and returns None, which would
restart a job from scratch (GUIDE section 4). Here a failure is one of two things: the file is
not there (FileNotFoundError, as for a local file) or the storage could not be used
(StorageError: one line naming the path and what to do). A dead endpoint fails within
TRAINER_STORAGE_TIMEOUT seconds (default 60) instead of retrying for minutes.
"""

import atexit
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
import tempfile
import threading

from trainer.errors import StorageError, UserError  # noqa: F401 -- storage.StorageError is what callers catch

GS = "gs://"
_DEFAULT_TIMEOUT = 60


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
  bucket, key = _split(path)
  with _translated(path, "check"):
    if not key:
      return _bucket(bucket).exists(**_call())
    return _bucket(bucket).blob(key).exists(**_call()) or _has_children(path)


def is_dir(path):
  """True for a folder (on gs://: any object below the prefix, or a bucket that exists)."""
  if not is_remote(path):
    return os.path.isdir(path)
  bucket, key = _split(path)
  if not key:
    return exists(path)
  return _has_children(path)


def read_bytes(path):
  """The file's contents; FileNotFoundError when it is missing, IsADirectoryError for a folder."""
  if not is_remote(path):
    with _translated(path, "read"):
      with open(path, "rb") as f:
        return f.read()
  from google.api_core import exceptions
  bucket, key = _split(path)
  with _translated(path, "read"):
    try:
      return _bucket(bucket).blob(key).download_as_bytes(**_call())
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
    bucket, key = _split(path)
    with _translated(path, "write"):
      _bucket(bucket).blob(key).upload_from_string(data, **_call())
    return
  with _translated(path, "write"):
    temp = _temp_sibling(path)
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
    with _translated(path, "list"):
      return sorted(os.listdir(path)) if os.path.isdir(path) else []
  bucket, prefix = _split(_as_folder(path))
  with _translated(path, "list"):
    blobs = _bucket(bucket).list_blobs(prefix=prefix, delimiter="/", **_call())
    names = [blob.name[len(prefix):] for blob in blobs]
    names += [p[len(prefix):].rstrip("/") for p in blobs.prefixes]
  return sorted(n for n in set(names) if n)  # "" is a folder-marker object, not a child


def list_files(path):
  """Relative posix paths of every file below a folder, sorted; [] when there is no such folder.
  One listing on gs://, where a list_dir per sub-folder costs a request each."""
  if not is_remote(path):
    with _translated(path, "list"):
      return sorted(_files_below(path)) if os.path.isdir(path) else []
  bucket, prefix = _split(_as_folder(path))
  with _translated(path, "list"):
    names = [blob.name[len(prefix):] for blob in _bucket(bucket).list_blobs(prefix=prefix, **_call())]
  return sorted(n for n in names if n and not n.endswith("/"))


def list_sizes(path):
  """{relative posix path: size in bytes} of every file below a folder, from one listing on
  gs://; {} when there is no such folder."""
  if not is_remote(path):
    with _translated(path, "list"):
      return {name: os.path.getsize(os.path.join(path, *name.split("/"))) for name in list_files(path)}
  bucket, prefix = _split(_as_folder(path))
  with _translated(path, "list"):
    return {blob.name[len(prefix):]: blob.size for blob in _bucket(bucket).list_blobs(prefix=prefix, **_call())
            if blob.name[len(prefix):] and not blob.name.endswith("/")}


def stat(path):
  """What identifies one version of a file: {"size", "modified" (UTC, ISO), "checksum"} and on
  gs:// "generation". The checksum is the object's crc32c on gs:// (kept by the storage) and a
  sha256 of the contents locally (which reads the whole file). FileNotFoundError when missing."""
  import datetime
  if not is_remote(path):
    with _translated(path, "read"):
      digest = hashlib.sha256()
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
        info = os.fstat(f.fileno())
    modified = datetime.datetime.fromtimestamp(info.st_mtime, datetime.timezone.utc)
    return {"size": info.st_size, "modified": modified.isoformat(timespec="seconds"),
            "checksum": "sha256:" + digest.hexdigest()}
  bucket, key = _split(path)
  with _translated(path, "read"):
    blob = _bucket(bucket).get_blob(key, **_call())
  if blob is None:
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
  return {"size": blob.size, "modified": blob.updated.astimezone(datetime.timezone.utc).isoformat(timespec="seconds"),
          "checksum": f"crc32c:{blob.crc32c}", "generation": blob.generation}


def remove(path, first=()):
  """Removes a file or a folder with everything in it; a missing path is not an error. first:
  files of the folder (relative paths) removed before the rest, in that order: a completion
  marker, so that a removal killed half way never leaves a marker beside part of the data."""
  if not is_remote(path):
    with _translated(path, "remove"):
      if os.path.isdir(path) and not os.path.islink(path):
        for name in first:
          with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(path, *name.split("/")))
        shutil.rmtree(path)
      elif os.path.lexists(path):
        os.remove(path)
    return
  from google.api_core import exceptions
  bucket, key = _split(path)
  if not key:
    raise StorageError(f"{path}: refusing to remove a whole bucket; name a folder in it")
  with _translated(path, "remove"):
    # A folder's objects, or else the object itself: no request for a name that is neither.
    names = [blob.name for blob in _bucket(bucket).list_blobs(prefix=key + "/", **_call())] or [key]
    markers = [f"{key}/{name}" for name in first if f"{key}/{name}" in names]
    for name in markers + [n for n in names if n not in markers]:
      with contextlib.suppress(exceptions.NotFound):
        _bucket(bucket).blob(name).delete(**_call())


# Conditional writes of one small file, for a lock that two processes may race for (a lease): on
# gs:// Cloud Storage's generation preconditions decide on the server; locally an flock on a
# sibling `<path>.lock` (created once, never removed) serialises the check and the write. The
# token of a version is its generation on gs:// and its bytes locally.


def create_exclusive(path, data):
  """Writes data to path only if there is no file there; True if this call created it. The
  file appears whole. Give data unique to the caller (a lease holds a random token): a retried
  request of ours that already created it is recognised by its contents."""
  if not is_remote(path):
    with _locked(path):
      if os.path.lexists(path):
        return False
      write_bytes(path, data)
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
  if not is_remote(path):
    with _locked(path):
      if not os.path.lexists(path) or read_bytes(path) != token:
        return False
      write_bytes(path, data)
    return True
  return _upload_if_generation(path, data, token)


def remove_if_unchanged(path, token):
  """Removes path only if it still holds the version of token; True if this call removed it."""
  if not is_remote(path):
    with _locked(path):
      if not os.path.lexists(path) or read_bytes(path) != token:
        return False
      with _translated(path, "remove"):
        os.remove(path)
    return True
  from google.api_core import exceptions
  bucket, key = _split(path)
  with _translated(path, "remove"):
    try:
      _bucket(bucket).blob(key).delete(if_generation_match=token, **_call())
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      return False
  return True


def _upload_if_generation(path, data, generation):
  """Uploads data only if the object's generation is `generation` (0: there is none)."""
  from google.api_core import exceptions
  bucket, key = _split(path)
  with _translated(path, "write"):
    try:
      _bucket(bucket).blob(key).upload_from_string(data, if_generation_match=generation, **_call())
      return True
    except exceptions.PreconditionFailed:
      pass
  # A retry of our own request that had already succeeded fails its precondition too.
  try:
    return read_bytes(path) == data
  except FileNotFoundError:
    return False


@contextlib.contextmanager
def _locked(path):
  """An exclusive flock on `<path>.lock` (a file: directories cannot be locked over NFS)."""
  import fcntl
  with _translated(path, "lock"):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
  try:
    with _translated(path, "lock"):
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


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
  files = _files_below(local_dir)
  missing = [name for name in last if name not in files]
  if missing:
    raise ValueError(f"publish_dir: {missing[0]} (in last) is not a file of {local_dir}")
  if is_remote(dest):
    remove(dest, first=tuple(reversed(last)))
    for name in [f for f in files if f not in last] + list(last):
      _upload(os.path.join(local_dir, name), join(dest, name))
    return
  with _translated(dest, "write"):
    temp = _temp_sibling(dest)
    try:
      shutil.copytree(local_dir, temp)
      _fsync_tree(temp)
      remove(dest, first=tuple(reversed(last)))
      os.rename(temp, dest)
    except BaseException:
      shutil.rmtree(temp, ignore_errors=True)
      raise
    _fsync(os.path.dirname(os.path.abspath(dest)))  # the rename itself


def download_dir(path, local_dir):
  """Copies a folder (local or gs://) into local_dir; FileNotFoundError when it is missing."""
  if not is_remote(path):
    with _translated(path, "read"):
      shutil.copytree(path, local_dir, dirs_exist_ok=True)
    return
  from google.api_core import exceptions
  bucket, prefix = _split(_as_folder(path))
  with _translated(path, "read"):
    names = [blob.name[len(prefix):] for blob in _bucket(bucket).list_blobs(prefix=prefix, **_call())]
  names = [n for n in names if n and not n.endswith("/")]  # folder markers hold nothing
  if not names:
    raise FileNotFoundError(errno.ENOENT, "no such folder", path)
  root = os.path.abspath(local_dir)
  os.makedirs(root, exist_ok=True)
  for name in names:
    target = os.path.normpath(os.path.join(root, *name.split("/")))
    if not target.startswith(root + os.sep):  # an object named "../x" must not land outside
      raise StorageError(f"{join(path, name)}: object name leaves the folder; refusing to download it")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with _translated(join(path, name), "read"):
      try:
        _bucket(bucket).blob(prefix + name).download_to_filename(target, **_call())
      except exceptions.NotFound:
        # Listed a moment ago: removed since (a prune by another process, a lifecycle rule). What
        # was downloaded is a mix; a retry lists again and sees what is there now.
        raise StorageError(f"{join(path, name)} vanished while {path} was downloaded (removed by another process "
                           "or a lifecycle rule?); run again to read what is there now") from None


# (local_dir, dest) -> {relative path: (size, mtime_ns)} as of the last sync_dir of that pair.
_synced = {}
_synced_lock = threading.Lock()


def sync_dir(local_dir, dest):
  """Copies the files of local_dir that are new or changed (size or mtime) since the last sync
  of the same pair; returns their relative paths. For logs written while a job runs (TensorBoard
  event files): not atomic, a reader may see a file of the last sync."""
  if not is_remote(dest) and os.path.realpath(dest) == os.path.realpath(local_dir):
    return []
  key = (os.path.abspath(local_dir), dest)
  with _synced_lock:
    seen = _synced.setdefault(key, {})
    changed = []
    for name in _files_below(local_dir):
      source = os.path.join(local_dir, name)
      stat = os.stat(source)
      if seen.get(name) == (stat.st_size, stat.st_mtime_ns):
        continue
      _upload(source, join(dest, *name.split("/")))
      seen[name] = (stat.st_size, stat.st_mtime_ns)
      changed.append(name)
  return changed


# Remote path -> its local copy, for this process; removed at exit.
_cache = {}
_cache_lock = threading.Lock()
_cache_dir = None


def local_path(path):
  """A local path holding the file or folder: the path itself, or a copy of a gs:// one
  downloaded once per process (the same remote path gives the same copy). FileNotFoundError
  when there is nothing at path, for both kinds alike."""
  if not is_remote(path):
    if not os.path.lexists(path):
      raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
    return path
  path = path.rstrip("/")
  with _cache_lock:
    if path in _cache:
      return _cache[path]
    target = os.path.join(tempfile.mkdtemp(dir=_cache_root()), posixpath.basename(path) or "bucket")
    try:
      data = read_bytes(path)
    except IsADirectoryError:
      download_dir(path, target)
    else:
      with open(target, "wb") as f:
        f.write(data)
    _cache[path] = target
    return target


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


def _call():
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


def _bucket(name):
  return _client().bucket(name)


def _split(path):
  bucket, _, key = path[len(GS):].partition("/")
  if not bucket:
    raise StorageError(f"{path}: no bucket name; write gs://BUCKET/PATH")
  return bucket, key


def _as_folder(path):
  return path if path.endswith("/") else path + "/"


def _has_children(path):
  bucket, prefix = _split(_as_folder(path))
  with _translated(path, "list"):
    return any(True for _ in _bucket(bucket).list_blobs(prefix=prefix, max_results=1, **_call()))


def _temp_sibling(path):
  """A fresh hidden name beside path (its folder created), for a write renamed onto path.
  Not mkstemp/mkdtemp: what they make is private (0600/0700); the umask should decide."""
  folder, name = os.path.split(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  return os.path.join(folder, f".tmp-{name}-{secrets.token_hex(4)}")


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


def _upload(source, dest):
  if not is_remote(dest):
    with _translated(dest, "write"):
      os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
      shutil.copy2(source, dest)
    return
  bucket, key = _split(dest)
  with _translated(dest, "write"):
    _bucket(bucket).blob(key).upload_from_filename(source, **_call())


def _files_below(folder):
  """Relative posix paths of every file below folder, sorted."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(errno.ENOENT, "no such folder", folder)
  found = []
  for root, dirs, files in os.walk(folder):
    dirs.sort()
    relative = os.path.relpath(root, folder)
    found += [f if relative == "." else posixpath.join(*relative.split(os.sep), f) for f in sorted(files)]
  return found


def _cache_root():
  global _cache_dir
  if _cache_dir is None:
    _cache_dir = tempfile.mkdtemp(prefix="trainer-storage-")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  return _cache_dir


@contextlib.contextmanager
def _translated(path, action):
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


# The storage's own clock, for a lease whose expiry must not depend on which host judges it: a
# file's modification time is set by the storage (the file server, Cloud Storage), not the writer.


def read_stamped(path):
  """(contents, token, modification time in epoch seconds by the storage's clock) of one version of
  a file, as read_with_token's; FileNotFoundError when it is missing."""
  if not is_remote(path):
    for _ in range(5):
      with _translated(path, "read"):
        before = os.stat(path).st_mtime_ns
        data = read_bytes(path)
        if os.stat(path).st_mtime_ns == before:  # not replaced while it was read
          return data, data, before / 1e9
    raise StorageError(f"{path}: changed during each of 5 reads; is something rewriting it in a loop?")
  from google.api_core import exceptions
  bucket, key = _split(path)
  for _ in range(5):
    with _translated(path, "read"):
      blob = _bucket(bucket).get_blob(key, **_call())
      if blob is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
      generation, updated = blob.generation, blob.updated  # before the download resets them
      if not generation or updated is None:
        raise StorageError(f"{path}: the storage did not say the object's generation and time; cannot judge it")
      try:
        return blob.download_as_bytes(if_generation_match=generation, **_call()), generation, updated.timestamp()
      except (exceptions.PreconditionFailed, exceptions.NotFound):
        continue
  raise StorageError(f"{path}: changed during each of 5 reads; is something rewriting it in a loop?")


def store_time(probe):
  """The storage's current time (epoch seconds): the modification time of probe, written now.
  Locally probe is touched and left (give a file that stays anyway, such as a lock); on gs:// it
  is uploaded empty and removed."""
  if not is_remote(probe):
    with _translated(probe, "write"):
      os.makedirs(os.path.dirname(os.path.abspath(probe)), exist_ok=True)
      os.close(os.open(probe, os.O_WRONLY | os.O_CREAT, 0o666))
      os.utime(probe)  # the file server's now, also over NFS
      return os.stat(probe).st_mtime_ns / 1e9
  from google.api_core import exceptions
  bucket, key = _split(probe)
  with _translated(probe, "write"):
    blob = _bucket(bucket).blob(key)
    blob.upload_from_string(b"", **_call())
    updated = blob.updated
    with contextlib.suppress(exceptions.NotFound):
      blob.delete(**_call())
  if updated is None:
    raise StorageError(f"{probe}: the storage did not say when the object was written; cannot read its clock")
  return updated.timestamp()


def copy_file(source, dest):
  """Copies one file within the storage: a server-side copy on gs:// (nothing goes through this
  host), a plain copy locally. FileNotFoundError when source is missing."""
  if not is_remote(source):
    with _translated(dest, "write"):
      os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
      shutil.copy2(source, dest)
    return
  from google.api_core import exceptions
  (bucket, key), (dest_bucket, dest_key) = _split(source), _split(dest)
  with _translated(dest, "write"):
    try:
      _bucket(bucket).copy_blob(_bucket(bucket).blob(key), _bucket(dest_bucket), dest_key, **_call())
    except exceptions.NotFound:
      raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), source) from None


def upload_file(source, dest):
  """Copies the local file source to dest (local or gs://), as one upload on gs://."""
  _upload(source, dest)
