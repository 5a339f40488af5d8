"""Checkpoints that survive preemption, dead nodes and flaky buckets.

A checkpoint is a folder `<checkpoint_dir>/ckpt-<global step>/` holding the model and optimizer
(a TF checkpoint, `ckpt.*`), the best weights so far (`best.npz`, for early stopping) and
`state.json` (epoch, step, history: trainer.loop.State). TF's checkpoint writers go through
tf.io.gfile, which cannot reach a storage emulator and whose `latest_checkpoint` turns an
unreachable bucket into "no checkpoint" (GUIDE section 4), so every checkpoint is written to a
local folder first and published through trainer.storage: renamed into place locally, uploaded
with `state.json` last on gs://. A folder without `state.json` is not a checkpoint.
"""

import json
import os
import re
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging

from trainer import storage
from trainer.config import UserError

STATE = "state.json"
_NAME = re.compile(r"ckpt-(\d+)$")
_STATE_FILE = re.compile(r"ckpt-(\d+)/" + re.escape(STATE))


class Checkpoints:
  """Saves and restores model, optimizer and loop state under `directory`.

  Every worker saves (a TF checkpoint of distributed variables may need all of them), but only
  the chief (`publish=True`) publishes; the others throw their copy away.
  """

  def __init__(self, directory, model, optimizer, keep=3, publish=True, info=None):
    """info: saved in every state.json beside the loop's state (the trainer puts its config there)."""
    self.directory, self.keep, self.publish, self.info = directory, keep, publish, info or {}
    # Dropout's random state lives outside model.weights and tf.train.Checkpoint skips it; without
    # it a resumed job would draw other dropout masks than the run it continues.
    weights = {id(w) for w in model.weights}
    self._checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                           random_state=[v for v in model.variables if id(v) not in weights])

  def complete(self):
    """Global steps of the complete checkpoints, oldest first. Raises StorageError when the
    folder cannot be read: an unreachable bucket must never look like a fresh start."""
    # One listing of every file, not one per checkpoint folder: on gs:// each is a request.
    return sorted(int(match.group(1)) for match in map(_STATE_FILE.fullmatch, storage.list_files(self.directory))
                  if match)

  def path(self, step):
    return storage.join(self.directory, f"ckpt-{step}")

  def restore_latest(self):
    """Restores the newest checkpoint that reads back whole, falling back to older ones with a
    warning. Returns (global step, state dict, best weights), or None when there is none."""
    steps = self.complete()
    for step in reversed(steps):
      try:
        return step, *self._restore(self.path(step))
      except storage.StorageError:
        raise  # unreachable is not corrupt: never fall back to an older checkpoint, or to none, for that
      except Exception as e:  # noqa: BLE001 -- a damaged file fails in TF, NumPy or JSON in many ways
        reason = str(e).strip().splitlines()[0][:200]
        logging.warning("checkpoint %s cannot be read (%s: %s); trying the one before it", self.path(step),
                        type(e).__name__, reason)
    if steps:
      raise UserError(f"none of the {len(steps)} checkpoints in {self.directory} can be read; "
                      "use --restart to train from scratch, or another --job_dir")
    return None

  def _restore(self, folder):
    # A fresh download every time (not storage.local_path's cache): after --restart a checkpoint
    # of the same name holds other weights.
    local = folder if not storage.is_remote(folder) else tempfile.mkdtemp(prefix="trainer-restore-")
    try:
      if local != folder:
        storage.download_dir(folder, local)
      with open(os.path.join(local, STATE)) as f:
        state = json.load(f)
      self._checkpoint.read(os.path.join(local, "ckpt")).assert_existing_objects_matched()
      with np.load(os.path.join(local, "best.npz")) as best:
        best_weights = [best[f"arr_{i}"] for i in range(len(best.files))] or None
      return state, best_weights
    finally:
      if local != folder:
        shutil.rmtree(local, ignore_errors=True)

  def save(self, step, state, best_weights):
    """Writes checkpoint `step`; the chief publishes it whole, then keeps only the newest `keep`."""
    staging = tempfile.mkdtemp(prefix="trainer-ckpt-")
    try:
      self._checkpoint.write(f"{staging}/ckpt")
      np.savez(f"{staging}/best.npz", *(best_weights or []))
      with open(f"{staging}/{STATE}", "w") as f:
        json.dump({**self.info, **state}, f, indent=1)
      if self.publish:
        storage.publish_dir(staging, self.path(step), last=(STATE,))
        self._prune(step)
    finally:
      shutil.rmtree(staging, ignore_errors=True)

  def remove_all(self):
    """Deletes every checkpoint (--restart): left in place, older ones with higher step numbers
    would be taken for the newest at the next resume."""
    for name in storage.list_dir(self.directory):
      if _NAME.match(name) or name.startswith(".tmp-"):
        storage.remove(storage.join(self.directory, name))

  def _prune(self, newest):
    kept = set(self.complete()[-self.keep:])
    for name in storage.list_dir(self.directory):
      match = _NAME.match(name)
      # Below `newest` (just published), anything but the kept checkpoints goes: older complete
      # ones and incomplete leftovers of a killed upload; a hidden .tmp- folder is a killed local copy.
      old = match and int(match.group(1)) < newest and int(match.group(1)) not in kept
      if old or name.startswith(".tmp-"):
        storage.remove(storage.join(self.directory, name))
