"""lowmem.optim.step_one.all_finite: the layer-wise step's (and the skipped-step guard's) finiteness check
against torch.isfinite(t).all(), and without a full-size copy (issue 27: a bf16 sum in fp32 copied the
embedding gradient to fp32 inside the CPU kernel, unseen by the planner's trace)."""

import pytest
import torch

from lowmem.memory import current_rss_bytes, reset_peak_rss, window_peak_rss_bytes
from lowmem.optim.step_one import all_finite


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_all_finite_matches_isfinite(dtype):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(300, 7, generator=g).to(dtype)
    cases = [t, t[:, 2:5], torch.empty(0, dtype=dtype), torch.full((4,), torch.finfo(dtype).max, dtype=dtype)]
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in (0, 1000, 2099):
            u = t.clone()
            u.view(-1)[where] = bad
            cases.append(u)
    for case in cases:  # a finite tensor of largest values too: its fp32 sum would overflow, not its extremes
        assert all_finite(case) == bool(torch.isfinite(case).all())


def test_all_finite_makes_no_fp32_copy_of_a_16bit_tensor():
    t = torch.randn(4096, 4096).to(torch.bfloat16)  # 32 MiB; an fp32 copy: 64 MiB
    before = current_rss_bytes()
    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs: the window's peak RSS cannot be read")
    assert all_finite(t)
    assert window_peak_rss_bytes() - before < 16 * 2**20
