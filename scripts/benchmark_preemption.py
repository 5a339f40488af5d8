"""How long a preempted trainer takes from SIGTERM to its exit, with its checkpoint on gs://, per family.

    python scripts/benchmark_preemption.py     # dense, lstm, cnn at their default sizes, 3 rounds: ~6 minutes

What a preemption grants: GKE's Spot and preemptible nodes give a pod 15 s between SIGTERM and the
kill, whatever terminationGracePeriodSeconds says. Cloud Storage is simulated as in
scripts/benchmark_streaming.py: the storage emulator on 127.0.0.1 (scripts/gcs_emulator.py) behind
scripts/latency_proxy.py, which adds --latency_ms to every request (the real service's round trip);
its bandwidth is the loopback's. Each round runs `python -m trainer.task --model=M` with the job
folder in the bucket and every flag at its default, waits for its first checkpoint (the end of
epoch 1: by then every function is traced and no save is under way), sends SIGTERM at once, and
times the rest from the trainer's own log lines:
  to_save s      SIGTERM to the start of the signal's save: the call of --steps_per_loop steps under
                 way (Python runs the handler only once TensorFlow's call returns), the next one,
                 which carries the flag to every worker (trainer.loop), and the epoch's validation
                 when that call ends an epoch
  save s         the signal's checkpoint: host copy excluded, its write and upload, as the trainer
                 logs it ("checkpoint ... saved (...; X s)")
  exit s         from that line to the process's end (evaluation is skipped; TensorFlow's teardown)
  total s        SIGTERM to the end: what must fit in the grace
  requests       storage requests from SIGTERM to the end
Prints a table of the medians over --rounds, then one line of JSON.
"""

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from gcs_emulator import GcsEmulator  # noqa: E402
from latency_proxy import LatencyProxy  # noqa: E402
from trainer import storage  # noqa: E402

FAMILIES = ("dense", "lstm", "cnn")
GRACE = 15  # GKE Spot and preemptible nodes
SAVED = re.compile(r"checkpoint (gs://\S+) saved \(epoch \d+, step \d+; ([0-9.]+) s\)")


class Watched:
  """A trainer process whose stderr lines are kept with the time each was read."""

  def __init__(self, argv, env):
    self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    self.lines, self._new = [], threading.Condition()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.process.stderr:
      with self._new:
        self.lines.append((time.monotonic(), line.rstrip("\n")))
        self._new.notify_all()
    with self._new:
      self.lines.append((time.monotonic(), None))  # the end
      self._new.notify_all()

  def wait_for(self, pattern, after=0, timeout=600):
    """(time, match) of the first line from index `after` matching pattern; fails at the end or timeout."""
    deadline = time.monotonic() + timeout
    with self._new:
      while True:
        for at, line in self.lines[after:]:
          if line is None:
            raise RuntimeError(f"exited before {pattern!r}:\n" + self.tail())
          if match := re.search(pattern, line):
            return at, match
        after = len(self.lines)
        if not self._new.wait(max(0.0, deadline - time.monotonic())):
          self.process.kill()
          raise RuntimeError(f"no {pattern!r} within {timeout} s:\n" + self.tail())

  def tail(self):
    return "\n".join(line for _, line in self.lines[-30:] if line is not None)


def one_round(model, job_dir, proxy, env, verbose=False):
  job = Watched([sys.executable, "-m", "trainer.task", f"--model={model}", f"--job_dir={job_dir}"], env)
  job.wait_for(SAVED.pattern)
  signalled, requests, seen = time.monotonic(), proxy.requests, len(job.lines)
  job.process.send_signal(signal.SIGTERM)
  # The signal's checkpoint, which its last line names (an epoch's end may save one more before it).
  _, stopped = job.wait_for(r"^trainer: stopped by SIGTERM at step \d+; checkpoint (\S+) saved", after=seen)
  saved_at, saved = job.wait_for(rf"checkpoint {re.escape(stopped.group(1))} saved \(.*; ([0-9.]+) s\)", after=seen)
  code = job.process.wait(600)
  ended, requests = time.monotonic(), proxy.requests - requests
  if code != 143:
    raise RuntimeError(f"{model}: exit code {code}, not 143:\n" + job.tail())
  if verbose:
    print("\n".join(f"{at - signalled:8.2f} {line}" for at, line in job.lines[seen:] if line), file=sys.stderr)
  save = float(saved.group(1))
  sizes = storage.list_sizes(stopped.group(1))
  params = int(job.wait_for(r"model \w+: ([0-9,]+) parameters")[1].group(1).replace(",", ""))
  return {"params": params, "ckpt_mib": sum(sizes.values()) / 2**20, "to_save": saved_at - save - signalled,
          "save": save, "exit": ended - saved_at, "total": ended - signalled, "requests": requests}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(FAMILIES))
  parser.add_argument("--latency_ms", type=float, default=50.0, help="added to every storage request")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--verbose", action="store_true", help="print each run's log after the signal, timed")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as scratch:
    emulator = GcsEmulator(os.path.join(scratch, "gcs"), os.path.join(scratch, "emulator.log")).start()
    proxy = LatencyProxy(emulator.host, args.latency_ms / 1000)
    os.environ["STORAGE_EMULATOR_HOST"] = proxy.host
    # This checkout's trainer, whatever an installed copy says.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    bucket = emulator.new_bucket()
    rows = {}
    try:
      for round_ in range(args.rounds):
        for model in args.models.split(","):
          rows.setdefault(model, []).append(one_round(model, f"{bucket}/{model}-{round_}", proxy, env,
                                                                 args.verbose))
    finally:
      proxy.stop()
      emulator.stop()

  columns = ("to_save", "save", "exit", "total", "requests")
  medians = {model: {**runs[0], **{c: statistics.median(run[c] for run in runs) for c in columns},
                     "worst_total": max(run["total"] for run in runs)} for model, runs in rows.items()}
  print(f"SIGTERM to exit, job folder on gs:// (emulator, {args.latency_ms:g} ms a request), every flag at its "
        f"default; median of {args.rounds} rounds; {os.cpu_count()} CPUs")
  print(f"{'model':<6} {'params':>10} {'ckpt MiB':>9} {'to_save s':>10} {'save s':>7} {'exit s':>7} {'total s':>8} "
        f"{'worst s':>8} {'requests':>9} {'in ' + str(GRACE) + ' s':>7}")
  for model, m in medians.items():
    print(f"{model:<6} {m['params']:>10,} {m['ckpt_mib']:>9.2f} {m['to_save']:>10.2f} {m['save']:>7.2f} "
          f"{m['exit']:>7.2f} {m['total']:>8.2f} {m['worst_total']:>8.2f} {m['requests']:>9.0f} "
          f"{'yes' if m['worst_total'] < GRACE else 'NO':>7}")
  print(json.dumps({"latency_ms": args.latency_ms, "rounds": args.rounds,
                    "models": {model: {k: round(v, 3) for k, v in m.items()} for model, m in medians.items()}}))


if __name__ == "__main__":
  main()
