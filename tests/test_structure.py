"""The package's shape, read from its source: no import cycle among trainer/ modules (imports inside
functions included), no module importing an entry point, no file over 400 lines."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "trainer"
ENTRY_POINTS = {"trainer.task", "trainer.retrain", "trainer.predict"}
MAX_LINES = 400


def module_name(path):
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(name, path):
  """The trainer modules `name` imports anywhere in its file, at the top or inside a function; a
  submodule brings its package's __init__ too."""
  found = set()
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *filter(None, [base])])
      targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
    else:
      continue
    for target in targets:
      while target:  # trainer.data.csv_file: trainer.data.csv_file and trainer.data
        if target in MODULES and target != "trainer":
          found.add(target)
        target = target.rpartition(".")[0]
  found.discard(name)
  return found


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def cycle():
  """One import cycle as [a, b, ..., a], or None."""
  state = {}

  def visit(name, trail):
    state[name] = "open"
    for other in sorted(GRAPH[name]):
      if state.get(other) == "open":
        return trail[trail.index(other):] + [other]
      if other not in state:
        found = visit(other, trail + [other])
        if found:
          return found
    state[name] = "done"
    return None

  for name in sorted(GRAPH):
    if name not in state:
      found = visit(name, [name])
      if found:
        return found
  return None


def test_the_import_graph_is_read():
  """The reader sees function-level imports and package members (a blind reader passes everything)."""
  assert "trainer.errors" in GRAPH["trainer.config"]
  assert "trainer.train" in GRAPH["trainer.task"]  # imported inside main(), after the flags are checked
  assert {"trainer.data", "trainer.data.csv_file"} <= GRAPH["trainer.data.tabular"]


def test_no_import_cycle():
  assert cycle() is None, " -> ".join(cycle())


def test_no_module_imports_an_entry_point():
  offenders = {name: sorted(GRAPH[name] & ENTRY_POINTS) for name in GRAPH if GRAPH[name] & ENTRY_POINTS}
  assert not offenders, f"entry points import libraries, never each other: {offenders}"


def test_no_file_is_over_400_lines():
  lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
  assert not {name: n for name, n in lengths.items() if n > MAX_LINES}, lengths


def test_no_line_is_over_120_columns():
  root = PACKAGE.parent
  long = [f"{path.relative_to(root)}:{number}" for folder in ("trainer", "tests", "scripts")
          for path in sorted((root / folder).rglob("*.py"))
          for number, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 120]
  assert not long, long
