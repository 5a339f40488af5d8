"""A serving folder as TF Serving reads it: `<serving_dir>/<integer version>/` SavedModels, of
which the highest complete one is in production, plus what retraining keeps beside them.

    <serving_dir>/<n>/             an export version (trainer.export), its trainer_export.json last
    <serving_dir>/.lease.json      who may change the folder now, and until when (trainer.serving_lease)
    <serving_dir>/history.jsonl    one line per retraining run (trainer.retrain_history)
    <serving_dir>/history.png      production's metric run by run (trainer.retrain_history)
    <serving_dir>/hold.json        promotions held by an operator, while it is there (trainer.hold)

Promotion never shows a poller a half-uploaded model: a version is staged under a hidden name
first (`.tmp-<n>-` locally, renamed into place; `.staging-` on gs://, copied into place on the
server, then saved_model.pb (what TF Serving waits for) and trainer_export.json (what
`production` waits for) uploaded last); killed between those two, the version is whole for TF
Serving but not production here until the next promotion replaces it with a higher number.
Everything that changes the folder (promote, retrain_history.append) assumes the caller holds the
Lease, and promote checks it before every publish and removal: the folder is read, decided on
and written in separate steps.
"""

import json
import os
import secrets
import tempfile

from absl import logging

from trainer import export, numbered, storage, transfer
from trainer.errors import UserError
from trainer.serving_lease import LeaseLost


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
