"""Several training steps per call, learning-rate schedules and gradient clipping (trainer.steps),
in the loop (trainer.loop) and through the trainer's flags."""

import json
import os
import re
import signal

import keras
import linear
import numpy as np
import pytest
import tensorflow as tf
from processes import Job, run, stalled

from trainer import distribution, loop, steps, storage
from trainer.checkpoints import Checkpoints
from trainer.cluster import Cluster
from trainer.config import Config
from trainer.errors import Preempted, UserError
from trainer.models import MODELS, OPTIMIZERS
from trainer.preemption import StopSignal
from trainer.state import TrainState

ALONE = Cluster(spec={}, task_type="worker", task_index=0, source="none")


# 232 rows: 8 steps of a global batch of 32 (not a multiple of 3); under two replicas of 16, 15
# per-replica batches, so the last step hands replica 1 an empty batch. The order changes with the epoch.
uneven = linear.make(rows=232, shuffle=True)


def model_and_optimizer(strategy, loss_scaling=False):
  keras.utils.set_random_seed(5)
  with strategy.scope():
    model = MODELS["dense"]((5,))
    optimizer = OPTIMIZERS["dense"](1e-2)
    if loss_scaling:  # as trainer.train does under mixed float16
      optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
  return model, optimizer


def trained(strategy, steps_per_loop, epochs=2, clip_norm=None, loss_scaling=False, make_dataset=uneven, batch=32):
  model, optimizer = model_and_optimizer(strategy, loss_scaling)
  history = loop.fit(model, optimizer, loop.squared_error, make_dataset, strategy, batch, epochs, epochs,
                     steps_per_loop=steps_per_loop, clip_norm=clip_norm)
  return history, model.get_weights()


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
@pytest.mark.parametrize("strategy_name", ["default", "mirrored"])
def test_three_steps_per_call_train_exactly_as_one(strategy_name):
  strategy = distribution.make_strategy(strategy_name, ALONE, 2 if strategy_name == "mirrored" else 0)
  (one, weights_1), (three, weights_3) = trained(strategy, 1), trained(strategy, 3)
  assert one["global_step"] == three["global_step"] == 16
  assert one == three  # the epochs' losses too: the running sum is added to in the same order
  for a, b in zip(weights_1, weights_3):
    np.testing.assert_array_equal(a, b)


def test_a_call_boundary_that_reaches_or_passes_a_multiple_saves(tmp_path):
  # 8 steps an epoch in calls of 3: calls end at 3, 6, 8, 11, 14, 16. Every 4 steps: 4 is passed by the call
  # ending at 6, 8 is reached, 12 passed at 14, 16 reached (the end of training, saved once).
  strategy = tf.distribute.get_strategy()
  model, optimizer = model_and_optimizer(strategy)
  checkpoints = Checkpoints(str(tmp_path), model, optimizer, keep=10)
  loop.fit(model, optimizer, loop.squared_error, uneven, strategy, 32, 2, 2, steps_per_loop=3,
           checkpointing=loop.Checkpointing(checkpoints, every_steps=4))
  assert checkpoints.complete() == [6, 8, 14, 16]
  due = loop.Checkpointing(every_steps=4).due
  assert [due(step, steps=3) for step in (3, 6, 8, 11, 14)] == [False, True, True, False, True]


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_a_signal_saves_after_the_next_call_and_the_resumed_job_ends_exactly_as_one_never_stopped(tmp_path):
  strategy = tf.distribute.get_strategy()
  reference, reference_weights = trained(strategy, 3)
  model, optimizer = model_and_optimizer(strategy)
  checkpoints = Checkpoints(str(tmp_path), model, optimizer)
  with StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)  # before the first call: its flag is read one call late, after step 6
    with pytest.raises(Preempted) as stopped:
      loop.fit(model, optimizer, loop.squared_error, uneven, strategy, 32, 2, 2, steps_per_loop=3,
               checkpointing=loop.Checkpointing(checkpoints, stop=stop))
  assert stopped.value.global_step == 6 and checkpoints.complete() == [6]

  model, optimizer = model_and_optimizer(strategy)  # a new process: other weights until restored
  checkpoints = Checkpoints(str(tmp_path), model, optimizer)
  restored = checkpoints.restore_latest()
  state = TrainState.from_saved(restored.state, restored.best_weights, restored.folder)
  assert (state.epoch, state.step) == (0, 6)
  history = loop.fit(model, optimizer, loop.squared_error, uneven, strategy, 32, 2, 2, state=state,
                     steps_per_loop=3, checkpointing=loop.Checkpointing(checkpoints))
  assert history == reference
  for a, b in zip(model.get_weights(), reference_weights):
    np.testing.assert_array_equal(a, b)


