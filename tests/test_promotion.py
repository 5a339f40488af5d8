"""Promotion into a serving folder (trainer.promotion) on a local folder and on gs:// (the emulator,
behind conftest's proxy that adds the generation preconditions it ignores): numbering, leftovers
and pruning, a promotion killed half way, a promoter whose lease ran out, and a promoted version
that tf.saved_model.load serves."""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
from processes import kill_when, stalled, wait_for_line
from test_serving_lease import write_lease

from trainer import errors, export, promotion, retrain_history, serving_lease, storage
from trainer.errors import UserError


def fake_export(folder, metric=1.0, marker=True):
  """A version folder laid out as export.write_export's (only the layout matters); returns it."""
  files = {"saved_model.pb": b"graph", "fingerprint.pb": b"fp", "variables/variables.index": b"index",
           "variables/variables.data-00000-of-00001": b"weights", "model.keras": b"keras",
           "assets.extra/tf_serving_warmup_requests": b"requests"}
  if marker:
    files[export.METADATA] = json.dumps({"format": export.FORMAT, "version": 9, "test": {"rmse": metric}}).encode()
  for name, data in files.items():
    storage.write_bytes(storage.join(folder, *name.split("/")), data)
  return folder


def version_files(folder):
  return storage.list_files(folder)


def test_promote_counts_up_and_rewrites_the_version(root, tmp_path):
  serving_dir = storage.join(root, "serving")
  assert promotion.production(serving_dir) is None
  source = fake_export(str(tmp_path / "export" / "3"))
  for n in (1, 2, 3):
    assert promotion.promote(source, serving_dir) == storage.join(serving_dir, str(n))
  assert promotion.production(serving_dir) == storage.join(serving_dir, "3")
  assert storage.list_dir(serving_dir) == ["1", "2", "3"]  # no hidden copy left behind
  metadata = export.read_metadata(storage.join(serving_dir, "3"))
  assert metadata["version"] == 3 and metadata["promoted_from"] == source and metadata["test"] == {"rmse": 1.0}
  assert version_files(storage.join(serving_dir, "3")) == version_files(source)
  assert storage.read_bytes(storage.join(serving_dir, "3", "variables", "variables.index")) == b"index"


def test_promote_from_gs_and_refusals(gcs_bucket, tmp_path):
  source = fake_export(storage.join(gcs_bucket, "job", "export", "1"))
  serving_dir = str(tmp_path / "serving")
  assert promotion.promote(source, serving_dir) == os.path.join(serving_dir, "1")
  assert export.read_metadata(os.path.join(serving_dir, "1"))["version"] == 1
  with pytest.raises(UserError, match="cannot read the export's metadata"):
    promotion.promote(fake_export(str(tmp_path / "half"), marker=False), serving_dir)
  with pytest.raises(ValueError, match="keep_versions=0"):
    promotion.promote(source, serving_dir, keep_versions=0)
  assert storage.list_dir(serving_dir) == ["1"]


def test_leftovers_are_removed_and_their_numbers_never_reused(root, tmp_path):
  serving_dir = storage.join(root, "serving")
  source = fake_export(str(tmp_path / "export"))
  for _ in range(3):
    promotion.promote(source, serving_dir)
  # A killed gs:// upload of 4 (everything but the marker) and a killed local copy's hidden folder.
  fake_export(storage.join(serving_dir, "4"), marker=False)
  fake_export(storage.join(serving_dir, ".tmp-4-0123abcd"))
  storage.write_text(storage.join(serving_dir, "notes", "README"), "not a version")
  storage.write_text(storage.join(serving_dir, retrain_history.FILE), "")
  assert promotion.production(serving_dir) == storage.join(serving_dir, "3")
  # A poller may have seen 4 half there and given up on it: the new version is 5.
  assert promotion.promote(source, serving_dir) == storage.join(serving_dir, "5")
  assert storage.list_dir(serving_dir) == ["1", "2", "3", "5", retrain_history.FILE, "notes"]
  assert promotion.complete_versions(serving_dir) == [1, 2, 3, 5]


def test_promote_under_a_lost_lease_publishes_nothing(root, tmp_path):
  serving_dir = storage.join(root, "serving")
  source = fake_export(str(tmp_path / "export"))
  lease = serving_lease.Lease(serving_dir, "slow").acquire()
  assert promotion.promote(source, serving_dir, lease=lease) == storage.join(serving_dir, "1")
  write_lease(serving_dir, "slow", time.time() - 1)  # as if ours ran out...
  serving_lease.Lease(serving_dir, "fast").acquire()  # ...and another retrain took over
  with pytest.raises(serving_lease.LeaseLost, match="now held by fast"):
    promotion.promote(source, serving_dir, lease=lease)
  assert promotion.complete_versions(serving_dir) == [1]


