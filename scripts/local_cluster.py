"""Rehearses a multi-worker cluster job on one machine: N trainer processes, each with its own TF_CONFIG.

    python scripts/local_cluster.py --workers=2 -- --model=dense --epochs=2 --job_dir=runs/rehearsal
    python scripts/local_cluster.py --workers=3 --chief -- --model=lstm --batch_size=48   # the shape of Vertex AI
                                                                    # and a TFJob with a chief; 3 replicas split 48

Everything after `--` goes, unchanged, to every `python -m trainer.task`; without `--` the trainer
runs with its defaults. Each process gets a free 127.0.0.1 port and the TF_CONFIG a cluster would
give it: `{"cluster": {"worker": [...]}, "task": {"type": "worker", "index": i}}`; with --chief, task
0 is `{"type": "chief", "index": 0}` in a "chief" list and the others are workers 0..N-2. Every line a
task writes is printed as it comes, prefixed with the task ("[worker 1] ...", "[chief] ..."): its
stdout to our stdout, its stderr to our stderr.

GPUs: TensorFlow takes all the memory of every GPU it sees, so two tasks that see one GPU run out
of memory. Each task gets a CUDA_VISIBLE_DEVICES of its own: the host's GPUs (our own
CUDA_VISIBLE_DEVICES, else those nvidia-smi lists) split evenly, in order; with fewer GPUs than
tasks, or none, every task sees none and trains on the CPU. One line says which.

Exit code: 0 when every task exits 0. Otherwise the first non-zero code (128+n for a task killed by
signal n): the other tasks get SIGTERM, SIGKILL after --grace_seconds, and a last line names the
task that failed. Ctrl-C or SIGTERM stops every task the same way and exits 130 or 143; a second
Ctrl-C kills them at once. Usage errors are one line and exit 2.
"""

import argparse
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


class Parser(argparse.ArgumentParser):

  def error(self, message):
    # argparse prints its whole usage block first; among N tasks' output one line is easier to read.
    sys.stderr.write(f"local_cluster: error: {message}\n")
    sys.exit(2)


def parse_args(argv):
  """(our options, the trainer's flags) from the command line, split at the first `--`."""
  # Split by hand: argparse's own handling of `--` differs between Python versions.
  ours, trainer_flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
  parser = Parser(description=__doc__.splitlines()[0], usage="%(prog)s --workers=N [--chief] -- <trainer flags>")
  parser.add_argument("--workers", type=int, required=True, help="Processes to start, the chief included.")
  parser.add_argument("--chief", action="store_true", help="Task 0 is the chief, the others workers 0..N-2.")
  parser.add_argument("--grace_seconds", type=float, default=10.0,
                      help="After SIGTERM, how long tasks get to exit before SIGKILL.")
  parser.add_argument("--module", default="trainer.task", help=argparse.SUPPRESS)  # tests run a stand-in
  args, unknown = parser.parse_known_args(ours)
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (trainer flags go after --)")
  if args.workers < 1:
    parser.error(f"--workers must be at least 1 (got {args.workers})")
  if args.grace_seconds < 0:
    parser.error(f"--grace_seconds must be at least 0 (got {args.grace_seconds:g})")
  return args, trainer_flags


