"""Preemption and resume with real trainer processes, real signals and the real storage emulator:
every scenario on a local job folder and on a gs:// one."""

import json
import os
import re
import shutil
import signal
import socket

import numpy as np
import pandas as pd
import pytest
from processes import Job, run, stalled

from trainer import errors, storage

pytestmark = pytest.mark.slow  # trainer processes or whole trainings: not in the fast tier

ROWS = 700  # GRU epochs of ~30 steps

# Fixtures are session-scoped: conftest.py orders tests by their duration, across modules.


@pytest.fixture(scope="session")
def prices(tmp_path_factory):
  rng = np.random.default_rng(0)
  close = 50 * np.exp(np.cumsum(0.0005 + 0.015 * rng.standard_normal(ROWS)))
  path = tmp_path_factory.mktemp("data") / "prices.csv"
  pd.DataFrame({"Date": pd.bdate_range("2010-01-01", periods=ROWS).strftime("%Y-%m-%d"),
                "Close": close.round(3)}).to_csv(path, index=False)
  return str(path)


def gru_flags(prices, job_dir, *extra):
  return ["--model=gru", f"--data={prices}", "--target_column=Close", "--date_column=Date", "--window=10",
          "--epochs=2", "--batch_size=16", f"--job_dir={job_dir}", *extra]


def dense_flags(job_dir, *extra):
  return ["--model=dense", "--epochs=2", f"--job_dir={job_dir}", *extra]


def report(job_dir):
  return json.loads(storage.read_text(storage.join(job_dir, "report.json")))


def complete_checkpoints(job_dir):
  folder = storage.join(job_dir, "checkpoints")
  return [n for n in storage.list_dir(folder)
          if re.fullmatch(r"ckpt-\d+", n) and "state.json" in storage.list_dir(storage.join(folder, n))]


@pytest.fixture(scope="session")
def uninterrupted(prices, tmp_path_factory):
  """(report, steps per epoch) of the GRU job run from start to end without a signal."""
  job_dir = str(tmp_path_factory.mktemp("reference") / "job")
  code, job = run(gru_flags(prices, job_dir))
  assert code == 0, job.stderr[-3000:]
  first, second = sorted(int(name[5:]) for name in complete_checkpoints(job_dir))  # each epoch's end
  assert second == 2 * first
  return report(job_dir), first


# On Cloud Storage only, and the background save's test below on a local folder only: the two flows
# are the same on both (a checkpoint's writes go through trainer.storage, tested on both in
# test_checkpoints.py); one trainer run of each pair saves ~35 s of the suite.
@pytest.mark.parametrize("storage_root", ["gcs"], indirect=True)
def test_sigterm_mid_epoch_saves_exits_143_and_the_rerun_ends_as_if_never_stopped(prices, storage_root, uninterrupted):
  """The signal arrives while the step checkpoint half way into epoch 2 (--checkpoint_every_steps) is
  published, at that exact point: the flag rides in the next step's all-reduce and is read one step
  later, so the job stops after step K + 2 and saves it. The rerun resumes there."""
  uninterrupted, epoch_steps = uninterrupted
  every = epoch_steps + epoch_steps // 2
  job_dir = f"{storage_root}/gru"
  # One step per call, so that step K is a call boundary and the flag is read one step late (calls of several
  # steps: tests/test_steps.py); synchronous saves, so that the stall holds training itself and the signal's
  # step is known exactly. The uninterrupted run took the defaults: results are the same for any of these.
  flags = gru_flags(prices, job_dir, f"--checkpoint_every_steps={every}", "--steps_per_loop=1",
                    "--async_checkpoints=false")
  job = Job(flags, command=stalled("trainer.task", rename=rf"/ckpt-{every}$", upload=rf"/ckpt-{every}/state\.json$",
                                   until_signal=True))
  job.wait_for("^STALLED")
  job.signal(signal.SIGTERM)
  assert job.finish() == 143
  stopped = re.fullmatch(r"trainer: stopped by SIGTERM at step (\d+); checkpoint (\S+) saved; run the same command "
                         r"again to resume \(exit code 143\)", job.last_line())
  assert stopped, job.stderr[-2000:]
  step = int(stopped.group(1))
  assert step == every + 2, job.stderr[-2000:]
  assert complete_checkpoints(job_dir) == [f"ckpt-{every}", f"ckpt-{step}"]  # the step checkpoint, the signal's

  code, rerun = run(flags)
  assert code == 0, rerun.stderr[-3000:]
  assert re.search(rf"resuming from \S+ckpt-{step}: 1 epochs done, {step - epoch_steps} steps into epoch 2",
                   rerun.stderr), rerun.stderr[-3000:]
  result = report(job_dir)
  assert result["resumed_from"]["epoch"] == 1 and result["resumed_from"]["step"] > 0  # mid-epoch
  # Same seed, same data order from the saved step on, dropout's random state restored: exactly equal.
  assert result["history"] == uninterrupted["history"]
  assert result["weights_checksum"] == uninterrupted["weights_checksum"]
  assert result["test"] == uninterrupted["test"]
  # A gs:// job folder holds what a local one does.
  assert storage.list_dir(job_dir) == ["checkpoints", "export", "logs", "plots", "report.json"]
  assert storage.list_dir(storage.join(job_dir, "plots")) == ["forecast.png", "history.png"]
  for split in ("train", "validation"):
    assert [n for n in storage.list_dir(storage.join(job_dir, "logs", split)) if n.startswith("events.out")]
  assert storage.list_dir(storage.join(job_dir, "export")) == ["1"]


