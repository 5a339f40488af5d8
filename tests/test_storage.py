"""The storage layer behaves the same on a local folder and on gs:// (a real emulator, no mocks):
round trips, atomic writes, listings, recursive removal, publishing with a completion marker
last, downloads, incremental syncs, local copies, and a dead endpoint that fails in seconds."""

import os
import time

import pytest

from trainer import storage


@pytest.fixture
def base(storage_root):
  return storage_root


def write_tree(root, files):
  for name, data in files.items():
    path = os.path.join(root, *name.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(data)
  return root


def read_tree(root):
  found = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, root).replace(os.sep, "/")] = f.read()
  return found


TREE = {"a.txt": b"alpha", "sub/b.bin": bytes(range(256)), "sub/deeper/c.txt": b"", "state.json": b"{}"}


def generations(folder):
  """{relative name: generation} of the objects below a gs:// folder; the emulator's generations
  are nanosecond timestamps, so they give the order of the uploads."""
  bucket, prefix = storage._split(folder + "/")
  return {blob.name[len(prefix):]: blob.generation
          for blob in storage._client().bucket(bucket).list_blobs(prefix=prefix)}


def test_join_and_is_remote():
  assert storage.join("gs://b", "x", "y.txt") == "gs://b/x/y.txt"
  assert storage.join("gs://b/x/", "y") == "gs://b/x/y"
  assert storage.join("/tmp", "x") == os.path.join("/tmp", "x")
  assert storage.is_remote("gs://b/x") and not storage.is_remote("/gs://b") and not storage.is_remote("b/x")


def test_write_read_round_trip(base):
  path = storage.join(base, "folder", "f.bin")
  assert not storage.exists(path) and not storage.exists(base)
  storage.write_bytes(path, b"\x00first")
  assert storage.read_bytes(path) == b"\x00first"
  storage.write_text(path, "zweite Fassung \u2713")
  assert storage.read_text(path) == "zweite Fassung \u2713"
  assert storage.exists(path) and storage.exists(storage.join(base, "folder")) and storage.exists(base)
  assert not storage.exists(storage.join(base, "fold"))  # a prefix of a name is not a folder
  with pytest.raises(FileNotFoundError, match="missing.bin"):
    storage.read_bytes(storage.join(base, "folder", "missing.bin"))
  with pytest.raises(IsADirectoryError):
    storage.read_bytes(storage.join(base, "folder"))


def test_atomic_write_leaves_no_temp_files(base):
  path = storage.join(base, "state.json")
  for i in range(3):
    storage.write_text(path, f'{{"step": {i}}}')
  with pytest.raises(TypeError):
    storage.write_bytes(path, 12345)  # fails half way: the old contents stay, no temp file is left
  assert storage.list_dir(base) == ["state.json"]
  assert storage.read_text(path) == '{"step": 2}'


def test_local_writes_get_the_usual_permissions(tmp_path):
  storage.write_bytes(str(tmp_path / "new.txt"), b"x")
  (tmp_path / "plain.txt").write_bytes(b"x")
  assert os.stat(tmp_path / "new.txt").st_mode == os.stat(tmp_path / "plain.txt").st_mode


def test_list_dir_of_files_folders_and_nothing(base):
  for name in ("b.txt", "a.txt", "sub/x.txt", "sub/deeper/y.txt", "subway.txt"):
    storage.write_bytes(storage.join(base, *name.split("/")), b"1")
  assert storage.list_dir(base) == ["a.txt", "b.txt", "sub", "subway.txt"]
  assert storage.list_dir(storage.join(base, "sub")) == ["deeper", "x.txt"]
  assert storage.list_dir(storage.join(base, "sub") + "/") == ["deeper", "x.txt"]
  assert storage.list_dir(storage.join(base, "nothing")) == []
  assert storage.list_dir(storage.join(base, "a.txt")) == []


def test_remove_is_recursive_and_missing_is_fine(base):
  for name in ("keep.txt", "gone/x.txt", "gone/deeper/y.txt", "gone-not/z.txt"):
    storage.write_bytes(storage.join(base, *name.split("/")), b"1")
  storage.remove(storage.join(base, "gone"))
  assert storage.list_dir(base) == ["gone-not", "keep.txt"]
  storage.remove(storage.join(base, "keep.txt"))
  storage.remove(storage.join(base, "never-there"))
  assert storage.list_dir(base) == ["gone-not"]


def test_publish_dir_puts_the_last_files_last(base, tmp_path):
  source = write_tree(str(tmp_path / "export"), dict(TREE, **{"sub/meta.txt": b"m"}))
  dest = storage.join(base, "models", "7")
  storage.write_bytes(storage.join(dest, "leftover.txt"), b"from an interrupted publish")
  storage.publish_dir(source, dest, last=("sub/meta.txt", "state.json"))
  copy = str(tmp_path / "copy")
  storage.download_dir(dest, copy)
  assert read_tree(copy) == read_tree(source)
  assert storage.list_dir(storage.join(base, "models")) == ["7"]  # no hidden temp folder left
  if storage.is_remote(dest):
    order = generations(dest)
    others = [g for name, g in order.items() if name not in ("sub/meta.txt", "state.json")]
    assert max(others) < order["sub/meta.txt"] < order["state.json"]
  with pytest.raises(ValueError, match="done.json"):
    storage.publish_dir(source, storage.join(base, "models", "8"), last=("done.json",))


