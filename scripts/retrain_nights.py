"""Replays scheduled retraining on a price CSV: one `python -m trainer.retrain` per "night", each
on the rows up to that night's date (as the file would have been then), into one serving folder,
then prints the history. The figures in README "Scheduled retraining" come from:

    python scripts/retrain_nights.py --data=GOOGL_2006-01-01_to_2018-01-01.csv \\
        --nights=2016-06-30,2016-12-31,2017-12-31 --bad_learning_rate=1e9 -- --min_confidence=0.95

--bad_learning_rate adds a last night on the last night's rows with that learning rate (and --force, or it
would be skipped for want of new data): a bad night.
Arguments after `--` go to every retrain.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import pandas as pd


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, help="a daily price CSV")
  parser.add_argument("--nights", required=True, help="comma-separated last dates (YYYY-MM-DD), one per night")
  parser.add_argument("--model", default="lstm")
  parser.add_argument("--date_column", default="Date")
  parser.add_argument("--target_column", default="Close")
  parser.add_argument("--bad_learning_rate", type=float, help="add a night on every row with this learning rate")
  parser.add_argument("--folder", help="where the nights' files, jobs and serving folder go; default: a temp folder")
  args, extra = parser.parse_known_args()
  extra = [a for a in extra if a != "--"]
  folder = args.folder or tempfile.mkdtemp(prefix="retrain-nights-")
  os.makedirs(folder, exist_ok=True)
  frame = pd.read_csv(args.data)
  serving_dir = os.path.join(folder, "serving")
  nights = [(night, night, []) for night in args.nights.split(",")]
  if args.bad_learning_rate:
    # The last night's rows again: --force, or it would be skipped for want of new data.
    nights.append(("bad", nights[-1][1], [f"--learning_rate={args.bad_learning_rate}", "--force"]))
  for name, last, flags in nights:
    data = os.path.join(folder, f"{name}.csv")
    frame[frame[args.date_column] <= last].to_csv(data, index=False)
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "trainer.retrain", f"--model={args.model}", f"--data={data}",
                           f"--date_column={args.date_column}", f"--target_column={args.target_column}",
                           f"--serving_dir={serving_dir}", f"--job_dir={os.path.join(folder, 'jobs', name)}",
                           *flags, *extra], capture_output=True, text=True)
    outcome = done.stdout.splitlines()[0] if done.returncode == 0 else done.stderr.strip().splitlines()[-1]
    print(f"night {name} (rows to {last}): exit {done.returncode} in {time.time() - started:.0f} s: {outcome}",
          flush=True)
  subprocess.run([sys.executable, "-m", "trainer.retrain", f"--serving_dir={serving_dir}", "--show_history"],
                 check=True)


if __name__ == "__main__":
  main()
