"""The kernel tests run the Triton kernels: compiled on a GPU, else in the interpreter they were defined
for (tests/conftest.py, fixture ``triton_interpreter``)."""

import pytest


@pytest.fixture(autouse=True)
def _kernels_interpreted(triton_interpreter):
    """Every kernel test takes the Triton kernels (interpreted on CPU tensors without CUDA)."""
