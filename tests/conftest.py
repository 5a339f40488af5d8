"""Shared fixtures: every test starts from the same seeds, and CSV files are made on the spot."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

# Two logical CPUs for the whole session, so MirroredStrategy has two replicas without GPUs; it
# can only be set before TensorFlow initialises its devices, so here, once (GUIDE section 4).
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
  keras.utils.set_random_seed(1234)


@pytest.fixture
def prices_csv(tmp_path):
  """Writes a daily price CSV (Date, Close, Volume, Name) and returns its path; rows= sets the length."""
  def write(rows=400, name="prices.csv", seed=0, start="2015-01-01"):
    rng = np.random.default_rng(seed)
    close = 50 * np.exp(np.cumsum(0.0005 + 0.015 * rng.standard_normal(rows)))
    frame = pd.DataFrame({"Date": pd.bdate_range(start, periods=rows).strftime("%Y-%m-%d"),
                          "Close": close.round(3), "Volume": rng.integers(1_000, 5_000, rows), "Name": "TEST"})
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)
  return write


@pytest.fixture
def make_image_folder(tmp_path):
  """Writes a class-per-folder image set of small solid-ish PNG/JPEG images and returns its path.
  classes: {name: count}; each class has its own colour so a CNN can tell them apart."""
  import tensorflow as tf

  def write(classes=None, name="images", size=20, seed=0):
    classes = classes or {"red": 12, "green": 12, "blue": 12}
    rng = np.random.default_rng(seed)
    root = tmp_path / name
    for k, (label, count) in enumerate(classes.items()):
      (root / label).mkdir(parents=True)
      for i in range(count):
        pixels = rng.integers(0, 60, (size + i % 3, size, 3))
        pixels[..., k % 3] += 180
        image = tf.constant(pixels.astype(np.uint8))
        if i % 2:
          (root / label / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
        else:
          (root / label / f"{i}.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
    return str(root)
  return write
