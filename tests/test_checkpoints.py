"""trainer.checkpoints on a local folder and on the real storage emulator."""

import builtins
import errno
import logging
import os
import re
import shutil
import tempfile
import threading
import types

import numpy as np
import pytest
import tensorflow as tf

from trainer import storage, transfer
from trainer.checkpoints import Checkpoints
from trainer.errors import UserError
from trainer.fingerprints import data_change, data_fingerprint, with_extent
from trainer.models import MODELS, OPTIMIZERS
from trainer.storage import StorageError


@pytest.fixture
def root(storage_root):
  return storage_root + "/checkpoints"


def make(root, keep=3):
  """A GRU (it has dropout, whose random state must be saved too) with a built optimizer."""
  model = MODELS["gru"]((5, 1))
  optimizer = OPTIMIZERS["gru"](1e-3)
  optimizer.build(model.trainable_variables)
  return model, optimizer, Checkpoints(root, model, optimizer, keep=keep, info={"config": {"model": "gru"}})


def train_a_step(model, optimizer):
  x, y = tf.random.normal((4, 5, 1)), tf.random.normal((4,))
  with tf.GradientTape() as tape:
    loss = tf.reduce_mean((model(x, training=True)[:, 0] - y) ** 2)
  optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))


def variables(model, optimizer):
  return [v.numpy() for v in model.variables + optimizer.variables]


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_restore_brings_back_weights_optimizer_dropout_state_and_loop_state(root):
  model, optimizer, checkpoints = make(root)
  assert checkpoints.restore_latest() is None
  train_a_step(model, optimizer)
  best = [w * 2 for w in model.get_weights()]
  checkpoints.save(7, {"epoch": 1, "step": 2}, best)
  saved = variables(model, optimizer)
  assert any("seed_generator" in v.path for v in model.variables)  # dropout's state is among them

  model2, optimizer2, checkpoints2 = make(root)
  assert not all(np.array_equal(a, b) for a, b in zip(saved, variables(model2, optimizer2)))
  step, state, best_weights, _ = checkpoints2.restore_latest()
  assert (step, state) == (7, {"config": {"model": "gru"}, "epoch": 1, "step": 2})
  for a, b in zip(saved, variables(model2, optimizer2)):
    np.testing.assert_array_equal(a, b)
  assert int(optimizer2.iterations) == 1
  for a, b in zip(best, best_weights):
    np.testing.assert_array_equal(a, b)


def test_keeps_the_newest_and_cleans_leftovers(root):
  model, optimizer, checkpoints = make(root, keep=2)
  checkpoints.save(1, {"n": 1}, None)
  # A folder without state.json, as a killed upload leaves it: not a checkpoint, and cleaned up.
  storage.write_text(storage.join(root, "ckpt-2", "ckpt.index"), "partial")
  assert checkpoints.complete() == [1]
  for step in (3, 4, 5):
    checkpoints.save(step, {"n": step}, None)
  assert checkpoints.complete() == [4, 5]
  assert storage.list_dir(root) == ["ckpt-4", "ckpt-5"]
  checkpoints.remove_all()
  assert storage.list_dir(root) == []


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(root, caplog):
  model, optimizer, checkpoints = make(root)
  checkpoints.save(1, {"n": 1}, None)
  first = model.get_weights()
  train_a_step(model, optimizer)
  checkpoints.save(2, {"n": 2}, None)
  data = storage.join(root, "ckpt-2", "ckpt.data-00000-of-00001")
  storage.write_bytes(data, storage.read_bytes(data)[:100])  # truncated

  model2, _, checkpoints2 = make(root)
  with caplog.at_level(logging.WARNING):
    step, state, _, _ = checkpoints2.restore_latest()
  assert (step, state["n"]) == (1, 1)
  assert any("ckpt-2 cannot be read" in r.getMessage() and "trying the one before it" in r.getMessage()
             for r in caplog.records)
  for a, b in zip(first, model2.get_weights()):
    np.testing.assert_array_equal(a, b)

  storage.write_text(storage.join(root, "ckpt-1", "state.json"), "{not json")
  with pytest.raises(UserError, match=r"none of the 2 checkpoints in .* can be read; use --restart"):
    make(root)[2].restore_latest()


