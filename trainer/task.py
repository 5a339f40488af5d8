"""Entry point: `python -m trainer.task --model=lstm` (or the `trainer` command).

Defines the flags, builds a Config and calls train.train_and_evaluate; nothing else.
"""

import contextlib
import os
import sys

# TensorFlow's C++ start-up chatter (CUDA probing, CPU instruction notes) hides the job's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from trainer import cluster as cluster_lib  # noqa: E402
from trainer import config as config_lib  # noqa: E402
from trainer import preemption, storage  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "lstm", config_lib.MODEL_NAMES,
                  "Network to train: dense (tables), gru or lstm (forecasts), cnn (images).")
flags.DEFINE_string("data", None, "CSV file; for cnn a folder of class subfolders, TFRecord shards or tfds:NAME; "
                    "empty: built-in generated data.")
flags.DEFINE_string("test_data", None, "cnn and dense: a separate test set of the same kind as --data.")
flags.DEFINE_string("target_column", None, "Column to predict (required with --data).")
flags.DEFINE_string("date_column", None, "Column of dates: rows are sorted by it, --test_start refers to it.")
flags.DEFINE_list("feature_columns", [], "Input columns besides the target; tables default to every numeric column.")
flags.DEFINE_string("test_start", None, "First date of the test period (YYYY-MM-DD); default (or empty): the last "
                    "20% of rows.")
flags.DEFINE_integer("window", 60, "Time steps in each forecast window.")
flags.DEFINE_integer("epochs", 60, "Maximum training epochs.")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Optimizer learning rate.")
flags.DEFINE_integer("patience", 10, "Epochs without a better validation loss before stopping.")
flags.DEFINE_integer("seed", 42, "Seed for the split, shuffling and initial weights.")
flags.DEFINE_bool("bidirectional", False, "Wrap each recurrent layer in Bidirectional.")
flags.DEFINE_float("validation_split", 0.2, "Fraction of the training rows held out for early stopping.")
flags.DEFINE_float("test_split", 0.2, "Fraction of rows held out for testing.")
flags.DEFINE_integer("image_size", 150, "cnn: images are resized to this square size.")
flags.DEFINE_bool("augment", True, "cnn: random rotation, shear, zoom and flips of training images.")
flags.DEFINE_string("tfds_data_dir", None, "cnn with tfds:NAME: the TFDS data folder.")
flags.DEFINE_bool("tfds_download", False, "cnn with tfds:NAME: allow downloading the dataset.")
flags.DEFINE_enum("strategy", "auto", config_lib.STRATEGIES,
                  "tf.distribute strategy; auto: multi_worker_mirrored when the cluster environment names several "
                  "tasks, mirrored with several GPUs (or --cpu_devices), else default.")
flags.DEFINE_integer("cpu_devices", 0, "Split the CPU into this many logical devices (mirrored without GPUs).")
flags.DEFINE_bool("mixed_precision", False, "Mixed precision: float16 with loss scaling on GPUs, bfloat16 on CPUs.")
flags.DEFINE_bool("jit_compile", False, "XLA-compile each replica's training step.")
flags.DEFINE_string("indexed_job_hosts", None, "Kubernetes Indexed Job without TF_CONFIG: host:port of every "
                    "worker with {index}, e.g. train-{index}.train-workers:2222 (env TRAINER_INDEXED_JOB_HOSTS).")
flags.DEFINE_integer("num_workers", None, "Kubernetes Indexed Job: number of workers (env TRAINER_NUM_WORKERS).")
flags.DEFINE_string("job_dir", None, "Folder (local or gs://) for checkpoints, logs, exports, the report and plots; "
                    "default: the folder above AIP_MODEL_DIR on Vertex AI, else a new folder under ./runs/.")
flags.DEFINE_string("checkpoint_dir", None, "Checkpoints; default: AIP_CHECKPOINT_DIR, else <job_dir>/checkpoints.")
flags.DEFINE_string("tensorboard_dir", None, "TensorBoard logs; default: AIP_TENSORBOARD_LOG_DIR, else <job_dir>/logs.")
flags.DEFINE_string("export_dir", None, "Versioned SavedModels (<export_dir>/<version>/); default: AIP_MODEL_DIR, "
                    "else <job_dir>/export.")
flags.DEFINE_integer("checkpoint_every_steps", 0, "Checkpoint every N training steps (and at the end) instead of at "
                     "the end of every epoch (0).")
