"""`python -m trainer.retrain` as the CronJob runs it, in real processes on local folders and on
gs:// (the emulator behind conftest's precondition proxy): exit codes, a diverged candidate, a
retrain killed while promoting, two retrains at once, and flags refused before any training."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import forked
import pytest
from processes import kill_when, run_cluster, stalled, wait_for_line

from trainer import errors, export, promotion, retrain_history, retraining, serving_lease, storage
from trainer.config import Config
from trainer.retraining import PROMOTED, REJECTED

pytestmark = pytest.mark.slow  # trainer processes or whole trainings: not in the fast tier

# Every test here runs the dense model on conftest's table: seconds per run. --force: most nights
# here train on production's own data, which trainer.no_new_data would skip (tests/test_no_new_data.py).
FLAGS = ["--model=dense", "--target_column=y", "--batch_size=64", "--force"]


def retrain(*args):
  return [sys.executable, "-m", "trainer.retrain", *FLAGS, *args]


def run(*args, timeout=300):
  return forked.run(retrain(*args), capture_output=True, text=True, timeout=timeout)


# `python -c PAUSING POINT NOTE -- ARGS...` runs trainer.retrain ARGS with two named points:
# after the first return of POINT it prints "PAUSED POINT" and waits (5 minutes at most) for a
# signal, which its own handler then sees as it would have anyway (SIGUSR1 only lets it go on);
# before every call of NOTE it prints "CALLED NOTE". A point is module:attribute.path; "-" is none.
PAUSING = """
import importlib, runpy, signal, sys, time
point, note, args = sys.argv[1], sys.argv[2], sys.argv[sys.argv.index("--") + 1:]
arrived, paused_once = [], []
install = signal.signal

def noting(signum, handler):
  def handle(number, frame):
    arrived.append(number)
    if callable(handler):
      handler(number, frame)
  return install(signum, handle if callable(handler) else handler)

signal.signal = noting
signal.signal(signal.SIGUSR1, lambda *_: None)

def patch(where, wrap):
  module, path = where.split(":")
  *owner, name = path.split(".")
  target = importlib.import_module(module)
  for part in owner:
    target = getattr(target, part)
  setattr(target, name, wrap(getattr(target, name)))

def pausing(function):
  def paused(*a, **k):
    result = function(*a, **k)
    if not paused_once:
      paused_once.append(point)
      print("PAUSED", point, file=sys.stderr, flush=True)
      deadline = time.monotonic() + 300
      while not arrived and time.monotonic() < deadline:
        time.sleep(0.05)
      assert arrived, "no signal came"
    return result
  return paused

def noted(function):
  def called(*a, **k):
    print("CALLED", note, file=sys.stderr, flush=True)
    return function(*a, **k)
  return called

if point != "-":
  patch(point, pausing)
if note != "-":
  patch(note, noted)
