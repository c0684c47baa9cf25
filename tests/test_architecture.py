"""The library's modules form layers (LAYERS, bottom to top; docs/architecture.md describes
them): commands on top, no library module imports a command, and each module imports only from
its own layer or the layers below it."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "l2s_jax")

# Bottom to top. A module belongs to the first entry naming it or a package above it.
LAYERS = (
  (
    "leaves",
    (
      "l2s_jax.sharding",
      "l2s_jax.checkpoint",
      "l2s_jax.buckets",
      "l2s_jax.console",
      "l2s_jax.metrics",
      "l2s_jax.metrics_log",
      "l2s_jax.files",
      "l2s_jax.lock",
      "l2s_jax.quantize",
      "l2s_jax.aot",
    ),
  ),
  ("models, data, hf", ("l2s_jax.models", "l2s_jax.data", "l2s_jax.hf")),
  ("engines", ("l2s_jax.decoding", "l2s_jax.collab", "l2s_jax.export", "l2s_jax.train_step")),
  # The config: its fields (with the data pipeline's defaults) and the specs it builds.
  (
    "config",
    (
      "l2s_jax.config_decode",
      "l2s_jax.config_schema",
      "l2s_jax.config_study",
      "l2s_jax.config_fingerprint",
      "l2s_jax.configs",
    ),
  ),
  ("assemble", ("l2s_jax.build", "l2s_jax.assemble", "l2s_jax.optimizer")),
  (
    "run",
    (
      "l2s_jax.train_lib",
      "l2s_jax.eval_lib",
      "l2s_jax.eval_progress",
      "l2s_jax.methods",
      "l2s_jax.demo_lib",
      "l2s_jax.study_lib",
      "l2s_jax.compile_lib",
    ),
  ),
)


def modules() -> dict[str, str]:
  out = {}
  for d, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(d, f)
        name = "l2s_jax." + os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


def imports(path: str, known: dict) -> set[str]:
  """l2s_jax modules `path` imports, at module level or inside functions."""

  def resolve(name):
    while name not in known and "." in name:
      name = name.rsplit(".", 1)[0]
    return name

  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      found |= {resolve(a.name) for a in node.names if a.name.startswith("l2s_jax")}
    elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("l2s_jax"):
      for a in node.names:
        full = f"{node.module}.{a.name}"
        found.add(full if full in known else resolve(node.module))
  return found


def is_command(path: str) -> bool:
  """A command runs as `python -m`: it has an `if __name__ == "__main__"` block."""
  for node in ast.parse(open(path).read()).body:
    if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
      return True
  return False


def layer(name: str, commands: set[str]) -> int:
  if name in commands:
    return len(LAYERS)
  for i, (_, prefixes) in enumerate(LAYERS):
    if any(name == p or name.startswith(p + ".") for p in prefixes):
      return i
  if name == "l2s_jax":
    return -1
  raise AssertionError(f"{name} belongs to no layer of this test; add it to LAYERS")


def violations(known: dict) -> list[str]:
  commands = {m for m, p in known.items() if is_command(p)}
  bad = []
  for m, path in sorted(known.items()):
    for dep in sorted(imports(path, known) - {m}):
      if dep in commands:
        bad.append(f"{m} imports the command {dep}")
      elif layer(dep, commands) > layer(m, commands):
        bad.append(
          f"{m} ({LAYERS[layer(m, commands)][0]}) imports {dep} "
          f"({LAYERS[layer(dep, commands)][0]}), a layer above it"
        )
  return bad


def test_the_commands_are_the_ones_we_ship():
  commands = {m for m, p in modules().items() if is_command(p)}
  assert commands == {"l2s_jax.demo"}


def test_no_module_imports_upwards_or_a_command():
  assert violations(modules()) == []


@pytest.mark.parametrize(
  "line, expected",
  [
    ("from l2s_jax import demo", "l2s_jax.eval_lib imports the command l2s_jax.demo"),
    ("def f():\n  from l2s_jax import demo", "l2s_jax.eval_lib imports the command l2s_jax.demo"),
    ("import l2s_jax.train_lib", None),  # the same layer, and the ones below: fine
    ("from l2s_jax import assemble", None),
  ],
)
def test_the_check_catches_a_bad_import(tmp_path, line, expected):
  """Negative control: the same check on a copy of eval_lib with one more import."""
  known = modules()
  path = tmp_path / "eval_lib.py"
  path.write_text(open(known["l2s_jax.eval_lib"]).read() + "\n" + line + "\n")
  found = violations({**known, "l2s_jax.eval_lib": str(path)})
  assert found == ([] if expected is None else [expected])


def test_a_leaf_importing_the_assembly_layer_is_caught(tmp_path):
  known = modules()
  path = tmp_path / "sharding.py"
  path.write_text(open(known["l2s_jax.sharding"]).read() + "\nfrom l2s_jax import assemble\n")
  assert violations({**known, "l2s_jax.sharding": str(path)}) == [
    "l2s_jax.sharding (leaves) imports l2s_jax.assemble (assemble), a layer above it"
  ]
