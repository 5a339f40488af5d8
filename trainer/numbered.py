"""Numbered folders of one parent folder, `<prefix><n><suffix>`, each complete once its marker file
exists: checkpoints (`ckpt-<step>`, state.json) and export or serving versions (`<n>`,
trainer_export.json). Writers publish the marker last, so a folder with it is whole and one without
it is the leftover of a killed write.

Also the hidden names such a folder is written under before it appears (the rule for what is a
leftover of a killed copy is here alone): storage's temporary sibling `.tmp-<name>-<random>` (of a
folder renamed into place; twice `.tmp-` for a publish_dir of a folder that was itself a temporary
copy), and `.staging-<random>` (a promotion's upload on gs://, copied into place).
"""

import re

from trainer import storage

STAGING = ".staging-"


class Folders:
  """The numbered folders named `<prefix><n>` or `<prefix><n><one of suffixes>` whose marker says
  they are complete."""

  def __init__(self, marker, prefix="", suffixes=()):
    self.marker = marker
    # [0-9], not \d or str.isdigit(): int() reads other digits too ("ckpt-٣" would pass for ckpt-3),
    # "²" is a digit to isdigit() but not to int(), and TF Serving polls only ASCII-numbered folders.
    self._name = re.compile(re.escape(prefix) + "([0-9]+)(?:" + "|".join(map(re.escape, suffixes)) + ")?")
    temporary = re.escape(storage.TEMPORARY)
    self._leftover = re.compile(f"{temporary}(?:{temporary})?{self._name.pattern}-|{re.escape(STAGING)}")

  def number(self, name):
    """n of a folder of this family, None for any other name."""
    match = self._name.fullmatch(name)
    return int(match.group(1)) if match else None

  def numbers(self, names):
    """The numbers of the names that are folders of this family (complete or not), ascending."""
    return sorted(n for n in map(self.number, names) if n is not None)

  def complete(self, parent):
    """{n: names of its complete folders, sorted} under parent, from one listing of every file
    (on gs:// a request per folder would cost one each). StorageError when parent cannot be read:
    an unreachable bucket must never look like an empty folder."""
    found = {}
    for path in storage.list_files(parent):
      name, _, rest = path.partition("/")
      if rest == self.marker and self.number(name) is not None:
        found.setdefault(self.number(name), []).append(name)
    return {n: sorted(names) for n, names in found.items()}

  def is_leftover(self, name):
    """A hidden copy of one of these folders, left by a write killed before it was renamed or
    copied into place; never the temporary file of a write of something else (a lease, a history)."""
    return self._leftover.match(name) is not None
