"""A command stalled at a chosen write, for tests that SIGKILL it there (processes.kill_when):

    python tests/stalled.py [--rename=REGEX] [--upload=REGEX] [--call=MODULE.FUNCTION] [--skip=N] \\
        -- TARGET ARGS...

A local os.rename to a path matching --rename, a gs:// upload (google-cloud-storage's
Blob.upload_from_filename) of an object name matching --upload, or a call of --call prints
"STALLED <what>" on stderr and sleeps for ten minutes, once the first --skip of them have gone
through. TARGET is a module, run as `python -m TARGET ARGS...` runs it, or MODULE:FUNCTION,
called with ARGS. The writes themselves are the real ones.
"""

import argparse
import importlib
import os
import re
import runpy
import sys
import time

from google.cloud.storage import Blob


def main(argv):
  ours, (target, *args) = argv[:argv.index("--")], argv[argv.index("--") + 1:]
  parser = argparse.ArgumentParser()
  for option in ("--rename", "--upload", "--call"):
    parser.add_argument(option)
  parser.add_argument("--skip", type=int, default=0)
  options = parser.parse_args(ours)
  seen = []

  def stall(what):
    seen.append(what)
    if len(seen) > options.skip:
      print("STALLED", what, file=sys.stderr, flush=True)
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
  if options.call:
    module, name = options.call.rsplit(".", 1)
    module = importlib.import_module(module)
    function = getattr(module, name)

    def stalled_call(*args, **kwargs):
      stall(options.call)
      return function(*args, **kwargs)
    setattr(module, name, stalled_call)

  if ":" in target:
    module, name = target.split(":")
    getattr(importlib.import_module(module), name)(*args)
  else:
    sys.argv = [target, *args]
    runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main(sys.argv[1:])
