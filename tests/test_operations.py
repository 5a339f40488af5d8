"""An operator's commands on a serving folder (trainer.operations, trainer.hold; `python -m
trainer.retrain --rollback_to=V / --hold / --release`) on a local folder and on gs:// (the
emulator behind conftest's proxy): a rollback republishes a kept version as the highest under a
run of its own, a version not kept is refused, a hold makes a night record "held", and both wait
for a retrain that holds the lease."""

import signal
import subprocess
import sys

import forked
import pytest
from processes import wait_for_line
from test_promotion import fake_export
from test_retrain import pausing, production_v1, run

from trainer import errors, export, hold, operations, promotion, retrain_history, serving_lease, storage
from trainer.errors import UserError
from trainer.retraining import PROMOTED

JOB_RUN = {"job_dir": "gs://b/jobs/night-1", "id": "0123456789abcdef"}


def served(serving_dir, tmp_path, versions=3):
  """A serving folder with versions 1..versions, each promoted by the same retraining run."""
  source = fake_export(str(tmp_path / "export" / "1"))
  for _ in range(versions):
    promotion.promote(source, serving_dir, run=JOB_RUN)
  return serving_dir


def operator(*args, timeout=60):
  """`python -m trainer.retrain ARGS`, as an operator runs it."""
  return forked.run([sys.executable, "-m", "trainer.retrain", *args], capture_output=True, text=True, timeout=timeout)


def test_a_rollback_republishes_a_kept_version_as_the_highest_under_a_run_of_its_own(root, tmp_path):
  serving_dir = served(storage.join(root, "serving"), tmp_path)
  (said,) = operations.operate(serving_dir, rollback_to=1, note="v3 answers NaN for empty rows")
  assert said.startswith("rollback: version 1 republished as version 4 by ")
  assert said.endswith(": v3 answers NaN for empty rows (production was version 3)")
  assert promotion.production(serving_dir) == storage.join(serving_dir, "4")
  assert storage.list_files(storage.join(serving_dir, "4")) == storage.list_files(storage.join(serving_dir, "1"))
  metadata = export.read_metadata(storage.join(serving_dir, "4"))
  assert metadata["version"] == 4 and metadata["promoted_from"] == storage.join(serving_dir, "1")
  # Not the run that promoted version 1: a retry of that job must not take version 4 for its own promotion.
  assert metadata["run"]["rollback_to"] == 1 and metadata["run"] != JOB_RUN
  (entry,) = retrain_history.read(serving_dir)
  assert (entry["decision"], entry["version"], entry["production_version"], entry["rollback_to"]) == \
      (operations.ROLLBACK, 4, 3, 1)
  assert entry["run"] == metadata["run"] and entry["note"] == "v3 answers NaN for empty rows"
  assert not storage.exists(storage.join(serving_dir, serving_lease.LEASE))  # released

  # Again (a retry of the command, or production itself): nothing to do, nothing recorded.
  assert operations.operate(serving_dir, rollback_to=1) == \
      ["rollback: nothing to do, production (version 4) is version 1 republished"]
  assert operations.operate(serving_dir, rollback_to=4) == ["rollback: nothing to do, version 4 is production"]
  # Numbers are never reused: back to 3 is version 5, and --keep_versions prunes as a promotion does.
  operations.operate(serving_dir, rollback_to=3, keep_versions=2)
  assert promotion.complete_versions(serving_dir) == [4, 5]
  assert [e["version"] for e in retrain_history.read(serving_dir)] == [4, 5]


def test_a_version_not_kept_is_refused_and_nothing_changes(root, tmp_path):
  serving_dir = served(storage.join(root, "serving"), tmp_path)
  fake_export(storage.join(serving_dir, "4"), marker=False)  # a killed promotion's folder: never a version
  before = storage.list_files(serving_dir)
  for version in (0, 4, 9):
    with pytest.raises(UserError) as refused:
      operations.operate(serving_dir, rollback_to=version, hold=True)  # refused before the hold, too
    assert str(refused.value) == (f"--rollback_to={version}: {storage.join(serving_dir, str(version))} is not a "
                                  "version kept there (kept: 1, 2, 3); give one of those")
  assert hold.read(serving_dir) is None and retrain_history.read(serving_dir) == []
  locks = {serving_lease.LEASE + ".lock"}  # locally the lease's lock file (flock) stays, empty
  assert sorted(set(storage.list_files(serving_dir)) - locks) == before

  with pytest.raises(UserError, match=r"--hold and --release: give one"):
    operations.operate(serving_dir, hold=True, release=True)
  with pytest.raises(UserError, match=r"nothing to do: give --rollback_to=V, --hold or --release \(--note is"):
    operations.operate(serving_dir, note="why")


