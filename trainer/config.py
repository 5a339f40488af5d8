"""The typed job configuration: defaults, and validation that fails before any work starts.

Library code takes a `Config`; only trainer.cli knows about flags, and defines one for each field
from the field's `option`: its help, and whether it is part of the job's identity, are written
once, beside the field. Field names match the flag names so that an error can name the flag the
user has to change.
"""

import dataclasses
import datetime
import glob
import os
from typing import Optional, Tuple

from trainer import cluster as cluster_lib
from trainer import families
from trainer.errors import UserError

COMMUNICATIONS = ("auto", "ring", "nccl")
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


# 10 steps per call. A signal is acted on after up to two calls, within the pods' 120 s grace
# period (k8s/base/job.yaml): the CNN at batch 32 takes ~0.15 s a step on 2 CPU cores, so a call
# of 10 is ~1.5 s, and a batch or image ten times larger still leaves two calls far inside it,
# where 100 would not. Most of the host overhead per step is gone at 10 already (BENCHMARKS.md).
STEPS_PER_LOOP = 10
LR_SCHEDULES = ("constant", "cosine")
CACHES = ("auto", "memory", "disk", "none")

# Three 3x3 convolutions, each followed by a 2x2 pooling, need at least this many pixels.
MIN_IMAGE_SIZE = 22


def option(default, help, identity=False, flag=True, choices=None, blank_is_none=False):  # noqa: A002
  """A Config field and everything about its option, in one place: `help` (the flag's --help text),
  `identity` (the value must stay the same for a job to resume from its checkpoints:
  Config.resume_mismatch), `flag` (trainer.cli defines --<name> from it; False for a field set
  otherwise), `choices` (an enum flag), `blank_is_none` (--name= given empty means not given)."""
  return dataclasses.field(default=default, metadata={"help": help, "identity": identity, "flag": flag,
                                                      "choices": choices, "blank_is_none": blank_is_none})