def one_batch_of_64(split, batch_size, input_context=None, epoch=0):
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((64, 5)).astype(np.float32), 10 * rng.standard_normal(64).astype(np.float32)
  dataset = tf.data.Dataset.from_tensor_slices((x, y))
  if input_context is not None:
    dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  return dataset.batch(batch_size)


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_clipping_is_of_the_all_reduced_gradient():
  """One replica of 64 and two of 32 take the same clipped step. Clipped per replica (Keras'
  global_clipnorm), each half of the gradient would be clipped to the norm, and the step would be up to
  twice as long."""
  runs = {name: trained(distribution.make_strategy(name, ALONE, 2 if name == "mirrored" else 0), 1, epochs=1,
                        clip_norm=0.01, make_dataset=one_batch_of_64, batch=64)
          for name in ("default", "mirrored")}
  for a, b in zip(runs["default"][1], runs["mirrored"][1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  _, unclipped = trained(tf.distribute.get_strategy(), 1, epochs=1, make_dataset=one_batch_of_64, batch=64)
  assert not np.allclose(unclipped[0], runs["default"][1][0], atol=1e-4)  # the clipping did bite


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_clipping_under_loss_scaling_takes_the_same_step():
  # Mixed float16 (GPUs) wraps the optimizer in a LossScaleOptimizer: its gradients are scaled, the threshold too.
  strategy = tf.distribute.get_strategy()
  _, plain = trained(strategy, 1, epochs=1, clip_norm=0.01, make_dataset=one_batch_of_64, batch=64)
  _, weights = trained(strategy, 1, epochs=1, clip_norm=0.01, loss_scaling=True, make_dataset=one_batch_of_64,
                       batch=64)
  for a, b in zip(plain, weights):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_learning_rate_schedules():
  assert steps.learning_rate("constant", 0.1) == 0.1
  warm = steps.learning_rate("constant", 0.1, warmup_steps=10, total_steps=100)
  cosine = steps.learning_rate("cosine", 0.1, warmup_steps=10, total_steps=110)
  at = {name: [float(schedule(step)) for step in (0, 5, 10, 60, 110, 200)]
        for name, schedule in (("warm", warm), ("cosine", cosine))}
  np.testing.assert_allclose(at["warm"], [0, 0.05, 0.1, 0.1, 0.1, 0.1], atol=1e-7)
  np.testing.assert_allclose(at["cosine"], [0, 0.05, 0.1, 0.05, 0, 0], atol=1e-7)
  no_warmup = steps.learning_rate("cosine", 0.1, total_steps=100)
  np.testing.assert_allclose([float(no_warmup(step)) for step in (0, 50, 100)], [0.1, 0.05, 0], atol=1e-7)


@pytest.mark.parametrize("flags, message", [
    ({"steps_per_loop": 0}, "--steps_per_loop must be at least 1 (got 0)"),
    ({"lr_schedule": "linear"}, "--lr_schedule='linear' is unknown; choose one of: constant, cosine"),
    ({"warmup_steps": -1}, "--warmup_steps must be 0 (no warmup) or more (got -1)"),
    ({"clip_norm": -1.0}, "--clip_norm must be 0 (no clipping) or more (got -1.0)"),
])
def test_flag_mistakes_are_one_line(flags, message):
  with pytest.raises(UserError, match=re.escape(message)):
    Config(**flags)


def test_the_schedule_is_part_of_the_identity_and_the_rest_may_change_on_resume():
  saved = Config().resume_identity()
  assert Config(lr_schedule="cosine").resume_mismatch(saved) == ("lr_schedule", "constant", "cosine")
  assert Config(warmup_steps=10).resume_mismatch(saved) == ("warmup_steps", 0, 10)
  assert Config(steps_per_loop=7, clip_norm=1.0, learning_rate=0.5).resume_mismatch(saved) is None


def test_a_divergence_suggests_clipping_unless_it_is_on():
  state = TrainState(checkpoint="ckpt-8")
  assert str(loop.Diverged.at(state, "nan", 9)).endswith("resume from it with a lower --learning_rate or with "
                                                          "--clip_norm=1")
  assert str(loop.Diverged.at(state, "nan", 9, clip_norm=1.0)).endswith("resume from it with a lower --learning_rate")
  assert str(loop.Diverged.at(TrainState(), "nan", 9)).endswith("; lower --learning_rate or set --clip_norm=1")


def infinite_third_batch(split, batch_size, input_context=None, epoch=0):
  batches = uneven(split, batch_size, input_context, epoch).enumerate()
  return batches.map(lambda i, batch: (batch[0], tf.where(i == 2, np.inf, batch[1])))


def test_a_nan_within_a_call_is_named_at_its_own_step():
  # One call of all 8 steps: the loss is first infinite at step 3 (then NaN, the weights being so).
  with pytest.raises(loop.Diverged, match=r"the loss is (nan|inf) at step 3 \(epoch 1\); lower --learning_rate"):
    trained(tf.distribute.get_strategy(), 100, epochs=1, make_dataset=infinite_third_batch)


@pytest.mark.slow
def test_sigterm_with_several_steps_per_call_and_a_cosine_schedule_resumes_exactly(tmp_path):
  """Dense, built-in table: 200 steps an epoch, in calls of 3. The signal arrives while ckpt-150 (a
  call boundary) is published, synchronously (the stall holds training); the next call carries the
  flag, read one call late: the job saves step 156 and stops. The rerun resumes there with the
  schedule where the optimizer's step count left it."""
  flags = ["--model=dense", "--epochs=2", "--steps_per_loop=3", "--lr_schedule=cosine", "--warmup_steps=50",
           "--checkpoint_every_steps=150", "--async_checkpoints=false"]
  code, reference = run([*flags, f"--job_dir={tmp_path / 'reference'}"])
  assert code == 0, reference.stderr[-3000:]
  job_dir = str(tmp_path / "stopped")
  job = Job([*flags, f"--job_dir={job_dir}"], command=stalled("trainer.task", rename=r"/ckpt-150$",
                                                              until_signal=True))
  job.wait_for("^STALLED")
  job.signal(signal.SIGTERM)
  assert job.finish() == 143
  assert re.match(r"trainer: stopped by SIGTERM at step 156; ", job.last_line()), job.stderr[-2000:]
  code, rerun = run([*flags, f"--job_dir={job_dir}"])
  assert code == 0, rerun.stderr[-3000:]
  assert "resuming from " + os.path.join(job_dir, "checkpoints", "ckpt-156") in rerun.stderr
  result, expected = (json.loads(storage.read_text(os.path.join(d, "report.json")))
                      for d in (job_dir, str(tmp_path / "reference")))
  assert result["history"] == expected["history"]
  assert result["weights_checksum"] == expected["weights_checksum"]
  assert result["test"] == expected["test"]


def test_a_cosine_schedule_spans_the_job_from_the_data_summary(make_image_folder):
  """--epochs of the training split's batches, counted from the prepared data's summary."""
  from trainer import train
  table = Config(model="dense", epochs=3, lr_schedule="cosine", warmup_steps=20)  # 6,400 training rows
  images = Config(model="cnn", data=make_image_folder(), image_size=24, augment=False, epochs=2, batch_size=4,
                  lr_schedule="cosine")
  for config, steps_in_job in ((table, 3 * 200), (images, None)):
    prepared = train.DATA[config.model].prepare(config)
    schedule = train._learning_rate(config, prepared)
    if steps_in_job is None:  # images: ceil(training images / 4) an epoch
      steps_in_job = 2 * -(-sum(prepared.summary["counts"]["train"]) // 4)
    assert schedule.decay_steps + schedule.warmup_steps == steps_in_job
    assert float(schedule(steps_in_job)) == 0 and float(schedule(config.warmup_steps)) == pytest.approx(1e-3)
