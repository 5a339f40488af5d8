"""No new data, no new model (trainer.no_new_data): a retrain on the data production was trained
on records "skipped" without starting TensorFlow, on a local folder and on gs://; --force, new
rows, another --model and the retry of a started run train; a forecast compares its newest row."""

import dataclasses
import json
import subprocess
import sys

import forked
import pandas as pd
import pytest
import trained_jobs

from trainer import export, fingerprints, promotion, retrain_history, retraining, storage
from trainer.config import Config
from trainer.no_new_data import RUN, SKIPPED, skip

FLAGS = ["--model=dense", "--target_column=y", "--batch_size=64", "--epochs=1"]
# trainer.retrain in a fresh interpreter, then whether it imported TensorFlow: the proof that a
# skipped night spends nothing on it (tests/forked.py's processes have it imported already).
FRESH = """
import runpy, sys
sys.argv = ["trainer.retrain", *sys.argv[1:]]
try:
  runpy.run_module("trainer.retrain", run_name="__main__", alter_sys=True)
finally:
  print("tensorflow imported:", "tensorflow" in sys.modules)
"""


@pytest.mark.slow  # two trainings
def test_a_second_retrain_on_the_same_data_is_skipped_and_force_trains(root, table_csv, tmp_path):
  serving_dir, data = storage.join(root, "serving"), storage.join(root, "data", "table.csv")
  storage.write_bytes(data, open(table_csv(rows=600), "rb").read())
  first = retraining.retrain(Config(model="dense", data=data, target_column="y", batch_size=64, epochs=1),
                             str(tmp_path / "night1"), retraining.Options(serving_dir=serving_dir))
  assert (first["decision"], first["version"]) == ("promoted", 1)
  night = [f"--data={data}", f"--serving_dir={serving_dir}", *FLAGS]

  skipped = subprocess.run([sys.executable, "-c", FRESH, *night, f"--job_dir={tmp_path / 'night2'}"],
                           capture_output=True, text=True, timeout=120)
  assert skipped.returncode == 0, skipped.stderr
  assert skipped.stdout.splitlines() == [
      f"skipped: no new data: version 1 was trained on these contents of --data={data}; --force trains anyway",
      f"production: {storage.join(serving_dir, '1')}", f"history: {storage.join(serving_dir, 'history.jsonl')}",
      "tensorflow imported: False"]
  assert not storage.exists(str(tmp_path / "night2" / "export"))  # nothing trained
  last = retrain_history.read(serving_dir)[-1]
  assert (last["decision"], last["version"], last["metric"], last["candidate"]) == (SKIPPED, 1, "rmse", None)
  assert "skipped         1  rmse" in retrain_history.table(retrain_history.read(serving_dir))

  forced = forked.run([sys.executable, "-m", "trainer.retrain", *night, f"--job_dir={tmp_path / 'night3'}",
                       "--force"], capture_output=True, text=True, timeout=300)
  assert forced.returncode == 0, forced.stderr
  assert forced.stdout.startswith(("promoted: ", "rejected: ")), forced.stdout
  assert len(retrain_history.read(serving_dir)) == 3


@pytest.mark.slow  # a training, shared with the export tests
def test_what_trains_and_what_is_skipped(root, tmp_path, tmp_path_factory):
  """In-process, on the dense job of tests/trained_jobs.py promoted as production."""
  job = trained_jobs.trained("dense", tmp_path_factory)
  serving_dir = storage.join(root, "serving")
  promotion.promote(job.version_dir, serving_dir)
  assert export.read_metadata(job.version_dir)["trained_on"] == job.result["trained_on"]
  night = lambda **changes: dataclasses.replace(job.config, **changes)  # noqa: E731
  decide = lambda config, job_dir=str(tmp_path / "night"): skip(config, job_dir, serving_dir, 30, 0)  # noqa: E731

  assert decide(night())["decision"] == SKIPPED
  workers = dataclasses.replace(job.config.cluster, task_type="worker", task_index=1)
  assert decide(night(cluster=workers))["decision"] == SKIPPED  # a worker skips too, and records nothing
  assert [e["decision"] for e in retrain_history.read(serving_dir)] == [SKIPPED]

  copy = storage.join(root, "tonight.csv")  # another path, the same bytes
  storage.write_bytes(copy, open(job.config.data, "rb").read())
  # Production trained on a local file: its sha256 never equals gs://'s crc32c of the same bytes.
  assert (decide(night(data=copy)) is None) == storage.is_remote(root)
  grown = str(tmp_path / "grown.csv")
  frame = pd.read_csv(job.config.data)
  pd.concat([frame, frame.tail(1)]).to_csv(grown, index=False)
  assert decide(night(data=grown)) is None  # new rows
  assert decide(night(model="cnn")) is None  # another network than production's
  assert decide(night(test_data=job.config.data)) is None  # a hold-out file production was not given
  started = tmp_path / "retry"
  started.mkdir()
  (started / RUN).write_text(json.dumps({"id": "0123456789abcdef"}))
  assert decide(night(), job_dir=str(started)) is None  # a retry decides as its first attempt would have


@pytest.mark.slow  # a training, shared with the export tests
def test_a_forecast_is_new_data_only_with_a_newer_row(tmp_path, tmp_path_factory):
  job = trained_jobs.trained("gru", tmp_path_factory)
  serving_dir = str(tmp_path / "serving")
  promotion.promote(job.version_dir, serving_dir)
  newest = job.result["data"]["split"]["test"]["last"]
  frame = pd.read_csv(job.config.data)
  tonight = str(tmp_path / "tonight.csv")
  frame.assign(Close=frame.Close * 1.01).to_csv(tonight, index=False)  # revised closes, no newer day
  entry = skip(dataclasses.replace(job.config, data=tonight), str(tmp_path / "night"), serving_dir, 30, 0)
  assert entry["reason"] == (f"no new data: the newest row of --data={tonight} is {newest}, as when version 1 was "
                             "trained; --force trains anyway")
  later = frame.tail(1).assign(Date=(pd.Timestamp(newest) + pd.Timedelta(days=1)).date().isoformat())
  pd.concat([frame, later]).to_csv(tonight, index=False)
  assert skip(dataclasses.replace(job.config, data=tonight), str(tmp_path / "night"), serving_dir, 30, 0) is None


def test_same_data_compares_contents_not_paths():
  one = {"data": {"path": "a.csv", "size": 10, "checksum": "sha256:1", "modified": "2026-01-01T00:00:00+00:00"}}
  moved = {"data": {**one["data"], "path": "b.csv", "modified": "2026-02-01T00:00:00+00:00"}}
  assert fingerprints.same_data(one, moved)
  assert not fingerprints.same_data(one, {"data": {**one["data"], "checksum": "sha256:2"}})
  assert not fingerprints.same_data(one, {**one, "test_data": one["data"]})  # a hold-out besides
  assert not fingerprints.same_data({}, {}) and not fingerprints.same_data(None, one)  # built-in data, older exports
  folder = {"data": {"path": "images", "files": 3, "bytes": 30, "listing": "f00"}}
  assert fingerprints.same_data(folder, folder) and not fingerprints.same_data(folder, one)
