"""Every config key of every config under configs/ is read by some code path (no dead settings).

A key `section.leaf` counts as read when library or launcher code (rflow_jax/, launch/, benchmarks/) accesses an
attribute named `leaf` or uses the string "leaf" (for `t[name]` loops over field names). config.model's fields are
constructor arguments of the backbones (`registry.model_kwargs` passes them all), so they count as read when every
registered architecture takes them. A name-level scan: it cannot tell two keys of the same leaf name apart, but a new
key no code mentions fails it.
"""

import ast
import dataclasses
import glob
import importlib
import os

from rflow_jax.model import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_DIRS = ("rflow_jax", "launch", "benchmarks")


def _names_in_code() -> set[str]:
  names = set()
  for d in CODE_DIRS:
    for path in glob.glob(os.path.join(ROOT, d, "**", "*.py"), recursive=True):
      with open(path) as f:
        tree = ast.parse(f.read())
      for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
          names.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
          names.add(node.value)
  return names


def _keys(config, prefix="") -> list[str]:
  out = []
  for k, v in config.items():
    out.extend(_keys(v, f"{prefix}{k}.") if hasattr(v, "items") else [prefix + k])
  return out


def _config_modules():
  return sorted(
      os.path.basename(f)[:-3]
      for f in glob.glob(os.path.join(ROOT, "configs", "*.py"))
      if not f.endswith("__init__.py")
  )


def unread_keys(config, names) -> list[str]:
  """The keys of `config` that no code reads (per the module docstring's rule)."""
  model_fields = set.intersection(
      *({f.name for f in dataclasses.fields(cls)} for cls in registry.ARCHITECTURES.values())
  )
  unread = []
  for key in _keys(config):
    leaf = key.rsplit(".", 1)[-1]
    if key.startswith("model.") and leaf in model_fields:
      continue
    if leaf not in names:
      unread.append(key)
  return unread


def test_every_key_of_every_config_is_read():
  names = _names_in_code()
  base_keys = set(_keys(importlib.import_module("configs.base").get_config()))
  for name in _config_modules():
    config = importlib.import_module(f"configs.{name}").get_config()
    # Families override base's fields and add none (every default lives once, in base.py).
    assert set(_keys(config)) == base_keys, f"configs/{name}.py: {sorted(set(_keys(config)) ^ base_keys)}"
    assert unread_keys(config, names) == [], f"configs/{name}.py has keys no code reads"


def test_an_unread_key_is_reported():
  config = importlib.import_module("configs.base").get_config()
  config.train.never_read_by_anything = 1
  assert unread_keys(config, _names_in_code()) == ["train.never_read_by_anything"]
