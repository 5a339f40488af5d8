"""Checkpoints that survive preemption, dead nodes and flaky buckets.

A checkpoint is a folder `<checkpoint_dir>/ckpt-<global step>/` holding the model and optimizer
(a TF checkpoint, `ckpt.*`), the best weights so far (`best.npz`, for early stopping) and
`state.json` (epoch, step, history: trainer.state.TrainState). TF's checkpoint writers go through
tf.io.gfile, which cannot reach a storage emulator and whose `latest_checkpoint` turns an
unreachable bucket into "no checkpoint" (it logs "Checkpoint ignored"), so every checkpoint is
written to a local folder first and published through trainer.transfer: renamed into place
locally, uploaded with `state.json` last on gs://. A folder without `state.json` is not a checkpoint.

A save in the background (Checkpoints.save(background=True), the trainer's default) copies the
variables to host memory on the calling thread and returns a Saving; the write and the
publication run on a thread of their own while training goes on, and Saving.wait reports them.
TF's own asynchronous checkpoints (CheckpointOptions(experimental_enable_async_checkpoint=True))
fail at the first save with Keras 3 variables: Keras' `_copy_trackable_to_cpu` makes a new
tf.Variable at every copy, and TF copies inside a tf.function ("tf.function only supports
singleton tf.Variables"). So _HostCopy does what TF's helper does, with copies made once: a second
tf.train.Checkpoint over the same objects whose saver reads host copies in their place.
"""

import io
import json
import os
import queue
import shutil
import tempfile
import threading
import time
from typing import List, NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from trainer import numbered, storage, transfer
from trainer.errors import StorageError, UserError

STATE = "state.json"
# ".new": the second copy of a step saved again (Checkpoints._publish).
_FOLDERS = numbered.Folders(STATE, prefix="ckpt-", suffixes=(".new",))


