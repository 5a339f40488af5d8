"""TFRecord shards: folder -> shards -> the same pixels and labels as the files, sharding by file
and by data gives disjoint shares of everything, and the writer script reports what it left out."""

import json
import os
import runpy
import shutil

import pytest
import tensorflow as tf

from image_files import rgb, write_image
from trainer import storage, transfer
from trainer.errors import UserError
from trainer.data import image_folder, image_tfrecords

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "scripts", "make_tfrecords.py")


def examples(dataset):
  """[(shape, pixel bytes, label)], sorted: a comparable multiset of what a dataset yields."""
  return sorted((image.shape, image.tobytes(), int(label)) for image, label in dataset.as_numpy_iterator())


def class_folder(root, per_class=(7, 6, 5)):
  """Distinct random PNGs of a few sizes, per_class[i] of them in class folder c<i>."""
  for c, n in enumerate(per_class):
    for i in range(n):
      write_image(os.path.join(root, f"c{c}", f"{i}.png"), rgb(8 + i % 3, 10 + c, seed=100 * c + i))
  return image_folder.scan(root)


@pytest.mark.parametrize("num_shards", [1, 3])
def test_round_trip_gives_the_decoded_files(messy_folder, tmp_path, num_shards):  # noqa: F811
  scan = image_folder.scan(messy_folder[0])
  out = str(tmp_path / "shards")
  written = image_tfrecords.write_shards(scan, out, num_shards)
  dataset, metadata = image_tfrecords.read(out)
  assert dataset.element_spec == (tf.TensorSpec([None, None, 3], tf.uint8), tf.TensorSpec([], tf.int32))
  assert examples(dataset) == examples(image_folder.dataset(scan.paths, scan.labels))
  names = [f"images-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]
  assert sorted(os.listdir(out)) == sorted(names + ["metadata.json"])
  with open(os.path.join(out, "metadata.json")) as f:
    on_disk = json.load(f)
  assert on_disk == written and {k: metadata[k] for k in on_disk} == on_disk
  assert on_disk["class_names"] == ["cats", "dogs"] and on_disk["counts"] == {"cats": 5, "dogs": 3}
  assert on_disk["num_examples"] == 8 and on_disk["shards"] == names
  assert sum(on_disk["shard_sizes"]) == 8 and max(on_disk["shard_sizes"]) - min(on_disk["shard_sizes"]) <= 1
  assert len(on_disk["skipped_files"]) == 3
  assert metadata["files"] == [os.path.join(out, n) for n in names]


def test_a_glob_reads_a_subset_of_the_shards(tmp_path):
  scan = class_folder(str(tmp_path / "src"))
  out = str(tmp_path / "shards")
  metadata = image_tfrecords.write_shards(scan, out, 4)
  dataset, read_metadata = image_tfrecords.read(os.path.join(out, "images-0000[13]-*.tfrecord"))
  assert len(read_metadata["files"]) == 2
  assert len(examples(dataset)) == metadata["shard_sizes"][1] + metadata["shard_sizes"][3]


def shares(location, num_pipelines):
  contexts = [tf.distribute.InputContext(num_pipelines, worker, num_pipelines) for worker in range(num_pipelines)]
  return [examples(image_tfrecords.read(location, context)[0]) for context in contexts]


@pytest.mark.parametrize("num_shards, num_pipelines, by_file", [(4, 2, True), (2, 3, False), (1, 2, False)])
def test_input_pipelines_get_disjoint_shares_of_everything(tmp_path, num_shards, num_pipelines, by_file):
  scan = class_folder(str(tmp_path / "src"))
  out = str(tmp_path / "shards")
  metadata = image_tfrecords.write_shards(scan, out, num_shards)
  everything = examples(image_tfrecords.read(out)[0])
  parts = shares(out, num_pipelines)
  assert sorted(sum(parts, [])) == everything  # nothing lost, nothing twice
  sizes = [len(p) for p in parts]
  if by_file:  # worker w reads files w, w + n, ...: exactly those files' examples
    per_file = [examples(image_tfrecords.read(os.path.join(out, name))[0]) for name in metadata["shards"]]
    assert parts == [sorted(sum(per_file[w::num_pipelines], [])) for w in range(num_pipelines)]
  else:  # every n-th record: shares differ by at most one
    assert max(sizes) - min(sizes) <= 1


def test_read_errors_name_the_location_and_say_what_to_do(tmp_path):
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  with pytest.raises(UserError, match="no TFRecord files match.*make_tfrecords.py"):
    image_tfrecords.read(empty)
  with pytest.raises(UserError, match="--test_data=.*no TFRecord files match"):
    image_tfrecords.read(os.path.join(empty, "images-*.tfrecord"), flag="--test_data")
  scan = class_folder(str(tmp_path / "src"))
  out = str(tmp_path / "shards")
  image_tfrecords.write_shards(scan, out, 2)
  shutil.copy(os.path.join(out, "images-00000-of-00002.tfrecord"), os.path.join(out, "images-00000-of-00003.tfrecord"))
  with pytest.raises(UserError, match="images-00000-of-00003.tfrecord is not one of the shards listed in"):
    image_tfrecords.read(out)
  os.remove(os.path.join(out, "metadata.json"))
  with pytest.raises(UserError, match="metadata.json is missing.*make_tfrecords.py") as error:
    image_tfrecords.read(out)
  assert "\n" not in str(error.value) and f"--data={out}" in str(error.value)


def test_write_refuses_old_shards_and_too_many_shards(tmp_path):
  scan = class_folder(str(tmp_path / "src"), per_class=(2, 2))
  out = str(tmp_path / "shards")
  with pytest.raises(UserError, match="--shards=5 is more than the 4 readable images"):
    image_tfrecords.write_shards(scan, out, 5)
  image_tfrecords.write_shards(scan, out, 2)
  # Shards of an earlier write beside new ones would be read as one data set.
  with pytest.raises(UserError, match="already holds shards"):
    image_tfrecords.write_shards(scan, out, 1)


def run_script(monkeypatch, *args):
  monkeypatch.setattr("sys.argv", ["make_tfrecords.py", *args])
  runpy.run_path(SCRIPT, run_name="__main__")


def test_script_writes_shards_and_reports_skipped_files(messy_folder, tmp_path, monkeypatch, capsys):  # noqa: F811
  root, _, broken = messy_folder
  out = str(tmp_path / "out")
  run_script(monkeypatch, root, out, "--shards=2")
  printed = capsys.readouterr().out
  assert "8 images in 2 classes -> 2 shards" in printed and "skipped 3 unreadable files" in printed
  assert all(path in printed for path in broken)
  assert len(examples(image_tfrecords.read(out)[0])) == 8
  with pytest.raises(SystemExit) as exit_:
    run_script(monkeypatch, str(tmp_path / "nowhere"), str(tmp_path / "out2"))
  message = str(exit_.value.code)
  assert message.startswith("make_tfrecords: error: SRC_DIR=") and "no such folder" in message
  assert "\n" not in message


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_shards_on_gcs_read_like_the_local_copy(tmp_path, gcs_bucket):
  scan = class_folder(str(tmp_path / "src"))
  out = str(tmp_path / "shards")
  metadata = image_tfrecords.write_shards(scan, out, 4)
  remote = storage.join(gcs_bucket, "shards")
  transfer.publish_dir(out, remote, last=(image_tfrecords.METADATA,))
  dataset, read_metadata = image_tfrecords.read(remote)
  assert examples(dataset) == examples(image_tfrecords.read(out)[0])
  assert read_metadata["files"] == [storage.join(remote, name) for name in metadata["shards"]]
  subset = "images-0000[13]-*.tfrecord"
  assert (examples(image_tfrecords.read(storage.join(remote, subset))[0])
          == examples(image_tfrecords.read(os.path.join(out, subset))[0]))
  assert shares(remote, 2) == shares(out, 2) and shares(remote, 5) == shares(out, 5)


def test_missing_shards_on_gcs_are_one_line(tmp_path, gcs_bucket):
  with pytest.raises(UserError, match="--test_data=gs://.*/nothing: no TFRecord files match"):
    image_tfrecords.read(storage.join(gcs_bucket, "nothing"), flag="--test_data")
  out = str(tmp_path / "shards")
  image_tfrecords.write_shards(class_folder(str(tmp_path / "src")), out, 2)
  os.remove(os.path.join(out, "metadata.json"))
  remote = storage.join(gcs_bucket, "unfinished")
  transfer.publish_dir(out, remote)
  with pytest.raises(UserError, match="metadata.json is missing") as error:
    image_tfrecords.read(remote)
  assert "\n" not in str(error.value) and str(error.value).startswith(f"--data={remote}: {remote}/metadata.json")