def test_keep_versions_prunes_the_oldest(root, tmp_path):
  serving_dir = storage.join(root, "serving")
  source = fake_export(str(tmp_path / "export"))
  for _ in range(4):
    promotion.promote(source, serving_dir, keep_versions=2)
  assert storage.list_dir(serving_dir) == ["3", "4"]
  assert promotion.production(serving_dir) == storage.join(serving_dir, "4")


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_a_promotion_killed_before_it_completes_is_never_production(root, tmp_path):
  serving_dir = storage.join(root, "serving")
  source = fake_export(str(tmp_path / "export"))
  promotion.promote(source, serving_dir)
  # Stalled just before the step that makes the version complete: locally the rename of the
  # hidden copy, on gs:// the upload of trainer_export.json.
  kill_when(stalled("trainer.promotion:promote", source, serving_dir, rename=r"/\d+$",
                    upload=r"/trainer_export\.json$"))
  assert promotion.production(serving_dir) == storage.join(serving_dir, "1")
  assert promotion.complete_versions(serving_dir) == [1]
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
  assert promotion.promote(source, serving_dir) == storage.join(serving_dir, expected)
  assert storage.list_dir(serving_dir) == ["1", expected]
  assert promotion.production(serving_dir) == storage.join(serving_dir, expected)


def test_folders_named_with_other_digits_are_not_versions(root, tmp_path):
  """str.isdigit() holds for "٣" (int: 3) and "²" (int: ValueError): neither is a version TF Serving polls."""
  serving_dir = storage.join(root, "serving")
  source = fake_export(str(tmp_path / "export"))
  promotion.promote(source, serving_dir)
  for name in ("\u0663", "\u00b2"):
    fake_export(storage.join(serving_dir, name))
  assert promotion.production(serving_dir) == storage.join(serving_dir, "1")
  assert export.latest_version(serving_dir) == storage.join(serving_dir, "1")
  assert promotion.complete_versions(serving_dir) == [1]
  assert promotion.promote(source, serving_dir) == storage.join(serving_dir, "2")
  assert export.next_version(serving_dir) == 3
  assert storage.list_dir(serving_dir) == sorted(["1", "2", "\u0663", "\u00b2"])


def test_the_version_folder_appears_only_once_its_upload_is_staged(gcs_bucket, tmp_path):
  """On gs:// a folder is visible from its first object: the slow upload goes to a hidden staging
  prefix (not all digits: TF Serving ignores it) and the version is made of server-side copies."""
  serving_dir = storage.join(gcs_bucket, "serving")
  source = fake_export(str(tmp_path / "export"))
  promotion.promote(source, serving_dir)
  kill_when(stalled("trainer.promotion:promote", source, serving_dir, upload=r"variables\.data"))
  left = storage.list_dir(serving_dir)
  assert [n for n in left if n.isdigit()] == ["1"], left  # no 2 while its weights are uploading
  assert promotion.promote(source, serving_dir) == storage.join(serving_dir, "2")
  assert storage.list_dir(serving_dir) == ["1", "2"]  # the killed staging removed
  assert version_files(storage.join(serving_dir, "2")) == version_files(source)


# Run as `python promote.py <source> <serving_dir> <owner> <pause> <go file>`: takes the lease of
# <serving_dir> and promotes <source> under it, pausing at the first write (a gs:// upload or copy,
# a local rename) whose target matches the regex <pause>, saying "PAUSED <target>" on stderr, until
# <go file> exists. A lost lease ends it with "LOST <message>" and exit 172.
PROMOTE = '''
import os, re, sys, time
from google.cloud.storage import Blob, Bucket
from trainer import promotion, serving_lease

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
  with serving_lease.Lease(serving_dir, owner) as lease:
    print("promoted", promotion.promote(source, serving_dir, lease=lease), flush=True)
except serving_lease.LeaseLost as e:
  print("LOST", e, file=sys.stderr, flush=True)
  sys.exit(e.exit_code)
'''


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_a_promoter_whose_lease_ran_out_never_touches_the_new_holders_version(root, tmp_path):
  serving_dir = storage.join(root, "serving")
  source = fake_export(str(tmp_path / "export"))
  promotion.promote(source, serving_dir)
  files = version_files(source)

  def production_loads():
    """Production's folder, checked whole: its weights are there."""
    folder = promotion.production(serving_dir)
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
    assert a.wait(timeout=120) == errors.SERVING_BUSY, a.stderr.read()
    assert re.search(r"^LOST .*held by retrain-b", a.stderr.read(), re.M)
    assert production_loads() == storage.join(serving_dir, "1")  # A withdrew and published nothing
    (tmp_path / "go-retrain-b").write_text("")
    out, err = b.communicate(timeout=120)
    assert b.returncode == 0, err
    promoted = out.split()[-1]
    assert production_loads() == promoted
    assert promotion.complete_versions(serving_dir) == [1, int(os.path.basename(promoted))]
    assert [n for n in storage.list_dir(serving_dir) if not n.startswith(serving_lease.LEASE)] == \
        ["1", os.path.basename(promoted)]  # A's staged copy is gone too
  finally:
    for process in (a, b):
      if process is not None and process.poll() is None:
        process.kill()
        process.wait()


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
  promotion.promote(source, serving_dir)
  folder = promotion.promote(source, serving_dir)
  x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
  served = tf.saved_model.load(folder).signatures["serving_default"](features=tf.constant(x))
  (output,) = served.values()
  np.testing.assert_allclose(output.numpy(), model(x).numpy(), atol=1e-6)
