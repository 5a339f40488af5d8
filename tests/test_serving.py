"""The serving folder on a local folder and on gs:// (the emulator, behind conftest's proxy that
adds the generation preconditions it ignores): promotion numbering, leftovers and pruning, a promotion
killed half way, the lease against real racing processes, the history, and a promoted version
that tf.saved_model.load serves."""

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from processes import kill_when, stalled, wait_for_line

from trainer import conditional, export, preemption, serving, storage
from trainer.config import UserError


def fake_export(folder, metric=1.0, marker=True):
  """A version folder laid out as export.write_export's (only the layout matters); returns it."""
  files = {"saved_model.pb": b"graph", "fingerprint.pb": b"fp", "variables/variables.index": b"index",
           "variables/variables.data-00000-of-00001": b"weights", "model.keras": b"keras"}
  if marker:
    files[export.METADATA] = json.dumps({"format": export.FORMAT, "version": 9, "test": {"rmse": metric}}).encode()
  for name, data in files.items():
    storage.write_bytes(storage.join(folder, *name.split("/")), data)
  return folder


def version_files(folder):
  return storage.list_files(folder)


def test_promote_counts_up_and_rewrites_the_version(root, tmp_path):
  serving_dir = storage.join(root, "serving")
  assert serving.production(serving_dir) is None
  source = fake_export(str(tmp_path / "export" / "3"))
  for n in (1, 2, 3):
    assert serving.promote(source, serving_dir) == storage.join(serving_dir, str(n))
  assert serving.production(serving_dir) == storage.join(serving_dir, "3")
  assert storage.list_dir(serving_dir) == ["1", "2", "3"]  # no hidden copy left behind
  metadata = export.read_metadata(storage.join(serving_dir, "3"))
  assert metadata["version"] == 3 and metadata["promoted_from"] == source and metadata["test"] == {"rmse": 1.0}
  assert version_files(storage.join(serving_dir, "3")) == version_files(source)
  assert storage.read_bytes(storage.join(serving_dir, "3", "variables", "variables.index")) == b"index"


def test_promote_from_gs_and_refusals(gcs_bucket, tmp_path):
  source = fake_export(storage.join(gcs_bucket, "job", "export", "1"))
  serving_dir = str(tmp_path / "serving")
  assert serving.promote(source, serving_dir) == os.path.join(serving_dir, "1")
  assert export.read_metadata(os.path.join(serving_dir, "1"))["version"] == 1
  with pytest.raises(UserError, match="cannot read the export's metadata"):
    serving.promote(fake_export(str(tmp_path / "half"), marker=False), serving_dir)
  with pytest.raises(ValueError, match="keep_versions=0"):
    serving.promote(source, serving_dir, keep_versions=0)
  assert storage.list_dir(serving_dir) == ["1"]


def test_leftovers_are_removed_and_their_numbers_never_reused(root, tmp_path):
  serving_dir = storage.join(root, "serving")
  source = fake_export(str(tmp_path / "export"))
  for _ in range(3):
    serving.promote(source, serving_dir)
  # A killed gs:// upload of 4 (everything but the marker) and a killed local copy's hidden folder.
  fake_export(storage.join(serving_dir, "4"), marker=False)
  fake_export(storage.join(serving_dir, ".tmp-4-0123abcd"))
  storage.write_text(storage.join(serving_dir, "notes", "README"), "not a version")
  storage.write_text(storage.join(serving_dir, serving.HISTORY), "")
  assert serving.production(serving_dir) == storage.join(serving_dir, "3")
  # A poller may have seen 4 half there and given up on it: the new version is 5.
  assert serving.promote(source, serving_dir) == storage.join(serving_dir, "5")
  assert storage.list_dir(serving_dir) == ["1", "2", "3", "5", serving.HISTORY, "notes"]
  assert serving.complete_versions(serving_dir) == [1, 2, 3, 5]


def test_promote_under_a_lost_lease_publishes_nothing(root, tmp_path):
  serving_dir = storage.join(root, "serving")
  source = fake_export(str(tmp_path / "export"))
  lease = serving.Lease(serving_dir, "slow").acquire()
  assert serving.promote(source, serving_dir, lease=lease) == storage.join(serving_dir, "1")
  write_lease(serving_dir, "slow", time.time() - 1)  # as if ours ran out...
  serving.Lease(serving_dir, "fast").acquire()  # ...and another retrain took over
  with pytest.raises(serving.LeaseLost, match="now held by fast"):
    serving.promote(source, serving_dir, lease=lease)
  assert serving.complete_versions(serving_dir) == [1]


