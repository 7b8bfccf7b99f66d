"""The import contract: dependencies point one way (model <- train <- entry points; data below model)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dcr_jax"
FORBIDDEN = {  # package -> packages it must not import, directly or through anything it imports
    "model": ("train", "evaluate", "kernels"),
    "train": ("evaluate", "kernels"),
    "data": ("model",),
}


def direct_imports(path: Path) -> set[str]:
  """dcr_jax subpackages a module imports at run time (imports under `if TYPE_CHECKING:` excluded)."""
  tree = ast.parse(path.read_text())
  skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
             for child in node.body for n in ast.walk(child)}
  found = set()
  for node in ast.walk(tree):
    if id(node) in skipped:
      continue
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
        [node.module or ""] if isinstance(node, ast.ImportFrom) else []
    found |= {name.split(".")[1] for name in names if name.startswith("dcr_jax.")}
  return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_module_imports_upward(package):
  for path in sorted((PACKAGE / package).glob("*.py")):
    bad = direct_imports(path) & set(FORBIDDEN[package])
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports dcr_jax.{sorted(bad)[0]}"


@pytest.mark.parametrize("package", ["model", "train"])
def test_no_package_pulls_them_in_at_run_time(package):
  modules = [f"dcr_jax.{package}.{p.stem}" for p in sorted((PACKAGE / package).glob("*.py")) if p.stem != "__init__"]
  code = (f"import sys; import {', '.join(modules)}; "
          "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('dcr_jax.') and m.count('.') >= 1}))")
  loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  assert not set(eval(loaded)) & set(FORBIDDEN[package]), loaded


def test_the_checker_sees_an_upward_import(tmp_path):
  module = tmp_path / "m.py"
  module.write_text("from typing import TYPE_CHECKING\nimport dcr_jax.evaluate.stage\nif TYPE_CHECKING:\n"
                    "  from dcr_jax.kernels import ntk\n")
  assert direct_imports(module) == {"evaluate"}
