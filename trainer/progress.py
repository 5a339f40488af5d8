"""Progress lines in the chief's log: where the epoch stands, how fast it goes, when it will end.

Without them an hour-long CNN epoch is an hour of silence in `kubectl logs`. The loop hands every
step call's result to Progress (Loop's on_step); every --log_every_steps steps, or by default about
every DEFAULT_SECONDS, it logs one line such as

  progress: epoch 2/60 step 150/400  41.2 steps/s  1318 examples/s  loss 0.2345  ETA epoch 0:00:06 job 0:09:40

Plain lines, on a terminal too: no carriage returns or progress-bar escapes, which pod logs and log
files would keep as garbage. A call may hold several steps (--steps_per_loop): counts come from the
global steps the results name, never from the number of calls.
"""

import dataclasses
import datetime
import re
import time
from typing import Callable, Optional

from absl import logging

# A line about this often when --log_every_steps is 0: often enough to see a job move, rarely enough to
# cost nothing measurable (BENCHMARKS.md, "Progress and summaries").
DEFAULT_SECONDS = 30.0

# What a progress line looks like, for whoever reads logs (and the tests).
LINE = re.compile(r"progress: epoch (?P<epoch>\d+)/(?P<epochs>\d+) step (?P<step>\d+)/(?P<steps>\d+|\?)  "
                  r"(?P<steps_per_second>[\d.]+) steps/s  (?P<examples_per_second>[\d.]+) examples/s  "
                  r"loss (?P<loss>\S+)  ETA epoch (?P<epoch_eta>[\d:]+|\?) job (?P<job_eta>[\d:]+|\?)$")


def eta(step, steps_per_epoch, epoch, epochs, steps_per_second, validation_seconds=0.0):
  """(seconds left in this epoch's training, seconds left in the job) at this rate, the job's with
  one validation of validation_seconds an epoch; (None, None) while the epoch's length is unknown.
  The job's is at most: early stopping may end it sooner."""
  if not steps_per_epoch or steps_per_second <= 0:
    return None, None
  epoch_left = max(steps_per_epoch - step, 0) / steps_per_second
  later = epochs - epoch
  return epoch_left, epoch_left + later * steps_per_epoch / steps_per_second + (later + 1) * validation_seconds


def _clock_time(seconds):
  return "?" if seconds is None else str(datetime.timedelta(seconds=round(seconds)))


@dataclasses.dataclass(frozen=True)
class Interval:
  """What one progress interval measured: the line's figures, and what summaries record."""
  epoch: int  # the epoch in progress, from 1
  epochs: int
  step: int  # steps of this epoch done
  steps_per_epoch: Optional[int]  # None until known
  global_step: int
  steps_per_second: float
  examples_per_second: float
  loss: float  # the epoch's running mean
  interval_loss: float  # the mean over this interval's steps
  epoch_eta: Optional[float]  # seconds
  job_eta: Optional[float]

  def line(self):
    return (f"progress: epoch {self.epoch}/{self.epochs} step {self.step}/{self.steps_per_epoch or '?'}  "
            f"{self.steps_per_second:.2f} steps/s  {self.examples_per_second:.1f} examples/s  loss {self.loss:.4g}  "
            f"ETA epoch {_clock_time(self.epoch_eta)} job {_clock_time(self.job_eta)}")


class Progress:
  """Loop's on_step: measures every interval and logs its line (log=False: measures only, as on
  the workers that are not the chief) and hands it to on_interval. end_epoch(state,
  validation_seconds) after each epoch learns the epoch's length when the data did not say it.

  global_step: where training starts (a resumed job's step); every_steps: a line every this many
  steps, 0: about every `seconds`; clock: seconds, monotonic (tests inject one)."""

  def __init__(self, epochs, global_step=0, every_steps=0, steps_per_epoch=None, seconds=DEFAULT_SECONDS,
               clock: Callable[[], float] = time.monotonic, on_interval=None, log=True):
    self.epochs, self.every_steps, self.steps_per_epoch, self.seconds = epochs, every_steps, steps_per_epoch, seconds
    self.clock, self.on_interval, self.log = clock, on_interval, log
    self.steps = self.examples = 0  # in all, for the report's throughput
    self._step = global_step  # the last step seen
    self._mark = (clock(), global_step, 0.0, [0.0, 0.0])  # the last line's time, step, examples, loss sums
    self._epoch, self._epoch_step, self._epoch_sums = None, 0, [0.0, 0.0]
    self._validation_seconds = 0.0

  def __call__(self, state, result):
    self.steps += result.step - self._step
    self.examples += result.count
    previous, self._step = self._step, result.step
    epoch = state.epoch + 1
    if epoch != self._epoch:
      self._epoch, self._epoch_sums = epoch, [0.0, 0.0]
    self._epoch_sums = [self._epoch_sums[0] + result.loss_sum, self._epoch_sums[1] + result.count]
    self._mark[3][:] = [self._mark[3][0] + result.loss_sum, self._mark[3][1] + result.count]
    # The loop has moved on since this result (it is read one call late): its step of the epoch.
    self._epoch_step = state.step - (state.global_step - result.step)
    now = self.clock()
    if self.every_steps:
      due = result.step // self.every_steps > previous // self.every_steps
    else:
      due = now - self._mark[0] >= self.seconds
    if due:
      self._report(now, result.step)

  def _report(self, now, global_step):
    seconds = max(now - self._mark[0], 1e-9)
    rate = (global_step - self._mark[1]) / seconds
    epoch_eta, job_eta = eta(self._epoch_step, self.steps_per_epoch, self._epoch, self.epochs, rate,
                             self._validation_seconds)
    interval = Interval(self._epoch, self.epochs, self._epoch_step, self.steps_per_epoch, global_step, rate,
                        (self.examples - self._mark[2]) / seconds, self._epoch_sums[0] / max(self._epoch_sums[1], 1),
                        self._mark[3][0] / max(self._mark[3][1], 1), epoch_eta, job_eta)
    self._mark = (now, global_step, self.examples, [0.0, 0.0])
    if self.log:
      logging.info("%s", interval.line())
    if self.on_interval:
      self.on_interval(interval)

  def end_epoch(self, state, validation_seconds):
    # The first epoch trained whole says how long every epoch is; validation is no training time.
    if self.steps_per_epoch is None and self._epoch == state.epoch:
      self.steps_per_epoch = self._epoch_step or None
    self._validation_seconds = validation_seconds
    self._mark = (self._mark[0] + validation_seconds, *self._mark[1:])
