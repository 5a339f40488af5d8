"""Shared fixtures: every test starts from the same seeds; CSV files and image folders are made
on the spot; gs:// is a Cloud Storage emulator on 127.0.0.1, started once per session."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One thread per op in this process and every trainer it starts (they inherit the variable): the suite
# runs two workers on two cores, so each TensorFlow's default of a thread per core only adds threads
# that wait for each other's core (measured: 14% less CPU for test_train and test_export).
# TensorFlow reads it when its runtime starts (tensorflow/core/common_runtime/process_util.cc).
os.environ.setdefault("TF_NUM_INTRAOP_THREADS", "1")

import tensorflow as tf  # noqa: E402

# Two logical CPUs for the whole session, so MirroredStrategy has two replicas without GPUs; it
# can only be set before TensorFlow initialises its devices (after, set_logical_device_configuration
# raises RuntimeError), so here, once.
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import processes  # noqa: E402
import pytest  # noqa: E402
from image_files import expected_rgb, rgb, write_image  # noqa: E402
from precondition_proxy import PreconditionProxy  # noqa: E402

# The emulator launcher is shared with scripts/benchmark_checkpoints.py.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
from gcs_emulator import GcsEmulator  # noqa: E402
from trainer import storage  # noqa: E402


DURATIONS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "durations.json")


def pytest_collection_modifyitems(items):
  """The longest tests first: with -n 2, pytest-xdist hands out tests in this order, so the run does
  not end on one core with a long test that started last. Shared trained jobs are session-scoped, so
  the new order costs no second training. durations.json holds each test's setup + call seconds from
  one run with --durations=0; a test not in it counts as 10 s if marked slow, else as quick."""
  with open(DURATIONS) as f:
    seconds = json.load(f)
  items.sort(key=lambda item: -seconds.get(item.nodeid, 10 if item.get_closest_marker("slow") else 0))


@pytest.fixture(autouse=True)
def seeded():
  keras.utils.set_random_seed(1234)


@pytest.fixture(autouse=True)
def no_process_left():
  """A test that fails half way leaves no trainer process behind (stalled ones sleep for minutes)."""
  yield
  processes.Job.stop_all()


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
def table_csv(tmp_path):
  """Writes a table (a, b, c, d, y) and returns its path: y depends on three columns, one of them
  non-linearly, so a model beats the mean by far, and more epochs on more rows beat fewer. The
  first rows are the same whatever rows= is: a smaller table is a larger one's beginning."""
  def write(rows=1000, name="table.csv"):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.standard_normal((10_000, 4)), columns=["a", "b", "c", "d"])
    frame["y"] = 50 + 8 * frame.a - 5 * frame.b + 4 * frame.c ** 2 + rng.standard_normal(10_000)
    path = tmp_path / name
    frame.head(rows).to_csv(path, index=False)
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


@pytest.fixture
def messy_folder(tmp_path):
  """Two classes of odd-sized images in every format, plus broken and foreign files.

  Returns (folder, good: {path: (expected RGB pixels, exact?)}, broken: set of paths).
  """
  root = str(tmp_path / "messy")
  good, broken = {}, set()
  lossless = {
      "cats/gray.png": np.random.default_rng(1).integers(0, 256, (9, 11, 1), dtype=np.uint8),
      "cats/alpha.png": np.random.default_rng(2).integers(0, 256, (20, 8, 4), dtype=np.uint8),
      "cats/plain.bmp": rgb(10, 13, seed=3),
      "cats/few.gif": rgb(12, 9, seed=4, colours=6),
      "dogs/wide.png": rgb(8, 19, seed=5),
      "dogs/nested/deep.png": rgb(15, 15, seed=6),
  }
  for name, pixels in lossless.items():
    write_image(os.path.join(root, name), pixels)
    good[os.path.join(root, name)] = (expected_rgb(pixels), True)
  # Gradient JPEGs: lossy, but they come back within a few levels (random pixels would be ~85 off).
  for name, shape in {"cats/photo.jpg": (13, 17), "dogs/small.jpg": (8, 8)}.items():
    pixels = np.broadcast_to(np.linspace(0, 200, shape[1], dtype=np.uint8)[None, :, None], shape + (3,)).copy()
    write_image(os.path.join(root, name), pixels)
    good[os.path.join(root, name)] = (pixels, False)
  truncated = write_image(os.path.join(root, "cats/truncated.jpg"), rgb(16, 16, seed=9))
  with open(os.path.join(root, "cats/truncated.jpg"), "wb") as f:
    f.write(truncated[:len(truncated) // 2])
  for name, text in {"cats/text.jpg": "not a picture", "dogs/notes.txt": "labelled by hand"}.items():
    with open(os.path.join(root, name), "w") as f:
      f.write(text)
  broken |= {os.path.join(root, n) for n in ("cats/truncated.jpg", "cats/text.jpg", "dogs/notes.txt")}
  with open(os.path.join(root, "cats", ".DS_Store"), "w") as f:  # hidden: not data, not a warning
    f.write("\0\0")
  os.makedirs(os.path.join(root, ".ipynb_checkpoints"))  # hidden: not a class
  return root, good, broken


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
  """A Cloud Storage emulator on 127.0.0.1 for the session; STORAGE_EMULATOR_HOST points every
  client (and every subprocess a test starts) at it. TRAINER_STORAGE_TIMEOUT=60: an emulator on a
  loaded machine once took over 5 s to answer, and the test failed for it; a hung one still fails
  the test in a minute. Tests of a stopped emulator set a short one themselves (outage_timeout)."""
  folder = tmp_path_factory.mktemp("gcs")
  emulator = GcsEmulator(folder / "data", folder / "emulator.log")
  emulator.start()
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    patch.setenv("TRAINER_STORAGE_TIMEOUT", "60")
    try:
      yield emulator
    finally:
      emulator.stop()


@pytest.fixture
def outage_timeout(monkeypatch):
  """TRAINER_STORAGE_TIMEOUT for a test that stops the emulator: each operation then fails (after
  its retries) within this many seconds, here and in the processes the test starts."""
  monkeypatch.setenv("TRAINER_STORAGE_TIMEOUT", "5")
  return 5.0


@pytest.fixture
def gcs_bucket(gcs_emulator):
  """A fresh, empty gs:// bucket in the emulator."""
  return gcs_emulator.new_bucket()


@pytest.fixture(params=["local", "gcs"])
def storage_root(request, tmp_path):
  """A folder that does not exist yet, under tmp_path or in a fresh emulator bucket: a test that
  takes it runs on both."""
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs_bucket") + "/root"


@pytest.fixture(scope="session")
def proxy(gcs_emulator):
  return PreconditionProxy(gcs_emulator.host)


@pytest.fixture
def root(storage_root, request, monkeypatch):
  """storage_root, with gs:// reached through the precondition proxy (here and in subprocesses)."""
  if storage.is_remote(storage_root):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", request.getfixturevalue("proxy").host)
  return storage_root
