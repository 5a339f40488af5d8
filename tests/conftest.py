"""Shared fixtures: every test starts from the same seeds, and CSV files are made on the spot."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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
