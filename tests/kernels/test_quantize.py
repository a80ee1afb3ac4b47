"""Blockwise quantization against outside truths: bitsandbytes' reference backend,
bitsandbytes' CPU library, a brute-force nearest search; and Triton == reference."""

import pytest
import torch

from lowmem.kernels.dynamic_map import dynamic_map
from lowmem.kernels.quantize import (dequantize_blockwise, dequantize_blockwise_ref, quantize_blockwise,
                                     quantize_blockwise_ref, use_triton)
from lowmem.kernels.quantize_triton import dequantize_blockwise_triton, quantize_blockwise_triton

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

# 2-D, several programs, a partial last block: what the interpreter checks does not grow with the size (the
# compiled kernels are compared on (1823, 781) in test_gpu.py; chunked references: test_adamw8bit_step.py)
SHAPES = [(1,), (255,), (257,), (4097,), (97, 131)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def sample(shape, dtype, signed, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    return (x if signed else x * x).to(dtype)


def bnb_reference_quantize(x, code, blocksize):
    """bitsandbytes' own reference implementation (backends/default, used off the CPU library)."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    codes, absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, x, code, blocksize)
    return codes.reshape(-1), absmax


def scaled_blocks(x, absmax, blocksize):
    flat = x.reshape(-1).float()
    return flat * (1.0 / absmax).repeat_interleave(blocksize)[: flat.numel()]


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_matches_bitsandbytes_reference(signed, dtype, blocksize):
    code = dynamic_map(signed)
    x = sample((50_001,), dtype, signed)
    codes, absmax = quantize_blockwise_ref(x, code, blocksize)
    ref_codes, ref_absmax = bnb_reference_quantize(x, code, blocksize)
    assert torch.equal(absmax, ref_absmax)
    diff = (codes.long() - ref_codes.long()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.002  # only exact ties may differ


@pytest.mark.parametrize("signed", [True, False])
def test_against_bitsandbytes_cpu_library(signed):
    """bnb 0.50's CPU library rounds x/absmax to a 65536-bin grid before looking up the code,
    so its codes are nearest only up to that grid; ours are exactly nearest. absmax is exact in both."""
    code = dynamic_map(signed)
    x = sample((65_536,), torch.float32, signed, seed=1)
    codes, absmax = quantize_blockwise_ref(x, code, 256)
    ref_codes, ref_state = F.quantize_blockwise(x, code=code, blocksize=256)
    assert torch.equal(absmax, ref_state.absmax)
    s = scaled_blocks(x, absmax, 256)
    ours_err = (code[codes.long()] - s).abs()
    bnb_err = (code[ref_codes.reshape(-1).long()] - s).abs()
    assert torch.all(ours_err <= bnb_err + 1e-7)
    assert torch.all(bnb_err <= ours_err + 2.0 / 65535)


@pytest.mark.parametrize("signed", [True, False])
def test_nearest_by_brute_force_and_round_trip_bound(signed):
    code = dynamic_map(signed)
    x = sample((10_007,), torch.float32, signed, seed=2)
    codes, absmax = quantize_blockwise_ref(x, code, 256)
    s = scaled_blocks(x, absmax, 256)
    dist = (s[:, None] - code[None, :]).abs()                       # (n, 256) brute force
    best = dist.min(dim=1).values
    assert torch.all(dist.gather(1, codes.long()[:, None]).squeeze(1) <= best + 1e-7)
    # round trip: error <= half the gap of the bracketing map values, times absmax
    gaps = torch.cat([code.diff(), code.diff()[-1:]])
    hi = torch.bucketize(s, code).clamp(1, 255)
    bound = 0.5 * (code[hi] - code[hi - 1]) * absmax.repeat_interleave(256)[: x.numel()]
    err = (dequantize_blockwise_ref(codes, absmax, code, 256, x.shape) - x).abs()
    assert torch.all(err <= bound * (1 + 1e-5) + 1e-12) and gaps.max() < 0.1


def test_zero_block_and_exact_values():
    code = dynamic_map(True)
    x = torch.zeros(300)
    x[260:270] = torch.tensor([0.5, -1.0, 1.0, 0.0, 0.25, -0.25, 0.75, 0.1, -0.1, 0.3])
    codes, absmax = quantize_blockwise(x, code, 256)
    assert absmax.tolist() == [0.0, 1.0]
    assert torch.all(codes[:256] == 127)  # the code of 0
    back = dequantize_blockwise(codes, absmax, code, 256, x.shape)
    assert torch.equal(back[:256], x[:256]) and back[262].item() == 1.0


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("signed", [True, False])
def test_triton_equals_reference(shape, dtype, signed):
    """Loads upcast exactly and all maths is fp32 in both, so codes/absmax/values are bit-identical."""
    code = dynamic_map(signed)
    x = sample(shape, dtype, signed, seed=3)
    codes, absmax = quantize_blockwise_triton(x, code, 256)
    ref_codes, ref_absmax = quantize_blockwise_ref(x, code, 256)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    values = dequantize_blockwise_triton(codes, absmax, code, 256, shape)
    assert torch.equal(values, dequantize_blockwise_ref(codes, absmax, code, 256, shape))


@pytest.mark.parametrize("blocksize", [16, 64, 2048])
def test_triton_other_blocksizes(blocksize):
    code = dynamic_map(True)
    x = sample((5_003,), torch.float32, True, seed=4)
    codes, absmax = quantize_blockwise_triton(x, code, blocksize)
    ref_codes, ref_absmax = quantize_blockwise_ref(x, code, blocksize)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)


def test_dispatch(monkeypatch):
    x = torch.zeros(3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert use_triton(x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not use_triton(x)  # CPU without the interpreter: PyTorch reference


@pytest.mark.parametrize("bad", [0, 100, 8, 8192, 256.0])
def test_bad_blocksize(bad):
    with pytest.raises(ValueError, match="blocksize"):
        quantize_blockwise(torch.zeros(4), dynamic_map(True), bad)


def test_bad_arguments():
    code = dynamic_map(True)
    with pytest.raises(ValueError, match="code"):
        quantize_blockwise(torch.zeros(4), code[:10], 256)
    with pytest.raises(ValueError, match="absmax"):
        dequantize_blockwise(torch.zeros(600, dtype=torch.uint8), torch.zeros(2), code, 256)
    with pytest.raises(ValueError, match="codes"):
        dequantize_blockwise(torch.zeros(6, dtype=torch.int32), torch.zeros(1), code, 256)
