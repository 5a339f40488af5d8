"""The lease of a serving folder, `<serving_dir>/.lease.json`: which retrain may change the folder
now, and until when. Of two processes racing for it exactly one wins; a crashed holder blocks
others for its time to live at most; expiry is judged by the storage's clock, never a host's.
"""

import datetime
import json
import secrets
import threading
import time

from absl import logging

from trainer import conditional, errors, storage

LEASE = ".lease.json"
DEFAULT_TTL_SECONDS = 3600


class LeaseHeld(errors.ServingBusy):
  """Another process holds the serving folder's lease: not a mistake, someone else's turn; the
  same command run later goes on (a retry resumes the trained candidate from its checkpoint)."""

  def __init__(self, path, owner, expires, left=None):
    self.path, self.owner, self.expires = path, owner, expires
    left = max(0, expires - time.time() if left is None else left)
    left = f"{left:.0f} s" if left < 120 else f"{left / 60:.0f} min"
    super().__init__(f"{path} is held by {owner} until {_utc(expires)} ({left} from now): another retrain is "
                     "running, or one crashed and its lease runs out then")


class LeaseLost(errors.ServingBusy):
  """The lease this process held has been released or taken over (it expired)."""


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
