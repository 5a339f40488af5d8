"""Watching a real process a test will kill at a chosen moment."""

import re
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