def test_keep_versions_prunes_the_oldest(root, tmp_path):
  serving_dir = storage.join(root, "serving")
  source = fake_export(str(tmp_path / "export"))
  for _ in range(4):
    serving.promote(source, serving_dir, keep_versions=2)
  assert storage.list_dir(serving_dir) == ["3", "4"]
  assert serving.production(serving_dir) == storage.join(serving_dir, "4")


def test_a_promotion_killed_before_it_completes_is_never_production(root, tmp_path):
  serving_dir = storage.join(root, "serving")
  source = fake_export(str(tmp_path / "export"))
  serving.promote(source, serving_dir)
  # Stalled just before the step that makes the version complete: locally the rename of the
  # hidden copy, on gs:// the upload of trainer_export.json.
  kill_when(stalled("trainer.serving:promote", source, serving_dir, rename=r"/\d+$",
                    upload=r"/trainer_export\.json$"))
  assert serving.production(serving_dir) == storage.join(serving_dir, "1")
  assert serving.complete_versions(serving_dir) == [1]
  left = [n for n in storage.list_dir(serving_dir) if n != "1"]
  if storage.is_remote(root):
    # No rename on gs://: 2 is visible, with saved_model.pb, and without the marker.
    assert left == ["2"]
    assert export.METADATA not in version_files(storage.join(serving_dir, "2"))
    assert "saved_model.pb" in version_files(storage.join(serving_dir, "2"))
    expected = "3"
  else:
    assert len(left) == 1 and left[0].startswith(".tmp-2-")  # hidden: no poller saw a 2
    expected = "2"
  assert serving.promote(source, serving_dir) == storage.join(serving_dir, expected)
  assert storage.list_dir(serving_dir) == ["1", expected]
  assert serving.production(serving_dir) == storage.join(serving_dir, expected)


def test_folders_named_with_other_digits_are_not_versions(root, tmp_path):
  """str.isdigit() holds for "٣" (int: 3) and "²" (int: ValueError): neither is a version TF Serving polls."""
  serving_dir = storage.join(root, "serving")
  source = fake_export(str(tmp_path / "export"))
  serving.promote(source, serving_dir)
  for name in ("\u0663", "\u00b2"):
    fake_export(storage.join(serving_dir, name))
  assert serving.production(serving_dir) == storage.join(serving_dir, "1")
  assert export.latest_version(serving_dir) == storage.join(serving_dir, "1")
  assert serving.complete_versions(serving_dir) == [1]
  assert serving.promote(source, serving_dir) == storage.join(serving_dir, "2")
  assert export.next_version(serving_dir) == 3
  assert storage.list_dir(serving_dir) == sorted(["1", "2", "\u0663", "\u00b2"])


def test_the_version_folder_appears_only_once_its_upload_is_staged(gcs_bucket, tmp_path):
  """On gs:// a folder is visible from its first object: the slow upload goes to a hidden staging
  prefix (not all digits: TF Serving ignores it) and the version is made of server-side copies."""
  serving_dir = storage.join(gcs_bucket, "serving")
  source = fake_export(str(tmp_path / "export"))
  serving.promote(source, serving_dir)
  kill_when(stalled("trainer.serving:promote", source, serving_dir, upload=r"variables\.data"))
  left = storage.list_dir(serving_dir)
  assert [n for n in left if n.isdigit()] == ["1"], left  # no 2 while its weights are uploading
  assert serving.promote(source, serving_dir) == storage.join(serving_dir, "2")
  assert storage.list_dir(serving_dir) == ["1", "2"]  # the killed staging removed
  assert version_files(storage.join(serving_dir, "2")) == version_files(source)


