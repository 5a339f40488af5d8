"""Watching a real process a test will signal or kill at a chosen moment.

Every read of a child's stderr here has a deadline that holds even when the child prints nothing
(a hung child fails the test instead of hanging it), and reads no further than the line it waits
for, so the caller may read the rest of process.stderr itself.
"""

import concurrent.futures
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time

import forked


def _read_line(stream, deadline):
  """The next line of stream as readline gives it ("" at the end), or None at the deadline. Reads byte by
  byte from the file descriptor: nothing past the line is taken from the pipe."""
  fd, data = stream.fileno(), bytearray()
  while True:
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
      return None
    byte = os.read(fd, 1)
    data += byte
    if byte in (b"", b"\n"):
      return data.decode(errors="replace")


def _stop(process):
  if process.poll() is None:
    process.kill()
    process.wait()


def wait_for_line(process, pattern, timeout=180, seen=None):
  """The first stderr line of process (a Popen with stderr=PIPE) matching pattern; the lines read, the
  matching one included, are appended to seen. Fails, after killing the process, if it ends or timeout
  seconds pass first."""
  deadline = time.monotonic() + timeout
  seen = [] if seen is None else seen
  while True:
    line = _read_line(process.stderr, deadline)
    if line is None:
      _stop(process)
      raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n" + "\n".join(seen)[-3000:])
    if line == "":
      raise AssertionError(f"exited {process.wait(60)} before {pattern!r}:\n" + "\n".join(seen)[-3000:])
    seen.append(line.rstrip("\n"))
    if re.search(pattern, seen[-1]):
      return seen[-1]


class Job:
  """A command (by default `python -m trainer.task`; `python` commands are forked, see forked.py) with its
  stderr watched line by line, so a test can wait for a line before it sends a signal; stdout is discarded.
  Whatever a test leaves running (it failed half way) is killed after it (stop_all, from conftest.py)."""

  started = []

  def __init__(self, flags, env=None, command=(sys.executable, "-m", "trainer.task")):
    self.process = forked.popen([*command, *flags], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, **(env or {})})
    self.lines = []
    Job.started.append(self)

  @classmethod
  def stop_all(cls):
    while cls.started:
      _stop(cls.started.pop().process)

  def wait_for(self, pattern, timeout=180):
    """The first stderr line matching pattern (see wait_for_line)."""
    return wait_for_line(self.process, pattern, timeout, self.lines)

  def signal(self, signum):
    self.process.send_signal(signum)

  def finish(self, timeout=300):
    """The exit code, once the process has ended and its stderr is read to the end (killed and failed
    after timeout seconds)."""
    deadline = time.monotonic() + timeout
    while (line := _read_line(self.process.stderr, deadline)) != "":
      if line is None:
        _stop(self.process)
        raise AssertionError(f"still running after {timeout} s:\n" + self.stderr[-3000:])
      self.lines.append(line.rstrip("\n"))
    self.process.stderr.close()
    return self.process.wait(max(1.0, deadline - time.monotonic()))

  @property
  def stderr(self):
    return "\n".join(self.lines)

  def last_line(self):
    return self.lines[-1] if self.lines else ""

  def last_trainer_line(self):
    """The last line the trainer itself wrote ("trainer: ..."). A worker of a cluster whose chief
    exited first may log TensorFlow's heartbeat error after it ("Failed to send RPC to
    coordination service"), while it exits."""
    return next((line for line in reversed(self.lines) if line.startswith("trainer:")), "")


def run(flags, **kwargs):
  """(exit code, Job) of a command run to its end."""
  job = Job(flags, **kwargs)
  return job.finish(), job


def free_ports(count):
  """Ports free on 127.0.0.1 now (the way scripts/local_cluster.py finds them)."""
  sockets = [socket.socket() for _ in range(count)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


def cluster_env(ports, index, env=None):
  """The environment of worker `index` of a cluster of workers on 127.0.0.1 at ports."""
  cluster = {"worker": [f"127.0.0.1:{port}" for port in ports]}
  return {**os.environ, **(env or {}), "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker",
                                                                                             "index": index}})}


def run_cluster(argv, workers, env=None, timeout=300):
  """Runs the `python ...` command argv as each of `workers` workers of one cluster on 127.0.0.1 (TF_CONFIG, as
  scripts/local_cluster.py sets it; its own tests run it), forked; returns their CompletedProcess, by
  index, once all have ended. All are killed when one is still running after timeout seconds."""
  ports = free_ports(workers)
  started = [forked.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=cluster_env(ports, index, env)) for index in range(workers)]
  try:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # read all at once: a full pipe would block one
      outputs = list(pool.map(lambda process: process.communicate(timeout), started))
  finally:
    for process in started:
      _stop(process)
  return [subprocess.CompletedProcess(argv, p.returncode, out, err) for p, (out, err) in zip(started, outputs)]


def kill_when(argv, pattern="^STALLED", timeout=180):
  """Runs argv until a line of its stderr matches pattern, then SIGKILLs it (nothing it does after
  runs: no cleanup, no finally); returns that line."""
  process = forked.popen(argv, stderr=subprocess.PIPE)
  try:
    return wait_for_line(process, pattern, timeout)
  finally:
    _stop(process)


STALLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stalled.py")


def stalled(target, *args, **stalls):
  """The command that runs target (a module, or module:function) with args, stalled at the writes
  that `stalls` (rename=, upload=, call=, skip=, until_signal=) name: see tests/stalled.py. A list
  value repeats its option; True gives it without a value."""
  options = [f"--{name}" if value is True else f"--{name}={value}" for name, values in stalls.items()
             for value in (values if isinstance(values, (list, tuple)) else [values])]
  return [sys.executable, STALLED, *options, "--", target, *args]
