"""What the job runs on, said at start (describe), and the device-dependent choices made from the
flags: op determinism (make_deterministic) and whether a model's step may be XLA-compiled
(jit_compile)."""

import keras
import tensorflow as tf
from absl import logging
# No public API says whether determinism is on; Keras' model_supports_jit imports the same.
from tensorflow.python.framework.config import is_op_determinism_enabled

# cuDNN's recurrent kernels (CudnnRNNV3) have no XLA implementation: Keras marks such a layer
# `supports_jit = False` on a GPU (keras/src/layers/rnn/lstm.py and gru.py: "cuDNN ops aren't XLA
# compatible") and only Model.fit honours it (Trainer.jit_compile's setter). On a CPU the same
# layers report True, so the type decides, and one command behaves alike on both.
_CUDNN_RECURRENT = (keras.layers.LSTM, keras.layers.GRU)


def describe():
  """Logs TensorFlow's build (its CUDA and cuDNN) and the GPUs it sees; returns their names.
  A CUDA build on a host without a GPU prints "Could not find cuda drivers" and "failed call to
  cuInit" first: abseil writes every message logged before it is initialised, so no
  TF_CPP_MIN_LOG_LEVEL below 3 removes them, and 3 would hide real errors too. One line says
  what they mean instead."""
  gpus, build = summary()
  if gpus:
    logging.info("%s: %d GPU(s): %s", build, len(gpus), ", ".join(gpus))
  else:
    logging.info("%s: no GPU found, training on the CPU%s", build,
                 " (TensorFlow's CUDA lines above say only that)" if "CUDA" in build else "")
  return gpus


def summary():
  """(the GPUs' names, "TensorFlow <version> (CUDA <version>, cuDNN <version>)"). Physical devices
  only: no GPU memory is taken, and a multi-worker strategy can still be made."""
  build = tf.sysconfig.get_build_info()
  cuda = (f"CUDA {build.get('cuda_version')}, cuDNN {build.get('cudnn_version')}" if build.get("is_cuda_build")
          else "no CUDA")
  gpus = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
          for gpu in tf.config.list_physical_devices("GPU")]
  return gpus, f"TensorFlow {tf.__version__} ({cuda})"


def make_deterministic(enabled):
  """--deterministic: the same results from the same inputs on a GPU too (its reductions otherwise
  add in any order), at a cost in speed. Call it before any op runs, as enable_op_determinism's
  documentation asks; it only sets a flag, so a multi-worker strategy can still be made after it."""
  if enabled:
    tf.config.experimental.enable_op_determinism()
    logging.info("--deterministic: TensorFlow ops run deterministically (slower on GPUs)")


def jit_compile(model, requested):
  """Whether to XLA-compile the model's step: --jit_compile, unless the model cannot be. Says why not."""
  if not requested:
    return False
  cudnn = sorted({type(layer).__name__ for layer in model._flatten_layers()  # what Keras' model_supports_jit walks
                  if isinstance(layer, _CUDNN_RECURRENT) and layer.use_cudnn in ("auto", True)})
  if cudnn:
    logging.warning("--jit_compile: not for this model: its %s layers run cuDNN kernels on a GPU, which XLA cannot "
                    "compile; training without XLA", " and ".join(cudnn))
    return False
  if is_op_determinism_enabled():
    # As Keras' model_supports_jit (keras/src/trainers/trainer.py): XLA has ops with no deterministic kernel.
    logging.warning("--jit_compile: not with --deterministic (XLA's kernels are not all deterministic); training "
                    "without XLA")
    return False
  if any(not layer.supports_jit for layer in model._flatten_layers()):
    logging.warning("--jit_compile: not for this model: a layer of it has no XLA kernel; training without XLA")
    return False
  return True