def free_ports(count):
  """`count` distinct ports on HOST that nothing is bound to now."""
  # Every socket stays bound until the last one is, so the kernel cannot hand out a port twice.
  # Another program can still take a port before its task binds it; that task then fails to
  # start its server and the launcher reports it like any other failure.
  sockets = []
  try:
    for _ in range(count):
      sockets.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
      sockets[-1].bind((HOST, 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def tasks(workers, chief):
  """(type, index) of each process, in start order."""
  if chief:
    return [("chief", 0)] + [("worker", i) for i in range(workers - 1)]
  return [("worker", i) for i in range(workers)]


def tf_configs(task_list, ports):
  """The TF_CONFIG of each task: one shared cluster, each task its own place in it."""
  cluster = {}
  for (task_type, _), port in zip(task_list, ports):
    # A chief-only cluster has no "worker" key at all: an empty list is not a valid TF_CONFIG.
    cluster.setdefault(task_type, []).append(f"{HOST}:{port}")
  return [{"cluster": cluster, "task": {"type": task_type, "index": index}} for task_type, index in task_list]


def host_gpus(environ):
  """The GPUs the tasks may use: CUDA_VISIBLE_DEVICES when set (empty: none), else nvidia-smi's list."""
  if "CUDA_VISIBLE_DEVICES" in environ:
    return [gpu.strip() for gpu in environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
  try:
    listed = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                            text=True, timeout=60, env=environ)
  except (OSError, subprocess.TimeoutExpired):
    return []  # no driver: no GPU
  return listed.stdout.split() if listed.returncode == 0 else []


def split_gpus(gpus, task_list):
  """(each task's CUDA_VISIBLE_DEVICES, the line that says so): an equal share of `gpus` each, or none."""
  share = len(gpus) // len(task_list)
  if not share:
    why = f"{len(gpus)} GPU(s) for {len(task_list)} tasks, which would share them" if gpus else "no GPU found"
    return [""] * len(task_list), f"{why}: every task trains on the CPU (CUDA_VISIBLE_DEVICES empty)"
  visible = [",".join(gpus[i * share:(i + 1) * share]) for i in range(len(task_list))]
  return visible, "CUDA_VISIBLE_DEVICES " + ", ".join(f"{label(task)} {v}" for task, v in zip(task_list, visible))


def label(task):
  task_type, index = task
  return "chief" if task_type == "chief" else f"{task_type} {index}"


def die_with_launcher():
  """A preexec_fn: the kernel kills the task if the launcher dies without cleaning up (e.g. SIGKILL)."""
  if not sys.platform.startswith("linux"):
    return None
  prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the child after fork
  launcher = os.getpid()

  def in_child():
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != launcher:  # the launcher died before prctl took effect
      os._exit(1)
  return in_child


def copy_lines(stream, prefix, out, lock):
  """Copies a task's stream to `out` line by line, each line prefixed and written whole."""
  for line in iter(stream.readline, b""):
    if not line.endswith(b"\n"):
      line += b"\n"  # the last line of a task that died mid-line
    with lock:  # one lock for both outputs: on a terminal they are the same screen
      try:
        out.write(prefix + line)
        out.flush()
      except (OSError, ValueError):
        pass  # our output is gone (e.g. piped into head): keep reading, or the task blocks on a full pipe
  stream.close()


def exit_code(returncode):
  """A shell's exit code for a Popen returncode: -n (killed by signal n) is 128+n."""
  return 128 - returncode if returncode < 0 else returncode


def signal_name(signum):
  try:
    return signal.Signals(signum).name
  except ValueError:  # real-time signals have no name
    return f"signal {signum}"


def describe(task, returncode):
  if returncode < 0:
    return f"{label(task)} was killed by {signal_name(-returncode)} (exit code {exit_code(returncode)})"
  return f"{label(task)} exited with code {returncode}"


def signal_group(process, signum):
  # The task leads its own process group: anything it started goes too.
  try:
    os.killpg(process.pid, signum)
  except (ProcessLookupError, PermissionError):
    pass  # already gone


def first_failure(processes, signals):
  """Waits until every task exits 0 (None), a task fails (its index) or a signal arrives (None)."""
  # Polling, not a blocking wait: a signal must be noticed, and the first failure is usually the
  # cause; the tasks that fail after it are typically peers losing their connection to it.
  while not signals:
    codes = [p.poll() for p in processes]
    for i, code in enumerate(codes):
      if code:
        return i
    if all(code == 0 for code in codes):
      return None
    time.sleep(0.05)
  return None


def stop(processes, grace_seconds, signals):
  """Stops every task still running: SIGTERM, then SIGKILL after the grace period or a second signal.

  Returns (the indices of the tasks that were running, those of them that needed SIGKILL).
  A signal that arrives during the grace period (a second Ctrl-C) cuts it short.
  """
  running = [i for i, p in enumerate(processes) if p.poll() is None]
  for i in running:
    signal_group(processes[i], signal.SIGTERM)
  deadline = time.monotonic() + grace_seconds
  signals_before = len(signals)
  while (any(processes[i].poll() is None for i in running) and time.monotonic() < deadline
         and len(signals) == signals_before):
    time.sleep(0.05)
  killed = [i for i in running if processes[i].poll() is None]
  for p in processes:
    # Every group, not just the live leaders: a task that exited may have left children behind.
    signal_group(p, signal.SIGKILL)
  for p in processes:
    p.wait()
  return running, killed


def main(argv=None):
  args, trainer_flags = parse_args(sys.argv[1:] if argv is None else argv)
  signals = []  # signals received, in order; the handler only records them, the main loop acts

  def on_signal(signum, frame):
    signals.append(signum)
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, on_signal)

  task_list = tasks(args.workers, args.chief)
  configs = tf_configs(task_list, free_ports(len(task_list)))
  visible, says = split_gpus(host_gpus(os.environ), task_list)
  print(f"local_cluster: {says}", file=sys.stderr, flush=True)
  processes, readers, lock = [], [], threading.Lock()
  preexec = die_with_launcher()
  failed = None
  try:
    for config, gpus in zip(configs, visible):
      # Unbuffered: a task's lines must reach us as it writes them, not when its buffer fills.
      env = dict(os.environ, TF_CONFIG=json.dumps(config), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES=gpus)
      # Its own session: Ctrl-C at a terminal reaches only the launcher, which then stops the tasks
      # in order instead of each one dying at a different point.
      processes.append(subprocess.Popen(
          [sys.executable, "-m", args.module, *trainer_flags], env=env, stdin=subprocess.DEVNULL,
          stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec))
    for task, p in zip(task_list, processes):
      print(f"local_cluster: started {label(task)} as pid {p.pid}", file=sys.stderr, flush=True)
    # Reader threads only once every task is started: forking with threads running can deadlock the child.
    for task, p in zip(task_list, processes):
      prefix = f"[{label(task)}] ".encode()
      for stream, out in ((p.stdout, sys.stdout.buffer), (p.stderr, sys.stderr.buffer)):
        readers.append(threading.Thread(target=copy_lines, args=(stream, prefix, out, lock), daemon=True))
        readers[-1].start()
    failed = first_failure(processes, signals)
  finally:
    running, killed = stop(processes, args.grace_seconds, signals)
    for reader in readers:
      reader.join(timeout=5)  # a grandchild that left the group may hold a pipe open: don't wait forever

  stopped = ", ".join(label(task_list[i]) for i in running if i != failed)
  if killed:
    stopped += f" ({', '.join(label(task_list[i]) for i in killed)}: SIGKILL after {args.grace_seconds:g} s)"
  if failed is not None:  # a Ctrl-C during its grace period does not hide the failure
    code = exit_code(processes[failed].returncode)
    message = describe(task_list[failed], processes[failed].returncode) + (f"; stopped {stopped}" if stopped else "")
  elif signals:
    code = 128 + signals[0]
    message = f"{signal_name(signals[0])}: stopped {stopped or 'no running tasks'}"
  else:
    code, message = 0, f"all {len(processes)} tasks exited 0"
  print(f"local_cluster: {message}", file=sys.stderr, flush=True)
  return code


if __name__ == "__main__":
  sys.exit(main())
