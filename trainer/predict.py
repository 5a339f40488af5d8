"""Entry point: `python -m trainer.predict --model_dir=EXPORT --data=...` predicts from an export.

It loads only the export (the SavedModel and its trainer_export.json), never the Keras model,
the job folder or the training data, so what it prints is what a server given the same folder
would answer: a check of an export before serving it. The export and the data are checked
before TensorFlow is imported, so a wrong path fails in a second, not in five.
"""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, CPU instruction notes) hides the predictions.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from trainer import errors, export, families, inference, storage  # noqa: E402
from trainer.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
PREFIX = "predict: error: "
flags.DEFINE_string("model_dir", None, "An export folder (its highest complete version is used) or one version "
                    "folder of it; local or gs://.")
flags.DEFINE_string("data", None, "Forecasts: a CSV with the columns the model was trained on; tables: a CSV "
                    "with its feature columns; images: one image, or a folder of images (flat, or in class "
                    "subfolders to measure accuracy against the folder names). Local or gs://.")
flags.DEFINE_string("output", None, "CSV file (local or gs://) for every prediction; for forecasts one per "
                    "window of --data: each row's value and the forecast of the next one.")
flags.mark_flags_as_required(["model_dir", "data"])


def main(argv):
  if len(argv) > 1:
    errors.fail(f"unexpected arguments {' '.join(argv[1:])}; flags are written --name=value", prefix=PREFIX)
  with errors.exiting("predict"):  # a mistake exits 2; storage unreachable 170, which is retried
    version_dir = export.find_version(FLAGS.model_dir)
    metadata = export.read_metadata(version_dir)
    kind = families.kind(metadata["preprocessing"]["kind"])
    if kind not in inference.KINDS:
      raise UserError(f"{version_dir}: an export of kind {kind!r}, which this trainer cannot predict with")
    read, predict = inference.KINDS[kind]
    inputs = read(FLAGS.data, metadata)
    predictions, text = predict(export.load(version_dir, metadata), metadata, inputs)
  print(f"export: {version_dir} (model {metadata['model']}, version {metadata['version']}, "
        f"made {metadata['created']})")
  print(text)
  if FLAGS.output:
    storage.write_text(FLAGS.output, predictions.to_csv(index=False))
    print(f"{len(predictions)} predictions written to {FLAGS.output}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
