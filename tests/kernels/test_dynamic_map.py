"""The dynamic maps equal bitsandbytes' bit for bit (``create_dynamic_map``; Dettmers et al. 2021,
"8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861, §2.2)."""

import pytest
import torch

from lowmem.kernels.dynamic_map import dynamic_map

F = pytest.importorskip("bitsandbytes.functional")


@pytest.mark.parametrize("signed", [True, False])
def test_map_equals_bitsandbytes(signed):
    ours = dynamic_map(signed)
    ref = F.create_dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours.view(torch.int32), ref.view(torch.int32))  # bit-identical, incl. sign of zero


def test_map_layout():
    s, u = dynamic_map(True), dynamic_map(False)
    assert torch.all(s[1:] > s[:-1]) and torch.all(u[1:] > u[:-1])
    # signed: no -1.0, index 127 is 0, index 255 is 1; unsigned starts at 0
    assert s[0].item() == pytest.approx(-0.99296875) and s[127].item() == 0.0 and s[255].item() == 1.0
    assert u[0].item() == 0.0 and u[255].item() == 1.0 and u[1].item() == pytest.approx(3.25e-7, rel=1e-3)
    assert torch.equal(s[128:255], -s[:127].flip(0))
