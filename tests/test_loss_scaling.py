"""float16 loss scaling (--mixed_precision on GPUs: a LossScaleOptimizer) under several replicas, forced on
logical CPUs: a step whose scaled gradient overflows on one replica only is skipped on every replica, in
one process (MirroredStrategy) and across workers (MultiWorkerMirroredStrategy); the dynamic scale
survives a checkpoint; a checkpoint of one precision is refused by a job of another."""

import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from processes import run, run_cluster

from trainer import distribution, loop
from trainer.checkpoints import Checkpoints
from trainer.cluster import Cluster
from trainer.config import Config
from trainer.models import MODELS, OPTIMIZERS

ALONE = Cluster(spec={}, task_type="worker", task_index=0, source="none")
# LossScaleOptimizer's initial scale (keras/src/optimizers/loss_scale_optimizer.py): halved by a skipped step.
INITIAL_SCALE = 2.0 ** 15


def overflow_in_second_half(split, batch_size, input_context=None, epoch=0):
  """Two global batches of 64 on 5 features; in the first, the targets of rows 32-63 (replica 1's half under
  two replicas) are 1e4. Their loss is finite in float32, but its gradient times the loss scale (2^15)
  overflows float16's 65504 in the hidden layer's backward pass: that replica's gradient is infinite."""
  del epoch
  rng = np.random.default_rng(0 if split == "train" else 1)
  x = rng.standard_normal((128, 5)).astype(np.float32)
  y = (x @ np.arange(5, dtype=np.float32)) / 5
  if split == "train":
    y[32:64] = 1e4
  dataset = tf.data.Dataset.from_tensor_slices((x, y))
  if input_context is not None:
    dataset = dataset.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
  return dataset.batch(batch_size)


def float16_model_and_optimizer(strategy):
  """As trainer.train builds them under mixed float16 (which it picks on GPUs only)."""
  keras.utils.set_random_seed(5)
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    with strategy.scope():
      model = MODELS["dense"]((5,))
      optimizer = keras.optimizers.LossScaleOptimizer(OPTIMIZERS["dense"](1e-2))
      optimizer.build(model.trainable_variables)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  return model, optimizer


def scale_of(optimizer):
  return float(keras.ops.convert_to_numpy(optimizer.dynamic_scale))


def train_one_epoch(strategy, checkpoint_dir=None, clip_norm=None):
  model, optimizer = float16_model_and_optimizer(strategy)
  initial = model.get_weights()
  checkpoints = Checkpoints(checkpoint_dir, model, optimizer) if checkpoint_dir else None
  loop.fit(model, optimizer, loop.squared_error, overflow_in_second_half, strategy, 64, 1, 1,
           checkpointing=loop.Checkpointing(checkpoints), clip_norm=clip_norm)
  return model, optimizer, initial


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_an_overflow_on_one_replica_skips_the_step_on_every_replica(clip_norm):
  """Keras' LossScaleOptimizer checks each replica's gradient before the all-reduce and follows replica
  0's answer: replica 1's infinite gradient was summed into the weights. Now the step is skipped on both
  replicas, as one replica of 64 skips it, and the second step is taken alike; with clipping too (the
  gradient is summed before it is clipped)."""
  runs = {name: train_one_epoch(distribution.make_strategy(name, ALONE, 2 if name == "mirrored" else 0),
                                clip_norm=clip_norm)
          for name in ("default", "mirrored")}
  for name, (model, optimizer, initial) in runs.items():
    assert all(np.isfinite(w).all() for w in model.get_weights()), name
    assert scale_of(optimizer) == INITIAL_SCALE / 2, name  # one step skipped, the scale halved once
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 1, name  # one step taken
    assert not np.allclose(initial[0], model.get_weights()[0]), name
  for a, b in zip(runs["default"][0].get_weights(), runs["mirrored"][0].get_weights()):
    np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-4)  # float16 gradients, summed in another order



@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_a_checkpoint_keeps_the_dynamic_scale(tmp_path):
  """A resumed float16 job goes on with the scale it had reached (halved here), not the initial one, and
  with the count of good steps towards its next doubling."""
  strategy = distribution.make_strategy("mirrored", ALONE, 2)
  model, optimizer, _ = train_one_epoch(strategy, str(tmp_path))
  resumed_model, resumed = float16_model_and_optimizer(strategy)
  assert scale_of(resumed) == INITIAL_SCALE
  assert Checkpoints(str(tmp_path), resumed_model, resumed).restore_latest().step == 2
  assert scale_of(resumed) == scale_of(optimizer) == INITIAL_SCALE / 2
  assert [int(keras.ops.convert_to_numpy(o.step_counter)) for o in (resumed, optimizer)] == [1, 1]
  assert int(keras.ops.convert_to_numpy(resumed.iterations)) == 1
  for a, b in zip(resumed_model.get_weights(), model.get_weights()):
    np.testing.assert_array_equal(a, b)


