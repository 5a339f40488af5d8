"""A hold on a serving folder, `<serving_dir>/hold.json` ({"since", "by", "note"}): while it is
there, retrains still train, score and record their nights, but a candidate that would have been
promoted is recorded "held" instead (trainer.retraining), so production stays as an operator left
it. Set and cleared by trainer.operations under the serving folder's lease; retrains read it under
the same lease, so a hold set while a night trains applies to that night.

No TensorFlow here: holding must work in a second, and when the trainer cannot start.
"""

import json

from absl import logging

from trainer import storage

MARKER = "hold.json"
HELD = "held"


def read(serving_dir):
  """The hold's record, or None when promotions are not held. A marker that is not a record of
  this trainer (edited by hand) still holds: someone put it there to stop promotions."""
  path = storage.join(serving_dir, MARKER)
  try:
    text = storage.read_text(path)
  except FileNotFoundError:
    return None
  try:
    record = json.loads(text)
  except ValueError:
    record = None
  if not isinstance(record, dict):
    logging.warning("%s: not a hold record of this trainer; promotions are held until --release removes it", path)
    return {}
  return record


def put(serving_dir, record, lease):
  """Writes the marker (the caller holds lease: it is checked first)."""
  lease.check()
  storage.write_text(storage.join(serving_dir, MARKER), json.dumps(record, sort_keys=True))


def remove(serving_dir, lease):
  """Removes the marker (the caller holds lease: it is checked first)."""
  lease.check()
  storage.remove(storage.join(serving_dir, MARKER))


def describe(record):
  """One line for people: since when, by whom and why promotions are held."""
  note = f": {record['note']}" if record.get("note") else ""
  return f"promotions held since {record.get('since', '?')} by {record.get('by', '?')}{note}"


def withheld(record, reason):
  """The reason a night records "held": the hold, and why its candidate would have been promoted."""
  return f"{describe(record)}; would have been promoted: {reason}"
