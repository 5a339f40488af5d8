import pytest

from trainer import config
from trainer.config import Config, UserError, output_folders


def test_vertex_ai_variables_give_the_default_folders():
  environ = {"AIP_MODEL_DIR": "gs://b/out/model/", "AIP_CHECKPOINT_DIR": "gs://b/out/checkpoints/",
             "AIP_TENSORBOARD_LOG_DIR": "gs://b/out/logs/"}
  job_dir, folders = output_folders(environ, None, "lstm", export_dir=None, checkpoint_dir=None, tensorboard_dir=None)
  assert job_dir == "gs://b/out"
  assert folders == {"export_dir": "gs://b/out/model/", "checkpoint_dir": "gs://b/out/checkpoints/",
                     "tensorboard_dir": "gs://b/out/logs/"}
  # A flag given on the command line wins over its variable.
  job_dir, folders = output_folders(environ, "gs://b/job", "lstm", export_dir="gs://b/serving", checkpoint_dir=None,
                                    tensorboard_dir=None)
  assert job_dir == "gs://b/job" and folders["export_dir"] == "gs://b/serving"
  assert folders["checkpoint_dir"] == "gs://b/out/checkpoints/"


def test_without_vertex_ai_the_job_folder_holds_everything():
  job_dir, folders = output_folders({}, None, "gru", export_dir=None, checkpoint_dir=None, tensorboard_dir=None)
  assert job_dir.startswith("runs/gru-")
  assert folders == {"export_dir": None, "checkpoint_dir": None, "tensorboard_dir": None}


def test_resume_mismatch_names_the_first_flag_that_changed():
  saved = {"model": "gru", "data": None, "test_data": None, "target_column": None, "date_column": None,
           "feature_columns": [], "test_start": None, "window": 60, "batch_size": 32, "seed": 42,
           "bidirectional": False, "validation_split": 0.2, "test_split": 0.2, "image_size": 150, "augment": True}
  assert Config(model="gru").resume_mismatch(saved) is None
  # Longer training and a smaller learning rate are what resuming is for.
  assert Config(model="gru", epochs=99, patience=3, learning_rate=1e-5).resume_mismatch(saved) is None
  assert Config(model="gru", window=30).resume_mismatch(saved) == ("window", 60, 30)


@pytest.mark.parametrize("flags, message", [
    ({"checkpoint_every_steps": -1}, "--checkpoint_every_steps must be 0"),
    ({"keep_checkpoints": 0}, "--keep_checkpoints must be at least 1"),
])
def test_checkpoint_flags_are_checked(flags, message):
  with pytest.raises(UserError, match=message):
    Config(**flags)


@pytest.mark.parametrize("flags, message", [
    ({"model": "gru", "test_days": 0}, "--eval_days=0: give a number of days of at least 1"),
    ({"model": "gru", "test_days": 30, "test_start": "2020-01-01"}, "and no --eval_start"),
    ({"model": "dense", "test_days": 30}, "--eval_days applies to forecasts"),
    ({"model": "gru", "test_data": "x.csv"}, "--test_data applies to --model=cnn and dense"),
    ({"model": "dense", "test_data": "missing.csv"}, "--test_data=missing.csv: no such file"),
])
def test_hold_out_flags_are_checked(flags, message):
  with pytest.raises(UserError, match=message):
    Config(**flags)


def test_the_identity_is_the_fields_marked_so_in_field_order():
  """The flags a checkpoint's config is compared on, as they were listed before they moved beside
  their fields: adding a field to the identity is a decision, not an accident of order."""
  assert config.IDENTITY == ("model", "data", "test_data", "target_column", "date_column", "feature_columns",
                             "test_start", "test_days", "window", "batch_size", "seed", "bidirectional",
                             "validation_split", "test_split", "image_size", "augment", "mixed_precision",
                             "lr_schedule", "warmup_steps")
  assert list(Config(model="gru").resume_identity()) == list(config.IDENTITY)
