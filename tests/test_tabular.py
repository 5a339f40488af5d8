import numpy as np
import pandas as pd
import pytest

from trainer.config import Config, UserError
from trainer.data import builtin, tabular
from trainer.models import MODELS


def test_builtin_table_follows_the_tutorials_law():
  frame = builtin.regression_table()
  assert frame.shape == (10_000, 6)
  # Two of the five features carry nothing: their correlation with y is noise.
  corr = frame.corr()["y"].abs()
  assert (corr[["x3", "x4"]] < 0.05).all() and (corr[["x0", "x1", "x2"]] > 0.1).all()
  assert frame.y.mean() == pytest.approx(100, abs=5)


def test_split_sizes_and_statistics_from_training_rows_only(tmp_path):
  frame = builtin.regression_table(rows=1000)
  path = tmp_path / "t.csv"
  frame.to_csv(path, index=False)
  prepared = tabular.prepare(Config(model="dense", data=str(path), target_column="y"))
  split = prepared.summary["split"]
  assert (split["train"]["rows"], split["validation"]["rows"], split["test"]["rows"]) == (640, 160, 200)
  test_rows = prepared.test_index
  pre = prepared.preprocessing
  # The statistics are not those of all rows, nor of all non-test rows: the 640 training rows only.
  features = frame[pre["features"]].to_numpy()
  assert not np.allclose(pre["feature_mean"], features.mean(axis=0))
  assert not np.allclose(pre["feature_mean"], np.delete(features, test_rows, axis=0).mean(axis=0))
  # Which rows those are, read back from what training is fed (standardised, float32) and found in
  # the file; then the statistics are exactly theirs (numpy's population std, ddof=0).
  train_rows, val_rows = (rows_fed(prepared, split, frame, pre) for split in ("train", "validation"))
  assert (len(train_rows), len(val_rows)) == (640, 160)
  assert not (set(train_rows) | set(val_rows)) & set(test_rows)
  train = frame.iloc[sorted(train_rows)]
  np.testing.assert_allclose(pre["feature_mean"], train[pre["features"]].mean(axis=0).to_numpy(), rtol=1e-12)
  np.testing.assert_allclose(pre["feature_std"], train[pre["features"]].std(axis=0, ddof=0).to_numpy(), rtol=1e-12)
  assert pre["target_mean"] == pytest.approx(train.y.mean(), rel=1e-12)
  assert pre["target_std"] == pytest.approx(train.y.std(ddof=0), rel=1e-12)
  np.testing.assert_allclose(prepared.baseline_predictions, train.y.mean(), rtol=1e-12)
  np.testing.assert_array_equal(prepared.test_targets, frame.y.to_numpy()[test_rows])
  assert prepared.baseline_name == "training mean"


def rows_fed(prepared, split, frame, pre):
  """The indices of frame's rows that prepared's `split` dataset holds (each matched exactly once)."""
  fed = np.concatenate([x for x, _ in prepared.make_dataset(split, 1024).as_numpy_iterator()])
  standardised = ((frame[pre["features"]].to_numpy() - pre["feature_mean"]) / pre["feature_std"]).astype(np.float32)
  index = {row.tobytes(): i for i, row in enumerate(standardised)}
  rows = [index[row.tobytes()] for row in fed]
  assert len(set(rows)) == len(rows)
  return rows


def test_predict_table_undoes_the_standardisation():
  pre = {"feature_mean": [1.0, 2.0], "feature_std": [2.0, 4.0], "target_mean": 100.0, "target_std": 10.0}
  model = MODELS["dense"]((2,))
  x = np.array([[3.0, 6.0], [1.0, 2.0]])
  expected = 100 + 10 * model(((x - [1, 2]) / [2, 4]).astype(np.float32)).numpy()[:, 0]
  np.testing.assert_allclose(tabular.predict_table(model, pre, x), expected, rtol=1e-5)


def test_too_few_rows(tmp_path):
  pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [1.0, 2.0, 3.0]}).to_csv(tmp_path / "t.csv", index=False)
  with pytest.raises(UserError, match="too few to split"):
    tabular.prepare(Config(model="dense", data=str(tmp_path / "t.csv"), target_column="y"))


def test_no_feature_besides_the_target(tmp_path):
  pd.DataFrame({"name": ["a"] * 20, "y": np.arange(20.0)}).to_csv(tmp_path / "t.csv", index=False)
  with pytest.raises(UserError, match="no numeric column besides 'y'"):
    tabular.prepare(Config(model="dense", data=str(tmp_path / "t.csv"), target_column="y"))


def test_a_separate_test_table_is_the_test_set(table_csv):
  prepared = tabular.prepare(Config(model="dense", data=table_csv(rows=500), target_column="y",
                                    test_data=table_csv(rows=80, name="holdout.csv")))
  split = prepared.summary["split"]
  # All of --data is for training (80% / 20% validation); the test rows are --test_data's, in order.
  assert (split["train"]["rows"], split["validation"]["rows"], split["test"]["rows"]) == (400, 100, 80)
  np.testing.assert_array_equal(prepared.test_targets, pd.read_csv(table_csv(rows=80, name="h.csv")).y.to_numpy())
  model = MODELS["dense"]((4,))
  own = prepared.predict(model)
  # Another export's statistics and feature order: the same raw rows, its own normalisation.
  other = {**prepared.preprocessing, "features": ["d", "c", "b", "a"],
           "feature_mean": prepared.preprocessing["feature_mean"][::-1],
           "feature_std": prepared.preprocessing["feature_std"][::-1]}
  reordered = prepared.predict(lambda x, training: model(x[:, ::-1], training=training), other)
  np.testing.assert_allclose(reordered, own, rtol=1e-5)


def test_a_test_table_without_the_columns_is_refused(table_csv, tmp_path):
  pd.read_csv(table_csv(rows=50)).drop(columns="c").to_csv(tmp_path / "holdout.csv", index=False)
  with pytest.raises(UserError, match="--feature_columns='c' is not a column of .*holdout.csv"):
    tabular.prepare(Config(model="dense", data=table_csv(rows=200), target_column="y",
                           test_data=str(tmp_path / "holdout.csv")))
