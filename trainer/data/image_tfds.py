"""Image classification data sets from TensorFlow Datasets by name (`--data=tfds:NAME`).

Ends where the other image sources end: (uint8 image [H, W, 3], int32 label) pairs and the
class names. Nothing is downloaded unless --tfds_download is given, so a missing data set stops
the job at once with one line. A download that cannot reach the network stops within a minute
with one line and exit code 170 (storage.StorageError), which a cluster retries: TFDS itself
retries each request 10 times over 3.5 minutes, waits on a silent server forever, then ends in
a long chained traceback.
"""

import contextlib

import numpy as np
import requests
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import downloader

from trainer.errors import UserError
from trainer import storage
from trainer.storage import StorageError

USUAL_SPLITS = ("train", "test")
# Per request: retries after the first try (TFDS's backoff: 0, 0.4 s) and (connect, read) seconds.
# At most 3 x 10 s to find the network unreachable; a stalled read fails after 30 s without a byte.
DOWNLOAD_RETRIES = 2
DOWNLOAD_TIMEOUT = (10, 30)


def load(name, data_dir=None, download=False):
  """({split name: dataset of (uint8 image, int32 label)}, class names) for TFDS data set NAME.

  NAME may carry a config and version as TFDS spells them ("cifar10:3.0.2"). Every split the
  prepared data set has is returned; single-channel images (mnist) become RGB.
  """
  source = f"--data=tfds:{name}"
  try:
    with _bounded_requests() if download else contextlib.nullcontext():
      splits, info = tfds.load(name, data_dir=data_dir, download=download, as_supervised=True, with_info=True)
  except (requests.RequestException, tfds.download.DownloadError) as e:
    # Files already downloaded stay in <data_dir>/downloads: a retry of the job goes on from them.
    raise StorageError(f"{source}: cannot download it ({storage.root_cause(e)}); retry, or prepare it on a machine "
                       "with internet and point --tfds_data_dir at a copy of its TFDS data folder") from None
  except tfds.core.DatasetNotFoundError:
    raise UserError(f"{source}: TFDS has no data set called {name!r}; "
                    "see https://www.tensorflow.org/datasets/catalog for the names") from None
  except AssertionError as e:
    # TFDS reports a data set that is not in data_dir (and a version it cannot load) as assertions.
    if "could not find data" not in str(e):
      raise UserError(f"{source}: {str(e).strip().splitlines()[0]}") from None
    raise UserError(f"{source}: not prepared in --tfds_data_dir={data_dir or tfds.core.constants.DATA_DIR}; "
                    "pass --tfds_download to download it (needs internet) or point --tfds_data_dir "
                    "at a prepared copy") from None
  image_key, label_key = _image_and_label(info, source)
  channels = info.features[image_key].shape[-1]
  if channels not in (1, 3):
    raise UserError(f"{source}: images have {channels} channels; only grayscale and RGB data sets are supported")
  if not splits:
    # A prepared copy always lists its splits. Only tfds.testing.mock_data without metadata files
    # lists none (and serves any split name asked for): ask for the usual two.
    splits = dict(zip(USUAL_SPLITS, tfds.load(name, data_dir=data_dir, download=False, split=list(USUAL_SPLITS),
                                              as_supervised=True)))

  def to_rgb(image, label):
    image = tf.image.grayscale_to_rgb(image) if channels == 1 else image
    image.set_shape([None, None, 3])
    return image, tf.cast(label, tf.int32)

  datasets = {split: ds.map(to_rgb, num_parallel_calls=tf.data.AUTOTUNE) for split, ds in splits.items()}
  return datasets, list(info.features[label_key].names)


def _image_and_label(info, source):
  """The supervised keys, checked to be one image and one class label."""
  keys = info.supervised_keys
  if not keys or len(keys) != 2 or not all(isinstance(k, str) for k in keys):
    raise UserError(f"{source} has no (image, label) pairs; choose an image classification data set")
  image_key, label_key = keys
  image, label = info.features[image_key], info.features[label_key]
  if not (isinstance(image, tfds.features.Image) and image.np_dtype == np.uint8
          and isinstance(label, tfds.features.ClassLabel)):
    raise UserError(f"{source}: its pairs are ({image_key}, {label_key}), not an image and a class label; "
                    "choose an image classification data set")
  return image_key, label_key


@contextlib.contextmanager
def _bounded_requests():
  """TFDS's downloads with a few retries and a timeout, instead of 10 retries and none.

  Both are set where TFDS reads them at each request: its module constant MAX_RETRIES and the
  keyword arguments its _open_with_requests passes to requests' Session.get. Restored after."""
  retries, open_with_requests = downloader.MAX_RETRIES, downloader._open_with_requests  # noqa: SLF001

  def with_timeout(url, **kwargs):
    return open_with_requests(url, **{"timeout": DOWNLOAD_TIMEOUT, **kwargs})

  downloader.MAX_RETRIES, downloader._open_with_requests = DOWNLOAD_RETRIES, with_timeout  # noqa: SLF001
  try:
    yield
  finally:
    downloader.MAX_RETRIES, downloader._open_with_requests = retries, open_with_requests  # noqa: SLF001

