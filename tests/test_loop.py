import logging
import os
import signal
import sys
import threading

import forked
import linear
import numpy as np
import pytest
import tensorflow as tf

from trainer import distribution, loop
from trainer.checkpoints import Checkpoints
from trainer.cluster import Cluster
from trainer.errors import StorageError, UserError
from trainer.models import MODELS, OPTIMIZERS
from trainer.errors import Preempted
from trainer.preemption import StopSignal
from trainer.state import TrainState


linear_data = linear.make(rows=256)


def train(epochs, patience, learning_rate=1e-2, log_dir=None):
  strategy = tf.distribute.get_strategy()
  model = MODELS["dense"]((5,))
  optimizer = OPTIMIZERS["dense"](learning_rate)
  history = loop.fit(model, optimizer, loop.squared_error, linear_data, strategy, 32, epochs, patience, log_dir)
  return model, history


def validation_loss(model):
  x, y = next(iter(linear_data("validation", 256)))
  return float(np.mean((model(x).numpy()[:, 0] - y.numpy()) ** 2))


def test_loss_falls_and_epoch_losses_are_exact():
  model, history = train(epochs=5, patience=5)
  assert history["loss"][-1] < history["loss"][0] / 2
  # The reported validation loss is the mean over every example, whatever the batching.
  assert validation_loss(model) == pytest.approx(history["val_loss"][history["best_epoch"] - 1], rel=1e-4)


def test_early_stopping_keeps_the_best_weights():
  # A learning rate this large makes validation loss bounce, so early stopping has work to do.
  model, history = train(epochs=30, patience=2, learning_rate=0.3)
  best = history["best_epoch"]
  assert len(history["loss"]) == best + 2 < 30  # stopped two epochs after the best
  assert min(history["val_loss"]) == history["val_loss"][best - 1]
  assert validation_loss(model) == pytest.approx(history["val_loss"][best - 1], rel=1e-4)


def test_divergence_stops_with_a_clear_error():
  with pytest.raises(UserError,
                     match=r"training diverged: the loss is (nan|inf) at step \d+ \(epoch 1\); lower --learning_rate"):
    train(epochs=20, patience=20, learning_rate=1e12)


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_tensorboard_logs_are_written(tmp_path):
  train(epochs=2, patience=2, log_dir=str(tmp_path))
  for split in ("train", "validation"):
    assert list((tmp_path / split).glob("events.out.tfevents.*"))


def test_checkpoints_every_n_steps_and_at_the_end(tmp_path):
  strategy = tf.distribute.get_strategy()
  model = MODELS["dense"]((5,))
  optimizer = OPTIMIZERS["dense"](1e-2)
  optimizer.build(model.trainable_variables)
  checkpoints = Checkpoints(str(tmp_path), model, optimizer, keep=10)
  # 256 rows in batches of 32: 8 steps an epoch.
  loop.fit(model, optimizer, loop.squared_error, linear_data, strategy, 32, 2, 2,
           checkpointing=loop.Checkpointing(checkpoints, every_steps=3))
  assert checkpoints.complete() == [3, 6, 9, 12, 15, 16]
  step, state, _, _ = checkpoints.restore_latest()
  assert (state["epoch"], state["step"], state["global_step"]) == (2, 0, 16)


SHAPES = {"dense": (5,), "gru": (6, 1), "lstm": (6, 1), "cnn": (32, 32, 3)}


def odd_batches(model_name):
  """A make_dataset whose splits give each pipeline 3 per-replica batches of 16 (the last of 8): under
  two replicas the last step hands replica 1 an empty batch."""
  def make_dataset(split, batch_size, input_context=None, epoch=0):
    rng = np.random.default_rng(0 if split == "train" else 1)
    # Images as the trainer's loop gets them: uint8, turned into floats by the step on each replica (an empty one too).
    x = (rng.integers(0, 256, (40, *SHAPES[model_name]), dtype=np.uint8) if model_name == "cnn" else
         rng.standard_normal((40, *SHAPES[model_name])).astype(np.float32))
    y = (rng.integers(0, 3, 40) if model_name == "cnn" else rng.standard_normal(40)).astype(np.float32)
    # A regressor's validation batches carry the data's units, as the forecasts' do (trainer.data.Prepared).
    units = (np.full(40, 2.0, np.float32),) if split == "validation" and model_name != "cnn" else ()
    return tf.data.Dataset.from_tensor_slices((x, y, *units)).batch(batch_size)
  return make_dataset


