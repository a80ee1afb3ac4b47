"""No folder of the repository may hide an installed package of the same name (issue 14).

``python -m ...`` from the repository root puts the root first on ``sys.path``. A top-level
folder with an ``__init__.py`` there would then shadow an installed package of that name, as
``kernels/`` once hid Hugging Face's ``kernels`` and broke every transformers model import.
``kernels/`` and ``offload/`` are therefore plain folders, shipped as ``lowmem.kernels`` and
``lowmem.offload`` through links inside ``lowmem/``.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))


def _from_root(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_only_lowmem_is_a_regular_package_at_the_top():
    assert {"kernels", "offload", "lowmem"} <= set(FOLDERS)
    packages = [name for name in FOLDERS if (ROOT / name / "__init__.py").exists()]
    assert packages == ["lowmem"]


def test_installed_packages_win_over_repository_folders():
    installed = set(importlib.metadata.packages_distributions())
    clashing = [name for name in FOLDERS if name in installed and name != "lowmem"]
    assert "kernels" in clashing, "transformers' `kernels` dependency is expected in this environment"
    code = ("import importlib.util, sys\n"
            f"for name in {clashing!r}:\n"
            "    print(name, importlib.util.find_spec(name).origin)\n"
            "import kernels\nprint('kernels.__file__', kernels.__file__)\n")
    done = _from_root("-c", code)
    assert done.returncode == 0, done.stderr
    for line in done.stdout.splitlines():
        name, origin = line.split(" ", 1)
        assert not origin.startswith(str(ROOT) + "/" + name.split(".")[0]), line
        assert "site-packages" in origin, line


def test_lowmem_subpackages_resolve_from_the_root():
    done = _from_root("-c", "import lowmem.kernels.quantize as q, lowmem.offload.engine as e; print(q.__file__); print(e.__file__)")
    assert done.returncode == 0, done.stderr
    kernels_file, offload_file = done.stdout.split()
    assert Path(kernels_file).resolve() == ROOT / "kernels" / "quantize.py"
    assert Path(offload_file).resolve() == ROOT / "offload" / "engine.py"


def test_cli_runs_from_the_repository_root(tiny_recipe, tmp_path):
    done = _from_root("-m", "lowmem.cli", tiny_recipe(), "train.steps=1", "train.eval_batches=1",
                      f"output.dir={tmp_path / 'run'}", "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "model" / "config.json").exists()
