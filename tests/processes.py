"""Watching a real process a test will kill at a chosen moment."""

import os
import re
import signal
import subprocess
import sys
import time


def wait_for_line(process, pattern, timeout=180):
  """The first stderr line of process matching pattern (it must appear within timeout seconds)."""
  deadline = time.monotonic() + timeout
  seen = []
  for line in process.stderr:
    seen.append(line)
    if re.search(pattern, line):
      return line
    assert time.monotonic() < deadline, "".join(seen)
  raise AssertionError(f"exited {process.wait()} before {pattern!r}:\n" + "".join(seen))


def kill_when(argv, pattern="^STALLED", timeout=180):
  """Runs argv until a line of its stderr matches pattern, then SIGKILLs it (nothing it does after
  runs: no cleanup, no finally); returns that line."""
  process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
  try:
    return wait_for_line(process, pattern, timeout)
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()


STALLED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stalled.py")


def stalled(target, *args, **stalls):
  """The command that runs target (a module, or module:function) with args, stalled at the writes
  that `stalls` (rename=, upload=, call=, skip=) name: see tests/stalled.py."""
  return [sys.executable, STALLED, *(f"--{name}={value}" for name, value in stalls.items()), "--", target, *args]