@pytest.mark.slow  # waits out the storage timeouts of a stopped emulator
def test_an_unreachable_bucket_is_an_error_not_a_fresh_start(gcs_emulator, outage_timeout):
  root = gcs_emulator.new_bucket() + "/checkpoints"
  model, optimizer, checkpoints = make(root)
  checkpoints.save(1, {"n": 1}, None)
  gcs_emulator.stop()
  try:
    with pytest.raises(StorageError, match=root.split("/")[2]):
      make(root)[2].restore_latest()
    with pytest.raises(StorageError):
      checkpoints.save(2, {"n": 2}, None)
  finally:
    gcs_emulator.start()
  assert make(root)[2].restore_latest()[0] == 1


def test_non_chief_workers_write_nothing(tmp_path):
  model, optimizer, _ = make(str(tmp_path))
  Checkpoints(str(tmp_path / "c"), model, optimizer, publish=False).save(1, {}, None)
  assert not os.path.exists(tmp_path / "c")


def test_a_checkpoint_is_on_disk_before_older_ones_are_pruned(tmp_path, monkeypatch):
  """A power loss cannot be pulled in a test; the order of the calls that make it survivable can be
  recorded: every file and folder of the copy fsynced before its rename, the parent after it, and
  no older checkpoint removed before that."""
  root = str(tmp_path / "checkpoints")
  model, optimizer, checkpoints = make(root, keep=1)
  checkpoints.save(1, {"n": 1}, None)
  events = []
  fsync, rename, unlink, rmtree = os.fsync, os.rename, os.unlink, shutil.rmtree
  monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                               fsync(fd)))
  monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", a, b)), rename(a, b)))
  monkeypatch.setattr(os, "unlink", lambda p, *a, **k: (events.append(("remove", str(p))), unlink(p, *a, **k)))
  monkeypatch.setattr(os, "remove", os.unlink)
  monkeypatch.setattr(shutil, "rmtree", lambda p, *a, **k: (events.append(("remove", str(p))), rmtree(p, *a, **k)))
  checkpoints.save(2, {"n": 2}, None)
  [at] = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == os.path.join(root, "ckpt-2")]
  temp = events[at][1]
  files = {os.path.join(temp, name) for name in os.listdir(os.path.join(root, "ckpt-2"))}
  synced = {e[1] for e in events[:at] if e[0] == "fsync"}
  assert files | {temp} <= synced, sorted(files | {temp} - synced)
  parent = events.index(("fsync", root))
  assert parent > at
  pruned = [i for i, e in enumerate(events) if e[0] == "remove" and "ckpt-1" in e[1]]
  assert pruned and min(pruned) > parent, events
  assert storage.list_dir(root) == ["ckpt-2"]


def test_a_pruned_checkpoint_loses_its_marker_first(root, monkeypatch):
  """A prune killed half way must not leave a marker beside part of the data (on gs:// objects
  were deleted in name order: state.json last)."""
  model, optimizer, checkpoints = make(root, keep=1)
  checkpoints.save(1, {"n": 1}, None)
  removed = []
  if storage.is_remote(root):
    from google.cloud.storage import Blob
    delete = Blob.delete
    monkeypatch.setattr(Blob, "delete", lambda self, *a, **k: (removed.append(self.name), delete(self, *a, **k)))
  else:
    unlink = os.unlink
    monkeypatch.setattr(os, "unlink", lambda p, *a, **k: (removed.append(str(p)), unlink(p, *a, **k)))
    monkeypatch.setattr(os, "remove", os.unlink)
  checkpoints.save(2, {"n": 2}, None)
  removed = [name for name in removed if "ckpt-1" in name]
  assert removed and removed[0].endswith("ckpt-1/state.json"), removed
  assert checkpoints.complete() == [2]


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_the_same_step_saved_again_replaces_it(root):
  model, optimizer, checkpoints = make(root, keep=1)
  checkpoints.save(5, {"n": 1}, None)
  checkpoints.save(5, {"n": 2}, None)
  assert storage.list_dir(root) == ["ckpt-5"]
  assert make(root)[2].restore_latest()[1]["n"] == 2
  # As a save killed after its first copy leaves it: the .new copy is the newer one, and read first.
  transfer.publish_dir(transfer.local_path(storage.join(root, "ckpt-5")), storage.join(root, "ckpt-5.new"),
                      last=("state.json",))
  storage.write_text(storage.join(root, "ckpt-5.new", "state.json"), '{"config": {"model": "gru"}, "n": 3}')
  again = make(root)[2]
  restored = again.restore_latest()
  assert again.complete() == [5] and restored.state["n"] == 3
  assert restored.folder == storage.join(root, "ckpt-5.new")
  again.save(5, {"n": 4}, None)
  assert storage.list_dir(root) == ["ckpt-5"]
  assert make(root)[2].restore_latest()[1]["n"] == 4


