"""A serving folder as TF Serving reads it: `<serving_dir>/<integer version>/` SavedModels, of
which the highest complete one is in production, plus what retraining keeps beside them.

    <serving_dir>/<n>/             an export version (trainer.export), its trainer_export.json last
    <serving_dir>/.lease.json      who may change the folder now, and until when (Lease)
    <serving_dir>/history.jsonl    one line per retraining run (append_history)
    <serving_dir>/history.png      production's metric run by run (history_plot)

Promotion never shows a poller a half-uploaded model: a version is staged under a hidden name
first (`.tmp-<n>-` locally, renamed into place; `.staging-` on gs://, copied into place on the
server, then saved_model.pb (what TF Serving waits for) and trainer_export.json (what
`production` waits for) uploaded last); killed between those two, the version is whole for TF
Serving but not production here until the next promotion replaces it with a higher number.
Everything that changes the folder (promote, append_history) assumes the caller holds the
Lease, and promote checks it before every publish and removal: the folder is read, decided on
and written in separate steps.

No TensorFlow here, and matplotlib only for the plot: the history is shown in a second.
"""

import datetime
import json
import os
import secrets
import tempfile
import threading
import time

from absl import logging

from trainer import conditional, export, numbered, preemption, storage, transfer
from trainer.config import UserError

LEASE = ".lease.json"
HISTORY = "history.jsonl"
HISTORY_PLOT = "history.png"
DEFAULT_TTL_SECONDS = 3600


def production(serving_dir):
  """The folder of the highest complete version, or None when there is none."""
  return export.latest_version(serving_dir)


def complete_versions(serving_dir):
  """The complete versions (with trainer_export.json), ascending."""
  return sorted(export.VERSIONS.complete(serving_dir))


def promote(version_dir, serving_dir, keep_versions=5, lease=None, run=None):
  """Copies the complete export version_dir (local or gs://) to `<serving_dir>/<n>`, n one more
  than the highest version folder present, complete or not; returns that folder. run (a JSON
  value naming the retraining run) is recorded in the version's metadata.

  The copy is staged first under a hidden name, which TF Serving does not poll, then published:
  locally `.tmp-<n>-<random>` renamed to n; on gs:// `.staging-<random>/` copied object by
  object on the server, saved_model.pb and trainer_export.json uploaded last. Why not reuse the
  number of an incomplete folder: on gs:// a folder is visible from its first object, so TF
  Serving may have tried, and failed, to load it, and would not try that number again.
  Incomplete folders are removed only once the new version is complete, so a run killed in
  between cannot make the next one reuse their numbers either. Then the newest keep_versions
  complete versions are kept and older ones removed.

  With a lease, it is checked (Lease.check) before the version is published and before anything
  is removed: a promoter whose lease ran out stops with LeaseLost, having removed only its own
  staged copy. Others' leftovers are removed only by the lease's holder: their writer lost it.
  """
  if keep_versions < 1:
    raise ValueError(f"keep_versions={keep_versions}: keep at least the version in production")
  metadata = export.read_metadata(version_dir)  # UserError unless it is a complete export
  with tempfile.TemporaryDirectory() as scratch:
    local = os.path.join(scratch, "version")
    transfer.download_dir(version_dir, local)
    if not os.path.exists(os.path.join(local, "saved_model.pb")):
      raise UserError(f"{version_dir}: no saved_model.pb; not a SavedModel export, cannot serve it")
    metadata.update(promoted_from=version_dir, **({"run": run} if run is not None else {}))
    _check(lease)
    _remove_hidden_leftovers(serving_dir, lease)
    publish = _publish_remote if storage.is_remote(serving_dir) else _publish_local
    try:
      folder = publish(local, serving_dir, metadata, lease)
    except (OSError, storage.StorageError):
      _check(lease)  # whoever took the lease over removed our staged copy: say that, not what it broke
      raise
  logging.info("promoted %s to %s", version_dir, folder)
  # Two listings however many versions there are.
  names, complete = storage.list_dir(serving_dir), sorted(export.VERSIONS.complete(serving_dir))
  for name in names:
    version = export.VERSIONS.number(name)
    if version is not None and version not in complete:
      logging.warning("removing %s: an incomplete version (no %s), left by an interrupted promotion",
                      storage.join(serving_dir, name), export.METADATA)
      _withdraw(storage.join(serving_dir, name), lease)
  for old in complete[:-keep_versions]:
    logging.info("removing version %d of %s: keeping the newest %d", old, serving_dir, keep_versions)
    _withdraw(storage.join(serving_dir, str(old)), lease)
  return folder


