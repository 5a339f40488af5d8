"""scripts/gpu_smoke.py on a host without a GPU: it says so, runs the checks the CPU can and prints one table."""

import os
import re
import sys
from pathlib import Path

import forked
import pytest

pytestmark = pytest.mark.slow  # trainer processes

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.py"
CPU_CHECKS = ["devices", "lstm", "lstm xla", "dense xla", "cnn b8", "cnn b32", "cnn mixed", "sigterm"]


def smoke(env=None):
  done = forked.run([sys.executable, SCRIPT, "--quick"], capture_output=True, text=True, timeout=900,
                    env={**os.environ, **(env or {})})
  # Each row: the check (may hold a space), two spaces or more, ok or FAIL, seconds, detail.
  rows = dict(re.match(r"(.+?) {2,}(ok|FAIL) ", line).groups() for line in done.stdout.splitlines()[1:])
  return done, rows


def test_without_a_gpu_it_says_so_runs_the_cpu_checks_and_exits_0():
  done, rows = smoke()
  assert done.returncode == 0, done.stdout + done.stderr[-3000:]
  assert done.stdout.splitlines()[0].split() == ["check", "result", "seconds", "detail"]
  assert rows == {name: "ok" for name in CPU_CHECKS}, done.stdout  # no bfloat16 GPU step
  assert "gpu_smoke: no GPU found" in done.stderr
  assert "XLA dropped, in one line" in done.stdout and "mixed_bfloat16, 2 replicas" in done.stdout


def test_any_failure_exits_1_after_the_whole_table():
  # A cluster environment the trainer refuses (exit 2, before TensorFlow starts) fails every trainer check fast.
  done, rows = smoke({"TF_CONFIG": "{not json"})
  assert done.returncode == 1, done.stdout + done.stderr[-3000:]
  assert rows == {"devices": "ok", **{name: "FAIL" for name in CPU_CHECKS[1:]}}, done.stdout
  assert "exit 2: trainer: error: TF_CONFIG" in done.stdout
  assert "gpu_smoke: failed: lstm, lstm xla" in done.stderr


def test_the_bfloat16_step_of_gpu_hosts_runs():
  # A GPU host's check of its own; here it runs on the CPU, which is enough to catch a broken step.
  done = forked.run([sys.executable, SCRIPT, "--bfloat16_step"], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert re.fullmatch(r"mixed_bfloat16, 1 replica\(s\), loss [0-9.]+", done.stdout.strip())
