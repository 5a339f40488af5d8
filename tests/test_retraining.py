"""Retraining in-process, with real training, exports and serving folders (local and gs://): the
decision rule, a first run promoting version 1 and a better run on more data version 2, and
production scored with its own saved preprocessing on the candidate's hold-out."""

import dataclasses
import json
import math
import sys

import forked
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from trainer import export, promotion, retrain_history, retraining, storage, train, transfer
from trainer.config import Config
from trainer.data import timeseries
from trainer.retraining import PROMOTED, REJECTED, decide

pytestmark = pytest.mark.slow  # trainer processes or whole trainings: not in the fast tier

RMSE = ("rmse", True)
ACCURACY = ("accuracy", False)


@pytest.mark.parametrize("metric, candidate, production, baseline, min_improvement, decision", [
    (RMSE, 9.0, None, 10.0, 0.01, PROMOTED),  # no production yet: the baseline is the bar
    (RMSE, 10.0, None, 10.0, 0.01, REJECTED),  # a tie with the baseline is no skill
    (RMSE, 9.0, 10.0, 8.0, 0.01, REJECTED),  # beats production, not the baseline
    (RMSE, 9.0, 10.0, 12.0, 0.01, PROMOTED),  # 10% better
    (RMSE, 9.95, 10.0, 12.0, 0.01, REJECTED),  # 0.5% better: not the 1% asked for
    (RMSE, 10.0, 10.0, 12.0, 0.0, REJECTED),  # the same model again: never churn versions
    (RMSE, float("nan"), 10.0, 12.0, 0.01, REJECTED),
    (RMSE, 9.0, float("nan"), 12.0, 0.01, PROMOTED),  # production answers NaN: anything sound beats it
    (ACCURACY, 0.95, 0.90, 0.5, 0.01, PROMOTED),  # higher is better
    (ACCURACY, 0.90, 0.95, 0.5, 0.01, REJECTED),
    (ACCURACY, 0.40, None, 0.5, 0.01, REJECTED),
])
def test_decide(metric, candidate, production, baseline, min_improvement, decision):
  name, lower_is_better = metric
  got, reason, improvement = decide(name, lower_is_better, {name: candidate},
                                    None if production is None else {name: production}, {name: baseline},
                                    min_improvement)
  assert got == decision, reason
  assert name in reason
  # Relative to production whenever there is one to compare with, for the history.
  assert (improvement is None) == (production is None or not math.isfinite(candidate))


def test_first_run_promotes_version_1_and_a_better_run_on_more_data_version_2(root, table_csv, tmp_path):
  serving_dir = storage.join(root, "serving")
  data = table_csv(rows=2000)
  first_rows = table_csv(rows=800, name="first.csv")  # the same rows' beginning: a table that grew
  options = retraining.Options(serving_dir=serving_dir)

  first = retraining.retrain(Config(model="dense", data=first_rows, target_column="y", epochs=1),
                             str(tmp_path / "night1"), options)
  assert (first["decision"], first["version"], first["production"]) == (PROMOTED, 1, None)
  assert first["warm_start"] == {"used": False, "reason": "no production model yet"}
  assert first["reason"].startswith("no production model yet")
  assert first["data"]["rows"] == 800

  assert first["improvement_interval"] is None  # nothing to compare with

  config = Config(model="dense", data=data, target_column="y", epochs=20)
  second = retraining.retrain(config, str(tmp_path / "night2"), dataclasses.replace(options, min_confidence=0.95))
  assert second["decision"] == PROMOTED, second["reason"]
  assert (second["version"], second["production_version"]) == (2, 1)
  assert second["warm_start"] == {"used": True, "from": storage.join(serving_dir, "1"), "version": 1}
  assert second["improvement"] >= options.min_improvement
  # Better beyond the hold-out's luck, as --min_confidence asked: the interval is of this improvement.
  low, high = second["improvement_interval"]
  assert options.min_improvement < low < second["improvement"] < high
  assert "better at 95% confidence by a paired bootstrap of the hold-out's rows" in second["reason"]
  assert second["warnings"] == []  # version 1 trained on first.csv, not on this table
  assert promotion.complete_versions(serving_dir) == [1, 2]  # version 1 kept
  assert promotion.production(serving_dir) == storage.join(serving_dir, "2")

  # Same footing: the candidate scored through its SavedModel is what training reported, and
  # version 1 is scored on night 2's hold-out, not on its own.
  report = json.loads(storage.read_text(storage.join(second["job_dir"], "report.json")))
  assert second["candidate"]["rmse"] == pytest.approx(report["test"]["rmse"], rel=1e-5)
  prepared = train.DATA["dense"].prepare(config)
  version_1 = storage.join(serving_dir, "1")
  metadata = export.read_metadata(version_1)
  expected = np.sqrt(np.mean((prepared.predict(export.load(version_1, metadata), metadata["preprocessing"])
                              - prepared.test_targets) ** 2))
  assert second["production"]["rmse"] == pytest.approx(expected, rel=1e-6)
  assert second["production"]["rmse"] != pytest.approx(first["candidate"]["rmse"], rel=1e-3)

  history = retrain_history.read(serving_dir)
  assert [(e["decision"], e["version"]) for e in history] == [(PROMOTED, 1), (PROMOTED, 2)]
  assert storage.read_bytes(storage.join(serving_dir, retrain_history.PLOT))[:4] == b"\x89PNG"

  # What a server does with the folder: TF Serving's loader, and trainer.predict from the export alone.
  loaded = tf.saved_model.load(transfer.local_path(storage.join(serving_dir, "2")))
  features = pd.read_csv(data)[["a", "b", "c", "d"]].head(5).to_numpy(np.float32)
  prediction = forked.run([sys.executable, "-m", "trainer.predict", f"--model_dir={serving_dir}",
                           f"--data={data}"], capture_output=True, text=True, timeout=120)
  assert prediction.returncode == 0, prediction.stderr
  assert f"export: {storage.join(serving_dir, '2')} (model dense, version 2" in prediction.stdout
  outputs = loaded.signatures["serving_default"](features=tf.constant(features))
  assert list(outputs.values())[0].shape == (5, 1)