def test_folder_names_with_other_digits_are_not_checkpoints(tmp_path):
  root = str(tmp_path)
  storage.write_text(os.path.join(root, "ckpt-\u0663", "state.json"), "{}")  # ARABIC-INDIC DIGIT THREE
  model, optimizer, checkpoints = make(root)
  assert checkpoints.complete() == [] and checkpoints.restore_latest() is None
  checkpoints.save(1, {"n": 1}, None)
  checkpoints.remove_all()
  assert storage.list_dir(root) == ["ckpt-\u0663"]


@pytest.mark.parametrize("name", ["state.json", "best.npz", "ckpt.data-00000-of-00001"])
def test_a_read_error_is_a_storage_failure_not_a_corrupt_checkpoint(tmp_path, monkeypatch, name):
  root = str(tmp_path)
  model, optimizer, checkpoints = make(root)
  checkpoints.save(1, {"n": 1}, None)
  checkpoints.save(2, {"n": 2}, None)
  failing = os.path.join(root, "ckpt-2", name)
  if name.startswith("ckpt."):
    # TensorFlow reads its files itself and says only that it failed: let it fail (a short read),
    # and the OS refuse the same file to Python, as an NFS server answering EIO refuses both.
    storage.write_bytes(failing, storage.read_bytes(failing)[:100])
  real_open = builtins.open

  def open_with_eio(file, *args, **kwargs):  # an NFS server that answers EIO for one file
    if str(file) == failing:
      raise OSError(errno.EIO, os.strerror(errno.EIO), str(file))
    return real_open(file, *args, **kwargs)
  monkeypatch.setattr(builtins, "open", open_with_eio)
  with pytest.raises(StorageError, match=rf"^cannot read {re.escape(failing)}: Input/output error$"):
    make(root)[2].restore_latest()


def test_a_check_refuses_a_checkpoint_before_its_variables_are_read(root):
  model, optimizer, checkpoints = make(root)
  checkpoints.save(1, {"n": 1}, None)
  dense = MODELS["dense"]((5,))
  other = Checkpoints(root, dense, OPTIMIZERS["dense"](1e-3))

  def check(state):
    if state["config"]["model"] != "dense":
      raise UserError("another model")
  with pytest.raises(UserError, match="^another model$"):
    other.restore_latest(check)


def test_data_fingerprints_of_files_folders_and_globs(storage_root):
  def at(*names):
    return storage.join(storage_root, *names)
  for name in ("images/cat/1.png", "images/dog/2.png", "shards/train-0.tfrecord", "shards/other.txt"):
    storage.write_bytes(at(*name.split("/")), name.encode())
  storage.write_text(at("test.csv"), "a,y\n1,2\n")

  def fingerprints(data, test_data=None):
    return with_extent(data_fingerprint(types.SimpleNamespace(data=data, test_data=test_data)),
                       {"split": {"test": {"rows": 1}}})

  before = fingerprints(at("images"), at("test.csv"))
  assert before["data"]["files"] == 2 and before["test_data"]["rows"] == 1
  storage.write_text(at("test.csv"), "a,y\n1,2\n")  # rewritten, the same bytes
  assert data_change(before, fingerprints(at("images"), at("test.csv"))) is None
  storage.write_text(at("test.csv"), "a,y\n1,3\n")  # the same size, other contents
  assert data_change(before, fingerprints(at("images"), at("test.csv"))).startswith(
      f"--test_data={at('test.csv')} changed since the checkpoint was written (")
  storage.write_bytes(at("images", "dog", "3.png"), b"new")
  assert data_change(before, fingerprints(at("images"), at("test.csv"))).startswith(
      f"--data={at('images')} changed since the checkpoint was written (files 2 -> 3, bytes 32 -> 35")

  shards = fingerprints(at("shards", "train-*.tfrecord"))
  storage.write_bytes(at("shards", "other.txt"), b"not a shard, whatever it holds")
  assert data_change(shards, fingerprints(at("shards", "train-*.tfrecord"))) is None
  storage.write_bytes(at("shards", "train-1.tfrecord"), b"another shard")
  assert "files 1 -> 2" in data_change(shards, fingerprints(at("shards", "train-*.tfrecord")))
  assert fingerprints(None) == {} and fingerprints("tfds:cifar10") == {}
  assert data_change(None, before) is None  # a checkpoint written before fingerprints


