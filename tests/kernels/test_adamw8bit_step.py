"""The fused 8-bit step: Triton == PyTorch reference (odd sizes, fp32/bf16/fp16), the
reference against torch.optim.AdamW / SGD, the non-finite rule and the sign rule of bitsandbytes,
and the chunked PyTorch path == one whole-tensor pass, bit for bit."""

import pytest
import torch

from lowmem.kernels.adamw8bit_step import (AdamScalars, adam8bit_step_ref, adam_fp32_step, momentum8bit_step_ref,
                                          momentum_fp32_step)
from lowmem.kernels.adamw8bit_step_triton import adam8bit_step_triton, momentum8bit_step_triton
from lowmem.kernels.dynamic_map import dynamic_map
from lowmem.kernels.quantize import dequantize_blockwise_ref, quantize_blockwise_ref

# 2-D, several programs, a partial last block: what the interpreter checks does not grow with the size (the
# compiled kernels are compared on (1823, 781) in test_gpu.py; chunked references: test_adamw8bit_step.py)
SHAPES = [(1,), (255,), (257,), (4097,), (97, 131)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
B = 256


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at the magnitude of ``x``."""
    mag = x.float().abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(mag))) * torch.finfo(dtype).eps


def random_state(n: int, gen: torch.Generator, moments: int) -> list[torch.Tensor]:
    """Quantized moments of a plausible mid-run state (m ~ 1e-3 N(0,1), v ~ 1e-6 chi2)."""
    out = []
    for signed in (True, False)[:moments]:
        x = torch.randn(n, generator=gen) * 1e-3
        codes, absmax = quantize_blockwise_ref(x if signed else x * x, dynamic_map(signed), B)
        out += [codes, absmax]
    return out


def assert_states_close(ours, ref):
    for a, b in zip(ours, ref):
        if a.dtype == torch.uint8:
            diff = (a.long() - b.long()).abs()
            assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.005  # ties after fp32 rounding only
        else:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def assert_params_close(ours, ref, before, dtype):
    """Within the step's roundings (the update term, ``p + update``, the decay: each <= 1 ulp at the
    operands' magnitude, as cancellation can make the result smaller than p or the update), taken
    by each side: 4 ulps. The interpreter truncates casts to bf16 instead of rounding to nearest
    (<= 1 ulp per cast instead of 1/2), which stays within the same bound."""
    before, ref, ours = before.float(), ref.float(), ours.float()
    scale = torch.maximum(torch.maximum(before.abs(), ref.abs()), (ref - before).abs())
    assert torch.all((ours - ref).abs() <= 4 * ulp(scale, dtype) + 1e-30)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_adam_triton_equals_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(shape, generator=gen).to(dtype)
    state = random_state(p.numel(), gen, 2)
    for step in (1, 7):  # the kernel is re-synced to the reference before each step
        g = torch.randn(shape, generator=gen).to(dtype)
        g.view(-1)[:: 97] = float("nan")
        k = AdamScalars.of(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=step)
        p_tri, state_tri, before = p.clone(), [s.clone() for s in state], p.clone()
        adam8bit_step_ref(p, g, *state, k, B)
        adam8bit_step_triton(p_tri, g, *state_tri, k, B)
        assert_params_close(p_tri, p, before, dtype)
        assert_states_close(state_tri, state)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_momentum_triton_equals_reference(shape, dtype):
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(shape, generator=gen).to(dtype)
    state = random_state(p.numel(), gen, 1)
    for step in (1, 4):
        g = torch.randn(shape, generator=gen).to(dtype)
        p_tri, state_tri, before = p.clone(), [s.clone() for s in state], p.clone()
        momentum8bit_step_ref(p, g, *state, lr=1e-2, beta1=0.9, weight_decay=1e-2, step=step, blocksize=B)
        momentum8bit_step_triton(p_tri, g, *state_tri, lr=1e-2, beta1=0.9, weight_decay=1e-2, step=step,
                                 blocksize=B)
        assert_params_close(p_tri, p, before, dtype)
        assert_states_close(state_tri, state)


@pytest.mark.parametrize("step_fn", [adam8bit_step_ref, adam8bit_step_triton])
def test_first_step_equals_torch_adamw(step_fn):
    """From a zero state the first step only quantizes after the update: it equals AdamW (wd=0,
    where the order of decay and update cannot matter), and the stored moments are the quantized
    (1-b1) g and (1-b2) g^2."""
    gen = torch.Generator().manual_seed(2)
    p = torch.randn(3001, generator=gen)
    g = torch.randn(3001, generator=gen)
    ref = torch.nn.Parameter(p.clone())
    ref.grad = g.clone()
    torch.optim.AdamW([ref], lr=1e-2, eps=1e-8, weight_decay=0.0).step()
    state = [torch.zeros(3001, dtype=torch.uint8), torch.zeros(12), torch.zeros(3001, dtype=torch.uint8),
             torch.zeros(12)]
    step_fn(p, g, *state, AdamScalars.of(1e-2, 0.9, 0.999, 1e-8, 0.0, 1), B)
    torch.testing.assert_close(p, ref.detach(), rtol=1e-6, atol=1e-7)
    for (codes, absmax), signed, exact in (((state[0], state[1]), True, 0.1 * g), ((state[2], state[3]), False,
                                                                                  1e-3 * g * g)):
        back = dequantize_blockwise_ref(codes, absmax, dynamic_map(signed), B, (3001,))
        assert torch.equal(absmax, exact.view(-1)[: 12 * B].new_tensor(
            [exact[i:i + B].abs().max().item() for i in range(0, 3001, B)]))
        assert (back - exact).abs().max() <= 0.05 * absmax.max()


@pytest.mark.parametrize("step_fn", [adam8bit_step_ref, adam8bit_step_triton])
def test_non_finite_gradients_wipe_state_and_keep_param(step_fn):
    gen = torch.Generator().manual_seed(3)
    p = torch.randn(600, generator=gen)
    state = random_state(600, gen, 2)
    g = torch.randn(600, generator=gen)
    bad = torch.tensor([0, 5, 300, 599])
    g[bad] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")])
    p0 = p.clone()
    step_fn(p, g, *state, AdamScalars.of(1e-2, 0.9, 0.999, 1e-8, 0.1, 3), B)
    assert torch.equal(p[bad], p0[bad]) and torch.all(p[1:5] != p0[1:5]) and torch.isfinite(p).all()
    m = dequantize_blockwise_ref(state[0], state[1], dynamic_map(True), B, (600,))
    v = dequantize_blockwise_ref(state[2], state[3], dynamic_map(False), B, (600,))
    assert torch.all(m[bad] == 0) and torch.all(v[bad] == 0) and torch.isfinite(state[1]).all()


@pytest.mark.parametrize("step_fn", [adam8bit_step_ref, adam8bit_step_triton])
def test_tiny_negative_momentum_keeps_its_sign(step_fn):
    """bitsandbytes moves a negative m that rounds to code(+0) one code down (-5.5e-7 absmax)."""
    p, g = torch.zeros(256), torch.zeros(256)
    g[0], g[1], g[2] = 1.0, -1e-9, 1e-9
    state = [torch.zeros(256, dtype=torch.uint8), torch.zeros(1), torch.zeros(256, dtype=torch.uint8), torch.zeros(1)]
    step_fn(p, g, *state, AdamScalars.of(1e-3, 0.9, 0.999, 1e-8, 0.0, 1), B)
    assert state[0][1].item() == 126 and state[0][2].item() == 127 and state[0][3].item() == 127


@pytest.mark.parametrize("step_fn", [momentum8bit_step_ref, momentum8bit_step_triton])
def test_momentum_against_torch_sgd(step_fn):
    """From the same momentum, 8-bit SGD differs from torch.optim.SGD by exactly lr*b1*(quantization
    error of m); over 20 un-synced steps it stays within 2% of SGD's displacement."""
    gen = torch.Generator().manual_seed(4)
    p = torch.randn(4097, generator=gen)
    ref = torch.nn.Parameter(p.clone())
    sgd = torch.optim.SGD([ref], lr=1e-2, momentum=0.9, weight_decay=1e-2)
    state = [torch.zeros(4097, dtype=torch.uint8), torch.zeros(17)]
    for step in range(1, 21):
        g = torch.randn(4097, generator=gen)
        m_exact = sgd.state[ref]["momentum_buffer"].clone() if step > 1 else torch.zeros(4097)
        m_deq = dequantize_blockwise_ref(*state, dynamic_map(True), B, (4097,))
        before = p - ref.detach()
        ref.grad = g.clone()
        sgd.step()
        step_fn(p, g, *state, lr=1e-2, beta1=0.9, weight_decay=1e-2, step=step, blocksize=B)
        expected = before - 1e-2 * 0.9 * (m_deq - m_exact) - 1e-2 * 1e-2 * before
        torch.testing.assert_close(p - ref.detach(), expected, rtol=0, atol=1e-6)
    moved = (ref.detach() - torch.randn(4097, generator=torch.Generator().manual_seed(4))).abs().mean()
    assert (p - ref.detach()).abs().mean() < 0.02 * moved


def chunk_size(monkeypatch, elements: int) -> None:
    """Run the PyTorch steps by chunks of ``elements`` (whole blocks)."""
    import lowmem.kernels.adamw8bit_step as mod
    from lowmem.kernels.quantize import block_chunks

    monkeypatch.setattr(mod, "block_chunks", lambda numel, blocksize: block_chunks(numel, blocksize, elements))


def three_steps(step, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """p, then the state, after three steps of ``step(p, g, state, t)`` from a fixed start; one
    gradient element is NaN at step 2 (the non-finite rule wipes that element)."""
    p = torch.randn(n, generator=gen)
    state = random_state(n, gen, 2) + [torch.randn(n, generator=gen) * 1e-3, torch.rand(n, generator=gen) * 1e-6]
    for t in (1, 2, 3):
        g = torch.randn(n, generator=gen)
        g[n // 2] = float("nan") if t == 2 else g[n // 2]
        step(p, g, state, t)
    return [p] + state


STEPS = {
    "adam8bit": lambda p, g, s, t: adam8bit_step_ref(p, g, *s[:4], AdamScalars.of(1e-2, 0.9, 0.999, 1e-8, 0.01, t), B),
    "momentum8bit": lambda p, g, s, t: momentum8bit_step_ref(p, g, *s[:2], 1e-2, 0.9, 0.01, t, B),
    "adam_fp32": lambda p, g, s, t: adam_fp32_step(p, g, s[4], s[5], AdamScalars.of(1e-2, 0.9, 0.999, 1e-8, 0.01, t)),
    "momentum_fp32": lambda p, g, s, t: momentum_fp32_step(p, g, s[4], 1e-2, 0.9, 0.01, t),
}


@pytest.mark.parametrize("name", list(STEPS))
def test_chunked_steps_equal_the_whole_tensor_step_bit_for_bit(monkeypatch, name):
    """Issue #8: the CPU path works on chunks of whole blocks to bound its fp32 temporaries;
    blocks are independent, so parameters, codes, absmax and fp32 moments are exactly those of
    one whole-tensor pass (odd size: a partial last block, a chunk boundary inside no block)."""
    n = 11 * B + 37
    chunk_size(monkeypatch, n + B)
    whole = three_steps(STEPS[name], n, torch.Generator().manual_seed(3))
    chunk_size(monkeypatch, 3 * B)
    chunked = three_steps(STEPS[name], n, torch.Generator().manual_seed(3))
    for a, b in zip(chunked, whole):
        assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
