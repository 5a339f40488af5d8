"""Strategies on logical CPUs (two, from conftest.py), batch splitting, and who writes where."""

import os
import sys

import forked
import pytest
import tensorflow as tf
from processes import cluster_env, free_ports, run_cluster, wait_for_line

from trainer import distribution, errors, train
from trainer.cluster import Cluster
from trainer.config import Config, UserError

# Tests that start trainer processes or train whole models are marked slow: the fast tier leaves them out.

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


@pytest.mark.parametrize("workers, gpus, cpu_devices, expected", [
    (1, 0, 0, "default"),
    (1, 1, 0, "one_device"),  # one GPU: batches prefetched to it, which the default strategy does not do
    (1, 2, 0, "mirrored"),
    (1, 0, 2, "mirrored"),
    (2, 1, 0, "multi_worker_mirrored"),
])
def test_auto_picks_one_device_on_one_gpu(workers, gpus, cpu_devices, expected):
  assert distribution.auto_strategy(workers, gpus, cpu_devices) == expected


def test_mirrored_without_a_gpu_or_cpu_devices_is_refused():
  # The GPU image sometimes registers no GPU: a mirrored job would train on the CPU unnoticed.
  with pytest.raises(UserError, match="^--strategy=mirrored found no GPU; .* or give --cpu_devices=N"):
    distribution.make_strategy("mirrored", ALONE, 0)


@pytest.mark.parametrize("strategy, communication, message", [
    ("multi_worker_mirrored", "nccl", "^--communication=nccl needs a GPU on every worker and this one has none"),
    ("mirrored", "ring", "^--communication=ring is multi_worker_mirrored's"),
])
def test_communication_that_cannot_work_here_is_refused(strategy, communication, message):
  with pytest.raises(UserError, match=message):
    distribution.make_strategy(strategy, ALONE, 2, communication)


