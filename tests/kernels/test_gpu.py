"""Compiled Triton kernels on a real GPU (skipped visibly without CUDA): equal to the references
run on the same device, and the 8-bit step within bitsandbytes' CUDA kernel's tolerance."""

import pytest
import torch

from lowmem.kernels.adamw8bit_step import AdamScalars, adam8bit_step_ref
from lowmem.kernels.adamw8bit_step_triton import adam8bit_step_triton
from lowmem.kernels.dynamic_map import dynamic_map
from lowmem.kernels.quantize import quantize_blockwise_ref
from lowmem.kernels.quantize_triton import quantize_blockwise_triton

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [(1,), (257,), (4097,), (1823, 781)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_quantize_compiled_equals_reference(shape, dtype):
    x = torch.randn(shape, device="cuda").to(dtype)
    code = dynamic_map(True, "cuda")
    codes, absmax = quantize_blockwise_triton(x, code, 256)
    ref_codes, ref_absmax = quantize_blockwise_ref(x, code, 256)
    assert torch.equal(absmax, ref_absmax)
    assert (codes != ref_codes).float().mean() <= 0.002


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adam_step_compiled_against_reference_and_bitsandbytes(dtype):
    bnb = pytest.importorskip("bitsandbytes")
    n = 1823 * 781
    p = torch.randn(n, device="cuda").to(dtype)
    p_ref, p_bnb = p.clone(), p.clone()
    ours = [torch.zeros(n, dtype=torch.uint8, device="cuda"), torch.zeros(-(-n // 256), device="cuda")] * 2
    ours = [t.clone() for t in ours]
    ref = [t.clone() for t in ours]
    opt = bnb.optim.AdamW8bit([torch.nn.Parameter(p_bnb)], lr=1e-3, weight_decay=1e-2)
    for step in range(1, 6):
        g = (torch.randn(n, device="cuda") * 1e-2).to(dtype)
        k = AdamScalars.of(1e-3, 0.9, 0.999, 1e-8, 1e-2, step)
        adam8bit_step_triton(p, g, *ours, k, 256)
        adam8bit_step_ref(p_ref, g, *ref, k, 256)
        opt.param_groups[0]["params"][0].grad = g.clone()
        opt.step()
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p, p_ref, **tol)
    torch.testing.assert_close(p, opt.param_groups[0]["params"][0].detach(), **tol)
    assert ((ours[0].long() - ref[0].long()).abs() > 1).float().mean() < 1e-3