@pytest.mark.slow
# The LSTM, whose step is built as the GRU's (keras.layers.RNN cells), meets an empty replica in
# test_distribution.py (an odd number of batches on two replicas).
@pytest.mark.parametrize("model_name", ["cnn", "dense", "gru"])
def test_a_replica_with_an_empty_batch_trains_every_family(model_name):
  # Two replicas of 16: 40 examples are 3 per-replica batches, so the second step gives replica 1 nothing.
  strategy = distribution.make_strategy("mirrored", Cluster({}, "worker", 0, "none"), cpu_devices=2)
  with strategy.scope():
    model = MODELS[model_name](SHAPES[model_name], 3 if model_name == "cnn" else 1)
    optimizer = OPTIMIZERS[model_name](1e-3)
    optimizer.build(model.trainable_variables)  # as the trainer does: no variable is created inside a step
  loss = loop.cross_entropy if model_name == "cnn" else loop.squared_error
  validated = []
  # Clipping all-reduces the gradient inside the step, a second collective that the empty replica must join;
  # two steps per call take the epoch's last step inside a call, as the trainer's default of 10 does.
  history = loop.fit(model, optimizer, loss, odd_batches(model_name), strategy, 32, 1, 1, clip_norm=1.0,
                     steps_per_loop=2, on_epoch=lambda state, loss, val_sums, *_: validated.append(val_sums))
  assert np.isfinite(history["loss"] + history["val_loss"]).all()
  assert history["global_step"] == 2  # 32 examples, then 8 on replica 0 alone
  # Validation too: every example counted once (the empty replica adds nothing), and every metric finite.
  assert validated[0][1] == 40 and np.isfinite(validated[0]).all() and len(validated[0]) == 2 + len(
      loop.VALIDATION_METRICS[loss])


def test_a_worker_that_does_not_publish_never_logs_a_checkpoint_as_saved(tmp_path, caplog):
  # A non-chief worker of a cluster writes each checkpoint for the collective save, then discards it:
  # only the chief's copy is published, so "checkpoint <path> saved" would name a folder it never wrote.
  strategy = tf.distribute.get_strategy()
  model = MODELS["dense"]((5,))
  optimizer = OPTIMIZERS["dense"](1e-2)
  optimizer.build(model.trainable_variables)
  checkpoints = Checkpoints(str(tmp_path), model, optimizer, publish=False)
  with caplog.at_level(logging.INFO, logger="absl"):
    loop.fit(model, optimizer, loop.squared_error, linear_data, strategy, 32, 1, 1,
             checkpointing=loop.Checkpointing(checkpoints))
  assert checkpoints.complete() == []
  lines = [r.getMessage() for r in caplog.records if "checkpoint" in r.getMessage()]
  assert lines and not [line for line in lines if " saved" in line], lines
  assert "checkpoint of step 8 written for the collective save and discarded: the chief publishes " \
      f"{tmp_path / 'ckpt-8'} (epoch 1, step 0;" in lines[0]


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_tensorboard_logs_are_copied_after_each_save_on_the_saving_thread_and_a_failed_copy_does_not_stop_it(
    tmp_path, caplog):
  # On gs:// a copy of the logs is a request per changed file: on the training thread it would stall
  # training after every save, as a synchronous save does.
  model, optimizer = MODELS["dense"]((5,)), OPTIMIZERS["dense"](1e-2)
  optimizer.build(model.trainable_variables)
  copies = []

  def copy_logs():
    copies.append(threading.current_thread().name)
    if len(copies) == 1:
      raise StorageError("gs://bucket/logs: 503 Service Unavailable")

  with caplog.at_level(logging.WARNING, logger="absl"):
    loop.fit(model, optimizer, loop.squared_error, linear_data, tf.distribute.get_strategy(), 32, 2, 2,
             checkpointing=loop.Checkpointing(Checkpoints(str(tmp_path), model, optimizer), after_save=copy_logs))
  assert copies == ["checkpoint saves"] * 2
  assert [r.getMessage() for r in caplog.records] == [
      "TensorBoard logs not copied after checkpoint ckpt-8: gs://bucket/logs: 503 Service Unavailable; "
      "tried again after the next save and at the end"]


def test_finished_iterators_are_destroyed_on_a_thread_of_their_own_each_once_the_next_arrives():
  # Destroying a tf.data iterator waits for its autotuning thread to stop (up to 0.4 s here).
  destroyed, gone = [], threading.Event()

  class Iterator:
    def __init__(self, name):
      self.name = name

    def __del__(self):
      destroyed.append((self.name, threading.current_thread().name))
      gone.set()

  discard = loop.Discard()
  discard(Iterator("first"))
  assert destroyed == []  # held until the next arrives: whoever handed it over may still hold it
  discard(Iterator("second"))
  assert gone.wait(timeout=60)
  assert destroyed == [("first", "finished iterators")]


def test_at_exit_the_last_iterator_is_destroyed_before_the_interpreter_goes():
  # A daemon thread still inside TensorFlow's C++ (destroying an iterator) when the interpreter
  # finalises is killed there: "terminate called ... FATAL: exception not rethrown", an abort a
  # cluster retries. So exit waits for the thread to destroy what it holds, and it then ends.
  script = """if True:
    import threading
    from trainer import loop

    class Iterator:
      def __del__(self):
        print("destroyed on", threading.current_thread().name, flush=True)

    loop.discard(Iterator())
  """
  done = forked.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert (done.returncode, done.stdout) == (0, "destroyed on finished iterators\n"), done.stderr