# Run as each worker of a cluster: one epoch of the overflow above, worker 1's batch overflowing (rows 32-63 of
# the global batch are its shard's first 32 rows when each worker takes a contiguous half). Prints its scale,
# optimizer steps and weights checksum.
CLUSTER_TASK = '''
import os, sys
import numpy as np
sys.path.insert(0, TESTS)
import test_loss_scaling as t
from trainer import cluster as cluster_lib, distribution, loop
cluster = cluster_lib.resolve(os.environ, None, None)
strategy = distribution.make_strategy("auto", cluster, 0)

def contiguous_halves(split, batch_size, input_context=None, epoch=0):
  rows = t.overflow_in_second_half(split, 128).unbatch()
  first = input_context.input_pipeline_id * 32  # worker 0: rows 0-31 and 64-95; worker 1: 32-63 and 96-127
  return rows.skip(first).take(32).concatenate(rows.skip(64 + first).take(32)).batch(batch_size)

model, optimizer = t.float16_model_and_optimizer(strategy)
loop.fit(model, optimizer, loop.squared_error, contiguous_halves, strategy, 64, 1, 1)
checksum = sum(float(np.abs(w).astype(np.float64).sum()) for w in model.get_weights())
print(t.scale_of(optimizer), int(optimizer.iterations.numpy()), repr(checksum))
'''


@pytest.mark.slow
def test_an_overflow_on_one_worker_skips_the_step_on_every_worker(tmp_path):
  """Under MultiWorkerMirroredStrategy each worker followed its own replica: worker 1 skipped the step,
  worker 0 entered the gradients' all-reduce alone. Now both skip it, and end with the same weights."""
  # This folder by name: a forked child's sys.path holds the server's, from which PYTHONPATH adds nothing.
  (tmp_path / "loss_scaling_task.py").write_text(f"TESTS = {os.path.dirname(os.path.abspath(__file__))!r}\n"
                                                 + CLUSTER_TASK)
  path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
  workers = run_cluster([sys.executable, "-m", "loss_scaling_task"], 2, env=dict(os.environ, PYTHONPATH=path),
                        timeout=180)
  assert [w.returncode for w in workers] == [0, 0], "\n".join(w.stderr[-2000:] for w in workers)
  answers = [w.stdout.split() for w in workers]
  assert answers[0] == answers[1]
  assert (float(answers[0][0]), int(answers[0][1])) == (INITIAL_SCALE / 2, 1)


def test_the_precision_is_compared_where_the_checkpoint_records_it():
  config = Config(mixed_precision=True)
  now = config.resume_identity("mixed_float16")
  assert config.resume_mismatch(config.resume_identity("mixed_float16"), now) is None
  assert config.resume_mismatch(config.resume_identity(), now) is None  # written before it was recorded
  assert config.resume_mismatch(config.resume_identity("mixed_bfloat16"), now) == \
      ("mixed_precision", "mixed_bfloat16", "mixed_float16")
  assert Config().resume_mismatch(config.resume_identity("mixed_float16"), Config().resume_identity("float32")) == \
      ("mixed_precision", True, False)  # the flag first, as before


# `python -m trainer.task` with --mixed_precision computing in float16 as on a GPU host (with a
# LossScaleOptimizer), whatever the devices.
FLOAT16_TASK = """
import sys
from trainer import distribution, task
distribution.precision_policy = lambda mixed_precision: "mixed_float16" if mixed_precision else "float32"
sys.argv[0] = "trainer"
task.run()
"""


@pytest.mark.slow
def test_a_checkpoint_of_another_precision_is_refused_in_one_line(tmp_path):
  """--mixed_precision is bfloat16 on a host without a GPU and float16 (loss-scaled: the optimizer holds
  other variables) on one with: a job that moves between them must not resume from the other's
  checkpoints. Trained in float16 on two replicas, resumed on a CPU host."""
  flags = ["--model=dense", "--epochs=1", "--mixed_precision", f"--job_dir={tmp_path}"]
  code, job = run([*flags, "--strategy=mirrored", "--cpu_devices=2"], command=(sys.executable, "-c", FLOAT16_TASK))
  assert code == 0, job.stderr[-3000:]
  code, resumed = run([*flags, "--epochs=2"])
  assert code == 2, resumed.stderr[-3000:]
  assert resumed.last_line() == (f"trainer: error: {tmp_path}/checkpoints holds checkpoints of another job: "
                                 "--mixed_precision was 'mixed_float16', now 'mixed_bfloat16'; use another "
                                 "--job_dir, or --restart to discard them")
