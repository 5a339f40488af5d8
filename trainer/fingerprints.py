"""What data a job trained on, without reading it: the fingerprints of --data and --test_data
(data_fingerprint), kept in every checkpoint's state.json, so that a resume on other data is
refused (data_change), and in every export's metadata ("trained_on"), so that a retrain on the
data production was trained on already can be skipped (same_data, trainer.no_new_data).

No TensorFlow here: trainer.retrain compares fingerprints before it starts TensorFlow.
"""

import fnmatch
import hashlib
import os
import re

from trainer import storage


def data_fingerprint(config):
  """{flag: fingerprint} of --data and --test_data, kept in every state.json: a checkpoint is
  bound to the data it was trained on, not only to its path. A file: its storage.stat (size,
  checksum, time); a folder or glob of files: a hash of its listing (names and sizes). Taken
  before the data is read; with_extent adds what was read. None for built-in data or tfds:NAME
  (a versioned dataset)."""
  found = {}
  for flag in ("data", "test_data"):
    location = getattr(config, flag)
    if location and not location.startswith("tfds:"):
      found[flag] = {"path": location, **_fingerprint(location)}
  return found


def with_extent(fingerprint, summary):
  """A data_fingerprint with the rows and date range that prepare() read (summary), which the
  message of a change shows."""
  return {flag: {**found, **_extent(summary, flag)} for flag, found in fingerprint.items()}


def data_change(saved, now):
  """What changed in the data since a checkpoint's fingerprints (`saved`) were taken, as one
  clause naming the flag and file; None when nothing did or the checkpoint has none (older)."""
  for flag, before in (saved or {}).items():
    after = now.get(flag)
    if after is None or _contents(before)[0] is None or _contents(before) == _contents(after):
      continue
    differences = [f"{name} {before[name]} -> {after.get(name)}" for name in _SHOWN
                   if name in before and before[name] != after.get(name)]
    return (f"--{flag}={after['path']} changed since the checkpoint was written "
            f"({', '.join(differences) or 'same size and time, other contents'})")
  return None


def same_data(saved, now):
  """Whether every file of `now` (a data_fingerprint) holds what it held when `saved` was taken,
  for the same flags, whatever its path; False when either has nothing to compare (built-in
  data, tfds:NAME, a fingerprint from before a flag was fingerprinted)."""
  return bool(saved) and saved.keys() == now.keys() and all(
      _contents(saved[flag])[0] is not None and _contents(saved[flag]) == _contents(now[flag]) for flag in now)


def _contents(found):
  """(checksum or listing hash, size): what decides whether a fingerprinted file or folder changed."""
  key = "checksum" if "checksum" in found else "listing"
  return found.get(key), found.get("size")


# What a data change message shows, when it differs; the checksum or listing hash decides.
_SHOWN = ("rows", "first", "last", "files", "bytes", "size", "modified", "generation")
_WILDCARDS = re.compile(r"[*?[]")


def _fingerprint(location):
  if _WILDCARDS.search(location):
    if storage.is_remote(location):
      folder, pattern = location.rsplit("/", 1)
      sizes = {n: s for n, s in storage.list_sizes(folder).items() if "/" not in n and fnmatch.fnmatch(n, pattern)}
    else:
      sizes = {path: os.path.getsize(path) for path in storage.glob(location)}
  elif storage.is_dir(location):
    sizes = storage.list_sizes(location)
  else:
    return storage.stat(location)
  listing = "".join(f"{name}\t{size}\n" for name, size in sorted(sizes.items()))
  return {"files": len(sizes), "bytes": sum(sizes.values()), "listing": hashlib.sha256(listing.encode()).hexdigest()}


def _extent(summary, flag):
  """Rows and date range of --data (or rows of --test_data) as the data module read them."""
  split = summary.get("split", {})
  if flag == "test_data":
    rows = split.get("test", {}).get("rows", summary.get("test_images"))
    return {"rows": rows} if rows is not None else {}
  extent = {"rows": summary["rows"]} if "rows" in summary else {}
  dates = [(part["first"], part["last"]) for part in split.values() if "first" in part]
  if dates:
    extent.update(first=min(first for first, _ in dates), last=max(last for _, last in dates))
  return extent