# What TF Serving waits for, and what `production` waits for: published last, in this order.
_MARKERS = ("saved_model.pb", export.METADATA)


def _publish_local(local, serving_dir, metadata, lease):
  """Copies local into `<serving_dir>/.tmp-<n>-<random>` and renames that to n; returns n's folder."""
  folder = _number(local, serving_dir, metadata)
  staging = storage.temp_sibling(folder)
  try:
    transfer.publish_dir(local, staging)
    _check(lease)
    try:
      os.rename(staging, folder)  # fails rather than merge into a folder someone else made meanwhile
    except OSError as e:
      raise storage.StorageError(f"cannot publish {folder}: {e.strerror or e}") from None
  finally:
    _remove_own(staging)
  return folder


def _publish_remote(local, serving_dir, metadata, lease):
  """Uploads local but its markers to `<serving_dir>/.staging-<random>/`, then makes the next
  version of server-side copies of it and uploads the markers last; returns its folder."""
  markers = os.path.join(os.path.dirname(local), "markers")
  os.makedirs(markers)
  for name in _MARKERS:  # uploaded straight into the version, last: staging them is one more step
    os.replace(os.path.join(local, name), os.path.join(markers, name))
  staging = storage.join(serving_dir, f"{numbered.STAGING}{secrets.token_hex(6)}")
  try:
    transfer.publish_dir(local, staging)  # the slow part, where no poller looks
    _check(lease)
    folder = _number(markers, serving_dir, metadata)  # numbered only now: the highest still
    staged = storage.list_files(staging)
    for name in staged:
      storage.copy_file(storage.join(staging, name), storage.join(folder, name))
  finally:
    _remove_own(staging)
  _check(lease)
  missing = sorted(set(staged) - set(storage.list_files(folder)))
  if missing:  # removed by whoever took the lease from us: no marker on a folder without weights
    raise LeaseLost(f"{folder}: {missing[0]} was removed while it was being published; not publishing it")
  for name in _MARKERS:
    storage.upload_file(os.path.join(markers, name), storage.join(folder, name))
  return folder


def _number(local, serving_dir, metadata):
  """The next version's folder; its number goes into the metadata written to local."""
  metadata["version"] = max(export.VERSIONS.numbers(storage.list_dir(serving_dir)), default=0) + 1
  with open(os.path.join(local, export.METADATA), "w") as f:
    json.dump(metadata, f, indent=2)
  return storage.join(serving_dir, str(metadata["version"]))


def _check(lease):
  if lease is not None:
    lease.check()


def _remove_hidden_leftovers(serving_dir, lease):
  """Removes the staged copies other promotions left: theirs, abandoned, since we hold the lease."""
  for name in storage.list_dir(serving_dir):
    if export.VERSIONS.is_leftover(name):
      _check(lease)
      logging.warning("removing %s: left by a promotion that was interrupted", storage.join(serving_dir, name))
      storage.remove(storage.join(serving_dir, name))


def _remove_own(staging):
  """Removes our staged copy, never masking the error that may be on its way out."""
  try:
    storage.remove(staging)
  except storage.StorageError as e:
    logging.warning("could not remove %s (%s); the next promotion will", staging, e)


def _withdraw(folder, lease=None):
  """Removes a version so that it stops being one first: its marker, then what TF Serving loads.
  Only by the lease's holder, checked first: a folder of someone else's is abandoned only then."""
  _check(lease)
  for name in _MARKERS[::-1]:
    storage.remove(storage.join(folder, name))
  storage.remove(folder)


class LeaseHeld(preemption.Restart):
  """Another process holds the serving folder's lease: not a mistake, someone else's turn; the
  same command run later goes on (a retry resumes the trained candidate from its checkpoint)."""
  exit_code = preemption.SERVING_BUSY

  def __init__(self, path, owner, expires, left=None):
    self.path, self.owner, self.expires = path, owner, expires
    left = max(0, expires - time.time() if left is None else left)
    left = f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min"
    super().__init__(f"{path} is held by {owner} until {_utc(expires)} ({left} from now): another retrain is "
                     "running, or one crashed and its lease runs out then")


class LeaseLost(preemption.Restart):
  """The lease this process held has been released or taken over (it expired)."""
  exit_code = preemption.SERVING_BUSY


