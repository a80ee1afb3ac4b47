"""The built wheel works on its own (issue 24, defect 1): CI's editable install cannot see a subpackage
left out of the wheel, so this builds the wheel offline from a copy of the sources, installs it into a
scratch directory with no repository on ``sys.path``, imports every module of the installed package
and runs the installed ``lowmem-train`` on a tiny config-built recipe for two steps."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

IMPORT_ALL = """
import importlib, pkgutil, sys
from pathlib import Path
import lowmem
site = Path(sys.argv[1]).resolve()
assert Path(lowmem.__file__).resolve().is_relative_to(site), lowmem.__file__  # the wheel's copy, not a checkout
names = [m.name for m in pkgutil.walk_packages(lowmem.__path__, "lowmem.")]
for name in names:
    assert Path(importlib.import_module(name).__file__).resolve().is_relative_to(site), name
for top in ("kernels", "offload"):  # shipped inside lowmem only
    spec = importlib.util.find_spec(top)
    assert spec is None or not Path(spec.origin or spec.submodule_search_locations[0]).resolve().is_relative_to(site), top
assert len(names) > 50, names  # every module of the package was found and imported
# the installed console script's entry point (the wheel's metadata), on a tiny recipe
from importlib.metadata import distribution
dist = distribution("lowmem")
assert Path(dist.locate_file("lowmem")).resolve().is_relative_to(site)
main = next(e for e in dist.entry_points if e.group == "console_scripts" and e.name == "lowmem-train").load()
sys.exit(main(sys.argv[2:]))
"""


def _run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def test_built_wheel_holds_every_module_and_runs(tiny_recipe, tmp_path):
    pytest.importorskip("setuptools", reason="the offline build (--no-build-isolation) uses the venv's setuptools")
    src = tmp_path / "src"  # a copy: building in the checkout would leave build/ and egg-info behind
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("lowmem", "kernels", "offload"):  # lowmem/kernels, lowmem/offload stay links to ../kernels ...
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(src)])
    wheel = next((tmp_path / "dist").glob("lowmem-*.whl"))
    site = tmp_path / "site"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)])

    # the venv's dependencies stay importable; the checkout does not (cwd elsewhere, PYTHONPATH only the wheel)
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    (tmp_path / "cwd").mkdir()
    recipe = tiny_recipe(train={"steps": 2, "checkpoint_every": 0})
    _run([sys.executable, "-c", IMPORT_ALL, str(site), recipe, f"output.dir={tmp_path / 'out'}", "--quiet"],
         cwd=tmp_path / "cwd", env=env)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 2
