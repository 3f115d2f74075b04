"""The tree is formatted by its one formatter configuration (pyproject.toml [tool.pyink]); `make format` applies it."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _formatted_paths() -> list[str]:
  """The Makefile's FORMATTED list: the test checks exactly what `make format` formats."""
  with open(os.path.join(ROOT, "Makefile")) as f:
    return re.search(r"^FORMATTED := (.+)$", f.read(), re.MULTILINE).group(1).split()


def test_tree_is_pyink_formatted():
  paths = _formatted_paths()
  assert "rflow_jax" in paths and "tests" in paths
  got = subprocess.run(
      [sys.executable, "-m", "pyink", "--check", *paths], cwd=ROOT, capture_output=True, text=True, check=False
  )
  assert got.returncode == 0, "run `make format`:\n" + got.stderr[-3000:]
