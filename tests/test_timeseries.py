import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from trainer.config import Config, UserError
from trainer.data import timeseries
from trainer.models import MODELS


def reference_windows(series, first, last, window):
  """The tutorial's loop: brute force, one window at a time; the label is column 0's next value."""
  return (np.array([series[t - window:t] for t in range(first, last)]),
          np.array([series[t, 0] for t in range(first, last)]))


def collect(dataset):
  """The dataset's elements (windows, targets and, for validation, the scale to prices) as arrays."""
  return [np.concatenate(part) for part in zip(*[[t.numpy() for t in element] for element in dataset])]


@pytest.mark.parametrize("length, window, batch", [
    (61, 60, 32), (100, 60, 7), (50, 1, 8), (30, 5, 100),
    (5000, 60, 100),  # several gather chunks, batches straddling their edges
])
def test_windows_equal_brute_force(length, window, batch):
  series = np.random.default_rng(0).standard_normal((length, 2)).astype(np.float32)
  x, y = collect(timeseries.window_dataset(series, window, length, window, batch))
  ref_x, ref_y = reference_windows(series, window, length, window)
  assert x.shape == (length - window, window, 2)
  np.testing.assert_array_equal(x, ref_x)
  np.testing.assert_array_equal(y, ref_y)


def test_exactly_window_plus_one_points_give_one_window():
  series = np.arange(11, dtype=np.float32)[:, None]
  x, y = collect(timeseries.window_dataset(series, 10, 11, 10, 4))
  np.testing.assert_array_equal(x, np.arange(10, dtype=np.float32).reshape(1, 10, 1))
  np.testing.assert_array_equal(y, [10.0])


def test_shuffled_windows_are_the_same_windows_reordered():
  series = np.arange(3000, dtype=np.float32)[:, None]
  dataset = timeseries.window_dataset(series, 20, 3000, 20, 16, shuffle_seed=(3, 0))
  assert [len(y) for _, y in dataset] == [16] * 186 + [4]  # 2,980 windows
  x, y = collect(dataset)
  assert not np.array_equal(y, np.arange(20, 3000))  # shuffled...
  np.testing.assert_array_equal(np.sort(y), np.arange(20, 3000))  # ...but every window once
  np.testing.assert_array_equal(x[:, -1, 0], y - 1)  # and each input still ends just before its target


def test_order_is_fixed_by_seed_and_epoch():
  series = np.arange(500, dtype=np.float32)[:, None]
  order = lambda seed: collect(timeseries.window_dataset(series, 5, 500, 5, 32, shuffle_seed=seed))[1]
  np.testing.assert_array_equal(order((1, 0)), order((1, 0)))
  assert not np.array_equal(order((1, 0)), order((1, 1)))