flags.DEFINE_integer("keep_checkpoints", 3, "Newest checkpoints to keep.")
flags.DEFINE_bool("restart", False, "Delete this job's checkpoints and train from scratch instead of resuming.")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {' '.join(argv[1:])}; flags are written --name=value")
  with exit_codes():
    job_dir, config = config_from_flags()
    from trainer import train  # imports TensorFlow: only once the flags are known to be sound
    with saying_how_to_resume(job_dir):
      result = train.train_and_evaluate(config, job_dir)
  from trainer import report
  print(report.summary_table(result))
  if config.cluster.is_chief:
    print(f"report: {storage.join(job_dir, 'report.json')}")


def config_from_flags(**overrides):
  """(job folder, Config) from the flags above, with overrides of Config fields (trainer.retrain
  sets the test period from its own flags); a mistake raises config.UserError."""
  cluster = cluster_lib.resolve(os.environ, FLAGS.indexed_job_hosts, FLAGS.num_workers)
  job_dir, folders = config_lib.output_folders(os.environ, FLAGS.job_dir, FLAGS.model, export_dir=FLAGS.export_dir,
                                               checkpoint_dir=FLAGS.checkpoint_dir,
                                               tensorboard_dir=FLAGS.tensorboard_dir)
  fields = dict(
      model=FLAGS.model, data=FLAGS.data, target_column=FLAGS.target_column, date_column=FLAGS.date_column,
      feature_columns=tuple(FLAGS.feature_columns), test_start=FLAGS.test_start or None, window=FLAGS.window,
      epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, learning_rate=FLAGS.learning_rate,
      patience=FLAGS.patience, seed=FLAGS.seed, bidirectional=FLAGS.bidirectional,
      validation_split=FLAGS.validation_split, test_split=FLAGS.test_split, test_data=FLAGS.test_data,
      image_size=FLAGS.image_size, augment=FLAGS.augment, tfds_data_dir=FLAGS.tfds_data_dir,
      tfds_download=FLAGS.tfds_download, strategy=FLAGS.strategy, cpu_devices=FLAGS.cpu_devices,
      mixed_precision=FLAGS.mixed_precision, jit_compile=FLAGS.jit_compile, cluster=cluster,
      checkpoint_every_steps=FLAGS.checkpoint_every_steps, keep_checkpoints=FLAGS.keep_checkpoints,
      restart=FLAGS.restart, **folders)
  return job_dir, config_lib.Config(**{**fields, **overrides})


@contextlib.contextmanager
def saying_how_to_resume(job_dir):
  """A stop on a signal names what resumes it: "the same command" starts from scratch when the job
  folder is a new one each run (no --job_dir) or --restart deletes the checkpoints every time."""
  try:
    yield
  except preemption.Preempted as e:
    changes = [f"with --job_dir={job_dir}"] if not FLAGS.job_dir else []
    changes += ["without --restart"] if FLAGS.restart else []
    if not changes:
      raise
    raise e.resumed_by(f"run the same command {' and '.join(changes)}") from None


@contextlib.contextmanager
def exit_codes(prefix="trainer"):
  """Turns what stops a job into one line on stderr and its exit code (below)."""
  try:
    yield
  except config_lib.UserError as e:
    fail(str(e), prefix=f"{prefix}: error: ")
  except storage.StorageError as e:
    fail(str(e), preemption.STORAGE_FAILURE, prefix=f"{prefix}: error: ")
  except preemption.Restart as e:
    fail(str(e), e.exit_code, prefix=f"{prefix}: ")


# Exit codes (README "Resume, preemption and exit codes"): 0 done; 2 a mistake in the job's input
# or a diverged training, which retrying cannot fix (TFJob's ExitCode policy treats 1-127 as
# permanent); 128-255, retried: 128 + the signal (143 SIGTERM, 130 SIGINT) after saving a
# checkpoint, and trainer.preemption's STORAGE_FAILURE, WORKER_LOST and SERVING_BUSY.
USER_ERROR = 2


def fail(message, code=USER_ERROR, prefix="trainer: error: "):
  """One line on stderr, no traceback, and the exit code that tells a cluster what to do next."""
  print(f"{prefix}{message}", file=sys.stderr, flush=True)
  sys.exit(code)


def run():
  app.run(main)


if __name__ == "__main__":
  run()