sys.argv = ["trainer.retrain", *args]
runpy.run_module("trainer.retrain", run_name="__main__", alter_sys=True)
"""


def pausing(*args, pause="-", note="-"):
  """Popen of trainer.retrain with FLAGS and args, paused after pause and telling each call of note
  (see PAUSING), its stderr a pipe the test reads."""
  return forked.popen([sys.executable, "-c", PAUSING, pause, note, "--", *FLAGS, *args],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def production_v1(serving_dir, data, job_dir):
  """A first night, in-process: one epoch, promoted as version 1 (it beats the mean)."""
  entry = retraining.retrain(Config(model="dense", data=data, target_column="y", batch_size=64, epochs=1), job_dir,
                             retraining.Options(serving_dir=serving_dir))
  assert (entry["decision"], entry["version"]) == (PROMOTED, 1)


def snapshot(serving_dir):
  """Every file of every version folder, with its bytes."""
  return {path: storage.read_bytes(storage.join(serving_dir, path)) for path in storage.list_files(serving_dir)
          if path.split("/")[0].isdigit()}


def test_a_diverged_candidate_is_rejected_production_untouched_exit_0(root, table_csv, tmp_path):
  serving_dir, data = storage.join(root, "serving"), table_csv()
  production_v1(serving_dir, data, str(tmp_path / "night1"))
  before = snapshot(serving_dir)

  night = run(f"--data={data}", f"--serving_dir={serving_dir}", f"--job_dir={tmp_path / 'night2'}",
              "--learning_rate=1e12", "--epochs=5")
  assert night.returncode == 0, night.stderr
  assert re.search(r"^rejected: training diverged: the loss is (nan|inf) at step \d+", night.stdout, re.M), night.stdout
  assert f"production: {storage.join(serving_dir, '1')}" in night.stdout
  assert snapshot(serving_dir) == before
  assert not storage.exists(storage.join(serving_dir, serving_lease.LEASE))  # released
  last = retrain_history.read(serving_dir)[-1]
  assert (last["decision"], last["version"], last["candidate"]) == (REJECTED, 1, None)
  assert last["warm_start"] == {"used": True, "from": storage.join(serving_dir, "1"), "version": 1}
  assert last["production"]["rmse"] < last["baseline"]["rmse"]  # production and baseline still scored

  shown = run(f"--serving_dir={serving_dir}", "--show_history", timeout=60)
  assert shown.returncode == 0, shown.stderr
  rows = shown.stdout.splitlines()
  assert rows[0].split()[:4] == ["time", "decision", "version", "metric"]
  assert rows[1].split()[2:4] == ["promoted", "1"] and rows[2].split()[2:4] == ["rejected", "1"]
  assert "training diverged" in rows[2]


def test_a_retrain_killed_while_promoting_leaves_production_and_the_next_run_proceeds(root, table_csv, tmp_path):
  serving_dir, data = storage.join(root, "serving"), table_csv()
  production_v1(serving_dir, data, str(tmp_path / "night1"))
  night = [f"--data={data}", f"--serving_dir={serving_dir}", f"--job_dir={tmp_path / 'night2'}", "--epochs=15"]
  # Stalled at the step that completes the promoted version: locally the rename of its hidden copy
  # to a number, on gs:// the upload of its marker. A short lease: the killed run's lease is in
  # the way of the next one for 3 seconds at most.
  kill_when(stalled("trainer.retrain", *FLAGS, *night, "--lease_ttl_seconds=3",
                    rename="^" + re.escape(serving_dir) + r"/\d+$",
                    upload=r"(^|/)serving/(.*/)?trainer_export\.json$"))

  assert promotion.production(serving_dir) == storage.join(serving_dir, "1")
  assert promotion.complete_versions(serving_dir) == [1]
  left = [n for n in storage.list_dir(serving_dir) if n not in ("1", retrain_history.FILE, retrain_history.PLOT)]
  assert serving_lease.LEASE in left  # the killed run's, expiring
  if storage.is_remote(root):
    assert sorted(left) == [serving_lease.LEASE, "2"]  # visible, but without its marker: nobody's production
    assert export.METADATA not in storage.list_files(storage.join(serving_dir, "2"))
    expected = 3
  else:
    assert any(n.startswith(".tmp-2-") for n in left)  # hidden: no poller saw a 2
    expected = 2
  assert len(retrain_history.read(serving_dir)) == 1  # the killed run decided, but wrote nothing

  # The same command again (the Job's next pod): resumes the trained candidate, outwaits the
  # lease, removes the leftovers and promotes.
  again = run(*night)
  assert again.returncode == 0, again.stderr
  assert "resuming from" in again.stderr and "took over" in again.stderr
  assert promotion.complete_versions(serving_dir) == [1, expected]
  # No leftover copy or version; locally the lock files (flock) of the lease and the history stay, empty.
  locks = (serving_lease.LEASE + ".lock", retrain_history.FILE + ".lock")
  assert [n for n in storage.list_dir(serving_dir) if n not in locks] == \
      sorted(["1", str(expected), retrain_history.FILE, retrain_history.PLOT])
  history = retrain_history.read(serving_dir)
  assert [e["decision"] for e in history] == [PROMOTED, PROMOTED]
  # Resumed from the killed attempt's checkpoint, which says where that attempt started from.
  assert history[-1]["warm_start"] == {"used": True, "from": storage.join(serving_dir, "1"), "version": 1}


def test_a_retrain_killed_after_promoting_is_recorded_once_by_its_retry(table_csv, tmp_path):
  serving_dir, data = str(tmp_path / "serving"), table_csv()
  production_v1(serving_dir, data, str(tmp_path / "night1"))
  night = [f"--data={data}", f"--serving_dir={serving_dir}", f"--job_dir={tmp_path / 'night2'}", "--epochs=15"]
  # After the promotion, before the history says so.
  kill_when(stalled("trainer.retrain", *FLAGS, *night, "--lease_ttl_seconds=3", call="trainer.retrain_history.append"))
  assert promotion.complete_versions(serving_dir) == [1, 2]  # promoted, unrecorded
  assert len(retrain_history.read(serving_dir)) == 1

  for attempt in range(2):  # the Job's next pod; then once more, as if killed after the history too
    # Without --force: production was trained on this data, yet the retry of a run is never skipped.
    again = forked.run([arg for arg in retrain(*night) if arg != "--force"], capture_output=True, text=True,
                       timeout=300)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("promoted: promoted as version 2 by an earlier attempt of this job")
    assert promotion.complete_versions(serving_dir) == [1, 2]  # not promoted twice
    history = retrain_history.read(serving_dir)
    assert [(e["decision"], e["version"]) for e in history] == [(PROMOTED, 1), (PROMOTED, 2)]
    assert history[-1]["job_dir"] == str(tmp_path / "night2")


def test_a_rejected_night_killed_after_recording_it_is_recorded_once_by_its_retry(table_csv, tmp_path):
  serving_dir, data = str(tmp_path / "serving"), table_csv()
  production_v1(serving_dir, data, str(tmp_path / "night1"))
  night = [f"--data={data}", f"--serving_dir={serving_dir}", f"--job_dir={tmp_path / 'night2'}",
           "--learning_rate=1e12", "--epochs=5"]
  # After its history line, before the plot.
  kill_when(stalled("trainer.retrain", *FLAGS, *night, "--lease_ttl_seconds=3", call="trainer.retrain_history.plot"))
  assert [e["decision"] for e in retrain_history.read(serving_dir)] == [PROMOTED, REJECTED]

  again = run(*night)
  assert again.returncode == 0, again.stderr
  assert again.stdout.startswith("rejected: training diverged")
  assert [e["decision"] for e in retrain_history.read(serving_dir)] == [PROMOTED, REJECTED]
  assert storage.read_bytes(storage.join(serving_dir, retrain_history.PLOT)).startswith(b"\x89PNG")


def test_nights_sharing_an_export_dir_each_decide_for_themselves(table_csv, tmp_path):
  """A flags file used every night may give one --export_dir: night 2's export sits beside the
  version night 1 promoted, and is still night 2's own candidate."""
  serving_dir, data, shared = str(tmp_path / "serving"), table_csv(), str(tmp_path / "exports")
  for name in ("night1", "night2"):
    night = run(f"--data={data}", f"--serving_dir={serving_dir}", f"--job_dir={tmp_path / name}",
                f"--export_dir={shared}", "--epochs=3")
    assert night.returncode == 0, night.stderr
  first, second = retrain_history.read(serving_dir)
  assert (first["decision"], first["version"]) == (PROMOTED, 1)
  assert "earlier attempt" not in second["reason"], second["reason"]
  assert second["production_version"] == 1 and second["improvement"] is not None  # compared with production
  assert promotion.complete_versions(serving_dir) == ([1, 2] if second["decision"] == PROMOTED else [1])
  assert storage.list_dir(shared) == ["1", "2"]


