"""Numbered folders (trainer.numbered) on a local folder and on gs://: names, completeness by one
listing, and which hidden names are leftovers of a killed copy."""

from trainer import export, numbered, storage
from trainer.checkpoints import STATE


def test_names_and_leftovers():
  checkpoints = numbered.Folders(STATE, prefix="ckpt-", suffixes=(".new",))
  assert [checkpoints.number(n) for n in ("ckpt-7", "ckpt-7.new", "ckpt-\u0663", "ckpt-7.old", "ckpt-", "7")] == \
      [7, 7, None, None, None, None]
  versions = export.VERSIONS
  assert [versions.number(n) for n in ("10", "\u0663", "\u00b2", "v1", "")] == [10, None, None, None, None]
  assert versions.numbers(["10", "9", "notes", "2"]) == [2, 9, 10]
  for leftover in (".tmp-3-0a1b2c3d", ".tmp-.tmp-3-0a1b2c3d-9f8e7d6c", ".staging-0a1b2c3d4e5f"):
    assert versions.is_leftover(leftover), leftover
  assert checkpoints.is_leftover(".tmp-ckpt-3.new-0a1b2c3d") and checkpoints.is_leftover(".tmp-ckpt-3-0a1b2c3d")
  # Another write's temporary file (a lease's, a history's) in the same folder is never a leftover to remove.
  for other in (".tmp-.lease.json-0a1b2c3d", ".tmp-history.jsonl-0a1b2c3d", ".lease.json", "3", "notes"):
    assert not versions.is_leftover(other), other


def test_complete_folders_come_from_one_listing(storage_root, monkeypatch):
  for name in ("1/a", "1/" + export.METADATA, "2/a", "3/" + export.METADATA, "3/sub/" + export.METADATA,
               "notes/" + export.METADATA, "\u0663/" + export.METADATA, "10/deeper/x"):
    storage.write_text(storage.join(storage_root, *name.split("/")), "{}")
  listings = []
  list_files = storage.list_files
  monkeypatch.setattr(storage, "list_files", lambda path: (listings.append(path), list_files(path))[1])
  assert export.VERSIONS.complete(storage_root) == {1: ["1"], 3: ["3"]}
  assert export.latest_version(storage_root) == storage.join(storage_root, "3")
  assert listings == [storage_root] * 2
  assert export.VERSIONS.complete(storage.join(storage_root, "nothing")) == {}