@pytest.mark.parametrize("storage_root", ["local"], indirect=True)
def test_sigterm_during_a_background_save_waits_for_it_and_the_rerun_ends_as_if_never_stopped(
    prices, storage_root, uninterrupted):
  """The step checkpoint half way into epoch 1 is published on the save's thread while training goes
  on; SIGTERM arrives while it is stalled there. The job stops at a later step (its flag rides in the
  next step's all-reduce), waits for the stalled save, saves the signal's step and exits 143; the
  rerun resumes from it exactly."""
  uninterrupted, epoch_steps = uninterrupted
  every = epoch_steps // 2
  job_dir = f"{storage_root}/background"
  # One step per call: step `every` is a call boundary, so that is where the save is.
  flags = gru_flags(prices, job_dir, f"--checkpoint_every_steps={every}", "--steps_per_loop=1")
  job = Job(flags, command=stalled("trainer.task", rename=rf"/ckpt-{every}$", upload=rf"/ckpt-{every}/state\.json$",
                                   until_signal=True))
  job.wait_for(rf"^STALLED \S+ckpt-{every}\S* in thread checkpoint saves")
  job.signal(signal.SIGTERM)
  assert job.finish() == 143, job.stderr[-3000:]
  stopped = re.fullmatch(r"trainer: stopped by SIGTERM at step (\d+); checkpoint (\S+) saved; run the same command "
                         r"again to resume \(exit code 143\)", job.last_line())
  assert stopped, job.stderr[-2000:]
  step = int(stopped.group(1))
  assert step > every and stopped.group(2) == storage.join(job_dir, "checkpoints", f"ckpt-{step}")
  # The stalled save was finished, not cut short, and the signal's came after it.
  assert re.search(rf"checkpoint \S+ckpt-{every} saved", job.stderr), job.stderr[-3000:]
  assert f"ckpt-{step}" in complete_checkpoints(job_dir) and f"ckpt-{every}" in complete_checkpoints(job_dir)

  code, rerun = run(flags)
  assert code == 0, rerun.stderr[-3000:]
  assert re.search(rf"resuming from \S+ckpt-{step}: ", rerun.stderr), rerun.stderr[-3000:]
  result = report(job_dir)
  assert result["history"] == uninterrupted["history"]
  assert result["weights_checksum"] == uninterrupted["weights_checksum"]
  assert result["test"] == uninterrupted["test"]


