"""TFDS by name, offline: mocked mnist and cifar10 come out as RGB uint8 with int32 labels, a
data set that is not prepared stops at once with one line instead of trying to download, and a
download that cannot reach the network ends in one line and the retryable exit code, after a
bounded number of requests, each with a timeout."""

import collections
import os
import socket
import sys

import forked
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader

from trainer.errors import UserError
from trainer.data import image_tfds
from trainer.storage import StorageError


@pytest.fixture
def no_downloads(monkeypatch):
  """Offline, a download retries for minutes: make any attempt fail at once instead."""
  def refuse(*args, **kwargs):
    raise RuntimeError("a download was attempted")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def mock_metadata(data_dir, name, splits, class_names=None):
  """Writes the metadata a prepared copy would have, so mock_data knows the splits and class names.

  (Without it, tfds.testing.mock_data knows no splits and a load of every split returns none;
  and cifar10's class names are only known once its files are downloaded.)
  """
  builder = tfds.builder(name, data_dir=data_dir)
  if class_names:
    builder.info.features["label"].names = class_names
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0, filename_template=None)
      for split, n in splits.items()]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)


@pytest.mark.parametrize("name, shape, class_names", [("mnist", (28, 28), [str(i) for i in range(10)]),
                                                     ("cifar10", (32, 32), CIFAR10_CLASSES)])
def test_mocked_data_sets_become_rgb_uint8_with_int32_labels(tmp_path, no_downloads, name, shape, class_names):
  mock_metadata(str(tmp_path), name, {"train": 6, "test": 4}, class_names if name == "cifar10" else None)
  with tfds.testing.mock_data(num_examples=6, data_dir=str(tmp_path)):
    splits, loaded_names = image_tfds.load(name, data_dir=str(tmp_path))
    assert sorted(splits) == ["test", "train"]
    assert loaded_names == class_names
    for dataset in splits.values():
      assert dataset.element_spec == (tf.TensorSpec(shape + (3,), tf.uint8), tf.TensorSpec([], tf.int32))
      pairs = list(dataset.as_numpy_iterator())
      assert len(pairs) == 6
      for image, label in pairs:
        assert image.shape == shape + (3,) and 0 <= label < 10
        if name == "mnist":  # gray copied to R, G and B
          np.testing.assert_array_equal(image[..., 0], image[..., 1])
          np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_mock_data_without_metadata_gives_train_and_test(no_downloads):
  with tfds.testing.mock_data(num_examples=3):
    splits, class_names = image_tfds.load("mnist")
    assert sorted(splits) == ["test", "train"] and class_names == [str(i) for i in range(10)]
    images = [image for image, _ in splits["train"].as_numpy_iterator()]
    assert len(images) == 3 and all(image.shape == (28, 28, 3) for image in images)


def test_not_prepared_stops_at_once_without_downloading(tmp_path, no_downloads):
  # A download attempt raises RuntimeError (no_downloads), not this UserError.
  with pytest.raises(UserError) as error:
    image_tfds.load("mnist", data_dir=str(tmp_path))
  message = str(error.value)
  assert message == (f"--data=tfds:mnist: not prepared in --tfds_data_dir={tmp_path}; pass --tfds_download to "
                     "download it (needs internet) or point --tfds_data_dir at a prepared copy")


def test_unknown_name_is_named(tmp_path, no_downloads):
  with pytest.raises(UserError, match="no data set called 'no_such_images'") as error:
    image_tfds.load("no_such_images", data_dir=str(tmp_path))
  assert "\n" not in str(error.value)


def test_a_version_tfds_cannot_load_is_one_line(tmp_path, no_downloads):
  with pytest.raises(UserError, match="--data=tfds:mnist:9.9.9: .*9.9.9") as error:
    image_tfds.load("mnist:9.9.9", data_dir=str(tmp_path))
  assert "\n" not in str(error.value)


def closed_port():
  """A port on 127.0.0.1 nothing listens on: a connection to it is refused at once, locally."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def offline(environ):
  """environ with every proxy variable requests reads pointing at a closed local port: a download
  fails for real, as offline, and nothing leaves this machine."""
  proxy = f"http://127.0.0.1:{closed_port()}"
  return {**environ, "NO_PROXY": "", "no_proxy": "",
          **{name: proxy for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                                      "all_proxy")}}


def test_a_failed_download_is_a_storage_error_after_a_few_timed_requests(tmp_path, monkeypatch):
  """Unbounded, TFDS tries each file 11 times over 3.5 minutes, each request without a timeout (a
  silent server hangs it forever): each request's retries and timeout are read here instead of timed."""
  for name, value in offline({}).items():
    monkeypatch.setenv(name, value)
  requests, open_with_requests = collections.Counter(), downloader._open_with_requests  # noqa: SLF001

  def counted(url, **kwargs):
    requests[downloader.MAX_RETRIES, kwargs.get("timeout")] += 1  # urllib3's Retry(total=MAX_RETRIES) per request
    return open_with_requests(url, **kwargs)
  monkeypatch.setattr(downloader, "_open_with_requests", counted)
  retries = downloader.MAX_RETRIES
  with pytest.raises(StorageError, match=r"^--data=tfds:mnist: cannot download it \(Connection refused\)"):
    image_tfds.load("mnist", data_dir=str(tmp_path), download=True)
  assert set(requests) == {(image_tfds.DOWNLOAD_RETRIES, image_tfds.DOWNLOAD_TIMEOUT)}, requests
  assert downloader.MAX_RETRIES == retries  # bounded for this download only
  assert downloader._open_with_requests is counted  # noqa: SLF001


@pytest.mark.slow
def test_a_download_without_network_is_one_line_and_exit_170(tmp_path):
  # Unbounded, TFDS retries for 3.5 minutes (the timeout fails the test), then exits 1 with a chained
  # traceback. How few requests it makes is counted in the test above.
  env = offline(os.environ)
  data_dir = tmp_path / "tfds"
  flags = ["--model=cnn", "--data=tfds:mnist", "--tfds_download", f"--tfds_data_dir={data_dir}", "--image_size=28",
           "--epochs=1", f"--job_dir={tmp_path / 'job'}"]
  done = forked.run([sys.executable, "-m", "trainer.task", *flags], cwd=tmp_path, env=env, capture_output=True,
                    text=True, timeout=180)
  assert done.returncode == 170, done.stderr[-3000:]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  (line,) = [line for line in done.stderr.splitlines() if line.startswith("trainer: error:")]
  assert line.startswith("trainer: error: --data=tfds:mnist: cannot download it"), line
  assert "--tfds_data_dir" in line and "Connection refused" in line, line