@pytest.mark.parametrize("flag, implementation", [("auto", "AUTO"), ("ring", "RING"), ("nccl", "NCCL")])
def test_communication_options(flag, implementation):
  options = distribution.communication_options(flag)
  assert options.implementation == tf.distribute.experimental.CommunicationImplementation[implementation]


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_refusals_are_one_line_and_exit_2(tmp_path):
  for flags in (["--strategy=mirrored"], ["--communication=nccl"]):
    done = forked.run([sys.executable, "-m", "trainer.task", "--model=dense", "--epochs=1", *flags,
                       f"--job_dir={tmp_path / 'job'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == errors.USER_ERROR, (flags, done.stderr[-2000:])
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and last.startswith("trainer: error: --"), flags


def test_a_cluster_needs_the_multi_worker_strategy():
  cluster = Cluster(spec=TWO_WORKERS, task_type="worker", task_index=0, source="TF_CONFIG")
  with pytest.raises(UserError, match="names 2 tasks, but --strategy=mirrored runs on one host"):
    distribution.make_strategy("mirrored", cluster)


def test_global_batch_splits_across_replicas():
  assert distribution.per_replica_batch_size(32, 2) == 16
  with pytest.raises(UserError,
                     match="--batch_size=30 .* does not split evenly across 4 replicas; use a multiple of 4"):
    distribution.per_replica_batch_size(30, 4)


def test_only_the_chief_writes_the_job_folder(tmp_path):
  job_dir = str(tmp_path / "job")
  assert distribution.writable_job_dir(job_dir, ALONE) == job_dir
  worker = Cluster(spec=TWO_WORKERS, task_type="worker", task_index=1, source="TF_CONFIG")
  folder = distribution.writable_job_dir(job_dir, worker)
  assert folder != job_dir and os.path.isdir(folder)
  distribution.cleanup(folder, job_dir)
  assert not os.path.exists(folder)


@pytest.mark.slow
# The GRU, whose step is built as the LSTM's (keras.layers.RNN cells), trains on two logical CPUs
# in test_loop.py's empty-batch test and across two workers below.
@pytest.mark.parametrize("model, data", [
    ("dense", {}),
    ("lstm", {"window": 10}),
    ("cnn", {"image_size": 24, "augment": False}),
])
def test_mirrored_training_on_two_cpus_for_every_family(model, data, tmp_path, prices_csv):
  if "window" in data:  # a shorter series than the built-in one: recurrent steps are slow on logical CPUs
    data = dict(data, data=prices_csv(rows=300), target_column="Close", date_column="Date")
  config = Config(model=model, epochs=2, batch_size=32, strategy="mirrored", cpu_devices=2, learning_rate=3e-3,
                  **data)
  result = train.train_and_evaluate(config, str(tmp_path / "job"))
  assert (result["strategy"], result["num_workers"], result["num_replicas"]) == ("mirrored", 1, 2)
  assert (result["global_batch_size"], result["per_replica_batch_size"]) == (32, 16)
  assert result["history"]["loss"][-1] < result["history"]["loss"][0]
  # What a mirrored job saves is a plain model: it loads outside any strategy.
  import keras
  saved = keras.models.load_model(tmp_path / "job" / "export" / "1" / "model.keras")
  assert saved.count_params() == result["parameters"]


@pytest.mark.parametrize("model", ["dense", "gru", "cnn"])
def test_variables_are_mirrored(model):
  from trainer.models import MODELS
  strategy = distribution.make_strategy("mirrored", ALONE, 2)
  shape = {"dense": (5,), "gru": (10, 1), "cnn": (24, 24, 3)}[model]
  with strategy.scope():
    built = MODELS[model](shape)
  assert {type(v.value).__name__ for v in built.trainable_variables} == {"MirroredVariable"}


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_one_replica_of_64_and_two_of_32_take_the_same_step():
  """The global batch means what it says: the first step's loss and updated weights are the same
  whether 64 examples go to one replica or 32 to each of two."""
  import numpy as np
  from trainer import loop
  from trainer.models import MODELS, OPTIMIZERS
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((64, 5)).astype(np.float32), rng.standard_normal(64).astype(np.float32)

  def one_batch(split, batch_size, input_context=None, epoch=0):
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if input_context is not None:
      dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return dataset.batch(batch_size)

  results = []
  for strategy in (distribution.make_strategy("default", ALONE), distribution.make_strategy("mirrored", ALONE, 2)):
    import keras
    keras.utils.set_random_seed(3)
    with strategy.scope():
      model = MODELS["dense"]((5,))
      optimizer = OPTIMIZERS["dense"](1e-2)
      optimizer.build(model.trainable_variables)
    history = loop.fit(model, optimizer, loop.squared_error, one_batch, strategy, 64, epochs=1, patience=1)
    results.append((history["loss"][0], model.get_weights()))
  (loss_1, weights_1), (loss_2, weights_2) = results
  assert loss_1 == pytest.approx(loss_2, rel=1e-5)
  for a, b in zip(weights_1, weights_2):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(weights_1[0], MODELS["dense"]((5,)).get_weights()[0])  # it did move


@pytest.mark.slow
@pytest.mark.parametrize("flags", [{"mixed_precision": True}, {"jit_compile": True}])
def test_speed_flags_train_with_a_falling_loss(flags, tmp_path):
  config = Config(model="dense", epochs=3, batch_size=64, **flags)
  result = train.train_and_evaluate(config, str(tmp_path / "job"))
  assert result["history"]["loss"][-1] < result["history"]["loss"][0] / 2
  assert result["precision"] == ("mixed_bfloat16" if flags.get("mixed_precision") else "float32")
  assert result["test"]["rmse"] < 0.5 * result["baseline"]["rmse"]  # predictions in the data's units, float
  import keras
  assert keras.mixed_precision.global_policy().name == "float32"  # nothing leaks to the next job


@pytest.mark.slow
@pytest.mark.parametrize("model", ["dense", "gru"])
def test_two_workers_on_localhost_train_as_one_job(tmp_path, model):
  """A real MultiWorkerMirroredStrategy job: two trainer processes on 127.0.0.1, the same loop as
  everywhere. Both see the same all-reduced losses; only the chief writes the job folder; the other
  worker's temporary folder is gone at the end. 501 rows leave 321 for training: shares of 161 and
  160 rows, 11 and 10 batches of 16, and the worker that runs out first must not leave the other
  hanging in an all-reduce."""
  import json
  import re
  import sys
  from trainer.data import builtin
  if model == "dense":
    builtin.regression_table(rows=501).to_csv(tmp_path / "table.csv", index=False)
    data = [f"--data={tmp_path / 'table.csv'}", "--target_column=y"]
  else:
    builtin.price_series(days=400).to_csv(tmp_path / "prices.csv", index=False)
    data = [f"--data={tmp_path / 'prices.csv'}", "--target_column=Close", "--date_column=Date", "--window=10"]
  scratch = tmp_path / "scratch"
  scratch.mkdir()
  communication = {"dense": "auto", "gru": "ring"}[model]
  workers = run_cluster([sys.executable, "-m", "trainer.task", f"--model={model}", *data, "--epochs=2",
                         "--batch_size=32", f"--communication={communication}", f"--job_dir={tmp_path / 'job'}"], 2,
                        env={"TMPDIR": str(scratch)})
  assert [w.returncode for w in workers] == [0, 0], workers[0].stderr[-3000:] + workers[1].stderr[-3000:]
  assert all(f"all-reduce between workers: {communication.upper()}" in w.stderr for w in workers)
  losses = [re.findall(r"epoch \d+/2  loss (\S+)", w.stderr) for w in workers]
  assert len(losses[0]) == 2 and losses[0] == losses[1]
  checksums = [re.findall(r"final weights checksum (\S+)", w.stderr) for w in workers]
  assert len(checksums[0]) == 1 and checksums[0] == checksums[1]  # the same final weights
  report = json.loads((tmp_path / "job" / "report.json").read_text())
  assert (report["strategy"], report["num_workers"], report["num_replicas"]) == ("multi_worker_mirrored", 2, 2)
  assert report["per_replica_batch_size"] == 16
  if model == "dense":
    assert report["data"]["split"]["train"]["rows"] == 321
  assert sorted(os.listdir(tmp_path / "job")) == ["checkpoints", "export", "logs", "plots", "report.json"]
  assert not [p for p in scratch.iterdir() if p.name.startswith("trainer-worker1-")]


@pytest.mark.slow
def test_a_dead_worker_fails_the_job_within_seconds(tmp_path):
  """One of two workers killed mid-run: the survivor fails on its own within seconds instead
  of waiting forever in an all-reduce (no launcher stops it here)."""
  import signal
  import subprocess
  import sys
  ports = free_ports(2)
  workers = [forked.popen(
      [sys.executable, "-m", "trainer.task", "--model=dense", "--epochs=500", "--patience=500",
       f"--job_dir={tmp_path / 'job'}"], env=cluster_env(ports, i), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  try:
    wait_for_line(workers[1], "epoch 2/500")
    workers[1].send_signal(signal.SIGKILL)
    # A code that restart policies retry, and one line saying why: the job resumes when restarted. (Waiting
    # forever in an all-reduce would run into the timeout: 500 epochs take far longer.)
    assert workers[0].wait(timeout=120) == errors.WORKER_LOST
    last = workers[0].stderr.read().strip().splitlines()[-1]
    assert last.startswith("trainer: another worker of this job was lost (") and "Traceback" not in last
  finally:
    for worker in workers:
      worker.kill()
      worker.wait()


@pytest.mark.slow
def test_lstm_on_two_replicas_with_an_odd_number_of_batches_as_a_user_runs_it(tmp_path):
  """`python -m trainer.task --model=lstm --strategy=mirrored --cpu_devices=2` as a user runs it: a
  process of its own splits its CPU itself (not conftest's split; a forked one has made no device
  yet either), and an odd number of per-replica
  batches hands replica 1 an empty batch on each epoch's last step, in training and validation."""
  import re
  import sys
  from trainer.data import builtin
  builtin.price_series(days=285).to_csv(tmp_path / "prices.csv", index=False)
  done = forked.run(
      [sys.executable, "-m", "trainer.task", "--model=lstm", "--strategy=mirrored", "--cpu_devices=2", "--epochs=1",
       f"--data={tmp_path / 'prices.csv'}", "--target_column=Close", "--date_column=Date", "--window=10",
       f"--job_dir={tmp_path / 'job'}"], capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "strategy mirrored: 2 replica(s) on 1 worker(s)" in done.stderr  # --cpu_devices split a fresh process's CPU
  train, validation = map(int, re.search(r"windows of 10: (\d+) train, (\d+) validation", done.stderr).groups())
  assert [-(-n // 16) % 2 for n in (train, validation)] == [1, 1]  # odd: the premise of this test
  assert re.search(r"epoch 1/1  loss \d", done.stderr)