def test_two_retrains_started_at_once_never_both_promote(root, table_csv, tmp_path):
  """Both train; the second asks for the lease while the first holds it (the first paused inside
  it, after deciding): it waits, then compares its candidate with what the first promoted."""
  serving_dir, data = storage.join(root, "serving"), table_csv()
  night = lambda name: [f"--data={data}", f"--serving_dir={serving_dir}", f"--job_dir={tmp_path / name}", "--epochs=3"]
  first = pausing(*night("a"), pause="trainer.retraining:decide")
  second = None
  try:
    wait_for_line(first, "^PAUSED", timeout=300)
    assert storage.exists(storage.join(serving_dir, serving_lease.LEASE))
    second = pausing(*night("b"), note="trainer.serving_lease:Lease.acquire")
    wait_for_line(second, "^CALLED", timeout=300)  # trained, and now waiting for the first's lease
    assert second.poll() is None and retrain_history.read(serving_dir) == []  # nobody decided yet
    first.send_signal(signal.SIGUSR1)
    outputs = [p.communicate(timeout=300) for p in (first, second)]
  finally:
    for p in (first, second):
      if p and p.poll() is None:
        p.kill()
  assert [p.returncode for p in (first, second)] == [0, 0], [err[-2000:] for _, err in outputs]
  # The second to hold the lease finds the first's candidate in production: the same model, no better.
  assert outputs[0][0].startswith("promoted: no production model yet") and \
      outputs[1][0].startswith("rejected: "), outputs
  history = retrain_history.read(serving_dir)
  assert [(e["decision"], e["job_dir"]) for e in history] == [(PROMOTED, str(tmp_path / "a")),
                                                               (REJECTED, str(tmp_path / "b"))]
  assert promotion.complete_versions(serving_dir) == [1]
  rejected = history[1]
  assert rejected["production_version"] == 1 and "than production's" in rejected["reason"]
  assert rejected["warnings"] == [f"the hold-out is a random split of {data}, which production was trained on too: "
                                  "some of its rows may be production's training rows, flattering its score; give "
                                  "--eval_data"]


