"""scripts/local_cluster.py, the real script in a subprocess, with a stand-in for trainer.task.

The stand-in (written into tmp_path, found through PYTHONPATH) starts in milliseconds where the trainer
takes seconds to import TensorFlow, so ports, TF_CONFIG, output, exit codes and signals are tested
here; a real two-process training run is a separate, slower test.
"""

import importlib.util
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import forked
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "local_cluster.py"

# Prints one JSON line (pid, argv, TF_CONFIG, CUDA_VISIBLE_DEVICES) on stdout and one line on stderr,
# then follows its flags:
#   --exit_<type>_<index>=CODE  that task exits with CODE (a negative CODE: kills itself with that signal),
#                               once every task has said it is ready; the other tasks sleep --sleep seconds
#   --ignore_term=<type>_<index> that task ignores SIGTERM
#   --lines=N                   every task first prints N long numbered lines
FAKE_TASK = '''
import json, os, signal, sys, time

config = json.loads(os.environ["TF_CONFIG"])
me = "{type}_{index}".format(**config["task"])
flags = dict(arg[2:].split("=", 1) for arg in sys.argv[1:])
if flags.get("ignore_term") == me:
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
for i in range(int(flags.get("lines", 0))):
  print(me, i, "x" * 400)
print(json.dumps({"pid": os.getpid(), "argv": sys.argv[1:], "tf_config": config,
                  "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}))
print("stderr of", me, file=sys.stderr)
ready_dir = os.environ["FAKE_READY_DIR"]
open(os.path.join(ready_dir, me), "w").close()
code = flags.get("exit_" + me)
if code is None:
  time.sleep(float(flags.get("sleep", 0)))
  sys.exit(0)
# Exit only once every task has started, so the launcher has live tasks to stop.
total = sum(len(addresses) for addresses in config["cluster"].values())
while len(os.listdir(ready_dir)) < total:
  time.sleep(0.01)
if int(code) < 0:
  os.kill(os.getpid(), -int(code))
sys.exit(int(code))
'''


@pytest.fixture
def cluster_env(tmp_path):
  """The environment for the launcher: the stand-in module on PYTHONPATH, a folder for its ready files."""
  (tmp_path / "fake_task.py").write_text(FAKE_TASK)
  (tmp_path / "ready").mkdir()
  path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
  return dict(os.environ, PYTHONPATH=path, FAKE_READY_DIR=str(tmp_path / "ready"))


