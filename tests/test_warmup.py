"""TF Serving's warm-up requests (trainer.warmup): an export's file parses as TF Serving reads it,
holds the job's first test inputs and replays against the export, also once promoted (local and
gs://); each way a file can be broken is caught with its reason; a retrain whose candidate's
warm-up fails rejects it, and nothing is promoted."""

import os
import pathlib
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from tensorflow_serving.apis import classification_pb2, prediction_log_pb2
from trained_jobs import trained

from trainer import export, promotion, retrain_history, retraining, storage, warmup
from trainer.config import Config
from trainer.models import MODELS
from trainer.retraining import REJECTED


def warm_up_file(folder):
  return os.path.join(folder, warmup.FOLDER, warmup.FILE)


def records(version_dir):
  """The warm-up file's PredictionLogs, parsed as TF Serving parses them."""
  return [prediction_log_pb2.PredictionLog.FromString(r.numpy())
          for r in tf.data.TFRecordDataset(warm_up_file(version_dir))]


@pytest.mark.slow
def test_an_export_warms_up_with_its_first_test_rows_as_the_signature_takes_them(tmp_path_factory):
  job = trained("dense", tmp_path_factory)
  metadata = export.read_metadata(job.version_dir)
  logs = records(job.version_dir)
  assert len(logs) == warmup.REQUESTS
  preprocessing = metadata["preprocessing"]
  rows = pd.read_csv(job.config.data)[preprocessing["features"]].to_numpy()[job.prepared.test_index[:len(logs)]]
  expected = (rows - preprocessing["feature_mean"]) / preprocessing["feature_std"]  # normalised as in training
  for log, row in zip(logs, expected):
    request = log.predict_log.request
    assert request.model_spec.signature_name == metadata["signature"]
    assert list(request.inputs) == [metadata["input"]]
    sent = tf.make_ndarray(request.inputs[metadata["input"]])
    assert sent.dtype == np.float32 and sent.shape == (1, len(row))
    np.testing.assert_allclose(sent[0], row, rtol=1e-5)
  assert warmup.replay(job.version_dir) == warmup.REQUESTS


@pytest.mark.slow
def test_a_promoted_version_keeps_its_warm_up_requests(root, tmp_path_factory):
  job = trained("dense", tmp_path_factory)
  served = promotion.promote(job.version_dir, storage.join(root, "serving"))
  path = storage.join(warmup.FOLDER, warmup.FILE)
  assert storage.read_bytes(storage.join(served, path)) == storage.read_bytes(storage.join(job.version_dir, path))
  assert warmup.replay(served) == warmup.REQUESTS
  assert warmup.failure(served) is None


def export_dense(folder, inputs, nan_weights=False):
  """An untrained dense network of 4 features exported as TF Serving loads it (no training: only
  the signature matters), with a warm-up request for each row of inputs."""
  model = MODELS["dense"]((4,), 1)
  if nan_weights:  # as a diverged training leaves them
    model.set_weights([np.full_like(w, np.nan) for w in model.get_weights()])
  model.export(folder, verbose=False)
  warmup.write(folder, export.SIGNATURE, "features", inputs)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory):
  """export_dense with 3 sound warm-up requests."""
  folder = str(tmp_path_factory.mktemp("small") / "1")
  export_dense(folder, np.arange(12, dtype=np.float32).reshape(3, 4) / 10)
  assert warmup.replay(folder) == 3
  return folder


def write_records(folder, *logs):
  with tf.io.TFRecordWriter(warm_up_file(folder)) as writer:
    for log in logs:
      writer.write(log if isinstance(log, bytes) else log.SerializeToString())


def write_inputs(name, inputs, signature=export.SIGNATURE):
  return lambda folder: warmup.write(folder, signature, name, inputs)


FOUR = np.ones((1, 4), np.float32)


def diverged(folder):
  """The export replaced by one of NaN weights, with sound requests. NaN inputs would not do: in the
  SavedModel's graph the CPU's fused MatMul+BiasAdd+Relu turns NaN into 0, though the same network
  run eagerly answers NaN."""
  shutil.rmtree(folder)
  export_dense(folder, FOUR, nan_weights=True)


BROKEN = {
    "missing": (lambda folder: os.remove(warm_up_file(folder)), "tf_serving_warmup_requests: missing"),
    "not_tfrecord": (lambda folder: pathlib.Path(warm_up_file(folder)).write_bytes(b"plain text, not TFRecords"),
                     "not a TFRecord file (corrupted record at 0"),
    "empty": (write_records, "no requests to warm the version up with"),
    "not_a_prediction_log": (lambda folder: write_records(folder, b"\xff\xff\xff\xff"),
                             "record 1 of 1 is not a PredictionLog"),
    "classify_log": (lambda folder: write_records(folder, prediction_log_pb2.PredictionLog(
        classify_log=prediction_log_pb2.ClassifyLog(request=classification_pb2.ClassificationRequest()))),
                     "record 1 of 1 is a classify_log, not the predict_log"),
    "other_signature": (write_inputs("features", FOUR, signature="predict"),
                        "asks for signature 'predict'; the SavedModel has serve, serving_default"),
    "wrong_input_name": (write_inputs("image", FOUR), "names its inputs image; the signature takes features"),
    "wrong_shape": (write_inputs("features", np.ones((2, 3), np.float32)),
                    "record 1 of 2 gives input 'features' as float32 of shape [1, 3]; the signature takes "
                    "float32 of shape [None, 4]"),
    "wrong_dtype": (write_inputs("features", FOUR.astype(np.float64)),
                    "gives input 'features' as float64 of shape [1, 4]"),
    "not_finite": (diverged, "gets a non-finite output 'output_0' ([nan])"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_warm_up_file_is_caught_with_its_reason(case, small_export, tmp_path):
  folder = str(tmp_path / "1")
  shutil.copytree(small_export, folder)
  breaks, reason = BROKEN[case]
  breaks(folder)
  with pytest.raises(warmup.WarmupFailed, match="^" + re.escape(warm_up_file(folder))) as failed:
    warmup.replay(folder)
  assert reason in str(failed.value)
  assert warmup.failure(folder).endswith(failed.value.problem)


@pytest.mark.slow
def test_a_candidate_whose_warm_up_fails_is_rejected_with_the_reason(table_csv, tmp_path, monkeypatch):
  write_export = export.write_export

  def with_a_wrong_input_name(model, prepared, result, export_dir):  # as an export that broke its file would
    folder = write_export(model, prepared, result, export_dir)
    warmup.write(folder, export.SIGNATURE, "x", warmup.test_inputs(prepared))
    return folder

  monkeypatch.setattr(export, "write_export", with_a_wrong_input_name)
  serving_dir = str(tmp_path / "serving")
  entry = retraining.retrain(Config(model="dense", data=table_csv(), target_column="y", batch_size=64, epochs=1),
                             str(tmp_path / "night"), retraining.Options(serving_dir=serving_dir))
  assert (entry["decision"], entry["version"]) == (REJECTED, None)
  assert entry["reason"] == ("its warm-up requests fail, and TF Serving loads no version whose warm-up fails: "
                             "record 1 of 5 names its inputs x; the signature takes features")
  assert entry["candidate"]["rmse"] < entry["baseline"]["rmse"]  # promoted, but for its warm-up
  assert promotion.production(serving_dir) is None
  assert retrain_history.read(serving_dir) == [entry]