# Run as `python promote.py <source> <serving_dir> <owner> <pause> <go file>`: takes the lease of
# <serving_dir> and promotes <source> under it, pausing at the first write (a gs:// upload or copy,
# a local rename) whose target matches the regex <pause>, saying "PAUSED <target>" on stderr, until
# <go file> exists. A lost lease ends it with "LOST <message>" and exit 172.
PROMOTE = '''
import os, re, sys, time
from google.cloud.storage import Blob, Bucket
from trainer import serving

source, serving_dir, owner, pattern, go = sys.argv[1:]
paused = []

def pause(target):
  if not paused and re.search(pattern, str(target)):
    paused.append(target)
    print("PAUSED", target, file=sys.stderr, flush=True)
    deadline = time.monotonic() + 120
    while not os.path.exists(go):
      assert time.monotonic() < deadline, "never told to go on"
      time.sleep(0.01)

def hooked(method, target):
  def call(*args, **kwargs):
    pause(target(*args, **kwargs))
    return method(*args, **kwargs)
  return call

Blob.upload_from_filename = hooked(Blob.upload_from_filename, lambda blob, *a, **k: blob.name)
Bucket.copy_blob = hooked(Bucket.copy_blob, lambda bucket, blob, dest, name=None, *a, **k: name)
os.rename = hooked(os.rename, lambda source, dest: dest)
try:
  with serving.Lease(serving_dir, owner) as lease:
    print("promoted", serving.promote(source, serving_dir, lease=lease), flush=True)
except serving.LeaseLost as e:
  print("LOST", e, file=sys.stderr, flush=True)
  sys.exit(e.exit_code)
'''


