"""The start decision, in its order: restart, resume, warm start, fresh (in-process, a tiny model)."""

import logging

import numpy as np
import pytest
import tensorflow as tf

from trainer import start
from trainer.checkpoints import Checkpoints
from trainer.config import Config, UserError
from trainer.models import MODELS, OPTIMIZERS
from trainer.state import NOT_A_RETRAIN, TrainState, WarmStart


def begin(folder, offered=NOT_A_RETRAIN, **flags):
  config = Config(model="dense", **flags)
  model, optimizer = MODELS["dense"]((5,)), OPTIMIZERS["dense"](config.learning_rate)
  optimizer.build(model.trainable_variables)
  checkpoints = Checkpoints(folder, model, optimizer, info={"config": config.resume_identity(), "data": {}})
  return start.begin(config, checkpoints, model, optimizer, tf.distribute.get_strategy(), offered), model, \
      checkpoints


def test_a_new_job_starts_fresh_and_says_why_it_did_not_warm_start(tmp_path):
  state, _, _ = begin(str(tmp_path), WarmStart(reason="--nowarm_start"))
  assert state == TrainState(warm_start=WarmStart(reason="--nowarm_start"))


def test_a_job_resumes_its_state_weights_and_first_warm_start_then_a_restart_forgets_them(tmp_path, caplog):
  state, model, checkpoints = begin(str(tmp_path))
  model.set_weights([w + 1 for w in model.get_weights()])
  state.epoch, state.global_step, state.best_weights = 1, 8, model.get_weights()
  checkpoints.save(8, state.to_json(), state.best_weights)

  with caplog.at_level(logging.INFO, logger="absl"):
    resumed, model2, _ = begin(str(tmp_path), WarmStart(reason="--nowarm_start"), learning_rate=0.5)
  assert "learning rate 0.001 from the checkpoint replaced by --learning_rate=0.5" in caplog.text
  assert resumed.resumed_from == {"checkpoint": str(tmp_path / "ckpt-8"), "epoch": 1, "step": 0, "global_step": 8}
  assert resumed.checkpoint == str(tmp_path / "ckpt-8")
  assert resumed.warm_start == NOT_A_RETRAIN  # what the first attempt started from, not what this one is offered
  for a, b in zip(model2.get_weights(), model.get_weights()):
    np.testing.assert_array_equal(a, b)

  restarted, _, checkpoints = begin(str(tmp_path), restart=True)
  assert restarted == TrainState(warm_start=NOT_A_RETRAIN) and checkpoints.complete() == []


def test_a_checkpoint_of_another_job_is_refused(tmp_path):
  state, _, checkpoints = begin(str(tmp_path))
  checkpoints.save(1, state.to_json(), None)
  with pytest.raises(UserError, match="holds checkpoints of another job: --seed was 42, now 7"):
    begin(str(tmp_path), seed=7)
