"""The serving folder's lease (trainer.serving_lease) on a local folder and on gs:// (the emulator,
behind conftest's proxy that adds the generation preconditions it ignores), against real racing
processes and hosts whose clocks are off."""

import json
import logging
import subprocess
import sys
import threading
import time

import pytest

from trainer import conditional, serving_lease, storage


def lease_record(serving_dir):
  return json.loads(storage.read_text(storage.join(serving_dir, serving_lease.LEASE)))


def write_lease(serving_dir, owner, expires):
  storage.write_text(storage.join(serving_dir, serving_lease.LEASE),
                     json.dumps({"owner": owner, "token": "theirs", "acquired": expires - 60, "expires": expires}))


def test_a_held_lease_blocks_until_released_or_expired(root):
  first = serving_lease.Lease(root, "retrain-a", ttl_seconds=600).acquire()
  record = lease_record(root)
  assert record["owner"] == "retrain-a" and abs(record["expires"] - time.time() - 600) < 30
  assert record["acquired"] <= time.time()
  second = serving_lease.Lease(root, "retrain-b")
  with pytest.raises(serving_lease.LeaseHeld) as held:
    second.acquire()
  message = str(held.value)
  assert "\n" not in message
  assert message.startswith(f"{storage.join(root, serving_lease.LEASE)} is held by retrain-a until ")
  assert held.value.owner == "retrain-a" and held.value.expires == record["expires"]
  first.renew()
  assert lease_record(root)["expires"] >= record["expires"] and lease_record(root)["acquired"] == record["acquired"]
  assert first.release() and not storage.exists(storage.join(root, serving_lease.LEASE))
  second.acquire()
  assert lease_record(root)["owner"] == "retrain-b"
  assert not first.release()  # not ours: left alone
  assert lease_record(root)["owner"] == "retrain-b"

  # A crashed holder's lease runs out; the next one takes over and the old holder learns it.
  write_lease(root, "crashed", time.time() - 1)
  third = serving_lease.Lease(root, "retrain-c").acquire()
  assert lease_record(root)["owner"] == "retrain-c"
  with pytest.raises(serving_lease.LeaseLost, match="now held by retrain-c"):
    second.renew()
  # A lease that is not one (edited by hand) does not block forever either.
  storage.write_text(storage.join(root, serving_lease.LEASE), "not json")
  serving_lease.Lease(root, "retrain-d").acquire()
  with pytest.raises(serving_lease.LeaseLost, match="now held by retrain-d"):
    third.renew()


@pytest.fixture
def store_clock(monkeypatch):
  """The storage's clock as a lease judges expiry by it (conditional.store_time), set by the test:
  clock["since"] seconds after the lease file was last written, however long it really was."""
  clock = {"since": 0.0}

  def store_time(probe):
    lease = probe[:-len(".lock")]  # Lease asks for the time with its lock file as the probe
    return conditional.read_stamped(lease)[2] + clock["since"]
  monkeypatch.setattr(conditional, "store_time", store_time)
  return clock


class Clock:
  """time as serving_lease sees it: monotonic() and sleep() advance a number, instantly; then()
  runs a callback at the first sleep (what another process does meanwhile)."""

  def __init__(self):
    self.now, self.slept, self.then = 0.0, [], None

  def monotonic(self):
    return self.now

  def sleep(self, seconds):
    self.slept.append(seconds)
    self.now += seconds
    if self.then:
      self.then, then = None, self.then
      then()

  time = staticmethod(time.time)


def test_the_keep_alive_thread_renews_the_lease(root, store_clock, monkeypatch):
  renewed = threading.Event()
  replace = conditional.replace_if_unchanged

  def observed(path, data, token):
    done = replace(path, data, token)
    if done and threading.current_thread().name == "lease-renewer":
      renewed.set()
    return done
  monkeypatch.setattr(conditional, "replace_if_unchanged", observed)
  with serving_lease.Lease(root, "long", ttl_seconds=1, keep_alive=True) as lease:
    first = lease_record(root)
    assert renewed.wait(timeout=120), "the keep-alive thread never renewed the lease"
    assert lease_record(root)["expires"] > first["expires"] and lease_record(root)["token"] == first["token"]
    lease.renew()  # by the caller too, beside the renewing thread
    store_clock["since"] = 0.5  # within the ttl of the last renewal
    with pytest.raises(serving_lease.LeaseHeld, match="held by long"):
      serving_lease.Lease(root, "short").acquire()
  assert not storage.exists(storage.join(root, serving_lease.LEASE))


def test_waiting_for_a_lease_tries_until_wait_seconds_then_gives_up(root, store_clock, monkeypatch):
  clock = Clock()
  monkeypatch.setattr(serving_lease, "time", clock)
  holder = serving_lease.Lease(root, "holder").acquire()
  with pytest.raises(serving_lease.LeaseHeld):
    serving_lease.Lease(root, "impatient", wait_seconds=2.5).acquire()
  assert clock.slept == [1, 1, 0.5]  # polled each second, the last try at the deadline
  clock.slept, clock.then = [], holder.release  # released while the next one waits
  with serving_lease.Lease(root, "patient", wait_seconds=10):
    assert lease_record(root)["owner"] == "patient"
  assert clock.slept == [1]
  # Expired without a renewal: anyone may take it.
  serving_lease.Lease(root, "brief", ttl_seconds=0.3).acquire()
  store_clock["since"] = 0.2
  with pytest.raises(serving_lease.LeaseHeld, match="held by brief"):
    serving_lease.Lease(root, "early").acquire()
  store_clock["since"] = 0.4
  serving_lease.Lease(root, "next").acquire()
  assert lease_record(root)["owner"] == "next"