def test_sigkill_while_a_checkpoint_is_written_resumes_from_the_one_before(storage_root, tmp_path):
  """With --checkpoint_every_steps=150 (epochs of 200 steps) from the command line: killed while the
  second step checkpoint is published, the same command resumes from the first, mid-epoch."""
  job_dir = f"{storage_root}/killed"
  flags = dense_flags(job_dir, "--epochs=3", "--checkpoint_every_steps=150")
  # Every checkpoint after the first stalled in the middle of its publication: locally before the
  # rename of the copied folder, on gs:// before state.json is uploaded.
  job = Job(flags, command=stalled("trainer.task", rename=r"/ckpt-[^/]*$", upload=r"/state\.json$", skip=1))
  job.wait_for("STALLED")
  job.signal(signal.SIGKILL)
  assert job.finish() == -signal.SIGKILL
  folder = storage.join(job_dir, "checkpoints")
  assert complete_checkpoints(job_dir) == ["ckpt-150"]  # the first step checkpoint; the second is half written
  assert len(storage.list_dir(folder)) == 2

  code, rerun = run(flags)
  assert code == 0, rerun.stderr[-3000:]
  assert "resuming from " + storage.join(folder, "ckpt-150") + ": 0 epochs done, 150 steps into epoch 1" \
      in rerun.stderr, rerun.stderr[-3000:]
  assert storage.list_dir(folder) == ["ckpt-300", "ckpt-450", "ckpt-600"]  # the half-written one replaced


@pytest.fixture(scope="session")
def one_epoch(tmp_path_factory):
  """A dense job of one epoch, stopped by a second Ctrl-C during its export, which leaves ckpt-200 to
  resume from: (its Job, its job folder). Tests that need such a checkpoint take a copy (one_epoch_copy)."""
  job_dir = str(tmp_path_factory.mktemp("one_epoch") / "job")
  # Stalled in the evaluation and in the export until a signal has gone through the trainer's handler.
  job = Job(dense_flags(job_dir, "--epochs=1"), command=stalled(
      "trainer.task", call=["trainer.report.evaluate", "trainer.export.write_export"], until_signal=True))
  job.wait_for("^STALLED trainer.report.evaluate")
  job.signal(signal.SIGINT)
  job.wait_for("^STALLED trainer.export.write_export")
  job.signal(signal.SIGINT)
  job.finish()
  return job, job_dir


@pytest.fixture
def one_epoch_copy(one_epoch, tmp_path):
  """A job folder holding the one-epoch dense job's checkpoints (ckpt-200)."""
  job_dir = str(tmp_path / "job")
  shutil.copytree(storage.join(one_epoch[1], "checkpoints"), storage.join(job_dir, "checkpoints"))
  assert complete_checkpoints(job_dir) == ["ckpt-200"]
  return job_dir


def test_ctrl_c_during_evaluation_lets_the_job_go_on_and_a_second_one_stops_it_at_once(one_epoch):
  job, job_dir = one_epoch
  # The first Ctrl-C came after training, during evaluation: the job went on to its export (see the
  # fixture), where the second one stopped it at once, without waiting for anything.
  assert job.process.returncode == 130, job.stderr[-3000:]
  assert job.last_line() == ("trainer: stopped at once by a second Ctrl-C, without a checkpoint of this step; the "
                             "last complete checkpoint, if any, is kept (exit code 130)"), job.stderr[-3000:]
  assert "SIGINT received" in job.stderr and "stopped by SIGINT" not in job.stderr
  assert not storage.exists(storage.join(job_dir, "export", "1"))
  assert complete_checkpoints(job_dir) == ["ckpt-200"]  # what the same command resumes from


# One kind of storage only: the storage plays no part in where a NaN stops.
def test_nan_stops_at_its_step_and_leaves_the_last_good_checkpoint_untouched(one_epoch_copy):
  job_dir = one_epoch_copy
  folder = storage.join(job_dir, "checkpoints", "ckpt-200")
  before = {name: storage.read_bytes(storage.join(folder, name)) for name in storage.list_dir(folder)}

  # Resuming with a learning rate this large (a new --learning_rate replaces the saved one) diverges.
  code, diverged = run(dense_flags(job_dir, "--epochs=3", "--learning_rate=1e12"))
  assert code == 2
  assert "learning rate 0.001 from the checkpoint replaced by --learning_rate=1e+12" in diverged.stderr
  assert re.fullmatch(r"trainer: error: training diverged: the loss is (nan|inf) at step \d+ \(epoch 2\); "
                      rf"checkpoint {re.escape(folder)} is kept; resume from it with a lower --learning_rate "
                      r"or with --clip_norm=1",
                      diverged.last_line()), diverged.stderr[-2000:]
  assert complete_checkpoints(job_dir) == ["ckpt-200"]
  assert {name: storage.read_bytes(storage.join(folder, name)) for name in storage.list_dir(folder)} == before

  code, resumed = run(dense_flags(job_dir, "--epochs=2"))
  assert code == 0, resumed.stderr[-3000:]
  assert "resuming from " + folder in resumed.stderr
  assert report(job_dir)["resumed_from"] == {"checkpoint": folder, "epoch": 1, "step": 0, "global_step": 200}


