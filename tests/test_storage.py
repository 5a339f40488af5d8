"""The storage layer behaves the same on a local folder and on gs:// (a real emulator, no mocks):
round trips, atomic writes, listings, recursive removal, a dead endpoint that fails in seconds."""

import os
import time

import forked
import pytest

from trainer import storage


@pytest.fixture
def base(storage_root):
  return storage_root


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


def test_a_missing_bucket_is_an_error_not_an_empty_folder(gcs_emulator):
  for operation in (storage.read_bytes, storage.list_dir, storage.exists):
    with pytest.raises(storage.StorageError, match=r"^gs://no-such-bucket-x/a/b: bucket not found"):
      operation("gs://no-such-bucket-x/a/b")


@pytest.mark.slow
def test_a_stopped_emulator_fails_in_time_and_keeps_its_objects(gcs_emulator, gcs_bucket, outage_timeout):
  path = storage.join(gcs_bucket, "run", "state.json")
  storage.write_text(path, '{"step": 3}')
  limit = outage_timeout + 5
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


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan"])
def test_a_bad_storage_timeout_is_a_user_mistake(gcs_bucket, monkeypatch, value):
  from trainer.errors import UserError
  monkeypatch.setenv("TRAINER_STORAGE_TIMEOUT", value)
  with pytest.raises(UserError, match=rf"^TRAINER_STORAGE_TIMEOUT='{value}' is not a positive number of seconds; "
                                      r"set it to one \(e.g. 60, the default\) or unset it$"):
    storage.read_bytes(storage.join(gcs_bucket, "x"))


@pytest.mark.slow
def test_a_bad_storage_timeout_exits_2(gcs_bucket, tmp_path):
  import sys
  done = forked.run([sys.executable, "-m", "trainer.task", "--model=dense", "--epochs=1",
                     f"--job_dir={gcs_bucket}/job"], capture_output=True, text=True, timeout=600,
                    env={**os.environ, "TRAINER_STORAGE_TIMEOUT": "abc"})
  assert done.returncode == 2, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1].startswith("trainer: error: TRAINER_STORAGE_TIMEOUT='abc'")
