"""What checkpointing at the default interval costs: the same job trained side by side without
checkpoints and with one at each epoch's end, as trainer.train saves them, synchronously and in
the background (--async_checkpoints).

    python scripts/benchmark_checkpoints.py --data=GOOGL.csv   # the tutorial's GOOGL daily prices CSV

Each case assembles its job as trainer/train.py does (the strategy, DATA[model].prepare(config),
MODELS and OPTIMIZERS, optimizer.build before training, trainer.checkpoints.Checkpoints with
keep=3) and calls trainer.loop.fit three times per repeat from the same seed: with
loop.Checkpointing() (no checkpoints), with loop.Checkpointing(Checkpoints(folder, ...),
background=False) (a checkpoint at every epoch's end, the default interval; training waits for
each) and with background=True (the default: written and published while training goes on).
Repeats rotate which goes first, so a change in the machine's load falls on all; read the medians.
  lstm_local  --model=lstm on the GOOGL close (test from 2017), checkpoints in a local folder
  lstm_gcs    the same, checkpoints on gs:// in a gcp-storage-emulator this script starts on
              127.0.0.1 (objects on disk), through trainer.storage as a real job's
  lstm_gcs50  the same, every request delayed 50 ms by scripts/latency_proxy.py in front of the
              emulator: the real service's round trip, which loopback hides
  cnn_local   --model=cnn on the built-in images: 1.2M parameters plus Adam's two slots each
Training seconds are loop.fit's wall time (tracing, training, validation and, in the run with
checkpoints, the saves); data is prepared and its caches filled before, and one untimed warm-up
epoch with a checkpoint runs per case, so the first repeat pays no one-time cost the others do
not. Columns:
  overhead %      (with - without) / without, whole runs: on a shared machine other jobs add
                  bursts of about a second, far more than a save of these models
  save s          Checkpoints.save's own time (write, publish, prune), mean of the run's saves
  requests        HTTP requests per save (gs://, google-cloud-storage's background ones too):
                  loopback hides their round trips
  saves %         the saves' total over the run without: the loop waits for each save and does
                  nothing else differently (but a check that the weights are finite, < 10 ms),
                  so this is the cost itself, without the noise of comparing two whole runs
                  (these columns are of the synchronous run)
  held sync/async s  the time a save holds up training, mean per save after the first: what the
                  training thread spends in loop.Loop.save and loop.Loop.settle (waiting for a
                  save under way) in the synchronous and the asynchronous run, but fit's final wait
  first s         the first asynchronous save's hold: it traces the host copy, once a job
  end wait s      fit's final wait in the asynchronous run: the last save is waited for before
                  evaluation and export, once a job
  async/epoch %   held async s over epoch s: an asynchronous save's cost in a long job
  epoch s         median epoch after the first (which traces) of the run without
  save/epoch %    save s over epoch s: the cost in a long job, where tracing is a small part
  CPU overhead %  the same as overhead %, in CPU seconds of this process (every thread; not the
                  emulator's, which on the real service are not the training machine's)
Then per case the median epoch after the first over every repeat, without and with (where each
epoch holds a save). Prints a table, then one line of JSON.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from absl import logging  # noqa: E402

from trainer import distribution, loop, storage  # noqa: E402
from trainer.checkpoints import Checkpoints  # noqa: E402
from trainer.config import Config  # noqa: E402
from trainer.models import MODELS, OPTIMIZERS  # noqa: E402
from trainer.train import DATA  # noqa: E402
from gcs_emulator import GcsEmulator  # noqa: E402 -- scripts/, beside this file
from latency_proxy import LatencyProxy  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("lstm_local", "lstm_gcs", "lstm_gcs50", "cnn_local")
KINDS = ("without", "sync", "async")


class Requests:
  """Counts HTTP requests (google-cloud-storage's all go through requests.Session.request): on
  the real service each is a round trip that loopback hides."""
  count = 0
  installed = False

  @classmethod
  def install(cls):
    import requests
    if cls.installed:
      return
    cls.installed, request = True, requests.Session.request

    def counted(self, *args, **kwargs):
      cls.count += 1
      return request(self, *args, **kwargs)
    requests.Session.request = counted


class TimedCheckpoints(Checkpoints):
  """Checkpoints that note how long each save took (from the call until it is done), and how many
  HTTP requests it made."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.seconds, self.requests = [], []

  def save(self, step, state, best_weights, background=False, then=None):
    """The time and requests of the whole save: measured when it is done (on its thread)."""
    start, requests = time.perf_counter(), Requests.count

    def done(seconds):
      self.seconds.append(time.perf_counter() - start)
      self.requests.append(Requests.count - requests)  # an asynchronous save's overlap the loop's other requests
      if then:
        then(seconds)
    return super().save(step, state, best_weights, background, done)


class Held:
  """Seconds the training thread spends in loop.Loop.save and loop.Loop.settle (outermost calls
  only: save settles the save before it), one entry a call, per run."""
  seconds, depth = [], 0

  @classmethod
  def install(cls):
    for name in ("save", "settle"):
      setattr(loop.Loop, name, cls.timed(getattr(loop.Loop, name)))

  @classmethod
  def timed(cls, method):
    def timed(self, *args, **kwargs):
      cls.depth += 1
      start = time.perf_counter()
      try:
        return method(self, *args, **kwargs)
      finally:
        cls.depth -= 1
        if not cls.depth:
          cls.seconds.append((method.__name__, time.perf_counter() - start))
    return timed


def gcs_bytes(client, path):
  bucket, _, prefix = path[len("gs://"):].partition("/")
  return sum(blob.size for blob in client.list_blobs(bucket, prefix=prefix.rstrip("/") + "/"))


def local_bytes(folder):
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def train(config, prepared, strategy, epochs, folder=None, background=False):
  """One job from config.seed: (loop.fit wall seconds, CPU seconds, seconds of each epoch, its
  history, the Checkpoints or None, parameters). An epoch runs from one epoch's training dataset
  to the next (the last: to fit's end), so it holds that epoch's training, validation and save."""
  keras.backend.clear_session()
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    model = MODELS[config.model](prepared.input_shape, prepared.num_outputs, config.bidirectional)
    optimizer = OPTIMIZERS[config.model](config.learning_rate)
    optimizer.build(model.trainable_variables)
  checkpoints = TimedCheckpoints(folder, model, optimizer, config.keep_checkpoints) if folder else None
  loss = loop.cross_entropy if prepared.kind == "classification" else loop.squared_error
  starts = []

  def make_dataset(split, batch_size, input_context=None, epoch=0):
    if split == "train":
      starts.append(time.perf_counter())
    return prepared.make_dataset(split, batch_size, input_context, epoch)

  start, cpu, Held.seconds = time.perf_counter(), time.process_time(), []
  history = loop.fit(model, optimizer, loss, make_dataset, strategy, config.batch_size, epochs,
                     patience=epochs, checkpointing=loop.Checkpointing(checkpoints, background=background))
  end = time.perf_counter()
  return (end - start, time.process_time() - cpu, np.diff(starts + [end]).tolist(), history, checkpoints,
          model.count_params(), list(Held.seconds))


def held(calls):
  """(the first save's hold, the others' total, fit's final wait) from a run's Held.seconds."""
  first = next(i for i, (name, _) in enumerate(calls) if name == "save")
  return calls[first][1], sum(s for i, (_, s) in enumerate(calls[:-1]) if i != first), calls[-1][1]


def measure(case, config, strategy, args, base, size_of):
  """Every repeat of one case: without checkpoints, with synchronous and with asynchronous ones,
  in rotating order."""
  prepared = DATA[config.model].prepare(config)
  for split in ("train", "validation"):  # fills the images' decode caches before anything is timed
    for _ in prepared.make_dataset(split, config.batch_size):
      pass
  train(config, prepared, strategy, 1, storage.join(base, "warmup"))
  train(config, prepared, strategy, 1, storage.join(base, "warmup-async"), background=True)
  rows = []
  for repeat in range(args.repeats):
    order = KINDS[repeat % 3:] + KINDS[:repeat % 3]
    runs = {}
    for kind in order:
      folder = storage.join(base, f"run-{repeat}-{kind}") if kind != "without" else None
      runs[kind] = train(config, prepared, strategy, args.epochs, folder, background=kind == "async")
    (without, cpu_without, epochs_without, plain, _, _, _) = runs["without"]
    (with_, cpu_with, epochs_with, history, checkpoints, parameters, held_sync) = runs["sync"]
    background = runs["async"][3]
    # The first save traces the host copy, and fit's last call waits for the last save before
    # evaluation: each once a job, not once an epoch.
    saves = checkpoints.seconds
    (first_sync, held_sync, _), (first_async, held_async, end_wait) = held(held_sync), held(runs["async"][6])
    held_sync, held_async = held_sync / (len(saves) - 1), held_async / (len(saves) - 1)
    newest = checkpoints.path(checkpoints.complete()[-1])
    row = {"case": case, "repeat": repeat + 1, "first": order[0], "epochs": len(history["loss"]),
           "without_s": round(without, 2), "with_s": round(with_, 2), "checkpoints": len(saves),
           "kept": len(checkpoints.complete()), "save_s_mean": round(statistics.mean(saves), 3),
           "save_s_max": round(max(saves), 3), "checkpoint_mb": round(size_of(newest) / 1e6, 2),
           "overhead_pct": round(100 * (with_ - without) / without, 2),
           "saves_pct": round(100 * sum(saves) / without, 2),
           "requests_per_save": statistics.mean(checkpoints.requests),
           # A long job traces once: its cost is a save per epoch of steady training.
           "epoch_s": round(statistics.median(epochs_without[1:]), 3),
           "per_epoch_pct": round(100 * statistics.mean(saves) / statistics.median(epochs_without[1:]), 2),
           "epochs_s_without": [round(e, 3) for e in epochs_without],
           "epochs_s_with": [round(e, 3) for e in epochs_with],
           "cpu_without_s": round(cpu_without, 2), "cpu_with_s": round(cpu_with, 2),
           "cpu_overhead_pct": round(100 * (cpu_with - cpu_without) / cpu_without, 2),
           "held_sync_s": round(held_sync, 4), "held_async_s": round(held_async, 4),
           "first_async_s": round(first_async, 3), "end_wait_s": round(end_wait, 3),
           "async_per_epoch_pct": round(100 * held_async / statistics.median(epochs_without[1:]), 2),
           # The same job every time: checkpointing must not change what is trained.
           "val_loss_max_diff": float(max(np.max(np.abs(np.subtract(h["val_loss"], plain["val_loss"])))
                                          for h in (history, background)))}
    rows.append(row)
    print(f"measured {case} repeat {row['repeat']} ({order[0]} first): {without:.1f} s without, {with_:.1f} s "
          f"with {len(saves)} saves holding training {row['held_sync_s']:.3f} s each, "
          f"{runs['async'][0]:.1f} s with asynchronous ones holding it {row['held_async_s']:.4f} s", file=sys.stderr)
  # Every epoch after the first (which traces) of every repeat: the median shrugs off the bursts
  # of other jobs' work (about a second each here, 20-50x a save of these models).
  epoch = {kind: statistics.median(e for r in rows for e in r[f"epochs_s_{kind}"][1:]) for kind in ("without", "with")}
  medians = {k: statistics.median(r[k] for r in rows) for k in MEDIANS}
  return {"case": case, "model": config.model, "parameters": parameters, "rows": rows, "median": medians,
          "median_epoch_s": epoch,
          "median_epoch_overhead_pct": round(100 * (epoch["with"] - epoch["without"]) / epoch["without"], 2)}


COLUMNS = [("case", "case", "<11", ""), ("rep", "repeat", ">3", ""), ("first", "first", "<7", ""),
           ("epochs", "epochs", ">6", ""), ("without s", "without_s", ">9", ".2f"), ("with s", "with_s", ">6", ".2f"),
           ("overhead %", "overhead_pct", ">10", ".1f"), ("ckpts", "checkpoints", ">5", ""),
           ("save s", "save_s_mean", ">6", ".3f"), ("ckpt MB", "checkpoint_mb", ">7", ".2f"),
           ("requests", "requests_per_save", ">8", ".0f"), ("saves %", "saves_pct", ">7", ".1f"),
           ("epoch s", "epoch_s", ">7", ".2f"), ("save/epoch %", "per_epoch_pct", ">12", ".1f"),
           ("CPU overhead %", "cpu_overhead_pct", ">14", ".1f"), ("held sync s", "held_sync_s", ">11", ".3f"),
           ("held async s", "held_async_s", ">12", ".4f"), ("async/epoch %", "async_per_epoch_pct", ">13", ".2f"),
           ("first s", "first_async_s", ">7", ".3f"), ("end wait s", "end_wait_s", ">10", ".3f")]
MEDIANS = ("without_s", "with_s", "overhead_pct", "save_s_mean", "saves_pct", "epoch_s", "per_epoch_pct",
           "cpu_overhead_pct", "held_sync_s", "held_async_s", "async_per_epoch_pct", "first_async_s", "end_wait_s")


def print_row(row):
  print(" ".join(format(row[key], f"{align}{fmt}") for _, key, align, fmt in COLUMNS))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=",".join(CASES), help=f"Comma-separated, from {','.join(CASES)}.")
  parser.add_argument("--data", help="The lstm cases' prices CSV (Date and Close columns): the tutorial's GOOGL "
                      "daily prices.")
  parser.add_argument("--latency", type=float, default=0.05, help="lstm_gcs50: seconds added to every request.")
  parser.add_argument("--epochs", type=int, default=5, help="Epochs of every run (patience as large: all run).")
  parser.add_argument("--repeats", type=int, default=3, help="Pairs of runs per case, alternating which goes first.")
  parser.add_argument("--image_size", type=int, default=150, help="cnn_local: pixels per side.")
  parser.add_argument("--seed", type=int, default=42)
  args = parser.parse_args()
  cases = args.cases.split(",")
  if args.epochs < 2 or args.repeats < 1:
    parser.error("--epochs must be at least 2 (the first traces) and --repeats at least 1")
  unknown = [c for c in cases if c not in CASES]
  if unknown:
    parser.error(f"unknown cases {unknown}; choose from {','.join(CASES)}")
  if any(c.startswith("lstm") for c in cases) and not (args.data and os.path.isfile(args.data)):
    parser.error(f"--data={args.data}: no such file")
  logging.set_verbosity(logging.WARNING)
  Held.install()

  configs = {"lstm": Config(model="lstm", data=args.data, target_column="Close", date_column="Date",
                            test_start="2017-01-01", epochs=args.epochs, patience=args.epochs, seed=args.seed),
             "cnn": Config(model="cnn", image_size=args.image_size, epochs=args.epochs, patience=args.epochs,
                           seed=args.seed)}
  strategy = distribution.make_strategy(configs["lstm"].strategy, configs["lstm"].cluster)
  work = tempfile.mkdtemp(prefix="benchmark-checkpoints-")
  results = []
  try:
    for case in cases:
      model_name, where = case.split("_")[:2]
      config = configs[model_name]
      if where == "local":
        results.append(measure(case, config, strategy, args, os.path.join(work, case), local_bytes))
        continue
      folder = os.path.join(work, "gcs")
      os.makedirs(folder)
      try:
        emulator = GcsEmulator(os.path.join(folder, "data"), os.path.join(folder, "emulator.log")).start()
      except RuntimeError as e:
        sys.exit(f"benchmark_checkpoints: {e}")
      try:
        proxy = LatencyProxy(emulator.host, args.latency) if case.endswith("50") else None
        # Read by trainer.storage at each call.
        os.environ["STORAGE_EMULATOR_HOST"] = proxy.host if proxy else emulator.host
        Requests.install()
        bucket = emulator.new_bucket("benchmark-checkpoints")
        client = emulator.client()
        results.append(measure(case, config, strategy, args, f"{bucket}/{case}", lambda p: gcs_bytes(client, p)))
      finally:
        if proxy:
          proxy.stop()
        emulator.stop()
  finally:
    shutil.rmtree(work, ignore_errors=True)

  print(f"{args.epochs} epochs per run, a checkpoint at each epoch's end (keep 3), {args.repeats} repeats "
        f"rotating which run goes first; {os.cpu_count()} CPUs; lstm_gcs50: {1000 * args.latency:.0f} ms a request")
  print(" ".join(format(title, align) for title, _, align, _ in COLUMNS))
  for result in results:
    for r in result["rows"]:
      print_row(r)
    print_row({**result["rows"][0], **result["median"], "repeat": "med", "first": ""})
  for result in results:
    epoch = result["median_epoch_s"]
    print(f"{result['case']}: {result['parameters']:,} parameters; median epoch after the first, over all repeats: "
          f"{epoch['without']:.3f} s without, {epoch['with']:.3f} s with ({result['median_epoch_overhead_pct']:+.1f}%)")
  worst = max(results, key=lambda r: r["median"]["per_epoch_pct"])
  print(f"largest cost: {worst['case']}, a save takes {worst['median']['per_epoch_pct']:.1f}% of an epoch's time "
        f"and the saves {worst['median']['saves_pct']:.1f}% of these {args.epochs}-epoch runs (medians; target < 5%)")
  for result in results:
    m = result["median"]
    print(f"{result['case']}: a save holds up training {m['held_sync_s']:.3f} s synchronous, "
          f"{m['held_async_s']:.4f} s asynchronous ({m['held_sync_s'] / max(m['held_async_s'], 1e-9):.0f}x less): "
          f"{m['async_per_epoch_pct']:.2f}% of a {m['epoch_s']:.2f} s epoch (medians; target < 1%); once a job: the "
          f"first save {m['first_async_s']:.3f} s (traces the host copy), the wait for the last at the end "
          f"{m['end_wait_s']:.3f} s")
  print(json.dumps({"epochs": args.epochs, "repeats": args.repeats, "keep": 3, "results": results}))


if __name__ == "__main__":
  main()
