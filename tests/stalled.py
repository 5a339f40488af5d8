"""A command stalled at a chosen write, for tests that kill or signal it there (processes.kill_when):

    python tests/stalled.py [--rename=REGEX] [--upload=REGEX] [--call=MODULE.FUNCTION ...] [--skip=N] \\
        [--until_signal] -- TARGET ARGS...

A local os.rename to a path matching --rename, a gs:// upload (google-cloud-storage's
Blob.upload_from_filename) of an object name matching --upload, or a call of a --call (the option
may be repeated) prints "STALLED <what>" on stderr and sleeps for ten minutes, once the first --skip
of them have gone through. With --until_signal the stall ends as soon as a SIGTERM or SIGINT has
been handled (by the handler the target installed), and the write goes on (later ones of the
same path or call are not stalled again): a test signals the target at that exact point instead of
racing it. A write on another thread than the main one (a checkpoint saved in the background) says
"STALLED <what> in thread <name> (id <its native id>)"; with --until_signal its stall ends once a handler the target
installed for SIGTERM or SIGINT has run, on the main thread, after that line. TARGET is a
module, run as `python -m TARGET ARGS...` runs it, or MODULE:FUNCTION, called with ARGS. The
writes themselves are the real ones.
"""

import argparse
import importlib
import os
import re
import runpy
import signal
import sys
import threading
import time

from google.cloud.storage import Blob


def main(argv):
  ours, (target, *args) = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  parser = argparse.ArgumentParser()
  for option in ("--rename", "--upload"):
    parser.add_argument(option)
  parser.add_argument("--call", action="append", default=[])
  parser.add_argument("--skip", type=int, default=0)
  parser.add_argument("--until_signal", action="store_true")
  options = parser.parse_args(ours)
  seen, released = [], set()
  if options.until_signal:
    signal.signal = counting_handlers

  def stall(what):
    seen.append(what)
    if len(seen) > options.skip and what not in released:
      in_thread = threading.current_thread() is not threading.main_thread()
      if options.until_signal:
        (until_handled if in_thread else until_signal)(what)
        released.add(what)
      else:
        print("STALLED", what, *(["in thread", threading.current_thread().name, f"(id {threading.get_native_id()})"]
                                 if in_thread else []), file=sys.stderr, flush=True)
        time.sleep(600)

  if options.rename:
    rename = os.rename

    def stalled_rename(source, dest):
      if re.search(options.rename, str(dest)):
        stall(dest)
      return rename(source, dest)
    os.rename = stalled_rename
  if options.upload:
    upload = Blob.upload_from_filename

    def stalled_upload(self, *args, **kwargs):
      if re.search(options.upload, self.name):
        stall(self.name)
      return upload(self, *args, **kwargs)
    Blob.upload_from_filename = stalled_upload
  for call in options.call:
    stall_calls(call, stall)

  if ":" in target:
    module, name = target.split(":")
    getattr(importlib.import_module(module), name)(*args)
  else:
    sys.argv = [target, *args]
    runpy.run_module(target, run_name="__main__", alter_sys=True)


def stall_calls(call, stall):
  module, name = call.rsplit(".", 1)
  module = importlib.import_module(module)
  function = getattr(module, name)

  def stalled_call(*args, **kwargs):
    stall(call)
    return function(*args, **kwargs)
  setattr(module, name, stalled_call)


_install = signal.signal
# The signals that handlers installed through counting_handlers have handled, in order.
HANDLED = []


def counting_handlers(signum, handler):
  """signal.signal for the target: its SIGTERM and SIGINT handlers also count what they handled
  (HANDLED), which a stall on another thread waits for (only the main thread may set handlers)."""
  if signum in (signal.SIGTERM, signal.SIGINT) and callable(handler):
    def counted(signum, frame, handler=handler):
      try:
        handler(signum, frame)
      finally:
        HANDLED.append(signum)
    counted.original = handler
    previous = _install(signum, counted)
  else:
    previous = _install(signum, handler)
  return getattr(previous, "original", previous)


def until_handled(what):
  """until_signal for a write on another thread: says STALLED, then sleeps (ten minutes at most)
  until one of the target's handlers has handled a SIGTERM or SIGINT after that line."""
  before = len(HANDLED)
  print("STALLED", what, "in thread", threading.current_thread().name, file=sys.stderr, flush=True)
  deadline = time.monotonic() + 600
  while len(HANDLED) == before and time.monotonic() < deadline:
    time.sleep(0.05)
  print("RELEASED by", signal.Signals(HANDLED[before]).name if len(HANDLED) > before else "nothing",
        file=sys.stderr, flush=True)


def until_signal(what):
  """Says STALLED, then sleeps (ten minutes at most) until a SIGTERM or SIGINT has gone through the
  target's own handler; whatever that handler raises (a second Ctrl-C's KeyboardInterrupt) ends the
  stall too. The handler is wrapped before the line is printed: a signal sent on it is never missed."""
  handled, previous = [], {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}

  def handle(signum, frame):
    try:
      if callable(previous[signum]):
        previous[signum](signum, frame)
    finally:
      handled.append(signum)
  try:
    for signum in previous:
      _install(signum, handle)
    print("STALLED", what, file=sys.stderr, flush=True)
    deadline = time.monotonic() + 600
    while not handled and time.monotonic() < deadline:
      time.sleep(0.05)
  finally:
    for signum, handler in previous.items():
      _install(signum, handler)
  print("RELEASED by", signal.Signals(handled[0]).name if handled else "nothing", file=sys.stderr, flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
