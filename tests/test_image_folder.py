"""Class folders: a messy folder scans with exactly its broken files left out, decode works eagerly
and inside tf.data, every user mistake stops with one line, and splits keep class proportions."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf
from image_files import rgb, write_image
from trainer import storage, transfer
from trainer.errors import UserError
from trainer.data import image_folder


def test_messy_folder_skips_exactly_the_broken_files(messy_folder, caplog):
  root, good, broken = messy_folder
  with caplog.at_level(logging.WARNING):
    scan = image_folder.scan(root)
  assert scan.class_names == ["cats", "dogs"]
  assert sorted(scan.paths) == sorted(good)
  assert {s["path"] for s in scan.skipped_files} == broken
  assert all(s["reason"] and "\n" not in s["reason"] and "function_node" not in s["reason"]
             for s in scan.skipped_files)
  for path in broken:
    assert sum(path in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 1
  assert scan.labels == [0 if "/cats/" in p else 1 for p in scan.paths]
  assert scan.counts == {"cats": 5, "dogs": 3}
  assert (scan.directory, scan.flag) == (root, "--data")


def test_every_good_image_decodes_to_rgb_uint8(messy_folder):
  root, good, _ = messy_folder
  scan = image_folder.scan(root)
  images = list(image_folder.dataset(scan.paths, scan.labels).as_numpy_iterator())
  assert [int(label) for _, label in images] == scan.labels
  for path, (image, label) in zip(scan.paths, images):
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
    assert label.dtype == np.int32
    expected, exact = good[path]
    assert image.shape == expected.shape, path
    if exact:
      np.testing.assert_array_equal(image, expected, err_msg=path)
    else:
      assert np.abs(image.astype(int) - expected).mean() < 8, path


def test_decode_eagerly_and_inside_tf_data_agree(messy_folder):
  root, good, _ = messy_folder
  paths = sorted(good)
  contents = [open(p, "rb").read() for p in paths]
  eager = [image_folder.decode(tf.constant(c)) for c in contents]
  assert all(image.shape.as_list()[-1] == 3 and image.dtype == tf.uint8 for image in eager)
  mapped = tf.data.Dataset.from_tensor_slices(contents).map(image_folder.decode)
  assert mapped.element_spec == tf.TensorSpec([None, None, 3], tf.uint8)
  for a, b in zip(eager, mapped.as_numpy_iterator()):
    np.testing.assert_array_equal(a.numpy(), b)


def test_dataset_shards_by_file_across_input_pipelines(messy_folder):
  scan = image_folder.scan(messy_folder[0])
  shares = []
  for worker in range(3):
    context = tf.distribute.InputContext(num_input_pipelines=3, input_pipeline_id=worker, num_replicas_in_sync=3)
    shares.append([image.tobytes() for image, _ in image_folder.dataset(scan.paths, scan.labels, context)
                   .as_numpy_iterator()])
  everything = [image.tobytes() for image, _ in image_folder.dataset(scan.paths, scan.labels).as_numpy_iterator()]
  assert sorted(sum(shares, [])) == sorted(everything)
  assert [len(s) for s in shares] == [3, 3, 2]


def one_line_error(directory, match, flag="--data"):
  with pytest.raises(UserError, match=match) as error:
    image_folder.scan(directory, flag=flag)
  assert "\n" not in str(error.value) and f"{flag}={directory}" in str(error.value)
  return str(error.value)


def test_missing_folder_and_file_instead_of_folder(tmp_path):
  one_line_error(str(tmp_path / "nowhere"), "no such folder")
  write_image(str(tmp_path / "one.png"), rgb(8, 8, seed=0))
  one_line_error(str(tmp_path / "one.png"), "not a folder", flag="--test_data")


def test_no_class_folders_and_a_single_class(tmp_path):
  write_image(str(tmp_path / "loose" / "a.png"), rgb(8, 8, seed=0))
  one_line_error(str(tmp_path / "loose"), "no class subfolders")
  write_image(str(tmp_path / "single" / "cats" / "a.png"), rgb(8, 8, seed=0))
  one_line_error(str(tmp_path / "single"), "one class folder \\('cats'\\).*at least two classes")


def test_no_readable_image_at_all(tmp_path):
  for name in ("cats", "dogs"):
    os.makedirs(tmp_path / name)
    (tmp_path / name / "readme.txt").write_text("nothing here")
  one_line_error(str(tmp_path), "no readable image in any class folder \\(2 unreadable files skipped\\)")


def test_an_empty_class_folder_is_named(tmp_path):
  write_image(str(tmp_path / "cats" / "a.png"), rgb(8, 8, seed=0))
  os.makedirs(tmp_path / "dogs")
  (tmp_path / "birds").mkdir()
  (tmp_path / "birds" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
  one_line_error(str(tmp_path), "class folders 'birds', 'dogs' have no readable images \\(1 unreadable file skipped")
  write_image(str(tmp_path / "dogs" / "a.png"), rgb(8, 8, seed=1))
  one_line_error(str(tmp_path), "class folder 'birds' has no readable images")


def test_test_folder_must_have_the_training_classes(tmp_path):
  for folder, classes in (("train", ("cats", "dogs", "fish")), ("test", ("cats", "dogs", "owls"))):
    for name in classes:
      write_image(str(tmp_path / folder / name / "a.png"), rgb(8, 8, seed=0))
  train = image_folder.scan(str(tmp_path / "train"))
  test = image_folder.scan(str(tmp_path / "test"), flag="--test_data")
  image_folder.check_same_classes(train, image_folder.scan(str(tmp_path / "train"), flag="--test_data"))
  with pytest.raises(UserError, match="only in --data: fish; only in --test_data: owls") as error:
    image_folder.check_same_classes(train, test)
  message = str(error.value)
  assert "\n" not in message
  assert f"--test_data={tmp_path / 'test'}" in message and f"--data={tmp_path / 'train'}" in message


def test_stratified_split_keeps_class_proportions():
  labels = np.array([0] * 50 + [1] * 30 + [2] * 3 + [3] * 2 + [4] * 1)
  np.random.default_rng(0).shuffle(labels)
  kept, held_out = image_folder.stratified_split(labels, 0.2, seed=7)
  assert kept.dtype == held_out.dtype == np.int64
  assert len(np.intersect1d(kept, held_out)) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([kept, held_out])), np.arange(len(labels)))
  # round(0.2 * n) per class; a class of 2 or 3 still gives one; a class of one is kept.
  assert np.bincount(labels[held_out], minlength=5).tolist() == [10, 6, 1, 1, 0]
  again = image_folder.stratified_split(labels, 0.2, seed=7)
  np.testing.assert_array_equal(again[1], held_out)
  other = image_folder.stratified_split(labels, 0.2, seed=8)
  assert not np.array_equal(other[1], held_out)
  # Every class with two or more examples keeps at least one for training.
  _, most = image_folder.stratified_split(labels, 0.9, seed=7)
  assert np.bincount(labels[most], minlength=5).tolist() == [45, 27, 2, 1, 0]


def test_a_folder_on_gcs_scans_and_reads_like_the_local_copy(messy_folder, gcs_bucket):
  root, _, broken = messy_folder
  remote = storage.join(gcs_bucket, "images", "messy")
  transfer.publish_dir(root, remote)
  local, copy = image_folder.scan(root), image_folder.scan(remote, flag="--test_data")
  assert (copy.class_names, copy.labels, copy.counts) == (local.class_names, local.labels, local.counts)
  assert (copy.directory, copy.flag) == (remote, "--test_data")
  assert {s["path"] for s in copy.skipped_files} == {remote + p[len(root):] for p in broken}
  assert all(os.path.exists(p) for p in copy.paths)  # decoded from a local copy
  pixels = lambda scan: [(i.tobytes(), i.shape, int(l)) for i, l in
                         image_folder.dataset(scan.paths, scan.labels).as_numpy_iterator()]
  assert pixels(copy) == pixels(local)


def test_a_missing_folder_or_a_file_on_gcs_is_one_line(gcs_bucket):
  one_line_error(storage.join(gcs_bucket, "nowhere"), "no such folder")
  storage.write_bytes(storage.join(gcs_bucket, "one.png"), b"a file, not a folder")
  one_line_error(storage.join(gcs_bucket, "one.png"), "not a folder", flag="--test_data")


def test_skipped_files_say_why_in_one_clean_line_and_nothing_else_reaches_stderr(messy_folder, capfd, caplog):
  """The reason is TensorFlow's message without its op suffix, and the decoders' own complaints
  (libjpeg's "Improper call to JPEG library", a bare "Input file read error") stay off stderr:
  what the user reads is one warning per skipped file."""
  root, _, broken = messy_folder
  capfd.readouterr()
  with caplog.at_level(logging.WARNING):
    scan = image_folder.scan(root)
  _, err = capfd.readouterr()  # at the file descriptor: what C++ code and decoders print too
  reasons = {s["path"]: s["reason"] for s in scan.skipped_files}
  assert reasons == {os.path.join(root, "cats/text.jpg"): "Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, "
                                                           "BMP, WebP required.",
                     os.path.join(root, "dogs/notes.txt"): "Unknown image file format. One of JPEG, JPEG XL, PNG, GIF, "
                                                            "BMP, WebP required.",
                     os.path.join(root, "cats/truncated.jpg"): reasons[os.path.join(root, "cats/truncated.jpg")]}
  assert all("[Op:" not in r and not r.endswith("name:") for r in reasons.values()), reasons
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert sorted(warnings) == sorted(f"{path}: skipped, not a readable image ({reasons[path]})" for path in broken)
  assert err == "", err  # the warnings above go through logging (captured by caplog here), nothing else