def test_storage_stat_tells_versions_apart(storage_root):
  path = storage.join(storage_root, "data.csv")
  storage.write_text(path, "a\n1\n")
  first = storage.stat(path)
  assert first["size"] == 4 and first["checksum"].startswith("crc32c:" if storage.is_remote(path) else "sha256:")
  storage.write_text(path, "a\n2\n")
  assert storage.stat(path)["checksum"] != first["checksum"]
  with pytest.raises(FileNotFoundError):
    storage.stat(storage.join(storage_root, "missing.csv"))


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_the_fingerprint_is_of_the_data_as_it_was_read(table_csv, tmp_path, monkeypatch):
  """A file rewritten while the job reads it (a nightly ETL landing mid-read) must not be recorded
  as the data the job trained on: the fingerprint is taken before the read."""
  import json
  import types
  from trainer import train
  from trainer.config import Config
  path = table_csv(rows=300)
  config = Config(model="dense", data=path, target_column="y", epochs=1)
  read = data_fingerprint(config)["data"]["checksum"]
  real = train.DATA["dense"]

  def prepare_then_rewritten(config):
    prepared = real.prepare(config)
    table_csv(rows=301)  # the same file, rewritten with one row more, after this job read it
    return prepared

  monkeypatch.setitem(train.DATA, "dense", types.SimpleNamespace(prepare=prepare_then_rewritten))
  train.train_and_evaluate(config, str(tmp_path / "job"))
  (state,) = (tmp_path / "job" / "checkpoints").glob("ckpt-*/state.json")
  assert json.loads(state.read_text())["data"]["data"]["checksum"] == read


# Asynchronous saves (trainer.loop's default): the variables are copied on the caller's thread,
# written and published on another.

def stalled_at(monkeypatch, owner, name, when=lambda *args, **kwargs: True):
  """Patches owner.name so that a call for which when(*args, **kwargs) holds waits until the test
  releases it (the returned Event; two minutes at most), on whatever thread it runs."""
  release, original = threading.Event(), getattr(owner, name)

  def stalled(*args, **kwargs):
    if when(*args, **kwargs):
      assert release.wait(120), f"{name} never released"
    return original(*args, **kwargs)
  monkeypatch.setattr(owner, name, stalled)
  return release


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_a_background_save_holds_the_variables_as_they_were_when_it_was_asked(root, monkeypatch):
  model, optimizer, checkpoints = make(root)
  train_a_step(model, optimizer)
  saved = variables(model, optimizer)
  # Stalled before anything is written: the save is under way, its staging folder not yet made.
  release = stalled_at(monkeypatch, tempfile, "mkdtemp", lambda prefix=None: prefix == "trainer-ckpt-")
  saving = checkpoints.save(1, {"n": 1}, None, background=True)
  train_a_step(model, optimizer)  # training goes on meanwhile
  release.set()
  saving.wait()
  model2, optimizer2, checkpoints2 = make(root)
  checkpoints2.restore_latest()
  for a, b in zip(saved, variables(model2, optimizer2)):
    np.testing.assert_array_equal(a, b)


def linear_data(split, batch_size, input_context=None, epoch=0):
  rng = np.random.default_rng(0 if split == "train" else 1)
  x = rng.standard_normal((256, 5)).astype(np.float32)
  return tf.data.Dataset.from_tensor_slices((x, x.sum(axis=1))).batch(batch_size)  # 8 steps an epoch


