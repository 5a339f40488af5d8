"""The trainer's command line, shared by the entry points (trainer.task, trainer.retrain): a flag
for every Config field that has one, defined from the field's `option` (its help, enum choices),
the flags about this process (its cluster, its job folder), and the Config they make.

No TensorFlow here: a flag mistake is one line within a second.
"""

import contextlib
import dataclasses
import os
import typing

from absl import flags

from trainer import cluster as cluster_lib
from trainer import config as config_lib
from trainer.errors import Preempted

FLAGS = flags.FLAGS
_DEFINE = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool}


def _flag_fields():
  return [field for field in dataclasses.fields(config_lib.Config) if field.metadata["flag"]]


def _define(field):
  """--<field name>: an enum for choices, a comma-separated list for a tuple, else the field's type."""
  meta, kind = field.metadata, field.type
  if meta["choices"]:
    flags.DEFINE_enum(field.name, field.default, meta["choices"], meta["help"])
  elif typing.get_origin(kind) is tuple:
    flags.DEFINE_list(field.name, list(field.default), meta["help"])
  else:
    optional = [t for t in typing.get_args(kind) if t is not type(None)]  # Optional[X] is X or None
    _DEFINE[optional[0] if optional else kind](field.name, field.default, meta["help"])


for _field in _flag_fields():
  _define(_field)
flags.DEFINE_string("indexed_job_hosts", None, "Kubernetes Indexed Job without TF_CONFIG: host:port of every "
                    "worker with {index}, e.g. train-{index}.train-workers:2222 (env TRAINER_INDEXED_JOB_HOSTS).")
flags.DEFINE_integer("num_workers", None, "Kubernetes Indexed Job: number of workers; JobSet: number of tasks, "
                     "chief included (env TRAINER_NUM_WORKERS).")
flags.DEFINE_string("job_dir", None, "Folder (local or gs://) for checkpoints, logs, exports, the report and plots; "
                    "default: the folder above AIP_MODEL_DIR on Vertex AI, else a new folder under ./runs/.")


def _value(field):
  value = FLAGS[field.name].value
  if typing.get_origin(field.type) is tuple:
    return tuple(value)
  return None if field.metadata["blank_is_none"] and value == "" else value


def config_from_flags(**overrides):
  """(job folder, Config) from the flags, with overrides of Config fields (trainer.retrain sets the
  test period from its own flags); a mistake raises UserError."""
  cluster = cluster_lib.resolve(os.environ, FLAGS.indexed_job_hosts, FLAGS.num_workers)
  fields = {field.name: _value(field) for field in _flag_fields()}
  job_dir, folders = config_lib.output_folders(os.environ, FLAGS.job_dir, FLAGS.model,
                                               **{name: fields[name] for name in config_lib.VERTEX_FOLDERS})
  return job_dir, config_lib.Config(**{**fields, **folders, "cluster": cluster, **overrides})


@contextlib.contextmanager
def saying_how_to_resume(job_dir):
  """A stop on a signal names what resumes it: "the same command" starts from scratch when the job
  folder is a new one each run (no --job_dir) or --restart deletes the checkpoints every time."""
  try:
    yield
  except Preempted as e:
    changes = [f"with --job_dir={job_dir}"] if not FLAGS.job_dir else []
    changes += ["without --restart"] if FLAGS.restart else []
    if not changes:
      raise
    raise e.resumed_by(f"run the same command {' and '.join(changes)}") from None