class Lease:
  """`<serving_dir>/.lease.json`: {"owner", "token", "acquired", "expires", "ttl"}.

  acquire() creates it if absent, or replaces it if it has expired (so a crashed holder blocks
  others for ttl_seconds at most), each only if nobody changed it in between (a generation
  precondition on gs://, a lock file locally), so of two processes racing exactly one wins and
  the other raises LeaseHeld. Expiry is judged by the storage's clock, never a host's: a lease
  runs out "ttl" seconds after the storage last wrote it (its `updated` time on gs://, its mtime
  locally), compared with the time the storage gives a file written now ("acquired" and
  "expires" are the holder's clock, for people). The holder renews it before it runs out
  (renew(), or keep_alive=True: a thread renews every ttl_seconds / 3 while the `with` block
  runs). A holder whose lease was taken over learns it at its next renew (LeaseLost), and from
  then on check() fails at once: whoever changes the folder calls check() before every write.
  """

  def __init__(self, serving_dir, owner, ttl_seconds=DEFAULT_TTL_SECONDS, wait_seconds=0, keep_alive=False):
    if not ttl_seconds > 0:
      raise ValueError(f"ttl_seconds={ttl_seconds}: a lease must last some time")
    self.path = storage.join(serving_dir, LEASE)
    self.owner, self.ttl_seconds, self.wait_seconds, self.keep_alive = owner, ttl_seconds, wait_seconds, keep_alive
    self._token = secrets.token_hex(8)
    self._lock = threading.Lock()  # the renewing thread and the caller must not race each other
    self._stop = threading.Event()
    self._renewer = None
    self._lost = None  # the LeaseLost once the lease is known lost: nothing may be written after it

  def acquire(self):
    """Takes the lease, waiting up to wait_seconds for its holder; LeaseHeld if it cannot."""
    deadline = time.monotonic() + self.wait_seconds
    while True:
      try:
        return self._try_acquire()
      except LeaseHeld:
        if time.monotonic() >= deadline:
          raise
      time.sleep(max(0.0, min(1.0, deadline - time.monotonic())))

  def _try_acquire(self):
    held = {}
    for _ in range(5):
      record = self._record(acquired=time.time())
      if conditional.create_exclusive(self.path, record):
        self._lost = None
        return self
      try:
        data, token, written = conditional.read_stamped(self.path)
      except FileNotFoundError:
        continue  # released since: create it again
      held = _parse_lease(data)
      if held.get("token") == self._token:  # ours already: extend it
        record = self._record(acquired=held.get("acquired", time.time()))
      else:
        left = _left(held, written, conditional.store_time(self.path + ".lock"))
        if left > 0:
          owner, expires = held.get("owner", "an unknown owner"), held.get("expires", time.time() + left)
          raise LeaseHeld(self.path, owner, expires, left)
      if conditional.replace_if_unchanged(self.path, record, token):
        if held.get("token") != self._token:
          logging.warning("took over %s from %s, whose lease expired at %s", self.path,
                          held.get("owner", "nobody"), _utc(held.get("expires", 0)))
        self._lost = None
        return self
      # Changed since we read it: someone else got there first. Look again.
    raise LeaseHeld(self.path, held.get("owner", "another process"), held.get("expires", time.time()))

  def renew(self):
    """Extends the lease to ttl_seconds from now; LeaseLost when it is no longer ours."""
    with self._lock:
      try:
        data, token = conditional.read_with_token(self.path)
      except FileNotFoundError:
        raise self._losing(f"{self.path}: the lease of {self.owner} is gone (released or removed)") from None
      held = _parse_lease(data)
      if held.get("token") != self._token:
        raise self._losing(f"{self.path}: the lease of {self.owner} expired and is now held by "
                           f"{held.get('owner', 'an unknown owner')}")
      record = self._record(acquired=held.get("acquired", time.time()))
      if not conditional.replace_if_unchanged(self.path, record, token):
        raise self._losing(f"{self.path}: the lease of {self.owner} changed while it was being renewed")
    return self

  def check(self):
    """LeaseLost unless the lease is ours: at once when it is known lost (by the renewing thread),
    else as the storage says now (renewing it). Nobody else writes before replacing our record,
    so a lease found ours here was ours until now, however late this process is running."""
    if self._lost is not None:
      raise LeaseLost(str(self._lost))
    return self.renew()

  def _losing(self, message):
    self._lost = LeaseLost(message)
    return self._lost

  def release(self):
    """Removes the lease if it is still ours; True if it was."""
    with self._lock:
      try:
        data, token = conditional.read_with_token(self.path)
      except FileNotFoundError:
        return False
      held = _parse_lease(data)
      if held.get("token") != self._token:
        logging.warning("not releasing %s: held by %s now, not by %s", self.path, held.get("owner"), self.owner)
        return False
      return conditional.remove_if_unchanged(self.path, token)

  def _record(self, acquired):
    now = time.time()
    return json.dumps({"owner": self.owner, "token": self._token, "acquired": round(acquired, 3),
                       "expires": round(now + self.ttl_seconds, 3), "ttl": self.ttl_seconds}).encode("utf-8")

  def __enter__(self):
    self.acquire()
    if self.keep_alive:
      self._stop.clear()
      self._renewer = threading.Thread(target=self._renew_until_stopped, daemon=True, name="lease-renewer")
      self._renewer.start()
    return self

  def __exit__(self, exc_type, exc, traceback):
    if self._renewer is not None:
      self._stop.set()
      self._renewer.join()
      self._renewer = None
    try:
      self.release()
    except Exception as e:  # noqa: BLE001 - whatever it is, the error already on its way out says more
      if exc is None:
        raise
      logging.error("could not release %s (%s); it runs out by itself within %g s", self.path, e, self.ttl_seconds)

  def _renew_until_stopped(self):
    while not self._stop.wait(self.ttl_seconds / 3):
      try:
        self.renew()
      except LeaseLost as e:
        logging.error("%s; stopped renewing it, and this process changes nothing more", e)
        return
      except storage.StorageError as e:  # a flaky bucket: try again at the next interval
        logging.warning("could not renew %s (%s); trying again", self.path, e)


