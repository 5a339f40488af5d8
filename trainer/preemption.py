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

from trainer.errors import SecondInterrupt

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
  """Catches SIGTERM and SIGINT while installed (`with StopSignal() as stop:`).

  Install it after the distribution strategy exists: MultiWorkerMirroredStrategy sets its own
  SIGTERM handler, which just keeps training. A second Ctrl-C stops at once.
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
      raise SecondInterrupt
    if self.signum is None:
      logging.warning("%s received: saving a checkpoint at the next step boundary, then exiting",
                      signal.Signals(signum).name)
      self.signum = signum

  def flag(self):
    """1.0 once a signal arrived, as a tensor, so passing it to a tf.function does not retrace it."""
    import tensorflow as tf  # noqa: PLC0415 -- not at import: trainer.task reads the exit codes before TF starts
    return tf.constant(0.0 if self.signum is None else 1.0)