def test_two_workers_train_the_same_warm_started_candidate_and_the_chief_alone_promotes(table_csv, tmp_path):
  serving_dir, data = str(tmp_path / "serving"), table_csv()
  production_v1(serving_dir, data, str(tmp_path / "night1"))
  workers = run_cluster(retrain(f"--data={data}", f"--serving_dir={serving_dir}", f"--job_dir={tmp_path / 'night2'}",
                                "--epochs=10"), 2)
  assert [w.returncode for w in workers] == [0, 0], workers[0].stderr[-3000:] + workers[1].stderr[-3000:]
  for worker in workers:
    assert re.search(r"warm start: from the weights of version 1 ", worker.stderr)
  checksums = [re.findall(r"final weights checksum (\S+)", w.stderr) for w in workers]
  assert len(checksums[0]) == 1 and checksums[0] == checksums[1], checksums
  assert "worker done: the chief decides" in workers[1].stdout
  assert re.search(r"^promoted: the candidate's rmse", workers[0].stdout, re.M), workers[0].stdout
  assert promotion.complete_versions(serving_dir) == [1, 2]
  assert [e["decision"] for e in retrain_history.read(serving_dir)] == [PROMOTED, PROMOTED]


def test_a_held_lease_exits_clearly_when_waiting_is_not_asked_for(table_csv, tmp_path):
  serving_dir = str(tmp_path / "serving")
  storage.write_text(storage.join(serving_dir, serving_lease.LEASE), json.dumps(
      {"owner": "a retrain started by hand", "token": "t", "acquired": time.time(), "expires": time.time() + 600}))
  held = run(f"--data={table_csv()}", f"--serving_dir={serving_dir}", f"--job_dir={tmp_path / 'job'}",
             "--epochs=1", "--lease_wait_seconds=0")
  assert held.returncode == errors.SERVING_BUSY
  assert held.stderr.strip().splitlines()[-1].startswith(
      f"retrain: {storage.join(serving_dir, serving_lease.LEASE)} is held by a retrain started by hand until ")
  assert storage.list_dir(serving_dir) == [serving_lease.LEASE, serving_lease.LEASE + ".lock"]  # nothing promoted