# One kind of storage only: removing checkpoints is what differs on gs://.
@pytest.mark.parametrize("storage_root", ["gcs"], indirect=True)
def test_restart_discards_the_checkpoints(storage_root):
  job_dir = f"{storage_root}/restart"
  assert run(dense_flags(job_dir, "--epochs=2"))[0] == 0
  code, again = run(dense_flags(job_dir, "--epochs=1", "--restart"))
  assert code == 0, again.stderr[-3000:]
  assert report(job_dir)["resumed_from"] is None
  assert complete_checkpoints(job_dir) == ["ckpt-200"]


def test_a_storage_outage_stops_the_job_clearly_and_loses_no_checkpoint(gcs_emulator, outage_timeout):
  job_dir = gcs_emulator.new_bucket() + "/outage"
  job = Job(dense_flags(job_dir, "--epochs=1000", "--patience=1000"))
  try:
    job.wait_for(r"checkpoint \S+ckpt-600 saved")
    gcs_emulator.stop()
    assert job.finish() == errors.STORAGE_FAILURE
    assert re.match(r"trainer: error: .*gs://", job.last_line()), job.stderr[-2000:]
    assert "Traceback" not in job.stderr
    # While storage is down, a restarted job must not mistake it for "no checkpoint".
    code, blind = run(dense_flags(job_dir, "--epochs=1000"))
    assert code == errors.STORAGE_FAILURE and "training from the start" not in blind.stderr
    assert re.match(r"trainer: error: .*gs://", blind.last_line())
  finally:
    gcs_emulator.start()
  kept = complete_checkpoints(job_dir)
  assert "ckpt-600" in kept
  code, resumed = run(dense_flags(job_dir, f"--epochs={int(kept[-1][5:]) // 200 + 1}"))
  assert code == 0, resumed.stderr[-3000:]
  assert f"resuming from {job_dir}/checkpoints/{kept[-1]}" in resumed.stderr
  # Every checkpoint still in the bucket loads.
  from trainer.checkpoints import Checkpoints
  from trainer.models import MODELS, OPTIMIZERS
  model = MODELS["dense"]((5,))
  optimizer = OPTIMIZERS["dense"](1e-3)
  optimizer.build(model.trainable_variables)
  checkpoints = Checkpoints(f"{job_dir}/checkpoints", model, optimizer)
  for step in checkpoints.complete():
    checkpoints._restore(checkpoints.path(step))


def indexed_job_hosts(count):
  """A --indexed_job_hosts pattern whose {index} gives free ports on 127.0.0.1: 127.0.0.1:<P>{index}."""
  for prefix in np.random.default_rng().permutation(np.arange(2000, 6500)):
    sockets = []
    try:
      for index in range(count):
        sockets.append(socket.socket())
        sockets[-1].bind(("127.0.0.1", int(f"{prefix}{index}")))
      return f"127.0.0.1:{prefix}{{index}}"
    except OSError:
      continue
    finally:
      for s in sockets:
        s.close()
  raise AssertionError("no free ports")


def workers(flags, stall_worker_1=()):
  """Two trainer processes of one MultiWorkerMirroredStrategy job on 127.0.0.1, started as the pods
  of a Kubernetes Indexed Job are: JOB_COMPLETION_INDEX, with the hosts and their number in the
  environment, and no TF_CONFIG. stall_worker_1: the stalled.py options that worker 1 runs under."""
  env = {"TRAINER_INDEXED_JOB_HOSTS": indexed_job_hosts(2), "TRAINER_NUM_WORKERS": "2"}
  return [Job(flags, env={**env, "JOB_COMPLETION_INDEX": str(i)},
              **({"command": stalled("trainer.task", **stall_worker_1)} if i and stall_worker_1 else {}))
          for i in range(2)]


