"""A Vertex AI tuning trial reports its metric through cloudml-hypertune, as Vertex AI reads it."""

import json
import os
import sys
from pathlib import Path

import forked
import pytest

from trainer import hptuning

# Tests that start trainer processes or train whole models are marked slow: the fast tier leaves them out.


@pytest.mark.slow
def test_a_trial_reports_every_epoch_then_the_kept_epochs_validation_loss(tmp_path):
  metrics = tmp_path / "hypertune" / "output.metrics"
  env = {**os.environ, "CLOUD_ML_TRIAL_ID": "7", "CLOUD_ML_HP_METRIC_FILE": str(metrics)}
  done = forked.run([sys.executable, "-m", "trainer.task", "--model=dense", "--epochs=2",
                     f"--job_dir={tmp_path / 'job'}"], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads((tmp_path / "job" / "report.json").read_text())
  *epochs, line = [json.loads(line) for line in metrics.read_text().splitlines()]
  # After every epoch, with its global step (200 steps an epoch): what the study's early stopping needs.
  assert [(r["trial"], r["global_step"], float(r[hptuning.METRIC])) for r in epochs] == [
      ("7", "200", report["history"]["val_loss"][0]), ("7", "400", report["history"]["val_loss"][1])]
  reported = line
  assert reported["trial"] == "7" and reported["global_step"] == "400"
  assert float(reported[hptuning.METRIC]) == report["history"]["val_loss"][report["best_epoch"] - 1]


def test_the_study_stops_bad_trials_early():
  import yaml
  job = Path(__file__).resolve().parents[1] / "k8s" / "vertex" / "hptuning_job.yaml"
  study = yaml.safe_load(job.read_text())["studySpec"]
  assert study["medianAutomatedStoppingSpec"] == {"useElapsedDuration": False}
  assert study["measurementSelectionType"] == "LAST_MEASUREMENT"


def test_only_trials_report():
  assert not hptuning.in_trial({"AIP_MODEL_DIR": "gs://b/model"})
  assert hptuning.in_trial({"CLOUD_ML_TRIAL_ID": "1"})