def _left(held, written, now):
  """Seconds until the lease held runs out by the storage's clock: its ttl from when the storage
  wrote it. A record without one (written by hand, or by an older trainer) says when it expires."""
  ttl = held.get("ttl")
  if isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
    return written + ttl - now
  return held.get("expires", 0) - now


def _parse_lease(data):
  """The lease's record; {} (an expired lease of nobody) when it is not one: our writes are
  whole, so only a person can have made it unreadable, and it must not block forever."""
  try:
    record = json.loads(data)
  except ValueError:
    return {}
  if not isinstance(record, dict) or not isinstance(record.get("expires", 0), (int, float)):
    return {}
  return record


def _utc(epoch_seconds):
  return datetime.datetime.fromtimestamp(epoch_seconds, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def append_history(serving_dir, entry):
  """Adds entry as the last line of `<serving_dir>/history.jsonl`, unless a line of the same
  entry["run"] is there already (a retry of a run killed after recording it); True if it wrote.
  Read, extended and written whole (gs:// has no append), only if nobody wrote in between (else
  read again): call it holding the Lease, but a writer that lost it unknowingly loses no line."""
  path = storage.join(serving_dir, HISTORY)
  for _ in range(5):
    try:
      data, token = conditional.read_with_token(path)
      text = data.decode("utf-8")
    except FileNotFoundError:
      text, token = "", None
    if entry.get("run") is not None and any(e.get("run") == entry["run"] for e in _entries(text, path)):
      logging.info("%s: this run is recorded already", path)
      return False
    if text and not text.endswith("\n"):
      text += "\n"
    data = (text + json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")
    written = (conditional.create_exclusive(path, data) if token is None
               else conditional.replace_if_unchanged(path, data, token))
    if written:
      return True
  raise storage.StorageError(f"{path}: changed during each of 5 attempts to add a line; is something rewriting it?")


def read_history(serving_dir):
  """The entries of `<serving_dir>/history.jsonl`, oldest first; [] when there is none. A line
  that is not a JSON object (edited by hand) is skipped with a warning naming it."""
  path = storage.join(serving_dir, HISTORY)
  try:
    text = storage.read_text(path)
  except FileNotFoundError:
    return []
  return _entries(text, path, warn=True)


def _entries(text, path, warn=False):
  entries = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      entry = json.loads(line)
    except ValueError:
      entry = None
    if not isinstance(entry, dict):
      if warn:
        logging.warning("%s:%d: not a JSON object; skipped", path, number)
      continue
    entries.append(entry)
  return entries


# An entry as the retrain writes it: "time" (ISO 8601, UTC), "decision" ("promoted" or
# "rejected"), "version" (promoted: the new version; rejected: the one kept, or null), "metric"
# (the name compared, e.g. "rmse"), "candidate", "production" and "baseline" (each the metric's
# value, or a dict of metrics holding it; null when there was none), "reason", "data".
_COLUMNS = ("time", "decision", "version", "metric", "candidate", "production", "baseline", "reason")


def history_table(entries):
  """The runs as a fixed-width table for a terminal, oldest first; the reason is last, unclipped."""
  rows = [[_time_text(e.get("time")), str(e.get("decision", "-")),
           "-" if e.get("version") is None else str(e["version"]), str(e.get("metric", "-")),
           *(_number_text(metric_value(e, key)) for key in ("candidate", "production", "baseline")),
           str(e.get("reason", ""))] for e in entries]
  widths = [max([len(name)] + [len(row[i]) for row in rows]) for i, name in enumerate(_COLUMNS)]
  right = {"version", "candidate", "production", "baseline"}
  lines = []
  for row in [list(_COLUMNS)] + rows:
    cells = [cell.rjust(width) if name in right else cell.ljust(width)
             for name, cell, width in zip(_COLUMNS, row, widths)]
    lines.append("  ".join(cells).rstrip())
  if not rows:
    lines.append("(no runs yet)")
  return "\n".join(lines)


def metric_value(entry, key):
  """The compared metric's value of entry[key] ("candidate", "production" or "baseline"), or None."""
  value = entry.get(key)
  if isinstance(value, dict):
    value = value.get(entry.get("metric"))
  return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _number_text(value):
  return "-" if value is None else f"{value:.5g}"


def _time_text(value):
  parsed = _parse_time(value)
  return parsed.strftime("%Y-%m-%d %H:%M") if parsed else str(value or "-")


def _parse_time(value):
  try:
    parsed = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
  except ValueError:
    return None
  return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def production_series(entries):
  """[(time, production's metric on that run's hold-out, its version, promoted that run?)] for the
  runs of the last entry's metric (a model that changed metric starts a new story): after a
  promotion the candidate's score, since it is production from then on."""
  series = []
  for when, entry in _runs(entries):
    promoted = entry.get("decision") == "promoted"
    value = metric_value(entry, "candidate" if promoted else "production")
    if value is not None:
      series.append((when, value, entry.get("version"), promoted))
  return series


def _runs(entries):
  """[(time, entry)] of the entries with a readable time and the last entry's metric."""
  metric = entries[-1].get("metric") if entries else None
  return [(t, e) for e in entries if e.get("metric") == metric for t in [_parse_time(e.get("time"))] if t]


def history_plot(entries, path):
  """A PNG at path (local or gs://) of production's metric run by run, each on that run's
  hold-out: the promotions marked with their version, rejected candidates as crosses, the
  baseline as dots."""
  import matplotlib
  matplotlib.use("Agg")  # retraining runs without a display
  import matplotlib.pyplot as plt

  metric = entries[-1].get("metric") if entries else None
  runs = _runs(entries)
  fig, ax = plt.subplots(figsize=(8, 4))
  production = production_series(entries)
  if production:
    ax.plot([t for t, *_ in production], [v for _, v, *_ in production], "-o", color="tab:blue", markersize=4,
            label="production")
    for t, value, version, promoted in production:
      if promoted:
        ax.annotate(f"v{version}", (t, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
  rejected = [(t, metric_value(e, "candidate")) for t, e in runs
              if e.get("decision") == "rejected" and metric_value(e, "candidate") is not None]
  if rejected:
    ax.plot(*zip(*rejected), "x", color="tab:red", markersize=8, label="rejected candidate")
  baseline = [(t, metric_value(e, "baseline")) for t, e in runs if metric_value(e, "baseline") is not None]
  if baseline:
    ax.plot(*zip(*baseline), ".", color="grey", label="baseline")
  if not runs:
    ax.text(0.5, 0.5, "no runs yet", ha="center", va="center", transform=ax.transAxes)
  else:
    ax.legend()
  ax.set(xlabel="run time (UTC)", ylabel=f"{metric or 'metric'} on each run's hold-out",
         title=f"Production {metric or 'metric'} over time")
  fig.autofmt_xdate()
  fig.tight_layout()
  with tempfile.TemporaryDirectory() as scratch:
    local = os.path.join(scratch, "history.png")
    fig.savefig(local, dpi=100)
    plt.close(fig)
    with open(local, "rb") as f:
      storage.write_bytes(path, f.read())