def test_an_epoch_hands_its_iterators_over_to_be_destroyed(monkeypatch):
  handed = []
  monkeypatch.setattr(loop, "discard", handed.append)
  model, parts_ = parts()
  parts_.train_epoch(TrainState())
  parts_.validate()
  assert [bool(i.get_next_as_optional().has_value()) for i in handed] == [False, False]  # both finished


# The parts of the loop, one by one.

@pytest.mark.parametrize("every, step, kwargs, due", [
    (0, 3, {}, False),  # within an epoch: only every N steps, when asked
    (3, 3, {}, True), (3, 4, {}, False),
    (0, 4, {"stopping": True}, True),  # a signal: at once
    (0, 8, {"epoch_end": True}, True),  # without every N steps: every epoch's end
    (3, 9, {"epoch_end": True}, False),  # with it: not at an epoch's end (step 9 was saved within the epoch)...
    (3, 10, {"epoch_end": True, "done": True}, True),  # ...but at the end of training
    (3, 10, {"epoch_end": True, "stopping": True}, True),
])
def test_the_one_rule_for_when_to_save(every, step, kwargs, due):
  assert loop.Checkpointing(every_steps=every).due(step, **kwargs) is due


def test_each_step_result_is_read_one_step_late():
  # A call's vector: loss sum, example count, stop flag, steps, first non-finite step (trainer.steps).
  late = loop.OneStepLate()
  assert late.swap(tf.constant([2.0, 4.0, 0.0, 1.0, 0.0])) is None
  assert late.swap(tf.constant([3.0, 4.0, 1.0, 1.0, 0.0])) == loop.StepResult(1, 2.0, 4.0, False)
  assert late.drain() == loop.StepResult(2, 3.0, 4.0, True)
  assert late.drain() is None
  # Calls of several steps: the global step advances by each call's count; a NaN names its own step.
  late = loop.OneStepLate(global_step=10)
  late.swap(tf.constant([9.0, 96.0, 0.0, 3.0, 0.0]))
  assert late.swap(tf.constant([np.nan, 40.0, 0.0, 2.0, 1.0])) == loop.StepResult(13, 9.0, 96.0, False, steps=3)
  result = late.drain()
  assert (result.step, result.steps, result.diverged_at, np.isnan(result.loss_sum)) == (15, 2, 14, True)


def parts(checkpointing=None, learning_rate=1e-2, on_step=None):
  model = MODELS["dense"]((5,))
  optimizer = OPTIMIZERS["dense"](learning_rate)
  optimizer.build(model.trainable_variables)
  return model, loop.Loop(model, optimizer, loop.squared_error, linear_data, tf.distribute.get_strategy(), 32,
                          checkpointing=checkpointing, on_step=on_step)


def test_one_epoch_its_validation_and_its_end():
  seen = []
  model, parts_ = parts(on_step=lambda state, result: seen.append(
      (int(parts_.steps.optimizer.iterations), state.global_step, result)))
  state = TrainState()
  loss, stopping = parts_.train_epoch(state)
  # 256 rows in batches of 32; each result reaches the hook once the next step has run (the optimizer's
  # count), the last at the end; the state the hook is given stands at the result's step.
  assert (state.step, state.global_step, stopping) == (8, 8, False)
  assert [(now, result.step, result.count) for now, _, result in seen] == [(n + 1, n, 32) for n in range(1, 8)] + \
      [(8, 8, 32)]
  assert [at for _, at, _ in seen] == list(range(1, 9))
  assert loss == pytest.approx(sum(result.loss_sum for _, _, result in seen) / 256)
  val_loss = parts_.validate()
  assert val_loss == pytest.approx(validation_loss(model), rel=1e-4)
  parts_.end_epoch(state, loss, val_loss, 1.0, epochs=2)
  assert (state.epoch, state.step, state.partial, state.best_epoch, state.val_loss) == (1, 0, [0.0, 0.0], 1, [val_loss])
  best = state.best_weights
  parts_.end_epoch(state, loss, val_loss + 1, 1.0, epochs=2)  # worse: the best weights stay epoch 1's
  assert state.best_epoch == 1 and state.best_weights is best
  with pytest.raises(loop.Diverged, match=r"the loss is nan on validation at step 8 \(epoch 3\)"):
    parts_.end_epoch(state, loss, float("nan"), 1.0, epochs=2)


def test_a_signal_saves_the_next_step_and_stops(tmp_path):
  model, optimizer = MODELS["dense"]((5,)), OPTIMIZERS["dense"](1e-2)
  optimizer.build(model.trainable_variables)
  checkpoints = Checkpoints(str(tmp_path), model, optimizer)
  with StopSignal() as stop:
    os.kill(os.getpid(), signal.SIGTERM)  # before the first step: its flag is read, one step late, at step 2
    with pytest.raises(Preempted) as stopped:
      loop.fit(model, optimizer, loop.squared_error, linear_data, tf.distribute.get_strategy(), 32, 2, 2,
               checkpointing=loop.Checkpointing(checkpoints, stop=stop))
  assert (stopped.value.global_step, stopped.value.checkpoint) == (2, str(tmp_path / "ckpt-2"))
  assert checkpoints.complete() == [2]
  assert checkpoints.restore_latest().state["step"] == 2
