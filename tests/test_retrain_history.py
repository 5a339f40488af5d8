"""The retraining history (trainer.retrain_history) on a local folder and on gs://: appends that
lose no line to a concurrent writer, the table and the plot."""

import json
import re

from trainer import conditional, retrain_history, storage


def test_append_history_loses_no_line_to_a_concurrent_writer_and_records_a_run_once(root, monkeypatch):
  path = storage.join(root, retrain_history.FILE)
  retrain_history.append(root, {"decision": "promoted", "run": "night-1"})
  reads = {"read_text": storage.read_text, "read_with_token": conditional.read_with_token}

  def then_another_writer(name):
    def read(p, *args):
      got = reads[name](p, *args)
      if p == path and not reads.get("done"):
        reads["done"] = True  # a writer that lost its lease without knowing, between our read and write
        storage.write_text(path, reads["read_text"](path) + json.dumps({"decision": "other"}) + "\n")
      return got
    return read

  for module, name in ((storage, "read_text"), (conditional, "read_with_token")):
    monkeypatch.setattr(module, name, then_another_writer(name))
  retrain_history.append(root, {"decision": "rejected", "run": "night-2"})
  monkeypatch.undo()
  assert [e["decision"] for e in retrain_history.read(root)] == ["promoted", "other", "rejected"]
  # A retry of night 2 (killed after it wrote its line) adds nothing.
  retrain_history.append(root, {"decision": "rejected", "run": "night-2", "reason": "again"})
  assert [e["decision"] for e in retrain_history.read(root)] == ["promoted", "other", "rejected"]


HISTORY = [
    {"time": "2025-03-01T03:00:00+00:00", "decision": "promoted", "version": 1, "metric": "rmse",
     "candidate": {"rmse": 9.5, "mae": 7.0}, "production": None, "baseline": {"rmse": 9.8},
     "reason": "no production model yet", "data": {"first": "2010-01-04", "last": "2025-02-28"}},
    {"time": "2025-03-02T03:00:00+00:00", "decision": "rejected", "version": 1, "metric": "rmse",
     "candidate": {"rmse": 9.7}, "production": {"rmse": 9.4}, "baseline": {"rmse": 9.8},
     "reason": "candidate rmse 9.7 is not better than production's 9.4"},
    {"time": "2025-03-03T03:00:00Z", "decision": "promoted", "version": 2, "metric": "rmse",
     "candidate": 9.1, "production": 9.4, "baseline": 9.7, "improvement_interval": [0.0123, 0.0541],
     "reason": "3.2% better than production"},
]


def test_history_round_trip_table_and_plot(root):
  assert retrain_history.read(root) == []
  for entry in HISTORY:
    retrain_history.append(root, entry)
  assert retrain_history.read(root) == HISTORY
  text = storage.read_text(storage.join(root, retrain_history.FILE))
  assert len(text.splitlines()) == 3 and text.endswith("\n")

  table = retrain_history.table(retrain_history.read(root)).splitlines()
  assert re.split(r"\s{2,}", table[0]) == ["time", "decision", "version", "metric", "candidate", "production",
                                           "baseline", "improvement (95% CI)", "reason"]
  assert re.split(r"\s{2,}", table[1]) == ["2025-03-01 03:00", "promoted", "1", "rmse", "9.5", "-", "9.8", "-",
                                           "no production model yet"]
  assert re.split(r"\s{2,}", table[3])[:8] == ["2025-03-03 03:00", "promoted", "2", "rmse", "9.1", "9.4", "9.7",
                                               "[+1.23%, +5.41%]"]
  assert len({line.index("reason" if i == 0 else HISTORY[i - 1]["reason"]) for i, line in enumerate(table)}) == 1
  assert retrain_history.table([]).splitlines()[-1] == "(no runs yet)"

  # Production's metric each night: the new model's score on promotion nights, else production's.
  assert [(t.day, value, version, promoted) for t, value, version, promoted in
          retrain_history.production_series(retrain_history.read(root))] == [(1, 9.5, 1, True), (2, 9.4, 1, False),
                                                                     (3, 9.1, 2, True)]
  plot = storage.join(root, "history.png")
  retrain_history.plot(retrain_history.read(root), plot)
  assert storage.read_bytes(plot).startswith(b"\x89PNG\r\n\x1a\n")
  retrain_history.plot([], plot)
  assert storage.read_bytes(plot).startswith(b"\x89PNG")

  # A line broken by hand is skipped with a warning; later appends still work.
  storage.write_text(storage.join(root, retrain_history.FILE), text + "{broken\n")
  retrain_history.append(root, {"decision": "rejected"})
  assert retrain_history.read(root) == HISTORY + [{"decision": "rejected"}]
