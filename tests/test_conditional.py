"""Conditional writes (trainer.conditional) on a local folder and on gs:// (the emulator, behind
conftest's proxy that adds the generation preconditions it ignores)."""

import pytest

from trainer import conditional, storage


def test_conditional_writes(root):
  path = storage.join(root, "lock.json")
  with pytest.raises(FileNotFoundError):
    conditional.read_with_token(path)
  assert conditional.create_exclusive(path, b"first")
  assert not conditional.create_exclusive(path, b"second")
  data, token = conditional.read_with_token(path)
  assert data == b"first"
  assert conditional.replace_if_unchanged(path, b"third", token)
  assert not conditional.replace_if_unchanged(path, b"fourth", token)  # changed since token was read
  assert not conditional.remove_if_unchanged(path, token)
  data, token = conditional.read_with_token(path)
  assert data == b"third"
  assert conditional.remove_if_unchanged(path, token)
  assert not storage.exists(path)
  assert not conditional.replace_if_unchanged(path, b"fifth", token)  # gone: nothing to replace
  assert not conditional.remove_if_unchanged(path, token)
  assert not storage.exists(path)


def test_the_emulator_ignores_preconditions(gcs_bucket, proxy, monkeypatch):
  """Why the proxy: straight to the emulator, create-if-absent overwrites. If this fails, the
  emulator has learnt preconditions and the proxy can go."""
  path = storage.join(gcs_bucket, "lock.json")
  assert conditional.create_exclusive(path, b"first")
  assert conditional.create_exclusive(path, b"second")
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.host)
  assert not conditional.create_exclusive(path, b"third")
  assert storage.read_bytes(path) == b"second"
