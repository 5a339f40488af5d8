"""An operator's commands on a serving folder (`python -m trainer.retrain --serving_dir=DIR` with
--rollback_to=V, --hold or --release): roll production back to a kept version, hold promotions,
release them. Each waits for the serving folder's lease as a retrain does, changes the folder
under it, and records itself in the history ("rollback", "hold", "release").

A rollback republishes version V (promotion.promote) as a new, highest number: TF Serving
serves the highest version, and a number it has seen is never reused (it would not load it
again). The copy is known by a run identity of the rollback's own, not V's, so that a retry of
the job that once promoted V never takes the copy for its own promotion.

No TensorFlow here: a rollback is what an operator runs when a model misbehaves, in seconds.
"""

import datetime
import getpass
import os
import secrets
import socket

from trainer import hold as holding
from trainer import export, promotion, retrain_history, serving_lease, storage
from trainer.errors import UserError

ROLLBACK, HOLD, RELEASE = "rollback", "hold", "release"


def operate(serving_dir, rollback_to=None, hold=False, release=False, note=None, keep_versions=5,
            lease_ttl_seconds=300, lease_wait_seconds=900):
  """Under the serving folder's lease: holds, rolls back to version rollback_to, releases (a hold
  first, so no retrain promotes between the rollback and the hold; a release last). Returns a line
  for each ("<decision>: <reason>"); each change is one history entry, a step with nothing to do
  ("held already") none. UserError, before any change, when rollback_to is not a kept version."""
  if hold and release:
    raise UserError("--hold and --release: give one (--hold holds promotions, --release resumes them)")
  if rollback_to is None and not hold and not release:
    raise UserError("nothing to do: give --rollback_to=V, --hold or --release (--note is their reason)")
  by = _operator()
  asked = " ".join(flag for flag, given in ((f"--rollback_to={rollback_to}", rollback_to is not None),
                                            ("--hold", hold), ("--release", release)) if given)
  owner = f"{by} pid {os.getpid()} ({asked})"
  with serving_lease.Lease(serving_dir, owner, lease_ttl_seconds, lease_wait_seconds, keep_alive=True) as lease:
    kept = _kept(serving_dir, rollback_to) if rollback_to is not None else None  # refused before any change
    said = []
    if hold:
      said.append(_hold(serving_dir, by, note, lease))
    if rollback_to is not None:
      said.append(_rollback(serving_dir, rollback_to, kept, by, note, keep_versions, lease))
    if release:
      said.append(_release(serving_dir, by, note, lease))
  return said


def _hold(serving_dir, by, note, lease):
  held = holding.read(serving_dir)
  if held is not None:
    return f"{HOLD}: nothing to do, {holding.describe(held)} (--release, then --hold, to change its note)"
  record = {"since": _now(), "by": by, "note": note}
  holding.put(serving_dir, record, lease)
  reason = f"promotions held by {by}{_said(note)}"
  return _record(serving_dir, lease, HOLD, reason, by=by, note=note)


def _release(serving_dir, by, note, lease):
  held = holding.read(serving_dir)
  if held is None:
    return f"{RELEASE}: nothing to do, promotions are not held"
  holding.remove(serving_dir, lease)
  reason = f"promotions released by {by}{_said(note)} ({holding.describe(held)})"
  return _record(serving_dir, lease, RELEASE, reason, by=by, note=note, released=held)


def _kept(serving_dir, version):
  """The complete versions, ascending; UserError unless version is one of them."""
  kept = promotion.complete_versions(serving_dir)
  if version not in kept:
    listed = ", ".join(map(str, kept)) or "none"
    raise UserError(f"--rollback_to={version}: {storage.join(serving_dir, str(version))} is not a version kept there "
                    f"(kept: {listed}); give one of those")
  return kept


def _rollback(serving_dir, version, kept, by, note, keep_versions, lease):
  production = export.read_metadata(storage.join(serving_dir, str(kept[-1])))
  run = production.get("run")
  if kept[-1] == version:
    return f"{ROLLBACK}: nothing to do, version {version} is production"
  if isinstance(run, dict) and run.get("rollback_to") == version:  # a retry of a rollback that got this far
    return f"{ROLLBACK}: nothing to do, production (version {kept[-1]}) is version {version} republished"
  run = {"rollback_to": version, "id": secrets.token_hex(8)}
  folder = promotion.promote(storage.join(serving_dir, str(version)), serving_dir, keep_versions, lease, run=run)
  new = int(os.path.basename(folder))
  reason = f"version {version} republished as version {new} by {by}{_said(note)} (production was version {kept[-1]})"
  return _record(serving_dir, lease, ROLLBACK, reason, version=new, production_version=kept[-1], rollback_to=version,
                 by=by, note=note, run=run)


def _record(serving_dir, lease, decision, reason, version=None, **fields):
  """Appends the history entry of one step; returns its line."""
  if version is None:  # the version in production after it
    version = next(reversed(promotion.complete_versions(serving_dir)), None)
  entry = {"time": _now(), "decision": decision, "version": version, "reason": reason, **fields}
  lease.check()
  retrain_history.append(serving_dir, entry)
  return f"{decision}: {reason}"


def _said(note):
  return f": {note}" if note else ""


def _now():
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _operator():
  """Who runs the command, as the history and the lease say it: user@host."""
  try:
    user = getpass.getuser()
  except (KeyError, OSError):  # a container's uid without a name
    user = f"uid {os.getuid()}"
  return f"{user}@{socket.gethostname()}"