@pytest.mark.parametrize("warm_start, reason", [(True, "no production model yet"), (False, "--nowarm_start")])
def test_the_report_says_what_the_candidate_started_from_as_the_history_does(warm_start, reason, table_csv, tmp_path):
  config = Config(model="dense", data=table_csv(rows=300), target_column="y", epochs=1)
  options = retraining.Options(serving_dir=str(tmp_path / "serving"), warm_start=warm_start)
  entry = retraining.retrain(config, str(tmp_path / "night"), options)
  report = json.loads((tmp_path / "night" / "report.json").read_text())
  assert report["warm_start"] == entry["warm_start"] == {"used": False, "reason": reason}


def momentum_prices(path, days=700, seed=0):
  """Daily prices whose changes carry over to the next day (AR(1), 0.5): a recurrent model can
  beat persistence on them."""
  rng = np.random.default_rng(seed)
  changes = np.zeros(days)
  for t in range(1, days):
    changes[t] = 0.5 * changes[t - 1] + 0.01 * rng.standard_normal()
  pd.DataFrame({"Date": pd.date_range("2020-01-01", periods=days).strftime("%Y-%m-%d"),
                "Close": (100 * np.exp(np.cumsum(changes))).round(4)}).to_csv(path, index=False)
  return str(path)


def test_forecast_production_is_scored_with_its_own_window_on_the_newest_days(tmp_path):
  data = momentum_prices(tmp_path / "prices.csv")
  serving_dir = str(tmp_path / "serving")
  # Production: a window of 8, trained (and validated) on rows up to 2021-10-14.
  old = Config(model="gru", data=data, target_column="Close", date_column="Date", window=8, epochs=2,
               test_start="2021-10-15", batch_size=64)
  promotion.promote(train.train_and_evaluate(old, str(tmp_path / "old"))["export"], serving_dir)

  candidate = Config(model="gru", data=data, target_column="Close", date_column="Date", window=12, epochs=2,
                     test_days=90, batch_size=64)
  entry = retraining.retrain(candidate, str(tmp_path / "night"), retraining.Options(serving_dir=serving_dir))
  test = entry["data"]["split"]["test"]
  assert (test["first"], test["last"], test["rows"]) == ("2021-09-02", "2021-11-30", 90)
  low, high = entry["improvement_interval"]  # from runs of 4 consecutive days (90 ** (1 / 3))
  assert low < entry["improvement"] < high
  # GRU weights do not depend on the window's length: the same network, warm-started.
  assert entry["warm_start"]["used"] is True
  # Production saw six weeks of this hold-out: the history says its score is flattered.
  assert entry["warnings"] == ["the production model trained on rows up to 2021-10-14, inside this hold-out (from "
                               "2021-09-02): its score is flattered; hold out a later period (--eval_start, "
                               "--eval_days)"]

  frame = pd.read_csv(data)
  first_test = int(np.flatnonzero(frame.Date == "2021-09-02")[0])
  version = storage.join(serving_dir, "1")
  metadata = export.read_metadata(version)
  assert metadata["preprocessing"]["window"] == 8
  forecasts = timeseries.forecast(export.load(version, metadata), metadata["preprocessing"],
                                  frame[["Close"]].to_numpy(np.float64)[first_test - 1 - 8:])[:-1]
  expected = np.sqrt(np.mean((forecasts - frame.Close.to_numpy()[first_test:]) ** 2))
  assert entry["production"]["rmse"] == pytest.approx(expected, rel=1e-6)
  persistence = np.sqrt(np.mean(np.diff(frame.Close.to_numpy()[first_test - 1:]) ** 2))
  assert entry["baseline"]["rmse"] == pytest.approx(persistence, rel=1e-9)
