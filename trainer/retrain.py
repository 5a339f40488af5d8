"""Entry point: `python -m trainer.retrain --serving_dir=DIR` with the trainer's flags (trainer.cli)
trains a candidate and promotes it into DIR only when it beats production (trainer.retraining);
with --rollback_to=V, --hold or --release it changes DIR as an operator asks (trainer.operations).

Exit codes as trainer.errors says them: 0 whether the candidate was promoted or rejected (a diverged
candidate too: production stays, nobody needs waking), or the night skipped for want of new data
(trainer.no_new_data); non-zero only when the job itself failed:
2 a mistake in its input, 170 storage, 172 another retrain holds the serving folder, 128 + a signal.
"""

import dataclasses

from absl import app, flags

from trainer import cli, errors, families, hold, no_new_data, operations, retrain_history, storage
from trainer.data import csv_file
from trainer.errors import UserError

FLAGS = flags.FLAGS
PREFIX = "retrain: error: "
flags.DEFINE_string("serving_dir", None, "Where production models live, as TF Serving reads them: "
                    "<serving_dir>/<version>/ SavedModels, plus history.jsonl and history.png (local or gs://).")
flags.DEFINE_bool("warm_start", True, "Start the candidate from the production model's weights when it is the "
                  "same network (same --model, columns, classes); --nowarm_start: from random weights.")
flags.DEFINE_string("eval_start", None, "Forecasts: first date (YYYY-MM-DD) of the hold-out that candidate, "
                    "production and baseline are scored on; default: the newest --eval_days days.")
flags.DEFINE_integer("eval_days", 365, "Forecasts: the hold-out is the newest this many days of --data.")
flags.DEFINE_string("eval_data", None, "dense and cnn: a separate hold-out of the same kind as --data; "
                    "default: --test_split of --data, split at random.")
flags.DEFINE_float("min_improvement", 0.01, "Promote only a candidate at least this much better than "
                   "production, relative (0.01: an RMSE 1% lower, or an accuracy 1% higher).")
flags.DEFINE_integer("keep_versions", 5, "Newest versions kept in --serving_dir.")
flags.DEFINE_float("lease_ttl_seconds", 300, "The serving folder's lease lasts this long unless renewed (a live "
                   "retrain renews it): what a crashed retrain blocks others for.")
flags.DEFINE_float("lease_wait_seconds", 900, "How long to wait for another retrain's lease before exiting "
                   "with 172.")
flags.DEFINE_bool("show_history", False, "Print <serving_dir>/history.jsonl as a table and exit.")
# No new data (trainer.no_new_data): a night on the data production was trained on is skipped.
flags.DEFINE_bool("force", False, "Train even when --data holds what production was trained on (the same "
                  "contents, or for a forecast the same newest row); without it such a night records "
                  "\"skipped: no new data\" and exits 0 before training.")
# Not noise: the improvement's confidence, by a paired bootstrap of the hold-out's rows (trainer.bootstrap).
flags.DEFINE_float("min_confidence", 0, "Promote only when the improvement over production reaches "
                   "--min_improvement at this one-sided confidence too (0.95: its 95% lower bound, by a paired "
                   "bootstrap of the hold-out's rows); 0: not asked.")
# Rollback and hold (trainer.operations): an operator's commands; they need no --data and train nothing.
flags.DEFINE_integer("rollback_to", None, "Republish kept version V of --serving_dir as its new highest version, "
                     "the one TF Serving serves, and exit.")
flags.DEFINE_bool("hold", False, "Hold promotions and exit: retrains still train and score, but record a candidate "
                  "that would have been promoted as held, until --release.")
flags.DEFINE_bool("release", False, "Release a --hold and exit: the next retrain may promote again.")
flags.DEFINE_string("note", None, "With --rollback_to, --hold or --release: why, recorded in the history.")
flags.adopt_module_key_flags(cli)  # the trainer's flags are this command's own too (--helpshort)