def launch(env, *args):
  return subprocess.Popen([sys.executable, str(SCRIPT), "--module=fake_task", *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(env, *args, timeout=120):
  """(exit code, stdout lines, stderr lines, seconds) of one launcher run."""
  start = time.monotonic()
  launcher = launch(env, *args)
  stdout, stderr = launcher.communicate(timeout=timeout)
  return launcher.returncode, stdout.splitlines(), stderr.splitlines(), time.monotonic() - start


def reports(stdout_lines):
  """{task label: the stand-in's JSON report}, from the prefixed stdout lines."""
  found = {}
  for line in stdout_lines:
    match = re.fullmatch(r"\[(chief|worker \d+)\] (\{.*\})", line)
    if match:
      found[match.group(1)] = json.loads(match.group(2))
  return found


def is_running(pid):
  # A zombie has exited; only its parent's wait is missing.
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def assert_gone(pids):
  deadline = time.monotonic() + 30
  while any(map(is_running, pids)) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not [pid for pid in pids if is_running(pid)]


@pytest.mark.parametrize("workers, chief, labels", [
    (3, False, ["worker 0", "worker 1", "worker 2"]),
    (3, True, ["chief", "worker 0", "worker 1"]),
    (1, True, ["chief"]),
])
def test_each_task_gets_its_place_and_a_port_of_its_own(cluster_env, workers, chief, labels):
  flags = ["--model=dense", "--epochs=2", "--job_dir=runs/x y"]
  code, stdout, stderr, _ = run(cluster_env, f"--workers={workers}", *(["--chief"] if chief else []), "--", *flags)
  assert code == 0, stderr
  found = reports(stdout)
  assert sorted(found) == labels
  cluster = found[labels[0]]["tf_config"]["cluster"]
  expected_types = {"chief": 1, "worker": workers - 1} if chief else {"worker": workers}
  assert {name: len(addresses) for name, addresses in cluster.items()} == {
      name: count for name, count in expected_types.items() if count}
  addresses = [address for name in cluster for address in cluster[name]]
  assert len(set(addresses)) == workers
  assert all(re.fullmatch(r"127\.0\.0\.1:\d+", address) for address in addresses)
  for task_label, report in found.items():
    assert report["tf_config"]["cluster"] == cluster  # one cluster, the same for every task
    task_type, _, index = task_label.partition(" ")
    assert report["tf_config"]["task"] == {"type": task_type, "index": int(index or 0)}
    assert report["argv"] == flags  # after --, unchanged
  assert stderr[-1] == f"local_cluster: all {workers} tasks exited 0"


@pytest.mark.parametrize("host, workers, expected, says", [
    ("3,5,6,7", 2, {"chief": "3,5", "worker 0": "6,7"}, "CUDA_VISIBLE_DEVICES chief 3,5, worker 0 6,7"),
    ("0,1,2", 2, {"chief": "0", "worker 0": "1"}, "CUDA_VISIBLE_DEVICES chief 0, worker 0 1"),
    ("0,1", 3, {"chief": "", "worker 0": "", "worker 1": ""}, "2 GPU(s) for 3 tasks, which would share them"),
    ("", 2, {"chief": "", "worker 0": ""}, "no GPU found"),
    (None, 2, {"chief": "", "worker 0": ""}, "no GPU found"),  # no nvidia-smi on PATH: no driver
])
def test_each_task_gets_gpus_of_its_own_or_none(cluster_env, host, workers, expected, says):
  # Every task would otherwise take every GPU's memory, and the second run out of it.
  env = {name: value for name, value in cluster_env.items() if name != "CUDA_VISIBLE_DEVICES"}
  env.update({"CUDA_VISIBLE_DEVICES": host} if host is not None else {"PATH": os.path.dirname(sys.executable)})
  code, stdout, stderr, _ = run(env, f"--workers={workers}", "--chief")
  assert code == 0, stderr
  assert {task: report["cuda_visible_devices"] for task, report in reports(stdout).items()} == expected
  lines = [line for line in stderr if says in line]
  assert len(lines) == 1 and lines[0].startswith("local_cluster: "), stderr


def test_every_line_is_prefixed_and_whole(cluster_env):
  code, stdout, stderr, _ = run(cluster_env, "--workers=2", "--chief", "--", "--lines=300")
  assert code == 0, stderr
  owners = {"chief": "chief_0", "worker 0": "worker_0"}
  counts = dict.fromkeys(owners, 0)
  for line in stdout:
    match = re.fullmatch(r"\[(chief|worker 0)\] (\w+) (\d+) x{400}", line)
    if match:
      assert owners[match.group(1)] == match.group(2), line
      assert int(match.group(3)) == counts[match.group(1)], line  # in order, none lost
      counts[match.group(1)] += 1
    else:
      assert re.fullmatch(r"\[(chief|worker 0)\] \{.*\}", line), line
  assert counts == {"chief": 300, "worker 0": 300}
  started = [re.sub(r"\d+$", "N", line) for line in stderr if line.startswith("local_cluster: started")]
  assert started == ["local_cluster: started chief as pid N", "local_cluster: started worker 0 as pid N"]
  assert sorted(line for line in stderr[:-1] if not line.startswith("local_cluster:")) == [
      "[chief] stderr of chief_0", "[worker 0] stderr of worker_0"]



@pytest.mark.parametrize("exit_flag, code, words", [
    ("--exit_worker_1=3", 3, "worker 1 exited with code 3"),
    ("--exit_chief_0=-9", 137, "chief was killed by SIGKILL (exit code 137)"),
])
def test_a_failing_task_stops_the_others_and_its_code_is_returned(cluster_env, exit_flag, code, words):
  chief = ["--chief"] if "chief" in exit_flag else []
  # The others would sleep for longer than run() waits: they must be stopped for the launcher to return.
  returncode, stdout, stderr, _ = run(cluster_env, "--workers=3", *chief, "--", exit_flag, "--sleep=600")
  assert returncode == code, stderr
  assert stderr[-1].startswith(f"local_cluster: {words}; stopped "), stderr[-1]
  found = reports(stdout)
  assert len(found) == 3
  assert_gone([report["pid"] for report in found.values()])


def test_all_zero_but_one_task_exits_late(cluster_env):
  # A task that finishes first (with 0) must not make the launcher stop the others.
  code, stdout, stderr, seconds = run(cluster_env, "--workers=2", "--", "--exit_worker_0=0", "--sleep=1")
  assert code == 0, stderr
  assert seconds >= 1
  assert stderr[-1] == "local_cluster: all 2 tasks exited 0"


def start_and_wait_until_ready(env, count, *args):
  """A running launcher whose `count` tasks have all printed their report: (launcher, lines so far, pids)."""
  launcher = launch(env, *args)
  lines = queue.Queue()
  threading.Thread(target=lambda: [lines.put(line) for line in launcher.stdout], daemon=True).start()
  seen, deadline = [], time.monotonic() + 120
  # Read while the tasks still sleep: lines must arrive as they are written, not at exit.
  while len(reports(seen)) < count:
    seen.append(lines.get(timeout=max(0.01, deadline - time.monotonic())).rstrip("\n"))
  return launcher, [report["pid"] for report in reports(seen).values()]


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_every_task(cluster_env, signum, code):
  # A grace period longer than the wait below: the launcher returns in time only if the tasks exit
  # on the first SIGTERM (the last line would name a SIGKILL otherwise).
  launcher, pids = start_and_wait_until_ready(cluster_env, 3, "--workers=3", "--grace_seconds=600", "--",
                                              "--sleep=600")
  assert all(map(is_running, pids))
  launcher.send_signal(signum)
  assert launcher.wait(timeout=120) == code
  assert launcher.stderr.read().splitlines()[-1] == (
      f"local_cluster: {signal.Signals(signum).name}: stopped worker 0, worker 1, worker 2")
  assert_gone(pids)


@pytest.mark.slow
def test_a_task_that_ignores_sigterm_is_killed_after_the_grace_period(cluster_env):
  launcher, pids = start_and_wait_until_ready(
      cluster_env, 2, "--workers=2", "--grace_seconds=1", "--", "--sleep=600", "--ignore_term=worker_1")
  start = time.monotonic()
  launcher.send_signal(signal.SIGINT)
  assert launcher.wait(timeout=120) == 130
  assert time.monotonic() - start >= 1  # the grace period was given (the last line says what ended it)
  assert launcher.stderr.read().splitlines()[-1] == (
      "local_cluster: SIGINT: stopped worker 0, worker 1 (worker 1: SIGKILL after 1 s)")
  assert_gone(pids)


@pytest.mark.parametrize("args, words", [
    (["--workers=0"], "--workers must be at least 1"),
    (["--workers=2", "--model=dense"], "--model=dense (trainer flags go after --)"),
    (["--", "--model=dense"], "--workers"),
    (["--workers=2", "--grace_seconds=-1"], "--grace_seconds must be at least 0"),
])
def test_usage_errors_are_one_line(cluster_env, args, words):
  code, stdout, stderr, _ = run(cluster_env, *args)
  assert code == 2
  assert stdout == []
  assert len(stderr) == 1 and stderr[0].startswith("local_cluster: error: ") and words in stderr[0], stderr


def readme_command(prefix):
  """The one README.md line that starts with prefix, as argv: the test runs what the README says."""
  readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
  (line,) = [line for line in readme.splitlines() if line.startswith(prefix)]
  return shlex.split(line.split("#", 1)[0])


def launcher_here(monkeypatch):
  """scripts/local_cluster.py as a module of this process, its tasks forked from the suite's server
  (tests/forked.py: each a real process, as `python -m trainer.task` starts it, without importing
  TensorFlow again: 9 CPU-seconds a task). Only its preexec_fn, which ties a task's life to the
  launcher's, is left out: the server, not this process, is the tasks' parent."""
  spec = importlib.util.spec_from_file_location("local_cluster", SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  popen = lambda argv, preexec_fn=None, **kwargs: forked.popen(argv, **kwargs)  # noqa: ARG005
  monkeypatch.setattr(script, "subprocess", types.SimpleNamespace(
      Popen=popen, run=subprocess.run, PIPE=subprocess.PIPE, DEVNULL=subprocess.DEVNULL,
      TimeoutExpired=subprocess.TimeoutExpired))
  return script


@pytest.mark.slow  # three trainer processes
def test_the_readmes_rehearsal_with_a_chief_trains(tmp_path, monkeypatch, capfd):
  """The README's three-task rehearsal, exactly, in a fresh folder: its global batch must split
  evenly across the three replicas, or every task exits 2."""
  argv = readme_command("python scripts/local_cluster.py --workers=3 --chief ")
  assert argv[:2] == ["python", "scripts/local_cluster.py"]
  script = launcher_here(monkeypatch)
  monkeypatch.chdir(tmp_path)
  handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
  try:
    code = script.main(argv[2:])
  finally:  # main() installs its own
    for signum, handler in handlers.items():
      signal.signal(signum, handler)
  _, stderr = capfd.readouterr()
  assert code == 0, stderr[-3000:]
  assert stderr.splitlines()[-1] == "local_cluster: all 3 tasks exited 0"
  (job_dir,) = [tmp_path / arg.split("=", 1)[1] for arg in argv if arg.startswith("--job_dir=")]
  report = json.loads((job_dir / "report.json").read_text())
  assert (report["num_workers"], report["num_replicas"]) == (3, 3)
  assert os.listdir(job_dir / "export") == ["1"]
