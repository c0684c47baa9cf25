"""`pip install .` (not editable) into a fresh virtual environment: the demo command and
the loaders work from outside the repository, the demo's configs found inside the package."""

import os
import site
import subprocess
import sys
import sysconfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_non_editable_install_finds_the_demo_and_its_configs(tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  py = str(venv / "bin" / "python")
  # The dependencies come from this interpreter's site-packages, listed after the venv's own
  # (a plain path: this interpreter's editable install of l2s_jax is not activated there).
  venv_site = subprocess.run(
    [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
    check=True,
    capture_output=True,
    text=True,
  ).stdout.strip()
  deps = [
    p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)
  ]
  with open(os.path.join(venv_site, "zz_dependencies.pth"), "w") as f:
    f.write("\n".join(dict.fromkeys(deps)) + "\n")
  subprocess.run(
    [
      py,
      "-m",
      "pip",
      "install",
      "--quiet",
      "--no-deps",
      "--no-build-isolation",
      "--no-index",
      REPO,
    ],
    check=True,
    cwd=tmp_path,
    capture_output=True,
  )
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  help_text = subprocess.run(
    [py, "-m", "l2s_jax.demo", "--help"],
    check=True,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    env=env,
  ).stdout
  assert "--workdir" in help_text and "--export" in help_text
  script = (
    "import l2s_jax, os\n"
    f"assert l2s_jax.__file__.startswith({str(venv)!r}), l2s_jax.__file__\n"
    "from l2s_jax import assemble, demo_lib\n"
    "from l2s_jax.configs import demo\n"
    "c = demo_lib.system_config('hybrid', '/runs/demo')\n"
    "print(c.llm.path, c.model.kind, demo.get_config('llm').train.steps)\n"
    "assert callable(assemble.load_trained) and callable(demo_lib.load_system)\n"
  )
  out = subprocess.run(
    [py, "-c", script], check=True, cwd=tmp_path, capture_output=True, text=True, env=env
  ).stdout
  assert out.split() == ["/runs/demo/llm/transformers", "hybrid", "1800"]
