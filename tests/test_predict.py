"""`python -m trainer.predict` in a subprocess: from the export alone it predicts what the trained
Keras model predicts on the same data, and bad input ends in one line and exit code 2."""

import io
import os
import re
import shutil
import subprocess
import sys

import forked
import numpy as np
import pandas as pd
import pytest
from trained_jobs import IMAGE_SIZE, trained

from trainer import export, storage
from trainer.data import image_folder, images, tabular, timeseries

# Tests that start trainer processes or train whole models are marked slow: the fast tier leaves them out.


def run_predict(*flags, fresh=False):
  """(exit code, stdout, stderr) of `python -m trainer.predict`, forked with TensorFlow imported, or in a
  fresh process where the test is about what happens before TensorFlow is imported."""
  done = (subprocess.run if fresh else forked.run)([sys.executable, "-m", "trainer.predict", *flags],
                                                    capture_output=True, text=True, timeout=120)
  return done.returncode, done.stdout, done.stderr


def predict_ok(*flags):
  code, stdout, stderr = run_predict(*flags)
  assert code == 0, stderr
  return stdout


@pytest.mark.slow
def test_forecasts_from_a_csv_are_the_trained_models(tmp_path_factory, tmp_path):
  job = trained("gru", tmp_path_factory)
  output = tmp_path / "forecasts.csv"
  stdout = predict_ok(f"--model_dir={os.path.dirname(job.version_dir)}", f"--data={job.config.data}",
                      f"--output={output}")
  frame = pd.read_csv(job.config.data)
  expected = timeseries.forecast(job.model, job.prepared.preprocessing, frame[["Close", "Volume"]].to_numpy())
  written = pd.read_csv(output)
  np.testing.assert_allclose(written.forecast_next_Close, expected, rtol=1e-4)
  assert list(written.Date) == list(frame.Date[job.config.window:])
  assert list(written.Close) == list(frame.Close[job.config.window:])
  (line,) = [line for line in stdout.splitlines() if line.startswith("next Close after")]
  assert f"after {frame.Date.iloc[-1]} (the last row of --data)" in line
  assert float(line.rsplit(": ", 1)[1]) == pytest.approx(expected[-1], rel=1e-4)


@pytest.mark.slow
def test_table_predictions_are_the_trained_models(tmp_path_factory, tmp_path):
  job = trained("dense", tmp_path_factory)
  rows = pd.DataFrame(np.random.default_rng(5).normal(size=(30, 5)), columns=[f"x{i}" for i in range(5)])
  rows.insert(0, "id", range(30))  # a column the model does not use
  rows.to_csv(tmp_path / "new.csv", index=False)
  output = tmp_path / "predictions.csv"
  stdout = predict_ok(f"--model_dir={job.version_dir}", f"--data={tmp_path / 'new.csv'}", f"--output={output}")
  expected = tabular.predict_table(job.model, job.prepared.preprocessing, rows[[f"x{i}" for i in range(5)]])
  np.testing.assert_allclose(pd.read_csv(output).predicted_y, expected, rtol=1e-4)
  assert "... 20 more rows" in stdout and "30 predictions written" in stdout


@pytest.mark.slow
def test_image_classes_are_the_trained_models(tmp_path_factory, tmp_path):
  job = trained("cnn", tmp_path_factory)
  folder = tmp_path / "images"
  shutil.copytree(job.config.data, folder)
  (folder / "circle" / "broken.png").write_bytes(b"not a picture")
  output = tmp_path / "classes.csv"
  code, stdout, stderr = run_predict(f"--model_dir={job.version_dir}", f"--data={folder}", f"--output={output}")
  assert code == 0, stderr
  assert "broken.png: skipped, not a readable image" in stderr

  scan = image_folder.scan(str(folder))
  pixels = images.resized(image_folder.dataset(scan.paths, scan.labels), IMAGE_SIZE).map(images.to_float).batch(64)
  probabilities = np.concatenate([job.model(x, training=False).numpy() for x, _ in pixels])
  written = pd.read_csv(output)
  assert list(written.file) == [os.path.relpath(p, folder) for p in scan.paths]
  assert list(written["class"]) == [scan.class_names[i] for i in probabilities.argmax(axis=1)]
  np.testing.assert_allclose(written.probability, probabilities.max(axis=1), rtol=1e-4)
  assert list(written.folder) == [scan.class_names[label] for label in scan.labels]
  hits = int((probabilities.argmax(axis=1) == np.array(scan.labels)).sum())
  assert f"accuracy against the folder names: {hits / len(scan.labels):.4f} ({hits} of {len(scan.labels)})" in stdout

  one = scan.paths[0]
  stdout = predict_ok(f"--model_dir={job.version_dir}", f"--data={one}")
  assert f"{os.path.basename(one)}  {scan.class_names[probabilities[0].argmax()]}  {probabilities[0].max():.4f}" \
      in stdout.splitlines()
  assert "accuracy" not in stdout