@pytest.mark.parametrize("args, message", [
    ([], "--serving_dir is required"),
    (["--test_start=2020-01-01"], "--test_start: a retrain scores every model on its hold-out; give --eval_start"),
    (["--eval_start=2020-01-01"], "--eval_start applies to forecasts"),
    (["--min_improvement=-0.1"], "--min_improvement=-0.1: a candidate worse than production would be promoted"),
    (["--min_confidence=1"], "--min_confidence=1.0: give a confidence level from 0 (off) to below 1, e.g. 0.95"),
    (["--keep_versions=0"], "--keep_versions=0: keep at least the version in production"),
])
def test_flags_refused_before_training(args, message, tmp_path):
  serving = [] if not args else [f"--serving_dir={tmp_path / 'serving'}"]
  refused = run(*serving, *args, f"--job_dir={tmp_path / 'job'}", timeout=60)
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines() == [f"retrain: error: {refused.stderr.split(': error: ', 1)[1].strip()}"]
  assert message in refused.stderr
  assert not os.path.exists(tmp_path / "job")


def test_a_serving_dir_that_is_a_file_is_refused_before_training(tmp_path):
  (tmp_path / "models").write_text("not a folder")
  refused = run(f"--serving_dir={tmp_path / 'models'}", f"--job_dir={tmp_path / 'job'}", timeout=60)
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines() == [f"retrain: error: --serving_dir={tmp_path / 'models'} is a file; "
                                                 "give the folder models are served from (it is created if missing)"]
  assert not os.path.exists(tmp_path / "job")


def test_forecast_flags(tmp_path):
  wrong = run("--model=lstm", f"--serving_dir={tmp_path}", "--eval_data=x.csv", timeout=60)
  assert wrong.returncode == 2 and "--eval_data applies to dense and cnn" in wrong.stderr
  (tmp_path / "prices.csv").write_text("Date,Close\n")
  days = run("--model=lstm", f"--serving_dir={tmp_path}", f"--data={tmp_path / 'prices.csv'}", "--target_column=Close",
             "--eval_days=30", timeout=60)
  assert days.returncode == 2 and "--eval_days needs --date_column" in days.stderr


def test_eval_data_and_nowarm_start_from_the_command_line(table_csv, tmp_path):
  """--eval_data is the hold-out of every model (no warning that production trained on it), and
  --nowarm_start trains from random weights although production is the same network."""
  serving_dir, data = str(tmp_path / "serving"), table_csv()
  production_v1(serving_dir, data, str(tmp_path / "night1"))
  holdout = table_csv(rows=1060, name="holdout.csv")  # rows 1000-1059 are new: written alone
  import pandas as pd
  pd.read_csv(holdout).iloc[1000:].to_csv(holdout, index=False)
  night = run(f"--data={data}", f"--serving_dir={serving_dir}", f"--job_dir={tmp_path / 'night2'}", "--epochs=2",
              f"--eval_data={holdout}", "--nowarm_start")
  assert night.returncode == 0, night.stderr[-3000:]
  assert "warm start: from the weights" not in night.stderr
  last = retrain_history.read(serving_dir)[-1]
  assert last["warm_start"] == {"used": False, "reason": "--nowarm_start"}
  assert last["data"]["split"]["test"] == {"rows": 60, "path": holdout}
  assert last["data"]["split"]["train"]["rows"] + last["data"]["split"]["validation"]["rows"] == 1000
  assert last["warnings"] == [] and last["production_version"] == 1
  # Production, too, was scored on the 60 new rows: its RMSE against their targets from its own export.
  frame = pd.read_csv(holdout)
  version = storage.join(serving_dir, "1")
  metadata = export.read_metadata(version)
  from trainer.data import tabular
  predicted = tabular.predict_table(export.load(version, metadata), metadata["preprocessing"],
                                    frame[metadata["preprocessing"]["features"]].to_numpy())
  assert last["production"]["rmse"] == pytest.approx(float(((predicted - frame.y) ** 2).mean() ** 0.5), rel=1e-6)