def test_local_publish_is_one_rename(tmp_path, monkeypatch):
  source = write_tree(str(tmp_path / "export"), TREE)
  dest = str(tmp_path / "models" / "1")
  renames = []
  rename = os.rename
  monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((a, b)), rename(a, b)))
  storage.publish_dir(source, dest)
  [(temp, target)] = renames
  assert target == dest and os.path.basename(temp).startswith(".tmp-1-")
  assert os.path.dirname(temp) == os.path.dirname(dest) and not os.path.exists(temp)
  assert read_tree(dest) == TREE


def test_download_dir_round_trip(base, tmp_path):
  for name, data in TREE.items():
    storage.write_bytes(storage.join(base, "run", *name.split("/")), data)
  storage.download_dir(storage.join(base, "run"), str(tmp_path / "down"))
  assert read_tree(str(tmp_path / "down")) == TREE
  with pytest.raises(FileNotFoundError):
    storage.download_dir(storage.join(base, "nothing"), str(tmp_path / "none"))


def test_sync_dir_copies_only_new_and_changed_files(base, tmp_path):
  logs = write_tree(str(tmp_path / "logs"), {"train/events.1": b"e1", "validation/events.1": b"v1"})
  dest = storage.join(base, "tensorboard")
  assert storage.sync_dir(logs, dest) == ["train/events.1", "validation/events.1"]
  before = generations(dest) if storage.is_remote(dest) else None
  assert storage.sync_dir(logs, dest) == []
  with open(os.path.join(logs, "train", "events.1"), "ab") as f:
    f.write(b" and more")
  write_tree(logs, {"train/events.2": b"e2"})
  assert storage.sync_dir(logs, dest) == ["train/events.1", "train/events.2"]
  copy = str(tmp_path / "copy")
  storage.download_dir(dest, copy)
  assert read_tree(copy) == read_tree(logs)
  if before is not None:
    after = generations(dest)
    assert after["validation/events.1"] == before["validation/events.1"]
    assert after["train/events.1"] > before["train/events.1"]
  assert storage.sync_dir(logs, logs) == []


def test_local_path_of_a_file_and_a_folder(base):
  for name, data in TREE.items():
    storage.write_bytes(storage.join(base, "data", *name.split("/")), data)
  file_path = storage.join(base, "data", "sub", "b.bin")
  local_file = storage.local_path(file_path)
  with open(local_file, "rb") as f:
    assert f.read() == TREE["sub/b.bin"]
  local_folder = storage.local_path(storage.join(base, "data"))
  assert read_tree(local_folder) == TREE
  if storage.is_remote(base):
    assert local_file != file_path and os.path.basename(local_file) == "b.bin"
    storage.write_bytes(file_path, b"changed later")
    assert storage.local_path(file_path) == local_file  # one download per process
  else:
    assert local_file == file_path
  with pytest.raises(FileNotFoundError):
    storage.local_path(storage.join(base, "nothing"))


def test_a_missing_bucket_is_an_error_not_an_empty_folder(gcs_emulator):
  for operation in (storage.read_bytes, storage.list_dir, storage.exists):
    with pytest.raises(storage.StorageError, match=r"^gs://no-such-bucket-x/a/b: bucket not found"):
      operation("gs://no-such-bucket-x/a/b")


@pytest.mark.slow
def test_a_stopped_emulator_fails_in_time_and_keeps_its_objects(gcs_emulator, gcs_bucket):
  path = storage.join(gcs_bucket, "run", "state.json")
  storage.write_text(path, '{"step": 3}')
  limit = float(os.environ["TRAINER_STORAGE_TIMEOUT"]) + 5
  gcs_emulator.stop()
  try:
    for action, operation in [("read", lambda: storage.read_bytes(path)),
                              ("list", lambda: storage.list_dir(storage.join(gcs_bucket, "run"))),
                              ("write", lambda: storage.write_text(path, "lost")),
                              ("check", lambda: storage.exists(path))]:
      started = time.monotonic()
      with pytest.raises(storage.StorageError) as error:
        operation()
      assert time.monotonic() - started < limit, action
      message = str(error.value)
      assert "\n" not in message and message.startswith(f"cannot {action} {gcs_bucket}/run"), message
      assert "Connection refused" in message
  finally:
    gcs_emulator.start()
  assert storage.read_text(path) == '{"step": 3}'
  assert storage.list_dir(gcs_bucket) == ["run"]


