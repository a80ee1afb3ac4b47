"""The CPU 8-bit kernels (C, :mod:`lowmem.kernels.blockwise_cpu`) give their PyTorch references'
bits: quantize/dequantize on odd sizes, dtypes and block sizes; the nearest-code table on the
edges of every 16-bit key and around every midpoint; the fused AdamW and SGD-momentum steps over
several steps (non-finite and overflowing gradients, fp32/bf16/fp16, pieces and threads); whole
optimizers (AdamW8bit, SGD8bit, SGD-SaI with 8-bit states) through a state-dict round trip. Codes
without a table, and a machine without a C compiler, take the references."""

import io

import pytest
import torch

from lowmem.kernels import blockwise_cpu
from lowmem.kernels.adamw8bit_step import AdamScalars, adam8bit_step, adam8bit_step_ref, momentum8bit_step, \
    momentum8bit_step_ref
from lowmem.kernels.dynamic_map import dynamic_map
from lowmem.kernels.quantize import dequantize_blockwise, dequantize_blockwise_ref, quantize_blockwise, \
    quantize_blockwise_ref

pytestmark = pytest.mark.skipif(blockwise_cpu.library() is None, reason="no C compiler")


@pytest.fixture(autouse=True)
def cpu_path(monkeypatch):
    """The entry points on CPU tensors take the C kernels (conftest sets TRITON_INTERPRET for the Triton tests)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def reference_only(monkeypatch):
    monkeypatch.setattr(blockwise_cpu, "takes", lambda *tensors: False)
    monkeypatch.setattr(blockwise_cpu, "steps_take", lambda *tensors: False)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, NaN payloads aside."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def sample(n: int, signed: bool, seed: int) -> torch.Tensor:
    """Moment-like values over many decades, a zero block, and in the last blocks a NaN and an inf."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen) * 1e-3 * torch.exp(torch.randn(n, generator=gen) * 3)
    x = x if signed else x * x
    if n > 600:
        x[256:512] = 0.0
        x[-1], x[-300] = float("nan"), float("inf")
    return x


