"""Vertex AI hyperparameter tuning: a trial reports its metric where Vertex AI reads it.

Vertex AI runs each trial as a custom job with the trial's values as flags, and learns how good
the trial was only from what the job reports through Google's cloudml-hypertune library (JSON
lines in the file that CLOUD_ML_HP_METRIC_FILE names). The study's metric id must be METRIC. The
chief reports the validation loss after every epoch with its global step, so the study's automated
stopping (k8s/vertex/hptuning_job.yaml) can stop a bad trial early, and last the kept epoch's.
"""

import functools
import os

from absl import logging

# The study's metricId (k8s/vertex/hptuning_job.yaml): the validation loss of the weights kept.
METRIC = "val_loss"


def in_trial(environ=None):
  """Whether this job is a tuning trial: Vertex AI names the trial and the metric file."""
  environ = os.environ if environ is None else environ
  return "CLOUD_ML_TRIAL_ID" in environ or "CLOUD_ML_HP_METRIC_FILE" in environ


@functools.lru_cache(maxsize=None)
def _hypertune():
  # One for the process: each HyperTune rewrites the metric file with the reports it holds itself.
  import hypertune  # noqa: PLC0415 -- only trials need it
  return hypertune.HyperTune()


def report(val_loss, global_step):
  """Reports the trial's metric when this job is a trial; returns whether it did."""
  if not in_trial():
    return False
  _hypertune().report_hyperparameter_tuning_metric(
      hyperparameter_metric_tag=METRIC, metric_value=val_loss, global_step=global_step)
  logging.info("hyperparameter tuning trial %s: reported %s = %g", os.environ.get("CLOUD_ML_TRIAL_ID", "?"),
               METRIC, val_loss)
  return True
