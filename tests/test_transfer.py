"""Whole folders (trainer.transfer) on a local folder and on gs:// (a real emulator, no mocks):
publishing with a completion marker last, downloads, incremental syncs, local copies."""

import os

import pytest

from trainer import storage, transfer


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
  bucket, prefix = storage.bucket_and_key(folder + "/")
  return {blob.name[len(prefix):]: blob.generation
          for blob in storage.gcs_bucket(bucket).list_blobs(prefix=prefix)}


def test_publish_dir_puts_the_last_files_last(base, tmp_path):
  source = write_tree(str(tmp_path / "export"), dict(TREE, **{"sub/meta.txt": b"m"}))
  dest = storage.join(base, "models", "7")
  storage.write_bytes(storage.join(dest, "leftover.txt"), b"from an interrupted publish")
  transfer.publish_dir(source, dest, last=("sub/meta.txt", "state.json"))
  copy = str(tmp_path / "copy")
  transfer.download_dir(dest, copy)
  assert read_tree(copy) == read_tree(source)
  assert storage.list_dir(storage.join(base, "models")) == ["7"]  # no hidden temp folder left
  if storage.is_remote(dest):
    order = generations(dest)
    others = [g for name, g in order.items() if name not in ("sub/meta.txt", "state.json")]
    assert max(others) < order["sub/meta.txt"] < order["state.json"]
  with pytest.raises(ValueError, match="done.json"):
    transfer.publish_dir(source, storage.join(base, "models", "8"), last=("done.json",))


def test_local_publish_is_one_rename(tmp_path, monkeypatch):
  source = write_tree(str(tmp_path / "export"), TREE)
  dest = str(tmp_path / "models" / "1")
  renames = []
  rename = os.rename
  monkeypatch.setattr(os, "rename", lambda a, b: (renames.append((a, b)), rename(a, b)))
  transfer.publish_dir(source, dest)
  [(temp, target)] = renames
  assert target == dest and os.path.basename(temp).startswith(".tmp-1-")
  assert os.path.dirname(temp) == os.path.dirname(dest) and not os.path.exists(temp)
  assert read_tree(dest) == TREE


def test_download_dir_round_trip(base, tmp_path):
  for name, data in TREE.items():
    storage.write_bytes(storage.join(base, "run", *name.split("/")), data)
  transfer.download_dir(storage.join(base, "run"), str(tmp_path / "down"))
  assert read_tree(str(tmp_path / "down")) == TREE
  with pytest.raises(FileNotFoundError):
    transfer.download_dir(storage.join(base, "nothing"), str(tmp_path / "none"))


def test_sync_dir_copies_only_new_and_changed_files(base, tmp_path):
  logs = write_tree(str(tmp_path / "logs"), {"train/events.1": b"e1", "validation/events.1": b"v1"})
  dest = storage.join(base, "tensorboard")
  assert transfer.sync_dir(logs, dest) == ["train/events.1", "validation/events.1"]
  before = generations(dest) if storage.is_remote(dest) else None
  assert transfer.sync_dir(logs, dest) == []
  with open(os.path.join(logs, "train", "events.1"), "ab") as f:
    f.write(b" and more")
  write_tree(logs, {"train/events.2": b"e2"})
  assert transfer.sync_dir(logs, dest) == ["train/events.1", "train/events.2"]
  copy = str(tmp_path / "copy")
  transfer.download_dir(dest, copy)
  assert read_tree(copy) == read_tree(logs)
  if before is not None:
    after = generations(dest)
    assert after["validation/events.1"] == before["validation/events.1"]
    assert after["train/events.1"] > before["train/events.1"]
  assert transfer.sync_dir(logs, logs) == []


def test_local_path_of_a_file_and_a_folder(base):
  for name, data in TREE.items():
    storage.write_bytes(storage.join(base, "data", *name.split("/")), data)
  file_path = storage.join(base, "data", "sub", "b.bin")
  local_file = transfer.local_path(file_path)
  with open(local_file, "rb") as f:
    assert f.read() == TREE["sub/b.bin"]
  local_folder = transfer.local_path(storage.join(base, "data"))
  assert read_tree(local_folder) == TREE
  if storage.is_remote(base):
    assert local_file != file_path and os.path.basename(local_file) == "b.bin"
    storage.write_bytes(file_path, b"changed later")
    assert transfer.local_path(file_path) == local_file  # one download per process
  else:
    assert local_file == file_path
  with pytest.raises(FileNotFoundError):
    transfer.local_path(storage.join(base, "nothing"))


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
  transfer.publish_dir(source, dest, last=("state.json",))
  [at] = [i for i, event in enumerate(events) if event[0] == "rename"]
  temp = events[at][1]
  synced_before = {path for kind, path, *_ in events[:at] if kind == "fsync"}
  copied = {os.path.join(temp, *name.split("/")) for name in TREE}
  folders = {temp, os.path.join(temp, "sub"), os.path.join(temp, "sub", "deeper")}
  assert copied | folders <= synced_before, sorted(copied | folders - synced_before)
  assert ("fsync", os.path.dirname(dest)) in events[at + 1:]
  assert read_tree(dest) == TREE


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
    transfer.download_dir(storage.join(gcs_bucket, "run"), str(tmp_path / "down"))
  assert str(error.value).startswith(f"{gcs_bucket}/run/sub/b.bin vanished while {gcs_bucket}/run was downloaded")
  assert "bucket not found" not in str(error.value)