def test_a_promoter_whose_lease_ran_out_never_touches_the_new_holders_version(root, tmp_path):
  serving_dir = storage.join(root, "serving")
  source = fake_export(str(tmp_path / "export"))
  serving.promote(source, serving_dir)
  files = version_files(source)

  def production_loads():
    """Production's folder, checked whole: its weights are there."""
    folder = serving.production(serving_dir)
    assert version_files(folder) == files, folder
    return folder

  script = tmp_path / "promote.py"
  script.write_text(PROMOTE)

  def start(owner, pause):
    return subprocess.Popen([sys.executable, str(script), source, serving_dir, owner, pause,
                             str(tmp_path / f"go-{owner}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  remote = storage.is_remote(root)
  # A pauses while it uploads its copy (its weights on gs://; locally the rename of its hidden copy)...
  a = start("retrain-a", r"variables\.data" if remote else r"/\.tmp-\d+-[0-9a-f]+$")
  b = None
  try:
    wait_for_line(a, "^PAUSED")
    write_lease(serving_dir, "retrain-a", time.time() - 1)  # ...long enough for its lease to run out,
    b = start("retrain-b", r"/\d+/saved_model\.pb$" if remote else r"/\d+$")
    wait_for_line(b, "^PAUSED")  # and B takes over and pauses before its version is whole.
    assert production_loads() == storage.join(serving_dir, "1")
    (tmp_path / "go-retrain-a").write_text("")
    assert a.wait(timeout=120) == preemption.SERVING_BUSY, a.stderr.read()
    assert re.search(r"^LOST .*held by retrain-b", a.stderr.read(), re.M)
    assert production_loads() == storage.join(serving_dir, "1")  # A withdrew and published nothing
    (tmp_path / "go-retrain-b").write_text("")
    out, err = b.communicate(timeout=120)
    assert b.returncode == 0, err
    promoted = out.split()[-1]
    assert production_loads() == promoted
    assert serving.complete_versions(serving_dir) == [1, int(os.path.basename(promoted))]
    assert [n for n in storage.list_dir(serving_dir) if not n.startswith(serving.LEASE)] == \
        ["1", os.path.basename(promoted)]  # A's staged copy is gone too
  finally:
    for process in (a, b):
      if process is not None and process.poll() is None:
        process.kill()
        process.wait()


def lease_record(serving_dir):
  return json.loads(storage.read_text(storage.join(serving_dir, serving.LEASE)))


def write_lease(serving_dir, owner, expires):
  storage.write_text(storage.join(serving_dir, serving.LEASE),
                     json.dumps({"owner": owner, "token": "theirs", "acquired": expires - 60, "expires": expires}))


def test_a_held_lease_blocks_until_released_or_expired(root):
  first = serving.Lease(root, "retrain-a", ttl_seconds=600).acquire()
  record = lease_record(root)
  assert record["owner"] == "retrain-a" and abs(record["expires"] - time.time() - 600) < 30
  assert record["acquired"] <= time.time()
  second = serving.Lease(root, "retrain-b")
  with pytest.raises(serving.LeaseHeld) as held:
    second.acquire()
  message = str(held.value)
  assert "\n" not in message and message.startswith(f"{storage.join(root, serving.LEASE)} is held by retrain-a until ")
  assert held.value.owner == "retrain-a" and held.value.expires == record["expires"]
  first.renew()
  assert lease_record(root)["expires"] >= record["expires"] and lease_record(root)["acquired"] == record["acquired"]
  assert first.release() and not storage.exists(storage.join(root, serving.LEASE))
  second.acquire()
  assert lease_record(root)["owner"] == "retrain-b"
  assert not first.release()  # not ours: left alone
  assert lease_record(root)["owner"] == "retrain-b"

  # A crashed holder's lease runs out; the next one takes over and the old holder learns it.
  write_lease(root, "crashed", time.time() - 1)
  third = serving.Lease(root, "retrain-c").acquire()
  assert lease_record(root)["owner"] == "retrain-c"
  with pytest.raises(serving.LeaseLost, match="now held by retrain-c"):
    second.renew()
  # A lease that is not one (edited by hand) does not block forever either.
  storage.write_text(storage.join(root, serving.LEASE), "not json")
  serving.Lease(root, "retrain-d").acquire()
  with pytest.raises(serving.LeaseLost, match="now held by retrain-d"):
    third.renew()


def test_lease_context_keep_alive_and_wait(root):
  with serving.Lease(root, "long", ttl_seconds=1, keep_alive=True) as lease:
    time.sleep(1.5)  # longer than the lease's life: renewed meanwhile
    lease.renew()  # by the caller too, beside the renewing thread
    with pytest.raises(serving.LeaseHeld, match="held by long"):
      serving.Lease(root, "short").acquire()
  assert not storage.exists(storage.join(root, serving.LEASE))

  holder = serving.Lease(root, "holder").acquire()
  started = time.monotonic()
  with pytest.raises(serving.LeaseHeld):
    serving.Lease(root, "impatient", wait_seconds=0.5).acquire()
  assert 0.5 <= time.monotonic() - started < 3
  threading.Timer(0.5, holder.release).start()
  with serving.Lease(root, "patient", wait_seconds=10):
    assert lease_record(root)["owner"] == "patient"
  # Expired without a renewal: anyone may take it.
  serving.Lease(root, "brief", ttl_seconds=0.3).acquire()
  time.sleep(0.4)
  serving.Lease(root, "next").acquire()


# Run as `python race.py <root> <name> <rounds> <go file>`: says READY; then for each round waits
# for `<go file>-<round>` and tries for the lease of <root>/<round> (fresh-<k>: none there;
# stale-<k>: an expired one), saying "<round> won" or "<round> held <message>".
RACE = '''
import os, sys, time
from trainer import serving, storage

root, name, rounds, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
storage.exists(root)  # the client made and its imports done, so that both start at full speed
print("READY", flush=True)
for key in [f"{kind}-{k}" for kind in ("fresh", "stale") for k in range(rounds)]:
  while not os.path.exists(f"{go}-{key}"):
    time.sleep(0.0005)
  try:
    serving.Lease(storage.join(root, key), name).acquire()
    print(key, "won", flush=True)
  except serving.LeaseHeld as e:
    print(key, "held", e, flush=True)
'''


def test_two_processes_racing_for_the_lease_never_both_win(root, tmp_path):
  rounds = 8
  for k in range(rounds):
    write_lease(storage.join(root, f"stale-{k}"), "crashed", time.time() - 1)
  script, go = tmp_path / "race.py", tmp_path / "go"
  script.write_text(RACE)
  racers = {name: subprocess.Popen([sys.executable, str(script), root, name, str(rounds), str(go)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in ("racer-a", "racer-b")}
  try:
    for process in racers.values():
      assert process.stdout.readline().strip() == "READY", process.stderr.read()
    for key in [f"{kind}-{k}" for kind in ("fresh", "stale") for k in range(rounds)]:
      (tmp_path / f"go-{key}").write_text("")  # both start this round at once
      outcomes = {}
      for name, process in racers.items():
        line = process.stdout.readline().rstrip("\n")
        assert line.startswith(key + " "), (name, line, process.stderr.read() if not line else "")
        outcomes[name] = line[len(key) + 1:]
      won = [name for name, outcome in outcomes.items() if outcome == "won"]
      assert len(won) == 1, (key, outcomes)
      (loser,) = set(racers) - set(won)
      assert outcomes[loser].startswith(f"held {storage.join(root, key, serving.LEASE)} is held by {won[0]} ")
      assert lease_record(storage.join(root, key))["owner"] == won[0]
  finally:
    for process in racers.values():
      process.kill()
      process.wait()


# Run as `python clock.py <offset seconds> <root> <owner> <ttl> <wait seconds>`: this host's
# clock is <offset> seconds off; tries for the lease of <root>, saying "won" or "held <message>".
CLOCK = '''
import sys, time
offset = float(sys.argv[1])
real = time.time
time.time = lambda: real() + offset
from trainer import serving
try:
  serving.Lease(sys.argv[2], sys.argv[3], ttl_seconds=float(sys.argv[4]), wait_seconds=float(sys.argv[5])).acquire()
  print("won", flush=True)
except serving.LeaseHeld as e:
  print("held", e, flush=True)
'''


def test_lease_expiry_is_judged_by_the_store_clock_not_the_hosts(root, tmp_path):
  script = tmp_path / "clock.py"
  script.write_text(CLOCK)

  def acquire(offset, owner, wait=0):
    done = subprocess.run([sys.executable, str(script), str(offset), root, owner, "300", str(wait)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()

  lease = storage.join(root, serving.LEASE)
  serving.Lease(root, "fresh", ttl_seconds=300).acquire()
  assert acquire(600, "ahead").startswith("held ")  # ten minutes ahead: the lease is still fresh
  assert lease_record(root)["owner"] == "fresh"
  storage.remove(lease)
  assert acquire(-600, "behind") == "won"  # its record says it ran out five minutes ago, by our clock
  with pytest.raises(serving.LeaseHeld, match="held by behind"):
    serving.Lease(root, "here").acquire()
  storage.remove(lease)
  # A lease does run out by the store's clock: a second after it was written, for a host behind too.
  serving.Lease(root, "brief", ttl_seconds=1).acquire()
  assert acquire(-600, "patient", wait=60) == "won"


def test_a_failing_release_does_not_mask_the_error_that_ended_the_block(root, monkeypatch, caplog):
  def unreachable(path, token):
    raise storage.StorageError(f"cannot remove {path}: Connection refused")

  with caplog.at_level(logging.ERROR), pytest.raises(ValueError, match="the real failure"):
    with serving.Lease(root, "holder"):
      monkeypatch.setattr(conditional, "remove_if_unchanged", unreachable)
      raise ValueError("the real failure")
  assert "could not release" in caplog.text and "Connection refused" in caplog.text
  # With nothing else failing, a failed release is the failure.
  monkeypatch.undo()
  with pytest.raises(storage.StorageError, match="Connection refused"):
    with serving.Lease(storage.join(root, "other"), "holder"):
      monkeypatch.setattr(conditional, "remove_if_unchanged", unreachable)


def test_append_history_loses_no_line_to_a_concurrent_writer_and_records_a_run_once(root, monkeypatch):
  path = storage.join(root, serving.HISTORY)
  serving.append_history(root, {"decision": "promoted", "run": "night-1"})
  reads = {"read_text": storage.read_text, "read_with_token": conditional.read_with_token}

  def then_another_writer(name):
    def read(p, *args):
      got = reads[name](p, *args)
      if p == path and not reads.get("done"):
        reads["done"] = True  # a writer that lost its lease without knowing, between our read and write
        storage.write_text(path, reads["read_text"](path) + json.dumps({"decision": "other"}) + "\n")
      return got
    return read

  for module, name in ((storage, "read_text"), (conditional, "read_with_token")):
    monkeypatch.setattr(module, name, then_another_writer(name))
  serving.append_history(root, {"decision": "rejected", "run": "night-2"})
  monkeypatch.undo()
  assert [e["decision"] for e in serving.read_history(root)] == ["promoted", "other", "rejected"]
  # A retry of night 2 (killed after it wrote its line) adds nothing.
  serving.append_history(root, {"decision": "rejected", "run": "night-2", "reason": "again"})
  assert [e["decision"] for e in serving.read_history(root)] == ["promoted", "other", "rejected"]


HISTORY = [
    {"time": "2025-03-01T03:00:00+00:00", "decision": "promoted", "version": 1, "metric": "rmse",
     "candidate": {"rmse": 9.5, "mae": 7.0}, "production": None, "baseline": {"rmse": 9.8},
     "reason": "no production model yet", "data": {"first": "2010-01-04", "last": "2025-02-28"}},
    {"time": "2025-03-02T03:00:00+00:00", "decision": "rejected", "version": 1, "metric": "rmse",
     "candidate": {"rmse": 9.7}, "production": {"rmse": 9.4}, "baseline": {"rmse": 9.8},
     "reason": "candidate rmse 9.7 is not better than production's 9.4"},
    {"time": "2025-03-03T03:00:00Z", "decision": "promoted", "version": 2, "metric": "rmse",
     "candidate": 9.1, "production": 9.4, "baseline": 9.7, "reason": "3.2% better than production"},
]


def test_history_round_trip_table_and_plot(root):
  assert serving.read_history(root) == []
  for entry in HISTORY:
    serving.append_history(root, entry)
  assert serving.read_history(root) == HISTORY
  text = storage.read_text(storage.join(root, serving.HISTORY))
  assert len(text.splitlines()) == 3 and text.endswith("\n")

  table = serving.history_table(serving.read_history(root)).splitlines()
  assert re.split(r"\s+", table[0]) == ["time", "decision", "version", "metric", "candidate", "production",
                                        "baseline", "reason"]
  assert re.split(r"\s{2,}", table[1]) == ["2025-03-01 03:00", "promoted", "1", "rmse", "9.5", "-", "9.8",
                                           "no production model yet"]
  assert re.split(r"\s{2,}", table[3])[:7] == ["2025-03-03 03:00", "promoted", "2", "rmse", "9.1", "9.4", "9.7"]
  assert len({line.index("reason" if i == 0 else HISTORY[i - 1]["reason"]) for i, line in enumerate(table)}) == 1
  assert serving.history_table([]).splitlines()[-1] == "(no runs yet)"

  # Production's metric each night: the new model's score on promotion nights, else production's.
  assert [(t.day, value, version, promoted) for t, value, version, promoted in
          serving.production_series(serving.read_history(root))] == [(1, 9.5, 1, True), (2, 9.4, 1, False),
                                                                     (3, 9.1, 2, True)]
  plot = storage.join(root, "history.png")
  serving.history_plot(serving.read_history(root), plot)
  assert storage.read_bytes(plot).startswith(b"\x89PNG\r\n\x1a\n")
  serving.history_plot([], plot)
  assert storage.read_bytes(plot).startswith(b"\x89PNG")

  # A line broken by hand is skipped with a warning; later appends still work.
  storage.write_text(storage.join(root, serving.HISTORY), text + "{broken\n")
  serving.append_history(root, {"decision": "rejected"})
  assert serving.read_history(root) == HISTORY + [{"decision": "rejected"}]


def test_a_promoted_version_serves_with_tf_saved_model_load(tmp_path):
  import keras
  import tensorflow as tf

  model = keras.Sequential([keras.Input((3,), name="features"), keras.layers.Dense(4, activation="relu"),
                            keras.layers.Dense(1)])
  source = str(tmp_path / "export" / "1")
  model.export(source, verbose=False)
  model.save(os.path.join(source, export.KERAS_MODEL))
  with open(os.path.join(source, export.METADATA), "w") as f:
    json.dump({"format": export.FORMAT, "version": 1, "signature": "serving_default"}, f)
  serving_dir = str(tmp_path / "serving")
  serving.promote(source, serving_dir)
  folder = serving.promote(source, serving_dir)
  x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
  served = tf.saved_model.load(folder).signatures["serving_default"](features=tf.constant(x))
  (output,) = served.values()
  np.testing.assert_allclose(output.numpy(), model(x).numpy(), atol=1e-6)
