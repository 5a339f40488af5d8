"""scripts/chaos.py, short: a job on gs:// (the emulator) SIGKILLed twice at seeded random moments
ends with the weights and test metrics of an uninterrupted run, and no run prints a traceback."""

import importlib.util
import os
import subprocess
import types

import forked
import pytest

pytestmark = pytest.mark.slow  # trainer processes or whole trainings: not in the fast tier

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "chaos.py")


def test_a_job_killed_twice_ends_as_an_uninterrupted_one(capsys, monkeypatch):
  # The script's main runs here, its four trainer processes forked from the suite's server
  # (tests/forked.py: each runs `python -m trainer.task` as a fresh process would, without importing
  # TensorFlow again: ~35 s of the suite). It sets and removes STORAGE_EMULATOR_HOST for its own
  # emulator; monkeypatch gives the session's value back afterwards.
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "set-by-the-script")
  spec = importlib.util.spec_from_file_location("chaos", SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  monkeypatch.setattr(script, "subprocess", types.SimpleNamespace(Popen=forked.popen, DEVNULL=subprocess.DEVNULL))
  code = script.main(["--kills=2", "--seed=3", "--where=gcs", "--", "--model=dense", "--epochs=2",
                      "--checkpoint_every_steps=40", "--keep_checkpoints=1"])
  out, err = capsys.readouterr()
  assert code == 0 and out.strip().endswith("chaos: PASSED"), out + err[-3000:]
  assert out.count("gcs: run ") == 3  # two killed (or finished before the kill), then one to the end
  assert "identical to the uninterrupted run" in out
