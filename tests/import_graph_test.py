"""The import graph of rflow_jax has no cycles and goes only down its floors (docs/architecture.md).

Imports are read with ast (module-level and function-level alike), so nothing is imported to check them.
"""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Longest matching prefix decides a module's floor. A module may import modules of a lower floor, or of its own
# package (rflow_jax.<package>) without a cycle.
FLOORS = {
    "rflow_jax.paths": 0,  # Output-path safety of the CLIs (imports nothing of rflow_jax).
    "rflow_jax.model": 0,
    "rflow_jax.flow": 0,
    "rflow_jax.data": 0,
    "rflow_jax.sharding": 0,
    "rflow_jax.sampling": 1,
    "rflow_jax.utils": 1,  # Compute accounting: reads the model's and text stack's shapes.
    "rflow_jax.config_lib": 2,
    "rflow_jax.eval": 2,
    "rflow_jax.export": 2,  # export: the diffusers/original formats.
    "rflow_jax.train": 3,
    "rflow_jax.rundir": 4,  # Reading a finished run: config, model, params, sampler.
    "rflow_jax.export.workdir": 5,  # Exporting a run.
    "rflow_jax.eval.formulation_eval": 5,  # Scores finished runs of the formulation study.
    "rflow_jax.cli": 6,
    # Entry points.
    "rflow_jax.main": 7,
    "rflow_jax.sample": 7,
    "rflow_jax.export.__main__": 7,
    "rflow_jax.eval.run_shapes": 7,
    "rflow_jax.data.convert": 7,
    "rflow_jax.eval.run_vae_recon": 7,
    "rflow_jax.export.latent_stats": 7,
    "rflow_jax.precompute": 7,  # Encodes a converted dataset into latent and text-embedding records.
    "rflow_jax.scaling": 7,  # Fits and plots of a sweep's CSV (python -m rflow_jax.scaling.fit).
}

# The only edges allowed to go up, each a function-level import with its reason. A text config that names released
# weights (text.sd3_path) is built by reading a Hugging Face directory, which is the export package's format code;
# the ground floor imports it only on that path.
UPWARD = {("rflow_jax.model.text_encoders", "rflow_jax.export.text")}


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _graph() -> dict[str, set[str]]:
  """{module: the rflow_jax modules it imports}."""
  modules = {_module_name(p): p for p in glob.glob(os.path.join(ROOT, "rflow_jax", "**", "*.py"), recursive=True)}
  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        deps.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.module:
        # `from rflow_jax.x import y`: y is a module of x when there is one, else a name in x.
        deps.update(
            f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names
        )
    graph[name] = {d for d in deps if d in modules and d != name and d != "rflow_jax"}
  return graph


def _floor(module: str) -> int:
  matches = [p for p in FLOORS if module == p or module.startswith(p + ".")]
  assert matches, f"{module} has no floor in FLOORS"
  return FLOORS[max(matches, key=len)]


def _package(module: str) -> str:
  return ".".join(module.split(".")[:2])


def test_imports_go_down_the_floors():
  bad = [
      f"{m} (floor {_floor(m)}) imports {d} (floor {_floor(d)})"
      for m, deps in _graph().items()
      for d in sorted(deps)
      if not (_floor(d) < _floor(m) or (_package(d) == _package(m) and _floor(d) <= _floor(m))) and (m, d) not in UPWARD
  ]
  assert not bad, "\n".join(bad)


def test_no_import_cycles():
  graph, state, cycles = _graph(), {}, []

  def visit(m, stack):
    state[m] = "open"
    for d in sorted(graph[m]):
      if state.get(d) == "open":
        cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
      elif d not in state:
        visit(d, stack + [d])
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycles, "\n".join(cycles)
