"""scripts/gpu_smoke.py on a host without a GPU: it says so, runs the checks the CPU can and prints one table."""

import importlib.util
import re
import subprocess
import sys
import types
from pathlib import Path

import forked
import pytest

pytestmark = pytest.mark.slow  # trainer processes

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_smoke.py"
CPU_CHECKS = ["devices", "lstm xla", "dense xla", "cnn mixed", "sigterm"]  # --quick's


def smoke(capsys, monkeypatch, env=None):
  """Runs the script's main(["--quick"]) here, its trainer processes forked from the suite's server
  (tests/forked.py: `python -m trainer.task` as a fresh process runs it, without importing TensorFlow
  again each time); returns (exit code, stdout, stderr, {check: ok or FAIL})."""
  for name, value in (env or {}).items():
    monkeypatch.setenv(name, value)
  spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  monkeypatch.setattr(script, "subprocess", types.SimpleNamespace(
      run=forked.run, Popen=forked.popen, PIPE=subprocess.PIPE, DEVNULL=subprocess.DEVNULL,
      TimeoutExpired=subprocess.TimeoutExpired))
  code = script.main(["--quick"])
  out, err = capsys.readouterr()
  # Each row: the check (may hold a space), two spaces or more, ok or FAIL, seconds, detail.
  rows = dict(re.match(r"(.+?) {2,}(ok|FAIL) ", line).groups() for line in out.splitlines()[1:])
  return code, out, err, rows


def test_without_a_gpu_it_says_so_runs_the_cpu_checks_and_exits_0(capsys, monkeypatch):
  code, out, err, rows = smoke(capsys, monkeypatch)
  assert code == 0, out + err[-3000:]
  assert out.splitlines()[0].split() == ["check", "result", "seconds", "detail"]
  assert rows == {name: "ok" for name in CPU_CHECKS}, out  # no bfloat16 GPU step
  assert "gpu_smoke: no GPU found" in err
  assert "XLA dropped, in one line" in out and "mixed_bfloat16, 2 replicas" in out


def test_any_failure_exits_1_after_the_whole_table(capsys, monkeypatch):
  # A cluster environment the trainer refuses (exit 2, before TensorFlow starts) fails every trainer check fast.
  code, out, err, rows = smoke(capsys, monkeypatch, {"TF_CONFIG": "{not json"})
  assert code == 1, out + err[-3000:]
  assert rows == {"devices": "ok", **{name: "FAIL" for name in CPU_CHECKS[1:]}}, out
  assert "exit 2: trainer: error: TF_CONFIG" in out
  assert "gpu_smoke: failed: lstm xla, dense xla" in err


def test_the_bfloat16_step_of_gpu_hosts_runs():
  # A GPU host's check of its own; here it runs on the CPU, which is enough to catch a broken step.
  done = forked.run([sys.executable, SCRIPT, "--bfloat16_step"], capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert re.fullmatch(r"mixed_bfloat16, 1 replica\(s\), loss [0-9.]+", done.stdout.strip())
