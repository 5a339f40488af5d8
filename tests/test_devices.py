"""trainer.devices: no XLA for cuDNN's recurrent layers, --deterministic, and what a job says at start
about TensorFlow's build and its GPUs (here: none)."""

import os
import subprocess
import sys

import forked
import pytest

from trainer.models import MODELS

NOT_FOR_THIS_MODEL = "--jit_compile: not for this model"


@pytest.mark.parametrize("model, bidirectional, compiled", [
    ("lstm", False, False), ("gru", False, False), ("lstm", True, False), ("dense", False, True), ("cnn", False, True)])
def test_models_with_cudnn_recurrent_layers_are_not_xla_compiled(model, bidirectional, compiled):
  from trainer import devices
  # On a CPU Keras marks these layers supports_jit=True: the layer type decides, as on a GPU.
  shape = {"dense": (5,), "cnn": (32, 32, 3)}.get(model, (10, 1))
  assert devices.jit_compile(MODELS[model](shape, 1, bidirectional), True) is compiled
  assert devices.jit_compile(MODELS[model](shape, 1, bidirectional), False) is False


def trainer(tmp_path, *flags, env=None):
  done = forked.run([sys.executable, "-m", "trainer.task", f"--job_dir={tmp_path / 'job'}", "--epochs=1", *flags],
                    cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("model, flags, dropped", [
    ("lstm", ["--window=5", "--batch_size=64"], "its LSTM layers run cuDNN kernels on a GPU"),
    ("dense", [], None)])
def test_jit_compile_is_dropped_for_an_lstm_in_one_line(tmp_path, prices_csv, model, flags, dropped):
  if model == "lstm":
    flags += [f"--data={prices_csv(rows=120)}", "--target_column=Close", "--date_column=Date"]
  # XLA writes each module it compiles there: the gradient's, when the step is compiled.
  stderr = trainer(tmp_path, f"--model={model}", "--jit_compile", *flags,
                   env={"XLA_FLAGS": f"--xla_dump_to={tmp_path / 'xla'}"})
  lines = [line for line in stderr.splitlines() if NOT_FOR_THIS_MODEL in line]
  assert len(lines) == (1 if dropped else 0), stderr[-3000:]
  assert not dropped or dropped in lines[0]
  assert bool(list(tmp_path.glob("xla/*_gradients_*"))) == (not dropped)


@pytest.mark.slow
def test_deterministic_runs_deterministic_ops_drops_xla_and_may_change_on_resume(tmp_path):
  stderr = trainer(tmp_path, "--model=dense", "--deterministic", "--jit_compile")
  assert "--deterministic: TensorFlow ops run deterministically" in stderr, stderr[-3000:]
  assert "--jit_compile: not with --deterministic" in stderr
  # Not part of the job's identity: the checkpoint restores the same without it.
  stderr = trainer(tmp_path, "--model=dense", "--epochs=2")
  assert "resuming from" in stderr and "--deterministic" not in stderr, stderr[-3000:]


@pytest.mark.slow
def test_a_fresh_job_says_its_build_and_that_no_gpu_was_found(tmp_path):
  """Start-up itself, so a fresh process. TensorFlow's CUDA build prints "failed call to cuInit" and
  "Could not find cuda drivers" before anything else on a host without a GPU, whatever
  TF_CPP_MIN_LOG_LEVEL below 3 says (trainer.devices.describe): one line says what they mean."""
  done = subprocess.run([sys.executable, "-m", "trainer.task", "--model=dense", "--epochs=1",
                         f"--job_dir={tmp_path / 'job'}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  lines = [line for line in done.stderr.splitlines() if "no GPU found" in line]
  assert len(lines) == 1, done.stderr[-3000:]
  assert "TensorFlow 2." in lines[0] and "training on the CPU" in lines[0]
  if "failed call to cuInit" in done.stderr or "Could not find cuda drivers" in done.stderr:
    assert "CUDA 12" in lines[0] and "TensorFlow's CUDA lines above say only that" in lines[0]
