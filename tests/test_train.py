"""One short real training run per model, on small generated data, into a temporary job folder."""

import json
import os
import sys

import keras
import numpy as np
import pandas as pd
import pytest
from processes import run_cluster

from trainer import report, train
from trainer.config import Config
from trainer.data import builtin, tabular, timeseries

pytestmark = pytest.mark.slow  # trainer processes or whole trainings: not in the fast tier

REPORT_KEYS = {"model", "config", "data", "epochs_run", "best_epoch", "test", "baseline", "history", "weights",
               "parameters", "plots", "wall_time_s", "throughput", "wall_time"}


# The LSTM (the README's job); the GRU trains end to end in test_resume.py and test_retraining.py.
@pytest.mark.parametrize("model", ["lstm"])
def test_forecaster_trains_and_reports(model, prices_csv, tmp_path):
  config = Config(model=model, data=prices_csv(rows=300), target_column="Close", date_column="Date",
                  test_start="2015-11-02", window=10, epochs=2, batch_size=64)
  result = train.train_and_evaluate(config, str(tmp_path / "job"))
  assert REPORT_KEYS <= set(result)
  assert json.loads((tmp_path / "job" / "report.json").read_text()) == json.loads(json.dumps(result))
  assert result["data"]["split"]["test"]["first"] == "2015-11-02"
  assert result["baseline"]["name"].startswith("persistence")
  assert set(result["test"]) == {"rmse", "mae", "r2"}
  assert len(result["history"]["loss"]) == result["epochs_run"] == 2
  assert sorted(result["plots"]) == ["forecast.png", "history.png"]
  for plot in result["plots"]:
    assert (tmp_path / "job" / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
  assert list((tmp_path / "job" / "logs" / "train").glob("events.out.tfevents.*"))


def test_saved_forecaster_reproduces_the_report_without_the_trainer(prices_csv, tmp_path):
  path = prices_csv(rows=300)
  config = Config(model="gru", data=path, target_column="Close", date_column="Date", test_start="2015-11-02",
                  window=10, epochs=1)
  result = train.train_and_evaluate(config, str(tmp_path / "job"))
  model = keras.models.load_model(tmp_path / "job" / "export" / "1" / "model.keras")
  preprocessing = json.loads((tmp_path / "job" / "export" / "1" / "trainer_export.json").read_text())["preprocessing"]
  frame = pd.read_csv(path)
  test_rows = (frame.Date >= "2015-11-02").to_numpy()
  first = int(np.argmax(test_rows))
  history = frame.Close.to_numpy()[first - 1 - preprocessing["window"]:, None]
  predictions = timeseries.forecast(model, preprocessing, history)[:-1]
  assert report.metrics(frame.Close[test_rows], predictions) == pytest.approx(result["test"], rel=1e-6)


def test_dense_trains_reports_and_its_saved_model_reproduces_the_report(tmp_path):
  builtin.regression_table(rows=600).to_csv(tmp_path / "t.csv", index=False)
  config = Config(model="dense", data=str(tmp_path / "t.csv"), target_column="y", epochs=3)
  result = train.train_and_evaluate(config, str(tmp_path / "job"))
  assert REPORT_KEYS <= set(result)
  assert result["weights"] == [[5, 16], [16], [16, 1], [1]] and result["parameters"] == 113
  assert result["baseline"]["name"] == "training mean"
  # As a retraining history says it: a plain job starts from random weights, and says why.
  assert result["warm_start"] == {"used": False, "reason": "not a retrain"}
  assert sorted(result["plots"]) == ["error_histogram.png", "history.png", "predicted_vs_true.png"]
  model = keras.models.load_model(tmp_path / "job" / "export" / "1" / "model.keras")
  preprocessing = json.loads((tmp_path / "job" / "export" / "1" / "trainer_export.json").read_text())["preprocessing"]
  frame = pd.read_csv(tmp_path / "t.csv")
  rows = np.random.default_rng(config.seed).permutation(600)[-120:]  # the test split: the last 20%
  predictions = tabular.predict_table(model, preprocessing, frame.loc[rows, preprocessing["features"]])
  assert report.metrics(frame.y[rows], predictions) == pytest.approx(result["test"], rel=1e-6)


def test_dense_reaches_the_noise_floor_on_the_tutorials_law(tmp_path):
  # Another draw of the law than the built-in one, read from CSV as a user's table would be.
  builtin.regression_table(seed=7).to_csv(tmp_path / "law.csv", index=False)
  result = train.train_and_evaluate(Config(model="dense", data=str(tmp_path / "law.csv"), target_column="y"),
                                    str(tmp_path / "job"))
  noise_floor_mae = 12.3 * np.sqrt(2 / np.pi)  # 9.81: the MAE of the noise itself
  assert result["test"]["mae"] <= 1.05 * noise_floor_mae


# Run by scripts/local_cluster.py: for each argument, this worker holds the number at its index in it.
SAME_VALUE_TASK = '''
import os, sys
from trainer import cluster as cluster_lib, distribution, start
cluster = cluster_lib.resolve(os.environ, None, None)
strategy = distribution.make_strategy("auto", cluster, 0)
for values in sys.argv[1:]:
  value = float(values.split(",")[cluster.task_index])
  print(values, "same" if start.same_on_every_worker(strategy, cluster, value) else "different")
'''


def test_workers_that_hold_different_numbers_are_told_apart(tmp_path):
  """What stops workers that restored different checkpoints, or warm-started from different
  versions: 1, 2 and 3 have the mean 2 of the worker in the middle, their squares do not. Both
  cases in one cluster of three processes (a cluster's start-up is most of the cost)."""
  (tmp_path / "same_value_task.py").write_text(SAME_VALUE_TASK)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
  workers = run_cluster([sys.executable, "-m", "same_value_task", "7,7,7", "1,2,3"], 3, env=env)
  assert [w.returncode for w in workers] == [0, 0, 0], "\n".join(w.stderr[-2000:] for w in workers)
  answers = [line for w in workers for line in w.stdout.splitlines()]
  assert sorted(answers) == ["1,2,3 different"] * 3 + ["7,7,7 same"] * 3