@pytest.mark.parametrize("failed, stops_at, boundary", [(3, 6, "the next save"), (6, 8, "the end of the epoch")])
def test_a_failed_background_save_stops_the_job_with_170_at_the_next_boundary(tmp_path, monkeypatch, capsys,
                                                                               failed, stops_at, boundary):
  """Saves every 3 steps, epochs of 8: the upload of ckpt-<failed> fails on the save's thread while
  training goes on; the job stops at `boundary` with one line, ckpt-3 (or none) left to resume from."""
  from trainer import errors, loop
  from trainer.state import TrainState
  model, optimizer = MODELS["dense"]((5,)), OPTIMIZERS["dense"](1e-2)
  optimizer.build(model.trainable_variables)
  checkpoints = Checkpoints(str(tmp_path), model, optimizer)
  publish = transfer.publish_dir

  def failing(local_dir, dest, last=()):
    if dest.endswith(f"/ckpt-{failed}"):
      raise StorageError(f"cannot write {dest}/state.json: injected")
    return publish(local_dir, dest, last)
  monkeypatch.setattr(transfer, "publish_dir", failing)
  state = TrainState()
  with pytest.raises(SystemExit) as stopped, errors.exiting():
    loop.fit(model, optimizer, loop.squared_error, linear_data, tf.distribute.get_strategy(), 32, 2, 2,
             checkpointing=loop.Checkpointing(checkpoints, every_steps=3), state=state)
  assert stopped.value.code == errors.STORAGE_FAILURE
  assert state.global_step == stops_at  # the boundary after the failed save, no further
  line = capsys.readouterr().err
  kept = f"checkpoint {tmp_path / 'ckpt-3'} is intact" if failed > 3 else "no checkpoint was saved before it"
  assert line == (f"trainer: error: checkpoint {tmp_path / f'ckpt-{failed}'} was not saved: cannot write "
                  f"{tmp_path / f'ckpt-{failed}'}/state.json: injected; {kept}: run the same command again to "
                  "resume from it\n"), line
  assert checkpoints.complete() == ([3] if failed > 3 else [])
  if failed > 3:
    assert Checkpoints(str(tmp_path), model, optimizer).restore_latest().state["global_step"] == 3


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_a_mirrored_model_saved_in_the_background_restores_outside_any_strategy(tmp_path):
  """The host copy reads distributed variables (here mirrored on two logical CPUs) on the caller's thread."""
  from trainer import distribution
  from trainer.cluster import Cluster
  strategy = distribution.make_strategy("mirrored", Cluster({}, "worker", 0, "none"), cpu_devices=2)
  with strategy.scope():
    model, optimizer, checkpoints = make(str(tmp_path))
  rng = np.random.default_rng(0)
  for v in model.weights:
    v.assign(rng.standard_normal(v.shape).astype(np.float32))
  saved = [v.numpy() for v in model.weights]
  checkpoints.save(1, {"n": 1}, None, background=True).wait()
  model2, _, checkpoints2 = make(str(tmp_path))
  checkpoints2.restore_latest()
  for a, b in zip(saved, model2.weights):
    np.testing.assert_array_equal(a, b.numpy())


def test_a_divergence_during_a_background_save_names_it_once_complete_and_nothing_is_saved_after(tmp_path,
                                                                                                  monkeypatch):
  """ckpt-4 (saves every 4 steps, keep 1) is stalled in its publication when step 5's loss is read as
  NaN (injected): the divergence waits for it, names it, and no checkpoint follows."""
  from trainer import loop
  model, optimizer = MODELS["dense"]((5,)), OPTIMIZERS["dense"](1e-2)
  optimizer.build(model.trainable_variables)
  checkpoints = Checkpoints(str(tmp_path), model, optimizer, keep=1)
  release = stalled_at(monkeypatch, transfer, "publish_dir", lambda local, dest, last=(): dest.endswith("/ckpt-4"))
  read = loop.StepResult.read.__func__

  def nan_at_step_5(cls, sums, step):
    result = read(cls, sums, step)
    if step != 5:
      return result
    release.set()  # the save goes on only now: the NaN is read while it is under way
    return loop.StepResult(step, float("nan"), result.count, result.stop)
  monkeypatch.setattr(loop.StepResult, "read", classmethod(nan_at_step_5))
  with pytest.raises(loop.Diverged) as diverged:
    loop.fit(model, optimizer, loop.squared_error, linear_data, tf.distribute.get_strategy(), 32, 2, 2,
             checkpointing=loop.Checkpointing(checkpoints, every_steps=4))
  assert str(diverged.value) == (f"training diverged: the loss is nan at step 5 (epoch 1); checkpoint "
                                 f"{tmp_path / 'ckpt-4'} is kept; resume from it with a lower --learning_rate "
                                 "or with --clip_norm=1")
  assert checkpoints.complete() == [4]
