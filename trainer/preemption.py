"""Preemption: SIGTERM (a node drained or preempted, a pod deleted) or SIGINT (Ctrl-C) asks the
job to save a checkpoint at the next step boundary and exit with a code that says "retry me".

The signal only sets a flag. The flag travels inside the training step's all-reduce
(trainer.loop), so under MultiWorkerMirroredStrategy every worker learns at the same step that
one of them was signalled, and all stop and save that same step. (TF's
PreemptionCheckpointHandler does the same through the coordination service, but it turns itself
off on GCE CPU machines and asks the GCE metadata server where it runs.)

The grace: a preempted pod is killed a fixed time after its SIGTERM (15 s on GKE's Spot and
preemptible nodes, whatever terminationGracePeriodSeconds says), and a checkpoint cut short is no
checkpoint. The trainer cannot read its pod's grace, so --preemption_grace_seconds says it; with it
a save that takes longer is said once, before a preemption finds out (trainer.loop), and after a
signal, a job still running at the grace's end says what it is still doing.
"""

import atexit
import gc
import signal
import threading

from absl import logging

from trainer.errors import SecondInterrupt

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
  """Catches SIGTERM and SIGINT while installed (`with StopSignal() as stop:`).

  Install it after the distribution strategy exists: MultiWorkerMirroredStrategy sets its own
  SIGTERM handler, which just keeps training. A second Ctrl-C stops at once.
  """

  def __init__(self, grace_seconds=0.0):
    """grace_seconds: --preemption_grace_seconds (0: no warnings)."""
    self.signum, self.grace_seconds = None, grace_seconds
    # The checkpoint save under way (trainer.checkpoints.Saving), kept by trainer.loop for the deadline's line.
    self.saving = None
    self._previous, self._deadline, self._said_slow = {}, None, False

  def __enter__(self):
    for signum in SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    if self._deadline is not None:
      self._deadline.cancel()
    if self.signum is not None:
      # The job exits within its grace: interpreter shutdown would garbage-collect every object TensorFlow
      # and Keras made, 7 of a dense job's 10 s from SIGTERM to exit (BENCHMARKS.md "Preemption"). Frozen,
      # they are left to the operating system. Registered now, so it runs before the exit handlers before it.
      atexit.register(gc.freeze)

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise SecondInterrupt
    if self.signum is None:
      logging.warning("%s received: saving a checkpoint at the next step boundary, then exiting",
                      signal.Signals(signum).name)
      self.signum = signum
      # A preemption's SIGTERM has a deadline; a Ctrl-C has none.
      if self.grace_seconds and signum == signal.SIGTERM:
        self._deadline = threading.Timer(self.grace_seconds, self._overdue)
        self._deadline.daemon = True  # never holds the exit up
        self._deadline.start()

  def _overdue(self):
    """At the grace's end after the signal, if the job is still running (the `with` not left)."""
    name, saving = signal.Signals(self.signum).name, self.saving
    if saving is not None and not saving.done:
      logging.warning("checkpoint %s is still being saved %g s after %s (--preemption_grace_seconds=%g): a preempted "
                      "node kills the job about now, and the next run resumes from the checkpoint before it",
                      saving.path, self.grace_seconds, name, self.grace_seconds)
    else:
      logging.warning("still running %g s after %s (--preemption_grace_seconds=%g): a preempted node kills the job "
                      "about now; if it had not saved yet, the next run resumes from the checkpoint before",
                      self.grace_seconds, name, self.grace_seconds)

  def slow_save(self, path, seconds):
    """Says, once, that the save of checkpoint `path` took `seconds`, longer than the grace."""
    if self.grace_seconds and seconds > self.grace_seconds and not self._said_slow:
      self._said_slow = True
      logging.warning("checkpoint %s took %.1f s to save, longer than --preemption_grace_seconds=%g: a preemption "
                      "would kill the job before its checkpoint is saved and lose the steps since the one before "
                      "(README \"Resume, preemption and exit codes\": what fits in 15 s)",
                      path, seconds, self.grace_seconds)

  def flag(self):
    """1.0 once a signal arrived, as a tensor, so passing it to a tf.function does not retrace it."""
    import tensorflow as tf  # noqa: PLC0415 -- not at import: trainer.task reads the exit codes before TF starts
    return tf.constant(0.0 if self.signum is None else 1.0)
