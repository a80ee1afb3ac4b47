"""ZO2 with an int8 host copy (``offload.host_dtype: int8``, issue #27 item 3): each block stored as
blockwise int8 plus one fp32 scale per 256 weights, dequantized on the device, perturbed, evaluated and
quantized back with stochastic rounding (Q-GaLore's scheme, arXiv 2407.08296; ZO2, arXiv 2503.12668)."""

import pytest
import torch

from lowmem.kernels.int8_weights import dequantize_int8, num_blocks, quantize_int8_
from lowmem.offload.engine import _ROUND_STREAM, ZO2Engine
from lowmem.optim import create_optimizer
from lowmem.optim.zo_noise import mix_seed, param_seed, sgd_update_
from tests.offload.helpers import HP, batches, engine

INT8 = dict(host_dtype="int8")
B = 256


def _quantize_(params: list[torch.Tensor], seed: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each tensor in order, from one generator seeded ``seed`` (None: nearest), then set to its dequantized value."""
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    out = []
    for p in params:
        q, s = torch.empty(p.shape, dtype=torch.int8), torch.empty(num_blocks(p.numel(), B))
        quantize_int8_(q, s, p, B, gen)
        p.copy_(dequantize_int8(q, s, B))
        out.append((q, s))
    return out


def _stored(eng, k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Block ``k``'s host copy read as (payload, scales) per parameter: payload at the packed offsets, then
    the scales of every parameter in order."""
    pk, raw = eng.packed[k], eng.store.get(k)
    scales, at, out = raw[pk.numel:].view(torch.float32), 0, []
    for o, shape in zip(pk.offsets, pk.shapes):
        nb = num_blocks(shape.numel(), B)
        out.append((raw[o:o + shape.numel()].view(torch.int8).view(shape), scales[at:at + nb]))
        at += nb
    return out


@torch.no_grad()
def test_one_step_equals_dequantize_perturb_update_round_by_hand(tiny_model):
    """Load: round to nearest. Step: dequantize, MeZO's +eps z / -2 eps z / +eps z around the two forwards,
    stochastic rounding back (seed of step and block); the deferred update at the next visit: dequantize,
    theta -= lr (g z + wd theta), stochastic rounding again. Payloads and scales equal to the byte."""
    batch = batches(1)[0]
    _, eng = engine(tiny_model, INT8, arch="llama", layers=2)
    assert eng.store.dtype == torch.uint8
    ref = tiny_model(arch="llama", layers=2).eval()
    blocks = [list(b.parameters()) for b in ref.model.layers]
    want = [_quantize_(ps, None) for ps in blocks]
    assert all(_same(want[k], _stored(eng, k)) for k in range(2))

    opt = create_optimizer(ref, "mezo", **HP)
    seed, eps, noise = opt.draw_step_seed(), opt.eps, opt.noise
    seeds = {id(p): param_seed(seed, 0, idx) for idx, p, _ in opt.indexed_params()}
    decay = {id(p): group["weight_decay"] for _, p, group in opt.indexed_params()}  # none on norms
    losses = []
    for scale in (1.0, -2.0, 1.0):
        for p in ref.parameters():
            noise.add_(p, seeds[id(p)], scale * eps)
        losses.append(ref(**batch).loss)
    g = (float(losses[0]) - float(losses[1])) / (2 * eps)
    assert torch.equal(eng.step(batch), losses[0]) and eng.optimizer.last_projected_grads == [g]
    for k, ps in enumerate(blocks):  # written back after the dual forward
        assert _same(_quantize_(ps, mix_seed(seed, _ROUND_STREAM, k)), _stored(eng, k))
    eng.flush()
    for k, ps in enumerate(blocks):  # the deferred update at the next visit (here: flush)
        for p in ps:
            sgd_update_(p, seeds[id(p)], HP["lr"], g, decay[id(p)], noise=noise)
        assert _same(_quantize_(ps, mix_seed(seed, _ROUND_STREAM + 1, k)), _stored(eng, k)), f"block {k}"


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def test_host_and_nvme_tiers_identical_and_resume_exact(tiny_model, tmp_path):
    """Same seed: the host tier, the NVMe tier and a mixed one store the same bytes and give the same losses;
    a run saved after 2 steps (pending update included) and resumed on other weights ends identical."""
    data, kw = batches(4), dict(arch="opt", tied=True, layers=3)
    _, host = engine(tiny_model, INT8, **kw)
    losses = [host.step(b) for b in data]
    host.flush()
    _, first = engine(tiny_model, {**INT8, "nvme_dir": str(tmp_path / "a"), "host_memory_budget_gb": 0.0}, **kw)
    assert torch.equal(first.step(data[0]), losses[0]) and torch.equal(first.step(data[1]), losses[1])
    saved = {"weights": first.model_state_dict(), "engine": first.state_dict()}
    assert saved["engine"]["pending"] is not None and len(saved["engine"]["host_blocks"]) == 3
    mixed = {**INT8, "nvme_dir": str(tmp_path / "b"), "host_memory_budget_gb": 2e-5, "prefetch_depth": 2}
    _, second = engine(tiny_model, mixed, **kw, seed=123)  # other weights: all must come from the checkpoint
    assert set(second.store.tiers) == {"host", "nvme"}
    second.load_model_state_dict(saved["weights"])
    second.load_state_dict(saved["engine"])
    for b, expected in zip(data[2:], losses[2:]):
        assert torch.equal(second.step(b), expected)
    second.flush()
    assert all(torch.equal(second.store.get(i), host.store.get(i)) for i in range(3))
    got, want = second.model_state_dict(), host.model_state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_frozen_weights_keep_their_stored_bytes(tiny_model):
    """model.trainable: a weight outside the optimizer is never requantized (its payload and scales stay)."""
    model = tiny_model(arch="llama", layers=2)
    for name, p in model.named_parameters():
        p.requires_grad_("mlp" not in name)
    eng = ZO2Engine(model, create_optimizer(model, "mezo", **HP), INT8, device="cpu")
    frozen = [j for j, p in enumerate(eng.packed[0].params) if not p.requires_grad]
    start = [_stored(eng, k) for k in range(2)]
    for b in batches(2):
        eng.step(b)
    eng.flush()
    for k in range(2):
        now = _stored(eng, k)
        assert _same([now[j] for j in frozen], [start[k][j] for j in frozen])
        assert not _same(now, start[k])  # the trained ones moved


def test_first_order_offload_refuses_an_int8_host_copy():
    from pathlib import Path

    from lowmem.recipe import RecipeError, load_recipe

    path = Path(__file__).resolve().parents[2] / "recipes" / "zo2-nvme-cpu.yaml"
    assert load_recipe(path, ["offload.host_dtype=int8"]).offload.host_dtype == "int8"
    with pytest.raises(RecipeError, match="offload.host_dtype: the first-order offload engine keeps fp32 master"):
        load_recipe(path, ["optim.name=adamw", "offload.host_dtype=int8", "optim.max_grad_norm=null"])
