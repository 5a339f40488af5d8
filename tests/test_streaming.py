"""Data streamed from gs:// (the emulator) with bounded local disk: TFRecord shards give the examples
local shards give, in the same order, with at most a few shards on disk at once; a shard that cannot
be downloaded stops the job in one line with exit 170."""

import json
import logging
import os
import runpy
import sys
import threading

import numpy as np
import pytest
import tensorflow as tf
from google.cloud import storage as gcs

import forked
from image_files import rgb, write_image
from trainer import storage, transfer
from trainer.data import image_folder, image_tfrecords
from trainer.errors import StorageError

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_tfrecords.py")


def in_order(dataset):
  """[(shape, pixel bytes, label...)] as the dataset yields them: order matters here."""
  return [tuple(x.tobytes() if isinstance(x, np.ndarray) else int(x) for x in element)
          for element in dataset.as_numpy_iterator()]


def shards(tmp_path, gcs_bucket, num_shards=4, per_class=(7, 6, 5)):
  """(local shard folder, its copy on gs://, metadata) of a folder of distinct random PNGs."""
  src = str(tmp_path / "src")
  for c, n in enumerate(per_class):
    for i in range(n):
      write_image(os.path.join(src, f"c{c}", f"{i}.png"), rgb(8 + i % 3, 10 + c, seed=100 * c + i))
  local = str(tmp_path / "shards")
  metadata = image_tfrecords.write_shards(image_folder.scan(src), local, num_shards)
  remote = storage.join(gcs_bucket, "shards")
  transfer.publish_dir(local, remote, last=(image_tfrecords.METADATA,))
  return local, remote, metadata


def scratch_files():
  """Every file in this process's scratch folder for copies of gs:// data (trainer.transfer)."""
  return [os.path.join(root, f) for root, _, files in os.walk(transfer.scratch_folder()) for f in files]


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_streamed_shards_give_the_local_examples_in_the_local_order(tmp_path, gcs_bucket):
  local, remote, _ = shards(tmp_path, gcs_bucket)
  read = lambda location, **options: in_order(image_tfrecords.read(location, **options)[0])
  assert read(remote) == read(local)
  assert read(remote, order_seed=7) == read(local, order_seed=7) != read(local)
  assert sorted(read(local, order_seed=7)) == sorted(read(local))
  # Each input pipeline its own shards (4 files, 2 pipelines) or every n-th record (4 files, 5 pipelines).
  for pipelines in (2, 5):
    for worker in range(pipelines):
      context = tf.distribute.InputContext(pipelines, worker, pipelines)
      assert read(remote, input_context=context, order_seed=3) == read(local, input_context=context, order_seed=3)
  # An example's index is its place in the folder, whatever the order it is read in.
  indexed = read(remote, order_seed=7, indexed=True)
  assert sorted(indexed) == [(i, *example) for i, example in enumerate(read(local))]


def folder_bytes(folder):
  """Bytes of the files in folder; one the reader removes meanwhile counts as gone (it ran on the
  download thread while the reader released a shard: a FileNotFoundError there failed this test in CI)."""
  sizes = []
  for name in os.listdir(folder):
    try:
      sizes.append(os.path.getsize(os.path.join(folder, name)))
    except FileNotFoundError:
      pass
  return sum(sizes)


def test_an_unexpected_error_on_the_download_thread_reaches_the_reader(tmp_path, gcs_bucket, monkeypatch):
  """The thread died silently before: the reader waited a storage timeout and said only that the
  download "stopped without a result"."""
  _, remote, _ = shards(tmp_path, gcs_bucket, num_shards=2)
  monkeypatch.setattr(transfer, "_downloaded", lambda folder: 1 / 0)
  with pytest.raises(Exception, match="ZeroDivisionError"):
    in_order(image_tfrecords.read(remote)[0])


def test_streaming_keeps_at_most_a_few_shards_on_disk_and_removes_each_once_read(tmp_path, gcs_bucket, monkeypatch):
  local, remote, metadata = shards(tmp_path, gcs_bucket, num_shards=6)
  largest = max(os.path.getsize(os.path.join(local, name)) for name in metadata["shards"])
  on_disk = []  # bytes of the stream's scratch folder after each download: the moments it is fullest
  monkeypatch.setattr(transfer, "_downloaded", lambda folder: on_disk.append(folder_bytes(folder)))
  before = set(scratch_files())
  assert in_order(image_tfrecords.read(remote)[0]) == in_order(image_tfrecords.read(local)[0])
  assert len(on_disk) == 6 and max(on_disk) <= transfer.STREAM_ON_DISK * largest, on_disk
  assert set(scratch_files()) == before  # nothing left once read