# Run as `python race.py <root> <name> <rounds> <go file>`: says READY; then for each round waits
# for `<go file>-<round>` and tries for the lease of <root>/<round> (fresh-<k>: none there;
# stale-<k>: an expired one), saying "<round> won" or "<round> held <message>".
RACE = '''
import os, sys, time
from trainer import serving_lease, storage

root, name, rounds, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
storage.exists(root)  # the client made and its imports done, so that both start at full speed
print("READY", flush=True)
for key in [f"{kind}-{k}" for kind in ("fresh", "stale") for k in range(rounds)]:
  while not os.path.exists(f"{go}-{key}"):
    time.sleep(0.0005)
  try:
    serving_lease.Lease(storage.join(root, key), name).acquire()
    print(key, "won", flush=True)
  except serving_lease.LeaseHeld as e:
    print(key, "held", e, flush=True)
'''


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_two_processes_racing_for_the_lease_never_both_win(root, tmp_path):
  rounds = 8
  for k in range(rounds):
    write_lease(storage.join(root, f"stale-{k}"), "crashed", time.time() - 1)
  script, go = tmp_path / "race.py", tmp_path / "go"
  script.write_text(RACE)
  racers = {name: subprocess.Popen([sys.executable, str(script), root, name, str(rounds), str(go)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for name in ("racer-a", "racer-b")}
  try:
    for process in racers.values():
      assert process.stdout.readline().strip() == "READY", process.stderr.read()
    for key in [f"{kind}-{k}" for kind in ("fresh", "stale") for k in range(rounds)]:
      (tmp_path / f"go-{key}").write_text("")  # both start this round at once
      outcomes = {}
      for name, process in racers.items():
        line = process.stdout.readline().rstrip("\n")
        assert line.startswith(key + " "), (name, line, process.stderr.read() if not line else "")
        outcomes[name] = line[len(key) + 1:]
      won = [name for name, outcome in outcomes.items() if outcome == "won"]
      assert len(won) == 1, (key, outcomes)
      (loser,) = set(racers) - set(won)
      assert outcomes[loser].startswith(f"held {storage.join(root, key, serving_lease.LEASE)} is held by {won[0]} ")
      assert lease_record(storage.join(root, key))["owner"] == won[0]
  finally:
    for process in racers.values():
      process.kill()
      process.wait()


# Run as `python clock.py <offset seconds> <root> <owner> <ttl> <wait seconds>`: this host's
# clock is <offset> seconds off; tries for the lease of <root>, saying "won" or "held <message>".
CLOCK = '''
import sys, time
offset = float(sys.argv[1])
real = time.time
time.time = lambda: real() + offset
from trainer import serving_lease
try:
  serving_lease.Lease(sys.argv[2], sys.argv[3], ttl_seconds=float(sys.argv[4]),
                      wait_seconds=float(sys.argv[5])).acquire()
  print("won", flush=True)
except serving_lease.LeaseHeld as e:
  print("held", e, flush=True)
'''


@pytest.mark.slow  # over 2 CPU-seconds: the fast tier stays under 2 minutes
def test_lease_expiry_is_judged_by_the_store_clock_not_the_hosts(root, tmp_path):
  script = tmp_path / "clock.py"
  script.write_text(CLOCK)

  def acquire(offset, owner, wait=0):
    done = subprocess.run([sys.executable, str(script), str(offset), root, owner, "300", str(wait)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()

  lease = storage.join(root, serving_lease.LEASE)
  serving_lease.Lease(root, "fresh", ttl_seconds=300).acquire()
  assert acquire(600, "ahead").startswith("held ")  # ten minutes ahead: the lease is still fresh
  assert lease_record(root)["owner"] == "fresh"
  storage.remove(lease)
  assert acquire(-600, "behind") == "won"  # its record says it ran out five minutes ago, by our clock
  with pytest.raises(serving_lease.LeaseHeld, match="held by behind"):
    serving_lease.Lease(root, "here").acquire()
  storage.remove(lease)
  # A lease does run out by the store's clock: a second after it was written, for a host behind too.
  serving_lease.Lease(root, "brief", ttl_seconds=1).acquire()
  assert acquire(-600, "patient", wait=60) == "won"


def test_a_failing_release_does_not_mask_the_error_that_ended_the_block(root, monkeypatch, caplog):
  def unreachable(path, token):
    raise storage.StorageError(f"cannot remove {path}: Connection refused")

  with caplog.at_level(logging.ERROR), pytest.raises(ValueError, match="the real failure"):
    with serving_lease.Lease(root, "holder"):
      monkeypatch.setattr(conditional, "remove_if_unchanged", unreachable)
      raise ValueError("the real failure")
  assert "could not release" in caplog.text and "Connection refused" in caplog.text
  # With nothing else failing, a failed release is the failure.
  monkeypatch.undo()
  with pytest.raises(storage.StorageError, match="Connection refused"):
    with serving_lease.Lease(storage.join(root, "other"), "holder"):
      monkeypatch.setattr(conditional, "remove_if_unchanged", unreachable)
