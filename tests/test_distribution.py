"""Strategies on logical CPUs (two, from conftest.py), batch splitting, and who writes where."""

import os

import pytest
import tensorflow as tf

from trainer import distribution, train
from trainer.cluster import Cluster
from trainer.config import Config, UserError

ALONE = Cluster(spec={}, task_type="worker", task_index=0, source="none")
TWO_WORKERS = {"worker": ["127.0.0.1:1", "127.0.0.1:2"]}


@pytest.mark.parametrize("name, cpu_devices, expected, replicas", [
    ("auto", 0, "default", 1),
    ("auto", 2, "mirrored", 2),
    ("mirrored", 2, "mirrored", 2),
    ("one_device", 0, "one_device", 1),
    ("default", 0, "default", 1),
])
def test_strategy_by_flag(name, cpu_devices, expected, replicas):
  strategy = distribution.make_strategy(name, ALONE, cpu_devices)
  assert distribution.strategy_name(strategy) == expected
  assert strategy.num_replicas_in_sync == replicas


def test_a_cluster_needs_the_multi_worker_strategy():
  cluster = Cluster(spec=TWO_WORKERS, task_type="worker", task_index=0, source="TF_CONFIG")
  with pytest.raises(UserError, match="names 2 tasks, but --strategy=mirrored runs on one host"):
    distribution.make_strategy("mirrored", cluster)


def test_global_batch_splits_across_replicas():
  assert distribution.per_replica_batch_size(32, 2) == 16
  with pytest.raises(UserError, match="--batch_size=30 .* does not split evenly across 4 replicas; use a multiple of 4"):
    distribution.per_replica_batch_size(30, 4)


def test_only_the_chief_writes_the_job_folder(tmp_path):
  job_dir = str(tmp_path / "job")
  assert distribution.writable_job_dir(job_dir, ALONE) == job_dir
  worker = Cluster(spec=TWO_WORKERS, task_type="worker", task_index=1, source="TF_CONFIG")
  folder = distribution.writable_job_dir(job_dir, worker)
  assert folder != job_dir and os.path.isdir(folder)
  distribution.cleanup(folder, job_dir)
  assert not os.path.exists(folder)


def test_mirrored_training_on_two_cpus_reports_its_replicas(prices_csv, tmp_path):
  config = Config(model="gru", data=prices_csv(rows=300), target_column="Close", date_column="Date",
                  window=10, epochs=3, batch_size=32, strategy="mirrored", cpu_devices=2)
  result = train.train_and_evaluate(config, str(tmp_path / "job"))
  assert (result["strategy"], result["num_workers"], result["num_replicas"]) == ("mirrored", 1, 2)
  assert (result["global_batch_size"], result["per_replica_batch_size"]) == (32, 16)
  assert result["history"]["loss"][-1] < result["history"]["loss"][0]
  # What a mirrored job saves is a plain model: it loads outside any strategy.
  import keras
  assert keras.models.load_model(tmp_path / "job" / "model" / "model.keras").count_params() == 22_401


@pytest.mark.parametrize("flags", [{"mixed_precision": True}, {"jit_compile": True}])
def test_speed_flags_train_with_a_falling_loss(flags, tmp_path):
  config = Config(model="dense", epochs=3, batch_size=64, **flags)
  result = train.train_and_evaluate(config, str(tmp_path / "job"))
  assert result["history"]["loss"][-1] < result["history"]["loss"][0] / 2
  assert result["precision"] == ("mixed_bfloat16" if flags.get("mixed_precision") else "float32")
  assert result["test"]["rmse"] < 0.5 * result["baseline"]["rmse"]  # predictions in the data's units, float
  import keras
  assert keras.mixed_precision.global_policy().name == "float32"  # nothing leaks to the next job


def test_two_workers_on_localhost_train_as_one_job(tmp_path):
  """A real MultiWorkerMirroredStrategy job: two trainer processes on 127.0.0.1 through
  scripts/local_cluster.py, the same loop as everywhere. Both see the same all-reduced losses;
  only the chief writes the job folder; the other worker's temporary folder is gone at the end.
  501 rows leave 321 for training: shares of 161 and 160 rows, 11 and 10 batches of 16, and
  the worker that runs out first must not leave the other hanging in an all-reduce."""
  import json
  import re
  import subprocess
  import sys
  from trainer.data import builtin
  builtin.regression_table(rows=501).to_csv(tmp_path / "table.csv", index=False)
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  script = os.path.join(os.path.dirname(__file__), "..", "scripts", "local_cluster.py")
  done = subprocess.run(
      [sys.executable, script, "--workers=2", "--", "--model=dense", f"--data={tmp_path / 'table.csv'}",
       "--target_column=y", "--epochs=2", "--batch_size=32", f"--job_dir={tmp_path / 'job'}"],
      capture_output=True, text=True, timeout=300, env={**os.environ, "TMPDIR": str(scratch)})
  assert done.returncode == 0, done.stderr[-3000:]
  losses = {task: re.findall(r"epoch \d+/2  loss (\S+)", "\n".join(
      line for line in done.stderr.splitlines() if line.startswith(f"[worker {task}]"))) for task in (0, 1)}
  assert len(losses[0]) == 2 and losses[0] == losses[1]
  report = json.loads((tmp_path / "job" / "report.json").read_text())
  assert (report["strategy"], report["num_workers"], report["num_replicas"]) == ("multi_worker_mirrored", 2, 2)
  assert report["per_replica_batch_size"] == 16 and report["data"]["split"]["train"]["rows"] == 321
  assert not [p for p in scratch.iterdir() if p.name.startswith("trainer-worker1-")]