def test_the_download_thread_waits_for_the_reader_to_finish_a_file(tmp_path, gcs_bucket, monkeypatch):
  _, remote, metadata = shards(tmp_path, gcs_bucket, num_shards=5)
  full = threading.Event()
  monkeypatch.setattr(transfer, "_waiting_for_room", lambda folder: full.set())
  paths = [storage.join(remote, name) for name in metadata["shards"]]
  stream = transfer.streamed(paths, on_disk=2)
  first = next(stream)
  assert full.wait(timeout=60), "the downloads never filled their room"
  folder = os.path.dirname(first)
  assert sorted(os.listdir(folder)) == ["000000-" + metadata["shards"][0], "000001-" + metadata["shards"][1]]
  second = next(stream)  # the reader is done with the first: its copy goes, the third may come
  assert not os.path.exists(first) and second.endswith(metadata["shards"][1])
  assert [os.path.basename(p)[7:] for p in [first, second, *stream]] == metadata["shards"]
  assert not os.path.exists(folder)


def test_a_shard_that_cannot_be_downloaded_is_a_storage_error_naming_it(tmp_path, gcs_bucket):
  _, remote, metadata = shards(tmp_path, gcs_bucket)
  dataset, _ = image_tfrecords.read(remote)  # listed: all four are there
  gone = storage.join(remote, metadata["shards"][2])
  storage.remove(gone)
  with pytest.raises(tf.errors.OpError) as raised:
    in_order(dataset)
  failure = transfer.stream_failure(raised.value)
  assert isinstance(failure, StorageError) and str(failure).startswith(f"{gone} vanished while it was read")
  assert transfer.stream_failure(tf.errors.UnknownError(None, None, "something else")) is None


@pytest.mark.slow  # trains a CNN for a step
def test_a_job_whose_shard_download_fails_exits_170_in_one_line(tmp_path, gcs_bucket):
  _, remote, metadata = shards(tmp_path, gcs_bucket, num_shards=2)
  # The fault, injected at a named point of the child: the second shard's download fails.
  driver = tmp_path / "driver.py"
  driver.write_text(
      "import runpy, sys\n"
      "from trainer import storage, transfer\n"
      "download = transfer._download\n"
      "def failing(path, target):\n"
      f"  if path.endswith({metadata['shards'][1]!r}):\n"
      "    raise storage.StorageError(f'cannot read {path}: Connection reset by peer')\n"
      "  download(path, target)\n"
      "transfer._download = failing\n"
      "runpy.run_module('trainer.task', run_name='__main__', alter_sys=True)\n")
  done = forked.run([sys.executable, str(driver), "--model=cnn", f"--data={remote}", "--image_size=22",
                     "--epochs=1", "--batch_size=8", f"--job_dir={tmp_path / 'job'}"],
                    cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert done.returncode == 170, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  (line,) = [line for line in done.stderr.splitlines() if line.startswith("trainer: error:")]
  assert line == f"trainer: error: cannot read {storage.join(remote, metadata['shards'][1])}: Connection reset by peer"


def test_make_tfrecords_writes_shards_of_a_target_size_and_says_how_many(tmp_path, monkeypatch, capsys):
  src = str(tmp_path / "src")
  for c in range(2):
    for i in range(20):
      write_image(os.path.join(src, f"c{c}", f"{i}.png"), rgb(16, 16, seed=100 * c + i))
  total = sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(src) for f in files)
  target_mb = total / 5 / 2**20  # about five shards' worth
  out = str(tmp_path / "out")
  monkeypatch.setattr("sys.argv", ["make_tfrecords.py", src, out, f"--shard_mb={target_mb}"])
  runpy.run_path(SCRIPT, run_name="__main__")
  printed = capsys.readouterr().out
  names = sorted(n for n in os.listdir(out) if n.endswith(".tfrecord"))
  sizes = [os.path.getsize(os.path.join(out, n)) for n in names]
  assert len(names) == 5, names
  mb = lambda size: f"{size / 2**20:.2f} MiB"
  assert f"40 images in 2 classes -> 5 shards of {mb(min(sizes))} to {mb(max(sizes))} ({mb(sum(sizes))}) in {out}" \
      in printed, printed
  assert all(abs(size - total / 5) < 0.2 * total / 5 for size in sizes), sizes
  monkeypatch.setattr("sys.argv", ["make_tfrecords.py", src, str(tmp_path / "out2"), "--shard_mb=0"])
  with pytest.raises(SystemExit) as exit_:
    runpy.run_path(SCRIPT, run_name="__main__")
  assert str(exit_.value.code) == ("make_tfrecords: error: --shard_mb=0.0 must be more than 0; "
                                   "give a size in MiB, e.g. 100")


def no_file_downloads(monkeypatch):
  """Fails a test that downloads any gs:// object to a local file (a whole folder's copy, a shard)."""
  def refused(blob, *args, **kwargs):
    raise AssertionError(f"downloaded {blob.name} to a file")
  monkeypatch.setattr(gcs.Blob, "download_to_filename", refused)


