"""Versioned exports: `<export_dir>/<version>/` holds a SavedModel for TF Serving and, beside it,
trainer_export.json, everything else inference needs (normalisation, window, columns, classes),
model.keras, the same model for Keras (to fine-tune or warm-start from it), and
assets.extra/tf_serving_warmup_requests, the requests TF Serving warms the version up with
(trainer.warmup).

A version is complete once its trainer_export.json exists: it is published last, so a reader
that finds it finds the whole SavedModel. Version folders without it are leftovers of a killed
upload and are removed before the next export, since TF Serving would try to serve them.

TensorFlow is imported only where a model is written or loaded: `python -m trainer.predict`
finds the version and reads its metadata first, so a wrong folder fails in a second.
"""

import datetime
import json
import os
import tempfile

from absl import logging

from trainer import numbered, storage, transfer, warmup
from trainer.errors import UserError

METADATA = "trainer_export.json"
KERAS_MODEL = "model.keras"
SIGNATURE = "serving_default"
# Bumped when the metadata changes in a way older readers would misread.
FORMAT = 1
# `<n>/`, complete once its metadata is there (published last).
VERSIONS = numbered.Folders(METADATA)


def write_export(model, prepared, result, export_dir):
  """Exports model as the next version under export_dir; returns that version's folder.

  result is the job's report (its config, test and baseline metrics and data summary go into
  the metadata, so an export says how it was made and how good it was).
  """
  with tempfile.TemporaryDirectory() as scratch:
    local = os.path.join(scratch, "export")
    model.export(local, verbose=False)
    model.save(os.path.join(local, KERAS_MODEL))
    input_name, output_key = _signature_keys(local)
    warmup.write(local, SIGNATURE, input_name, warmup.test_inputs(prepared))
    version = next_version(export_dir)
    metadata = {
        "format": FORMAT, "model": result["model"], "kind": prepared.kind, "signature": SIGNATURE,
        "input": input_name, "output": output_key, "preprocessing": prepared.preprocessing,
        "flags": result["config"], "test": result["test"], "baseline": result["baseline"], "data": result["data"],
        "trained_on": result["trained_on"],
        "version": version, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(local, METADATA), "w") as f:
      json.dump(metadata, f, indent=2)
    folder = storage.join(export_dir, str(version))
    # TF Serving loads a version once saved_model.pb is there, our readers once the metadata is.
    transfer.publish_dir(local, folder, last=("saved_model.pb", METADATA))
  logging.info("exported version %d of the %s model to %s", version, result["model"], folder)
  return folder


def _signature_keys(saved_model_dir):
  """(input name, output key) of the serving signature, read back from what was written."""
  import tensorflow as tf

  signature = tf.saved_model.load(saved_model_dir).signatures[SIGNATURE]
  (input_name,) = signature.structured_input_signature[1]
  (output_key,) = signature.structured_outputs
  return input_name, output_key


def next_version(export_dir):
  """1 + the highest complete version; first removes incomplete version folders. Two listings
  however many versions there are."""
  complete = VERSIONS.complete(export_dir)
  for version in VERSIONS.numbers(storage.list_dir(export_dir)):
    if version not in complete:
      folder = storage.join(export_dir, str(version))
      logging.warning("removing %s: an incomplete export (no %s), left by an interrupted one", folder, METADATA)
      storage.remove(folder)
  return max(complete, default=0) + 1


def latest_version(export_dir):
  """The folder of the highest complete version under export_dir, or None; one listing."""
  complete = VERSIONS.complete(export_dir)
  return storage.join(export_dir, complete[max(complete)][-1]) if complete else None


def read_metadata(version_dir):
  """The version's trainer_export.json as a dict; UserError if it is missing or malformed.

  A storage.StorageError (the bucket unreachable, no permission) passes: it exits 170, which a
  cluster retries, where a UserError's 2 would fail the job for good over an outage."""
  path = storage.join(version_dir, METADATA)
  try:
    metadata = json.loads(storage.read_text(path))
  except OSError as e:  # missing, or a folder: storage says anything else as StorageError
    raise UserError(f"{path}: cannot read the export's metadata ({e.strerror or e})") from None
  except ValueError as e:  # JSON, or UTF-8, that is not
    raise UserError(f"{path}: the export's metadata is not valid JSON ({e}); re-export the model") from None
  if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
    found = metadata.get("format") if isinstance(metadata, dict) else None
    raise UserError(f"{path}: export metadata format {found!r}, this trainer reads format {FORMAT}; "
                    "use the trainer version that wrote it")
  return metadata


def find_version(model_dir):
  """model_dir itself if it is a complete version, else its highest complete version."""
  if storage.exists(storage.join(model_dir, METADATA)):
    return model_dir
  folder = latest_version(model_dir)
  if folder is None and storage.exists(storage.join(model_dir, "saved_model.pb")):
    raise UserError(f"{model_dir}: a SavedModel without {METADATA}: an export that did not finish (or not "
                    "one of this trainer's); export again")
  if folder is None:
    raise UserError(f"{model_dir}: no export found: looked for {storage.join(model_dir, METADATA)} and for "
                    f"version folders {storage.join(model_dir, '<N>', METADATA)}; give an export folder "
                    "(<job_dir>/export) or one of its version folders")
  return folder


def warm_start(model, version_dir, model_name):
  """Copies the weights of the export at version_dir into model when it is the same network (the
  same --model and weight shapes); returns what the report and the retraining history say:
  {"used", "from", "version"} and, when not used, the "reason"."""
  import keras

  metadata = read_metadata(version_dir)
  said = {"used": False, "from": version_dir, "version": metadata.get("version")}
  if metadata["model"] != model_name:
    return {**said, "reason": f"it is a {metadata['model']} model, this job trains {model_name}"}
  source = keras.models.load_model(transfer.local_path(storage.join(version_dir, KERAS_MODEL)), compile=False)
  theirs, ours = [w.shape for w in source.get_weights()], [w.shape for w in model.get_weights()]
  if theirs != ours:
    return {**said, "reason": "its weights have other shapes (other columns, classes, image size or layers)"}
  model.set_weights(source.get_weights())
  return {**said, "used": True}


def load(version_dir, metadata):
  """The version's serving signature, called as a Keras model is, `model(x, training=False)`, so
  the functions that feed a trained model (timeseries.forecast, tabular.predict_table) feed it."""
  import tensorflow as tf

  loaded = tf.saved_model.load(transfer.local_path(version_dir))
  signature = loaded.signatures[metadata["signature"]]

  def model(x, training=False):
    del training  # a SavedModel signature always infers
    outputs = signature(**{metadata["input"]: tf.convert_to_tensor(x, tf.float32)})
    # Mixed-precision models answer in (b)float16; the data's functions compute in float32 or more.
    return tf.cast(outputs[metadata["output"]], tf.float32)

  # A signature holds only weak references to the loaded object's variables: once that is garbage
  # collected, calling it fails ("Error while reading resource variable", tensorflow/tensorflow#46708).
  model.saved_model = loaded
  return model

