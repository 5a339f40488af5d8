"""What stops a job, and the exit code that tells a cluster what to do next (README "Resume,
preemption and exit codes"): every exception that carries a code, the codes, and `exiting`,
which turns them into one line on stderr and that code. No TensorFlow here: the entry points
report flag and data mistakes with it before TensorFlow starts.

  0        done
  2        a mistake in the job's input (UserError) or a diverged training: retrying cannot fix it
           (TFJob's ExitCode restart policy treats 1-127 as permanent)
  128-255  retried, and the same command resumes from the last checkpoint:
           128 + the signal (143 SIGTERM, 130 SIGINT) after saving a checkpoint (Preempted),
           170 storage unreachable (StorageError), 171 another worker lost (WorkerLost),
           172 the serving folder busy (ServingBusy)
"""

import contextlib
import signal
import sys

USER_ERROR = 2
STORAGE_FAILURE = 170  # Cloud Storage could not be read or written (StorageError)
WORKER_LOST = 171  # another worker of a multi-worker job died (WorkerLost)
# trainer.retrain: another retrain holds the serving folder's lease, or promoted a version while
# this job's workers started (ServingBusy).
SERVING_BUSY = 172


def signal_exit_code(signum):
  """128 + the signal number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process killed
  by it: in the 128-255 range that TFJob's ExitCode restart policy retries."""
  return 128 + signum


class UserError(Exception):
  """A mistake in the job's input: reported as one line and exit code 2, never a traceback."""


class StorageError(Exception):
  """Storage that could not be reached or refused an operation; the message is one line (exit 170)."""


class Restart(Exception):
  """The job stopped for a reason outside it; exit with `exit_code`, and the same command run
  again resumes from the last checkpoint."""
  exit_code = WORKER_LOST


class ServingBusy(Restart):
  """Another retrain holds or changed the serving folder (trainer.serving_lease's Lease, a warm start
  raced by a promotion): a retry later finds it free or settled."""
  exit_code = SERVING_BUSY


class WorkerLost(Restart):
  """A collective operation failed because another worker of the job went away (killed, out of
  memory, its node gone): every worker must restart together."""

  def __init__(self, error):
    reason = str(error).strip().splitlines()[0][:160]
    super().__init__(f"another worker of this job was lost ({type(error).__name__}: {reason}); restart every "
                     f"worker to resume from the last checkpoint (exit code {self.exit_code})")


class SecondInterrupt(KeyboardInterrupt):
  """A second Ctrl-C while a job was stopping on the first (trainer.preemption): stop at once."""


class Preempted(Restart):
  """Training stopped on a signal after saving a checkpoint; `resume` says what runs it on from there."""

  def __init__(self, signum, global_step, checkpoint, resume="run the same command again"):
    self.exit_code = signal_exit_code(signum)
    self.signum, self.global_step, self.checkpoint = signum, global_step, checkpoint
    super().__init__(f"stopped by {signal.Signals(signum).name} at step {global_step}; checkpoint {checkpoint} "
                     f"saved; {resume} to resume (exit code {self.exit_code})")

  def resumed_by(self, resume):
    """The same stop, advising `resume` (the command line knows what the loop does not: whether the
    job folder is new each run, or --restart wipes the checkpoints)."""
    return Preempted(self.signum, self.global_step, self.checkpoint, resume)


def fail(message, code=USER_ERROR, prefix="trainer: error: "):
  """One line on stderr, no traceback, and the exit code that tells a cluster what to do next."""
  print(f"{prefix}{message}", file=sys.stderr, flush=True)
  sys.exit(code)


@contextlib.contextmanager
def exiting(program="trainer"):
  """Turns what stops a job into one line on stderr, "<program>: error: ..." for a mistake or a
  storage failure, "<program>: ..." for a restart, and its exit code."""
  try:
    yield
  except UserError as e:
    fail(str(e), USER_ERROR, prefix=f"{program}: error: ")
  except StorageError as e:
    fail(str(e), STORAGE_FAILURE, prefix=f"{program}: error: ")
  except Restart as e:
    fail(str(e), e.exit_code, prefix=f"{program}: ")
  except KeyboardInterrupt as e:  # Ctrl-C before training installed its handler, or a second one during it
    how = "at once by a second Ctrl-C" if isinstance(e, SecondInterrupt) else "by Ctrl-C"
    fail(f"stopped {how}, without a checkpoint of this step; the last complete checkpoint, if any, is kept "
         f"(exit code {signal_exit_code(signal.SIGINT)})", signal_exit_code(signal.SIGINT), prefix=f"{program}: ")
