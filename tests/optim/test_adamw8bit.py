"""AdamW8bit / SGD8bit against torch.optim.AdamW and bitsandbytes' 8-bit optimizers (CPU),
state-dict round trips, state selection, registry names, argument errors."""

import io

import pytest
import torch

from lowmem.kernels.dynamic_map import dynamic_map
from lowmem.kernels.quantize import dequantize_blockwise
from lowmem.optim.adamw8bit import AdamW8bit, SGD8bit
from lowmem.optim.registry import create_optimizer

bnb = pytest.importorskip("bitsandbytes")

SHAPES = [(64, 257), (1, 4097), (33, 129)]  # all >= min_8bit_size, with partial last blocks


def make_params(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(gen, *param_lists, scale=0.01):
    for ps in zip(*param_lists):
        g = torch.randn(ps[0].shape, generator=gen) * scale
        for p in ps:
            p.grad = g.to(p.dtype).clone()


def _dequantized(opt, p, key, signed):
    st = opt.state[p]
    return dequantize_blockwise(st[key + "_codes"], st[key + "_absmax"], dynamic_map(signed), 256, p.shape)


@pytest.mark.parametrize("shape", [pytest.param((1024, 32), marks=pytest.mark.slow), (33, 129)], ids=str)
def test_resynced_steps_match_torch_adam(shape):
    """bitsandbytes' test_optimizer8bit: after each step the torch.optim.Adam reference takes the
    8-bit params and dequantized moments; states stay close (< 20 elements outside atol 3e-3,
    rtol 1e-3) and the params' errors below its bounds (mean abs 6e-5, mean rel 6e-4)."""
    ref = [torch.nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.1)]
    ours = clone_params(ref)
    opt_ref = torch.optim.Adam(ref, lr=1e-3, eps=1e-8)
    opt = AdamW8bit(ours, lr=1e-3, eps=1e-8, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(30):
        set_grads(gen, ref, ours)
        opt_ref.step()
        opt.step()
        (a,), (b,) = ours, ref
        for key, signed in (("exp_avg", True), ("exp_avg_sq", False)):
            s = _dequantized(opt, a, key, signed)
            assert (~torch.isclose(opt_ref.state[b][key], s, atol=3e-3, rtol=1e-3)).sum() < 20
            opt_ref.state[b][key].copy_(s)
        err = (a - b).abs()
        assert err.mean() < 6e-5 and (err / (b.abs() + 1e-9)).mean() < 6e-4
        b.data.copy_(a.data)


def _distance_after(opt_cls, steps=50, **kw):
    ref = make_params(SHAPES[:2], seed=2)
    other = clone_params(ref)
    opt_ref = torch.optim.AdamW(ref, lr=1e-3, weight_decay=1e-2)
    opt = opt_cls(other, lr=1e-3, weight_decay=1e-2, **kw)
    gen = torch.Generator().manual_seed(3)
    for _ in range(steps):
        set_grads(gen, ref, other)
        opt_ref.step()
        opt.step()
    return sum((a - b).abs().sum().item() for a, b in zip(other, ref)) / sum(p.numel() for p in ref)


@pytest.mark.slow
def test_unsynced_no_further_from_adamw_than_bitsandbytes():
    """Same maps, blocks and maths: the two drift from AdamW by the same quantization noise
    (bnb's CPU codes are slightly coarser, its decay comes before the update): equal within 2%."""
    ours = _distance_after(AdamW8bit)
    theirs = _distance_after(bnb.optim.AdamW8bit)
    assert 0 < ours <= 1.02 * theirs


def _bnb_codes(opt, p):
    st = opt.state[p]
    return st["state1"].reshape(-1), st["absmax1"], st["state2"].reshape(-1), st["absmax2"]


def test_step_for_step_against_bitsandbytes_adamw8bit():
    """Same block size (256) and min_8bit_size (4096). bnb's CPU library looks codes up on a 65536-bin
    grid (see tests/kernels/test_quantize.py), so states drift apart a little: the mean param
    difference stays below 0.1% of the mean distance travelled, under 0.5% of the elements differ
    by more than 10% of their own travel, codes mostly equal, absmax close."""
    theirs = make_params(SHAPES + [(10, 10)], seed=4)  # the 100-element tensor keeps fp32 state in both
    ours = clone_params(theirs)
    start = [p.detach().clone() for p in theirs]
    opt_b = bnb.optim.AdamW8bit(theirs, lr=1e-3, weight_decay=1e-2)
    opt = AdamW8bit(ours, lr=1e-3, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(5)
    for _ in range(10):
        set_grads(gen, theirs, ours)
        opt_b.step()
        opt.step()
        for a, b, s in zip(ours, theirs, start):
            diff, travel = (a - b).abs(), (b - s).abs()
            assert diff.mean() <= 1e-3 * travel.mean() and (diff > 0.1 * travel).float().mean() < 0.005
    for a, b in zip(ours[:-1], theirs[:-1]):
        st = opt.state[a]
        c1, a1, c2, a2 = _bnb_codes(opt_b, b)
        # bnb's CPU path also lacks the kernel's sign rule for tiny negative m (one code apart)
        assert (st["exp_avg_codes"] != c1).float().mean() < 0.05
        assert (st["exp_avg_sq_codes"].long() - c2.long()).abs().float().mean() < 0.2
        torch.testing.assert_close(st["exp_avg_absmax"], a1, rtol=0.02, atol=0)
        torch.testing.assert_close(st["exp_avg_sq_absmax"], a2, rtol=0.02, atol=0)
    assert set(opt.state[ours[-1]]) == {"step", "exp_avg", "exp_avg_sq"}
    torch.testing.assert_close(opt.state[ours[-1]]["exp_avg"], opt_b.state[theirs[-1]]["state1"])
    torch.testing.assert_close(ours[-1], theirs[-1], rtol=1e-6, atol=1e-7)


def test_step_for_step_against_bitsandbytes_sgd8bit():
    theirs = make_params(SHAPES, seed=6)
    ours = clone_params(theirs)
    start = [p.detach().clone() for p in theirs]
    opt_b = bnb.optim.SGD8bit(theirs, lr=1e-2, momentum=0.9, weight_decay=1e-2)
    opt = SGD8bit(ours, lr=1e-2, momentum=0.9, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(7)
    for _ in range(10):
        set_grads(gen, theirs, ours, scale=1.0)
        opt_b.step()
        opt.step()
    for a, b, s in zip(ours, theirs, start):
        assert (a - b).abs().mean() <= 0.01 * (b - s).abs().mean()
        assert (opt.state[a]["momentum_buffer_codes"] != opt_b.state[b]["state1"].reshape(-1)).float().mean() < 0.02


def test_non_finite_gradient_element_leaves_param_and_wipes_state():
    (p,) = make_params([(4097,)], seed=8)
    opt = AdamW8bit([p], lr=1e-2)
    p.grad = torch.randn(4097) * 0.01
    opt.step()
    before = p.detach().clone()
    p.grad = torch.randn(4097) * 0.01
    p.grad[7] = float("nan")
    opt.step()
    assert p[7] == before[7] and torch.isfinite(p).all() and (p != before).sum() == 4096
    assert opt.state[p]["exp_avg_codes"][7] == 127 and opt.state[p]["exp_avg_sq_codes"][7] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [AdamW8bit, SGD8bit])
def test_state_dict_round_trip_mid_run(cls, dtype):
    params = make_params(SHAPES + [(7,)], seed=9, dtype=dtype)
    twin = clone_params(params)
    opt = cls(params, lr=1e-2)
    gen = torch.Generator().manual_seed(10)
    for _ in range(3):
        set_grads(gen, params)
        opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    for state in loaded["state"].values():
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    opt2 = cls(twin, lr=1e-2)
    for a, b in zip(twin, params):
        a.data.copy_(b.data)
    opt2.load_state_dict(loaded)
    for p, q in zip(params, twin):
        for key, value in opt.state[p].items():
            assert opt2.state[q][key].dtype == value.dtype and torch.equal(opt2.state[q][key], value)
    for _ in range(3):  # identical continuation
        set_grads(gen, params, twin)
        opt.step()
        opt2.step()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


def test_state_selection_by_size_and_name(tiny_model, tiny_batch):
    model = tiny_model(hidden=64, vocab=128)  # q_proj 64x64 = 4096 elements: 8-bit; norms: fp32
    opt = create_optimizer(model, "adamw8bit", lr=1e-3)
    assert isinstance(opt, AdamW8bit)
    model(**tiny_batch()).loss.backward()
    opt.step()
    named = dict(model.named_parameters())
    state = {n: opt.state[p] for n, p in named.items()}
    assert "exp_avg" in state["model.embed_tokens.weight"]          # embedding: fp32 (stable embedding)
    assert "exp_avg_codes" in state["lm_head.weight"]               # 128x64 = 8192: 8-bit
    assert "exp_avg_codes" in state["model.layers.0.self_attn.q_proj.weight"]
    assert "exp_avg" in state["model.layers.0.self_attn.k_proj.weight"]  # 64x32 = 2048 < 4096: fp32
    assert state["lm_head.weight"]["exp_avg_absmax"].numel() == 8192 // 256
    all8 = create_optimizer(model, "adamw8bit", fp32_state_params=[])
    model(**tiny_batch()).loss.backward()
    all8.step()
    assert "exp_avg_codes" in all8.state[named["model.embed_tokens.weight"]]
    assert isinstance(create_optimizer(model, "sgd8bit", lr=1e-2), SGD8bit)


@pytest.mark.parametrize("kwargs, field", [
    (dict(lr=-1.0), "lr"), (dict(betas=(1.0, 0.999)), "betas"), (dict(eps=0.0), "eps"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(blocksize=100), "blocksize"),
    (dict(min_8bit_size=-1), "min_8bit_size"),
])
def test_bad_arguments(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdamW8bit(make_params([(3,)]), **kwargs)


def test_sgd_needs_momentum():
    with pytest.raises(ValueError, match="momentum"):
        SGD8bit(make_params([(3,)]), momentum=0.0)
