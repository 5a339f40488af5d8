"""Preemption: SIGTERM (a node drained or preempted, a pod deleted) or SIGINT (Ctrl-C) asks the
job to save a checkpoint at the next step boundary and exit with a code that says "retry me".

The signal only sets a flag. The flag travels inside the training step's all-reduce
(trainer.loop), so under MultiWorkerMirroredStrategy every worker learns at the same step that
one of them was signalled, and all stop and save that same step. (TF's
PreemptionCheckpointHandler does the same through the coordination service, but it turns itself
off on GCE CPU machines and asks the GCE metadata server where it runs.)
"""

import signal

from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum):
  """128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process killed
  by it: in the 128-255 range that TFJob's ExitCode restart policy retries."""
  return 128 + signum


# Other codes in the 128-255 range that cluster restart policies retry: the job stopped for a
# reason outside it, and the same command resumes from the last checkpoint.
STORAGE_FAILURE = 170  # Cloud Storage could not be read or written (trainer.storage.StorageError)
WORKER_LOST = 171  # another worker of a multi-worker job died
# trainer.retrain: another retrain holds the serving folder's lease (trainer.serving.Lease), or
# promoted a version while this job's workers started (train.WarmStartRace).
SERVING_BUSY = 172


class Restart(Exception):
  """The job stopped for a reason outside it; exit with `exit_code`, and the same command run
  again resumes from the last checkpoint."""
  exit_code = WORKER_LOST


class WorkerLost(Restart):
  """A collective operation failed because another worker of the job went away (killed, out of
  memory, its node gone): every worker must restart together."""

  def __init__(self, error):
    reason = str(error).strip().splitlines()[0][:160]
    super().__init__(f"another worker of this job was lost ({type(error).__name__}: {reason}); restart every "
                     f"worker to resume from the last checkpoint (exit code {self.exit_code})")


class Preempted(Restart):
  """Training stopped on a signal after saving a checkpoint; `resume` says what runs it on from there."""

  def __init__(self, signum, global_step, checkpoint, resume="run the same command again"):
    self.exit_code = exit_code(signum)
    self.signum, self.global_step, self.checkpoint = signum, global_step, checkpoint
    super().__init__(f"stopped by {signal.Signals(signum).name} at step {global_step}; checkpoint {checkpoint} "
                     f"saved; {resume} to resume (exit code {self.exit_code})")

  def resumed_by(self, resume):
    """The same stop, advising `resume` (the command line knows what the loop does not: whether the
    job folder is new each run, or --restart wipes the checkpoints)."""
    return Preempted(self.signum, self.global_step, self.checkpoint, resume)


class StopSignal:
  """Catches SIGTERM and SIGINT while installed (`with StopSignal() as stop:`).

  Install it after the distribution strategy exists: MultiWorkerMirroredStrategy sets its own
  SIGTERM handler, which just keeps training (GUIDE section 4). A second Ctrl-C stops at once.
  """

  def __init__(self):
    self.signum = None
    self._previous = {}

  def __enter__(self):
    for signum in SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    if self.signum is None:
      logging.warning("%s received: saving a checkpoint at the next step boundary, then exiting",
                      signal.Signals(signum).name)
      self.signum = signum

  def flag(self):
    """1.0 once a signal arrived, as a tensor, so passing it to a tf.function does not retrace it."""
    import tensorflow as tf  # noqa: PLC0415 -- not at import: trainer.task reads the exit codes before TF starts
    return tf.constant(0.0 if self.signum is None else 1.0)