def test_a_folder_on_gcs_over_the_disk_budget_is_checked_and_read_file_by_file(messy_folder, gcs_bucket, monkeypatch,
                                                                                 caplog):
  root, _, broken = messy_folder
  remote = storage.join(gcs_bucket, "images", "messy")
  transfer.publish_dir(root, remote)
  local = image_folder.scan(root)
  size = sum(storage.list_sizes(remote).values())
  no_file_downloads(monkeypatch)
  with caplog.at_level(logging.INFO, logger="absl"):
    streamed = image_folder.scan(remote, flag="--test_data", disk_budget=size - 1)
  assert f"--test_data={remote}: {size:,} bytes of files, more than the {size - 1:,} bytes of scratch disk" \
         " it may take: read file by file while training" in caplog.text
  assert (streamed.class_names, streamed.labels, streamed.counts) == (local.class_names, local.labels, local.counts)
  assert streamed.paths == [remote + p[len(root):] for p in local.paths]
  assert [(s["path"], s["reason"]) for s in streamed.skipped_files] == \
         [(remote + s["path"][len(root):], s["reason"]) for s in local.skipped_files]
  pixels = lambda scan: in_order(image_folder.dataset(scan.paths, scan.labels))
  assert pixels(streamed) == pixels(local)
  monkeypatch.undo()
  assert image_folder.scan(remote, disk_budget=size).paths[0].startswith(transfer.scratch_folder())


def test_a_file_of_a_streamed_folder_that_cannot_be_read_is_a_storage_error(messy_folder, gcs_bucket):
  root, good, _ = messy_folder
  remote = storage.join(gcs_bucket, "images", "messy")
  transfer.publish_dir(root, remote)
  scan = image_folder.scan(remote, disk_budget=1)
  storage.remove(scan.paths[3])
  with pytest.raises(tf.errors.OpError) as raised:
    in_order(image_folder.dataset(scan.paths, scan.labels))
  failure = transfer.stream_failure(raised.value)
  assert isinstance(failure, StorageError) and str(failure).startswith(f"{scan.paths[3]} vanished while it was read")


@pytest.mark.slow  # trains a CNN for an epoch: the whole path, from the flag to the report
def test_a_job_on_a_gcs_folder_over_its_disk_budget_trains_without_downloading_it(tmp_path, gcs_bucket):
  # Noise PNGs do not compress: 12 of 250x250 px are over the 1 MiB budget.
  rng = np.random.default_rng(0)
  for c in ("a", "b", "c"):
    for i in range(4):
      write_image(str(tmp_path / "src" / c / f"{i}.png"), rng.integers(0, 256, (250, 250, 3), dtype=np.uint8))
  remote = storage.join(gcs_bucket, "noise")
  transfer.publish_dir(str(tmp_path / "src"), remote)
  assert sum(storage.list_sizes(remote).values()) > 2**20
  driver = tmp_path / "driver.py"  # a named point of the child: any download to a file fails the job
  driver.write_text(
      "import runpy\n"
      "from google.cloud import storage\n"
      "def refused(blob, *args, **kwargs):\n"
      "  raise AssertionError(f'downloaded {blob.name} to a file')\n"
      "storage.Blob.download_to_filename = refused\n"
      "runpy.run_module('trainer.task', run_name='__main__', alter_sys=True)\n")
  done = forked.run([sys.executable, str(driver), "--model=cnn", f"--data={remote}", "--image_size=22",
                     "--disk_budget_mb=1", "--epochs=1", "--batch_size=4", f"--job_dir={tmp_path / 'job'}"],
                    cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "read file by file while training" in done.stderr
  report = json.loads((tmp_path / "job" / "report.json").read_text())
  assert sum(report["data"]["counts"]["train"]) + sum(report["data"]["counts"]["validation"]) \
      + report["data"]["test_images"] == 12


def test_shards_written_from_a_streamed_gcs_folder_are_those_of_the_local_folder(messy_folder, gcs_bucket,
                                                                                  tmp_path, monkeypatch):
  root = messy_folder[0]
  remote = storage.join(gcs_bucket, "images", "messy")
  transfer.publish_dir(root, remote)
  no_file_downloads(monkeypatch)
  written = image_tfrecords.write_shards(image_folder.scan(remote, disk_budget=1), str(tmp_path / "remote"), 2)
  expected = image_tfrecords.write_shards(image_folder.scan(root), str(tmp_path / "local"), 2)
  assert written["shard_bytes"] == expected["shard_bytes"]
  assert in_order(image_tfrecords.read(str(tmp_path / "remote"))[0]) == in_order(
      image_tfrecords.read(str(tmp_path / "local"))[0])


def test_a_stream_left_half_way_leaves_nothing_on_disk(tmp_path, gcs_bucket):
  _, remote, metadata = shards(tmp_path, gcs_bucket, num_shards=4)
  before = set(scratch_files())
  paths = [storage.join(remote, name) for name in metadata["shards"]]
  # The records themselves: no parallel map reads ahead, so the reader is exactly in the second shard.
  iterator = iter(image_tfrecords._records(paths, [0] * 4))  # noqa: SLF001
  for _ in range(metadata["shard_sizes"][0] + 1):
    next(iterator)
  assert any(f.endswith(metadata["shards"][1]) for f in set(scratch_files()) - before)
  del iterator  # tf.data closes the generator, which stops its downloads and removes their folder
  assert set(scratch_files()) == before
