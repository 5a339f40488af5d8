"""The typed job configuration: defaults, and validation that fails before any work starts.

Library code takes a `Config`; only `trainer/task.py` knows about flags. Field names match
the flag names so that an error can name the flag the user has to change.
"""

import dataclasses
import datetime
import glob
import os
from typing import Any, Optional, Tuple


class UserError(Exception):
  """A mistake in the job's input: reported as one line and a non-zero exit, never a traceback."""


MODEL_NAMES = ("dense", "gru", "lstm", "cnn")
FORECAST_MODELS = ("gru", "lstm")
IMAGE_MODELS = ("cnn",)
STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker_mirrored")
# Vertex AI custom training says where a job should write through these variables; a flag given
# on the command line wins.
VERTEX_FOLDERS = {"export_dir": "AIP_MODEL_DIR", "checkpoint_dir": "AIP_CHECKPOINT_DIR",
                  "tensorboard_dir": "AIP_TENSORBOARD_LOG_DIR"}


def output_folders(environ, job_dir, model, **flags):
  """(job_dir, {export_dir, checkpoint_dir, tensorboard_dir}) from the flags, else Vertex AI's
  AIP_* variables. Without --job_dir: on Vertex AI the folder above AIP_MODEL_DIR (its base
  output directory), elsewhere a new folder under ./runs/."""
  folders = {name: flags.get(name) or environ.get(variable) or None for name, variable in VERTEX_FOLDERS.items()}
  if not job_dir:
    model_dir = environ.get("AIP_MODEL_DIR", "").rstrip("/")
    job_dir = (model_dir.rsplit("/", 1)[0] if "/" in model_dir else
               os.path.join("runs", f"{model}-{datetime.datetime.now():%Y%m%d-%H%M%S}"))
  return job_dir, folders


# Flags that must keep their value for a job to resume from its checkpoints (Config.resume_mismatch).
# --mixed_precision: its optimizer (a LossScaleOptimizer on GPUs) holds other variables.
RESUME_FIELDS = ("model", "data", "test_data", "target_column", "date_column", "feature_columns", "test_start",
                 "test_days", "window", "batch_size", "seed", "bidirectional", "validation_split", "test_split",
                 "image_size", "augment", "mixed_precision")
# Three 3x3 convolutions, each followed by a 2x2 pooling, need at least this many pixels.
MIN_IMAGE_SIZE = 22


