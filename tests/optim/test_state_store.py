"""MomentStore: round-trip bounds against a brute-force nearest quantizer, 8-bit vs fp32 selection
by size, plain-tensor state that survives torch.load(weights_only=True)."""

import io

import pytest
import torch

from lowmem.kernels.dynamic_map import dynamic_map
from lowmem.optim.state_store import MomentStore


def brute_force_round_trip(x: torch.Tensor, signed: bool, blocksize: int) -> torch.Tensor:
    code = dynamic_map(signed)
    flat = x.reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), blocksize):
        block = flat[start:start + blocksize]
        absmax = block.abs().max()
        scaled = block / absmax if absmax > 0 else block
        nearest = code[(scaled[:, None] - code[None, :]).abs().argmin(dim=1)]
        out[start:start + blocksize] = nearest * absmax
    return out.view_as(x)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(4096,), (65, 129)], ids=str)
def test_8bit_round_trip_is_the_nearest_map_value(signed, shape):
    store = MomentStore(bits=8, blocksize=256)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    x = x if signed else x * x
    state = {}
    store.init(state, "m", x)
    store.store(state, "m", x, signed=signed)
    back = store.load(state, "m", x.shape, signed=signed)
    assert back.shape == x.shape and back.dtype == torch.float32
    expected = brute_force_round_trip(x, signed, 256)
    # equal to the brute-force nearest value, except where x sits on a midpoint (fp32 ties)
    assert (back != expected).float().mean() <= 0.002
    absmax = x.reshape(-1).abs().max()
    assert (back - x).abs().max() <= 0.5 * dynamic_map(signed).diff().max() * absmax


def test_selection_by_size_and_bits():
    small, large = torch.zeros(4095), torch.zeros(64, 64)
    state = {}
    MomentStore(bits=8).init(state, "small", small)
    MomentStore(bits=8).init(state, "large", large)
    MomentStore(bits=32).init(state, "fp32", large)
    assert state["small"].dtype == torch.float32 and state["small"].shape == small.shape
    assert state["large_codes"].dtype == torch.uint8 and state["large_codes"].shape == (4096,)
    assert state["large_absmax"].dtype == torch.float32 and state["large_absmax"].shape == (16,)
    assert state["fp32"].shape == large.shape and "fp32_codes" not in state
    assert MomentStore(bits=8, min_8bit_size=10).quantized(10) and not MomentStore(bits=32).quantized(10 ** 6)


def test_fp32_store_is_exact_and_state_is_plain_tensors():
    store8, store32 = MomentStore(bits=8, blocksize=64), MomentStore(bits=32)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(1))
    state = {}
    store8.init(state, "q", x)
    store32.init(state, "f", x)
    store8.store(state, "q", x, signed=True)
    store32.store(state, "f", x.clone(), signed=True)
    assert torch.equal(store32.load(state, "f", x.shape, signed=True), x)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in loaded.values())
    assert torch.equal(store8.load(loaded, "q", x.shape, signed=True), store8.load(state, "q", x.shape, signed=True))


def test_bad_bits():
    with pytest.raises(ValueError, match="state_bits"):
        MomentStore(bits=4)


def apollo_mini_run(state_bits: int, chunk_numel: int) -> tuple[list[torch.Tensor], dict]:
    """Three APOLLO-Mini steps on a target matrix and a large non-target (embedding-like) matrix."""
    from lowmem.optim.apollo import APOLLOAdamW

    gen = torch.Generator().manual_seed(5)
    target, embedding = torch.nn.Parameter(torch.randn(96, 80, generator=gen)), \
        torch.nn.Parameter(torch.randn(97, 131, generator=gen))   # 12707 elements: a partial last block
    opt = APOLLOAdamW([{"params": [target], "rank": 1, "scale_type": "tensor", "scale": 128.0},
                       {"params": [embedding]}], lr=1e-2, weight_decay=0.01, state_bits=state_bits)
    opt.store.chunk_numel = chunk_numel
    for _ in range(3):
        for p in (target, embedding):
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return [target.detach(), embedding.detach()], opt.state[embedding]


@pytest.mark.parametrize("state_bits", [8, 32])
def test_chunked_moments_equal_the_whole_tensor_update_bit_for_bit(state_bits):
    """Issue #8: moments are loaded, updated and stored by chunks of whole blocks, so an update holds
    one chunk's fp32 temporaries; blocks quantize independently, so parameters and states equal a
    whole-tensor pass exactly. ``state_bits`` covers APOLLO's non-target AdamW group too."""
    whole_params, whole_state = apollo_mini_run(state_bits, chunk_numel=1 << 20)
    params, state = apollo_mini_run(state_bits, chunk_numel=3 * 256)
    assert len(MomentStore(chunk_numel=3 * 256).chunks(97 * 131)) == 17
    assert ("exp_avg_codes" in state) == (state_bits == 8)
    for a, b in zip(params, whole_params):
        assert torch.equal(a, b)
    assert state.keys() == whole_state.keys()
    assert all(torch.equal(state[k], whole_state[k]) for k in state if isinstance(state[k], torch.Tensor))
