"""A Vertex AI tuning trial reports its metric through cloudml-hypertune, as Vertex AI reads it."""

import json
import os
import sys

import forked
import pytest

from trainer import hptuning

# Tests that start trainer processes or train whole models are marked slow: the fast tier leaves them out.


@pytest.mark.slow
def test_a_trial_reports_the_kept_epochs_validation_loss(tmp_path):
  metrics = tmp_path / "hypertune" / "output.metrics"
  env = {**os.environ, "CLOUD_ML_TRIAL_ID": "7", "CLOUD_ML_HP_METRIC_FILE": str(metrics)}
  done = forked.run([sys.executable, "-m", "trainer.task", "--model=dense", "--epochs=2",
                     f"--job_dir={tmp_path / 'job'}"], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads((tmp_path / "job" / "report.json").read_text())
  (line,) = metrics.read_text().splitlines()
  reported = json.loads(line)
  assert reported["trial"] == "7" and reported["global_step"] == "400"
  assert float(reported[hptuning.METRIC]) == report["history"]["val_loss"][report["best_epoch"] - 1]


def test_only_trials_report():
  assert not hptuning.in_trial({"AIP_MODEL_DIR": "gs://b/model"})
  assert hptuning.in_trial({"CLOUD_ML_TRIAL_ID": "1"})
