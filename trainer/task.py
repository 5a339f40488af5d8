"""Entry point: `python -m trainer.task --model=lstm` (or the `trainer` command).

Reads the flags (trainer.cli) into a Config, checks a CSV before TensorFlow starts, and calls
train.train_and_evaluate; nothing else. Exit codes: trainer.errors.
"""

import os

# TensorFlow's C++ start-up chatter (CUDA probing, CPU instruction notes) hides the job's own output. Not
# all: a host without a GPU still gets abseil's early CUDA lines, which trainer.devices.describe explains.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from trainer import cli, errors, storage  # noqa: E402

flags.adopt_module_key_flags(cli)  # the flags are this command's own (--helpshort)


def main(argv):
  if len(argv) > 1:
    errors.fail(f"unexpected arguments {' '.join(argv[1:])}; flags are written --name=value")
  with errors.exiting("trainer"):
    job_dir, config = cli.config_from_flags()
    # Imported here: pandas costs 0.7 s, which `--help` and scripts/submit.py (it reads the flags) need not pay.
    from trainer.data import csv_file
    csv_file.check(config)  # a mistake in the file in a second, not after TensorFlow's start
    from trainer import train  # imports TensorFlow: only once the flags and the data are known to be sound
    with cli.saying_how_to_resume(job_dir):
      result = train.train_and_evaluate(config, job_dir)
  from trainer import report
  print(report.summary_table(result))
  if config.cluster.is_chief:
    print(f"report: {storage.join(job_dir, 'report.json')}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
