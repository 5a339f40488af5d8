"""Progress lines: the figures they give (rates, running loss, ETAs) from an injected clock, whatever
the number of steps a call holds."""

import pytest

from trainer import progress
from trainer.loop import StepResult
from trainer.state import TrainState


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def epoch(watch, state, clock, calls, steps_per_call=4, seconds_per_call=2.0, validation_seconds=5.0):
  """One epoch as trainer.loop runs it: each call's result reaches the hook once the next call is
  queued, the last at the end; then validation, and the end of the epoch."""
  late = None
  for _ in range(calls):
    clock.now += seconds_per_call
    state.step, state.global_step = state.step + steps_per_call, state.global_step + steps_per_call
    if late:
      watch(state, late)
    late = StepResult(state.global_step, loss_sum=0.5 * 32 * steps_per_call, count=32 * steps_per_call, stop=False)
  watch(state, late)
  clock.now += validation_seconds
  state.end_epoch(0.5, 0.4)
  watch.end_epoch(state, validation_seconds)


def test_rates_and_etas_by_time_with_several_steps_a_call():
  clock, seen, state = Clock(), [], TrainState()
  watch = progress.Progress(epochs=3, clock=clock, on_interval=seen.append, log=False)
  epoch(watch, state, clock, calls=10)  # 40 steps in 20 s: no line yet, and the epoch's length learnt
  assert seen == [] and watch.steps_per_epoch == 40
  epoch(watch, state, clock, calls=10)
  epoch(watch, state, clock, calls=10)
  first, second = seen
  # 30 s of training (validation's 5 s left out) at the call whose result is step 56, 16 steps into epoch 2.
  rate = 56 / 30
  assert (first.epoch, first.step, first.steps_per_epoch, first.global_step) == (2, 16, 40, 56)
  assert first.steps_per_second == pytest.approx(rate)
  assert first.examples_per_second == pytest.approx(56 * 32 / 30)
  assert first.loss == first.interval_loss == pytest.approx(0.5)
  # The epoch's 24 steps left; then epoch 3's 40, and two validations of 5 s.
  assert first.epoch_eta == pytest.approx(24 / rate)
  assert first.job_eta == pytest.approx(24 / rate + 40 / rate + 2 * 5)
  assert (second.epoch, second.step, second.global_step) == (3, 36, 116)
  assert second.steps_per_second == pytest.approx(60 / 30)
  assert (second.epoch_eta, second.job_eta) == (pytest.approx(2.0), pytest.approx(2.0 + 5))
  assert watch.steps == 120 and watch.examples == 120 * 32
  assert progress.LINE.match(first.line()).groupdict() == {
      "epoch": "2", "epochs": "3", "step": "16", "steps": "40", "steps_per_second": "1.87",
      "examples_per_second": "59.7", "loss": "0.5", "epoch_eta": "0:00:13", "job_eta": "0:00:44"}


@pytest.mark.parametrize("steps_per_call, lines", [(1, [20, 40, 60]), (4, [20, 40, 60]), (3, [21, 42, 60])])
def test_every_n_steps_counts_steps_not_calls(steps_per_call, lines):
  clock, seen, state = Clock(), [], TrainState()
  watch = progress.Progress(epochs=1, every_steps=20, steps_per_epoch=60, clock=clock, on_interval=seen.append,
                            log=False)
  epoch(watch, state, clock, calls=60 // steps_per_call, steps_per_call=steps_per_call)
  assert [interval.global_step for interval in seen] == lines
  assert seen[-1].epoch_eta == seen[-1].job_eta == 0  # no validation timed yet


def test_a_resumed_epoch_counts_from_the_epochs_start():
  clock, seen, state = Clock(), [], TrainState(global_step=10, step=10)
  watch = progress.Progress(epochs=1, global_step=10, every_steps=10, clock=clock, on_interval=seen.append,
                            log=False)
  epoch(watch, state, clock, calls=4, steps_per_call=5)
  assert [(i.step, i.global_step, i.steps_per_epoch) for i in seen] == [(20, 20, None), (30, 30, None)]
  assert watch.steps_per_epoch == 30 and watch.steps == 20


def test_eta_is_unknown_until_the_epochs_length_is():
  assert progress.eta(5, None, 1, 3, 2.0) == (None, None)
  assert progress.Interval(1, 3, 5, None, 5, 2.0, 64.0, 0.5, 0.5, None, None).line().endswith(
      "step 5/?  2.00 steps/s  64.0 examples/s  loss 0.5  ETA epoch ? job ?")
