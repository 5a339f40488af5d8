"""A job you can watch: progress lines in its log, TensorBoard summaries read back with TensorBoard's
own reader, a profile, the report's throughput and wall time; the validation metric in data units."""

import json
import re
import sys

import forked
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from trainer import loop, progress, report, storage, summaries, transfer
from trainer.config import Config
from trainer.data import images, tabular, timeseries
from trainer.models import MODELS, OPTIMIZERS


def tensors(folder):
  """{tag: [(step, value)]} of a TensorBoard run folder (tf.summary writes scalars and images as tensors)."""
  events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
  events.Reload()
  return events, {tag: [(e.step, tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)]
                  for tag in events.Tags()["tensors"]}


@pytest.mark.slow
def test_a_watched_job_logs_progress_and_writes_summaries_a_profile_and_timings(tmp_path, gcs_bucket):
  job_dir = f"{gcs_bucket}/job"
  done = forked.run([sys.executable, "-m", "trainer.task", "--model=dense", "--epochs=2", "--log_every_steps=50",
                     "--profile_steps=3,6", f"--job_dir={job_dir}"], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  # Plain lines, not a progress bar: the built-in table's 6,400 training rows are 200 steps of 32.
  assert "\r" not in done.stderr and "\x1b" not in done.stderr
  lines = [progress.LINE.search(line) for line in done.stderr.splitlines() if "progress:" in line]
  assert all(lines), [line for line in done.stderr.splitlines() if "progress:" in line]
  assert [(m["epoch"], m["step"], m["steps"]) for m in lines] == [
      (epoch, str(step), "200") for epoch in ("1", "2") for step in (50, 100, 150, 200)]
  assert all(float(m["steps_per_second"]) > 0 and float(m["examples_per_second"]) > 0 for m in lines)
  assert lines[-1]["epoch_eta"] == "0:00:00"

  logs = tmp_path / "logs"  # what reached gs://, as TensorBoard there would read it
  transfer.download_dir(storage.join(job_dir, "logs"), str(logs))
  _, steps = tensors(logs / "steps")
  assert {"loss", "learning_rate", "steps_per_second", "examples_per_second"} <= set(steps)
  assert [step for step, _ in steps["loss"]] == [50, 100, 150, 200, 250, 300, 350, 400]
  assert all(value == pytest.approx(1e-3) for _, value in steps["learning_rate"])
  _, epochs = tensors(logs / "epochs")
  assert set(epochs) == {"epoch/loss", "epoch/val_loss", "epoch/val_rmse", "epoch/val_mae"}
  result = json.loads(storage.read_text(f"{job_dir}/report.json"))
  assert [float(v) for _, v in epochs["epoch/val_loss"]] == pytest.approx(result["history"]["val_loss"])
  assert [step for step, _ in epochs["epoch/val_rmse"]] == [1, 2]
  # In the target's units: the validation RMSE is of the order of the test RMSE, not of a standardised one.
  assert float(epochs["epoch/val_rmse"][-1][1]) == pytest.approx(result["test"]["rmse"], rel=0.5)
  run, tags = tensors(logs)
  assert {"test/rmse", "test/ratio_to_baseline", "plots/history", "plots/predicted_vs_true"} <= set(tags)
  assert float(tags["test/ratio_to_baseline"][0][1]) == pytest.approx(
      result["test"]["rmse"] / result["baseline"]["rmse"])
  # The run's flags as an HParams session, so runs compare side by side in the HParams tab.
  content = run.PluginTagToContent("hparams")["_hparams_/session_start_info"]
  session = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
  assert (session.hparams["model"].string_value, session.hparams["epochs"].number_value) == ("dense", 2)
  assert list(logs.glob("plugins/profile/*/*.xplane.pb"))

  assert set(result["throughput"]) == {"steps_per_second", "examples_per_second"}
  assert result["throughput"]["examples_per_second"] == pytest.approx(32 * result["throughput"]["steps_per_second"],
                                                                             rel=1e-3)
  assert set(result["wall_time"]) == {"startup_s", "data_s", "training_s", "validation_s", "evaluation_s",
                                      "export_s", "other_s"}
  assert all(seconds >= 0 for seconds in result["wall_time"].values())
  assert sum(result["wall_time"].values()) == pytest.approx(result["wall_time_s"], abs=0.2)


def test_a_table_regressors_validation_metrics_are_in_the_targets_units(table_csv):
  prepared = tabular.prepare(Config(model="dense", data=table_csv(rows=300), target_column="y"))
  model = MODELS["dense"](prepared.input_shape)
  parts = loop.Loop(model, OPTIMIZERS["dense"](1e-3), loop.squared_error, prepared.make_dataset,
                    tf.distribute.get_strategy(), 32)
  parts.validate()
  got = summaries.validation_metrics("table", prepared.preprocessing, parts.val_sums)
  x, y = (np.concatenate(part) for part in zip(*prepared.make_dataset("validation", 1000)))
  mean, std = prepared.preprocessing["target_mean"], prepared.preprocessing["target_std"]
  expected = report.metrics(mean + std * y, mean + std * model(x).numpy()[:, 0])
  assert got == {"val_rmse": pytest.approx(expected["rmse"], rel=1e-4),
                 "val_mae": pytest.approx(expected["mae"], rel=1e-4)}


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_a_forecasters_validation_metrics_are_in_the_prices_units(prices_csv):
  # The network predicts a standardised relative change; a price error is that error times the
  # price the forecast starts from and the change's std, which differs from day to day.
  prepared = timeseries.prepare(Config(model="gru", data=prices_csv(rows=300), target_column="Close",
                                       date_column="Date", window=10))
  model = MODELS["gru"](prepared.input_shape)
  parts = loop.Loop(model, OPTIMIZERS["gru"](1e-3), loop.squared_error, prepared.make_dataset,
                    tf.distribute.get_strategy(), 32)
  parts.validate()
  got = summaries.validation_metrics("forecast", prepared.preprocessing, parts.val_sums)
  split, rows = prepared.summary["split"], prepared.summary["rows"]
  first = rows - split["test"]["rows"] - split["validation"]["rows"]  # the first validation target's row
  prices = pd.read_csv(prices_csv(rows=300))["Close"].to_numpy(np.float64)
  forecasts = timeseries.forecast(model, prepared.preprocessing, prices[first - 1 - 10:, None])
  expected = report.metrics(prices[first:first + split["validation"]["rows"]],
                            forecasts[:split["validation"]["rows"]])
  assert got == {"val_rmse": pytest.approx(expected["rmse"], rel=1e-4),
                 "val_mae": pytest.approx(expected["mae"], rel=1e-4)}


def test_a_classifiers_validation_metric_is_its_accuracy():
  rng = np.random.default_rng(0)
  images, labels = rng.random((100, 24, 24, 3)).astype(np.float32), rng.integers(0, 4, 100)

  def make_dataset(split, batch_size, input_context=None, epoch=0):
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)

  model = MODELS["cnn"]((24, 24, 3), 4)
  parts = loop.Loop(model, OPTIMIZERS["cnn"](1e-3), loop.cross_entropy, make_dataset, tf.distribute.get_strategy(),
                    32)
  parts.validate()
  expected = np.mean(np.argmax(model(images).numpy(), axis=-1) == labels)
  assert summaries.validation_metrics("images", {}, parts.val_sums) == {"val_accuracy": pytest.approx(expected)}