def main(argv):
  if len(argv) > 1:
    errors.fail(f"unexpected arguments {' '.join(argv[1:])}; flags are written --name=value", prefix=PREFIX)
  with errors.exiting("retrain"):
    if not FLAGS.serving_dir:
      raise UserError("--serving_dir is required: the folder (local or gs://) production models "
                      "are served from")
    if FLAGS.rollback_to is not None or FLAGS.hold or FLAGS.release or FLAGS.note:
      _operate()
      return
    if FLAGS.show_history:
      held = hold.read(FLAGS.serving_dir)
      if held is not None:
        print(f"{hold.describe(held)} (--release resumes them)")
      history = retrain_history.read(FLAGS.serving_dir)
      print(retrain_history.table(history))
      if history:
        print(f"plot: {storage.join(FLAGS.serving_dir, retrain_history.PLOT)}")
      return
    job_dir, config = cli.config_from_flags(**_hold_out_fields())
    _check_options()
    _check_serving_dir()
    csv_file.check(config)  # a mistake in the file in a second, not after TensorFlow's start
    entry = None if FLAGS.force else no_new_data.skip(config, job_dir, FLAGS.serving_dir, FLAGS.lease_ttl_seconds,
                                                      FLAGS.lease_wait_seconds)
    if entry is None:
      from trainer import retraining  # imports TensorFlow: only once the flags and the data are known to be sound
      # Each field of retraining.Options is the flag of its name.
      options = retraining.Options(**{field.name: FLAGS[field.name].value
                                      for field in dataclasses.fields(retraining.Options)})
      with cli.saying_how_to_resume(job_dir):
        entry = retraining.retrain(config, job_dir, options)
  if entry is None:
    print("worker done: the chief decides whether the candidate is promoted")
    return
  print(f"{entry['decision']}: {entry['reason']}")
  if entry["version"] is not None:
    print(f"production: {storage.join(FLAGS.serving_dir, str(entry['version']))}")
  print(f"history: {storage.join(FLAGS.serving_dir, retrain_history.FILE)}")


def _check_serving_dir():
  if storage.exists(FLAGS.serving_dir) and not storage.is_dir(FLAGS.serving_dir):
    raise UserError(f"--serving_dir={FLAGS.serving_dir} is a file; give the folder models are "
                    "served from (it is created if missing)")


def _operate():
  """--rollback_to, --hold, --release: an operator's commands, each waiting for the lease as a retrain does."""
  _check_options()
  _check_serving_dir()
  for line in operations.operate(FLAGS.serving_dir, FLAGS.rollback_to, FLAGS.hold, FLAGS.release, FLAGS.note,
                                 FLAGS.keep_versions, FLAGS.lease_ttl_seconds, FLAGS.lease_wait_seconds):
    print(line)
  print(f"history: {storage.join(FLAGS.serving_dir, retrain_history.FILE)}")


def _hold_out_fields():
  """The Config fields that set the hold-out, from --eval_start, --eval_days and --eval_data."""
  for flag, instead in (("test_start", "--eval_start"), ("test_data", "--eval_data")):
    if FLAGS[flag].value:  # an empty --test_start= clears one from a shared flags file (k8s/overlays/cronjob)
      raise UserError(f"--{flag}: a retrain scores every model on its hold-out; give {instead}")
  if families.FAMILIES[FLAGS.model].kind == "forecast":
    if FLAGS.eval_data:
      raise UserError("--eval_data applies to dense and cnn; forecasts hold out their newest rows "
                      "(--eval_start or --eval_days)")
    return {"test_start": FLAGS.eval_start, "test_days": None if FLAGS.eval_start else FLAGS.eval_days}
  if FLAGS.eval_start:
    raise UserError("--eval_start applies to forecasts (--model=gru or lstm); dense and cnn are scored "
                    "on --test_split or --eval_data")
  return {"test_data": FLAGS.eval_data}


def _check_options():
  """retraining.Options' flags, checked before TensorFlow starts."""
  if FLAGS.min_improvement < 0:
    raise UserError(f"--min_improvement={FLAGS.min_improvement}: a candidate worse than production "
                    "would be promoted; give 0 or more")
  if not 0 <= FLAGS.min_confidence < 1:
    raise UserError(f"--min_confidence={FLAGS.min_confidence}: give a confidence level from 0 (off) to below 1, "
                    "e.g. 0.95")
  if FLAGS.keep_versions < 1:
    raise UserError(f"--keep_versions={FLAGS.keep_versions}: keep at least the version in production")
  if not FLAGS.lease_ttl_seconds > 0 or FLAGS.lease_wait_seconds < 0:
    raise UserError("--lease_ttl_seconds must be positive and --lease_wait_seconds 0 or more")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