def test_hold_and_release_set_and_clear_the_marker_once_each(root):
  serving_dir = storage.join(root, "serving")
  assert hold.read(serving_dir) is None
  (said,) = operations.operate(serving_dir, hold=True, note="data vendor outage")
  record = hold.read(serving_dir)
  assert said == f"hold: promotions held by {record['by']}: data vendor outage"
  assert record["note"] == "data vendor outage" and record["since"].endswith("+00:00")
  assert operations.operate(serving_dir, hold=True, note="other") == \
      [f"hold: nothing to do, {hold.describe(record)} (--release, then --hold, to change its note)"]
  (released,) = operations.operate(serving_dir, release=True)
  assert released == f"release: promotions released by {record['by']} ({hold.describe(record)})"
  assert hold.read(serving_dir) is None
  assert operations.operate(serving_dir, release=True) == ["release: nothing to do, promotions are not held"]
  history = retrain_history.read(serving_dir)
  assert [(e["decision"], e["version"]) for e in history] == [(operations.HOLD, None), (operations.RELEASE, None)]
  assert history[1]["released"] == record
  # A marker written by hand still holds: someone meant to stop promotions.
  storage.write_text(storage.join(serving_dir, hold.MARKER), "held, ask Ana")
  assert hold.read(serving_dir) == {} and hold.describe({}) == "promotions held since ? by ?"


def test_operator_entries_leave_the_table_and_the_plot_to_the_runs(tmp_path):
  runs = [{"time": "2025-03-01T03:00:00+00:00", "decision": PROMOTED, "version": 1, "metric": "rmse",
           "candidate": {"rmse": 9.5}, "production": None, "baseline": {"rmse": 9.8}, "reason": "first"},
          {"time": "2025-03-02T03:00:00+00:00", "decision": hold.HELD, "version": 1, "metric": "rmse",
           "candidate": {"rmse": 9.0}, "production": {"rmse": 9.4}, "baseline": {"rmse": 9.8}, "reason": "held"}]
  operator_entries = [{"time": "2025-03-02T09:00:00+00:00", "decision": operations.ROLLBACK, "version": 2,
                       "reason": "version 1 republished as version 2"}]
  assert retrain_history.production_series(runs + operator_entries) == retrain_history.production_series(runs)
  assert len(retrain_history.production_series(runs)) == 2
  rows = retrain_history.table(runs + operator_entries).splitlines()
  assert rows[2].split()[2:5] == ["held", "1", "rmse"]
  assert rows[3].split()[2:5] == ["rollback", "2", "-"] and rows[3].endswith("version 1 republished as version 2")


def test_the_commands_from_the_command_line(root, tmp_path):
  serving_dir = served(storage.join(root, "serving"), tmp_path, versions=2)
  done = operator(f"--serving_dir={serving_dir}", "--rollback_to=1", "--hold", "--note=bad night")
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  assert lines[0].startswith("hold: promotions held by ") and lines[0].endswith(": bad night")
  assert lines[1].startswith("rollback: version 1 republished as version 3 by ")
  assert lines[2] == f"history: {storage.join(serving_dir, retrain_history.FILE)}"

  shown = operator(f"--serving_dir={serving_dir}", "--show_history")
  assert shown.returncode == 0, shown.stderr
  first, header, *rows = shown.stdout.splitlines()
  assert first == f"{hold.describe(hold.read(serving_dir))} (--release resumes them)"
  assert header.split()[:2] == ["time", "decision"] and [row.split()[2] for row in rows[:2]] == ["hold", "rollback"]

  refused = operator(f"--serving_dir={serving_dir}", "--rollback_to=7")
  assert refused.returncode == 2
  assert refused.stderr.strip().splitlines() == [
      f"retrain: error: --rollback_to=7: {storage.join(serving_dir, '7')} is not a version kept there (kept: 1, 2, "
      "3); give one of those"]
  released = operator(f"--serving_dir={serving_dir}", "--release", "--data=ignored.csv")
  assert released.returncode == 0 and released.stdout.startswith("release: promotions released by "), released


