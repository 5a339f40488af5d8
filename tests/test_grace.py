"""The preemption grace (--preemption_grace_seconds): a checkpoint save that takes longer than a
preempted pod is given is said once, before a preemption finds out; and after a SIGTERM, a save
still running at the grace's end is said when it ends (README "Resume, preemption and exit codes")."""

import itertools
import logging
import os
import re
import signal
import subprocess
import sys
import time
import types

import linear
import pytest
import tensorflow as tf
from processes import Job, stalled

from trainer import checkpoints as checkpoints_lib
from trainer import config as config_lib
from trainer import loop
from trainer.checkpoints import Checkpoints
from trainer.errors import UserError
from trainer.models import MODELS, OPTIMIZERS
from trainer.preemption import StopSignal


def warnings(caplog):
  return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def test_a_save_longer_than_the_grace_is_said_once(tmp_path, monkeypatch, caplog):
  # A clock offset, not a slow save: the saves' clock gains 20 s at every reading, so each save of
  # this run seems to take 20 s, 5 more than the grace.
  offset = itertools.count(step=20)
  monkeypatch.setattr(checkpoints_lib, "time", types.SimpleNamespace(monotonic=lambda: time.monotonic() + next(offset)))
  model, optimizer = MODELS["dense"]((5,)), OPTIMIZERS["dense"](1e-2)
  optimizer.build(model.trainable_variables)
  with caplog.at_level(logging.INFO, logger="absl"), StopSignal(grace_seconds=15) as stop:
    loop.fit(model, optimizer, loop.squared_error, linear.make(rows=256), tf.distribute.get_strategy(), 32, 3, 3,
             checkpointing=loop.Checkpointing(Checkpoints(str(tmp_path), model, optimizer), stop=stop))
  assert len([r for r in caplog.records if " saved (epoch" in r.getMessage()]) == 3
  said = warnings(caplog)
  assert len(said) == 1, said
  # 20 s and the save's own time.
  assert re.match(rf"checkpoint {re.escape(str(tmp_path / 'ckpt-8'))} took 2\d\.\d s to save, longer than "
                  r"--preemption_grace_seconds=15: a preemption would kill the job", said[0]), said[0]
  assert "README" in said[0]


@pytest.mark.parametrize("grace, said", [(-1, "--preemption_grace_seconds must be 0 (no warnings) or more (got -1)"),
                                         (float("nan"), "--preemption_grace_seconds must be 0")])
def test_a_negative_grace_is_refused(grace, said):
  with pytest.raises(UserError, match=r"^" + said.replace("(", r"\(").replace(")", r"\)")):
    config_lib.Config(preemption_grace_seconds=grace)


@pytest.mark.slow  # a trainer process
def test_a_save_still_running_at_the_grace_deadline_after_sigterm_is_said(tmp_path):
  """The first step checkpoint is held at its rename into place (a save that would outlast the grace);
  a SIGTERM then asks for the signal's checkpoint, which waits for it: once the grace has passed
  since the signal, one line says which save is still running."""
  job_dir = tmp_path / "job"
  job = Job(["--model=dense", "--epochs=2", "--checkpoint_every_steps=50", "--preemption_grace_seconds=1",
             f"--job_dir={job_dir}"], command=stalled("trainer.task", rename=r"/ckpt-50$"))
  job.wait_for("^STALLED .*ckpt-50 in thread checkpoint saves")
  job.signal(signal.SIGTERM)
  line = job.wait_for("SIGTERM|still", timeout=120)
  assert "SIGTERM received" in line, job.stderr[-3000:]
  line = job.wait_for("preemption_grace_seconds", timeout=120)
  assert (f"checkpoint {job_dir / 'checkpoints' / 'ckpt-50'} is still being saved 1 s after SIGTERM "
          "(--preemption_grace_seconds=1)") in line, job.stderr[-3000:]
  job.signal(signal.SIGKILL)
  assert job.finish() == -signal.SIGKILL


def test_a_job_stopped_by_a_signal_leaves_its_objects_to_the_operating_system_at_exit():
  # Interpreter shutdown garbage-collects every object TensorFlow and Keras made: 7 of a dense job's 10 s
  # from SIGTERM to exit on gs:// (BENCHMARKS.md "Preemption"), time a preempted pod does not have.
  # gc.freeze() at exit skips them; the first exit handler registered runs last, after the trainer's.
  script = ("import atexit, gc, os, signal\n"
            "from trainer.preemption import StopSignal\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count() > 0))\n"
            "with StopSignal():\n"
            "  os.kill(os.getpid(), signal.SIGTERM)\n")
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "frozen True", done.stderr
  assert "SIGTERM received" in done.stderr


def test_a_job_still_running_at_the_grace_deadline_says_so_and_a_ctrl_c_has_no_deadline(caplog):
  with caplog.at_level(logging.WARNING, logger="absl"):
    with StopSignal(grace_seconds=0.1) as stop:
      os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, on this thread
      deadline = time.monotonic() + 60
      while not [r for r in caplog.records if "still running" in r.getMessage()] and time.monotonic() < deadline:
        time.sleep(0.05)
    with StopSignal(grace_seconds=0.1) as interrupted:
      os.kill(os.getpid(), signal.SIGINT)
  assert stop.saving is None
  assert warnings(caplog)[1].startswith("still running 0.1 s after SIGTERM (--preemption_grace_seconds=0.1): a "
                                         "preempted node kills the job about now"), warnings(caplog)
  assert interrupted.signum == signal.SIGINT and interrupted._deadline is None  # noqa: SLF001