def test_an_epochs_steps_are_known_from_the_datas_size(table_csv, prices_csv):
  for prepared in (tabular.prepare(Config(model="dense", data=table_csv(rows=300), target_column="y")),
                   timeseries.prepare(Config(model="gru", data=prices_csv(rows=300), target_column="Close",
                                             date_column="Date", window=10)),
                   images.prepare(Config(model="cnn", image_size=32))):
    batches = sum(1 for _ in prepared.make_dataset("train", 32))
    assert summaries.steps_per_epoch(prepared, 32) == batches
    assert summaries.steps_per_epoch(prepared, 32, num_workers=2) is None  # shards: the first epoch says


@pytest.mark.parametrize("flag, message", [
    ({"profile_steps": "5"}, "--profile_steps='5': give START,END"),
    ({"profile_steps": "6,5"}, "--profile_steps='6,5': give START,END"),
    ({"profile_steps": "0,5"}, "--profile_steps='0,5': give START,END"),
    ({"log_every_steps": -1}, "--log_every_steps must be 0"),
])
def test_watch_flags_are_checked(flag, message):
  from trainer.errors import UserError
  with pytest.raises(UserError, match=re.escape(message)):
    Config(**flag)
  assert Config(profile_steps="3,6").profile_range == (3, 6) and Config().profile_range is None


@pytest.mark.parametrize("per_call, start, end, step, expected", [
    (1, 3, 6, 0, [("start", 1), ("stop", 6)]),  # step by step: step 3 is queued once on_step has seen step 1
    (10, 3, 6, 0, [("start", -10), ("stop", 10)]),  # both in the first call: started before it
    (10, 25, 40, 0, [("start", 10), ("stop", 40)]),  # steps 21-30 are queued once on_step has seen step 10
    (10, 3, 6, 20, []),  # a job resumed past the range: no trace
])
def test_the_profile_covers_the_calls_that_hold_its_steps(monkeypatch, tmp_path, per_call, start, end, step,
                                                          expected):
  # When the profiler starts and stops, by the step on_step saw last (construction: the one before the first call).
  seen, events = [step - per_call], []
  monkeypatch.setattr(tf.profiler.experimental, "start", lambda log_dir: events.append(("start", seen[0])))
  monkeypatch.setattr(tf.profiler.experimental, "stop", lambda: events.append(("stop", seen[0])))
  profiler = summaries.Profiler(str(tmp_path), start, end, per_call, step)
  for seen[0] in range(step + per_call, 100, per_call):
    profiler(seen[0])
  assert events == expected


@pytest.mark.parametrize("schedule", [None, "cosine"])
def test_the_learning_rate_of_a_mirrored_optimizer_is_read(schedule):
  """Under MirroredStrategy a constant learning rate is a MirroredVariable, which float() refused: the
  first progress line (30 s into a mirrored job) stopped it with a TypeError."""
  strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  rate = tf.keras.optimizers.schedules.CosineDecay(1e-3, 100) if schedule else 1e-3
  with strategy.scope():
    model = MODELS["dense"]((5,))
    optimizer = OPTIMIZERS["dense"](rate)
    optimizer.build(model.trainable_variables)
  assert summaries.learning_rate(optimizer) == pytest.approx(1e-3)