# One kind of storage only: gs://, as on a cluster, where the workers share no disk.
@pytest.mark.parametrize("storage_root", ["gcs"], indirect=True)
def test_two_workers_one_sigtermed_both_save_the_same_step_and_resume_from_it(storage_root):
  job_dir = f"{storage_root}/pair"
  flags = dense_flags(job_dir, "--batch_size=64")
  # The non-chief, signalled while it writes its own (unpublished) copy of epoch 1's checkpoint: the
  # chief must notice and save.
  pair = workers(flags, stall_worker_1=dict(call="numpy.savez", until_signal=True))
  pair[1].wait_for("^STALLED")
  pair[1].signal(signal.SIGTERM)
  assert [w.finish() for w in pair] == [143, 143], pair[0].stderr[-2000:] + pair[1].stderr[-2000:]
  assert all(re.search(r"stopped by SIGTERM at step \d+", w.last_trainer_line()) for w in pair), \
      pair[0].stderr[-2000:] + pair[1].stderr[-2000:]
  steps = [re.search(r"stopped by SIGTERM at step (\d+)", w.last_trainer_line()).group(1) for w in pair]
  assert steps[0] == steps[1]
  assert complete_checkpoints(job_dir)[-1] == f"ckpt-{steps[0]}"

  pair = workers(flags)
  assert [w.finish() for w in pair] == [0, 0], pair[0].stderr[-2000:] + pair[1].stderr[-2000:]
  for w in pair:
    assert re.search(rf"resuming from \S+ckpt-{steps[0]}: 1 epochs done", w.stderr), w.stderr[-3000:]
  checksums = [re.search(r"final weights checksum (\S+)", w.stderr).group(1) for w in pair]
  assert checksums[0] == checksums[1]
  assert report(job_dir)["resumed_from"]["global_step"] == int(steps[0])
  assert (report(job_dir)["num_workers"], report(job_dir)["num_replicas"]) == (2, 2)


def test_ctrl_c_saves_and_exits_130(tmp_path):
  job = Job(dense_flags(str(tmp_path / "job"), "--epochs=50"))
  job.wait_for(r"epoch 1/50 ")
  job.signal(signal.SIGINT)
  assert job.finish() == 130
  assert re.fullmatch(r"trainer: stopped by SIGINT at step \d+; .*\(exit code 130\)", job.last_line())


def test_a_job_folder_of_another_job_is_refused(one_epoch_copy):
  job_dir = one_epoch_copy
  code, other = run(dense_flags(job_dir, "--epochs=1", "--seed=7"))
  assert code == 2
  assert other.last_line() == (f"trainer: error: {job_dir}/checkpoints holds checkpoints of another job: --seed was "
                               "42, now 7; use another --job_dir, or --restart to discard them")


def test_the_same_step_saved_again_and_killed_half_way_leaves_a_checkpoint_to_resume_from(storage_root):
  """An epoch of 200 steps with --checkpoint_every_steps=200 saves step 200 twice (every 200 steps,
  then at the end of training). Killed while the second copy is published, over the first,
  with --keep_checkpoints=1: a complete step 200 must be left, and the next run resume from it."""
  job_dir = f"{storage_root}/twice"
  flags = ["--checkpoint_every_steps=200", "--keep_checkpoints=1"]
  # Stalled where the second copy of ckpt-200 becomes complete: its rename locally, its state.json on gs://.
  job = Job(dense_flags(job_dir, "--epochs=1", *flags),
            command=stalled("trainer.task", rename=r"/ckpt-200$", upload=r"/ckpt-200/state\.json$", skip=1))
  job.wait_for("STALLED")
  job.process.send_signal(signal.SIGKILL)
  assert job.finish() == -signal.SIGKILL
  folder = storage.join(job_dir, "checkpoints")
  assert any(storage.exists(storage.join(folder, name, "state.json")) for name in storage.list_dir(folder)), \
      storage.list_dir(folder)

  code, rerun = run(dense_flags(job_dir, "--epochs=2", *flags))
  assert code == 0, rerun.stderr[-3000:]
  assert "training from the start" not in rerun.stderr
  assert re.search(r"resuming from \S+/ckpt-200(\.new)?: 1 epochs done, 0 steps into epoch 2", rerun.stderr)
  assert storage.list_dir(folder) == ["ckpt-400"]


