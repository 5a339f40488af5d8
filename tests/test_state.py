"""TrainState and WarmStart: what a checkpoint's state.json holds, and what reports say."""

import logging

import pytest

from trainer.errors import UserError
from trainer.state import NOT_A_RETRAIN, TrainState, WarmStart


@pytest.mark.parametrize("said", [
    {"used": True, "from": "gs://b/serving/3", "version": 3},
    {"used": False, "from": "gs://b/serving/3", "version": 3, "reason": "it is a gru model, this job trains dense"},
    {"used": False, "reason": "--nowarm_start"},
])
def test_a_warm_start_record_reads_back_as_it_was_said(said):
  # The shapes export.warm_start and trainer.retraining give, kept key for key in reports and histories.
  assert WarmStart.from_json(said).to_json() == said


def test_state_json_round_trips_without_the_weights_and_the_report_fields():
  state = TrainState(epoch=2, step=3, global_step=19, loss=[1.0, 0.5], val_loss=[1.1, 0.6], best_epoch=2,
                     partial=[4.0, 96.0], num_replicas=2, warm_start=NOT_A_RETRAIN, best_weights=[1], checkpoint="x")
  saved = state.to_json()
  assert set(saved) == {"epoch", "step", "global_step", "loss", "val_loss", "best_epoch", "partial", "num_replicas",
                        "warm_start"}
  again = TrainState.from_saved(saved, [1], "ckpt-19")
  assert again == TrainState(**{**vars(state), "checkpoint": "ckpt-19", "resumed_from": {
      "checkpoint": "ckpt-19", "epoch": 2, "step": 3, "global_step": 19}})


def test_an_older_layout_takes_the_defaults_and_says_so(caplog):
  with caplog.at_level(logging.WARNING):
    state = TrainState.from_saved({"epoch": 1, "step": 0, "global_step": 8, "warm_start": None}, None, "ckpt-8")
  assert (state.partial, state.num_replicas, state.warm_start) == ([0.0, 0.0], 1, None)
  assert "checkpoint ckpt-8 is of an older layout without loss, val_loss, best_epoch, partial, num_replicas" in \
      caplog.text
  with pytest.raises(UserError, match=r"ckpt-8/state.json has no step, global_step: a checkpoint layout"):
    TrainState.from_saved({"epoch": 1}, None, "ckpt-8")


def test_an_epoch_that_improves_is_the_best_until_a_better_one():
  state = TrainState()
  assert state.end_epoch(1.0, 0.5) and state.end_epoch(0.9, 0.4)
  assert not state.end_epoch(0.8, 0.45)
  assert (state.epoch, state.best_epoch, state.done(epochs=10, patience=1)) == (3, 2, True)
