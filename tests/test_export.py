"""Exports: a SavedModel that tf.saved_model.load alone serves as the trained model answers, its
metadata beside it, and versions that count up past the leftovers of interrupted exports."""

import datetime
import json
import os
import socket
import sys

import forked
import numpy as np
import pytest
import tensorflow as tf
from trained_jobs import trained

from trainer import errors, export, storage, warmup
from trainer.models import MODELS
from trainer.errors import UserError

# Tests that start trainer processes or train whole models are marked slow: the fast tier leaves them out.

INPUTS = {"dense": "features", "gru": "window", "cnn": "image"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "gru", "cnn"])
def test_export_serves_the_trained_models_answers(name, tmp_path_factory):
  job = trained(name, tmp_path_factory)
  loaded = tf.saved_model.load(job.version_dir)
  metadata = export.read_metadata(job.version_dir)
  x, *_ = next(iter(job.prepared.make_dataset("validation", 16)))  # a forecaster's carries a third element
  served = loaded.signatures["serving_default"](**{metadata["input"]: x})[metadata["output"]]
  np.testing.assert_allclose(served.numpy(), job.model(x, training=False).numpy(), atol=1e-5)
  # TF Serving warms it up with its first test inputs (tests/test_warmup.py), as the signature takes them.
  assert warmup.replay(job.version_dir) == min(warmup.REQUESTS, len(job.prepared.test_targets))

  assert metadata["input"] == INPUTS[name] and metadata["signature"] == "serving_default"
  assert metadata["model"] == name and metadata["kind"] == job.prepared.kind
  assert job.version_dir.endswith(os.path.join("job", "export", "1")) and metadata["version"] == 1
  from_report = {key: job.result[key] for key in ("test", "baseline", "data")}
  for key, value in {"preprocessing": job.prepared.preprocessing, "flags": job.result["config"], **from_report}.items():
    assert metadata[key] == json.loads(json.dumps(value)), key
  created = datetime.datetime.fromisoformat(metadata["created"])
  assert created.utcoffset() == datetime.timedelta(0)
  assert abs(datetime.datetime.now(datetime.timezone.utc) - created) < datetime.timedelta(hours=1)


@pytest.mark.slow
def test_versions_count_up_past_leftovers_of_interrupted_exports(tmp_path_factory, tmp_path):
  job = trained("dense", tmp_path_factory)
  folder = str(tmp_path / "export")
  assert export.latest_version(folder) is None
  write = lambda: export.write_export(job.model, job.prepared, job.result, folder)  # noqa: E731
  assert write() == os.path.join(folder, "1")
  assert write() == os.path.join(folder, "2")
  # A killed upload: files of version 5 but no metadata. Not a version, and removed by the next export.
  os.makedirs(tmp_path / "export" / "5" / "variables")
  (tmp_path / "export" / "5" / "saved_model.pb").write_bytes(b"half")
  (tmp_path / "export" / "notes").mkdir()  # not a version: left alone
  assert export.latest_version(folder) == os.path.join(folder, "2")
  assert write() == os.path.join(folder, "3")
  assert sorted(os.listdir(folder)) == ["1", "2", "3", "notes"]
  assert export.latest_version(folder) == os.path.join(folder, "3")
  assert export.read_metadata(os.path.join(folder, "3"))["version"] == 3
  assert {"saved_model.pb", "variables", "trainer_export.json"} <= set(os.listdir(os.path.join(folder, "3")))
  # Version 10 sorts after 9, not after 1.
  os.rename(os.path.join(folder, "3"), os.path.join(folder, "10"))
  assert export.find_version(folder) == os.path.join(folder, "10")
  assert export.find_version(os.path.join(folder, "2")) == os.path.join(folder, "2")


@pytest.mark.parametrize("case, expected", [
    ("empty", ["no export found", os.path.join("<N>", "trainer_export.json")]),
    ("no_metadata", ["a SavedModel without trainer_export.json"]),
    ("bad_json", ["not valid JSON"]),
    ("newer_format", ["format 2", "format 1"]),
])
def test_unusable_exports_are_user_errors(tmp_path, case, expected):
  folder = tmp_path / "export"
  folder.mkdir()
  if case == "no_metadata":
    (folder / "saved_model.pb").write_bytes(b"")
  elif case == "bad_json":
    (folder / "trainer_export.json").write_text("{not json")
  elif case == "newer_format":
    (folder / "trainer_export.json").write_text('{"format": 2}')
  with pytest.raises(UserError) as raised:
    export.read_metadata(export.find_version(str(folder)))
  for text in expected:
    assert text in str(raised.value)


def test_missing_metadata_read_directly_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="trainer_export.json: cannot read the export's metadata"):
    export.read_metadata(str(tmp_path))


def closed_port():
  """A port on 127.0.0.1 nothing listens on: connecting is refused at once, locally."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def unreachable_storage(monkeypatch):
  """gs:// pointed at a closed port (here and in subprocesses), failing within seconds."""
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{closed_port()}")
  monkeypatch.setenv("TRAINER_STORAGE_TIMEOUT", "3")


def test_an_unreachable_bucket_is_a_storage_error_not_a_user_error(unreachable_storage):
  # A UserError exits 2, which no cluster retries: a storage outage would fail the job for good.
  with pytest.raises(storage.StorageError, match="cannot read gs://bucket/export/1/trainer_export.json"):
    export.read_metadata("gs://bucket/export/1")


def test_predict_from_an_unreachable_bucket_exits_170_in_one_line(unreachable_storage, tmp_path):
  done = forked.run([sys.executable, "-m", "trainer.predict", "--model_dir=gs://bucket/export/1",
                     f"--data={tmp_path / 'rows.csv'}"], capture_output=True, text=True, timeout=120)
  assert done.returncode == errors.STORAGE_FAILURE, done.stderr
  assert "Traceback" not in done.stderr
  (line,) = [line for line in done.stderr.splitlines() if "error" in line]
  assert line.startswith("predict: error: cannot ") and "gs://bucket/export/1" in line, line


@pytest.mark.slow
def test_warm_start_copies_the_weights_of_the_same_network_only(tmp_path_factory):
  job = trained("dense", tmp_path_factory)
  same = MODELS["dense"](job.prepared.input_shape)
  said = export.warm_start(same, job.version_dir, "dense")
  assert said == {"used": True, "from": job.version_dir, "version": 1}
  for mine, theirs in zip(same.get_weights(), job.model.get_weights()):
    np.testing.assert_array_equal(mine, theirs)

  wider = MODELS["dense"]((job.prepared.input_shape[0] + 1,))
  before = [w.copy() for w in wider.get_weights()]
  said = export.warm_start(wider, job.version_dir, "dense")
  assert not said["used"] and "other shapes" in said["reason"]
  assert all(np.array_equal(a, b) for a, b in zip(before, wider.get_weights()))  # untouched
  said = export.warm_start(MODELS["gru"]((8, 1)), job.version_dir, "gru")
  assert not said["used"] and said["reason"] == "it is a dense model, this job trains gru"
