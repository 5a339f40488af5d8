"""Built-in generated data, so the first command works on a fresh machine with no download."""

import numpy as np
import pandas as pd

TABLE_TARGET = "y"
SERIES_TARGET = "Close"
SERIES_DATE = "Date"


def regression_table(rows=10_000, features=5, informative=3, noise=12.3, bias=100.0, seed=0):
  """The tutorial's synthetic regression (as sklearn's make_regression draws it): y is linear in
  `informative` of the standard-normal features, plus `bias`, plus Gaussian noise; the other
  features are distractors. The best possible MAE is noise * sqrt(2 / pi) (9.81 for 12.3)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((rows, features))
  coef = np.zeros(features)
  coef[:informative] = 100 * rng.uniform(size=informative)
  y = x @ coef + bias + noise * rng.standard_normal(rows)
  frame = pd.DataFrame(x, columns=[f"x{i}" for i in range(features)])
  frame[TABLE_TARGET] = y
  return frame


def price_series(days=3_000, start_price=100.0, drift=0.0004, volatility=0.018, seed=0):
  """A price-like series: a geometric random walk over business days from 2006, with volatility
  that drifts between calm and turbulent spells as real prices do."""
  rng = np.random.default_rng(seed)
  regime = np.exp(np.convolve(rng.standard_normal(days), np.ones(60) / np.sqrt(60), mode="same") * 0.3)
  returns = drift + volatility * regime * rng.standard_normal(days)
  close = start_price * np.exp(np.cumsum(returns))
  dates = pd.bdate_range("2006-01-02", periods=days)
  return pd.DataFrame({SERIES_DATE: dates, SERIES_TARGET: close.round(2)})


SHAPE_CLASSES = ("circle", "square", "horizontal_stripes", "vertical_stripes")


def shape_images(per_class=150, size=150, seed=0):
  """A small image set of visually distinct classes: (uint8 images [N, size, size, 3], int32
  labels, class names). Shapes and stripes of random colour, position and scale on a noisy
  background, so the task is easy but not trivial and survives the tutorial's augmentation
  (rotation up to 40 degrees keeps horizontal stripes apart from vertical ones)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  images, labels = [], []
  for label, name in enumerate(SHAPE_CLASSES):
    for _ in range(per_class):
      background, colour = rng.uniform(0, 0.5, 3), rng.uniform(0.5, 1, 3)
      cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
      period = rng.uniform(0.08, 0.2)
      mask = {"circle": (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2,
              "square": (abs(xx - cx) < r) & (abs(yy - cy) < r),
              "horizontal_stripes": (yy / period) % 1 < 0.5,
              "vertical_stripes": (xx / period) % 1 < 0.5}[name]
      image = np.where(mask[..., None], colour, background) + rng.normal(0, 0.05, (size, size, 3))
      images.append((np.clip(image, 0, 1) * 255).astype(np.uint8))
      labels.append(label)
  return np.stack(images), np.array(labels, np.int32), list(SHAPE_CLASSES)
