"""Distribution: which tf.distribute strategy runs the job, how the global batch splits across
replicas, and where each process writes.

The strategy if-chain follows TF Model Garden's `distribute_utils` in spirit. Only the chief
writes the real job folder; every other worker writes what it must to a temporary folder of
its own that is removed at the end (Keras 3 callbacks have no chief logic, so the trainer has
to have it).
"""

import json
import os
import shutil
import tempfile

import tensorflow as tf
from absl import logging

from trainer import storage
from trainer.errors import UserError

# One strategy of each kind per process: a second MirroredStrategy over the same devices reuses
# the first one's collective instance keys, and its all-reduces then meet the first one's
# ("Shape mismatch in the collective instance"); a MultiWorkerMirroredStrategy can only be made
# once. A job is one process, but tests and notebooks run several jobs in one.
_made = {}


def split_cpu(devices):
  """Splits the CPU into `devices` logical devices, so MirroredStrategy runs (and is tested)
  without GPUs. Must run before TensorFlow initialises its devices."""
  cpu = tf.config.list_physical_devices("CPU")[0]
  try:
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * devices)
  except RuntimeError:
    # Already initialised (a second job in one process, as in tests): fine if it matches.
    if len(tf.config.list_logical_devices("CPU")) != devices:
      raise UserError(f"--cpu_devices={devices}: TensorFlow's devices were already set up in this process "
                      f"with {len(tf.config.list_logical_devices('CPU'))} CPUs; start a new process") from None


def auto_strategy(num_workers, gpus, cpu_devices):
  """What --strategy=auto picks: several workers -> multi_worker_mirrored; several GPUs (or
  --cpu_devices) -> mirrored; one GPU -> one_device, whose distributed datasets prefetch each
  batch to the GPU while the step before it runs (the default strategy's do not); else default."""
  if num_workers > 1:
    return "multi_worker_mirrored"
  if gpus > 1 or cpu_devices > 1:
    return "mirrored"
  return "one_device" if gpus == 1 else "default"


def make_strategy(name, cluster, cpu_devices=0, communication="auto"):
  """The tf.distribute strategy for --strategy=name in this cluster (trainer.cluster.Cluster), its
  replicas exchanging gradients by --communication."""
  if cpu_devices > 1:
    split_cpu(cpu_devices)
  # Physical, not logical, devices: listing logical ones starts TensorFlow's runtime, after
  # which MultiWorkerMirroredStrategy fails ("Collective ops must be configured at program startup").
  gpus = tf.config.list_physical_devices("GPU")
  if name == "auto":
    name = auto_strategy(cluster.num_workers, len(gpus), cpu_devices)
  if cluster.num_workers > 1 and name != "multi_worker_mirrored":
    raise UserError(f"the cluster environment ({cluster.source}) names {cluster.num_workers} tasks, but "
                    f"--strategy={name} runs on one host; use --strategy=multi_worker_mirrored or auto")
  if name == "mirrored" and not gpus and cpu_devices < 1:
    # The GPU image sometimes registers no GPU (tensorflow/tensorflow#62412): a job that asked for
    # GPUs would train on the CPU for hours, unnoticed.
    raise UserError("--strategy=mirrored found no GPU; check the GPU driver and image (nvidia-smi), or give "
                    "--cpu_devices=N to mirror over N CPU devices on purpose")
  if communication == "nccl" and not gpus:
    raise UserError("--communication=nccl needs a GPU on every worker and this one has none; use "
                    "--communication=auto or ring")
  if communication == "ring" and name == "mirrored":
    raise UserError("--communication=ring is multi_worker_mirrored's; mirrored on one host uses NCCL between "
                    "GPUs by itself: use --communication=auto or nccl")
  if name == "default":
    return tf.distribute.get_strategy()
  if name not in _made:
    _made[name] = _new_strategy(name, cluster, gpus, communication)
  return _made[name]


def _new_strategy(name, cluster, gpus, communication):
  if name == "multi_worker_mirrored":
    if cluster.tf_config is not None:
      # TensorFlow reads the cluster from TF_CONFIG only; an Indexed Job's is built by trainer.cluster.
      os.environ["TF_CONFIG"] = json.dumps(cluster.tf_config)
    options = communication_options(communication)
    logging.info("all-reduce between workers: %s (--communication=%s)", options.implementation.name, communication)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
  if name == "mirrored":
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    # auto: TensorFlow's own choice, NcclAllReduce when every device is a GPU and NCCL is built in,
    # else through the host (cross_device_ops.select_cross_device_ops in tensorflow/python/distribute);
    # nccl: NCCL or an error, never the silent fallback.
    cross_device_ops = tf.distribute.NcclAllReduce() if communication == "nccl" else None
    return tf.distribute.MirroredStrategy([d.name for d in devices], cross_device_ops=cross_device_ops)
  return tf.distribute.OneDeviceStrategy("/gpu:0" if gpus else "/cpu:0")


def communication_options(communication):
  """--communication for MultiWorkerMirroredStrategy's all-reduces. AUTO is RING in practice: the
  runtime picks NCCL only when the hint or the session config asks for it (tensorflow/core/common_runtime/
  collective_param_resolver_local.cc, AssignCollectiveType), so GPU clusters ask for nccl."""
  implementation = tf.distribute.experimental.CommunicationImplementation[communication.upper()]
  return tf.distribute.experimental.CommunicationOptions(implementation=implementation)


def precision_policy(mixed_precision):
  """The Keras dtype policy: float16 compute on GPUs (with loss scaling in the optimizer),
  bfloat16 on CPUs, which have no fast float16 but do bfloat16 on recent cores."""
  if not mixed_precision:
    return "float32"
  return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"


def strategy_name(strategy):
  return {"MultiWorkerMirroredStrategy": "multi_worker_mirrored",
          "CollectiveAllReduceStrategy": "multi_worker_mirrored", "MirroredStrategy": "mirrored",
          "OneDeviceStrategy": "one_device"}.get(type(strategy).__name__, "default")


def per_replica_batch_size(global_batch_size, replicas):
  if global_batch_size % replicas:
    raise UserError(f"--batch_size={global_batch_size} is the global batch and does not split evenly across "
                    f"{replicas} replicas; use a multiple of {replicas}")
  return global_batch_size // replicas


def writable_job_dir(job_dir, cluster):
  """The local folder this process writes: a local job folder itself for the chief; otherwise a
  temporary one (remove it with `cleanup` at the end), which the chief of a gs:// job uploads."""
  if cluster.is_chief and not storage.is_remote(job_dir):
    return job_dir
  folder = tempfile.mkdtemp(prefix=f"trainer-{cluster.task_type}{cluster.task_index}-")
  if not cluster.is_chief:
    logging.info("%s %d is not the chief: writing to %s, removed at the end", cluster.task_type,
                 cluster.task_index, folder)
  return folder


def cleanup(folder, job_dir):
  if folder != job_dir:
    shutil.rmtree(folder, ignore_errors=True)
