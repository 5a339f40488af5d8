import numpy as np
import pytest

from trainer import report


def test_metrics_by_hand():
  m = report.metrics([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 6.0])
  assert m["rmse"] == pytest.approx(1.0)  # sqrt(4 / 4)
  assert m["mae"] == pytest.approx(0.5)
  assert m["r2"] == pytest.approx(1 - 4 / 5)  # spread of 1..4 around 2.5 is 5


def test_perfect_prediction_scores_r2_one():
  y = np.linspace(0, 1, 10)
  assert report.metrics(y, y) == {"rmse": 0.0, "mae": 0.0, "r2": 1.0}


def test_summary_table_shows_model_beside_baseline():
  table = report.summary_table({"model": "gru", "test": {"rmse": 9.0, "mae": 6.0, "r2": 0.98},
                                "baseline": {"name": "persistence", "rmse": 9.2, "mae": 6.6, "r2": 0.985},
                                "strategy": "mirrored", "num_workers": 1, "num_replicas": 2,
                                "global_batch_size": 32, "per_replica_batch_size": 16})
  lines = table.splitlines()
  assert lines[0] == "strategy mirrored: 2 replicas on 1 worker, batch 32 (16 per replica)"
  assert lines[2].split()[:2] == ["gru", "(test)"] and "persistence" in lines[3]
  assert lines[-1].endswith("0.978x")
