"""No new data, no new model: a retrain (trainer.retrain) whose data is what the model in
production was trained on would train the same candidate on the same rows again, so instead it
records decision "skipped" in the history and exits 0 in seconds, before TensorFlow starts.

"The same data" is compared with the "trained_on" fingerprints that production's export keeps
(trainer.fingerprints): for tables and images the same contents (a file's checksum, a folder's
or glob's listing of names and sizes), whatever the path; for a forecast, also the same newest
date: a series grows at its end, and a file rewritten without a newer row (downloaded again on a
holiday) has no new day to learn from. Never skipped: --force; another --model than production's;
data without a fingerprint (built-in, tfds:NAME) or a production exported before "trained_on";
and the retry of a run killed after training (its --job_dir holds its run id), which records what
that run decided: killed after promoting, its own model, trained on this very data, is production.
"""

import datetime
import os
import socket

from absl import logging

from trainer import export, fingerprints, promotion, retrain_history, serving_lease, storage
from trainer.data import csv_file
from trainer.families import METRICS

SKIPPED = "skipped"
# In the job folder: the run's identity (trainer.retraining.run_identity), written once it has trained.
RUN = "retrain_run.json"
# trainer.retrain's names of the data flags a fingerprint is kept for (trainer.fingerprints).
_FLAGS = {"data": "--data", "test_data": "--eval_data"}


def skip(config, job_dir, serving_dir, lease_ttl_seconds, lease_wait_seconds):
  """The history entry of a night skipped for want of new data, appended to the history by the
  chief under the serving folder's lease (other workers only return it); None when the night
  trains. Every worker reads the same files, so all of them skip or none, unless another retrain
  promotes in the seconds between their looks: those that train then wait for the others in vain."""
  unchanged = _unchanged(config, job_dir, serving_dir)
  if unchanged is None:
    return None
  version, what, now = unchanged
  entry = {
      "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "decision": SKIPPED, "version": version, "production_version": version,
      "reason": f"no new data: {what}; --force trains anyway", "metric": METRICS[config.kind][0],
      "candidate": None, "production": None, "baseline": None, "improvement": None,
      "trained_on": now, "job_dir": job_dir,
  }
  if config.cluster.is_chief:
    owner = f"{socket.gethostname()} pid {os.getpid()} ({job_dir})"
    with serving_lease.Lease(serving_dir, owner, lease_ttl_seconds, lease_wait_seconds):
      retrain_history.append(serving_dir, entry)  # no point to plot: history.png stays as it is
  logging.info("%s: %s", SKIPPED, entry["reason"])
  return entry


def _unchanged(config, job_dir, serving_dir):
  """(production's version, what in the data is unchanged since it was trained, the data's
  fingerprints) when this night has nothing new to train on; else None."""
  if config.data is None or storage.exists(storage.join(job_dir, RUN)):
    return None
  production = promotion.production(serving_dir)
  if production is None:
    return None
  metadata = export.read_metadata(production)
  version, saved = metadata.get("version"), metadata.get("trained_on")
  if metadata.get("model") != config.model or not saved:
    return None
  now = fingerprints.data_fingerprint(config)
  if fingerprints.same_data(saved, now):
    files = " and ".join(f"{_FLAGS[flag]}={found['path']}" for flag, found in now.items())
    return version, f"version {version} was trained on these contents of {files}", now
  last = saved.get("data", {}).get("last")
  if config.is_forecast and last is not None and csv_file.newest(config) == last:
    return version, f"the newest row of --data={config.data} is {last}, as when version {version} was trained", now
  return None