def test_local_errors_are_one_line(tmp_path):
  (tmp_path / "file").write_bytes(b"a file, not a folder")
  with pytest.raises(storage.StorageError, match=r"^cannot write .*/file/f.txt: (Not a directory|File exists)$"):
    storage.write_bytes(str(tmp_path / "file" / "f.txt"), b"x")
  with pytest.raises(storage.StorageError, match=r"^cannot read .*/file/f.txt: Not a directory$"):
    storage.read_bytes(str(tmp_path / "file" / "f.txt"))


def test_list_files_lists_every_file_below_in_one_go(base):
  assert storage.list_files(base) == []
  for name in ("a/x.txt", "a/b/y.txt", "z.txt"):
    storage.write_text(storage.join(base, *name.split("/")), name)
  assert storage.list_files(base) == ["a/b/y.txt", "a/x.txt", "z.txt"]
  assert storage.list_files(storage.join(base, "a")) == ["b/y.txt", "x.txt"]


def test_local_publish_is_durable_before_it_returns(tmp_path, monkeypatch):
  """Every file and folder of the copy reaches the disk before the rename, the rename itself (the
  parent folder) after it: a caller that deletes older copies once publish_dir returns cannot be
  left with nothing but empty files after a power loss."""
  source = write_tree(str(tmp_path / "export"), TREE)
  dest = str(tmp_path / "models" / "1")
  events = []
  fsync, rename = os.fsync, os.rename
  monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                               fsync(fd)))
  monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", a, b)), rename(a, b)))
  storage.publish_dir(source, dest, last=("state.json",))
  [at] = [i for i, event in enumerate(events) if event[0] == "rename"]
  temp = events[at][1]
  synced_before = {path for kind, path, *_ in events[:at] if kind == "fsync"}
  copied = {os.path.join(temp, *name.split("/")) for name in TREE}
  folders = {temp, os.path.join(temp, "sub"), os.path.join(temp, "sub", "deeper")}
  assert copied | folders <= synced_before, sorted(copied | folders - synced_before)
  assert ("fsync", os.path.dirname(dest)) in events[at + 1:]
  assert read_tree(dest) == TREE


def test_a_removal_deletes_the_markers_first(base, monkeypatch):
  for name in ("a.txt", "b/c.txt", "state.json", "z.txt"):
    storage.write_bytes(storage.join(base, "ckpt", *name.split("/")), b"1")
  removed = []
  if storage.is_remote(base):
    from google.cloud.storage import Blob
    delete = Blob.delete
    monkeypatch.setattr(Blob, "delete", lambda self, *a, **k: (removed.append(self.name.split("/ckpt/")[1]),
                                                                delete(self, *a, **k)))
  else:
    unlink = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p, *a, **k: (removed.append(os.path.relpath(p, f"{base}/ckpt")
                                                                         if isinstance(p, str) else p),
                                                          unlink(p, *a, **k)))
    monkeypatch.setattr(os, "remove", os.unlink)
  storage.remove(storage.join(base, "ckpt"), first=("state.json",))
  assert removed[0] == "state.json", removed
  assert storage.list_dir(base) == []


def test_an_object_removed_during_a_download_is_a_storage_error_naming_it(gcs_bucket, tmp_path, monkeypatch):
  for name, data in TREE.items():
    storage.write_bytes(storage.join(gcs_bucket, "run", *name.split("/")), data)
  from google.cloud.storage import Blob
  download = Blob.download_to_filename

  def download_after_a_prune(self, *args, **kwargs):
    # Another process removes sub/b.bin after it was listed, before it is downloaded (one call).
    if self.name.endswith("a.txt"):
      storage.remove(storage.join(gcs_bucket, "run", "sub", "b.bin"))
    return download(self, *args, **kwargs)
  monkeypatch.setattr(Blob, "download_to_filename", download_after_a_prune)
  with pytest.raises(storage.StorageError) as error:
    storage.download_dir(storage.join(gcs_bucket, "run"), str(tmp_path / "down"))
  assert str(error.value).startswith(f"{gcs_bucket}/run/sub/b.bin vanished while {gcs_bucket}/run was downloaded")
  assert "bucket not found" not in str(error.value)


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan"])
def test_a_bad_storage_timeout_is_a_user_mistake(gcs_bucket, monkeypatch, value):
  from trainer.config import UserError
  monkeypatch.setenv("TRAINER_STORAGE_TIMEOUT", value)
  with pytest.raises(UserError, match=rf"^TRAINER_STORAGE_TIMEOUT='{value}' is not a positive number of seconds; "
                                      r"set it to one \(e.g. 60, the default\) or unset it$"):
    storage.read_bytes(storage.join(gcs_bucket, "x"))


@pytest.mark.slow
def test_a_bad_storage_timeout_exits_2(gcs_bucket, tmp_path):
  import subprocess
  import sys
  done = subprocess.run([sys.executable, "-m", "trainer.task", "--model=dense", "--epochs=1",
                         f"--job_dir={gcs_bucket}/job"], capture_output=True, text=True, timeout=600,
                        env={**os.environ, "TRAINER_STORAGE_TIMEOUT": "abc"})
  assert done.returncode == 2, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1].startswith("trainer: error: TRAINER_STORAGE_TIMEOUT='abc'")
