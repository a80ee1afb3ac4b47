"""The offload fixes of issue #18 on a real GPU (skipped visibly without CUDA): exact-size pinned host
blocks, uploads awaited before host-side writes, the compute lane on the caller's stream, stochastic
rounding on the device."""

import pytest
import torch

from lowmem.offload.engine import ZO2Engine
from lowmem.offload.rounding import stochastic_round_
from lowmem.offload.store import BlockStore
from lowmem.optim import create_optimizer
from tests.offload.helpers import HP, batches, ref_step

pytestmark = pytest.mark.gpu


def test_pinned_blocks_exact_size_and_freed_on_take():
    numels = [1000, 3001, 513]
    store = BlockStore(numels, torch.float16, budget_bytes=None, nvme_dir=None, pin=True, prefetch_depth=1)
    for i, n in enumerate(numels):
        store.put(i, torch.full((n,), float(i), dtype=torch.float16))
    assert all(store._host[i].is_pinned() for i in range(3))
    assert store.memory.pinned_bytes == 2 * sum(numels)  # no power-of-two rounding
    dev = torch.empty(3001, dtype=torch.float16, device="cuda")
    dev.copy_(store._host[1], non_blocking=True)
    torch.cuda.synchronize()
    taken = store.take(1)
    assert not taken.is_pinned() and torch.equal(taken, dev.cpu())
    assert store.memory.pinned_bytes == 2 * (1000 + 513)
    store.close()
    assert store.memory.pinned_bytes == 0


def _pair(tiny_model):
    ref = tiny_model(arch="opt", tied=True, layers=4).cuda().eval()
    model = tiny_model(arch="opt", tied=True, layers=4)
    eng = ZO2Engine(model, create_optimizer(model, "mezo", **HP), device="cuda")
    return ref, create_optimizer(ref, "mezo", **HP), eng


def test_load_after_an_upload_only_pass_then_eval(tiny_model):
    ref, _, eng = _pair(tiny_model)
    data = batches(3)
    eng.eval_loss(data[0])  # uploads only: nothing is written back
    state = {k: v * 0.5 for k, v in eng.model_state_dict().items()}
    eng.load_model_state_dict(state)  # host-side writes while those uploads may still be in flight
    ref.load_state_dict({k: v.cuda() for k, v in state.items()})
    cuda = {k: v.cuda() for k, v in data[1].items()}
    assert torch.equal(eng.eval_loss(data[1]), ref(**cuda, use_cache=False).loss.detach())


def test_step_under_the_callers_stream_equals_mezo(tiny_model):
    ref, ref_opt, eng = _pair(tiny_model)
    stream = torch.cuda.Stream()
    for batch in batches(3):
        with torch.cuda.stream(stream):
            loss = eng.step(batch)
        torch.cuda.current_stream().wait_stream(stream)
        assert torch.equal(ref_step(ref, ref_opt, {k: v.cuda() for k, v in batch.items()}), loss)


def test_stochastic_rounding_on_the_device_is_unbiased_and_seeded():
    x = torch.full((1 << 20,), 1.0 + 2**-12, device="cuda")  # a quarter of the way from 1 to the next fp16
    out, again = (torch.empty_like(x, dtype=torch.float16) for _ in range(2))
    stochastic_round_(out, x, seed=5)
    stochastic_round_(again, x, seed=5)
    assert torch.equal(out, again)
    up = (out.float() > 1).float().mean().item()
    assert abs(up - 0.25) < 0.005