def test_a_checkpoint_of_another_model_or_precision_is_refused_by_its_flags(one_epoch_copy):
  job_dir = one_epoch_copy
  for flag, was, now in [("--model=gru", "'dense'", "'gru'"), ("--mixed_precision", "False", "True")]:
    code, other = run(dense_flags(job_dir, "--epochs=1") + [flag])
    assert code == 2, other.stderr[-3000:]
    name = flag[2:].split("=")[0]
    assert other.last_line() == (f"trainer: error: {job_dir}/checkpoints holds checkpoints of another job: --{name} "
                                 f"was {was}, now {now}; use another --job_dir, or --restart to discard them")


def test_a_checkpoint_of_an_older_layout_resumes_and_a_signal_during_its_export_lets_it_finish(one_epoch_copy):
  job_dir = one_epoch_copy
  path = storage.join(job_dir, "checkpoints", "ckpt-200", "state.json")
  state = json.loads(storage.read_text(path))
  for name in ("partial", "num_replicas", "data"):  # fields added since, and no data fingerprint
    state.pop(name, None)
  storage.write_text(path, json.dumps(state))
  # SIGTERM while the export is written, at that point: it is written whole, the job finishes and exits 0.
  resumed = Job(dense_flags(job_dir, "--epochs=2"),
                command=stalled("trainer.task", call="trainer.export.write_export", until_signal=True))
  resumed.wait_for("^STALLED")
  resumed.signal(signal.SIGTERM)
  code = resumed.finish()
  assert code == 0, resumed.stderr[-3000:]
  assert "SIGTERM received" in resumed.stderr and "stopped by" not in resumed.stderr
  assert "trainer_export.json" in storage.list_dir(storage.join(job_dir, "export", "1"))
  assert re.search(r"checkpoint \S+ckpt-200 is of an older layout without partial, num_replicas: taking their "
                   "defaults", resumed.stderr)
  assert report(job_dir)["resumed_from"]["global_step"] == 200


# One kind of storage only: the gs:// fingerprint is tested in test_checkpoints.py.
@pytest.mark.parametrize("storage_root", ["local"], indirect=True)
def test_data_rewritten_since_the_checkpoint_is_refused(prices, storage_root):
  data = f"{storage_root}/prices.csv"
  storage.write_bytes(data, storage.read_bytes(prices))
  job_dir = f"{storage_root}/nightly"
  assert run(gru_flags(data, job_dir, "--epochs=1"))[0] == 0
  storage.write_bytes(data, storage.read_bytes(prices))  # rewritten, the same rows: still the same data
  code, same = run(gru_flags(data, job_dir, "--epochs=1"))
  assert code == 0 and "resuming from" in same.stderr, same.stderr[-3000:]

  rows = pd.read_csv(prices)
  extra = pd.DataFrame({"Date": ["2012-09-10"], "Close": [rows.Close.iloc[-1] * 1.01]})
  storage.write_text(data, pd.concat([rows, extra]).to_csv(index=False))  # a nightly ETL added a day
  code, changed = run(gru_flags(data, job_dir, "--epochs=2"))
  assert code == 2, changed.stderr[-3000:]
  line = changed.last_line()
  assert line.startswith(f"trainer: error: --data={data} changed since the checkpoint was written (rows 700 -> 701, "
                         f"last {rows.Date.iloc[-1]} -> 2012-09-10, size "), line
  assert line.endswith("; use --restart to train from scratch on the new data, or another --job_dir"), line
  assert "Traceback" not in changed.stderr

  # A checkpoint written before data fingerprints resumes as it did.
  folder = storage.join(job_dir, "checkpoints", complete_checkpoints(job_dir)[-1])
  state = json.loads(storage.read_text(storage.join(folder, "state.json")))
  del state["data"]
  storage.write_text(storage.join(folder, "state.json"), json.dumps(state))
  code, old = run(gru_flags(data, job_dir, "--epochs=1"))
  assert code == 0 and "resuming from" in old.stderr, old.stderr[-3000:]