@dataclasses.dataclass
class Config:
  model: str = "lstm"
  # A CSV file (dense, gru, lstm); for cnn a folder of class subfolders, TFRecord shards (their
  # folder or a glob) or tfds:NAME. None trains on built-in generated data: no download needed.
  data: Optional[str] = None
  # cnn: a separate test set, of the same kind as --data; None splits --data.
  test_data: Optional[str] = None
  # None: "y" for the built-in table, "Close" for the built-in series; required with --data.
  target_column: Optional[str] = None
  # Rows are sorted by this column; needed for --test_start.
  date_column: Optional[str] = None
  # Inputs besides the target; for tables, None means every numeric column but the target.
  feature_columns: Tuple[str, ...] = ()
  # First date of the test period; None: the last 20% of the rows (forecasts only).
  test_start: Optional[str] = None
  # Forecasts: the test period is the newest test_days days instead (trainer.retrain's
  # --eval_days: a hold-out that moves with the data as rows are added).
  test_days: Optional[int] = None
  # 60 trading days, the tutorial's window.
  window: int = 60
  epochs: int = 60
  # Global batch: split across replicas by the distribution strategy.
  batch_size: int = 32
  learning_rate: float = 1e-3
  # Epochs without a better validation loss before training stops (best weights are kept).
  patience: int = 10
  seed: int = 42
  bidirectional: bool = False
  # Fraction of the training rows (their tail, for series) held out for early stopping.
  validation_split: float = 0.2
  # cnn: images are resized to image_size x image_size (the tutorial's 150).
  image_size: int = 150
  # cnn: random rotation, shear, zoom and flips on training images, as the tutorial's generator.
  augment: bool = True
  # cnn with tfds:NAME: where TFDS keeps prepared datasets; downloading only when asked.
  tfds_data_dir: Optional[str] = None
  tfds_download: bool = False
  # tf.distribute strategy: auto picks multi-worker when the cluster names several tasks,
  # mirrored when several GPUs (or --cpu_devices) are visible, the default strategy otherwise.
  strategy: str = "auto"
  # Split the CPU into this many logical devices (mirrored without GPUs: rehearsals and tests).
  cpu_devices: int = 0
  # Mixed precision: float16 compute with loss scaling on GPUs, bfloat16 on CPUs.
  mixed_precision: bool = False
  # XLA-compile each replica's training step.
  jit_compile: bool = False
  # This process's place in the cluster (trainer.cluster.resolve); None: alone.
  cluster: Any = None
  # Fraction of the rows held out for testing: at random for tables, as the tutorial did;
  # the last rows for forecasts without --test_start.
  test_split: float = 0.2
  # Where checkpoints, TensorBoard logs and versioned SavedModels go (local or gs://); None: the
  # job folder's checkpoints/, logs/ and export/ (trainer.task fills them from AIP_* on Vertex AI).
  checkpoint_dir: Optional[str] = None
  tensorboard_dir: Optional[str] = None
  export_dir: Optional[str] = None
  # 0: a checkpoint at the end of every epoch; N: every N training steps instead (and at the end).
  checkpoint_every_steps: int = 0
  keep_checkpoints: int = 3
  # Ignore the checkpoints of an earlier run of this job and train from scratch.
  restart: bool = False

  def __post_init__(self):
    self.feature_columns = tuple(self.feature_columns or ())
    if self.cluster is None:
      from trainer import cluster as cluster_lib  # no TensorFlow there: safe before any server starts
      self.cluster = cluster_lib.alone()
    if self.strategy not in STRATEGIES:
      raise UserError(f"--strategy={self.strategy!r} is unknown; choose one of: {', '.join(STRATEGIES)}")
    if self.cpu_devices < 0:
      raise UserError(f"--cpu_devices must be 0 (no split) or more (got {self.cpu_devices})")
    if self.model not in MODEL_NAMES:
      raise UserError(f"--model={self.model!r} is unknown; choose one of: {', '.join(MODEL_NAMES)}")
    for name in ("window", "epochs", "batch_size", "patience", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise UserError(f"--{name} must be at least 1 (got {getattr(self, name)})")
    if self.checkpoint_every_steps < 0:
      raise UserError(f"--checkpoint_every_steps must be 0 (every epoch) or more (got {self.checkpoint_every_steps})")
    if not self.learning_rate > 0:
      raise UserError(f"--learning_rate must be positive (got {self.learning_rate})")
    for name in ("validation_split", "test_split"):
      if not 0 < getattr(self, name) < 1:
        raise UserError(f"--{name} must be between 0 and 1 (got {getattr(self, name)})")
    if self.model in IMAGE_MODELS:
      if self.image_size < MIN_IMAGE_SIZE:
        raise UserError(f"--image_size must be at least {MIN_IMAGE_SIZE} (got {self.image_size})")
      for flag in ("data", "test_data"):
        location = getattr(self, flag)
        if (location and not location.startswith(("tfds:", "gs://"))
            and not (os.path.isdir(location) or glob.glob(location))):
          raise UserError(f"--{flag}={location}: no such folder or files; give a folder with one subfolder "
                          "per class, a folder or glob of TFRecord shards, or tfds:NAME")
    elif self.data is not None:
      if not self.data.startswith("gs://") and not os.path.isfile(self.data):
        raise UserError(f"--data={self.data}: no such file; give the path of a CSV file")
      if not self.target_column:
        raise UserError("--target_column is required with --data: name the column to predict")
    if self.test_data and self.is_forecast:
      raise UserError("--test_data applies to --model=cnn and dense; forecasts are tested on their newest rows "
                      "(--test_start)")
    if self.test_data and self.model not in IMAGE_MODELS and not self.test_data.startswith("gs://") \
        and not os.path.isfile(self.test_data):
      raise UserError(f"--test_data={self.test_data}: no such file; give a CSV file with the columns of --data")
    if self.test_days is not None:
      if not self.is_forecast:
        raise UserError("--eval_days applies to forecasts (--model=gru or lstm); tables and images are "
                        "evaluated on --test_split or --eval_data")
      if self.test_days < 1 or self.test_start is not None:
        raise UserError(f"--eval_days={self.test_days}: give a number of days of at least 1, and no --eval_start")
      if self.data is not None and not self.date_column:
        raise UserError("--eval_days needs --date_column: name the column that holds the dates")
    if self.test_start is not None:
      if not self.is_forecast:
        raise UserError("--test_start applies to forecasts (--model=gru or lstm); "
                        "tables are split at random with --test_split")
      if self.data is not None and not self.date_column:
        raise UserError("--test_start needs --date_column: name the column that holds the dates")
      try:
        datetime.date.fromisoformat(self.test_start)
      except ValueError:
        raise UserError(f"--test_start={self.test_start!r} is not a date; write it as YYYY-MM-DD") from None

  def resume_identity(self):
    """The flags that make this job this job (RESUME_FIELDS), as JSON saves them: a checkpoint
    keeps them, and resume_mismatch compares against them."""
    return {name: list(value) if isinstance(value, tuple) else value
            for name, value in ((name, getattr(self, name)) for name in RESUME_FIELDS)}

  def resume_mismatch(self, saved):
    """The first flag whose value differs from `saved` (a checkpoint's config) in a way that makes
    its checkpoints useless or misleading for this job, as (flag, saved value, value), or None.
    --epochs, --patience and --learning_rate may change: going on for longer, or going on with a
    smaller step after a divergence, is what resuming is for. A flag that `saved` lacks (a
    checkpoint written before the flag was part of the identity) is not compared."""
    for name, value in self.resume_identity().items():
      if name in saved and value != saved[name]:
        return name, saved[name], value
    return None

  @property
  def is_forecast(self) -> bool:
    return self.model in FORECAST_MODELS