def test_a_cnn_retrain_is_promoted_then_served(make_image_folder, tmp_path):
  serving_dir = str(tmp_path / "serving")
  data = make_image_folder({"red": 12, "green": 12, "blue": 12})
  holdout = make_image_folder({"red": 4, "green": 4, "blue": 4}, name="holdout", seed=1)
  night = forked.run([sys.executable, "-m", "trainer.retrain", "--model=cnn", f"--data={data}",
                      f"--eval_data={holdout}", "--image_size=24", "--epochs=3", "--batch_size=8", "--noaugment",
                      f"--serving_dir={serving_dir}", f"--job_dir={tmp_path / 'night1'}"],
                     capture_output=True, text=True, timeout=300)
  assert night.returncode == 0, night.stderr[-3000:]
  (entry,) = retrain_history.read(serving_dir)
  assert (entry["decision"], entry["version"], entry["metric"]) == (PROMOTED, 1, "accuracy"), entry["reason"]
  assert promotion.production(serving_dir) == storage.join(serving_dir, "1")
  # Served: trainer.predict on the serving folder answers the hold-out as the candidate was scored.
  served = forked.run([sys.executable, "-m", "trainer.predict", f"--model_dir={serving_dir}", f"--data={holdout}"],
                      capture_output=True, text=True, timeout=300)
  assert served.returncode == 0, served.stderr[-3000:]
  assert f"export: {storage.join(serving_dir, '1')} (model cnn, version 1" in served.stdout
  hits = round(entry["candidate"]["accuracy"] * 12)
  assert f"accuracy against the folder names: {hits / 12:.4f} ({hits} of 12)" in served.stdout, served.stdout


def test_a_forecast_retrain_stopped_by_sigterm_exits_143_and_its_retry_holds_out_from_eval_start(prices_csv, tmp_path):
  data = prices_csv(rows=300)
  import pandas as pd
  eval_start = pd.read_csv(data).Date[250]
  night = ["--model=gru", f"--data={data}", "--target_column=Close", "--date_column=Date", "--window=8",
           "--epochs=3", f"--eval_start={eval_start}", f"--serving_dir={tmp_path / 'serving'}",
           f"--job_dir={tmp_path / 'night'}"]
  # SIGTERM while training: sent once the first checkpoint is saved, the job paused there for it.
  stopped = pausing(*night, pause="trainer.checkpoints:Checkpoints.save")
  try:
    wait_for_line(stopped, "^PAUSED", timeout=300)
    stopped.send_signal(signal.SIGTERM)
    _, rest = stopped.communicate(timeout=300)
  finally:
    stopped.kill()
  assert stopped.returncode == 143, rest[-3000:]
  last = rest.strip().splitlines()[-1]
  assert last.startswith("retrain: stopped by SIGTERM at step ") and last.endswith("(exit code 143)"), last
  assert not os.path.exists(tmp_path / "serving" / retrain_history.FILE)

  again = run(*night)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resuming from" in again.stderr
  (entry,) = retrain_history.read(str(tmp_path / "serving"))
  test = entry["data"]["split"]["test"]
  assert (test["first"], test["rows"]) == (eval_start, 50)


def test_a_serving_dir_in_a_bucket_that_does_not_exist_exits_170(gcs_emulator, tmp_path):
  missing = f"gs://no-such-bucket-{os.getpid()}/serving"
  done = run(f"--serving_dir={missing}", f"--job_dir={tmp_path / 'job'}", timeout=120)
  assert done.returncode == 170, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1] == f"retrain: error: {missing}: bucket not found; create it or fix " \
      "the bucket name"
  assert "Traceback" not in done.stderr
