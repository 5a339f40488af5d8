"""Every stop that carries an exit code becomes one line on stderr and that code."""

import signal

import pytest

from trainer import errors, storage
from trainer.errors import UserError


class Busy(errors.ServingBusy):
  pass


@pytest.mark.parametrize("error, code, line", [
    (UserError("--epochs must be at least 1"), 2, "retrain: error: --epochs must be at least 1"),
    (storage.StorageError("gs://b/x: bucket not found"), 170, "retrain: error: gs://b/x: bucket not found"),
    (errors.WorkerLost(OSError("Connection reset by peer")), 171, "retrain: another worker of this job was lost"),
    (errors.Preempted(signal.SIGTERM, 7, "ckpt-7"), 143, "retrain: stopped by SIGTERM at step 7"),
    (Busy("the serving folder is busy"), 172, "retrain: the serving folder is busy"),
])
def test_exiting_says_one_line_and_exits_with_the_code(capsys, error, code, line):
  with pytest.raises(SystemExit) as exit_:
    with errors.exiting("retrain"):
      raise error
  assert exit_.value.code == code
  (said,) = capsys.readouterr().err.splitlines()
  assert said.startswith(line), said


def test_anything_else_is_left_to_python():
  with pytest.raises(ZeroDivisionError):
    with errors.exiting():
      raise ZeroDivisionError
