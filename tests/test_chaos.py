"""scripts/chaos.py, short: a job on gs:// (the emulator) SIGKILLed twice at seeded random moments
ends with the weights and test metrics of an uninterrupted run, and no run prints a traceback."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # trainer processes or whole trainings: not in the fast tier

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "chaos.py")


def test_a_job_killed_twice_ends_as_an_uninterrupted_one():
  done = subprocess.run([sys.executable, SCRIPT, "--kills=2", "--seed=3", "--where=gcs", "--", "--model=dense",
                         "--epochs=2", "--checkpoint_every_steps=40", "--keep_checkpoints=1"],
                        capture_output=True, text=True, timeout=900)
  assert done.returncode == 0 and done.stdout.strip().endswith("chaos: PASSED"), done.stdout + done.stderr[-3000:]
  assert done.stdout.count("gcs: run ") == 3  # two killed (or finished before the kill), then one to the end
  assert "identical to the uninterrupted run" in done.stdout