def test_a_flat_folder_has_no_classes_to_measure(tmp_path):
  from trainer import inference
  for name in ("b.png", "a.jpg", ".DS_Store"):
    (tmp_path / name).write_bytes(b"")
  (tmp_path / ".ipynb_checkpoints").mkdir()
  (tmp_path / ".ipynb_checkpoints" / "c.png").write_bytes(b"")
  assert inference.list_images(str(tmp_path), {}) == (str(tmp_path), [("a.jpg", None), ("b.png", None)])


@pytest.mark.slow
def test_export_to_cloud_storage_and_predict_from_it(gcs_bucket, tmp_path_factory):
  job = trained("dense", tmp_path_factory)
  export_dir = f"{gcs_bucket}/models/dense"
  assert export.write_export(job.model, job.prepared, job.result, export_dir) == f"{export_dir}/1"
  assert {"saved_model.pb", "trainer_export.json", "variables"} <= set(storage.list_dir(f"{export_dir}/1"))
  storage.write_text(f"{export_dir}/2/saved_model.pb", "half an upload")  # no metadata: not a version
  assert export.latest_version(export_dir) == f"{export_dir}/1"

  rows = pd.read_csv(job.config.data).head(12)
  storage.write_text(f"{gcs_bucket}/rows.csv", rows.to_csv(index=False))
  stdout = predict_ok(f"--model_dir={export_dir}", f"--data={gcs_bucket}/rows.csv",
                      f"--output={gcs_bucket}/predictions.csv")
  assert f"export: {export_dir}/1 " in stdout
  expected = tabular.predict_table(job.model, job.prepared.preprocessing, rows[job.prepared.preprocessing["features"]])
  written = pd.read_csv(io.StringIO(storage.read_text(f"{gcs_bucket}/predictions.csv")))
  np.testing.assert_allclose(written.predicted_y, expected, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("case, expected", [
    ("no_export", ["no export found", "trainer_export.json"]),
    ("bad_metadata", ["trainer_export.json", "not valid JSON"]),
    ("missing_data", ["--data=", "no such file or folder"]),
    ("folder_for_csv", ["is a folder", "CSV file with the columns Close, Volume"]),
    ("csv_for_images", ["is not an image", "folder of images"]),
    ("missing_column", ["no column 'Volume', which the model needs", "its columns are: Date, Close"]),
    ("too_few_rows", ["5 rows are too few", "at least 9"]),
    ("no_images", ["no images found"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path_factory, tmp_path, case, expected):
  gru, cnn = trained("gru", tmp_path_factory), trained("cnn", tmp_path_factory)
  prices = pd.read_csv(gru.config.data)
  model_dir, data = gru.version_dir, gru.config.data
  if case == "no_export":
    model_dir = str(tmp_path)
  elif case == "bad_metadata":
    shutil.copytree(gru.version_dir, tmp_path / "1")
    (tmp_path / "1" / "trainer_export.json").write_text('{"format": 1,')
    model_dir = str(tmp_path / "1")
  elif case == "missing_data":
    data = str(tmp_path / "nowhere.csv")
  elif case == "folder_for_csv":
    data = str(tmp_path)
  elif case == "csv_for_images":
    model_dir = cnn.version_dir
  elif case == "missing_column":
    prices.drop(columns="Volume").to_csv(tmp_path / "prices.csv", index=False)
    data = str(tmp_path / "prices.csv")
  elif case == "too_few_rows":
    prices.head(5).to_csv(tmp_path / "prices.csv", index=False)
    data = str(tmp_path / "prices.csv")
  else:
    (tmp_path / "empty" / "circle").mkdir(parents=True)
    model_dir, data = cnn.version_dir, str(tmp_path / "empty")
  code, stdout, stderr = run_predict(f"--model_dir={model_dir}", f"--data={data}", fresh=True)
  assert code == 2 and "Traceback" not in stderr, stderr
  # Each is found before TensorFlow starts, so nothing else is on stderr.
  (line,) = stderr.strip().splitlines()
  assert re.match(r"predict: error: ", line) and stdout == "", line
  for text in expected:
    assert text in line, line
