"""The real command line in a subprocess: bad input ends in one clear line and a non-zero exit."""

import ctypes
import json
import os
import re
import signal
import subprocess
import sys

import forked
import pandas as pd
import pytest
from processes import Job, stalled, wait_for_line

pytestmark = pytest.mark.slow  # trainer processes or whole trainings: not in the fast tier


def run_cli(*flags, cwd, env=None):
  done = forked.run([sys.executable, "-m", "trainer.task", *flags], cwd=cwd, capture_output=True, text=True,
                    timeout=300, env={**os.environ, **(env or {})})
  return done.returncode, done.stdout, done.stderr


def error_line(stderr):
  lines = [line for line in stderr.splitlines() if line.startswith(("trainer: error:", "FATAL Flags parsing error"))]
  assert len(lines) == 1, stderr
  return lines[0]


def assert_fails(tmp_path, flags, code, *expected, env=None):
  """The command exits with code (2 for our one-line errors, 1 for absl's own flag parsing ones),
  without a traceback, on one error line holding every expected text."""
  got, _, stderr = run_cli(*flags, cwd=tmp_path, env=env)
  assert got == code, stderr[-3000:]
  assert "Traceback" not in stderr, stderr
  line = error_line(stderr)
  for text in expected:
    assert text in line, line


@pytest.mark.parametrize("flags, code, expected", [
    (["--model=transformer"], 1, ["--model=transformer", "dense|gru|lstm"]),  # absl's own flag parsing
    (["--epochs=0"], 2, ["--epochs must be at least 1"]),
    (["--batch_size=-4"], 2, ["--batch_size must be at least 1"]),
    (["--window=0"], 2, ["--window must be at least 1"]),
    (["--data=nowhere.csv", "--target_column=y"], 2, ["--data=nowhere.csv: no such file"]),
    (["--model=gru", "--test_start=2017-13-40"], 2, ["--test_start='2017-13-40' is not a date"]),
])
def test_bad_flags(tmp_path, flags, code, expected):
  assert_fails(tmp_path, flags, code, *expected)


@pytest.fixture
def data_errors_csv(tmp_path, prices_csv):
  """The files behind the data errors below, written into the test's folder."""
  frame = pd.read_csv(prices_csv(rows=200))
  frame.assign(Close=frame.Close.astype(str).where(frame.index != 50, "abc")).to_csv(tmp_path / "text.csv", index=False)
  frame.head(40).to_csv(tmp_path / "short.csv", index=False)
  (tmp_path / "binary.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe\xfa")
  return tmp_path


SERIES = ["--model=gru", "--date_column=Date", "--target_column=Close"]


@pytest.mark.parametrize("flags, expected", [
    (["--data=binary.csv"] + SERIES, ["--data=binary.csv: cannot read it as CSV"]),
    (["--data=prices.csv", "--model=gru", "--target_column=close"],
     ["--target_column='close' is not a column", "Date, Close, Volume, Name"]),
    (["--data=prices.csv", "--model=gru", "--target_column=Close", "--date_column=Day"], ["--date_column='Day'"]),
    (["--data=text.csv"] + SERIES, ["column 'Close'", "non-numeric", "line 52: 'abc'"]),
    (["--data=short.csv", "--window=60"] + SERIES, ["too short for --window=60", "at least 63 rows"]),
    (["--data=prices.csv", "--test_start=2030-01-01"] + SERIES, ["--test_start=2030-01-01 is outside the data"]),
])
def test_bad_data(data_errors_csv, flags, expected):
  assert_fails(data_errors_csv, flags, 2, *expected)


def test_flagfile_gaps_and_default_job_dir(tmp_path, prices_csv):
  """A real run from a flagfile on a series with gaps: gaps are filled, said and reported."""
  frame = pd.read_csv(prices_csv(rows=200))
  frame.loc[[20, 21, 90], "Close"] = None
  frame.to_csv(tmp_path / "gaps.csv", index=False)
  (tmp_path / "job.flags").write_text(
      "--model=lstm\n--data=gaps.csv\n--target_column=Close\n--date_column=Date\n--window=8\n--epochs=1\n")
  code, stdout, stderr = run_cli("--flagfile=job.flags", cwd=tmp_path)
  assert code == 0, stderr
  assert "3 rows have missing values in Close; filled forward" in stderr
  assert "lstm (test)" in stdout and "persistence" in stdout
  (job,) = (tmp_path / "runs").iterdir()
  assert job.name.startswith("lstm-")
  data = json.loads((job / "report.json").read_text())["data"]
  assert data["missing_rows"] == 3 and data["missing_action"].startswith("filled forward")


