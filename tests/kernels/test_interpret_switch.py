"""tests/conftest.py defines the Triton kernels for the interpreter only without CUDA: with a GPU the
``gpu`` tests must get compiled kernels (``triton.jit`` reads TRITON_INTERPRET when a kernel is defined).
Either way the variable is unset afterwards, so the tests outside tests/kernels call the C kernels and the
references (:func:`lowmem.kernels.quantize.use_triton` reads it at each call), and tests/kernels/conftest.py
sets it for the kernel tests."""

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


@pytest.mark.parametrize("cuda,expected", [(False, "None InterpretedFunction"), (True, "None JITFunction")])
def test_interpreter_only_without_cuda(cuda, expected):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _PROBE.format(cuda=cuda)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == expected


def test_kernel_tests_take_the_interpreted_kernels():
    """Here (a kernel test) a CPU tensor takes Triton, in the interpreter (the probe above: the rest of the
    suite finds the variable unset)."""
    pytest.importorskip("triton")
    import torch

    from lowmem.kernels.quantize import use_triton

    if torch.cuda.is_available():
        pytest.skip("with a GPU the kernels are compiled, and CPU tensors take the C kernels")
    assert use_triton(torch.zeros(1))