@pytest.mark.parametrize("n, blocksize", [(1, 256), (4097, 256), (50_001, 64), (9_000, 4096), (333, 16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_and_dequantize_equal_the_reference(n, blocksize, dtype, signed):
    code = dynamic_map(signed)
    x = sample(n, signed, seed=n).to(dtype)
    codes, absmax = quantize_blockwise(x, code, blocksize)
    ref_codes, ref_absmax = quantize_blockwise_ref(x, code, blocksize)
    assert torch.equal(codes, ref_codes) and same(absmax, ref_absmax)
    values = dequantize_blockwise(codes, absmax, code, blocksize, (n,))
    assert same(values, dequantize_blockwise_ref(codes, absmax, code, blocksize, (n,)))


@pytest.mark.parametrize("signed", [True, False])
def test_table_at_every_key_edge_and_midpoint(signed):
    """Blocks holding 1.0 (absmax 1, so the scaled value is the value itself) and, for every
    16-bit key in [-1, 1], floats at both ends and the middle of its interval, plus each midpoint
    and its two neighbouring floats: every code equals torch.bucketize's."""
    code = dynamic_map(signed)
    mid = (code[:-1] + code[1:]) / 2
    keys = torch.arange(1 << 16, dtype=torch.int64) << 16
    edges = torch.cat([keys | tail for tail in (0, 1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)])
    floats = (edges - (edges >= 1 << 31).long() * (1 << 32)).to(torch.int32).view(torch.float32)
    around = torch.cat([mid, torch.nextafter(mid, torch.tensor(2.0)), torch.nextafter(mid, torch.tensor(-2.0))])
    x = torch.cat([floats[floats.abs() <= 1], around, torch.tensor([0.0, -0.0])])
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % 255)).view(-1, 255)
    x = torch.cat([torch.ones(blocks.shape[0], 1), blocks], dim=1).reshape(-1)
    codes, absmax = quantize_blockwise(x, code, 256)
    assert torch.all(absmax == 1) and torch.equal(codes, quantize_blockwise_ref(x, code, 256)[0])


def moments(n: int, gen: torch.Generator, count: int) -> list[torch.Tensor]:
    state = []
    for signed in (True, False)[:count]:
        x = torch.randn(n, generator=gen) * 1e-3
        state += list(quantize_blockwise_ref(x if signed else x * x, dynamic_map(signed), 256))
    return state


def gradients(n: int, dtype: torch.dtype, gen: torch.Generator):
    """Step 2: a NaN and infs (the element's state is wiped); step 3: 1e20 (g^2 overflows: v = inf, so
    absmax inf and NaN scaled values); step 4 starts from that state."""
    for t in (1, 2, 3, 4):
        g = torch.randn(n, generator=gen)
        if t == 2 and n > 10:
            g[3], g[n // 2], g[-1] = float("nan"), float("inf"), -float("inf")
        if t == 3:
            g[n // 3] = 1e20
        yield t, g.to(dtype)


@pytest.mark.parametrize("n", [1, 4097, 11 * 256 + 37], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_adam_step_equals_the_reference(n, dtype):
    gen = torch.Generator().manual_seed(n)
    p = torch.randn(n, generator=gen).to(dtype)
    state = moments(n, gen, 2)
    p_ref, state_ref = p.clone(), [s.clone() for s in state]
    for t, g in gradients(n, dtype, gen):
        k = AdamScalars.of(1e-2, 0.9, 0.999, 1e-8, 0.1, t)
        adam8bit_step(p, g, *state, k, 256)
        adam8bit_step_ref(p_ref, g, *state_ref, k, 256)
        assert same(p, p_ref) and all(same(a, b) for a, b in zip(state, state_ref)), t


@pytest.mark.parametrize("n", [1, 4097, 11 * 256 + 37], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_momentum_step_equals_the_reference(n, dtype):
    gen = torch.Generator().manual_seed(n + 1)
    p = torch.randn(n, generator=gen).to(dtype)
    state = moments(n, gen, 1)
    p_ref, state_ref = p.clone(), [s.clone() for s in state]
    for t, g in gradients(n, dtype, gen):
        momentum8bit_step(p, g, *state, 1e-2, 0.9, 1e-2, t, 256)
        momentum8bit_step_ref(p_ref, g, *state_ref, 1e-2, 0.9, 1e-2, t, 256)
        assert same(p, p_ref) and all(same(a, b) for a, b in zip(state, state_ref)), t


def test_pieces_and_threads_equal_the_reference(monkeypatch):
    """Two threads, each over several pieces of the Adam step (a partial last block, a piece
    boundary inside no block), and a threaded quantize."""
    monkeypatch.setattr(blockwise_cpu, "MIN_BLOCKS_PER_THREAD", 1)
    monkeypatch.setattr(blockwise_cpu, "SQRT_PIECE", 3 * 256)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(5)
        n = 23 * 256 + 101
        p, state = torch.randn(n, generator=gen), moments(n, gen, 2)
        p_ref, state_ref = p.clone(), [s.clone() for s in state]
        for t, g in gradients(n, torch.float32, gen):
            k = AdamScalars.of(1e-3, 0.9, 0.999, 1e-8, 0.01, t)
            adam8bit_step(p, g, *state, k, 256)
            adam8bit_step_ref(p_ref, g, *state_ref, k, 256)
        assert same(p, p_ref) and all(same(a, b) for a, b in zip(state, state_ref))
        x = sample(n, True, seed=6)
        assert all(same(a, b) for a, b in zip(quantize_blockwise(x, dynamic_map(True), 256),
                                              quantize_blockwise_ref(x, dynamic_map(True), 256)))
    finally:
        torch.set_num_threads(threads)


def trajectory(make, dtype, monkeypatch, reference: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Three steps, a state-dict round trip into a fresh optimizer, two more steps: the parameters
    and the state tensors (C kernels, or ``reference``: the PyTorch paths)."""
    with monkeypatch.context() as patch:
        if reference:
            reference_only(patch)
        gen = torch.Generator().manual_seed(7)
        shapes = [(64, 257), (1, 4097), (33, 129)]
        params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
        opt = make(params)
        for step in range(5):
            if step == 3:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = make(params)
                opt.load_state_dict(torch.load(buf, weights_only=True))
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(dtype)
            opt.step()
    return params, [v for p in params for v in opt.state[p].values()]


@pytest.mark.parametrize("name", ["adamw8bit", "sgd8bit", "sgd_sai"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_optimizers_on_the_kernels_equal_the_reference_through_a_state_dict(monkeypatch, name, dtype):
    from lowmem.optim.adamw8bit import AdamW8bit, SGD8bit
    from lowmem.optim.sgd_sai import SGDSaI

    make = {"adamw8bit": lambda ps: AdamW8bit(ps, lr=1e-2, weight_decay=0.1),
            "sgd8bit": lambda ps: SGD8bit(ps, lr=1e-2, momentum=0.9, weight_decay=1e-2),
            "sgd_sai": lambda ps: SGDSaI(ps, lr=1e-2, state_bits=8)}[name]
    params, state = trajectory(make, dtype, monkeypatch, reference=False)
    params_ref, state_ref = trajectory(make, dtype, monkeypatch, reference=True)
    assert any(t.dtype == torch.uint8 for t in state)  # 8-bit state was used
    assert all(same(a.detach(), b.detach()) for a, b in zip(params, params_ref))
    assert all(same(a, b) for a, b in zip(state, state_ref))


def test_codes_without_a_table_take_the_reference():
    """A code with more than two midpoints in some 16-bit key's interval, and an unsorted one."""
    for code in (torch.linspace(0.5, 0.501, 256), torch.linspace(1, -1, 256)):
        assert blockwise_cpu._table(code) is None and not blockwise_cpu.takes(code)
        x = torch.rand(1000, generator=torch.Generator().manual_seed(8)) * 1e-3
        assert all(torch.equal(a, b) for a, b in zip(quantize_blockwise(x, code, 256),
                                                     quantize_blockwise_ref(x, code, 256)))


def test_without_a_compiler_one_warning_and_the_reference(monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    blockwise_cpu.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU 8-bit kernels are unavailable.*not found"):
            assert blockwise_cpu.library() is None
        x = sample(4097, True, seed=9)
        assert not blockwise_cpu.takes(dynamic_map(True), x)
        assert all(same(a, b) for a, b in zip(quantize_blockwise(x, dynamic_map(True), 256),
                                              quantize_blockwise_ref(x, dynamic_map(True), 256)))
    finally:
        monkeypatch.undo()
        blockwise_cpu.library.cache_clear()
