"""The retraining history of a serving folder: `<serving_dir>/history.jsonl`, one JSON line per
retraining run (append, read), shown as a table for a terminal (table) and as a plot of
production's metric run by run (plot, `<serving_dir>/history.png`).

No TensorFlow here, and matplotlib only for the plot: the history is shown in a second.
"""

import datetime
import json
import os
import tempfile

from absl import logging

from trainer import bootstrap, conditional, storage

FILE = "history.jsonl"
PLOT = "history.png"


def append(serving_dir, entry):
  """Adds entry as the last line of `<serving_dir>/history.jsonl`, unless a line of the same
  entry["run"] is there already (a retry of a run killed after recording it); True if it wrote.
  Read, extended and written whole (gs:// has no append), only if nobody wrote in between (else
  read again): call it holding the Lease, but a writer that lost it unknowingly loses no line."""
  path = storage.join(serving_dir, FILE)
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


def read(serving_dir):
  """The entries of `<serving_dir>/history.jsonl`, oldest first; [] when there is none. A line
  that is not a JSON object (edited by hand) is skipped with a warning naming it."""
  path = storage.join(serving_dir, FILE)
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


# An entry as the retrain writes it: "time" (ISO 8601, UTC), "decision" ("promoted", "rejected",
# "held" or "skipped"), "version" (promoted: the new version; otherwise the one kept, or null), "metric"
# (the name compared, e.g. "rmse"), "candidate", "production" and "baseline" (each the metric's
# value, or a dict of metrics holding it; null when there was none), "reason", "data",
# "improvement_interval" ([low, high]: the candidate's relative improvement over production at
# bootstrap.CONFIDENCE; null without a production model to compare with). An operator's command
# (trainer.operations: "rollback", "hold", "release") writes no metric.
INTERVAL = f"improvement ({bootstrap.CONFIDENCE:.0%} CI)"
_COLUMNS = ("time", "decision", "version", "metric", "candidate", "production", "baseline", INTERVAL, "reason")


def table(entries):
  """The runs as a fixed-width table for a terminal, oldest first; the reason is last, unclipped."""
  rows = [[_time_text(e.get("time")), str(e.get("decision", "-")),
           "-" if e.get("version") is None else str(e["version"]), str(e.get("metric", "-")),
           *(_number_text(metric_value(e, key)) for key in ("candidate", "production", "baseline")),
           _interval_text(e.get("improvement_interval")), str(e.get("reason", ""))] for e in entries]
  widths = [max([len(name)] + [len(row[i]) for row in rows]) for i, name in enumerate(_COLUMNS)]
  right = {"version", "candidate", "production", "baseline", INTERVAL}
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


def _interval_text(value):
  try:
    low, high = value
    return f"[{low:+.2%}, {high:+.2%}]"
  except (TypeError, ValueError):
    return "-"


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
  """[(time, entry)] of the entries with a readable time and the last run's metric."""
  metric = _metric(entries)
  return [(t, e) for e in entries if e.get("metric") == metric for t in [_parse_time(e.get("time"))] if t]


def _metric(entries):
  """The metric of the last entry that has one: an operator's command after it has none."""
  return next((e["metric"] for e in reversed(entries) if e.get("metric")), None)


def plot(entries, path):
  """A PNG at path (local or gs://) of production's metric run by run, each on that run's
  hold-out: the promotions marked with their version, rejected (red) and held (orange) candidates
  as crosses, the baseline as dots."""
  import matplotlib
  matplotlib.use("Agg")  # retraining runs without a display
  import matplotlib.pyplot as plt

  metric = _metric(entries)
  runs = _runs(entries)
  fig, ax = plt.subplots(figsize=(8, 4))
  production = production_series(entries)
  if production:
    ax.plot([t for t, *_ in production], [v for _, v, *_ in production], "-o", color="tab:blue", markersize=4,
            label="production")
    for t, value, version, promoted in production:
      if promoted:
        ax.annotate(f"v{version}", (t, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
  for decision, color in (("rejected", "tab:red"), ("held", "tab:orange")):
    candidates = [(t, metric_value(e, "candidate")) for t, e in runs
                  if e.get("decision") == decision and metric_value(e, "candidate") is not None]
    if candidates:
      ax.plot(*zip(*candidates), "x", color=color, markersize=8, label=f"{decision} candidate")
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
