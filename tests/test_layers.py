"""The package's layers (docs/design.md): a module imports only from its own layer or the
layers below, the import graph has no cycle, and imports inside functions are kept for
optional heavy dependencies."""
import ast
import collections
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "step_jax")
LAYERS = ("runtime", "models", "data", "evaluation", "training", "analysis", "api", "interop",
          "cli")
# Packages at the package root that belong to a layer of that name: step_jax/inference/ (bulk
# inference over the Python API) is of the api layer.
SAME_LAYER = {"inference": "api"}
# The package root is the top layer: it re-exports the Python API.
ROOT_LAYER = len(LAYERS)
# Imports allowed inside functions: optional or heavy dependencies that most runs never need.
LAZY_OK = ("torch", "tensorflow", "tensorflow_datasets", "matplotlib", "safetensors",
           "jax.experimental.jax2tf", "step_jax.data.tfds_ade20k",
           "step_jax.data.tfds_coco_stuff10k")


def _modules():
  out = {}
  for dirpath, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(dirpath, f)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  return out


def _imports(name, path, modules):
  """[(imported module, inside a function?)] for step_jax modules and external packages."""
  found = []

  def visit(node, in_fn):
    for child in ast.iter_child_nodes(node):
      fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
      if isinstance(child, ast.Import):
        found.extend((a.name, fn) for a in child.names)
      elif isinstance(child, ast.ImportFrom):
        base = child.module or ""
        if child.level:
          pkg = name.split(".") if path.endswith("__init__.py") else name.split(".")[:-1]
          base = ".".join(pkg[:len(pkg) - child.level + 1] + ([base] if base else []))
        for a in child.names:  # `from pkg import module` names a module
          full = f"{base}.{a.name}"
          internal = base.split(".")[0] == "step_jax"
          found.append((base if internal and full not in modules else full, fn))
      visit(child, fn)
  with open(path) as f:
    visit(ast.parse(f.read()), False)
  return found


def _layer(module):
  parts = module.split(".")
  if len(parts) == 1:
    return ROOT_LAYER
  name = SAME_LAYER.get(parts[1], parts[1])
  return LAYERS.index(name) if name in LAYERS else None


def test_every_module_belongs_to_a_layer():
  unknown = [m for m in _modules() if _layer(m) is None and not m.startswith("step_jax.testing")]
  assert not unknown, f"modules outside the layers {LAYERS}: {unknown}"


def test_no_upward_imports_and_lazy_imports_only_for_heavy_dependencies():
  modules = _modules()
  upward, lazy = [], []
  for name, path in modules.items():
    if name.startswith("step_jax.testing"):
      continue
    for target, in_fn in _imports(name, path, modules):
      if in_fn and not target.startswith(LAZY_OK):
        lazy.append(f"{name} imports {target} inside a function")
      if target in modules and name != "step_jax":
        if _layer(target) > _layer(name):
          upward.append(f"{name} ({LAYERS[_layer(name)]}) imports {target} "
                        f"({LAYERS[_layer(target)] if _layer(target) < ROOT_LAYER else 'root'})")
  assert not upward, "upward imports:\n" + "\n".join(upward)
  assert not lazy, "imports inside functions:\n" + "\n".join(lazy)


def test_import_graph_has_no_cycle():
  modules = _modules()
  graph = collections.defaultdict(set)
  for name, path in modules.items():
    for target, _ in _imports(name, path, modules):
      if target in modules and target != name and target != "step_jax":
        graph[name].add(target)
  state = {}

  def dfs(node, stack):
    state[node] = 1
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
      if nxt not in state:
        dfs(nxt, stack + [nxt])
    state[node] = 2
  for m in sorted(modules):
    if m not in state:
      dfs(m, [m])


def test_the_checker_sees_an_upward_and_a_lazy_import(tmp_path):
  """The rules above would catch a real violation (not vacuous)."""
  path = tmp_path / "m.py"
  path.write_text("from step_jax.training import train\n"
                  "def f():\n  from step_jax.models import vit\n")
  modules = _modules()
  found = _imports("step_jax.models.fake", str(path), modules)
  assert ("step_jax.training.train", False) in found
  assert ("step_jax.models.vit", True) in found
  assert _layer("step_jax.training.train") > _layer("step_jax.models.fake")
