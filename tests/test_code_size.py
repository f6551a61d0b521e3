"""Keep the layout readable: no module past 600 lines, no function past 120 (issue 20 §4).

A module or function may exceed its limit only if it is listed below with the reason.
Docstrings count: a reader scrolls past them too.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULE_LINES, FUNCTION_LINES = 600, 120
# path (or path::function) -> why it may be longer. Keep this empty where possible.
ALLOWED: dict[str, str] = {}


def _sources() -> list[pathlib.Path]:
  return sorted([*(ROOT / "jaxprune").rglob("*.py"), *(ROOT / "scripts").glob("*.py")])


def test_modules_and_functions_stay_short():
  too_long = []
  for path in _sources():
    rel = path.relative_to(ROOT).as_posix()
    text = path.read_text()
    lines = text.count("\n")
    if lines > MODULE_LINES and rel not in ALLOWED:
      too_long.append(f"{rel}: {lines} lines (limit {MODULE_LINES})")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        span = node.end_lineno - node.lineno + 1
        if span > FUNCTION_LINES and f"{rel}::{node.name}" not in ALLOWED:
          too_long.append(f"{rel}::{node.name}: {span} lines (limit {FUNCTION_LINES})")
  assert not too_long, ("split these into named steps or modules, or list them in ALLOWED with "
                        "a reason:\n  " + "\n  ".join(too_long))


def _module_aliases(tree, package: pathlib.Path) -> dict[str, str]:
  """Local names bound to public jaxprune modules: ``from jaxprune import pruning as p``."""
  aliases = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module == "jaxprune":
      for a in node.names:
        if (package / f"{a.name}.py").exists() or (package / a.name).is_dir():
          aliases[a.asname or a.name] = a.name
    elif isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("jaxprune.") and a.asname:
          aliases[a.asname] = a.name.split(".")[-1]
  return aliases


def test_no_module_uses_another_modules_private_names():
  """``from x import _name`` or ``x._name`` between modules is a seam to name publicly.

  Private *modules* (``jaxprune._checks``) are the package's shared internals and may be
  imported; what they define is public to the package.
  """
  package = ROOT / "jaxprune"
  offenders = []
  # scripts/ may time private building blocks (bench.py does, on purpose); the library may not.
  for path in sorted(package.rglob("*.py")):
    tree = ast.parse(path.read_text())
    aliases = _module_aliases(tree, package)
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxprune."):
        if node.module.split(".")[-1].startswith("_"):
          continue
        where = ROOT.joinpath(*node.module.split("."))
        private = [a.name for a in node.names if a.name.startswith("_")
                   and not (where / f"{a.name}.py").exists()]   # a private module may be
        if private:
          offenders.append(f"{path.relative_to(ROOT)}: from {node.module} import {private}")
      elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id in aliases and aliases[node.value.id] != path.stem
            and node.attr.startswith("_") and not node.attr.startswith("__")
            and not aliases[node.value.id].startswith("_")):
        offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: "
                         f"{node.value.id}.{node.attr}")
  assert not offenders, "name these seams publicly:\n  " + "\n  ".join(offenders)
