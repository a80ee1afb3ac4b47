"""install.sh chooses the torch build a machine needs (issue 24), rehearsed with ``--dry-run`` (prints the pip
commands, runs none): PyPI's CUDA build where ``nvidia-smi`` lists a GPU, PyTorch's CPU wheel elsewhere, from its
CPU index only when pip cannot find that wheel without an index (so an offline machine never waits on the index).
The script runs from a copy in a scratch folder (no .venv there: the probe uses the system's pip)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clone")
    for name in ("install.sh", "constraints.txt"):
        shutil.copy(ROOT / name, folder / name)
    return folder


def dry_run(clone, tmp_path, nvidia_smi: str | None, **env) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if nvidia_smi is not None:  # a stand-in for the driver's tool: its output decides
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    path = ":".join(d for d in os.environ["PATH"].split(":") if not (Path(d) / "nvidia-smi").exists())
    base = {k: v for k, v in os.environ.items() if k != "LOWMEM_TORCH"}
    return subprocess.run(["bash", str(clone / "install.sh"), "--dry-run"], capture_output=True, text=True,
                          env={**base, "PATH": f"{bin_dir}:{path}", **env}, timeout=120)


def test_a_gpu_machine_gets_the_cuda_build_with_torchs_triton(clone, tmp_path):
    out = dry_run(clone, tmp_path, 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"')
    assert out.returncode == 0, out.stderr
    assert "torch build: cuda (torch==2.13.0)" in out.stdout
    assert "-c .cache/constraints-cuda.txt torch==2.13.0 -e .\\[dev\\,demo\\,deepspeed\\,peft\\,gpu\\]" in out.stdout
    assert "grep -v '^triton==' constraints.txt" in out.stdout and "+cpu" not in out.stdout


def test_no_gpu_gets_the_cpu_wheel_and_its_index_only_when_needed(clone, tmp_path):
    local = dry_run(clone, tmp_path, "echo 'NVIDIA-SMI has failed: no driver'; exit 9")  # this machine: a local wheel
    assert local.returncode == 0, local.stderr
    assert "torch build: cpu (torch==2.13.0+cpu" in local.stdout and "gpu\\]" not in local.stdout
    no_local = dry_run(clone, tmp_path, None, PIP_CONFIG_FILE=os.devnull, PIP_FIND_LINKS="", LOWMEM_TORCH="cpu")
    assert no_local.returncode == 0, no_local.stderr
    assert ("--extra-index-url https://download.pytorch.org/whl/cpu --timeout 30 --retries 2 torch==2.13.0+cpu"
            in no_local.stdout)


def test_a_wrong_choice_is_one_line(clone, tmp_path):
    out = dry_run(clone, tmp_path, None, LOWMEM_TORCH="rocm")
    assert out.returncode == 2 and out.stderr.strip() == "install.sh: LOWMEM_TORCH must be auto, cuda or cpu, got 'rocm'"