def test_a_held_lease_exits_172_when_waiting_is_not_asked_for(tmp_path):
  serving_dir = served(str(tmp_path / "serving"), tmp_path)
  with serving_lease.Lease(serving_dir, "a retrain started by hand"):
    busy = operator(f"--serving_dir={serving_dir}", "--hold", "--lease_wait_seconds=0")
  assert busy.returncode == errors.SERVING_BUSY
  assert "is held by a retrain started by hand until " in busy.stderr.strip().splitlines()[-1]
  assert hold.read(serving_dir) is None and retrain_history.read(serving_dir) == []


def test_the_commands_import_no_tensorflow(tmp_path):
  """A fresh process, not a fork of the test's server (which imported TensorFlow ahead)."""
  serving_dir = served(str(tmp_path / "serving"), tmp_path, versions=2)
  check = ("import atexit, runpy, sys; atexit.register(lambda: print('tensorflow' in sys.modules)); "
           f"sys.argv = ['retrain', '--serving_dir={serving_dir}', '--rollback_to=1', '--hold']; "
           "runpy.run_module('trainer.retrain', run_name='__main__')")
  done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[-1] == "False"
  assert promotion.complete_versions(serving_dir) == [1, 2, 3] and hold.read(serving_dir)


@pytest.mark.slow  # trains: not in the fast tier
def test_rollback_and_hold_wait_for_a_retrain_that_holds_the_lease(root, table_csv, tmp_path):
  serving_dir, data = storage.join(root, "serving"), table_csv()
  production_v1(serving_dir, data, str(tmp_path / "night1"))
  promotion.promote(storage.join(serving_dir, "1"), serving_dir)  # version 2: version 1 again
  night = pausing(f"--data={data}", f"--serving_dir={serving_dir}", f"--job_dir={tmp_path / 'night2'}", "--epochs=3",
                  pause="trainer.retraining:decide")
  operating = None
  try:
    wait_for_line(night, "^PAUSED", timeout=300)  # decided, holding the lease
    operating = pausing(f"--serving_dir={serving_dir}", "--rollback_to=1", "--hold", "--note=v2 drifts",
                        note="trainer.serving_lease:Lease.acquire")
    wait_for_line(operating, "^CALLED", timeout=120)  # now waiting for the night's lease
    assert operating.poll() is None and hold.read(serving_dir) is None and len(retrain_history.read(serving_dir)) == 1
    night.send_signal(signal.SIGUSR1)
    outputs = [p.communicate(timeout=300) for p in (night, operating)]
  finally:
    for p in (night, operating):
      if p and p.poll() is None:
        p.kill()
  assert [p.returncode for p in (night, operating)] == [0, 0], [err[-2000:] for _, err in outputs]
  history = retrain_history.read(serving_dir)
  # The night decided without the hold (it read none under its lease); then the hold, then the rollback.
  assert [e["decision"] for e in history][2:] == [operations.HOLD, operations.ROLLBACK], history
  produced = history[1]["version"]  # the night's promotion, or version 2 kept
  rollback = history[-1]
  assert (rollback["production_version"], rollback["version"]) == (produced, produced + 1)
  assert promotion.production(serving_dir) == storage.join(serving_dir, str(produced + 1))
  assert hold.read(serving_dir)["note"] == "v2 drifts"


@pytest.mark.slow  # trains: not in the fast tier
def test_a_held_night_records_held_and_keeps_production(table_csv, tmp_path):
  serving_dir, data = str(tmp_path / "serving"), table_csv()
  production_v1(serving_dir, data, str(tmp_path / "night1"))
  operations.operate(serving_dir, hold=True, note="quarter close")
  # Warm-started from version 1's single epoch, 10 more are better than it: a candidate that would be promoted.
  night = run(f"--data={data}", f"--serving_dir={serving_dir}", f"--job_dir={tmp_path / 'night2'}", "--epochs=10",
              "--min_improvement=0")
  assert night.returncode == 0, night.stderr[-3000:]
  record = hold.read(serving_dir)
  assert night.stdout.startswith(f"held: {hold.describe(record)}; would have been promoted: the candidate's rmse ")
  assert f"production: {storage.join(serving_dir, '1')}" in night.stdout
  assert promotion.complete_versions(serving_dir) == [1]
  last = retrain_history.read(serving_dir)[-1]
  assert (last["decision"], last["version"], last["production_version"]) == (hold.HELD, 1, 1)
  assert last["candidate"]["rmse"] < last["production"]["rmse"]  # scored as any night is
  assert storage.read_bytes(storage.join(serving_dir, retrain_history.PLOT)).startswith(b"\x89PNG")