@dataclasses.dataclass
class Config:
  model: str = option("lstm", "Network to train: dense (tables), gru or lstm (forecasts), cnn (images).",
                      identity=True, choices=families.NAMES)
  # None trains on built-in generated data: no download needed.
  data: Optional[str] = option(None, "CSV file; for cnn a folder of class subfolders, TFRecord shards (their folder "
                               "or a glob) or tfds:NAME; not given: built-in generated data.", identity=True)
  test_data: Optional[str] = option(None, "cnn and dense: a separate test set of the same kind as --data.",
                                    identity=True)
  # None: "y" for the built-in table, "Close" for the built-in series.
  target_column: Optional[str] = option(None, "Column to predict (required with --data).", identity=True)
  date_column: Optional[str] = option(None, "Column of dates: rows are sorted by it, --test_start refers to it.",
                                      identity=True)
  feature_columns: Tuple[str, ...] = option((), "Input columns besides the target; tables default to every numeric "
                                            "column.", identity=True)
  # Forecasts only. Blank is None: a shared flags file clears it (k8s/overlays/cronjob/retrain.flags).
  test_start: Optional[str] = option(None, "First date of the test period (YYYY-MM-DD); default (or empty): the "
                                     "last 20% of rows.", identity=True, blank_is_none=True)
  # Set by trainer.retrain's --eval_days: a hold-out that moves with the data as rows are added.
  test_days: Optional[int] = option(None, "Forecasts: the test period is the newest this many days.",
                                    identity=True, flag=False)
  # 60 trading days, the tutorial's window.
  window: int = option(60, "Time steps in each forecast window.", identity=True)
  epochs: int = option(60, "Maximum training epochs.")
  # Split across replicas by the distribution strategy.
  batch_size: int = option(32, "Global batch size.", identity=True)
  learning_rate: float = option(1e-3, "Optimizer learning rate.")
  # The best weights are kept.
  patience: int = option(10, "Epochs without a better validation loss before stopping.")
  seed: int = option(42, "Seed for the split, shuffling and initial weights.", identity=True)
  bidirectional: bool = option(False, "Wrap each recurrent layer in Bidirectional.", identity=True)
  # Their tail, for series.
  validation_split: float = option(0.2, "Fraction of the training rows held out for early stopping.",
                                   identity=True)
  # At random for tables, as the tutorial did; the last rows for forecasts without --test_start.
  test_split: float = option(0.2, "Fraction of rows held out for testing.", identity=True)
  # The tutorial's 150.
  image_size: int = option(150, "cnn: images are resized to this square size.", identity=True)
  # As the tutorial's generator.
  augment: bool = option(True, "cnn: random rotation, shear, zoom and flips of training images.", identity=True)
  tfds_data_dir: Optional[str] = option(None, "cnn with tfds:NAME: the TFDS data folder.")
  tfds_download: bool = option(False, "cnn with tfds:NAME: allow downloading the dataset.")
  strategy: str = option("auto", "tf.distribute strategy; auto: multi_worker_mirrored when the cluster environment "
                         "names several tasks, mirrored with several GPUs (or --cpu_devices), else default.",
                         choices=STRATEGIES)
  # Rehearsals and tests of mirrored training.
  cpu_devices: int = option(0, "Split the CPU into this many logical devices (mirrored without GPUs).")
  # How gradients are all-reduced; not identity: any value trains the same model.
  communication: str = option("auto", "All-reduce between replicas: nccl (GPU clusters: every worker needs a GPU), "
                              "ring (through the hosts), auto (TensorFlow's choice: ring across workers).",
                              choices=COMMUNICATIONS)
  # Identity: its optimizer (a LossScaleOptimizer on GPUs) holds other variables.
  mixed_precision: bool = option(False, "Mixed precision: float16 with loss scaling on GPUs, bfloat16 on CPUs.",
                                 identity=True)
  jit_compile: bool = option(False, "XLA-compile each replica's training step (not for gru and lstm: cuDNN has no "
                             "XLA kernels; nor with --deterministic).")
  # Not identity: a checkpoint restores the same with or without it; on GPUs, the identical weights after
  # a resume that the README promises need it on every attempt.
  deterministic: bool = option(False, "Deterministic TensorFlow ops: the same weights from the same inputs on GPUs too "
                               "(slower; CPUs are deterministic without it).")
  # This process's place in the cluster (trainer.cluster.resolve, from the environment and trainer.cli's
  # --indexed_job_hosts and --num_workers); None: alone.
  cluster: Optional[cluster_lib.Cluster] = option(None, "This process's place in the cluster.", flag=False)
  # None: the job folder's checkpoints/, logs/ and export/ (trainer.cli fills them from AIP_* on Vertex AI).
  checkpoint_dir: Optional[str] = option(None, "Checkpoints; default: AIP_CHECKPOINT_DIR, else "
                                         "<job_dir>/checkpoints.")
  tensorboard_dir: Optional[str] = option(None, "TensorBoard logs; default: AIP_TENSORBOARD_LOG_DIR, else "
                                          "<job_dir>/logs.")
  export_dir: Optional[str] = option(None, "Versioned SavedModels (<export_dir>/<version>/); default: "
                                     "AIP_MODEL_DIR, else <job_dir>/export.")
  checkpoint_every_steps: int = option(0, "Checkpoint every N training steps (and at the end) instead of at the "
                                       "end of every epoch (0).")
  keep_checkpoints: int = option(3, "Newest checkpoints to keep.")
  restart: bool = option(False, "Delete this job's checkpoints and train from scratch instead of resuming.")
  # Watching a job (trainer.progress, trainer.summaries): may change on resume.
  log_every_steps: int = option(0, "The chief logs a progress line (epoch, step, steps/s, examples/s, loss, ETA) "
                                "every N training steps; 0: about every 30 seconds.")
  profile_steps: str = option("", "START,END: record a profiler trace of these global steps on the chief into the "
                              "TensorBoard folder; empty: none.")
  # Steps per call, learning-rate schedule, gradient clipping. Results are the same
  # for any --steps_per_loop; a signal is read once per call, so a call must stay well inside a
  # pod's termination grace period (k8s/base/job.yaml: 120 s) with the slowest model.
  steps_per_loop: int = option(STEPS_PER_LOOP, "Training steps per host round trip; the same results for any "
                               "value. A signal (preemption) waits for up to two calls: keep N steps well under "
                               "a minute with your model.")
  # Identity: the curve is the job's; --learning_rate (its peak) and --epochs (its length) may still change.
  lr_schedule: str = option("constant", "Learning rate over the optimizer's steps: constant (the tutorial's), or "
                            "cosine: decays to 0 at the end of --epochs.", identity=True, choices=LR_SCHEDULES)
  warmup_steps: int = option(0, "Raise the learning rate linearly from 0 over this many steps first.", identity=True)
  # Not identity: resuming a diverged job with clipping is what the divergence message suggests.
  clip_norm: float = option(0.0, "Clip the gradient (all replicas' sum) to this global norm; 0: no clipping.")
  # Checkpoints off the critical path: may change on resume.
  async_checkpoints: bool = option(True, "Copy each checkpoint to host memory and write and upload it while training "
                                   "goes on; false: training waits for each save.")
  # What a preempted pod is given between SIGTERM and SIGKILL: GKE's Spot and preemptible nodes give 15 s, whatever
  # terminationGracePeriodSeconds says. Only warns: the trainer cannot read its pod's grace itself.
  preemption_grace_seconds: float = option(15.0, "Seconds a preemption gives between SIGTERM and the kill (GKE Spot "
                                           "nodes: 15; else the pod's terminationGracePeriodSeconds): a checkpoint "
                                           "save that takes longer is warned about once; 0: no warnings.")
  # Data beyond memory (trainer/data/budget.py, trainer/data/images.py).
  cache: str = option("auto", "cnn: where decoded images are kept between epochs: memory, disk (local scratch: TMPDIR, "
                      "else /tmp), none (decoded every epoch), or auto: the first of these that fits.",
                      choices=CACHES)
  memory_budget_mb: int = option(0, "Memory (MiB) the data may take; 0: the container's memory limit, else the "
                                 "machine's available memory, less what TensorFlow and the model need.")
  disk_budget_mb: int = option(0, "Local scratch disk (MiB) the data may take (set it to the pod's ephemeral-storage "
                               "or emptyDir size); 0: the free space of the scratch folder.")

  def __post_init__(self):
    self.feature_columns = tuple(self.feature_columns or ())
    if self.cluster is None:
      self.cluster = cluster_lib.alone()
    if self.strategy not in STRATEGIES:
      raise UserError(f"--strategy={self.strategy!r} is unknown; choose one of: {', '.join(STRATEGIES)}")
    if self.communication not in COMMUNICATIONS:
      raise UserError(f"--communication={self.communication!r} is unknown; choose one of: {', '.join(COMMUNICATIONS)}")
    if self.cpu_devices < 0:
      raise UserError(f"--cpu_devices must be 0 (no split) or more (got {self.cpu_devices})")
    if self.model not in families.NAMES:
      raise UserError(f"--model={self.model!r} is unknown; choose one of: {', '.join(families.NAMES)}")
    for name in ("window", "epochs", "batch_size", "patience", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise UserError(f"--{name} must be at least 1 (got {getattr(self, name)})")
    if self.checkpoint_every_steps < 0:
      raise UserError(f"--checkpoint_every_steps must be 0 (every epoch) or more (got {self.checkpoint_every_steps})")
    if self.log_every_steps < 0:
      raise UserError(f"--log_every_steps must be 0 (about every 30 seconds) or more (got {self.log_every_steps})")
    self.profile_range  # noqa: B018 -- validates --profile_steps
    if self.steps_per_loop < 1:
      raise UserError(f"--steps_per_loop must be at least 1 (got {self.steps_per_loop})")
    if self.lr_schedule not in LR_SCHEDULES:
      raise UserError(f"--lr_schedule={self.lr_schedule!r} is unknown; choose one of: {', '.join(LR_SCHEDULES)}")
    for name in ("memory_budget_mb", "disk_budget_mb"):
      if getattr(self, name) < 0:
        raise UserError(f"--{name} must be 0 (measure it) or more (got {getattr(self, name)})")
    if not self.preemption_grace_seconds >= 0:
      raise UserError("--preemption_grace_seconds must be 0 (no warnings) or more "
                      f"(got {self.preemption_grace_seconds:g})")
    if self.warmup_steps < 0:
      raise UserError(f"--warmup_steps must be 0 (no warmup) or more (got {self.warmup_steps})")
    if not self.clip_norm >= 0:
      raise UserError(f"--clip_norm must be 0 (no clipping) or more (got {self.clip_norm})")
    if not self.learning_rate > 0:
      raise UserError(f"--learning_rate must be positive (got {self.learning_rate})")
    for name in ("validation_split", "test_split"):
      if not 0 < getattr(self, name) < 1:
        raise UserError(f"--{name} must be between 0 and 1 (got {getattr(self, name)})")
    if self.kind == "images":
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
    if self.test_data and self.kind != "images" and not self.test_data.startswith("gs://") \
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

  def resume_identity(self, precision=None):
    """The flags that make this job this job (the fields marked identity), as JSON saves them: a
    checkpoint keeps them, and resume_mismatch compares against them. precision: the Keras dtype
    policy --mixed_precision became on this host (trainer.distribution.precision_policy), kept too:
    float16 (GPUs) has a LossScaleOptimizer, bfloat16 (CPUs) not, and neither restores the other."""
    identity = {name: list(value) if isinstance(value, tuple) else value
                for name, value in ((name, getattr(self, name)) for name in IDENTITY)}
    return {**identity, "precision": precision} if precision else identity

  def resume_mismatch(self, saved, identity=None):
    """The first flag whose value differs from `saved` (a checkpoint's config) in a way that makes
    its checkpoints useless or misleading for this job, as (flag, saved value, value), or None.
    --epochs, --patience and --learning_rate may change: going on for longer, or going on with a
    smaller step after a divergence, is what resuming is for. A flag that `saved` lacks (a
    checkpoint written before the flag was part of the identity) is not compared. identity: this
    job's, with its precision (default: the flags alone); a precision named by its flag."""
    for name, value in (identity or self.resume_identity()).items():
      if name in saved and value != saved[name]:
        return "mixed_precision" if name == "precision" else name, saved[name], value
    return None

  @property
  def profile_range(self) -> Optional[Tuple[int, int]]:
    """--profile_steps as (START, END), or None."""
    if not self.profile_steps:
      return None
    try:
      start, end = (int(part) for part in self.profile_steps.split(","))
    except ValueError:
      start = end = 0
    if not 1 <= start <= end:
      raise UserError(f"--profile_steps={self.profile_steps!r}: give START,END, two global steps with "
                      "1 <= START <= END")
    return start, end

  @property
  def kind(self) -> str:
    """The model's kind (trainer.families): "table", "forecast" or "images"."""
    return families.FAMILIES[self.model].kind

  @property
  def is_forecast(self) -> bool:
    return self.kind == "forecast"


# The flags that must keep their value for a job to resume from its checkpoints, in field order.
IDENTITY = tuple(field.name for field in dataclasses.fields(Config) if field.metadata["identity"])