def test_input_pipelines_read_disjoint_shares():
  series = np.arange(100, dtype=np.float32)[:, None]
  shares = [collect(timeseries.window_dataset(
      series, 10, 100, 10, 8,
      input_context=tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=i)))[1]
      for i in range(2)]
  assert not set(shares[0]) & set(shares[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(10, 100))


def test_relative_changes():
  np.testing.assert_allclose(timeseries.relative_changes(np.array([[100.0], [110.0], [99.0]])), [[0.1], [-0.1]])


def config_for(path, **overrides):
  return Config(**{"model": "gru", "data": path, "target_column": "Close", "date_column": "Date",
                   "test_start": "2016-01-01", "window": 5, **overrides})


def test_split_is_chronological_and_test_starts_at_test_start(prices_csv):
  prepared = timeseries.prepare(config_for(prices_csv(rows=400)))
  split = prepared.summary["split"]
  assert split["test"]["first"] == "2016-01-01"
  assert split["train"]["last"] < split["validation"]["first"] <= split["validation"]["last"] < split["test"]["first"]
  frame = pd.read_csv(prices_csv(rows=400))
  assert split["test"]["rows"] == (frame.Date >= "2016-01-01").sum() == len(prepared.test_targets)
  # Windows: every training row after the first window + 1 is a target once, in train or validation.
  assert split["train"]["rows"] + split["validation"]["rows"] == (frame.Date < "2016-01-01").sum() - 6


def test_nothing_from_the_test_period_leaks_into_training(prices_csv, tmp_path):
  path = prices_csv(rows=400)
  frame = pd.read_csv(path)
  changed = frame.assign(Close=np.where(frame.Date >= "2016-01-01", frame.Close * 10, frame.Close))
  changed_path = tmp_path / "changed.csv"
  changed.to_csv(changed_path, index=False)
  a, b = timeseries.prepare(config_for(path)), timeseries.prepare(config_for(str(changed_path)))
  assert a.preprocessing == b.preprocessing
  for split in ("train", "validation"):
    # Unshuffled, the same windows in the same order.
    first_a = collect(a.make_dataset(split, 1000).take(1))
    first_b = collect(b.make_dataset(split, 1000).take(1))
    for got, expected in zip(first_a, first_b, strict=True):
      np.testing.assert_array_equal(got, expected)
  assert not np.array_equal(a.test_targets, b.test_targets)


def test_validation_does_not_touch_the_statistics(prices_csv, tmp_path):
  """The statistics come from the training windows only, not from validation rows."""
  path = prices_csv(rows=400)
  a = timeseries.prepare(config_for(path))
  b = timeseries.prepare(config_for(path, validation_split=0.5))
  assert a.preprocessing["change_std"] != b.preprocessing["change_std"]


def test_forecast_needs_only_model_and_preprocessing(prices_csv):
  prepared = timeseries.prepare(config_for(prices_csv(rows=400)))
  model = MODELS["gru"](prepared.input_shape)
  pre = prepared.preprocessing
  values = pd.read_csv(prices_csv(rows=400))[["Close"]].to_numpy()
  # By hand, the forecast after the last row: standardised changes of the last window.
  changes = (values[-6:][1:] / values[-6:][:-1] - 1 - pre["change_mean"]) / pre["change_std"]
  out = model(changes[None].astype(np.float32)).numpy()[0, 0]
  expected = values[-1, 0] * (1 + pre["change_mean"][0] + pre["change_std"][0] * out)
  forecasts = timeseries.forecast(model, pre, values)
  assert len(forecasts) == len(values) - 5
  assert forecasts[-1] == pytest.approx(expected, rel=1e-5)


def test_persistence_baseline_is_yesterdays_value(prices_csv):
  prepared = timeseries.prepare(config_for(prices_csv(rows=400)))
  np.testing.assert_array_equal(prepared.baseline_predictions[1:], prepared.test_targets[:-1])


def test_test_days_hold_out_the_newest_days(prices_csv):
  path = prices_csv(rows=400)  # business days from 2015-01-01 to 2016-07-13
  prepared = timeseries.prepare(config_for(path, test_start=None, test_days=30))
  test = prepared.summary["split"]["test"]
  # 30 calendar days back from the last date, both ends included: 2016-06-14 on.
  assert (test["first"], test["last"], test["rows"]) == ("2016-06-14", "2016-07-13", 22)
  assert len(prepared.test_targets) == 22


def test_another_exports_preprocessing_is_fed_its_own_window(prices_csv):
  path = prices_csv(rows=400)
  mine, theirs = (timeseries.prepare(config_for(path, window=window)) for window in (5, 9))
  model = MODELS["gru"]((9, 1))
  # Scoring a model of window 9 on the window-5 split: its windows, its statistics, the same test rows.
  np.testing.assert_allclose(mine.predict(model, theirs.preprocessing), theirs.predict(model), rtol=1e-6)
  with pytest.raises(UserError, match="no column 'Volume', which the model needs"):
    mine.predict(model, {**theirs.preprocessing, "columns": ["Close", "Volume"]})


@pytest.mark.parametrize("overrides, message", [
    ({"window": 300}, "too short for --window=300"),
    ({"test_start": None, "test_days": 1000}, "--eval_days=1000 covers all of"),
    ({"test_start": "2030-01-01"}, "--test_start=2030-01-01 is outside the data"),
    ({"test_start": "2000-01-01"}, "--test_start=2000-01-01 is outside the data"),
])
def test_bad_series_input(prices_csv, overrides, message):
  with pytest.raises(UserError, match=message):
    timeseries.prepare(config_for(prices_csv(rows=400), **overrides))


def test_non_positive_prices_are_refused(prices_csv, tmp_path):
  frame = pd.read_csv(prices_csv())
  frame.loc[3, "Close"] = 0
  frame.to_csv(tmp_path / "zero.csv", index=False)
  with pytest.raises(UserError, match="'Close' .* has values <= 0"):
    timeseries.prepare(config_for(str(tmp_path / "zero.csv")))


def test_builtin_series_needs_no_file():
  prepared = timeseries.prepare(Config(model="lstm", window=60))
  assert prepared.input_shape == (60, 1)
  assert prepared.summary["rows"] == 3000 and prepared.summary["split"]["test"]["rows"] == 600
