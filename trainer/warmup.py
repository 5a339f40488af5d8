"""TF Serving's warm-up requests: `<version>/assets.extra/tf_serving_warmup_requests`, a TFRecord
file of PredictionLogs that TF Serving replays against a version it loads before that version
takes traffic, so the first real requests do not pay for its lazy initialisation
(https://www.tensorflow.org/tfx/serving/saved_model_warmup).

Every export writes one (write, from a few of the job's test inputs); trainer.retraining replays
it against a candidate before promoting it (failure), since TF Serving fails to load a version
whose warm-up requests fail, and production would then be a version that never serves.
"""

import os

import numpy as np
from absl import logging

from trainer import storage, transfer

FOLDER, FILE = "assets.extra", "tf_serving_warmup_requests"
# Test inputs written, one single-example request each: an online server's usual request.
REQUESTS = 5
# TF Serving refuses a file of more records (WarmupConsts::kMaxNumRecords in
# tensorflow_serving/servables/tensorflow/saved_model_warmup_util.h).
MAX_RECORDS = 1000
# What TF Serving's Predict uses when a request names no signature.
DEFAULT_SIGNATURE = "serving_default"


class WarmupFailed(Exception):
  """A warm-up file that TF Serving would fail on: missing, unparsable, or a request that does not run.
  Said as "<file>: <problem>"; the problem alone is the retraining history's reason."""

  def __init__(self, file, problem):
    super().__init__(f"{file}: {problem}")
    self.problem = problem


def write(saved_model_dir, signature_name, input_name, inputs):
  """Writes one PredictRequest per row of inputs (a batch as the signature takes it) into the
  local SavedModel folder being exported, under the signature's input name."""
  import tensorflow as tf
  from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

  os.makedirs(os.path.join(saved_model_dir, FOLDER), exist_ok=True)
  with tf.io.TFRecordWriter(os.path.join(saved_model_dir, FOLDER, FILE)) as writer:
    for row in np.asarray(inputs):
      # No model name: TF Serving names the model in its own config, and warm-up ignores it.
      request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(signature_name=signature_name))
      request.inputs[input_name].CopyFrom(tf.make_tensor_proto(row[np.newaxis]))
      writer.write(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
                   .SerializeToString())


class _Fed(Exception):
  """Stops prepared.predict at its first batch, carrying that batch out (test_inputs)."""

  def __init__(self, x):
    super().__init__()
    self.x = x


def test_inputs(prepared, count=REQUESTS):
  """The first count test inputs as prepared.predict feeds them to a model: normalised, windowed
  or decoded and resized as the serving signature takes them, whatever the kind of data. Its first
  call of the model stops it, so no more of the test split is read than one batch."""
  def model(x, training=False):
    del training
    raise _Fed(np.asarray(x)[:count])

  try:
    prepared.predict(model)
  except _Fed as fed:
    return fed.x
  raise ValueError("prepared.predict never called the model: no test inputs to warm up with")


def failure(version_dir):
  """None when the version's warm-up requests replay, else why not: the reason to reject it."""
  try:
    replay(version_dir)
  except WarmupFailed as e:
    return f"its warm-up requests fail, and TF Serving loads no version whose warm-up fails: {e.problem}"
  return None


def replay(version_dir):
  """Replays every warm-up request of the version (local or gs://) as TF Serving does: each record
  parsed as a PredictionLog and its PredictRequest's inputs fed to the signature it names; each
  output must have a row per example, all finite. Returns the number of requests; raises
  WarmupFailed naming the file, the record and what is wrong."""
  import tensorflow as tf

  where = storage.join(version_dir, FOLDER, FILE)
  local = transfer.local_path(version_dir)
  path = os.path.join(local, FOLDER, FILE)
  if not os.path.isfile(path):
    raise WarmupFailed(where, "missing; every export writes one")
  try:
    records = [record.numpy() for record in tf.data.TFRecordDataset(path)]
  except tf.errors.OpError as e:
    said = e.message.split("}}")[-1].split(" [Op:")[0].strip()  # without "{{function_node ...}}", "[Op:...]"
    raise WarmupFailed(where, f"not a TFRecord file ({said})") from None
  if not records:
    raise WarmupFailed(where, "no requests to warm the version up with; every export writes some")
  if len(records) > MAX_RECORDS:
    raise WarmupFailed(where, f"{len(records)} records; TF Serving refuses more than {MAX_RECORDS}")
  signatures = tf.saved_model.load(local).signatures
  for number, record in enumerate(records, 1):
    problem = _problem(record, signatures)
    if problem:
      raise WarmupFailed(where, f"record {number} of {len(records)} {problem}")
  logging.info("%s: %d warm-up requests replayed", where, len(records))
  return len(records)


def _problem(record, signatures):
  """What TF Serving would fail on in one record, said to follow "record N", or None when it is sound."""
  import tensorflow as tf
  from google.protobuf.message import DecodeError
  from tensorflow_serving.apis import prediction_log_pb2

  log = prediction_log_pb2.PredictionLog()
  try:
    log.ParseFromString(record)
  except DecodeError:
    return "is not a PredictionLog"
  if log.WhichOneof("log_type") != "predict_log":
    return f"is a {log.WhichOneof('log_type')}, not the predict_log this export answers"
  request = log.predict_log.request
  name = request.model_spec.signature_name or DEFAULT_SIGNATURE
  if name not in signatures:
    return f"asks for signature {name!r}; the SavedModel has {', '.join(signatures)}"
  signature = signatures[name]
  specs = signature.structured_input_signature[1]
  if set(request.inputs) != set(specs):
    return f"names its inputs {', '.join(sorted(request.inputs)) or '(none)'}; the signature takes " \
        f"{', '.join(sorted(specs))}"
  inputs = {}
  for key, proto in request.inputs.items():
    try:
      value = tf.make_ndarray(proto)
    except (ValueError, TypeError) as e:
      return f"gives input {key!r} as no readable tensor ({e})"
    spec, dtype = specs[key], tf.as_dtype(proto.dtype)
    if dtype != spec.dtype or not spec.shape.is_compatible_with(value.shape):
      return f"gives input {key!r} as {dtype.name} of shape {list(value.shape)}; the signature takes " \
          f"{spec.dtype.name} of shape {spec.shape.as_list()}"
    inputs[key] = tf.constant(value)
  try:
    outputs = signature(**inputs)
  except (tf.errors.OpError, ValueError, TypeError) as e:
    return f"makes the signature fail ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
  rows = next(iter(inputs.values())).shape[0]  # the signature's inputs all have the batch first
  for key, output in outputs.items():
    answer = output.numpy()
    if answer.shape[:1] != (rows,):
      return f"gets output {key!r} of shape {list(answer.shape)}, not a row per example"
    if not np.isfinite(answer).all():
      return f"gets a non-finite output {key!r} ({answer.ravel()[:4].tolist()})"
  return None
