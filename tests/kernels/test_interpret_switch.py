"""tests/conftest.py runs Triton in the interpreter only without CUDA: with a GPU the ``gpu`` tests must
get compiled kernels (``triton.jit`` reads TRITON_INTERPRET when a kernel is defined)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_PROBE = """
import runpy, sys, torch
torch.cuda.is_available = lambda: {cuda}
runpy.run_path("tests/conftest.py")
import os
from lowmem.kernels import quantize_triton
print(os.environ.get("TRITON_INTERPRET"), type(quantize_triton._quantize_kernel).__name__)
"""


@pytest.mark.parametrize("cuda,expected", [(False, "1 InterpretedFunction"), (True, "None JITFunction")])
def test_interpreter_only_without_cuda(cuda, expected):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _PROBE.format(cuda=cuda)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == expected