def test_console_script_runs_the_same_main(tmp_path):
  """`pip install -e .` puts a `trainer` command beside this Python; it is task.run."""
  import pathlib
  script = pathlib.Path(sys.executable).parent / "trainer"
  done = subprocess.run([str(script), "--epochs=0"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and "trainer: error: --epochs must be at least 1" in done.stderr


@pytest.mark.parametrize("case, expected", [
    ("empty_class", ["'green'", "no readable images"]),
    ("mismatched", ["--test_data", "green"]),
    ("missing", ["--data=nowhere: no such folder"]),
    ("one_class", ["two classes"]),
])
def test_bad_image_folders(tmp_path, make_image_folder, case, expected):
  flags = ["--model=cnn", "--image_size=24", "--epochs=1"]
  if case == "empty_class":
    root = make_image_folder({"red": 4, "blue": 4})
    os.makedirs(os.path.join(root, "green"))
    flags.append(f"--data={root}")
  elif case == "mismatched":
    flags += [f"--data={make_image_folder({'red': 4, 'green': 4})}",
              f"--test_data={make_image_folder({'red': 2, 'blue': 2}, name='test')}"]
  elif case == "missing":
    flags.append("--data=nowhere")
  else:
    flags.append(f"--data={make_image_folder({'red': 4})}")
  assert_fails(tmp_path, flags, 2, *expected)


@pytest.mark.parametrize("env, flags, code, expected", [
    ({"TF_CONFIG": "{not json"}, [], 2, ["TF_CONFIG"]),
    ({"TF_CONFIG": '{"cluster": {"worker": ["127.0.0.1:2222"]}, "task": {"type": "worker", "index": 3}}'}, [], 2,
     ["TF_CONFIG", "3"]),
    ({"TF_CONFIG": '{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}'}, [], 2,
     ["parameter servers"]),
    ({"JOB_COMPLETION_INDEX": "5"}, ["--indexed_job_hosts=train-{index}.svc:2222", "--num_workers=2"], 2,
     ["JOB_COMPLETION_INDEX"]),
    ({"JOB_COMPLETION_INDEX": "1"}, ["--model=dense", "--epochs=1"], 2,
     ["JOB_COMPLETION_INDEX=1", "--indexed_job_hosts", "--num_workers"]),
    ({}, ["--strategy=mirrored_everywhere"], 1, ["--strategy"]),  # an enum flag: absl's parsing
])
def test_bad_cluster_environment_fails_fast(tmp_path, env, flags, code, expected):
  """Before TensorFlow starts any server: one line, a non-zero exit, within seconds (no hang)."""
  import time
  started = time.time()
  assert_fails(tmp_path, flags, code, *expected, env=env)
  assert time.time() - started < 30


def test_vertex_ai_variables_decide_where_a_job_writes(tmp_path):
  out = tmp_path / "vertex"
  env = {"AIP_MODEL_DIR": f"{out}/model/", "AIP_CHECKPOINT_DIR": f"{out}/checkpoints/",
         "AIP_TENSORBOARD_LOG_DIR": f"{out}/tensorboard/"}
  code, stdout, stderr = run_cli("--model=dense", "--epochs=1", cwd=tmp_path, env=env)
  assert code == 0, stderr[-3000:]
  assert f"report: {out}/report.json" in stdout  # the job folder: Vertex AI's base output directory
  assert sorted(os.listdir(out / "model" / "1")) == ["assets", "assets.extra", "fingerprint.pb", "model.keras",
                                                     "saved_model.pb", "trainer_export.json", "variables"]
  assert os.listdir(out / "checkpoints") == ["ckpt-200"]
  # Epoch losses, intervals, epochs, and the run's own events (HParams, test metrics, plots): trainer.summaries.
  folders = sorted(p.name for p in (out / "tensorboard").iterdir() if p.is_dir())
  assert folders == ["epochs", "steps", "train", "validation"]
  assert [p.name.split(".")[:3] for p in (out / "tensorboard").iterdir() if p.is_file()] == [["events", "out",
                                                                                               "tfevents"]]
  assert not os.path.exists(tmp_path / "runs")


@pytest.mark.parametrize("flags, advice", [
    ([], "run the same command with --job_dir={job_dir} to resume"),
    (["--job_dir=jobs/kept", "--restart"], "run the same command without --restart to resume"),
])
def test_sigterm_says_exactly_what_resumes_the_job(tmp_path, flags, advice):
  """Without --job_dir every run makes a new folder, and --restart wipes the checkpoints: "run the
  same command again" would start from scratch; the line names what to run instead."""
  process = forked.popen([sys.executable, "-m", "trainer.task", "--model=dense", *flags], cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    wait_for_line(process, r"checkpoint \S+ saved|epoch 1/")
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 143, rest[-3000:]
  (job_dir,) = [flag.split("=", 1)[1] for flag in flags if flag.startswith("--job_dir=")] or [
      os.path.join("runs", name) for name in os.listdir(tmp_path / "runs")]
  assert os.listdir(tmp_path / job_dir / "checkpoints")
  last = rest.strip().splitlines()[-1]
  assert last.startswith("trainer: stopped by SIGTERM at step ") and "Traceback" not in rest, rest[-3000:]
  assert last.endswith(f"; {advice.format(job_dir=job_dir)} (exit code 143)"), last


def test_a_job_dir_in_a_bucket_that_does_not_exist_exits_170(tmp_path, gcs_emulator):
  """No such bucket (on Cloud Storage: also no permission) is storage the job cannot use: one line
  and 170, which clusters retry a bounded number of times, never a traceback."""
  missing = f"gs://no-such-bucket-{os.getpid()}"
  assert_fails(tmp_path, ["--model=dense", "--epochs=1", f"--job_dir={missing}/job"], 170,
               f"{missing}/job/checkpoints: bucket not found")


def test_tensorboard_logs_reach_gcs_during_training(tmp_path, table_csv, gcs_bucket):
  """Killed while it publishes its second checkpoint, a job has already copied the first epoch's
  TensorBoard logs to gs://: they are readable while training goes on, not only at the end."""
  from processes import kill_when, stalled
  from trainer import storage
  import tensorflow as tf
  job_dir = f"{gcs_bucket}/job"
  # Synchronous saves: the stall holds training at the second epoch's save (a background save would
  # let the second epoch's logs be synced too, or not, as the threads go).
  kill_when(stalled("trainer.task", "--model=dense", f"--data={table_csv(rows=200)}", "--target_column=y",
                    "--epochs=3", f"--job_dir={job_dir}", "--async_checkpoints=false",
                    upload=r"/checkpoints/ckpt-\d+/state\.json$", skip=1))
  assert not storage.exists(f"{job_dir}/report.json")  # stopped in training
  logs = storage.join(job_dir, "logs")
  for split in ("train", "validation"):
    (name,) = [f for f in storage.list_files(logs) if f.startswith(f"{split}/events.out.tfevents")]
    (tmp_path / split).write_bytes(storage.read_bytes(storage.join(logs, name)))
    steps = [(e.step, v.tag) for e in tf.compat.v1.train.summary_iterator(str(tmp_path / split))
             for v in e.summary.value]
    assert steps == [(1, "epoch_loss")], (split, steps)


def tgkill(pid, tid, signum):
  """Sends signum to one thread of a process (Linux tgkill(2); Python has no call for another process's thread)."""
  libc = ctypes.CDLL(None, use_errno=True)
  assert libc.syscall(234, pid, tid, signum) == 0, os.strerror(ctypes.get_errno())  # 234: SYS_tgkill on x86-64


def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path):
  """The first Ctrl-C asks for a checkpoint; a second one, while the job waits for the background
  save under way (stalled in its thread), stops at once: one line, exit 130, no traceback, and the
  unfinished checkpoint is no checkpoint (the next run starts from the last complete one, here
  none). The second goes to the saving thread, as the kernel may deliver a process's signal to any
  of its threads: the main thread, blocked in its wait for that save, must still run the handler."""
  job_dir = tmp_path / "job"
  job = Job(["--model=dense", "--epochs=5", f"--job_dir={job_dir}"],
            command=stalled("trainer.task", rename=r"/ckpt-\d+$"))
  saver = int(re.search(r"\(id (\d+)\)$", job.wait_for(r"^STALLED .* in thread checkpoint saves")).group(1))
  job.signal(signal.SIGINT)
  job.wait_for("SIGINT received: saving a checkpoint")  # handled: the next SIGINT is a second one
  # The main thread is in its wait for the stalled save. It may have got there before the first
  # SIGINT (a loaded machine runs the next epoch first, and its save waits for this one), so the
  # line may already be read.
  waiting = r"waiting for the background save of ckpt-\d+ to finish"
  if not any(re.search(waiting, line) for line in job.lines):
    job.wait_for(waiting)
  tgkill(job.process.pid, saver, signal.SIGINT)
  assert job.finish(timeout=60) == 130
  assert "Traceback" not in job.stderr, job.stderr[-3000:]
  assert job.last_line() == ("trainer: stopped at once by a second Ctrl-C, without a checkpoint of this step; the "
                             "last complete checkpoint, if any, is kept (exit code 130)")
  assert not [name for name in os.listdir(job_dir / "checkpoints") if re.fullmatch(r"ckpt-\d+", name)]