class Restored(NamedTuple):
  """What Checkpoints.restore_latest read (besides the variables, which it set)."""
  step: int  # global step
  state: dict  # its state.json
  best_weights: Optional[List[np.ndarray]]
  folder: str


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
    objects = dict(model=model, optimizer=optimizer, random_state=[v for v in model.variables if id(v) not in weights])
    self._checkpoint = tf.train.Checkpoint(**objects)
    self._host = _HostCopy(tf.train.Checkpoint(**objects), checked=model.weights)
    self._saver = _Saver()

  def complete(self):
    """Global steps of the complete checkpoints, oldest first. Raises StorageError when the
    folder cannot be read: an unreachable bucket must never look like a fresh start."""
    return sorted(self._complete_folders())

  def _complete_folders(self):
    """{step: names of its complete folders, the one to read first first}: ckpt-G.new, when
    complete, is as new as ckpt-G or newer (_publish)."""
    return {step: names[::-1] for step, names in _FOLDERS.complete(self.directory).items()}

  def path(self, step):
    return storage.join(self.directory, f"ckpt-{step}")

  def restore_latest(self, accept=None):
    """Restores the newest checkpoint that reads back whole, falling back to older ones with a
    warning. Returns a Restored, or None when there is none. accept(state dict): called with each
    checkpoint's state.json before its variables are read; it raises (errors.UserError) to refuse a
    checkpoint of another job, which variables of another shape would only report as unreadable."""
    folders = self._complete_folders()
    for step in sorted(folders, reverse=True):
      for name in folders[step]:
        folder = storage.join(self.directory, name)
        try:
          state, best_weights = self._restore(folder, accept)
        except (storage.StorageError, UserError):
          raise  # unreachable or refused is not corrupt: never fall back to an older checkpoint, or to none
        except Exception as e:  # noqa: BLE001 -- a damaged file fails in TF, NumPy or JSON in many ways
          reason = str(e).strip().splitlines()[0][:200]
          logging.warning("checkpoint %s cannot be read (%s: %s); trying the one before it", folder,
                          type(e).__name__, reason)
          continue
        return Restored(step, state, best_weights, folder)
    if folders:
      raise UserError(f"none of the {len(folders)} checkpoints in {self.directory} can be read; "
                      "use --restart to train from scratch, or another --job_dir")
    return None

  def _restore(self, folder, accept=None):
    # A fresh download every time (not transfer.local_path's cache): after --restart a checkpoint
    # of the same name holds other weights.
    local = folder if not storage.is_remote(folder) else tempfile.mkdtemp(prefix="trainer-restore-")
    try:
      if local != folder:
        transfer.download_dir(folder, local)
      # Read through storage: an OSError that is not about the contents (EIO on NFS, no
      # permission) is a StorageError, never a reason to fall back to an older checkpoint.
      state = json.loads(storage.read_bytes(os.path.join(local, STATE)))
      if accept:
        accept(state)
      try:
        self._checkpoint.read(os.path.join(local, "ckpt")).assert_existing_objects_matched()
      except Exception:
        _read_every_file(local)  # TF's errors do not say which: a file we cannot read is the storage's fault
        raise
      with np.load(io.BytesIO(storage.read_bytes(os.path.join(local, "best.npz")))) as best:
        best_weights = [best[f"arr_{i}"] for i in range(len(best.files))] or None
      return state, best_weights
    finally:
      if local != folder:
        shutil.rmtree(local, ignore_errors=True)

  def save(self, step, state, best_weights, background=False, then=None):
    """Writes checkpoint `step`; the chief publishes it whole, then keeps only the newest `keep`.
    Returns its Saving. background: copy what it holds to host memory (the variables, the best
    weights, the state as JSON) and write and publish it on a thread; the caller waits for the
    Saving before the next save and before it stops. Else the save is done on return (its errors
    raised). then(seconds): called once the save is done, on the thread that did it. Raises
    NotFinite, and saves nothing, when a weight of the model is NaN or infinite."""
    if not self._host.copy():
      raise NotFinite(f"checkpoint {self.path(step)} not saved: the model's weights are not finite")
    text = json.dumps({**self.info, **state}, indent=1)  # the state now: the loop goes on changing it
    best = list(best_weights or [])  # arrays the loop replaces, never changes in place
    saving = Saving(self.path(step), lambda: self._write(step, text, best), then)
    if background:
      self._saver.start(saving)
    else:
      saving.run()
      saving.wait()
    return saving

  def _write(self, step, text, best_weights):
    staging = tempfile.mkdtemp(prefix="trainer-ckpt-")
    try:
      self._host.write(f"{staging}/ckpt")
      np.savez(f"{staging}/best.npz", *best_weights)
      with open(f"{staging}/{STATE}", "w") as f:
        f.write(text)
      if self.publish:
        folders = self._complete_folders()  # one listing for both: on gs:// each is a request
        self._publish(step, staging, folders.get(step, []))
        folders[step] = [f"ckpt-{step}"]
        self._prune(step, folders)  # only now: publish_dir returns once the new checkpoint is on disk
    finally:
      shutil.rmtree(staging, ignore_errors=True)

  def _publish(self, step, staging, complete):
    """Publishes staging as ckpt-<step>; complete: the names of that step's complete folders. The
    same step saved again (the end of training right after an every-N-steps save, a signal at an
    epoch's end) must never leave that step without a complete copy, which with
    --keep_checkpoints=1 is the only checkpoint: the new copy goes beside the old as
    ckpt-<step>.new first, then replaces the old, then the .new copy goes."""
    main, aside = f"ckpt-{step}", f"ckpt-{step}.new"
    if main in complete:
      if aside not in complete:
        transfer.publish_dir(staging, storage.join(self.directory, aside), last=(STATE,))
      self._remove(main)
    transfer.publish_dir(staging, storage.join(self.directory, main), last=(STATE,))
    if complete:
      self._remove(aside)

  def _remove(self, name):
    # The marker first: a removal killed half way must not leave a folder that looks complete.
    storage.remove(storage.join(self.directory, name), first=(STATE,))

  def remove_all(self):
    """Deletes every checkpoint (--restart): left in place, older ones with higher step numbers
    would be taken for the newest at the next resume."""
    for name in storage.list_dir(self.directory):
      if _FOLDERS.number(name) is not None or _FOLDERS.is_leftover(name):
        self._remove(name)

  def _prune(self, newest, folders):
    """Removes what is not among the newest `keep` checkpoints; folders: _complete_folders()."""
    kept = set(sorted(folders)[-self.keep:])
    complete = {name for names in folders.values() for name in names}
    for name in storage.list_dir(self.directory):
      step = _FOLDERS.number(name)
      # Below `newest` (just published), anything but the kept checkpoints goes: older complete
      # ones and incomplete leftovers of a killed upload; a hidden copy is a killed local one.
      old = step is not None and step < newest and (step not in kept or name not in complete)
      if old or _FOLDERS.is_leftover(name):
        self._remove(name)


class NotFinite(ValueError):
  """A save of weights that are NaN or infinite, refused."""


class _HostCopy:
  """The variables of a tf.train.Checkpoint, copied to host memory by copy(); write() writes a TF
  checkpoint of the copies, the same as the original's (same keys and values; restore reads it),
  on any thread, while training changes the originals. How: TF's saver serializes
  `_saver._object_map[v]` in place of v (TF's asynchronous checkpoints rely on it:
  tensorflow/python/checkpoint/async_checkpoint_helper.py). The copy is made on the caller's
  thread, so a distributed variable is read where training's collectives run, never beside them."""

  def __init__(self, checkpoint, checked):
    from tensorflow.python.util import object_identity  # noqa: PLC0415 -- what TF's saver keys its map with
    self._checkpoint, self._pairs = checkpoint, []
    self._checked = [v for v in checked if tf.as_dtype(v.dtype).is_floating]
    mapped = object_identity.ObjectIdentityDictionary()
    with tf.device("/cpu:0"):
      for variable in tf.train.TrackableView(checkpoint).descendants():
        if isinstance(variable, (tf.Variable, keras.Variable)):
          host = tf.Variable(tf.zeros(variable.shape, variable.dtype), trainable=False)
          self._pairs.append((variable, host))
          mapped[variable] = host
          if isinstance(variable, keras.Variable):
            mapped[variable.value] = host  # Keras saves its tf.Variable's tensors
    checkpoint._saver._object_map = mapped  # noqa: SLF001

  @tf.function
  def copy(self):
    """Copies every variable; returns whether the `checked` ones (the model's weights) are all
    finite. One traced call: an eager assign a variable costs ten times as much on the host."""
    for variable, host in self._pairs:
      host.assign(variable.value if isinstance(variable, keras.Variable) else variable)
    return tf.reduce_all([tf.reduce_all(tf.math.is_finite(v.value)) for v in self._checked])

  def write(self, prefix):
    self._checkpoint.write(prefix)


class _Saver:
  """One thread that runs the background saves one after another, started at the first: starting a
  thread a save costs milliseconds on a busy host. A daemon: a second Ctrl-C exits at once, and a
  publication cut short leaves no complete folder."""

  def __init__(self):
    self._queue, self._thread = queue.SimpleQueue(), None

  def start(self, saving):
    if self._thread is None:
      self._thread = threading.Thread(target=self._run, name="checkpoint saves", daemon=True)
      self._thread.start()
    self._queue.put(saving)

  def _run(self):
    while True:
      self._queue.get().run()


class Saving:
  """A checkpoint save (Checkpoints.save): `path`, the folder it publishes; wait() returns once it
  is done, or raises what failed it (StorageError for storage and file errors)."""

  def __init__(self, path, work, then=None):
    self.path, self._work, self._then = path, work, then
    self._error, self._done = None, threading.Event()

  @property
  def done(self) -> bool:
    return self._done.is_set()

  def run(self):
    started = time.monotonic()
    try:
      self._work()
      if self._then:
        self._then(time.monotonic() - started)
    except Exception as e:  # noqa: BLE001 -- handed to the thread that waits (wait); the saver thread lives on
      self._error = e
    finally:
      self._done.set()

  def wait(self):
    if not self._done.is_set():
      logging.info("waiting for the background save of %s to finish", self.path.rstrip("/").rsplit("/", 1)[-1])
    # In slices: the kernel may deliver a signal to any thread, and its handler (a second Ctrl-C
    # stops at once) runs only when the main thread runs Python code again, which a wait without
    # a timeout never does while the save is stuck.
    while not self._done.wait(0.5):
      pass
    error, self._error = self._error, None
    if isinstance(error, (StorageError, OSError)):
      reason = (str(error).strip() or type(error).__name__).splitlines()[0]
      raise StorageError(f"checkpoint {self.path} was not saved: {reason}") from error
    if error is not None:
      raise error


def _read_every_file(folder):
  """Reads every file below a local folder; StorageError for one that cannot be read."""
  for name in storage.list_files(folder):
    storage.read_bytes(os.path.join(folder, *name.split("/")))
